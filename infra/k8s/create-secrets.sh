#!/usr/bin/env bash
# Create or update the firesight namespace's Secrets from an env file laid out like secrets.example.env: each
# "# Secret <name>" line starts the KEY=value lines of one Secret. An empty value is refused. Values are never
# printed and never appear on a command line (kubectl reads them from a private temporary file).
set -euo pipefail
env_file=${1:?usage: create-secrets.sh infra/k8s/secrets.env}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 700 "$tmp"
names=() name=""
while IFS= read -r line || [ -n "$line" ]; do
  if [[ $line =~ ^#\ Secret\ ([a-z0-9-]+) ]]; then
    name=${BASH_REMATCH[1]}
    names+=("$name")
    : > "$tmp/$name"
  elif [[ $line =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
    [ -n "$name" ] || { echo "create-secrets.sh: ${BASH_REMATCH[1]} comes before any '# Secret <name>' line" >&2; exit 2; }
    [ -n "${BASH_REMATCH[2]}" ] || { echo "create-secrets.sh: ${BASH_REMATCH[1]} of Secret $name is empty" >&2; exit 2; }
    printf '%s\n' "$line" >> "$tmp/$name"
  fi
done < "$env_file"
[ ${#names[@]} -gt 0 ] || { echo "create-secrets.sh: no '# Secret <name>' line in $env_file" >&2; exit 2; }
for name in "${names[@]}"; do
  kubectl -n firesight create secret generic "$name" --from-env-file="$tmp/$name" --dry-run=client -o yaml \
    | kubectl apply -f -
done
