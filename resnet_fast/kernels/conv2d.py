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
as TF32 on the GPU when torch lets cuDNN convolutions use it
(``torch.backends.cudnn.conv.fp32_precision``, see :func:`conv_fp32_precision`; TF32 is
torch's default for convolutions), in IEEE float32 otherwise.

Constexpr-selected prologue, applied to each loaded input tile (per input channel c):
``a = relu(x * scale[c] + shift[c])``, then masked, so padded and out-of-range
positions stay exactly zero after the activation (the convolution of the activation
with zero padding, as ``F.conv2d(relu(bn(x)))`` computes).

Constexpr-selected epilogue, on the float32 accumulator:
``y = acc + bias[co]``; with ``STATS`` each program writes, for its M tile and each of
its channels, (count, mean, M2 = sum((y - mean)^2)) of y, the pre-residual, pre-ReLU
convolution output, to a float32 workspace (3, M tiles, C_out); then
``y += residual``, ``y = relu(y)``, stored in the output dtype. Per-channel vectors
(bias, scale, shift) are read with stride 1: the launchers make them contiguous (a copy
of C elements only when they are not).

The per-tile partials are merged by Chan's formula in :func:`_stats_merge_kernel`, in two
levels (:func:`merge_groups`): about sqrt(tiles) groups of about sqrt(tiles) rows each,
times C_out/32 channel blocks in parallel, then one program per channel block over the
groups (a single launch when one group suffices). Fixed order, no atomics: for a given
tile configuration the same input gives bitwise the same statistics, and the workspace
needs no zeroing launch; no cancellation of ``var = sum(y^2)/M - mean^2`` when |mean| is
large against the standard deviation.

Tiles (:func:`launch_plan`): on the GPU ``triton.autotune`` over the configs of
:data:`CONFIGS` that do not spill registers on the device's architecture for the
variant at hand (:func:`configs_for`, :data:`SPILL_FREE_CONFIGS`), keyed by the whole
convolution shape and every code-changing constexpr (:data:`AUTOTUNE_KEY`; Triton adds
the dtypes), with tuning results cached on disk (``cache_results``). With the statistics
epilogue the M tile is chosen per shape before launch (:func:`stats_block_m`: 128 rows,
or 64 when 128 would leave SMs idle, as layer4 at a per-GPU batch of 32), and the
workspace is sized for it. The statistics' summation order depends on the config (its
warps), so under ``torch.use_deterministic_algorithms(True)`` — and whenever
``RESNET_FAST_AUTOTUNE=0`` — no autotuning runs: every shape takes one fixed config
(:func:`fixed_config`), and two runs give bitwise-equal results. Under
``TRITON_INTERPRET=1`` a single fixed configuration (:data:`INTERPRETER_BLOCKS`,
module-level so tests can shrink it) keeps the interpreter fast.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from resnet_fast.kernels import register_compile_example
from resnet_fast.ops.common import output_memory_format
from resnet_fast.ops.dispatch import register_kernel

USES_TENSOR_CORES = True
"""``tl.dot`` needs tensor cores to be fast: below sm_80 Triton falls back to FMA, so the
fused convolutions should go elsewhere on those devices."""

_empty = torch.empty  # every output and workspace comes from here (tests poison it with NaN)

FLAT_K_BELOW_CHANNELS = 16
"""Inputs with fewer channels than this (the stem) tile K across filter taps (``FLAT_K``)."""
GROUP_M = 8  # M tiles per group in the launch order, so programs in flight share B tiles in L2


def _config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                         num_warps=warps, num_stages=stages)


def config_name(config: triton.Config) -> str:
    """``"128x128x64-w8-s3"``: BLOCK_M x BLOCK_N x BLOCK_K, warps, stages."""
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}-w{config.num_warps}-s{config.num_stages}"


CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 32, 8, 4),
    _config(128, 64, 64, 8, 3),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(128, 64, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 32, 4, 4),
    _config(64, 64, 32, 8, 3),
    _config(64, 64, 16, 4, 4),
    _config(64, 32, 32, 4, 3),
    _config(64, 32, 16, 4, 4),
]
"""Tile configurations (GPU); the autotuner tries the spill-free ones (:func:`configs_for`)."""


def config_by_name(name: str) -> triton.Config:
    """The config of :data:`CONFIGS` called ``name`` (:func:`config_name`)."""
    for config in CONFIGS:
        if config_name(config) == name:
            return config
    raise KeyError(f"no convolution tile config named {name!r}")


AUTOTUNE_KEY = ["M", "C_out", "C", "H", "W", "R", "S", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
                "HAS_BIAS", "HAS_RESIDUAL", "RELU", "STATS", "PROLOGUE", "PROLOGUE_RELU", "INPUT_PRECISION", "FLAT_K"]
"""What a tuned config is cached under (Triton adds the tensors' dtypes): the convolution's
shape and every constexpr that changes the compiled code except the tile itself, so two
kernels with the same GEMM shape but another epilogue, prologue or input precision are
tuned apart."""

SPILL_FREE_CONFIGS: dict[tuple[str, str, str, str], frozenset[str]] = {
    ("sm_90", "epilogue", "16-bit", "taps"):
        frozenset({"128x128x64-w8-s3", "128x128x32-w8-s4", "128x64x64-w8-s3", "64x64x64-w4-s4", "128x64x32-w4-s4",
                   "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_90", "epilogue", "16-bit", "flat-k"):
        frozenset({"128x128x32-w8-s4", "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_90", "epilogue", "tf32", "taps"):
        frozenset({"128x128x64-w8-s3", "128x128x32-w8-s4", "128x64x64-w8-s3", "64x64x64-w4-s4", "128x64x32-w4-s4",
                   "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_90", "epilogue", "tf32", "flat-k"):
        frozenset({"128x128x32-w8-s4", "64x64x32-w4-s4"}),
    ("sm_90", "epilogue", "fp32-ieee", "taps"):
        frozenset({"64x64x32-w4-s4", "64x64x16-w4-s4", "64x32x32-w4-s3", "64x32x16-w4-s4"}),
    ("sm_90", "epilogue", "fp32-ieee", "flat-k"):
        frozenset({"64x64x32-w4-s4", "64x64x32-w8-s3", "64x32x32-w4-s3", "64x32x16-w4-s4"}),
    ("sm_90", "stats", "16-bit", "taps"):
        frozenset({"128x128x64-w8-s3", "128x128x32-w8-s4", "128x64x64-w8-s3", "64x64x64-w4-s4", "128x64x32-w4-s4",
                   "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_90", "stats", "16-bit", "flat-k"):
        frozenset({"128x128x32-w8-s4", "64x64x64-w4-s4", "64x64x32-w4-s4"}),
    ("sm_90", "stats", "tf32", "taps"):
        frozenset({"128x128x64-w8-s3", "128x128x32-w8-s4", "128x64x64-w8-s3", "64x64x64-w4-s4", "128x64x32-w4-s4",
                   "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_90", "stats", "tf32", "flat-k"):
        frozenset({"128x128x32-w8-s4", "64x64x32-w4-s4"}),
    ("sm_90", "stats", "fp32-ieee", "taps"):
        frozenset({"64x64x32-w4-s4", "64x64x16-w4-s4", "64x32x32-w4-s3", "64x32x16-w4-s4"}),
    ("sm_90", "stats", "fp32-ieee", "flat-k"):
        frozenset({"64x64x32-w8-s3", "64x64x16-w4-s4", "64x32x32-w4-s3"}),
    ("sm_90", "stats+prologue", "16-bit", "taps"):
        frozenset({"128x128x64-w8-s3", "128x128x32-w8-s4", "128x64x64-w8-s3", "64x64x64-w4-s4", "128x64x32-w4-s4",
                   "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_90", "stats+prologue", "16-bit", "flat-k"):
        frozenset({"128x128x32-w8-s4", "128x64x64-w8-s3", "64x64x64-w4-s4", "64x64x32-w4-s4"}),
    ("sm_90", "stats+prologue", "tf32", "taps"):
        frozenset({"128x128x64-w8-s3", "128x128x32-w8-s4", "128x64x64-w8-s3", "64x64x64-w4-s4", "128x64x32-w4-s4",
                   "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_90", "stats+prologue", "tf32", "flat-k"):
        frozenset({"128x128x32-w8-s4", "64x64x32-w4-s4"}),
    ("sm_90", "stats+prologue", "fp32-ieee", "taps"):
        frozenset({"64x64x32-w4-s4", "64x64x16-w4-s4", "64x32x32-w4-s3", "64x32x16-w4-s4"}),
    ("sm_90", "stats+prologue", "fp32-ieee", "flat-k"):
        frozenset({"64x64x32-w4-s4", "64x64x32-w8-s3", "64x64x16-w4-s4", "64x32x32-w4-s3", "64x32x16-w4-s4"}),
    ("sm_80", "epilogue", "16-bit", "taps"):
        frozenset({"128x128x32-w8-s4", "128x64x64-w8-s3", "64x64x64-w4-s4", "128x64x32-w4-s4", "64x128x32-w4-s4",
                   "64x64x32-w4-s4"}),
    ("sm_80", "epilogue", "16-bit", "flat-k"):
        frozenset({"128x128x32-w8-s4", "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_80", "epilogue", "tf32", "taps"):
        frozenset({"128x128x32-w8-s4", "128x64x64-w8-s3", "128x64x32-w4-s4", "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_80", "epilogue", "tf32", "flat-k"):
        frozenset({"64x64x32-w4-s4"}),
    ("sm_80", "epilogue", "fp32-ieee", "taps"):
        frozenset({"64x64x32-w4-s4", "64x64x32-w8-s3", "64x32x32-w4-s3", "64x32x16-w4-s4"}),
    ("sm_80", "epilogue", "fp32-ieee", "flat-k"):
        frozenset({"64x64x32-w4-s4", "64x64x32-w8-s3", "64x64x16-w4-s4", "64x32x32-w4-s3", "64x32x16-w4-s4"}),
    ("sm_80", "stats", "16-bit", "taps"):
        frozenset({"128x128x32-w8-s4", "128x64x64-w8-s3", "64x64x64-w4-s4", "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_80", "stats", "16-bit", "flat-k"):
        frozenset({"128x128x32-w8-s4", "128x64x32-w4-s4", "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_80", "stats", "tf32", "taps"):
        frozenset({"128x128x32-w8-s4", "128x64x64-w8-s3", "128x64x32-w4-s4"}),
    ("sm_80", "stats", "tf32", "flat-k"):
        frozenset({"64x64x32-w4-s4"}),
    ("sm_80", "stats", "fp32-ieee", "taps"):
        frozenset({"64x64x32-w4-s4", "64x64x16-w4-s4", "64x32x16-w4-s4"}),
    ("sm_80", "stats", "fp32-ieee", "flat-k"):
        frozenset({"64x64x32-w4-s4", "64x64x32-w8-s3", "64x64x16-w4-s4", "64x32x32-w4-s3", "64x32x16-w4-s4"}),
    ("sm_80", "stats+prologue", "16-bit", "taps"):
        frozenset({"128x128x32-w8-s4", "128x64x64-w8-s3", "64x64x64-w4-s4", "128x64x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_80", "stats+prologue", "16-bit", "flat-k"):
        frozenset({"128x128x32-w8-s4", "128x64x64-w8-s3", "64x64x64-w4-s4", "64x128x32-w4-s4", "64x64x32-w4-s4"}),
    ("sm_80", "stats+prologue", "tf32", "taps"):
        frozenset({"128x128x32-w8-s4", "64x64x32-w4-s4"}),
    ("sm_80", "stats+prologue", "tf32", "flat-k"):
        frozenset({"64x64x32-w4-s4"}),
    ("sm_80", "stats+prologue", "fp32-ieee", "taps"):
        frozenset({"64x32x32-w4-s3", "64x32x16-w4-s4"}),
    ("sm_80", "stats+prologue", "fp32-ieee", "flat-k"):
        frozenset({"64x64x32-w8-s3", "64x64x16-w4-s4", "64x32x32-w4-s3", "64x32x16-w4-s4"}),
}
"""(architecture, epilogue, input, K tiling) -> the names of the configs autotuning may try
there: those that compile without register spills (``ptxas -v`` on the kernel built as the
runtime specialises it, for ResNet-50's layer kinds; tests/test_triton_conv2d_compile.py
checks it, and ``python tests/conv2d_compile.py --table`` measures it anew) under both
Triton versions measured, 3.8 (CI's) and 3.6 (the lent GPU machine's): register allocation
differs between them, so a config is kept only where neither spills. A config that spills
is never timed or chosen, except in :data:`SPILLING_ON_TRITON_3_6`. Architectures other
than sm_80 and sm_90 use the nearest measured one (:func:`architecture`)."""

SPILLING_ON_TRITON_3_6: frozenset[tuple[str, str, str, str]] = frozenset({
    ("sm_80", "stats+prologue", "16-bit", "flat-k"),
    ("sm_90", "stats+prologue", "16-bit", "flat-k"),
    ("sm_90", "stats", "fp32-ieee", "taps"),
})
"""Variants where every config of :data:`CONFIGS` spills under Triton 3.6 (their entries above
are Triton 3.8's spill-free configs): a BatchNorm prologue on inputs of fewer than 16
channels (flat K; in a ResNet the prologue follows a BatchNorm of at least 16 channels, so
only tests build it) and IEEE-float32 statistics on sm_90 (fused training in float32 with
TF32 turned off). Smaller tiles would be needed there; the compile tests allow these spills
on Triton 3.6 only."""

STATS_BLOCK_MS = (128, 64)
"""M tiles of the statistics epilogue, largest first (:func:`stats_block_m` picks one per
shape; the workspace has one row per M tile)."""
STATS_PROGRAMS_BLOCK_N = 128
"""The N tile assumed when counting a statistics launch's programs for :func:`stats_block_m`."""
DEFAULT_SM_COUNT = 132  # H100 SXM: the SM count assumed without a device
INTERPRETER_SM_COUNT = 1
"""The SM count the interpreter assumes (tests raise it to exercise the smaller M tiles)."""
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
"""The tiles used under ``TRITON_INTERPRET=1`` (the statistics M tile may be halved, see
:func:`stats_block_m`)."""
COMBINE_BLOCK_S = 32  # workspace rows per step of the statistics merge
COMBINE_BLOCK_C = 32  # channels per program of the statistics merge
AUTOTUNE_ENV = "RESNET_FAST_AUTOTUNE"
_OFF, _ON = {"0", "false", "no", "off"}, {"", "1", "true", "yes", "on"}


def autotune_enabled() -> bool:
    """Whether the convolutions autotune their tiles: yes unless ``RESNET_FAST_AUTOTUNE=0``
    (read at every launch). Off, every shape runs one fixed config (:func:`fixed_config`),
    as under ``torch.use_deterministic_algorithms(True)``."""
    value = os.environ.get(AUTOTUNE_ENV, "1").strip().lower()
    if value not in _OFF | _ON:
        raise ValueError(f"{AUTOTUNE_ENV} must be 0 or 1, got {os.environ[AUTOTUNE_ENV]!r}")
    return value in _ON


def conv_fp32_precision() -> str:
    """torch's float32 precision for cuDNN convolutions, ``"tf32"`` or ``"ieee"``: the
    current API (``torch.backends.cudnn.conv.fp32_precision``, where ``"none"`` defers to
    ``torch.backends.cudnn.fp32_precision`` and then ``torch.backends.fp32_precision``),
    and ``torch.backends.cudnn.allow_tf32`` only on torch versions without it."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        return "tf32" if cudnn.allow_tf32 else "ieee"
    for level in (conv, cudnn, torch.backends):
        precision = getattr(level, "fp32_precision", "none")
        if precision != "none":
            return "tf32" if precision == "tf32" else "ieee"
    return "ieee"


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


@triton.jit
def _stats_merge_kernel(src_ptr, dst_ptr, mean_ptr, var_ptr, C, rows, rows_per_group,
                        FINAL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan's merge of the rows ``[g * rows_per_group, (g + 1) * rows_per_group)`` of a
    (3, rows, C) float32 workspace of (count, mean, M2), g = program_id(0): into row g of
    ``dst`` (3, groups, C), or with ``FINAL`` into the per-channel mean and biased variance.
    Two passes (the mean, then M2 about it), in a fixed order: deterministic."""
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    first = group * rows_per_group
    last = tl.minimum(first + rows_per_group, rows)
    plane = rows * C
    offs_s = tl.arange(0, BLOCK_S)
    ref = tl.load(src_ptr + plane + first * C + cols, mask=cmask, other=0.0)  # the group's first mean
    total = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    moved = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for s0 in range(first, last, BLOCK_S):
        s = s0 + offs_s
        mask = (s < last)[:, None] & cmask[None, :]
        idx = s[:, None] * C + cols[None, :]
        n = tl.load(src_ptr + idx, mask=mask, other=0.0)
        m = tl.load(src_ptr + plane + idx, mask=mask, other=0.0)
        total += n
        moved += n * (m - ref[None, :])
    count = tl.where(cmask, tl.sum(total, axis=0), 1.0)
    mean = ref + tl.math.div_rn(tl.sum(moved, axis=0), count)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for s0 in range(first, last, BLOCK_S):
        s = s0 + offs_s
        mask = (s < last)[:, None] & cmask[None, :]
        idx = s[:, None] * C + cols[None, :]
        n = tl.load(src_ptr + idx, mask=mask, other=0.0)
        d = tl.load(src_ptr + plane + idx, mask=mask, other=0.0) - mean[None, :]
        m2 += tl.load(src_ptr + 2 * plane + idx, mask=mask, other=0.0) + n * d * d
    total_m2 = tl.sum(m2, axis=0)
    if FINAL:
        tl.store(mean_ptr + cols, mean, mask=cmask)
        tl.store(var_ptr + cols, tl.math.div_rn(total_m2, count), mask=cmask)
    else:
        dst_plane = tl.num_programs(0) * C
        tl.store(dst_ptr + group * C + cols, count, mask=cmask)
        tl.store(dst_ptr + dst_plane + group * C + cols, mean, mask=cmask)
        tl.store(dst_ptr + 2 * dst_plane + group * C + cols, total_m2, mask=cmask)


KERNELS = {"conv2d": _conv2d_kernel, "stats_merge": _stats_merge_kernel}
"""Every Triton kernel of this module, by name (the ahead-of-time compile test walks it)."""

INTERPRETED = not isinstance(_conv2d_kernel, triton.runtime.JITFunction)

_FLOAT32_POINTERS = {"bias_ptr", "scale_ptr", "shift_ptr", "ws_ptr"}


def compile_example(flat_k: bool = False, input_precision: str = "ieee") -> tuple[dict[str, str], dict]:
    """Signature and constexprs compiling :func:`_conv2d_kernel` ahead of time with every
    prologue and epilogue stage on (one compile covers all the code) and the first tile
    configuration; per-channel vectors and the statistics workspace are float32. (What
    the runtime builds, config by config, is compiled by tests/test_triton_conv2d_compile.py.)"""
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
    register_compile_example(
        __name__, "_stats_merge_kernel", _stats_merge_kernel,
        {"src_ptr": "*fp32", "dst_ptr": "*fp32", "mean_ptr": "*fp32", "var_ptr": "*fp32", "C": "i32", "rows": "i32",
         "rows_per_group": "i32", "FINAL": "constexpr", "BLOCK_S": "constexpr", "BLOCK_C": "constexpr"},
        {"FINAL": True, "BLOCK_S": COMBINE_BLOCK_S, "BLOCK_C": COMBINE_BLOCK_C})


# ------------------------------------------------------------------------ tile choice
def architecture(capability: tuple[int, int]) -> str:
    """The measured architecture whose spill table applies: ``"sm_90"`` from 9.0 up, else ``"sm_80"``."""
    return "sm_90" if capability[0] >= 9 else "sm_80"


Variant = tuple[str, str, str]
"""(epilogue, input, K tiling) of a compiled kernel: ``"epilogue"`` (bias, residual, ReLU),
``"stats"`` or ``"stats+prologue"``; ``"16-bit"`` (float16/bfloat16), ``"tf32"`` or
``"fp32-ieee"``; ``"taps"`` or ``"flat-k"``. Register use, and so spilling, follows all three."""


def variant(stats: bool, prologue: bool, dtype: torch.dtype, c_in: int) -> Variant:
    """The :data:`Variant` of a launch."""
    kind = ("stats+prologue" if prologue else "stats") if stats else "epilogue"
    if dtype == torch.float32:
        precision = "tf32" if _input_precision(dtype) == "tf32" else "fp32-ieee"
    else:
        precision = "16-bit"
    return kind, precision, "flat-k" if c_in < FLAT_K_BELOW_CHANNELS else "taps"


def configs_for(arch: str, kind: Variant, block_m: Optional[int] = None) -> list[triton.Config]:
    """The spill-free configs (:data:`SPILL_FREE_CONFIGS`) for variant ``kind`` on ``arch``,
    with M tile ``block_m`` when given, in :data:`CONFIGS`' order: all autotuning may try."""
    allowed = SPILL_FREE_CONFIGS[(arch, *kind)]
    return [c for c in CONFIGS if config_name(c) in allowed and (block_m is None or c.kwargs["BLOCK_M"] == block_m)]


@functools.lru_cache(maxsize=None)
def _autotuner(arch: str, kind: Variant, block_m: Optional[int]):
    """The autotuned kernel over :func:`configs_for`; tuning results cached on disk
    (Triton's ``cache_results``), so a later process does not time the configs again."""
    return triton.autotune(configs=configs_for(arch, kind, block_m), key=AUTOTUNE_KEY,
                           cache_results=True)(_conv2d_kernel)


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def _device(device: torch.device) -> tuple[tuple[int, int], int]:
    """(compute capability, SM count) of ``device``; sm_90 with :data:`DEFAULT_SM_COUNT` without one."""
    if device.type == "cuda":
        return _device_facts(device.index if device.index is not None else torch.cuda.current_device())
    return (9, 0), (INTERPRETER_SM_COUNT if INTERPRETED else DEFAULT_SM_COUNT)


def stats_block_m(m: int, c_out: int, sm_count: int, choices: Sequence[int] = STATS_BLOCK_MS) -> int:
    """The statistics epilogue's M tile for M output pixels and C_out channels: the largest
    of ``choices`` (interpreted: the interpreter's M tile and its half) that still gives
    every SM a program (N tiles of :data:`STATS_PROGRAMS_BLOCK_N`), else the smallest.
    Small per-GPU batches (layer4 at batch 32) get the smaller tile."""
    if INTERPRETED:
        choices = (INTERPRETER_BLOCKS["BLOCK_M"], INTERPRETER_BLOCKS["BLOCK_M"] // 2)
        block_n = INTERPRETER_BLOCKS["BLOCK_N"]
    else:
        block_n = STATS_PROGRAMS_BLOCK_N
    for block_m in choices:
        if _cdiv(m, block_m) * _cdiv(c_out, block_n) >= sm_count:
            return block_m
    return choices[-1]


def fixed_config(m: int, c_out: int, configs: Sequence[triton.Config], sm_count: int) -> triton.Config:
    """One config per shape, no timing: of ``configs``, those no wider than C_out needs,
    the largest tile that still gives every SM a program (else the one with most programs);
    ties keep :data:`CONFIGS`' order. Used when autotuning is off or determinism is asked."""
    width = max(64, triton.next_power_of_2(c_out))
    fitting = [c for c in configs if c.kwargs["BLOCK_N"] <= width] or list(configs)

    def programs(c: triton.Config) -> int:
        return _cdiv(m, c.kwargs["BLOCK_M"]) * _cdiv(c_out, c.kwargs["BLOCK_N"])

    full = [c for c in fitting if programs(c) >= sm_count]
    if full:
        return max(full, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    return max(fitting, key=programs)


def launch_plan(m: int, c_out: int, device: torch.device, stats: bool, prologue: bool, dtype: torch.dtype,
                c_in: int) -> dict:
    """How the convolution launches for this shape: ``{"block_m": statistics M tile or None,
    "autotune": bool, "config": fixed config or None, "arch": ..., "variant": ...}``.
    Autotuned unless :func:`autotune_enabled` is off or
    ``torch.are_deterministic_algorithms_enabled()`` (the statistics' reduction order
    follows the config's warps, so determinism needs one config per shape)."""
    capability, sm_count = _device(device)
    arch, kind = architecture(capability), variant(stats, prologue, dtype, c_in)
    plan = {"block_m": None, "autotune": False, "config": None, "arch": arch, "variant": kind}
    if INTERPRETED:  # the interpreter's tiles (INTERPRETER_BLOCKS)
        plan["block_m"] = stats_block_m(m, c_out, sm_count) if stats else None
        return plan
    if stats:  # an M tile with spill-free configs for this variant
        plan["block_m"] = stats_block_m(m, c_out, sm_count,
                                        [b for b in STATS_BLOCK_MS if configs_for(arch, kind, b)])
    plan["autotune"] = autotune_enabled() and not torch.are_deterministic_algorithms_enabled()
    if not plan["autotune"]:
        plan["config"] = fixed_config(m, c_out, configs_for(arch, kind, plan["block_m"]), sm_count)
    return plan


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
    """``"tf32"`` for float32 input when torch lets cuDNN convolutions use TF32, else ``"ieee"``."""
    if dtype == torch.float32 and not INTERPRETED and conv_fp32_precision() == "tf32":
        return "tf32"
    return "ieee"


def kernel_arguments(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], out: Tensor,
                     scale: Optional[Tensor], shift: Optional[Tensor], ws: Optional[Tensor],
                     stride, padding, dilation, relu: bool, prologue_relu: bool) -> tuple[tuple, dict]:
    """(positional arguments, constexpr flags) of one :func:`_conv2d_kernel` launch, without
    the tile configuration: what the launcher passes, and what the ahead-of-time compile
    tests specialise exactly as the runtime does. ``x``/``weight`` as :func:`_prepare` gives
    them; per-channel vectors (``bias``, ``scale``, ``shift``) contiguous."""
    n, c, h, w = (int(d) for d in x.shape)
    _, c_out, p, q = (int(d) for d in out.shape)
    r, s = int(weight.shape[2]), int(weight.shape[3])
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu, STATS=ws is not None,
                 PROLOGUE=scale is not None, PROLOGUE_RELU=prologue_relu,
                 INPUT_PRECISION=_input_precision(x.dtype), FLAT_K=c < FLAT_K_BELOW_CHANNELS, GROUP_M=GROUP_M)
    args = (x, weight, out if bias is None else bias, out if residual is None else residual, out,
            out if scale is None else scale, out if shift is None else shift, out if ws is None else ws,
            n * p * q, c, h, w, p, q, c_out, r, s, stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1], *x.stride(), *weight.stride(), *out.stride())
    return args, flags


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], out: Tensor,
            scale: Optional[Tensor], shift: Optional[Tensor], ws: Optional[Tensor], plan: dict,
            stride, padding, dilation, relu: bool, prologue_relu: bool) -> None:
    """One launch of :func:`_conv2d_kernel` as ``plan`` (:func:`launch_plan`) says."""
    args, flags = kernel_arguments(x, weight, bias, residual, out, scale, shift, ws, stride, padding, dilation,
                                   relu, prologue_relu)
    m, c_out = args[8], args[14]
    if INTERPRETED:
        blocks = dict(INTERPRETER_BLOCKS)
        if plan["block_m"] is not None:
            blocks["BLOCK_M"] = plan["block_m"]
        grid = (_cdiv(m, blocks["BLOCK_M"]) * _cdiv(c_out, blocks["BLOCK_N"]),)
        _conv2d_kernel[grid](*args, **flags, **blocks)
        return

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),)

    if plan["autotune"]:
        wrap_triton(_autotuner(plan["arch"], plan["variant"], plan["block_m"]))[grid](*args, **flags)
    else:
        wrap_triton(_conv2d_kernel)[grid](*args, **flags, **plan["config"].all_kwargs())


def merge_groups(rows: int) -> tuple[int, int]:
    """(rows per group, groups) of the statistics merge's first level over ``rows`` M tiles:
    about sqrt(rows) rows per group (a multiple of :data:`COMBINE_BLOCK_S`), so both levels
    loop over about sqrt(rows) rows. One group means a single, final launch."""
    per_group = COMBINE_BLOCK_S * max(1, _cdiv(math.isqrt(max(rows, 1) - 1) + 1, COMBINE_BLOCK_S))
    return per_group, _cdiv(rows, per_group)


def _merge_statistics(ws: Tensor, mean: Tensor, var: Tensor) -> None:
    """Per-channel mean and biased variance from the (3, M tiles, C_out) workspace: a
    parallel two-level Chan merge (:func:`merge_groups`) with a fixed order, deterministic."""
    _, rows, c_out = ws.shape
    per_group, groups = merge_groups(rows)
    kernel = _stats_merge_kernel if INTERPRETED else wrap_triton(_stats_merge_kernel)
    c_blocks = _cdiv(c_out, COMBINE_BLOCK_C)
    blocks = dict(BLOCK_S=COMBINE_BLOCK_S, BLOCK_C=COMBINE_BLOCK_C)
    if groups == 1:
        kernel[(1, c_blocks)](ws, ws, mean, var, c_out, rows, rows, FINAL=True, **blocks)
        return
    partial = _empty((3, groups, c_out), dtype=torch.float32, device=ws.device)
    kernel[(groups, c_blocks)](ws, partial, mean, var, c_out, rows, per_group, FINAL=False, **blocks)
    kernel[(1, c_blocks)](partial, partial, mean, var, c_out, groups, groups, FINAL=True, **blocks)


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
        if bias is not None:
            bias = bias.contiguous()  # the kernel reads per-channel vectors with stride 1
        plan = launch_plan(out.shape[0] * out.shape[2] * out.shape[3], out.shape[1], x.device, stats=False,
                           prologue=False, dtype=x.dtype, c_in=x.shape[1])
        _launch(x, weight, bias, residual, out, None, None, None, plan, stride, padding, dilation, relu, False)
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
    plan = launch_plan(n * p * q, c_out, x.device, stats=True, prologue=prologue_scale is not None, dtype=x.dtype,
                       c_in=x.shape[1])
    ws = _empty((3, _cdiv(n * p * q, plan["block_m"]), c_out), dtype=torch.float32, device=x.device)
    if out.numel() == 0 or not _launches(x):
        return out, mean, var
    if prologue_scale is not None:
        prologue_scale = prologue_scale.contiguous()
        prologue_shift = prologue_shift.contiguous()
    _launch(x, weight, None, None, out, prologue_scale, prologue_shift, ws, plan, stride, padding, dilation,
            False, prologue_relu)
    _merge_statistics(ws, mean, var)
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
