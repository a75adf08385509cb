"""pgd_step_ in Triton, registered as robust_ops::pgd_step_triton (same schema as the C++ op apart from the name).
Semantics and rounding: robust_ops.reference.pgd_step_ (torchattacks 3.5.1's PGD / PGDL2 expressions).

One program handles BLOCK elements of one sample, so alpha / eps / the L2 factors are loaded once per program.
L-inf is one pass (reads x_adv, x_nat, grad; writes x_adv and the history slot). L2 takes the per-sample norms from
torch.linalg.vector_norm, exactly as the eager chain computes them, around two fused passes. Every intermediate is
rounded to the storage dtype like the eager op producing it (float32 opmath for float16/bfloat16, whose per-sample
values stay in float32 so ||g|| + 1e-10 cannot underflow), with products that feed an add through mul_rn so no FMA
changes a bit, also under torch.compile (the L-inf step's alpha * sign is exact and needs none), and the L2
normalization through div_rn (IEEE division, as torch divides).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._autograd import register_in_place_without_gradient
from .._meta import check_pgd_step_args, check_pgd_step_values, check_strided
from ..reference import clip_bounds, opmath_dtype
from ._utils import check_launchable, div_rn, launch, may_overlap, mul_rn, on_device_of, per_sample_grid

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _clamp(v, lo, hi):
    # torch.clamp / std::min(std::max(v, lo), hi): a NaN in v survives.
    v = tl.where(v < lo, lo, v)
    return tl.where(hi < v, hi, v)


@triton.jit
def _sample_block(per_sample, blocks_per_sample, BLOCK: tl.constexpr):
    """This program's sample n and its block of flat element indices (blocks never straddle two samples)."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // blocks_per_sample
    offs = (pid - n * blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    return n, n * per_sample + offs, offs < per_sample


@triton.jit
def _linf_kernel(
    x_ptr, x_nat_ptr, grad_ptr, alpha_ptr, eps_ptr, bounds_ptr, hist_ptr,
    per_sample, blocks_per_sample, hist_offset,
    HAS_HISTORY: tl.constexpr, BLOCK: tl.constexpr,
):
    n, idx, mask = _sample_block(per_sample, blocks_per_sample, BLOCK)
    alpha = tl.load(alpha_ptr + n)
    eps = tl.load(eps_ptr + n)
    clip_min = tl.load(bounds_ptr)
    clip_max = tl.load(bounds_ptr + 1)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    x_nat = tl.load(x_nat_ptr + idx, mask=mask, other=0.0)
    g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(alpha.dtype)
    dtype = x.dtype
    sign = (g > 0).to(alpha.dtype) - (g < 0).to(alpha.dtype)
    step = (alpha * sign).to(dtype)
    stepped = (x.to(alpha.dtype) + step.to(alpha.dtype)).to(dtype)
    diff = (stepped.to(alpha.dtype) - x_nat.to(alpha.dtype)).to(dtype)
    # eps * -1.0, not -eps: Triton 3.6 (torch 2.11's) negates as 0 - eps, +0.0 for eps = 0 where torch's -eps is
    # -0.0, and the clamp returns that bound (its sign reaches x_adv when x_nat is -0.0).
    delta = _clamp(diff.to(alpha.dtype), eps * -1.0, eps)
    moved = (x_nat.to(alpha.dtype) + delta).to(dtype)
    out = _clamp(moved.to(alpha.dtype), clip_min, clip_max).to(dtype)
    tl.store(x_ptr + idx, out, mask=mask)
    if HAS_HISTORY:
        tl.store(hist_ptr + hist_offset + idx, out, mask=mask)


@triton.jit
def _l2_delta_kernel(
    x_ptr, x_nat_ptr, grad_ptr, alpha_ptr, grad_norm_ptr, delta_ptr,
    per_sample, blocks_per_sample,
    BLOCK: tl.constexpr,
):
    n, idx, mask = _sample_block(per_sample, blocks_per_sample, BLOCK)
    alpha = tl.load(alpha_ptr + n)
    grad_norm = tl.load(grad_norm_ptr + n)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    x_nat = tl.load(x_nat_ptr + idx, mask=mask, other=0.0)
    g = tl.load(grad_ptr + idx, mask=mask, other=0.0)
    dtype = x.dtype
    unit = div_rn(g.to(alpha.dtype), grad_norm).to(dtype)
    step = mul_rn(alpha, unit.to(alpha.dtype)).to(dtype)
    stepped = (x.to(alpha.dtype) + step.to(alpha.dtype)).to(dtype)
    delta = (stepped.to(alpha.dtype) - x_nat.to(alpha.dtype)).to(dtype)
    tl.store(delta_ptr + idx, delta, mask=mask)


@triton.jit
def _l2_project_kernel(
    x_ptr, x_nat_ptr, delta_ptr, factor_ptr, bounds_ptr, hist_ptr,
    per_sample, blocks_per_sample, hist_offset,
    HAS_HISTORY: tl.constexpr, BLOCK: tl.constexpr,
):
    n, idx, mask = _sample_block(per_sample, blocks_per_sample, BLOCK)
    factor = tl.load(factor_ptr + n)
    clip_min = tl.load(bounds_ptr)
    clip_max = tl.load(bounds_ptr + 1)
    delta = tl.load(delta_ptr + idx, mask=mask, other=0.0)
    x_nat = tl.load(x_nat_ptr + idx, mask=mask, other=0.0)
    dtype = delta.dtype
    scaled = mul_rn(delta.to(factor.dtype), factor).to(dtype)
    moved = (x_nat.to(factor.dtype) + scaled.to(factor.dtype)).to(dtype)
    out = _clamp(moved.to(factor.dtype), clip_min, clip_max).to(dtype)
    tl.store(x_ptr + idx, out, mask=mask)
    if HAS_HISTORY:
        tl.store(hist_ptr + hist_offset + idx, out, mask=mask)


def _sample_norms(t, n):
    """Per-sample L2 norms as torch.norm(t.reshape(N, -1), p=2, dim=1) computes them (opmath dtype)."""
    op_dtype = opmath_dtype(t.dtype)
    return torch.linalg.vector_norm(t.reshape(n, -1), 2, dim=1, dtype=None if op_dtype == t.dtype else op_dtype)


@torch.library.triton_op("robust_ops::pgd_step_triton", mutates_args={"x_adv", "history"})
def pgd_step_triton(
    x_adv: Tensor, x_nat: Tensor, grad: Tensor, alpha: Tensor, eps: Tensor, clip_min: float, clip_max: float,
    norm: str, history: Optional[Tensor], slot: int,
) -> None:
    check_strided("pgd_step_triton", ("x_adv", x_adv), ("x_nat", x_nat), ("grad", grad), ("alpha", alpha), ("eps", eps),
                  ("history", history), kernel="Triton")
    check_launchable("pgd_step_triton", x_adv)
    check_pgd_step_args(x_adv, x_nat, grad, alpha, eps, clip_min, clip_max, norm, history, slot)
    op_dtype = opmath_dtype(x_adv.dtype)
    alpha_c = alpha.to(op_dtype).contiguous()
    eps_c = eps.to(op_dtype).contiguous()
    if x_adv.device.type == "cpu":  # interpreter, real tensors (check_launchable): the C++ CPU kernel's checks
        check_pgd_step_values(alpha, eps, x_adv.dtype)
    n = x_adv.shape[0]
    if x_adv.numel() == 0:
        return
    per_sample = x_adv.numel() // n
    blocks_per_sample, grid = per_sample_grid("pgd_step_triton", "x_adv", n, per_sample, BLOCK)
    x = x_adv.contiguous()
    # As the C++ kernels: programs write x before others have read x_nat / grad, and the history slot before others
    # have read the inputs, so nothing written may share memory with what is read (x_adv = buf[1:] with
    # x_nat = buf[:-1] read values already stepped).
    x_nat_c = x_nat.clone(memory_format=torch.contiguous_format) if may_overlap(x_nat, x_adv) else x_nat.contiguous()
    grad_c = grad.clone(memory_format=torch.contiguous_format) if may_overlap(grad, x_adv) else grad.contiguous()
    # Programs load alpha[n] / eps[n] after others wrote x or the slot: a view of either (alpha = x_adv.view(-1)[:N])
    # is copied first.
    written = [x_adv] + ([history[slot]] if history is not None else [])
    alpha_c, eps_c = (v.clone() if any(may_overlap(v, w) for w in written) else v for v in (alpha_c, eps_c))
    # Filled on the device (no host sync every step, which the CUDA kernel avoids), rounded to op_dtype as the C++
    # kernels do: a bound beyond its range is inf (clip_max=1e39 for float32 used to raise in torch.full).
    low, high, _ = clip_bounds(clip_min, clip_max, x_adv.dtype)
    bounds = torch.full((2,), low, dtype=op_dtype, device=x_adv.device)
    bounds[1:].fill_(high)
    direct_history = history is not None and history.is_contiguous() and not any(
        may_overlap(history[slot], t) for t in (x, x_nat_c, grad_c)
    )
    hist = history if direct_history else x  # never written when HAS_HISTORY is False
    hist_offset = slot * x_adv.numel() if direct_history else 0
    with on_device_of(x_adv):
        if norm == "linf":
            launch(_linf_kernel)[grid](
                x, x_nat_c, grad_c, alpha_c, eps_c, bounds, hist,
                per_sample, blocks_per_sample, hist_offset,
                HAS_HISTORY=direct_history, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
            )
        else:
            # delta goes to its own buffer, so x_nat or grad may alias x_adv.
            grad_norm = (_sample_norms(grad, n) + 1e-10).contiguous()
            delta = torch.empty_like(x)
            launch(_l2_delta_kernel)[grid](
                x, x_nat_c, grad_c, alpha_c, grad_norm, delta,
                per_sample, blocks_per_sample,
                BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
            )
            # min((1/||delta||) * eps, 1) as torchattacks computes eps / delta_norms; 0 where eps = 0 (no 0 * inf).
            # The norm of delta laid out as the eager chain's (TensorIterator follows x_adv's layout): ATen reduces in
            # stride order, so a batch-innermost x_adv summed the contiguous copy in another order (last bit off).
            delta_eager = delta if x is x_adv else torch.empty_like(x_adv).copy_(delta)
            factor = torch.minimum(_sample_norms(delta_eager, n).reciprocal() * eps_c, torch.ones_like(eps_c))
            factor = torch.where(eps_c == 0, torch.zeros_like(factor), factor).contiguous()
            launch(_l2_project_kernel)[grid](
                x, x_nat_c, delta, factor, bounds, hist,
                per_sample, blocks_per_sample, hist_offset,
                HAS_HISTORY=direct_history, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
            )
    if x is not x_adv:
        x_adv.copy_(x)
    if history is not None and not direct_history:
        # x is x_adv itself when that is contiguous: a slot interleaved with it (views ATen's overlap check cannot
        # judge, so not refused) would read elements of x_adv the copy had already overwritten
        history[slot].copy_(x.clone() if may_overlap(history[slot], x) else x)


register_in_place_without_gradient("robust_ops::pgd_step_triton")
