// Input gradient of eval-mode batch norm on CPU: grad_input = (grad_output * invstd[c]) * weight[c], the two
// multiplies in ATen's order so results are bitwise those of aten::native_batch_norm_backward(train=False). ATen
// also reduces sum(grad) and sum(grad * x_hat) per channel for the weight gradients even when only the input
// gradient is asked for; this is the one pass that remains (robust_ops.native_layers uses it during attacks).
// NCHW and channels_last grad_output keep their layout; any other strides are made contiguous first.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "checks.h"

namespace robust_ops {
namespace {

constexpr const char* kOp = "_eval_batch_norm_backward";

at::Tensor eval_batch_norm_backward_cpu(const at::Tensor& grad_output, const at::Tensor& invstd,
                                        const std::optional<at::Tensor>& weight) {
  check_given(kOp, "grad_output", grad_output);
  check_given(kOp, "invstd", invstd);
  TORCH_CHECK(grad_output.scalar_type() == at::kFloat || grad_output.scalar_type() == at::kDouble, kOp,
              ": expected grad_output to be float32 or float64, got ", py_dtype(grad_output.scalar_type()));
  TORCH_CHECK(grad_output.dim() >= 2, kOp, ": expected grad_output to be (N, C, ...), got ", grad_output.dim(),
              "-D");
  const int64_t C = grad_output.size(1);
  // dtype before shape for each tensor, in the order of the fake kernel (robust_ops/_meta.py), so both say the same
  check_same_dtype(kOp, "invstd", invstd, "grad_output", grad_output);
  TORCH_CHECK(invstd.dim() == 1 && invstd.size(0) == C, kOp, ": expected invstd of shape (", C, ",), got ",
              py_tuple(invstd.sizes()));
  check_same_device(kOp, "invstd", invstd, "grad_output", grad_output);
  if (weight.has_value()) {
    check_same_dtype(kOp, "weight", *weight, "grad_output", grad_output);
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == C, kOp, ": expected weight of shape (", C, ",), got ",
                py_tuple(weight->sizes()));
    check_same_device(kOp, "weight", *weight, "grad_output", grad_output);
  }
  const at::Tensor inv = invstd.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  // channels_last grad_output (a channels_last model's batch norms): keep its layout, channels innermost.
  const bool channels_last = grad_output.dim() == 4 && !grad_output.is_contiguous() &&
                             grad_output.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor go = channels_last ? grad_output : grad_output.contiguous();
  at::Tensor grad_input = at::empty(
      go.sizes(), go.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous));
  if (go.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), kOp, [&] {
    const scalar_t* g = go.const_data_ptr<scalar_t>();
    const scalar_t* a = inv.const_data_ptr<scalar_t>();
    const scalar_t* b = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
    if (channels_last) {  // rows of C channels, ~32K elements per task
      const int64_t rows = go.numel() / C;
      at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* gp = g + r * C;
          scalar_t* op = out + r * C;
          if (b) {
            for (int64_t c = 0; c < C; ++c) op[c] = (gp[c] * a[c]) * b[c];  // two roundings, as ATen
          } else {
            for (int64_t c = 0; c < C; ++c) op[c] = gp[c] * a[c];
          }
        }
      });
      return;
    }
    const int64_t planes = go.size(0) * C, inner = go.numel() / planes;
    // Whole (n, c) planes per task, at least ~32K elements each so small planes do not drown in scheduling.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(inner, 1));
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        const scalar_t s = a[c], t = b ? b[c] : scalar_t(1);
        const scalar_t* gp = g + p * inner;
        scalar_t* op = out + p * inner;
        for (int64_t i = 0; i < inner; ++i) op[i] = (gp[i] * s) * t;  // two roundings, as ATen
      }
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_ops, CPU, m) { m.impl("_eval_batch_norm_backward", &eval_batch_norm_backward_cpu); }

}  // namespace robust_ops
