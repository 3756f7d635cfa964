// Runs csrc/conv2d_tensor_core_kernel.cuh under the CPU emulation (emulation.h), set up
// as conv2d_tensor_core.cu's launcher sets it up. tests/test_cuda_conv2d_emulated.py
// compiles and drives it.
//
// argv: case files; for each, one line on stdout: "ok P Q <out fp16 bits, NHWC> mean
// <K floats> var <K floats>" or "error <why>". A case file holds whitespace-separated
//   N C H W K R S stride_h stride_w pad_h pad_w dilation_h dilation_w
//   prologue prologue_relu relu stats bias residual misalign        (0 or 1 each)
//   x (N*H*W*C fp16 bits, NHWC)  weight (K*R*S*C fp16 bits, (K, R, S, C))
//   [scale (C floats)  shift (C floats)]  [bias (K floats)]  [residual (N*P*Q*K fp16 bits)]
// misalign = 1 places x, residual and out one element past a 16-byte boundary (as the
// GPU tests' misaligned storage), so the element-by-element paths run.

#include "emulation.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "conv2d_tensor_core_kernel.cuh"

using namespace resnet_fast;

namespace {

// 256-byte aligned storage (as the caching allocator's), `offset` elements in.
template <typename T>
struct Buffer {
  std::unique_ptr<unsigned char[]> bytes;
  T* data = nullptr;
  Buffer(size_t count, int offset) : bytes(new unsigned char[(count + offset) * sizeof(T) + 256]()) {
    const uintptr_t base = (reinterpret_cast<uintptr_t>(bytes.get()) + 255) & ~uintptr_t(255);
    data = reinterpret_cast<T*>(base) + offset;
  }
};

template <typename T>
void read_into(std::istream& in, T* data, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    double v = 0;
    in >> v;
    data[i] = static_cast<T>(v);
  }
}

void run_case(const char* path) {
  std::ifstream in(path);
  int64_t n, c, h, w, k, r, s_, sh, sw, ph, pw, dh, dw;
  int prologue, prologue_relu, relu, stats, has_bias, has_residual, misalign;
  in >> n >> c >> h >> w >> k >> r >> s_ >> sh >> sw >> ph >> pw >> dh >> dw >> prologue >> prologue_relu >> relu >>
      stats >> has_bias >> has_residual >> misalign;
  conv2d_geometry::ConvSizes sizes{h, w, c, r, s_, {sh, sw}, {ph, pw}, {dh, dw}};
  int64_t p = 0, q = 0;
  const std::string why = conv2d_geometry::check_sizes(sizes, &p, &q);
  if (!why.empty()) {
    std::cout << "error " << why << "\n";
    return;
  }
  const ConvShape shape = make_conv_shape(sizes, n, k, p, q);
  const int offset = misalign ? 1 : 0;
  Buffer<uint16_t> x(n * h * w * c, offset), weight(k * r * s_ * c, 0), residual(shape.rows * k, offset),
      out(shape.rows * k, offset);
  Buffer<float> scale(c, 0), shift(c, 0), bias(k, 0);
  read_into(in, x.data, n * h * w * c);
  read_into(in, weight.data, k * r * s_ * c);
  if (prologue) {
    read_into(in, scale.data, c);
    read_into(in, shift.data, c);
  }
  if (has_bias) read_into(in, bias.data, k);
  if (has_residual) read_into(in, residual.data, shape.rows * k);

  const int64_t tiles_m = ceil_div(shape.rows, kBlockM);
  const int64_t tiles_n = ceil_div(k, kBlockN);
  Buffer<float> partial(2 * tiles_m * k, 0), mean(k, 0), var(k, 0);
  ConvIO io{};
  io.x = x.data;
  io.weight = weight.data;
  io.prologue_scale = prologue ? scale.data : nullptr;
  io.prologue_shift = prologue ? shift.data : nullptr;
  io.bias = has_bias ? bias.data : nullptr;
  io.residual = has_residual ? residual.data : nullptr;
  io.out = out.data;
  io.partial = stats ? partial.data : nullptr;
  io.prologue_relu = prologue_relu;
  io.relu = relu;
  io.vector_out = writes_vectors(shape, io);
  const bool vector_in = reads_vectors(shape, io);
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n));
  const dim3 block(kConvThreads);
  if (vector_in && stats) {
    cuda_emulation::launch(grid, block, conv2d_tensor_core_kernel<true, true>, io, shape);
  } else if (vector_in) {
    cuda_emulation::launch(grid, block, conv2d_tensor_core_kernel<true, false>, io, shape);
  } else if (stats) {
    cuda_emulation::launch(grid, block, conv2d_tensor_core_kernel<false, true>, io, shape);
  } else {
    cuda_emulation::launch(grid, block, conv2d_tensor_core_kernel<false, false>, io, shape);
  }
  if (stats) {
    cuda_emulation::launch(dim3(static_cast<unsigned>(ceil_div(k, kMergeLanes))), dim3(kMergeLanes, kMergeLanes),
                           conv2d_stats_merge_kernel, static_cast<const float*>(partial.data), tiles_m, shape.rows,
                           k, mean.data, var.data);
  }
  std::cout << "ok " << p << ' ' << q << " vector_in=" << vector_in << " vector_out=" << io.vector_out;
  for (int64_t i = 0; i < shape.rows * k; ++i) std::cout << ' ' << out.data[i];
  char number[64];
  std::cout << " mean";
  for (int64_t i = 0; i < (stats ? k : 0); ++i) {
    std::snprintf(number, sizeof number, " %.9g", mean.data[i]);
    std::cout << number;
  }
  std::cout << " var";
  for (int64_t i = 0; i < (stats ? k : 0); ++i) {
    std::snprintf(number, sizeof number, " %.9g", var.data[i]);
    std::cout << number;
  }
  std::cout << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) run_case(argv[i]);
  return 0;
}
