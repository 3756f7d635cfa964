"""The training-throughput profiler: ``python -m resnet_fast.bench`` (``resnet-fast-bench``).

Compares torchvision's eager ResNets, their ``torch.compile`` versions and resnet_fast's
fused ResNets from the same initial weights; see :mod:`resnet_fast.bench.profiler`
(measuring, CUDA graphs), :mod:`resnet_fast.bench.trace` (profiler traces, kernel time
by category) and :mod:`resnet_fast.bench.plot` (the figure).
"""

from resnet_fast.bench.profiler import (
    BenchConfig,
    BenchConfigError,
    BenchReport,
    CaptureError,
    Measurement,
    Options,
    Skipped,
    Variant,
    resolve_config,
    run_benchmark,
)
from resnet_fast.bench.trace import CATEGORIES, Breakdown, categorize

__all__ = [
    "CATEGORIES",
    "BenchConfig",
    "BenchConfigError",
    "BenchReport",
    "Breakdown",
    "CaptureError",
    "Measurement",
    "Options",
    "Skipped",
    "Variant",
    "categorize",
    "resolve_config",
    "run_benchmark",
]
