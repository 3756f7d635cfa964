"""The ``cuda`` backend of the BatchNorm family: its stage operators and their composition.

CPU (runs everywhere):
  * each stage operator's default implementation (the torch math) against float64 math,
    and ``torch.library.opcheck`` on it;
  * the CUDA kernels of resnet_fast._C are registered for the stage operators (required
    with RESNET_FAST_EXPECT_CUDA_EXT=1, as tests/test_extension_build.py);
  * the cuda backend's functions, composed from the stage operators' default
    implementations, equal the torch backend (bit for bit), alone and inside the
    modules' autograd.
GPU (marked ``gpu``; skipped without a GPU): ``set_backend("cuda")`` through
``BatchNormAct2d`` / ``ConvBNAct2d`` against the float64 reference over dtypes, layouts,
residual/ReLU, train/eval and odd shapes, misaligned storage, mixed dtypes, > 2^31
elements, CUDA-graph capture of a training step, and opcheck of each stage operator on
CUDA.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import (
    DEVICES,
    assert_close_to_reference,
    conv_bn_parameters,
    cuda_kernel_names,
    random_input,
    relu_with_mask_of,
    stock_conv_bn_act,
    strided_per_channel,
)
from torch import nn

import resnet_fast.ops  # noqa: F401  defines the operators and loads resnet_fast._C when built
from resnet_fast._extension import extension_load_error
from resnet_fast.nn import BatchNormAct2d, ConvBNAct2d
from resnet_fast.ops import batch_norm_act_stages as stages
from resnet_fast.ops.dispatch import BACKENDS, get_backend, set_backend

APPLY = torch.ops.resnet_fast.batch_norm_act_apply.default
REDUCE = torch.ops.resnet_fast.batch_norm_act_backward_reduce.default
BACKWARD_APPLY = torch.ops.resnet_fast.batch_norm_act_backward_apply.default
STAGE_OPS = ("batch_norm_act_apply", "batch_norm_act_backward_reduce", "batch_norm_act_backward_apply")
BACKEND_OPS = ("batch_norm_act", "batch_norm_act_backward", "conv_bn_act")
EXPECT_EXT = os.environ.get("RESNET_FAST_EXPECT_CUDA_EXT") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]

# Elementwise tolerance of one rounding to the output dtype (values here are O(1..10)).
ROUNDING = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel(t):
    return t.view(1, -1, 1, 1)


def _stage_inputs(shape, dtype, layout, *, device="cpu", seed=0, param_dtype=None):
    """Activations in ``dtype``/``layout`` and per-channel tensors in ``param_dtype``."""
    g = torch.Generator().manual_seed(seed)
    channels_last = layout == "channels_last"
    c = shape[1]
    param_dtype = param_dtype or _acc(dtype)

    def act(scale=1.0, shift=0.0):
        return random_input(shape, dtype, channels_last, scale=scale, shift=shift, generator=g, device=device)

    def per_channel(low=None):
        t = torch.rand(c, generator=g, dtype=torch.float64) + low if low is not None else \
            torch.randn(c, generator=g, dtype=torch.float64)
        return t.to(device=device, dtype=param_dtype)

    return {
        "x": act(2.0, 0.5), "residual": act(), "grad_out": act(), "out": act(),
        "mean": per_channel(), "var": per_channel(0.5), "weight": per_channel(0.5), "bias": per_channel(),
    }


# ---------------------------------------------------------------------------------------
# float64 math of each stage (independent of resnet_fast.ops.reference).


def _apply64(x, mean, var, weight, bias, residual, eps, relu):
    invstd = (var.double() + eps).rsqrt()
    w = torch.ones_like(invstd) if weight is None else weight.double()
    b = torch.zeros_like(invstd) if bias is None else bias.double()
    y = (x.double() - _channel(mean.double())) * _channel(invstd * w) + _channel(b)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def _masked_dy64(grad_out, out, relu):
    dy = grad_out.double()
    return dy.masked_fill(out <= 0, 0) if relu else dy


def _reduce64(grad_out, x, mean, var, out, eps, relu):
    dy = _masked_dy64(grad_out, out, relu)
    x_hat = (x.double() - _channel(mean.double())) * _channel((var.double() + eps).rsqrt())
    return dy.sum((0, 2, 3)), (dy * x_hat).sum((0, 2, 3))


def _backward_apply64(grad_out, x, weight, mean, var, out, sum_dy, sum_dy_xhat, training, eps, relu):
    dy = _masked_dy64(grad_out, out, relu)
    invstd = (var.double() + eps).rsqrt()
    w = torch.ones_like(invstd) if weight is None else weight.double()
    if training:
        m = x.numel() // x.shape[1]
        x_hat = (x.double() - _channel(mean.double())) * _channel(invstd)
        dy = dy - _channel(sum_dy.double() / m) - x_hat * _channel(sum_dy_xhat.double() / m)
    return dy * _channel(w * invstd), _masked_dy64(grad_out, out, relu)


def _assert_rounding_close(ours, ref, dtype, name):
    """Elementwise: within a few roundings to ``dtype`` of the float64 value."""
    tol = ROUNDING[dtype]
    torch.testing.assert_close(ours.double(), ref.double(), rtol=tol, atol=tol * max(1.0, ref.abs().max().item()),
                               msg=lambda m: f"{name}: {m}")


def _assert_sums_close(ours, ref, terms_abs_sum, acc_dtype, name):
    """Sums accumulated in ``acc_dtype``: error relative to the sum of |terms|."""
    tol = 1e-12 if acc_dtype == torch.float64 else 1e-5
    err = (ours.double().cpu() - ref.double().cpu()).abs()
    bound = tol * terms_abs_sum.double().cpu() + 1e-30
    assert (err <= bound).all(), f"{name}: error {err.max().item():.3g} exceeds {bound.max().item():.3g}"


def _expected_format(x):
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ---------------------------------------------------------------------------------------
# CPU: the stage operators' default implementations.

CPU_SHAPES = [(4, 6, 5, 7), (3, 5, 1, 1), (2, 3, 9, 4)]
CPU_CASES = [(s, d, lay) for s in CPU_SHAPES for d in DTYPES for lay in LAYOUTS
             if not (s[2] * s[3] == 1 and lay == "channels_last")]


@pytest.mark.parametrize("shape,dtype,layout", CPU_CASES, ids=lambda v: str(v) if not isinstance(v, tuple) else "x".join(map(str, v)))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False), (False, False)])
def test_apply_default_matches_float64(shape, dtype, layout, affine, residual, relu):
    t = _stage_inputs(shape, dtype, layout)
    w, b = (t["weight"], t["bias"]) if affine else (None, None)
    r = t["residual"] if residual else None
    out = APPLY(t["x"], t["mean"], t["var"], w, b, r, 1e-5, relu)
    assert out.dtype == dtype and out.shape == t["x"].shape
    assert out.is_contiguous(memory_format=_expected_format(t["x"]))
    _assert_rounding_close(out, _apply64(t["x"], t["mean"], t["var"], w, b, r, 1e-5, relu), dtype, "out")


@pytest.mark.parametrize("shape,dtype,layout", CPU_CASES, ids=lambda v: str(v) if not isinstance(v, tuple) else "x".join(map(str, v)))
@pytest.mark.parametrize("relu", [True, False])
def test_backward_reduce_default_matches_float64(shape, dtype, layout, relu):
    t = _stage_inputs(shape, dtype, layout)
    out = t["out"] if relu else None
    sum_dy, sum_dy_xhat = REDUCE(t["grad_out"], t["x"], t["mean"], t["var"], out, 1e-5, relu)
    acc = _acc(dtype)
    assert sum_dy.dtype == acc and sum_dy_xhat.dtype == acc and sum_dy.shape == (shape[1],)
    ref_dy, ref_dy_xhat = _reduce64(t["grad_out"], t["x"], t["mean"], t["var"], out, 1e-5, relu)
    dy = _masked_dy64(t["grad_out"], out, relu)
    x_hat = (t["x"].double() - _channel(t["mean"].double())) * _channel((t["var"].double() + 1e-5).rsqrt())
    _assert_sums_close(sum_dy, ref_dy, dy.abs().sum((0, 2, 3)), acc, "sum_dy")
    _assert_sums_close(sum_dy_xhat, ref_dy_xhat, (dy * x_hat).abs().sum((0, 2, 3)), acc, "sum_dy_xhat")


@pytest.mark.parametrize("shape,dtype,layout", CPU_CASES, ids=lambda v: str(v) if not isinstance(v, tuple) else "x".join(map(str, v)))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu,need_grad_residual", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("affine", [True, False])
def test_backward_apply_default_matches_float64(shape, dtype, layout, training, relu, need_grad_residual, affine):
    t = _stage_inputs(shape, dtype, layout)
    out = t["out"] if relu else None
    w = t["weight"] if affine else None
    sum_dy, sum_dy_xhat = _reduce64(t["grad_out"], t["x"], t["mean"], t["var"], out, 1e-5, relu)
    sum_dy, sum_dy_xhat = sum_dy.to(_acc(dtype)), sum_dy_xhat.to(_acc(dtype))
    grad_input, grad_residual = BACKWARD_APPLY(t["grad_out"], t["x"], w, t["mean"], t["var"], out, sum_dy,
                                               sum_dy_xhat, training, 1e-5, relu, need_grad_residual)
    ref_input, ref_residual = _backward_apply64(t["grad_out"], t["x"], w, t["mean"], t["var"], out, sum_dy,
                                                sum_dy_xhat, training, 1e-5, relu)
    fmt = _expected_format(t["x"])
    assert grad_input.dtype == dtype and grad_input.is_contiguous(memory_format=fmt)
    _assert_rounding_close(grad_input, ref_input, dtype, "grad_input")
    if need_grad_residual:
        assert grad_residual.dtype == t["grad_out"].dtype and grad_residual.is_contiguous(memory_format=fmt)
        assert torch.equal(grad_residual.double(), ref_residual)  # a masked copy: exact
    else:
        assert grad_residual.numel() == 0


def test_stage_ops_take_per_channel_tensors_of_any_float_dtype():
    """Mixed precision: float16 activations with float32, float16 or float64 parameters."""
    for param_dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = _stage_inputs((3, 4, 5, 5), torch.float16, "channels_last", param_dtype=param_dtype)
        out = APPLY(t["x"], t["mean"], t["var"], t["weight"], t["bias"], t["residual"], 1e-5, True)
        ref = _apply64(t["x"], t["mean"].float(), t["var"].float(), t["weight"].float(), t["bias"].float(),
                       t["residual"], 1e-5, True)
        _assert_rounding_close(out, ref, torch.float16, f"out with {param_dtype} parameters")
        sum_dy, sum_dy_xhat = REDUCE(t["grad_out"], t["x"], t["mean"], t["var"], t["out"], 1e-5, True)
        assert sum_dy.dtype == torch.float32 and sum_dy_xhat.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_stage_ops_take_strided_per_channel_tensors(device, layout, training):
    """mean, var, weight, bias, sum_dy and sum_dy_xhat as stride-2 views with NaN between their
    elements: every stage operator gives exactly the results of contiguous copies."""
    t = _stage_inputs((3, 5, 4, 6), torch.float16, layout, device=device, param_dtype=torch.float32)
    per_channel = ("mean", "var", "weight", "bias")
    strided = {name: strided_per_channel(t[name]) for name in per_channel}

    def stages_of(v):
        out = APPLY(t["x"], v["mean"], v["var"], v["weight"], v["bias"], t["residual"], 1e-5, True)
        sums = REDUCE(t["grad_out"], t["x"], v["mean"], v["var"], out, 1e-5, True)
        sums_arg = sums if v is t else tuple(map(strided_per_channel, sums))
        grads = BACKWARD_APPLY(t["grad_out"], t["x"], v["weight"], v["mean"], v["var"], out, *sums_arg,
                               training, 1e-5, True, True)
        return (out, *sums, *grads)

    names = ("out", "sum_dy", "sum_dy_xhat", "grad_input", "grad_residual")
    for name, ours, expected in zip(names, stages_of({**t, **strided}), stages_of(t)):
        assert torch.equal(ours, expected), f"{name} differs with strided per-channel tensors"


def test_stage_ops_name_the_bad_argument():
    t = _stage_inputs((2, 4, 3, 3), torch.float32, "nchw")
    with pytest.raises(ValueError, match="mean"):
        APPLY(t["x"], t["mean"][:3], t["var"], None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="residual"):
        APPLY(t["x"], t["mean"], t["var"], None, None, t["residual"][:1], 1e-5, False)
    with pytest.raises(ValueError, match="input"):
        APPLY(t["x"][0], t["mean"], t["var"], None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="out"):
        REDUCE(t["grad_out"], t["x"], t["mean"], t["var"], None, 1e-5, True)
    with pytest.raises(ValueError, match="sum_dy"):
        BACKWARD_APPLY(t["grad_out"], t["x"], None, t["mean"], t["var"], None, t["mean"][:2], t["var"],
                       True, 1e-5, False, False)
    with pytest.raises(TypeError, match="grad_out"):
        REDUCE(t["grad_out"].int(), t["x"], t["mean"], t["var"], None, 1e-5, False)


def _opcheck_stage_ops(shape, dtype, layout, device, *, relu, residual, training, need_grad_residual, affine):
    t = _stage_inputs(shape, dtype, layout, device=device)
    w, b = (t["weight"], t["bias"]) if affine else (None, None)
    out = t["out"] if relu else None
    torch.library.opcheck(APPLY, (t["x"], t["mean"], t["var"], w, b, t["residual"] if residual else None,
                                  1e-5, relu))
    torch.library.opcheck(REDUCE, (t["grad_out"], t["x"], t["mean"], t["var"], out, 1e-5, relu))
    sums = REDUCE(t["grad_out"], t["x"], t["mean"], t["var"], out, 1e-5, relu)
    torch.library.opcheck(BACKWARD_APPLY, (t["grad_out"], t["x"], w, t["mean"], t["var"], out, *sums, training,
                                           1e-5, relu, need_grad_residual))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("relu,residual,training,need_grad_residual,affine",
                         [(True, True, True, True, True), (False, False, False, False, False),
                          (True, False, False, True, True), (False, True, True, False, False)])
def test_cpu_opcheck(dtype, layout, relu, residual, training, need_grad_residual, affine):
    _opcheck_stage_ops((3, 4, 5, 6), dtype, layout, "cpu", relu=relu, residual=residual, training=training,
                       need_grad_residual=need_grad_residual, affine=affine)


# ---------------------------------------------------------------------------------------
# CPU: registration of the CUDA kernels.


def _need_extension():
    error = extension_load_error()
    if error is not None:
        if EXPECT_EXT:
            pytest.fail(f"RESNET_FAST_EXPECT_CUDA_EXT=1 but {error}")
        pytest.skip(error)


@pytest.mark.parametrize("op", STAGE_OPS + ("batch_norm_stats",))
def test_extension_registers_cuda_kernel(op):
    _need_extension()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast::{op}", "CUDA"), (
        f"resnet_fast._C has no CUDA kernel for resnet_fast::{op} (rebuild the extension)")


def test_stage_schemas():
    names = {op: [a.name for a in getattr(torch.ops.resnet_fast, op).default._schema.arguments] for op in STAGE_OPS}
    assert names["batch_norm_act_apply"] == ["input", "mean", "var", "weight", "bias", "residual", "eps", "relu"]
    assert names["batch_norm_act_backward_reduce"] == ["grad_out", "input", "mean", "var", "out", "eps", "relu"]
    assert names["batch_norm_act_backward_apply"] == [
        "grad_out", "input", "weight", "mean", "var", "out", "sum_dy", "sum_dy_xhat", "training", "eps", "relu",
        "need_grad_residual"]
    returns = [r.name for r in REDUCE._schema.returns]
    assert returns == ["sum_dy", "sum_dy_xhat"]


def test_explicit_cuda_backend_trains_with_running_statistics(monkeypatch):
    """set_backend("cuda") runs the running-statistics update too (it used to refuse it)."""
    monkeypatch.setattr(BACKENDS["cuda"], "availability", lambda: [])
    monkeypatch.setattr(BACKENDS["cuda"], "device_check", lambda x: [])
    previous = get_backend()
    set_backend("cuda")
    try:
        running_mean, running_var = torch.zeros(3), torch.ones(3)
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64).float()  # float32: the running statistics' dtype
        resnet_fast.ops.batch_norm_act(x, None, None, running_mean, running_var, momentum=0.5)
    finally:
        set_backend(previous)
    torch.testing.assert_close(running_mean, 0.5 * x.double().mean(dim=(0, 2, 3)).float())


def test_cuda_backend_implements_the_batch_norm_family():
    for op in BACKEND_OPS:
        assert BACKENDS["cuda"].kernels[op] is getattr(stages, op)
    # the torch function serves the running-statistics update (a C-element op)
    assert BACKENDS["cuda"].kernels["update_running_stats"] is BACKENDS["torch"].kernels["update_running_stats"]
    if not torch.cuda.is_available():
        reasons = BACKENDS["cuda"].not_supported_reasons("batch_norm_act", torch.ones(2, 3, 1, 1))
        assert any("not on a CUDA device" in r for r in reasons)


# ---------------------------------------------------------------------------------------
# CPU: the cuda backend's composition equals the torch backend.

COMPOSE_CASES = [((4, 6, 5, 7), d, lay) for d in DTYPES for lay in LAYOUTS] + [((3, 5, 1, 1), torch.float32, "nchw")]


def _assert_same(ours, ref, name):
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, f"{name}: {ours.dtype}{tuple(ours.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    if ours.dim() == 4:
        assert ours.is_contiguous(memory_format=_expected_format(ref)) == ref.is_contiguous(
            memory_format=_expected_format(ref)), f"{name}: memory format"
    assert torch.equal(ours, ref), f"{name}: max difference {(ours.double() - ref.double()).abs().max().item():.3g}"


@pytest.mark.parametrize("shape,dtype,layout", COMPOSE_CASES, ids=lambda v: str(v) if not isinstance(v, tuple) else "x".join(map(str, v)))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("affine", [True, False])
def test_cuda_backend_composition_equals_torch_backend(shape, dtype, layout, training, residual, relu, affine):
    t = _stage_inputs(shape, dtype, layout, param_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    w, b = (t["weight"], t["bias"]) if affine else (None, None)
    r = t["residual"] if residual else None
    rv = t["var"]
    args = (t["x"], w, b, r, t["mean"], rv, training, 1e-5, relu)
    ours = BACKENDS["cuda"].kernels["batch_norm_act"](*args)
    ref = BACKENDS["torch"].kernels["batch_norm_act"](*args)
    for name, a, e in zip(("out", "mean", "var"), ours, ref):
        _assert_same(a, e, name)
    out, mean, var = ref
    for need_grad_residual in (True, False):
        bargs = (t["grad_out"], t["x"], w, mean, var, out if relu else None, training, 1e-5, relu, need_grad_residual)
        ours = BACKENDS["cuda"].kernels["batch_norm_act_backward"](*bargs)
        ref = BACKENDS["torch"].kernels["batch_norm_act_backward"](*bargs)
        for name, a, e in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), ours, ref):
            _assert_same(a, e, name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cuda_backend_conv_composition_equals_torch_backend(layout, training, dtype):
    g = torch.Generator().manual_seed(4)
    x = random_input((2, 4, 9, 9), dtype, layout == "channels_last", generator=g)
    conv_w = random_input((6, 4, 3, 3), dtype, False, generator=g)
    conv_b = torch.randn(6, generator=g).to(dtype)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    bw, bb = torch.rand(6, generator=g).to(pd) + 0.5, torch.randn(6, generator=g).to(pd)
    rm, rv = torch.randn(6, generator=g).to(pd), torch.rand(6, generator=g).to(pd) + 0.5
    res = random_input((2, 6, 5, 5), dtype, layout == "channels_last", generator=g)
    args = (x, conv_w, conv_b, [2, 2], [1, 1], [1, 1], 1, bw, bb, res, rm, rv, training, 1e-5, True)
    ours = BACKENDS["cuda"].kernels["conv_bn_act"](*args)
    ref = BACKENDS["torch"].kernels["conv_bn_act"](*args)
    for name, a, e in zip(("out", "conv_out", "mean", "var"), ours, ref):
        _assert_same(a, e, name)


@pytest.fixture
def cuda_backend_on_cpu(monkeypatch):
    """Route the torch backend's batch-norm-family calls to the cuda backend's functions,
    so CPU tensors run the cuda backend's composition inside the operators' autograd."""
    for op in BACKEND_OPS:
        monkeypatch.setitem(BACKENDS["torch"].kernels, op, BACKENDS["cuda"].kernels[op])
    previous = get_backend()
    set_backend("torch")
    yield
    set_backend(previous)


def _bn_pair(channels, dtype_params, relu, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    bn = bn.to(dtype_params)
    ours = BatchNormAct2d(channels, relu=relu).to(dtype_params)
    ours.load_state_dict(bn.state_dict())
    return bn, ours


def _run(fn, params, x, residual, seed=7):
    x = x.detach().requires_grad_()
    residual = None if residual is None else residual.detach().requires_grad_()
    out = fn(x, residual)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(grad.to(device=out.device, dtype=out.dtype))
    grads = {"input": x.grad, "residual": None if residual is None else residual.grad}
    grads.update({name: p.grad for name, p in params})
    return out, grads


def _torch_bn_act(bn, relu, mask_of=None):
    def fn(a, r):
        y = bn(a)
        y = y if r is None else y + r
        if not relu:
            return y
        return torch.relu(y) if mask_of is None else relu_with_mask_of(y, mask_of)
    return fn


def _check_module(shape, dtype, layout, residual, relu, training, device, seed=0):
    """BatchNormAct2d (whatever backend is selected) against float64 nn.BatchNorm2d."""
    g = torch.Generator().manual_seed(seed)
    channels_last = layout == "channels_last"
    x = random_input(shape, dtype, channels_last, scale=2.0, shift=0.5, generator=g, device=device)
    res = random_input(shape, dtype, channels_last, generator=g, device=device) if residual else None
    params_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bn64, _ = _bn_pair(shape[1], torch.float64, relu)
    bn_same, ours = _bn_pair(shape[1], params_dtype, relu)
    for m in (bn64, bn_same, ours):
        m.train(training).to(device)
    out, grads = _run(lambda a, r: ours(a, r), ours.named_parameters(), x, res)
    same_out, same_grads = _run(_torch_bn_act(bn_same, relu), bn_same.named_parameters(), x, res)
    ref_out, ref_grads = _run(_torch_bn_act(bn64, relu, mask_of=out), bn64.named_parameters(), x.double(),
                              None if res is None else res.double())
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=_expected_format(x))
    assert_close_to_reference(out, ref_out, same_out, "output")
    for name, ref in ref_grads.items():
        if ref is not None:
            assert_close_to_reference(grads[name], ref, same_grads[name], f"grad {name}")
    if training:
        for name in ("running_mean", "running_var"):
            assert_close_to_reference(getattr(ours, name), getattr(bn64, name), getattr(bn_same, name), name)
        assert ours.num_batches_tracked.item() == bn64.num_batches_tracked.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("training", [True, False])
def test_cuda_backend_composition_inside_autograd_on_cpu(cuda_backend_on_cpu, dtype, layout, residual, relu, training):
    _check_module((4, 6, 5, 7), dtype, layout, residual, relu, training, "cpu")


def test_cuda_backend_conv_composition_inside_autograd_on_cpu(cuda_backend_on_cpu):
    torch.manual_seed(0)
    ours = ConvBNAct2d(4, 6, 3, stride=2, padding=1, relu=True).double()
    ref_conv, ref_bn = copy.deepcopy(ours.conv), nn.BatchNorm2d(6).double()
    ref_bn.load_state_dict(ours.bn.state_dict())
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    res = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    out, grads = _run(lambda a, r: ours(a, r), ours.named_parameters(), x, res)
    ref_params = [(f"conv.{n}", p) for n, p in ref_conv.named_parameters()] + \
                 [(f"bn.{n}", p) for n, p in ref_bn.named_parameters()]
    ref_out, ref_grads = _run(lambda a, r: torch.relu(ref_bn(ref_conv(a)) + r), ref_params, x, res)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-10, atol=1e-10, msg=name)
    torch.testing.assert_close(ours.bn.running_var, ref_bn.running_var, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# GPU: the CUDA kernels through the cuda backend.


@pytest.fixture
def cuda_backend():
    """Skip without a GPU; without the extension skip, or fail when it is expected."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _need_extension()
    for op in STAGE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast::{op}", "CUDA"), op
    previous = get_backend()
    set_backend("cuda")
    yield
    set_backend(previous)


GPU_SHAPES = [
    (4, 3, 9, 11),       # C = 3: scalar loads, an odd plane
    (2, 1000, 3, 3),     # C = 1000: 125 groups of 8 (fp16), not a power of two
    (8, 64, 1, 1),       # H*W = 1: NCHW and channels_last are the same bytes
    (5, 7, 7, 7),        # 7x7 planes, odd C
    (1, 16, 33, 35),     # N = 1, odd plane
    (3, 1, 17, 19),      # C = 1
    (16, 256, 7, 7),     # wide C, small planes
    (32, 8, 56, 56),     # narrow C, many rows: the reduction splits rows and merges
    (2, 4, 80, 80),      # large planes: NCHW walks along H*W and splits the plane
]
GPU_CASES = [(s, d, lay) for s in GPU_SHAPES for d in (torch.float32, torch.float16, torch.bfloat16)
             for lay in LAYOUTS if not (s[2] * s[3] == 1 and lay == "channels_last")]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype,layout", GPU_CASES, ids=lambda v: str(v) if not isinstance(v, tuple) else "x".join(map(str, v)))
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False), (False, False)])
@pytest.mark.parametrize("training", [True, False])
def test_module_matches_float64_reference(cuda_backend, shape, dtype, layout, residual, relu, training):
    _check_module(shape, dtype, layout, residual, relu, training, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_module_float64(cuda_backend, layout, training):
    _check_module((6, 10, 9, 9), torch.float64, layout, True, True, training, "cuda")


def _conv_pair(dtype, relu, training, device):
    """Stock nn.Conv2d + nn.BatchNorm2d and a ConvBNAct2d with the same state; the
    convolution in ``dtype``, BatchNorm parameters in float32 (float64 for float64)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    ours = ConvBNAct2d(8, 16, 3, stride=2, padding=1, relu=relu)
    ours.conv.load_state_dict(conv.state_dict())
    ours.bn.load_state_dict(bn.state_dict())
    params = torch.float64 if dtype == torch.float64 else torch.float32
    ours.conv.to(dtype)
    ours.bn.to(params)
    return conv.to(dtype).to(device).train(training), bn.to(params).to(device).train(training), \
        ours.to(device).train(training)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, False)])
def test_conv_module_matches_float64_reference(cuda_backend, dtype, layout, training, residual, relu):
    channels_last = layout == "channels_last"
    conv64, bn64, _ = _conv_pair(torch.float64, relu, training, "cuda")
    conv_same, bn_same, ours = _conv_pair(dtype, relu, training, "cuda")
    g = torch.Generator().manual_seed(1)
    x = random_input((4, 8, 15, 15), dtype, channels_last, generator=g, device="cuda")
    res = random_input((4, 16, 8, 8), dtype, channels_last, generator=g, device="cuda") if residual else None


    out, grads = _run(lambda a, r: ours(a, r), ours.named_parameters(), x, res)
    same_out, same_grads = _run(stock_conv_bn_act(conv_same, bn_same, relu), conv_bn_parameters(conv_same, bn_same), x, res)
    ref_out, ref_grads = _run(stock_conv_bn_act(conv64, bn64, relu, mask_of=out), conv_bn_parameters(conv64, bn64), x.double(),
                              None if res is None else res.double())
    assert out.dtype == dtype
    assert_close_to_reference(out, ref_out, same_out, "output")
    for name, ref in ref_grads.items():
        if ref is not None:
            assert_close_to_reference(grads[name], ref, same_grads[name], f"grad {name}")
    assert_close_to_reference(ours.bn.running_var, bn64.running_var, bn_same.running_var, "running_var")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (16, 8, 24, 24), (4, 10, 1, 1), (3, 12, 14, 14)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_stage_ops_match_default_implementation(cuda_backend, dtype, layout, shape):
    """Each CUDA stage kernel against the float64 math, as the CPU defaults are tested."""
    t = _stage_inputs(shape, dtype, layout, device="cuda")
    for relu, residual in ((True, True), (False, False), (True, False)):
        r = t["residual"] if residual else None
        out = APPLY(t["x"], t["mean"], t["var"], t["weight"], t["bias"], r, 1e-5, relu)
        assert out.is_contiguous(memory_format=_expected_format(t["x"]))
        _assert_rounding_close(out, _apply64(t["x"], t["mean"], t["var"], t["weight"], t["bias"], r, 1e-5, relu),
                               dtype, "out")
        o = t["out"] if relu else None
        sum_dy, sum_dy_xhat = REDUCE(t["grad_out"], t["x"], t["mean"], t["var"], o, 1e-5, relu)
        ref_dy, ref_dy_xhat = _reduce64(t["grad_out"], t["x"], t["mean"], t["var"], o, 1e-5, relu)
        dy = _masked_dy64(t["grad_out"], o, relu)
        x_hat = (t["x"].double() - _channel(t["mean"].double())) * _channel((t["var"].double() + 1e-5).rsqrt())
        _assert_sums_close(sum_dy, ref_dy, dy.abs().sum((0, 2, 3)), _acc(dtype), "sum_dy")
        _assert_sums_close(sum_dy_xhat, ref_dy_xhat, (dy * x_hat).abs().sum((0, 2, 3)), _acc(dtype), "sum_dy_xhat")
        for training in (True, False):
            gi, gr = BACKWARD_APPLY(t["grad_out"], t["x"], t["weight"], t["mean"], t["var"], o, sum_dy, sum_dy_xhat,
                                    training, 1e-5, relu, True)
            ref_gi, ref_gr = _backward_apply64(t["grad_out"], t["x"], t["weight"], t["mean"], t["var"], o, sum_dy,
                                               sum_dy_xhat, training, 1e-5, relu)
            _assert_rounding_close(gi, ref_gi, dtype, "grad_input")
            assert torch.equal(gr.double(), ref_gr)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout,shape,width", [
    ("nchw", (3, 8, 14, 14), 4),            # H*W = 196: 8-byte loads instead of 2-byte ones
    ("channels_last", (3, 12, 5, 5), 4),    # C = 12
    ("nchw", (3, 8, 16, 16), 8),
    ("nchw", (3, 8, 7, 7), 1),
])
def test_stage_kernels_load_width(cuda_backend, dtype, layout, shape, width):
    """Each stage kernel takes the widest loads the extent allows, and stays exact there."""
    t = _stage_inputs(shape, dtype, layout, device="cuda")
    kind = "nchw" if layout == "nchw" else "nhwc"
    element = "c10::Half" if dtype == torch.float16 else "c10::BFloat16"
    o = t["out"]
    results = {}
    names = cuda_kernel_names(lambda: results.update(
        out=APPLY(t["x"], t["mean"], t["var"], t["weight"], t["bias"], t["residual"], 1e-5, True),
        sums=REDUCE(t["grad_out"], t["x"], t["mean"], t["var"], o, 1e-5, True)))
    names += cuda_kernel_names(lambda: results.update(
        grads=BACKWARD_APPLY(t["grad_out"], t["x"], t["weight"], t["mean"], t["var"], o, *results["sums"], True,
                             1e-5, True, True)))
    for kernel in ("apply", "reduce", "backward"):
        expected = f"{kernel}_{kind}_kernel<{element}, {element}, {width}>"
        assert any(expected in name for name in names), (expected, names)
    _assert_rounding_close(results["out"], _apply64(t["x"], t["mean"], t["var"], t["weight"], t["bias"],
                                                    t["residual"], 1e-5, True), dtype, "out")
    ref_gi, ref_gr = _backward_apply64(t["grad_out"], t["x"], t["weight"], t["mean"], t["var"], o,
                                       *results["sums"], True, 1e-5, True)
    _assert_rounding_close(results["grads"][0], ref_gi, dtype, "grad_input")
    assert torch.equal(results["grads"][1].double(), ref_gr)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_misaligned_storage(cuda_backend, dtype, layout):
    """Storage offsets that break 16-byte alignment (input, residual, grad) take the
    scalar kernels; results still match."""
    shape = (4, 16, 8, 8)
    numel = 4 * 16 * 8 * 8

    def view(flat):
        if layout == "nchw":
            return flat[1:1 + numel].view(shape)
        return flat[1:1 + numel].view(4, 8, 8, 16).permute(0, 3, 1, 2)

    g = torch.Generator().manual_seed(0)
    x = view(torch.randn(numel + 1, generator=g).to("cuda", dtype))
    res = view(torch.randn(numel + 1, generator=g).to("cuda", dtype))
    assert x.data_ptr() % 16 != 0 and res.data_ptr() % 16 != 0
    for residual in (res, None):
        t = _stage_inputs(shape, dtype, layout, device="cuda")
        out = APPLY(x, t["mean"], t["var"], t["weight"], t["bias"], residual, 1e-5, True)
        _assert_rounding_close(out, _apply64(x, t["mean"], t["var"], t["weight"], t["bias"], residual, 1e-5, True),
                               dtype, "out")
        sums = REDUCE(res, x, t["mean"], t["var"], out, 1e-5, True)
        ref = _reduce64(res, x, t["mean"], t["var"], out, 1e-5, True)
        for a, e in zip(sums, ref):
            torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-3)
        gi, gr = BACKWARD_APPLY(res, x, t["weight"], t["mean"], t["var"], out, *sums, True, 1e-5, True, True)
        ref_gi, ref_gr = _backward_apply64(res, x, t["weight"], t["mean"], t["var"], out, *sums, True, 1e-5, True)
        _assert_rounding_close(gi, ref_gi, dtype, "grad_input")
        assert torch.equal(gr.double(), ref_gr)
    # Only the residual misaligned, the input aligned.
    x_aligned = x.clone(memory_format=_expected_format(x))
    assert x_aligned.data_ptr() % 16 == 0
    t = _stage_inputs(shape, dtype, layout, device="cuda")
    out = APPLY(x_aligned, t["mean"], t["var"], None, None, res, 1e-5, False)
    _assert_rounding_close(out, _apply64(x_aligned, t["mean"], t["var"], None, None, res, 1e-5, False), dtype, "out")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_dtypes(cuda_backend, layout):
    """float16 activations with a float32 residual / float32 or bfloat16 gradients, and
    float16 parameters: the kernels read them without rounding them to float16."""
    t = _stage_inputs((4, 24, 6, 6), torch.float16, layout, device="cuda", param_dtype=torch.float16)
    for residual in (t["residual"].float(), t["residual"].to(torch.bfloat16), t["residual"].double()):
        out = APPLY(t["x"], t["mean"], t["var"], t["weight"], t["bias"], residual, 1e-5, True)
        _assert_rounding_close(out, _apply64(t["x"], t["mean"], t["var"], t["weight"], t["bias"], residual, 1e-5,
                                             True), torch.float16, "out")
    for grad_out in (t["grad_out"].float(), t["grad_out"].to(torch.bfloat16), t["grad_out"].double()):
        sums = REDUCE(grad_out, t["x"], t["mean"], t["var"], t["out"], 1e-5, True)
        ref = _reduce64(grad_out, t["x"], t["mean"], t["var"], t["out"], 1e-5, True)
        for a, e in zip(sums, ref):
            torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-3)
        gi, gr = BACKWARD_APPLY(grad_out, t["x"], t["weight"], t["mean"], t["var"], t["out"], *sums, True, 1e-5,
                                True, True)
        ref_gi, ref_gr = _backward_apply64(grad_out, t["x"], t["weight"], t["mean"], t["var"], t["out"], *sums,
                                           True, 1e-5, True)
        _assert_rounding_close(gi, ref_gi, torch.float16, "grad_input")
        assert gr.dtype == grad_out.dtype and torch.equal(gr.double(), ref_gr)
    # An `out` in another dtype: only its sign (out <= 0) matters.
    out32 = t["out"].float() * 1e-30  # tiny positives: zero in float16, still positive here
    sums = REDUCE(t["grad_out"], t["x"], t["mean"], t["var"], out32, 1e-5, True)
    ref = _reduce64(t["grad_out"], t["x"], t["mean"], t["var"], out32, 1e-5, True)
    for a, e in zip(sums, ref):
        torch.testing.assert_close(a.double(), e, rtol=1e-3, atol=1e-2)


@pytest.mark.gpu
def test_bad_input_names_the_argument(cuda_backend):
    t = _stage_inputs((2, 4, 3, 3), torch.float32, "nchw", device="cuda")
    with pytest.raises(RuntimeError, match="mean"):
        APPLY(t["x"], t["mean"][:3], t["var"], None, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="residual"):
        APPLY(t["x"], t["mean"], t["var"], None, None, t["residual"][:1], 1e-5, False)
    with pytest.raises(RuntimeError, match="weight"):
        APPLY(t["x"], t["mean"], t["var"], t["weight"].cpu(), None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="out"):
        REDUCE(t["grad_out"], t["x"], t["mean"], t["var"], None, 1e-5, True)
    with pytest.raises(RuntimeError, match="sum_dy"):
        BACKWARD_APPLY(t["grad_out"], t["x"], None, t["mean"], t["var"], None, t["mean"][:2], t["var"],
                       True, 1e-5, False, False)


@pytest.mark.gpu
def test_empty_tensors(cuda_backend):
    for shape in ((0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 3)):
        x = torch.randn(shape, device="cuda")
        c = shape[1]
        mean, var = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        assert APPLY(x, mean, var, None, None, None, 1e-5, True).shape == shape
        sum_dy, sum_dy_xhat = REDUCE(x, x, mean, var, x, 1e-5, True)
        assert sum_dy.shape == (c,) and (sum_dy == 0).all() and (sum_dy_xhat == 0).all()
        gi, gr = BACKWARD_APPLY(x, x, None, mean, var, x, sum_dy, sum_dy_xhat, True, 1e-5, True, True)
        assert gi.shape == shape and gr.shape == shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_opcheck(cuda_backend, dtype, layout):
    for shape in ((3, 4, 5, 6), (16, 8, 24, 24)):
        for relu, residual, training, need, affine in ((True, True, True, True, True),
                                                       (False, False, False, False, False)):
            _opcheck_stage_ops(shape, dtype, layout, "cuda", relu=relu, residual=residual, training=training,
                               need_grad_residual=need, affine=affine)


@pytest.mark.gpu
def test_runs_on_the_current_stream(cuda_backend):
    m = BatchNormAct2d(16, relu=True).cuda()
    x = torch.randn(32, 16, 20, 20, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    expected = copy.deepcopy(m)(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = m(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_step_captures_in_a_cuda_graph(cuda_backend, layout):
    """Forward and backward (stats, apply, reduce with its workspace, backward apply) with
    no host synchronisation: a captured step replays to the eager results."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    eager = BatchNormAct2d(16, relu=True).cuda()
    graphed = copy.deepcopy(eager)
    static_x = torch.randn(64, 16, 20, 20, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=memory_format)
    static_r = torch.randn_like(static_x)
    static_g = torch.randn_like(static_x)
    static_x.requires_grad_()
    static_r.requires_grad_()

    def step(m, x, r, g):
        out = m(x, r)
        out.backward(g)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph, as torch requires
        for _ in range(2):
            step(graphed, static_x, static_r, static_g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graphed.zero_grad(set_to_none=False)
    static_x.grad = static_r.grad = None
    with torch.cuda.graph(graph):
        static_out = step(graphed, static_x, static_r, static_g)
    eager.load_state_dict(graphed.state_dict())
    for i in range(3):
        with torch.no_grad():
            static_x.copy_(torch.randn_like(static_x) * (i + 1) + i)
            static_r.copy_(torch.randn_like(static_r))
            static_g.copy_(torch.randn_like(static_g))
            graphed.weight.grad.zero_()
            graphed.bias.grad.zero_()
        graph.replay()
        x = static_x.detach().clone().requires_grad_()
        r = static_r.detach().clone().requires_grad_()
        eager.zero_grad()
        expected = step(eager, x, r, static_g)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, expected)
        torch.testing.assert_close(static_x.grad, x.grad)
        torch.testing.assert_close(static_r.grad, r.grad)
        torch.testing.assert_close(graphed.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(graphed.bias.grad, eager.bias.grad, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(graphed.running_mean, eager.running_mean)
        torch.testing.assert_close(graphed.running_var, eager.running_var)


@pytest.mark.gpu
def test_torch_compile_traces_the_cuda_backend(cuda_backend):
    m = BatchNormAct2d(8, relu=True).cuda()
    x = torch.randn(4, 8, 6, 6, device="cuda").contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x, r)
    ref = copy.deepcopy(m)(x, r)
    torch.testing.assert_close(out, ref)


def _sliced_apply_check(x, out, mean, var, relu):
    """Compare out with float32 math slice by slice along H (the far end included)."""
    invstd = (var.float() + 1e-5).rsqrt()
    for h in list(range(0, 256, 128)) + [x.shape[2] - 128]:
        xs, os = x[:, :, h:h + 128].float(), out[:, :, h:h + 128].float()
        ref = torch.relu((xs - _channel(mean.float())) * _channel(invstd)) if relu else \
            (xs - _channel(mean.float())) * _channel(invstd)
        torch.testing.assert_close(os, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_over_2_31_elements(cuda_backend, layout):
    """64-bit indexing: 2^31 + 65536 float16 values per tensor, both layouts, all stages."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GiB")
    shape = (1, 2, 32768, 32769)
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, dtype=torch.float16, device="cuda", generator=generator)
    x[:, :, -100:] += 2.0  # the far end differs: an index that wraps would miss it
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    mean, var = torch.ops.resnet_fast.batch_norm_stats(x)
    out = APPLY(x, mean, var, None, None, None, 1e-5, True)
    _sliced_apply_check(x, out, mean, var, relu=True)
    grad = out  # a gradient that is nonzero exactly where the ReLU passes
    sum_dy, sum_dy_xhat = REDUCE(grad, x, mean, var, out, 1e-5, True)
    ref_dy = torch.zeros(2, dtype=torch.float64, device="cuda")
    ref_dy_xhat = torch.zeros(2, dtype=torch.float64, device="cuda")
    invstd = (var.double() + 1e-5).rsqrt()
    for h in range(0, shape[2], 2048):
        o = out[:, :, h:h + 2048].double()
        ref_dy += o.sum((0, 2, 3))
        ref_dy_xhat += (o * (x[:, :, h:h + 2048].double() - _channel(mean.double())) * _channel(invstd)).sum((0, 2, 3))
    torch.testing.assert_close(sum_dy.double(), ref_dy, rtol=1e-3, atol=0)
    torch.testing.assert_close(sum_dy_xhat.double(), ref_dy_xhat, rtol=1e-3, atol=0)
    del grad
    gi, _ = BACKWARD_APPLY(out, x, None, mean, var, out, sum_dy, sum_dy_xhat, False, 1e-5, True, False)
    # Eval-mode dx = invstd * dy' = invstd * out here.
    for h in (0, shape[2] - 128):
        torch.testing.assert_close(gi[:, :, h:h + 128].float(),
                                   out[:, :, h:h + 128].float() * _channel(invstd.float()), rtol=2e-3, atol=2e-3)
