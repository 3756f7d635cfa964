// A CPU emulation of the parts of the CUDA execution model that csrc/'s WMMA convolution
// uses, so that its kernels (csrc/conv2d_tensor_core_kernel.cuh, the very code nvcc
// compiles) run under the host C++ compiler: every thread of a block is a std::thread,
// __syncthreads() is a std::barrier over the block, __shared__ variables are the
// function's statics (blocks run one after another), and WMMA fragments hold their whole
// 16 x 16 tile in every lane (loads and MMAs repeated per lane, stores by lane 0; the
// kernels synchronise before reading what a store wrote). Float arithmetic is the
// host's with FMA contraction off (-ffp-contract=off); the MMA accumulates in float in
// depth order, which the tests' tolerance for the tensor cores' order covers.
//
// Include this first, then the kernel header.

#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <bit>
#include <cstdint>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // one block at a time: a kernel's statics are its block's shared memory
#define __launch_bounds__(...)

namespace cuda_emulation {

inline thread_local uint3 thread_index;
inline thread_local uint3 block_index;
inline thread_local dim3 grid_size;
inline thread_local dim3 block_size;
inline thread_local std::barrier<>* block_barrier = nullptr;

// Runs kernel(args...) over the grid: the blocks in order, each block's threads at once.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            thread_index = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            block_index = uint3{bx, by, bz};
            grid_size = grid;
            block_size = block;
            block_barrier = &barrier;
            kernel(args...);
            barrier.arrive_and_drop();  // an exited thread no longer holds the others back
          });
        }
        for (std::thread& thread : pool) thread.join();
      }
    }
  }
}

}  // namespace cuda_emulation

#undef threadIdx
#undef blockIdx
#undef gridDim
#undef blockDim
#define threadIdx (::cuda_emulation::thread_index)
#define blockIdx (::cuda_emulation::block_index)
#define gridDim (::cuda_emulation::grid_size)
#define blockDim (::cuda_emulation::block_size)
#define __syncthreads() (::cuda_emulation::block_barrier->arrive_and_wait())

// Device intrinsics the kernels use, with their exact host meaning.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __uint_as_float(unsigned int u) { return std::bit_cast<float>(u); }
inline unsigned int __float_as_uint(float f) { return std::bit_cast<unsigned int>(f); }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Every lane holds the whole tile (see the top of this file).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the kernels use m16n16k16");
  float x[16][16];
};

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (auto& row : f.x) {
    for (float& v : row) v = value;
  }
}

// A row-major: A[i][k] = p[i * ldm + k].
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, __half, row_major>& f, const __half* p, unsigned ldm) {
  for (unsigned i = 0; i < 16; ++i) {
    for (unsigned k = 0; k < 16; ++k) f.x[i][k] = __half2float(p[i * ldm + k]);
  }
}

// B column-major: B[k][j] = p[j * ldm + k].
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, __half, col_major>& f, const __half* p, unsigned ldm) {
  for (unsigned k = 0; k < 16; ++k) {
    for (unsigned j = 0; j < 16; ++j) f.x[k][j] = __half2float(p[j * ldm + k]);
  }
}

inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, __half, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, __half, col_major>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  fragment<accumulator, 16, 16, 16, float> result;
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float sum = c.x[i][j];
      for (int k = 0; k < 16; ++k) sum += a.x[i][k] * b.x[k][j];
      result.x[i][j] = sum;
    }
  }
  d = result;
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (threadIdx.x % 32 != 0) return;  // one lane writes the warp's tile
  for (unsigned i = 0; i < 16; ++i) {
    for (unsigned j = 0; j < 16; ++j) {
      p[layout == mem_row_major ? i * ldm + j : j * ldm + i] = f.x[i][j];
    }
  }
}

}  // namespace wmma
}  // namespace nvcuda
