"""``resnet_fast::scale_shift_act``: relu(x * scale + shift + residual) with its autograd.

Outputs and every gradient against float64 autograd of the same formula, on the CPU
(the stage operators' torch implementations) and, marked, on a GPU (their CUDA kernels).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_to_reference, random_input, relu_with_mask_of, strided_per_channel

from resnet_fast.ops.scale_shift_act import scale_shift_act, scale_shift_act_op


def _formula(x, scale, shift, residual, relu, mask_of=None):
    y = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    if not relu:
        return y
    return torch.relu(y) if mask_of is None else relu_with_mask_of(y, mask_of)


def _leaves(dtype, channels_last, device, residual_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 16, 5, 7)
    x = random_input(shape, dtype, channels_last, scale=2.0, shift=0.3, generator=g).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(16, generator=g, dtype=torch.float64) + 0.5).to(device, acc)
    shift = torch.randn(16, generator=g, dtype=torch.float64).to(device, acc)
    residual = None
    if residual_dtype is not None:
        residual = random_input(shape, residual_dtype, channels_last, generator=g).to(device)
    return [None if t is None else t.requires_grad_() for t in (x, scale, shift, residual)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("residual", ["none", "same", "float32"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_matches_float64_with_gradients(device, dtype, residual, relu, channels_last):
    if device == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this GPU")
    residual_dtype = {"none": None, "same": dtype, "float32": torch.float32}[residual]
    x, scale, shift, res = _leaves(dtype, channels_last, device, residual_dtype)
    out = scale_shift_act(x, scale, shift, res, relu)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad = random_input(out.shape, dtype, channels_last, generator=torch.Generator().manual_seed(5)).to(device)
    out.backward(grad)

    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in (x, scale, shift, res)]
    ref = _formula(*leaves64, relu, mask_of=out)
    ref.backward(grad.double())
    with torch.no_grad():
        same = _formula(*(None if t is None else t.detach() for t in (x, scale, shift, res)), relu).to(dtype)
    assert_close_to_reference(out.detach(), ref.detach(), same, "out")
    for name, ours, ref_leaf in zip(("input", "scale", "shift", "residual"), (x, scale, shift, res), leaves64):
        if ours is None:
            continue
        assert ours.grad.dtype == ours.dtype, name
        # the gradient of a low-precision leaf is rounded once; the sums are float32
        ref_grad = ref_leaf.grad
        assert_close_to_reference(ours.grad, ref_grad, ref_grad.to(ours.grad.dtype), f"grad_{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_strided_scale_and_shift_give_the_contiguous_results(device, relu, channels_last):
    """scale and shift as stride-2 views with NaN between their elements: output and every
    gradient equal those of contiguous copies exactly."""
    x, scale, shift, res = _leaves(torch.float16, channels_last, device, torch.float16)
    grad = random_input(x.shape, torch.float16, channels_last, generator=torch.Generator().manual_seed(2)).to(device)
    leaves = (x, scale, shift, res)

    def run(scale_arg, shift_arg):
        out = scale_shift_act(x, scale_arg, shift_arg, res, relu)
        return (out, *torch.autograd.grad(out, leaves, grad))

    expected = run(scale, shift)
    ours = run(strided_per_channel(scale), strided_per_channel(shift))
    for name, o, e in zip(("out", "grad input", "grad scale", "grad shift", "grad residual"), ours, expected):
        torch.testing.assert_close(o, e, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_opcheck():
    x, scale, shift, res = (t.detach() for t in _leaves(torch.float32, True, "cpu", torch.float32))
    torch.library.opcheck(scale_shift_act_op, (x, scale, shift, res, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_rejects_bad_shapes():
    x, scale, shift, res = (t.detach() for t in _leaves(torch.float32, True, "cpu", torch.float32))
    with pytest.raises(ValueError, match="scale"):
        scale_shift_act(x, scale[:3], shift)
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        scale_shift_act(x, scale, shift, res[:1])
