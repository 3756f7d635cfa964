#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA extension for this GPU, run every test
# (GPU tests included), the benchmark suite's fast path (bf16, channels_last) with its
# Markdown report, and the profiler. The machine has torch, triton, pytest,
# pytest-benchmark, rich, tqdm, matplotlib and ninja, and no network.
#
#   scripts/gpu_check.sh [STAGE ...]    stages: build tests bench convs cudnn profile (default: all)
#   OUT=dir                             results (default ./gpu-out)
#   GPU_CHECK_BENCH_K="bf16-nhwc"       pytest -k filter for the benchmark suite
#   GPU_CHECK_PROFILE_ARGS="..."        extra profiler arguments
#
# Extra Python packages travel as wheels in the git-ignored .whl/ folder at the repository
# root (the machine has no network): `cudnn` (the cuDNN fused-engine race,
# benchmarks/bench_cudnn_fused.py) needs nvidia-cudnn-frontend. Here, once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl nvidia-cudnn-frontend
# and pass `.whl` in the device call's carry; every wheel found there is installed (no
# dependencies, into /tmp/site on PYTHONPATH) before the stages run. Without it the
# race's cuDNN cases skip with the reason and ours are still timed.
#
# The stage limits add up to more than one device call's 10 minutes: the first call on a
# lent GPU should run `build tests`, a second `build bench profile`, a third `build convs`
# (the per-layer convolutions, benchmarks/bench_conv2d.py, whose max-autotune compiles
# take minutes), a fourth `build cudnn` (a new machine starts bare, so each call builds;
# a warm one rebuilds nothing).
#
# What comes back under $OUT (a handful of files, as the device tool returns at most 8):
# summary.txt, tests.log, BENCHMARKS.md, BENCHMARKS-convs.md, cudnn.log, profile.json, and
# gpu-results.tar.gz with every log, JSON file and plot.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/plots"
export PYTHONUNBUFFERED=1
stages=${*:-build tests bench convs cudnn profile}
status=0

note() { echo "$*" | tee -a "$OUT/summary.txt"; }
run_stage() {  # run_stage NAME SECONDS COMMAND...: time-limited, logged, failure noted
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  note "$name: exit $rc in $((SECONDS - start)) s"
  tail -15 "$WORK/$name.log"
  [ $rc -eq 0 ] || status=1
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__)"
} 2>&1 | tee "$OUT/summary.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} && note "installed $(ls .whl)" \
    || note "installing the carried wheels failed"
fi
cap=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")

for stage in $stages; do
  case $stage in
    build)
      run_stage build 300 env TORCH_CUDA_ARCH_LIST="$cap" RESNET_FAST_BUILD_CUDA=1 MAX_JOBS=16 \
        python3 setup.py build_ext --inplace ;;
    tests)
      # The GPU-marked tests (the cuda backend's ones need the extension); CI runs the rest.
      run_stage tests 480 env RESNET_FAST_EXPECT_CUDA_EXT=1 python3 -m pytest tests -q -ra \
        -m gpu -p no:cacheprovider --junitxml="$WORK/tests.xml"
      cp "$WORK/tests.log" "$OUT/tests.log" ;;
    bench)
      for level in "batch_norm_act conv_bn_act" blocks models; do
        files=$(for f in $level; do echo "benchmarks/bench_$f.py"; done)
        name=bench-${level%% *}
        k="${GPU_CHECK_BENCH_K:-bf16-nhwc}"
        [ "$level" = models ] && k="$k and (resnet50- or resnet56-)"
        # shellcheck disable=SC2086
        run_stage "$name" 240 python3 -m pytest $files -m gpu -k "$k" -q -rs -p no:cacheprovider \
          --benchmark-quiet --benchmark-json="$WORK/$name.json"
      done
      run_stage report 60 python3 -m resnet_fast.bench.report "$WORK"/bench-*.json \
        -o "$OUT/BENCHMARKS.md" --plots "$WORK/plots" ;;
    convs)
      run_stage bench-conv2d 540 python3 -m pytest benchmarks/bench_conv2d.py -m gpu -q -rs -p no:cacheprovider \
        --benchmark-quiet --benchmark-json="$WORK/bench-conv2d.json"
      run_stage report-convs 60 python3 -m resnet_fast.bench.report "$WORK/bench-conv2d.json" \
        -o "$OUT/BENCHMARKS-convs.md" --plots "$WORK/plots" ;;
    cudnn)
      run_stage cudnn 420 python3 -m pytest benchmarks/bench_cudnn_fused.py -m gpu -q -rs -p no:cacheprovider \
        --benchmark-quiet --benchmark-json="$WORK/cudnn-race.json"
      cp "$WORK/cudnn.log" "$OUT/cudnn.log" ;;
    profile)
      # shellcheck disable=SC2086
      run_stage profile 300 python3 -m resnet_fast.bench --json "$OUT/profile.json" \
        --plot "$WORK/plots/profile.png" \
        ${GPU_CHECK_PROFILE_ARGS:---compare eager,compile,resnet_fast:triton,resnet_fast:cuda} ;;
    *) note "unknown stage $stage"; status=1 ;;
  esac
done

tar czf "$OUT/gpu-results.tar.gz" -C "$WORK" .
note "overall: $([ $status -eq 0 ] && echo ok || echo FAILED)"
exit $status
