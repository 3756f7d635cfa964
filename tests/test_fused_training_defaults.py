"""Fused training by default only where measured faster (a patched table; no GPU needed)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import resnet_fast
from resnet_fast import validation
from resnet_fast.nn import blocks, enable_fused_training
from resnet_fast.nn import fused_training_defaults as defaults


@pytest.fixture
def h100(monkeypatch):
    """Fake CUDA tensors on a GPU of compute capability 9.0 whose fused backends are validated
    (``validated(False)`` takes the records away)."""
    monkeypatch.setattr(defaults, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(validation, "auto_reason", lambda backend, device: None)

    def tensor(dtype):
        with FakeTensorMode():
            return torch.empty(2, 8, 4, 4, dtype=dtype, device="cuda")

    return tensor


def test_the_table_is_empty_until_gpu_results_are_committed():
    assert defaults.FUSED_TRAINING_MEASURED_FASTER == {}
    assert "no GPU results exist yet" in defaults.__doc__


def test_shipped_table_keeps_the_default_path(h100):
    assert not defaults.fused_training_by_default(h100(torch.bfloat16))


def test_a_measured_architecture_and_dtype_train_fused(h100, monkeypatch):
    monkeypatch.setitem(defaults.FUSED_TRAINING_MEASURED_FASTER, ("9.0", torch.bfloat16),
                        "benchmarks/results/example.jsonl: headline resnet50 bf16")
    assert defaults.fused_training_by_default(h100(torch.bfloat16))
    assert not defaults.fused_training_by_default(h100(torch.float16))  # not measured faster in fp16
    monkeypatch.setattr(defaults, "device_capability", lambda device: (8, 0))
    assert not defaults.fused_training_by_default(h100(torch.bfloat16))  # another architecture


def test_only_where_a_fused_backend_runs(h100, monkeypatch):
    monkeypatch.setitem(defaults.FUSED_TRAINING_MEASURED_FASTER, ("9.0", torch.bfloat16), "measured")
    monkeypatch.setattr(validation, "auto_reason", lambda backend, device: "no validation record")
    x = h100(torch.bfloat16)
    assert not defaults.fused_training_by_default(x)  # auto would run the unfused torch path
    resnet_fast.set_backend("triton")
    assert defaults.fused_training_by_default(x)  # a forced fused backend
    resnet_fast.set_backend("torch")
    assert not defaults.fused_training_by_default(x)


def test_never_on_the_cpu(monkeypatch):
    monkeypatch.setitem(defaults.FUSED_TRAINING_MEASURED_FASTER, ("9.0", torch.float32), "measured")
    assert not defaults.fused_training_by_default(torch.zeros(2, 8, 4, 4))


def test_the_compute_dtype_is_autocasts():
    x = torch.zeros(2, 3, 4, 4)
    assert defaults.compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert defaults.compute_dtype(x) == torch.bfloat16


@pytest.mark.parametrize("setting,by_measurement,fused", [
    (None, True, True), (None, False, False),  # the default follows the table
    (True, False, True), (False, True, False),  # enable_fused_training forces either way
])
def test_blocks_follow_the_setting_or_the_measurements(monkeypatch, setting, by_measurement, fused):
    monkeypatch.setattr(defaults, "fused_training_by_default", lambda x: by_measurement)
    calls = []
    real = blocks.conv_stats_forward
    monkeypatch.setattr(blocks, "conv_stats_forward", lambda *args: calls.append(1) or real(*args))
    model = resnet_fast.resnet20().train()
    if setting is not None:
        enable_fused_training(model, setting)
    assert all(block.fused_training is setting for block in model.modules()
               if isinstance(block, (blocks.BasicBlock, blocks.Bottleneck)))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert bool(calls) == fused
