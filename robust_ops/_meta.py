"""Fake (meta) kernels for every C++ op: shapes and argument checks only, never data.

The messages are the same as the C++ TORCH_CHECKs (csrc/*.h), so a user sees one error whether the op runs eagerly
or under torch.compile. The check_* functions are also the Triton launchers' checks (device and overlap included).
"""

import math

import torch

from . import reference
from .reference import opmath_dtype, pool_output_size

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_floating(op, arg, t):
    # Plain Python, the RuntimeError torch._check raised: a dtype is never symbolic, and torch._check imports torch.fx's
    # symbolic shapes (sympy) at its first call, which the eager drop_max_pool2d and pgd_step_ wrappers run (measured:
    # the first DropMax2d forward of a process 0.83 s and 33.6 MB of resident memory, the next 0.03 s). Dynamo traces
    # it as it traced torch._check (the message is built only on failure: a closure holding a tensor broke
    # torch.compile(fullgraph=True) of pgd_step_ with a tensor alpha/eps).
    if t.dtype not in FLOATING:
        raise RuntimeError(f"{op}: expected {arg} to be a floating-point tensor (float16, bfloat16, float32, float64), "
                           f"got {t.dtype}")


def check_same_device(op, arg, t, ref_arg, ref):
    """csrc/checks.h check_same_device: a kernel launched for ref's device would read t's memory as its own."""
    torch._check(
        t.device == ref.device,
        lambda: f"{op}: expected {arg} on the device of {ref_arg} ({ref.device}), got {t.device}",
    )


def check_no_internal_overlap(op, arg, t):
    """A tensor written in place must not have internal overlap (an expanded tensor): checked before any write, so a
    rejected call changes nothing. Contains ATen's assert_no_internal_overlap text; same check in csrc/checks.h."""
    torch._check(
        torch._debug_has_internal_overlap(t) != 1,  # 1 = MemOverlap::Yes; 2 (TooHard) passes, as in ATen
        lambda: f"{op}: expected {arg} without internal overlap (more than one element of the written-to tensor "
        "refers to a single memory location); clone() it first",
    )


def _non_overlapping_and_dense(t):
    """ATen's is_non_overlapping_and_dense: some order of the dimensions (size-1 ones ignored) is contiguous."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def shares_memory(a, b):
    """ATen's get_overlap_status(a, b) is Full or Partial: one tensor passed twice (whatever its layout or size, as
    ATen checks that first), or dense views of one storage whose bytes intersect. Fake and meta tensors have no
    addresses and pass, as do distinct views that are not dense (ATen's TooHard)."""
    from torch._subclasses.fake_tensor import is_fake

    if a is b:
        return True
    if a.numel() == 0 or b.numel() == 0 or a.device.type == "meta" or is_fake(a) or is_fake(b):
        return False
    if not (_non_overlapping_and_dense(a) and _non_overlapping_and_dense(b)) or not torch._C._overlaps(a, b):
        return False
    a_begin, b_begin = a.data_ptr(), b.data_ptr()
    a_end, b_end = a_begin + a.numel() * a.element_size(), b_begin + b.numel() * b.element_size()
    return a_begin < b_end and b_begin < a_end


def partly_overlaps(a, b):
    """ATen's get_overlap_status(a, b) == Partial (csrc/pgd_step.h check_args): views of one storage whose bytes
    intersect without being the same elements (the same span with other strides counts as partial)."""
    if not shares_memory(a, b):
        return False
    same_span = a.data_ptr() == b.data_ptr() and a.numel() * a.element_size() == b.numel() * b.element_size()
    return not same_span or a.stride() != b.stride()


def output_memory_format(input):
    """Eval-batch-norm-backward outputs (and IMA's records) keep channels_last when the input is channels_last (and not
    also plain contiguous); pooling goes by pool_memory_format."""
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def pool_memory_format(t):
    """The drop-max / max pooling layout (csrc/drop_max_pool2d.h pool_channels_last), ATen's max_pool2d's, of the
    forward's outputs from its input and of the backward's grad_input from the indices (so the input's, whatever
    grad_output's): the reference's rule, robust_ops.reference._pool_memory_format."""
    return reference._pool_memory_format(t)


def check_tensors_given(op, *named):
    """The schema's Tensor (not Tensor?) arguments take None too (eager, as an undefined tensor): named first, as
    csrc/checks.h check_given does, rather than an AttributeError here or a shape of (0,) and "Unimplemented scalar
    type" there. ``named``: (name, value) pairs."""
    for name, t in named:
        torch._check(t is not None, lambda name=name: f"{op}: expected {name} to be a tensor, got None")


def check_strided(op, *named, kernel=None):
    """Refuses by name a tensor argument that is not strided (sparse, mkldnn), as robust_ops.drop_max_pool2d does its
    input: the kernels read raw strided memory, and such a tensor got the dispatcher's many-line "Could not run
    'robust_ops::pgd_step_' with arguments from the 'SparseCPU' backend" (native), torch's "Cannot access storage of
    SparseTensorImpl" or "unsupported memory format option Contiguous" (Triton) or passed pgd_step's overlap check as
    "x_adv without internal overlap", naming neither op nor argument. ``named``: (name, tensor or None) pairs;
    ``kernel``: the kernel the message says there is none of (default ``op``: "no pgd_step_ kernel", the Triton
    launchers' "no Triton kernel")."""
    for name, t in named:
        if t is not None and t.layout != torch.strided:
            raise RuntimeError(f"{op}: expected {name} to be a strided (dense) tensor, got {t.layout}; there is no "
                               f"{kernel or op} kernel for it: convert with .to_dense()")


def check_pool_geometry(op, kernel_size, stride, padding, dilation, given=None):
    """The checks that need no input (pairs of ints, as _pool_args makes them): also DropMax2d's at construction.
    ``given``: the arguments as the caller wrote them (``stride=0``, not the pair ``(0, 0)``), shown in the messages
    instead of the pairs; the ops' schemas see only the pairs. Plain Python (torch._check's RuntimeError): it runs on
    every eager pooling forward, where a torch._check call costs ~1.5 us."""
    pairs = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)

    def shown(name):
        return given[name] if given is not None else tuple(pairs[name])

    for name in ("kernel_size", "stride", "dilation"):
        value = pairs[name]
        if not (len(value) == 2 and value[0] > 0 and value[1] > 0):
            raise RuntimeError(f"{op}: expected {name} to be two positive integers, got {shown(name)}")
    if not (len(padding) == 2 and padding[0] >= 0 and padding[1] >= 0):
        raise RuntimeError(f"{op}: expected padding to be two non-negative integers, got {shown('padding')}")
    # F.max_pool2d's limit (its arguments are C ints): larger values overflowed the int64 window arithmetic
    for name, value in pairs.items():
        if not (value[0] < 2**31 and value[1] < 2**31):
            raise RuntimeError(f"{op}: expected {name} below 2**31 as in F.max_pool2d, got {shown(name)}")
    if not (padding[0] <= kernel_size[0] // 2 and padding[1] <= kernel_size[1] // 2):
        raise RuntimeError(f"{op}: expected padding to be at most half of kernel_size, got padding={shown('padding')} "
                           f"for kernel_size={shown('kernel_size')}")


def check_drop_max_pool2d_args(input, kernel_size, stride, padding, dilation, ceil_mode, op="drop_max_pool2d"):
    """Checks shared by the fake kernels of drop_max_pool2d and max_pool2d (``op`` names the caller); the C++ kernel
    makes the same checks with the same messages. Returns the output spatial size (oh, ow)."""
    check_tensors_given(op, ("input", input))
    _check_floating(op, "input", input)
    torch._check(input.dim() == 4, lambda: f"{op}: expected input to be 4-D (N, C, H, W), got {input.dim()}-D")
    check_pool_geometry(op, kernel_size, stride, padding, dilation)
    h, w = input.shape[2], input.shape[3]
    torch._check(h > 0 and w > 0, lambda: f"{op}: expected input with non-zero height and width, got {h}x{w}")
    if op == "max_pool2d":  # ATen's max_pool2d refuses C = 0 (N = 0 is fine); drop_max_pool2d returns empty
        torch._check(
            input.shape[1] > 0,
            lambda: f"{op}: expected input with non-zero channels, as F.max_pool2d, got {tuple(input.shape)}",
        )
    oh = pool_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = pool_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    torch._check(
        oh > 0 and ow > 0,
        lambda: f"{op}: expected kernel_size {tuple(kernel_size)} with dilation {tuple(dilation)} to fit the padded "
        f"input {h + 2 * padding[0]}x{w + 2 * padding[1]}, got output size {oh}x{ow}",
    )
    return oh, ow


def _pool2d_fake(op, input, kernel_size, stride, padding, dilation, ceil_mode):
    oh, ow = check_drop_max_pool2d_args(input, kernel_size, stride, padding, dilation, ceil_mode, op)
    shape = (input.shape[0], input.shape[1], oh, ow)
    fmt = pool_memory_format(input)
    out = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    idx = torch.empty(shape, dtype=torch.int64, device=input.device, memory_format=fmt)
    return out, idx


@torch.library.register_fake("robust_ops::drop_max_pool2d")
def _drop_max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    return _pool2d_fake("drop_max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode)


@torch.library.register_fake("robust_ops::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    return _pool2d_fake("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode)


def check_drop_max_pool2d_backward_args(grad_output, indices, input_size):
    """Checks of the backward op, shared by the fake and the Triton kernel; the C++ kernels say the same."""
    op = "_drop_max_pool2d_backward"
    check_tensors_given(op, ("grad_output", grad_output), ("indices", indices))
    torch._check(
        indices.dtype == torch.int64, lambda: f"{op}: expected indices to be int64, got {indices.dtype}"
    )
    torch._check(
        grad_output.shape == indices.shape,
        lambda: f"{op}: expected grad_output to have the shape of indices {tuple(indices.shape)}, "
        f"got {tuple(grad_output.shape)}",
    )
    _check_floating(op, "grad_output", grad_output)
    torch._check(
        grad_output.dim() == 4,
        lambda: f"{op}: expected grad_output to be 4-D (N, C, H_out, W_out), got {grad_output.dim()}-D",
    )
    torch._check(
        len(input_size) == 4 and input_size[0] == grad_output.shape[0] and input_size[1] == grad_output.shape[1]
        and input_size[2] > 0 and input_size[3] > 0,
        lambda: f"{op}: expected input_size to be (N, C, H, W) = ({grad_output.shape[0]}, {grad_output.shape[1]}, "
        f"H, W) with H, W > 0, got {tuple(input_size)}",
    )
    check_same_device(op, "indices", indices, "grad_output", grad_output)


@torch.library.register_fake("robust_ops::_drop_max_pool2d_backward")
def _drop_max_pool2d_backward_fake(grad_output, indices, input_size):
    check_drop_max_pool2d_backward_args(grad_output, indices, input_size)
    return torch.empty(
        tuple(input_size), dtype=grad_output.dtype, device=grad_output.device,
        memory_format=pool_memory_format(indices),
    )


@torch.library.register_fake("robust_ops::_eval_batch_norm_backward")
def _eval_batch_norm_backward_fake(grad_output, invstd, weight):
    op = "_eval_batch_norm_backward"
    check_tensors_given(op, ("grad_output", grad_output), ("invstd", invstd))  # it returned a gradient for invstd None
    torch._check(
        grad_output.dtype in (torch.float32, torch.float64),
        lambda: f"{op}: expected grad_output to be float32 or float64, got {grad_output.dtype}",
    )
    torch._check(grad_output.dim() >= 2, lambda: f"{op}: expected grad_output to be (N, C, ...), got "
                 f"{grad_output.dim()}-D")
    c = grad_output.shape[1]
    for name, t in (("invstd", invstd), ("weight", weight)):
        if t is not None:
            torch._check(t.dtype == grad_output.dtype, lambda t=t, name=name: f"{op}: expected {name} to have the "
                         f"dtype of grad_output ({grad_output.dtype}), got {t.dtype}")
            torch._check(t.dim() == 1 and t.shape[0] == c,
                         lambda t=t, name=name: f"{op}: expected {name} of shape ({c},), got {tuple(t.shape)}")
            # A meta invstd with a CPU grad_output dispatches here (Meta outranks CPU): returning an empty CPU
            # tensor handed the caller uninitialized memory as a gradient.
            check_same_device(op, name, t, "grad_output", grad_output)
    return torch.empty(grad_output.shape, dtype=grad_output.dtype, device=grad_output.device,
                       memory_format=output_memory_format(grad_output))


def check_pgd_step_norm(norm):
    """pgd_step_'s norm, "linf" or "l2" (csrc/pgd_step.h check_args, with its message). Also robust_ops.pgd_step_'s,
    before any backend: the schema refused a norm that is not a string (None) with its own "robust_ops::pgd_step_()
    Expected a value of type 'str' for argument 'norm' but instead found type 'NoneType'." on the native and Triton
    backends. Plain Python, as _check_floating: it runs on every eager call. A string first: an array's comparison
    with the names raised numpy's "The truth value of an array with more than one element is ambiguous"."""
    if not isinstance(norm, str) or norm not in ("linf", "l2"):
        raise RuntimeError(f"pgd_step_: expected norm to be 'linf' or 'l2', got {norm!r}")


def check_pgd_step_args(x_adv, x_nat, grad, alpha, eps, clip_min, clip_max, norm, history, slot):
    op = "pgd_step_"
    check_tensors_given(op, ("x_adv", x_adv), ("x_nat", x_nat), ("grad", grad), ("alpha", alpha), ("eps", eps))
    _check_floating(op, "x_adv", x_adv)
    torch._check(x_adv.dim() >= 1, lambda: f"{op}: expected x_adv to have a batch dimension, got a 0-D tensor")
    for name, t in (("x_nat", x_nat), ("grad", grad)):
        torch._check(
            t.shape == x_adv.shape,
            lambda name=name, t=t: f"{op}: expected {name} to have the shape of x_adv {tuple(x_adv.shape)}, "
            f"got {tuple(t.shape)}",
        )
        torch._check(
            t.dtype == x_adv.dtype,
            lambda name=name, t=t: f"{op}: expected {name} to have the dtype of x_adv ({x_adv.dtype}), got {t.dtype}",
        )
    n = x_adv.shape[0]
    for name, t in (("alpha", alpha), ("eps", eps)):
        torch._check(
            t.dim() == 1 and t.shape[0] == n,
            lambda name=name, t=t: f"{op}: expected {name} to be a 1-D tensor of {n} per-sample values, "
            f"got shape {tuple(t.shape)}",
        )
        _check_floating(op, name, t)
    torch._check(
        clip_min <= clip_max,
        lambda: f"{op}: expected clip_min <= clip_max, got clip_min={clip_min}, clip_max={clip_max}",
    )
    check_pgd_step_norm(norm)
    if history is not None:
        torch._check(
            history.dim() == x_adv.dim() + 1 and history.shape[1:] == x_adv.shape,
            lambda: f"{op}: expected history to have shape [m, {', '.join(str(s) for s in x_adv.shape)}], "
            f"got {tuple(history.shape)}",
        )
        torch._check(
            history.dtype == x_adv.dtype,
            lambda: f"{op}: expected history to have the dtype of x_adv ({x_adv.dtype}), got {history.dtype}",
        )
        torch._check(
            0 <= slot < history.shape[0],
            lambda: f"{op}: expected slot in [0, {history.shape[0]}) for a history of {history.shape[0]} slots, "
            f"got {slot}",
        )
    for name, t in (("x_nat", x_nat), ("grad", grad), ("alpha", alpha), ("eps", eps), ("history", history)):
        if t is not None:
            check_same_device(op, name, t, "x_adv", x_adv)
    check_no_internal_overlap(op, "x_adv", x_adv)
    if history is not None:
        check_no_internal_overlap(op, "history", history)
        # the slot is written after x_adv: a partial overlap would overwrite part of the step just written
        torch._check(
            not partly_overlaps(history[slot], x_adv),
            lambda: f"{op}: expected history[{slot}] to be x_adv itself or apart from it, got a slot that partly "
            "overlaps x_adv; clone() one of them first",
        )


def check_pgd_step_values(alpha, eps, x_dtype):
    """csrc/pgd_step.h check_values, with its messages: alpha finite and eps >= 0 for every sample, on the values the
    kernels use (converted to the opmath dtype of x_adv). Reads the values on the host: for CPU tensors only (the
    Triton launcher under the interpreter and backend="reference"); on CUDA it would cost a sync per step."""
    op_dtype = opmath_dtype(x_dtype)
    alphas, epss = alpha.to(op_dtype).tolist(), eps.to(op_dtype).tolist()
    for i, (a, e) in enumerate(zip(alphas, epss)):
        torch._check(
            math.isfinite(a),
            lambda i=i, a=a: f"pgd_step_: expected alpha to be finite for every sample, got alpha[{i}]={a!r}",
        )
        torch._check(e >= 0.0, lambda i=i, e=e: f"pgd_step_: expected eps >= 0 for every sample, got eps[{i}]={e!r}")


@torch.library.register_fake("robust_ops::pgd_step_")
def _pgd_step_fake(x_adv, x_nat, grad, alpha, eps, clip_min, clip_max, norm, history, slot):
    check_pgd_step_args(x_adv, x_nat, grad, alpha, eps, clip_min, clip_max, norm, history, slot)
    return None


def check_boundary_search_step_args(lo, hi, points, crossed_at, active):
    op = "boundary_search_step_"
    check_tensors_given(op, ("lo", lo), ("hi", hi), ("points", points), ("crossed_at", crossed_at))
    _check_floating(op, "lo", lo)
    torch._check(lo.dim() >= 1, lambda: f"{op}: expected lo to have a batch dimension, got a 0-D tensor")
    torch._check(
        hi.shape == lo.shape and hi.dtype == lo.dtype,
        lambda: f"{op}: expected hi to have the shape and dtype of lo ({tuple(lo.shape)}, {lo.dtype}), "
        f"got ({tuple(hi.shape)}, {hi.dtype})",
    )
    torch._check(
        points.dim() == lo.dim() + 1 and points.shape[1:] == lo.shape and points.shape[0] >= 1
        and points.dtype == lo.dtype,
        lambda: f"{op}: expected points to be [k-1, {', '.join(str(s) for s in lo.shape)}] with k >= 2 and the "
        f"dtype of lo, got {tuple(points.shape)} {points.dtype}",
    )
    n = lo.shape[0]
    torch._check(
        crossed_at.dtype == torch.int64 and crossed_at.dim() == 1 and crossed_at.shape[0] == n,
        lambda: f"{op}: expected crossed_at to be an int64 tensor of shape [{n}], "
        f"got {crossed_at.dtype} {tuple(crossed_at.shape)}",
    )
    if active is not None:
        torch._check(
            active.dtype == torch.bool and active.dim() == 1 and active.shape[0] == n,
            lambda: f"{op}: expected active to be a bool tensor of shape [{n}], "
            f"got {active.dtype} {tuple(active.shape)}",
        )
    for name, t in (("hi", hi), ("points", points), ("crossed_at", crossed_at), ("active", active)):
        if t is not None:
            check_same_device(op, name, t, "lo", lo)
    written = (("lo", lo), ("hi", hi), ("points", points))
    for name, t in written:
        check_no_internal_overlap(op, name, t)
    # csrc/boundary_search_step_checks.h: two written tensors sharing memory have no single result
    for i, (name, t) in enumerate(written):
        for other_name, other in written[i + 1:]:
            torch._check(
                not shares_memory(t, other),
                lambda name=name, other_name=other_name: f"{op}: expected {name} and {other_name} not to share memory "
                "(both are written in place); clone() one of them first",
            )


def check_boundary_search_step_values(crossed_at, k):
    """csrc/cpu/boundary_search_step_kernel.cpp's value check, with its message and ValueError: every sample's
    crossed_at in [0, k-1], active or not, the first one outside named. Reads the values on the host: for the
    reference backend (a sync on CUDA, as the reference syncs anyway) and the Triton launcher on CPU (the interpreter);
    the CUDA kernels check asynchronously. Meta tensors have no values to check. Until 2026-12-07 the reference said
    only "expected crossed_at in [0, 3]" and the interpreted Triton launcher "got a value outside that range"."""
    if crossed_at.numel() == 0 or crossed_at.device.type == "meta":
        return
    if int(crossed_at.min()) < 0 or int(crossed_at.max()) > k - 1:
        sample = int(((crossed_at < 0) | (crossed_at > k - 1)).nonzero()[0, 0])
        raise ValueError(f"boundary_search_step_: expected crossed_at in [0, {k - 1}] (k = {k}), got "
                         f"{int(crossed_at[sample])} for sample {sample}")


@torch.library.register_fake("robust_ops::boundary_search_step_")
def _boundary_search_step_fake(lo, hi, points, crossed_at, active):
    check_boundary_search_step_args(lo, hi, points, crossed_at, active)
    return None
