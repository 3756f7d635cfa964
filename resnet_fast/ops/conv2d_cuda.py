"""The ``cuda`` backend of the convolution operators: cuDNN's fused engines and our CUDA kernels.

``conv2d_bias_act`` (inference: a convolution with its BatchNorm folded in)
    with ReLU, one cuDNN call through ATen's C++ ``at::cudnn_convolution_relu`` /
    ``at::cudnn_convolution_add_relu``: ``relu(conv(x, w) + bias + residual)`` in cuDNN's
    fused convolution-bias-activation engine. These engines take every tensor in the
    input's dtype, so a float32 ``bias`` (the fold keeps it in float32) is rounded to
    float16/bfloat16 first: a difference from the ``torch`` and ``triton`` backends of
    at most one rounding of the bias. Without ReLU (a downsample shortcut), cuDNN's
    convolution with bias, plus the residual when there is one.
``conv2d_stats`` (training: BatchNorm prologue, statistics epilogue)
    on compute capability 7.x (V100, T4) with float16 channels_last input: our
    tensor-core kernel ``resnet_fast::conv2d_tensor_core`` (WMMA; prologue applied while
    loading, statistics from the float32 accumulators, one kernel plus a per-channel
    merge), because the ``triton`` backend's ``tl.dot`` has no tensor cores there.
    Otherwise the prologue ``relu(x * scale + shift)`` by the ``batch_norm_act_apply``
    CUDA kernel (:func:`~resnet_fast.ops.scale_shift_act.apply_scale_shift`), cuDNN's
    convolution, then the ``batch_norm_stats``
    CUDA kernel: three kernels where the ``triton`` backend runs one, so the prologue's
    output makes a round trip through memory.

``conv2d_bias_act`` stays on cuDNN's fused engine on every GPU (already one kernel; our
kernel's inference epilogue, ``conv2d_tensor_core(..., stats=False)``, is raced against it
in ``benchmarks/bench_cudnn_fused.py``). No GPU measurement has chosen between them yet.

Both have the ``torch`` backend's signatures (:mod:`resnet_fast.ops.reference`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_fast.ops import conv2d_tensor_core  # noqa: F401  defines resnet_fast::conv2d_tensor_core
from resnet_fast.ops.common import output_memory_format
from resnet_fast.ops.dispatch import BACKENDS, device_capability, register_kernel
from resnet_fast.ops.scale_shift_act import apply_scale_shift

TENSOR_CORE_KERNEL_BELOW = (8, 0)
"""Compute capabilities below this run ``conv2d_stats`` through ``conv2d_tensor_core``."""


def uses_tensor_core_kernel(x: Tensor, weight: Tensor, capability: tuple[int, int]) -> bool:
    """Whether ``conv2d_stats`` on ``x`` runs our WMMA kernel on a GPU of ``capability``:
    float16 input and weight, channels_last input, capability 7.x."""
    return (x.dtype == torch.float16 and weight.dtype == torch.float16
            and x.is_contiguous(memory_format=torch.channels_last)
            and (7, 0) <= tuple(capability) < TENSOR_CORE_KERNEL_BELOW)


def _runs_tensor_core_kernel(x: Tensor, weight: Tensor) -> bool:
    return x.is_cuda and uses_tensor_core_kernel(x, weight, device_capability(x.device))


def _conv2d_stats_implementation(capability: tuple[int, int] | None) -> str:
    """What runs ``conv2d_stats`` on a GPU of ``capability`` (for ``backend_info()``)."""
    unfused = "BatchNorm prologue kernel + cuDNN convolution + statistics kernel"
    if capability is not None and (7, 0) <= tuple(capability) < TENSOR_CORE_KERNEL_BELOW:
        return (f"float16 channels_last: conv2d_tensor_core (WMMA tensor cores; prologue, convolution and "
                f"statistics in one kernel, Triton's tl.dot has no tensor cores below sm_80); otherwise {unfused}")
    return f"{unfused} (conv2d_tensor_core runs it on sm_7x)"


BACKENDS["cuda"].implementations["conv2d_stats"] = _conv2d_stats_implementation


@register_kernel("cuda", "conv2d_bias_act")
def conv2d_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    relu: bool,
) -> Tensor:
    """``relu(conv2d(x, weight) + bias + residual)`` in one cuDNN fused call when ``relu``."""
    fmt = output_memory_format(x)
    bias = None if bias is None else bias.to(x.dtype)
    conv_args = (list(stride), list(padding), list(dilation), 1)
    if relu and residual is None:
        out = torch.ops.aten.cudnn_convolution_relu(x, weight.contiguous(memory_format=fmt), bias, *conv_args)
    elif relu:
        out = torch.ops.aten.cudnn_convolution_add_relu(
            x, weight.contiguous(memory_format=fmt), residual.to(x.dtype).contiguous(memory_format=fmt), 1.0, bias,
            *conv_args,
        )
    else:
        out = F.conv2d(x, weight, bias, stride, padding, dilation)
        if residual is not None:
            out = out.add_(residual.to(x.dtype))
    return out.contiguous(memory_format=fmt)


@register_kernel("cuda", "conv2d_stats")
def conv2d_stats(
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    prologue_scale: Tensor | None,
    prologue_shift: Tensor | None,
    prologue_relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Our tensor-core kernel on sm_7x, else prologue kernel, cuDNN convolution, statistics
    kernel; returns (out, mean, var)."""
    if _runs_tensor_core_kernel(x, weight):
        return torch.ops.resnet_fast.conv2d_tensor_core(
            x, weight, None, None, prologue_scale, prologue_shift, list(stride), list(padding), list(dilation),
            prologue_relu, False, True)
    if prologue_scale is not None:
        x = apply_scale_shift(x, prologue_scale, prologue_shift, None, prologue_relu)
    out = F.conv2d(x, weight, None, stride, padding, dilation).contiguous(memory_format=output_memory_format(x))
    mean, var = torch.ops.resnet_fast.batch_norm_stats(out)
    return out, mean, var
