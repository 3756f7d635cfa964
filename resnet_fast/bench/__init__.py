"""The training-throughput profiler: ``python -m resnet_fast.bench`` (``resnet-fast-bench``).

Compares torchvision's eager ResNets, their ``torch.compile`` versions and resnet_fast's
fused ResNets from the same initial weights; see :mod:`resnet_fast.bench.profiler`.
"""

from resnet_fast.bench.profiler import (
    BenchConfig,
    BenchConfigError,
    BenchReport,
    Measurement,
    Options,
    Skipped,
    Variant,
    resolve_config,
    run_benchmark,
)

__all__ = [
    "BenchConfig",
    "BenchConfigError",
    "BenchReport",
    "Measurement",
    "Options",
    "Skipped",
    "Variant",
    "resolve_config",
    "run_benchmark",
]
