"""resnet_fast::batch_norm_act (+ backward, + update_running_stats) against float64 torch."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    DEVICES,
    DTYPES,
    assert_close_to_reference,
    random_input,
    relu_with_mask_of,
    requires_gpu,
    strided_buffer,
    strided_per_channel,
)
from torch import nn

import resnet_fast
from resnet_fast.nn import BatchNormAct2d
from resnet_fast.ops.batch_norm_act import batch_norm_act_backward_op, batch_norm_act_op, update_running_stats_op

# The modules here run the fused operators (their torch reference composition), not the
# default native path (torchvision's own aten operators, tested in test_native_path.py).
pytestmark = pytest.mark.usefixtures("reference_backend")

SHAPES = [(4, 6, 5, 7), (3, 5, 1, 1), (2, 3, 9, 4)]
# H*W = 1 (ambiguous memory format) in every dtype, NCHW only; the other shapes in both layouts.
CASES = [(shape, dtype, channels_last) for shape in SHAPES for dtype in DTYPES for channels_last in (False, True)
         if not (shape[2] * shape[3] == 1 and channels_last)]


def _torch_bn_act(bn: nn.BatchNorm2d, x, residual, relu, mask_of=None):
    """Stock torch; with ``mask_of``, the float64 reference whose ReLU takes that output's mask."""
    y = bn(x)
    if residual is not None:
        y = y + residual
    if not relu:
        return y
    return torch.relu(y) if mask_of is None else relu_with_mask_of(y, mask_of)


def _make_pair(channels, dtype_params, *, affine=True, track=True, momentum=0.1, relu=True, seed=0):
    """A stock BatchNorm2d and a BatchNormAct2d with identical random state."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, affine=affine, track_running_stats=track, momentum=momentum)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(channels, generator=g))
        if track:
            bn.running_mean.copy_(torch.randn(channels, generator=g))
            bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
            bn.num_batches_tracked.fill_(3)
    bn = bn.to(dtype_params)
    ours = BatchNormAct2d(channels, affine=affine, track_running_stats=track, momentum=momentum, relu=relu)
    ours = ours.to(dtype_params)
    ours.load_state_dict(bn.state_dict())
    return bn, ours


def _forward_backward(module_fn, module, x, residual):
    x = x.detach().requires_grad_()
    residual = None if residual is None else residual.detach().requires_grad_()
    out = module_fn(x, residual)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grad_out = grad_out.to(device=out.device, dtype=out.dtype)
    out.backward(grad_out)
    grads = {"input": x.grad, "residual": None if residual is None else residual.grad}
    for name, p in module.named_parameters():
        grads[name] = p.grad
    return out, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype,channels_last", CASES)
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False), (False, False)])
@pytest.mark.parametrize("training", [True, False])
def test_matches_float64_reference(shape, dtype, channels_last, residual, relu, training, device):
    g = torch.Generator().manual_seed(hash((shape, residual, relu)) % 2**31)
    x = random_input(shape, dtype, channels_last, scale=2.0, shift=0.5, generator=g, device=device)
    res = random_input(shape, dtype, channels_last, generator=g, device=device) if residual else None
    params_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    bn64, _ = _make_pair(shape[1], torch.float64, relu=relu)
    bn_same, ours = _make_pair(shape[1], params_dtype, relu=relu)
    for m in (bn64, bn_same, ours):
        m.train(training).to(device)

    out, grads = _forward_backward(lambda a, r: ours(a, r), ours, x, res)
    same_out, same_grads = _forward_backward(lambda a, r: _torch_bn_act(bn_same, a, r, relu), bn_same, x, res)
    ref_out, ref_grads = _forward_backward(lambda a, r: _torch_bn_act(bn64, a, r, relu, mask_of=out), bn64,
                                           x.double(), None if res is None else res.double())

    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close_to_reference(out, ref_out, same_out, "output")
    for name, ref in ref_grads.items():
        if ref is not None:
            assert_close_to_reference(grads[name], ref, same_grads[name], f"grad {name}")
    for name in ("running_mean", "running_var"):
        assert_close_to_reference(getattr(ours, name), getattr(bn64, name), getattr(bn_same, name), name)
    assert ours.num_batches_tracked.item() == bn64.num_batches_tracked.item()


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)])
def test_module_semantics_match_batchnorm2d(momentum, affine, track):
    """Several training steps then eval, in float64: running stats, momentum=None, flags."""
    bn, ours = _make_pair(6, torch.float64, affine=affine, track=track, momentum=momentum, relu=False)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(5, 6, 3, 3, dtype=torch.float64, generator=g) * (step + 1) + step
        torch.testing.assert_close(ours(x), bn(x), rtol=1e-12, atol=1e-12)
    assert set(ours.state_dict()) == set(bn.state_dict())
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12)
    bn.eval()
    ours.eval()
    x = torch.randn(5, 6, 3, 3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(ours(x), bn(x), rtol=1e-12, atol=1e-12)


def test_functional_wrapper_matches_f_batch_norm():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    ours = resnet_fast.ops.batch_norm_act(x, w, b, rm, rv, training=True, momentum=0.2, relu=False)
    ref = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training=True, momentum=0.2)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


def test_large_mean_offset_keeps_variance_accurate():
    """Statistics of data far from zero: float32 accumulation must not cancel."""
    x = torch.randn(8, 4, 16, 16) + 1000.0
    _, mean, var = batch_norm_act_op(x, None, None, None, None, None, True, 1e-5, False)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)


def _op_args(training=True, residual=True, relu=True, channels_last=False, requires_grad=True):
    g = torch.Generator().manual_seed(3)
    x = random_input((3, 4, 5, 5), torch.float64, channels_last, generator=g).requires_grad_(requires_grad)
    r = random_input((3, 4, 5, 5), torch.float64, channels_last, generator=g).requires_grad_(requires_grad) if residual else None
    w = (torch.rand(4, dtype=torch.float64, generator=g) + 0.5).requires_grad_(requires_grad)
    b = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
    rm = torch.randn(4, dtype=torch.float64, generator=g)
    rv = torch.rand(4, dtype=torch.float64, generator=g) + 0.5
    return (x, w, b, r, rm, rv, training, 1e-5, relu)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(training, residual, relu, channels_last):
    torch.library.opcheck(batch_norm_act_op, _op_args(training, residual, relu, channels_last))


def test_opcheck_backward_and_update_ops():
    x, w, b, r, rm, rv, *_ = _op_args(requires_grad=False)
    out, mean, var = batch_norm_act_op(x, w, b, r, rm, rv, True, 1e-5, True)
    grad = torch.randn_like(out)
    torch.library.opcheck(batch_norm_act_backward_op, (grad, x, w, mean, var, out, True, 1e-5, True, True))
    torch.library.opcheck(batch_norm_act_backward_op, (grad, x, None, mean, var, None, False, 1e-5, False, False))
    torch.library.opcheck(update_running_stats_op, (rm.clone(), rv.clone(), torch.tensor(2), mean, var, 75, None))
    torch.library.opcheck(update_running_stats_op, (rm.clone(), rv.clone(), None, mean, var, 75, 0.1))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, False)])
def test_gradcheck(training, residual, relu):
    x, w, b, r, *rest = _op_args(training, residual, relu)
    differentiable = (x, w, b) if r is None else (x, w, b, r)

    def fn(x, w, b, r=None):
        return batch_norm_act_op(x, w, b, r, *rest)[0]

    assert torch.autograd.gradcheck(fn, differentiable)


def _assert_same(ours, expected, name):
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_per_channel_vectors_give_the_contiguous_results(device, dtype, channels_last, training):
    """weight, bias, running_mean, running_var (forward), weight, mean, var (backward) and the
    four vectors of update_running_stats as stride-2 views with NaN between their elements:
    exactly the results of contiguous copies, and nothing written between the elements."""
    g = torch.Generator().manual_seed(9)
    shape = (3, 5, 4, 3)
    x = random_input(shape, dtype, channels_last, scale=2.0, shift=0.5, generator=g, device=device)
    res = random_input(shape, dtype, channels_last, generator=g, device=device)
    grad = random_input(shape, dtype, channels_last, generator=g, device=device)
    w = (torch.rand(5, generator=g) + 0.5).to(device)
    b = torch.randn(5, generator=g).to(device)
    rm = torch.randn(5, generator=g).to(device)
    rv = (torch.rand(5, generator=g) + 0.5).to(device)

    out, mean, var = batch_norm_act_op(x, w, b, res, rm, rv, training, 1e-5, True)
    s_out, s_mean, s_var = batch_norm_act_op(x, *map(strided_per_channel, (w, b)), res,
                                             *map(strided_per_channel, (rm, rv)), training, 1e-5, True)
    for name, ours, expected in (("out", s_out, out), ("mean", s_mean, mean), ("var", s_var, var)):
        _assert_same(ours, expected, name)

    expected = batch_norm_act_backward_op(grad, x, w, mean, var, out, training, 1e-5, True, True)
    ours = batch_norm_act_backward_op(grad, x, *map(strided_per_channel, (w, mean, var)), out,
                                      training, 1e-5, True, True)
    for name, o, e in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), ours, expected):
        _assert_same(o, e, name)

    if training:
        (rm_view, rm_gaps), (rv_view, rv_gaps) = strided_buffer(rm), strided_buffer(rv)
        tracked, s_tracked = torch.tensor(2, device=device), torch.tensor(2, device=device)
        for momentum in (0.1, None):
            update_running_stats_op(rm, rv, tracked, mean, var, x.numel() // 5, momentum)
            update_running_stats_op(rm_view, rv_view, s_tracked, *map(strided_per_channel, (mean, var)),
                                    x.numel() // 5, momentum)
            _assert_same(rm_view, rm, "running_mean")
            _assert_same(rv_view, rv, "running_var")
        assert rm_gaps.isnan().all() and rv_gaps.isnan().all(), "written between a strided buffer's elements"
        assert s_tracked.item() == tracked.item() == 4


def test_update_running_stats_cumulative_average_needs_no_host_value():
    """momentum=None: f = 1 / num_batches_tracked, computed from the tensor."""
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    nbt = torch.tensor(0)
    for step in range(1, 4):
        mean = torch.full((2,), float(step), dtype=torch.float64)
        var = torch.full((2,), 2.0, dtype=torch.float64)
        update_running_stats_op(rm, rv, nbt, mean, var, 11, None)
    assert nbt.item() == 3
    torch.testing.assert_close(rm, torch.full((2,), 2.0, dtype=torch.float64))  # mean of 1, 2, 3
    torch.testing.assert_close(rv, torch.full((2,), 2.2, dtype=torch.float64))  # 2 * 11 / 10


def test_deepcopy_and_repr():
    m = BatchNormAct2d(4, relu=True)
    assert "relu=True" in repr(m)
    assert copy.deepcopy(m).relu is True
    assert isinstance(m, nn.BatchNorm2d)


def test_from_batch_norm_shares_storage():
    bn = nn.BatchNorm2d(5)
    fused = BatchNormAct2d.from_batch_norm(bn, relu=True)
    for name, t in list(bn.named_parameters()) + list(bn.named_buffers()):
        assert getattr(fused, name) is t
    fused(torch.randn(4, 5, 2, 2))
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_step_captures_in_a_cuda_graph(momentum):
    """No host synchronisation in the step, momentum=None included: graph replays match eager."""
    eager = BatchNormAct2d(8, momentum=momentum, relu=True).cuda()
    graphed = copy.deepcopy(eager)
    static_x = torch.randn(16, 8, 6, 6, device="cuda").contiguous(memory_format=torch.channels_last)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, as torch requires
        graphed(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    eager(static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = graphed(static_x)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x) * 3 + 1)
        graph.replay()
        expected = eager(static_x)
        torch.testing.assert_close(static_out, expected)
    torch.cuda.synchronize()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(graphed.state_dict()[key], value)


def test_weight_without_bias_matches_batchnorm2d():
    ours, ref = BatchNormAct2d(4, bias=False), nn.BatchNorm2d(4, bias=False)
    assert set(ours.state_dict()) == set(ref.state_dict()) and ours.bias is None
    fused = BatchNormAct2d.from_batch_norm(ref, relu=False)
    assert fused.bias is None and fused.weight is ref.weight
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(fused(x), nn.BatchNorm2d(4, bias=False)(x))
