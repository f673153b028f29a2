#!/usr/bin/env bash
# An MLflow tracking server with proxied artifacts: clients log models and files through it and never need
# storage credentials. Defaults: the same sqlite store and ./mlartifacts the embedded default writes, on
# 127.0.0.1:5000. For S3 artifacts: ARTIFACTS_DESTINATION=s3://bucket/mlflow with AWS_ENDPOINT_URL (MinIO or any
# S3-compatible endpoint) and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment.
# Auth: with MLFLOW_AUTH_ADMIN_PASSWORD set (12+ characters; and MLFLOW_FLASK_SERVER_SECRET_KEY) it runs MLflow's
# basic-auth app (needs `.venv/bin/pip install 'mlflow[auth]'`): every request needs a user, the admin is
# MLFLOW_AUTH_ADMIN_USERNAME (default admin), settings from MLFLOW_AUTH_CONFIG_PATH (default: MLflow's own, users
# in ./basic_auth.db). Clients set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
# Binds 127.0.0.1 unless HOST is set; it refuses a HOST beyond loopback without auth.
# Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:${PORT:-5000}
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-127.0.0.1}
auth=()
if [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]; then auth=(--app-name basic-auth); fi
case "$HOST" in
  127.*|localhost|::1) ;;
  *) if [ ${#auth[@]} -eq 0 ]; then
       echo "mlflow-server.sh: refusing to listen on $HOST without auth: set MLFLOW_AUTH_ADMIN_PASSWORD and" \
            "MLFLOW_FLASK_SERVER_SECRET_KEY (MLflow's basic-auth app), or leave HOST unset for 127.0.0.1" >&2
       exit 2
     fi ;;
esac
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false   # the job runner costs ~2 GB of memory and is unused here
if [ -n "${AWS_ENDPOINT_URL:-}" ]; then export MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL:-$AWS_ENDPOINT_URL}"; fi
exec .venv/bin/mlflow server "${auth[@]}" \
  --backend-store-uri "${BACKEND_STORE_URI:-sqlite:///mlflow.db}" \
  --artifacts-destination "${ARTIFACTS_DESTINATION:-./mlartifacts}" \
  --host "$HOST" --port "${PORT:-5000}" --workers "${WORKERS:-1}"
