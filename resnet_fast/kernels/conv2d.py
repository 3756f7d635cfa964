"""Triton implicit-GEMM convolution (groups=1) with fused prologue and epilogue.

The ``triton`` backend of ``resnet_fast::conv2d_bias_act`` (inference: BatchNorm folded
into weight and bias, then + bias, + residual, ReLU in the epilogue) and
``resnet_fast::conv2d_stats`` (training: the next BatchNorm's statistics in the
epilogue, the previous BatchNorm's scale/shift + ReLU in the prologue).

The GEMM: out[m, co] = sum_k A[m, k] * B[k, co] with

* m = (n, p, q) over M = N*P*Q output pixels (rows of the NHWC output),
* k = (r, s, c) over K = R*S*C_in, ordered with C_in innermost, so that the A tile of
  an NHWC input ``x[n, p*stride - pad + r*dil, q*stride - pad + s*dil, c0:c0+BLOCK_K]``
  is contiguous along C_in, and the B tile ``weight[co, c, r, s]`` is contiguous along
  C_in for a channels_last weight (that is, (C_out, R, S, C_in) row-major: the GEMM
  operand B^T; models converted with ``.to(memory_format=torch.channels_last)`` already
  hold their weights so, and the inference fold writes them so once).

Every tensor is addressed through its strides, so NCHW input, weight or output also
work (slower: their loads are not contiguous along C). Pixel (row) offsets are formed in
int64, so activations past 2^31 elements work; per-element channel offsets are int32.
Masks cover the M, C_out and C_in tails and the zero padding.

One program computes a [BLOCK_M, BLOCK_N] output tile, looping over K in steps of
BLOCK_K within one filter tap (r, s) — or, with fewer than
:data:`FLAT_K_BELOW_CHANNELS` input channels (the stem's 3), across taps, each k decoded
to (r, s, c) (``FLAT_K``), so the K tiles are not mostly padding; products run in
``tl.dot`` with float32
accumulation (tensor cores on sm_80+: :data:`USES_TENSOR_CORES`). float32 input runs
as TF32 on the GPU when ``torch.backends.cudnn.allow_tf32`` is set (torch's default for
convolutions, so cuDNN does the same), in IEEE float32 otherwise.

Constexpr-selected prologue, applied to each loaded input tile (per input channel c):
``a = relu(x * scale[c] + shift[c])``, then masked, so padded and out-of-range
positions stay exactly zero after the activation (the convolution of the activation
with zero padding, as ``F.conv2d(relu(bn(x)))`` computes).

Constexpr-selected epilogue, on the float32 accumulator:
``y = acc + bias[co]``; with ``STATS`` each program writes, for its M tile and each of
its channels, (count, mean, M2 = sum((y - mean)^2)) of y, the pre-residual, pre-ReLU
convolution output, to a float32 workspace (3, M tiles, C_out); then
``y += residual``, ``y = relu(y)``, stored in the output dtype. The per-tile partials
are merged by Chan's formula in ``batch_norm_act``'s combine kernel (second launch):
deterministic (no atomics: the same input gives bitwise the same statistics, and the
workspace needs no zeroing launch) and free of the cancellation of
``var = sum(y^2)/M - mean^2`` when |mean| is large against the standard deviation.

Tiles: ``triton.autotune`` over :data:`CONFIGS`, keyed by the GEMM shape (Triton caches
the choice per key, dtype and device); with the statistics epilogue the M tile is fixed
at :data:`STATS_BLOCK_M` (the workspace has one row per M tile, sized before launch).
Under ``TRITON_INTERPRET=1`` a single fixed configuration (:data:`INTERPRETER_BLOCKS`,
module-level so tests can shrink it) keeps the interpreter fast.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from resnet_fast.kernels import batch_norm_act as bn_kernels
from resnet_fast.kernels import register_compile_example
from resnet_fast.ops.common import output_memory_format
from resnet_fast.ops.dispatch import register_kernel

USES_TENSOR_CORES = True
"""``tl.dot`` needs tensor cores to be fast: below sm_80 Triton falls back to FMA, so the
fused convolutions should go elsewhere on those devices."""

_empty = torch.empty  # every output and workspace comes from here (tests poison it with NaN)

STATS_BLOCK_M = 128
FLAT_K_BELOW_CHANNELS = 16
"""Inputs with fewer channels than this (the stem) tile K across filter taps (``FLAT_K``)."""
GROUP_M = 8  # M tiles per group in the launch order, so programs in flight share B tiles in L2


def _config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                         num_warps=warps, num_stages=stages)


CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 256, 64, 8, 3),
    _config(256, 128, 64, 8, 3),
    _config(128, 128, 32, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
]
"""Tile configurations tried by the autotuner (GPU)."""
STATS_CONFIGS = [c for c in CONFIGS if c.kwargs["BLOCK_M"] == STATS_BLOCK_M]
AUTOTUNE_KEY = ["M", "C_out", "C", "R", "S", "stride_h", "stride_w"]
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
"""The single configuration used under ``TRITON_INTERPRET=1``."""
COMBINE_BLOCK_S = 32
COMBINE_BLOCK_C = 32


@triton.jit
def _conv2d_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, scale_ptr, shift_ptr, ws_ptr,
    M, C, H, W, P, Q, C_out, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw,
    swn, swc, swr, sws,
    son, soc, sop, soq,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
    PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    FLAT_K: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, co] = epilogue(sum_{r,s,c} prologue(x[n, h, w, c]) * weight[co, c, r, s])."""
    # Grouped launch order: GROUP_M M tiles sweep the N tiles together.
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    n_tiles = tl.cdiv(C_out, BLOCK_N)
    group = pid // (GROUP_M * n_tiles)
    first_m = group * GROUP_M
    group_size = tl.minimum(m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_tiles)) % group_size
    pid_n = (pid % (GROUP_M * n_tiles)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    # m -> (image, output row p, output column q)
    img = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    h_base = p * stride_h - pad_h
    w_base = q * stride_w - pad_w
    x_img = img.to(tl.int64) * sxn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FLAT_K:
        # Few input channels (the stem's 3): K tiles run across filter taps, each k
        # decoded to (r, s, c), so the tiles are not mostly padding.
        for k0 in range(0, R * S * C, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < R * S * C
            cs = ks % C
            rs = ks // C
            r = rs // S
            s = rs - r * S
            h = h_base[:, None] + (r * dil_h)[None, :]
            w = w_base[:, None] + (s * dil_w)[None, :]
            a_mask = m_ok[:, None] & k_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a_offs = x_img[:, None] + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw + (cs * sxc)[None, :]
            a = tl.load(x_ptr + a_offs, mask=a_mask, other=0.0)
            if PROLOGUE:
                scale = tl.load(scale_ptr + cs, mask=k_ok, other=0.0).to(tl.float32)
                shift = tl.load(shift_ptr + cs, mask=k_ok, other=0.0).to(tl.float32)
                act = a.to(tl.float32) * scale[None, :] + shift[None, :]
                if PROLOGUE_RELU:
                    act = tl.maximum(act, 0.0)
                a = tl.where(a_mask, act, 0.0).to(x_ptr.dtype.element_ty)  # padding stays zero
            b_ptrs = w_ptr + (cs * swc + r * swr + s * sws)[:, None] + (offs_n * swn)[None, :]
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        # One filter tap (r, s) per K tile; contiguous C_in runs of BLOCK_K channels.
        c_tiles = tl.cdiv(C, BLOCK_K)
        for kt in range(0, R * S * c_tiles):
            rs = kt // c_tiles
            c0 = (kt - rs * c_tiles) * BLOCK_K
            r = rs // S
            s = rs - r * S
            h = h_base + r * dil_h
            w = w_base + s * dil_w
            pix_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            cs = c0 + offs_k
            c_ok = cs < C
            a_mask = pix_ok[:, None] & c_ok[None, :]
            a_rows = x_img + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
            a = tl.load(x_ptr + a_rows[:, None] + (cs * sxc)[None, :], mask=a_mask, other=0.0)
            if PROLOGUE:
                scale = tl.load(scale_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
                shift = tl.load(shift_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
                act = a.to(tl.float32) * scale[None, :] + shift[None, :]
                if PROLOGUE_RELU:
                    act = tl.maximum(act, 0.0)
                a = tl.where(a_mask, act, 0.0).to(x_ptr.dtype.element_ty)  # padding stays zero
            b_ptrs = w_ptr + r * swr + s * sws + (cs * swc)[:, None] + (offs_n * swn)[None, :]
            b = tl.load(b_ptrs, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if STATS:
        # Per-tile (count, mean, M2) of the convolution output, for Chan's merge.
        valid = m_ok[:, None] & n_ok[None, :]
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_mean = tl.math.div_rn(tl.sum(tl.where(valid, acc, 0.0), axis=0), count)
        centred = tl.where(valid, acc - tile_mean[None, :], 0.0)
        plane = m_tiles * C_out
        idx = pid_m * C_out + offs_n
        tl.store(ws_ptr + idx, tl.zeros([BLOCK_N], dtype=tl.float32) + count, mask=n_ok)
        tl.store(ws_ptr + plane + idx, tile_mean, mask=n_ok)
        tl.store(ws_ptr + 2 * plane + idx, tl.sum(centred * centred, axis=0), mask=n_ok)
    out_rows = img.to(tl.int64) * son + p.to(tl.int64) * sop + q.to(tl.int64) * soq
    out_offs = out_rows[:, None] + (offs_n * soc)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


KERNELS = {"conv2d": _conv2d_kernel}
"""Every Triton kernel of this module, by name (the ahead-of-time compile test walks it)."""

INTERPRETED = not isinstance(_conv2d_kernel, triton.runtime.JITFunction)

_FLOAT32_POINTERS = {"bias_ptr", "scale_ptr", "shift_ptr", "ws_ptr"}


def compile_example(flat_k: bool = False, input_precision: str = "ieee") -> tuple[dict[str, str], dict]:
    """Signature and constexprs compiling :func:`_conv2d_kernel` ahead of time with every
    prologue and epilogue stage on (one compile covers all the code) and the first tile
    configuration; per-channel vectors and the statistics workspace are float32."""
    flags = {"HAS_BIAS": True, "HAS_RESIDUAL": True, "RELU": True, "STATS": True, "PROLOGUE": True,
             "PROLOGUE_RELU": True, "INPUT_PRECISION": input_precision, "FLAT_K": flat_k, "GROUP_M": GROUP_M,
             **CONFIGS[0].kwargs}
    signature, constexprs = {}, {}
    for p in _conv2d_kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = flags[p.name]
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*fp32" if p.name in _FLOAT32_POINTERS else "*{data}"
        else:
            signature[p.name] = "i32"
    return signature, constexprs


if not INTERPRETED:  # interpreter functions cannot be compiled ahead of time
    register_compile_example(__name__, "_conv2d_kernel", _conv2d_kernel, *compile_example())
_autotuned = triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY)(_conv2d_kernel)
_autotuned_stats = triton.autotune(configs=STATS_CONFIGS, key=AUTOTUNE_KEY)(_conv2d_kernel)


def _launches(t: Tensor) -> bool:
    return not (INTERPRETED and torch._subclasses.fake_tensor.is_fake(t))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _output_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int, int, int]:
    n, _, h, w = (int(d) for d in x.shape)
    r, s = int(weight.shape[2]), int(weight.shape[3])
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return n, int(weight.shape[0]), p, q


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not INTERPRETED and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], out: Tensor,
            scale: Optional[Tensor], shift: Optional[Tensor], ws: Optional[Tensor],
            stride, padding, dilation, relu: bool, prologue_relu: bool) -> None:
    """One launch of :func:`_conv2d_kernel` (autotuned on the GPU, fixed when interpreted)."""
    n, c, h, w = (int(d) for d in x.shape)
    _, c_out, p, q = (int(d) for d in out.shape)
    r, s = int(weight.shape[2]), int(weight.shape[3])
    m = n * p * q
    stats = ws is not None
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu, STATS=stats,
                 PROLOGUE=scale is not None, PROLOGUE_RELU=prologue_relu,
                 INPUT_PRECISION=_input_precision(x.dtype), FLAT_K=c < FLAT_K_BELOW_CHANNELS, GROUP_M=GROUP_M)
    args = (x, weight, out if bias is None else bias, out if residual is None else residual, out,
            out if scale is None else scale, out if shift is None else shift, out if ws is None else ws,
            m, c, h, w, p, q, c_out, r, s, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *x.stride(), *weight.stride(), *out.stride())
    if INTERPRETED:
        blocks = dict(INTERPRETER_BLOCKS)
        grid = (_cdiv(m, blocks["BLOCK_M"]) * _cdiv(c_out, blocks["BLOCK_N"]),)
        _conv2d_kernel[grid](*args, **flags, **blocks)
        return

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),)

    wrap_triton(_autotuned_stats if stats else _autotuned)[grid](*args, **flags)


def _stats_block_m() -> int:
    return INTERPRETER_BLOCKS["BLOCK_M"] if INTERPRETED else STATS_BLOCK_M


def _prepare(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, torch.memory_format]:
    """NHWC input and (C_out, R, S, C_in)-ordered weight (no copies when already so)."""
    fmt = output_memory_format(x)
    return (x.contiguous(memory_format=torch.channels_last),
            weight.contiguous(memory_format=torch.channels_last), fmt)


@triton_op("resnet_fast::triton_conv2d_bias_act", mutates_args=())
def triton_conv2d_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    relu: bool,
) -> Tensor:
    """``relu(conv2d(x, weight) + bias + residual)`` in one launch (bias in any float dtype)."""
    x, weight, fmt = _prepare(x, weight)
    out = _empty(_output_shape(x, weight, stride, padding, dilation), dtype=x.dtype, device=x.device,
                 memory_format=fmt)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt)
    if out.numel() and _launches(x):
        _launch(x, weight, bias, residual, out, None, None, None, stride, padding, dilation, relu, False)
    return out


@triton_op("resnet_fast::triton_conv2d_stats", mutates_args=())
def triton_conv2d_stats(
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    prologue_scale: Optional[Tensor],
    prologue_shift: Optional[Tensor],
    prologue_relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``y = conv2d(act(x), weight)`` with act = relu(x * scale + shift) per input channel
    (when given); returns (y, mean, biased var) of y per output channel, in float32."""
    x, weight, fmt = _prepare(x, weight)
    out = _empty(_output_shape(x, weight, stride, padding, dilation), dtype=x.dtype, device=x.device,
                 memory_format=fmt)
    n, c_out, p, q = out.shape
    mean = _empty(c_out, dtype=torch.float32, device=x.device)
    var = _empty(c_out, dtype=torch.float32, device=x.device)
    m_tiles = _cdiv(n * p * q, _stats_block_m())
    ws = _empty((3, m_tiles, c_out), dtype=torch.float32, device=x.device)
    if out.numel() == 0 or not _launches(x):
        return out, mean, var
    if prologue_scale is not None:
        prologue_scale = prologue_scale.contiguous()
        prologue_shift = prologue_shift.contiguous()
    _launch(x, weight, None, None, out, prologue_scale, prologue_shift, ws, stride, padding, dilation,
            False, prologue_relu)
    kernel = bn_kernels._stats_combine_kernel
    if not INTERPRETED:
        kernel = wrap_triton(kernel)
    kernel[(_cdiv(c_out, COMBINE_BLOCK_C),)](ws, mean, var, c_out, m_tiles,
                                             BLOCK_S=COMBINE_BLOCK_S, BLOCK_C=COMBINE_BLOCK_C)
    return out, mean, var


# ----------------------------------------------------------------------------- backend
@register_kernel("triton", "conv2d_bias_act")
def conv2d_bias_act(x, weight, bias, residual, stride, padding, dilation, relu):
    """``conv2d_bias_act`` through :func:`triton_conv2d_bias_act`."""
    return triton_conv2d_bias_act(x, weight, bias, residual, stride, padding, dilation, relu)


@register_kernel("triton", "conv2d_stats")
def conv2d_stats(x, weight, stride, padding, dilation, prologue_scale, prologue_shift, prologue_relu):
    """``conv2d_stats`` through :func:`triton_conv2d_stats`."""
    return triton_conv2d_stats(x, weight, stride, padding, dilation, prologue_scale, prologue_shift,
                               prologue_relu)
