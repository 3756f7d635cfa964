"""A run's settings: a recipe's defaults with the command line's overrides, checked."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from resnet_fast.ops.dispatch import BACKEND_NAMES, machine_reasons
from resnet_fast.runtime import DTYPES, ConfigError, check_dtype_supported, resolve_device
from resnet_fast.train.models import check_model_name, cifar_depth
from resnet_fast.train.recipes import RECIPES

BACKENDS = ("auto", *BACKEND_NAMES)
DEFAULT_SYNTHETIC_BATCHES = 50  # global batches per synthetic epoch
DEFAULT_PLATEAU_PATIENCE = 5


@dataclass
class Options:
    """The command line as given: ``None`` means "the recipe's default"."""

    recipe: str
    model: str | None = None
    data: str | None = None
    out: str | None = None
    iterations: int | None = None
    epochs: int | None = None
    milestones: tuple[int, ...] | None = None
    batch_size: int | None = None
    accumulate: int = 1
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    plateau: bool = False
    plateau_patience: int = DEFAULT_PLATEAU_PATIENCE
    warmup: bool | None = None
    image_size: int | None = None
    num_classes: int | None = None
    synthetic_images: int | None = None
    workers: int = 4
    dtype: str | None = None
    channels_last: bool | None = None
    backend: str = "auto"
    eager: bool = False
    compile: bool = False
    fused_training: bool | None = None  # None: resnet_fast.nn.fused_training_defaults decides
    cuda_graphs: bool = False
    sync_bn: bool = False
    resume: str | None = None
    seed: int = 0
    device: str | None = None
    val_split: int = 0
    ten_crop: bool = False
    stop_after: int | None = None
    log_every: int = 50
    deterministic: bool = False
    progress: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """A fully resolved run. ``length`` and ``milestones`` count ``unit`` s (iterations or epochs)."""

    recipe: str
    model: str
    data_kind: str
    data: str | None
    out: Path
    batch_size: int  # global: over all processes and accumulation steps
    accumulate: int
    lr: float
    momentum: float
    weight_decay: float
    unit: str
    length: int
    milestones: tuple[int, ...]
    lr_decay: float
    plateau: bool
    plateau_patience: int
    warmup: bool
    image_size: int
    num_classes: int
    synthetic_images: int
    workers: int
    dtype: str
    channels_last: bool
    backend: str
    eager: bool
    compile: bool
    fused_training: bool | None
    cuda_graphs: bool
    sync_bn: bool
    resume: str | None
    seed: int
    device: str
    val_split: int
    ten_crop: bool
    stop_after: int | None
    log_every: int
    deterministic: bool
    progress: bool

    # Settings a resumed run must share with its checkpoint: they fix the trajectory.
    TRAJECTORY = ("recipe", "model", "batch_size", "accumulate", "lr", "momentum", "weight_decay", "unit",
                  "length", "milestones", "lr_decay", "plateau", "plateau_patience", "warmup", "image_size",
                  "num_classes", "synthetic_images", "eager", "seed", "val_split")

    def trajectory(self) -> dict[str, Any]:
        """The settings in :attr:`TRAJECTORY`, as plain values."""
        values = asdict(self)
        return {key: list(values[key]) if isinstance(values[key], tuple) else values[key] for key in self.TRAJECTORY}

    def describe(self) -> str:
        """One line per group of settings, for the start of the log."""
        length = f"{self.length} {self.unit}"
        decay = ("on plateau" if self.plateau
                 else f"x{self.lr_decay} at {', '.join(map(str, self.milestones))} {self.unit}" if self.milestones
                 else "constant")
        return "\n".join([
            f"recipe {self.recipe} | model {self.model} ({'eager PyTorch' if self.eager else 'resnet_fast'}"
            f"{'' if self.eager else ', backend ' + self.backend}{_FUSED_TRAINING_NOTE[self.fused_training]}"
            f"{', torch.compile' if self.compile else ''}{', CUDA graphs' if self.cuda_graphs else ''})",
            f"batch {self.batch_size}{f' in {self.accumulate} accumulation steps' if self.accumulate > 1 else ''} "
            f"| SGD lr {self.lr} momentum {self.momentum} weight decay {self.weight_decay} | {length}, lr {decay}"
            f"{' | warm-up at lr/10 until training error < 80%' if self.warmup else ''}",
            f"device {self.device} | dtype {self.dtype} | channels_last {'on' if self.channels_last else 'off'} "
            f"| seed {self.seed} | output {self.out}",
        ])


_FUSED_TRAINING_NOTE = {None: "", True: ", fused training", False: ", fused training off"}


def check_cuda_graphs(options: Options, device: str, world_size: int) -> None:
    """Refuse ``--cuda-graphs`` where the whole step cannot be captured, naming the combination."""
    if not options.cuda_graphs:
        return
    if torch.device(device).type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA device, but this run is on {device} (CUDA graphs "
                          "capture GPU kernels); drop --cuda-graphs or train on a GPU")
    if options.compile:
        raise ConfigError("--cuda-graphs cannot be combined with --compile: torch.compile captures its own "
                          "graphs (mode='reduce-overhead'); choose one")
    if world_size > 1:
        raise ConfigError(f"--cuda-graphs with {world_size} processes: capturing DistributedDataParallel's "
                          "gradient all-reduce is not supported; run one process or drop --cuda-graphs")


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"--{name} must be positive, got {value}")


def resolve_config(options: Options, cuda_available: bool, cuda_bf16: bool, world_size: int = 1,
                   local_rank: int = 0) -> TrainConfig:
    """Fill in the recipe's defaults and check the combination.

    Without ``--device`` a process uses ``cuda`` (``cuda:LOCAL_RANK`` under torchrun) when
    there is a GPU, else the CPU. ``--iterations`` / ``--epochs`` without ``--milestones``
    keep the recipe's milestones at the same fractions of the run.
    """
    if options.recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {options.recipe!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[options.recipe]
    requested = options.device
    if requested is None and cuda_available and world_size > 1:
        requested = f"cuda:{local_rank}"
    device = resolve_device(requested, cuda_available)
    on_gpu = torch.device(device).type == "cuda"
    dtype = options.dtype or ("fp32" if not on_gpu else "bf16" if cuda_bf16 else "fp16")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_dtype_supported(device, dtype, cuda_bf16)

    model = options.model or recipe.model
    check_model_name(model)
    if options.backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {options.backend!r}")
    if not options.eager and options.backend not in ("auto", "torch"):
        unavailable = machine_reasons(options.backend, device)
        if unavailable:
            raise ConfigError(f"--backend {options.backend} cannot run on {device}: {'; '.join(unavailable)} "
                              "(--backend auto runs what this machine can)")

    if options.iterations is not None and options.epochs is not None:
        raise ConfigError("give --iterations or --epochs, not both")
    for name in ("iterations", "epochs", "batch_size", "lr", "image_size", "num_classes", "synthetic_images",
                 "accumulate", "log_every", "plateau_patience", "stop_after"):
        _positive(name.replace("_", "-"), getattr(options, name))
    if options.momentum is not None and options.momentum < 0 or options.weight_decay is not None and \
            options.weight_decay < 0:
        raise ConfigError("--momentum and --weight-decay must not be negative")
    unit, length = recipe.unit, recipe.length
    if options.iterations is not None:
        unit, length = "iterations", options.iterations
    elif options.epochs is not None:
        unit, length = "epochs", options.epochs
    if options.milestones is not None:
        milestones = tuple(options.milestones)
    elif unit == recipe.unit:
        milestones = recipe.scaled_milestones(length)
    else:
        raise ConfigError(f"the {recipe.name} recipe's milestones count {recipe.unit}; with --{unit} give "
                          f"--milestones in {unit} too")
    if list(milestones) != sorted(set(milestones)) or any(m < 1 for m in milestones):
        raise ConfigError(f"--milestones must be increasing positive {unit}, got {','.join(map(str, milestones))}")

    batch_size = options.batch_size or recipe.batch_size
    if batch_size % (world_size * options.accumulate):
        raise ConfigError(f"--batch-size {batch_size} must be divisible by processes x --accumulate "
                          f"({world_size} x {options.accumulate})")
    if batch_size // (world_size * options.accumulate) < 2:
        raise ConfigError(f"--batch-size {batch_size} leaves fewer than 2 images per BatchNorm batch over "
                          f"{world_size} process(es) and --accumulate {options.accumulate}; BatchNorm needs 2")

    depth = cifar_depth(model)
    image_size = options.image_size or (32 if depth is not None and recipe.data != "cifar10" else recipe.image_size)
    if recipe.data == "cifar10" and options.image_size not in (None, 32):
        raise ConfigError("CIFAR-10 images are 32x32; --image-size cannot change that")
    num_classes = options.num_classes or (10 if depth is not None else recipe.num_classes)
    if recipe.data != "synthetic" and options.num_classes is not None:
        raise ConfigError("--num-classes is for the synthetic recipe; the data set's classes decide otherwise")
    if options.val_split and recipe.data != "cifar10":
        raise ConfigError("--val-split holds out CIFAR-10 training images; the imagenet recipe evaluates val/")
    if options.ten_crop and recipe.data != "imagefolder":
        raise ConfigError("--ten-crop is for the imagenet recipe's validation")
    if options.workers < 0:
        raise ConfigError(f"--workers must not be negative, got {options.workers}")
    if options.compile and options.deterministic:
        raise ConfigError("--deterministic cannot be combined with --compile (inductor's kernels are not "
                          "covered by torch.use_deterministic_algorithms)")
    if options.fused_training and options.eager:
        raise ConfigError("--fused-training is resnet_fast's convolution fusion; --eager trains the plain "
                          "PyTorch model, which has none: drop one of them")
    check_cuda_graphs(options, device, world_size)
    warmup = options.warmup if options.warmup is not None else model in recipe.warmup_models

    return TrainConfig(
        recipe=recipe.name, model=model, data_kind=recipe.data, data=options.data,
        out=Path(options.out or f"runs/{recipe.name}-{model}"),
        batch_size=batch_size, accumulate=options.accumulate,
        lr=options.lr if options.lr is not None else recipe.lr,
        momentum=options.momentum if options.momentum is not None else recipe.momentum,
        weight_decay=options.weight_decay if options.weight_decay is not None else recipe.weight_decay,
        unit=unit, length=length, milestones=milestones, lr_decay=recipe.lr_decay,
        plateau=options.plateau, plateau_patience=options.plateau_patience, warmup=warmup,
        image_size=image_size, num_classes=num_classes,
        synthetic_images=options.synthetic_images or DEFAULT_SYNTHETIC_BATCHES * batch_size,
        workers=options.workers, dtype=dtype,
        channels_last=options.channels_last if options.channels_last is not None else on_gpu,
        backend=options.backend, eager=options.eager, compile=options.compile,
        fused_training=options.fused_training, cuda_graphs=options.cuda_graphs, sync_bn=options.sync_bn,
        resume=options.resume, seed=options.seed, device=device, val_split=options.val_split,
        ten_crop=options.ten_crop, stop_after=options.stop_after, log_every=options.log_every,
        deterministic=options.deterministic, progress=options.progress,
    )
