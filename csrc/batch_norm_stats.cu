// resnet_fast::batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var), CUDA kernel.
//
// Per-channel mean and biased variance of a 4-D (N, C, H, W) tensor, the first pass of
// a training BatchNorm. The schema, the fake implementation and the torch reference live
// in resnet_fast/ops/batch_norm_stats.py; this file only adds the CUDA kernel.
//
// Numerics: every thread keeps a Welford state (mean, M2, count) in float32 (float64 for
// float64 input). It folds its values in a few at a time: a small chunk (up to kUnroll
// loads) gets its own mean and M2 directly, then merges into the running state with
// Chan et al.'s pairwise update. That is Welford's update with a batch of values instead
// of one, so it keeps Welford's robustness to a large mean (no sum-of-squares
// cancellation) at one division per chunk instead of one per element. Threads, then
// blocks, merge with the same update.
//
// Work split (two levels):
//  * channels_last (NHWC): the input is a (rows = N*H*W, C) matrix. A block covers a tile
//    of channels (each thread owns V adjacent channels, loaded as one vector: 16 bytes,
//    or 8 bytes for fp16/bf16 when C is a multiple of 4 but not of 8, else one element;
//    NCHW planes likewise along H*W) and a range of rows; blockIdx.y splits the rows.
//  * NCHW: a block covers one channel; blockIdx.y splits the batch (and, for large
//    planes, the H*W plane too). Small planes (7x7) put several planes in flight per
//    block so that a block still reads long runs; large planes unroll along H*W.
//  When one block per channel tile does not fill the GPU (small C, large N*H*W), the
//  blocks write partial states to a workspace and a second kernel merges them per
//  channel; otherwise the first kernel writes the result directly. No host
//  synchronisation: capturable in CUDA graphs.
//
// bf16 values are widened by a bit shift (exact), not with bf16 intrinsics, so the
// sm_75 (and sm_70) builds need nothing newer.

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
#include <tuple>

#include "reduction.cuh"

namespace resnet_fast {
namespace {

// kThreads, kUnroll, kMaxSplits, Traits, Pack, block_reduce and the work splits
// (plan_nhwc, plan_nchw) come from reduction.cuh.

// ---------------------------------------------------------------------------------------
// Welford states and Chan's merge.

template <typename acc_t>
struct Welford;
template <typename acc_t>
__device__ __forceinline__ void merge(Welford<acc_t>& a, acc_t b_mean, acc_t b_m2, acc_t b_n);

template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;
  acc_t n;  // count; float32 counts are exact to 2^24 per partial, ample per block

  // The State interface of block_reduce (reduction.cuh).
  using value_type = acc_t;
  static constexpr int kFields = 3;
  __device__ __forceinline__ acc_t& field(int k) { return k == 0 ? mean : (k == 1 ? m2 : n); }
  __device__ __forceinline__ void combine(const Welford& o) { merge(*this, o.mean, o.m2, o.n); }
  static __device__ __forceinline__ Welford identity() { return {acc_t(0), acc_t(0), acc_t(0)}; }
};

template <typename acc_t>
__device__ __forceinline__ acc_t ratio(acc_t a, acc_t b) {
  return a / b;
}
// The chunk weight k / n only scales a correction term; a 2-ulp quotient is plenty and
// far cheaper than IEEE division (this file is built without --use_fast_math).
template <>
__device__ __forceinline__ float ratio<float>(float a, float b) {
  return __fdividef(a, b);
}

// Merge (b_mean, b_m2, b_n) into a (Chan, Golub and LeVeque).
template <typename acc_t>
__device__ __forceinline__ void merge(Welford<acc_t>& a, acc_t b_mean, acc_t b_m2, acc_t b_n) {
  if (b_n == acc_t(0)) {
    return;
  }
  const acc_t n = a.n + b_n;
  const acc_t w = b_n / n;
  const acc_t delta = b_mean - a.mean;
  a.mean += delta * w;
  a.m2 += b_m2 + delta * delta * a.n * w;
  a.n = n;
}

// Fold a chunk of L values, of which the first `valid` are real, into s.
template <int L, typename acc_t>
__device__ __forceinline__ void merge_chunk(Welford<acc_t>& s, const acc_t (&x)[L], int valid) {
  if (valid <= 0) {
    return;
  }
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < L; ++i) {
    if (i < valid) sum += x[i];
  }
  const acc_t k = static_cast<acc_t>(valid);
  const acc_t chunk_mean = valid == L ? sum * (acc_t(1) / acc_t(L)) : sum / k;
  acc_t chunk_m2 = 0;
#pragma unroll
  for (int i = 0; i < L; ++i) {
    if (i < valid) {
      const acc_t d = x[i] - chunk_mean;
      chunk_m2 += d * d;
    }
  }
  const acc_t n = s.n + k;
  const acc_t w = ratio(k, n);
  const acc_t delta = chunk_mean - s.mean;
  s.mean += delta * w;
  s.m2 += chunk_m2 + delta * delta * s.n * w;
  s.n = n;
}

// Write a block's total for channel c: the result when the grid has one split, else a
// partial state into the (3, C, splits) workspace.
template <typename acc_t>
__device__ __forceinline__ void store(const Welford<acc_t>& s, int64_t c, int64_t channels,
                                      acc_t* __restrict__ mean, acc_t* __restrict__ var,
                                      acc_t* __restrict__ workspace) {
  const int64_t splits = gridDim.y;
  if (splits == 1) {
    mean[c] = s.mean;
    var[c] = s.m2 / s.n;
  } else {
    const int64_t i = c * splits + blockIdx.y;
    const int64_t plane = channels * splits;
    workspace[i] = s.mean;
    workspace[plane + i] = s.m2;
    workspace[2 * plane + i] = s.n;
  }
}

// ---------------------------------------------------------------------------------------
// channels_last: a (rows, C) matrix. Thread (tx, ty) of a (bx, by) block owns channels
// [c0, c0 + V) and reads rows ty, ty + by, ... of its block's row range, kUnroll rows at
// a time. bx is a power of two <= 32.

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) stats_nhwc_kernel(
    const scalar_t* __restrict__ input, int64_t rows, int64_t channels, int64_t rows_per_split,
    int bx, typename Traits<scalar_t>::acc_t* __restrict__ mean,
    typename Traits<scalar_t>::acc_t* __restrict__ var,
    typename Traits<scalar_t>::acc_t* __restrict__ workspace) {
  using raw_t = typename Traits<scalar_t>::raw_t;
  using acc_t = typename Traits<scalar_t>::acc_t;
  __shared__ acc_t smem[3 * kThreads];

  const int by = kThreads / bx;
  const int tx = threadIdx.x % bx;
  const int ty = threadIdx.x / bx;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * bx + tx;  // channels [g * V, g * V + V)
  const int64_t c0 = g * V;
  const bool active = c0 < channels;  // uniform per slot; every thread still reduces

  Welford<acc_t> st[V];
#pragma unroll
  for (int v = 0; v < V; ++v) st[v] = {acc_t(0), acc_t(0), acc_t(0)};

  if (active) {
    // channels % V == 0 (the host picks V so), hence channels / V groups per row
    const auto* vecs = reinterpret_cast<const Pack<raw_t, V>*>(input);
    visit_nhwc_rows(rows, channels / V, rows_per_split, by, ty, g, [&](const int64_t(&idx)[kUnroll], int valid) {
      Pack<raw_t, V> p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (u < valid) {
          p[u] = vecs[idx[u]];
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) p[u].v[v] = raw_t(0);
        }
      }
#pragma unroll
      for (int v = 0; v < V; ++v) {
        acc_t x[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) x[u] = Traits<scalar_t>::to_acc(p[u].v[v]);
        merge_chunk(st[v], x, valid);
      }
    });
  }

#pragma unroll
  for (int v = 0; v < V; ++v) {
    block_reduce(st[v], bx, smem);
    if (threadIdx.x < bx && active && c0 + v < channels) {
      store(st[v], c0 + v, channels, mean, var, workspace);
    }
  }
}

// ---------------------------------------------------------------------------------------
// NCHW: blockIdx.x is the channel; blockIdx.y picks a range of images and of the H*W
// plane (counted in V-element vectors), walked as visit_nchw_vectors (reduction.cuh) says.

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) stats_nchw_kernel(
    const scalar_t* __restrict__ input, int64_t batch, int64_t channels, int64_t hw,
    int64_t n_per_split, int64_t vec_per_split, int hw_splits, int bx, bool unroll_hw,
    typename Traits<scalar_t>::acc_t* __restrict__ mean,
    typename Traits<scalar_t>::acc_t* __restrict__ var,
    typename Traits<scalar_t>::acc_t* __restrict__ workspace) {
  using raw_t = typename Traits<scalar_t>::raw_t;
  using acc_t = typename Traits<scalar_t>::acc_t;
  using P = Pack<raw_t, V>;
  __shared__ acc_t smem[3 * kThreads];

  const int64_t c = blockIdx.x;
  const P* vecs = reinterpret_cast<const P*>(input);

  Welford<acc_t> st{acc_t(0), acc_t(0), acc_t(0)};
  visit_nchw_vectors(batch, channels, hw / V, n_per_split, vec_per_split, hw_splits, bx, unroll_hw,
                     [&](const int64_t(&idx)[kUnroll], int valid) {
                       P p[kUnroll];
#pragma unroll
                       for (int u = 0; u < kUnroll; ++u) {
                         if (u < valid) p[u] = vecs[idx[u]];
                       }
                       acc_t x[kUnroll * V];
#pragma unroll
                       for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
                         for (int v = 0; v < V; ++v) {
                           x[u * V + v] = u < valid ? Traits<scalar_t>::to_acc(p[u].v[v]) : acc_t(0);
                         }
                       }
                       merge_chunk(st, x, valid * V);
                     });

  block_reduce(st, 1, smem);
  if (threadIdx.x == 0) {
    store(st, c, channels, mean, var, workspace);
  }
}

// ---------------------------------------------------------------------------------------
// Second level: one block per channel merges its `splits` partial states.

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) stats_finalize_kernel(
    const acc_t* __restrict__ workspace, int64_t channels, int splits,
    acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  __shared__ acc_t smem[3 * kThreads];
  const int64_t c = blockIdx.x;
  const int64_t plane = channels * splits;
  const acc_t* ws = workspace + c * splits;
  Welford<acc_t> st{acc_t(0), acc_t(0), acc_t(0)};
  for (int i = threadIdx.x; i < splits; i += kThreads) {
    merge(st, ws[i], ws[plane + i], ws[2 * plane + i]);
  }
  block_reduce(st, 1, smem);
  if (threadIdx.x == 0) {
    mean[c] = st.mean;
    var[c] = st.m2 / st.n;
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

template <typename scalar_t>
void launch_stats(const at::Tensor& x, bool channels_last, at::Tensor& mean, at::Tensor& var,
                  int64_t target_blocks, cudaStream_t stream) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  constexpr int V = vec_width<scalar_t>();
  const int64_t batch = x.size(0);
  const int64_t channels = x.size(1);
  const int64_t hw = x.size(2) * x.size(3);
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  acc_t* mean_ptr = mean.mutable_data_ptr<acc_t>();
  acc_t* var_ptr = var.mutable_data_ptr<acc_t>();

  dim3 grid;
  at::Tensor workspace;
  acc_t* ws_ptr = nullptr;
  auto make_workspace = [&](int64_t splits) {
    if (splits > 1) {
      workspace = at::empty({3, channels, splits}, mean.options());
      ws_ptr = workspace.mutable_data_ptr<acc_t>();
    }
  };

  // Elements per load: 16 bytes, 8 bytes (fp16/bf16) or one element (vector_width).
  const int width = vector_width(V, channels_last ? channels : hw, {data});
  if (channels_last) {
    const int64_t rows = batch * hw;
    const NhwcPlan plan = plan_nhwc(rows, channels / width, target_blocks, /*reduction=*/true);
    make_workspace(plan.splits);
    grid = dim3(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.splits));
    with_vector_width<V>(width, [&](auto w) {
      stats_nhwc_kernel<scalar_t, decltype(w)::value><<<grid, kThreads, 0, stream>>>(
          data, rows, channels, plan.rows_per_split, plan.bx, mean_ptr, var_ptr, ws_ptr);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t nvec = hw / width;
    const NchwPlan plan = plan_nchw(batch, channels, nvec, target_blocks);
    TORCH_INTERNAL_ASSERT(plan.splits >= 1 && plan.splits <= kMaxSplits);
    make_workspace(plan.splits);
    grid = dim3(static_cast<unsigned>(channels), static_cast<unsigned>(plan.splits));
    with_vector_width<V>(width, [&](auto w) {
      stats_nchw_kernel<scalar_t, decltype(w)::value><<<grid, kThreads, 0, stream>>>(
          data, batch, channels, hw, plan.n_per_split, plan.vec_per_split, static_cast<int>(plan.hw_splits),
          plan.bx, plan.unroll_hw, mean_ptr, var_ptr, ws_ptr);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (ws_ptr != nullptr) {
    stats_finalize_kernel<acc_t><<<static_cast<unsigned>(channels), kThreads, 0, stream>>>(
        ws_ptr, channels, static_cast<int>(grid.y), mean_ptr, var_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "batch_norm_stats: input must be a CUDA tensor, got device ",
              input.device());
  TORCH_CHECK(input.dim() == 4, "batch_norm_stats: input must be a 4-D (N, C, H, W) tensor, got shape ",
              input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              "batch_norm_stats: input must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(input.size(1) <= std::numeric_limits<int32_t>::max(),
              "batch_norm_stats: input has too many channels (", input.size(1), ")");

  c10::cuda::CUDAGuard guard(input.device());
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t channels = input.size(1);
  at::Tensor mean = at::empty({channels}, input.options().dtype(acc_dtype));
  at::Tensor var = at::empty({channels}, input.options().dtype(acc_dtype));
  if (channels == 0) {
    return {mean, var};
  }
  if (input.numel() == 0) {  // no values per channel: NaN, as torch.var_mean gives
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }

  // Pick the layout to read. A tensor can be both NCHW- and channels_last-contiguous
  // (H = W = 1, or C = 1); take whichever reads longer runs. Other strides: copy.
  const bool hw_one = input.size(2) * input.size(3) == 1;
  const bool nchw = input.is_contiguous();
  const bool nhwc = input.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor x = input;
  bool channels_last;
  if (nhwc && (!nchw || hw_one)) {
    channels_last = true;
  } else if (nchw) {
    channels_last = false;
  } else {
    x = input.contiguous();
    channels_last = false;
  }

  const int64_t target_blocks = wave_blocks(input.device().index());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "batch_norm_stats_cuda", [&] {
    launch_stats<scalar_t>(x, channels_last, mean, var, target_blocks, stream);
  });
  return {mean, var};
}

}  // namespace
}  // namespace resnet_fast

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("batch_norm_stats", TORCH_FN(resnet_fast::batch_norm_stats_cuda));
}
