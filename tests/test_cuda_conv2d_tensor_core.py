"""``resnet_fast::conv2d_tensor_core``: the WMMA (sm_70+) fp16 convolution of the cuda backend.

CPU: the operator's contract on its default implementation (float64 references, opcheck,
errors), the capability rule that sends ``conv2d_stats`` to it, and that routing through
``conv2d_cuda.conv2d_stats``. GPU (marked): the CUDA kernel against float64 on every kind
of ResNet convolution (stem 7x7/2 with 3 channels, 3x3/1, 3x3/2, 1x1/1, 1x1/2; partial
tiles; channel counts that are not multiples of 8; misaligned and NCHW inputs; NaN), and
``conv2d_stats`` with its gradients on the cuda backend with the device reported as sm_75;
tiles whose second half of rows (the epilogue stages 64 rows at a time) is partly valid
or empty; the output-size and int-range errors of the C++ launcher; per-channel views at
odd offsets. (The launcher's size checks and the main loop's depth walk are also tested on
the CPU: tests/test_cuda_conv2d_geometry.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_gpu

from resnet_fast.ops import conv2d_cuda, reference
from resnet_fast.ops.conv2d_stats import conv2d_stats
from resnet_fast.ops.dispatch import get_backend, set_backend
from resnet_fast.ops.reference import prologue_activation

op = torch.ops.resnet_fast.conv2d_tensor_core

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation)
SHAPES = {
    "3x3s1": (2, 16, 64, 8, 8, 3, 1, 1, 1),         # one 128 x 64 tile, vector loads
    "3x3s2": (3, 40, 72, 9, 7, 3, 2, 1, 1),         # partial tiles in M and N, depth 360
    "stem": (2, 3, 16, 13, 13, 7, 2, 3, 1),         # C_in = 3: element loads
    "1x1s2": (2, 24, 20, 6, 6, 1, 2, 0, 1),         # C_out % 8 != 0: element stores
    "1x1s1": (4, 64, 32, 9, 9, 1, 1, 0, 1),         # M = 324: three row tiles
    "3x3d2": (2, 16, 16, 8, 8, 3, 1, 2, 2),         # dilation
    "c12": (1, 12, 8, 3, 5, 3, 1, 1, 1),            # C_in % 8 != 0, M = 15
    # The epilogue stages the 128-row tile in two halves of 64 rows:
    "m100": (1, 32, 64, 10, 10, 3, 1, 1, 1),       # second half partly valid (36 rows)
    "m64": (1, 24, 16, 8, 8, 3, 1, 1, 1),          # second half empty
    "m192": (3, 8, 72, 8, 8, 1, 1, 0, 1),          # a full tile, then a first half alone
}
# (prologue relu: None = no prologue, bias, residual, relu, stats)
MODES = {
    "conv": (None, False, False, False, False),
    "bias_relu": (None, True, False, True, False),
    "bias_residual_relu": (None, True, True, True, False),
    "bias_residual": (None, True, True, False, False),
    "stats": (None, False, False, False, True),
    "prologue_relu_stats": (True, False, False, False, True),
    "prologue_stats": (False, False, False, False, True),
}


def _half(shape, generator, scale=1.0, shift=0.0, channels_last=True, misalign=False, device="cpu"):
    """Random float16 data (never zeros); ``misalign`` offsets the storage by one element."""
    numel = torch.Size(shape).numel()
    flat = (torch.randn(numel + 1, generator=generator, dtype=torch.float64) * scale + shift).half()
    flat = flat[1:] if misalign else flat[:numel]
    if channels_last:
        n, c, h, w = shape
        t = flat.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        t = flat.view(shape)
    return t.to(device)


def _case(shape, mode, device="cpu", channels_last=True, misalign=False, seed=0):
    n, cin, cout, h, w, k, s, p, d = SHAPES[shape]
    prologue, bias, residual, relu, stats = MODES[mode]
    g = torch.Generator().manual_seed(seed)
    x = _half((n, cin, h, w), g, 2.0, 0.5, channels_last, misalign, device)
    weight = _half((cout, cin, k, k), g, (cin * k * k) ** -0.5, device=device)
    ho, wo = ((size + 2 * p - d * (k - 1) - 1) // s + 1 for size in (h, w))
    scale = shift = None
    if prologue is not None:
        scale = (torch.rand(cin, generator=g) + 0.5).to(device)
        shift = torch.randn(cin, generator=g).to(device)
    b = torch.randn(cout, generator=g).to(device) if bias else None
    r = _half((n, cout, ho, wo), g, misalign=misalign, device=device) if residual else None
    return (x, weight, b, r, scale, shift, [s, s], [p, p], [d, d], bool(prologue), relu, stats)


def _float64_reference(args):
    """(out, accumulator, |a| * |w| magnitudes) in float64 from the float16 activation."""
    x, weight, b, r, scale, shift, s, p, d, prologue_relu, relu, _ = args
    a = x if scale is None else prologue_activation(x, scale, shift, prologue_relu)
    acc = F.conv2d(a.double(), weight.double(), None, s, p, d)
    magnitude = F.conv2d(a.double().abs(), weight.double().abs(), None, s, p, d)
    out = acc
    if b is not None:
        out = out + b.double().view(1, -1, 1, 1)
        magnitude = magnitude + b.double().abs().view(1, -1, 1, 1)
    if r is not None:
        out = out + r.double()
        magnitude = magnitude + r.double().abs()
    return (torch.relu(out) if relu else out), acc, magnitude


def _check_against_float64(args, result):
    out, mean, var = result
    ref, acc, magnitude = _float64_reference(args)
    assert out.dtype == torch.float16 and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    out = out.double().cpu()
    ref, acc, magnitude = ref.cpu(), acc.cpu(), magnitude.cpu()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite), "non-finite values where the reference has none (or v.v.)"
    # one float16 rounding of the result, float32 accumulation over the depth
    bound = 1e-3 * ref.abs() + 2e-5 * magnitude + 1e-6
    error = (out - ref).abs()
    assert (error[finite] <= bound[finite]).all(), f"max error {error[finite].max().item():.3g}"
    stats = args[-1]
    if not stats:
        assert mean.numel() == 0 and var.numel() == 0
        return
    var64, mean64 = torch.var_mean(acc, dim=(0, 2, 3), correction=0)
    assert mean.dtype == var.dtype == torch.float32
    mean, var = mean.double().cpu(), var.double().cpu()
    assert ((mean - mean64).abs() <= 1e-5 * (mean64.abs() + var64.sqrt()) + 1e-7).all()
    assert ((var - var64).abs() <= 1e-5 * var64 + 1e-9).all()


# ---------------------------------------------------------------------------------------
# CPU: the contract on the default implementation.


@pytest.mark.parametrize("shape", ["3x3s2", "stem", "1x1s2"])
@pytest.mark.parametrize("mode", list(MODES))
def test_default_implementation_matches_float64(shape, mode):
    args = _case(shape, mode)
    _check_against_float64(args, op(*args))


@pytest.mark.parametrize("mode", ["bias_residual_relu", "prologue_relu_stats"])
def test_opcheck(mode):
    args = _case("1x1s2", mode)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_rejects_what_the_kernel_cannot_take():
    args = list(_case("1x1s2", "bias_relu"))
    with pytest.raises(TypeError, match="float16"):
        op(args[0].bfloat16(), *args[1:])
    with pytest.raises(ValueError, match="stats=True takes no bias"):
        op(*args[:-1], True)
    stats_args = list(_case("1x1s2", "prologue_stats"))
    with pytest.raises(ValueError, match="both be given"):
        op(*stats_args[:5], None, *stats_args[6:])
    residual_args = list(_case("1x1s2", "bias_residual"))
    residual_args[3] = residual_args[3].float()
    with pytest.raises(ValueError, match="residual must be a float16"):
        op(*residual_args)


@pytest.mark.parametrize("capability,dtype,channels_last,expected", [
    ((7, 0), torch.float16, True, True),
    ((7, 5), torch.float16, True, True),
    ((8, 0), torch.float16, True, False),    # cuDNN + our BN kernels (the triton backend fuses there)
    ((9, 0), torch.float16, True, False),
    ((7, 5), torch.float32, True, False),
    ((7, 5), torch.float16, False, False),   # NCHW stays on cuDNN
    ((6, 1), torch.float16, True, False),    # no tensor cores
])
def test_capability_rule(capability, dtype, channels_last, expected):
    x = torch.empty(2, 8, 4, 4, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weight = torch.empty(8, 8, 3, 3, dtype=dtype)
    assert conv2d_cuda.uses_tensor_core_kernel(x, weight, capability) is expected


@pytest.fixture
def tensor_core_calls(monkeypatch) -> list:
    """The argument tuples of every ``conv2d_tensor_core`` call made through ``torch.ops``."""
    calls = []
    original = torch.ops.resnet_fast.conv2d_tensor_core

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(torch.ops.resnet_fast, "conv2d_tensor_core", spy)
    return calls


@pytest.mark.parametrize("mode", ["stats", "prologue_relu_stats", "prologue_stats"])
def test_conv2d_stats_routes_through_the_tensor_core_operator(monkeypatch, tensor_core_calls, mode):
    monkeypatch.setattr(conv2d_cuda, "_runs_tensor_core_kernel", lambda x, w: True)
    args = _case("3x3s2", mode)
    x, weight, _, _, scale, shift, s, p, d, prologue_relu, _, _ = args
    result = conv2d_cuda.conv2d_stats(x, weight, s, p, d, scale, shift, prologue_relu)
    assert len(tensor_core_calls) == 1
    _check_against_float64(args, result)


# ---------------------------------------------------------------------------------------
# GPU: the CUDA kernel.

GPU = [pytest.mark.gpu, requires_gpu]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "misaligned"])
@pytest.mark.gpu
@requires_gpu
def test_kernel_matches_float64(shape, mode, layout):
    args = _case(shape, mode, "cuda", channels_last=layout != "nchw", misalign=layout == "misaligned")
    _check_against_float64(args, op(*args))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("mode", ["bias_relu", "prologue_relu_stats"])
def test_kernel_propagates_nan(mode):
    args = list(_case("3x3s1", mode, "cuda"))
    args[0] = args[0].clone()
    args[0][0, 0, 0, 0] = float("nan")
    out, mean, var = op(*args)
    ref, _, _ = _float64_reference(args)
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref.cpu()))
    if args[-1]:
        assert torch.isnan(mean).any() and torch.isnan(var).any()


@pytest.mark.gpu
@requires_gpu
def test_kernel_rejects_an_output_span_below_zero():
    """H + 2p - d(R-1) - 1 = -1 at stride 2: an error with the Python check's words, not 1 row."""
    args = list(_case("3x3s1", "conv", "cuda"))
    args[0] = args[0][:, :, :2].contiguous(memory_format=torch.channels_last)  # H = 2, 3x3 kernel
    args[6], args[7] = [2, 2], [0, 1]
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(ValueError) as cpu_error:
        op(*cpu_args)
    with pytest.raises(ValueError) as cuda_error:
        op(*args)
    assert str(cpu_error.value) in str(cuda_error.value)
    assert "input spatial size (2, 8) is too small" in str(cuda_error.value)


@pytest.mark.gpu
@requires_gpu
def test_kernel_rejects_values_it_cannot_narrow_to_int():
    args = list(_case("3x3s1", "conv", "cuda"))
    args[6] = [2**32 + 1, 1]  # an int cast would make it stride 1
    with pytest.raises(ValueError, match=r"stride must be in \[1, 2147483647\]"):
        op(*args)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("mode", ["bias_residual_relu", "prologue_relu_stats"])
def test_kernel_takes_per_channel_views_at_odd_offsets(mode):
    """Bias, prologue scale and shift one float past a 16-byte boundary (the kernel reads
    them as 16-byte vectors: the launcher copies such views)."""
    args = list(_case("3x3s1", mode, "cuda"))
    for i in (2, 4, 5):
        if args[i] is not None:
            padded = torch.empty(args[i].numel() + 1, dtype=args[i].dtype, device="cuda")
            padded[1:] = args[i]
            args[i] = padded[1:]
            assert args[i].data_ptr() % 16 != 0
    _check_against_float64(args, op(*args))


@pytest.mark.gpu
@requires_gpu
def test_kernel_is_deterministic_on_a_large_layer():
    # ResNet-50's layer2 3x3 at batch 8: 98 row tiles, two column tiles, depth 1152
    g = torch.Generator().manual_seed(1)
    x = _half((8, 128, 28, 28), g, device="cuda")
    weight = _half((128, 128, 3, 3), g, (128 * 9) ** -0.5, device="cuda")
    scale, shift = (torch.rand(128, generator=g) + 0.5).cuda(), torch.randn(128, generator=g).cuda()
    args = (x, weight, None, None, scale, shift, [1, 1], [1, 1], [1, 1], True, False, True)
    first = op(*args)
    _check_against_float64(args, first)
    for a, b in zip(first, op(*args)):
        assert torch.equal(a, b)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("mode", ["prologue_relu_stats", "prologue_stats"])
def test_conv2d_stats_on_sm75_path_matches_float64_with_gradients(monkeypatch, tensor_core_calls, mode):
    monkeypatch.setattr(conv2d_cuda, "device_capability", lambda device: (7, 5))
    args = _case("3x3s2", mode, "cuda")
    x, weight, _, _, scale, shift, s, p, _, prologue_relu, _, _ = args
    leaves = [t.detach().requires_grad_() for t in (x, weight, scale, shift)]
    previous = get_backend()
    set_backend("cuda")
    try:
        out, mean, var = conv2d_stats(leaves[0], leaves[1], stride=s, padding=p, prologue_scale=leaves[2],
                                      prologue_shift=leaves[3], prologue_relu=prologue_relu)
        (out.float().square().sum() + mean.sum() + var.sum()).backward()
    finally:
        set_backend(previous)
    assert len(tensor_core_calls) == 1
    _check_against_float64(args, (out.detach(), mean.detach(), var.detach()))
    # gradients against float64 autograd through the reference math
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, scale, shift)]
    out64, mean64, var64 = reference.conv2d_stats(leaves64[0], leaves64[1], [s[0], s[1]], p, [1, 1],
                                                  leaves64[2], leaves64[3], prologue_relu)
    (out64.square().sum() + mean64.sum() + var64.sum()).backward()
    for ours, ref in zip(leaves, leaves64):
        error = (ours.grad.double() - ref.grad).norm() / ref.grad.norm()
        assert error < 2e-2, f"gradient relative error {error:.3g}"
