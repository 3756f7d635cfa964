"""Triton kernels for ``resnet_fast::batch_norm_act`` (forward, backward) and ``conv_bn_act``.

The ``triton`` backend of the BatchNorm-family operators: the math of
:mod:`resnet_fast.ops.reference` at the bandwidth floor. Per channel c over the
M = N*H*W values of the normalised tensor x:

Forward, training (two launches; x is read twice from DRAM, out written once):

1. ``_bn_stats_*`` — one read of x. A grid of (channel block, split) programs; each split
   covers a range of rows (NHWC) or of (image, pixel) tiles (NCHW) and accumulates,
   in float32, shifted sums S1 = sum(x - K), S2 = sum((x - K)^2) with K the mean of
   the program's first tile (so a mean offset of 1000 costs no precision), then writes
   its (mean, M2) per channel and its count to a small float32 workspace.
2. ``_bn_apply_*`` — its prologue merges the partials of the program's channels
   (``_merged_statistics``: Chan's parallel merge, one pass in split order, so every
   program of a channel gets the same bits and split 0's programs store mean and var —
   deterministic, no atomics, nothing to reset between CUDA-graph replays); then one read
   of x (and the residual), one write of out:
   y = (x - mean) * scale + bias (+ residual) (ReLU), scale = weight / sqrt(var + eps).
   (x - mean first, not x * scale + shift: with a large mean the two products would
   cancel.)

Forward, eval: only ``_bn_apply_*``, with the running statistics.

Running statistics (the separate operator ``update_running_stats``, after a training
forward): ``_update_running_stats_kernel``, one program, in place in buffers of any
strides, num_batches_tracked incremented and f = 1 / num_batches_tracked read on the
device (momentum None) — one launch where the PyTorch composition takes 10 (15).

Backward, with dy' = dy * (out > 0) under a ReLU (the mask recomputed from ``out``):

1. ``_bn_bwd_reduce_*`` — one read of dy, x (and out): per-split float32 sums of dy' and
   dy' * (x - mean) into a (2, splits, C) workspace. It also writes d_residual = dy'
   when asked, and in eval mode dx = weight * invstd * dy'.
2. Training: ``_bn_bwd_dx_*`` — its prologue merges the sums of its channels
   (``_merged_sums``): grad_bias = sum(dy'), grad_weight = invstd * sum(dy' (x - mean)),
   stored by split 0's programs; then one read of dy and out — or of d_residual = dy'
   alone when the reduction wrote it — and of x, one write of dx:
   dx = a dy' + k1 (x - mean) + k0 with a = weight * invstd,
   k1 = -a * invstd * grad_weight / M, k0 = -a * grad_bias / M.
   Eval: ``_bn_bwd_combine_kernel`` writes grad_weight and grad_bias (dx is already written).

Launches and DRAM bytes per layer, for E = N*C*H*W elements of b bytes (ReLU; R = 1
with a residual add, whose gradient is then written, else 0):

=================  ========  ====================================================
pass               launches  bytes
=================  ========  ====================================================
training forward   2 + 1     (3 + R) E b: stats reads x; apply reads x (+ residual),
                             writes out; + the running-statistics update (C elements)
training backward  2         7 E b: reduce reads dy, out, x (+ writes dy'); dx reads
                             dy, out, x — or dy', x with a residual — writes dx
eval forward       1         (2 + R) E b
eval backward      2         (4 + R) E b
=================  ========  ====================================================

Without a ReLU ``out`` is not read: 5 E b backward in training. Besides these, each apply
(dx) program reads its channels' partials from L2: (2 BLOCK_C + 1) * 4 bytes (2 BLOCK_C *
4) per statistics (reduction) split. A ResNet-50 training step (53 BatchNorms) launches
265 kernels for them, running-statistics updates included (before: 318 Triton kernels,
a combine after each reduction, and 530 PyTorch kernels for the updates); at batch 256, bf16,
224x224 on 132 SMs the BatchNorm passes move 19.9 GB forward and 38.3 GB backward
(41.1 GB when dx re-read dy and out in the 16 residual layers), and the merges read
2.4 GB from L2 (0.04 GB with separate combine kernels).

Layouts: channels_last (NHWC) is an (M, C) row-major matrix, tiled [BLOCK_M, BLOCK_C]
with contiguous (16-byte vectorisable) loads along C. Contiguous NCHW is treated as
(N, C, HW): every kernel gives each program one channel and tiles [BLOCK_N, BLOCK_HW]
over (image, pixel). H*W == 1 uses the NHWC kernels (the memory is the same). Other
strides are made contiguous first, and so are per-channel vectors (weight, bias, running
statistics, mean, var: the kernels index them with stride 1). Per-element offsets are
formed from int64 row offsets, so tensors past 2^31 elements work.

No host synchronisation anywhere (CUDA graphs capture it); the launchers are
``torch.library.triton_op`` operators (``resnet_fast::triton_batch_norm_act_forward``,
``resnet_fast::triton_batch_norm_act_backward``) calling the kernels through
``wrap_triton``, so torch.compile can see into them; their fake implementations are
the launchers themselves, traced with fake tensors (as ``triton_op`` does).

Block sizes and the number of splits come from a few fixed rules (no autotuning): tiles
of :data:`TILE` (statistics), :data:`BACKWARD_TILE` (backward reduction, three input
streams) and :data:`ELEMENTWISE_TILE` elements, at most :data:`MAX_BLOCK_C` channels
(NHWC) or :data:`MAX_BLOCK_HW` pixels (NCHW) wide, :data:`NUM_WARPS` warps, and enough
splits for :data:`PROGRAMS_PER_SM` programs per SM in the reductions and
:data:`ELEMENTWISE_PROGRAMS_PER_SM` in the apply and dx kernels (fewer, longer programs:
each merges the partials once) — the device's SM count, 132 without one — while every
split keeps at least :data:`MIN_TILES_PER_SPLIT` tiles. Merges step through
:data:`COMBINE_BLOCK_S` splits at a time. The module-level constants are read at each
call (the tests shrink them to exercise loops, tails and multi-split merges on tiny
inputs). ``_stats_combine_kernel`` merges the (count, mean, M2) workspace of
:mod:`resnet_fast.kernels.conv2d`'s statistics epilogue.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from resnet_fast.kernels import register_compile_example, register_device_function
from resnet_fast.ops.common import output_memory_format
from resnet_fast.ops.dispatch import register_kernel

USES_TENSOR_CORES = False  # reductions and elementwise only: fine on sm_70/sm_75 too

_empty = torch.empty  # every output and workspace comes from here (tests poison it with NaN)

# ----------------------------------------------------------------------------- heuristics
TILE = 4096  # statistics: elements per program per loop step (32 per thread with 4 warps)
BACKWARD_TILE = 2048  # backward reduction (three input streams): keeps it near 110 registers
ELEMENTWISE_TILE = 4096  # elementwise kernels: elements per program
MAX_BLOCK_C = 64  # NHWC: channels per tile (128 bytes of a 16-bit row)
MAX_BLOCK_HW = 1024  # NCHW: pixels per tile row
PROGRAMS_PER_SM = 4  # reduction grids aim at this many programs per SM
ELEMENTWISE_PROGRAMS_PER_SM = 2  # apply / dx grids: fewer, longer programs (each merges the partials once)
MIN_TILES_PER_SPLIT = 4  # ... but never split a channel below this many tiles per program
DEFAULT_SM_COUNT = 132  # H100 SXM, when there is no GPU to ask (interpreter, tracing)
NUM_WARPS = 4
COMBINE_BLOCK_S = 32  # splits per step of a partials merge
COMBINE_BLOCK_C = 32  # channels per program of the standalone combine kernels
UPDATE_BLOCK_C = 1024  # running-statistics update: channels per loop step of its one program


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SM_COUNT


def _nhwc_blocks(rows: int, channels: int, tile: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) for an (rows, channels) row-major matrix."""
    block_c = min(_pow2(channels), MAX_BLOCK_C)
    block_m = max(1, min(tile // block_c, _pow2(rows)))
    return block_m, block_c


def _row_hw_blocks(rows: int, hw: int, tile: int) -> tuple[int, int]:
    """(BLOCK_rows, BLOCK_HW) for NCHW tiles: pixels contiguous, rows strided."""
    block_hw = min(_pow2(hw), MAX_BLOCK_HW)
    block_r = max(1, min(tile // block_hw, _pow2(rows)))
    return block_r, block_hw


def _split(tiles: int, parallel: int, programs: int) -> tuple[int, int]:
    """Split ``tiles`` tiles of one channel block over programs: (tiles per split, splits).

    Aims at ``programs`` programs over ``parallel`` channel blocks, with at least
    ``MIN_TILES_PER_SPLIT`` tiles per program; every split is non-empty.
    """
    wanted = _cdiv(programs, parallel)
    splits = max(1, min(wanted, _cdiv(tiles, MIN_TILES_PER_SPLIT)))
    per_split = _cdiv(tiles, splits)
    return per_split, _cdiv(tiles, per_split)


class _Reduction:
    """Grid and split geometry of a per-channel pass over a 4-D tensor: programs
    (channel block, split), each covering a range of rows (NHWC) or of (image, pixel) tiles
    of one channel (NCHW). The reductions and the elementwise kernels share it."""

    def __init__(self, shape: Sequence[int], nhwc: bool, programs: int, tile: int) -> None:
        n, c, h, w = (int(s) for s in shape)
        hw = h * w
        self.nhwc, self.channels, self.count = nhwc, c, n * hw
        if nhwc:
            rows = n * hw
            self.block_r, self.block_k = _nhwc_blocks(rows, c, tile)
            c_blocks = _cdiv(c, self.block_k)
            per_split, splits = _split(_cdiv(rows, self.block_r), c_blocks, programs)
            self.rows_per_split = per_split * self.block_r
            self.splits_r, self.splits_k, self.k_per_split = splits, 1, 0
            self.grid = (c_blocks, splits)
        else:
            self.block_r, self.block_k = _row_hw_blocks(n, hw, tile)
            n_tiles, hw_tiles = _cdiv(n, self.block_r), _cdiv(hw, self.block_k)
            per_split, splits = _split(n_tiles * hw_tiles, c, programs)
            # Split images first, then pixels when there are too few images.
            splits_n = min(splits, n_tiles)
            n_per = _cdiv(n_tiles, splits_n)
            splits_n = _cdiv(n_tiles, n_per)
            splits_hw = min(max(1, splits // splits_n), hw_tiles)
            hw_per = _cdiv(hw_tiles, splits_hw)
            splits_hw = _cdiv(hw_tiles, hw_per)
            self.rows_per_split, self.k_per_split = n_per * self.block_r, hw_per * self.block_k
            self.splits_r, self.splits_k = splits_n, splits_hw
            self.grid = (c, splits_n * splits_hw)
        self.splits = self.grid[1]
        if self.splits > 65535:
            raise ValueError(f"too many reduction splits ({self.splits}) for a grid axis")


def _reduction_grid(x: Tensor, nhwc: bool, tile: int) -> _Reduction:
    """Geometry of a statistics or backward-reduction pass over ``x``."""
    return _Reduction(x.shape, nhwc, PROGRAMS_PER_SM * _sm_count(x.device), tile)


def _elementwise_grid(x: Tensor, nhwc: bool) -> _Reduction:
    """Geometry of an apply or dx pass over ``x``."""
    return _Reduction(x.shape, nhwc, ELEMENTWISE_PROGRAMS_PER_SM * _sm_count(x.device), ELEMENTWISE_TILE)


# ----------------------------------------------------------------------------- kernels
# Element loops call no @triton.jit helpers: the CPU interpreter pays milliseconds per
# helper call, which the tests cannot afford inside loops (the partials merges below run
# once per program). Per-channel values (mean, invstd = 1 / sqrt(var + eps),
# scale = weight * invstd) are computed at the top of each program with IEEE division and
# square root; element loops use only +, -, *.


# Kernel names start with "_bn_" (or say "running_stats"): profiler traces name kernels by
# function, and resnet_fast.bench.trace files those under normalisation.
#
# Split geometry (rows or tiles per split, number of splits) varies from layer to layer:
# not specialised (== 1, divisible by 16), so each kernel compiles once per flag set and
# dtype instead of once per geometry class.
_ROW_SPLITS = ("rows_per_split",)
_TILE_SPLITS = ("n_per_split", "hw_per_split", "splits_hw")


@triton.jit(do_not_specialize=_ROW_SPLITS + ("num_splits",))
def _bn_stats_nhwc_kernel(x_ptr, ws_ptr, M, C, rows_per_split, num_splits,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, M2) per (split, channel) of rows [s * rows_per_split, ...) of (M, C) x, and each
    split's count (written by the first channel block)."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    offs_m = tl.arange(0, BLOCK_M)
    r_start = pid_s.to(tl.int64) * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, M)

    # Shift K per channel: the mean of this program's first tile (read again below, from L2).
    rows = r_start + offs_m
    mask = (rows < r_end)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + (rows * C)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    first = tl.minimum(r_end - r_start, BLOCK_M).to(tl.float32)
    shift = tl.math.div_rn(tl.sum(x, axis=0), first)

    acc1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_M):
        rows = r0 + offs_m
        mask = (rows < r_end)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + (rows * C)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - shift[None, :], 0.0)
        acc1 += d
        acc2 += d * d
    s1 = tl.sum(acc1, axis=0)
    s2 = tl.sum(acc2, axis=0)
    count = (r_end - r_start).to(tl.float32)
    mean_shift = tl.math.div_rn(s1, tl.zeros([BLOCK_C], dtype=tl.float32) + count)
    idx = pid_s * C + cols
    plane = num_splits * C
    tl.store(ws_ptr + idx, shift + mean_shift, mask=cmask)
    tl.store(ws_ptr + plane + idx, tl.maximum(s2 - s1 * mean_shift, 0.0), mask=cmask)
    if pid_c == 0:
        tl.store(ws_ptr + 2 * plane + pid_s, count)


@triton.jit(do_not_specialize=_TILE_SPLITS + ("num_splits",))
def _bn_stats_nchw_kernel(x_ptr, ws_ptr, N, C, HW, n_per_split, hw_per_split, splits_hw, num_splits,
                       BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(mean, M2) per (split, channel) of a block of images x pixels of NCHW x, and each
    split's count (written by channel 0's program)."""
    c = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_start = (pid_s // splits_hw) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    h_start = (pid_s % splits_hw) * hw_per_split
    h_end = tl.minimum(h_start + hw_per_split, HW)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_HW)

    rows = n_start + offs_n
    hws = h_start + offs_h
    mask = (rows < n_end)[:, None] & (hws < h_end)[None, :]
    row_off = (rows.to(tl.int64) * C + c) * HW
    x = tl.load(x_ptr + row_off[:, None] + hws[None, :], mask=mask, other=0.0).to(tl.float32)
    first = (tl.minimum(n_end - n_start, BLOCK_N).to(tl.float32)
             * tl.minimum(h_end - h_start, BLOCK_HW).to(tl.float32))
    shift = tl.math.div_rn(tl.sum(x), first)

    acc1 = tl.zeros([BLOCK_N, BLOCK_HW], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_HW], dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + offs_n
        rmask = rows < n_end
        row_off = (rows.to(tl.int64) * C + c) * HW
        for h0 in range(h_start, h_end, BLOCK_HW):
            hws = h0 + offs_h
            mask = rmask[:, None] & (hws < h_end)[None, :]
            x = tl.load(x_ptr + row_off[:, None] + hws[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - shift, 0.0)
            acc1 += d
            acc2 += d * d
    s1 = tl.sum(acc1)
    s2 = tl.sum(acc2)
    count = (n_end - n_start).to(tl.float32) * (h_end - h_start).to(tl.float32)
    mean_shift = tl.math.div_rn(s1, count)
    idx = pid_s * C + c
    plane = num_splits * C
    tl.store(ws_ptr + idx, shift + mean_shift)
    tl.store(ws_ptr + plane + idx, tl.maximum(s2 - s1 * mean_shift, 0.0))
    if c == 0:
        tl.store(ws_ptr + 2 * plane + pid_s, count)


@triton.jit
def _merged_statistics(ws_ptr, cols, cmask, C, num_splits, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan's merge of the statistics kernels' partials: per-channel (mean, biased var).

    With d_s = mean_s - K (K = split 0's mean), D = sum n_s d_s and N = sum n_s:
    mean = K + D / N, M2 = sum(M2_s + n_s d_s^2) - D^2 / N (>= sum M2_s, no cancellation
    beyond the between-split term). One pass over the partials, in split order: every
    program that merges a channel gets the same bits.
    """
    plane = num_splits * C
    offs_s = tl.arange(0, BLOCK_S)
    ref = tl.load(ws_ptr + cols, mask=cmask, other=0.0)
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    moved = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + offs_s
        smask = s < num_splits
        n = tl.load(ws_ptr + 2 * plane + s, mask=smask, other=0.0)[:, None]
        mask = smask[:, None] & cmask[None, :]
        idx = s[:, None] * C + cols[None, :]
        d = tl.where(mask, tl.load(ws_ptr + idx, mask=mask, other=0.0) - ref[None, :], 0.0)
        q = tl.load(ws_ptr + plane + idx, mask=mask, other=0.0)
        total += tl.sum(tl.where(mask, n, 0.0), axis=0)
        moved += tl.sum(n * d, axis=0)
        m2 += tl.sum(q + n * d * d, axis=0)
    total = tl.where(cmask, total, 1.0)
    delta = tl.math.div_rn(moved, total)
    var = tl.math.div_rn(tl.maximum(m2 - moved * delta, 0.0), total)
    return ref + delta, var


@triton.jit
def _merged_sums(ws_ptr, cols, cmask, C, num_splits, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum(dy') and sum(dy' (x - mean)) per channel from the backward reduction's partials,
    in split order (every program that merges a channel gets the same bits)."""
    offs_s = tl.arange(0, BLOCK_S)
    plane = num_splits * C
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dyx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + offs_s
        mask = (s < num_splits)[:, None] & cmask[None, :]
        idx = s[:, None] * C + cols[None, :]
        sum_dy += tl.sum(tl.load(ws_ptr + idx, mask=mask, other=0.0), axis=0)
        sum_dyx += tl.sum(tl.load(ws_ptr + plane + idx, mask=mask, other=0.0), axis=0)
    return sum_dy, sum_dyx


@triton.jit
def _stats_combine_kernel(ws_ptr, mean_ptr, var_ptr, C, num_splits,
                          BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan's merge of per-split (count, mean, M2) planes (3, splits, C) — the workspace of
    ``kernels.conv2d``'s statistics epilogue: per-channel mean and biased var."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    offs_s = tl.arange(0, BLOCK_S)
    plane = num_splits * C
    ref = tl.load(ws_ptr + plane + cols, mask=cmask, other=0.0)  # split 0's mean
    total = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    moved = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + offs_s
        mask = (s < num_splits)[:, None] & cmask[None, :]
        idx = s[:, None] * C + cols[None, :]
        n = tl.load(ws_ptr + idx, mask=mask, other=0.0)
        m = tl.load(ws_ptr + plane + idx, mask=mask, other=0.0)
        total += n
        moved += n * (m - ref[None, :])
    count = tl.where(cmask, tl.sum(total, axis=0), 1.0)
    mean = ref + tl.math.div_rn(tl.sum(moved, axis=0), count)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + offs_s
        mask = (s < num_splits)[:, None] & cmask[None, :]
        idx = s[:, None] * C + cols[None, :]
        n = tl.load(ws_ptr + idx, mask=mask, other=0.0)
        m = tl.load(ws_ptr + plane + idx, mask=mask, other=0.0)
        q = tl.load(ws_ptr + 2 * plane + idx, mask=mask, other=0.0)
        delta = m - mean[None, :]
        m2 += q + n * delta * delta
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(var_ptr + cols, tl.math.div_rn(tl.sum(m2, axis=0), count), mask=cmask)


@triton.jit(do_not_specialize=_ROW_SPLITS + ("num_partials",))
def _bn_apply_nhwc_kernel(x_ptr, res_ptr, out_ptr, ws_ptr, mean_ptr, var_ptr, w_ptr, b_ptr,
                       M, C, eps, rows_per_split, num_partials,
                       FROM_PARTIALS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """out = relu((x - mean) * scale + bias + residual) on rows [s * rows_per_split, ...) of an
    (M, C) row-major x. FROM_PARTIALS (training): mean and var are first merged from the
    statistics kernel's ``num_partials`` partials, and split 0's programs store them."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if FROM_PARTIALS:
        mean, var = _merged_statistics(ws_ptr, cols, cmask, C, num_partials, BLOCK_S, BLOCK_C)
        if pid_s == 0:
            tl.store(mean_ptr + cols, mean, mask=cmask)
            tl.store(var_ptr + cols, var, mask=cmask)
    else:
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
        var = tl.load(var_ptr + cols, mask=cmask, other=1.0)
    scale = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)

    offs_m = tl.arange(0, BLOCK_M)
    r_start = pid_s.to(tl.int64) * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, M)
    for r0 in range(r_start, r_end, BLOCK_M):
        rows = r0 + offs_m
        mask = (rows < r_end)[:, None] & cmask[None, :]
        offs = (rows * C)[:, None] + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * scale[None, :] + bias[None, :]
        if HAS_RESIDUAL:
            y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_TILE_SPLITS + ("num_partials",))
def _bn_apply_nchw_kernel(x_ptr, res_ptr, out_ptr, ws_ptr, mean_ptr, var_ptr, w_ptr, b_ptr,
                       N, C, HW, eps, n_per_split, hw_per_split, splits_hw, num_partials,
                       FROM_PARTIALS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr):
    """The same on a block of images x pixels of one channel of NCHW x."""
    c = tl.program_id(0)
    pid_s = tl.program_id(1)
    if FROM_PARTIALS:
        one = tl.zeros([1], dtype=tl.int32) + c
        mean_c, var_c = _merged_statistics(ws_ptr, one, one < C, C, num_partials, BLOCK_S, 1)
        mean = tl.sum(mean_c, axis=0)
        var = tl.sum(var_c, axis=0)
        if pid_s == 0:
            tl.store(mean_ptr + c, mean)
            tl.store(var_ptr + c, var)
    else:
        mean = tl.load(mean_ptr + c)
        var = tl.load(var_ptr + c)
    scale = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + c).to(tl.float32)

    n_start = (pid_s // splits_hw) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    h_start = (pid_s % splits_hw) * hw_per_split
    h_end = tl.minimum(h_start + hw_per_split, HW)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_HW)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + offs_n
        rmask = rows < n_end
        row_off = (rows.to(tl.int64) * C + c) * HW
        for h0 in range(h_start, h_end, BLOCK_HW):
            hws = h0 + offs_h
            mask = rmask[:, None] & (hws < h_end)[None, :]
            offs = row_off[:, None] + hws[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * scale + bias
            if HAS_RESIDUAL:
                y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if RELU:
                y = tl.maximum(y, 0.0)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_ROW_SPLITS + ("num_splits",))
def _bn_bwd_reduce_nhwc_kernel(dy_ptr, x_ptr, out_ptr, mean_ptr, var_ptr, w_ptr, dx_ptr, dres_ptr, ws_ptr,
                            M, C, eps, rows_per_split, num_splits,
                            HAS_WEIGHT: tl.constexpr, RELU: tl.constexpr, WRITE_DRES: tl.constexpr,
                            WRITE_DX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-(split, channel) sums of dy' and dy' (x - mean); d_residual = dy'; eval-mode dx.

    dy' = dy * (out > 0) with a ReLU, else dy; in eval mode dx = weight * invstd * dy'.
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    if WRITE_DX:
        var = tl.load(var_ptr + cols, mask=cmask, other=1.0)
        scale = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        if HAS_WEIGHT:
            scale = scale * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    r_start = pid_s.to(tl.int64) * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, M)
    acc_dy = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_dyx = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_M):
        rows = r0 + offs_m
        mask = (rows < r_end)[:, None] & cmask[None, :]
        offs = (rows * C)[:, None] + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
        if RELU:
            dy = tl.where(tl.load(out_ptr + offs, mask=mask, other=0.0) > 0, dy, 0.0)
        if WRITE_DRES:
            tl.store(dres_ptr + offs, dy.to(dres_ptr.dtype.element_ty), mask=mask)
        dy = dy.to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_dy += dy
        acc_dyx += dy * (x - mean[None, :])
        if WRITE_DX:
            tl.store(dx_ptr + offs, (dy * scale[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
    idx = pid_s * C + cols
    tl.store(ws_ptr + idx, tl.sum(acc_dy, axis=0), mask=cmask)
    tl.store(ws_ptr + num_splits * C + idx, tl.sum(acc_dyx, axis=0), mask=cmask)


@triton.jit(do_not_specialize=_TILE_SPLITS + ("num_splits",))
def _bn_bwd_reduce_nchw_kernel(dy_ptr, x_ptr, out_ptr, mean_ptr, var_ptr, w_ptr, dx_ptr, dres_ptr, ws_ptr,
                            N, C, HW, eps, n_per_split, hw_per_split, splits_hw, num_splits,
                            HAS_WEIGHT: tl.constexpr, RELU: tl.constexpr, WRITE_DRES: tl.constexpr,
                            WRITE_DX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The NCHW version: one channel per program, tiles over (image, pixel)."""
    c = tl.program_id(0)
    pid_s = tl.program_id(1)
    mean = tl.load(mean_ptr + c)
    scale = 0.0
    if WRITE_DX:
        scale = tl.math.div_rn(1.0, tl.sqrt_rn(tl.load(var_ptr + c) + eps))
        if HAS_WEIGHT:
            scale = scale * tl.load(w_ptr + c).to(tl.float32)
    n_start = (pid_s // splits_hw) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    h_start = (pid_s % splits_hw) * hw_per_split
    h_end = tl.minimum(h_start + hw_per_split, HW)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_HW)
    acc_dy = tl.zeros([BLOCK_N, BLOCK_HW], dtype=tl.float32)
    acc_dyx = tl.zeros([BLOCK_N, BLOCK_HW], dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + offs_n
        rmask = rows < n_end
        row_off = (rows.to(tl.int64) * C + c) * HW
        for h0 in range(h_start, h_end, BLOCK_HW):
            hws = h0 + offs_h
            mask = rmask[:, None] & (hws < h_end)[None, :]
            offs = row_off[:, None] + hws[None, :]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
            if RELU:
                dy = tl.where(tl.load(out_ptr + offs, mask=mask, other=0.0) > 0, dy, 0.0)
            if WRITE_DRES:
                tl.store(dres_ptr + offs, dy.to(dres_ptr.dtype.element_ty), mask=mask)
            dy = dy.to(tl.float32)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc_dy += dy
            acc_dyx += dy * (x - mean)
            if WRITE_DX:
                tl.store(dx_ptr + offs, (dy * scale).to(dx_ptr.dtype.element_ty), mask=mask)
    idx = pid_s * C + c
    tl.store(ws_ptr + idx, tl.sum(acc_dy))
    tl.store(ws_ptr + num_splits * C + idx, tl.sum(acc_dyx))


@triton.jit(do_not_specialize=("num_splits",))
def _bn_bwd_combine_kernel(ws_ptr, var_ptr, gw_ptr, gb_ptr, C, num_splits, eps,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Evaluation mode: grad_bias = sum(dy'), grad_weight = invstd * sum(dy' (x - mean))."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sum_dy, sum_dyx = _merged_sums(ws_ptr, cols, cmask, C, num_splits, BLOCK_S, BLOCK_C)
    var = tl.load(var_ptr + cols, mask=cmask, other=1.0)
    invstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(gb_ptr + cols, sum_dy, mask=cmask)
    tl.store(gw_ptr + cols, sum_dyx * invstd, mask=cmask)


@triton.jit(do_not_specialize=_ROW_SPLITS + ("num_partials",))
def _bn_bwd_dx_nhwc_kernel(dy_ptr, x_ptr, out_ptr, ws_ptr, mean_ptr, var_ptr, w_ptr, gw_ptr, gb_ptr, dx_ptr,
                        M, C, eps, inv_count, rows_per_split, num_partials,
                        HAS_WEIGHT: tl.constexpr, RELU: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Training-mode dx = a dy' + k1 (x - mean) + k0 on rows [s * rows_per_split, ...) of an
    (M, C) row-major tensor, with a = weight * invstd, k1 = -a * invstd * grad_weight / M,
    k0 = -a * grad_bias / M; grad_bias and grad_weight are first merged from the backward
    reduction's ``num_partials`` partials, and split 0's programs store them."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    invstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.load(var_ptr + cols, mask=cmask, other=1.0) + eps))
    grad_bias, sum_dyx = _merged_sums(ws_ptr, cols, cmask, C, num_partials, BLOCK_S, BLOCK_C)
    grad_weight = sum_dyx * invstd
    if pid_s == 0:
        tl.store(gb_ptr + cols, grad_bias, mask=cmask)
        tl.store(gw_ptr + cols, grad_weight, mask=cmask)
    a = invstd
    if HAS_WEIGHT:
        a = a * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    k1 = -a * invstd * grad_weight * inv_count
    k0 = -a * grad_bias * inv_count

    offs_m = tl.arange(0, BLOCK_M)
    r_start = pid_s.to(tl.int64) * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, M)
    for r0 in range(r_start, r_end, BLOCK_M):
        rows = r0 + offs_m
        mask = (rows < r_end)[:, None] & cmask[None, :]
        offs = (rows * C)[:, None] + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
        if RELU:
            dy = tl.where(tl.load(out_ptr + offs, mask=mask, other=0.0) > 0, dy, 0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = a[None, :] * dy.to(tl.float32) + k1[None, :] * (x - mean[None, :]) + k0[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_TILE_SPLITS + ("num_partials",))
def _bn_bwd_dx_nchw_kernel(dy_ptr, x_ptr, out_ptr, ws_ptr, mean_ptr, var_ptr, w_ptr, gw_ptr, gb_ptr, dx_ptr,
                        N, C, HW, eps, inv_count, n_per_split, hw_per_split, splits_hw, num_partials,
                        HAS_WEIGHT: tl.constexpr, RELU: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr):
    """Training-mode dx on a block of images x pixels of one channel of NCHW tensors."""
    c = tl.program_id(0)
    pid_s = tl.program_id(1)
    mean = tl.load(mean_ptr + c)
    invstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.load(var_ptr + c) + eps))
    one = tl.zeros([1], dtype=tl.int32) + c
    sum_dy, sum_dyx = _merged_sums(ws_ptr, one, one < C, C, num_partials, BLOCK_S, 1)
    grad_bias = tl.sum(sum_dy, axis=0)
    grad_weight = tl.sum(sum_dyx, axis=0) * invstd
    if pid_s == 0:
        tl.store(gb_ptr + c, grad_bias)
        tl.store(gw_ptr + c, grad_weight)
    a = invstd
    if HAS_WEIGHT:
        a = a * tl.load(w_ptr + c).to(tl.float32)
    k1 = -a * invstd * grad_weight * inv_count
    k0 = -a * grad_bias * inv_count

    n_start = (pid_s // splits_hw) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    h_start = (pid_s % splits_hw) * hw_per_split
    h_end = tl.minimum(h_start + hw_per_split, HW)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_HW)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + offs_n
        rmask = rows < n_end
        row_off = (rows.to(tl.int64) * C + c) * HW
        for h0 in range(h_start, h_end, BLOCK_HW):
            hws = h0 + offs_h
            mask = rmask[:, None] & (hws < h_end)[None, :]
            offs = row_off[:, None] + hws[None, :]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
            if RELU:
                dy = tl.where(tl.load(out_ptr + offs, mask=mask, other=0.0) > 0, dy, 0.0)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dx = a * dy.to(tl.float32) + k1 * (x - mean) + k0
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_running_stats_kernel(rm_ptr, rv_ptr, tracked_ptr, mean_ptr, var_ptr, C,
                                 rm_stride, rv_stride, mean_stride, var_stride, momentum, bessel,
                                 HAS_TRACKED: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr):
    """running <- (1 - f) running + f batch statistic (var * bessel), in place, any strides.

    f = momentum, or 1 / num_batches_tracked after its increment (CUMULATIVE). One program:
    the counter is read, incremented and written once, with no other program to race.
    """
    factor = momentum
    if HAS_TRACKED:
        tracked = tl.load(tracked_ptr) + 1
        tl.store(tracked_ptr, tracked)
        if CUMULATIVE:
            factor = tl.math.div_rn(1.0, tracked.to(tl.float32))
    keep = 1.0 - factor
    offs = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + offs).to(tl.int64)
        mask = cols < C
        rm = tl.load(rm_ptr + cols * rm_stride, mask=mask, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptr + cols * rv_stride, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + cols * mean_stride, mask=mask, other=0.0).to(tl.float32)
        var = tl.load(var_ptr + cols * var_stride, mask=mask, other=0.0).to(tl.float32)
        tl.store(rm_ptr + cols * rm_stride, (keep * rm + factor * mean).to(rm_ptr.dtype.element_ty), mask=mask)
        tl.store(rv_ptr + cols * rv_stride, (keep * rv + factor * (var * bessel)).to(rv_ptr.dtype.element_ty),
                 mask=mask)


KERNELS = {
    "stats_nhwc": _bn_stats_nhwc_kernel,
    "stats_nchw": _bn_stats_nchw_kernel,
    "stats_combine": _stats_combine_kernel,
    "apply_nhwc": _bn_apply_nhwc_kernel,
    "apply_nchw": _bn_apply_nchw_kernel,
    "bwd_reduce_nhwc": _bn_bwd_reduce_nhwc_kernel,
    "bwd_reduce_nchw": _bn_bwd_reduce_nchw_kernel,
    "bwd_combine": _bn_bwd_combine_kernel,
    "bwd_dx_nhwc": _bn_bwd_dx_nhwc_kernel,
    "bwd_dx_nchw": _bn_bwd_dx_nchw_kernel,
    "update_running_stats": _update_running_stats_kernel,
}
"""Every Triton kernel of this module, by name."""


def _compile_example(name: str, kernel) -> tuple[dict[str, str], dict[str, object]]:
    """Signature and constexprs for compiling ``kernel`` ahead of time: the shipped rules'
    typical blocks and every optional path (residual, ReLU, ...) switched on. Per-channel
    vectors (running statistics included) and workspaces are float32, the step counter
    int64; the other pointers hold activations."""
    float32_pointers = {"ws_ptr", "mean_ptr", "var_ptr", "w_ptr", "b_ptr", "gw_ptr", "gb_ptr", "rm_ptr", "rv_ptr"}
    float_scalars = {"eps", "inv_count", "momentum", "bessel"}
    if name == "update_running_stats":
        blocks = {"BLOCK_C": UPDATE_BLOCK_C}
    elif "combine" in name:
        blocks = {"BLOCK_S": COMBINE_BLOCK_S, "BLOCK_C": COMBINE_BLOCK_C}
    else:
        blocks = {"BLOCK_M": 64, "BLOCK_C": 64, "BLOCK_N": 4, "BLOCK_HW": 1024, "BLOCK_S": COMBINE_BLOCK_S}
    signature, constexprs = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = blocks[p.name] if p.name.startswith("BLOCK_") else True
        elif p.name == "tracked_ptr":
            signature[p.name] = "*i64"
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*fp32" if p.name in float32_pointers else "*{data}"
        else:
            signature[p.name] = "fp32" if p.name in float_scalars else "i32"
    return signature, constexprs

# Under TRITON_INTERPRET=1 ``triton.jit`` returns interpreter functions: they run on CPU
# tensors, but cannot be traced, so with fake tensors (the fake implementation, opcheck)
# the launchers only allocate their outputs.
INTERPRETED = not isinstance(_bn_apply_nhwc_kernel, triton.runtime.JITFunction)

if not INTERPRETED:  # interpreter functions cannot be compiled ahead of time
    for _name, _kernel in KERNELS.items():
        register_compile_example(__name__, _name, _kernel, *_compile_example(_name, _kernel))
    for _function in (_merged_statistics, _merged_sums):
        register_device_function(__name__, _function.fn.__name__, _function)


def _launches(t: Tensor) -> bool:
    return not (INTERPRETED and torch._subclasses.fake_tensor.is_fake(t))


# ----------------------------------------------------------------------------- launchers
def _per_channel(t: Optional[Tensor]) -> Optional[Tensor]:
    """A per-channel vector as the kernels index it (stride 1): ``t`` itself when contiguous,
    else a contiguous copy (a sliced or expanded weight, a strided running buffer)."""
    return None if t is None else t.contiguous()


def _nhwc(x: Tensor, fmt: torch.memory_format) -> bool:
    """Whether the NHWC kernels take x: channels_last, or H*W == 1 (the same memory)."""
    return fmt == torch.channels_last or x.shape[2] * x.shape[3] == 1


def _statistics_partials(x: Tensor, nhwc: bool) -> tuple[Tensor, int]:
    """Launch the statistics kernel on contiguous ``x``: a float32 workspace holding each
    split's (mean, M2) per channel and count — planes (splits, C), (splits, C), (splits,) —
    and the number of splits. The apply kernel merges them."""
    n, c, h, w = (int(d) for d in x.shape)
    red = _reduction_grid(x, nhwc, TILE)
    ws = _empty(red.splits * (2 * c + 1), dtype=torch.float32, device=x.device)
    if not _launches(x):
        return ws, red.splits
    if nhwc:
        wrap_triton(_bn_stats_nhwc_kernel)[red.grid](
            x, ws, n * h * w, c, red.rows_per_split, red.splits,
            BLOCK_M=red.block_r, BLOCK_C=red.block_k, num_warps=NUM_WARPS)
    else:
        wrap_triton(_bn_stats_nchw_kernel)[red.grid](
            x, ws, n, c, h * w, red.rows_per_split, red.k_per_split, red.splits_k, red.splits,
            BLOCK_N=red.block_r, BLOCK_HW=red.block_k, num_warps=NUM_WARPS)
    return ws, red.splits


@triton_op("resnet_fast::triton_batch_norm_act_forward", mutates_args=())
def triton_batch_norm_act_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton ``batch_norm_act``: (out, mean, var), statistics in float32."""
    fmt = output_memory_format(x)
    x = x.contiguous(memory_format=fmt)
    weight, bias = _per_channel(weight), _per_channel(bias)
    nhwc = _nhwc(x, fmt)
    n, c, h, w = (int(d) for d in x.shape)
    if training:
        mean = _empty(c, dtype=torch.float32, device=x.device)
        var = _empty(c, dtype=torch.float32, device=x.device)
        ws, partials = _statistics_partials(x, nhwc)
    else:
        # Copies (outputs must not alias inputs), contiguous whatever the buffers' strides.
        mean = running_mean.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        var = running_var.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        ws, partials = mean, 0
    out = _empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt)
    if x.numel() == 0 or not _launches(x):
        return out, mean, var
    grid = _elementwise_grid(x, nhwc)
    flags = dict(FROM_PARTIALS=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 HAS_RESIDUAL=residual is not None, RELU=relu, BLOCK_S=COMBINE_BLOCK_S, num_warps=NUM_WARPS)
    w_arg = mean if weight is None else weight
    b_arg = mean if bias is None else bias
    r_arg = x if residual is None else residual
    if nhwc:
        wrap_triton(_bn_apply_nhwc_kernel)[grid.grid](
            x, r_arg, out, ws, mean, var, w_arg, b_arg, n * h * w, c, eps, grid.rows_per_split, partials,
            BLOCK_M=grid.block_r, BLOCK_C=grid.block_k, **flags)
    else:
        wrap_triton(_bn_apply_nchw_kernel)[grid.grid](
            x, r_arg, out, ws, mean, var, w_arg, b_arg, n, c, h * w, eps,
            grid.rows_per_split, grid.k_per_split, grid.splits_k, partials,
            BLOCK_N=grid.block_r, BLOCK_HW=grid.block_k, **flags)
    return out, mean, var


@triton_op("resnet_fast::triton_batch_norm_act_backward", mutates_args=())
def triton_batch_norm_act_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    out: Optional[Tensor],
    training: bool,
    eps: float,
    relu: bool,
    need_grad_residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton ``batch_norm_act_backward``: (grad_input, grad_weight, grad_bias, grad_residual)."""
    if relu and out is None:
        raise ValueError("batch_norm_act_backward with relu=True needs the forward output `out`")
    fmt = output_memory_format(x)
    x = x.contiguous(memory_format=fmt)
    grad_out = grad_out.contiguous(memory_format=fmt)
    out = out.contiguous(memory_format=fmt) if relu else None
    weight, mean, var = _per_channel(weight), _per_channel(mean), _per_channel(var)
    nhwc = _nhwc(x, fmt)
    n, c, h, w = (int(d) for d in x.shape)
    grad_input = _empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if need_grad_residual:
        grad_residual = _empty(x.shape, dtype=grad_out.dtype, device=x.device, memory_format=fmt)
    else:
        grad_residual = grad_out.new_empty(0)
    grad_weight = _empty(c, dtype=torch.float32, device=x.device)
    grad_bias = _empty(c, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        grad_weight.zero_()
        grad_bias.zero_()
        return grad_input, grad_weight, grad_bias, grad_residual
    red = _reduction_grid(x, nhwc, BACKWARD_TILE)
    ws = _empty((2, red.splits, c), dtype=torch.float32, device=x.device)
    if not _launches(x):
        return grad_input, grad_weight, grad_bias, grad_residual
    w_arg = mean if weight is None else weight
    o_arg = grad_out if out is None else out
    r_arg = grad_input if not need_grad_residual else grad_residual
    reduce_flags = dict(HAS_WEIGHT=weight is not None, RELU=relu, WRITE_DRES=need_grad_residual,
                        WRITE_DX=not training, num_warps=NUM_WARPS)
    if nhwc:
        wrap_triton(_bn_bwd_reduce_nhwc_kernel)[red.grid](
            grad_out, x, o_arg, mean, var, w_arg, grad_input, r_arg, ws,
            n * h * w, c, eps, red.rows_per_split, red.splits,
            BLOCK_M=red.block_r, BLOCK_C=red.block_k, **reduce_flags)
    else:
        wrap_triton(_bn_bwd_reduce_nchw_kernel)[red.grid](
            grad_out, x, o_arg, mean, var, w_arg, grad_input, r_arg, ws,
            n, c, h * w, eps, red.rows_per_split, red.k_per_split, red.splits_k, red.splits,
            BLOCK_N=red.block_r, BLOCK_HW=red.block_k, **reduce_flags)
    if not training:  # dx was written by the reduction: only the gradient sums remain
        wrap_triton(_bn_bwd_combine_kernel)[(_cdiv(c, COMBINE_BLOCK_C),)](
            ws, var, grad_weight, grad_bias, c, red.splits, eps,
            BLOCK_S=COMBINE_BLOCK_S, BLOCK_C=COMBINE_BLOCK_C, num_warps=NUM_WARPS)
        return grad_input, grad_weight, grad_bias, grad_residual
    # dy' = grad_residual when the reduction wrote it: read it instead of dy and out.
    dy_arg, mask_arg, masked = (grad_residual, x, False) if need_grad_residual else (grad_out, o_arg, relu)
    grid = _elementwise_grid(x, nhwc)
    flags = dict(HAS_WEIGHT=weight is not None, RELU=masked, BLOCK_S=COMBINE_BLOCK_S, num_warps=NUM_WARPS)
    inv_count = 1.0 / red.count
    if nhwc:
        wrap_triton(_bn_bwd_dx_nhwc_kernel)[grid.grid](
            dy_arg, x, mask_arg, ws, mean, var, w_arg, grad_weight, grad_bias, grad_input,
            n * h * w, c, eps, inv_count, grid.rows_per_split, red.splits,
            BLOCK_M=grid.block_r, BLOCK_C=grid.block_k, **flags)
    else:
        wrap_triton(_bn_bwd_dx_nchw_kernel)[grid.grid](
            dy_arg, x, mask_arg, ws, mean, var, w_arg, grad_weight, grad_bias, grad_input,
            n, c, h * w, eps, inv_count, grid.rows_per_split, grid.k_per_split, grid.splits_k, red.splits,
            BLOCK_N=grid.block_r, BLOCK_HW=grid.block_k, **flags)
    return grad_input, grad_weight, grad_bias, grad_residual


@triton_op("resnet_fast::triton_update_running_stats",
           mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def triton_update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: Optional[float],
) -> None:
    """Triton ``update_running_stats``: one launch, in place in buffers of any strides.

    The arithmetic is float32 (the triton backend takes float16, bfloat16 and float32
    tensors); f = 1 / num_batches_tracked (momentum None) is computed on the device.
    Without ``num_batches_tracked``, momentum None means f = 0, as the torch backend.
    """
    if not _launches(running_mean):
        return
    tracked = num_batches_tracked if num_batches_tracked is not None else running_mean
    wrap_triton(_update_running_stats_kernel)[(1,)](
        running_mean, running_var, tracked, mean, var, running_mean.shape[0],
        running_mean.stride(0), running_var.stride(0), mean.stride(0), var.stride(0),
        0.0 if momentum is None else momentum, count / (count - 1),
        HAS_TRACKED=num_batches_tracked is not None,
        CUMULATIVE=momentum is None and num_batches_tracked is not None,
        BLOCK_C=min(_pow2(running_mean.shape[0]), UPDATE_BLOCK_C), num_warps=NUM_WARPS)


# ----------------------------------------------------------------------------- backend
# (resnet_fast.kernels registered loaders for these; importing this module replaces them.)
@register_kernel("triton", "batch_norm_act")
def batch_norm_act(x, weight, bias, residual, running_mean, running_var, training, eps, relu):
    """``batch_norm_act`` through :func:`triton_batch_norm_act_forward`."""
    return triton_batch_norm_act_forward(x, weight, bias, residual, running_mean, running_var,
                                         training, eps, relu)


@register_kernel("triton", "batch_norm_act_backward")
def batch_norm_act_backward(grad_out, x, weight, mean, var, out, training, eps, relu, need_grad_residual):
    """``batch_norm_act_backward`` through :func:`triton_batch_norm_act_backward`."""
    return triton_batch_norm_act_backward(grad_out, x, weight, mean, var, out, training, eps, relu,
                                          need_grad_residual)


@register_kernel("triton", "update_running_stats")
def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count: int, momentum):
    """``update_running_stats`` through :func:`triton_update_running_stats`."""
    triton_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)


@register_kernel("triton", "conv_bn_act")
def conv_bn_act(x, conv_weight, conv_bias, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, weight, bias, residual, running_mean, running_var,
                training, eps, relu):
    """``F.conv2d`` (cuDNN), then the Triton :func:`batch_norm_act`: (out, conv_out, mean, var)."""
    conv_out = F.conv2d(x, conv_weight, conv_bias, stride, padding, dilation, groups)
    conv_out = conv_out.contiguous(memory_format=output_memory_format(x))
    out, mean, var = batch_norm_act(conv_out, weight, bias, residual, running_mean, running_var,
                                    training, eps, relu)
    return out, conv_out, mean, var
