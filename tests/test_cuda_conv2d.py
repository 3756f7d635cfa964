"""The ``cuda`` backend of ``conv2d_bias_act`` and ``conv2d_stats`` (resnet_fast/ops/conv2d_cuda.py).

CPU: the parts that do not need cuDNN's fused engines (the stage operators' torch math
stands in for their CUDA kernels) equal the ``torch`` backend. GPU (marked): every
combination through ``set_backend("cuda")`` against float64, outputs and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_reference, random_input, requires_gpu

from resnet_fast.ops import conv2d_cuda, reference
from resnet_fast.ops.conv2d_bias_act import conv2d_bias_act
from resnet_fast.ops.conv2d_stats import conv2d_stats
from resnet_fast.ops.dispatch import BACKENDS, get_backend, set_backend

# (C_in, C_out, kernel, stride, padding, H): the stem, 3x3 s1/s2, 1x1 s2, odd channel counts
CONVS = [(3, 8, 7, 2, 3, 11), (6, 5, 3, 1, 1, 6), (6, 8, 3, 2, 1, 7), (8, 12, 1, 2, 0, 6)]


def _case(conv, dtype, channels_last, device="cpu", seed=0):
    cin, cout, k, s, p, h = conv
    g = torch.Generator().manual_seed(seed)
    x = random_input((2, cin, h, h), dtype, channels_last, generator=g).to(device)
    w = random_input((cout, cin, k, k), dtype, channels_last, scale=(cin * k * k) ** -0.5, generator=g).to(device)
    out_hw = (h + 2 * p - k) // s + 1
    bias = torch.randn(cout, generator=g).to(device)  # float32, as the BatchNorm fold gives
    residual = random_input((2, cout, out_hw, out_hw), dtype, channels_last, generator=g).to(device)
    scale = (torch.rand(cin, generator=g) + 0.5).to(device)
    shift = torch.randn(cin, generator=g).to(device)
    return x, w, s, p, bias, residual, scale, shift


def test_cuda_backend_implements_the_convolution_operators():
    for op in ("conv2d_bias_act", "conv2d_stats"):
        assert BACKENDS["cuda"].kernels[op] is getattr(conv2d_cuda, op)


@pytest.mark.parametrize("conv", CONVS, ids=str)
@pytest.mark.parametrize("prologue", [None, True, False], ids=["plain", "prologue_relu", "prologue"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv2d_stats_composition_equals_torch_backend(conv, prologue, channels_last):
    x, w, s, p, _, _, scale, shift = _case(conv, torch.float64, channels_last)
    scale, shift = (None, None) if prologue is None else (scale.double(), shift.double())
    args = (x, w, [s, s], [p, p], [1, 1], scale, shift, bool(prologue))
    ours, expected = conv2d_cuda.conv2d_stats(*args), reference.conv2d_stats(*args)
    for name, a, b in zip(("out", "mean", "var"), ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert ours[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("residual", [False, True])
def test_conv2d_without_relu_equals_torch_backend(residual):
    x, w, s, p, bias, r, _, _ = _case(CONVS[1], torch.float64, True)
    args = (x, w, bias.double(), r if residual else None, [s, s], [p, p], [1, 1], False)
    torch.testing.assert_close(conv2d_cuda.conv2d_bias_act(*args), reference.conv2d_bias_act(*args),
                               rtol=1e-12, atol=1e-12)


@pytest.fixture
def cuda_backend():
    previous = get_backend()
    set_backend("cuda")
    yield
    set_backend(previous)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("conv", CONVS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bias,residual,relu", [(True, True, True), (True, False, True), (False, False, True),
                                                (True, False, False), (True, True, False)])
def test_conv2d_bias_act_on_gpu_matches_float64(cuda_backend, conv, dtype, channels_last, bias, residual, relu):
    x, w, s, p, b, r, _, _ = _case(conv, dtype, channels_last, "cuda")
    b, r = (b if bias else None), (r if residual else None)
    out = conv2d_bias_act(x, w, b, r, stride=s, padding=p, relu=relu)

    def torch_math(x, w, b, r):
        y = F.conv2d(x, w, None, s, p)
        y = y + b.view(1, -1, 1, 1).to(y.dtype) if b is not None else y
        y = y + r.to(y.dtype) if r is not None else y
        return torch.relu(y) if relu else y

    ref = torch_math(*(None if t is None else t.double() for t in (x, w, b, r)))
    same = torch_math(x, w, b, r)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close_to_reference(out, ref, same)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("conv", CONVS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prologue_relu", [True, False])
def test_conv2d_stats_on_gpu_matches_float64(cuda_backend, conv, dtype, prologue_relu):
    x, w, s, p, _, _, scale, shift = _case(conv, dtype, True, "cuda")
    leaves = [t.detach().requires_grad_() for t in (x, w, scale, shift)]
    out, mean, var = conv2d_stats(leaves[0], leaves[1], stride=s, padding=p, prologue_scale=leaves[2],
                                  prologue_shift=leaves[3], prologue_relu=prologue_relu)
    (out.float().square().sum() + mean.sum() + var.sum()).backward()

    def torch_math(x, w, scale, shift):
        a = x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)
        y = F.conv2d(torch.relu(a) if prologue_relu else a, w, None, s, p)
        var, mean = torch.var_mean(y.float() if y.dtype != torch.float64 else y, dim=(0, 2, 3), correction=0)
        return y, mean, var

    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, scale, shift)]
    leaves_same = [t.detach().clone().requires_grad_() for t in (x, w, scale, shift)]
    ref = torch_math(*leaves64)
    same = torch_math(*leaves_same)
    for name, a, r, sm in zip(("out", "mean", "var"), (out, mean, var), ref, same):
        assert_close_to_reference(a.detach(), r.detach(), sm.detach(), name)
    (ref[0].square().sum() + ref[1].sum() + ref[2].sum()).backward()
    (same[0].float().square().sum() + same[1].sum() + same[2].sum()).backward()
    for name, ours, r, sm in zip(("input", "weight", "scale", "shift"), leaves, leaves64, leaves_same):
        assert_close_to_reference(ours.grad, r.grad, sm.grad, f"grad_{name}")
