#!/usr/bin/env bash
# The GPU check: one call on a lent GPU builds the extension for that GPU, runs the kernel
# check, model parity, the headline throughput, the primitives against the bandwidth floor
# and the remaining GPU tests, under a deadline it never overruns.
#
# Whoever has a GPU runs it first, as ONE device call (the machine's start, a minute or more,
# comes out of the same 15 minutes, and one command may run at most 10):
#
#   run(command="bash scripts/gpu_check.sh", timeout_s=560)
#
#   bash scripts/gpu_check.sh [--deadline S] [--dry-run]    OUT=dir (default $OUT, else gpu-out)
#
# The driver is `python -m resnet_fast.bench.gpu_check` (stages, budgets, what each records:
# see its docstring); the default deadline is 480 s, so a 560 s device timeout leaves room to
# fetch the files. Stages in order of value, each under its own budget, a stage that would
# not fit skipped and recorded as skipped: environment -> build (this GPU's architecture,
# all cores) -> kernel check (`python -m resnet_fast.check` where it exists, else the
# GPU-marked kernel tests; RESNET_FAST_AUTOTUNE=0) -> model parity (one training step vs
# float64 and eager; ResNet-20 trained on scikit-learn's digits, fused vs eager) -> headline
# (ResNet-50 bf16: eager, native, triton, cuda, fused training; fp16; ResNet-50 at batch 32
# and ResNet-20 at batch 128 with and without CUDA graphs; torch.compile) -> primitives ->
# remaining GPU tests.
#
# What comes back in $OUT (at most 8 files, none in sub-folders), each written as it grows,
# so a kill keeps every finished result:
#   results.jsonl            one record per line, appended the moment each result exists
#   summary.md               readable, one part per stage, then the overall verdict
#   check.log                the output of every process
#   <gpu>-<yyyymmdd>.json    the results document (rewritten after each stage)
#   BENCHMARKS.md            generated from the document;  plots.tar.gz: its PNG plots
#
# Then, on the development machine:
#   cp <files_at>/<gpu>-<yyyymmdd>.json benchmarks/results/
#   python -m resnet_fast.bench.report benchmarks/results/*.json -o BENCHMARKS.md --plots benchmarks/results/
#   git add benchmarks/results BENCHMARKS.md     # the document is the source of truth
# The kernel check is `python -m resnet_fast.check`: a backend that passes gets a validation
# record, kept in the document under "self_checks"; written out as
# resnet_fast/validation_records/<name>.json and committed (only for the code that ran), it
# lets `auto` choose that backend on GPUs of that kind (the self-check issue).
#
# Extra Python packages travel as wheels in the git-ignored .whl/ folder at the repository
# root (the machine has no network); pass `.whl` in the device call's carry and every wheel
# there is installed (no dependencies, into /tmp/site on PYTHONPATH) before the check.
#
# CI runs `python -m resnet_fast.bench.gpu_check --dry-run` (tests/test_gpu_check.py): every
# stage on the CPU at tiny shapes, the same files in the same format, labelled as a dry run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} && echo "installed $(ls .whl)" \
    || echo "installing the carried wheels failed"
fi
exec python3 -m resnet_fast.bench.gpu_check --out "$OUT" "$@"
