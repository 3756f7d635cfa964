// CUDA kernels of the BatchNorm-family stage operators (the `cuda` backend of
// resnet_fast::batch_norm_act / batch_norm_act_backward / conv_bn_act):
//
//   resnet_fast::batch_norm_act_apply(input, mean, var, weight?, bias?, residual?, eps, relu)
//       out = relu(x * scale + shift + residual), scale = w * rsqrt(var + eps),
//       shift = b - mean * scale: one read of x (and residual), one write.
//   resnet_fast::batch_norm_act_backward_reduce(grad_out, input, mean, var, out?, eps, relu)
//       per channel sum_dy = sum(dy'), sum_dy_xhat = sum(dy' * x_hat), dy' = dy * (out > 0)
//       with a ReLU: one read of dy, x (and out); two-level reduction.
//   resnet_fast::batch_norm_act_backward_apply(grad_out, input, weight?, mean, var, out?,
//       sum_dy, sum_dy_xhat, training, eps, relu, need_grad_residual)
//       dx = w * invstd * (dy' - sum_dy / M - x_hat * sum_dy_xhat / M) (training) or
//       w * invstd * dy' (eval; x is not read), grad_residual = dy' when asked: one pass.
//
// Schemas, fake implementations and the torch default implementations live in
// resnet_fast/ops/batch_norm_act_stages.py; this file only adds CUDA kernels.
//
// Every kernel computes its per-channel coefficients itself (scale/shift, or the three
// backward coefficients) from mean, var, weight, bias (and the sums): no extra launches,
// and a thread loads them once for all the rows it handles. Per-channel tensors may be
// any float dtype (read through a runtime type tag); statistics and coefficients are
// float32 (float64 for float64 input).
//
// Layouts (work splits in reduction.cuh):
//  * channels_last: a (rows = N*H*W, C) matrix. Each thread owns one 16-byte vector of
//    adjacent channels (8 fp16/bf16, 4 fp32, 2 fp64) when C is a multiple of the vector
//    width and the tensors are 16-byte aligned (else one channel), loads that group's
//    coefficients once, then walks rows kUnroll at a time (kUnroll vector loads per
//    tensor in flight). blockIdx.x tiles the channel groups, blockIdx.y splits the rows.
//  * NCHW: blockIdx.x is the channel (coefficients once per thread), blockIdx.y splits
//    the images and, for large planes, the H*W plane; 16-byte vectors along H*W when
//    H*W is a multiple of the vector width and the tensors are aligned.
//  fp16/bf16 have a middle tier in both layouts: 8-byte vectors of 4 elements when the
//  extent is a multiple of 4 and the tensors 8-byte aligned (NCHW 14 x 14 planes, 196
//  elements) instead of 2-byte loads (reduction.cuh's vector_width).
// Tensors with other strides are copied to the input's layout first (residual, grad_out
// and out follow the input's layout). Indices are 64-bit. No host synchronisation (CUDA
// graphs capture it), the current stream, workspaces from the caching allocator.
//
// Mixed dtypes: residual (forward) and grad_out (backward) are read in the input's dtype
// or in the accumulation dtype (fp16/bf16 input with fp32 residual/gradients; scalar
// kernels, a rare case); any other dtype is converted to the accumulation dtype first,
// exactly as the torch reference's .to(acc).

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "reduction.cuh"

namespace resnet_fast {
namespace {

// ---------------------------------------------------------------------------------------
// Per-channel vectors of any float dtype, read into the accumulation type.

enum ChannelType : int { kAbsent = 0, kF16 = 1, kBF16 = 2, kF32 = 3, kF64 = 4 };

struct ChannelVec {
  const void* ptr;
  int type;  // ChannelType; kAbsent: the caller's default value
};

template <typename acc_t>
__device__ __forceinline__ acc_t load_channel(const ChannelVec& p, int64_t c, acc_t fallback) {
  switch (p.type) {
    case kF16:
      return static_cast<acc_t>(Traits<c10::Half>::to_acc(static_cast<const uint16_t*>(p.ptr)[c]));
    case kBF16:
      return static_cast<acc_t>(Traits<c10::BFloat16>::to_acc(static_cast<const uint16_t*>(p.ptr)[c]));
    case kF32:
      return static_cast<acc_t>(static_cast<const float*>(p.ptr)[c]);
    case kF64:
      return static_cast<acc_t>(static_cast<const double*>(p.ptr)[c]);
    default:
      return fallback;
  }
}

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t relu_acc(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;  // NaN stays NaN, as torch.relu
}

// ReLU mask of the backward: dy' = 0 where out <= 0 (masked_fill semantics: a NaN
// output keeps its gradient).
template <typename scalar_t>
__device__ __forceinline__ bool relu_blocks(typename Traits<scalar_t>::raw_t out_bits) {
  return Traits<scalar_t>::to_acc(out_bits) <= typename Traits<scalar_t>::acc_t(0);
}

// ---------------------------------------------------------------------------------------
// Forward apply.

template <typename acc_t>
struct ApplyParams {
  ChannelVec mean, var, weight, bias;
  acc_t eps;
  bool relu;
};

template <typename acc_t>
__device__ __forceinline__ void apply_coefficients(const ApplyParams<acc_t>& p, int64_t c, acc_t& scale,
                                                   acc_t& shift) {
  const acc_t invstd = rsqrt_acc(load_channel(p.var, c, acc_t(1)) + p.eps);
  scale = load_channel(p.weight, c, acc_t(1)) * invstd;
  shift = load_channel(p.bias, c, acc_t(0)) - load_channel(p.mean, c, acc_t(0)) * scale;
}

// Vector-indexed tensors of one apply call (residual may be null).
template <typename scalar_t, typename res_t, int V>
struct ApplyIO {
  using XP = Pack<typename Traits<scalar_t>::raw_t, V>;
  using RP = Pack<typename Traits<res_t>::raw_t, V>;
  const XP* __restrict__ x;
  const RP* __restrict__ res;
  XP* __restrict__ out;
};

// Transform the first `valid` of kUnroll vectors idx[u]: all loads first, then stores.
template <typename scalar_t, typename res_t, int V, typename acc_t>
__device__ __forceinline__ void apply_vectors(const ApplyIO<scalar_t, res_t, V>& io, const int64_t (&idx)[kUnroll],
                                              int valid, const acc_t (&scale)[V], const acc_t (&shift)[V],
                                              bool relu) {
  using IO = ApplyIO<scalar_t, res_t, V>;
  typename IO::XP xp[kUnroll];
  typename IO::RP rp[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < valid) {
      xp[u] = io.x[idx[u]];
      if (io.res != nullptr) rp[u] = io.res[idx[u]];
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < valid) {
      typename IO::XP yp;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        acc_t y = fma(static_cast<acc_t>(Traits<scalar_t>::to_acc(xp[u].v[v])), scale[v], shift[v]);
        if (io.res != nullptr) y += static_cast<acc_t>(Traits<res_t>::to_acc(rp[u].v[v]));
        if (relu) y = relu_acc(y);
        yp.v[v] = Traits<scalar_t>::from_acc(y);
      }
      io.out[idx[u]] = yp;
    }
  }
}

// channels_last: thread (tx, ty) owns channel group g = blockIdx.x * bx + tx (`groups`
// groups of V channels per row) and rows ty, ty + by, ... of its block's row range.
template <typename scalar_t, typename res_t, int V>
__global__ void __launch_bounds__(kThreads) apply_nhwc_kernel(
    ApplyIO<scalar_t, res_t, V> io, ApplyParams<typename Traits<scalar_t>::acc_t> p, int64_t rows,
    int64_t groups, int64_t rows_per_split, int bx) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  const int by = kThreads / bx;
  const int tx = threadIdx.x % bx;
  const int ty = threadIdx.x / bx;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * bx + tx;
  if (ty >= by || g >= groups) return;  // no block-wide synchronisation below

  acc_t scale[V], shift[V];
#pragma unroll
  for (int v = 0; v < V; ++v) apply_coefficients(p, g * V + v, scale[v], shift[v]);

  visit_nhwc_rows(rows, groups, rows_per_split, by, ty, g, [&](const int64_t(&idx)[kUnroll], int valid) {
    apply_vectors(io, idx, valid, scale, shift, p.relu);
  });
}

// NCHW: blockIdx.x is the channel; blockIdx.y = n_split * hw_splits + hw_split (see
// NchwPlan in reduction.cuh). Vector j of image n of channel c: (n * C + c) * nvec + j.
template <typename scalar_t, typename res_t, int V>
__global__ void __launch_bounds__(kThreads) apply_nchw_kernel(
    ApplyIO<scalar_t, res_t, V> io, ApplyParams<typename Traits<scalar_t>::acc_t> p, int64_t batch,
    int64_t channels, int64_t nvec, int64_t n_per_split, int64_t vec_per_split, int hw_splits, int bx,
    bool unroll_hw) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  const int64_t c = blockIdx.x;

  acc_t s, t;
  apply_coefficients(p, c, s, t);
  acc_t scale[V], shift[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    scale[v] = s;
    shift[v] = t;
  }

  visit_nchw_vectors(batch, channels, nvec, n_per_split, vec_per_split, hw_splits, bx, unroll_hw,
                     [&](const int64_t(&idx)[kUnroll], int valid) { apply_vectors(io, idx, valid, scale, shift, p.relu); });
}

// ---------------------------------------------------------------------------------------
// Backward reduction: per channel sum(dy') and sum(dy' * (x - mean)); the second is
// scaled by invstd when it is written.

// F per-channel pairs (sum_dy, sum_dy_xmu) as a block_reduce State.
template <typename acc_t, int F>
struct Sums {
  using value_type = acc_t;
  static constexpr int kFields = 2 * F;
  acc_t v[2 * F];
  __device__ __forceinline__ acc_t& field(int k) { return v[k]; }
  __device__ __forceinline__ void combine(const Sums& o) {
#pragma unroll
    for (int k = 0; k < 2 * F; ++k) v[k] += o.v[k];
  }
  static __device__ __forceinline__ Sums identity() {
    Sums s;
#pragma unroll
    for (int k = 0; k < 2 * F; ++k) s.v[k] = acc_t(0);
    return s;
  }
};

template <typename acc_t>
struct ReduceParams {
  ChannelVec mean, var;
  acc_t eps;
  bool relu;
};

template <typename scalar_t, typename dy_t, int V>
struct ReduceIO {
  using XP = Pack<typename Traits<scalar_t>::raw_t, V>;
  using DP = Pack<typename Traits<dy_t>::raw_t, V>;
  const DP* __restrict__ dy;
  const XP* __restrict__ x;
  const XP* __restrict__ out;  // null without a ReLU
  typename Traits<scalar_t>::acc_t* __restrict__ sum_dy;
  typename Traits<scalar_t>::acc_t* __restrict__ sum_dy_xhat;
  typename Traits<scalar_t>::acc_t* __restrict__ workspace;  // (2, C, splits), null with one split
};

// Accumulate the first `valid` of kUnroll vectors idx[u] into s (pair v of s belongs to
// element v of the vector when F == V; F == 1 folds every element into pair 0).
template <typename scalar_t, typename dy_t, int V, int F, typename acc_t>
__device__ __forceinline__ void reduce_vectors(const ReduceIO<scalar_t, dy_t, V>& io, const int64_t (&idx)[kUnroll],
                                               int valid, const acc_t (&mean)[F], bool relu, Sums<acc_t, F>& s) {
  using IO = ReduceIO<scalar_t, dy_t, V>;
  typename IO::DP dp[kUnroll];
  typename IO::XP xp[kUnroll];
  typename IO::XP op[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < valid) {
      dp[u] = io.dy[idx[u]];
      xp[u] = io.x[idx[u]];
      if (relu) op[u] = io.out[idx[u]];
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < valid) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        constexpr int kStride = F == V ? 1 : 0;
        const int f = v * kStride;
        acc_t d = static_cast<acc_t>(Traits<dy_t>::to_acc(dp[u].v[v]));
        if (relu && relu_blocks<scalar_t>(op[u].v[v])) d = acc_t(0);
        const acc_t xmu = static_cast<acc_t>(Traits<scalar_t>::to_acc(xp[u].v[v])) - mean[f];
        s.v[2 * f] += d;
        s.v[2 * f + 1] = fma(d, xmu, s.v[2 * f + 1]);
      }
    }
  }
}

// A block's totals for channel c: the result with one split, else a partial.
template <typename acc_t, typename IOT>
__device__ __forceinline__ void reduce_store(const IOT& io, const ReduceParams<acc_t>& p, int64_t c,
                                             int64_t channels, acc_t sum_dy, acc_t sum_dy_xmu) {
  const int64_t splits = gridDim.y;
  if (splits == 1) {
    io.sum_dy[c] = sum_dy;
    io.sum_dy_xhat[c] = sum_dy_xmu * rsqrt_acc(load_channel(p.var, c, acc_t(1)) + p.eps);
  } else {
    const int64_t i = c * splits + blockIdx.y;
    io.workspace[i] = sum_dy;
    io.workspace[channels * splits + i] = sum_dy_xmu;
  }
}

template <typename scalar_t, typename dy_t, int V>
__global__ void __launch_bounds__(kThreads) reduce_nhwc_kernel(
    ReduceIO<scalar_t, dy_t, V> io, ReduceParams<typename Traits<scalar_t>::acc_t> p, int64_t rows,
    int64_t groups, int64_t rows_per_split, int bx) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  __shared__ acc_t smem[Sums<acc_t, V>::kFields * kThreads];
  const int by = kThreads / bx;  // bx is a power of two: every thread has a row slot
  const int tx = threadIdx.x % bx;
  const int ty = threadIdx.x / bx;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * bx + tx;
  const bool active = g < groups;  // uniform per slot; every thread still reduces

  Sums<acc_t, V> s = Sums<acc_t, V>::identity();
  if (active) {
    acc_t mean[V];
#pragma unroll
    for (int v = 0; v < V; ++v) mean[v] = load_channel(p.mean, g * V + v, acc_t(0));
    visit_nhwc_rows(rows, groups, rows_per_split, by, ty, g, [&](const int64_t(&idx)[kUnroll], int valid) {
      reduce_vectors(io, idx, valid, mean, p.relu, s);
    });
  }

  block_reduce(s, bx, smem);
  if (threadIdx.x < bx && active) {
#pragma unroll
    for (int v = 0; v < V; ++v) reduce_store(io, p, g * V + v, groups * V, s.v[2 * v], s.v[2 * v + 1]);
  }
}

template <typename scalar_t, typename dy_t, int V>
__global__ void __launch_bounds__(kThreads) reduce_nchw_kernel(
    ReduceIO<scalar_t, dy_t, V> io, ReduceParams<typename Traits<scalar_t>::acc_t> p, int64_t batch,
    int64_t channels, int64_t nvec, int64_t n_per_split, int64_t vec_per_split, int hw_splits, int bx,
    bool unroll_hw) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  __shared__ acc_t smem[Sums<acc_t, 1>::kFields * kThreads];
  const int64_t c = blockIdx.x;
  const acc_t mean[1] = {load_channel(p.mean, c, acc_t(0))};

  Sums<acc_t, 1> s = Sums<acc_t, 1>::identity();
  visit_nchw_vectors(batch, channels, nvec, n_per_split, vec_per_split, hw_splits, bx, unroll_hw,
                     [&](const int64_t(&idx)[kUnroll], int valid) { reduce_vectors(io, idx, valid, mean, p.relu, s); });

  block_reduce(s, 1, smem);
  if (threadIdx.x == 0) reduce_store(io, p, c, channels, s.v[0], s.v[1]);
}

// Second level: one block per channel adds its `splits` partial sums.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) reduce_finalize_kernel(
    const acc_t* __restrict__ workspace, ReduceParams<acc_t> p, int64_t channels, int splits,
    acc_t* __restrict__ sum_dy, acc_t* __restrict__ sum_dy_xhat) {
  __shared__ acc_t smem[Sums<acc_t, 1>::kFields * kThreads];
  const int64_t c = blockIdx.x;
  const acc_t* ws = workspace + c * splits;
  const int64_t plane = channels * splits;
  Sums<acc_t, 1> s = Sums<acc_t, 1>::identity();
  for (int i = threadIdx.x; i < splits; i += kThreads) {
    s.v[0] += ws[i];
    s.v[1] += ws[plane + i];
  }
  block_reduce(s, 1, smem);
  if (threadIdx.x == 0) {
    sum_dy[c] = s.v[0];
    sum_dy_xhat[c] = s.v[1] * rsqrt_acc(load_channel(p.var, c, acc_t(1)) + p.eps);
  }
}

// ---------------------------------------------------------------------------------------
// Backward elementwise pass: dx = A * dy' + B * (x - mean) + C0 per channel, with
// A = w * invstd and, in training, B = -A * invstd * sum_dy_xhat / M, C0 = -A * sum_dy / M
// (eval: B = C0 = 0 and x is not read); grad_residual = dy' in grad_out's dtype.

template <typename acc_t>
struct BackwardParams {
  ChannelVec mean, var, weight, sum_dy, sum_dy_xhat;
  acc_t eps;
  acc_t count;
  bool training;
  bool relu;
};

template <typename acc_t>
struct BackwardCoef {
  acc_t a, b, c0, mean;
};

template <typename acc_t>
__device__ __forceinline__ BackwardCoef<acc_t> backward_coefficients(const BackwardParams<acc_t>& p, int64_t c) {
  const acc_t invstd = rsqrt_acc(load_channel(p.var, c, acc_t(1)) + p.eps);
  BackwardCoef<acc_t> k;
  k.a = load_channel(p.weight, c, acc_t(1)) * invstd;
  k.mean = load_channel(p.mean, c, acc_t(0));
  if (p.training) {
    k.b = -k.a * invstd * (load_channel(p.sum_dy_xhat, c, acc_t(0)) / p.count);
    k.c0 = -k.a * (load_channel(p.sum_dy, c, acc_t(0)) / p.count);
  } else {
    k.b = acc_t(0);
    k.c0 = acc_t(0);
  }
  return k;
}

template <typename scalar_t, typename dy_t, int V>
struct BackwardIO {
  using XP = Pack<typename Traits<scalar_t>::raw_t, V>;
  using DP = Pack<typename Traits<dy_t>::raw_t, V>;
  const DP* __restrict__ dy;
  const XP* __restrict__ x;    // read in training only
  const XP* __restrict__ out;  // null without a ReLU
  XP* __restrict__ dx;
  DP* __restrict__ grad_res;   // null unless asked for
};

template <typename scalar_t, typename dy_t, int V, typename acc_t>
__device__ __forceinline__ void backward_vectors(const BackwardIO<scalar_t, dy_t, V>& io,
                                                 const int64_t (&idx)[kUnroll], int valid,
                                                 const BackwardCoef<acc_t> (&k)[V], const BackwardParams<acc_t>& p) {
  using IO = BackwardIO<scalar_t, dy_t, V>;
  using dy_raw_t = typename Traits<dy_t>::raw_t;
  typename IO::DP dp[kUnroll];
  typename IO::XP xp[kUnroll];
  typename IO::XP op[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < valid) {
      dp[u] = io.dy[idx[u]];
      if (p.training) xp[u] = io.x[idx[u]];
      if (p.relu) op[u] = io.out[idx[u]];
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < valid) {
      if (p.relu) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (relu_blocks<scalar_t>(op[u].v[v])) dp[u].v[v] = dy_raw_t(0);
        }
      }
      typename IO::XP dxp;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const acc_t d = static_cast<acc_t>(Traits<dy_t>::to_acc(dp[u].v[v]));
        acc_t g = k[v].a * d;
        if (p.training) {
          const acc_t xmu = static_cast<acc_t>(Traits<scalar_t>::to_acc(xp[u].v[v])) - k[v].mean;
          g = fma(k[v].b, xmu, g) + k[v].c0;
        }
        dxp.v[v] = Traits<scalar_t>::from_acc(g);
      }
      io.dx[idx[u]] = dxp;
      if (io.grad_res != nullptr) io.grad_res[idx[u]] = dp[u];
    }
  }
}

template <typename scalar_t, typename dy_t, int V>
__global__ void __launch_bounds__(kThreads) backward_nhwc_kernel(
    BackwardIO<scalar_t, dy_t, V> io, BackwardParams<typename Traits<scalar_t>::acc_t> p, int64_t rows,
    int64_t groups, int64_t rows_per_split, int bx) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  const int by = kThreads / bx;
  const int tx = threadIdx.x % bx;
  const int ty = threadIdx.x / bx;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * bx + tx;
  if (ty >= by || g >= groups) return;  // no block-wide synchronisation below

  BackwardCoef<acc_t> k[V];
#pragma unroll
  for (int v = 0; v < V; ++v) k[v] = backward_coefficients(p, g * V + v);

  visit_nhwc_rows(rows, groups, rows_per_split, by, ty, g, [&](const int64_t(&idx)[kUnroll], int valid) {
    backward_vectors(io, idx, valid, k, p);
  });
}

template <typename scalar_t, typename dy_t, int V>
__global__ void __launch_bounds__(kThreads) backward_nchw_kernel(
    BackwardIO<scalar_t, dy_t, V> io, BackwardParams<typename Traits<scalar_t>::acc_t> p, int64_t batch,
    int64_t channels, int64_t nvec, int64_t n_per_split, int64_t vec_per_split, int hw_splits, int bx,
    bool unroll_hw) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  const int64_t c = blockIdx.x;

  const BackwardCoef<acc_t> kc = backward_coefficients(p, c);
  BackwardCoef<acc_t> k[V];
#pragma unroll
  for (int v = 0; v < V; ++v) k[v] = kc;

  visit_nchw_vectors(batch, channels, nvec, n_per_split, vec_per_split, hw_splits, bx, unroll_hw,
                     [&](const int64_t(&idx)[kUnroll], int valid) { backward_vectors(io, idx, valid, k, p); });
}

// ---------------------------------------------------------------------------------------
// Host side.

bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

at::ScalarType accumulation_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The layout the kernels read, and the memory format of the outputs (ops/common.py's
// output_memory_format: channels_last when the input is, and not also contiguous).
struct Layout {
  bool nhwc;                   // kernel: channels_last (rows, C) or NCHW planes
  at::MemoryFormat kernel;     // the format every tensor is read in
  at::MemoryFormat output;     // the outputs' memory format
};

Layout choose_layout(const at::Tensor& input) {
  const bool nchw = input.is_contiguous();
  const bool nhwc = input.is_contiguous(at::MemoryFormat::ChannelsLast);
  const bool hw_one = input.size(2) * input.size(3) == 1;
  Layout layout;
  layout.output = (nhwc && !nchw) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  // A tensor can be both (H = W = 1, C = 1): with H*W = 1 the (rows, C) view reads whole
  // rows of channels, and the NCHW output holds the same bytes.
  layout.nhwc = nhwc && (!nchw || hw_one);
  layout.kernel = layout.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return layout;
}

at::Tensor in_format(const at::Tensor& t, at::MemoryFormat format) {
  return t.is_contiguous(format) ? t : t.contiguous(format);
}

void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), op, ": input must be a CUDA tensor, got device ", input.device());
  TORCH_CHECK(input.dim() == 4, op, ": input must be a 4-D (N, C, H, W) tensor, got shape ", input.sizes());
  TORCH_CHECK(is_float_dtype(input.scalar_type()), op,
              ": input must be float16, bfloat16, float32 or float64, got ", input.scalar_type());
  TORCH_CHECK(input.size(1) <= std::numeric_limits<int32_t>::max(), op, ": input has too many channels (",
              input.size(1), ")");
}

void check_like_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": ", name, " must have the input's shape ", input.sizes(),
              ", got ", t.sizes());
}

// A per-channel vector for the kernels; `keep` holds a contiguous copy when one is needed.
ChannelVec channel_vec(const char* op, const char* name, const std::optional<at::Tensor>& t,
                       const at::Tensor& input, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) {
    return {nullptr, kAbsent};
  }
  const int64_t channels = input.size(1);
  TORCH_CHECK(t->device() == input.device(), op, ": ", name, " is on ", t->device(), " but input is on ",
              input.device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, op, ": ", name, " must have shape (", channels,
              ",) to match the input's ", channels, " channels, got ", t->sizes());
  int type = kAbsent;
  switch (t->scalar_type()) {
    case at::kHalf: type = kF16; break;
    case at::kBFloat16: type = kBF16; break;
    case at::kFloat: type = kF32; break;
    case at::kDouble: type = kF64; break;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float16, bfloat16, float32 or float64, got ", t->scalar_type());
  }
  keep = t->contiguous();
  return {keep.const_data_ptr(), type};
}

// The contiguous extent the vector loads run along: C (channels_last) or H*W (NCHW).
int64_t inner_extent(const at::Tensor& input, const Layout& layout) {
  return layout.nhwc ? input.size(1) : input.size(2) * input.size(3);
}

// Launch configuration shared by the three ops: the plan for the layout and vector width.
struct Grid {
  dim3 grid;
  NhwcPlan nhwc;
  NchwPlan nchw;
  int64_t rows, groups, nvec;
};

Grid make_grid(const at::Tensor& input, const Layout& layout, int width, int64_t target_blocks, bool reduction) {
  Grid g{};
  const int64_t batch = input.size(0);
  const int64_t channels = input.size(1);
  const int64_t hw = input.size(2) * input.size(3);
  if (layout.nhwc) {
    g.rows = batch * hw;
    g.groups = channels / width;
    g.nhwc = plan_nhwc(g.rows, g.groups, target_blocks, reduction);
    g.grid = dim3(static_cast<unsigned>(g.nhwc.tiles), static_cast<unsigned>(g.nhwc.splits));
  } else {
    g.nvec = hw / width;
    g.nchw = plan_nchw(batch, channels, g.nvec, target_blocks);
    TORCH_INTERNAL_ASSERT(g.nchw.splits >= 1 && g.nchw.splits <= kMaxSplits);
    g.grid = dim3(static_cast<unsigned>(channels), static_cast<unsigned>(g.nchw.splits));
  }
  return g;
}

// The kernels of an elementwise pass want a couple of waves; a reduction one wave (its
// partials then take a second, small kernel).
int64_t elementwise_blocks(const at::Tensor& input) { return 2 * wave_blocks(input.device().index()); }
int64_t reduction_blocks(const at::Tensor& input) { return wave_blocks(input.device().index()); }

// ----- apply --------------------------------------------------------------------------

template <typename scalar_t, typename res_t, int V>
void launch_apply(const at::Tensor& x, const at::Tensor* residual, at::Tensor& out, const Layout& layout,
                  const ApplyParams<typename Traits<scalar_t>::acc_t>& p, cudaStream_t stream) {
  using IO = ApplyIO<scalar_t, res_t, V>;
  IO io;
  io.x = reinterpret_cast<const typename IO::XP*>(x.const_data_ptr());
  io.res = residual == nullptr ? nullptr : reinterpret_cast<const typename IO::RP*>(residual->const_data_ptr());
  io.out = reinterpret_cast<typename IO::XP*>(out.mutable_data_ptr());
  const Grid g = make_grid(x, layout, V, elementwise_blocks(x), /*reduction=*/false);
  if (layout.nhwc) {
    apply_nhwc_kernel<scalar_t, res_t, V><<<g.grid, kThreads, 0, stream>>>(io, p, g.rows, g.groups,
                                                                            g.nhwc.rows_per_split, g.nhwc.bx);
  } else {
    apply_nchw_kernel<scalar_t, res_t, V><<<g.grid, kThreads, 0, stream>>>(
        io, p, x.size(0), x.size(1), g.nvec, g.nchw.n_per_split, g.nchw.vec_per_split,
        static_cast<int>(g.nchw.hw_splits), g.nchw.bx, g.nchw.unroll_hw);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename res_t>
void dispatch_apply_width(const at::Tensor& x, const at::Tensor* residual, at::Tensor& out, const Layout& layout,
                          const ApplyParams<typename Traits<scalar_t>::acc_t>& p, cudaStream_t stream) {
  // Mixed dtypes (a float32 residual of fp16/bf16 activations) are rare: scalar kernels
  // only, which keeps the build smaller.
  constexpr int V = std::is_same_v<scalar_t, res_t> ? vec_width<scalar_t>() : 1;
  const int width = vector_width(V, inner_extent(x, layout),
                                 {x.const_data_ptr(), out.const_data_ptr(),
                                  residual == nullptr ? nullptr : residual->const_data_ptr()});
  with_vector_width<V>(width, [&](auto w) {
    launch_apply<scalar_t, res_t, decltype(w)::value>(x, residual, out, layout, p, stream);
  });
}

at::Tensor batch_norm_act_apply_cuda(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& residual, double eps, bool relu) {
  constexpr const char* op = "batch_norm_act_apply";
  check_input(op, input);
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor keep_mean, keep_var, keep_weight, keep_bias;
  const ChannelVec mean_vec = channel_vec(op, "mean", mean, input, keep_mean);
  const ChannelVec var_vec = channel_vec(op, "var", var, input, keep_var);
  const ChannelVec weight_vec = channel_vec(op, "weight", weight, input, keep_weight);
  const ChannelVec bias_vec = channel_vec(op, "bias", bias, input, keep_bias);
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) check_like_input(op, "residual", *residual, input);

  const Layout layout = choose_layout(input);
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(layout.output));
  if (input.numel() == 0) return out;
  const at::Tensor x = in_format(input, layout.kernel);
  const auto acc_dtype = accumulation_dtype(input.scalar_type());
  // The residual in the input's dtype or the accumulation dtype (exact, as the reference's
  // residual.to(acc)); in the kernel layout.
  at::Tensor res;
  if (has_residual) {
    res = residual->scalar_type() == input.scalar_type() ? *residual : residual->to(acc_dtype);
    res = in_format(res, layout.kernel);
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act_apply_cuda", [&] {
    using acc_t = typename Traits<scalar_t>::acc_t;
    const ApplyParams<acc_t> p{mean_vec, var_vec, weight_vec, bias_vec, static_cast<acc_t>(eps), relu};
    const at::Tensor* res_ptr = has_residual ? &res : nullptr;
    if (!has_residual || res.scalar_type() == input.scalar_type()) {
      dispatch_apply_width<scalar_t, scalar_t>(x, res_ptr, out, layout, p, stream);
    } else if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      dispatch_apply_width<scalar_t, acc_t>(x, res_ptr, out, layout, p, stream);
    }
  });
  return out;
}

// ----- backward reduce ----------------------------------------------------------------

// grad_out in the input's dtype or the accumulation dtype (exact, as the reference's
// grad_out.to(acc)); `exact` is false when that conversion rounds (float64 gradients of
// a lower-precision input), where grad_residual must come from grad_out itself.
at::Tensor grad_out_for_kernels(const at::Tensor& grad_out, const at::Tensor& input, const Layout& layout) {
  const auto dtype = grad_out.scalar_type();
  const auto acc_dtype = accumulation_dtype(input.scalar_type());
  at::Tensor dy = (dtype == input.scalar_type() || dtype == acc_dtype) ? grad_out : grad_out.to(acc_dtype);
  return in_format(dy, layout.kernel);
}

// The ReLU mask source in the input's dtype: `out` itself, or a 0/1 tensor with the same
// `out <= 0` pattern when out has another dtype.
at::Tensor out_for_kernels(const at::Tensor& out, const at::Tensor& input, const Layout& layout) {
  at::Tensor o = out.scalar_type() == input.scalar_type() ? out : out.le(0).logical_not().to(input.scalar_type());
  return in_format(o, layout.kernel);
}

template <typename scalar_t, typename dy_t, int V>
void launch_reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* out, at::Tensor& sum_dy,
                   at::Tensor& sum_dy_xhat, const Layout& layout,
                   const ReduceParams<typename Traits<scalar_t>::acc_t>& p, cudaStream_t stream) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  using IO = ReduceIO<scalar_t, dy_t, V>;
  const Grid g = make_grid(x, layout, V, reduction_blocks(x), /*reduction=*/true);
  const int64_t channels = x.size(1);
  at::Tensor workspace;
  IO io;
  io.dy = reinterpret_cast<const typename IO::DP*>(dy.const_data_ptr());
  io.x = reinterpret_cast<const typename IO::XP*>(x.const_data_ptr());
  io.out = out == nullptr ? nullptr : reinterpret_cast<const typename IO::XP*>(out->const_data_ptr());
  io.sum_dy = sum_dy.mutable_data_ptr<acc_t>();
  io.sum_dy_xhat = sum_dy_xhat.mutable_data_ptr<acc_t>();
  io.workspace = nullptr;
  if (g.grid.y > 1) {
    workspace = at::empty({2, channels, static_cast<int64_t>(g.grid.y)}, sum_dy.options());
    io.workspace = workspace.mutable_data_ptr<acc_t>();
  }
  if (layout.nhwc) {
    reduce_nhwc_kernel<scalar_t, dy_t, V><<<g.grid, kThreads, 0, stream>>>(io, p, g.rows, g.groups,
                                                                            g.nhwc.rows_per_split, g.nhwc.bx);
  } else {
    reduce_nchw_kernel<scalar_t, dy_t, V><<<g.grid, kThreads, 0, stream>>>(
        io, p, x.size(0), channels, g.nvec, g.nchw.n_per_split, g.nchw.vec_per_split,
        static_cast<int>(g.nchw.hw_splits), g.nchw.bx, g.nchw.unroll_hw);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (io.workspace != nullptr) {
    reduce_finalize_kernel<acc_t><<<static_cast<unsigned>(channels), kThreads, 0, stream>>>(
        io.workspace, p, channels, static_cast<int>(g.grid.y), io.sum_dy, io.sum_dy_xhat);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename dy_t>
void dispatch_reduce_width(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* out, at::Tensor& sum_dy,
                           at::Tensor& sum_dy_xhat, const Layout& layout,
                           const ReduceParams<typename Traits<scalar_t>::acc_t>& p, cudaStream_t stream) {
  constexpr int V = std::is_same_v<scalar_t, dy_t> ? vec_width<scalar_t>() : 1;  // mixed: scalar only
  const int width = vector_width(V, inner_extent(x, layout),
                                 {x.const_data_ptr(), dy.const_data_ptr(),
                                  out == nullptr ? nullptr : out->const_data_ptr()});
  with_vector_width<V>(width, [&](auto w) {
    launch_reduce<scalar_t, dy_t, decltype(w)::value>(dy, x, out, sum_dy, sum_dy_xhat, layout, p, stream);
  });
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_backward_reduce_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& out, double eps, bool relu) {
  constexpr const char* op = "batch_norm_act_backward_reduce";
  check_input(op, input);
  check_like_input(op, "grad_out", grad_out, input);
  const bool has_out = out.has_value() && out->defined();
  TORCH_CHECK(!relu || has_out, op, ": out (the forward output, whose sign is the ReLU mask) must be given when relu=True");
  if (relu) check_like_input(op, "out", *out, input);
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor keep_mean, keep_var;
  const ChannelVec mean_vec = channel_vec(op, "mean", mean, input, keep_mean);
  const ChannelVec var_vec = channel_vec(op, "var", var, input, keep_var);

  const auto acc_dtype = accumulation_dtype(input.scalar_type());
  const int64_t channels = input.size(1);
  at::Tensor sum_dy = at::empty({channels}, input.options().dtype(acc_dtype));
  at::Tensor sum_dy_xhat = at::empty({channels}, input.options().dtype(acc_dtype));
  if (channels == 0) return {sum_dy, sum_dy_xhat};
  if (input.numel() == 0) {  // sums over no values
    sum_dy.zero_();
    sum_dy_xhat.zero_();
    return {sum_dy, sum_dy_xhat};
  }
  const Layout layout = choose_layout(input);
  const at::Tensor x = in_format(input, layout.kernel);
  const at::Tensor dy = grad_out_for_kernels(grad_out, input, layout);
  at::Tensor o;
  if (relu) o = out_for_kernels(*out, input, layout);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act_backward_reduce_cuda", [&] {
    using acc_t = typename Traits<scalar_t>::acc_t;
    const ReduceParams<acc_t> p{mean_vec, var_vec, static_cast<acc_t>(eps), relu};
    const at::Tensor* out_ptr = relu ? &o : nullptr;
    if (dy.scalar_type() == input.scalar_type()) {
      dispatch_reduce_width<scalar_t, scalar_t>(dy, x, out_ptr, sum_dy, sum_dy_xhat, layout, p, stream);
    } else if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      dispatch_reduce_width<scalar_t, acc_t>(dy, x, out_ptr, sum_dy, sum_dy_xhat, layout, p, stream);
    }
  });
  return {sum_dy, sum_dy_xhat};
}

// ----- backward apply -----------------------------------------------------------------

template <typename scalar_t, typename dy_t, int V>
void launch_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* out, at::Tensor& dx,
                     at::Tensor* grad_res, const Layout& layout,
                     const BackwardParams<typename Traits<scalar_t>::acc_t>& p, cudaStream_t stream) {
  using IO = BackwardIO<scalar_t, dy_t, V>;
  IO io;
  io.dy = reinterpret_cast<const typename IO::DP*>(dy.const_data_ptr());
  io.x = reinterpret_cast<const typename IO::XP*>(x.const_data_ptr());
  io.out = out == nullptr ? nullptr : reinterpret_cast<const typename IO::XP*>(out->const_data_ptr());
  io.dx = reinterpret_cast<typename IO::XP*>(dx.mutable_data_ptr());
  io.grad_res = grad_res == nullptr ? nullptr : reinterpret_cast<typename IO::DP*>(grad_res->mutable_data_ptr());
  const Grid g = make_grid(x, layout, V, elementwise_blocks(x), /*reduction=*/false);
  if (layout.nhwc) {
    backward_nhwc_kernel<scalar_t, dy_t, V><<<g.grid, kThreads, 0, stream>>>(io, p, g.rows, g.groups,
                                                                              g.nhwc.rows_per_split, g.nhwc.bx);
  } else {
    backward_nchw_kernel<scalar_t, dy_t, V><<<g.grid, kThreads, 0, stream>>>(
        io, p, x.size(0), x.size(1), g.nvec, g.nchw.n_per_split, g.nchw.vec_per_split,
        static_cast<int>(g.nchw.hw_splits), g.nchw.bx, g.nchw.unroll_hw);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename dy_t>
void dispatch_backward_width(const at::Tensor& dy, const at::Tensor& x, const at::Tensor* out, at::Tensor& dx,
                             at::Tensor* grad_res, const Layout& layout,
                             const BackwardParams<typename Traits<scalar_t>::acc_t>& p, cudaStream_t stream) {
  constexpr int V = std::is_same_v<scalar_t, dy_t> ? vec_width<scalar_t>() : 1;  // mixed: scalar only
  const int width = vector_width(V, inner_extent(x, layout),
                                 {x.const_data_ptr(), dx.const_data_ptr(), dy.const_data_ptr(),
                                  out == nullptr ? nullptr : out->const_data_ptr(),
                                  grad_res == nullptr ? nullptr : grad_res->const_data_ptr()});
  with_vector_width<V>(width, [&](auto w) {
    launch_backward<scalar_t, dy_t, decltype(w)::value>(dy, x, out, dx, grad_res, layout, p, stream);
  });
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_backward_apply_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& out, const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xhat, bool training, double eps, bool relu, bool need_grad_residual) {
  constexpr const char* op = "batch_norm_act_backward_apply";
  check_input(op, input);
  check_like_input(op, "grad_out", grad_out, input);
  const bool has_out = out.has_value() && out->defined();
  TORCH_CHECK(!relu || has_out, op, ": out (the forward output, whose sign is the ReLU mask) must be given when relu=True");
  if (relu) check_like_input(op, "out", *out, input);
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor keep_mean, keep_var, keep_weight, keep_sum_dy, keep_sum_dy_xhat;
  const ChannelVec mean_vec = channel_vec(op, "mean", mean, input, keep_mean);
  const ChannelVec var_vec = channel_vec(op, "var", var, input, keep_var);
  const ChannelVec weight_vec = channel_vec(op, "weight", weight, input, keep_weight);
  const ChannelVec sum_dy_vec = channel_vec(op, "sum_dy", sum_dy, input, keep_sum_dy);
  const ChannelVec sum_dy_xhat_vec = channel_vec(op, "sum_dy_xhat", sum_dy_xhat, input, keep_sum_dy_xhat);

  const Layout layout = choose_layout(input);
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(layout.output));
  at::Tensor grad_residual = need_grad_residual
      ? at::empty(input.sizes(), grad_out.options().memory_format(layout.output))
      : at::empty({0}, grad_out.options());
  if (input.numel() == 0) return {grad_input, grad_residual};

  const at::Tensor x = in_format(input, layout.kernel);
  const at::Tensor dy = grad_out_for_kernels(grad_out, input, layout);
  at::Tensor o;
  if (relu) o = out_for_kernels(*out, input, layout);
  // The kernel writes grad_residual when it reads grad_out in grad_out's own dtype;
  // otherwise (a converted grad_out) it comes from grad_out directly, as the reference.
  const bool kernel_writes_residual = need_grad_residual && dy.scalar_type() == grad_out.scalar_type();
  if (need_grad_residual && !kernel_writes_residual) {
    const at::Tensor masked = relu ? grad_out.masked_fill(out->le(0), 0) : grad_out;
    grad_residual.copy_(masked);
  }
  const int64_t count = input.numel() / input.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_act_backward_apply_cuda", [&] {
    using acc_t = typename Traits<scalar_t>::acc_t;
    const BackwardParams<acc_t> p{mean_vec,       var_vec,  weight_vec,          sum_dy_vec, sum_dy_xhat_vec,
                                  static_cast<acc_t>(eps), static_cast<acc_t>(count), training, relu};
    const at::Tensor* out_ptr = relu ? &o : nullptr;
    at::Tensor* res_ptr = kernel_writes_residual ? &grad_residual : nullptr;
    if (dy.scalar_type() == input.scalar_type()) {
      dispatch_backward_width<scalar_t, scalar_t>(dy, x, out_ptr, grad_input, res_ptr, layout, p, stream);
    } else if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      dispatch_backward_width<scalar_t, acc_t>(dy, x, out_ptr, grad_input, res_ptr, layout, p, stream);
    }
  });
  return {grad_input, grad_residual};
}

}  // namespace
}  // namespace resnet_fast

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("batch_norm_act_apply", TORCH_FN(resnet_fast::batch_norm_act_apply_cuda));
  m.impl("batch_norm_act_backward_reduce", TORCH_FN(resnet_fast::batch_norm_act_backward_reduce_cuda));
  m.impl("batch_norm_act_backward_apply", TORCH_FN(resnet_fast::batch_norm_act_backward_apply_cuda));
}
