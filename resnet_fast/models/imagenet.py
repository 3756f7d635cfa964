"""ImageNet ResNets with torchvision's constructors, module names, state dicts and init.

``resnet_fast.models.resnet50()`` builds the same network as
``torchvision.models.resnet50()`` — same submodule names, parameter and buffer names and
shapes, the same initialisation (with the same random seed, bit-identical weights) — but
its BatchNorms are :class:`~resnet_fast.nn.BatchNormAct2d` and every convolution runs with
the BatchNorm, residual add and ReLU after it as one ``resnet_fast`` operator. State
dicts move both ways with ``strict=True``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from resnet_fast.models.weights import load_weights, num_classes_for, resolve_weights
from resnet_fast.nn.batch_norm_act import BatchNormAct2d
from resnet_fast.nn.blocks import BasicBlock, Bottleneck, conv1x1
from resnet_fast.nn.stem import stem_forward

__all__ = [
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

Block = Union[type[BasicBlock], type[Bottleneck]]


class ResNet(nn.Module):
    """torchvision's ``ResNet`` (v1.5: stride in the 3x3 convolution), fused.

    Args:
        block: :class:`~resnet_fast.nn.BasicBlock` or :class:`~resnet_fast.nn.Bottleneck`
            (any class with their constructor works, torchvision's included).
        layers: number of blocks in each of the four stages.
        num_classes: outputs of the final ``fc`` layer.
        zero_init_residual: zero the weight of each block's last BatchNorm (``bn3`` of a
            bottleneck, ``bn2`` of a basic block), so every block starts as the identity.
        groups, width_per_group: grouped-convolution width of the bottlenecks (ResNeXt,
            wide ResNet).
        replace_stride_with_dilation: three booleans, one per stage 2-4: dilate instead
            of striding.
        norm_layer: BatchNorm factory, default :class:`~resnet_fast.nn.BatchNormAct2d`;
            ``nn.BatchNorm2d`` is fused the same way, other norms run unfused.

    ``fused_training`` (not in the state dict; set by
    :func:`~resnet_fast.nn.enable_fused_training`; the default None: where measured
    faster, as the blocks'): the stem trains as ``conv2d_stats``
    + ``scale_shift_act`` (:func:`~resnet_fast.nn.stem.stem_forward`), as the blocks do.
    """

    fused_training: bool | None = None

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Sequence[bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = BatchNormAct2d
        self._norm_layer = norm_layer
        if len(layers) != 4:
            raise ValueError(f"layers must give the number of blocks of 4 stages, got {list(layers)}")

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None "
                f"or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        # Construction order matters: it fixes the order in which modules draw from the
        # random generator, so a seed gives the same weights as torchvision.
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)  # kept for torchvision parity; the stem fuses it
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        if zero_init_residual:
            # The last BatchNorm of every residual branch starts at zero (Goyal et al. 2017).
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                for m in stage:
                    last_bn = m.bn3 if hasattr(m, "bn3") else getattr(m, "bn2", None)
                    if last_bn is not None and getattr(last_bn, "weight", None) is not None:
                        nn.init.constant_(last_bn.weight, 0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [
            block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                  previous_dilation, norm_layer)
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = stem_forward(x, self.conv1, self.bn1, self.maxpool, self.fused_training)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def _resnet(block: Block, layers: list[int], weights: Any, progress: bool, enum_name: str,
            builder: str, **kwargs: Any) -> ResNet:
    weights = resolve_weights(weights, enum_name, builder)
    num_classes_for(weights, kwargs)
    model = ResNet(block, layers, **kwargs)
    return load_weights(model, weights, progress)


def _override(kwargs: dict[str, Any], name: str, value: Any) -> None:
    """Fix ``kwargs[name]`` to ``value`` (as torchvision's builders), refusing another value."""
    if name in kwargs and kwargs[name] != value:
        raise ValueError(f"The parameter '{name}' expected value {value} but got {kwargs[name]} instead.")
    kwargs[name] = value


_WEIGHTS_DOC = """
    Args:
        weights: None (random init); a ``torchvision.models.{enum}`` member or its name
            (``"DEFAULT"``, ...: downloaded by torchvision, sets ``num_classes``); a state
            dict; or the path of a file holding one (``torch.load(weights_only=True)``).
        progress: show a download progress bar.
        **kwargs: :class:`ResNet` arguments (``num_classes``, ``zero_init_residual``,
            ``groups``, ``width_per_group``, ``replace_stride_with_dilation``,
            ``norm_layer``).
"""


def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, "ResNet18_Weights", "resnet18", **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, "ResNet34_Weights", "resnet34", **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, "ResNet50_Weights", "resnet50", **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "ResNet101_Weights", "resnet101", **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, "ResNet152_Weights", "resnet152", **kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    _override(kwargs, "groups", 32)
    _override(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, "ResNeXt50_32X4D_Weights",
                   "resnext50_32x4d", **kwargs)


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    _override(kwargs, "groups", 32)
    _override(kwargs, "width_per_group", 8)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "ResNeXt101_32X8D_Weights",
                   "resnext101_32x8d", **kwargs)


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    _override(kwargs, "groups", 64)
    _override(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "ResNeXt101_64X4D_Weights",
                   "resnext101_64x4d", **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    _override(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, "Wide_ResNet50_2_Weights",
                   "wide_resnet50_2", **kwargs)


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    _override(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "Wide_ResNet101_2_Weights",
                   "wide_resnet101_2", **kwargs)


_TITLES = {
    resnet18: "ResNet-18", resnet34: "ResNet-34", resnet50: "ResNet-50", resnet101: "ResNet-101",
    resnet152: "ResNet-152", resnext50_32x4d: "ResNeXt-50 32x4d", resnext101_32x8d: "ResNeXt-101 32x8d",
    resnext101_64x4d: "ResNeXt-101 64x4d", wide_resnet50_2: "Wide ResNet-50-2",
    wide_resnet101_2: "Wide ResNet-101-2",
}
_ENUMS = {
    resnet18: "ResNet18_Weights", resnet34: "ResNet34_Weights", resnet50: "ResNet50_Weights",
    resnet101: "ResNet101_Weights", resnet152: "ResNet152_Weights",
    resnext50_32x4d: "ResNeXt50_32X4D_Weights", resnext101_32x8d: "ResNeXt101_32X8D_Weights",
    resnext101_64x4d: "ResNeXt101_64X4D_Weights", wide_resnet50_2: "Wide_ResNet50_2_Weights",
    wide_resnet101_2: "Wide_ResNet101_2_Weights",
}
for _fn, _title in _TITLES.items():
    _fn.__doc__ = (f"{_title}, as ``torchvision.models.{_fn.__name__}`` (same signature and "
                   f"state dict), with fused BatchNorm/add/ReLU.\n" + _WEIGHTS_DOC.format(enum=_ENUMS[_fn]))
del _fn, _title
