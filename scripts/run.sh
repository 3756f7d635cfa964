#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the training-throughput profiler.
# Arguments go to `python -m resnet_fast.bench` (see --help). Without a GPU it runs a
# small CPU configuration and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m resnet_fast.bench "$@"
