"""The CIFAR-10 ResNets of He et al., "Deep Residual Learning for Image Recognition" (§4.2).

A 3x3 convolution with 16 filters (+ BatchNorm + ReLU) on the 32x32 input, then three
stages of ``n`` :class:`~resnet_fast.nn.BasicBlock` s (2n 3x3 convolutions each) with
16, 32 and 64 filters on 32x32, 16x16 and 8x8 maps (the first block of stages 2 and 3
has stride 2), global average pooling and a ``num_classes``-way fully connected layer:
6n + 2 weighted layers. ``resnet20 … resnet1202`` are n = 3, 5, 7, 9, 18, 200.

Shortcuts when the dimensions change (paper's options):

* ``"A"`` (default, as the paper's CIFAR experiments): parameter-free — subsample with
  stride 2 (``x[:, :, ::2, ::2]``) and append zero channels (:class:`PadShortcut`);
* ``"B"``: a projection, 1x1 convolution + BatchNorm (fused into one operator).

Identity shortcuts everywhere else.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet_fast.models.weights import load_weights, resolve_weights
from resnet_fast.nn.batch_norm_act import BatchNormAct2d
from resnet_fast.nn.blocks import BasicBlock, conv1x1, conv3x3
from resnet_fast.nn.stem import stem_forward

__all__ = [
    "CifarResNet",
    "PadShortcut",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet1202",
]

SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option A shortcut: ``x[:, :, ::stride, ::stride]`` with zero channels appended.

    No parameters. ``in_planes`` channels become ``out_planes`` (the new ones zero).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 2) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"PadShortcut cannot reduce channels ({in_planes} -> {out_planes})")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_planes - self.in_planes))

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


def _blocks_per_stage(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, 1202, ...), "
            f"got {depth!r}"
        )
    return (depth - 2) // 6


class CifarResNet(nn.Module):
    """The paper's CIFAR-10 ResNet of ``depth`` = 6n + 2 layers.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, 1202, ...).
        num_classes: outputs of ``fc`` (10 for CIFAR-10).
        shortcut: ``"A"`` (zero-padding identity, no parameters) or ``"B"`` (1x1
            convolution + BatchNorm projection where the dimensions change).
        norm_layer: BatchNorm factory, default :class:`~resnet_fast.nn.BatchNormAct2d`.

    Submodules: ``conv1``, ``bn1``, ``relu``, ``layer1``-``layer3`` (``nn.Sequential`` of
    :class:`~resnet_fast.nn.BasicBlock`), ``avgpool``, ``fc``.

    ``fused_training`` (not in the state dict; set by
    :func:`~resnet_fast.nn.enable_fused_training`; the default None: where measured
    faster, as the blocks'): the stem trains as ``conv2d_stats``
    + ``scale_shift_act`` (:func:`~resnet_fast.nn.stem.stem_forward`).
    """

    fused_training: bool | None = None

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        shortcut: str = "A",
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        n = _blocks_per_stage(depth)
        shortcut = shortcut.upper() if isinstance(shortcut, str) else shortcut
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be 'A' (zero-padding) or 'B' (projection), got {shortcut!r}")
        if norm_layer is None:
            norm_layer = BatchNormAct2d
        self.depth = depth
        self.shortcut = shortcut
        self._norm_layer = norm_layer
        self.inplanes = 16

        self.conv1 = conv3x3(3, 16)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)  # kept for readability; the stem fuses it
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes:
            if self.shortcut == "A":
                downsample = PadShortcut(self.inplanes, planes, stride)
            else:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), self._norm_layer(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, norm_layer=self._norm_layer)]
        self.inplanes = planes
        layers.extend(BasicBlock(planes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = stem_forward(x, self.conv1, self.bn1, fused_training=self.fused_training)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, shortcut={self.shortcut!r}"


def _cifar_resnet(depth: int, weights: Any, num_classes: int, shortcut: str,
                  norm_layer: Callable[..., nn.Module] | None) -> CifarResNet:
    weights = resolve_weights(weights, None, f"resnet{depth}")
    model = CifarResNet(depth, num_classes=num_classes, shortcut=shortcut, norm_layer=norm_layer)
    return load_weights(model, weights)


_BUILDER_DOC = """ResNet-{depth} for CIFAR-10 (He et al. 2015, §4.2; n = {n}, {params} parameters with option A).

    Args:
        num_classes: outputs of the final layer.
        shortcut: ``"A"`` (zero-padding, the paper's choice) or ``"B"`` (projection).
        norm_layer: BatchNorm factory, default :class:`~resnet_fast.nn.BatchNormAct2d`.
        weights: None, a state dict, or the path of a file holding one.
"""


def resnet20(*, num_classes: int = 10, shortcut: str = "A", norm_layer: Callable[..., nn.Module] | None = None,
             weights: Any = None) -> CifarResNet:
    return _cifar_resnet(20, weights, num_classes, shortcut, norm_layer)


def resnet32(*, num_classes: int = 10, shortcut: str = "A", norm_layer: Callable[..., nn.Module] | None = None,
             weights: Any = None) -> CifarResNet:
    return _cifar_resnet(32, weights, num_classes, shortcut, norm_layer)


def resnet44(*, num_classes: int = 10, shortcut: str = "A", norm_layer: Callable[..., nn.Module] | None = None,
             weights: Any = None) -> CifarResNet:
    return _cifar_resnet(44, weights, num_classes, shortcut, norm_layer)


def resnet56(*, num_classes: int = 10, shortcut: str = "A", norm_layer: Callable[..., nn.Module] | None = None,
             weights: Any = None) -> CifarResNet:
    return _cifar_resnet(56, weights, num_classes, shortcut, norm_layer)


def resnet110(*, num_classes: int = 10, shortcut: str = "A", norm_layer: Callable[..., nn.Module] | None = None,
              weights: Any = None) -> CifarResNet:
    return _cifar_resnet(110, weights, num_classes, shortcut, norm_layer)


def resnet1202(*, num_classes: int = 10, shortcut: str = "A", norm_layer: Callable[..., nn.Module] | None = None,
               weights: Any = None) -> CifarResNet:
    return _cifar_resnet(1202, weights, num_classes, shortcut, norm_layer)


for _fn, _depth, _params in ((resnet20, 20, "0.27M"), (resnet32, 32, "0.46M"), (resnet44, 44, "0.66M"),
                             (resnet56, 56, "0.85M"), (resnet110, 110, "1.7M"), (resnet1202, 1202, "19.4M")):
    _fn.__doc__ = _BUILDER_DOC.format(depth=_depth, n=(_depth - 2) // 6, params=_params)
del _fn, _depth, _params
