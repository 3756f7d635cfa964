"""Convolution + BatchNorm (+ residual) (+ ReLU): the function the blocks call, and a module.

Training (and any BatchNorm that normalises with batch statistics) runs
``resnet_fast::conv_bn_act``. In evaluation with running statistics the BatchNorm is
folded into the convolution, per output channel c (s = gamma / sqrt(running_var + eps)):

    w'[c] = w[c] * s[c],    b'[c] = beta[c] + (b[c] - running_mean[c]) * s[c]

and the layer is one ``resnet_fast::conv2d_bias_act`` call (bias, residual and ReLU in
the convolution's epilogue: one kernel in the ``triton`` backend). The fold is computed
in float32 (float64 for float64 parameters); w' is stored in the convolution's dtype
(the autocast dtype under autocast), b' stays in float32.

Native path: where ``auto`` chooses no fused backend for the input
(:func:`~resnet_fast.ops.dispatch.runs_native`: always on the CPU, and on a GPU without a
validation record), a conv + BN pair runs exactly torchvision eager's aten operators —
``conv2d``, ``batch_norm``, then in-place ``add_`` and ``relu_`` — in training and in
evaluation (no fold: torchvision does not fold either), after the same argument checks.

Fold cache: without autograd (``torch.no_grad``/``inference_mode``, or no parameter
requiring grad) the folded (w', b') of each convolution is cached outside the modules
(so never in a state dict) and recomputed when any of conv weight/bias, BN weight/bias,
running_mean/running_var is replaced (identity, e.g. ``.to(dtype)``) or modified in
place (its ``_version``: optimizer steps, ``load_state_dict``, training-mode statistics
updates), or when eps, the dtype, device or memory format asked for changes. Changes
made through ``tensor.data`` bypass version counting: call :func:`clear_fold_cache`
after them. With autograd on, or under torch.compile (which traces the fold as part of
the graph), the fold is recomputed on each call, differentiably.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from resnet_fast.nn.batch_norm_act import (
    BatchNormAct2d,
    batch_norm_call_args,
    native_add_relu,
    native_batch_norm,
)
from resnet_fast.ops.batch_norm_act import update_running_stats_after
from resnet_fast.ops.common import to_dtype
from resnet_fast.ops.conv2d_bias_act import conv2d_bias_act
from resnet_fast.ops.conv2d_stats import conv2d_stats
from resnet_fast.ops.conv_bn_act import check_conv_bn_act_args, conv_bn_act
from resnet_fast.ops.dispatch import runs_native
from resnet_fast.ops.eager import runs_eagerly


def is_fusable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn(conv(x))`` can run as one ``resnet_fast::conv_bn_act`` call.

    Needs a plain ``nn.Conv2d`` with zero padding given as numbers and a BatchNorm with
    ``nn.BatchNorm2d``'s forward (``nn.BatchNorm2d`` itself or :class:`BatchNormAct2d`).
    Anything else (GroupNorm, frozen BatchNorm, ``padding="same"``, reflective padding,
    subclasses with their own forward) runs unfused; a :class:`SyncBatchNormAct2d
    <resnet_fast.nn.SyncBatchNormAct2d>` runs after the convolution with its own fused
    add and ReLU.
    """
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and type(bn) in (nn.BatchNorm2d, BatchNormAct2d)
    )


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def fold_batch_norm(
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    dtype: torch.dtype,
    memory_format: torch.memory_format = torch.channels_last,
) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm folded into the preceding convolution: (w', b').

    ``w' = w * s`` per output channel and ``b' = beta + (b - running_mean) * s`` with
    ``s = gamma / sqrt(running_var + eps)`` (gamma = 1, beta = 0 without affine
    parameters), computed in float32 (float64 when ``dtype`` or the statistics are
    float64). w' is returned in ``dtype`` and ``memory_format``, b' in the computation dtype.
    """
    acc = torch.float64 if torch.float64 in (dtype, running_var.dtype, conv_weight.dtype) else torch.float32
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = bn_weight.to(acc) * scale
    weight = (conv_weight.to(acc) * scale.view(-1, 1, 1, 1)).to(dtype).contiguous(memory_format=memory_format)
    centred = -running_mean.to(acc) if conv_bias is None else conv_bias.to(acc) - running_mean.to(acc)
    bias = centred * scale
    if bn_bias is not None:
        bias = bias + bn_bias.to(acc)
    return weight, bias


@dataclass
class _Fold:
    """A cached fold and what it was computed from (weak references: no memory kept alive)."""

    sources: tuple[weakref.ref | None, ...]
    versions: tuple[int, ...]
    settings: tuple
    weight: Tensor
    bias: Tensor

    def matches(self, tensors: tuple[Tensor | None, ...], settings: tuple) -> bool:
        if settings != self.settings:
            return False
        for ref, version, t in zip(self.sources, self.versions, tensors):
            if (ref is None) != (t is None) or (t is not None and (ref() is not t or t._version != version)):
                return False
        return True


_FOLD_CACHE: "weakref.WeakKeyDictionary[nn.Module, _Fold]" = weakref.WeakKeyDictionary()


def clear_fold_cache() -> None:
    """Forget every cached BatchNorm fold (needed only after changes made through ``.data``)."""
    _FOLD_CACHE.clear()


def is_foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn(conv(x))`` runs as a folded ``conv2d_bias_act``: a fusable pair
    (:func:`is_fusable`) with groups=1, the BatchNorm in eval mode with running statistics."""
    return (is_fusable(conv, bn) and conv.groups == 1 and not bn.training
            and bn.running_mean is not None and bn.running_var is not None)


def folded_weight_and_bias(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype,
                           memory_format: torch.memory_format) -> tuple[Tensor, Tensor]:
    """(w', b') of :func:`fold_batch_norm` for these modules, cached when autograd is off."""
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    args = (*tensors, bn.eps, dtype, memory_format)
    params = (conv.weight, conv.bias, bn.weight, bn.bias)
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)):
        return fold_batch_norm(*args)
    # a fold made under inference_mode holds inference tensors, which autograd cannot save
    settings = (bn.eps, dtype, memory_format, conv.weight.device, torch.is_inference_mode_enabled())
    cached = _FOLD_CACHE.get(conv)
    if cached is None or not cached.matches(tensors, settings):
        with torch.no_grad():
            weight, bias = fold_batch_norm(*args)
        cached = _Fold(tuple(None if t is None else weakref.ref(t) for t in tensors),
                       tuple(0 if t is None else t._version for t in tensors), settings, weight, bias)
        _FOLD_CACHE[conv] = cached
    return cached.weight, cached.bias


def conv_bn_act_forward(
    x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Tensor | None = None, relu: bool = True
) -> Tensor:
    """``relu(bn(conv(x)) + residual)``, fused when :func:`is_fusable`, else module by module.

    The activation comes from ``relu``; a :class:`BatchNormAct2d`'s own ``relu`` flag is
    not consulted on the fused path. Under ``torch.autocast`` the convolution's input and
    weight are cast to the autocast dtype, as autocast does for ``F.conv2d``; the
    BatchNorm parameters and statistics stay in their own dtype. In eval mode the
    BatchNorm is folded into the convolution (:func:`is_foldable`, module docstring). On the
    native path (:func:`~resnet_fast.ops.dispatch.runs_native`) the modules' own aten
    operators run instead, after the same checks (:func:`native_conv_bn_act`).
    """
    if isinstance(x, Tensor) and is_fusable(conv, bn) and runs_native(x):
        return native_conv_bn_act(x, conv, bn, residual, relu)
    if not is_fusable(conv, bn):
        if isinstance(bn, BatchNormAct2d):  # e.g. SyncBatchNormAct2d: still fuses add and ReLU
            return bn.forward_act(conv(x), residual, relu)
        out = bn(conv(x))
        if residual is not None:
            out = out + residual
        return torch.relu(out) if relu else out
    dtype = _autocast_dtype(x)
    if is_foldable(conv, bn):
        if dtype is not None:
            x = x.to(dtype)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        # without autocast w' keeps the conv weight's dtype: a mismatched input is refused, as by F.conv2d
        weight, bias = folded_weight_and_bias(conv, bn, dtype or conv.weight.dtype, fmt)
        return conv2d_bias_act(x, weight, bias, residual, stride=conv.stride, padding=conv.padding,
                               dilation=conv.dilation, relu=relu)
    weight, bias = conv.weight, conv.bias
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return conv_bn_act(
        x, weight, bias, bn.weight, bn.bias, residual=residual, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, relu=relu,
        **batch_norm_call_args(bn),
    )


def check_native_conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: Tensor | None) -> None:
    """The checks of ``resnet_fast::conv_bn_act`` for a fusable pair, run by the native path
    (no operator runs). Under autocast the convolution's dtypes are autocast's to choose."""
    args = batch_norm_call_args(bn)
    check_conv_bn_act_args(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                           bn.weight, bn.bias, residual, args["running_mean"], args["running_var"],
                           args["training"], autocast=_autocast_dtype(x) is not None)


def native_conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: Tensor | None = None,
                       relu: bool = True) -> Tensor:
    """``relu(bn(conv(x)) + residual)`` as torchvision eager runs it: ``conv2d``,
    ``batch_norm``, in-place ``add_`` and ``relu_`` (no fold in evaluation)."""
    check_native_conv_bn(x, conv, bn, residual)
    return native_add_relu(native_batch_norm(bn, conv(x)), residual, relu)


def is_stats_fusable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn(conv(x))`` can run as ``conv2d_stats`` + scale/shift in training: a
    fusable pair (:func:`is_fusable`), groups=1, no conv bias, BatchNorm in training."""
    return is_fusable(conv, bn) and conv.groups == 1 and conv.bias is None and bn.training


def conv_stats_forward(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    prologue: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training conv + BatchNorm with the normalisation left to the consumer.

    ``y = conv(relu(x * scale + shift))`` (the previous BatchNorm + ReLU applied in the
    convolution's prologue when ``prologue = (scale, shift)``) by ``conv2d_stats``, whose
    epilogue gives y's batch mean and variance; ``bn``'s running statistics are updated
    from them as ``nn.BatchNorm2d`` does. Returns (y, scale, shift): ``bn`` in the form
    ``bn(y) = y * scale + shift`` per channel (scale = gamma / sqrt(var + eps),
    shift = beta - mean * scale, differentiable in gamma, beta and the statistics), for the
    next convolution's prologue or a final ``resnet_fast::scale_shift_act``.
    """
    weight = conv.weight
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
    scale, shift = prologue if prologue is not None else (None, None)
    y, mean, var = conv2d_stats(x, weight, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                prologue_scale=scale, prologue_shift=shift, prologue_relu=True)
    args = batch_norm_call_args(bn)
    update_running_stats_after(y, mean, var, args["running_mean"], args["running_var"],
                               args["num_batches_tracked"], True, args["momentum"])
    return (y, *batch_norm_scale_shift(mean, var, bn.weight, bn.bias, bn.eps))


def _scale_shift_terms(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(invstd, -mean, scale, shift) of :func:`batch_norm_scale_shift`, op by op."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else to_dtype(weight, var.dtype) * invstd
    neg_mean = -mean
    shift = neg_mean * scale
    if bias is not None:
        shift = shift + to_dtype(bias, var.dtype)
    return invstd, neg_mean, scale, shift


class _BatchNormScaleShift(torch.autograd.Function):
    """:func:`_scale_shift_terms` as one autograd node: the chain rule of its six operators
    written out in the order and form autograd applies them, so values and gradients are
    bit-identical to the composition while the host runs one node instead of six."""

    @staticmethod
    def forward(ctx, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor]:
        invstd, neg_mean, scale, shift = _scale_shift_terms(mean, var, weight, bias, eps)
        ctx.save_for_backward(invstd, neg_mean, scale, weight)
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return scale, shift

    @staticmethod
    def backward(ctx, grad_scale: Tensor, grad_shift: Tensor):
        invstd, neg_mean, scale, weight = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        need_mean, need_var, need_weight, need_bias = ctx.needs_input_grad[:4]
        grad_mean = (grad_shift * scale).neg() if need_mean else None
        grad_scale = grad_scale + grad_shift * neg_mean
        grad_weight = to_dtype(grad_scale * invstd, weight_dtype) if need_weight else None
        grad_invstd = grad_scale if weight is None else grad_scale * to_dtype(weight, invstd.dtype)
        grad_var = -0.5 * grad_invstd * invstd.pow(3) if need_var else None
        grad_bias = to_dtype(grad_shift, bias_dtype) if need_bias else None
        return grad_mean, grad_var, grad_weight, grad_bias, None


def batch_norm_scale_shift(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                           eps: float) -> tuple[Tensor, Tensor]:
    """A BatchNorm with batch statistics (mean, biased var) as ``bn(y) = y * scale + shift``:
    scale = weight / sqrt(var + eps), shift = bias - mean * scale (in var's dtype),
    differentiable in every tensor. Plain eager calls run it as one autograd node
    (:class:`_BatchNormScaleShift`, bit-identical), traced ones as its operators."""
    if runs_eagerly(mean, var, weight, bias):
        return _BatchNormScaleShift.apply(mean, var, weight, bias, eps)
    _, _, scale, shift = _scale_shift_terms(mean, var, weight, bias, eps)
    return scale, shift


class ConvBNAct2d(nn.Module):
    """``relu(BatchNorm2d(Conv2d(x)) + residual)`` as one operator.

    Holds ``conv`` (``nn.Conv2d``, no bias by default) and ``bn`` (:class:`BatchNormAct2d`),
    so its state-dict keys are ``conv.weight``, ``bn.weight``, ``bn.running_mean`` ...

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            as ``nn.Conv2d``.
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``.
        relu: apply ReLU after the (optional) residual add.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        relu: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              groups, bias, device=device, dtype=dtype)
        self.bn = BatchNormAct2d(out_channels, eps, momentum, affine, track_running_stats,
                                 device=device, dtype=dtype)
        self.relu = relu

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return conv_bn_act_forward(input, self.conv, self.bn, residual, self.relu)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"
