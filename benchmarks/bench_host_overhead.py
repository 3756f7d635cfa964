"""Host overhead: the CPU time one module call costs, torchvision against resnet_fast.

Fusion saves GPU time only while the CPU keeps the GPU fed. At tiny shapes the arithmetic
is negligible, so what pytest-benchmark's host clock measures per call is Python, dispatch
and launch work. Per call of ``BatchNormAct2d`` (+ ReLU), ``BasicBlock`` (8 -> 8) and
``Bottleneck`` (16 -> 4 -> 16), training forward + backward and evaluation forward:

* ``torchvision`` — ``nn.BatchNorm2d`` + ``relu`` / torchvision's blocks (the baseline);
* ``default`` — resnet_fast with ``set_backend("auto")``: the native path wherever ``auto``
  chooses no fused backend (the CPU always);
* ``<backend>`` — ``set_backend(<backend>)`` for each of ``torch``, ``triton``, ``cuda``
  (skipped with the reasons where the backend cannot run here);
* ``fused_training`` — the blocks' ``fused_training`` pattern under ``auto`` (training only).

One intra-op thread (as the issue's measurements), CPU tensors unmarked (CI runs them),
CUDA tensors marked ``gpu``. ``extra_info``: module, pass, variant, device, per_call_us
(median), and x_torchvision (this median over torchvision's, from the same session).
Targets (issue 17), per call against torchvision: default training <= 2.0x, fused training
<= 2.5x, evaluation <= 1.5x, on the default path and on each fused backend (the ``torch``
backend is the float32 reference composition, the test oracle: reported, not a target).

On a GPU, :func:`test_model_step_host_time` also times whole training steps of ResNet-50
at batch 32 and ResNet-20 at batch 128 (bf16 autocast, channels_last): the host time to
issue a step against its GPU time (CUDA events) shows whether the step is host-bound.

    python -m pytest benchmarks/bench_host_overhead.py -m "not gpu" --benchmark-json=host.json

``RESNET_FAST_BENCH_HOST_ROUNDS`` (default 20 rounds of 10 calls) shortens the run (CI's
check of the harness uses 2).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import median
from typing import Callable, Iterator

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

import resnet_fast
import resnet_fast.nn as rf

pytestmark = pytest.mark.host_overhead

TARGETS = {"default": {"train": 2.0, "eval": 1.5}, "fused_training": {"train": 2.5}}
"""Issue 17's targets, per call against torchvision (also for each fused backend)."""

BACKEND_VARIANTS = ("torch", "triton", "cuda")
VARIANTS = ("torchvision", "default", *BACKEND_VARIANTS, "fused_training")
PASSES = ("train", "eval")
GPU_MARKS = (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=GPU_MARKS)]


@dataclass(frozen=True)
class ModuleCase:
    """A module at a tiny shape: ``build(fused)`` gives torchvision's (False) or resnet_fast's."""

    name: str
    shape: tuple[int, int, int, int]
    build: Callable[[bool], nn.Module]
    is_block: bool


def _bn_relu(fused: bool) -> nn.Module:
    return rf.BatchNormAct2d(16, relu=True) if fused else nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(inplace=True))


def _block(kind: str) -> Callable[[bool], nn.Module]:
    def build(fused: bool) -> nn.Module:
        torch.manual_seed(0)
        norm = rf.BatchNormAct2d if fused else nn.BatchNorm2d
        if kind == "basic":
            return (rf.BasicBlock if fused else tv.BasicBlock)(8, 8, norm_layer=norm)
        return (rf.Bottleneck if fused else tv.Bottleneck)(16, 4, norm_layer=norm)

    return build


CASES = {
    "batch_norm_act": ModuleCase("batch_norm_act", (2, 16, 8, 8), _bn_relu, False),
    "basic_block": ModuleCase("basic_block", (2, 8, 8, 8), _block("basic"), True),
    "bottleneck": ModuleCase("bottleneck", (2, 16, 8, 8), _block("bottleneck"), True),
}

ROUNDS = int(os.environ.get("RESNET_FAST_BENCH_HOST_ROUNDS", "20"))
ITERATIONS = 10 if ROUNDS >= 10 else 2

_MEDIANS: dict[tuple[str, str, str], float] = {}
"""(case, pass, device) -> torchvision's median per call (s), measured first in the session."""


@contextmanager
def _settings(threads: int, backend: str) -> Iterator[None]:
    """One intra-op thread and the resnet_fast backend, restored afterwards."""
    before_threads, before_backend = torch.get_num_threads(), resnet_fast.get_backend()
    torch.set_num_threads(threads)
    resnet_fast.set_backend(backend)
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        resnet_fast.set_backend(before_backend)


def _skip_reason(variant: str, case: ModuleCase, pass_: str, device: str) -> str | None:
    if variant == "fused_training" and not (case.is_block and pass_ == "train"):
        return "fused_training applies to the blocks' training"
    if variant in BACKEND_VARIANTS:
        info = resnet_fast.backend_info()[variant]
        if not info["available"]:
            return f"resnet_fast backend '{variant}' is unavailable: " + "; ".join(info["reasons"])
        if device == "cpu" and variant != "torch":
            return f"the {variant} backend runs CPU tensors only in the Triton interpreter (not a host measurement)"
    return None


def make_call(case: ModuleCase, variant: str, pass_: str, device: str) -> Callable[[], None]:
    """One call of the module as the variant runs it: forward + backward, or a no-grad forward."""
    module = case.build(variant != "torchvision").to(device)
    if variant == "fused_training":
        rf.enable_fused_training(module)
    module.train(pass_ == "train")
    x = torch.randn(case.shape, device=device)

    def train() -> None:
        module(x).sum().backward()

    def infer() -> None:
        with torch.no_grad():
            module(x)

    return train if pass_ == "train" else infer


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_host_overhead(benchmark, device: str, case: str, pass_: str, variant: str) -> None:
    spec = CASES[case]
    reason = _skip_reason(variant, spec, pass_, device)
    if reason is not None:
        pytest.skip(reason)
    backend = variant if variant in BACKEND_VARIANTS else "auto"
    with _settings(1, backend):
        call = make_call(spec, variant, pass_, device)
        benchmark.group = f"host-{device}-{case}-{pass_}"
        benchmark.pedantic(call, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=3)
        if device == "cuda":
            torch.cuda.synchronize()
    stats = getattr(benchmark, "stats", None)
    per_call = stats.stats.median if stats is not None else None
    info = {"module": case, "pass": pass_, "variant": variant, "device": device}
    if per_call is not None:
        info["per_call_us"] = per_call * 1e6
        if variant == "torchvision":
            _MEDIANS[(case, pass_, device)] = per_call
        elif (case, pass_, device) in _MEDIANS:
            info["x_torchvision"] = per_call / _MEDIANS[(case, pass_, device)]
    benchmark.extra_info.update(info)


MODEL_STEPS = {"resnet50": (32, 224, 1000), "resnet20": (128, 32, 10)}
MODEL_VARIANTS = ("torchvision", "default", "triton", "cuda", "fused_training")


def _model(name: str, variant: str) -> nn.Module:
    torch.manual_seed(0)
    if variant == "torchvision":
        return getattr(tv, name)()
    model = getattr(resnet_fast, name)()
    if variant == "fused_training":
        rf.enable_fused_training(model)
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", MODEL_VARIANTS)
@pytest.mark.parametrize("model_name", list(MODEL_STEPS))
def test_model_step_host_time(benchmark, model_name: str, variant: str) -> None:
    """Host time to issue one training step (forward, backward, SGD) against its GPU time."""
    if variant == "torchvision" and not hasattr(tv, model_name):
        pytest.skip(f"torchvision has no {model_name} (the default variant runs torchvision's ops there: the native "
                    "path, until a validation lets auto use a fused backend)")
    if variant in ("triton", "cuda") and not resnet_fast.backend_info()[variant]["available"]:
        pytest.skip(f"resnet_fast backend '{variant}' is unavailable")
    batch, size, classes = MODEL_STEPS[model_name]
    backend = variant if variant in ("triton", "cuda") else "auto"
    with _settings(torch.get_num_threads(), backend):
        model = _model(model_name, variant).cuda().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
        y = torch.randint(0, classes, (batch,), device="cuda")
        host, gpu = [], []

        def step() -> None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin = time.perf_counter()
            start.record()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            end.record()
            host.append(time.perf_counter() - begin)
            end.synchronize()
            gpu.append(start.elapsed_time(end) / 1e3)

        benchmark.group = f"host-step-{model_name}"
        benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=3)
    host_ms, gpu_ms = median(host[-10:]) * 1e3, median(gpu[-10:]) * 1e3
    benchmark.extra_info.update({"model": model_name, "variant": variant, "batch": batch, "host_ms": host_ms,
                                 "gpu_ms": gpu_ms, "host_bound": host_ms >= gpu_ms})
