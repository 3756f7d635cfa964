"""Per layer: resnet_fast's convolutions against cuDNN (``F.conv2d``) and against inductor's
template, on every distinct ResNet-50 convolution (forward only).

Two operators, each with the work around the convolution that ResNet fuses into it:

* ``conv2d_bias_act`` (inference, ``infer`` pass) — ``relu(conv2d(x, w) + b [+ r])``: the
  BatchNorm folded into the weights and bias ``b`` (float32), the residual ``r`` added for
  the bottlenecks' closing 1x1 expansions (``conv3``), no ReLU for the shortcut projections
  (``downsample.0``) alone. Floor: :func:`resnet_fast.bench.timing.conv_bn_act_bytes` (infer).
* ``conv2d_stats`` (training forward, ``fwd`` pass) — ``y = conv2d(relu(x * scale + shift), w)``
  and y's per-channel mean and biased variance: the previous BatchNorm applied in the
  prologue, the next one's statistics in the epilogue. Floor:
  :func:`resnet_fast.bench.timing.conv2d_stats_bytes`.

Variants, from the same weights and inputs:

* ``eager`` — the same arithmetic in torch: ``F.conv2d`` (cuDNN, ``cudnn.benchmark`` on) with
  the bias, ``+=`` residual and ``relu_``; for the statistics the prologue as torch
  elementwise ops, ``F.conv2d`` and ``torch.var_mean``;
* ``compile`` — ``torch.compile(mode="max-autotune-no-cudagraphs")`` of the eager module, so
  inductor may choose its Triton convolution template over cuDNN (compilation and
  autotuning happen in the untimed warm-up calls);
* ``resnet_fast:<backend>`` — ``resnet_fast.ops.conv2d_bias_act`` / ``resnet_fast.ops.conv2d_stats``
  under ``resnet_fast.set_backend(<backend>)``; a backend that cannot run it is skipped with
  the dispatcher's reasons.

Cases: every distinct convolution of torchvision's ResNet-50
(:func:`resnet_fast.bench.shapes.resnet50_conv_shapes`, 23 shapes) at batch
``RESNET_FAST_BENCH_BATCH`` (default 256), bf16 and fp16 (weights held in that dtype),
channels_last. The CPU smoke run (fp32, tiny shapes, the ``torch`` backend) checks the
harness. ``extra_info`` is the suite's (:mod:`benchmarks.conftest`), operators' fields
included: bytes_moved, floor, flops (``2 N P Q C_out C_in R S``), tflops.

    python -m pytest benchmarks/bench_conv2d.py -m gpu -k bf16-nhwc --benchmark-json=conv2d.json
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import resnet_fast
from resnet_fast.bench.shapes import ConvShape, resnet50_conv_shapes
from resnet_fast.bench.timing import (
    FWD,
    INFER,
    BenchSpec,
    Target,
    conv2d_stats_bytes,
    conv_bn_act_bytes,
    conv_flops,
)

GPU_TARGETS = tuple(Target("cuda", dtype, "nhwc") for dtype in ("bf16", "fp16"))
COMPILE_MODE = "max-autotune-no-cudagraphs"  # inductor may pick its Triton convolution template

CPU_BIAS_ACT = [ConvShape(("conv3x3",), 2, 8, 8, 3, 1, 1, 8), ConvShape(("block.conv3",), 2, 8, 16, 1, 1, 0, 8)]
CPU_STATS = [ConvShape(("conv3x3",), 2, 8, 8, 3, 1, 1, 8)]


def conv_weight(shape: ConvShape, dtype: torch.dtype) -> nn.Parameter:
    """He-scaled random weights in ``dtype`` (the harness seeds the generator)."""
    fan_in = shape.in_channels * shape.kernel**2
    return nn.Parameter((torch.randn(shape.weight_shape) * (2 / fan_in) ** 0.5).to(dtype))


class Conv2dBiasAct(nn.Module):
    """``relu(conv2d(x, w) + b [+ r])`` for ``shape``: in torch (eager, and compiled), or
    through ``resnet_fast.ops.conv2d_bias_act`` (``fused``); the same state-dict keys."""

    def __init__(self, shape: ConvShape, dtype: torch.dtype, fused: bool) -> None:
        super().__init__()
        self.shape, self.fused = shape, fused
        self.weight = conv_weight(shape, dtype)
        self.bias = nn.Parameter(torch.randn(shape.out_channels) * 0.1)  # a folded BatchNorm's, float32

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        s = self.shape
        if self.fused:
            return resnet_fast.ops.conv2d_bias_act(input, self.weight, self.bias, residual, stride=s.stride,
                                                   padding=s.padding, relu=s.relu)
        out = F.conv2d(input, self.weight, self.bias.to(input.dtype), s.stride, s.padding)
        if residual is not None:
            out += residual
        return torch.relu_(out) if s.relu else out


class Conv2dStats(nn.Module):
    """``y = conv2d(relu(x * scale + shift), w)`` and y's per-channel mean and biased variance:
    in torch (eager, and compiled), or through ``resnet_fast.ops.conv2d_stats`` (``fused``)."""

    def __init__(self, shape: ConvShape, dtype: torch.dtype, fused: bool) -> None:
        super().__init__()
        self.shape, self.fused = shape, fused
        self.weight = conv_weight(shape, dtype)
        # the previous BatchNorm in scale/shift form, float32
        self.prologue_scale = nn.Parameter(torch.rand(shape.in_channels) + 0.5)
        self.prologue_shift = nn.Parameter(torch.randn(shape.in_channels) * 0.1)

    def forward(self, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = self.shape
        if self.fused:
            return resnet_fast.ops.conv2d_stats(input, self.weight, stride=s.stride, padding=s.padding,
                                                prologue_scale=self.prologue_scale,
                                                prologue_shift=self.prologue_shift, prologue_relu=True)
        scale, shift = self.prologue_scale.view(1, -1, 1, 1), self.prologue_shift.view(1, -1, 1, 1)
        activated = torch.relu(input * scale + shift).to(input.dtype)
        out = F.conv2d(activated, self.weight, None, s.stride, s.padding)
        var, mean = torch.var_mean(out, dim=(0, 2, 3), correction=0)
        return out, mean, var


def run(run_module_bench: Callable[..., None], spec: BenchSpec[ConvShape], module: type[nn.Module],
        operator: str, residual: bool, bytes_moved: int) -> None:
    shape, dtype = spec.case, spec.target.torch_dtype
    run_module_bench(
        spec, shape=shape.input_shape, output_shape=shape.output_shape, residual=residual,
        build_eager=lambda: module(shape, dtype, fused=False),
        build_fused=lambda: module(shape, dtype, fused=True),
        operators=(operator,), bytes_moved=bytes_moved,
        flops=conv_flops(shape.output_shape, shape.in_channels, (shape.kernel, shape.kernel), 1, spec.pass_),
        compile_mode=COMPILE_MODE,
    )


def elements(shape: ConvShape) -> tuple[int, int, int]:
    """Elements of x, w and y."""
    return math.prod(shape.input_shape), math.prod(shape.weight_shape), math.prod(shape.output_shape)


@pytest.mark.bench(level="op", gpu_cases=resnet50_conv_shapes, cpu_cases=CPU_BIAS_ACT, passes=(INFER,),
                   gpu_targets=GPU_TARGETS)
def test_conv2d_bias_act(run_module_bench: Callable[..., None], spec: BenchSpec[ConvShape]) -> None:
    shape = spec.case
    nbytes = conv_bn_act_bytes(*elements(shape), spec.target.torch_dtype.itemsize, INFER, shape.residual)
    run(run_module_bench, spec, Conv2dBiasAct, "conv2d_bias_act", shape.residual, nbytes)


@pytest.mark.bench(level="op", gpu_cases=resnet50_conv_shapes, cpu_cases=CPU_STATS, passes=(FWD,),
                   gpu_targets=GPU_TARGETS)
def test_conv2d_stats(run_module_bench: Callable[..., None], spec: BenchSpec[ConvShape]) -> None:
    shape = spec.case
    nbytes = conv2d_stats_bytes(*elements(shape), spec.target.torch_dtype.itemsize)
    run(run_module_bench, spec, Conv2dStats, "conv2d_stats", False, nbytes)
