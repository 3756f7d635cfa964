#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Arguments go to pytest.
# Where nvcc is present the CUDA extension must have been built: its tests then assert it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if command -v nvcc >/dev/null 2>&1 && [ "${RESNET_FAST_BUILD_CUDA:-}" != "0" ]; then
  export RESNET_FAST_EXPECT_CUDA_EXT=1
fi
# -rfE: failures and errors in the short summary (their tracebacks print in full above it);
# skips are summarised by tests/conftest.py, one line per reason.
exec "${VENV:-.venv}/bin/python" -m pytest tests -q -rfE "$@"
