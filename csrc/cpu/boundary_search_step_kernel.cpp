// boundary_search_step_ on CPU: one fused pass per chunk of the flattened batch (at::parallel_for).
// Semantics and rounding: robust_ops/reference.py (boundary_search_step_, interpolation_weights). Each interior point
// is lo * w_lo + hi * w_hi rounded like the eager expression: both products rounded to the tensor dtype, then the sum
// (opmath float for float16/bfloat16); built with -ffp-contract=off so no FMA changes the last bit.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#include "boundary_search_step_checks.h"

namespace robust_ops {
namespace {

// Positions per parallel chunk; below this a single thread does the whole batch.
constexpr int64_t kGrain = 32768;

template <typename scalar_t>
void interpolate_segment(const scalar_t* src_lo, const scalar_t* src_hi, scalar_t* lo, scalar_t* hi, scalar_t* points,
                         int64_t point_stride, int64_t count, bool write_lo, bool write_hi,
                         const std::vector<double>& w_lo, const std::vector<double>& w_hi) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t interior = static_cast<int64_t>(w_lo.size());
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    // float / double: vectorized, one rounding per product and one per sum, like the eager mul/mul/add.
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t V = Vec::size();
    int64_t i = 0;
    for (; i < count; i += V) {
      const int64_t m = std::min<int64_t>(V, count - i);
      // Load both ends before any store: src_lo / src_hi may be points that are overwritten below.
      const Vec a = m == V ? Vec::loadu(src_lo + i) : Vec::loadu(src_lo + i, m);
      const Vec b = m == V ? Vec::loadu(src_hi + i) : Vec::loadu(src_hi + i, m);
      if (write_lo) a.store(lo + i, m);
      if (write_hi) b.store(hi + i, m);
      for (int64_t j = 0; j < interior; ++j) {
        const Vec p = a * Vec(static_cast<scalar_t>(w_lo[j])) + b * Vec(static_cast<scalar_t>(w_hi[j]));
        p.store(points + j * point_stride + i, m);
      }
    }
  } else {
    // float16 / bfloat16: eager multiplies in float and rounds each product to the dtype, then adds in float.
    std::vector<opmath_t> wl(interior), wh(interior);
    for (int64_t j = 0; j < interior; ++j) {
      wl[j] = static_cast<opmath_t>(w_lo[j]);
      wh[j] = static_cast<opmath_t>(w_hi[j]);
    }
    for (int64_t i = 0; i < count; ++i) {
      const scalar_t a = src_lo[i];
      const scalar_t b = src_hi[i];
      if (write_lo) lo[i] = a;
      if (write_hi) hi[i] = b;
      const opmath_t af = static_cast<opmath_t>(a);
      const opmath_t bf = static_cast<opmath_t>(b);
      for (int64_t j = 0; j < interior; ++j) {
        const scalar_t pa = static_cast<scalar_t>(af * wl[j]);
        const scalar_t pb = static_cast<scalar_t>(bf * wh[j]);
        points[j * point_stride + i] = static_cast<scalar_t>(static_cast<opmath_t>(pa) + static_cast<opmath_t>(pb));
      }
    }
  }
}

void boundary_search_step_cpu(at::Tensor& lo, at::Tensor& hi, at::Tensor& points, const at::Tensor& crossed_at,
                              const std::optional<at::Tensor>& active) {
  check_boundary_search_step_args(lo, hi, points, crossed_at, active);
  const int64_t k = points.size(0) + 1;
  const int64_t n = lo.size(0);
  const int64_t per_sample = n == 0 ? 0 : lo.numel() / n;

  const at::Tensor crossed = crossed_at.contiguous();
  const int64_t* crossed_ptr = crossed.data_ptr<int64_t>();
  // Validate every index before touching the data, so a bad index leaves lo/hi/points unchanged.
  for (int64_t s = 0; s < n; ++s) {
    TORCH_CHECK_VALUE(crossed_ptr[s] >= 0 && crossed_ptr[s] <= k - 1, "boundary_search_step_: expected crossed_at in [0, ",
                      k - 1, "] (k = ", k, "), got ", crossed_ptr[s], " for sample ", s);
  }
  if (lo.numel() == 0) return;

  at::Tensor active_c;
  const bool* active_ptr = nullptr;
  if (active.has_value()) {
    active_c = active->contiguous();
    active_ptr = active_c.data_ptr<bool>();
  }

  // Work on contiguous buffers (views of the originals when they already are) and copy back afterwards.
  at::Tensor lo_c = lo.contiguous();
  at::Tensor hi_c = hi.contiguous();
  at::Tensor points_c = points.contiguous();

  std::vector<double> w_lo(k - 1), w_hi(k - 1);
  for (int64_t j = 0; j < k - 1; ++j) {
    const double t = static_cast<double>(j + 1) / static_cast<double>(k);
    w_lo[j] = 1.0 - t;  // same double expression as reference.interpolation_weights, cast to the dtype later
    w_hi[j] = t;
  }

  const int64_t total = n * per_sample;
  const int64_t point_stride = total;  // points_c is [k-1, N, M] contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lo.scalar_type(), "boundary_search_step_cpu", [&] {
    scalar_t* lo_ptr = lo_c.data_ptr<scalar_t>();
    scalar_t* hi_ptr = hi_c.data_ptr<scalar_t>();
    scalar_t* points_ptr = points_c.data_ptr<scalar_t>();
    at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
      int64_t pos = begin;
      while (pos < end) {
        const int64_t s = pos / per_sample;
        const int64_t seg_begin = pos;
        const int64_t seg_end = std::min(end, (s + 1) * per_sample);
        pos = seg_end;
        if (active_ptr != nullptr && !active_ptr[s]) continue;
        const int64_t c = crossed_ptr[s];
        const scalar_t* src_lo = c == 0 ? lo_ptr : points_ptr + (c - 1) * point_stride;
        const scalar_t* src_hi = c == k - 1 ? hi_ptr : points_ptr + c * point_stride;
        interpolate_segment<scalar_t>(src_lo + seg_begin, src_hi + seg_begin, lo_ptr + seg_begin, hi_ptr + seg_begin,
                                      points_ptr + seg_begin, point_stride, seg_end - seg_begin, c != 0, c != k - 1,
                                      w_lo, w_hi);
      }
    });
  });

  if (!lo_c.is_same(lo)) lo.copy_(lo_c);
  if (!hi_c.is_same(hi)) hi.copy_(hi_c);
  if (!points_c.is_same(points)) points.copy_(points_c);
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_ops, CPU, m) { m.impl("boundary_search_step_", &boundary_search_step_cpu); }

}  // namespace robust_ops
