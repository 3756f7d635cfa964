"""``resnet_fast::scale_shift_act`` — a BatchNorm in scale/shift form, + residual, + ReLU.

    out = relu(input * scale + shift + residual)        per channel (residual, ReLU optional)

The last step of a block trained with ``fused_training`` (:mod:`resnet_fast.nn.blocks`):
``scale`` and ``shift`` come from a ``conv2d_stats`` epilogue's statistics
(scale = gamma / sqrt(var + eps), shift = beta - mean * scale), so autograd carries their
gradients back to gamma, beta and the statistics. It is the BatchNorm stage operators
with mean = 0, var = 1, eps = 0, whose per-channel coefficients are then exactly
``scale`` and ``shift``; on CUDA tensors their kernels run it, one pass each way:

forward   ``batch_norm_act_apply``: reads input (and residual), writes out.
backward  ``batch_norm_act_backward_reduce``: grad_shift = sum(g'), grad_scale =
          sum(g' * input) with g' = grad_out * (out > 0) under the ReLU (reads grad_out,
          input, out); ``batch_norm_act_backward_apply`` in evaluation form: grad_input =
          g' * scale and grad_residual = g' (reads grad_out and out, writes both).

Plain PyTorch takes four elementwise kernels forward and about as many backward, each
reading and writing a whole activation. The arithmetic is float32 (float64 for float64
input), the output has the input's dtype and memory format. Double backward is not
supported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from resnet_fast.ops import batch_norm_act_stages  # noqa: F401  defines the stage operators
from resnet_fast.ops.common import (
    accumulation_dtype,
    check_input_4d,
    check_per_channel,
    check_same_device,
    output_memory_format,
    to_dtype,
)
from resnet_fast.ops.eager import operator_function, runs_eagerly

_stage = torch.ops.resnet_fast
_CHANNEL_DIMS = (0, 2, 3)


def _check(input: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None) -> None:
    check_input_4d("input", input)
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            raise ValueError(f"{name} is required")
        check_per_channel(name, t, input.shape[1])
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    check_same_device(input, scale=scale, shift=shift, residual=residual)


def _identity_statistics(scale: Tensor) -> tuple[Tensor, Tensor]:
    """mean = 0 and var = 1: with eps = 0 the stage operators' coefficients are scale and shift."""
    return torch.zeros_like(scale), torch.ones_like(scale)


def _per_channel(t: Tensor, dtype: torch.dtype) -> Tensor:
    return to_dtype(t, dtype).view(1, -1, 1, 1)


def apply_scale_shift(input: Tensor, scale: Tensor | None, shift: Tensor, residual: Tensor | None,
                      relu: bool) -> Tensor:
    """``relu(input * scale + shift + residual)`` by the ``batch_norm_act_apply`` stage (one
    pass on CUDA), not differentiable; ``scale=None`` means 1.

    Off CUDA the stage operator has only its torch math, which with mean 0, var 1 and
    eps 0 is exactly this expression: it runs here directly, without the operator call
    (tens of microseconds of host time each)."""
    if not input.is_cuda:
        acc = accumulation_dtype(input.dtype)
        y = to_dtype(input, acc)
        if scale is not None:
            y = y * _per_channel(scale, acc)
        y = y + _per_channel(shift, acc)
        if residual is not None:
            y = y + to_dtype(residual, acc)
        if relu:
            y = torch.relu(y)
        return to_dtype(y, input.dtype).contiguous(memory_format=output_memory_format(input))
    zeros, ones = _identity_statistics(shift)
    return _stage.batch_norm_act_apply(input, zeros, ones, scale, shift, residual, 0.0, relu)


def scale_shift_backward(grad_out: Tensor, input: Tensor, scale: Tensor, out: Tensor | None, relu: bool,
                         need_input: bool, need_residual: bool) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """Gradients of ``out = relu(input * scale + shift + residual)``, with g' = grad_out *
    (out > 0) under the ReLU (``out`` is only read then):

        (grad_input = g' * scale, grad_scale = sum(g' * input), grad_shift = sum(g'), grad_residual = g')

    per channel in the accumulation dtype for the sums; grad_input and grad_residual are None
    unless asked for. Two passes on CUDA (a reduction, then the elementwise one when needed);
    off CUDA the stages' torch math (x_hat = input with mean 0, var 1), without the
    operator calls.
    """
    if not input.is_cuda:
        acc = accumulation_dtype(input.dtype)
        # ReLU's own backward: grad_out where out > 0, else 0 (masked_fill(out <= 0, 0) in one operator)
        masked = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
        dy = to_dtype(masked, acc)
        fmt = output_memory_format(input)
        grad_input = to_dtype(dy * _per_channel(scale, acc), input.dtype).contiguous(memory_format=fmt) \
            if need_input else None
        grad_residual = masked.contiguous(memory_format=fmt) if need_residual else None
        return grad_input, (dy * to_dtype(input, acc)).sum(_CHANNEL_DIMS), dy.sum(_CHANNEL_DIMS), grad_residual
    zeros, ones = _identity_statistics(scale)
    sum_g, sum_g_input = _stage.batch_norm_act_backward_reduce(grad_out, input, zeros, ones, out, 0.0, relu)
    grad_input = masked = None
    # Without the ReLU, g' is grad_out itself: no kernel writes a copy of it.
    need_masked = need_residual and relu
    if need_input or need_masked:
        grad_input, masked = _stage.batch_norm_act_backward_apply(
            grad_out, input, scale, zeros, ones, out, sum_g, sum_g_input, False, 0.0, relu, need_masked)
        grad_input = grad_input if need_input else None
    grad_residual = (masked if relu else grad_out) if need_residual else None
    return grad_input, sum_g_input, sum_g, grad_residual


@torch.library.custom_op("resnet_fast::scale_shift_act", mutates_args=())
def scale_shift_act_op(input: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """Returns ``relu(input * scale + shift + residual)``."""
    _check(input, scale, shift, residual)
    return apply_scale_shift(input, scale, shift, residual, relu)


@scale_shift_act_op.register_fake
def _(input, scale, shift, residual, relu):
    _check(input, scale, shift, residual)
    return torch.empty(input.shape, dtype=input.dtype, device=input.device,
                       memory_format=output_memory_format(input))


def _setup_context(ctx, inputs, output):
    input, scale, shift, residual, relu = inputs
    ctx.save_for_backward(input, scale, output if relu else None)
    ctx.relu = relu
    ctx.dtypes = (scale.dtype, shift.dtype, None if residual is None else residual.dtype)


def _backward(ctx, grad_out):
    input, scale, out = ctx.saved_tensors
    need_input, need_scale, need_shift, need_residual = ctx.needs_input_grad[:4]
    scale_dtype, shift_dtype, residual_dtype = ctx.dtypes
    grad_input, grad_scale, grad_shift, grad_residual = scale_shift_backward(
        grad_out, input, scale, out, ctx.relu, need_input, need_residual)
    return (grad_input, to_dtype(grad_scale, scale_dtype) if need_scale else None,
            to_dtype(grad_shift, shift_dtype) if need_shift else None,
            to_dtype(grad_residual, residual_dtype) if need_residual else None, None)


scale_shift_act_op.register_autograd(_backward, setup_context=_setup_context)
_ScaleShiftActFunction = operator_function("ScaleShiftActFunction", apply_scale_shift, _setup_context, _backward)


def scale_shift_act(input: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None = None,
                    relu: bool = False) -> Tensor:
    """``relu(input * scale + shift + residual)`` per channel, differentiable in every tensor.

    In plain eager calls the operator's implementation and autograd formula run without
    the operator call (:mod:`resnet_fast.ops.eager`), after the same checks."""
    if isinstance(input, Tensor) and runs_eagerly(input, scale, shift, residual):
        _check(input, scale, shift, residual)
        return _ScaleShiftActFunction.apply(input, scale, shift, residual, relu)
    return scale_shift_act_op(input, scale, shift, residual, relu)
