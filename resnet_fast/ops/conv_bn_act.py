"""``resnet_fast::conv_bn_act`` — convolution, BatchNorm, optional residual add and ReLU.

``out = relu(batch_norm(conv2d(input, conv_weight, conv_bias)) + residual)``, with the
BatchNorm semantics of :mod:`resnet_fast.ops.batch_norm_act` (a functional operator; the
wrapper :func:`conv_bn_act` then updates running statistics in training). ``input`` and
``conv_weight`` must share a dtype; the BatchNorm parameters and running statistics may
be float32 while the activations are float16/bfloat16 (mixed precision).

The op returns (out, conv_out, mean, var): ``conv_out`` is the pre-normalisation
activation that backward needs. Saved for backward: input, conv_weight, conv_out, BN
weight, mean, var, and out when there is a ReLU. Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_fast.ops.batch_norm_act import (
    batch_norm_act_forward,
    batch_norm_act_grads,
    save_batch_norm_context,
    update_running_stats_after,
)
from resnet_fast.ops.common import (
    TensorMeta,
    accumulation_dtype,
    check_batch_norm_args,
    check_conv_args,
    output_memory_format,
)
from resnet_fast.ops.dispatch import select_kernel
from resnet_fast.ops.triton_ops import uses_triton_op


def check_conv_bn_act_args(input, conv_weight, conv_bias, stride, padding, dilation, groups, weight, bias,
                           residual, running_mean, running_var, training,
                           autocast: bool = False) -> tuple[int, int, int, int]:
    """Every check of ``conv_bn_act``'s arguments (no operator runs); returns the output shape.

    ``autocast=True``: under ``torch.autocast`` (the native path), which casts the
    convolution's input and weight to its dtype, so theirs need not match.
    """
    out_shape = check_conv_args(input, conv_weight, conv_bias, stride, padding, dilation, groups,
                                autocast=autocast)
    conv_dtype = torch.get_autocast_dtype(input.device.type) if autocast else input.dtype
    conv_out = TensorMeta(out_shape, conv_dtype, input.device)
    check_batch_norm_args(conv_out, weight, bias, residual, running_mean, running_var,
                          training, input_name="convolution output")
    return out_shape


@torch.library.custom_op("resnet_fast::conv_bn_act", mutates_args=())
def conv_bn_act_op(
    input: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, conv_out, mean, var)."""
    check_conv_bn_act_args(input, conv_weight, conv_bias, stride, padding, dilation, groups, weight, bias, residual,
           running_mean, running_var, training)
    kernel = select_kernel("conv_bn_act", input)
    return kernel(input, conv_weight, conv_bias, stride, padding, dilation, groups, weight, bias,
                  residual, running_mean, running_var, training, eps, relu)


@conv_bn_act_op.register_fake
def _(input, conv_weight, conv_bias, stride, padding, dilation, groups, weight, bias, residual,
      running_mean, running_var, training, eps, relu):
    out_shape = check_conv_bn_act_args(input, conv_weight, conv_bias, stride, padding, dilation, groups, weight, bias,
                       residual, running_mean, running_var, training)
    fmt = output_memory_format(input)
    out = torch.empty(out_shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    conv_out = torch.empty(out_shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    stats_dtype = accumulation_dtype(input.dtype)
    channels = out_shape[1]
    return out, conv_out, input.new_empty(channels, dtype=stats_dtype), input.new_empty(channels, dtype=stats_dtype)


def _setup_context(ctx, inputs, output):
    (input, conv_weight, conv_bias, stride, padding, dilation, groups, weight, bias, residual,
     _running_mean, _running_var, training, eps, relu) = inputs
    out, conv_out, mean, var = output
    ctx.save_for_backward(input, conv_weight, conv_out, weight, mean, var, out if relu else None)
    save_batch_norm_context(ctx, bias, residual, training, eps, relu)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.conv_bias_shape = None if conv_bias is None else list(conv_bias.shape)


def _backward(ctx, grad_out, _grad_conv_out, _grad_mean, _grad_var):
    input, conv_weight, conv_out, weight, mean, var, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_conv = need[0] or need[1] or need[2]
    grad_conv_out, grad_weight, grad_bias, grad_residual = batch_norm_act_grads(
        ctx, grad_out, conv_out, weight, mean, var, out, need_conv, need[7], need[8], need[9]
    )
    grad_input = grad_conv_weight = grad_conv_bias = None
    if need_conv:
        stride, padding, dilation, groups = ctx.conv_args
        grad_input, grad_conv_weight, grad_conv_bias = torch.ops.aten.convolution_backward(
            grad_conv_out, input, conv_weight, ctx.conv_bias_shape, stride, padding, dilation,
            False, [0, 0], groups, [need[0], need[1], need[2]],
        )
    return (grad_input, grad_conv_weight, grad_conv_bias, None, None, None, None,
            grad_weight, grad_bias, grad_residual, None, None, None, None, None)


conv_bn_act_op.register_autograd(_backward, setup_context=_setup_context)


def _pair(value: int | tuple[int, int] | list[int]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def conv_bn_act(
    input: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    relu: bool = True,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """``relu(batch_norm(conv2d(input, conv_weight, conv_bias)) + residual)``.

    Convolution arguments as ``F.conv2d`` (zero padding given as numbers); BatchNorm
    arguments as :func:`resnet_fast.ops.batch_norm_act`, running statistics updated in
    training.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if isinstance(input, Tensor) and uses_triton_op("conv_bn_act", input):
        # The triton backend's conv_bn_act is cuDNN's convolution, then its batch_norm_act:
        # called as such, torch.compile sees the BatchNorm's triton_op (and autograd the aten conv).
        check_conv_bn_act_args(input, conv_weight, conv_bias, stride, padding, dilation, groups, weight, bias,
                               residual, running_mean, running_var, training)
        conv_out = F.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
        conv_out = conv_out.contiguous(memory_format=output_memory_format(input))
        out, mean, var = batch_norm_act_forward(conv_out, weight, bias, residual, running_mean, running_var,
                                                training, eps, relu)
    else:
        out, conv_out, mean, var = conv_bn_act_op(
            input, conv_weight, conv_bias, stride, padding, dilation, groups,
            weight, bias, residual, running_mean, running_var, training, eps, relu,
        )
    update_running_stats_after(conv_out, mean, var, running_mean, running_var, num_batches_tracked,
                               training, momentum)
    return out
