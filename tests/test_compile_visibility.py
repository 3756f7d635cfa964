"""torch.compile reaches the triton backend's ``triton_op`` operators (not an opaque
``custom_op`` around them), so Inductor sees the ``wrap_triton`` kernels.

CPU (in a fresh ``TRITON_INTERPRET=1`` process): the graph dynamo captures for a module on
the triton backend calls ``resnet_fast::triton_*`` itself — the BatchNorm, the folded
evaluation convolution and the statistics convolution — and no ``resnet_fast`` custom
operator that would hide it. GPU (marked): Inductor's output code names our Triton kernels,
forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICES, TRITON_INTERPRETER, requires_gpu, run_cpu_tests_in_triton_interpreter

import resnet_fast
import resnet_fast.nn as rf
from resnet_fast.ops.conv2d_stats import conv2d_stats

pytest.importorskip("triton")

OPAQUE_OPS = ("resnet_fast.batch_norm_act.", "resnet_fast.conv_bn_act.", "resnet_fast.conv2d_bias_act.",
              "resnet_fast.conv2d_stats.")


@pytest.fixture
def triton_backend():
    before = resnet_fast.get_backend()
    resnet_fast.set_backend("triton")
    yield
    resnet_fast.set_backend(before)


def _dynamo_graph_ops(fn, *args) -> list[str]:
    """The operators in the FX graph(s) dynamo captures for ``fn(*args)`` (no graph break allowed)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=record, fullgraph=True)(*args)
    return [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]


def _assert_reaches(ops: list[str], triton_op: str) -> None:
    assert f"resnet_fast.{triton_op}.default" in ops, ops
    assert not any(op.startswith(OPAQUE_OPS) for op in ops), ops


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_compiled_batch_norm_act_reaches_the_triton_op(device, triton_backend):
    module = rf.BatchNormAct2d(8, relu=True).to(device)
    ops = _dynamo_graph_ops(module, torch.randn(2, 8, 4, 4, device=device), torch.randn(2, 8, 4, 4, device=device))
    _assert_reaches(ops, "triton_batch_norm_act_forward")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_compiled_conv_bn_act_reaches_the_triton_ops(device, triton_backend):
    """Training: cuDNN's convolution then the BatchNorm's triton_op; evaluation: the folded
    convolution's triton_op."""
    module = rf.ConvBNAct2d(8, 16, 3, padding=1).to(device)
    x = torch.randn(2, 8, 4, 4, device=device)
    _assert_reaches(_dynamo_graph_ops(module.train(), x), "triton_batch_norm_act_forward")
    with torch.no_grad():
        _assert_reaches(_dynamo_graph_ops(module.eval(), x), "triton_conv2d_bias_act")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_compiled_conv2d_stats_reaches_the_triton_op(device, triton_backend):
    x, w = torch.randn(2, 8, 4, 4, device=device), torch.randn(16, 8, 3, 3, device=device)
    scale, shift = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)

    def fn(x, w, scale, shift):
        return conv2d_stats(x, w, padding=1, prologue_scale=scale, prologue_shift=shift)

    _assert_reaches(_dynamo_graph_ops(fn, x, w, scale, shift), "triton_conv2d_stats")


@pytest.mark.skipif(TRITON_INTERPRETER, reason="this is the driver of the interpreter run")
def test_interpreter_run():
    run_cpu_tests_in_triton_interpreter(__file__, min_passed=3)


@pytest.mark.gpu
@requires_gpu
def test_inductor_output_code_names_our_kernels(triton_backend):
    """Compiled with Inductor on a GPU, forward and backward run our Triton kernels."""
    from torch._inductor.utils import run_and_get_code

    module = rf.BatchNormAct2d(64, relu=True).cuda()
    x = torch.randn(8, 64, 16, 16, device="cuda").to(memory_format=torch.channels_last).requires_grad_()

    def step(x):
        out = module(x)
        out.sum().backward()
        return out

    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(step), x)
    source = "\n".join(code)
    assert "_apply_nhwc_kernel" in source and "_stats_nhwc_kernel" in source
    assert "_bwd_reduce_nhwc_kernel" in source
