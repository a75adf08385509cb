// Drop-max pooling (MIRST-DM) on CUDA: forward (top-2 per window, one thread per output element) and backward
// (scatter-add of grad_output to the selected positions with atomics; windows overlap).
//
// Semantics are those of robust_ops.reference.drop_max_pool2d and the CPU kernel: remove the first occurrence
// (row-major window order) of the maximum, select the first occurrence of the largest remaining value; a single
// valid element selects itself; a window holding NaN selects its first NaN. The kernels index through strides, so
// NCHW, channels_last and other layouts need no copy; outputs keep the input's memory format (pool_channels_last, as
// the fake kernel in robust_ops/_meta.py says).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <string>

#include "cuda/cuda_helpers.cuh"
#include "drop_max_pool2d.h"

namespace robust_ops {
namespace {

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename scalar_t>
__global__ void drop_max_pool2d_forward_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
                                               int64_t* __restrict__ indices, int64_t total, Geometry g,
                                               Strides4 in_s, Strides4 out_s) {
  using acc_t = at::opmath_type<scalar_t>;
  ROBUST_OPS_KERNEL_LOOP(i, total) {
    const int64_t ow = i % g.OW;
    int64_t t = i / g.OW;
    const int64_t oh = t % g.OH;
    t /= g.OH;
    const int64_t c = t % g.C;
    const int64_t n = t / g.C;
    const scalar_t* plane = input + n * in_s.n + c * in_s.c;
    const int64_t hs = oh * g.sh - g.ph, ws = ow * g.sw - g.pw;
    WindowTop2<acc_t> top2;
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      const int64_t h = hs + ki * g.dh;
      if (h < 0 || h >= g.H) continue;
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const int64_t w = ws + kj * g.dw;
        if (w < 0 || w >= g.W) continue;
        top2.push(static_cast<acc_t>(plane[h * in_s.h + w * in_s.w]), h * g.W + w);
      }
    }
    const int64_t sel = top2.selected();
    const int64_t o = n * out_s.n + c * out_s.c + oh * out_s.h + ow * out_s.w;
    // Re-read the selected element: exact in the input dtype, NaN included.
    output[o] = sel >= 0 ? plane[(sel / g.W) * in_s.h + (sel % g.W) * in_s.w]
                         : static_cast<scalar_t>(-INFINITY);
    indices[o] = sel;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void drop_max_pool2d_backward_kernel(const scalar_t* __restrict__ grad_output,
                                                const int64_t* __restrict__ indices, acc_t* __restrict__ grad_input,
                                                int64_t total, int64_t C, int64_t OH, int64_t OW, int64_t HW,
                                                int64_t W, Strides4 go_s, Strides4 ix_s, Strides4 gi_s) {
  ROBUST_OPS_KERNEL_LOOP(i, total) {
    const int64_t ow = i % OW;
    int64_t t = i / OW;
    const int64_t oh = t % OH;
    t /= OH;
    const int64_t c = t % C;
    const int64_t n = t / C;
    const int64_t sel = indices[n * ix_s.n + c * ix_s.c + oh * ix_s.h + ow * ix_s.w];
    // -1: a window without input elements (output -inf), no gradient. Anything else out of range is a caller bug:
    // a device-side assert, as ATen's index kernels do (a host check would need a synchronizing read).
    CUDA_KERNEL_ASSERT(sel >= -1 && sel < HW);
    if (sel < 0 || sel >= HW) continue;
    const acc_t g = static_cast<acc_t>(grad_output[n * go_s.n + c * go_s.c + oh * go_s.h + ow * go_s.w]);
    gpuAtomicAdd(grad_input + n * gi_s.n + c * gi_s.c + (sel / W) * gi_s.h + (sel % W) * gi_s.w, g);
  }
}

std::tuple<at::Tensor, at::Tensor> drop_max_pool2d_cuda(const at::Tensor& input, c10::IntArrayRef kernel_size,
                                                        c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                        c10::IntArrayRef dilation, bool ceil_mode) {
  TORCH_INTERNAL_ASSERT(input.is_cuda());
  const Geometry g = check_drop_max_pool2d_args(input, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = pool_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor output = at::empty({g.N, g.C, g.OH, g.OW}, input.options().memory_format(format));
  at::Tensor indices = at::empty({g.N, g.C, g.OH, g.OW}, input.options().dtype(at::kLong).memory_format(format));
  const int64_t total = output.numel();
  if (total == 0) return {output, indices};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "drop_max_pool2d_cuda", [&] {
    drop_max_pool2d_forward_kernel<scalar_t><<<cuda::grid_for(total), cuda::kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int64_t>(),
        total, g, strides_of(input), strides_of(output));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {output, indices};
}

at::Tensor drop_max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& indices,
                                         c10::IntArrayRef input_size) {
  // Checks first: CUDA outranks CPU in dispatch, so a CPU grad_output with CUDA indices lands here and must get the
  // device message, not an internal assert.
  check_drop_max_pool2d_backward_args(grad_output, indices, input_size);
  TORCH_INTERNAL_ASSERT(grad_output.is_cuda());
  // Float atomics: the summation order of overlapping windows varies between runs (ATen's max_pool2d backward alerts
  // too); an error under torch.use_deterministic_algorithms(True), a warning with warn_only=True.
  at::globalContext().alertNotDeterministic("_drop_max_pool2d_backward_cuda");
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const auto format =
      pool_channels_last(indices) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto acc_type = at::toOpMathType(grad_output.scalar_type());
  // Accumulate in opmath (float for float16/bfloat16) and round once, like the CPU kernel.
  at::Tensor acc = at::empty(input_size, grad_output.options().dtype(acc_type).memory_format(format)).zero_();
  const int64_t total = grad_output.numel();
  if (total > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                    "drop_max_pool2d_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      drop_max_pool2d_backward_kernel<scalar_t, acc_t><<<cuda::grid_for(total), cuda::kThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(), acc.mutable_data_ptr<acc_t>(),
          total, grad_output.size(1), grad_output.size(2), grad_output.size(3), input_size[2] * input_size[3],
          input_size[3], strides_of(grad_output), strides_of(indices), strides_of(acc));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return acc.scalar_type() == grad_output.scalar_type() ? acc : acc.to(grad_output.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_ops, CUDA, m) {
  m.impl("drop_max_pool2d", &drop_max_pool2d_cuda);
  m.impl("_drop_max_pool2d_backward", &drop_max_pool2d_backward_cuda);
}

}  // namespace robust_ops
