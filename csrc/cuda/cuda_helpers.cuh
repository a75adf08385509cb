// Shared CUDA helpers: ceil_div and a capped grid for grid-stride loops (launches are checked with
// C10_CUDA_KERNEL_LAUNCH_CHECK at each call site).
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <algorithm>
#include <cstdint>

namespace robust_ops {
namespace cuda {

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid for a grid-stride loop over n items, capped so huge tensors do not overflow gridDim.x.
inline dim3 grid_for(int64_t n, int threads = kThreads) {
  const int64_t max_blocks = 4096;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(n, threads), max_blocks))));
}

}  // namespace cuda
}  // namespace robust_ops

// 64-bit grid-stride loop.
#define ROBUST_OPS_KERNEL_LOOP(i, n)                                                              \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);        \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
