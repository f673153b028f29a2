#!/usr/bin/env bash
# An MLflow tracking server over the same sqlite store the embedded default writes, with proxied artifacts.
# Binds 127.0.0.1 unless HOST is set. Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:${PORT:-5000}
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false   # the job runner costs ~2 GB of memory and is unused here
exec .venv/bin/mlflow server \
  --backend-store-uri "${BACKEND_STORE_URI:-sqlite:///mlflow.db}" \
  --artifacts-destination "${ARTIFACTS_DESTINATION:-./mlartifacts}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}"
