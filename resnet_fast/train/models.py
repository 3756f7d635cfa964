"""The networks a run trains: resnet_fast's fused ResNets, or plain PyTorch ones to compare with.

``--eager`` trains torchvision's ResNet (ImageNet networks) or, for the CIFAR networks
that torchvision lacks, :class:`TorchCifarResNet` — the paper's CIFAR ResNet built from
torchvision's ``BasicBlock`` and ``nn.BatchNorm2d``. Either way the initial weights are
those of the resnet_fast model built under the same seed (state dicts have the same
keys), so fused and eager runs start from identical parameters.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

import resnet_fast
from resnet_fast.models.cifar import CifarResNet, PadShortcut
from resnet_fast.runtime import ConfigError

IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR_NAME = re.compile(r"resnet(\d+)")


def cifar_depth(name: str) -> int | None:
    """The depth of a CIFAR ResNet name (``resnet20`` → 20; any 6n + 2), else None."""
    match = CIFAR_NAME.fullmatch(name)
    if match is None or name in IMAGENET_MODELS:
        return None
    depth = int(match.group(1))
    return depth if depth >= 8 and (depth - 2) % 6 == 0 else None


def check_model_name(name: str) -> None:
    """Refuse a name that is neither an ImageNet ResNet nor a CIFAR ResNet of depth 6n + 2."""
    if name not in IMAGENET_MODELS and cifar_depth(name) is None:
        raise ConfigError(f"--model {name!r} is not a ResNet this trainer builds; choose one of "
                          f"{', '.join(IMAGENET_MODELS)} or a CIFAR ResNet resnet<6n+2> (resnet8, resnet20, "
                          "resnet32, resnet44, resnet56, resnet110, resnet1202, ...)")


class TorchCifarResNet(nn.Module):
    """The paper's CIFAR ResNet (option A shortcuts) in plain PyTorch: torchvision's
    ``BasicBlock`` and ``nn.BatchNorm2d``, with :class:`resnet_fast.models.CifarResNet`'s
    module names and state-dict keys."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            shortcut = PadShortcut(inplanes, planes, stride) if stride != 1 or inplanes != planes else None
            layers = [BasicBlock(inplanes, planes, stride, shortcut)]
            layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*layers))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(name: str, num_classes: int, eager: bool) -> nn.Module:
    """A freshly initialised network (draws from torch's generator: seed before calling)."""
    check_model_name(name)
    depth = cifar_depth(name)
    fused = (CifarResNet(depth, num_classes=num_classes) if depth is not None
             else getattr(resnet_fast, name)(num_classes=num_classes))
    if not eager:
        return fused
    if depth is not None:
        model = TorchCifarResNet(depth, num_classes)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    model.load_state_dict(fused.state_dict(), strict=True)
    return model


def convert_sync_batchnorm(model: nn.Module, eager: bool, device: torch.device) -> nn.Module:
    """BatchNorms that reduce their batch statistics over all processes.

    resnet_fast models go through :func:`resnet_fast.nn.convert_sync_batchnorm` (in place;
    runs on GPUs and, with gloo, on the CPU); the eager torchvision models through
    ``torch.nn.SyncBatchNorm``, which runs on GPUs only. With one process nothing is synchronized.
    """
    if eager:
        if device.type != "cuda":
            raise ConfigError("--sync-bn --eager needs CUDA devices: torch.nn.SyncBatchNorm does not run on the "
                              "CPU; drop --eager (resnet_fast's synchronized BatchNorm) or --sync-bn")
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return resnet_fast.nn.convert_sync_batchnorm(model, process_group=None)
