"""Device, precision and layout settings shared by the command-line tools.

The profiler (:mod:`resnet_fast.bench`) and the trainer (:mod:`resnet_fast.train`) both
take ``--device``, ``--dtype fp32|fp16|bf16`` and ``--channels-last``; this module turns
those into torch objects the same way for both. ``fp16`` / ``bf16`` mean mixed precision:
parameters stay float32 and the step runs under ``torch.autocast`` (fp16 also with a
``GradScaler``).
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ConfigError(ValueError):
    """A requested configuration cannot run here (the message says why)."""


def resolve_device(requested: str | None, cuda_available: bool) -> str:
    """``requested`` checked (``cpu``, ``cuda`` or ``cuda:N``), or ``cuda`` / ``cpu`` by availability."""
    device = requested or ("cuda" if cuda_available else "cpu")
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {device!r}")
    if device_type == "cuda" and not cuda_available:
        raise ConfigError(f"--device {device} was asked for, but torch sees no CUDA device")
    return device


def check_dtype_supported(device: str | torch.device, dtype: str, cuda_bf16: bool | None = None) -> None:
    """Refuse a dtype the device cannot compute in (bf16 on a GPU older than Ampere).

    ``cuda_bf16``: whether the GPU has bf16, when the caller knows; else torch is asked.
    """
    device = torch.device(device)
    if device.type != "cuda" or dtype != "bf16":
        return
    if cuda_bf16 is None:
        cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if not cuda_bf16:
        try:
            name = torch.cuda.get_device_name(device)
        except (RuntimeError, AssertionError):  # no CUDA runtime to ask (the caller said it has no bf16)
            name = "this GPU"
        raise ConfigError(f"{name} has no bf16 support; use --dtype fp16 (with a GradScaler) or --dtype fp32")


def autocast(device: str | torch.device, dtype: str, cache_enabled: bool = True) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``'s type (disabled for fp32)."""
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype], enabled=dtype != "fp32",
                          cache_enabled=cache_enabled)


def grad_scaler(device: str | torch.device, dtype: str) -> torch.amp.GradScaler:
    """A ``GradScaler`` that is enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype == "fp16")


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` (NHWC) or ``torch.contiguous_format`` (NCHW)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
