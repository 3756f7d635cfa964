// Machinery shared by the per-channel kernels of resnet_fast._C (batch_norm_stats.cu,
// batch_norm_act.cu): element types, 16-byte vector packs, the block-level reduction,
// the work splits over a 4-D (N, C, H, W) tensor and the traversals of a block's share.
//
// Work splits (every kernel runs 1-D blocks of kThreads threads):
//  * channels_last (NHWC): the tensor is a (rows = N*H*W, C) matrix. A block covers a
//    tile of channel groups (each thread owns `width` adjacent channels, one vector) and
//    a range of rows; blockIdx.y splits the rows (NhwcPlan).
//  * NCHW: a block covers one channel; blockIdx.y splits the batch (and, for large
//    planes, the H*W plane too). Small planes put several planes in flight per block,
//    large planes unroll along H*W (NchwPlan).
// Reductions write one partial state per (channel, split) to a workspace and a second
// kernel merges them, unless the grid has a single split.
//
// bf16 values are converted with bit operations (widening is a shift; narrowing rounds
// to nearest even exactly as c10::BFloat16 does), never with bf16 intrinsics, so the
// sm_75 (and sm_70) builds need nothing newer. Only ATen/c10 headers, no
// ATen/cuda/CUDAContext.h.

#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace resnet_fast {

inline constexpr int kThreads = 256;  // 1-D blocks of this many threads
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kUnroll = 4;         // vector loads in flight per thread and tensor
inline constexpr int kMaxSplits = 65535;  // gridDim.y limit

// ---------------------------------------------------------------------------------------
// Element types: what is loaded and stored (raw bits for 16-bit types) and what is
// accumulated.

template <typename scalar_t>
struct Traits;

template <>
struct Traits<c10::Half> {
  using raw_t = uint16_t;
  using acc_t = float;
  static __device__ __forceinline__ float to_acc(uint16_t bits) {
    return __half2float(__ushort_as_half(bits));
  }
  static __device__ __forceinline__ uint16_t from_acc(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};

template <>
struct Traits<c10::BFloat16> {
  using raw_t = uint16_t;
  using acc_t = float;
  // bf16 is the top half of a float32: widening is exact and needs no bf16 support.
  static __device__ __forceinline__ float to_acc(uint16_t bits) {
    return __uint_as_float(static_cast<unsigned int>(bits) << 16);
  }
  // Round to nearest even, NaN stays a (quiet) NaN: c10::BFloat16's conversion.
  static __device__ __forceinline__ uint16_t from_acc(float v) {
    const unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      return static_cast<uint16_t>((u >> 16) | 0x0040u);
    }
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

template <>
struct Traits<float> {
  using raw_t = float;
  using acc_t = float;
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};

template <>
struct Traits<double> {
  using raw_t = double;
  using acc_t = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};

// Elements per 16-byte vector load.
template <typename scalar_t>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// ---------------------------------------------------------------------------------------
// Block-level reduction of a State: a struct with `using value_type`, `kFields` values
// reachable through `field(k)`, an associative `combine(const State&)` and a static
// `identity()`.
//
// Thread tid = ty * bx + tx holds a partial state for slot tx (bx is a power of two, at
// most 32; bx = 1 reduces everything). On return, threads tid < bx hold their slot's
// total (lanes are combined first across the warp, then warps in order through shared
// memory). `smem` holds State::kFields * kThreads values. Every thread of the block
// must call this.

template <typename State>
__device__ __forceinline__ void block_reduce(State& s, int bx, typename State::value_type* smem) {
  using T = typename State::value_type;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // Lanes l and l ^ off (off >= bx) own the same slot.
  for (int off = 16; off >= bx; off >>= 1) {
    State other;
#pragma unroll
    for (int k = 0; k < State::kFields; ++k) {
      other.field(k) = __shfl_xor_sync(0xffffffffu, s.field(k), off);
    }
    s.combine(other);
  }
  // Now lanes < bx of each warp hold that warp's total for slot `lane`.
  if (lane < bx) {
    const int i = warp * bx + lane;
#pragma unroll
    for (int k = 0; k < State::kFields; ++k) {
      smem[k * kThreads + i] = s.field(k);
    }
  }
  __syncthreads();
  if (tid < bx) {
    State total = State::identity();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int i = w * bx + tid;
      State other;
#pragma unroll
      for (int k = 0; k < State::kFields; ++k) {
        other.field(k) = smem[k * kThreads + i];
      }
      total.combine(other);
    }
    s = total;
  }
  __syncthreads();  // smem may be reused right away
}

// ---------------------------------------------------------------------------------------
// Traversals of a block's share of the tensor (the work splits below). Each calls
// visit(idx, valid) for chunks of kUnroll vector indices (vectors of `width` elements,
// counted from the tensor's start) of which the first `valid` are in range.

// channels_last: channel group g, rows ty, ty + by, ... of split blockIdx.y:
// idx = row * groups + g.
template <typename Visit>
__device__ __forceinline__ void visit_nhwc_rows(int64_t rows, int64_t groups, int64_t rows_per_split, int by,
                                                int ty, int64_t g, Visit&& visit) {
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t row_end = rows < row_begin + rows_per_split ? rows : row_begin + rows_per_split;
  const int64_t step = static_cast<int64_t>(by) * kUnroll;
  for (int64_t r = row_begin + ty; r < row_end; r += step) {
    const int64_t left = row_end - r;
    const int valid = left >= step ? kUnroll : static_cast<int>((left + by - 1) / by);
    int64_t idx[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) idx[u] = (r + static_cast<int64_t>(u) * by) * groups + g;
    visit(idx, valid);
  }
}

// NCHW: channel c = blockIdx.x; blockIdx.y = n_split * hw_splits + hw_split picks the
// images and the range of the plane (NchwPlan). Vector j of image n: (n * C + c) * nvec + j.
// unroll_hw: each thread walks along the plane, kUnroll vectors kThreads apart per chunk;
// otherwise thread (tx < bx, ty < by) takes vector tx of kUnroll images n, n + by, ...
// (spare threads, ty >= by, visit nothing).
template <typename Visit>
__device__ __forceinline__ void visit_nchw_vectors(int64_t batch, int64_t channels, int64_t nvec,
                                                   int64_t n_per_split, int64_t vec_per_split, int hw_splits,
                                                   int bx, bool unroll_hw, Visit&& visit) {
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y / hw_splits) * n_per_split;
  const int64_t n_end = batch < n_begin + n_per_split ? batch : n_begin + n_per_split;
  const int64_t j_begin = static_cast<int64_t>(blockIdx.y % hw_splits) * vec_per_split;
  const int64_t j_end = nvec < j_begin + vec_per_split ? nvec : j_begin + vec_per_split;
  const int64_t image_vecs = channels * nvec;
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * nvec;
  if (unroll_hw) {
    const int64_t step = static_cast<int64_t>(kThreads) * kUnroll;
    for (int64_t n = n_begin; n < n_end; ++n) {
      const int64_t base = n * image_vecs + plane;
      for (int64_t j = j_begin + threadIdx.x; j < j_end; j += step) {
        const int64_t left = j_end - j;
        const int valid = left >= step ? kUnroll : static_cast<int>((left + kThreads - 1) / kThreads);
        int64_t idx[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) idx[u] = base + j + static_cast<int64_t>(u) * kThreads;
        visit(idx, valid);
      }
    }
    return;
  }
  const int by = kThreads / bx;
  const int tx = threadIdx.x % bx;
  const int ty = threadIdx.x / bx;
  if (ty >= by) return;
  const int64_t step = static_cast<int64_t>(by) * kUnroll;
  for (int64_t j = j_begin + tx; j < j_end; j += bx) {
    for (int64_t n = n_begin + ty; n < n_end; n += step) {
      const int64_t left = n_end - n;
      const int valid = left >= step ? kUnroll : static_cast<int>((left + by - 1) / by);
      int64_t idx[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) idx[u] = (n + static_cast<int64_t>(u) * by) * image_vecs + plane + j;
      visit(idx, valid);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side: sizes and work splits.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}
inline bool aligned16(const void* p) { return aligned_to(p, 16); }

// Elements per vector load for one kernel call (host side). `full` is the 16-byte width
// of the element type (vec_width), `inner` the contiguous extent the vectors run along
// (C for channels_last, H*W for NCHW), `pointers` the tensors read or written (null
// entries are skipped). `full` when inner is a multiple of it and every pointer is
// 16-byte aligned; for 16-bit types (full == 8) else 4 elements, 8-byte loads, when inner
// is a multiple of 4 and the pointers 8-byte aligned (NCHW fp16/bf16 planes of
// 14 x 14 = 196 elements); else 1.
inline int vector_width(int full, int64_t inner, std::initializer_list<const void*> pointers) {
  const int64_t bytes_per_element = 16 / full;
  auto fits = [&](int width) {
    if (inner % width != 0) return false;
    for (const void* p : pointers) {
      if (p != nullptr && !aligned_to(p, width * bytes_per_element)) return false;
    }
    return true;
  };
  if (full > 1 && fits(full)) return full;
  if (full == 8 && fits(4)) return 4;
  return 1;
}

// Calls launch(std::integral_constant<int, W>{}) with W the width vector_width chose for
// an element type whose full width is V: V, 4 (only when V == 8) or 1.
template <int V, typename Launch>
void with_vector_width(int width, Launch&& launch) {
  if constexpr (V == 8) {
    if (width == 4) {
      launch(std::integral_constant<int, 4>{});
      return;
    }
  }
  if (width == V) {
    launch(std::integral_constant<int, V>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// Blocks of kThreads that make one full wave on the device (cached per device; no
// synchronisation).
inline int64_t wave_blocks(int device) {
  constexpr int kMaxDevices = 128;
  static std::array<std::atomic<int64_t>, kMaxDevices> cache{};
  if (device >= 0 && device < kMaxDevices) {
    const int64_t cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  int threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t blocks = static_cast<int64_t>(sms) * std::max(1, threads_per_sm / kThreads);
  if (device >= 0 && device < kMaxDevices) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

// channels_last: grid (tiles, splits); thread (tx = tid % bx, ty = tid / bx) owns channel
// group blockIdx.x * bx + tx (of `width` channels) and reads rows ty, ty + by, ... of
// rows [blockIdx.y * rows_per_split, +rows_per_split), kUnroll rows per step
// (by = kThreads / bx; threads with ty >= by, if any, have no rows).
struct NhwcPlan {
  int bx;
  int64_t tiles;
  int64_t splits;
  int64_t rows_per_split;
};

// Fraction of a tile's threads that have a channel group (bx groups per block row, by =
// kThreads / bx rows, groups spread over ceil(groups / bx) tiles).
inline double nhwc_thread_use(int64_t groups, int64_t bx) {
  const int64_t tiles = ceil_div(groups, bx);
  return static_cast<double>(groups) / static_cast<double>(tiles * bx) *
         static_cast<double>(bx * (kThreads / bx)) / kThreads;
}

// `groups` = channels / width. For a reduction bx is a power of two <= 32 (block_reduce
// merges the by threads of a slot). An elementwise kernel covers up to kThreads groups
// per block row: whole rows (contiguous in memory) when they fit, unless another bx
// leaves far fewer threads idle (129 groups: bx = 33 uses 88% of the threads, 129 50%).
inline NhwcPlan plan_nhwc(int64_t rows, int64_t groups, int64_t target_blocks, bool reduction) {
  NhwcPlan plan{};
  if (reduction) {
    plan.bx = static_cast<int>(std::min<int64_t>(32, next_pow2(groups)));
  } else {
    int64_t bx = ceil_div(groups, ceil_div(groups, kThreads));
    if (groups > 32 && nhwc_thread_use(groups, bx) < 0.875) {
      // At least a warp's worth of adjacent groups per block row, for coalescing.
      double best = 0.0;
      for (int64_t b = kThreads; b >= 32; --b) {
        const double use = nhwc_thread_use(groups, b);
        if (use > best + 1e-9) {
          best = use;
          bx = b;
        }
      }
    }
    plan.bx = static_cast<int>(bx);
  }
  plan.tiles = ceil_div(groups, plan.bx);
  const int64_t by = kThreads / plan.bx;
  const int64_t chunk_rows = by * kUnroll;
  const int64_t splits = clamp64(ceil_div(target_blocks, plan.tiles), 1,
                                 std::min<int64_t>(kMaxSplits, ceil_div(rows, chunk_rows)));
  plan.rows_per_split = round_up(ceil_div(rows, splits), chunk_rows);
  plan.splits = ceil_div(rows, plan.rows_per_split);
  return plan;
}

// NCHW: grid (C, splits), blockIdx.y = n_split * hw_splits + hw_split picks images
// [n_split * n_per_split, +n_per_split) and vectors [hw_split * vec_per_split,
// +vec_per_split) of each H*W plane (nvec vectors of `width` elements).
// unroll_hw (large planes; bx = kThreads, by = 1): each thread walks along the plane,
// kUnroll vectors kThreads apart per step. Otherwise (small planes): thread (tx < bx,
// ty < by = kThreads / bx) takes vector tx of images n, n + by, ..., kUnroll per step;
// bx is 32 (one warp per plane row) or the plane itself when that wastes fewer threads
// (7x7 = 49: 5 planes of 49 use 245 of 256 threads; 32 lanes would idle 15 of every 64).
struct NchwPlan {
  bool unroll_hw;
  int bx;
  int64_t n_per_split;
  int64_t vec_per_split;
  int64_t hw_splits;
  int64_t splits;
};

inline NchwPlan plan_nchw(int64_t batch, int64_t channels, int64_t nvec, int64_t target_blocks) {
  NchwPlan plan{};
  const int64_t wanted = ceil_div(target_blocks, channels);  // splits per channel to fill the GPU
  if (nvec >= static_cast<int64_t>(kThreads) * kUnroll) {
    // Large planes: a whole block walks along each plane; split images, then planes.
    plan.unroll_hw = true;
    plan.bx = kThreads;
    const int64_t n_splits = std::min(batch, wanted);
    plan.n_per_split = ceil_div(batch, n_splits);
    const int64_t chunk = static_cast<int64_t>(kThreads) * kUnroll;
    int64_t hw_splits = clamp64(ceil_div(wanted, ceil_div(batch, plan.n_per_split)), 1, nvec / chunk);
    plan.vec_per_split = round_up(ceil_div(nvec, hw_splits), chunk);
    plan.hw_splits = ceil_div(nvec, plan.vec_per_split);
  } else {
    plan.unroll_hw = false;
    int bx = nvec < 32 ? static_cast<int>(nvec) : 32;
    if (nvec > 32 && nvec <= kThreads) {
      const double use_warp = static_cast<double>(nvec) / (32.0 * ceil_div(nvec, 32));
      const double use_plane = static_cast<double>(nvec * (kThreads / nvec)) / kThreads;
      if (use_plane > use_warp) bx = static_cast<int>(nvec);
    }
    plan.bx = bx;
    const int64_t chunk = static_cast<int64_t>(kThreads / bx) * kUnroll;
    const int64_t n_splits = clamp64(wanted, 1, ceil_div(batch, chunk));
    plan.n_per_split = round_up(ceil_div(batch, n_splits), chunk);
    plan.vec_per_split = nvec;
    plan.hw_splits = 1;
  }
  plan.splits = ceil_div(batch, plan.n_per_split) * plan.hw_splits;
  return plan;
}

}  // namespace resnet_fast
