#!/usr/bin/env bash
# One call on a lent GPU machine (see BENCHMARKS.md): build the CUDA extension for this
# GPU, run every test (GPU tests included), then the profiler summary. Results and logs
# go under $OUT (default ./gpu-out). The machine has torch, triton, pytest,
# pytest-benchmark, rich, tqdm, matplotlib and ninja, and no network.
#   GPU_CHECK_BENCH_ARGS="..."  extra arguments for the profiler
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/environment.txt"

cap=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
echo "== build (sm_${cap/./})"
TORCH_CUDA_ARCH_LIST=$cap RESNET_FAST_BUILD_CUDA=1 MAX_JOBS=16 \
  python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { status=1; tail -30 "$OUT/build.log"; }

echo "== tests"
RESNET_FAST_EXPECT_CUDA_EXT=1 python3 -m pytest tests -q -ra -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== profiler"
python3 -m resnet_fast.bench --json "$OUT/bench.json" ${GPU_CHECK_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
