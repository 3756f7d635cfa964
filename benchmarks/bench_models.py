"""Whole ResNets: resnet_fast's models against torchvision's and their ``torch.compile``.

ImageNet ResNet-18/50/101/152 at 224x224 and the CIFAR ResNet-56 at 32x32, at the
session's batch (the CPU smoke run: ResNet-18 at 32x32 and CIFAR ResNet-20, batch 2).
A ``train`` step is forward, cross-entropy on random labels, backward, an SGD step
(momentum 0.9, lr 0.1, weight decay 1e-4) and ``zero_grad(set_to_none=True)`` (fp16 adds
a GradScaler), as ``python -m resnet_fast.bench`` (also with fused training, the ``rf_<backend>_fused``
variants, stem included); ``infer`` is an eval-mode forward
under ``torch.inference_mode``. Images are float32 (autocast casts them), in the target
layout, with the model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models import resnet as tv

import resnet_fast
from resnet_fast.bench.profiler import CIFAR_MODELS
from resnet_fast.bench.timing import INFER, TRAIN, BenchSpec, Step, Target, shape_id
from resnet_fast.models.cifar import PadShortcut

PASSES = (TRAIN, INFER)
Batch = tuple[Tensor, Tensor]  # images, labels


@dataclass(frozen=True)
class ModelCase:
    """``name`` (a resnet_fast model builder) on a batch of ``image_size`` images."""

    name: str
    batch: int
    image_size: int

    @property
    def id(self) -> str:
        return f"{self.name}-{shape_id(self.shape)}"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 3, self.image_size, self.image_size)

    @property
    def cifar(self) -> bool:
        return self.name in CIFAR_MODELS

    @property
    def num_classes(self) -> int:
        return 10 if self.cifar else 1000


def gpu_models(batch: int) -> list[ModelCase]:
    """ResNet-18/50/101/152 at 224x224, and the CIFAR ResNet-56."""
    return [ModelCase(name, batch, 224) for name in ("resnet18", "resnet50", "resnet101", "resnet152")] + [
        ModelCase("resnet56", batch, 32)]


CPU_CASES = [ModelCase("resnet18", 2, 32), ModelCase("resnet20", 2, 32)]


def eager_cifar_resnet(depth: int, num_classes: int) -> nn.Sequential:
    """The paper's CIFAR ResNet (option A shortcuts) from stock modules — torchvision's
    ``BasicBlock`` and ``nn.BatchNorm2d`` — with resnet_fast's ``CifarResNet`` keys."""
    layers, inplanes = OrderedDict(), 16
    for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        blocks = []
        for index in range((depth - 2) // 6):
            block_stride = stride if index == 0 else 1
            shortcut = None
            if block_stride != 1 or inplanes != planes:
                shortcut = PadShortcut(inplanes, planes, block_stride)
            blocks.append(tv.BasicBlock(inplanes, planes, block_stride, shortcut))
            inplanes = planes
        layers[f"layer{stage}"] = nn.Sequential(*blocks)
    return nn.Sequential(OrderedDict(
        conv1=tv.conv3x3(3, 16), bn1=nn.BatchNorm2d(16), relu=nn.ReLU(inplace=True), **layers,
        avgpool=nn.AdaptiveAvgPool2d((1, 1)), flatten=nn.Flatten(), fc=nn.Linear(64, num_classes)))


def build_eager(case: ModelCase) -> nn.Module:
    """torchvision's model (for the CIFAR ones, :func:`eager_cifar_resnet`)."""
    if case.cifar:
        return eager_cifar_resnet(int(case.name.removeprefix("resnet")), case.num_classes)
    return getattr(torchvision.models, case.name)(num_classes=case.num_classes)


def sgd_step(model: nn.Module, target: Target) -> Step[Batch]:
    """Forward, cross-entropy, backward, SGD step, ``zero_grad``; fp16 with a GradScaler."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(target.device, enabled=target.dtype == "fp16")

    def step(batch: Batch) -> None:
        images, labels = batch
        with target.autocast():
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


@pytest.mark.bench(level="model", gpu_cases=gpu_models, cpu_cases=CPU_CASES, passes=PASSES, fused_training=True)
def test_model(run_bench: Callable[..., None], spec: BenchSpec[ModelCase]) -> None:
    case, target = spec.case, spec.target

    def make_inputs() -> Batch:
        images = torch.randn(case.shape, device=target.device).contiguous(memory_format=target.memory_format)
        return images, torch.randint(0, case.num_classes, (case.batch,), device=target.device)

    run_bench(
        spec, shape=case.shape, make_inputs=make_inputs, train_step=sgd_step,
        forward=lambda model, batch: model(batch[0]),
        build_eager=lambda: build_eager(case),
        build_fused=lambda: getattr(resnet_fast, case.name)(num_classes=case.num_classes),
        operators=("conv_bn_act",),
    )
