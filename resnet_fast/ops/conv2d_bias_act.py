"""``resnet_fast::conv2d_bias_act`` — convolution with bias, residual add and ReLU fused.

``out = relu(conv2d(input, weight) + bias + residual)`` (bias, residual and ReLU
optional), groups=1, zero padding. The inference form of a ResNet convolution: with the
BatchNorm folded into ``weight`` and ``bias`` (see :mod:`resnet_fast.nn.conv_bn_act`) a
whole conv + BN (+ add) (+ ReLU) is this one operator, one kernel in the ``triton``
backend. ``bias`` may be float32 while ``input`` and ``weight`` are float16/bfloat16
(the fold keeps it in float32); the additions and the ReLU run in float32 (float64 for
float64 input), the output has the input's dtype and memory format.

Differentiable in every tensor argument (the ReLU mask from the saved output;
``aten.convolution_backward`` for input and weight). Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from resnet_fast.ops.common import (
    check_conv_args,
    check_float_tensor,
    check_per_channel,
    check_same_device,
    output_memory_format,
)
from resnet_fast.ops.dispatch import select_kernel
from resnet_fast.ops.triton_ops import share_autograd, triton_op, uses_triton_op


def _check(input, weight, bias, residual, stride, padding, dilation) -> tuple[int, int, int, int]:
    out_shape = check_conv_args(input, weight, None, stride, padding, dilation, 1, weight_name="weight")
    check_per_channel("bias", bias, out_shape[1])
    if residual is not None:
        check_float_tensor("residual", residual)
        if tuple(residual.shape) != tuple(out_shape):
            raise ValueError(f"residual must have the convolution output's shape {tuple(out_shape)}, "
                             f"got {tuple(residual.shape)}")
    check_same_device(input, bias=bias, residual=residual)
    return out_shape


@torch.library.custom_op("resnet_fast::conv2d_bias_act", mutates_args=())
def conv2d_bias_act_op(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
) -> Tensor:
    """Returns ``relu(conv2d(input, weight) + bias + residual)``."""
    _check(input, weight, bias, residual, stride, padding, dilation)
    kernel = select_kernel("conv2d_bias_act", input)
    return kernel(input, weight, bias, residual, stride, padding, dilation, relu)


@conv2d_bias_act_op.register_fake
def _(input, weight, bias, residual, stride, padding, dilation, relu):
    out_shape = _check(input, weight, bias, residual, stride, padding, dilation)
    return torch.empty(out_shape, dtype=input.dtype, device=input.device,
                       memory_format=output_memory_format(input))


def _setup_context(ctx, inputs, output):
    input, weight, bias, residual, stride, padding, dilation, relu = inputs
    ctx.save_for_backward(input, weight, output if relu else None)
    ctx.conv_args = (stride, padding, dilation)
    ctx.relu = relu
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, grad_out):
    input, weight, out = ctx.saved_tensors
    need_input, need_weight, need_bias, need_residual = ctx.needs_input_grad[:4]
    grad = grad_out.masked_fill(out <= 0, 0) if ctx.relu else grad_out
    grad_input = grad_weight = None
    if need_input or need_weight:
        stride, padding, dilation = ctx.conv_args
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad.to(input.dtype), input, weight, None, stride, padding, dilation, False, [0, 0], 1,
            [need_input, need_weight, False])
    grad_bias = grad.sum((0, 2, 3), dtype=torch.float64 if grad.dtype == torch.float64 else torch.float32)
    return (grad_input, grad_weight, grad_bias.to(ctx.bias_dtype) if need_bias else None,
            grad.to(ctx.residual_dtype) if need_residual else None, None, None, None, None)


conv2d_bias_act_op.register_autograd(_backward, setup_context=_setup_context)
share_autograd("conv2d_bias_act", _backward, _setup_context)


def _pair(value: int | tuple[int, int] | list[int]) -> list[int]:
    return [value, value] if isinstance(value, int) else [int(v) for v in value]


def conv2d_bias_act(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    relu: bool = False,
) -> Tensor:
    """``relu(F.conv2d(input, weight, bias, stride, padding, dilation) + residual)``.

    As ``F.conv2d`` with groups=1 and zero padding given as numbers; ``residual`` (the
    output's shape) is added and ReLU applied when asked.
    """
    args = (input, weight, bias, residual, _pair(stride), _pair(padding), _pair(dilation), relu)
    if isinstance(input, Tensor) and uses_triton_op("conv2d_bias_act", input):
        _check(*args[:-1])  # then the triton_op itself, which torch.compile sees into
        return triton_op("conv2d_bias_act")(*args)
    return conv2d_bias_act_op(*args)
