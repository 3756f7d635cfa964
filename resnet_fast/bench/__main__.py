"""``python -m resnet_fast.bench`` / ``resnet-fast-bench``: parse the command line and run.

The measuring lives in :mod:`resnet_fast.bench.profiler`, the figure in
:mod:`resnet_fast.bench.plot`, traces and the time breakdown in :mod:`resnet_fast.bench.trace`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from rich.console import Console

from resnet_fast.bench.plot import write_plot
from resnet_fast.bench.profiler import (
    MODELS,
    MODES,
    BenchConfigError,
    Options,
    Variant,
    check_device_support,
    parse_variants,
    print_report,
    resolve_config,
    run_benchmark,
    write_json,
)
from resnet_fast.runtime import DTYPES


def _variants(text: str) -> tuple[Variant, ...]:
    try:
        return parse_variants(text)
    except BenchConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; ``None`` defaults are filled in by ``resolve_config``."""
    parser = argparse.ArgumentParser(
        prog="resnet-fast-bench",
        description="Training / inference throughput of torchvision eager, torch.compile and "
                    "resnet_fast ResNets. Without a CUDA device (and no --device), a small CPU "
                    "configuration runs.")
    parser.add_argument("--model", choices=MODELS, help="network (GPU default resnet50, CPU resnet18)")
    parser.add_argument("--batch", type=int, help="images per step (GPU default 256, CPU 8)")
    parser.add_argument("--image-size", type=int,
                        help="input height and width (default 224 ImageNet / 32 CIFAR; CPU 64 / 32)")
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="fp32, or autocast to fp16 / bf16 (GPU default bf16, CPU fp32)")
    parser.add_argument("--mode", choices=MODES, default="both", help="what to time (default both)")
    parser.add_argument("--compare", type=_variants, metavar="LIST",
                        help="comma list of eager, compile, resnet_fast, resnet_fast:<auto|cuda|triton|torch>; "
                             "a resnet_fast variant + '+fused' trains with the convolution fusion "
                             "(resnet_fast.nn.enable_fused_training; e.g. resnet_fast:triton+fused, "
                             "resnet_fast+fused for auto; training only); '+compile' runs it under "
                             "torch.compile (e.g. resnet_fast+compile, resnet_fast:triton+fused+compile) "
                             "(GPU default eager,compile,resnet_fast; CPU eager,resnet_fast)")
    parser.add_argument("--steps", type=int, help="timed steps (GPU default 50, CPU 3)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps, at least 1 (GPU default 10, CPU 1)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        help="NHWC models and inputs (default on for GPU, off for CPU)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cuda if available, else cpu)")
    parser.add_argument("--json", metavar="PATH", help="also write the results and environment as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                        help="capture each step in a CUDA graph and time its replays (GPU only; default off)")
    parser.add_argument("--plot", metavar="PATH.png",
                        help="also draw images/s and peak memory per variant into a PNG")
    parser.add_argument("--trace", metavar="DIR",
                        help="also write a torch.profiler Chrome/Perfetto trace of a few steps per variant "
                             "and mode into DIR (implies --breakdown)")
    parser.add_argument("--breakdown", action="store_true",
                        help="profile a few steps per variant and mode and print kernel time by category")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the profiler; returns the exit status (2 for a bad command line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        options = Options(**vars(parser.parse_args(argv)))
    except SystemExit as exit_:  # argparse has printed the error (or --help)
        return int(exit_.code or 0)
    try:
        cuda_available = torch.cuda.is_available()
        cuda_bf16 = cuda_available and torch.cuda.is_bf16_supported(including_emulation=False)
        config = resolve_config(options, cuda_available, cuda_bf16)
        check_device_support(config)
    except BenchConfigError as error:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2

    console = Console(width=None if sys.stdout.isatty() else 140)
    if config.notice:
        console.print(config.notice, style="bold yellow", highlight=False, soft_wrap=True)
    report = run_benchmark(config, shlex.join(["resnet-fast-bench", *argv]))
    print_report(report, console)
    if config.plot_path:
        console.print(f"wrote {write_plot(report, config.plot_path)}", highlight=False)
    if config.trace_dir:
        traces = [m.breakdown.trace_path for m in report.measurements if m.breakdown is not None]
        console.print(f"wrote {len(traces)} trace(s) under {config.trace_dir} (open in https://ui.perfetto.dev "
                      "or chrome://tracing)", highlight=False)
    if config.json_path:
        write_json(report, config.json_path)
        console.print(f"wrote {config.json_path}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
