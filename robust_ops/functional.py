"""Public functional API of the robust_ops kernels. Semantics: docs/ops/; the oracle: robust_ops.reference."""

import numbers
import operator

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from . import _autograd, _backend, reference
from ._compile import capturing
from ._meta import _check_floating, check_pgd_step_norm, check_pool_geometry, check_strided

__all__ = ["drop_max_pool2d", "max_pool2d", "pgd_step_", "boundary_search_step_"]


def _is_int(value):
    # F.max_pool2d also takes one-element integer tensors (nn.MaxPool2d(torch.tensor(2))): refused here, such a
    # model ran outside attacks and failed inside them, where native_layers runs its pooling on max_pool2d
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not (value.is_floating_point() or value.is_complex())
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)  # ints, numpy integers and 0-D integer arrays
    except TypeError:
        return False
    return True


def _pair(name, value, op="drop_max_pool2d"):
    if _is_int(value):
        return [int(value), int(value)]
    if isinstance(value, (tuple, list)) and len(value) in (1, 2) and all(_is_int(v) for v in value):
        return [int(value[0]), int(value[-1])]
    raise TypeError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r}")


def _bool(op, name, value):
    """A flag as F.max_pool2d takes it: a bool, never coerced (bool("False") is True)."""
    if isinstance(value, bool):
        return value
    raise TypeError(f"{op}: expected {name} to be a bool, got {value!r}")


def _pool_args(op, kernel_size, stride, padding, dilation, always_check=False):
    """The pairs of ints the ops take, checked here so that a refusal shows the value as written: the op saw
    stride=0 as (0, 0) and said "got (0, 0)" (nn.MaxPool2d says "stride should not be zero"). Eager only unless
    ``always_check`` (DropMax2d's construction): under torch.compile the fake kernel's check (the pairs) keeps
    Dynamo's TorchRuntimeError, as docs/ops/drop_max_pool2d.md says."""
    kernel = _pair("kernel_size", kernel_size, op)
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        stride, given_stride = kernel, kernel_size
    else:
        stride, given_stride = _pair("stride", stride, op), stride
    pairs = kernel, stride, _pair("padding", padding, op), _pair("dilation", dilation, op)
    given = dict(kernel_size=kernel_size, stride=given_stride, padding=padding, dilation=dilation)
    if always_check or not capturing():
        check_pool_geometry(op, *pairs, given=given)
    return pairs


def _check_tensor(op, name, value, optional=False):
    """A tensor argument (or None where optional), refused by name before any backend runs: backend="reference"
    failed on a list with an AttributeError naming neither op nor argument, the ops' schemas with their own text."""
    if not (isinstance(value, torch.Tensor) or (optional and value is None)):
        kind = "a tensor or None" if optional else "a tensor"
        raise TypeError(f"{op}: expected {name} to be {kind}, got {type(value).__name__}")


def _refuse_vmap(op, *named):
    """The in-place ops have no batching rule: under torch.func.vmap each backend failed in its own words, naming no
    argument (native: "Batching rule not implemented for robust_ops::pgd_step_; the fallback path doesn't work on out=
    or view ops", Triton the same for robust_ops::pgd_step_triton, the reference "Batching rule not implemented for
    aten::_debug_has_internal_overlap" or torch's in-place refusal). One refusal on every backend, before anything is
    written. ``named``: (name, value) pairs (alpha and eps may be numbers)."""
    # Outside every torch.func transform (no functorch level: ~0.03 us) nothing is asked; the walk over a tensor's
    # wrappers cost ~3 us a call. Not while compiling, where Dynamo cannot trace these queries.
    if torch._C._functorch.maybe_current_level() is None or torch.compiler.is_compiling():
        return
    for name, t in named:
        if isinstance(t, torch.Tensor) and reference._under_vmap(t):
            raise RuntimeError(f"{op}: expected {name} outside torch.func.vmap, got a tensor vmapped over; the op has "
                               "no batching rule and works per sample already: fold the vmapped dimension into the "
                               "batch (N) dimension and call it once")


def _functorch_autodiff(x):
    """Which differentiating transform sees x, if any: the native/Triton ops' autograd (torch.library.register_autograd)
    has no forward-mode formula, so a jvp/forward_ad tangent would be dropped silently (zero), and torch.func.grad
    refuses the generated autograd.Function ("it must override the setup_context staticmethod")."""
    if torch.compiler.is_compiling():  # fake tensors; the transforms are dynamo's business there
        return None
    functorch = torch._C._functorch
    # Every level of wrappers: under grad(vmap(f)) x is the batched wrapper and the differentiating level lies
    # beneath it. unpack_dual has no batching rule, so it sees only the levels that are not batched.
    while True:
        batched = functorch.is_batchedtensor(x)
        if not batched and fwAD.unpack_dual(x).tangent is not None:
            return "forward-mode AD (torch.func.jvp, torch.autograd.forward_ad)"
        if functorch.is_gradtrackingtensor(x):
            return "torch.func.grad/vjp/jacrev"
        if not functorch.is_functorch_wrapped_tensor(x):
            return None
        x = functorch.get_unwrapped(x)


def _as_batch(input):
    """(a batch of the pooling input, whether it was one (C, H, W) input). ATen pools a (C, H, W) input into a
    contiguous output whatever its strides: an HWC image viewed as CHW (permute(2, 0, 1)) is channels_last once
    unsqueezed, and pooled HWC-strided. flatten + view, not unsqueeze: contiguous() keeps the strides of size-1
    dimensions, so a 1 x 1 HWC image viewed as CHW, C x 1 x 1 of strides (1, C, C), stayed channels_last once
    unsqueezed (strides (C, 1, C, C)) and, padded, pooled into a non-contiguous output."""
    unbatched = input.dim() == 3
    return (input.contiguous().flatten().view((1,) + tuple(input.shape)) if unbatched else input), unbatched


def _in_atens_layout(x):
    """x, or x copied into the layout F.max_pool2d pools it in (ATen's suggest_memory_format), where the pooling
    ops' own rule (channels_last exactly when x is channels_last-contiguous and not plain contiguous, else NCHW)
    parts from it: a channel slice of a channels_last tensor pools into channels_last there, and a
    channels_last-contiguous batch of one HWC image, (1, 3, 4, 2) of strides (3, 1, 6, 3), into NCHW (ATen's rule
    also reads size-1 dimensions' strides: N's stride is under C * H * W). The ops then give ATen's output, indices
    and input gradient strides (a copy's gradient passes through as the op makes it). Inputs the ops already pool
    in ATen's layout are not copied (the CUDA and Triton kernels take any strides); the check costs ~0.5 us for a
    channels_last input, nothing for a contiguous one. Under vmap the layout cannot be asked (torch: "NYI: querying
    is_contiguous inside of vmap for memory_format other than torch.contiguous_format"), nor set ("Tensor.clone(
    memory_format) inside vmap"), also under vmap(grad(f)), where the batched tensor lies beneath grad's; the ops'
    batching rules take any strides. Nor under torch.jit.trace, whose sizes are tensors: the integer rule's
    comparisons warned and torch's suggest_memory_format failed ("Expected bool, got <class 'torch.Tensor'>"); the
    ops' rule stands there."""
    if (x.is_contiguous() or torch._C._functorch.is_batchedtensor(x) or reference._under_vmap(x)
            or torch.jit.is_tracing()):
        return x
    if not x.is_contiguous(memory_format=torch.channels_last):
        channels_last = reference._suggested_memory_format(x) == torch.channels_last
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x
    # channels_last-contiguous: the two rules part only where a dimension has size 1 (its stride is free)
    if 1 in x.shape and reference._suggested_memory_format(x) == torch.contiguous_format:
        return x.contiguous()
    return x


# The fewest channels with which _one_hwc_image_pooled_as_is pools a batch of one HWC image as it is, per dtype.
_HWC_AS_IS_MIN_CHANNELS = {torch.float32: 24, torch.float64: 16}


def _one_hwc_image_pooled_as_is(x, which):
    """Whether the native CPU kernel pools x as it is, its outputs then made NCHW, where _in_atens_layout would copy
    the whole input: a batch of one HWC image (1 x C x H x W, channels_last-contiguous and not plain contiguous),
    which ATen reads as NCHW and the ops' rule as channels_last. Its channels_last kernel, whose lanes are the
    channels, and a copy of the (smaller) outputs beat the input's copy and the NCHW kernel where there are many
    channels (1 x 32 x 32 x 32, kernel 3 stride 2, one core: drop_max_pool2d ~40 us a call against ~48 us, 2026-12-07;
    values and indices are the same, bit for bit, as both kernels select by window order). Only where no gradient is
    recorded: the op's backward takes the indices' layout, which would give the input gradient channels_last strides
    where ATen's are NCHW. Not under torch.func transforms (no layout is asked there) or while capturing a graph;
    torch.jit.trace is asked before the sizes, which are tensors there: their comparisons warned on every trace
    (TracerWarning "Converting a tensor to a Python boolean"), after is_contiguous(), which answers for most inputs at
    less cost (~0.05 us, ~0.2 us). Only for float32 with C >= 24 and float64 with C >= 16 (_HWC_AS_IS_MIN_CHANNELS):
    elsewhere the copy with the NCHW kernel is as fast or faster, so it stays (an RGB image 1 x 3 x 224 x 224, kernel 3
    stride 2, one core: ~0.51 ms a call as is against ~0.09 ms). Measured 2026-12-07 under the AVX2 and AVX-512 caps
    alike (1 x C x S x S, kernel 3 stride 2, one thread, as-is time / copied time, S = 32 and 112): float32 C = 3-12
    1.2-1.6, 15-17 1.0-1.3, 20 0.98-1.03, 24 0.77-0.93, 32 0.67-0.81, 40-64 0.61-0.71; float64 (vector paths since that
    day) C = 15 0.87-1.06, 16 0.75-0.91, 17-24 0.56-1.0, 32 0.69-0.76; float16 and bfloat16 1.0-1.6 up to C = 24,
    0.77-1.0 at 32: copied. C = 16 float32, as is until then (~41 against ~61 us when the rule was set), was level to
    1.10 by then, the copy's kernel faster."""
    # the cheap tests first; the channels_last query after the transforms' (vmap cannot answer it)
    return (which == "native" and x.dim() == 4 and not x.is_contiguous() and not torch.jit.is_tracing()
            and x.shape[0] == 1 and x.shape[1] >= _HWC_AS_IS_MIN_CHANNELS.get(x.dtype, float("inf"))
            and not (x.requires_grad and torch.is_grad_enabled())
            and torch._C._functorch.maybe_current_level() is None and not capturing() and x.device.type == "cpu"
            and x.is_contiguous(memory_format=torch.channels_last)
            and reference._suggested_memory_format(x) == torch.contiguous_format)


def _as_nchw(t):
    """t with NCHW strides, size-1 dimensions' included (contiguous() keeps a view that is contiguous already, e.g. a
    1 x C x 1 x 1 channels_last output of strides (C, 1, C, C), where ATen's are (C, 1, 1, 1))."""
    return t.reshape(-1).view(t.shape)


def drop_max_pool2d(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False, *, backend=None
):
    r"""Drop-max pooling (MIRST-DM, Sun et al., MICCAI 2022): a drop-in for :func:`torch.nn.functional.max_pool2d`
    that outputs, per window, the largest value left after removing ONE occurrence of the window maximum.

    Windows are exactly those of ``F.max_pool2d`` (padding counts as -inf and is never selected; dilation; ceil_mode).
    Ties: the removed maximum is its first occurrence in row-major window order, and the output is the first
    occurrence of the largest remaining value (window ``[5, 5, 1]`` gives 5, from the second position). A window
    with a single valid element returns that element. A window holding NaN returns NaN (at its first NaN), as
    max_pool2d propagates NaN. The backward pass routes each output gradient to the selected element.

    Args:
        input (Tensor[N, C, H, W] or Tensor[C, H, W]): float16, bfloat16, float32 or float64; NCHW or channels_last.
        kernel_size (int or (int, int)): window size.
        stride (int or (int, int), optional): window stride. Default: ``kernel_size``.
        padding (int or (int, int)): implicit -inf padding on both sides, at most ``kernel_size // 2``. Default: 0.
        dilation (int or (int, int)): spacing between window elements. Default: 1.
        ceil_mode (bool): use ceil instead of floor for the output size, as in max_pool2d. Default: False.
        return_indices (bool): also return the flat ``H * W`` index of each selected element. Default: False.
        backend (str, optional): "auto", "native", "triton" or "reference"; default ``$ROBUST_OPS_BACKEND`` or
            "auto" (see docs/backends.md).

    Shape:
        - input: ``(N, C, H, W)`` or ``(C, H, W)``
        - output and indices: ``(N, C, H_out, W_out)`` or ``(C, H_out, W_out)`` with max_pool2d's formula.
          The output, indices and input gradient take F.max_pool2d's strides (docs/ops/drop_max_pool2d.md).

    Example::

        >>> x = torch.tensor([[[[5., 5.], [1., 0.]]]])
        >>> robust_ops.drop_max_pool2d(x, 2)
        tensor([[[[5.]]]])
    """
    _check_tensor("drop_max_pool2d", "input", input)
    # a quantized tensor (a quantized model's pooling after replace_maxpool) never reached the ops' dtype check: the
    # dispatcher refused it first, in many lines about the 'QuantizedCPU' backend
    _check_floating("drop_max_pool2d", "input", input)
    if input.layout != torch.strided:  # an mkldnn or sparse tensor got the dispatcher's many-line refusal
        raise RuntimeError(f"drop_max_pool2d: expected a strided (dense) input, got {input.layout}; there is no "
                           "drop-max kernel for it: convert with .to_dense()")
    if input.dim() not in (3, 4):
        raise RuntimeError(
            f"drop_max_pool2d: expected input to be 3-D (C, H, W) or 4-D (N, C, H, W), got {input.dim()}-D"
        )
    kernel, stride, padding, dilation = _pool_args("drop_max_pool2d", kernel_size, stride, padding, dilation)
    ceil_mode = _bool("drop_max_pool2d", "ceil_mode", ceil_mode)
    return_indices = _bool("drop_max_pool2d", "return_indices", return_indices)  # "no" returned (out, indices)
    which = _backend.resolve("drop_max_pool2d", input.device, backend)
    # an HWC image viewed as CHW (permute(2, 0, 1), as from numpy or PIL) is such a batch once unsqueezed, where
    # _as_batch copies it into CHW
    as_is = (input.dim() == 3 and not input.is_contiguous()
             and _one_hwc_image_pooled_as_is(input.unsqueeze(0), which))
    x, unbatched = (input.unsqueeze(0), True) if as_is else _as_batch(input)
    as_is = as_is or _one_hwc_image_pooled_as_is(x, which)
    if not as_is:  # F.max_pool2d's output and gradient strides (DropMax2d is a drop-in for nn.MaxPool2d)
        x = _in_atens_layout(x)
    if which in ("native", "triton"):
        name = "drop_max_pool2d" if which == "native" else "drop_max_pool2d_triton"
        # torch.func.grad/jvp and forward_ad cannot run the op's register_autograd: the same backward op through a
        # torch.autograd.Function they support (robust_ops/_autograd.py)
        pool = (getattr(torch.ops.robust_ops, name) if _functorch_autodiff(x) is None
                else _autograd.FUNCTORCH_FUNCTIONS[f"robust_ops::{name}"])
        out, idx = pool(x, kernel, stride, padding, dilation, ceil_mode)
    else:
        from ._meta import check_drop_max_pool2d_args

        # Dynamo refuses the checks' message closures (they hold the tensor): eager only, so that
        # backend="reference" still compiles with fullgraph=True. torch.jit.trace turns sizes into tensors, which
        # torch._check refuses ("cond must be a bool"): a plain-PyTorch trace is checked by the ops it records.
        if not capturing():
            check_drop_max_pool2d_args(x, kernel, stride, padding, dilation, ceil_mode)
        out, idx = reference.drop_max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    if as_is:
        out, idx = _as_nchw(out), _as_nchw(idx)
    if unbatched:
        out, idx = out.squeeze(0), idx.squeeze(0)
    return (out, idx) if return_indices else out


# A leaf for torch.fx (torchvision's create_feature_extractor): tracing into it branches on input.dim().
torch.fx.wrap("drop_max_pool2d")

# What the CPU-only helper ops (max_pool2d, _eval_batch_norm_backward) run; other dtypes stay with ATen.
NATIVE_CPU_DTYPES = (torch.float32, torch.float64)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    r""":func:`torch.nn.functional.max_pool2d` with bitwise-equal outputs, indices and gradients, on CPU several
    times faster: ATen's selection rule (first occurrence of the maximum; a NaN wins, the last NaN of a window) run
    on the drop-max kernel's vectorized windows. ATen's CPU kernel for NCHW inputs walks each window element by
    element; at resnet18's first pooling layer (1x64x64 inputs, batch 32) the forward here is ~8x faster.

    Strided CPU float32/float64 inputs run ``torch.ops.robust_ops.max_pool2d`` (gradient: the index scatter shared
    with drop_max_pool2d, accumulated in ATen's order); other devices, dtypes and layouts (mkldnn, sparse) run
    ``F.max_pool2d`` itself (torch's CUDA pooling is already at memory bandwidth), and so does torch.onnx.export
    (ONNX has max pooling, not the custom op). The one difference from ATen: a window holding no input element
    (dilation stepping over a tiny input) returns index -1 and no gradient, where ATen returns an index outside the
    input. Arguments and shapes as for ``F.max_pool2d``; see docs/ops/max_pool2d.md.
    """
    if (input.device.type != "cpu" or input.dtype not in NATIVE_CPU_DTYPES or input.dim() not in (3, 4)
            or input.layout != torch.strided  # mkldnn (ATen pools it) or sparse (ATen's own error)
            or _functorch_autodiff(input) is not None  # ATen's has forward AD and torch.func support
            or _backend.onnx_exporting()):  # ONNX translates ATen's, not the custom op (native_layers' pools)
        return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                            return_indices=return_indices)
    kernel, stride, padding, dilation = _pool_args("max_pool2d", kernel_size, stride, padding, dilation)
    ceil_mode = _bool("max_pool2d", "ceil_mode", ceil_mode)
    x, unbatched = _as_batch(input)
    # Not _one_hwc_image_pooled_as_is: max_pool2d's NCHW kernel on the copy was as fast (~36 us a call, 1 x 16 x 32 x
    # 32, kernel 3 stride 2, one core; ~35 us as is)
    x = _in_atens_layout(x)
    out, idx = torch.ops.robust_ops.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    if unbatched:
        out, idx = out.squeeze(0), idx.squeeze(0)
    return (out, idx) if return_indices else out


torch.fx.wrap("max_pool2d")  # as drop_max_pool2d: it branches on the input's device, dtype and dim


def _per_sample_tensor(name, value, like):
    """A scalar or a per-sample tensor [N] as a 1-D tensor on like's device."""
    n = like.shape[0]
    dtype = torch.promote_types(like.dtype, torch.float32)
    if isinstance(value, torch.Tensor):
        # The op's own dtype check: the conversion below turned a bool mask into steps of 1.0 and dropped the
        # imaginary part of a complex tensor, silently.
        _check_floating("pgd_step_", name, value)
        check_strided("pgd_step_", (name, value))
        if value.dim() == 0:
            return value.to(device=like.device, dtype=dtype).expand(n).contiguous()
        if value.dim() != 1 or value.shape[0] != n:
            raise ValueError(
                f"pgd_step_: expected {name} to be a scalar or a tensor of shape [{n}], got shape {tuple(value.shape)}"
            )
        if value.device != like.device:  # the op's own message; .to() moved it silently (or failed unnamed: meta)
            raise RuntimeError(f"pgd_step_: expected {name} on the device of x_adv ({like.device}), got {value.device}")
        return value.to(dtype=dtype)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.full((n,), float(value), dtype=dtype, device=like.device)
    raise TypeError(f"pgd_step_: expected {name} to be a number or a tensor, got {type(value).__name__}")


def _real(name, value):
    """A clip bound as a Python float: a real number or a 0-D tensor, never None or a string."""
    if (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (
        isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool and not value.is_complex()
    ):
        return float(value)
    kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
    raise TypeError(f"pgd_step_: expected {name} to be a number, got {kind}")


def _index(name, value):
    """An int (or a 0-D integer tensor), never truncated: int(1.5) used to pick slot 1 silently."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"pgd_step_: expected {name} to be an int, got {value!r}")


def pgd_step_(
    x_adv, x_nat, grad, alpha, eps, *, clip_min=0.0, clip_max=1.0, norm="linf", history=None, slot=0, backend=None
):
    r"""One fused projected-gradient step, in place on ``x_adv`` (and ``history[slot]`` when given).

    ``linf``: ``x <- clip(x_nat + clamp(x + alpha*sign(g) - x_nat, -eps, eps))``;
    ``l2``: ``x <- clip(P_eps(x + alpha*g/(||g||_2 + 1e-10)))`` with per-sample norms. Zero-gradient samples stay
    put. The expressions follow torchattacks 3.5.1 operation by operation, so float32 results are bitwise equal.

    Args:
        x_adv (Tensor[N, ...]): current iterate, updated in place.
        x_nat (Tensor[N, ...]): clean inputs (centre of the ball).
        grad (Tensor[N, ...]): loss gradient at x_adv (ascent direction).
        alpha, eps (float or Tensor[N]): step size and radius, scalar or per sample.
        clip_min, clip_max (float): valid input range. Default: [0, 1].
        norm (str): "linf" or "l2". Default: "linf".
        history (Tensor[m, N, ...], optional): buffer that also receives the new iterate in slot ``slot``.
        slot (int): the index of ``history``'s first dimension written; other slots are untouched. Default: 0.
        backend (str, optional): as for :func:`drop_max_pool2d`.

    Returns:
        ``x_adv`` (updated in place).
    """
    for name, value in (("x_adv", x_adv), ("x_nat", x_nat), ("grad", grad)):
        _check_tensor("pgd_step_", name, value)
    _check_tensor("pgd_step_", "history", history, optional=True)
    check_strided("pgd_step_", ("x_adv", x_adv), ("x_nat", x_nat), ("grad", grad), ("history", history))
    _refuse_vmap("pgd_step_", ("x_adv", x_adv), ("x_nat", x_nat), ("grad", grad), ("alpha", alpha), ("eps", eps),
                 ("history", history))
    if x_adv.dim() == 0:  # the op's own message, raised before x_adv.shape[0] below fails with an IndexError
        raise RuntimeError("pgd_step_: expected x_adv to have a batch dimension, got a 0-D tensor")
    alpha_t = _per_sample_tensor("alpha", alpha, x_adv)
    eps_t = _per_sample_tensor("eps", eps, x_adv)
    clip_min, clip_max = _real("clip_min", clip_min), _real("clip_max", clip_max)
    slot = _index("slot", slot)
    check_pgd_step_norm(norm)
    which = _backend.resolve("pgd_step_", x_adv.device, backend)
    return _pgd_step_on(which, x_adv, x_nat, grad, alpha_t, eps_t, clip_min, clip_max, norm, history, slot)


def _pgd_step_on(which, x_adv, x_nat, grad, alpha_t, eps_t, clip_min, clip_max, norm, history, slot):
    """pgd_step_ after its wrapper's checks and conversions, on the backend ``which`` (``_backend.resolve``'s answer):
    for loops that made them once per attack (run_pgd, APGD, IMA's gen_adv) with tensors they built themselves
    (per-sample alpha_t and eps_t [N] in x_adv's opmath dtype, float clips, an int slot). The wrapper's Python work
    cost about as much as the CPU op call on small batches, once per step. The op's own checks (and the reference
    backend's) still run."""
    with torch.no_grad():
        if which == "native":
            torch.ops.robust_ops.pgd_step_(x_adv, x_nat, grad, alpha_t, eps_t, clip_min, clip_max, norm, history, slot)
        elif which == "triton":
            torch.ops.robust_ops.pgd_step_triton(
                x_adv, x_nat, grad, alpha_t, eps_t, clip_min, clip_max, norm, history, slot
            )
        else:
            from ._meta import check_pgd_step_args, check_pgd_step_values

            check_pgd_step_args(x_adv, x_nat, grad, alpha_t, eps_t, clip_min, clip_max, norm, history, slot)
            # As the CPU kernels (skipped on CUDA: a sync per step; and while compiling: they read values).
            if x_adv.device.type == "cpu" and not torch.compiler.is_compiling():
                check_pgd_step_values(alpha_t, eps_t, x_adv.dtype)
            reference.pgd_step_(x_adv, x_nat, grad, alpha_t, eps_t, clip_min, clip_max, norm, history, slot)
    return x_adv


def boundary_search_step_(lo, hi, points, crossed_at, active=None, *, backend=None):
    r"""One round of a batched k-ary boundary search (k = points.shape[0] + 1; k = 2 is bisection), in place.

    ``points[j]`` are the interior points ``lo + (hi - lo) * (j + 1) / k``; ``crossed_at[n]`` is the first of them
    (lo -> hi order) found past the decision boundary, ``k - 1`` if none. For active samples ``lo``/``hi`` move to
    the bracketing points and ``points`` is rewritten for the new interval; inactive samples are untouched.

    Args:
        lo, hi (Tensor[N, ...]): interval ends (lo on the correct side, hi past the boundary).
        points (Tensor[k-1, N, ...]): interior points, rewritten in place.
        crossed_at (LongTensor[N]): index of the first crossed interior point, in [0, k-1].
        active (BoolTensor[N], optional): samples to update. Default: all.
        backend (str, optional): as for :func:`drop_max_pool2d`.

    Returns:
        ``(lo, hi, points)`` (updated in place).
    """
    for name, value in (("lo", lo), ("hi", hi), ("points", points), ("crossed_at", crossed_at)):
        _check_tensor("boundary_search_step_", name, value)
    _check_tensor("boundary_search_step_", "active", active, optional=True)
    check_strided("boundary_search_step_", ("lo", lo), ("hi", hi), ("points", points), ("crossed_at", crossed_at),
                  ("active", active))
    _refuse_vmap("boundary_search_step_", ("lo", lo), ("hi", hi), ("points", points), ("crossed_at", crossed_at),
                 ("active", active))
    which = _backend.resolve("boundary_search_step_", lo.device, backend)
    return _boundary_search_step_on(which, lo, hi, points, crossed_at, active)


def _boundary_search_step_on(which, lo, hi, points, crossed_at, active):
    """boundary_search_step_ after its wrapper's checks, on the backend ``which`` (``_backend.resolve``'s answer): for
    IMA's search rounds, which resolve it once per gen_adv call, as :func:`_pgd_step_on` for the PGD loops."""
    with torch.no_grad():
        if which == "native":
            torch.ops.robust_ops.boundary_search_step_(lo, hi, points, crossed_at, active)
        elif which == "triton":
            torch.ops.robust_ops.boundary_search_step_triton(lo, hi, points, crossed_at, active)
        else:
            from ._meta import check_boundary_search_step_args

            check_boundary_search_step_args(lo, hi, points, crossed_at, active)
            reference.boundary_search_step_(lo, hi, points, crossed_at, active)
    return lo, hi, points
