"""resnet_fast::batch_norm_stats against a float64 reference.

The CPU tests check the operator as registered (its torch reference) and run opcheck.
The GPU tests (marked ``gpu``) check the CUDA kernel of resnet_fast._C: dtypes, NCHW and
channels_last, odd shapes, shapes that take each of its work splits, a large mean
offset, arbitrary strides, misaligned storage, CUDA-graph capture and > 2^31 elements.

Tolerances: the reference is torch.var_mean in float64 of the *same* input upcast, so
only accumulation error counts, whatever the input dtype. With float32 accumulation
(float16/bfloat16/float32 inputs) the mean must be within 1e-5 * (|mean| + std) and the
variance within 2e-5 relative; float64 inputs get 1e-12. (An fp32 emulation of the
kernel's Welford/Chan arithmetic stays below 2e-6 relative on the variance at
mean/std = 1000; a naive sum / sum-of-squares is off by about 6e-2 there.)
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import cuda_kernel_names

import resnet_fast.ops  # noqa: F401  defines the operator and loads resnet_fast._C when built
from resnet_fast._extension import extension_load_error

OP = torch.ops.resnet_fast.batch_norm_stats.default
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUTS = ["nchw", "channels_last"]
EXPECT_EXT = os.environ.get("RESNET_FAST_EXPECT_CUDA_EXT") == "1"


def make_input(shape, dtype, layout, *, device="cpu", shift=0.0, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale + shift
    # Distinct channel means, so reading the wrong channel shows.
    if shape[1] > 1:
        x += torch.linspace(-2.0, 2.0, shape[1], dtype=torch.float64).view(1, -1, 1, 1) * scale
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def reference(x):
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    return mean, var


def check_stats(x, mean, var, ref=None):
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    channels = x.shape[1]
    assert mean.dtype == acc_dtype and var.dtype == acc_dtype, (mean.dtype, var.dtype)
    assert mean.shape == (channels,) and var.shape == (channels,)
    assert mean.device == x.device and var.device == x.device
    ref_mean, ref_var = reference(x) if ref is None else ref
    mean, var = mean.double().cpu(), var.double().cpu()
    ref_mean, ref_var = ref_mean.cpu(), ref_var.cpu()
    rtol_mean, rtol_var = (1e-12, 1e-12) if acc_dtype == torch.float64 else (1e-5, 2e-5)
    scale = ref_mean.abs() + ref_var.sqrt()
    mean_err = (mean - ref_mean).abs()
    var_err = (var - ref_var).abs()
    mean_bound = rtol_mean * scale + 1e-30
    var_bound = rtol_var * ref_var + 1e-30
    worst = int((mean_err / mean_bound).argmax())
    assert (mean_err <= mean_bound).all(), (
        f"mean: channel {worst}: {mean[worst].item()!r} vs {ref_mean[worst].item()!r} "
        f"(error {mean_err[worst].item():.3g} > {mean_bound[worst].item():.3g}; {x.dtype}, {tuple(x.shape)})")
    worst = int((var_err / var_bound).argmax())
    assert (var_err <= var_bound).all(), (
        f"var: channel {worst}: {var[worst].item()!r} vs {ref_var[worst].item()!r} "
        f"(error {var_err[worst].item():.3g} > {var_bound[worst].item():.3g}; {x.dtype}, {tuple(x.shape)})")


# ---------------------------------------------------------------------------------------
# CPU: the registered operator (torch reference) and opcheck.

CPU_SHAPES = [(4, 3, 9, 11), (2, 1000, 3, 3), (8, 64, 1, 1), (1, 16, 5, 7), (1, 5, 1, 1)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_matches_float64_reference(shape, dtype, layout):
    x = make_input(shape, dtype, layout)
    mean, var = OP(x)
    check_stats(x, mean, var)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_large_mean_offset(dtype):
    x = make_input((16, 8, 12, 12), dtype, "nchw", shift=1000.0)
    mean, var = OP(x)
    check_stats(x, mean, var)


def test_cpu_arbitrary_strides():
    x = make_input((6, 5, 8, 10), torch.float32, "nchw").permute(0, 1, 3, 2)[:, :, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    mean, var = OP(x)
    check_stats(x, mean, var)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_opcheck(dtype, layout):
    torch.library.opcheck(OP, (make_input((3, 4, 5, 6), dtype, layout),))


# ---------------------------------------------------------------------------------------
# GPU: the CUDA kernel of resnet_fast._C.


@pytest.fixture
def cuda_kernel():
    """Skip without a GPU; without the extension skip, or fail when it is expected."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    error = extension_load_error()
    if error is not None:
        if EXPECT_EXT:
            pytest.fail(f"RESNET_FAST_EXPECT_CUDA_EXT=1 but {error}")
        pytest.skip(error)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fast::batch_norm_stats", "CUDA")


GPU_SHAPES = [
    (4, 3, 9, 11),       # C = 3, odd plane, no vector loads
    (2, 1000, 3, 3),     # C = 1000 (channels_last: a partial channel tile)
    (8, 64, 1, 1),       # H*W = 1 (NCHW and channels_last are the same bytes)
    (1, 16, 33, 35),     # N = 1
    (1, 5, 1, 1),        # one value per channel: variance exactly 0
    (5, 7, 7, 7),
    (3, 1, 17, 19),      # C = 1
    (16, 2048, 7, 7),    # wide C, 7x7 planes: one block per channel tile
    (32, 8, 56, 56),     # narrow C, many rows: blocks split the rows, second pass merges
    (2, 4, 128, 128),    # large planes: NCHW walks along H*W and splits the plane
    (3, 24, 20, 20),
    (6, 12, 14, 14),     # fp16/bf16: 4-element loads (NCHW: H*W = 196; channels_last: C = 12)
]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_float64_reference(cuda_kernel, shape, dtype, layout):
    x = make_input(shape, dtype, layout, device="cuda")
    mean, var = OP(x)
    check_stats(x, mean, var)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 32, 28, 28), (256, 16, 7, 7), (4, 8, 96, 96)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_large_mean_offset(cuda_kernel, shape, dtype, layout):
    """x = 1000 + randn: Welford/Chan keep the variance; sum of squares would not."""
    x = make_input(shape, dtype, layout, device="cuda", shift=1000.0)
    mean, var = OP(x)
    check_stats(x, mean, var)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_cuda_tiny_variance_large_mean(cuda_kernel, dtype):
    x = make_input((32, 16, 14, 14), dtype, "channels_last", device="cuda", shift=3.0, scale=1e-3)
    mean, var = OP(x)
    check_stats(x, mean, var)


@pytest.mark.gpu
def test_cuda_arbitrary_strides(cuda_kernel):
    base = make_input((6, 5, 8, 10), torch.float32, "nchw", device="cuda")
    for x in (base.permute(0, 1, 3, 2), base[:, :, ::2], base[::2], base.transpose(0, 1).contiguous().transpose(0, 1)):
        mean, var = OP(x)
        check_stats(x, mean, var)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_misaligned_storage(cuda_kernel, dtype, layout):
    """A storage offset that breaks 16-byte alignment takes the scalar-load kernels."""
    shape = (4, 16, 8, 8)
    flat = make_input((1, 1, 1, 1 + 4 * 16 * 8 * 8), dtype, "nchw", device="cuda").flatten()
    if layout == "nchw":
        x = flat[1:].view(shape)
    else:
        x = flat[1:].view(4, 8, 8, 16).permute(0, 3, 1, 2)
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert x.data_ptr() % 16 != 0
    mean, var = OP(x)
    check_stats(x, mean, var)


def _strided_view(shape, dtype, layout, offset):
    """An input whose storage starts `offset` elements into a fresh allocation."""
    n, c, h, w = shape
    flat = make_input((1, 1, 1, offset + n * c * h * w), dtype, "nchw", device="cuda").flatten()[offset:]
    return flat.view(shape) if layout == "nchw" else flat.view(n, h, w, c).permute(0, 3, 1, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout,shape,offset,width", [
    ("nchw", (4, 8, 14, 14), 0, 4),            # H*W = 196: 8-byte loads, not 2-byte ones
    ("nchw", (4, 8, 6, 6), 0, 4),              # H*W = 36
    ("channels_last", (4, 12, 6, 6), 0, 4),    # C = 12
    ("nchw", (4, 8, 16, 16), 4, 4),            # 8-byte but not 16-byte aligned
    ("nchw", (4, 8, 14, 14), 2, 1),            # 4-byte aligned: element loads
    ("nchw", (4, 8, 16, 16), 0, 8),            # the full 16 bytes
    ("nchw", (4, 8, 7, 7), 0, 1),              # H*W = 49
])
def test_cuda_load_width_follows_extent_and_alignment(cuda_kernel, dtype, layout, shape, offset, width):
    x = _strided_view(shape, dtype, layout, offset)
    result = []
    names = cuda_kernel_names(lambda: result.extend(OP(x)))
    kernel = "stats_nchw_kernel" if layout == "nchw" else "stats_nhwc_kernel"
    element = "c10::Half" if dtype == torch.float16 else "c10::BFloat16"
    assert any(f"{kernel}<{element}, {width}>" in name for name in names), names
    check_stats(x, *result)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_empty_batch_gives_nan(cuda_kernel, layout):
    x = make_input((0, 6, 4, 4), torch.float32, layout, device="cuda")
    mean, var = OP(x)
    assert mean.shape == (6,) and var.shape == (6,)
    assert torch.isnan(mean).all() and torch.isnan(var).all()
    mean, var = OP(make_input((2, 0, 4, 4), torch.float32, layout, device="cuda"))
    assert mean.shape == (0,) and var.shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("bad", ["rank", "dtype"])
def test_cuda_bad_input_names_the_argument(cuda_kernel, bad):
    x = torch.randn(2, 3, 4, device="cuda") if bad == "rank" else torch.ones(2, 3, 4, 4, device="cuda", dtype=torch.int32)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="input"):
        OP(x)


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream(cuda_kernel):
    x = make_input((32, 16, 20, 20), torch.float16, "channels_last", device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        mean, var = OP(x)
    torch.cuda.current_stream().wait_stream(stream)
    check_stats(x, mean, var)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_capture(cuda_kernel, layout):
    """No host synchronisation: the op captures in a CUDA graph (workspace included)."""
    x = make_input((64, 16, 32, 32), torch.bfloat16, layout, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        OP(x)  # warm up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mean, var = OP(x)
    new = make_input(x.shape, torch.bfloat16, layout, device="cuda", shift=5.0, seed=1)
    x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    check_stats(x, mean, var)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_opcheck(cuda_kernel, dtype, layout):
    for shape in ((3, 4, 5, 6), (16, 8, 24, 24)):
        torch.library.opcheck(OP, (make_input(shape, dtype, layout, device="cuda"),))


@pytest.mark.gpu
def test_cuda_over_2_31_elements(cuda_kernel):
    """64-bit indexing: 2^31 + 65536 float16 values (4.3 GB), NCHW and channels_last."""
    if torch.cuda.get_device_properties(0).total_memory < 20 * 2**30:
        pytest.skip("needs a GPU with 20 GiB")
    shape = (1, 2, 32768, 32769)
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, dtype=torch.float16, device="cuda", generator=generator)
    x[:, 1] += 3.0
    x[:, :, -100:] += 1.0  # the far end differs: an index that wraps would miss it
    assert x.numel() > 2**31
    # float64 reference in slices of rows (two passes).
    count = shape[0] * shape[2] * shape[3]
    ref_mean = torch.zeros(2, dtype=torch.float64, device="cuda")
    ref_m2 = torch.zeros(2, dtype=torch.float64, device="cuda")
    rows = 2048
    for h in range(0, shape[2], rows):
        ref_mean += x[:, :, h:h + rows].double().sum(dim=(0, 2, 3))
    ref_mean /= count
    for h in range(0, shape[2], rows):
        ref_m2 += ((x[:, :, h:h + rows].double() - ref_mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    ref = (ref_mean, ref_m2 / count)

    mean, var = OP(x)
    check_stats(x, mean, var, ref=ref)
    del mean, var
    x = x.contiguous(memory_format=torch.channels_last)
    torch.cuda.empty_cache()
    mean, var = OP(x)
    check_stats(x, mean, var, ref=ref)
