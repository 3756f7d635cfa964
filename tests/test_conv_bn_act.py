"""resnet_fast::conv_bn_act against float64 torch (Conv2d -> BatchNorm2d -> + residual -> ReLU)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICES,
    DTYPES,
    assert_close_to_reference,
    conv_bn_parameters,
    random_input,
    stock_conv_bn_act,
    strided_buffer,
    strided_per_channel,
)
from torch import nn

from resnet_fast.nn import ConvBNAct2d
from resnet_fast.ops.conv_bn_act import conv_bn_act_op

# The modules here run the fused operators (their torch reference composition), not the
# default native path (torchvision's own aten operators, tested in test_native_path.py).
pytestmark = pytest.mark.usefixtures("reference_backend")

# (in, out, kernel, stride, padding, groups, conv bias): every ResNet conv kind, small.
CONVS = [
    (3, 8, 7, 2, 3, 1, False),   # stem
    (6, 6, 3, 1, 1, 1, False),
    (6, 8, 3, 2, 1, 1, False),
    (8, 12, 1, 1, 0, 1, False),
    (8, 12, 1, 2, 0, 1, True),
    (8, 8, 3, 1, 1, 4, False),   # grouped (ResNeXt)
]


def _pair(cin, cout, k, s, p, groups, bias, relu, dtype, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    ours = ConvBNAct2d(cin, cout, k, s, p, groups=groups, bias=bias, relu=relu)
    ours.conv.load_state_dict(conv.state_dict())
    ours.bn.load_state_dict(bn.state_dict())
    # The convolution runs in the activation dtype; BatchNorm keeps float32 parameters.
    params = torch.float64 if dtype == torch.float64 else torch.float32
    ours.conv.to(dtype)
    ours.bn.to(params)
    return conv.to(dtype), bn.to(params), ours


def _run(fn, params, x, residual):
    x = x.detach().requires_grad_()
    residual = None if residual is None else residual.detach().requires_grad_()
    out = fn(x, residual)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grad = grad.to(device=out.device, dtype=out.dtype)
    out.backward(grad)
    grads = {"input": x.grad, "residual": None if residual is None else residual.grad}
    grads.update({name: p.grad for name, p in params})
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}s{c[3]}g{c[5]}{'b' if c[6] else ''}")
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_float64_reference(dtype, channels_last, conv, residual, relu, training, device):
    cin, cout, k, s, p, groups, bias = conv
    g = torch.Generator().manual_seed(11)
    x = random_input((3, cin, 9, 9), dtype, channels_last, generator=g, device=device)
    conv64, bn64, _ = _pair(*conv, relu, torch.float64)
    conv_same, bn_same, ours = _pair(*conv, relu, dtype)
    out_hw = (9 + 2 * p - k) // s + 1
    res = random_input((3, cout, out_hw, out_hw), dtype, channels_last, generator=g, device=device) if residual else None
    for m in (conv64, bn64, conv_same, bn_same, ours):
        m.train(training).to(device)

    out, grads = _run(lambda a, r: ours(a, r), conv_bn_parameters(ours.conv, ours.bn), x, res)
    same_out, same_grads = _run(stock_conv_bn_act(conv_same, bn_same, relu), conv_bn_parameters(conv_same, bn_same), x, res)
    ref_out, ref_grads = _run(stock_conv_bn_act(conv64, bn64, relu, mask_of=out), conv_bn_parameters(conv64, bn64), x.double(),
                              None if res is None else res.double())

    assert out.dtype == dtype
    assert_close_to_reference(out, ref_out, same_out, "output")
    for name, ref in ref_grads.items():
        if ref is not None:
            assert_close_to_reference(grads[name], ref, same_grads[name], f"grad {name}")
    assert_close_to_reference(ours.bn.running_mean, bn64.running_mean, bn_same.running_mean, "running_mean")
    assert_close_to_reference(ours.bn.running_var, bn64.running_var, bn_same.running_var, "running_var")
    assert ours.bn.num_batches_tracked.item() == bn64.num_batches_tracked.item()


def _op_args(training=True, residual=True, relu=True, requires_grad=True, stride=2):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
    cb = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
    bw = (torch.rand(6, dtype=torch.float64, generator=g) + 0.5).requires_grad_(requires_grad)
    bb = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
    size = (7 + 2 - 3) // stride + 1
    r = torch.randn(2, 6, size, size, dtype=torch.float64, generator=g).requires_grad_(requires_grad) if residual else None
    rm = torch.randn(6, dtype=torch.float64, generator=g)
    rv = torch.rand(6, dtype=torch.float64, generator=g) + 0.5
    return (x, w, cb, [stride, stride], [1, 1], [1, 1], 1, bw, bb, r, rm, rv, training, 1e-5, relu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_per_channel_vectors_give_the_contiguous_results(device, dtype, channels_last, training):
    """conv_bias, weight, bias, running_mean and running_var as stride-2 views with NaN between
    their elements: the output, statistics, every gradient and the running statistics equal
    those of contiguous copies exactly, and nothing is written between the elements."""
    args = [a.detach().to(device) if isinstance(a, torch.Tensor) else a for a in _op_args(training)]
    x, conv_w, conv_b, bn_w, bn_b, res, rm, rv = (args[i] for i in (0, 1, 2, 7, 8, 9, 10, 11))
    x, conv_w, conv_b, res = (t.to(dtype) for t in (x, conv_w, conv_b, res))
    bn_w, bn_b, rm, rv = (t.float() for t in (bn_w, bn_b, rm, rv))
    if channels_last:
        x, res = (t.contiguous(memory_format=torch.channels_last) for t in (x, res))
    conv_geometry, tail = args[3:7], args[12:]
    leaves = [t.clone().requires_grad_() for t in (conv_b, bn_w, bn_b)]
    grad = torch.randn(res.shape, generator=torch.Generator().manual_seed(4)).to(device, dtype)

    def run(cb, bw, bb, running_mean, running_var):
        outputs = conv_bn_act_op(x, conv_w, cb, *conv_geometry, bw, bb, res, running_mean, running_var, *tail)
        grads = torch.autograd.grad(outputs[0], leaves, grad)
        return outputs, grads

    expected, expected_grads = run(*leaves, rm.clone(), rv.clone())
    strided = [strided_per_channel(t) for t in leaves]
    ours, grads = run(*strided, strided_per_channel(rm), strided_per_channel(rv))
    for name, o, e in zip(("out", "conv_out", "mean", "var", "grad conv_bias", "grad weight", "grad bias"),
                          (*ours, *grads), (*expected, *expected_grads)):
        torch.testing.assert_close(o, e, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")

    if training:  # the module's running-statistics update, into strided buffers
        from resnet_fast.ops.batch_norm_act import update_running_stats_after
        (rm_view, rm_gaps), (rv_view, rv_gaps) = strided_buffer(rm), strided_buffer(rv)
        update_running_stats_after(expected[1], expected[2], expected[3], rm, rv, None, True, 0.1)
        update_running_stats_after(ours[1], ours[2], ours[3], rm_view, rv_view, None, True, 0.1)
        torch.testing.assert_close(rm_view, rm, rtol=0, atol=0)
        torch.testing.assert_close(rv_view, rv, rtol=0, atol=0)
        assert rm_gaps.isnan().all() and rv_gaps.isnan().all()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, False)])
def test_opcheck(training, residual, relu):
    torch.library.opcheck(conv_bn_act_op, _op_args(training, residual, relu))


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(training):
    args = _op_args(training)

    def fn(x, w, cb, bw, bb, r):
        return conv_bn_act_op(x, w, cb, *args[3:7], bw, bb, r, *args[10:])[0]

    assert torch.autograd.gradcheck(fn, (args[0], args[1], args[2], args[7], args[8], args[9]))


def test_autocast_runs_conv_in_autocast_dtype():
    torch.manual_seed(0)
    ours = ConvBNAct2d(3, 8, 3, padding=1)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    conv.load_state_dict(ours.conv.state_dict())
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
        ref = torch.relu(bn(conv(x)))
    assert out.dtype == ref.dtype == torch.bfloat16
    assert ours.bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.bn.running_mean, bn.running_mean, rtol=1e-2, atol=1e-3)


def test_unfusable_layers_run_module_by_module():
    ours = ConvBNAct2d(3, 4, 3, padding=1)
    ours.conv.padding_mode = "reflect"
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False)
    conv.load_state_dict(ours.conv.state_dict())
    bn = nn.BatchNorm2d(4)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(ours(x), torch.relu(bn(conv(x))))
