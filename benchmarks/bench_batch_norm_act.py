"""BatchNorm + ReLU and BatchNorm + residual add + ReLU, one operator
(``resnet_fast.nn.BatchNormAct2d`` -> ``resnet_fast.ops.batch_norm_act``) against eager
``nn.BatchNorm2d`` + add + ``relu`` and its ``torch.compile``.

Shapes: ResNet-50's activations after the stem and at the end of each stage. Bytes moved:
:func:`resnet_fast.bench.timing.batch_norm_act_bytes`, i.e. passes over the tensor times
its size: fwd 3 (4 with the residual), train 8 (11), infer 2 (3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from resnet_fast.bench.timing import FWD, INFER, TRAIN, BenchSpec, batch_norm_act_bytes, shape_id
from resnet_fast.nn import BatchNormAct2d

PASSES = (FWD, TRAIN, INFER)


@dataclass(frozen=True)
class ActivationCase:
    """A BatchNorm input of ``shape`` (N, C, H, W)."""

    shape: tuple[int, int, int, int]

    @property
    def id(self) -> str:
        return shape_id(self.shape)


def resnet50_activations(batch: int) -> list[ActivationCase]:
    """ResNet-50's activations after the stem and the four stages: 64x112x112 ... 2048x7x7."""
    return [ActivationCase((batch, channels, size, size))
            for channels, size in ((64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7))]


CPU_CASES = [ActivationCase((2, 8, 8, 8))]


class EagerBatchNormAct(nn.BatchNorm2d):
    """What eager PyTorch runs: ``nn.BatchNorm2d``, ``+= residual``, in-place ``relu`` (as
    torchvision's blocks), with :class:`BatchNormAct2d`'s state-dict keys."""

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        out = super().forward(input)
        if residual is not None:
            out += residual
        return torch.relu_(out)


def run(run_module_bench: Callable[..., None], spec: BenchSpec[ActivationCase], residual: bool) -> None:
    """Measure ``relu(batch_norm(x) [+ r])`` for ``spec``."""
    shape = spec.case.shape
    channels = shape[1]
    run_module_bench(
        spec, shape=shape, output_shape=shape, residual=residual,
        build_eager=lambda: EagerBatchNormAct(channels),
        build_fused=lambda: BatchNormAct2d(channels, relu=True),
        operators=("batch_norm_act",),
        bytes_moved=batch_norm_act_bytes(math.prod(shape), spec.target.torch_dtype.itemsize, spec.pass_, residual),
    )


@pytest.mark.bench(level="op", gpu_cases=resnet50_activations, cpu_cases=CPU_CASES, passes=PASSES)
def test_bn_relu(run_module_bench: Callable[..., None], spec: BenchSpec[ActivationCase]) -> None:
    run(run_module_bench, spec, residual=False)


@pytest.mark.bench(level="op", gpu_cases=resnet50_activations, cpu_cases=CPU_CASES, passes=PASSES)
def test_bn_add_relu(run_module_bench: Callable[..., None], spec: BenchSpec[ActivationCase]) -> None:
    run(run_module_bench, spec, residual=True)
