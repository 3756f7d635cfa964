"""Model builders: torchvision's ImageNet ResNets and the paper's CIFAR-10 ResNets, fused.

ImageNet (torchvision's signatures and state dicts): :func:`resnet18`, :func:`resnet34`,
:func:`resnet50`, :func:`resnet101`, :func:`resnet152`, :func:`resnext50_32x4d`,
:func:`resnext101_32x8d`, :func:`resnext101_64x4d`, :func:`wide_resnet50_2`,
:func:`wide_resnet101_2`. CIFAR-10 (He et al. 2015, §4.2): :func:`resnet20`,
:func:`resnet32`, :func:`resnet44`, :func:`resnet56`, :func:`resnet110`, :func:`resnet1202`.
"""

from resnet_fast.models.cifar import (
    CifarResNet,
    PadShortcut,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    resnet1202,
)
from resnet_fast.models.imagenet import (
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)

__all__ = [
    "CifarResNet",
    "PadShortcut",
    "ResNet",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnet101",
    "resnet110",
    "resnet152",
    "resnet1202",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
