// boundary_search_step_ on CPU: one fused pass per chunk of the flattened batch (at::parallel_for).
// Semantics and rounding: robust_ops/reference.py (boundary_search_step_, interpolation_weights). Each interior point
// is lo * w_lo + hi * w_hi rounded like the eager expression: both products rounded to the tensor dtype, then the sum
// (opmath float for float16/bfloat16); built with -ffp-contract=off so no FMA changes the last bit.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "boundary_search_step_checks.h"

namespace robust_ops {
namespace {

// Positions per parallel chunk; below this a single thread does the whole batch.
constexpr int64_t kGrain = 32768;

// Positions staged per block: both ends are copied to local buffers first (they may be points that the block then
// overwrites), which also lets the compiler vectorize the per-point loop without aliasing checks.
constexpr int64_t kBlock = 256;

template <typename scalar_t>
void interpolate_segment(const scalar_t* src_lo, const scalar_t* src_hi, scalar_t* lo, scalar_t* hi, scalar_t* points,
                         int64_t point_stride, int64_t count, bool write_lo, bool write_hi,
                         const std::vector<double>& w_lo, const std::vector<double>& w_hi) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t interior = static_cast<int64_t>(w_lo.size());
  opmath_t a[kBlock];
  opmath_t b[kBlock];
  for (int64_t base = 0; base < count; base += kBlock) {
    const int64_t m = std::min(kBlock, count - base);
    for (int64_t i = 0; i < m; ++i) {
      a[i] = static_cast<opmath_t>(src_lo[base + i]);
      b[i] = static_cast<opmath_t>(src_hi[base + i]);
    }
    // write_lo means src_lo is a points slice (and write_hi likewise): distinct memory, copied before it changes.
    if (write_lo) std::memcpy(lo + base, src_lo + base, m * sizeof(scalar_t));
    if (write_hi) std::memcpy(hi + base, src_hi + base, m * sizeof(scalar_t));
    for (int64_t j = 0; j < interior; ++j) {
      const opmath_t wl = static_cast<opmath_t>(w_lo[j]);
      const opmath_t wh = static_cast<opmath_t>(w_hi[j]);
      scalar_t* out = points + j * point_stride + base;
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        // float / double: one rounding per product and one for the sum, like the eager mul, mul, add.
        for (int64_t i = 0; i < m; ++i) out[i] = a[i] * wl + b[i] * wh;
      } else {
        // float16 / bfloat16: eager multiplies in float and rounds each product to the dtype, then adds in float.
        for (int64_t i = 0; i < m; ++i) {
          const scalar_t p_lo = static_cast<scalar_t>(a[i] * wl);
          const scalar_t p_hi = static_cast<scalar_t>(b[i] * wh);
          out[i] = static_cast<scalar_t>(static_cast<opmath_t>(p_lo) + static_cast<opmath_t>(p_hi));
        }
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
    TORCH_CHECK_VALUE(crossed_ptr[s] >= 0 && crossed_ptr[s] <= k - 1,
                      "boundary_search_step_: expected crossed_at in [0, ", k - 1, "] (k = ", k, "), got ",
                      crossed_ptr[s], " for sample ", s);
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
