#!/usr/bin/env bash
# An MLflow tracking server with proxied artifacts: clients log models and files through it and never need
# storage credentials. Defaults: the same sqlite store and ./mlartifacts the embedded default writes, on
# 127.0.0.1:5000. For S3 artifacts: ARTIFACTS_DESTINATION=s3://bucket/mlflow with AWS_ENDPOINT_URL (MinIO or any
# S3-compatible endpoint) and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment.
# Binds 127.0.0.1 unless HOST is set. Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:${PORT:-5000}
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false   # the job runner costs ~2 GB of memory and is unused here
if [ -n "${AWS_ENDPOINT_URL:-}" ]; then export MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL:-$AWS_ENDPOINT_URL}"; fi
exec .venv/bin/mlflow server \
  --backend-store-uri "${BACKEND_STORE_URI:-sqlite:///mlflow.db}" \
  --artifacts-destination "${ARTIFACTS_DESTINATION:-./mlartifacts}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" --workers "${WORKERS:-1}"
