"""Convolution + BatchNorm + ReLU and convolution + BatchNorm + residual add + ReLU, one
operator (``resnet_fast.nn.ConvBNAct2d`` -> ``resnet_fast.ops.conv_bn_act``) against eager
``nn.Conv2d`` + ``nn.BatchNorm2d`` + add + ``relu`` and its ``torch.compile``.

Cases: ResNet-50's convolutions that end in those fusions: the stem (7x7/2, BN + ReLU),
each stage's 3x3 (BN + ReLU) and each stage's closing 1x1 expansion (BN + add + ReLU,
writing the 256x56x56 ... 2048x7x7 stage outputs). The floor is the larger of
:func:`resnet_fast.bench.timing.conv_bn_act_bytes` over the copy bandwidth and
:func:`resnet_fast.bench.timing.conv_flops` over the matmul rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from resnet_fast.bench.timing import FWD, INFER, TRAIN, BenchSpec, conv_bn_act_bytes, conv_flops, shape_id
from resnet_fast.nn import ConvBNAct2d

PASSES = (FWD, TRAIN, INFER)


@dataclass(frozen=True)
class ConvCase:
    """A bias-free ``kernel x kernel`` convolution with ``kernel // 2`` padding and its BatchNorm."""

    name: str  # the convolution's name in torchvision's resnet50
    batch: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    size: int  # input height and width

    @property
    def id(self) -> str:
        return f"{self.name}-{shape_id(self.shape)}"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.size, self.size)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        size = (self.size + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1
        return (self.batch, self.out_channels, size, size)

    def conv_args(self) -> tuple[int, int, int, int, int]:
        """``(in, out, kernel, stride, padding)`` for ``nn.Conv2d`` and ``ConvBNAct2d``."""
        return (self.in_channels, self.out_channels, self.kernel, self.stride, self.kernel // 2)


STAGES = ((1, 64, 56), (2, 128, 28), (3, 256, 14), (4, 512, 7))  # stage, bottleneck width, size


def resnet50_conv_bn_relu(batch: int) -> list[ConvCase]:
    """The stem and each stage's 3x3 convolution (of a non-downsampling block)."""
    return [ConvCase("conv1", batch, 3, 64, 7, 2, 224)] + [
        ConvCase(f"layer{stage}.1.conv2", batch, width, width, 3, 1, size) for stage, width, size in STAGES]


def resnet50_conv_bn_add_relu(batch: int) -> list[ConvCase]:
    """Each stage's closing 1x1 expansion, whose BatchNorm takes the shortcut."""
    return [ConvCase(f"layer{stage}.1.conv3", batch, width, 4 * width, 1, 1, size) for stage, width, size in STAGES]


CPU_CONV_BN_RELU = [ConvCase("conv3x3", 2, 8, 8, 3, 1, 8)]
CPU_CONV_BN_ADD_RELU = [ConvCase("conv1x1", 2, 8, 16, 1, 1, 8)]


class EagerConvBNAct(nn.Module):
    """What eager PyTorch runs: ``nn.Conv2d``, ``nn.BatchNorm2d``, ``+= residual``, in-place
    ``relu``, with :class:`ConvBNAct2d`'s state-dict keys (``conv.*``, ``bn.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        out = self.bn(self.conv(input))
        if residual is not None:
            out += residual
        return torch.relu_(out)


def run(run_module_bench: Callable[..., None], spec: BenchSpec[ConvCase], residual: bool) -> None:
    """Measure ``relu(batch_norm(conv2d(x)) [+ r])`` for ``spec``."""
    case, pass_ = spec.case, spec.pass_
    weight_elements = case.out_channels * case.in_channels * case.kernel**2
    run_module_bench(
        spec, shape=case.shape, output_shape=case.output_shape, residual=residual,
        build_eager=lambda: EagerConvBNAct(*case.conv_args()),
        build_fused=lambda: ConvBNAct2d(*case.conv_args(), relu=True),
        operators=("conv_bn_act",),
        bytes_moved=conv_bn_act_bytes(math.prod(case.shape), weight_elements, math.prod(case.output_shape),
                                      spec.target.torch_dtype.itemsize, pass_, residual),
        flops=conv_flops(case.output_shape, case.in_channels, (case.kernel, case.kernel), 1, pass_),
    )


@pytest.mark.bench(level="op", gpu_cases=resnet50_conv_bn_relu, cpu_cases=CPU_CONV_BN_RELU, passes=PASSES)
def test_conv_bn_relu(run_module_bench: Callable[..., None], spec: BenchSpec[ConvCase]) -> None:
    run(run_module_bench, spec, residual=False)


@pytest.mark.bench(level="op", gpu_cases=resnet50_conv_bn_add_relu, cpu_cases=CPU_CONV_BN_ADD_RELU, passes=PASSES)
def test_conv_bn_add_relu(run_module_bench: Callable[..., None], spec: BenchSpec[ConvCase]) -> None:
    run(run_module_bench, spec, residual=True)
