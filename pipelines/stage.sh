#!/bin/sh
# Run one pipeline stage with Firesight's Python, whatever `python` is first on PATH (dvc.yaml: `sh pipelines/stage.sh
# ingest`): $FIRESIGHT_PYTHON when set, else this checkout's .venv (made by ./setup.sh), else python3 (an image with
# Firesight installed, e.g. infra/Dockerfile).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
python=${FIRESIGHT_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then
    python=$root/.venv/bin/python
  else
    python=python3
    if ! "$python" -c "import importlib.metadata as m; m.version('firesight')" >/dev/null 2>&1; then
      echo "firesight $1: error: no Python with Firesight installed: run ./setup.sh (it makes .venv), or set FIRESIGHT_PYTHON" >&2
      exit 2
    fi
  fi
fi
exec "$python" -m "pipelines.$1"
