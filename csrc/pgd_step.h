// pgd_step_: argument checks, host-side preparation and the per-element update, shared by the CPU kernel
// (csrc/cpu/pgd_step_kernel.cpp) and the CUDA kernel (csrc/cuda/pgd_step_kernel.cu).
//
// Semantics: robust_ops/reference.py (pgd_step_), docs/ops/pgd_step.md. The update follows torchattacks 3.5.1
// operation by operation; every intermediate is rounded to the storage dtype as eager PyTorch does, so results are
// bitwise equal to the eager chain (with FMA contraction off: setup.py passes -ffp-contract=off / --fmad=false).
#pragma once
#include "checks.h"
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>

#ifdef __CUDACC__
#define ROBUST_OPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ROBUST_OPS_HOST_DEVICE inline
#endif

namespace robust_ops {
namespace pgd_step {

constexpr const char* kOp = "pgd_step_";

// ---------------------------------------------------------------------------------------------------------------------
// Per-element update. opmath is float for float16/bfloat16 (and the type itself otherwise); each result is rounded to
// scalar_t like the eager op that produces it. max/min propagate NaN like ATen's clamp.

template <typename T>
ROBUST_OPS_HOST_DEVICE T max_propagate_nan(T a, T b) {
  return (a < b) ? b : a;  // std::max: a NaN in `a` survives
}

template <typename T>
ROBUST_OPS_HOST_DEVICE T min_propagate_nan(T a, T b) {
  return (b < a) ? b : a;  // std::min: a NaN in `a` survives
}

// torch.clamp(v, lo, hi) with lo <= hi.
template <typename T>
ROBUST_OPS_HOST_DEVICE T clamp_like_torch(T v, T lo, T hi) {
  return min_propagate_nan(max_propagate_nan(v, lo), hi);
}

// torch.sign: 0 for 0, -0 and NaN.
template <typename T>
ROBUST_OPS_HOST_DEVICE T sign_like_torch(T g) {
  return static_cast<T>(static_cast<int>(T(0) < g) - static_cast<int>(g < T(0)));
}

// Per-sample values (alpha, eps, norms, factors) and the clip bounds come in opmath_t: for float32/float64 that is
// the dtype itself, exactly as the eager chain sees them; for float16/bfloat16 it is float, which keeps ||g|| + 1e-10
// from underflowing to 0 (torchattacks' float16 chain turns a zero gradient into NaN there). The reference differs:
// it keeps alpha, its L2 norms, the L2 eps and factors in float32 but rounds the L-inf eps to the tensor dtype, so an
// L-inf eps the dtype cannot represent (8/255 in float16) clamps at another radius: equal within tolerance, not
// bitwise.
template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// L-inf: clamp(x_nat + clamp(x + alpha*sign(g) - x_nat, -eps, eps), clip_min, clip_max)
template <typename scalar_t>
ROBUST_OPS_HOST_DEVICE scalar_t linf_update(scalar_t x, scalar_t x_nat, scalar_t g, opmath_t<scalar_t> alpha,
                                            opmath_t<scalar_t> eps, opmath_t<scalar_t> clip_min,
                                            opmath_t<scalar_t> clip_max) {
  using op_t = opmath_t<scalar_t>;
  const scalar_t step = static_cast<scalar_t>(alpha * sign_like_torch(static_cast<op_t>(g)));
  const scalar_t stepped = static_cast<scalar_t>(static_cast<op_t>(x) + static_cast<op_t>(step));
  const scalar_t diff = static_cast<scalar_t>(static_cast<op_t>(stepped) - static_cast<op_t>(x_nat));
  const op_t delta = clamp_like_torch(static_cast<op_t>(diff), -eps, eps);
  const scalar_t moved = static_cast<scalar_t>(static_cast<op_t>(x_nat) + delta);
  return static_cast<scalar_t>(clamp_like_torch(static_cast<op_t>(moved), clip_min, clip_max));
}

// L2, first pass: delta = (x + alpha * (g / grad_norm)) - x_nat, where grad_norm already includes the + 1e-10.
template <typename scalar_t>
ROBUST_OPS_HOST_DEVICE scalar_t l2_delta(scalar_t x, scalar_t x_nat, scalar_t g, opmath_t<scalar_t> alpha,
                                         opmath_t<scalar_t> grad_norm) {
  using op_t = opmath_t<scalar_t>;
  const scalar_t unit = static_cast<scalar_t>(static_cast<op_t>(g) / grad_norm);
  const scalar_t step = static_cast<scalar_t>(alpha * static_cast<op_t>(unit));
  const scalar_t stepped = static_cast<scalar_t>(static_cast<op_t>(x) + static_cast<op_t>(step));
  return static_cast<scalar_t>(static_cast<op_t>(stepped) - static_cast<op_t>(x_nat));
}

// L2, second pass: clamp(x_nat + delta * factor, clip_min, clip_max), factor = eps/||delta|| or 1.
template <typename scalar_t>
ROBUST_OPS_HOST_DEVICE scalar_t l2_project(scalar_t delta, scalar_t x_nat, opmath_t<scalar_t> factor,
                                           opmath_t<scalar_t> clip_min, opmath_t<scalar_t> clip_max) {
  using op_t = opmath_t<scalar_t>;
  const scalar_t scaled = static_cast<scalar_t>(static_cast<op_t>(delta) * factor);
  const scalar_t moved = static_cast<scalar_t>(static_cast<op_t>(x_nat) + static_cast<op_t>(scaled));
  return static_cast<scalar_t>(clamp_like_torch(static_cast<op_t>(moved), clip_min, clip_max));
}

// ---------------------------------------------------------------------------------------------------------------------
// Messages spelled as robust_ops/_meta.py spells them (Python reprs), so eager and compiled calls raise the same text.

// repr(float): shortest round-trip digits, fixed notation for 1e-4 <= |v| < 1e16, else d.ddde+XX.
inline std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  std::string sci(buf, res.ptr);  // e.g. "-1.25e-05" or "1e+16"
  const auto epos = sci.find('e');
  const int exponent = std::stoi(sci.substr(epos + 1));
  std::string mantissa = sci.substr(0, epos);
  const bool negative = mantissa[0] == '-';
  if (negative) mantissa.erase(0, 1);
  std::string digits;
  for (char c : mantissa)
    if (c != '.') digits += c;
  std::string out;
  if (exponent >= -4 && exponent < 16) {
    if (exponent < 0) {
      out = "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
    } else if (static_cast<int>(digits.size()) <= exponent + 1) {
      out = digits + std::string(static_cast<size_t>(exponent + 1 - static_cast<int>(digits.size())), '0') + ".0";
    } else {
      out = digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
    }
  } else {
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "") + "e" + (exponent < 0 ? "-" : "+") +
          (std::abs(exponent) < 10 ? "0" : "") + std::to_string(std::abs(exponent));
  }
  return negative ? "-" + out : out;
}

// The checks of robust_ops/_meta.py:check_pgd_step_args, in the same order with the same messages.
inline void check_args(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad, const at::Tensor& alpha,
                       const at::Tensor& eps, double clip_min, double clip_max, std::string_view norm,
                       const std::optional<at::Tensor>& history, int64_t slot) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"x_adv", &x_adv}, {"x_nat", &x_nat},
                         {"grad", &grad}, {"alpha", &alpha}, {"eps", &eps}}) {
    check_given(kOp, name, *t);
  }
  check_floating(kOp, "x_adv", x_adv);
  TORCH_CHECK(x_adv.dim() >= 1, kOp, ": expected x_adv to have a batch dimension, got a 0-D tensor");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"x_nat", &x_nat}, {"grad", &grad}}) {
    TORCH_CHECK(t->sizes() == x_adv.sizes(), kOp, ": expected ", name, " to have the shape of x_adv ",
                py_tuple(x_adv.sizes()), ", got ", py_tuple(t->sizes()));
    TORCH_CHECK(t->scalar_type() == x_adv.scalar_type(), kOp, ": expected ", name, " to have the dtype of x_adv (",
                py_dtype(x_adv.scalar_type()), "), got ", py_dtype(t->scalar_type()));
  }
  const int64_t n = x_adv.size(0);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"alpha", &alpha}, {"eps", &eps}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, kOp, ": expected ", name, " to be a 1-D tensor of ", n,
                " per-sample values, got shape ", py_tuple(t->sizes()));
    check_floating(kOp, name, *t);
  }
  TORCH_CHECK(clip_min <= clip_max, kOp, ": expected clip_min <= clip_max, got clip_min=", py_float(clip_min),
              ", clip_max=", py_float(clip_max));
  TORCH_CHECK(norm == "linf" || norm == "l2", kOp, ": expected norm to be 'linf' or 'l2', got '", norm, "'");
  if (history.has_value()) {
    const at::Tensor& h = *history;
    bool shape_ok = h.dim() == x_adv.dim() + 1;
    for (int64_t d = 0; shape_ok && d < x_adv.dim(); ++d) shape_ok = h.size(d + 1) == x_adv.size(d);
    if (!shape_ok) {
      std::ostringstream expected;
      for (int64_t d = 0; d < x_adv.dim(); ++d) expected << (d ? ", " : "") << x_adv.size(d);
      TORCH_CHECK(false, kOp, ": expected history to have shape [m, ", expected.str(), "], got ", py_tuple(h.sizes()));
    }
    TORCH_CHECK(h.scalar_type() == x_adv.scalar_type(), kOp, ": expected history to have the dtype of x_adv (",
                py_dtype(x_adv.scalar_type()), "), got ", py_dtype(h.scalar_type()));
    TORCH_CHECK(0 <= slot && slot < h.size(0), kOp, ": expected slot in [0, ", h.size(0), ") for a history of ",
                h.size(0), " slots, got ", slot);
  }
  auto same_device = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.device() == x_adv.device(), kOp, ": expected ", name, " on the device of x_adv (", x_adv.device(),
                "), got ", t.device());
  };
  same_device("x_nat", x_nat);
  same_device("grad", grad);
  same_device("alpha", alpha);
  same_device("eps", eps);
  if (history.has_value()) same_device("history", *history);
  check_no_internal_overlap(kOp, "x_adv", x_adv);
  if (history.has_value()) {
    check_no_internal_overlap(kOp, "history", *history);
    // The slot is written after x_adv (Plan::finish): a partial overlap would overwrite part of the step just written.
    TORCH_CHECK(at::get_overlap_status(history->select(0, slot), x_adv) != at::MemOverlapStatus::Partial, kOp,
                ": expected history[", slot, "] to be x_adv itself or apart from it, got a slot that partly overlaps "
                "x_adv; clone() one of them first");
  }
}

// Data-dependent checks (CPU only: on CUDA they would cost a device sync per step), on the values the kernel uses
// (alpha and eps converted to the opmath dtype of x).
inline void check_values(const at::Tensor& alpha, const at::Tensor& eps, at::ScalarType x_type) {
  const at::ScalarType op_type = at::toOpMathType(x_type);
  const at::Tensor a = alpha.to(op_type).to(at::kDouble).contiguous();
  const at::Tensor e = eps.to(op_type).to(at::kDouble).contiguous();
  const double* ap = a.data_ptr<double>();
  const double* ep = e.data_ptr<double>();
  for (int64_t i = 0; i < a.numel(); ++i) {
    TORCH_CHECK(std::isfinite(ap[i]), kOp, ": expected alpha to be finite for every sample, got alpha[", i,
                "]=", py_float(ap[i]));
    TORCH_CHECK(ep[i] >= 0.0, kOp, ": expected eps >= 0 for every sample, got eps[", i, "]=", py_float(ep[i]));
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Host-side preparation shared by the CPU and CUDA kernels: contiguous working tensors, per-sample values in x's
// dtype, the history slot, and (for L2) the per-sample norms computed by ATen exactly as the eager chain does.

inline bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  return at::get_overlap_status(a, b) != at::MemOverlapStatus::No;
}

struct Plan {
  at::Tensor x_adv;      // the caller's tensor
  at::Tensor x;          // contiguous working copy (x_adv itself when contiguous)
  at::Tensor x_nat;      // contiguous, never aliasing x
  at::Tensor grad;       // contiguous, never aliasing x
  at::Tensor alpha;      // [N], opmath dtype of x (x's dtype for float32/float64), contiguous, never aliasing x/slot
  at::Tensor eps;        // [N], likewise
  at::Tensor slot;       // history[slot] (undefined without history)
  at::Tensor slot_out;   // history[slot] when the kernel may write it directly, else undefined
  int64_t n = 0;         // batch size
  int64_t per_sample = 0;  // elements per sample
  int64_t numel = 0;

  // Copy back what the kernel could not write in place.
  void finish() const {
    if (!x.is_same(x_adv)) x_adv.copy_(x);
    // x is x_adv itself when that is contiguous: a strided slot interleaved with it (an overlap ATen cannot judge,
    // so not refused) would read elements of x_adv this copy had already overwritten
    if (slot.defined() && !slot_out.defined()) slot.copy_(overlaps(slot, x) ? x.clone() : x);
  }
};

inline Plan make_plan(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                      const at::Tensor& alpha, const at::Tensor& eps, const std::optional<at::Tensor>& history,
                      int64_t slot) {
  Plan p;  // check_args rejected internal overlap of x_adv and history
  p.x_adv = x_adv;
  p.n = x_adv.size(0);
  p.numel = x_adv.numel();
  p.per_sample = p.n > 0 ? p.numel / p.n : 0;
  p.x = x_adv.is_contiguous() ? x_adv : x_adv.contiguous();
  // The kernel writes x (and, for L2, delta into x) before it has read all of x_nat/grad: never let them alias.
  p.x_nat = overlaps(x_nat, x_adv) ? x_nat.clone(at::MemoryFormat::Contiguous) : x_nat.contiguous();
  p.grad = overlaps(grad, x_adv) ? grad.clone(at::MemoryFormat::Contiguous) : grad.contiguous();
  const at::ScalarType op_type = at::toOpMathType(x_adv.scalar_type());
  // The kernels read alpha[s] / eps[s] per run while writing x and the slot: a view of either (alpha =
  // x_adv.view(-1)[:N]) would be read after earlier samples changed it, so such a view is copied first.
  const at::Tensor written_slot = history.has_value() ? history->select(0, slot) : at::Tensor();
  auto per_sample = [&](const at::Tensor& t) {
    at::Tensor v = t.to(op_type).contiguous();
    const bool aliased = overlaps(v, x_adv) || (written_slot.defined() && overlaps(v, written_slot));
    return aliased ? v.clone() : v;
  };
  p.alpha = per_sample(alpha);
  p.eps = per_sample(eps);
  if (history.has_value()) {
    p.slot = written_slot;
    const bool direct = p.slot.is_contiguous() && !overlaps(p.slot, p.x) && !overlaps(p.slot, p.x_nat) &&
                        !overlaps(p.slot, p.grad);
    if (direct) p.slot_out = p.slot;
  }
  return p;
}

// Per-sample L2 norms in the opmath dtype; for float32/float64 exactly torch.norm(t.reshape(N, -1), p=2, dim=1).
inline at::Tensor sample_norms(const at::Tensor& t, int64_t n) {
  const at::ScalarType op_type = at::toOpMathType(t.scalar_type());
  const std::optional<at::ScalarType> dtype =
      op_type == t.scalar_type() ? std::nullopt : std::optional<at::ScalarType>(op_type);
  return at::linalg_vector_norm(t.reshape({n, -1}), 2, at::IntArrayRef{1}, false, dtype);
}

// ||grad||_2 + 1e-10 per sample, as torch.norm(grad.reshape(N, -1), p=2, dim=1) + 1e-10 (reference / torchattacks).
inline at::Tensor grad_norms(const at::Tensor& grad, int64_t n) { return sample_norms(grad, n) + 1e-10; }

// The delta the first L2 pass wrote (contiguous) laid out as x_adv, as the eager chain's x_adv - x_nat is: ATen
// reduces a norm in stride order, so for an x_adv whose reshape(N, -1) is a strided view (batch innermost) the norm of
// the contiguous delta differs from the eager one in the last bit.
inline at::Tensor delta_in_layout_of(const at::Tensor& x_adv, const at::Tensor& delta) {
  return x_adv.is_contiguous() ? delta : at::empty_like(x_adv).copy_(delta);
}

// Projection factor per sample: min((1/||delta||) * eps, 1), as torchattacks computes eps / delta_norms (a Python
// float divided by a tensor is reciprocal(tensor) * float), and 0 where eps = 0 (torchattacks: 0 * inf = NaN for a
// zero delta). eps: [N] in the opmath dtype.
inline at::Tensor projection_factors(const at::Tensor& delta, const at::Tensor& eps, int64_t n) {
  const at::Tensor delta_norm = sample_norms(delta, n);
  const at::Tensor factor = at::minimum(at::reciprocal(delta_norm) * eps, at::ones_like(delta_norm));
  return at::where(eps == 0, at::zeros_like(factor), factor);
}

}  // namespace pgd_step
}  // namespace robust_ops
