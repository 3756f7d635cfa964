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
// tensors are 16-byte aligned, else element by element. A thread's 8 depth indices of a
// step share one filter tap (r, s) and channel c: it decomposes its first depth index
// once (conv2d_geometry.h's Tap) and advances it by adding 32 per step, so the main loop
// divides nothing; the prologue's scale and shift for the 8 channels are two 16-byte
// loads each, shared by the thread's A rows.
//
// Epilogue: WMMA's fragment layout is opaque, so the accumulators go through shared
// memory, one 64 x 64 float32 half of the tile at a time (reusing the A/B tiles' space):
// 17 KB instead of 35 KB, so that two blocks fit in a T4's 64 KB per SM (the registers,
// at most 128 per thread, allow two). Threads then add bias and residual, apply the ReLU
// and store 8 channels at a time; with stats, every column is also reduced: each thread
// keeps the moments of 16 rows of a column in each half, and per tile the column's
// mean_t and M2_t = sum over the tile's rows of (acc - mean_t)^2 go into a
// (2, tiles_m, C_out) workspace, which a second kernel merges per channel with Chan's
// formula
//     n = n_a + n_b,  d = mean_b - mean_a,  mean = mean_a + d * n_b / n,
//     M2 = M2_a + M2_b + d^2 * n_a * n_b / n,           var = M2 / M.
// No E[x^2] - E[x]^2 cancellation, no atomics: deterministic. Indices are 64-bit; sizes
// the kernel keeps in 32-bit ints are range-checked on the host (conv2d_geometry.h); no
// host synchronisation; the current stream; the workspace from the caching allocator.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "conv2d_geometry.h"
#include "conv2d_tensor_core_kernel.cuh"

namespace resnet_fast {
namespace {

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
  // The kernel reads 8 channels as two 16-byte loads: a view at an odd offset is copied.
  if (!aligned16(keep.const_data_ptr())) keep = keep.clone();
  return keep.const_data_ptr<float>();
}

// Two values (height, width) of a convolution argument.
void take_pair(at::IntArrayRef values, const char* name, int64_t (&pair)[2]) {
  TORCH_CHECK_VALUE(values.size() == 2, kOp, ": ", name, " must have 2 values (height, width), got ", values);
  pair[0] = values[0];
  pair[1] = values[1];
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

  // The sizes, checked in 64 bits before anything is narrowed to int (conv2d_geometry.h):
  // a negative output span is an error, not a 1-row output.
  conv2d_geometry::ConvSizes sizes{};
  sizes.height = input.size(2);
  sizes.width = input.size(3);
  sizes.in_channels = input.size(1);
  sizes.kernel_h = weight.size(2);
  sizes.kernel_w = weight.size(3);
  take_pair(stride, "stride", sizes.stride);
  take_pair(padding, "padding", sizes.padding);
  take_pair(dilation, "dilation", sizes.dilation);
  int64_t out_height = 0;
  int64_t out_width = 0;
  const std::string invalid = conv2d_geometry::check_sizes(sizes, &out_height, &out_width);
  TORCH_CHECK_VALUE(invalid.empty(), kOp, ": ", invalid);
  c10::cuda::CUDAGuard guard(input.device());

  const ConvShape s = make_conv_shape(sizes, input.size(0), weight.size(0), out_height, out_width);
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
  io.vector_out = writes_vectors(s, io);
  const bool vector_in = reads_vectors(s, io);

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
