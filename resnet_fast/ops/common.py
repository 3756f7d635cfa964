"""Input validation and small tensor conventions shared by every operator.

Validation runs before an operator mutates anything, so a bad call leaves running
statistics and ``num_batches_tracked`` untouched. Messages name the argument.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from resnet_fast.ops.dispatch import device_capability

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when ``t`` already has ``dtype`` (``to`` then returns
    ``t`` itself too): the hot paths of small tensors make dozens of such calls per block,
    each most of a microsecond of host time."""
    return t if t.dtype == dtype else t.to(dtype)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Outputs are channels_last when the input is (and not also plain contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_float_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )


BFLOAT16_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bfloat16 arithmetic


def check_dtype_on_device(name: str, t: torch.Tensor) -> None:
    """Refuse a bfloat16 CUDA tensor on a GPU without bfloat16 (V100 sm_70, T4 sm_75).

    Kernels there would emulate bf16 at best; fp16 with a GradScaler is the fast path.
    """
    if t.dtype != torch.bfloat16 or not t.is_cuda:
        return
    capability = device_capability(t.device)
    if tuple(capability) < BFLOAT16_CAPABILITY:
        raise TypeError(
            f"{name} is torch.bfloat16 on {t.device}, a GPU of compute capability "
            f"{capability[0]}.{capability[1]} without bfloat16 support (it needs 8.0 or newer); use float16 "
            "instead: torch.autocast('cuda', dtype=torch.float16) with torch.amp.GradScaler('cuda')"
        )


class TensorMeta(NamedTuple):
    """What the checks read of a tensor that does not exist yet (a convolution's output):
    shape, dtype and device. Building it runs no operator."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def check_same_device(reference: torch.Tensor | TensorMeta, **tensors: torch.Tensor | None) -> None:
    device = reference.device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but input is on {device}; "
                "move them to the same device"
            )


def check_input_4d(name: str, x: torch.Tensor) -> None:
    check_float_tensor(name, x)
    check_dtype_on_device(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")


def check_per_channel(name: str, t: torch.Tensor | None, channels: int) -> None:
    if t is None:
        return
    check_float_tensor(name, t)
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(
            f"{name} must have shape ({channels},) to match the input's {channels} channels, "
            f"got {tuple(t.shape)}"
        )


LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def check_batch_norm_dtype(name: str, t: torch.Tensor | None, x_dtype: torch.dtype, input_name: str) -> None:
    """``nn.BatchNorm2d``'s dtype rule: a parameter or running statistic has the input's
    dtype, or is float32 for a float16/bfloat16 input (mixed precision, as autocast runs it).
    torch refuses everything else ("mixed dtype"); so does this, naming both dtypes."""
    if t is None or t.dtype == x_dtype or (t.dtype == torch.float32 and x_dtype in LOW_PRECISION_DTYPES):
        return
    allowed = f"{x_dtype}" + (" or torch.float32" if x_dtype in LOW_PRECISION_DTYPES else "")
    raise TypeError(
        f"{input_name} is {x_dtype} but {name} is {t.dtype}; BatchNorm parameters and running statistics "
        f"must be {allowed} for a {x_dtype} {input_name}, as nn.BatchNorm2d requires: convert the module "
        f"(module.to({x_dtype})) or the {input_name}, or run under torch.autocast"
    )


def check_batch_norm_args(
    x: torch.Tensor | TensorMeta,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    input_name: str = "input",
    check_count: bool = True,
) -> None:
    """Everything BatchNorm(+add)(+ReLU) needs of its arguments, checked up front.

    ``x`` is the tensor being normalised (or its :class:`TensorMeta`); ``input_name`` is
    what the error calls it. ``check_count=False`` leaves the "more than one value per
    channel" check to the caller (synchronized BatchNorm counts the values of the whole
    group). Dtypes follow ``nn.BatchNorm2d`` (:func:`check_batch_norm_dtype`); the residual
    may have any floating dtype (it is added in place: the result keeps ``x``'s dtype).
    """
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_per_channel(name, t, channels)
        check_batch_norm_dtype(name, t, x.dtype, input_name)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("evaluation mode (training=False) needs running_mean and running_var")
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"residual must have the same shape as the normalised tensor "
                f"{tuple(x.shape)}, got {tuple(residual.shape)}"
            )
    check_same_device(x, weight=weight, bias=bias, residual=residual,
                      running_mean=running_mean, running_var=running_var)
    if training and check_count and math.prod(x.shape) // max(channels, 1) <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {input_name} "
            f"size {tuple(x.shape)}"
        )


def conv_output_shape(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int, int, int]:
    """(N, C_out, H_out, W_out) with H_out = (H + 2p - d(k - 1) - 1) // s + 1."""
    n, _, h, w = x.shape
    sizes = []
    for dim, (size, k) in enumerate(zip((h, w), conv_weight.shape[2:])):
        out = (size + 2 * padding[dim] - dilation[dim] * (k - 1) - 1) // stride[dim] + 1
        if out <= 0:
            raise ValueError(
                f"input spatial size {(h, w)} is too small for a {tuple(conv_weight.shape[2:])} "
                f"kernel with stride {tuple(stride)}, padding {tuple(padding)}, dilation {tuple(dilation)}"
            )
        sizes.append(out)
    return n, conv_weight.shape[0], sizes[0], sizes[1]


def check_conv_args(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    weight_name: str = "conv_weight",
    autocast: bool = False,
) -> tuple[int, int, int, int]:
    """Check the convolution's arguments; return its output shape.

    ``weight_name`` is what the errors call ``conv_weight``. ``autocast=True``: the call
    runs under ``torch.autocast``, which casts input, weight and bias to one dtype, so
    their dtypes need not match here.
    """
    check_input_4d("input", x)
    check_float_tensor(weight_name, conv_weight)
    if conv_weight.dim() != 4:
        raise ValueError(f"{weight_name} must be 4-D (C_out, C_in/groups, kH, kW), got {tuple(conv_weight.shape)}")
    for name, values in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(values) != 2:
            raise ValueError(f"{name} must have two values (height, width), got {list(values)}")
    if any(s < 1 for s in stride) or any(d < 1 for d in dilation) or any(p < 0 for p in padding):
        raise ValueError(f"invalid stride {list(stride)}, padding {list(padding)} or dilation {list(dilation)}")
    if groups < 1 or conv_weight.shape[0] % groups:
        raise ValueError(f"groups={groups} must be positive and divide {weight_name}'s {conv_weight.shape[0]} output channels")
    if x.shape[1] != conv_weight.shape[1] * groups:
        raise ValueError(
            f"input has {x.shape[1]} channels but {weight_name} expects "
            f"{conv_weight.shape[1] * groups} (shape {tuple(conv_weight.shape)}, groups={groups})"
        )
    if conv_weight.dtype != x.dtype and not autocast:
        raise TypeError(
            f"input is {x.dtype} but {weight_name} is {conv_weight.dtype}; they must match "
            "(under torch.autocast the resnet_fast modules cast both)"
        )
    check_per_channel("conv_bias", conv_bias, conv_weight.shape[0])
    if conv_bias is not None and conv_bias.dtype != x.dtype and not autocast:
        raise TypeError(f"input is {x.dtype} but conv_bias is {conv_bias.dtype}; they must match")
    check_same_device(x, **{weight_name: conv_weight}, conv_bias=conv_bias)
    return conv_output_shape(x, conv_weight, stride, padding, dilation)
