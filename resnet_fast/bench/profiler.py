"""Training and inference throughput of ResNets: torchvision eager, torch.compile, resnet_fast.

Every variant starts from the same initial weights (torchvision's model is built once
under the seed and its state dict loaded into each variant; for the CIFAR networks,
which torchvision lacks, resnet_fast's own model provides them) and sees the same input
batches, generated once on the device and rotated. The eager and ``compile`` variants of
a CIFAR network are the paper's CIFAR ResNet in plain PyTorch
(:class:`resnet_fast.train.models.TorchCifarResNet`: torchvision's ``BasicBlock`` and
``nn.BatchNorm2d``).

A training step is forward, cross-entropy on random labels, backward, a foreach SGD step
(momentum 0.9, lr 0.1, weight decay 1e-4) and ``zero_grad(set_to_none=True)``; fp16 adds
a GradScaler. A ``+fused`` variant trains with :func:`resnet_fast.nn.enable_fused_training`
(stem included); its inference is the same variant's without it, so it is not measured.
A ``+compile`` variant is the resnet_fast model under ``torch.compile`` (default mode),
built like ``compile`` builds torchvision's, so the two compare like for like in one run;
it composes with ``+fused`` (``resnet_fast:triton+fused+compile``, the fused model compiled).
With ``cuda_graphs`` every compiled variant (default mode, not inductor's own
``reduce-overhead`` graphs) is captured by the profiler like any other.
An inference step is a forward pass in eval mode under ``torch.inference_mode``.
fp16 / bf16 mean ``torch.autocast`` with that dtype.

With ``cuda_graphs`` a GPU step is captured once in a CUDA graph after warm-up on a
side stream (which also autotunes the Triton kernels and cuDNN, so nothing tunes inside
the capture), and each timed step copies its batch into the graph's static input and
replays it. A training graph holds the whole step: forward, loss, backward and the SGD
step, which is then the capturable fused SGD with the learning rate as a device tensor;
under fp16 the GradScaler hands that optimizer its scale and inf flag without a host sync,
so its inf check and scale update are in the graph too. A variant that cannot be captured
is skipped with the error.

On a GPU each timed step sits between two CUDA events and the median is reported; peak
memory is ``torch.cuda.max_memory_allocated`` over the timed steps (under CUDA graphs
``max_memory_reserved`` after emptying the cache, since replays bypass the allocator).
On the CPU each step is timed with ``time.perf_counter``. With ``breakdown`` a few more
steps run under ``torch.profiler`` (:mod:`resnet_fast.bench.trace`).
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn
from tqdm import tqdm

import resnet_fast
from resnet_fast.bench.trace import (
    PROFILED_STEPS,
    Breakdown,
    breakdown_tables,
    prepare_for_graphs,
    profile_steps,
    trace_file,
)
from resnet_fast.ops.dispatch import BACKEND_NAMES, chosen_backend, runs_native
from resnet_fast.runtime import DTYPES, ConfigError, grad_scaler, resolve_device, synchronize
from resnet_fast.runtime import autocast as runtime_autocast
from resnet_fast.runtime import check_dtype_supported as runtime_check_dtype_supported
from resnet_fast.train.models import TorchCifarResNet

IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
MODELS = IMAGENET_MODELS + CIFAR_MODELS
MODES = ("train", "infer", "both")
VARIANT_KINDS = ("eager", "compile", "resnet_fast")
RESNET_FAST_BACKENDS = ("auto", *BACKEND_NAMES)
FUSED_OPTION = "fused"  # ``resnet_fast[:backend]+fused``: fused training
COMPILE_OPTION = "compile"  # ``resnet_fast[:backend]+compile``: torch.compile of the resnet_fast model
VARIANT_OPTIONS = (FUSED_OPTION, COMPILE_OPTION)  # in the order a variant's name spells them
FUSED_INFERENCE_SKIP = ("fused training changes training only: its inference is that of the same "
                        "variant without +fused")

NUM_BATCHES = 3  # input batches rotated through the steps, so no step re-reads the last one's input
Batches = list[tuple[torch.Tensor, torch.Tensor]]  # (images, labels) per batch


@dataclass(frozen=True)
class Defaults:
    """The values used for options the user did not give."""

    model: str
    batch: int
    image_size: int  # for the ImageNet networks; the CIFAR ones always default to 32
    dtype: str
    steps: int
    warmup: int
    compare: str
    channels_last: bool


GPU_DEFAULTS = Defaults(model="resnet50", batch=256, image_size=224, dtype="bf16", steps=50,
                        warmup=10, compare="eager,compile,resnet_fast", channels_last=True)
CPU_DEFAULTS = Defaults(model="resnet18", batch=8, image_size=64, dtype="fp32", steps=3,
                        warmup=1, compare="eager,resnet_fast", channels_last=False)


class BenchConfigError(ConfigError):
    """The requested configuration cannot run (the message says why)."""


@dataclass(frozen=True)
class Variant:
    """One thing to measure: ``eager``, ``compile`` or ``resnet_fast`` with a backend, and
    for ``resnet_fast`` optionally fused training (``+fused``:
    :func:`resnet_fast.nn.enable_fused_training`, training mode only) and ``torch.compile``
    of the model (``+compile``)."""

    name: str
    kind: str
    backend: str | None = None
    fused_training: bool = False
    compiled: bool = False  # resnet_fast under torch.compile (``+compile``)

    @property
    def torch_compiled(self) -> bool:
        """Whether the model runs under ``torch.compile``: torchvision's ``compile`` or a
        ``+compile`` resnet_fast variant."""
        return self.kind == "compile" or self.compiled


@dataclass
class Options:
    """The command line as given: ``None`` means "not given, use the default"."""

    model: str | None = None
    batch: int | None = None
    image_size: int | None = None
    dtype: str | None = None
    mode: str = "both"
    compare: tuple[Variant, ...] | None = None
    steps: int | None = None
    warmup: int | None = None
    channels_last: bool | None = None
    device: str | None = None
    json: str | None = None
    seed: int = 0
    cuda_graphs: bool = False
    plot: str | None = None
    trace: str | None = None
    breakdown: bool = False


@dataclass(frozen=True)
class BenchConfig:
    """A fully resolved benchmark configuration."""

    model: str
    batch: int
    image_size: int
    dtype: str
    modes: tuple[str, ...]
    variants: tuple[Variant, ...]
    steps: int
    warmup: int
    channels_last: bool
    device: str
    seed: int
    json_path: str | None = None
    notice: str | None = None  # printed at the top (e.g. the no-GPU fallback)
    cuda_graphs: bool = False
    plot_path: str | None = None
    trace_dir: str | None = None
    breakdown: bool = False  # profile a few steps per variant and mode (implied by trace_dir)

    @property
    def num_classes(self) -> int:
        """1000 for the ImageNet networks, 10 for the CIFAR ones."""
        return 10 if self.model in CIFAR_MODELS else 1000


@dataclass
class Measurement:
    """The timing of one variant in one mode."""

    variant: str
    mode: str
    timings_ms: list[float]
    median_ms: float
    images_per_s: float
    peak_memory_gib: float | None  # None on the CPU
    compile_s: float | None = None  # first warm-up step of a torch.compile variant
    speedup: float | None = None  # filled in by :func:`assign_speedups`
    baseline: str | None = None
    graph: str | None = None  # what the CUDA graph holds (None: eager steps)
    breakdown: Breakdown | None = None
    label: str | None = None  # the variant as shown, with the backend that ran (see variant_label)
    spread: float | None = None  # (slowest - fastest) / median of the timed steps

    @property
    def shown(self) -> str:
        """The name tables and plots show: :attr:`label`, else the variant's name."""
        return self.label or self.variant


@dataclass
class Skipped:
    """A variant that was not measured, and why."""

    variant: str
    modes: tuple[str, ...]
    reasons: list[str]


@dataclass
class BenchReport:
    """Everything one run produced."""

    config: BenchConfig
    environment: dict[str, object]
    measurements: list[Measurement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """A JSON-serialisable view of the report."""
        config = asdict(self.config)
        config["variants"] = [variant.name for variant in self.config.variants]
        return {
            "config": config,
            "environment": self.environment,
            "results": [asdict(m) for m in self.measurements],
            "skipped": [asdict(s) for s in self.skipped],
        }


# ---------------------------------------------------------------------------------------
# Pure helpers


def parse_variant(text: str) -> Variant:
    """``"eager"``, ``"compile"``, ``"resnet_fast"`` or ``"resnet_fast:<backend>"``, the
    resnet_fast ones optionally with ``"+fused"`` (fused training) and ``"+compile"``
    (``torch.compile`` of the model), in either order, e.g. ``"resnet_fast:triton+fused"``,
    ``"resnet_fast+compile"`` (auto) or ``"resnet_fast:triton+fused+compile"``. The name
    is canonical: ``auto`` left out, ``+fused`` before ``+compile``."""
    text = text.strip()
    spec, *options = text.split("+")
    for option in options:
        if option not in VARIANT_OPTIONS:
            raise BenchConfigError(f"unknown variant option {'+' + option!r} in {text!r}; the options are "
                                   f"+{FUSED_OPTION} (fused training of a resnet_fast variant) and "
                                   f"+{COMPILE_OPTION} (torch.compile of a resnet_fast variant)")
        if options.count(option) > 1:
            raise BenchConfigError(f"variant option +{option} given twice in {text!r}")
    kind, _, backend = spec.partition(":")
    if kind not in VARIANT_KINDS:
        raise BenchConfigError(f"unknown variant {text!r}; choose from eager, compile, resnet_fast, "
                               "resnet_fast:<backend>, each resnet_fast one optionally +fused and/or +compile")
    if kind != "resnet_fast":
        if backend:
            raise BenchConfigError(f"variant {kind!r} takes no backend (got {text!r})")
        if FUSED_OPTION in options:
            raise BenchConfigError(f"+{FUSED_OPTION} is resnet_fast's fused training; {kind!r} has none "
                                   f"(got {text!r})")
        if COMPILE_OPTION in options:
            raise BenchConfigError(f"+{COMPILE_OPTION} compiles a resnet_fast variant; torchvision's model "
                                   f"under torch.compile is the variant 'compile' (got {text!r})")
        return Variant(name=kind, kind=kind)
    backend = backend or "auto"
    if backend not in RESNET_FAST_BACKENDS:
        raise BenchConfigError(f"unknown resnet_fast backend {backend!r} in {text!r}; "
                               f"choose one of {', '.join(RESNET_FAST_BACKENDS)}")
    name = ("resnet_fast" if backend == "auto" else f"resnet_fast:{backend}") + "".join(
        f"+{option}" for option in VARIANT_OPTIONS if option in options)
    return Variant(name=name, kind=kind, backend=backend, fused_training=FUSED_OPTION in options,
                   compiled=COMPILE_OPTION in options)


def parse_variants(text: str) -> tuple[Variant, ...]:
    """A comma-separated list of variants, without duplicates."""
    variants = tuple(parse_variant(part) for part in text.split(",") if part.strip())
    if not variants:
        raise BenchConfigError("--compare needs at least one variant")
    names = [variant.name for variant in variants]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BenchConfigError(f"variant listed twice in --compare: {', '.join(duplicates)}")
    return variants


def median_ms(timings_ms: list[float]) -> float:
    """The median of per-step times in milliseconds."""
    if not timings_ms:
        raise ValueError("no timings to take the median of")
    return float(statistics.median(timings_ms))


def images_per_second(batch: int, step_ms: float) -> float:
    """Throughput of a step that processes ``batch`` images in ``step_ms`` milliseconds."""
    if step_ms <= 0:
        raise ValueError(f"step time must be positive, got {step_ms} ms")
    return batch / (step_ms / 1e3)


def speedup(baseline_ms: float, variant_ms: float) -> float:
    """How many times faster ``variant_ms`` is than ``baseline_ms`` (per-step times)."""
    if variant_ms <= 0:
        raise ValueError(f"step time must be positive, got {variant_ms} ms")
    return baseline_ms / variant_ms


def assign_speedups(measurements: list[Measurement]) -> None:
    """Fill in each measurement's speedup against ``eager`` in the same mode.

    Where ``eager`` was not measured in a mode, the first measured variant of that mode
    is the baseline.
    """
    for mode in dict.fromkeys(m.mode for m in measurements):
        in_mode = [m for m in measurements if m.mode == mode]
        baseline = next((m for m in in_mode if m.variant == "eager"), in_mode[0])
        for m in in_mode:
            m.speedup = speedup(baseline.median_ms, m.median_ms)
            m.baseline = baseline.variant


def timing_spread(timings_ms: list[float]) -> float:
    """(slowest - fastest) / median of the timed steps: 0.2 means the steps ranged over 20%
    of the median."""
    return (max(timings_ms) - min(timings_ms)) / median_ms(timings_ms)


# The operators whose backend a variant's label reports, per mode (fused training: its own).
LABEL_OPERATORS = {"train": ("conv_bn_act", "batch_norm_act"), "infer": ("conv2d_bias_act", "batch_norm_act"),
                   "train+fused": ("conv2d_stats",)}


def backends_that_run(config: BenchConfig, mode: str, fused_training: bool = False) -> list[str]:
    """The backends the current choice runs the model's operators with on this run's device
    and dtype (asked of :func:`resnet_fast.ops.dispatch.chosen_backend`), in first-use order;
    ``["native"]`` when the modules run torchvision's own aten operators there
    (:func:`resnet_fast.ops.dispatch.runs_native`); ``fused_training``: those of a
    fused-training step (``conv2d_stats``), which always runs the fused operators."""
    example = torch.empty(2, 8, 4, 4, device=config.device, dtype=DTYPES[config.dtype])
    if not fused_training and runs_native(example):
        return ["native"]
    names = [chosen_backend(op, example) for op in LABEL_OPERATORS[f"{mode}+fused" if fused_training else mode]]
    return list(dict.fromkeys(name for name in names if name is not None))


def variant_label(variant: Variant, backends_ran: list[str]) -> str:
    """How tables and plots name ``variant``: ``eager`` and ``compile`` as they are; a
    resnet_fast variant (``+compile`` ones too) with the backend(s) that actually ran when
    its name does not say it, e.g. ``resnet_fast (native)`` for ``auto`` on a CPU or
    ``resnet_fast+compile (triton)``. The one place labels are made: new variant kinds
    extend it here."""
    if variant.kind != "resnet_fast" or not backends_ran:
        return variant.name
    ran = "+".join(backends_ran)
    return variant.name if ran == variant.backend else f"{variant.name} ({ran})"


def default_image_size(model: str, defaults: Defaults) -> int:
    """32 for the CIFAR networks, the device's default size for the ImageNet ones."""
    return 32 if model in CIFAR_MODELS else defaults.image_size


def describe_small_config(config: BenchConfig) -> str:
    """The parenthesised summary used in the no-GPU notice."""
    return (f"{config.model}, batch {config.batch}, image {config.image_size}, {config.dtype}, "
            f"{config.steps} timed steps, {config.warmup} warm-up, compare "
            f"{','.join(v.name for v in config.variants)}")


def resolve_config(options: Options, cuda_available: bool, cuda_bf16: bool = True) -> BenchConfig:
    """Fill in defaults and check the combination.

    Without ``--device`` the device is ``cuda`` when one exists, else ``cpu``; the CPU
    gets a small configuration (:data:`CPU_DEFAULTS`) that explicit options override.
    A GPU without bf16 (``cuda_bf16`` false) defaults to fp16, with a notice saying so;
    an explicit bf16 request there is refused by :func:`check_device_support`.
    """
    try:
        device = resolve_device(options.device, cuda_available)
    except ConfigError as error:
        raise BenchConfigError(str(error)) from None
    device_type = torch.device(device).type
    defaults = GPU_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS
    check_extras(options, device_type, cuda_available)

    model = options.model or defaults.model
    modes = ("train", "infer") if options.mode == "both" else (options.mode,)
    batch = options.batch if options.batch is not None else defaults.batch
    if batch < 1:
        raise BenchConfigError(f"--batch must be at least 1, got {batch}")
    if "train" in modes and batch < 2:
        raise BenchConfigError(f"--batch {batch} cannot train: BatchNorm needs more than one "
                               "value per channel; use --batch 2 or more, or --mode infer")
    image_size = options.image_size if options.image_size is not None else default_image_size(model, defaults)
    if image_size < 1:
        raise BenchConfigError(f"--image-size must be positive, got {image_size}")
    steps = options.steps if options.steps is not None else defaults.steps
    warmup = options.warmup if options.warmup is not None else defaults.warmup
    if steps < 1 or warmup < 1:
        raise BenchConfigError("--steps and --warmup must be at least 1 (the first step "
                               "compiles and autotunes; it is never timed)")
    config = BenchConfig(
        model=model,
        batch=batch,
        image_size=image_size,
        dtype=options.dtype or (defaults.dtype if device_type == "cpu" or cuda_bf16 else "fp16"),
        modes=modes,
        variants=options.compare or parse_variants(defaults.compare),
        steps=steps,
        warmup=warmup,
        channels_last=defaults.channels_last if options.channels_last is None else options.channels_last,
        device=device,
        seed=options.seed,
        json_path=options.json,
        cuda_graphs=options.cuda_graphs,
        plot_path=options.plot,
        trace_dir=options.trace,
        breakdown=options.breakdown or options.trace is not None,
    )
    if options.device is None and not cuda_available:
        notice = (f"No CUDA device: running a small CPU configuration ({describe_small_config(config)}); "
                  "GPU numbers need a GPU.")
        config = replace(config, notice=notice)
    elif device_type == "cuda" and options.dtype is None and not cuda_bf16:
        config = replace(config, notice="This GPU has no bf16 support (compute capability below 8.0): "
                                        "using fp16 autocast with a GradScaler; --dtype fp32 for full precision.")
    return config


def check_extras(options: Options, device_type: str, cuda_available: bool) -> None:
    """Refuse --cuda-graphs off a GPU, a --plot path that is not a PNG, a --trace path that is a file."""
    if options.cuda_graphs and device_type != "cuda":
        why = "torch sees no CUDA device" if not cuda_available else "--device selects the CPU"
        raise BenchConfigError(f"--cuda-graphs needs a CUDA device, but this run is on the CPU ({why}); "
                               "CUDA graphs capture GPU kernels")
    if options.plot is not None and Path(options.plot).suffix.lower() != ".png":
        raise BenchConfigError(f"--plot writes a PNG image; give a path ending in .png, got {options.plot!r}")
    if options.trace is not None and Path(options.trace).is_file():
        raise BenchConfigError(f"--trace takes a directory, but {options.trace!r} is a file")


def check_device_support(config: BenchConfig) -> None:
    """Refuse a dtype the device cannot compute in (bf16 on a GPU older than Ampere)."""
    try:
        runtime_check_dtype_supported(config.device, config.dtype)
    except ConfigError as error:
        raise BenchConfigError(str(error)) from None


def skip_reasons(variant: Variant, model: str, info: dict[str, dict]) -> list[str]:
    """Why ``variant`` cannot run for ``model`` here (empty: it can), from ``backend_info()``."""
    if variant.kind == "resnet_fast" and variant.backend != "auto":
        entry = info[variant.backend]
        if not entry["available"]:
            return list(entry["reasons"]) or [f"backend {variant.backend} is not available"]
    return []


# ---------------------------------------------------------------------------------------
# Environment


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def collect_environment(config: BenchConfig, command_line: str) -> dict[str, object]:
    """Versions, device and run settings, for the JSON output and the header line."""
    device = torch.device(config.device)
    on_gpu = device.type == "cuda"
    capability = torch.cuda.get_device_capability(device) if on_gpu else None
    return {
        "command_line": command_line,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": _package_version("triton"),
        "resnet_fast": resnet_fast.__version__,
        "device": config.device,
        "device_name": torch.cuda.get_device_name(device) if on_gpu else cpu_name(),
        "capability": f"{capability[0]}.{capability[1]}" if capability else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "cpu_threads": torch.get_num_threads(),
        "dtype": config.dtype,
        "batch": config.batch,
        "image_size": config.image_size,
        "channels_last": config.channels_last,
        "seed": config.seed,
        "cuda_graphs": config.cuda_graphs,
        "resnet_fast_backends": resnet_fast.backend_info(),
    }


def environment_line(env: dict[str, object]) -> str:
    """One line saying what was measured where."""
    device = f"{env['device']} ({env['device_name']}"
    device += f", sm {env['capability']})" if env["capability"] else ")"
    return (f"device {device} | torch {env['torch']} | dtype {env['dtype']} | batch {env['batch']} "
            f"| image {env['image_size']} | channels_last {'on' if env['channels_last'] else 'off'}"
            f"{' | CUDA graphs' if env['cuda_graphs'] else ''}")


# ---------------------------------------------------------------------------------------
# Models and inputs


def initial_state(config: BenchConfig) -> dict[str, torch.Tensor]:
    """The initial weights every variant starts from, built once under the seed."""
    torch.manual_seed(config.seed)
    if config.model in CIFAR_MODELS:
        reference = getattr(resnet_fast, config.model)(num_classes=config.num_classes)
    else:
        reference = getattr(torchvision.models, config.model)(weights=None, num_classes=config.num_classes)
    return reference.state_dict()


def build_model(config: BenchConfig, variant: Variant, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh model for ``variant`` holding ``state``, on the device, compiled if asked."""
    if variant.kind == "resnet_fast":
        model = getattr(resnet_fast, config.model)(num_classes=config.num_classes)
    elif config.model in CIFAR_MODELS:
        model = TorchCifarResNet(int(config.model.removeprefix("resnet")), config.num_classes)
    else:
        model = getattr(torchvision.models, config.model)(weights=None, num_classes=config.num_classes)
    model.load_state_dict(state, strict=True)
    if variant.fused_training:
        resnet_fast.nn.enable_fused_training(model)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(device=config.device, memory_format=memory_format)
    return torch.compile(model) if variant.torch_compiled else model


def make_batches(config: BenchConfig) -> Batches:
    """A few random-normal image batches and integer labels, generated on the device."""
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    shape = (config.batch, 3, config.image_size, config.image_size)
    batches = []
    for _ in range(NUM_BATCHES):
        images = torch.randn(shape, generator=generator, device=config.device)
        labels = torch.randint(0, config.num_classes, (config.batch,), generator=generator,
                               device=config.device)
        batches.append((images.contiguous(memory_format=memory_format), labels))
    return batches


# ---------------------------------------------------------------------------------------
# Steps and timing

Step = Callable[[int], None]  # step ``i`` uses batch ``i % len(batches)``


class CaptureError(RuntimeError):
    """A step could not be captured in a CUDA graph (the message says why)."""


def _nothing() -> None:
    """No work: the tail or reset of a step that has none."""


@dataclass(frozen=True)
class StepPlan:
    """One step, split where a CUDA graph has to end.

    ``body`` takes one batch (images, labels) and is what a graph captures; ``tail`` runs
    after it on every step (work that syncs the host); ``reset`` runs after eager steps and
    so before a capture, never inside a graph, whose replays overwrite the gradients
    instead of accumulating them. ``captured`` says what ``body`` does.
    """

    body: Callable[[torch.Tensor, torch.Tensor], None]
    tail: Callable[[], None]
    reset: Callable[[], None]
    captured: str


def autocast(config: BenchConfig) -> torch.autocast:
    """Autocast to the configured dtype (disabled for fp32).

    Its weight-cast cache is off under CUDA graphs, as ``torch.cuda.graph`` requires.
    """
    return runtime_autocast(config.device, config.dtype, cache_enabled=not config.cuda_graphs)


def make_optimizer(model: nn.Module, config: BenchConfig) -> torch.optim.SGD:
    """SGD (momentum 0.9, lr 0.1, weight decay 1e-4): foreach (torch's CUDA default) on every
    device, one well-defined step named _foreach_* in profiles; under CUDA graphs the capturable
    form, fused with the learning rate as a device tensor."""
    if config.cuda_graphs:
        return torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1, device=config.device), momentum=0.9,
                               weight_decay=1e-4, fused=True)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)


def make_train_plan(model: nn.Module, config: BenchConfig) -> StepPlan:
    """Forward, cross-entropy, backward, SGD step (GradScaler under fp16), zero_grad."""
    model.train()
    optimizer = make_optimizer(model, config)
    scaler = grad_scaler(config.device, config.dtype)

    def forward_backward(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(config):
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()

    def optimizer_step() -> None:
        scaler.step(optimizer)
        scaler.update()

    def reset() -> None:
        optimizer.zero_grad(set_to_none=True)

    if scaler.is_enabled() and not config.cuda_graphs:  # foreach SGD: the scaler's inf check syncs
        return StepPlan(forward_backward, optimizer_step, reset,
                        captured="forward, loss and backward; the GradScaler's inf check syncs the host, "
                                 "so its SGD step runs eagerly after each replay")

    def whole_step(images: torch.Tensor, labels: torch.Tensor) -> None:
        forward_backward(images, labels)
        optimizer_step()

    scaled = ", with the GradScaler's inf check and update" if scaler.is_enabled() else ""
    sgd = "fused SGD step (learning rate a device tensor)" if config.cuda_graphs else "SGD step"
    return StepPlan(whole_step, _nothing, reset, captured=f"forward, loss, backward and {sgd}{scaled}")


def make_infer_plan(model: nn.Module, config: BenchConfig) -> StepPlan:
    """A forward pass in eval mode under ``torch.inference_mode``."""
    model.eval()

    def forward(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.inference_mode(), autocast(config):
            model(images)

    return StepPlan(forward, _nothing, _nothing, captured="forward")


def eager_step(plan: StepPlan, batches: Batches) -> Step:
    """The plan run op by op."""

    def step(i: int) -> None:
        plan.body(*batches[i % len(batches)])
        plan.tail()
        plan.reset()

    return step


def describe_error(error: BaseException) -> str:
    """The first line of ``error``'s message and of each exception it arose from (as a
    traceback would show them), first cause first."""
    lines: list[str] = []
    current: BaseException | None = error
    while current is not None:
        message = str(current).strip()
        lines.append(f"{type(current).__name__}: {message.splitlines()[0] if message else '(no message)'}")
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return " -> ".join(reversed(lines))


def capture(plan: StepPlan, static_batch: tuple[torch.Tensor, torch.Tensor]) -> torch.cuda.CUDAGraph:
    """Capture ``plan.body`` on ``static_batch``; any failure becomes a :class:`CaptureError`."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            plan.body(*static_batch)
    except Exception as error:  # whatever stops the capture skips the variant
        torch.cuda.set_stream(stream)  # a failed capture leaves torch.cuda.graph's own stream current
        raise CaptureError(f"CUDA graph capture failed: {describe_error(error)}") from error
    return graph


def graphed_step(plan: StepPlan, batches: Batches, warmup: int, device: torch.device,
                 progress: tqdm) -> tuple[Step, float]:
    """Warm up eagerly on a side stream, capture the plan, and return a replaying step.

    The step copies its batch into the graph's static input, replays the graph and runs
    ``plan.tail``. Also returns the first warm-up step's wall time in seconds.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        first_step_s = warm_up(eager_step(plan, batches), warmup, device, progress)
    torch.cuda.current_stream(device).wait_stream(side)
    static_batch = tuple(tensor.clone() for tensor in batches[0])
    graph = capture(plan, static_batch)

    def step(i: int) -> None:
        for static, tensor in zip(static_batch, batches[i % len(batches)]):
            static.copy_(tensor)
        graph.replay()
        plan.tail()

    return step, first_step_s


def warm_up(step: Step, count: int, device: torch.device, progress: tqdm) -> float:
    """Run ``count`` untimed steps; return the wall time of the first (compilation) in seconds."""
    first_s = 0.0
    for i in range(count):
        start = time.perf_counter()
        step(i)
        synchronize(device)
        if i == 0:
            first_s = time.perf_counter() - start
        progress.update()
    return first_s


def time_steps(step: Step, count: int, device: torch.device, progress: tqdm) -> list[float]:
    """Per-step times in ms: CUDA events on a GPU, ``time.perf_counter`` on the CPU."""
    if device.type == "cuda":
        events = []
        for i in range(count):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            events.append((start, end))
            progress.update()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    timings = []
    for i in range(count):
        start_s = time.perf_counter()
        step(i)
        timings.append((time.perf_counter() - start_s) * 1e3)
        progress.update()
    return timings


@contextmanager
def resnet_fast_backend(variant: Variant) -> Iterator[None]:
    """Select the variant's resnet_fast backend for the duration, then restore the choice."""
    previous = resnet_fast.get_backend()
    if variant.backend is not None:
        resnet_fast.set_backend(variant.backend)
    try:
        yield
    finally:
        resnet_fast.set_backend(previous)


def release_memory(device: torch.device) -> None:
    """Free what the last variant left, so the next one's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def start_steps(config: BenchConfig, plan: StepPlan, batches: Batches, progress: tqdm) -> tuple[Step, float]:
    """Warm up, eagerly or into a CUDA graph; the step to time and the first warm-up step's seconds."""
    device = torch.device(config.device)
    if config.cuda_graphs:
        return graphed_step(plan, batches, config.warmup, device, progress)
    step = eager_step(plan, batches)
    return step, warm_up(step, config.warmup, device, progress)


def reset_peak_memory(device: torch.device, graphs: bool) -> None:
    """Count peak memory afresh; under CUDA graphs first release the blocks the eager warm-up cached."""
    if device.type == "cuda":
        if graphs:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device, graphs: bool) -> float | None:
    """Peak memory since :func:`reset_peak_memory` (None on the CPU).

    Allocated memory for eager steps; reserved memory under CUDA graphs, whose replays
    use the graph's private pool without going through the allocator.
    """
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_reserved(device) if graphs else torch.cuda.max_memory_allocated(device)
    return peak / 2**30


def measure(config: BenchConfig, variant: Variant, mode: str, state: dict[str, torch.Tensor],
            batches: Batches) -> Measurement:
    """Warm up, then time ``config.steps`` steps of ``variant`` in ``mode`` on a fresh model.

    With ``config.breakdown``, a few more steps (as many as were timed, at most
    :data:`~resnet_fast.bench.trace.PROFILED_STEPS`) are profiled afterwards.
    """
    device = torch.device(config.device)
    model = build_model(config, variant, state)
    plan = (make_train_plan if mode == "train" else make_infer_plan)(model, config)
    with tqdm(total=config.warmup + config.steps, desc=f"{variant.name} {mode}", unit="step",
              file=sys.stderr, leave=False) as progress:
        step, first_step_s = start_steps(config, plan, batches, progress)
        reset_peak_memory(device, config.cuda_graphs)
        timings = time_steps(step, config.steps, device, progress)
    peak = peak_memory_gib(device, config.cuda_graphs)
    median = median_ms(timings)
    trace_path = trace_file(config.trace_dir, variant.name, mode) if config.trace_dir else None
    return Measurement(
        variant=variant.name,
        label=variant_label(variant, backends_that_run(config, mode, variant.fused_training)),
        spread=timing_spread(timings),
        mode=mode,
        timings_ms=timings,
        median_ms=median,
        images_per_s=images_per_second(config.batch, median),
        peak_memory_gib=peak,
        compile_s=first_step_s if variant.torch_compiled else None,
        graph=plan.captured if config.cuda_graphs else None,
        breakdown=profile_steps(step, device, trace_path, min(config.steps, PROFILED_STEPS))
        if config.breakdown else None,
    )


def run_variant(config: BenchConfig, variant: Variant, state: dict[str, torch.Tensor],
                batches: Batches, report: BenchReport) -> None:
    """Measure ``variant`` in every configured mode, recording a skip where its backend refuses
    or its CUDA graph cannot be captured."""
    device = torch.device(config.device)
    for mode in config.modes:
        if variant.fused_training and mode != "train":
            report.skipped.append(Skipped(variant.name, (mode,), [FUSED_INFERENCE_SKIP]))
            continue
        try:
            with resnet_fast_backend(variant):
                report.measurements.append(measure(config, variant, mode, state, batches))
        except (resnet_fast.BackendUnavailableError, CaptureError) as error:
            report.skipped.append(Skipped(variant.name, (mode,), [str(error)]))
        finally:
            release_memory(device)


def on_device(device: torch.device) -> ContextManager[object]:
    """Make ``device`` the current CUDA device (streams, events, graphs); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def run_benchmark(config: BenchConfig, command_line: str) -> BenchReport:
    """Measure every variant of ``config`` in every mode."""
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    report = BenchReport(config=config, environment=collect_environment(config, command_line))
    info = report.environment["resnet_fast_backends"]
    with on_device(device):
        if config.cuda_graphs and config.breakdown:
            prepare_for_graphs(device)
        state = initial_state(config)
        batches = make_batches(config)
        for variant in config.variants:
            reasons = skip_reasons(variant, config.model, info)
            if reasons:
                report.skipped.append(Skipped(variant.name, config.modes, reasons))
            else:
                run_variant(config, variant, state, batches, report)
    assign_speedups(report.measurements)
    report.environment["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return report


# ---------------------------------------------------------------------------------------
# Output


def results_table(report: BenchReport) -> Table:
    """The summary table: one row per measured variant and mode."""
    baselines = sorted({m.baseline for m in report.measurements if m.baseline})
    graphs = " (CUDA graphs)" if report.config.cuda_graphs else ""
    table = Table(title=f"{report.config.model} throughput{graphs}", title_justify="left")
    # the labels are never shortened: a narrow terminal shortens the numbers' headers instead
    label_width = max((len(m.shown) for m in report.measurements), default=0)
    for header in ("variant", "mode", "images/s", "ms/step (median)", "spread", "peak memory (GiB)",
                   "compile (s)", f"speedup vs {'/'.join(baselines) or 'eager'}"):
        justify = "left" if header in ("variant", "mode") else "right"
        table.add_column(header, justify=justify, no_wrap=True, min_width=label_width if header == "variant" else None)
    for m in report.measurements:
        table.add_row(m.shown, m.mode, f"{m.images_per_s:,.1f}", f"{m.median_ms:.2f}",
                      "-" if m.spread is None else f"{m.spread:.0%}",
                      "n/a" if m.peak_memory_gib is None else f"{m.peak_memory_gib:.2f}",
                      "-" if m.compile_s is None else f"{m.compile_s:.1f}",
                      f"{m.speedup:.2f}x")
    return table


def graph_notes(measurements: list[Measurement]) -> list[str]:
    """One line per mode saying what its CUDA graphs hold (none for eager steps)."""
    held = {m.mode: m.graph for m in measurements if m.graph is not None}
    return [f"CUDA graph ({mode}): {graph}" for mode, graph in held.items()]


def harness_check_note(report: BenchReport) -> str | None:
    """On the CPU: the numbers check that the harness runs, they are not a performance
    result (None on a GPU)."""
    if torch.device(report.config.device).type != "cpu":
        return None
    spreads = [m.spread for m in report.measurements if m.spread is not None]
    spread = f"; steps ranged over up to {max(spreads):.0%} of their median" if spreads else ""
    return (f"CPU run: a harness check (models build, steps run, numbers come out), not a performance "
            f"result: {report.config.steps} timed step(s) per variant{spread}. Measure on a GPU "
            "(--steps 50 or more) for speedups that mean something.")


def print_report(report: BenchReport, console: Console) -> None:
    """The environment line, the results table (the spread column: (slowest - fastest) /
    median of the timed steps), the CPU harness-check note, what the graphs hold, the
    breakdown and the skipped variants."""
    console.print(environment_line(report.environment), highlight=False)
    if report.measurements:
        console.print(results_table(report))
    else:
        console.print("No variant could be measured.")
    note = harness_check_note(report)
    if note:
        console.print(note, style="yellow", highlight=False, markup=False)
    for note in graph_notes(report.measurements):
        console.print(note, highlight=False, markup=False)
    if any(m.breakdown is not None for m in report.measurements):
        for table in breakdown_tables(report.measurements):
            console.print(table)
    for skipped in report.skipped:
        console.print(f"skipped {skipped.variant} ({', '.join(skipped.modes)}): "
                      + "; ".join(skipped.reasons), highlight=False, markup=False)


def write_json(report: BenchReport, path: str) -> None:
    """Write the machine-readable report to ``path``."""
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
