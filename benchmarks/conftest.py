"""The benchmark suite's shared machinery: ``python -m pytest benchmarks --benchmark-json=R.json``.

Levels and files: ``op`` (``bench_batch_norm_act.py``, ``bench_conv_bn_act.py``,
``bench_conv2d.py``),
``block`` (``bench_blocks.py``) and ``model`` (``bench_models.py``). A bench function
declares its cases with ``@pytest.mark.bench(level=..., gpu_cases=..., cpu_cases=...,
passes=...)``; :func:`pytest_generate_tests` turns that into one benchmark per target,
case, pass and variant, with ids such as ``bn_relu[bf16-nhwc-256x256x56x56-fwd-eager]``.

Variants, measured in the same session from the same weights and inputs:

* ``eager`` — stock PyTorch: ``nn.BatchNorm2d`` + add + ``relu``, torchvision's blocks and
  models;
* ``compile`` — ``torch.compile`` (default mode, unless the case names another) of the eager
  module; dynamo is reset before each, so every case compiles afresh for its own static
  shapes;
* ``rf_<backend>`` — resnet_fast's fused module with ``resnet_fast.set_backend(<backend>)``,
  for every backend of ``resnet_fast.backend_info()``; one that is unavailable, or lacks
  an operator the case needs, is skipped with its reasons as the skip reason;
* ``rf_<backend>_fused`` (variant ``resnet_fast:<backend>+fused``) — the same with fused
  training (:func:`resnet_fast.nn.enable_fused_training`: ``conv2d_stats`` epilogues and
  BatchNorm+ReLU prologues), in the ``train`` pass of the benches whose marker says
  ``fused_training=True`` (blocks and models).

Targets: on a GPU (marked ``gpu``; skipped without CUDA) fp32, fp16 and bf16 (autocast,
float32 parameters) in NCHW and channels_last, at batch ``RESNET_FAST_BENCH_BATCH``
(default 256); the CPU smoke run (not marked) is fp32 NCHW at tiny shapes, without
``compile``, so CI exercises the whole harness in seconds.

Timing: pytest-benchmark's own timer would read the host clock around asynchronous
launches. Instead each case runs through ``benchmark.pedantic`` with one call per round,
and that call (:meth:`resnet_fast.bench.timing.Timer.timed_call`) times itself with CUDA
events and waits for its end event; the median of those event times is
``extra_info["median_ms"]``, which the report uses. Warm-up calls (compilation, cuDNN
autotuning with ``cudnn.benchmark``) come first and are not timed; input sets rotate. See
:mod:`resnet_fast.bench.timing`.

``extra_info`` of every benchmark: level, bench, case (the key shared by the variants
compared), variant, device, dtype, layout, shape, pass, median_ms, times_ms, timer,
rounds, input_sets, peak_memory_bytes, resident_bytes, and speedup_vs_eager /
speedup_vs_compile (baseline ms / this ms, from baselines measured earlier in the
session); blocks and models add images_per_s; operators add bytes_moved, gb_per_s,
copy_gb_per_s, floor_ms and floor_multiple (convolutions also flops, tflops and
matmul_tflops).

Environment variables: ``RESNET_FAST_BENCH_BATCH`` (GPU batch, default 256),
``RESNET_FAST_BENCH_WARMUP`` / ``RESNET_FAST_BENCH_ROUNDS`` (GPU untimed / timed calls,
default 5 / 20).
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast.bench.profiler import cpu_name, images_per_second, speedup
from resnet_fast.bench.timing import (
    DTYPES,
    INFER,
    LAYOUTS,
    TRAIN,
    BenchSpec,
    Measurement,
    Step,
    Target,
    TimingSettings,
    copy_bandwidth,
    floor_ms,
    floor_multiple,
    gb_per_s,
    matmul_flop_rate,
    measure,
    shape_id,
)
from resnet_fast.ops.dispatch import BACKEND_NAMES


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    value = int(os.environ.get(name, default))
    if value < minimum:
        raise pytest.UsageError(f"{name} must be at least {minimum}, got {value}")
    return value


BATCH = _env_int("RESNET_FAST_BENCH_BATCH", 256)
TIMING = {
    "cuda": TimingSettings(warmup=_env_int("RESNET_FAST_BENCH_WARMUP", 5),
                           rounds=_env_int("RESNET_FAST_BENCH_ROUNDS", 20)),
    "cpu": TimingSettings(warmup=1, rounds=3),
}
INPUT_SETS = 3  # rotated, so no timed call finds its input in the cache
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 26}  # size of the copy that measures bandwidth
MATMUL_SIZE = {"cuda": 8192, "cpu": 512}

VARIANTS = ("eager", "compile", *(f"resnet_fast:{backend}" for backend in BACKEND_NAMES))
FUSED_TRAINING_VARIANTS = tuple(f"resnet_fast:{backend}+fused" for backend in BACKEND_NAMES)
FUSED_TRAINING_OPERATORS = ("conv2d_stats",)  # what fused training needs beyond the default path
GPU_TARGETS = [Target("cuda", dtype, layout) for dtype in DTYPES for layout in LAYOUTS]
CPU_TARGET = Target("cpu", "fp32", "nchw")
GPU_MARKS = (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


# ---------------------------------------------------------------------------------------
# Parametrization


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "bench(level, gpu_cases, cpu_cases, passes, gpu_targets=all, fused_training=False): a "
        "resnet_fast benchmark; gpu_cases(batch) and cpu_cases give the cases (each with an ``id``), passes the "
        "passes to time, fused_training adds the +fused variants to the train pass")
    config.stash[SESSION] = BenchSession()
    if not torch.cuda.is_available():
        # Only the CPU smoke run can run: it checks the harness, not CPU speed, and one
        # intra-op thread keeps it quick where other work keeps OpenMP threads waiting.
        torch.set_num_threads(1)


def bench_specs(level: str, bench: str, gpu_cases: Callable[[int], list[Any]], cpu_cases: list[Any],
                passes: tuple[str, ...], gpu_targets: Sequence[Target] = tuple(GPU_TARGETS),
                fused_training: bool = False) -> list[BenchSpec]:
    """Every target x case x pass x variant, ``eager`` first within each case (``gpu_targets``:
    the GPU targets, all of :data:`GPU_TARGETS` unless the bench marker names fewer;
    ``fused_training``: the ``train`` pass also times :data:`FUSED_TRAINING_VARIANTS`)."""
    runs = [(target, gpu_cases(BATCH)) for target in gpu_targets] + [(CPU_TARGET, cpu_cases)]

    def variants(pass_: str) -> tuple[str, ...]:
        return VARIANTS + (FUSED_TRAINING_VARIANTS if fused_training and pass_ == TRAIN else ())

    return [BenchSpec(level, bench, case, target, pass_, variant)
            for target, cases in runs for case in cases for pass_ in passes for variant in variants(pass_)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``spec`` of every function marked ``bench``."""
    marker = metafunc.definition.get_closest_marker("bench")
    if marker is None:
        return
    bench = metafunc.function.__name__.removeprefix("test_")
    specs = bench_specs(bench=bench, **marker.kwargs)
    metafunc.parametrize("spec", [
        pytest.param(spec, id=spec.id, marks=GPU_MARKS if spec.target.device == "cuda" else ())
        for spec in specs
    ])


# ---------------------------------------------------------------------------------------
# Session state


class BenchSession:
    """What the benchmarks of one pytest session share: the medians measured so far (for
    the speedups), the device ceilings (measured once each) and the skip reasons."""

    def __init__(self) -> None:
        self.medians: dict[str, dict[str, float]] = {}
        self.ceilings: dict[str, dict[str, float]] = {}
        self.skipped: Counter[str] = Counter()
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # as the profiler: autotuned convolutions

    def _ceiling(self, device: str, name: str, measure_it: Callable[[], float]) -> float:
        values = self.ceilings.setdefault(device, {})
        if name not in values:
            values[name] = measure_it()
        return values[name]

    def copy_bandwidth(self, device: str) -> float:
        """Bytes/s of a large device-to-device copy (read + written), measured once."""
        return 1e9 * self._ceiling(device, "copy_gb_per_s",
                                   lambda: copy_bandwidth(device, COPY_BYTES[device]) / 1e9)

    def matmul_flop_rate(self, device: str, dtype: str) -> float:
        """FLOP/s of a large matrix product in ``dtype`` ("bf16", ...), measured once per dtype."""
        return 1e12 * self._ceiling(device, f"matmul_tflops_{dtype}",
                                    lambda: matmul_flop_rate(device, DTYPES[dtype], MATMUL_SIZE[device]) / 1e12)

    def speedups(self, spec: BenchSpec, median: float) -> dict[str, float]:
        """Record ``median`` for ``spec``; its speedups against eager and compile when measured."""
        medians = self.medians.setdefault(spec.key, {})
        medians[spec.variant] = median
        return {f"speedup_vs_{base}": speedup(medians[base], median)
                for base in ("eager", "compile") if base in medians}

    def environment(self, config: pytest.Config) -> dict[str, Any]:
        """Versions, devices, settings, ceilings, backends and skips, for the JSON's machine_info."""
        on_gpu = torch.cuda.is_available()
        return {
            "command": shlex.join(["python", "-m", "pytest", *config.invocation_params.args]),
            "bench_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RESNET_FAST_")},
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "triton": _package_version("triton"),
            "resnet_fast": resnet_fast.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if on_gpu else None,
            "gpu": torch.cuda.get_device_name() if on_gpu else None,
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if on_gpu else None,
            "driver": _nvidia_driver() if on_gpu else None,
            "cpu": cpu_name(),
            "cpu_threads": torch.get_num_threads(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
            "settings": {"batch": BATCH, "input_sets": INPUT_SETS,
                         **{f"{device}_{k}": v for device, s in TIMING.items() for k, v in vars(s).items()}},
            "ceilings": self.ceilings,
            "backends": {name: resnet_fast.backend_info()[name] for name in BACKEND_NAMES},
            "skipped": dict(self.skipped),
        }


SESSION = pytest.StashKey[BenchSession]()


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi`` (None where it cannot say)."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, check=False)
    return result.stdout.splitlines()[0].strip() if result.returncode == 0 and result.stdout else None


@pytest.fixture(scope="session")
def bench_session(pytestconfig: pytest.Config) -> BenchSession:
    """The session's :class:`BenchSession`."""
    return pytestconfig.stash[SESSION]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Add the resnet_fast environment to the ``--benchmark-json`` output."""
    machine_info["resnet_fast"] = config.stash[SESSION].environment(config)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    """Count each benchmark's skip reason, for the report's "not measured" list."""
    report = yield
    if report.skipped and item.get_closest_marker("bench") and isinstance(report.longrepr, tuple):
        item.config.stash[SESSION].skipped[report.longrepr[2].removeprefix("Skipped: ")] += 1
    return report


# ---------------------------------------------------------------------------------------
# Running one case


@dataclass(frozen=True)
class Workload:
    """What a bench function supplies for one case.

    ``build_eager`` / ``build_fused`` build the eager and the resnet_fast module (on the
    CPU, in float32; the harness places them and gives the fused one the eager weights);
    ``make_inputs`` makes one random input set; ``forward(module, inputs)`` is the forward
    pass; ``train_step(module, target)`` makes the ``train`` pass's step. ``shape`` is the
    input shape; ``operators`` the resnet_fast operators the fused module needs;
    ``bytes_moved`` / ``flops`` (operators only) the floor's counts; ``compile_mode`` the
    ``torch.compile`` mode of the ``compile`` variant (None: the default mode).
    """

    build_eager: Callable[[], nn.Module]
    build_fused: Callable[[], nn.Module]
    make_inputs: Callable[[], Any]
    forward: Callable[[nn.Module, Any], Any]
    train_step: Callable[[nn.Module, Target], Step]
    shape: tuple[int, ...]
    operators: tuple[str, ...]
    bytes_moved: int | None = None
    flops: float | None = None
    compile_mode: str | None = None


def skip_reason(spec: BenchSpec, operators: tuple[str, ...]) -> str | None:
    """Why ``spec`` cannot be measured here (None: it can)."""
    target = spec.target
    if target.device == "cuda" and target.dtype == "bf16" and not torch.cuda.is_bf16_supported(
            including_emulation=False):
        return "bf16 needs a GPU with native bf16 (compute capability 8.0 or newer)"
    if spec.variant == "compile" and target.device == "cpu":
        return "torch.compile is not timed in the CPU smoke run (compilation would dominate it)"
    if spec.backend is None:
        return None
    info = resnet_fast.backend_info()[spec.backend]
    if not info["available"]:
        return f"resnet_fast backend {spec.backend!r} is unavailable: " + "; ".join(info["reasons"])
    needed = (*operators, *FUSED_TRAINING_OPERATORS) if spec.fused_training else operators
    missing = [op for op in needed if op not in info["operators"]]
    if missing:
        return f"resnet_fast backend {spec.backend!r} does not implement {', '.join(missing)}"
    return None


def place(module: nn.Module, target: Target) -> nn.Module:
    """``module`` on the target's device, its convolution weights in the target's layout."""
    return module.to(device=target.device, memory_format=target.memory_format)


def build_variant(spec: BenchSpec, workload: Workload) -> nn.Module:
    """The module of ``spec.variant`` on the target, all variants holding the same (seeded) weights."""
    torch.manual_seed(0)
    eager = workload.build_eager()
    if spec.variant == "eager":
        return place(eager, spec.target)
    if spec.variant == "compile":
        torch._dynamo.reset()  # no recompile limit or dynamic shapes carried over from other cases
        return torch.compile(place(eager, spec.target), mode=workload.compile_mode)
    fused = workload.build_fused()
    fused.load_state_dict(eager.state_dict())
    if spec.fused_training:
        resnet_fast.nn.enable_fused_training(fused)
    return place(fused, spec.target)


def make_step(module: nn.Module, spec: BenchSpec, workload: Workload) -> Step:
    """The timed call of ``spec.pass_``: an inference forward, a training forward, or a training step."""
    target = spec.target
    if spec.pass_ == INFER:
        module.eval()

        def infer(inputs: Any) -> None:
            with torch.inference_mode(), target.autocast():
                workload.forward(module, inputs)

        return infer
    module.train()
    if spec.pass_ == TRAIN:
        return workload.train_step(module, target)

    def forward(inputs: Any) -> None:
        with target.autocast():
            workload.forward(module, inputs)

    return forward


@contextmanager
def selected_backend(backend: str | None) -> Iterator[None]:
    """Select a resnet_fast backend for the duration (nothing for None), then restore the choice."""
    previous = resnet_fast.get_backend()
    if backend is not None:
        resnet_fast.set_backend(backend)
    try:
        yield
    finally:
        resnet_fast.set_backend(previous)


def release_memory() -> None:
    """Free what the last GPU case left, so the next one's peak memory is its own."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def measure_case(benchmark: Any, spec: BenchSpec, workload: Workload) -> Measurement:
    """Build the variant and its input sets, then time ``spec.pass_`` on them."""
    module = build_variant(spec, workload)
    torch.manual_seed(1)
    inputs = [workload.make_inputs() for _ in range(INPUT_SETS)]
    step = make_step(module, spec, workload)
    with selected_backend(spec.backend):
        return measure(benchmark, step, inputs, spec.target.device, TIMING[spec.target.device])


def level_metrics(session: BenchSession, spec: BenchSpec, workload: Workload, median: float) -> dict[str, float]:
    """Images/s for blocks and models; bytes, GB/s and the floor for operators."""
    if spec.level != "op":
        return {"images_per_s": images_per_second(workload.shape[0], median)}
    device, nbytes, flops = spec.target.device, workload.bytes_moved, workload.flops
    bandwidth = session.copy_bandwidth(device)
    rate = session.matmul_flop_rate(device, spec.target.dtype) if flops else None
    floor = floor_ms(nbytes, bandwidth, flops or 0.0, rate)
    metrics = {"bytes_moved": nbytes, "gb_per_s": gb_per_s(nbytes, median), "copy_gb_per_s": bandwidth / 1e9,
               "floor_ms": floor, "floor_multiple": floor_multiple(median, floor)}
    if flops:
        metrics |= {"flops": flops, "tflops": flops / (median / 1e3) / 1e12, "matmul_tflops": rate / 1e12}
    return metrics


def device_name(device: str) -> str:
    """The GPU's name, or the processor's."""
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def case_info(session: BenchSession, spec: BenchSpec, workload: Workload, m: Measurement) -> dict[str, Any]:
    """The ``extra_info`` of one measured case (see the module docstring)."""
    median = m.median_ms
    return {
        "level": spec.level, "bench": spec.bench, "case": spec.key, "variant": spec.variant,
        "device": device_name(spec.target.device), "dtype": spec.target.dtype, "layout": spec.target.layout,
        "shape": shape_id(workload.shape), "pass": spec.pass_,
        "median_ms": median, "times_ms": list(m.times_ms), "timer": m.timer, "rounds": len(m.times_ms),
        "input_sets": INPUT_SETS, "peak_memory_bytes": m.peak_memory_bytes, "resident_bytes": m.resident_bytes,
        **level_metrics(session, spec, workload, median),
        **session.speedups(spec, median),
    }


def run_case(benchmark: Any, session: BenchSession, spec: BenchSpec, **fields: Any) -> None:
    """Measure one case (``fields`` are :class:`Workload`'s), or skip it with the reason.

    A backend that refuses the call (``BackendUnavailableError``) or a device out of memory
    skips the case with the error's message.
    """
    workload = Workload(**fields)
    reason = skip_reason(spec, workload.operators)
    if reason is not None:
        pytest.skip(reason)
    benchmark.group = spec.key  # pytest-benchmark's table puts the variants of a case together
    try:
        measurement = measure_case(benchmark, spec, workload)
    except (resnet_fast.BackendUnavailableError, torch.cuda.OutOfMemoryError) as error:
        reason = f"{spec.variant}: {type(error).__name__}: {error}"
    else:
        benchmark.extra_info.update(case_info(session, spec, workload, measurement))
        return
    release_memory()  # the failed case's tensors went with its frames
    pytest.skip(reason)


@pytest.fixture
def run_bench(benchmark: Any, bench_session: BenchSession) -> Iterator[Callable[..., None]]:
    """``run_bench(spec, **workload_fields)``: measure a case (:func:`run_case`)."""
    yield partial(run_case, benchmark, bench_session)
    release_memory()


# ---------------------------------------------------------------------------------------
# Operators and blocks: modules called on activations


class ActivationInputs(NamedTuple):
    """One input set of an operator or block: its arguments and, for ``train``, dy."""

    args: tuple[torch.Tensor, ...]
    grad: torch.Tensor | None


def gradient_step(module: nn.Module, target: Target) -> Step[ActivationInputs]:
    """Forward, then the gradients of every input and parameter for a random dy
    (``torch.autograd.grad``: nothing accumulates between calls)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step(inputs: ActivationInputs) -> None:
        with target.autocast():
            out = module(*inputs.args)
        torch.autograd.grad(out, [*inputs.args, *params], inputs.grad)

    return step


@pytest.fixture
def run_module_bench(run_bench: Callable[..., None]) -> Callable[..., None]:
    """``run_module_bench(spec, shape=, output_shape=, residual=, build_eager=, build_fused=,
    operators=, bytes_moved=None, flops=None)``: an operator or block case, called as
    ``module(x)`` or (``residual=True``) ``module(x, r)`` on random activations: x of
    ``shape``, r and dy of ``output_shape``."""

    def run(spec: BenchSpec, *, shape: tuple[int, ...], output_shape: tuple[int, ...], residual: bool,
            **fields: Any) -> None:
        target, needs_grad = spec.target, spec.pass_ != INFER

        def make_inputs() -> ActivationInputs:
            x = target.randn(shape, requires_grad=needs_grad)
            extra = (target.randn(output_shape, requires_grad=needs_grad),) if residual else ()
            return ActivationInputs((x, *extra), target.randn(output_shape) if spec.pass_ == TRAIN else None)

        run_bench(spec, make_inputs=make_inputs, forward=lambda module, inputs: module(*inputs.args),
                  train_step=gradient_step, shape=shape, **fields)

    return run
