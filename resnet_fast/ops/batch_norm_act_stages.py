"""The ``cuda`` backend of the BatchNorm-family operators, built from stage operators.

A training BatchNorm (+ residual add) (+ ReLU) runs as four memory-bound passes, each a
``torch.library`` operator whose CUDA kernel ``resnet_fast._C`` adds
(``csrc/batch_norm_act.cu``, ``csrc/batch_norm_stats.cu``):

forward
    ``resnet_fast::batch_norm_stats(input) -> (mean, var)`` (training only), then
    ``resnet_fast::batch_norm_act_apply(input, mean, var, weight?, bias?, residual?, eps,
    relu) -> out``: ``out = relu(x * scale + shift + residual)`` with
    ``scale = weight * rsqrt(var + eps)`` and ``shift = bias - mean * scale`` computed
    per channel inside the kernel.
backward
    ``resnet_fast::batch_norm_act_backward_reduce(grad_out, input, mean, var, out?, eps,
    relu) -> (sum_dy, sum_dy_xhat)``: per channel ``sum(dy')`` and ``sum(dy' * x_hat)``
    with ``dy' = grad_out * (out > 0)`` under a ReLU; then
    ``resnet_fast::batch_norm_act_backward_apply(grad_out, input, weight?, mean, var, out?,
    sum_dy, sum_dy_xhat, training, eps, relu, need_grad_residual) -> (grad_input,
    grad_residual)``: ``grad_input = weight * invstd * (dy' - sum_dy / M - x_hat *
    sum_dy_xhat / M)`` in training, ``weight * invstd * dy'`` in evaluation, and
    ``grad_residual = dy'`` (grad_out's dtype; empty unless asked for).

Statistics and sums are float32 (float64 for float64 input); outputs have the input's
dtype and :func:`~resnet_fast.ops.common.output_memory_format`. The default
implementation of each stage operator is the torch math of
:mod:`resnet_fast.ops.reference` (it runs on any device; CUDA tensors go to the kernels
once the extension is built), and a fake implementation sits beside each, so the stage
operators trace under torch.compile and pass ``torch.library.opcheck``.

The backend functions registered here (``batch_norm_act``, ``batch_norm_act_backward``,
``conv_bn_act``) have exactly the ``torch`` backend's signatures; the running-statistics
update is the ``torch`` backend's function (a C-element operation), registered here too so
that ``set_backend("cuda")`` trains with running statistics.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_fast.ops import reference
from resnet_fast.ops.common import (
    accumulation_dtype,
    check_float_tensor,
    check_input_4d,
    check_per_channel,
    check_same_device,
    output_memory_format,
)
from resnet_fast.ops.dispatch import register_kernel

# ---------------------------------------------------------------------------------------
# Argument checks shared by the default and fake implementations (the CUDA kernels check
# the same with TORCH_CHECK).


def _check_same_shape(name: str, t: Tensor, input: Tensor) -> None:
    check_float_tensor(name, t)
    if t.shape != input.shape:
        raise ValueError(f"{name} must have the input's shape {tuple(input.shape)}, got {tuple(t.shape)}")


def _check_stage_args(input: Tensor, per_channel: dict, same_shape: dict) -> None:
    check_input_4d("input", input)
    channels = input.shape[1]
    for name, t in per_channel.items():
        if t is not None:
            check_per_channel(name, t, channels)
    for name, t in same_shape.items():
        if t is not None:
            _check_same_shape(name, t, input)
    check_same_device(input, **per_channel, **same_shape)


def _check_relu_out(relu: bool, out: Tensor | None) -> None:
    if relu and out is None:
        raise ValueError("out (the forward output, whose sign is the ReLU mask) must be given when relu=True")


def _channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------
# Stage operators.


@torch.library.custom_op(
    "resnet_fast::batch_norm_act_apply",
    mutates_args=(),
    schema="(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor? residual, "
    "float eps, bool relu) -> Tensor",
)
def batch_norm_act_apply(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    relu: bool,
) -> Tensor:
    """``relu(input * scale + shift + residual)`` with the given per-channel statistics."""
    _check_stage_args(input, {"mean": mean, "var": var, "weight": weight, "bias": bias}, {"residual": residual})
    # The reference's evaluation mode normalises with given statistics: exactly this stage.
    out, _, _ = reference.batch_norm_act(input, weight, bias, residual, mean, var, False, eps, relu)
    return out


@batch_norm_act_apply.register_fake
def _(input, mean, var, weight, bias, residual, eps, relu):
    _check_stage_args(input, {"mean": mean, "var": var, "weight": weight, "bias": bias}, {"residual": residual})
    return torch.empty(input.shape, dtype=input.dtype, device=input.device,
                       memory_format=output_memory_format(input))


@torch.library.custom_op(
    "resnet_fast::batch_norm_act_backward_reduce",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor input, Tensor mean, Tensor var, Tensor? out, float eps, bool relu) "
    "-> (Tensor sum_dy, Tensor sum_dy_xhat)",
)
def batch_norm_act_backward_reduce(
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    out: Optional[Tensor],
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy')`` and ``sum(dy' * x_hat)`` (the bias and weight gradients)."""
    _check_stage_args(input, {"mean": mean, "var": var}, {"grad_out": grad_out, "out": out if relu else None})
    _check_relu_out(relu, out)
    acc = accumulation_dtype(input.dtype)
    # The reference backward's grad_bias and grad_weight are these sums (its grad_input is
    # not needed here).
    _, sum_dy_xhat, sum_dy, _ = reference.batch_norm_act_backward(
        grad_out, input, None, mean.to(acc), var.to(acc), out, False, eps, relu, False
    )
    return sum_dy, sum_dy_xhat


@batch_norm_act_backward_reduce.register_fake
def _(grad_out, input, mean, var, out, eps, relu):
    _check_stage_args(input, {"mean": mean, "var": var}, {"grad_out": grad_out, "out": out if relu else None})
    _check_relu_out(relu, out)
    acc = accumulation_dtype(input.dtype)
    channels = input.shape[1]
    return input.new_empty(channels, dtype=acc), input.new_empty(channels, dtype=acc)


@torch.library.custom_op(
    "resnet_fast::batch_norm_act_backward_apply",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, Tensor var, Tensor? out, "
    "Tensor sum_dy, Tensor sum_dy_xhat, bool training, float eps, bool relu, bool need_grad_residual) "
    "-> (Tensor grad_input, Tensor grad_residual)",
)
def batch_norm_act_backward_apply(
    grad_out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    out: Optional[Tensor],
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    training: bool,
    eps: float,
    relu: bool,
    need_grad_residual: bool,
) -> tuple[Tensor, Tensor]:
    """``(grad_input, grad_residual)`` from the per-channel sums of the reduce stage.

    The formula of :func:`resnet_fast.ops.reference.batch_norm_act_backward`, with its
    ``grad_bias`` / ``grad_weight`` replaced by the given ``sum_dy`` / ``sum_dy_xhat``.
    """
    _check_backward_apply(grad_out, input, weight, mean, var, out, sum_dy, sum_dy_xhat, relu)
    acc = accumulation_dtype(input.dtype)
    mean, var = mean.to(acc), var.to(acc)
    invstd = torch.rsqrt(var + eps)
    dy = grad_out.to(acc)
    if relu:
        dy = dy.masked_fill(out <= 0, 0)
    scale = invstd if weight is None else weight.to(acc) * invstd
    if training:
        count = input.numel() // max(input.shape[1], 1)
        x_hat = (input.to(acc) - _channel(mean)) * _channel(invstd)
        dy = dy - _channel(sum_dy.to(acc) / count) - x_hat * _channel(sum_dy_xhat.to(acc) / count)
    fmt = output_memory_format(input)
    grad_input = (dy * _channel(scale)).to(input.dtype).contiguous(memory_format=fmt)
    if need_grad_residual:
        masked = grad_out.masked_fill(out <= 0, 0) if relu else grad_out.clone()
        grad_residual = masked.contiguous(memory_format=fmt)
    else:
        grad_residual = grad_out.new_empty(0)
    return grad_input, grad_residual


def _check_backward_apply(grad_out, input, weight, mean, var, out, sum_dy, sum_dy_xhat, relu) -> None:
    per_channel = {"weight": weight, "mean": mean, "var": var, "sum_dy": sum_dy, "sum_dy_xhat": sum_dy_xhat}
    _check_stage_args(input, per_channel, {"grad_out": grad_out, "out": out if relu else None})
    _check_relu_out(relu, out)


@batch_norm_act_backward_apply.register_fake
def _(grad_out, input, weight, mean, var, out, sum_dy, sum_dy_xhat, training, eps, relu, need_grad_residual):
    _check_backward_apply(grad_out, input, weight, mean, var, out, sum_dy, sum_dy_xhat, relu)
    fmt = output_memory_format(input)
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    if need_grad_residual:
        grad_residual = torch.empty(input.shape, dtype=grad_out.dtype, device=input.device, memory_format=fmt)
    else:
        grad_residual = grad_out.new_empty(0)
    return grad_input, grad_residual


# ---------------------------------------------------------------------------------------
# The cuda backend: the torch backend's signatures (resnet_fast/ops/reference.py),
# composed from the stage operators.


@register_kernel("cuda", "batch_norm_act")
def batch_norm_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics (training) or the running statistics (eval), then the apply kernel."""
    if training:
        mean, var = torch.ops.resnet_fast.batch_norm_stats(x)
    else:
        # Copies: the operator's outputs must not alias its inputs (the running buffers).
        acc = accumulation_dtype(x.dtype)
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    out = torch.ops.resnet_fast.batch_norm_act_apply(x, mean, var, weight, bias, residual, eps, relu)
    return out, mean, var


@register_kernel("cuda", "batch_norm_act_backward")
def batch_norm_act_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    out: Tensor | None,
    training: bool,
    eps: float,
    relu: bool,
    need_grad_residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reduce (the sums are grad_bias and grad_weight, needed in eval too), then apply."""
    mask_source = out if relu else None
    sum_dy, sum_dy_xhat = torch.ops.resnet_fast.batch_norm_act_backward_reduce(
        grad_out, x, mean, var, mask_source, eps, relu
    )
    grad_input, grad_residual = torch.ops.resnet_fast.batch_norm_act_backward_apply(
        grad_out, x, weight, mean, var, mask_source, sum_dy, sum_dy_xhat, training, eps, relu, need_grad_residual
    )
    # The operator's fake gives grad_weight / grad_bias mean's dtype, as the torch backend.
    return grad_input, sum_dy_xhat.to(mean.dtype), sum_dy.to(mean.dtype), grad_residual


@register_kernel("cuda", "conv_bn_act")
def conv_bn_act(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``F.conv2d`` (cuDNN), then :func:`batch_norm_act`; returns (out, conv_out, mean, var)."""
    conv_out = F.conv2d(x, conv_weight, conv_bias, stride, padding, dilation, groups)
    conv_out = conv_out.contiguous(memory_format=output_memory_format(x))
    out, mean, var = batch_norm_act(conv_out, weight, bias, residual, running_mean, running_var,
                                    training, eps, relu)
    return out, conv_out, mean, var


# The running-statistics update is a C-element op with no kernel worth writing: the torch
# implementation serves, so an explicit "cuda" choice trains whole modules (as "triton").
register_kernel("cuda", "update_running_stats")(reference.update_running_stats)
