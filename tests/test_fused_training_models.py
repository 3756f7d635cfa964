"""Fused training of whole models: the stem as ``conv2d_stats``, no aten convolution or
batch_norm in a fused-training forward, and ``convert()`` fusing a torchvision stem.

The op-level check runs twice: in this process with the ``torch`` backend, recording the
operators the modules call (a ``TorchDispatchMode`` sees each operator the Python code
calls, not what runs inside a ``resnet_fast`` operator), for resnet18 and resnet50; and in
a fresh ``TRITON_INTERPRET=1`` process with the ``triton`` backend, where ``torch.profiler``
records every operator at every depth — inside the ``resnet_fast`` operators too — so the
absence of aten convolutions and batch norms is proved for what the kernels launch.
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
import torchvision.models as tvm
from conftest import TRITON_DEVICES, TRITON_INTERPRETER, import_kernel_module, run_cpu_tests_in_triton_interpreter
from model_checks import compare_eval, compare_training_step, images, randomize_batch_norms
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fast
from resnet_fast.nn import conv_bn_act as conv_bn_act_module
from resnet_fast.nn import enable_fused_training

# What a fused-training forward may call besides elementwise and pooling aten ops.
FUSED_TRAINING_OPS = {"resnet_fast.conv2d_stats.default", "resnet_fast.scale_shift_act.default",
                      "resnet_fast.update_running_stats.default"}


class RecordOps(TorchDispatchMode):
    """Records the name of every operator dispatched at the top level."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def is_aten_convolution_or_batch_norm(name: str) -> bool:
    """``aten.convolution``/``aten::conv2d``/``aten.native_batch_norm`` ... (either naming style)."""
    return name.startswith("aten") and ("conv" in name or "batch_norm" in name)


def convolutions(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.fixture
def torch_backend():
    resnet_fast.set_backend("torch")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fused_training_forward_calls_conv2d_stats_for_every_convolution(name, torch_backend):
    torch.manual_seed(0)
    model = getattr(resnet_fast, name)(num_classes=10).train()
    assert enable_fused_training(model) == sum(isinstance(m, (resnet_fast.nn.BasicBlock, resnet_fast.nn.Bottleneck))
                                               for m in model.modules()) + 1  # the blocks and the stem
    with RecordOps() as recorded:
        model(torch.randn(2, 3, 32, 32))
    calls = Counter(recorded.names)
    ours = {op for op in calls if op.startswith("resnet_fast")}
    assert ours <= FUSED_TRAINING_OPS and "resnet_fast.scale_shift_act.default" in ours, ours
    assert calls["resnet_fast.conv2d_stats.default"] == convolutions(model)
    assert not [op for op in calls if is_aten_convolution_or_batch_norm(op)], calls


def test_default_training_runs_the_stem_as_conv_bn_act(torch_backend):
    model = resnet_fast.resnet18(num_classes=10).train()
    with RecordOps() as recorded:
        model(torch.randn(2, 3, 32, 32))
    assert "resnet_fast.conv2d_stats.default" not in recorded.names
    assert Counter(recorded.names)["resnet_fast.conv_bn_act.default"] == convolutions(model)


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
def test_fused_training_stem_matches_torchvision_in_float64(name, torch_backend):
    """A whole model with fused training (stem included) against the same network made of
    torch modules: loss, every gradient, running statistics, the SGD step."""
    torch.manual_seed(0)
    ours = randomize_batch_norms(getattr(resnet_fast, name)(num_classes=10).double())
    if name == "resnet20":  # torchvision has no CIFAR ResNet: the trainer's plain-PyTorch twin
        from resnet_fast.train.models import TorchCifarResNet
        reference = TorchCifarResNet(20).double()
    else:
        reference = tvm.resnet18(num_classes=10).double()
    reference.load_state_dict(ours.state_dict())
    enable_fused_training(ours)
    assert ours.fused_training
    compare_training_step(ours, reference, images(4, seed=3), torch.tensor([1, 0, 9, 3]))
    compare_eval(ours, reference, images(2, seed=4))


# ----------------------------------------------------------------------------- convert()
def test_convert_fuses_the_torchvision_stem_in_eval_and_fused_training(torch_backend):
    torch.manual_seed(0)
    model = randomize_batch_norms(tvm.resnet18(num_classes=10).double())
    reference = copy.deepcopy(model)
    converted, _ = resnet_fast.convert(model)
    assert converted is model and isinstance(model, resnet_fast.models.ResNet)
    x = images(2, seed=5)

    model.eval()
    with torch.no_grad(), RecordOps() as recorded:
        model(x)
    calls = Counter(recorded.names)  # every convolution folded, the stem's included
    assert calls["resnet_fast.conv2d_bias_act.default"] == convolutions(model)
    assert not [op for op in calls if is_aten_convolution_or_batch_norm(op)], calls
    compare_eval(model, reference, x)

    assert enable_fused_training(model) == 9  # 8 blocks and the stem
    with RecordOps() as recorded:
        copy.deepcopy(model).train()(x)  # a copy: its running statistics move
    assert Counter(recorded.names)["resnet_fast.conv2d_stats.default"] == convolutions(model)
    compare_training_step(model, reference, images(4, seed=6), torch.tensor([2, 7, 0, 1]))


def test_converted_state_dicts_move_both_ways():
    torch.manual_seed(0)
    source = randomize_batch_norms(tvm.resnet50(num_classes=10))
    converted, _ = resnet_fast.convert(copy.deepcopy(source))
    fresh_torchvision = tvm.resnet50(num_classes=10)
    fresh_torchvision.load_state_dict(converted.state_dict(), strict=True)
    fresh_converted, _ = resnet_fast.convert(tvm.resnet50(num_classes=10))
    fresh_converted.load_state_dict(source.state_dict(), strict=True)
    ours = resnet_fast.resnet50(num_classes=10)
    ours.load_state_dict(converted.state_dict(), strict=True)  # the same keys as resnet_fast's own model
    x = images(2, seed=7).float()
    for model in (fresh_torchvision, fresh_converted, ours):
        compare_eval(model.double(), copy.deepcopy(source).double(), x.double())


def test_convert_keeps_a_torchvision_resnet_subclass_and_says_so():
    class Tagged(tvm.ResNet):  # keeps torchvision's forward
        tag = "mine"

    model = Tagged(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    converted, report = resnet_fast.convert(model)
    assert type(converted) is Tagged
    reasons = {path: reason for path, _, reason in report.skipped}
    assert "subclass of torchvision's ResNet" in reasons["conv1"]


# ----------------------------------------------------------------------------- triton, interpreted
@pytest.mark.skipif(TRITON_INTERPRETER, reason="this is the interpreter process")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the triton check runs on it")
def test_interpreter_run():
    """The ``cpu`` tests of this file again, in a fresh process with TRITON_INTERPRET=1."""
    run_cpu_tests_in_triton_interpreter(__file__, min_passed=3)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_fused_training_forward_runs_no_aten_convolution_or_batch_norm(device, monkeypatch):
    """resnet18, fused training, triton backend: every operator at every depth (torch.profiler)."""
    kernels = import_kernel_module("resnet_fast.kernels.conv2d")
    if device == "cpu":  # few, large tiles: the interpreter's time goes per program and K step
        monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128})
    before = resnet_fast.get_backend()
    resnet_fast.set_backend("triton")
    try:
        torch.manual_seed(0)
        model = resnet_fast.resnet18(num_classes=10).train().to(device)
        enable_fused_training(model)
        x = torch.randn(2, 3, 16, 16, device=device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            model(x)
    finally:
        resnet_fast.set_backend(before)
    names = Counter(event.name for event in profile.events())
    assert not [name for name in names if is_aten_convolution_or_batch_norm(name)], names
    assert names["resnet_fast::triton_conv2d_stats"] == convolutions(model)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_profiler_times_triton_fused_training(device, tmp_path, monkeypatch):
    from resnet_fast.bench.__main__ import main

    kernels = import_kernel_module("resnet_fast.kernels.conv2d")
    if device == "cpu":
        monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})
    path = tmp_path / "fused.json"
    assert main(["--device", device, "--model", "resnet20", "--batch", "2", "--image-size", "8", "--steps", "1",
                 "--warmup", "1", "--mode", "train", "--compare", "resnet_fast:triton+fused",
                 "--json", str(path)]) == 0
    [result] = json.loads(path.read_text())["results"]
    assert result["variant"] == "resnet_fast:triton+fused" and result["label"] == "resnet_fast:triton+fused"
    assert result["images_per_s"] > 0


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_train_cli_trains_with_triton_fused_training(device, tmp_path, monkeypatch):
    from train_fixtures import train

    kernels = import_kernel_module("resnet_fast.kernels.conv2d")
    if device == "cpu":
        monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})
    calls = []
    conv2d_stats = conv_bn_act_module.conv2d_stats
    monkeypatch.setattr(conv_bn_act_module, "conv2d_stats",
                        lambda *args, **kwargs: calls.append(1) or conv2d_stats(*args, **kwargs))
    out = tmp_path / "run"
    assert train("synthetic", "--model", "resnet8", "--batch-size", 4, "--image-size", 8, "--num-classes", 3,
                 "--synthetic-images", 8, "--iterations", 2, "--log-every", 1, "--device", device,
                 "--backend", "triton", "--fused-training", "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fused_training"] and summary["backend"] == "triton" and summary["iterations"] == 2
    # per step: the stem and the identity block's two convolutions (option-A shortcut blocks run unfused)
    assert len(calls) == 2 * 3
