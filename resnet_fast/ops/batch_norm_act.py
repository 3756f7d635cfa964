"""``resnet_fast::batch_norm_act`` — BatchNorm, optional residual add, optional ReLU.

Schema, fake implementation, autograd formula and backend dispatch live here; the math is
in each backend (:mod:`resnet_fast.ops.reference` for ``torch``).

The operator is functional: ``training=True`` normalises with the batch statistics,
``training=False`` with ``running_mean`` / ``running_var``; it returns
``(out, mean, var)``, the per-channel statistics it used (float32, float64 for float64
input). The running-statistics update of ``nn.BatchNorm2d`` is the separate mutating
operator ``resnet_fast::update_running_stats`` (a C-element op), because
``torch.library`` registers autograd only for functional operators; the wrapper
:func:`batch_norm_act` calls both, the update only after the normalisation succeeded,
so a bad call mutates nothing.

Saved for backward: the input, the weight, mean and var, and the output when there is a
ReLU (its sign is the ReLU mask; with a following convolution the output is kept alive
anyway). Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from resnet_fast.ops.common import (
    accumulation_dtype,
    check_batch_norm_args,
    check_input_4d,
    check_per_channel,
    check_same_device,
    output_memory_format,
)
from resnet_fast.ops.dispatch import chosen_backend, select_kernel
from resnet_fast.ops.eager import runs_eagerly
from resnet_fast.ops.triton_ops import share_autograd, triton_op, uses_triton_op


def check_batch_norm_act_args(input, weight, bias, residual, running_mean, running_var, training) -> None:
    """Every check of ``batch_norm_act``'s arguments (no operator runs)."""
    check_input_4d("input", input)
    check_batch_norm_args(input, weight, bias, residual, running_mean, running_var, training)


def _empty_stats(input: Tensor, channels) -> tuple[Tensor, Tensor]:
    stats_dtype = accumulation_dtype(input.dtype)
    return input.new_empty(channels, dtype=stats_dtype), input.new_empty(channels, dtype=stats_dtype)


@torch.library.custom_op("resnet_fast::batch_norm_act", mutates_args=())
def batch_norm_act_op(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, mean, var): the output and the per-channel statistics used."""
    check_batch_norm_act_args(input, weight, bias, residual, running_mean, running_var, training)
    kernel = select_kernel("batch_norm_act", input)
    return kernel(input, weight, bias, residual, running_mean, running_var, training, eps, relu)


@batch_norm_act_op.register_fake
def _(input, weight, bias, residual, running_mean, running_var, training, eps, relu):
    check_batch_norm_act_args(input, weight, bias, residual, running_mean, running_var, training)
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                      memory_format=output_memory_format(input))
    return (out, *_empty_stats(input, input.shape[1]))


@torch.library.custom_op("resnet_fast::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward_op(
    grad_out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    out: Optional[Tensor],
    training: bool,
    eps: float,
    relu: bool,
    need_grad_residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_input, grad_weight, grad_bias, grad_residual).

    ``out`` is needed only with ``relu``. grad_weight and grad_bias are in the statistics
    dtype; grad_residual is empty unless ``need_grad_residual``.
    """
    kernel = select_kernel("batch_norm_act_backward", input)
    return kernel(grad_out, input, weight, mean, var, out, training, eps, relu, need_grad_residual)


@batch_norm_act_backward_op.register_fake
def _(grad_out, input, weight, mean, var, out, training, eps, relu, need_grad_residual):
    fmt = output_memory_format(input)
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    if need_grad_residual:
        grad_residual = torch.empty(input.shape, dtype=grad_out.dtype, device=input.device, memory_format=fmt)
    else:
        grad_residual = grad_out.new_empty(0)
    return grad_input, mean.new_empty(mean.shape), mean.new_empty(mean.shape), grad_residual


@torch.library.custom_op(
    "resnet_fast::update_running_stats",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)
def update_running_stats_op(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: Optional[float],
) -> None:
    """``nn.BatchNorm2d``'s running-statistics update from a batch's (mean, biased var).

    ``num_batches_tracked``, when given, is incremented first. With factor
    f = momentum, or 1 / num_batches_tracked when momentum is None (computed on the
    device, so no host synchronisation):
    running_mean <- (1 - f) running_mean + f mean;
    running_var  <- (1 - f) running_var + f var * count / (count - 1).
    """
    _check_running_stats_args(running_mean, running_var, num_batches_tracked, mean, var, count)
    select_kernel("update_running_stats", running_mean)(
        running_mean, running_var, num_batches_tracked, mean, var, count, momentum
    )


def _check_running_stats_args(running_mean, running_var, num_batches_tracked, mean, var, count) -> None:
    """Every check of ``update_running_stats``'s arguments (nothing is mutated)."""
    channels = running_mean.shape[0] if running_mean.dim() == 1 else -1
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("mean", mean), ("var", var)):
        check_per_channel(name, t, channels)
    check_same_device(running_mean, running_var=running_var, mean=mean, var=var,
                      num_batches_tracked=num_batches_tracked)
    if count < 2:
        raise ValueError(f"count must be at least 2 for an unbiased variance, got {count}")


@update_running_stats_op.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    return None


def save_batch_norm_context(ctx, bias, residual, training: bool, eps: float, relu: bool) -> None:
    """Record what :func:`batch_norm_act_grads` needs besides the saved tensors."""
    ctx.training, ctx.eps, ctx.relu = training, eps, relu
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def batch_norm_act_grads(ctx, grad_out: Tensor, x: Tensor, weight, mean, var, out,
                         need_input: bool, need_weight: bool, need_bias: bool, need_residual: bool):
    """The four gradients (input, weight, bias, residual), None where not needed.

    Shared by this op's autograd and by ``conv_bn_act``'s; ``x`` is the normalised tensor.
    """
    backward = batch_norm_act_backward_op
    if uses_triton_op("batch_norm_act_backward", x):
        backward = triton_op("batch_norm_act_backward")
    grad_input, grad_weight, grad_bias, grad_residual = backward(
        grad_out, x, weight, mean, var, out, ctx.training, ctx.eps, ctx.relu, need_residual and ctx.relu
    )
    if need_residual and not ctx.relu:
        grad_residual = grad_out
    return (
        grad_input if need_input else None,
        grad_weight.to(weight.dtype) if need_weight else None,
        grad_bias.to(ctx.bias_dtype) if need_bias else None,
        grad_residual.to(ctx.residual_dtype) if need_residual else None,
    )


def _setup_context(ctx, inputs, output):
    input, weight, bias, residual, _running_mean, _running_var, training, eps, relu = inputs
    out, mean, var = output
    ctx.save_for_backward(input, weight, mean, var, out if relu else None)
    save_batch_norm_context(ctx, bias, residual, training, eps, relu)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    input, weight, mean, var, out = ctx.saved_tensors
    grads = batch_norm_act_grads(ctx, grad_out, input, weight, mean, var, out, *ctx.needs_input_grad[:4])
    return (*grads, None, None, None, None, None)


batch_norm_act_op.register_autograd(_backward, setup_context=_setup_context)
share_autograd("batch_norm_act", _backward, _setup_context)


def batch_norm_act_forward(input, weight, bias, residual, running_mean, running_var, training: bool, eps: float,
                           relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``resnet_fast::batch_norm_act``, or, when the triton backend serves the call, its
    ``triton_op`` called directly after the same checks (:mod:`resnet_fast.ops.triton_ops`:
    what torch.compile can see into)."""
    if isinstance(input, Tensor) and uses_triton_op("batch_norm_act", input):
        check_batch_norm_act_args(input, weight, bias, residual, running_mean, running_var, training)
        forward = triton_op("batch_norm_act")
        return forward(input, weight, bias, residual, running_mean, running_var, training, eps, relu)
    return batch_norm_act_op(input, weight, bias, residual, running_mean, running_var, training, eps, relu)


def update_running_stats_after(
    normalised: Tensor,
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    training: bool,
    momentum: float | None,
) -> None:
    """Run ``update_running_stats`` when a training call had running statistics; in plain
    eager calls served by the ``torch`` backend its kernel runs without the operator call
    (:mod:`resnet_fast.ops.eager`), after the same checks."""
    if training and running_mean is not None:
        count = normalised.numel() // normalised.shape[1]
        args = (running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(), count, momentum)
        if (isinstance(running_mean, Tensor) and chosen_backend("update_running_stats", running_mean) == "torch"
                and runs_eagerly(*args[:5])):
            _check_running_stats_args(*args[:-1])
            select_kernel("update_running_stats", running_mean)(*args)
        else:
            update_running_stats_op(*args)


def batch_norm_act(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    relu: bool = True,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """``relu(batch_norm(input) + residual)``, updating running statistics in training.

    Same semantics as ``F.batch_norm`` (plus ``num_batches_tracked`` and
    ``momentum=None`` as in ``nn.BatchNorm2d``) followed by the add and ``F.relu``.
    ``input`` is (N, C, H, W) in float16, bfloat16, float32 or float64, NCHW or
    channels_last; the output has its dtype and memory format.
    """
    out, mean, var = batch_norm_act_forward(input, weight, bias, residual, running_mean, running_var,
                                            training, eps, relu)
    update_running_stats_after(input, mean, var, running_mean, running_var, num_batches_tracked,
                               training, momentum)
    return out
