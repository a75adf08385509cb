"""Plain-PyTorch reference for every robust_ops op: readable, slow, and the oracle that tests and benchmarks import.

Nothing here is optimized; each function states the exact semantics the native and Triton kernels must reproduce
(see docs/ops/). Shape helpers here are shared with the fake kernels in _meta.py.
"""

import math

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

__all__ = [
    "pool_output_size",
    "drop_max_pool2d",
    "max_pool2d",
    "pgd_step_",
    "boundary_search_step_",
    "interpolation_weights",
    "clip_bounds",
]


# ---------------------------------------------------------------------------------------------------------------------
# Pooling geometry (identical to ATen's pooling_output_shape)


def pool_output_size(size, kernel, stride, pad, dilation, ceil_mode):
    """Output length of one pooled dimension of length ``size`` (``kernel``, ``stride``, ``pad``, ``dilation``,
    ``ceil_mode`` as F.max_pool2d's), exactly as F.max_pool2d computes it (ceil_mode: the last window must start
    inside the input or the left padding), for a valid geometry (pad at most kernel // 2).

    No Python branch on ``size``, which may be symbolic: a SymInt (torch.export, torch.compile, where a branch is a
    guard that fixes the size's parity) or a 0-dim tensor (torch.jit.trace, the TorchScript ONNX exporter, which
    freezes a branch into the trace). ATen's ceil-then-decrement (one fewer window when the last would start in the
    right padding) is the min of the ceil count and the last start inside ``size + pad``; the two agree whenever pad
    <= kernel // 2 (checked for sizes, kernels and strides up to 60, 8 and 8). Until 2026-12-05 the branch made
    ONNX files exported with a dynamic height or width return one row too many or too few at the other parity, and
    torch.export of the default backend with ceil_mode and a dynamic height failed ("Constraints violated").
    """
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    minimum = torch.minimum if isinstance(size, torch.Tensor) else torch.sym_min
    return minimum((span + stride - 1) // stride, (size + pad - 1) // stride) + 1


# ---------------------------------------------------------------------------------------------------------------------
# drop_max_pool2d


def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    """Reference of robust_ops::max_pool2d: ATen's own max pooling, (output, indices) -- the op's definition is to
    match it bit for bit (windows without any input element aside, see functional.max_pool2d)."""
    return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)


def _under_vmap(t):
    """Whether t is batched by torch.func.vmap at some level of its functorch wrappers (under vmap(grad(f)) the
    batched tensor lies beneath grad's)."""
    if torch.compiler.is_compiling():  # fake tensors, and Dynamo cannot trace these queries
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _pool_memory_format(t):
    """The pooling outputs' layout (of the forward from its input, of the backward from the indices), ATen's
    max_pool2d's: channels_last when t is channels_last and not also plain contiguous, and where it is both (one
    channel, or 1 x 1 images) when its strides say so, as Tensor.suggest_memory_format (not under torch.jit.trace,
    whose sizes are tensors that it cannot compare: there such a tensor counts as NCHW)."""
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    if not t.is_contiguous():
        return torch.channels_last
    if torch.jit.is_tracing():
        return torch.contiguous_format
    return _suggested_memory_format(t)


def _suggested_memory_format(t):
    """Tensor.suggest_memory_format of a 4-D tensor t, without its cost for integer sizes and strides: channels_last
    exactly when its strides are channels_last's, size-1 dimensions included (a channels_last-contiguous batch of
    one HWC image, (1, 3, 4, 2) of strides (3, 1, 6, 3), is NCHW to ATen: N's stride is under C * H * W)."""
    if t._has_symbolic_sizes_strides:  # fake tensors of dynamic shapes: torch's DDE-safe rule (~2-30 us a call)
        return suggest_memory_format(t)
    # ATen's is_channels_last_strides_2d (behind suggest_memory_format), unrolled for integer sizes and strides:
    # positive sizes, C's stride positive and each of W, H, N at least the span of the dimensions inside it, and N not
    # where C is (an N x 1 x 1 x 1 tensor of equal strides counts as NCHW).
    (n, c, h, w), (sn, sc, sh, sw) = t.shape, t.stride()
    if n and c and h and w and 0 < sc and sc * c <= sw and sw * w <= sh and sh * h <= sn and sh * h != sc:
        return torch.channels_last
    return torch.contiguous_format


def drop_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    """Reference drop-max pooling on a 4-D (N, C, H, W) tensor; returns (output, indices).

    Per window (windows exactly as F.max_pool2d; padding and positions past the input never count):
      * remove ONE occurrence of the maximum: the first in row-major window order;
      * the output is the largest remaining value, at its first occurrence in row-major window order
        (window [5, 5, 1] gives the second 5);
      * a window with a single valid element returns that element;
      * a window containing NaN returns NaN at its first NaN (NaN propagates, as in max_pool2d);
      * a window holding no input element at all (dilation stepping over a tiny input) returns -inf at index -1.
    indices are flat positions into H*W of the selected element, like max_pool2d's.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    n, c, h, w = input.shape
    oh = pool_output_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    # Pad so every window lies inside: padding on both sides, plus what ceil_mode windows need on the far side, at
    # most stride - 1 (ceil adds at most that to the span); windows() drops the ones past oh, ow. Without ceil_mode
    # the windows lie inside already. A constant, not max(0, need - padded) of the sizes: on symbolic sizes that was
    # a guard (torch.export with a dynamic H or W failed, "Constraints violated") or a branch frozen into a trace.
    extra_h = sh - 1 if ceil_mode else 0
    extra_w = sw - 1 if ceil_mode else 0
    pads = (pw, pw + extra_w, ph, ph + extra_h)

    # Under torch.func.vmap a layout cannot be asked ("NYI: querying is_contiguous inside of vmap"), and none is
    # observable: the NCHW result stands there. Nor set by memory_format ("Tensor.clone(memory_format) inside vmap"),
    # which a batched forward-mode tangent (jacfwd, hessian) meets too: channels_last is made by permuting.
    channels_last = not _under_vmap(input) and _pool_memory_format(input) == torch.channels_last
    positions = torch.arange(h * w, dtype=torch.float64, device=input.device).reshape(1, 1, h, w)
    positions = F.pad(positions, pads, value=-1.0)

    # Sizes spelled out, never -1: an empty batch or channel dimension (n * c = 0) runs this same path, where -1
    # cannot be inferred ("cannot reshape tensor of 0 elements"). A branch on n * c for it was frozen into traces
    # and exports: a program exported with a dynamic batch failed at batch 0.
    def windows(t):  # [P, 1, H', W'] -> [P, K, oh*ow] with K = kh*kw in row-major window order
        cols = F.unfold(t, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
        oh_full = (t.shape[2] - dh * (kh - 1) - 1) // sh + 1
        ow_full = (t.shape[3] - dw * (kw - 1) - 1) // sw + 1
        return cols.reshape(t.shape[0], kh * kw, oh_full, ow_full)[:, :, :oh, :ow].reshape(t.shape[0], kh * kw, oh * ow)

    if channels_last and not torch.jit.is_tracing():
        # The input viewed as NHWC, padded, and its rows as one plane per sample, (n, 1, H', W' * c): unfold with
        # the width's dilation times c gives each channel's windows (a start column every column, c per input column,
        # kept where the stride says). Autograd's input gradient is then channels_last, as ATen's and the kernels'
        # (fold, unfold's backward, fills that plane; flatten + view give canonical strides where a size-1
        # dimension's could be any); through reshape(n * c, 1, h, w) it came back NCHW. Sums in a fixed order
        # (deterministic), with vmap rules (torch.func over the backward). Not under torch.jit.trace, where no
        # gradient is taken. Costs stride-width times the columns: the reference is slow anyway.
        nhwc = F.pad(input.permute(0, 2, 3, 1).flatten().view(n, h, w, c), (0, 0) + pads, value=float("-inf"))
        hp, wp = nhwc.shape[1], nhwc.shape[2]
        cols = F.unfold(nhwc.view(n, 1, hp, wp * c), (kh, kw), dilation=(dh, dw * c), stride=(sh, 1))
        oh_full, starts = (hp - dh * (kh - 1) - 1) // sh + 1, wp - dw * (kw - 1)
        taps = cols.reshape(n, kh * kw, oh_full, starts, c)[:, :, :oh, ::sw][:, :, :, :ow]  # [n, K, oh, ow, c]
        vals = taps.permute(0, 4, 1, 2, 3).reshape(n * c, kh * kw, oh * ow)  # [NC, K, L]
    else:
        vals = windows(F.pad(input.reshape(n * c, 1, h, w), pads, value=float("-inf")))  # [NC, K, L]
    pos = windows(positions).to(torch.int64)  # [1, K, L]
    valid = pos >= 0
    k = vals.shape[1]
    order = torch.arange(k, device=input.device).view(1, k, 1)
    none = k  # "no candidate" sentinel, larger than any window slot

    masked = torch.where(valid, vals, torch.full_like(vals, float("-inf")))
    not_nan = ~torch.isnan(masked)
    best = torch.where(not_nan, masked, torch.full_like(masked, float("-inf"))).amax(1, keepdim=True)
    first_max = torch.where(valid & not_nan & (masked == best), order, none).amin(1, keepdim=True)
    rest = valid & not_nan & (order != first_max)
    second = torch.where(rest, masked, torch.full_like(masked, float("-inf"))).amax(1, keepdim=True)
    first_second = torch.where(rest & (masked == second), order, none).amin(1, keepdim=True)
    chosen = torch.where(first_second == none, first_max, first_second)
    first_nan = torch.where(valid & ~not_nan, order, none).amin(1, keepdim=True)
    chosen = torch.where(first_nan != none, first_nan, chosen)
    empty = chosen == none  # no input element in the window: -inf at index -1
    chosen = torch.where(empty, 0, chosen)

    out = vals.gather(1, chosen).masked_fill(empty, float("-inf")).reshape(n, c, oh, ow)
    idx = pos.expand(n * c, -1, -1).gather(1, chosen).masked_fill(empty, -1).reshape(n, c, oh, ow)
    if channels_last:
        # reshape + view, not contiguous(): that hands an NHWC view that is already contiguous (one channel, 1 x 1
        # images) back with its NCHW strides, where ATen's and the kernels' channels_last outputs have
        # channels_last ones
        out, idx = (t.permute(0, 2, 3, 1).reshape(-1).view(n, oh, ow, c).permute(0, 3, 1, 2) for t in (out, idx))
    return out, idx


# ---------------------------------------------------------------------------------------------------------------------
# pgd_step_


def _per_sample(t, like, dtype=None):
    return t.to(dtype or like.dtype).view((like.shape[0],) + (1,) * (like.dim() - 1))


def opmath_dtype(dtype):
    """The dtype the kernels compute ``dtype``'s elementwise work in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_FLOAT32_MAX = 3.4028234663852886e38


def _round_to_float32(value):
    """``value`` rounded to the nearest float32 (ties to even), as a Python float; beyond float32's range, inf.
    Plain Python arithmetic, so torch.compile(fullgraph=True) folds it (numpy's np.errstate made Dynamo refuse the
    eager chain, and bench_pgd_step lost its torch.compile rows)."""
    value = float(value)
    if value != value or math.isinf(value) or value == 0.0:
        return value
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    if exponent > -125:  # normal: 24 significant bits
        rounded = math.ldexp(round(math.ldexp(mantissa, 24)), exponent - 24)
    else:  # subnormal: multiples of 2**-149
        rounded = math.ldexp(round(math.ldexp(value, 149)), -149)
    # copysign: a negative value that rounds to zero is -0.0, as in float32
    return math.copysign(rounded if abs(rounded) <= _FLOAT32_MAX else math.inf, value)


def clip_bounds(clip_min, clip_max, dtype):
    """``(clip_min, clip_max, opmath)``: the bounds as Python floats rounded to the opmath dtype of ``dtype`` (float64
    for float64, else float32), as the C++ kernels' static_cast rounds them: a bound beyond that dtype's range
    becomes inf (torch.clamp or torch.full with 1e39 for float32 raise "value cannot be converted to type float
    without overflow"). Rounded from Python numbers: no tensor, so no device work and no sync."""
    if opmath_dtype(dtype) == torch.float64:
        return float(clip_min), float(clip_max), torch.float64
    return _round_to_float32(clip_min), _round_to_float32(clip_max), torch.float32


@torch.no_grad()
def pgd_step_(x_adv, x_nat, grad, alpha, eps, clip_min, clip_max, norm, history=None, slot=0):
    """Reference fused PGD step, in place on x_adv (and history[slot] when history is given).

    grad (g): the input gradient; norm: "linf" or "l2"; alpha, eps: per-sample tensors [N]. The expressions and
    their order are those of torchattacks 3.5.1, so results are bitwise equal to torchattacks' PGD / PGDL2 in
    float32:
      linf: x <- clamp(x_nat + clamp(x + alpha*sign(g) - x_nat, -eps, eps), clip_min, clip_max)
      l2:   x <- x + alpha * g / (||g||_2 + 1e-10);  d = x - x_nat;  d <- d * min((1/||d||) * eps, 1);
            x <- clamp(x_nat + d, clip_min, clip_max)          (norms per sample)
    The factor is computed as torchattacks computes `eps / delta_norms` (Python float / tensor is
    reciprocal(tensor) * float), except that eps = 0 gives factor 0 (torchattacks: 0 * inf = NaN for a zero delta).
    A zero gradient leaves a sample where it is (up to the rounding of x_nat + (x - x_nat)); no NaN.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"pgd_step_: expected norm to be 'linf' or 'l2', got {norm!r}")
    if x_adv.numel() == 0:  # nothing to update (and grad.reshape(0, -1) below is ambiguous for an empty batch)
        return
    # alpha in the opmath dtype, as the kernels keep it: rounded to float16 first, an alpha >= 65520 became inf, and
    # inf * sign(0) made NaN of a sample's zero-gradient elements, which the kernels leave in place
    a = _per_sample(alpha, x_adv, dtype=opmath_dtype(x_adv.dtype))
    e = _per_sample(eps, x_adv)
    if norm == "linf":
        stepped = x_adv + (a * grad.sign()).to(x_adv.dtype)
        delta = torch.clamp(stepped - x_nat, min=-e, max=e)
    elif norm == "l2":
        n = x_adv.shape[0]
        # float16/bfloat16: norms and factors in float32; in float16 ||g|| + 1e-10 underflows to 0 (NaN for g = 0).
        norm_dtype = torch.float32 if x_adv.dtype in (torch.float16, torch.bfloat16) else None
        grad_norm = torch.norm(grad.reshape(n, -1), p=2, dim=1, dtype=norm_dtype) + 1e-10
        stepped = x_adv + a * (grad / grad_norm.view_as(a))
        delta = stepped - x_nat
        delta_norm = torch.norm(delta.reshape(n, -1), p=2, dim=1, dtype=norm_dtype)
        eps_flat = eps.to(delta_norm.dtype)
        factor = torch.minimum(delta_norm.reciprocal() * eps_flat, torch.ones_like(delta_norm))
        factor = torch.where(eps_flat == 0, torch.zeros_like(factor), factor)
        delta = delta * factor.view_as(a)
    new = x_nat + delta
    # Clamp in the opmath dtype with the bounds rounded to it (a bound beyond its range to inf), as the kernels do:
    # the same bits as a clamp in the dtype wherever the dtype holds the bound (checked over every float16 and
    # bfloat16 value), where torch.clamp with a Python bound the dtype cannot hold (1e5 in float16, 1e39 in float32)
    # raised "value cannot be converted to type c10::Half without overflow".
    low, high, opmath = clip_bounds(clip_min, clip_max, new.dtype)
    new = torch.clamp(new.to(opmath), min=low, max=high).to(new.dtype)  # Python bounds: a tensor bound is ~4x slower
    x_adv.copy_(new)
    if history is not None:
        history[slot].copy_(new)


# ---------------------------------------------------------------------------------------------------------------------
# boundary_search_step_


def interpolation_weights(k):
    """Weights (w_lo, w_hi) of the k-1 interior points lo*w_lo + hi*w_hi, t = j/k for j = 1..k-1."""
    return [(1.0 - j / k, j / k) for j in range(1, k)]


@torch.no_grad()
def boundary_search_step_(lo, hi, points, crossed_at, active=None):
    """Reference k-ary boundary search round, in place (k = points.shape[0] + 1; k = 2 is bisection).

    points[j] (j = 0..k-2) are the interior points lo + (hi - lo)*(j+1)/k. crossed_at[n] in [0, k-1] is the first
    interior point, in lo -> hi order, found on the far side of the boundary (k-1: none was). For active samples:
      lo <- points[c-1] (lo itself when c = 0);  hi <- points[c] (hi itself when c = k-1)
      points[j] <- lo * (1 - t_j) + hi * t_j with t_j = (j+1)/k, in the tensor's dtype.
    Inactive samples (active[n] False) are left untouched.
    """
    from ._meta import check_boundary_search_step_values  # _meta imports this module

    k = points.shape[0] + 1
    n = lo.shape[0]
    check_boundary_search_step_values(crossed_at, k)
    stacked = torch.cat([lo.unsqueeze(0), points, hi.unsqueeze(0)], 0)  # [k+1, N, ...]
    index = crossed_at.view((1, n) + (1,) * (lo.dim() - 1)).expand((1,) + tuple(lo.shape))
    new_lo = stacked.gather(0, index)[0]
    new_hi = stacked.gather(0, index + 1)[0]
    if active is not None:
        keep = active.view((n,) + (1,) * (lo.dim() - 1))
        new_lo = torch.where(keep, new_lo, lo)
        new_hi = torch.where(keep, new_hi, hi)
    new_points = torch.stack([new_lo * w_lo + new_hi * w_hi for w_lo, w_hi in interpolation_weights(k)], 0)
    if active is not None:
        new_points = torch.where(active.view((1, n) + (1,) * (lo.dim() - 1)), new_points, points)
    lo.copy_(new_lo)
    hi.copy_(new_hi)
    points.copy_(new_points)
