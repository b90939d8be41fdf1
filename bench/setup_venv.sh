#!/usr/bin/env bash
# Creates bench/.venv with the Python peers and interop checkers (PyPI only): torch,
# pytorch-lightning, tensorboard, numpy. Idempotent: does nothing when they import.
set -euo pipefail
cd "$(dirname "$0")"
if .venv/bin/python -c "import torch, pytorch_lightning, tensorboard, numpy" 2>/dev/null; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q numpy tensorboard safetensors torch pytorch-lightning
.venv/bin/python -c "import torch, pytorch_lightning, tensorboard; print('bench venv: torch', torch.__version__, \
'lightning', pytorch_lightning.__version__, 'tensorboard', tensorboard.__version__)"
