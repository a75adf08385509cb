// pgd_step_ on CUDA: one fused pass for L-inf; for L2 two fused passes around the per-sample norms, which
// ATen computes exactly as the eager chain does. The element functions are those of the CPU kernel (csrc/pgd_step.h);
// setup.py compiles with --fmad=false so no FMA changes a bit. alpha finite / eps >= 0 are not checked here: that
// needs a device sync per step (the CPU kernel checks them).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "cuda/cuda_helpers.cuh"
#include "pgd_step.h"

namespace robust_ops {
namespace {

using namespace pgd_step;

// Each block updates kElemsPerBlock consecutive elements of ONE sample, so the per-sample values are read once per
// block and no thread divides a 64-bit index by the sample size.
constexpr int64_t kElemsPerBlock = 4 * cuda::kThreads;

struct SampleChunk {
  int64_t sample, begin, end;  // flat element range [begin, end) inside `sample`
};

__device__ __forceinline__ SampleChunk block_chunk(int64_t per_sample, int64_t blocks_per_sample) {
  const int64_t block = blockIdx.x;
  const int64_t sample = block / blocks_per_sample;
  const int64_t first = (block - sample * blocks_per_sample) * kElemsPerBlock;
  const int64_t last = first + kElemsPerBlock < per_sample ? first + kElemsPerBlock : per_sample;
  return {sample, sample * per_sample + first, sample * per_sample + last};
}

template <typename scalar_t>
__global__ void linf_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x_nat,
                            const scalar_t* __restrict__ g, const opmath_t<scalar_t>* __restrict__ alpha,
                            const opmath_t<scalar_t>* __restrict__ eps, scalar_t* __restrict__ slot,
                            int64_t per_sample, int64_t blocks_per_sample, opmath_t<scalar_t> clip_min,
                            opmath_t<scalar_t> clip_max) {
  const SampleChunk c = block_chunk(per_sample, blocks_per_sample);
  const opmath_t<scalar_t> a = alpha[c.sample];
  const opmath_t<scalar_t> e = eps[c.sample];
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) {
    const scalar_t out = linf_update(x[i], x_nat[i], g[i], a, e, clip_min, clip_max);
    x[i] = out;
    if (slot != nullptr) slot[i] = out;
  }
}

template <typename scalar_t>
__global__ void l2_delta_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x_nat,
                                const scalar_t* __restrict__ g, const opmath_t<scalar_t>* __restrict__ alpha,
                                const opmath_t<scalar_t>* __restrict__ grad_norm, int64_t per_sample,
                                int64_t blocks_per_sample) {
  const SampleChunk c = block_chunk(per_sample, blocks_per_sample);
  const opmath_t<scalar_t> a = alpha[c.sample];
  const opmath_t<scalar_t> gn = grad_norm[c.sample];
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) x[i] = l2_delta(x[i], x_nat[i], g[i], a, gn);
}

template <typename scalar_t>
__global__ void l2_project_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x_nat,
                                  const opmath_t<scalar_t>* __restrict__ factor, scalar_t* __restrict__ slot,
                                  int64_t per_sample, int64_t blocks_per_sample, opmath_t<scalar_t> clip_min,
                                  opmath_t<scalar_t> clip_max) {
  const SampleChunk c = block_chunk(per_sample, blocks_per_sample);
  const opmath_t<scalar_t> f = factor[c.sample];
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) {
    const scalar_t out = l2_project(x[i], x_nat[i], f, clip_min, clip_max);
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
  const int64_t blocks_per_sample = cuda::ceil_div(p.per_sample, kElemsPerBlock);
  const int64_t blocks = p.n * blocks_per_sample;
  // Blocks never straddle two samples, so the limit is on N * ceil(per_sample / kElemsPerBlock), not on the elements.
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), kOp, ": expected at most ",
              std::numeric_limits<int32_t>::max(), " blocks of ", kElemsPerBlock, " elements (one sample's elements ",
              "per block, rounded up) on CUDA, got ", blocks, " for ", p.n, " samples of ", p.per_sample,
              " elements; split the batch");
  const dim3 grid(static_cast<unsigned>(blocks));
  const int64_t ps = p.per_sample;
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
      linf_kernel<scalar_t><<<grid, cuda::kThreads, 0, stream>>>(x, xn, g, a, p.eps.const_data_ptr<op_t>(), out_slot, ps,
                                                                 blocks_per_sample, lo, hi);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const at::Tensor gnorm = grad_norms(grad, p.n).contiguous();
    l2_delta_kernel<scalar_t><<<grid, cuda::kThreads, 0, stream>>>(x, xn, g, a, gnorm.const_data_ptr<op_t>(), ps,
                                                                   blocks_per_sample);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor factors = projection_factors(delta_in_layout_of(x_adv, p.x), p.eps, p.n).contiguous();
    l2_project_kernel<scalar_t><<<grid, cuda::kThreads, 0, stream>>>(x, xn, factors.const_data_ptr<op_t>(), out_slot,
                                                                     ps, blocks_per_sample, lo, hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  p.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_ops, CUDA, m) { m.impl("pgd_step_", &pgd_step_cuda); }

}  // namespace robust_ops
