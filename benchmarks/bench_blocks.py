"""ResNet blocks: ``resnet_fast.nn.BasicBlock`` / ``Bottleneck`` against torchvision's and
their ``torch.compile``, at the real stage configurations.

Bottleneck: every stage of ResNet-50, its first block (stride and projection shortcut:
(N,64,56,56) -> (N,256,56,56), (N,256,56,56) -> (N,512,28,28), ...) and a following
identity block. BasicBlock: the same for ResNet-18/34 (whose first block of stage 1 is
already an identity block). Throughput in images/s at the case's batch. The ``train`` pass
also times fused training (``rf_<backend>_fused``: ``conv2d_stats`` with BatchNorm+ReLU
prologues, :func:`resnet_fast.nn.enable_fused_training`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
from torch import nn
from torchvision.models import resnet as tv

import resnet_fast.nn as rf
from resnet_fast.bench.timing import INFER, TRAIN, BenchSpec, shape_id
from resnet_fast.nn.blocks import conv1x1

PASSES = (TRAIN, INFER)


@dataclass(frozen=True)
class BlockCase:
    """``block(inplanes, planes, stride, downsample)`` on (batch, inplanes, size, size)."""

    name: str  # the block's name in torchvision's ResNet ("layer2.0")
    batch: int
    inplanes: int
    planes: int
    stride: int
    size: int
    expansion: int  # 1 for BasicBlock, 4 for Bottleneck

    @property
    def id(self) -> str:
        return f"{self.name}-{shape_id(self.shape)}"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.inplanes, self.size, self.size)

    @property
    def out_channels(self) -> int:
        return self.planes * self.expansion

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.size // self.stride, self.size // self.stride)

    @property
    def has_downsample(self) -> bool:
        """A 1x1 convolution + BatchNorm shortcut, as torchvision adds one."""
        return self.stride != 1 or self.inplanes != self.out_channels


def stage_blocks(expansion: int, batch: int) -> list[BlockCase]:
    """Each stage's first block and, where that one changes the shape, an identity block."""
    cases, inplanes, size = [], 64, 56
    for stage, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        first = BlockCase(f"layer{stage}.0", batch, inplanes, planes, stride, size, expansion)
        cases.append(first)
        if first.has_downsample:
            cases.append(BlockCase(f"layer{stage}.1", batch, first.out_channels, planes, 1, size // stride, expansion))
        inplanes, size = first.out_channels, size // stride
    return cases


def resnet18_blocks(batch: int) -> list[BlockCase]:
    """ResNet-18/34's BasicBlock stages."""
    return stage_blocks(1, batch)


def resnet50_blocks(batch: int) -> list[BlockCase]:
    """ResNet-50/101/152's Bottleneck stages."""
    return stage_blocks(4, batch)


def build(block: type[nn.Module], norm: type[nn.Module], case: BlockCase) -> nn.Module:
    """``block`` for ``case`` with ``norm`` BatchNorms (torchvision's constructor and keys)."""
    downsample = None
    if case.has_downsample:
        downsample = nn.Sequential(conv1x1(case.inplanes, case.out_channels, case.stride), norm(case.out_channels))
    return block(case.inplanes, case.planes, case.stride, downsample, norm_layer=norm)


def run(run_module_bench: Callable[..., None], spec: BenchSpec[BlockCase], eager: type[nn.Module],
        fused: type[nn.Module]) -> None:
    """Measure the ``eager`` block type (torchvision) or its ``fused`` counterpart for ``spec``."""
    case = spec.case
    run_module_bench(
        spec, shape=case.shape, output_shape=case.output_shape, residual=False,
        build_eager=lambda: build(eager, nn.BatchNorm2d, case),
        build_fused=lambda: build(fused, rf.BatchNormAct2d, case),
        operators=("conv_bn_act",),
    )


@pytest.mark.bench(level="block", gpu_cases=resnet18_blocks, passes=PASSES, fused_training=True,
                   cpu_cases=[BlockCase("identity", 2, 8, 8, 1, 8, 1), BlockCase("downsample", 2, 8, 16, 2, 8, 1)])
def test_basic_block(run_module_bench: Callable[..., None], spec: BenchSpec[BlockCase]) -> None:
    run(run_module_bench, spec, tv.BasicBlock, rf.BasicBlock)


@pytest.mark.bench(level="block", gpu_cases=resnet50_blocks, passes=PASSES, fused_training=True,
                   cpu_cases=[BlockCase("identity", 2, 32, 8, 1, 8, 4), BlockCase("downsample", 2, 32, 16, 2, 8, 4)])
def test_bottleneck(run_module_bench: Callable[..., None], spec: BenchSpec[BlockCase]) -> None:
    run(run_module_bench, spec, tv.Bottleneck, rf.Bottleneck)
