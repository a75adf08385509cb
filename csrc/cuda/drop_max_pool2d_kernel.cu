// Drop-max pooling (MIRST-DM) on CUDA: forward (top-2 per window, one thread per output element) and backward
// (scatter-add of grad_output to the selected positions with atomics; windows overlap).
//
// Semantics are those of robust_ops.reference.drop_max_pool2d and the CPU kernel: remove the first occurrence
// (row-major window order) of the maximum, select the first occurrence of the largest remaining value; a single
// valid element selects itself; a window holding NaN selects its first NaN. The kernels index through strides, so
// NCHW, channels_last and other layouts need no copy; outputs keep the input's memory format (channels_last iff the
// input is channels_last and not also contiguous, as the fake kernel in robust_ops/_meta.py says).
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

namespace robust_ops {
namespace {

constexpr const char* kOp = "drop_max_pool2d";
constexpr const char* kBackwardOp = "_drop_max_pool2d_backward";

std::string python_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string python_tuple(c10::IntArrayRef v) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  if (v.size() == 1) s << ",";
  s << ")";
  return s.str();
}

int64_t pool_output_size(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t num = size + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= size + p) --out;
  return out;
}

struct Geometry {
  int64_t N, C, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// The checks and messages of the CPU kernel and of _meta.check_drop_max_pool2d_args.
Geometry check_args(const at::Tensor& input, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                    c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), kOp,
              ": expected input to be a floating-point tensor (float16, bfloat16, float32, float64), got ",
              python_dtype(input.scalar_type()));
  TORCH_CHECK(input.dim() == 4, kOp, ": expected input to be 4-D (N, C, H, W), got ", input.dim(), "-D");
  const std::pair<const char*, c10::IntArrayRef> positive[] = {
      {"kernel_size", kernel_size}, {"stride", stride}, {"dilation", dilation}};
  for (const auto& [name, value] : positive) {
    TORCH_CHECK(value.size() == 2 && value[0] > 0 && value[1] > 0, kOp, ": expected ", name,
                " to be two positive integers, got ", python_tuple(value));
  }
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, kOp,
              ": expected padding to be two non-negative integers, got ", python_tuple(padding));
  TORCH_CHECK(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, kOp,
              ": expected padding to be at most half of kernel_size, got padding=", python_tuple(padding),
              " for kernel_size=", python_tuple(kernel_size));
  const int64_t h = input.size(2), w = input.size(3);
  TORCH_CHECK(h > 0 && w > 0, kOp, ": expected input with non-zero height and width, got ", h, "x", w);
  const int64_t oh = pool_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode);
  const int64_t ow = pool_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode);
  TORCH_CHECK(oh > 0 && ow > 0, kOp, ": expected kernel_size ", python_tuple(kernel_size), " with dilation ",
              python_tuple(dilation), " to fit the padded input ", h + 2 * padding[0], "x", w + 2 * padding[1],
              ", got output size ", oh, "x", ow);
  return Geometry{input.size(0), input.size(1), h, w, oh, ow,
                  kernel_size[0], kernel_size[1], stride[0], stride[1],
                  padding[0], padding[1], dilation[0], dilation[1]};
}

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
    acc_t m1 = 0, m2 = 0;
    int64_t i1 = -1, i2 = -1, inan = -1;
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      const int64_t h = hs + ki * g.dh;
      if (h < 0 || h >= g.H) continue;
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const int64_t w = ws + kj * g.dw;
        if (w < 0 || w >= g.W) continue;
        const acc_t v = static_cast<acc_t>(plane[h * in_s.h + w * in_s.w]);
        const int64_t pos = h * g.W + w;
        if (v != v) {
          if (inan < 0) inan = pos;
        } else if (i1 < 0 || v > m1) {
          m2 = m1;
          i2 = i1;
          m1 = v;
          i1 = pos;
        } else if (i2 < 0 || v > m2) {
          m2 = v;
          i2 = pos;
        }
      }
    }
    const int64_t sel = inan >= 0 ? inan : (i2 >= 0 ? i2 : i1);
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

bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

std::tuple<at::Tensor, at::Tensor> drop_max_pool2d_cuda(const at::Tensor& input, c10::IntArrayRef kernel_size,
                                                        c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                        c10::IntArrayRef dilation, bool ceil_mode) {
  TORCH_INTERNAL_ASSERT(input.is_cuda());
  const Geometry g = check_args(input, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = is_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
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
  TORCH_INTERNAL_ASSERT(grad_output.is_cuda());
  TORCH_CHECK(indices.scalar_type() == at::kLong, kBackwardOp, ": expected indices to be int64, got ",
              python_dtype(indices.scalar_type()));
  TORCH_CHECK(grad_output.sizes() == indices.sizes(), kBackwardOp,
              ": expected grad_output to have the shape of indices ", python_tuple(indices.sizes()), ", got ",
              python_tuple(grad_output.sizes()));
  TORCH_CHECK(at::isFloatingType(grad_output.scalar_type()), kBackwardOp,
              ": expected grad_output to be a floating-point tensor (float16, bfloat16, float32, float64), got ",
              python_dtype(grad_output.scalar_type()));
  TORCH_CHECK(grad_output.dim() == 4, kBackwardOp, ": expected grad_output to be 4-D (N, C, H_out, W_out), got ",
              grad_output.dim(), "-D");
  TORCH_CHECK(input_size.size() == 4 && input_size[0] == grad_output.size(0) &&
                  input_size[1] == grad_output.size(1) && input_size[2] > 0 && input_size[3] > 0,
              kBackwardOp, ": expected input_size to be (N, C, H, W) = (", grad_output.size(0), ", ",
              grad_output.size(1), ", H, W) with H, W > 0, got ", python_tuple(input_size));
  TORCH_CHECK(indices.device() == grad_output.device(), kBackwardOp, ": expected indices on the device of grad_output (",
              grad_output.device(), "), got ", indices.device());
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const auto format = is_channels_last(grad_output) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
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
