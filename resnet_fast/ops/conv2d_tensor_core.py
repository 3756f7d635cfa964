"""``resnet_fast::conv2d_tensor_core`` — the ``cuda`` backend's own fp16 convolution.

One implicit-GEMM convolution on tensor cores (WMMA, compute capability 7.0 and newer:
V100 and T4 as well as every later GPU; ``csrc/conv2d_tensor_core.cu``) with both
fusions of the convolution operators:

    a    = relu?(input * prologue_scale + prologue_shift)   per input channel (optional)
    acc  = conv2d(a, weight)                                 float32 accumulation
    out  = relu?(acc + bias + residual)                      float16, channels_last
    mean, var = per-channel mean and biased variance of acc  (stats=True)

``a`` is rounded to float16 (the tensor cores' input) and never written to memory;
padded positions of ``a`` are zero. With ``stats=True`` the operator takes no bias,
residual or ReLU (the statistics are the convolution's own, from the float32
accumulators, as ``conv2d_stats`` defines them); otherwise ``mean`` and ``var`` are
empty. ``input``, ``weight`` and ``residual`` are float16 (the kernel's only dtype: the
sm_7x tensor cores have no bfloat16), groups=1, zero padding; per-channel tensors any
float dtype (used in float32). ``out`` is always channels_last.

This is a stage operator, not differentiable: :mod:`resnet_fast.ops.conv2d_cuda` calls it
inside ``conv2d_bias_act`` and ``conv2d_stats``, whose autograd formulas hold for every
backend. Its default implementation is the same math in torch (float32 convolution of the
float16 activation), so it runs and is tested on any device; the CUDA kernel replaces it
on CUDA tensors once the extension is built. A fake implementation lets it trace under
torch.compile.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_fast.ops.common import check_conv_args, check_per_channel, check_same_device
from resnet_fast.ops.reference import prologue_activation


def _check(input, weight, bias, residual, prologue_scale, prologue_shift, stride, padding, dilation, relu, stats):
    out_shape = check_conv_args(input, weight, None, stride, padding, dilation, 1, weight_name="weight")
    if input.dtype != torch.float16 or weight.dtype != torch.float16:
        raise TypeError(f"conv2d_tensor_core takes float16 input and weight, got {input.dtype} and {weight.dtype}")
    if (prologue_scale is None) != (prologue_shift is None):
        raise ValueError("prologue_scale and prologue_shift must both be given or both be None")
    if stats and (bias is not None or residual is not None or relu):
        raise ValueError("stats=True takes no bias, residual or ReLU (the statistics are of the convolution itself)")
    check_per_channel("prologue_scale", prologue_scale, input.shape[1])
    check_per_channel("prologue_shift", prologue_shift, input.shape[1])
    check_per_channel("bias", bias, out_shape[1])
    if residual is not None and (residual.dtype != torch.float16 or tuple(residual.shape) != tuple(out_shape)):
        raise ValueError(f"residual must be a float16 tensor of the output's shape {tuple(out_shape)}, "
                         f"got {residual.dtype} {tuple(residual.shape)}")
    check_same_device(input, weight=weight, bias=bias, residual=residual, prologue_scale=prologue_scale,
                      prologue_shift=prologue_shift)
    return out_shape


def _outputs_like(input: Tensor, out_shape, stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    out = torch.empty(out_shape, dtype=input.dtype, device=input.device, memory_format=torch.channels_last)
    channels = out_shape[1] if stats else 0
    return out, input.new_empty(channels, dtype=torch.float32), input.new_empty(channels, dtype=torch.float32)


@torch.library.custom_op(
    "resnet_fast::conv2d_tensor_core",
    mutates_args=(),
    schema="(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, Tensor? prologue_scale, "
    "Tensor? prologue_shift, int[] stride, int[] padding, int[] dilation, bool prologue_relu, bool relu, "
    "bool stats) -> (Tensor, Tensor, Tensor)",
)
def conv2d_tensor_core(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    prologue_scale: Optional[Tensor],
    prologue_shift: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    prologue_relu: bool,
    relu: bool,
    stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, mean, var); see the module docstring."""
    out_shape = _check(input, weight, bias, residual, prologue_scale, prologue_shift, stride, padding, dilation,
                       relu, stats)
    a = input if prologue_scale is None else prologue_activation(input, prologue_scale, prologue_shift, prologue_relu)
    acc = F.conv2d(a.float(), weight.float(), None, stride, padding, dilation)
    out, mean, var = _outputs_like(input, out_shape, stats)
    if stats:
        var_, mean_ = torch.var_mean(acc, dim=(0, 2, 3), correction=0)
        mean.copy_(mean_)
        var.copy_(var_)
    if bias is not None:
        acc = acc + bias.float().view(1, -1, 1, 1)
    if residual is not None:
        acc = acc + residual.float()
    if relu:
        acc = torch.relu(acc)
    out.copy_(acc)
    return out, mean, var


@conv2d_tensor_core.register_fake
def _(input, weight, bias, residual, prologue_scale, prologue_shift, stride, padding, dilation, prologue_relu, relu,
      stats):
    out_shape = _check(input, weight, bias, residual, prologue_scale, prologue_shift, stride, padding, dilation,
                       relu, stats)
    return _outputs_like(input, out_shape, stats)
