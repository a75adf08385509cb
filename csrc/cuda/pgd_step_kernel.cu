// pgd_step_ on CUDA: one fused grid-stride pass for L-inf; for L2 two fused passes around the per-sample norms, which
// ATen computes exactly as the eager chain does. The element functions are those of the CPU kernel (csrc/pgd_step.h);
// setup.py compiles with --fmad=false so no FMA changes a bit. alpha finite / eps >= 0 are not checked here: that
// needs a device sync per step (the CPU kernel checks them).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_helpers.cuh"
#include "pgd_step.h"

namespace robust_ops {
namespace {

using namespace pgd_step;

template <typename scalar_t>
__global__ void linf_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x_nat,
                            const scalar_t* __restrict__ g, const opmath_t<scalar_t>* __restrict__ alpha,
                            const opmath_t<scalar_t>* __restrict__ eps, scalar_t* __restrict__ slot, int64_t numel,
                            int64_t per_sample, opmath_t<scalar_t> clip_min, opmath_t<scalar_t> clip_max) {
  ROBUST_OPS_KERNEL_LOOP(i, numel) {
    const int64_t s = i / per_sample;
    const scalar_t out = linf_update(x[i], x_nat[i], g[i], alpha[s], eps[s], clip_min, clip_max);
    x[i] = out;
    if (slot != nullptr) slot[i] = out;
  }
}

template <typename scalar_t>
__global__ void l2_delta_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x_nat,
                                const scalar_t* __restrict__ g, const opmath_t<scalar_t>* __restrict__ alpha,
                                const opmath_t<scalar_t>* __restrict__ grad_norm, int64_t numel, int64_t per_sample) {
  ROBUST_OPS_KERNEL_LOOP(i, numel) {
    const int64_t s = i / per_sample;
    x[i] = l2_delta(x[i], x_nat[i], g[i], alpha[s], grad_norm[s]);
  }
}

template <typename scalar_t>
__global__ void l2_project_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x_nat,
                                  const opmath_t<scalar_t>* __restrict__ factor, scalar_t* __restrict__ slot,
                                  int64_t numel, int64_t per_sample, opmath_t<scalar_t> clip_min,
                                  opmath_t<scalar_t> clip_max) {
  ROBUST_OPS_KERNEL_LOOP(i, numel) {
    const int64_t s = i / per_sample;
    const scalar_t out = l2_project(x[i], x_nat[i], factor[s], clip_min, clip_max);
    x[i] = out;
    if (slot != nullptr) slot[i] = out;
  }
}

void pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad, const at::Tensor& alpha,
                   const at::Tensor& eps, double clip_min, double clip_max, c10::string_view norm,
                   const std::optional<at::Tensor>& history, int64_t slot) {
  const std::string_view norm_name(norm.data(), norm.size());
  check_args(x_adv, x_nat, grad, alpha, eps, clip_min, clip_max, norm_name, history, slot);
  TORCH_INTERNAL_ASSERT(x_adv.device().is_cuda());
  if (x_adv.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(x_adv.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const Plan p = make_plan(x_adv, x_nat, grad, alpha, eps, history, slot);
  const bool l2 = norm_name == "l2";
  const dim3 grid = cuda::grid_for(p.numel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cuda", [&] {
    using op_t = opmath_t<scalar_t>;
    scalar_t* x = p.x.data_ptr<scalar_t>();
    const scalar_t* xn = p.x_nat.const_data_ptr<scalar_t>();
    const scalar_t* g = p.grad.const_data_ptr<scalar_t>();
    scalar_t* out_slot = p.slot_out.defined() ? p.slot_out.data_ptr<scalar_t>() : nullptr;
    const op_t* a = p.alpha.const_data_ptr<op_t>();
    const op_t lo = static_cast<op_t>(clip_min);
    const op_t hi = static_cast<op_t>(clip_max);
    if (!l2) {
      linf_kernel<scalar_t><<<grid, cuda::kThreads, 0, stream>>>(x, xn, g, a, p.eps.const_data_ptr<op_t>(), out_slot,
                                                                 p.numel, p.per_sample, lo, hi);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const at::Tensor gnorm = grad_norms(grad, p.n).contiguous();
    l2_delta_kernel<scalar_t><<<grid, cuda::kThreads, 0, stream>>>(x, xn, g, a, gnorm.const_data_ptr<op_t>(),
                                                                   p.numel, p.per_sample);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor factors = projection_factors(p.x, p.eps, p.n).contiguous();
    l2_project_kernel<scalar_t><<<grid, cuda::kThreads, 0, stream>>>(x, xn, factors.const_data_ptr<op_t>(), out_slot,
                                                                     p.numel, p.per_sample, lo, hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  p.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_ops, CUDA, m) { m.impl("pgd_step_", &pgd_step_cuda); }

}  // namespace robust_ops
