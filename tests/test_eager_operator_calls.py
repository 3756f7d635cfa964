"""Plain eager calls skip the ``torch.library`` operator call (:mod:`resnet_fast.ops.eager`)
without changing a bit, and anything that must see the operators still does.

The fused-training pattern (``conv2d_stats``, the running-statistics update, the BatchNorm
in scale/shift form, ``scale_shift_act``) runs once plainly and once under a pass-through
``TorchDispatchMode``, which sends every call through the operators as before: outputs,
every gradient, running statistics and ``num_batches_tracked`` must be equal bit for bit.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import resnet as tv_resnet

import resnet_fast
from resnet_fast.nn import BasicBlock, Bottleneck, enable_fused_training
from resnet_fast.nn.conv_bn_act import _scale_shift_terms, batch_norm_scale_shift
from resnet_fast.ops.eager import runs_eagerly

conv2d_stats_module = sys.modules["resnet_fast.ops.conv2d_stats"]
scale_shift_act_module = sys.modules["resnet_fast.ops.scale_shift_act"]
batch_norm_act_module = sys.modules["resnet_fast.ops.batch_norm_act"]


class PassThrough(TorchDispatchMode):
    """Runs every operator as it is; its presence makes the wrappers call the operators."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def _fused_block(kind: str, stride: int, dtype: torch.dtype, momentum: float | None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    tv_cls, ours_cls = (tv_resnet.Bottleneck, Bottleneck) if kind == "bottleneck" else (tv_resnet.BasicBlock,
                                                                                        BasicBlock)
    inplanes, planes = 8, 8 // tv_cls.expansion
    downsample = None
    if stride != 1:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * tv_cls.expansion, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * tv_cls.expansion))
    block = ours_cls.from_torchvision(tv_cls(inplanes, planes, stride=stride, downsample=downsample))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.momentum = momentum
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
    enable_fused_training(block)
    return block.to(dtype).train()


def _steps(block: nn.Module, dtype: torch.dtype) -> list[torch.Tensor]:
    """Two training steps; everything they produce (outputs, gradients, buffers)."""
    gen = torch.Generator().manual_seed(7)
    results = []
    for _ in range(2):
        x = (torch.randn(3, 8, 6, 6, generator=gen) * 2 + 0.5).to(dtype).requires_grad_()
        out = block(x)
        grad = torch.randn(out.shape, generator=gen).to(dtype)
        block.zero_grad()
        out.backward(grad)
        results += [out.detach(), x.grad, *(p.grad for p in block.parameters()),
                    *(b.clone() for b in block.buffers())]
    return results


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_eager_fused_training_is_bit_identical_to_the_operators(kind, stride, dtype, momentum):
    resnet_fast.set_backend("torch")
    block = _fused_block(kind, stride, dtype, momentum)
    same_block = copy.deepcopy(block)
    eager = _steps(block, dtype)
    with PassThrough():
        through_operators = _steps(same_block, dtype)
    assert len(eager) == len(through_operators)
    for i, (a, b) in enumerate(zip(eager, through_operators)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"result {i} differs"


def test_eager_fused_training_calls_no_operator(monkeypatch):
    """Plainly called, the fused-training block reaches no ``torch.library`` operator of ours."""
    resnet_fast.set_backend("torch")
    block = _fused_block("bottleneck", 2, torch.float32, 0.1)

    def refuse(*args, **kwargs):
        raise AssertionError("the operator was called")

    monkeypatch.setattr(conv2d_stats_module, "conv2d_stats_op", refuse)
    monkeypatch.setattr(scale_shift_act_module, "scale_shift_act_op", refuse)
    monkeypatch.setattr(batch_norm_act_module, "update_running_stats_op", refuse)
    block(torch.randn(2, 8, 6, 6, requires_grad=True)).sum().backward()


def test_dispatch_modes_and_the_profiler_still_see_the_operators():
    resnet_fast.set_backend("torch")
    block = _fused_block("bottleneck", 2, torch.float32, 0.1)
    x = torch.randn(2, 8, 6, 6)
    ours = {"resnet_fast.conv2d_stats.default", "resnet_fast.scale_shift_act.default",
            "resnet_fast.update_running_stats.default"}
    with RecordOps() as recorded:
        block(x)
    assert ours <= recorded.names
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        block(x)
    names = {event.name for event in prof.events()}
    assert {"resnet_fast::conv2d_stats", "resnet_fast::scale_shift_act", "resnet_fast::update_running_stats"} <= names


def test_runs_eagerly_refuses_tracing_modes_and_subclasses():
    x = torch.randn(3)
    assert runs_eagerly(x, None, nn.Parameter(torch.randn(3)))
    with PassThrough():
        assert not runs_eagerly(x)

    class Sub(torch.Tensor):
        pass

    assert not runs_eagerly(x, x.as_subclass(Sub))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_batch_norm_scale_shift_node_equals_its_operators_bitwise(param_dtype, affine):
    """The one-node scale/shift form against the same operators recorded by autograd: values
    and every gradient equal bit for bit (statistics in float32, float64 for float64)."""
    stats_dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        mean = torch.randn(16, generator=gen, dtype=stats_dtype).requires_grad_()
        var = (torch.rand(16, generator=gen, dtype=stats_dtype) * 3).requires_grad_()
        weight = (torch.randn(16, generator=gen) + 1).to(param_dtype).requires_grad_() \
            if affine in ("both", "weight") else None
        bias = torch.randn(16, generator=gen).to(param_dtype).requires_grad_() if affine in ("both", "bias") else None
        leaves = [t for t in (mean, var, weight, bias) if t is not None]
        grads_out = (torch.randn(16, generator=gen, dtype=stats_dtype), torch.randn(16, generator=gen, dtype=stats_dtype))
        node = batch_norm_scale_shift(mean, var, weight, bias, 1e-5)
        composed = _scale_shift_terms(mean, var, weight, bias, 1e-5)[2:]
        for a, b in zip(node, composed):
            assert torch.equal(a, b)
        node_grads = torch.autograd.grad(node, leaves, grads_out)
        composed_grads = torch.autograd.grad(composed, leaves, grads_out)
        for a, b in zip(node_grads, composed_grads):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_torch_compile_still_traces_the_operators():
    """Under torch.compile the graph holds the operators, not the eager autograd nodes."""
    resnet_fast.set_backend("torch")
    block = _fused_block("bottleneck", 2, torch.float32, 0.1)
    targets: set[str] = set()

    def record(gm: torch.fx.GraphModule, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(block, backend=record, fullgraph=True)(torch.randn(2, 8, 6, 6, requires_grad=True))
    assert {"resnet_fast.conv2d_stats.default", "resnet_fast.scale_shift_act.default",
            "resnet_fast.update_running_stats.default"} <= targets, targets
    assert not any("autograd_function" in target for target in targets), targets



def test_torch_func_transforms_meet_the_operators():
    """Inside a ``torch.func`` transform the wrappers call the operators, as before."""
    seen = []

    def probe(x):
        seen.append(runs_eagerly(x))
        return x.sum()

    torch.func.grad(probe)(torch.randn(3))
    assert seen == [False]


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_eager_fused_training_forward_without_autograd(context):
    """A training-mode forward without autograd (statistics still updated) equals the operators'."""
    resnet_fast.set_backend("torch")
    block = _fused_block("bottleneck", 2, torch.float32, 0.1)
    same_block = copy.deepcopy(block)
    x = torch.randn(2, 8, 6, 6)
    with context():
        out = block(x)
        with PassThrough():
            expected = same_block(x)
    assert torch.equal(out, expected)
    for a, b in zip(block.buffers(), same_block.buffers()):
        assert torch.equal(a, b)
