// pgd_step_ on CPU: one fused pass for L-inf (reads x_adv, x_nat, grad; writes x_adv and the history slot), two
// fused passes around ATen's per-sample norms for L2. Semantics and checks: csrc/pgd_step.h, robust_ops/reference.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "pgd_step.h"

namespace robust_ops {
namespace {

using namespace pgd_step;

// Elements per parallel chunk: large enough that a chunk streams at memory speed, small enough to split a batch.
constexpr int64_t kGrain = 32768;

// Calls body(sample, begin, end) for each run of [begin, end) that lies in one sample, in parallel chunks.
template <typename Body>
void for_each_sample_run(int64_t numel, int64_t per_sample, const Body& body) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t sample = i / per_sample;
      const int64_t run_end = std::min(end, (sample + 1) * per_sample);
      body(sample, i, run_end);
      i = run_end;
    }
  });
}

// Plain loops over the shared element functions: GCC vectorizes them (SSE2 baseline) and they stream at the speed of
// a copy. at::vec::Vectorized was measured slower here: without AVX2 flags it falls back to its generic
// implementation (blendv/minimum element loops with NaN checks), 4x slower than these loops.

template <typename scalar_t>
void linf_run(scalar_t* __restrict__ x, const scalar_t* __restrict__ x_nat, const scalar_t* __restrict__ g,
              scalar_t* __restrict__ slot, int64_t len, opmath_t<scalar_t> alpha, opmath_t<scalar_t> eps,
              opmath_t<scalar_t> clip_min, opmath_t<scalar_t> clip_max) {
  if (slot != nullptr) {
    for (int64_t j = 0; j < len; ++j) {
      const scalar_t out = linf_update(x[j], x_nat[j], g[j], alpha, eps, clip_min, clip_max);
      x[j] = out;
      slot[j] = out;
    }
  } else {
    for (int64_t j = 0; j < len; ++j) x[j] = linf_update(x[j], x_nat[j], g[j], alpha, eps, clip_min, clip_max);
  }
}

template <typename scalar_t>
void l2_delta_run(scalar_t* __restrict__ x, const scalar_t* __restrict__ x_nat, const scalar_t* __restrict__ g,
                  int64_t len, opmath_t<scalar_t> alpha, opmath_t<scalar_t> grad_norm) {
  for (int64_t j = 0; j < len; ++j) x[j] = l2_delta(x[j], x_nat[j], g[j], alpha, grad_norm);
}

template <typename scalar_t>
void l2_project_run(scalar_t* __restrict__ x, const scalar_t* __restrict__ x_nat, scalar_t* __restrict__ slot,
                    int64_t len, opmath_t<scalar_t> factor, opmath_t<scalar_t> clip_min, opmath_t<scalar_t> clip_max) {
  if (slot != nullptr) {
    for (int64_t j = 0; j < len; ++j) {
      const scalar_t out = l2_project(x[j], x_nat[j], factor, clip_min, clip_max);
      x[j] = out;
      slot[j] = out;
    }
  } else {
    for (int64_t j = 0; j < len; ++j) x[j] = l2_project(x[j], x_nat[j], factor, clip_min, clip_max);
  }
}

void pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad, const at::Tensor& alpha,
                  const at::Tensor& eps, double clip_min, double clip_max, c10::string_view norm,
                  const std::optional<at::Tensor>& history, int64_t slot) {
  const std::string_view norm_name(norm.data(), norm.size());
  check_args(x_adv, x_nat, grad, alpha, eps, clip_min, clip_max, norm_name, history, slot);
  TORCH_INTERNAL_ASSERT(x_adv.device().is_cpu());
  check_values(alpha, eps, x_adv.scalar_type());
  if (x_adv.numel() == 0) return;

  const Plan p = make_plan(x_adv, x_nat, grad, alpha, eps, history, slot);
  const bool l2 = norm_name == "l2";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cpu", [&] {
    scalar_t* x = p.x.data_ptr<scalar_t>();
    const scalar_t* xn = p.x_nat.const_data_ptr<scalar_t>();
    const scalar_t* g = p.grad.const_data_ptr<scalar_t>();
    scalar_t* out_slot = p.slot_out.defined() ? p.slot_out.data_ptr<scalar_t>() : nullptr;
    using op_t = opmath_t<scalar_t>;
    const op_t* a = p.alpha.const_data_ptr<op_t>();
    const op_t lo = static_cast<op_t>(clip_min);
    const op_t hi = static_cast<op_t>(clip_max);
    if (!l2) {
      const op_t* e = p.eps.const_data_ptr<op_t>();
      for_each_sample_run(p.numel, p.per_sample, [&](int64_t s, int64_t begin, int64_t end) {
        linf_run(x + begin, xn + begin, g + begin, out_slot ? out_slot + begin : nullptr, end - begin, a[s], e[s], lo,
                 hi);
      });
      return;
    }
    const at::Tensor gnorm = grad_norms(grad, p.n).contiguous();
    const op_t* gn = gnorm.const_data_ptr<op_t>();
    for_each_sample_run(p.numel, p.per_sample, [&](int64_t s, int64_t begin, int64_t end) {
      l2_delta_run(x + begin, xn + begin, g + begin, end - begin, a[s], gn[s]);
    });
    const at::Tensor factors = projection_factors(delta_in_layout_of(x_adv, p.x), p.eps, p.n).contiguous();
    const op_t* f = factors.const_data_ptr<op_t>();
    for_each_sample_run(p.numel, p.per_sample, [&](int64_t s, int64_t begin, int64_t end) {
      l2_project_run(x + begin, xn + begin, out_slot ? out_slot + begin : nullptr, end - begin, f[s], lo, hi);
    });
  });
  p.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_ops, CPU, m) { m.impl("pgd_step_", &pgd_step_cpu); }

}  // namespace robust_ops
