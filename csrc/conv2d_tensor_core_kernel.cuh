// The kernels of resnet_fast::conv2d_tensor_core (see conv2d_tensor_core.cu for what they
// compute and how), apart from their launcher so that the CPU emulation test
// (tests/test_cuda_conv2d_emulated.py) compiles exactly this code with the host compiler,
// supplying threads, barriers and WMMA itself. Only conv2d_tensor_core.cu includes it.

#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#if defined(__CUDACC__)
#include <mma.h>  // a host-compiler build (the emulation test) brings its own nvcuda::wmma
#endif

#include <cstdint>

#include "conv2d_geometry.h"
#include "reduction.cuh"

namespace resnet_fast {
namespace {

namespace wmma = nvcuda::wmma;
using conv2d_geometry::Tap;

constexpr int kConvThreads = 256;
constexpr int kMinBlocksPerSm = 2;  // what the registers and the halved epilogue allow on sm_75
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
// The epilogue stages the accumulators one half of the tile's rows at a time.
constexpr int kStageM = kBlockM / 2;
// The statistics: kStatParts threads per column, each over kStatRows rows of each half.
constexpr int kStatParts = kConvThreads / kBlockN;
constexpr int kStatRows = kStageM / kStatParts;
// The merge kernel: 32 channels x 32 tile lanes per block.
constexpr int kMergeLanes = 32;

static_assert((kBlockM / kWarpM) * kWarpsN * 32 == kConvThreads, "the warps cover the tile");
static_assert(kBlockN * kChunksK == kConvThreads, "one B chunk per thread");
static_assert(kRowsA * kRowStrideA == kBlockM, "A rows split evenly");
static_assert(kStageM % kWarpM == 0, "a warp's rows lie in one half");

using Half8 = Pack<uint16_t, kVec>;
using HalfT = Traits<c10::Half>;

struct ConvShape {
  int64_t batch, height, width, in_channels;           // input (N, H, W, C), NHWC
  int64_t out_height, out_width, out_channels;         // P, Q, K
  int64_t rows;                                        // M = N * P * Q
  int64_t depth;                                       // R * S * C
  // Range-checked on the host (conv2d_geometry::check_sizes): each fits an int.
  int channels, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

// The shape the kernel reads, from sizes conv2d_geometry::check_sizes accepted (host).
inline ConvShape make_conv_shape(const conv2d_geometry::ConvSizes& sizes, int64_t batch, int64_t out_channels,
                                 int64_t out_height, int64_t out_width) {
  ConvShape s{};
  s.batch = batch;
  s.in_channels = sizes.in_channels;
  s.height = sizes.height;
  s.width = sizes.width;
  s.out_channels = out_channels;
  s.out_height = out_height;
  s.out_width = out_width;
  s.rows = batch * out_height * out_width;
  s.depth = sizes.kernel_h * sizes.kernel_w * sizes.in_channels;
  s.channels = static_cast<int>(sizes.in_channels);
  s.kernel_w = static_cast<int>(sizes.kernel_w);
  s.stride_h = static_cast<int>(sizes.stride[0]);
  s.stride_w = static_cast<int>(sizes.stride[1]);
  s.pad_h = static_cast<int>(sizes.padding[0]);
  s.pad_w = static_cast<int>(sizes.padding[1]);
  s.dilation_h = static_cast<int>(sizes.dilation[0]);
  s.dilation_w = static_cast<int>(sizes.dilation[1]);
  return s;
}

struct ConvIO {
  const uint16_t* x;               // NHWC, fp16 bits
  const uint16_t* weight;          // (K, R, S, C), fp16 bits
  const float* prologue_scale;     // (C) or null: no prologue; 16-byte aligned
  const float* prologue_shift;     // (C), 16-byte aligned
  const float* bias;               // (K) or null; 16-byte aligned
  const uint16_t* residual;        // NHWC like out, or null
  uint16_t* out;                   // NHWC
  float* partial;                  // (2, tiles_m, K): per-tile mean and M2 (stats only)
  bool prologue_relu;
  bool relu;
  bool vector_out;                 // K % 8 == 0 and out/residual 16-byte aligned
};

// Whether the kernel gathers A and B as 16-byte vectors: C % 8 == 0 and x, weight 16-byte
// aligned (host).
inline bool reads_vectors(const ConvShape& s, const ConvIO& io) {
  return s.in_channels % kVec == 0 && aligned16(io.x) && aligned16(io.weight);
}

// Whether the epilogue stores (and reads the residual as) 16-byte vectors (host).
inline bool writes_vectors(const ConvShape& s, const ConvIO& io) {
  return s.out_channels % kVec == 0 && aligned16(io.out) && (io.residual == nullptr || aligned16(io.residual));
}

struct SharedTiles {
  union {
    struct {
      __half a[kBlockM][kPitchK];
      __half b[kBlockN][kPitchK];
    } in;
    float acc[kStageM][kPitchN];  // one half of the tile's rows
  };
  float part_count[kStatParts][kBlockN];
  float part_mean[kStatParts][kBlockN];
  float part_m2[kStatParts][kBlockN];
};

// ReLU that keeps NaN (as torch.relu): only negative values become 0.
__device__ __forceinline__ float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

// x * scale + shift rounded twice (no FMA contraction), as torch computes it: the fp16
// activation is then exactly the reference's.
__device__ __forceinline__ uint16_t prologue(uint16_t bits, float scale, float shift, bool relu) {
  const float v = __fadd_rn(__fmul_rn(HalfT::to_acc(bits), scale), shift);
  return HalfT::from_acc(relu ? relu_keep_nan(v) : v);
}

// Eight consecutive floats starting at a 32-byte boundary, as two 16-byte loads.
struct Float8 {
  float v[kVec];
};

__device__ __forceinline__ Float8 load_float8(const float* p) {
  const float4 lo = reinterpret_cast<const float4*>(p)[0];
  const float4 hi = reinterpret_cast<const float4*>(p)[1];
  return Float8{{lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w}};
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

// Offset of the input element under tap (t.r, t.s), channel t.c, for `o`; -1 in the padding.
__device__ __forceinline__ int64_t input_offset(const ConvShape& s, const PixelOrigin& o, const Tap& t) {
  const int64_t h = o.h0 + static_cast<int64_t>(t.r) * s.dilation_h;
  const int64_t w = o.w0 + static_cast<int64_t>(t.s) * s.dilation_w;
  if (h < 0 || h >= s.height || w < 0 || w >= s.width) return -1;
  return o.image_offset + (h * s.width + w) * s.in_channels + t.c;
}

// A[m][k .. k + 8) for C % 8 == 0: the 8 channels t.c .. t.c + 7 share one tap, and all 8
// are in range when k < depth (`in_depth`). `scale`/`shift`: the prologue's coefficients of
// those channels (unused without a prologue). Zeros outside the image and the depth.
__device__ __forceinline__ Half8 load_a_vector(const ConvIO& io, const ConvShape& s, const PixelOrigin& o,
                                               const Tap& t, bool in_depth, const Float8& scale,
                                               const Float8& shift) {
  Half8 v{};
  if (!o.valid || !in_depth) return v;
  const int64_t offset = input_offset(s, o, t);
  if (offset < 0) return v;
  v = *reinterpret_cast<const Half8*>(io.x + offset);
  if (io.prologue_scale != nullptr) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) v.v[j] = prologue(v.v[j], scale.v[j], shift.v[j], io.prologue_relu);
  }
  return v;
}

// A[m][k .. k + 8) element by element (any C); `t` is the tap of k.
__device__ __forceinline__ Half8 load_a_scalar(const ConvIO& io, const ConvShape& s, const PixelOrigin& o, Tap t,
                                               int64_t k) {
  Half8 v{};
  if (!o.valid) return v;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    if (k + j >= s.depth) break;
    const int64_t offset = input_offset(s, o, t);
    if (offset >= 0) {
      v.v[j] = io.prologue_scale != nullptr
                   ? prologue(io.x[offset], io.prologue_scale[t.c], io.prologue_shift[t.c], io.prologue_relu)
                   : io.x[offset];
    }
    t.next(s.channels, s.kernel_w);
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

// Rows of the staged half starting at output row `stage_base` that are output pixels.
__device__ __forceinline__ int valid_stage_rows(const ConvShape& s, int64_t stage_base) {
  const int64_t left = s.rows - stage_base;
  return left <= 0 ? 0 : static_cast<int>(min64(kStageM, left));
}

// Writes out = relu?(acc + bias + residual) for the staged half of the tile (output rows
// stage_base .. stage_base + kStageM).
__device__ __forceinline__ void store_output(const ConvIO& io, const ConvShape& s, const SharedTiles& t,
                                             int64_t stage_base, int64_t n_base) {
  constexpr int kChunksN = kBlockN / kVec;
  for (int chunk = threadIdx.x; chunk < kStageM * kChunksN; chunk += kConvThreads) {
    const int row = chunk / kChunksN;
    const int col = (chunk % kChunksN) * kVec;
    const int64_t m = stage_base + row;
    const int64_t n = n_base + col;
    if (m >= s.rows || n >= s.out_channels) continue;
    const int64_t offset = m * s.out_channels + n;
    float v[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = t.acc[row][col + j];
    if (io.vector_out) {
      // n % 8 == 0 and K % 8 == 0: all 8 channels exist; the bias is 16-byte aligned.
      Half8 res{};
      if (io.residual != nullptr) res = *reinterpret_cast<const Half8*>(io.residual + offset);
      Float8 bias{};
      if (io.bias != nullptr) bias = load_float8(io.bias + n);
      Half8 o;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (io.bias != nullptr) v[j] += bias.v[j];
        if (io.residual != nullptr) v[j] += HalfT::to_acc(res.v[j]);
        o.v[j] = HalfT::from_acc(io.relu ? relu_keep_nan(v[j]) : v[j]);
      }
      *reinterpret_cast<Half8*>(io.out + offset) = o;
    } else {
      const int64_t width = min64(kVec, s.out_channels - n);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (j >= width) break;
        if (io.bias != nullptr) v[j] += io.bias[n + j];
        if (io.residual != nullptr) v[j] += HalfT::to_acc(io.residual[offset + j]);
        io.out[offset + j] = HalfT::from_acc(io.relu ? relu_keep_nan(v[j]) : v[j]);
      }
    }
  }
}

// Folds this thread's kStatRows rows of its column of the staged half into `running`:
// thread (col = tid % 64, part = tid / 64) takes rows part * kStatRows .. + kStatRows.
__device__ __forceinline__ void fold_stage_statistics(const ConvShape& s, const SharedTiles& t, int64_t stage_base,
                                                      Moments& running) {
  const int col = threadIdx.x % kBlockN;
  const int part = threadIdx.x / kBlockN;
  const int valid = valid_stage_rows(s, stage_base);
  const int begin = part * kStatRows;
  const int end = begin + kStatRows < valid ? begin + kStatRows : valid;
  if (end <= begin) return;
  float sum = 0.f;
  for (int r = begin; r < end; ++r) sum += t.acc[r][col];
  const float count = static_cast<float>(end - begin);
  const float mean = sum / count;
  float m2 = 0.f;
  for (int r = begin; r < end; ++r) {
    const float d = t.acc[r][col] - mean;
    m2 += d * d;
  }
  running.merge(count, mean, m2);
}

// Merges the kStatParts threads' moments of each column (in part order: deterministic)
// and writes the tile's (mean_t, M2_t) into io.partial.
__device__ __forceinline__ void write_tile_statistics(const ConvIO& io, const ConvShape& s, SharedTiles& t,
                                                      const Moments& running, int64_t n_base) {
  const int col = threadIdx.x % kBlockN;
  const int part = threadIdx.x / kBlockN;
  t.part_count[part][col] = running.count;
  t.part_mean[part][col] = running.mean;
  t.part_m2[part][col] = running.m2;
  __syncthreads();
  const int64_t n = n_base + col;
  if (part != 0 || n >= s.out_channels) return;
  Moments total;
  for (int p = 0; p < kStatParts; ++p) total.merge(t.part_count[p][col], t.part_mean[p][col], t.part_m2[p][col]);
  const int64_t tiles = gridDim.x;
  io.partial[blockIdx.x * s.out_channels + n] = total.mean;
  io.partial[(tiles + blockIdx.x) * s.out_channels + n] = total.m2;
}

template <bool kVector, bool kStats>
__global__ void __launch_bounds__(kConvThreads, kMinBlocksPerSm) conv2d_tensor_core_kernel(ConvIO io, ConvShape s) {
  __shared__ __align__(32) SharedTiles t;
  const int warp = threadIdx.x / 32;
  const int64_t m_base = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t n_base = static_cast<int64_t>(blockIdx.y) * kBlockN;
  const int warp_m = (warp / kWarpsN) * kWarpM;
  const int warp_n = (warp % kWarpsN) * kWarpN;

  // This thread's share of every step: rows a_row + i * kRowStrideA of A and row a_row of
  // B, depth chunk [chunk_k, chunk_k + 8) of the step; `tap` is that chunk's first depth
  // index, advanced by kBlockK after each step's loads.
  const int chunk_k = (threadIdx.x % kChunksK) * kVec;
  const int a_row = threadIdx.x / kChunksK;
  PixelOrigin origin[kRowsA];
#pragma unroll
  for (int i = 0; i < kRowsA; ++i) origin[i] = pixel_origin(s, m_base + a_row + i * kRowStrideA);
  Tap tap = Tap::at(chunk_k, s.channels, s.kernel_w);

  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  Half8 a_next[kRowsA];
  Half8 b_next;
  auto load_step = [&](int64_t k) {  // k: this thread's first depth index of the step
    if constexpr (kVector) {
      const bool in_depth = k < s.depth;
      Float8 scale{}, shift{};
      if (in_depth && io.prologue_scale != nullptr) {  // c % 8 == 0, 16-byte aligned vectors
        scale = load_float8(io.prologue_scale + tap.c);
        shift = load_float8(io.prologue_shift + tap.c);
      }
#pragma unroll
      for (int i = 0; i < kRowsA; ++i) a_next[i] = load_a_vector(io, s, origin[i], tap, in_depth, scale, shift);
    } else {
#pragma unroll
      for (int i = 0; i < kRowsA; ++i) a_next[i] = load_a_scalar(io, s, origin[i], tap, k);
    }
    b_next = load_b<kVector>(io, s, n_base + a_row, k);
    tap.advance(kBlockK, s.channels, s.kernel_w);
  };
  auto store_step = [&]() {
#pragma unroll
    for (int i = 0; i < kRowsA; ++i) store_half8(&t.in.a[a_row + i * kRowStrideA][chunk_k], a_next[i]);
    store_half8(&t.in.b[a_row][chunk_k], b_next);
  };

  const int64_t steps = (s.depth + kBlockK - 1) / kBlockK;
  load_step(chunk_k);
  store_step();
  __syncthreads();
  for (int64_t step = 0; step < steps; ++step) {
    const bool more = step + 1 < steps;
    if (more) load_step((step + 1) * kBlockK + chunk_k);  // in flight during this step's MMAs
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

  // The last barrier freed the A/B tiles: the accumulators take their place, one half of
  // the rows at a time (the warps whose 32 rows lie in that half store them).
  Moments running;  // this thread's statistics over both halves (kStats)
#pragma unroll
  for (int stage = 0; stage < 2; ++stage) {
    const int stage_row = stage * kStageM;
    if (warp_m >= stage_row && warp_m < stage_row + kStageM) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::store_matrix_sync(&t.acc[warp_m - stage_row + i * kFrag][warp_n + j * kFrag], acc[i][j], kPitchN,
                                  wmma::mem_row_major);
        }
      }
    }
    __syncthreads();
    store_output(io, s, t, m_base + stage_row, n_base);
    if constexpr (kStats) fold_stage_statistics(s, t, m_base + stage_row, running);
    if (stage == 0) __syncthreads();  // every thread is done with the first half
  }
  if constexpr (kStats) write_tile_statistics(io, s, t, running, n_base);
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

}  // namespace
}  // namespace resnet_fast
