"""Whether a block trains with the fused pattern when nobody said: only where it was measured faster.

``BasicBlock.fused_training`` / ``Bottleneck.fused_training`` is ``True`` or ``False`` when
set (:func:`~resnet_fast.nn.blocks.enable_fused_training` sets it on a whole model) and
``None`` by default. ``None`` means: train fused exactly where the project's committed GPU
results show fused training faster than the default path, for that GPU architecture and
compute dtype, and only when a fused backend will run it there (a validation record lets
``auto`` use one, or one was chosen with ``set_backend``). Everywhere else the default
(unfused) path runs.

:data:`FUSED_TRAINING_MEASURED_FASTER` is the table. It is empty: no GPU results exist yet
(``benchmarks/results/`` holds none; the GPU check's headline stage, run by
``scripts/gpu_check.sh``, measures ResNet-50 training with and without fused training). An
entry is added only from committed results, citing the file and row that show the gain.
"""

from __future__ import annotations

import torch

from resnet_fast import validation
from resnet_fast.ops.dispatch import device_capability, get_backend

FUSED_TRAINING_MEASURED_FASTER: dict[tuple[str, torch.dtype], str] = {}
"""(GPU architecture ``"major.minor"``, compute dtype) -> the committed results (file and
row) showing fused training faster than the default there. Empty: no GPU results exist yet."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the block's convolutions run in: autocast's when it is on for ``x``'s device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _fused_backend_runs(device: torch.device) -> bool:
    choice = get_backend()
    if choice == "auto":
        return any(validation.auto_reason(name, device) is None for name in validation.FUSED_BACKENDS)
    return choice in validation.FUSED_BACKENDS


def fused_training_by_default(x: torch.Tensor) -> bool:
    """Whether a block with ``fused_training=None`` trains fused on input ``x``."""
    if not x.is_cuda:
        return False
    architecture = "%d.%d" % device_capability(x.device)
    if (architecture, compute_dtype(x)) not in FUSED_TRAINING_MEASURED_FASTER:
        return False
    return _fused_backend_runs(x.device)


def trains_fused(setting: bool | None, x: torch.Tensor) -> bool:
    """A block's ``fused_training`` setting resolved for input ``x`` (None: by measurement)."""
    return fused_training_by_default(x) if setting is None else bool(setting)
