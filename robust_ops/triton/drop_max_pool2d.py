"""Triton drop-max pooling: robust_ops::drop_max_pool2d_triton and robust_ops::_drop_max_pool2d_backward_triton.

Same schema and semantics as the C++ op (robust_ops.reference.drop_max_pool2d): per window the first occurrence of
the largest value left after removing the first occurrence of the maximum (row-major window order); a single valid
element selects itself; a window holding NaN selects its first NaN. The kernels index through the tensors' strides,
so NCHW, channels_last and any other layout run without copies; outputs keep the input's memory format.

Forward: one lane per output element, the window unrolled at compile time (kernel size is a constexpr).
Comparisons and gradient sums run in ACC: float64 for float64 tensors, float32 otherwise (float16/bfloat16 are
compared in float32 and their gradients accumulate in a float32 buffer).
Backward: scatter-add of grad_output to the selected positions with atomics (windows overlap). The backward op's
schema carries no window geometry, so a gather formulation is not possible; the atomic order of an element's
contributions (at most ceil(k*gcd(s, d)/s) along each dimension) changes its sum in the last bits between
runs (more where gradients of both signs cancel). On CUDA it therefore raises
under torch.use_deterministic_algorithms(True) (warns with warn_only=True), as the CUDA kernel and ATen's max_pool2d
backward do.
"""

from typing import List, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._prims_common import alert_not_deterministic  # torch's Python twin of alertNotDeterministic

from .._autograd import register_drop_max_autograd
from .._meta import (
    check_drop_max_pool2d_args, check_drop_max_pool2d_backward_args, check_strided, pool_memory_format,
)
from ._utils import check_launchable, flat_grid, launch, on_device_of

FORWARD_SCHEMA = (
    "(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) "
    "-> (Tensor, Tensor)"
)
# input_size is SymInt[] as in the native schema: int[] would make torch.compile guard on (and recompile for) every
# batch size of the backward.
BACKWARD_SCHEMA = "(Tensor grad_output, Tensor indices, SymInt[] input_size) -> Tensor"
# torch.library.triton_op of torch 2.11 (seen on a GPU machine) and earlier ignores `schema` and infers one from the
# annotations (int[2] -> SymInt[], which only loses the scalar broadcast that robust_ops.drop_max_pool2d already
# does before calling the op); torch 2.14 uses it.
BLOCK = 256


def _acc_dtype(dtype):
    """Kernel compute type: float64 keeps its precision (float32 would merge close values into ties and round
    gradient sums); the half types compute in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _unravel_nchw(offs, C, OH, OW):
    """(n, c, oh, ow) of flat row-major output positions."""
    ow = offs % OW
    t = offs // OW
    oh = t % OH
    t = t // OH
    return t // C, t % C, oh, ow


@triton.jit
def _drop_max_pool2d_fwd_kernel(
    x_ptr, out_ptr, idx_ptr, total, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, oh, ow = _unravel_nchw(offs, C, OH, OW)
    hs = oh * SH - PH
    ws = ow * SW - PW
    base = n * sxn + c * sxc
    a1 = tl.zeros([BLOCK], dtype=ACC)
    a2 = tl.zeros([BLOCK], dtype=ACC)
    t1 = tl.full([BLOCK], -1, tl.int64)
    t2 = tl.full([BLOCK], -1, tl.int64)
    first_nan = tl.full([BLOCK], -1, tl.int64)
    for ki in tl.static_range(KH):
        h = hs + ki * DH
        for kj in tl.static_range(KW):
            w = ws + kj * DW
            valid = mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            v = tl.load(x_ptr + base + h * sxh + w * sxw, mask=valid, other=0.0).to(ACC)
            pos = h * W + w
            is_nan = v != v
            ok = valid & (is_nan == 0)
            gt1 = ok & ((t1 < 0) | (v > a1))
            gt2 = ok & (gt1 == 0) & ((t2 < 0) | (v > a2))
            a2 = tl.where(gt1, a1, tl.where(gt2, v, a2))
            t2 = tl.where(gt1, t1, tl.where(gt2, pos, t2))
            a1 = tl.where(gt1, v, a1)
            t1 = tl.where(gt1, pos, t1)
            first_nan = tl.where(valid & is_nan & (first_nan < 0), pos, first_nan)
    sel = tl.where(first_nan >= 0, first_nan, tl.where(t2 >= 0, t2, t1))
    found = mask & (sel >= 0)
    # Re-read the selected element: exact in the input dtype, NaN payload included.
    value = tl.load(x_ptr + base + (sel // W) * sxh + (sel % W) * sxw, mask=found, other=float("-inf"))
    o = n * son + c * soc + oh * soh + ow * sow
    tl.store(out_ptr + o, value, mask=mask)
    tl.store(idx_ptr + o, sel, mask=mask)


@triton.jit
def _drop_max_pool2d_bwd_kernel(
    go_ptr, idx_ptr, gi_ptr, total, C, OH, OW, HW, W,
    sgn, sgc, sgh, sgw, sin, sic, sih, siw, sxn, sxc, sxh, sxw,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, oh, ow = _unravel_nchw(offs, C, OH, OW)
    sel = tl.load(idx_ptr + n * sin + c * sic + oh * sih + ow * siw, mask=mask, other=-1)
    g = tl.load(go_ptr + n * sgn + c * sgc + oh * sgh + ow * sgw, mask=mask, other=0.0).to(ACC)
    ok = mask & (sel >= 0) & (sel < HW)  # -1: a window without input elements (output -inf), no gradient
    tl.atomic_add(gi_ptr + n * sxn + c * sxc + (sel // W) * sxh + (sel % W) * sxw, g, mask=ok)


@torch.library.triton_op("robust_ops::drop_max_pool2d_triton", mutates_args=(), schema=FORWARD_SCHEMA)
def drop_max_pool2d_triton(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                           dilation: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    check_strided("drop_max_pool2d_triton", ("input", input), kernel="Triton")
    check_launchable("drop_max_pool2d_triton", input)
    oh, ow = check_drop_max_pool2d_args(input, kernel_size, stride, padding, dilation, ceil_mode)
    n, c, h, w = input.shape
    total = n * c * oh * ow
    grid = flat_grid("drop_max_pool2d_triton", "the output", total, BLOCK)
    fmt = pool_memory_format(input)
    out = torch.empty((n, c, oh, ow), dtype=input.dtype, device=input.device, memory_format=fmt)
    idx = torch.empty((n, c, oh, ow), dtype=torch.int64, device=input.device, memory_format=fmt)
    if total == 0:
        return out, idx
    with on_device_of(input):
        launch(_drop_max_pool2d_fwd_kernel)[grid](
            input, out, idx, total, c, h, w, oh, ow,
            *input.stride(), *out.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=kernel_size[0], KW=kernel_size[1], ACC=_acc_dtype(input.dtype), BLOCK=BLOCK,
        )
    return out, idx


@torch.library.triton_op("robust_ops::_drop_max_pool2d_backward_triton", mutates_args=(), schema=BACKWARD_SCHEMA)
def drop_max_pool2d_backward_triton(grad_output: Tensor, indices: Tensor, input_size: List[int]) -> Tensor:
    check_strided("_drop_max_pool2d_backward_triton", ("grad_output", grad_output), ("indices", indices),
                  kernel="Triton")
    check_launchable("_drop_max_pool2d_backward_triton", grad_output)
    check_drop_max_pool2d_backward_args(grad_output, indices, input_size)
    if grad_output.is_cuda:  # float atomics: run-to-run sums differ (the CPU interpreter runs programs in order)
        alert_not_deterministic("_drop_max_pool2d_backward_triton")
    total = grad_output.numel()
    grid = flat_grid("_drop_max_pool2d_backward_triton", "grad_output", total, BLOCK)
    fmt = pool_memory_format(indices)
    # Accumulation buffer for the atomics: float64 for float64, else float32; the grad_input itself unless half.
    acc_dtype = torch.float64 if grad_output.dtype == torch.float64 else torch.float32
    acc = torch.empty(tuple(input_size), dtype=acc_dtype, device=grad_output.device, memory_format=fmt).zero_()
    h, w = input_size[2], input_size[3]
    # An index outside the input is an error, as in the C++ kernels, never skipped: an asynchronous check (no host
    # sync), raised at the next sync on CUDA and at once on CPU. -1 marks a window without input elements.
    torch._assert_async(
        ((indices >= -1) & (indices < h * w)).all(),
        f"_drop_max_pool2d_backward: expected indices in [0, {h * w}) (flat positions into H*W = {h}*{w}) or -1 (a "
        "window without input elements), got an index out of range",
    )
    if total > 0:
        n, c, oh, ow = grad_output.shape
        with on_device_of(grad_output):
            launch(_drop_max_pool2d_bwd_kernel)[grid](
                grad_output, indices, acc, total, c, oh, ow, h * w, w,
                *grad_output.stride(), *indices.stride(), *acc.stride(),
                ACC=_acc_dtype(grad_output.dtype), BLOCK=BLOCK,
            )
    return acc if grad_output.dtype == acc_dtype else acc.to(grad_output.dtype)


register_drop_max_autograd("robust_ops::drop_max_pool2d_triton", "robust_ops::_drop_max_pool2d_backward_triton")
