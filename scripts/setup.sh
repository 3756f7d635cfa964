#!/usr/bin/env bash
# Create .venv (once) with torch, torchvision and the test tools, and install resnet_fast
# into it in editable mode, compiling the CUDA extension when nvcc is present.
# Idempotent: a later run reinstalls resnet_fast only when its build inputs changed.
#   VENV=path        where the virtual environment lives (default .venv)
#   RESNET_FAST_BUILD_CUDA=0|1, TORCH_CUDA_ARCH_LIST, MAX_JOBS: see setup.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
PIP=("$VENV/bin/python" -m pip)

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  # torch and torchvision built for each other (a CUDA build on x86_64, so the extension
  # compiles); see README "Installing".
  case "$(uname -m)" in
    x86_64) TORCH_PINS=(torch==2.14.1 torchvision==0.29.1) ;;
    *) TORCH_PINS=(torch==2.9.1 torchvision==0.24.1) ;;
  esac
  echo "[setup] installing ${TORCH_PINS[*]} (large; once)"
  "${PIP[@]}" install -q "${TORCH_PINS[@]}"
fi

# The editable install compiles the CUDA extension from scratch (minutes), so redo it
# only when what it builds from, or how, has changed.
stamp_file="$VENV/.resnet_fast-build-stamp"
stamp="$(cat setup.py pyproject.toml resnet_fast/_build.py csrc/* | sha256sum | cut -c1-16)"
stamp="$stamp:${RESNET_FAST_BUILD_CUDA:-}:${TORCH_CUDA_ARCH_LIST:-}:$PWD"
if [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] && (cd / && "$VENV/bin/python" -c "import resnet_fast") 2>/dev/null; then
  echo "[setup] resnet_fast is installed and its build inputs are unchanged"
else
  echo "[setup] installing resnet_fast (editable, compiling the CUDA extension when nvcc is found)"
  MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" install -q --no-build-isolation -e ".[test]"
  echo "$stamp" >"$stamp_file"
fi
# What was built and what can run here (the full report: python -m resnet_fast.info).
"$VENV/bin/python" -m resnet_fast.info --short | sed 's/^/[setup] /'
