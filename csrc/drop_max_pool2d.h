// Shared by the CPU and CUDA drop-max kernels: pooling geometry and the argument checks, with the messages of
// robust_ops/_meta.py (check_drop_max_pool2d_args / check_drop_max_pool2d_backward_args), so eager and compiled calls
// fail alike.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>

#include "checks.h"

namespace robust_ops {

constexpr const char* kDropMaxOp = "drop_max_pool2d";
constexpr const char* kDropMaxBackwardOp = "_drop_max_pool2d_backward";
// max_pool2d: the same windows and checks with the plain maximum (CPU only, see csrc/cpu/drop_max_pool2d_kernel.cpp).
constexpr const char* kMaxPoolOp = "max_pool2d";

// The instruction set the CPU kernel's float32 windows run with here: "avx512", "avx2" or "scalar" -- the best this
// CPU has, capped by $ROBUST_OPS_CPU_ISA (always "scalar" off x86-64). Benchmarks record it; tests check the cap.
std::string cpu_vector_isa();

// Same formula as reference.pool_output_size (ATen's pooling_output_shape).
inline int64_t pool_output_size(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t num = size + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  // Python floor division (num may be negative).
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= size + p) --out;
  return out;
}

struct Geometry {
  int64_t N, C, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// The same checks, in the same order and with the same messages, as _meta.check_drop_max_pool2d_args; `op` names the
// calling op (drop_max_pool2d or max_pool2d).
inline Geometry check_drop_max_pool2d_args(const at::Tensor& input, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                    c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode,
                    const char* op = kDropMaxOp) {
  check_given(op, "input", input);
  check_floating(op, "input", input);
  TORCH_CHECK(input.dim() == 4, op, ": expected input to be 4-D (N, C, H, W), got ", input.dim(), "-D");
  const std::pair<const char*, c10::IntArrayRef> positive[] = {
      {"kernel_size", kernel_size}, {"stride", stride}, {"dilation", dilation}};
  for (const auto& [name, value] : positive) {
    TORCH_CHECK(value.size() == 2 && value[0] > 0 && value[1] > 0, op, ": expected ", name,
                " to be two positive integers, got ", py_tuple(value));
  }
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": expected padding to be two non-negative integers, got ", py_tuple(padding));
  // F.max_pool2d's limit (its arguments are C ints): larger values overflowed pool_output_size's int64 arithmetic.
  const std::pair<const char*, c10::IntArrayRef> bounded[] = {
      {"kernel_size", kernel_size}, {"stride", stride}, {"padding", padding}, {"dilation", dilation}};
  for (const auto& [name, value] : bounded) {
    TORCH_CHECK(value[0] < (int64_t{1} << 31) && value[1] < (int64_t{1} << 31), op, ": expected ", name,
                " below 2**31 as in F.max_pool2d, got ", py_tuple(value));
  }
  TORCH_CHECK(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, op,
              ": expected padding to be at most half of kernel_size, got padding=", py_tuple(padding),
              " for kernel_size=", py_tuple(kernel_size));
  const int64_t h = input.size(2), w = input.size(3);
  TORCH_CHECK(h > 0 && w > 0, op, ": expected input with non-zero height and width, got ", h, "x", w);
  // ATen's max_pool2d refuses C = 0 (N = 0 is fine); drop_max_pool2d returns an empty output there.
  TORCH_CHECK(op != std::string_view(kMaxPoolOp) || input.size(1) > 0, op,
              ": expected input with non-zero channels, as F.max_pool2d, got ", py_tuple(input.sizes()));
  const int64_t oh = pool_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode);
  const int64_t ow = pool_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode);
  TORCH_CHECK(oh > 0 && ow > 0, op, ": expected kernel_size ", py_tuple(kernel_size), " with dilation ",
              py_tuple(dilation), " to fit the padded input ", h + 2 * padding[0], "x", w + 2 * padding[1],
              ", got output size ", oh, "x", ow);
  return Geometry{input.size(0), input.size(1), h, w, oh, ow,
                  kernel_size[0], kernel_size[1], stride[0], stride[1],
                  padding[0], padding[1], dilation[0], dilation[1]};
}

inline void check_drop_max_pool2d_backward_args(const at::Tensor& grad_output, const at::Tensor& indices,
                                                c10::IntArrayRef input_size) {
  check_given(kDropMaxBackwardOp, "grad_output", grad_output);
  check_given(kDropMaxBackwardOp, "indices", indices);
  TORCH_CHECK(indices.scalar_type() == at::kLong, kDropMaxBackwardOp, ": expected indices to be int64, got ",
              py_dtype(indices.scalar_type()));
  TORCH_CHECK(grad_output.sizes() == indices.sizes(), kDropMaxBackwardOp,
              ": expected grad_output to have the shape of indices ", py_tuple(indices.sizes()), ", got ",
              py_tuple(grad_output.sizes()));
  check_floating(kDropMaxBackwardOp, "grad_output", grad_output);
  TORCH_CHECK(grad_output.dim() == 4, kDropMaxBackwardOp, ": expected grad_output to be 4-D (N, C, H_out, W_out), got ",
              grad_output.dim(), "-D");
  TORCH_CHECK(input_size.size() == 4 && input_size[0] == grad_output.size(0) &&
                  input_size[1] == grad_output.size(1) && input_size[2] > 0 && input_size[3] > 0,
              kDropMaxBackwardOp, ": expected input_size to be (N, C, H, W) = (", grad_output.size(0), ", ",
              grad_output.size(1), ", H, W) with H, W > 0, got ", py_tuple(input_size));
  TORCH_CHECK(indices.device() == grad_output.device(), kDropMaxBackwardOp,
              ": expected indices on the device of grad_output (", grad_output.device(), "), got ", indices.device());
}

// The drop-max selection rule for one window, fed its elements in row-major window order (CPU scalar path and CUDA):
// remove the first occurrence of the maximum, keep the first occurrence of the largest remaining value; a single
// element selects itself; a NaN selects the first NaN; no element at all selects -1.
template <typename acc_t>
struct WindowTop2 {
  acc_t m1 = 0, m2 = 0;
  int64_t i1 = -1, i2 = -1, inan = -1;

  C10_HOST_DEVICE inline void push(acc_t v, int64_t pos) {
    if (v != v) {  // NaN
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

  C10_HOST_DEVICE inline int64_t selected() const { return inan >= 0 ? inan : (i2 >= 0 ? i2 : i1); }
};

// The pooling layout (_meta.pool_memory_format), ATen's max_pool2d's: of the forward's outputs from the input, of the
// backward's grad_input from the indices, which the forward made in the input's (so grad_input takes the input's
// layout whatever grad_output's). Tensors that are NCHW and channels_last at once (one channel, or N x C x 1 x 1) are
// told apart by their strides, as suggest_memory_format does: a (25, 1, 5, 1)-strided 1 x 1 x 5 x 5 input pools into
// channels_last strides, a 2 x 3 x 1 x 1 one of strides (3, 1, 3, 3) into a channels_last 2 x 2 output.
inline bool pool_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         (!t.is_contiguous() || t.suggest_memory_format() == at::MemoryFormat::ChannelsLast);
}

}  // namespace robust_ops
