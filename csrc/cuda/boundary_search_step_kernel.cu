// boundary_search_step_ on CUDA. Semantics and rounding: robust_ops/reference.py. Each block handles kTile positions
// of one sample (grid-stride over (sample, tile) pairs), so crossed_at / active are read once per tile and only the
// two bracketing tensors are loaded. Interior points are lo * w_lo + hi * w_hi with explicitly rounded multiplies and
// adds (__fmul_rn / __fadd_rn: never contracted into an FMA), both products rounded to the dtype like the eager
// expression (opmath float for float16 / bfloat16).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "boundary_search_step_checks.h"
#include "cuda/cuda_helpers.cuh"

namespace robust_ops {
namespace {

constexpr int kThreads = cuda::kThreads;
constexpr int kItemsPerThread = 4;
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kItemsPerThread;

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename scalar_t>
__global__ void boundary_search_step_kernel(scalar_t* __restrict__ lo, scalar_t* __restrict__ hi,
                                            scalar_t* __restrict__ points, const int64_t* __restrict__ crossed_at,
                                            const bool* __restrict__ active, int64_t n, int64_t per_sample,
                                            int64_t k) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t total = n * per_sample;
  const int64_t tiles_per_sample = (per_sample + kTile - 1) / kTile;
  const int64_t num_tiles = n * tiles_per_sample;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t s = tile / tiles_per_sample;
    const int64_t c = crossed_at[s];
    // Every sample's index is checked, active or not, as on CPU.
    CUDA_KERNEL_ASSERT_PRINTF(c >= 0 && c <= k - 1,
                              "boundary_search_step_: expected crossed_at in [0, %lld], got %lld for sample %lld",
                              static_cast<long long>(k - 1), static_cast<long long>(c), static_cast<long long>(s));
    if (active != nullptr && !active[s]) continue;
    const scalar_t* src_lo = c == 0 ? lo : points + (c - 1) * total;
    const scalar_t* src_hi = c == k - 1 ? hi : points + c * total;
    const int64_t begin = s * per_sample + (tile - s * tiles_per_sample) * kTile;
    const int64_t sample_end = (s + 1) * per_sample;
    const int64_t end = begin + kTile < sample_end ? begin + kTile : sample_end;
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      // Both ends are loaded before any store: they may be points that are overwritten below.
      const scalar_t a = src_lo[i];
      const scalar_t b = src_hi[i];
      if (c != 0) lo[i] = a;
      if (c != k - 1) hi[i] = b;
      const opmath_t af = static_cast<opmath_t>(a);
      const opmath_t bf = static_cast<opmath_t>(b);
      for (int64_t j = 0; j < k - 1; ++j) {
        // t and 1 - t in double, exactly like the reference's Python floats, then cast to opmath.
        const double t = static_cast<double>(j + 1) / static_cast<double>(k);
        const opmath_t w_lo = static_cast<opmath_t>(1.0 - t);
        const opmath_t w_hi = static_cast<opmath_t>(t);
        const scalar_t p_lo = static_cast<scalar_t>(mul_rn(af, w_lo));
        const scalar_t p_hi = static_cast<scalar_t>(mul_rn(bf, w_hi));
        points[j * total + i] =
            static_cast<scalar_t>(add_rn(static_cast<opmath_t>(p_lo), static_cast<opmath_t>(p_hi)));
      }
    }
  }
}

void boundary_search_step_cuda(at::Tensor& lo, at::Tensor& hi, at::Tensor& points, const at::Tensor& crossed_at,
                               const std::optional<at::Tensor>& active) {
  check_boundary_search_step_args(lo, hi, points, crossed_at, active);
  TORCH_INTERNAL_ASSERT(lo.is_cuda());
  const c10::cuda::CUDAGuard guard(lo.device());
  const int64_t k = points.size(0) + 1;
  const int64_t n = lo.size(0);
  if (lo.numel() == 0) {
    // No tile runs, so the kernel's per-sample check would not either: an asynchronous one (no host sync), as the
    // Triton launcher; CPU checks on the host.
    if (n > 0) {
      const std::string message = "boundary_search_step_: expected crossed_at in [0, " + std::to_string(k - 1) +
                                  "] (k = " + std::to_string(k) + "), got a value outside that range";
      at::_assert_async(at::logical_and(crossed_at >= 0, crossed_at <= k - 1).all(), message);
    }
    return;
  }
  const int64_t per_sample = lo.numel() / n;

  at::Tensor lo_c = lo.contiguous();
  at::Tensor hi_c = hi.contiguous();
  at::Tensor points_c = points.contiguous();
  const at::Tensor crossed = crossed_at.contiguous();
  at::Tensor active_c;
  if (active.has_value()) active_c = active->contiguous();

  const int64_t num_tiles = n * ((per_sample + kTile - 1) / kTile);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(num_tiles, 65535)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lo.scalar_type(), "boundary_search_step_cuda", [&] {
    boundary_search_step_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        lo_c.data_ptr<scalar_t>(), hi_c.data_ptr<scalar_t>(), points_c.data_ptr<scalar_t>(),
        crossed.data_ptr<int64_t>(), active.has_value() ? active_c.data_ptr<bool>() : nullptr, n, per_sample, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  if (!lo_c.is_same(lo)) lo.copy_(lo_c);
  if (!hi_c.is_same(hi)) hi.copy_(hi_c);
  if (!points_c.is_same(points)) points.copy_(points_c);
}

}  // namespace

TORCH_LIBRARY_IMPL(robust_ops, CUDA, m) { m.impl("boundary_search_step_", &boundary_search_step_cuda); }

}  // namespace robust_ops
