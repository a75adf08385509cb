"""boundary_search_step_ in Triton, registered as robust_ops::boundary_search_step_triton (same schema apart from the
name). Semantics and rounding: robust_ops.reference.boundary_search_step_ and interpolation_weights.

One program handles BLOCK positions of one sample, so crossed_at / active are loaded once per program and only the two
bracketing tensors are read (masked loads touch no memory). Interior points are rounded like the eager expression
lo * w_lo + hi * w_hi: each product rounded to the dtype, then the sum (float32 opmath for float16/bfloat16), with
products through mul_rn so no FMA changes the last bit (also under torch.compile, which drops the launch's
enable_fp_fusion=False).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._autograd import register_in_place_without_gradient
from .._meta import check_boundary_search_step_args, check_boundary_search_step_values, check_strided
from ._utils import check_launchable, launch, mul_rn, on_device_of, per_sample_grid

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _boundary_search_step_kernel(
    lo_ptr, hi_ptr, points_ptr, crossed_ptr, active_ptr,
    per_sample, total, k, blocks_per_sample,
    HAS_ACTIVE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // blocks_per_sample
    offs = (pid - n * blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    if HAS_ACTIVE:
        mask = mask & (tl.load(active_ptr + n) != 0)
    c = tl.load(crossed_ptr + n)
    idx = n * per_sample + offs
    from_lo = c == 0
    to_hi = c == k - 1
    # The new interval [points[c-1] or lo, points[c] or hi]; the masked loads read only the one that applies.
    a_lo = tl.load(lo_ptr + idx, mask=mask & from_lo, other=0.0)
    a_pt = tl.load(points_ptr + (c - 1) * total + idx, mask=mask & (c != 0), other=0.0)
    a = tl.where(from_lo, a_lo, a_pt)
    b_hi = tl.load(hi_ptr + idx, mask=mask & to_hi, other=0.0)
    b_pt = tl.load(points_ptr + c * total + idx, mask=mask & (c != k - 1), other=0.0)
    b = tl.where(to_hi, b_hi, b_pt)
    tl.store(lo_ptr + idx, a, mask=mask & (c != 0))
    tl.store(hi_ptr + idx, b, mask=mask & (c != k - 1))

    dtype = lo_ptr.dtype.element_ty
    if dtype == tl.float64:
        af = a
        bf = b
    else:
        af = a.to(tl.float32)
        bf = b.to(tl.float32)
    k_f64 = tl.cast(k, tl.float64)
    out_ptr = points_ptr + idx
    for j in range(0, k - 1):
        # w_hi = t, w_lo = 1 - t computed in float64 exactly as the reference's Python floats, then cast to opmath.
        t = tl.cast(j + 1, tl.float64) / k_f64
        w_lo = (1.0 - t).to(af.dtype)
        w_hi = t.to(af.dtype)
        p_lo = mul_rn(af, w_lo).to(dtype)
        p_hi = mul_rn(bf, w_hi).to(dtype)
        tl.store(out_ptr, (p_lo.to(af.dtype) + p_hi.to(af.dtype)).to(dtype), mask=mask)
        out_ptr += total


@torch.library.triton_op("robust_ops::boundary_search_step_triton", mutates_args={"lo", "hi", "points"})
def boundary_search_step_triton(lo: Tensor, hi: Tensor, points: Tensor, crossed_at: Tensor,
                                active: Optional[Tensor]) -> None:
    check_strided("boundary_search_step_triton", ("lo", lo), ("hi", hi), ("points", points), ("crossed_at", crossed_at),
                  ("active", active), kernel="Triton")
    check_launchable("boundary_search_step_triton", lo)
    check_boundary_search_step_args(lo, hi, points, crossed_at, active)
    k = points.shape[0] + 1
    # Out-of-range indices are an error, never clamped. On CPU (the interpreter) the C++ CPU kernel's check, naming the
    # sample; on CUDA an asynchronous one (no host sync), raised at the next sync.
    if crossed_at.device.type == "cpu":
        check_boundary_search_step_values(crossed_at, k)
    else:
        torch._assert_async(
            ((crossed_at >= 0) & (crossed_at <= k - 1)).all(),
            f"boundary_search_step_: expected crossed_at in [0, {k - 1}] (k = {k}), got a value outside that range",
        )
    n = lo.shape[0]
    if lo.numel() == 0:
        return
    per_sample = lo.numel() // n
    total = lo.numel()
    blocks_per_sample, grid = per_sample_grid("boundary_search_step_triton", "lo", n, per_sample, BLOCK)
    lo_c, hi_c, points_c = lo.contiguous(), hi.contiguous(), points.contiguous()
    crossed_c = crossed_at.contiguous()
    active_c = active.contiguous() if active is not None else crossed_c  # never read when HAS_ACTIVE is False
    with on_device_of(lo):
        launch(_boundary_search_step_kernel)[grid](
            lo_c, hi_c, points_c, crossed_c, active_c,
            per_sample, total, k, blocks_per_sample,
            HAS_ACTIVE=active is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    if lo_c is not lo:
        lo.copy_(lo_c)
    if hi_c is not hi:
        hi.copy_(hi_c)
    if points_c is not points:
        points.copy_(points_c)


register_in_place_without_gradient("robust_ops::boundary_search_step_triton")
