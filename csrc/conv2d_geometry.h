// Geometry of resnet_fast::conv2d_tensor_core (conv2d_tensor_core.cu): the checks on the
// convolution's sizes and the walk over the GEMM depth k = (r * S + s) * C + c.
//
// Plain C++ (standard library only), compiled for both the host and the device: the
// kernel and its launcher include it, and tests/test_cuda_conv2d_geometry.py compiles it
// with the host compiler alone and runs it on the CPU, so what the GPU code relies on is
// tested without a GPU.

#pragma once

#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

#if defined(__CUDACC__)
#define RESNET_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RESNET_FAST_HOST_DEVICE inline
#endif

namespace resnet_fast {
namespace conv2d_geometry {

// The sizes of one convolution as the operator receives them (64-bit, unchecked).
struct ConvSizes {
  int64_t height, width;           // input H, W
  int64_t in_channels;             // C
  int64_t kernel_h, kernel_w;      // R, S
  int64_t stride[2], padding[2], dilation[2];
};

// Output size along one dimension, or -1 when the dilated kernel does not fit the padded
// input. The numerator is tested before dividing: C++ division truncates toward zero, so
// (H + 2p - d(R-1) - 1) = -1 with stride 2 would otherwise give -1 / 2 + 1 = 1 row.
// The arguments must be in the ranges check_sizes enforces (no overflow then).
inline int64_t output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  const int64_t span = size + 2 * padding - dilation * (kernel - 1) - 1;
  if (span < 0) return -1;
  return span / stride + 1;
}

namespace detail {
inline void pair(std::ostringstream& out, int64_t a, int64_t b) { out << '(' << a << ", " << b << ')'; }
}  // namespace detail

// Empty when the kernel can take these sizes (and then *out_h, *out_w are the output's
// H, W), else the reason. The kernel keeps strides, paddings, dilations, R, S and C in
// 32-bit ints: each must fit one. The output-size message is word for word the one of
// the Python check (resnet_fast/ops/common.py, conv_output_shape).
inline std::string check_sizes(const ConvSizes& s, int64_t* out_h, int64_t* out_w) {
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  std::ostringstream why;
  const char* names[3] = {"stride", "padding", "dilation"};
  const int64_t* values[3] = {s.stride, s.padding, s.dilation};
  for (int i = 0; i < 3; ++i) {
    const int64_t lowest = i == 1 ? 0 : 1;
    for (int d = 0; d < 2; ++d) {
      if (values[i][d] < lowest || values[i][d] > kIntMax) {
        why << names[i] << " must be in [" << lowest << ", " << kIntMax << "], got ";
        detail::pair(why, values[i][0], values[i][1]);
        return why.str();
      }
    }
  }
  if (s.kernel_h < 1 || s.kernel_w < 1 || s.kernel_h > kIntMax || s.kernel_w > kIntMax) {
    why << "the kernel size must be in [1, " << kIntMax << "], got ";
    detail::pair(why, s.kernel_h, s.kernel_w);
    return why.str();
  }
  if (s.in_channels < 1 || s.in_channels > kIntMax) {
    why << "the input channels must be in [1, " << kIntMax << "], got " << s.in_channels;
    return why.str();
  }
  *out_h = output_size(s.height, s.kernel_h, s.stride[0], s.padding[0], s.dilation[0]);
  *out_w = output_size(s.width, s.kernel_w, s.stride[1], s.padding[1], s.dilation[1]);
  if (*out_h <= 0 || *out_w <= 0) {
    why << "input spatial size ";
    detail::pair(why, s.height, s.width);
    why << " is too small for a ";
    detail::pair(why, s.kernel_h, s.kernel_w);
    why << " kernel with stride ";
    detail::pair(why, s.stride[0], s.stride[1]);
    why << ", padding ";
    detail::pair(why, s.padding[0], s.padding[1]);
    why << ", dilation ";
    detail::pair(why, s.dilation[0], s.dilation[1]);
    return why.str();
  }
  return std::string();
}

// A depth index k = (r * S + s) * C + c of the implicit GEMM held as its filter tap
// (r, s) and channel c, so that the main loop advances it by adding instead of dividing.
// r keeps counting past R - 1 (the caller compares k itself with the depth).
struct Tap {
  int r, s, c;

  // The decomposition of k (two divisions; once per thread, before the loop).
  RESNET_FAST_HOST_DEVICE static Tap at(int64_t k, int channels, int kernel_w) {
    const int64_t tap = k / channels;
    return Tap{static_cast<int>(tap / kernel_w), static_cast<int>(tap % kernel_w),
               static_cast<int>(k % channels)};
  }

  // k += 1.
  RESNET_FAST_HOST_DEVICE void next(int channels, int kernel_w) {
    if (++c == channels) {
      c = 0;
      if (++s == kernel_w) {
        s = 0;
        ++r;
      }
    }
  }

  // k += delta (delta >= 0): one pass per channel wrap, a single one when C >= delta.
  RESNET_FAST_HOST_DEVICE void advance(int delta, int channels, int kernel_w) {
    c += delta;
    while (c >= channels) {
      c -= channels;
      if (++s == kernel_w) {
        s = 0;
        ++r;
      }
    }
  }
};

}  // namespace conv2d_geometry
}  // namespace resnet_fast
