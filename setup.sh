#!/usr/bin/env bash
# Creates .venv with PyTorch and the project's requirements. On a machine without an NVIDIA GPU it
# installs the CPU build of torch (a few hundred MB), never the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install "torch>=2.6"
  else
    "${PIP[@]}" install --timeout 30 --retries 1 --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" "torch>=2.6"
  fi
fi
"${PIP[@]}" install -q -r requirements.txt
# Hugging Face's `kernels` wheel, for tests/test_package.py only (installed into that test's scratch venv, never
# into .venv: its import name is what our installed package must not collide with)
ls .cache/wheels/kernels-*.whl >/dev/null 2>&1 || "${PIP[@]}" download -q --no-deps -d .cache/wheels "kernels==0.17.2"
.venv/bin/python -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())"
