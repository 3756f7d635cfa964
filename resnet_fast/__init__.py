"""resnet_fast: ResNets with BatchNorm, residual add and ReLU fused around the convolutions.

    import resnet_fast
    model = resnet_fast.resnet50().cuda().to(memory_format=torch.channels_last)
    model, report = resnet_fast.convert(torchvision.models.resnet50())

Operators live under ``torch.ops.resnet_fast``; :func:`set_backend` chooses their
implementation (``auto``, ``cuda``, ``triton`` or ``torch``) and :func:`backend_info`
says what this machine can run (``python -m resnet_fast.info`` prints it as tables).
"""

from resnet_fast import nn, ops
from resnet_fast.convert import ConversionReport, convert
from resnet_fast.models import (
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet44,
    resnet50,
    resnet56,
    resnet101,
    resnet110,
    resnet152,
    resnet1202,
)
from resnet_fast.ops.dispatch import (
    BackendUnavailableError,
    BackendUnavailableWarning,
    backend_info,
    get_backend,
    set_backend,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BackendUnavailableWarning",
    "ConversionReport",
    "backend_info",
    "convert",
    "get_backend",
    "nn",
    "ops",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnet101",
    "resnet110",
    "resnet152",
    "resnet1202",
    "set_backend",
]
