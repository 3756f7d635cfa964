"""The cuDNN fused-engine comparator (``benchmarks/bench_cudnn_fused.py``) without a GPU:
its ResNet-50 shape table and its skip reasons. The timing itself runs on a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

BENCH_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cudnn_fused.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cudnn_fused", BENCH_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_shapes_cover_every_resnet50_convolution_once(bench):
    shapes = bench.resnet50_conv_shapes(8)
    convs = {name for name, m in torchvision.models.resnet50().named_modules() if isinstance(m, nn.Conv2d)}
    named = [name for shape in shapes for name in shape.names]
    assert sorted(named) == sorted(convs)  # every convolution, each in exactly one shape
    assert len({(s.input_shape, s.weight_shape, s.stride) for s in shapes}) == len(shapes) == 23
    stem = shapes[0]
    assert stem.names == ("conv1",)
    assert (stem.input_shape, stem.weight_shape, stem.stride, stem.padding) == (
        (8, 3, 224, 224), (64, 3, 7, 7), 2, 3)
    last = next(s for s in shapes if "layer4.1.conv2" in s.names)
    assert (last.input_shape, last.weight_shape, last.stride, last.padding) == (
        (8, 512, 7, 7), (512, 512, 3, 3), 1, 1)
    assert len({s.id for s in shapes}) == len(shapes)


def test_without_the_package_the_fused_cases_say_how_to_get_it(bench, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cudnn" else real_find_spec(
        name, *a))
    assert "nvidia-cudnn-frontend is not installed" in bench.cudnn_skip_reason("fp16")


def test_without_a_gpu_or_below_sm80_the_fused_cases_say_why(bench, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # pretend it is installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.cudnn_skip_reason("fp16") == "needs a CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert bench.cudnn_skip_reason("fp16") == (
        "cuDNN's fused ConvBN engines need compute capability 8.0 or newer, this GPU has 7.0")


def test_every_race_case_is_a_gpu_benchmark(bench):
    marks = [m for m in bench.test_conv_genstats.pytestmark if m.name == "parametrize"]
    params = {m.args[0]: m.args[1] for m in marks}
    assert set(params["variant"]) == {"cudnn_fused", "cudnn_conv_then_stats", "resnet_fast:cuda",
                                      "resnet_fast:triton", "resnet_fast:conv2d_tensor_core"}
    assert [p.values[0] for p in params["dtype"]] == ["fp16", "bf16"]
    assert all(any(mark.name == "gpu" for mark in p.marks) for p in params["dtype"])
    assert len(params["shape"]) == 23
