"""Helpers shared by the Triton kernels."""

import contextlib

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from triton.language.extra import libdevice

from .._backend import triton_device_reason, triton_interpreted

# triton.jit decides at import time whether kernels are interpreted (TRITON_INTERPRET=1, tests on CPU).
_INTERPRETED = tl.constexpr(triton_interpreted())


def launch(kernel):
    """The callable to launch a @triton.jit kernel with: wrapped for torch.compile on real GPUs, raw under the
    interpreter (torch.library.wrap_triton rejected interpreted kernels, pytorch#152868; the pinned torch 2.14.1
    hands them back unchanged, so raw is what it returns there too)."""
    return kernel if _INTERPRETED.value else torch.library.wrap_triton(kernel)


def check_launchable(op_name, t):
    """Refuses by name a tensor these kernels cannot run on (CPU without TRITON_INTERPRET=1 at import, meta), the
    reason backend="triton" gives: direct torch.ops.robust_ops.<op>_triton calls reach the launchers unchecked.
    Also fake tensors under the interpreter: torch.compile, torch.export and opcheck run the launcher on them, and an
    interpreted kernel, which runs at once on the data, failed inside triton with 'Attempted to set the storage of a
    tensor on device "meta" to a storage on different device "cpu"'.
    None passes: the schema's Tensor arguments take it, and the launcher's argument checks, which follow, name it
    (reading its device raised an AttributeError that named neither op nor argument)."""
    if t is None:
        return
    reason = triton_device_reason(t.device)
    torch._check(reason is None, lambda: f"{op_name}: {reason}")
    torch._check(
        not (_INTERPRETED.value and is_fake(t)),
        lambda: f"{op_name}: Triton kernels interpreted under TRITON_INTERPRET=1 run eagerly only; torch.compile, "
        "torch.export and opcheck trace with fake tensors, which need the kernels compiled for a CUDA device",
    )


# CUDA's limit on gridDim.x, the programs of a 1-D grid. Triton's launcher takes the grid as C ints: past it the launch
# raised "OverflowError: signed integer is greater than maximum", naming no op or argument.
MAX_PROGRAMS = 2**31 - 1


def per_sample_grid(op_name, name, n, per_sample, block):
    """(blocks_per_sample, grid) of a kernel whose programs each take `block` elements of one sample of `name` (N
    samples of per_sample elements), refused by name, before anything is written, where the grid would pass
    MAX_PROGRAMS (N = 2**31 samples of up to 1024 elements: tensors of a few GiB), as the C++ CUDA pgd_step_ refuses
    its blocks."""
    blocks_per_sample = triton.cdiv(per_sample, block)
    programs = n * blocks_per_sample
    torch._check(
        programs <= MAX_PROGRAMS,
        lambda: f"{op_name}: expected at most {MAX_PROGRAMS} programs (CUDA's limit on a 1-D grid) of {block} elements "
        f"of one sample each, got {programs} for {name} of {n} samples of {per_sample} elements; split the batch",
    )
    return blocks_per_sample, (programs,)


def flat_grid(op_name, name, total, block):
    """The grid of a kernel whose programs each take `block` of the `total` elements of `name`, refused by name where it
    would pass MAX_PROGRAMS (2**31 - 1 programs of 256 elements: 2**39 elements). Called before anything is allocated:
    an expanded tensor of that many elements is a few bytes, and the outputs or checks sized by it failed first in
    the allocator ("can't allocate memory: you tried to allocate 2199023255552 bytes"), naming no op or argument."""
    programs = triton.cdiv(total, block)
    torch._check(
        programs <= MAX_PROGRAMS,
        lambda: f"{op_name}: expected at most {MAX_PROGRAMS} programs (CUDA's limit on a 1-D grid) of {block} elements "
        f"each, got {programs} for {name} of {total} elements; split the batch",
    )
    return (programs,)


def on_device_of(t):
    """Context for a launch on t's device: Triton launches on the current CUDA device and its current stream, not on
    the tensors' device. No-op for CPU tensors (TRITON_INTERPRET=1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def may_overlap(a, b):
    """Whether a and b may share memory (csrc/pgd_step.h `overlaps`: at::get_overlap_status(a, b) != No): views of one
    storage whose element spans intersect. Interleaved views count as overlapping, as ATen's TooHard does."""
    if a.numel() == 0 or b.numel() == 0 or not torch._C._overlaps(a, b):  # _overlaps: the same storage
        return False

    def span(t):
        first = t.storage_offset() * t.element_size()
        last = first + (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()
        return first, last

    (a_first, a_last), (b_first, b_last) = span(a), span(b)
    return a_first < b_last and b_first < a_last


@triton.jit
def mul_rn(a, b):
    """a * b rounded once, never contracted with a following add into an FMA. The eager launches also pass
    enable_fp_fusion=False, but torch.compile launches a wrapped kernel itself and drops that option (torch 2.11 on an
    H200: 1-ulp differences in boundary_search_step_ under torch.compile), so the kernels must not depend on it.
    float32/float64 only; the interpreter computes in numpy, which never fuses.
    float32 as PTX mul.rn.f32 itself: libdevice's __nv_fmul_rn is mul.rn.ftz.f32 under triton's default
    enable_reflect_ftz (also dropped under torch.compile), which flushes subnormal factors and products to zero where
    torch keeps them."""
    if _INTERPRETED:
        return a * b
    elif a.dtype == tl.float32:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return libdevice.mul_rn(a, b)


@triton.jit
def div_rn(a, b):
    """a / b correctly rounded, as torch divides: Triton lowers float32 "/" to div.full.f32 (up to 2 ulp off);
    float64 "/" is already div.rn.f64 (tl.math.div_rn takes float32 only)."""
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b
