// CUDA kernel of resnet_fast::conv2d_tensor_core: an implicit-GEMM convolution on tensor
// cores through WMMA (compute capability 7.0 and newer: V100, T4, and every later GPU),
// fp16 in, fp32 accumulate, NHWC, with the fusions of the convolution operators:
//
//   a        = relu?(x * prologue_scale[c] + prologue_shift[c])  prologue (optional), fp16;
//                                                                 padded positions stay 0
//   acc      = conv2d(a, weight)                                  float32 accumulators
//   out      = relu?(acc + bias[k] + residual)                    epilogue, fp16
//   mean_k, var_k = mean and biased variance of acc[:, k]         stats = true (then no
//                                                                 bias, residual or ReLU)
//
// The schema, checks and torch default implementation live in
// resnet_fast/ops/conv2d_tensor_core.py; this file only adds the CUDA kernel.
//
// GEMM view: rows m = output pixels (n, p, q) of the NHWC output (M = N*P*Q), columns =
// output channels, depth k = (r*S + s)*C_in + c, the memory order of a channels_last
// weight, so B[k][col] = weight[col][r][s][c] is read straight from it and A[m][k] is the
// input pixel under filter tap (r, s) of output pixel m (zero outside the image).
//
// Tiles: a block of 256 threads (8 warps, 4 along M x 2 along N) computes a 128 x 64
// output tile in steps of 32 along the depth; each warp owns 32 x 32 of it as 2 x 2 WMMA
// 16x16x16 fragments. The A and B tiles of a step are staged through registers: the next
// step's global loads (prologue applied) are issued before this step's MMAs and stored to
// shared memory after them (sm_70 has no cp.async). Loads are 16-byte vectors of 8
// channels when C_in is a multiple of 8 (every ResNet convolution but the stem) and the
// tensors are 16-byte aligned, else element by element.
//
// Epilogue: WMMA's fragment layout is opaque, so the accumulators go to shared memory as
// a 128 x 64 float32 tile (reusing the A/B tiles' space). Threads then add bias and
// residual, apply the ReLU and store 8 channels at a time; with stats, every column is
// also reduced: per tile, mean_t and M2_t = sum over the tile's rows of (acc - mean_t)^2,
// into a (2, tiles_m, C_out) workspace, which a second kernel merges per channel with
// Chan's formula
//     n = n_a + n_b,  d = mean_b - mean_a,  mean = mean_a + d * n_b / n,
//     M2 = M2_a + M2_b + d^2 * n_a * n_b / n,           var = M2 / M.
// No E[x^2] - E[x]^2 cancellation, no atomics: deterministic. Indices are 64-bit; no host
// synchronisation; the current stream; the workspace from the caching allocator.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "reduction.cuh"

namespace resnet_fast {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kConvThreads = 256;
constexpr int kBlockM = 128;  // output pixels per block
constexpr int kBlockN = 64;   // output channels per block
constexpr int kBlockK = 32;   // depth per step
constexpr int kFrag = 16;     // WMMA m16n16k16
constexpr int kWarpM = 32;    // each warp: 32 x 32 of the tile, 2 x 2 fragments
constexpr int kWarpN = 32;
constexpr int kWarpsN = kBlockN / kWarpN;
constexpr int kVec = 8;  // fp16 per 16-byte load
// Row pitches of the shared tiles: a multiple of 8 halves / 4 floats (WMMA's rule) that
// staggers the rows across the memory banks.
constexpr int kPitchK = kBlockK + 8;
constexpr int kPitchN = kBlockN + 4;
// Each thread gathers one 8-channel chunk of kRowsA rows of A and of one row of B per step.
constexpr int kChunksK = kBlockK / kVec;
constexpr int kRowsA = kBlockM * kChunksK / kConvThreads;
constexpr int kRowStrideA = kConvThreads / kChunksK;
// The statistics: kStatParts threads per column, each over kBlockM / kStatParts rows.
constexpr int kStatParts = kConvThreads / kBlockN;
constexpr int kStatRows = kBlockM / kStatParts;
// The merge kernel: 32 channels x 32 tile lanes per block.
constexpr int kMergeLanes = 32;

static_assert((kBlockM / kWarpM) * kWarpsN * 32 == kConvThreads, "the warps cover the tile");
static_assert(kBlockN * kChunksK == kConvThreads, "one B chunk per thread");
static_assert(kRowsA * kRowStrideA == kBlockM, "A rows split evenly");

using Half8 = Pack<uint16_t, kVec>;
using HalfT = Traits<c10::Half>;

struct ConvShape {
  int64_t batch, height, width, in_channels;           // input (N, H, W, C), NHWC
  int64_t out_height, out_width, out_channels;         // P, Q, K
  int64_t rows;                                        // M = N * P * Q
  int64_t depth;                                       // R * S * C
  int kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

struct ConvIO {
  const uint16_t* x;               // NHWC, fp16 bits
  const uint16_t* weight;          // (K, R, S, C), fp16 bits
  const float* prologue_scale;     // (C) or null: no prologue
  const float* prologue_shift;     // (C)
  const float* bias;               // (K) or null
  const uint16_t* residual;        // NHWC like out, or null
  uint16_t* out;                   // NHWC
  float* partial;                  // (2, tiles_m, K): per-tile mean and M2 (stats only)
  bool prologue_relu;
  bool relu;
  bool vector_out;                 // K % 8 == 0 and out/residual 16-byte aligned
};

struct SharedTiles {
  union {
    struct {
      __half a[kBlockM][kPitchK];
      __half b[kBlockN][kPitchK];
    } in;
    float acc[kBlockM][kPitchN];
  };
  float part_mean[kStatParts][kBlockN];
  float part_m2[kStatParts][kBlockN];
};

// ReLU that keeps NaN (as torch.relu): only negative values become 0.
__device__ __forceinline__ float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

// x * scale + shift rounded twice (no FMA contraction), as torch computes it: the fp16
// activation is then exactly the reference's.
__device__ __forceinline__ uint16_t prologue(uint16_t bits, const ConvIO& io, int64_t c) {
  const float v = __fadd_rn(__fmul_rn(HalfT::to_acc(bits), io.prologue_scale[c]), io.prologue_shift[c]);
  return HalfT::from_acc(io.prologue_relu ? relu_keep_nan(v) : v);
}

// Where output pixel m reads its input: the image's offset and the top-left tap.
struct PixelOrigin {
  int64_t image_offset;
  int64_t h0, w0;
  bool valid;
};

__device__ __forceinline__ PixelOrigin pixel_origin(const ConvShape& s, int64_t m) {
  PixelOrigin o{};
  o.valid = m < s.rows;
  const int64_t mm = o.valid ? m : 0;
  const int64_t q = mm % s.out_width;
  const int64_t np = mm / s.out_width;
  const int64_t p = np % s.out_height;
  const int64_t n = np / s.out_height;
  o.image_offset = n * s.height * s.width * s.in_channels;
  o.h0 = p * s.stride_h - s.pad_h;
  o.w0 = q * s.stride_w - s.pad_w;
  return o;
}

// Offset of input element (tap of depth index k, channel) for `o`, or -1 in the padding.
__device__ __forceinline__ int64_t input_offset(const ConvShape& s, const PixelOrigin& o, int64_t k,
                                                int64_t* channel) {
  const int64_t c = k % s.in_channels;
  const int64_t tap = k / s.in_channels;
  const int64_t h = o.h0 + (tap / s.kernel_w) * s.dilation_h;
  const int64_t w = o.w0 + (tap % s.kernel_w) * s.dilation_w;
  *channel = c;
  if (h < 0 || h >= s.height || w < 0 || w >= s.width) return -1;
  return o.image_offset + (h * s.width + w) * s.in_channels + c;
}

// A[m][k0 .. k0 + 8) with the prologue applied; zeros outside the image and the depth.
template <bool kVector>
__device__ __forceinline__ Half8 load_a(const ConvIO& io, const ConvShape& s, const PixelOrigin& o, int64_t k0) {
  Half8 v{};
  if (!o.valid) return v;
  if constexpr (kVector) {
    // C % 8 == 0: the 8 channels share one tap, and k0 < depth means all 8 are in range.
    if (k0 >= s.depth) return v;
    int64_t c = 0;
    const int64_t offset = input_offset(s, o, k0, &c);
    if (offset < 0) return v;
    v = *reinterpret_cast<const Half8*>(io.x + offset);
    if (io.prologue_scale != nullptr) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) v.v[j] = prologue(v.v[j], io, c + j);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (k0 + j >= s.depth) break;
      int64_t c = 0;
      const int64_t offset = input_offset(s, o, k0 + j, &c);
      if (offset < 0) continue;
      v.v[j] = io.prologue_scale != nullptr ? prologue(io.x[offset], io, c) : io.x[offset];
    }
  }
  return v;
}

// B[k0 .. k0 + 8)[col] = weight[col][k0 .. k0 + 8); zeros past the channels and the depth.
template <bool kVector>
__device__ __forceinline__ Half8 load_b(const ConvIO& io, const ConvShape& s, int64_t col, int64_t k0) {
  Half8 v{};
  if (col >= s.out_channels) return v;
  const uint16_t* row = io.weight + col * s.depth;
  if constexpr (kVector) {
    if (k0 < s.depth) v = *reinterpret_cast<const Half8*>(row + k0);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (k0 + j < s.depth) v.v[j] = row[k0 + j];
    }
  }
  return v;
}

__device__ __forceinline__ void store_half8(__half* dst, const Half8& v) {
  *reinterpret_cast<Half8*>(dst) = v;
}

// Chan's merge of (count, mean, M2) partial moments.
struct Moments {
  float count = 0.f, mean = 0.f, m2 = 0.f;
  __device__ __forceinline__ void merge(float count_b, float mean_b, float m2_b) {
    if (count_b == 0.f) return;
    const float n = count + count_b;
    const float d = mean_b - mean;
    const float w = count_b / n;
    mean += d * w;
    m2 += m2_b + d * d * count * w;
    count = n;
  }
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float rows_in_tile(int64_t rows, int64_t tile) {
  return static_cast<float>(min64(kBlockM, rows - tile * kBlockM));
}

// Writes out = relu?(acc + bias + residual) for the tile in shared memory.
__device__ __forceinline__ void store_output(const ConvIO& io, const ConvShape& s, const SharedTiles& t,
                                             int64_t m_base, int64_t n_base) {
  constexpr int kChunksN = kBlockN / kVec;
  for (int chunk = threadIdx.x; chunk < kBlockM * kChunksN; chunk += kConvThreads) {
    const int row = chunk / kChunksN;
    const int col = (chunk % kChunksN) * kVec;
    const int64_t m = m_base + row;
    const int64_t n = n_base + col;
    if (m >= s.rows || n >= s.out_channels) continue;
    const int64_t offset = m * s.out_channels + n;
    const int width = static_cast<int>(min64(kVec, s.out_channels - n));
    float v[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = t.acc[row][col + j];
    if (io.vector_out) {
      Half8 res{};
      if (io.residual != nullptr) res = *reinterpret_cast<const Half8*>(io.residual + offset);
      Half8 o;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (io.bias != nullptr) v[j] += io.bias[n + j];
        if (io.residual != nullptr) v[j] += HalfT::to_acc(res.v[j]);
        o.v[j] = HalfT::from_acc(io.relu ? relu_keep_nan(v[j]) : v[j]);
      }
      *reinterpret_cast<Half8*>(io.out + offset) = o;
    } else {
      for (int j = 0; j < width; ++j) {
        if (io.bias != nullptr) v[j] += io.bias[n + j];
        if (io.residual != nullptr) v[j] += HalfT::to_acc(io.residual[offset + j]);
        io.out[offset + j] = HalfT::from_acc(io.relu ? relu_keep_nan(v[j]) : v[j]);
      }
    }
  }
}

// Per column of the tile: (mean_t, M2_t) over its valid rows, into io.partial.
__device__ __forceinline__ void tile_statistics(const ConvIO& io, const ConvShape& s, SharedTiles& t,
                                                int64_t m_base, int64_t n_base) {
  const int col = threadIdx.x % kBlockN;
  const int part = threadIdx.x / kBlockN;
  const int valid = static_cast<int>(min64(kBlockM, s.rows - m_base));
  const int begin = part * kStatRows;
  const int end = begin + kStatRows < valid ? begin + kStatRows : valid;
  float sum = 0.f;
  for (int r = begin; r < end; ++r) sum += t.acc[r][col];
  const float mean = end > begin ? sum / static_cast<float>(end - begin) : 0.f;
  float m2 = 0.f;
  for (int r = begin; r < end; ++r) {
    const float d = t.acc[r][col] - mean;
    m2 += d * d;
  }
  t.part_mean[part][col] = mean;
  t.part_m2[part][col] = m2;
  __syncthreads();
  const int64_t n = n_base + col;
  if (part != 0 || n >= s.out_channels) return;
  Moments total;
  for (int p = 0; p < kStatParts; ++p) {
    const int count = kStatRows < valid - p * kStatRows ? kStatRows : valid - p * kStatRows;
    if (count > 0) total.merge(static_cast<float>(count), t.part_mean[p][col], t.part_m2[p][col]);
  }
  const int64_t tiles = gridDim.x;
  io.partial[blockIdx.x * s.out_channels + n] = total.mean;
  io.partial[(tiles + blockIdx.x) * s.out_channels + n] = total.m2;
}

template <bool kVector, bool kStats>
__global__ void __launch_bounds__(kConvThreads) conv2d_tensor_core_kernel(ConvIO io, ConvShape s) {
  __shared__ __align__(32) SharedTiles t;
  const int warp = threadIdx.x / 32;
  const int64_t m_base = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t n_base = static_cast<int64_t>(blockIdx.y) * kBlockN;
  const int warp_m = (warp / kWarpsN) * kWarpM;
  const int warp_n = (warp % kWarpsN) * kWarpN;

  // This thread's share of every step: rows a_row + i * kRowStrideA of A and row a_row of
  // B, depth chunk [chunk_k, chunk_k + 8) of the step.
  const int chunk_k = (threadIdx.x % kChunksK) * kVec;
  const int a_row = threadIdx.x / kChunksK;
  PixelOrigin origin[kRowsA];
#pragma unroll
  for (int i = 0; i < kRowsA; ++i) origin[i] = pixel_origin(s, m_base + a_row + i * kRowStrideA);

  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  Half8 a_next[kRowsA];
  Half8 b_next;
  auto load_step = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < kRowsA; ++i) a_next[i] = load_a<kVector>(io, s, origin[i], k0 + chunk_k);
    b_next = load_b<kVector>(io, s, n_base + a_row, k0 + chunk_k);
  };
  auto store_step = [&]() {
#pragma unroll
    for (int i = 0; i < kRowsA; ++i) store_half8(&t.in.a[a_row + i * kRowStrideA][chunk_k], a_next[i]);
    store_half8(&t.in.b[a_row][chunk_k], b_next);
  };

  const int64_t steps = (s.depth + kBlockK - 1) / kBlockK;
  load_step(0);
  store_step();
  __syncthreads();
  for (int64_t step = 0; step < steps; ++step) {
    const bool more = step + 1 < steps;
    if (more) load_step((step + 1) * kBlockK);  // in flight during this step's MMAs
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += kFrag) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, __half, wmma::row_major> a_frag[2];
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, __half, wmma::col_major> b_frag[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a_frag[i], &t.in.a[warp_m + i * kFrag][kk], kPitchK);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b_frag[j], &t.in.b[warp_n + j * kFrag][kk], kPitchK);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
      }
    }
    __syncthreads();
    if (more) {
      store_step();
      __syncthreads();
    }
  }

  // The last barrier freed the A/B tiles: the accumulators take their place.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(&t.acc[warp_m + i * kFrag][warp_n + j * kFrag], acc[i][j], kPitchN,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();
  store_output(io, s, t, m_base, n_base);
  if constexpr (kStats) tile_statistics(io, s, t, m_base, n_base);
}

// Grid ceil(K / 32), block (32, 32): thread (x, y) merges tiles y, y + 32, ... of channel
// blockIdx.x * 32 + x, then row y = 0 merges the 32 partial results.
__global__ void __launch_bounds__(kMergeLanes * kMergeLanes)
    conv2d_stats_merge_kernel(const float* partial, int64_t tiles, int64_t rows, int64_t channels, float* mean,
                              float* var) {
  __shared__ float s_count[kMergeLanes][kMergeLanes + 1];
  __shared__ float s_mean[kMergeLanes][kMergeLanes + 1];
  __shared__ float s_m2[kMergeLanes][kMergeLanes + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kMergeLanes + threadIdx.x;
  Moments m;
  if (c < channels) {
    for (int64_t tile = threadIdx.y; tile < tiles; tile += kMergeLanes) {
      m.merge(rows_in_tile(rows, tile), partial[tile * channels + c], partial[(tiles + tile) * channels + c]);
    }
  }
  s_count[threadIdx.y][threadIdx.x] = m.count;
  s_mean[threadIdx.y][threadIdx.x] = m.mean;
  s_m2[threadIdx.y][threadIdx.x] = m.m2;
  __syncthreads();
  if (threadIdx.y != 0 || c >= channels) return;
  for (int y = 1; y < kMergeLanes; ++y) m.merge(s_count[y][threadIdx.x], s_mean[y][threadIdx.x], s_m2[y][threadIdx.x]);
  mean[c] = m.mean;
  var[c] = m.m2 / m.count;
}

// ----- host ---------------------------------------------------------------------------

constexpr const char* kOp = "conv2d_tensor_core";

const float* per_channel_float(const char* name, const std::optional<at::Tensor>& t, int64_t size,
                               const at::Tensor& input, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == input.device(), kOp, ": ", name, " is on ", t->device(), " but input is on ",
              input.device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, kOp, ": ", name, " must have shape (", size, ",), got ",
              t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), kOp, ": ", name, " must be a float tensor, got ",
              t->scalar_type());
  keep = t->to(at::kFloat).contiguous();
  return keep.const_data_ptr<float>();
}

int64_t checked_int(at::IntArrayRef values, size_t i, const char* name) {
  TORCH_CHECK(values.size() == 2, kOp, ": ", name, " must have 2 values, got ", values.size());
  return values[i];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_tensor_core_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& prologue_scale,
    const std::optional<at::Tensor>& prologue_shift, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool prologue_relu, bool relu, bool stats) {
  TORCH_CHECK(input.is_cuda(), kOp, ": input must be a CUDA tensor, got device ", input.device());
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, kOp, ": input and weight must be 4-D, got ", input.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(input.scalar_type() == at::kHalf && weight.scalar_type() == at::kHalf, kOp,
              ": input and weight must be float16, got ", input.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), kOp, ": weight is on ", weight.device(), " but input is on ",
              input.device());
  TORCH_CHECK(weight.size(1) == input.size(1), kOp, ": weight has ", weight.size(1),
              " input channels but input has ", input.size(1), " (groups=1)");
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_residual = residual.has_value() && residual->defined();
  TORCH_CHECK(!stats || !(has_bias || has_residual || relu), kOp,
              ": stats=True takes no bias, residual or ReLU (the statistics are of the convolution itself)");
  TORCH_CHECK(prologue_scale.has_value() == prologue_shift.has_value(), kOp,
              ": prologue_scale and prologue_shift must both be given or both be None");
  c10::cuda::CUDAGuard guard(input.device());

  ConvShape s{};
  s.batch = input.size(0);
  s.in_channels = input.size(1);
  s.height = input.size(2);
  s.width = input.size(3);
  s.out_channels = weight.size(0);
  const int64_t kernel_h = weight.size(2);
  s.kernel_w = static_cast<int>(weight.size(3));
  s.stride_h = static_cast<int>(checked_int(stride, 0, "stride"));
  s.stride_w = static_cast<int>(checked_int(stride, 1, "stride"));
  s.pad_h = static_cast<int>(checked_int(padding, 0, "padding"));
  s.pad_w = static_cast<int>(checked_int(padding, 1, "padding"));
  s.dilation_h = static_cast<int>(checked_int(dilation, 0, "dilation"));
  s.dilation_w = static_cast<int>(checked_int(dilation, 1, "dilation"));
  TORCH_CHECK(s.stride_h > 0 && s.stride_w > 0 && s.dilation_h > 0 && s.dilation_w > 0 && s.pad_h >= 0 &&
                  s.pad_w >= 0,
              kOp, ": stride and dilation must be positive and padding non-negative");
  s.out_height = (s.height + 2 * s.pad_h - s.dilation_h * (kernel_h - 1) - 1) / s.stride_h + 1;
  s.out_width = (s.width + 2 * s.pad_w - s.dilation_w * (s.kernel_w - 1) - 1) / s.stride_w + 1;
  TORCH_CHECK(s.out_height > 0 && s.out_width > 0, kOp, ": the output would be empty (input ", input.sizes(),
              ", weight ", weight.sizes(), ")");
  s.rows = s.batch * s.out_height * s.out_width;
  s.depth = kernel_h * s.kernel_w * s.in_channels;
  TORCH_CHECK(!stats || s.rows > 0, kOp, ": stats need at least one output pixel");

  const auto nhwc = at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({s.batch, s.out_channels, s.out_height, s.out_width}, input.options().memory_format(nhwc));
  const auto stat_options = input.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({stats ? s.out_channels : 0}, stat_options);
  at::Tensor var = at::empty({stats ? s.out_channels : 0}, stat_options);
  if (out.numel() == 0) return {out, mean, var};

  const at::Tensor x = input.contiguous(nhwc);
  const at::Tensor w = weight.contiguous(nhwc);
  at::Tensor res;
  if (has_residual) {
    TORCH_CHECK(residual->device() == input.device() && residual->scalar_type() == at::kHalf &&
                    residual->sizes() == out.sizes(),
                kOp, ": residual must be a float16 tensor of the output's shape ", out.sizes(), " on ",
                input.device(), ", got ", residual->scalar_type(), " ", residual->sizes(), " on ",
                residual->device());
    res = residual->contiguous(nhwc);
  }
  at::Tensor keep_scale, keep_shift, keep_bias;
  ConvIO io{};
  io.x = reinterpret_cast<const uint16_t*>(x.const_data_ptr());
  io.weight = reinterpret_cast<const uint16_t*>(w.const_data_ptr());
  io.prologue_scale = per_channel_float("prologue_scale", prologue_scale, s.in_channels, input, keep_scale);
  io.prologue_shift = per_channel_float("prologue_shift", prologue_shift, s.in_channels, input, keep_shift);
  io.bias = per_channel_float("bias", bias, s.out_channels, input, keep_bias);
  io.residual = has_residual ? reinterpret_cast<const uint16_t*>(res.const_data_ptr()) : nullptr;
  io.out = reinterpret_cast<uint16_t*>(out.mutable_data_ptr());
  io.prologue_relu = prologue_relu;
  io.relu = relu;
  io.vector_out = s.out_channels % kVec == 0 && aligned16(io.out) && (io.residual == nullptr || aligned16(io.residual));
  const bool vector_in = s.in_channels % kVec == 0 && aligned16(io.x) && aligned16(io.weight);

  const int64_t tiles_m = ceil_div(s.rows, kBlockM);
  const int64_t tiles_n = ceil_div(s.out_channels, kBlockN);
  TORCH_CHECK(tiles_m <= std::numeric_limits<int32_t>::max() && tiles_n <= kMaxSplits, kOp,
              ": the convolution is too large (", s.rows, " output pixels, ", s.out_channels, " channels)");
  at::Tensor partial;
  if (stats) {
    partial = at::empty({2, tiles_m, s.out_channels}, stat_options);
    io.partial = partial.mutable_data_ptr<float>();
  }
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  if (vector_in && stats) {
    conv2d_tensor_core_kernel<true, true><<<grid, kConvThreads, 0, stream>>>(io, s);
  } else if (vector_in) {
    conv2d_tensor_core_kernel<true, false><<<grid, kConvThreads, 0, stream>>>(io, s);
  } else if (stats) {
    conv2d_tensor_core_kernel<false, true><<<grid, kConvThreads, 0, stream>>>(io, s);
  } else {
    conv2d_tensor_core_kernel<false, false><<<grid, kConvThreads, 0, stream>>>(io, s);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (stats) {
    const dim3 merge_grid(static_cast<unsigned>(ceil_div(s.out_channels, kMergeLanes)));
    const dim3 merge_block(kMergeLanes, kMergeLanes);
    conv2d_stats_merge_kernel<<<merge_grid, merge_block, 0, stream>>>(
        partial.const_data_ptr<float>(), tiles_m, s.rows, s.out_channels, mean.mutable_data_ptr<float>(),
        var.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, mean, var};
}

}  // namespace
}  // namespace resnet_fast

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("conv2d_tensor_core", TORCH_FN(resnet_fast::conv2d_tensor_core_cuda));
}
