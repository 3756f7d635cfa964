"""``resnet_fast::conv2d_stats`` — convolution with BatchNorm prologue and statistics epilogue.

The training pattern of NVIDIA's MLPerf ResNet-50:

    a    = relu(input * prologue_scale + prologue_shift)   per input channel (optional)
    out  = conv2d(a, weight)                                groups=1, zero padding
    mean = mean(out), var = mean((out - mean)^2)            per output channel, float32

``input`` is the previous convolution's raw output and (scale, shift) its BatchNorm in
scale/shift form (scale = gamma / sqrt(var + eps), shift = beta - mean * scale, built by
the caller from this op's statistics, so autograd reaches gamma, beta and the
statistics). Padding is applied to ``a``: padded positions are zero after the
activation. ``a`` is never materialised by the ``triton`` backend (it is computed while
loading input tiles) and never saved for backward (recomputed there). ``mean`` and
``var`` (biased) are float32 (float64 for float64 input) and come from the convolution
kernel's epilogue in the ``triton`` backend, from the float32 accumulator; ``out`` has
the input's dtype and memory format.

Backward (``g`` the gradients of out, mean, var; M = N*P*Q):

    grad_out_total = g_out + g_mean / M + g_var * 2 (out - mean) / M
    grad_a, grad_weight = convolution_backward(grad_out_total, a, weight)   (a recomputed)
    g' = grad_a * (x * scale + shift > 0)                                   (ReLU mask)
    grad_input = g' * scale, grad_scale = sum(g' * x), grad_shift = sum(g')

Memory traffic per training step, in elements of the activation tensors (x: the input,
E_in elements; y: the output, E_out elements), beside the weights:

* forward: reads x once per filter tap it meets (from L2/cache for overlapping taps;
  one DRAM pass ideally), writes y once; the statistics are (3, M tiles, C_out) float32
  partials. The normalised activation relu(x * scale + shift) is neither written nor
  saved: the unfused ``conv(relu(bn(x)))`` writes and re-reads it (2 E_in) and saves it.
* backward: the statistics term is one scale/shift pass (reads g_out and y, writes the
  total gradient: 3 E_out); the activation is recomputed in one pass (reads x, writes a:
  2 E_in); cuDNN's dgrad reads the gradient and writes grad_a (E_out + E_in) and wgrad
  reads the gradient and a (E_out + E_in); the prologue's chain rule is a reduction
  (reads grad_a, x and a: 3 E_in) for grad_scale and grad_shift and one pass for
  grad_input (reads grad_a and a, writes grad_input: 3 E_in). The scale/shift passes are
  the BatchNorm stage operators (:mod:`resnet_fast.ops.scale_shift_act`), one CUDA kernel
  each once the extension is built. No GPU measurement of these has been made yet.

Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from resnet_fast.ops.common import (
    accumulation_dtype,
    check_conv_args,
    check_per_channel,
    check_same_device,
    output_memory_format,
    to_dtype,
)
from resnet_fast.ops.dispatch import chosen_backend, select_kernel
from resnet_fast.ops.eager import operator_function, runs_eagerly
from resnet_fast.ops.scale_shift_act import apply_scale_shift, scale_shift_backward
from resnet_fast.ops.triton_ops import share_autograd, triton_op, uses_triton_op


def _check(input, weight, stride, padding, dilation, prologue_scale, prologue_shift):
    out_shape = check_conv_args(input, weight, None, stride, padding, dilation, 1, weight_name="weight")
    if (prologue_scale is None) != (prologue_shift is None):
        raise ValueError("prologue_scale and prologue_shift must both be given or both be None")
    check_per_channel("prologue_scale", prologue_scale, input.shape[1])
    check_per_channel("prologue_shift", prologue_shift, input.shape[1])
    check_same_device(input, prologue_scale=prologue_scale, prologue_shift=prologue_shift)
    if out_shape[0] * out_shape[2] * out_shape[3] <= 1:
        raise ValueError(f"Expected more than 1 value per channel for the statistics, got a convolution "
                         f"output of size {tuple(out_shape)}")
    return out_shape


@torch.library.custom_op("resnet_fast::conv2d_stats", mutates_args=())
def conv2d_stats_op(
    input: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    prologue_scale: Optional[Tensor],
    prologue_shift: Optional[Tensor],
    prologue_relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, mean, var): the convolution of the activated input and its statistics."""
    _check(input, weight, stride, padding, dilation, prologue_scale, prologue_shift)
    return _run_kernel(input, weight, stride, padding, dilation, prologue_scale, prologue_shift, prologue_relu)


@conv2d_stats_op.register_fake
def _(input, weight, stride, padding, dilation, prologue_scale, prologue_shift, prologue_relu):
    out_shape = _check(input, weight, stride, padding, dilation, prologue_scale, prologue_shift)
    out = torch.empty(out_shape, dtype=input.dtype, device=input.device, memory_format=output_memory_format(input))
    stats_dtype = accumulation_dtype(input.dtype)
    return out, input.new_empty(out_shape[1], dtype=stats_dtype), input.new_empty(out_shape[1], dtype=stats_dtype)


def _setup_context(ctx, inputs, output):
    input, weight, stride, padding, dilation, prologue_scale, prologue_shift, prologue_relu = inputs
    out, mean, _var = output
    ctx.save_for_backward(input, weight, prologue_scale, prologue_shift, out, mean)
    ctx.conv_args = (stride, padding, dilation)
    ctx.prologue_relu = prologue_relu


def _statistics_gradient(grad_out: Tensor | None, grad_mean: Tensor | None, grad_var: Tensor | None,
                         out: Tensor, mean: Tensor) -> Tensor:
    """``g_out + g_mean / M + g_var * 2 (out - mean) / M`` in out's dtype: one scale/shift
    pass over ``out`` (scale ``w = 2 g_var / M``, shift ``g_mean / M - w * mean``, residual
    ``g_out``)."""
    count = out.numel() // out.shape[1]
    shift = torch.zeros_like(mean) if grad_mean is None else to_dtype(grad_mean, mean.dtype) / count
    if grad_var is not None:
        w = 2 * to_dtype(grad_var, mean.dtype) / count
        return apply_scale_shift(out, w, shift - w * mean, grad_out, relu=False)
    if grad_out is None:
        return shift.to(out.dtype).view(1, -1, 1, 1).expand(out.shape).contiguous(
            memory_format=output_memory_format(out))
    return grad_out if grad_mean is None else apply_scale_shift(grad_out, None, shift, None, relu=False)


def _backward(ctx, grad_out, grad_mean, grad_var):
    input, weight, scale, shift, out, mean = ctx.saved_tensors
    need_input, need_weight = ctx.needs_input_grad[:2]
    need_scale, need_shift = ctx.needs_input_grad[5:7]
    grad = _statistics_gradient(grad_out, grad_mean, grad_var, out, mean)
    has_prologue = scale is not None
    # the activation, recomputed: relu(x * scale + shift) rounded to x's dtype, as the forward used it
    x_act = apply_scale_shift(input, scale, shift, None, ctx.prologue_relu) if has_prologue else input
    need_act = need_input or (has_prologue and (need_scale or need_shift))
    stride, padding, dilation = ctx.conv_args
    grad_act, grad_weight, _ = torch.ops.aten.convolution_backward(
        to_dtype(grad, input.dtype), x_act, weight, None, stride, padding, dilation, False, [0, 0], 1,
        [need_act, need_weight, False])
    grad_input = grad_scale = grad_shift = None
    if need_act and not has_prologue:
        grad_input = grad_act
    elif need_act:
        # the ReLU's mask is that of the recomputed activation (x_act > 0), as torch.relu's backward
        grad_input, grad_scale, grad_shift, _ = scale_shift_backward(
            grad_act, input, scale, x_act if ctx.prologue_relu else None, ctx.prologue_relu, need_input, False)
        grad_scale = to_dtype(grad_scale, scale.dtype) if need_scale else None
        grad_shift = to_dtype(grad_shift, shift.dtype) if need_shift else None
    return grad_input, grad_weight, None, None, None, grad_scale, grad_shift, None


conv2d_stats_op.register_autograd(_backward, setup_context=_setup_context)
share_autograd("conv2d_stats", _backward, _setup_context)


def _run_kernel(input, weight, stride, padding, dilation, prologue_scale, prologue_shift, prologue_relu):
    kernel = select_kernel("conv2d_stats", input)
    return kernel(input, weight, stride, padding, dilation, prologue_scale, prologue_shift, prologue_relu)


_Conv2dStatsFunction = operator_function("Conv2dStatsFunction", _run_kernel, _setup_context, _backward)


def _pair(value: int | tuple[int, int] | list[int]) -> list[int]:
    return [value, value] if isinstance(value, int) else [int(v) for v in value]


def conv2d_stats(
    input: Tensor,
    weight: Tensor,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    prologue_scale: Tensor | None = None,
    prologue_shift: Tensor | None = None,
    prologue_relu: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``out = F.conv2d(relu(input * prologue_scale + prologue_shift), weight, ...)`` and
    out's per-channel mean and biased variance: (out, mean, var).

    Without ``prologue_scale``/``prologue_shift`` the input is used as it is (and
    ``prologue_relu`` is ignored). In plain eager calls served by the ``torch`` backend the
    operator's implementation and autograd formula run without the operator call
    (:mod:`resnet_fast.ops.eager`), after the same checks.
    """
    args = (input, weight, _pair(stride), _pair(padding), _pair(dilation), prologue_scale, prologue_shift,
            prologue_relu)
    if isinstance(input, Tensor) and uses_triton_op("conv2d_stats", input):
        _check(*args[:-1])  # then the triton_op itself, which torch.compile sees into
        return triton_op("conv2d_stats")(*args)
    if (isinstance(input, Tensor) and chosen_backend("conv2d_stats", input) == "torch"
            and runs_eagerly(input, weight, prologue_scale, prologue_shift)):
        _check(*args[:-1])
        return _Conv2dStatsFunction.apply(*args)
    return conv2d_stats_op(*args)
