"""Convolution + BatchNorm (+ residual) (+ ReLU): the function the blocks call, and a module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from resnet_fast.nn.batch_norm_act import BatchNormAct2d, batch_norm_call_args
from resnet_fast.ops.conv_bn_act import conv_bn_act


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


def conv_bn_act_forward(
    x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Tensor | None = None, relu: bool = True
) -> Tensor:
    """``relu(bn(conv(x)) + residual)``, fused when :func:`is_fusable`, else module by module.

    The activation comes from ``relu``; a :class:`BatchNormAct2d`'s own ``relu`` flag is
    not consulted on the fused path. Under ``torch.autocast`` the convolution's input and
    weight are cast to the autocast dtype, as autocast does for ``F.conv2d``; the
    BatchNorm parameters and statistics stay in their own dtype.
    """
    if not is_fusable(conv, bn):
        if isinstance(bn, BatchNormAct2d):  # e.g. SyncBatchNormAct2d: still fuses add and ReLU
            return bn.forward_act(conv(x), residual, relu)
        out = bn(conv(x))
        if residual is not None:
            out = out + residual
        return torch.relu(out) if relu else out
    weight, bias = conv.weight, conv.bias
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return conv_bn_act(
        x, weight, bias, bn.weight, bn.bias, residual=residual, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, relu=relu,
        **batch_norm_call_args(bn),
    )


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
