"""ResNet blocks with torchvision's constructors, attribute names and state-dict keys.

Each convolution and the BatchNorm after it run as one ``resnet_fast::conv_bn_act`` call;
the block's last one also takes the shortcut as its residual and applies the ReLU. In eval
mode each pair is one ``resnet_fast::conv2d_bias_act`` with the BatchNorm folded into the
convolution (cached; see :mod:`resnet_fast.nn.conv_bn_act`): one kernel per convolution,
the last with the residual add and ReLU in its epilogue, the downsample without ReLU.

Fused training pattern (``block.fused_training = True``, or :func:`enable_fused_training`
on a whole model; by default only where measured faster, see
:mod:`resnet_fast.nn.fused_training_defaults`): each convolution runs as
``resnet_fast::conv2d_stats``, whose epilogue gives its BatchNorm's batch statistics, and
the next convolution applies that BatchNorm and the ReLU in its prologue, so the normalised
activations inside the block are never written (nor saved: backward recomputes them). The
last BatchNorm, the residual add and the ReLU are one ``resnet_fast::scale_shift_act`` (one
pass forward, two backward, by the BatchNorm stage kernels on CUDA), the shortcut's
BatchNorm another. Blocks whose layers do
not qualify (:func:`~resnet_fast.nn.conv_bn_act.is_stats_fusable`) run as before.

Native path: where ``auto`` chooses no fused backend for the input
(:func:`~resnet_fast.ops.dispatch.runs_native`: always on the CPU, on a GPU without a
validation record) and ``fused_training`` is not in effect, a block runs exactly
torchvision's ``forward``: its modules in torchvision's order (the shortcut after the main
branch), ``batch_norm`` unfolded, in-place ``add_`` and ``relu_`` — the same aten
operators, forward and backward. The block's input is checked as the first convolution's
(the later layers are the block's own, and torch's errors name their mismatches).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from resnet_fast.nn.batch_norm_act import BatchNormAct2d, native_batch_norm
from resnet_fast.nn.conv_bn_act import (
    check_native_conv_bn,
    conv_bn_act_forward,
    conv_stats_forward,
    is_fusable,
    is_stats_fusable,
)
from resnet_fast.nn.fused_training_defaults import trains_fused
from resnet_fast.ops.dispatch import runs_native
from resnet_fast.ops.scale_shift_act import scale_shift_act


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (as torchvision)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (as torchvision)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def shortcut_forward(downsample: nn.Module | None, x: Tensor) -> Tensor:
    """The block's identity path: ``x``, or ``downsample(x)`` (fused when it is conv + BN)."""
    if downsample is None:
        return x
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2 and is_fusable(*downsample):
        return conv_bn_act_forward(x, downsample[0], downsample[1], relu=False)
    return downsample(x)


def _fused_training_shortcut(downsample: nn.Module | None) -> bool:
    """Whether the shortcut is the identity or a (conv, BatchNorm) pair conv2d_stats can run."""
    if downsample is None:
        return True
    return isinstance(downsample, nn.Sequential) and len(downsample) == 2 and is_stats_fusable(*downsample)


def fused_training_forward(block: nn.Module, pairs: list[tuple[nn.Module, nn.Module]], x: Tensor) -> Tensor | None:
    """The block as conv2d_stats calls chained through BatchNorm+ReLU prologues, or None
    when ``block`` is not in training mode with ``fused_training`` on (or, for None, chosen by
    measurement) or a layer does not qualify."""
    if not (block.training and trains_fused(getattr(block, "fused_training", None), x)):
        return None
    if not (all(is_stats_fusable(conv, bn) for conv, bn in pairs) and _fused_training_shortcut(block.downsample)):
        return None
    y, prologue = x, None
    for conv, bn in pairs:
        y, scale, shift = conv_stats_forward(y, conv, bn, prologue)
        prologue = (scale, shift)
    if block.downsample is None:
        identity = x
    else:
        identity = scale_shift_act(*conv_stats_forward(x, *block.downsample))
    return scale_shift_act(y, scale, shift, residual=identity, relu=True)


def _native_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """A block's norm layer as torchvision calls it: ``nn.BatchNorm2d``'s forward for the
    BatchNorms (a :class:`BatchNormAct2d`'s ``relu`` flag is the block's business), any
    other norm module as it is."""
    return native_batch_norm(norm, x) if type(norm) in (nn.BatchNorm2d, BatchNormAct2d) else norm(x)


def native_block_forward(block: nn.Module, pairs: list[tuple[nn.Module, nn.Module]], x: Tensor) -> Tensor:
    """torchvision's ``BasicBlock`` / ``Bottleneck`` ``forward``: each (conv, norm) pair,
    ReLU in place between them, the shortcut after the main branch, ``out += identity`` and
    an in-place ReLU; the input checked as the first pair's."""
    first_conv, first_norm = pairs[0]
    if is_fusable(first_conv, first_norm):
        check_native_conv_bn(x, first_conv, first_norm, None)
    out = x
    last = len(pairs) - 1
    for i, (conv, norm) in enumerate(pairs):
        out = _native_norm(norm, conv(out))
        if i < last:
            out = torch.relu_(out)
    identity = x if block.downsample is None else block.downsample(x)
    out += identity
    return torch.relu_(out)


def enable_fused_training(model: nn.Module, enabled: bool | None = True) -> int:
    """Set ``fused_training`` on every module of ``model`` that has the switch: each
    :class:`BasicBlock` / :class:`Bottleneck`, and the stem of a resnet_fast ResNet
    (:class:`resnet_fast.models.ResNet`, :class:`~resnet_fast.models.CifarResNet`, or a
    torchvision ResNet after :func:`resnet_fast.convert`; see :mod:`resnet_fast.nn.stem`).
    True forces the fused pattern, False the default one, None follows the measurements
    (:mod:`resnet_fast.nn.fused_training_defaults`). Returns how many modules were set."""
    switched = [m for m in model.modules() if hasattr(type(m), "fused_training")]
    for module in switched:
        module.fused_training = enabled
    return len(switched)


def _adopt_children(block: nn.Module, source: nn.Module) -> nn.Module:
    """Give ``block`` the children of ``source`` (shared, not copied) and its mode."""
    for name, child in source.named_children():
        block.add_module(name, child)
    if "downsample" not in block._modules:  # ``downsample=None`` is a plain attribute
        block.downsample = getattr(source, "downsample", None)
    block.stride = source.stride
    block.train(source.training)
    return block


def _empty(cls: type[nn.Module]) -> nn.Module:
    """An instance of ``cls`` with no modules yet (its ``__init__`` not run)."""
    block = cls.__new__(cls)
    nn.Module.__init__(block)
    return block


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut: torchvision's ``BasicBlock``, fused.

    ``fused_training`` (not in the state dict): True trains with the statistics-epilogue /
    BatchNorm-prologue pattern (module docstring), False without; the default None does so
    where it was measured faster (:mod:`resnet_fast.nn.fused_training_defaults`).
    """

    expansion: int = 1
    fused_training: bool | None = None

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or BatchNormAct2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "BasicBlock":
        """This block type around ``block``'s own modules (parameters shared)."""
        return _adopt_children(_empty(cls), block)

    def forward(self, x: Tensor) -> Tensor:
        fused = fused_training_forward(self, [(self.conv1, self.bn1), (self.conv2, self.bn2)], x)
        if fused is not None:
            return fused
        if runs_native(x):
            return native_block_forward(self, [(self.conv1, self.bn1), (self.conv2, self.bn2)], x)
        identity = shortcut_forward(self.downsample, x)
        out = conv_bn_act_forward(x, self.conv1, self.bn1, relu=True)
        return conv_bn_act_forward(out, self.conv2, self.bn2, residual=identity, relu=True)


class Bottleneck(nn.Module):
    """1x1, 3x3 (stride here, as torchvision v1.5), 1x1 convolutions with a shortcut, fused.

    ``fused_training`` as :class:`BasicBlock`'s.
    """

    expansion: int = 4
    fused_training: bool | None = None

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or BatchNormAct2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "Bottleneck":
        """This block type around ``block``'s own modules (parameters shared)."""
        return _adopt_children(_empty(cls), block)

    def forward(self, x: Tensor) -> Tensor:
        fused = fused_training_forward(
            self, [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)], x)
        if fused is not None:
            return fused
        if runs_native(x):
            return native_block_forward(
                self, [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)], x)
        identity = shortcut_forward(self.downsample, x)
        out = conv_bn_act_forward(x, self.conv1, self.bn1, relu=True)
        out = conv_bn_act_forward(out, self.conv2, self.bn2, relu=True)
        return conv_bn_act_forward(out, self.conv3, self.bn3, residual=identity, relu=True)
