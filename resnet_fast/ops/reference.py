"""The ``torch`` backend: every operator in plain PyTorch.

Runs on any device, and is the oracle the other backends are tested against. Formulas,
per channel c over the M = N*H*W values of the normalised tensor x:

    mean = sum(x) / M,  var = sum((x - mean)^2) / M,  invstd = 1 / sqrt(var + eps)
    x_hat = (x - mean) * invstd
    y = relu(weight * x_hat + bias + residual)              (add and ReLU optional)

    running_mean <- (1 - f) * running_mean + f * mean
    running_var  <- (1 - f) * running_var  + f * var * M / (M - 1)
    (f = momentum, or 1 / num_batches_tracked when momentum is None)

Backward, with dy' = dy * (y > 0) when there is a ReLU (else dy):

    grad_bias = sum(dy'),  grad_weight = sum(dy' * x_hat),  grad_residual = dy'
    training:  dx = weight * invstd * (dy' - grad_bias / M - x_hat * grad_weight / M)
    eval:      dx = weight * invstd * dy'

Statistics are computed in float32 (float64 for float64 inputs); outputs have the input's
dtype and memory format.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from resnet_fast.ops.common import accumulation_dtype, output_memory_format, to_dtype
from resnet_fast.ops.dispatch import register_kernel

_CHANNEL_DIMS = (0, 2, 3)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def batch_norm_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a 4-D tensor, accumulated in float32."""
    var, mean = torch.var_mean(to_dtype(x, accumulation_dtype(x.dtype)), dim=_CHANNEL_DIMS, correction=0)
    return mean, var


@register_kernel("torch", "update_running_stats")
def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float | None,
) -> None:
    """Exponential moving average of the batch statistics, with unbiased variance."""
    factor: float | torch.Tensor = 0.0 if momentum is None else momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / num_batches_tracked.double()  # stays on the device: no sync
    unbiased = var * (count / (count - 1))
    # in place: the same roundings as (1 - f) * running + f * batch written back, two operators fewer
    running_mean.mul_(1 - factor).add_(to_dtype(mean, running_mean.dtype) * factor)
    running_var.mul_(1 - factor).add_(to_dtype(unbiased, running_var.dtype) * factor)


@register_kernel("torch", "batch_norm_act")
def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm (+ residual) (+ ReLU); returns (out, mean, var) in the statistics dtype."""
    acc = accumulation_dtype(x.dtype)
    if training:
        mean, var = batch_norm_stats(x)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    invstd = torch.rsqrt(var + eps)
    # y = x * scale + shift, scale = weight * invstd, shift = bias - mean * scale
    scale = invstd if weight is None else weight.to(acc) * invstd
    shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
    y = x.to(acc) * _per_channel(scale) + _per_channel(shift)
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    out = y.to(x.dtype).contiguous(memory_format=output_memory_format(x))
    return out, mean, var


@register_kernel("torch", "batch_norm_act_backward")
def batch_norm_act_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    out: torch.Tensor | None,
    training: bool,
    eps: float,
    relu: bool,
    need_grad_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (input, weight, bias, residual) of :func:`batch_norm_act`.

    grad_weight and grad_bias are returned in the accumulation dtype; grad_residual is
    an empty tensor unless ``need_grad_residual``.
    """
    acc = mean.dtype
    invstd = torch.rsqrt(var + eps)
    dy = grad_out.to(acc)
    if relu:
        dy = dy.masked_fill(out <= 0, 0)
    x_hat = (x.to(acc) - _per_channel(mean)) * _per_channel(invstd)
    grad_bias = dy.sum(_CHANNEL_DIMS)
    grad_weight = (dy * x_hat).sum(_CHANNEL_DIMS)
    scale = invstd if weight is None else weight.to(acc) * invstd
    if training:
        count = x.numel() // x.shape[1]
        dy = dy - _per_channel(grad_bias / count) - x_hat * _per_channel(grad_weight / count)
    fmt = output_memory_format(x)
    grad_input = (dy * _per_channel(scale)).to(x.dtype).contiguous(memory_format=fmt)
    if need_grad_residual:
        masked = grad_out.masked_fill(out <= 0, 0) if relu else grad_out.clone()
        grad_residual = masked.contiguous(memory_format=fmt)
    else:
        grad_residual = grad_out.new_empty(0)
    return grad_input, grad_weight, grad_bias, grad_residual


@register_kernel("torch", "conv_bn_act")
def conv_bn_act(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convolution, then :func:`batch_norm_act`; returns (out, conv_out, mean, var)."""
    conv_out = F.conv2d(x, conv_weight, conv_bias, stride, padding, dilation, groups)
    conv_out = conv_out.contiguous(memory_format=output_memory_format(x))
    out, mean, var = batch_norm_act(conv_out, weight, bias, residual, running_mean, running_var,
                                    training, eps, relu)
    return out, conv_out, mean, var


def prologue_activation(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool) -> torch.Tensor:
    """``relu(x * scale + shift)`` per channel (a BatchNorm in scale/shift form, + ReLU),
    computed in the accumulation dtype and returned in ``x``'s dtype."""
    acc = accumulation_dtype(x.dtype)
    a = to_dtype(x, acc) * _per_channel(to_dtype(scale, acc)) + _per_channel(to_dtype(shift, acc))
    return to_dtype(torch.relu(a) if relu else a, x.dtype)


@register_kernel("torch", "conv2d_bias_act")
def conv2d_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    relu: bool,
) -> torch.Tensor:
    """``relu(conv2d(x, weight) + bias + residual)``; the additions in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    y = F.conv2d(x, weight, None, stride, padding, dilation).to(acc)
    if bias is not None:
        y = y + _per_channel(bias.to(acc))
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype).contiguous(memory_format=output_memory_format(x))


@register_kernel("torch", "conv2d_stats")
def conv2d_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    prologue_scale: torch.Tensor | None,
    prologue_shift: torch.Tensor | None,
    prologue_relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = conv2d(prologue(x), weight)`` and y's per-channel mean and biased variance."""
    if prologue_scale is not None:
        x_act = prologue_activation(x, prologue_scale, prologue_shift, prologue_relu)
    else:
        x_act = x
    y = F.conv2d(x_act, weight, None, stride, padding, dilation).contiguous(memory_format=output_memory_format(x))
    mean, var = batch_norm_stats(y)
    return y, mean, var
