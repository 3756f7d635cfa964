"""The native path: where ``auto`` chooses no fused backend (every CPU tensor), the modules
run exactly the aten operators torchvision's eager modules run, in the same order, forward
and backward, and give bit-identical results.

The op sequences are recorded with a ``TorchDispatchMode`` (every aten call below autograd,
backward included) and compared with torchvision's: ResNet-18, the paper's ResNet-20 (its
BasicBlocks as torchvision's, its option-A shortcut shared) and a Bottleneck with a
projection shortcut, in training (forward + backward) and evaluation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import DEVICES
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import resnet as tv

import resnet_fast
import resnet_fast.nn as rf
from resnet_fast import validation
from resnet_fast.models.cifar import CifarResNet
from resnet_fast.nn.blocks import conv1x1
from resnet_fast.ops import dispatch


@pytest.fixture(autouse=True)
def auto_backend():
    before = resnet_fast.get_backend()
    resnet_fast.set_backend("auto")
    yield
    resnet_fast.set_backend(before)


class AtenRecorder(TorchDispatchMode):
    """Records the name of every aten operator dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _run(model: nn.Module, x: torch.Tensor, training: bool) -> tuple[list[str], torch.Tensor]:
    model.train(training)
    with AtenRecorder() as recorder:
        if training:
            out = model(x)
            out.sum().backward()
        else:
            with torch.no_grad():
                out = model(x)
    return recorder.ops, out.detach()


class TorchvisionCifar(nn.Module):
    """The paper's CIFAR ResNet as torchvision eager code would write it: the same modules
    (shared), stem ``relu(bn1(conv1(x)))``, torchvision's ``BasicBlock`` forward."""

    def __init__(self, model: CifarResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = model.conv1, _plain_bn(model.bn1), nn.ReLU(inplace=True)
        for name in ("layer1", "layer2", "layer3"):
            setattr(self, name, nn.Sequential(*[_torchvision_basic_block(b) for b in getattr(model, name)]))
        self.avgpool, self.fc = model.avgpool, model.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _plain_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum)
    plain.load_state_dict(bn.state_dict())
    return plain


def _torchvision_basic_block(block: rf.BasicBlock) -> tv.BasicBlock:
    twin = tv.BasicBlock(block.conv1.in_channels, block.conv1.out_channels, block.stride,
                         copy.deepcopy(block.downsample))
    twin.load_state_dict(block.state_dict())
    return twin


def _bottleneck_pair() -> tuple[nn.Module, nn.Module]:
    def build(block, norm):
        torch.manual_seed(0)
        downsample = nn.Sequential(conv1x1(8, 16, 2), norm(16))
        return block(8, 4, 2, downsample, norm_layer=norm)

    return build(rf.Bottleneck, rf.BatchNormAct2d), build(tv.Bottleneck, nn.BatchNorm2d)


def _resnet18_pair() -> tuple[nn.Module, nn.Module]:
    theirs = torchvision.models.resnet18(num_classes=10)
    ours = resnet_fast.resnet18(num_classes=10)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _resnet20_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ours = resnet_fast.resnet20()
    return ours, TorchvisionCifar(copy.deepcopy(ours))


def _converted_resnet18_pair() -> tuple[nn.Module, nn.Module]:
    theirs = torchvision.models.resnet18(num_classes=10)
    ours, _ = resnet_fast.convert(copy.deepcopy(theirs))
    return ours, theirs


PAIRS = {"resnet18": (_resnet18_pair, (2, 3, 32, 32)), "resnet20": (_resnet20_pair, (2, 3, 16, 16)),
         "bottleneck": (_bottleneck_pair, (2, 8, 8, 8)),
         "converted_resnet18": (_converted_resnet18_pair, (2, 3, 32, 32))}


@pytest.fixture
def deterministic():
    """cuDNN picks one deterministic algorithm, so two runs of the same ops agree bitwise."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("device", DEVICES)
def test_native_path_runs_torchvisions_aten_ops_with_identical_results(device, name, training, deterministic):
    make, shape = PAIRS[name]
    ours, theirs = (m.to(device) for m in make())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    if device == "cuda":  # the GPU's fast layout (the same ops take it)
        ours, theirs = (m.to(memory_format=torch.channels_last) for m in (ours, theirs))
        x = x.contiguous(memory_format=torch.channels_last)
    our_ops, our_out = _run(ours, x, training)
    their_ops, their_out = _run(theirs, x, training)
    assert our_ops == their_ops
    assert not any("resnet_fast" in op for op in our_ops)
    assert torch.equal(our_out, their_out)
    if training:
        theirs_params = dict(theirs.named_parameters())
        for key, p in ours.named_parameters():
            assert torch.equal(p.grad, theirs_params[key].grad), key
    theirs_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs_state[key]), key


def test_native_batch_norm_act_is_batch_norm_add_relu():
    """BatchNormAct2d(x, residual) runs what ``out = bn(x); out += residual; relu_(out)`` runs."""
    ours, theirs = rf.BatchNormAct2d(4, relu=True), nn.BatchNorm2d(4)
    x, residual = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    recorded = []
    for module, act in ((ours, lambda out: out), (theirs, lambda out: torch.relu_(out.add_(residual)))):
        leaf = x.clone().requires_grad_()
        with AtenRecorder() as recorder:
            out = act(module(leaf, residual) if module is ours else module(leaf))
            out.sum().backward()
        recorded.append((recorder.ops, out.detach(), leaf.grad))
    (our_ops, our_out, our_grad), (their_ops, their_out, their_grad) = recorded
    assert our_ops == their_ops and "aten.native_batch_norm_backward.default" in our_ops
    assert torch.equal(our_out, their_out) and torch.equal(our_grad, their_grad)


def test_explicit_torch_backend_still_runs_the_reference_operators():
    resnet_fast.set_backend("torch")
    bn = rf.BatchNormAct2d(4, relu=True)
    with AtenRecorder() as recorder:
        bn(torch.randn(3, 4, 5, 5))
    assert "resnet_fast.batch_norm_act.default" in recorder.ops
    assert not any("native_batch_norm" in op for op in recorder.ops)


def test_native_decision_is_cached_per_device_and_dtype(monkeypatch):
    """Decided once per (device, dtype): later calls do not ask the backends again."""
    dispatch.clear_dispatch_cache()
    asked = []
    original = dispatch.Backend.not_supported_reasons

    def counting(self, *args, **kwargs):
        asked.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(dispatch.Backend, "not_supported_reasons", counting)
    block = rf.BasicBlock(4, 4)
    for _ in range(3):
        block(torch.randn(2, 4, 4, 4))
    assert sorted(asked) == ["cuda", "triton"]
    block(torch.randn(2, 4, 4, 4, dtype=torch.float64).to(torch.float32))
    assert len(asked) == 2
    assert dispatch.runs_native(torch.zeros(1))
    resnet_fast.set_backend("torch")
    assert not dispatch.runs_native(torch.zeros(1))


def test_native_path_compiles_without_graph_breaks():
    """torch.compile (fullgraph) traces the native path: the decision is made at trace time."""
    torch._dynamo.reset()
    model = resnet_fast.resnet20()
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    eager(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()


def test_a_fused_backend_that_auto_may_use_ends_the_native_path(monkeypatch):
    """auto_refusal is the one hook validation answers: once it lets auto use a fused
    backend on a GPU, tensors there leave the native path (CPU tensors never do). The
    modules follow validation.clear_cache() (a record written in the process)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        gpu_tensor = torch.empty(2, 4, 4, 4, device="cuda")
    monkeypatch.setattr(dispatch.BACKENDS["triton"], "availability", lambda: [])
    monkeypatch.setattr(dispatch, "auto_refusal", lambda backend, device: "no validation record")
    dispatch.clear_dispatch_cache()
    assert dispatch.runs_native(gpu_tensor)
    monkeypatch.setattr(dispatch, "auto_refusal", lambda backend, device: None)
    dispatch.clear_dispatch_cache()
    assert not dispatch.runs_native(gpu_tensor)
    assert dispatch.runs_native(torch.zeros(1))
    monkeypatch.setattr(dispatch, "auto_refusal", lambda backend, device: "no validation record")
    validation.clear_cache()
    assert dispatch.runs_native(gpu_tensor)
