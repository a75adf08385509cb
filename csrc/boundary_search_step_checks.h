// Argument checks of boundary_search_step_, shared by the CPU and CUDA kernels. The messages are character for
// character those of robust_ops/_meta.py (check_boundary_search_step_args), so eager and compiled calls fail alike;
// shapes and dtypes are therefore printed the Python way: (2, 3) and torch.float32.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>
#include <sstream>
#include <string>

#include "checks.h"

namespace robust_ops {

inline void check_boundary_search_step_args(const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& points,
                                            const at::Tensor& crossed_at, const std::optional<at::Tensor>& active) {
  constexpr const char* op = "boundary_search_step_";
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"lo", &lo}, {"hi", &hi}, {"points", &points},
                         {"crossed_at", &crossed_at}}) {
    check_given(op, name, *t);
  }
  check_floating(op, "lo", lo);
  TORCH_CHECK(lo.dim() >= 1, op, ": expected lo to have a batch dimension, got a 0-D tensor");
  TORCH_CHECK(hi.sizes() == lo.sizes() && hi.scalar_type() == lo.scalar_type(), op,
              ": expected hi to have the shape and dtype of lo (", py_tuple(lo.sizes()), ", ",
              py_dtype(lo.scalar_type()), "), got (", py_tuple(hi.sizes()), ", ", py_dtype(hi.scalar_type()), ")");
  const bool points_ok = points.dim() == lo.dim() + 1 && points.sizes().slice(1) == lo.sizes() &&
                         points.size(0) >= 1 && points.scalar_type() == lo.scalar_type();
  if (!points_ok) {
    std::ostringstream want;
    for (int64_t d = 0; d < lo.dim(); ++d) want << (d ? ", " : "") << lo.size(d);
    TORCH_CHECK(false, op, ": expected points to be [k-1, ", want.str(), "] with k >= 2 and the dtype of lo, got ",
                py_tuple(points.sizes()), " ", py_dtype(points.scalar_type()));
  }
  const int64_t n = lo.size(0);
  TORCH_CHECK(crossed_at.scalar_type() == at::kLong && crossed_at.dim() == 1 && crossed_at.size(0) == n, op,
              ": expected crossed_at to be an int64 tensor of shape [", n, "], got ",
              py_dtype(crossed_at.scalar_type()), " ", py_tuple(crossed_at.sizes()));
  if (active.has_value()) {
    TORCH_CHECK(active->scalar_type() == at::kBool && active->dim() == 1 && active->size(0) == n, op,
                ": expected active to be a bool tensor of shape [", n, "], got ", py_dtype(active->scalar_type()), " ",
                py_tuple(active->sizes()));
  }
  // Device checks (the dispatcher picks the kernel from the tensors' devices; a mix would read foreign memory).
  check_same_device(op, "hi", hi, "lo", lo);
  check_same_device(op, "points", points, "lo", lo);
  check_same_device(op, "crossed_at", crossed_at, "lo", lo);
  if (active.has_value()) check_same_device(op, "active", *active, "lo", lo);
  // Before any write: the kernels update lo/hi/points in place (an expanded lo used to fail only at the copy back).
  check_no_internal_overlap(op, "lo", lo);
  check_no_internal_overlap(op, "hi", hi);
  check_no_internal_overlap(op, "points", points);
  // All three are written: two that share memory (hi passed as lo, overlapping views of one buffer) have no single
  // result, and the backends wrote them in different orders. Views ATen cannot judge (not dense: TooHard) pass.
  const std::pair<const char*, const at::Tensor*> written[] = {{"lo", &lo}, {"hi", &hi}, {"points", &points}};
  for (int i = 0; i < 3; ++i) {
    for (int j = i + 1; j < 3; ++j) {
      const at::MemOverlapStatus status = at::get_overlap_status(*written[i].second, *written[j].second);
      TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": expected ",
                  written[i].first, " and ", written[j].first, " not to share memory (both are written in place); "
                  "clone() one of them first");
    }
  }
}

}  // namespace robust_ops
