"""``resnet_fast::conv2d_bias_act`` and ``resnet_fast::conv2d_stats`` (torch backend) against
float64 torch: outputs and every gradient, opcheck, gradcheck, bad input; the eval-mode
BatchNorm fold of ``ConvBNAct2d`` and the blocks, and its cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_close_to_reference, random_input, relu_with_mask_of
from torch import nn
from torchvision.models import resnet as tv_resnet

from resnet_fast.nn import BasicBlock, Bottleneck, ConvBNAct2d, enable_fused_training
from resnet_fast.nn import conv_bn_act as conv_bn_act_module
from resnet_fast.nn.conv_bn_act import _FOLD_CACHE
from resnet_fast.ops import reference
from resnet_fast.ops.conv2d_bias_act import conv2d_bias_act, conv2d_bias_act_op
from resnet_fast.ops.conv2d_stats import conv2d_stats, conv2d_stats_op

# The modules here run the fused operators (their torch reference composition), not the
# default native path (torchvision's own aten operators, tested in test_native_path.py).
pytestmark = pytest.mark.usefixtures("reference_backend")

# (C_in, C_out, kernel, stride, padding, H)
CONVS = {"stem7x7s2": (3, 8, 7, 2, 3, 9), "3x3s1": (6, 5, 3, 1, 1, 6), "3x3s2": (6, 8, 3, 2, 1, 7),
         "1x1s2": (8, 12, 1, 2, 0, 6)}


def _leaves(*tensors):
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


def _grads(output_terms, leaves):
    total = sum((o * g).sum() for o, g in output_terms)
    found = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(total, found))
    return [None if t is None else next(grads) for t in leaves]


def _inputs(conv, dtype, channels_last, seed=0):
    if not channels_last and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("test time: NCHW runs float32 and float64 (the layout is dtype-independent code)")
    cin, cout, k, s, p, h = CONVS[conv]
    g = torch.Generator().manual_seed(seed)
    x = random_input((2, cin, h, h), dtype, channels_last, generator=g)
    w = random_input((cout, cin, k, k), dtype, channels_last, scale=(cin * k * k) ** -0.5, generator=g)
    out_hw = (h + 2 * p - k) // s + 1
    return x, w, s, p, (2, cout, out_hw, out_hw), g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("bias,residual,relu", [(True, True, True), (False, False, False), (True, False, True)])
def test_conv2d_bias_act_matches_float64_reference(conv, channels_last, dtype, bias, residual, relu):
    x, w, s, p, out_shape, g = _inputs(conv, dtype, channels_last)
    b = torch.randn(out_shape[1], generator=g) if bias else None  # float32, as the BatchNorm fold gives
    r = random_input(out_shape, dtype, channels_last, generator=g) if residual else None
    if dtype == torch.float64 and b is not None:
        b = b.double()
    grad = random_input(out_shape, dtype, channels_last, generator=g)

    def run(x, w, b, r, ours, mask_of=None):
        leaves = _leaves(x, w, b, r)
        if ours:
            out = conv2d_bias_act(*leaves, stride=s, padding=p, relu=relu)
        else:
            y = F.conv2d(leaves[0], leaves[1], None if b is None else leaves[2].to(x.dtype), s, p)
            y = y if r is None else y + leaves[3]
            out = y if not relu else (torch.relu(y) if mask_of is None else relu_with_mask_of(y, mask_of))
        return out, _grads([(out, grad.to(out.dtype))], leaves)

    out, grads = run(x, w, b, r, True)
    same, same_grads = run(x, w, b, r, False)
    ref, ref_grads = run(*(None if t is None else t.double() for t in (x, w, b, r)), False, mask_of=out)
    assert out.dtype == dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert_close_to_reference(out, ref, same, "output")
    for name, ours, rg, sg in zip(("input", "weight", "bias", "residual"), grads, ref_grads, same_grads):
        if ours is not None:
            assert ours.dtype == {"bias": b, "residual": r}.get(name, x).dtype, name
            assert_close_to_reference(ours, rg, sg, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("prologue,prologue_relu", [(True, True), (True, False), (False, True)])
def test_conv2d_stats_matches_float64_reference(conv, channels_last, dtype, prologue, prologue_relu):
    """Outputs and the gradients of input, weight, scale and shift through out, mean and var."""
    x, w, s, p, out_shape, g = _inputs(conv, dtype, channels_last, seed=1)
    cin, cout = x.shape[1], out_shape[1]
    params = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(cin, generator=g) + 0.5).to(params) if prologue else None
    shift = torch.randn(cin, generator=g).to(params) if prologue else None
    go = random_input(out_shape, dtype, channels_last, generator=g)
    gm, gv = torch.randn(cout, generator=g), torch.randn(cout, generator=g)

    def run(x, w, scale, shift, ours):
        leaves = _leaves(x, w, scale, shift)
        if ours:
            out, mean, var = conv2d_stats(leaves[0], leaves[1], stride=s, padding=p, prologue_scale=leaves[2],
                                          prologue_shift=leaves[3], prologue_relu=prologue_relu)
        else:
            a = leaves[0]
            if scale is not None:
                a = a * leaves[2].view(1, -1, 1, 1).to(x.dtype) + leaves[3].view(1, -1, 1, 1).to(x.dtype)
                a = torch.relu(a) if prologue_relu else a
            out = F.conv2d(a, leaves[1], None, s, p)
            var, mean = torch.var_mean(out.to(params if x.dtype != torch.float64 else x.dtype), dim=(0, 2, 3),
                                       correction=0)
        terms = [(out, go.to(out.dtype)), (mean, gm.to(mean.dtype)), (var, gv.to(var.dtype))]
        return (out, mean, var), _grads(terms, leaves)

    outs, grads = run(x, w, scale, shift, True)
    same, same_grads = run(x, w, scale, shift, False)
    # (the prologue runs in float32 from the same inputs: its ReLU mask is float64's)
    ref, ref_grads = run(*(None if t is None else t.double() for t in (x, w, scale, shift)), False)
    assert outs[0].dtype == dtype and outs[1].dtype == outs[2].dtype == params
    for name, ours, r, sm in zip(("output", "mean", "var"), outs, ref, same):
        assert_close_to_reference(ours, r, sm, name)
    for name, ours, rg, sg in zip(("input", "weight", "scale", "shift"), grads, ref_grads, same_grads):
        if ours is None:
            continue
        if name in ("scale", "shift"):
            # float32 sums of float16/bfloat16 gradients: scored with the activation dtype's floor
            assert ours.dtype == params
            ours, sg = ours.to(dtype), sg.to(dtype)
        assert_close_to_reference(ours, rg, sg, f"grad {name}")


def _op_args(seed=0, prologue=True, batch=2, cin=4, cout=5, size=6):
    """float64 arguments of a 3x3 convolution; the residual fits stride 2, padding 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, size, size, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(cout, cin, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(cout, dtype=torch.float64, generator=g).requires_grad_()
    out_size = (size - 1) // 2 + 1
    r = torch.randn(batch, cout, out_size, out_size, dtype=torch.float64, generator=g).requires_grad_()
    scale = (torch.rand(cin, dtype=torch.float64, generator=g) + 0.5).requires_grad_() if prologue else None
    shift = torch.randn(cin, dtype=torch.float64, generator=g).requires_grad_() if prologue else None
    return x, w, b, r, scale, shift


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_conv2d_bias_act(relu, channels_last):
    x, w, b, r, _, _ = _op_args()
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(conv2d_bias_act_op, (x, w, b, r, [2, 2], [1, 1], [1, 1], relu))
    torch.library.opcheck(conv2d_bias_act_op, (x, w, None, None, [1, 1], [0, 0], [1, 1], relu))


@pytest.mark.parametrize("prologue", [True, False])
@pytest.mark.parametrize("prologue_relu", [True, False])
def test_opcheck_conv2d_stats(prologue, prologue_relu):
    x, w, _, _, scale, shift = _op_args(prologue=prologue)
    torch.library.opcheck(conv2d_stats_op, (x, w, [2, 2], [1, 1], [1, 1], scale, shift, prologue_relu))


def test_gradcheck():
    x, w, b, r, scale, shift = _op_args(seed=3, batch=1, cin=3, cout=2, size=4)
    assert torch.autograd.gradcheck(
        lambda *a: conv2d_bias_act_op(*a, [2, 2], [1, 1], [1, 1], True), (x, w, b, r))
    # shift keeps pre-activations away from the ReLU kink for finite differences
    assert torch.autograd.gradcheck(
        lambda x, w, sc, sh: conv2d_stats_op(x, w, [1, 1], [1, 1], [1, 1], sc, sh, True), (x, w, scale, shift))


@pytest.mark.parametrize("used", ["out", "mean", "var", "out+mean", "mean+var", "out+var"])
def test_conv2d_stats_gradients_when_only_some_outputs_are_used(used):
    """Backward with some of (out, mean, var) unused (their gradients None) equals float64
    autograd through the reference math."""
    x, w, _, _, scale, shift = _op_args(seed=5)
    outputs = conv2d_stats_op(x, w, [1, 1], [1, 1], [1, 1], scale, shift, True)
    leaves = (x, w, scale, shift)
    ours = torch.autograd.grad(sum(outputs[i].sum() * (i + 1) for i in _used(used)), leaves)
    expected_outputs = reference.conv2d_stats(x, w, [1, 1], [1, 1], [1, 1], scale, shift, True)
    expected = torch.autograd.grad(sum(expected_outputs[i].sum() * (i + 1) for i in _used(used)), leaves)
    for name, a, e in zip(("input", "weight", "scale", "shift"), ours, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


def _used(names: str) -> list[int]:
    return [("out", "mean", "var").index(n) for n in names.split("+")]


def _strided_leaf(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, view): a leaf twice as long whose every other element is ``t``; the view has stride 2."""
    leaf = torch.zeros(2 * t.shape[0], dtype=t.dtype)
    with torch.no_grad():
        leaf[::2] = t
    leaf.requires_grad_()
    return leaf, leaf[::2]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_non_contiguous_per_channel_vectors(backend):
    """A strided bias, prologue scale or shift is accepted and gives the contiguous copy's
    outputs and gradients (the gradient lands in every other element of the leaf)."""
    import resnet_fast

    before = resnet_fast.get_backend()
    resnet_fast.set_backend(backend)
    try:
        x, w, b, r, scale, shift = _op_args(seed=7, prologue=True)
        b_leaf, b_view = _strided_leaf(b.detach())
        assert not b_view.is_contiguous()
        out = conv2d_bias_act(x, w, b_view, r, stride=2, padding=1, relu=True)
        expected = conv2d_bias_act(x, w, b, r, stride=2, padding=1, relu=True)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        (grad_b,) = torch.autograd.grad(out.sum(), b_leaf)
        (expected_b,) = torch.autograd.grad(expected.sum(), b)
        torch.testing.assert_close(grad_b[::2], expected_b, rtol=0, atol=0)
        assert not grad_b[1::2].any()

        (sc_leaf, sc_view), (sh_leaf, sh_view) = _strided_leaf(scale.detach()), _strided_leaf(shift.detach())
        outs = conv2d_stats(x, w, padding=1, prologue_scale=sc_view, prologue_shift=sh_view)
        expected = conv2d_stats(x, w, padding=1, prologue_scale=scale, prologue_shift=shift)
        for name, o, e in zip(("output", "mean", "var"), outs, expected):
            torch.testing.assert_close(o, e, rtol=0, atol=0, msg=name)
        grads = torch.autograd.grad(sum(o.sum() for o in outs), (sc_leaf, sh_leaf))
        expected_grads = torch.autograd.grad(sum(e.sum() for e in expected), (scale, shift))
        for name, g, e in zip(("scale", "shift"), grads, expected_grads):
            torch.testing.assert_close(g[::2], e, rtol=0, atol=0, msg=name)
    finally:
        resnet_fast.set_backend(before)


@pytest.mark.parametrize("call,match", [
    (lambda x, w: conv2d_bias_act(x, w, torch.zeros(4)), r"bias must have shape \(5,\)"),
    (lambda x, w: conv2d_bias_act(x, w, residual=torch.zeros(2, 5, 5, 5)), "residual must have the convolution"),
    (lambda x, w: conv2d_bias_act(x, w.half()), "input is torch.float32 but weight is torch.float16"),
    (lambda x, w: conv2d_bias_act(x, w[:, :3]), "input has 4 channels but weight expects 3"),
    (lambda x, w: conv2d_stats(x, w, prologue_scale=torch.ones(4)), "prologue_scale and prologue_shift"),
    (lambda x, w: conv2d_stats(x, w, prologue_scale=torch.ones(3), prologue_shift=torch.ones(3)),
     r"prologue_scale must have shape \(4,\)"),
    (lambda x, w: conv2d_stats(x[:1, :, :3, :3], w), "more than 1 value per channel"),
])
def test_bad_input_names_the_argument(call, match):
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(5, 4, 3, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, w)


# ----------------------------------------------------------------------------- inference folding
def _randomise_batch_norm(bn: nn.BatchNorm2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)


def _layer_pair(conv_bias: bool, affine: bool, relu: bool, seed: int = 0):
    """(ConvBNAct2d in eval, the same weights as float64 Conv2d -> BatchNorm2d in eval)."""
    torch.manual_seed(seed)
    ours = ConvBNAct2d(6, 8, 3, stride=2, padding=1, bias=conv_bias, affine=affine, relu=relu)
    _randomise_batch_norm(ours.bn, seed)
    conv = nn.Conv2d(6, 8, 3, 2, 1, bias=conv_bias).double()
    bn = nn.BatchNorm2d(8, affine=affine).double()
    conv.load_state_dict(ours.conv.state_dict())
    bn.load_state_dict(ours.bn.state_dict())
    return ours.eval(), conv.eval(), bn.eval()


def _unfused(conv, bn, x, residual, relu):
    y = bn(conv(x))
    y = y if residual is None else y + residual
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("conv_bias,affine", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, False)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eval_fold_equals_unfused_float64_reference(dtype, conv_bias, affine, residual, relu, channels_last):
    """Eval ConvBNAct2d = one conv2d_bias_act call with the folded weight and bias."""
    ours, conv, bn = _layer_pair(conv_bias, affine, relu)
    same_conv, same_bn = copy.deepcopy(conv).to(dtype), copy.deepcopy(bn).to(dtype)
    ours.to(dtype)
    g = torch.Generator().manual_seed(1)
    x = random_input((2, 6, 7, 7), dtype, channels_last, generator=g)
    r = random_input((2, 8, 4, 4), dtype, channels_last, generator=g) if residual else None
    with torch.no_grad():
        out = ours(x, r)
        same = _unfused(same_conv, same_bn, x, r, relu)
        pre = _unfused(conv, bn, x.double(), None if r is None else r.double(), False)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close_to_reference(out, relu_with_mask_of(pre, out) if relu else pre, same, "output")


def test_eval_with_autograd_folds_differentiably():
    """Eval with grad enabled: gradients reach conv weight, BN weight and bias (no cache)."""
    ours, conv, bn = _layer_pair(True, True, True)
    ours.double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    ours(x).sum().backward()
    _unfused(conv, bn, x, None, True).sum().backward()
    for name, a, b in (("conv.weight", ours.conv.weight, conv.weight), ("conv.bias", ours.conv.bias, conv.bias),
                       ("bn.weight", ours.bn.weight, bn.weight), ("bn.bias", ours.bn.bias, bn.bias)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10, msg=name)
    assert ours.conv not in _FOLD_CACHE


def test_fold_cache_is_reused_and_invalidated():
    """Cached under no_grad; recomputed after an optimizer step, load_state_dict, a
    training-mode statistics update and .to(dtype); never in the state dict."""
    ours, conv, bn = _layer_pair(True, True, True)
    keys = set(ours.state_dict())
    x = torch.randn(2, 6, 7, 7)

    def check(dtype=torch.float32):
        with torch.no_grad():
            out = ours(x.to(dtype))
            ref = _unfused(conv, bn, x.double(), None, True)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        return _FOLD_CACHE[ours.conv]

    first = check()
    assert check() is first, "an unchanged layer must reuse its fold"

    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    for p in ours.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    conv.load_state_dict(ours.conv.state_dict())
    bn.load_state_dict(ours.bn.state_dict())
    after_step = check()
    assert after_step is not first

    other, _, _ = _layer_pair(True, True, True, seed=5)
    ours.load_state_dict(other.state_dict())
    conv.load_state_dict(other.conv.state_dict())
    bn.load_state_dict(other.bn.state_dict())
    assert check() is not after_step

    ours.train()
    with torch.no_grad():
        ours(torch.randn(4, 6, 7, 7) * 3 + 1)  # updates running_mean / running_var in place
    ours.eval()
    bn.load_state_dict(ours.bn.state_dict())
    check()

    ours.double()
    conv.double()
    check(torch.float64)
    assert set(ours.state_dict()) == keys


def test_eval_blocks_run_one_conv2d_bias_act_per_conv(monkeypatch):
    """Eval Bottleneck / BasicBlock (with downsample) equal torchvision's in float64, and no
    conv_bn_act call is made: every conv (the last with residual + ReLU) is one folded op."""
    monkeypatch.setattr(conv_bn_act_module, "conv_bn_act", None)  # calling it would fail
    calls = []
    original = conv_bn_act_module.conv2d_bias_act
    monkeypatch.setattr(conv_bn_act_module, "conv2d_bias_act",
                        lambda *a, **k: calls.append((a[3] is not None, k["relu"])) or original(*a, **k))
    for tv_cls, ours_cls, convs in ((tv_resnet.Bottleneck, Bottleneck, 3), (tv_resnet.BasicBlock, BasicBlock, 2)):
        torch.manual_seed(0)
        planes = 4
        downsample = nn.Sequential(nn.Conv2d(8, planes * tv_cls.expansion, 1, 2, bias=False),
                                   nn.BatchNorm2d(planes * tv_cls.expansion))
        tv_block = tv_cls(8, planes, stride=2, downsample=downsample).double()
        for i, bn in enumerate(m for m in tv_block.modules() if isinstance(m, nn.BatchNorm2d)):
            _randomise_batch_norm(bn, i)
        block = ours_cls.from_torchvision(copy.deepcopy(tv_block)).eval()
        tv_block.eval()
        x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
        calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(block(x), tv_block(x), rtol=1e-10, atol=1e-10)
        # downsample (no ReLU), the inner convs (ReLU), the last (residual + ReLU)
        assert calls == [(False, False)] + [(False, True)] * (convs - 1) + [(True, True)]


# ----------------------------------------------------------------------------- fused training (opt-in)
def _block_pair(tv_cls, ours_cls, stride: int, dtype=torch.float64, seed: int = 0):
    """(torchvision block, our block around a copy of its modules with fused_training on)."""
    torch.manual_seed(seed)
    inplanes, planes = 8, 8 // tv_cls.expansion
    downsample = None
    if stride != 1 or inplanes != planes * tv_cls.expansion:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * tv_cls.expansion, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * tv_cls.expansion))
    tv_block = tv_cls(inplanes, planes, stride=stride, downsample=downsample)
    for i, bn in enumerate(m for m in tv_block.modules() if isinstance(m, nn.BatchNorm2d)):
        _randomise_batch_norm(bn, i)
    tv_block.to(dtype).train()
    block = ours_cls.from_torchvision(copy.deepcopy(tv_block)).train()
    assert enable_fused_training(block) == 1
    return tv_block, block


def _train_step(block, x, grad):
    x = x.detach().requires_grad_()
    out = block(x)
    out.backward(grad)
    grads = {"input": x.grad, **{n: p.grad for n, p in block.named_parameters()}}
    return out, grads


@pytest.mark.parametrize("blocks", [(tv_resnet.Bottleneck, Bottleneck), (tv_resnet.BasicBlock, BasicBlock)],
                         ids=["bottleneck", "basic"])
@pytest.mark.parametrize("stride", [1, 2])
def test_fused_training_block_matches_torchvision_in_float64(blocks, stride, monkeypatch):
    """Output, every gradient (input, conv weights, BN weights and biases), running statistics
    and num_batches_tracked of two training steps, against torchvision's block in float64;
    the fused path is taken (conv_bn_act is never called)."""
    monkeypatch.setattr(conv_bn_act_module, "conv_bn_act", None)  # calling it would fail
    tv_block, block = _block_pair(*blocks, stride)
    assert (block.downsample is None) == (stride == 1)  # the identity shortcut is covered too
    g = torch.Generator().manual_seed(4)
    for step in range(2):
        x = torch.randn(3, 8, 6, 6, dtype=torch.float64, generator=g) * 2 + 0.5
        grad = torch.randn(3, 8, 6 // stride, 6 // stride, dtype=torch.float64, generator=g)
        block.zero_grad()
        tv_block.zero_grad()
        out, grads = _train_step(block, x, grad)
        ref_out, ref_grads = _train_step(tv_block, x, grad)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-9, msg=f"step {step}: grad {name}")
        for (name, buf), ref in zip(block.named_buffers(), tv_block.buffers()):
            torch.testing.assert_close(buf, ref, rtol=1e-12, atol=1e-12, msg=f"step {step}: {name}")


def test_fused_training_follows_measurements_by_default_and_is_not_in_the_state_dict():
    tv_block, block = _block_pair(tv_resnet.Bottleneck, Bottleneck, 2)
    assert Bottleneck.fused_training is None  # resnet_fast.nn.fused_training_defaults decides
    assert set(block.state_dict()) == set(tv_block.state_dict())
    assert enable_fused_training(block, False) == 1 and block.fused_training is False


def test_fold_made_in_inference_mode_is_not_reused_with_autograd():
    """Inference tensors cannot be saved for backward: grad mode gets its own fold."""
    ours, conv, bn = _layer_pair(False, True, True)
    ours.requires_grad_(False)
    x = torch.randn(2, 6, 7, 7)
    with torch.inference_mode():
        ours(x)
    xg = x.clone().requires_grad_()
    out = ours(xg)
    out.sum().backward()
    x64 = x.double().requires_grad_()
    _unfused(conv, bn, x64, None, True).sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
