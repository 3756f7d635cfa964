"""``python -m resnet_fast.train`` / ``resnet-fast-train``: parse the command line and run."""

from __future__ import annotations

import argparse
import sys

import torch

from resnet_fast.runtime import DTYPES, ConfigError
from resnet_fast.train.config import BACKENDS, DEFAULT_PLATEAU_PATIENCE, Options, resolve_config
from resnet_fast.train.loop import Processes, Trainer
from resnet_fast.train.recipes import RECIPES


def _milestones(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; ``None`` defaults come from the recipe."""
    parser = argparse.ArgumentParser(
        prog="resnet-fast-train",
        description="Train the ResNets of He et al. 2015 with resnet_fast's fused kernels (or eager PyTorch). "
                    "Recipes: cifar10 (§4.2), imagenet (§3.4), synthetic (on-device random data, for profiling). "
                    "Several processes: torchrun --nproc-per-node N -m resnet_fast.train ...")
    parser.add_argument("recipe", choices=tuple(RECIPES), help="training recipe")
    add = parser.add_argument
    add("--data", help="data folder: CIFAR-10 python batches (cifar-10-batches-py) or an ImageFolder tree with "
                       "train/ and val/ (nothing downloads)")
    add("--out", help="output folder for checkpoint.pt, metrics.csv, curves.png, summary.json "
                      "(default runs/<recipe>-<model>)")
    add("--model", help="resnet18/34/50/101/152, or a CIFAR ResNet resnet<6n+2> (resnet20 ... resnet1202); "
                        "default resnet20 (cifar10), resnet50 (imagenet, synthetic)")
    add("--iterations", type=int, help="train this many iterations (cifar10 default 64000, synthetic 200)")
    add("--epochs", type=int, help="train this many epochs (imagenet default 90)")
    add("--milestones", type=_milestones, metavar="LIST",
        help="comma list of iterations or epochs (as the run counts) where the learning rate is divided by 10 "
             "(default the recipe's, scaled to --iterations / --epochs)")
    add("--plateau", action="store_true",
        help="divide the learning rate by 10 when the evaluation error stops improving, instead of milestones")
    add("--plateau-patience", type=int, default=DEFAULT_PLATEAU_PATIENCE,
        help=f"epochs without improvement before --plateau decays (default {DEFAULT_PLATEAU_PATIENCE})")
    add("--batch-size", type=int, help="global batch over all processes (cifar10 128, imagenet/synthetic 256)")
    add("--accumulate", type=int, default=1,
        help="split each process's batch into this many chunks and add their gradients (default 1)")
    add("--lr", type=float, help="base learning rate (default 0.1)")
    add("--momentum", type=float, help="SGD momentum (default 0.9)")
    add("--weight-decay", type=float, help="weight decay (default 1e-4)")
    add("--warmup", action=argparse.BooleanOptionalAction,
        help="train at lr/10 until the training error is below 80%% (default: only resnet110 on cifar10)")
    add("--image-size", type=int, help="training crop size (imagenet/synthetic default 224; CIFAR models 32)")
    add("--num-classes", type=int, help="classes of the synthetic recipe (default 1000; 10 for CIFAR models)")
    add("--synthetic-images", type=int, help="images per synthetic epoch (default 50 batches)")
    add("--val-split", type=int, default=0,
        help="cifar10: hold out the last N training images for validation (the paper's 45k/5k: 5000)")
    add("--ten-crop", action="store_true", help="imagenet: evaluate on ten crops instead of the centre crop")
    add("--workers", type=int, default=4, help="data-loader worker processes per process (default 4)")
    add("--dtype", choices=tuple(DTYPES),
        help="fp32, or mixed precision bf16 / fp16 (GradScaler); default bf16 on GPUs that have it, fp16 on "
             "older GPUs, fp32 on the CPU")
    add("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC model and inputs (default on GPUs)")
    add("--backend", choices=BACKENDS, default="auto", help="resnet_fast backend (default auto)")
    add("--eager", action="store_true", help="train the plain PyTorch (torchvision) model instead, for comparison")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--fused-training", action=argparse.BooleanOptionalAction,
        help="train with the convolution fusion (resnet_fast.nn.enable_fused_training, stem included): each "
             "convolution gives its BatchNorm's statistics, the next applies that BatchNorm and ReLU while "
             "loading; --no-fused-training never (default: where measured faster on this GPU and dtype)")
    add("--cuda-graphs", action="store_true",
        help="capture the whole training step (forward, backward, fused SGD step with the learning rate as a "
             "tensor; GradScaler under fp16) in a CUDA graph after a few eager warm-up steps on a side stream, "
             "and replay it (GPU only; one process; not with --compile)")
    add("--sync-bn", action="store_true", help="synchronize BatchNorm statistics over all processes")
    add("--resume", metavar="PATH",
        help="continue from a checkpoint (a checkpoint.pt, or the --out folder) with the same settings; a longer "
             "--iterations / --epochs extends the run, finished or not, with the milestones of the new length "
             "(the recipe's scaled to it, or --milestones) and the learning rate they give at the checkpoint")
    add("--stop-after", type=int, metavar="ITERATION",
        help="checkpoint and stop at this iteration, as if interrupted; --resume continues exactly")
    add("--seed", type=int, default=0, help="seed for weights, data order and augmentation (default 0)")
    add("--device", help="cpu, cuda or cuda:N (default cuda:LOCAL_RANK if there is a GPU, else cpu)")
    add("--log-every", type=int, default=50, help="iterations per training-metrics row (default 50)")
    add("--deterministic", action="store_true",
        help="torch.use_deterministic_algorithms(True) and no cuDNN autotuning (slower)")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default on)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Train; returns the exit status (0 also when stopped by --stop-after, 2 for a bad configuration)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        options = Options(**vars(parser.parse_args(argv)))
    except SystemExit as exit_:  # argparse has printed the error (or --help)
        return int(exit_.code or 0)
    processes = Processes.from_environment()
    try:
        cuda_available = torch.cuda.is_available()
        cuda_bf16 = cuda_available and torch.cuda.is_bf16_supported(including_emulation=False)
        config = resolve_config(options, cuda_available, cuda_bf16, processes.world_size, processes.local_rank)
        trainer = Trainer(config, processes)
    except ConfigError as error:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    trainer.run()
    return 0
