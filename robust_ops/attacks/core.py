"""The one PGD core every gradient attack, defense and IMA runs on.

``run_pgd`` does forward + backward at the current iterate and one fused ``robust_ops.pgd_step_`` per step. The
fused step also writes the requested iterates into a preallocated history buffer (``emit``), so emitting iterates
costs no extra copy; it can reuse the attack's backward passes to produce parameter gradients
(``param_grad_weights``, MIRST-DM); and it freezes samples once misclassified (``early_stop``, also FAT's tau) by
zeroing their per-sample step size, so the fused step leaves them in place.
"""

import contextlib
import functools
import inspect
import math
import numbers
import struct
import threading
from dataclasses import dataclass

import torch

from .. import _backend, functional
from .._options import check_flags, check_int, check_options, check_real, fits_a_float, refuse_unused
from .context import (
    InputGradScale,
    NonFiniteOutputError,
    attack_context,
    best_other_logit,
    check_gradients_possible,
    check_inputs,
    check_output,
    classification_loss,
    forward_naming_input_mismatch,
    is_single_logit,
    labels_range,
    margin,
    num_classes_of,
    one_sample_batch_norm_error,
    predict_from_output,
    probabilities_flag,
    probabilities_unwarned,
    range_read_before,
    two_logits,
    warn_probabilities,
)

NORMS = ("linf", "l2")
# APGD, APGD-T (Croce & Hein 2021's L1-APGD), FAB, FAB-T and AutoAttack also take L1; every other attack refuses it
NORMS_WITH_L1 = NORMS + ("l1",)
LOSSES = ("ce", "cw")

# Other libraries' names for the attack options (advertorch's and cleverhans' PGD(eps_iter, nb_iter, rand_init), ART's
# ProjectedGradientDescent(eps_step, max_iter), foolbox's epsilons and abs_stepsize, AutoAttack's APGD n_iter,
# TRADES' and MART's reference code's epsilon, step_size, perturb_steps and num_steps; step_size is also the
# defenses' name): {foreign name: (what it is, the names here it may be, in order, the library it comes from)}. One
# table for the attack classes (option_hints), the functions (names_foreign_options) and the defenses
# (defenses._common.option_hints): all refused them without the name here.
STEP_NAMES = ("step_size", "alpha")  # the defenses' first: SAT's, MIRST's and DPAAT's alpha is a loss weight
FOREIGN_NAMES = {
    "step_size": ("the step", STEP_NAMES, "the defenses'"),
    "eps_iter": ("the step", STEP_NAMES, "advertorch's and cleverhans'"),
    "eps_step": ("the step", STEP_NAMES, "ART's"),
    "abs_stepsize": ("the step", STEP_NAMES, "foolbox's"),
    "nb_iter": ("the number of steps", ("steps", "n_queries", "trials"), "advertorch's and cleverhans'"),
    "max_iter": ("the number of steps", ("steps", "n_queries", "trials"), "ART's"),
    "num_steps": ("the number of steps", ("steps", "n_queries", "trials"), "TRADES' and MART's code's"),
    "perturb_steps": ("the number of steps", ("steps", "n_queries", "trials"), "TRADES' and MART's code's"),
    "n_iter": ("the number of steps", ("steps", "n_queries", "trials"), "AutoAttack's"),
    "rand_init": ("the random start", ("random_start",), "advertorch's and cleverhans'"),
    "epsilon": ("the radius", ("eps",), "TRADES' and MART's code's"),
    "epsilons": ("the radius", ("eps",), "foolbox's"),
}
# step_size keeps the wording it had before the table (docs/defenses/index.md quotes it)
STEP_SIZE_HINT = "the step is called alpha here, step_size in the defenses"


def foreign_name_hints(accepted):
    """{foreign name: hint} for the ``FOREIGN_NAMES`` that name an option in ``accepted`` (an attack's options): a
    name with no counterpart there (APGD's step, FGSM's steps) gets none, and is listed as unknown only."""
    hints = {}
    for foreign, (what, ours, library) in FOREIGN_NAMES.items():
        here = next((name for name in ours if name in accepted), None)
        if here is not None and foreign not in accepted:
            hints[foreign] = (STEP_SIZE_HINT if foreign == "step_size" and here == "alpha"
                              else f"{what} is called {here} here, {foreign} in {library}")
    return hints


def names_foreign_options(fn):
    """Decorator of an attack function: a keyword of ``FOREIGN_NAMES`` that ``fn`` does not take (pgd(...,
    step_size=0.01)) is refused as the classes refuse it, naming the option here, where it met Python's bare "got an
    unexpected keyword argument 'step_size'" (a TypeError still); other calls run ``fn`` unchanged."""
    params = inspect.signature(fn).parameters
    accepted = [p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in ("model", "x", "y", "name")]
    hints = foreign_name_hints(accepted)
    # a keyword fn's **options catches (apgd_t's, fab_t's, white_noise's targeted) is fn's to refuse, saying why: listed
    # here with a foreign name, "unknown options 'targeted', 'nb_iter'" called it unknown
    caught = any(p.kind == p.VAR_KEYWORD for p in params.values())

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if any(k in hints for k in kwargs):
            unknown = {k: v for k, v in kwargs.items() if k in hints or (k not in params and not caught)}
            check_options(fn.__name__, None, unknown, hints, accepted=accepted, error=TypeError)
        return fn(*args, **kwargs)

    return checked


@dataclass
class PGDResult:
    """What ``run_pgd`` returns.

    x_adv: the final iterate [N, ...].
    iterates: [len(emit), N, ...] with ``iterates[j]`` the iterate after ``emit[j]`` steps (None without emit).
    param_grads: sum over ``param_grad_weights`` of ``w * d(loss)/d(theta)`` at those iterates, in the order of
        ``[p for p in model.parameters() if p.requires_grad]``, None for a parameter no forward used (None without
        param_grad_weights).
    emitted_losses: the attack loss (unweighted, as a float) at each iterate of ``param_grad_weights``, in
        increasing iterate order (None without param_grad_weights); read back from the device once, at the end.
    """

    x_adv: torch.Tensor
    iterates: torch.Tensor = None
    param_grads: list = None
    emitted_losses: list = None


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks shared by the attacks


def check_steps(name, steps, arg="steps", minimum=1):
    steps = check_int(name, arg, steps, minimum)
    if steps >= 2**63:  # APGD(steps=10**22) was torch's multi-line "Overflow when unpacking long long"
        raise ValueError(f"{name}: expected {arg} below 2**63 (a 64-bit integer), got {steps}")
    return steps


def check_norm(name, norm, allowed=NORMS):
    """``norm`` in its canonical spelling, one of ``allowed`` ("linf", "l2"; APGD, APGD-T, FAB, FAB-T and AutoAttack
    pass ``NORMS_WITH_L1``). Any case is accepted ("Linf", "L2", "L1": AutoAttack's and torchattacks' spellings) where a
    norm enters the Python API, and only the canonical value is passed on, so reprs, options, checkpoints and results
    record one spelling. The ops (``robust_ops.pgd_step_``) take only "linf"/"l2"."""
    canonical = norm.lower() if isinstance(norm, str) else None
    if canonical not in allowed:
        spellings = ", ".join(repr(n.capitalize()) for n in allowed)
        raise ValueError(f"{name}: expected norm to be one of {', '.join(allowed)} (any case, e.g. {spellings}), "
                         f"got {norm!r}")
    return canonical


def refuse_targeted(name, options, what, instead=""):
    """A one-line ValueError for a ``targeted=`` among ``options`` (the keyword arguments caught by ``**options``) of
    ``name``, an attack without that argument (fab_t, apgd_t, white_noise), where Python's "got an unexpected keyword
    argument 'targeted'" (fab_t: "multiple values") said neither why nor which attack to use: ``what`` says what
    the attack is, ``instead`` (", or use ...") the alternative. Any other option is Python's own TypeError."""
    if "targeted" in options:
        raise ValueError(f"{name}: {what}, got targeted={options['targeted']!r}; leave targeted out{instead}")
    if options:
        raise TypeError(f"{name}() got an unexpected keyword argument {next(iter(options))!r}")


def sample_distance(a, b, norm):
    """Per-sample distance ||a - b||_p [N] (``norm`` "l2" or "linf", any case; any shape [N, ...], also N = 0 or
    empty samples)."""
    norm = check_norm("sample_distance", norm)
    d = (a - b).reshape(a.shape[0], math.prod(a.shape[1:]))
    if d.shape[1] == 0:
        return d.new_zeros(a.shape[0])
    return d.norm(p=2, dim=1) if norm == "l2" else d.abs().amax(1)


def project_l1(x_nat, point, eps_t, clip_min, clip_max):
    """Euclidean projection of ``point`` onto {x_nat + d : ||d||_1 <= eps_i, clip_min <= x_nat + d <= clip_max}, per
    sample: AutoAttack's ``L1_projection`` (Croce & Hein 2021) for any clip range and per-sample eps [N].

    The solution is d_j = sign(y_j) * min(max(|y_j| - lam, 0), room_j) with y = point - x_nat, room_j how far the box
    lets coordinate j move along sign(y_j), and lam >= 0 the smallest level with ||d||_1 <= eps_i. ||d(lam)||_1 is
    piecewise linear in lam, so lam is solved exactly between its sorted breakpoints (in float64: a cumulative sum over
    2 * features terms would drift in float32)."""
    n = x_nat.shape[0]
    y = (point - x_nat).reshape(n, -1)
    if y.numel() == 0:
        return point.clone()
    xf = x_nat.reshape(n, -1)
    room = torch.where(y > 0, clip_max - xf, xf - clip_min).clamp_min(0)
    size, room64 = y.abs().double(), room.double()
    # |d_j(lam)| is room_j up to lam = size_j - room_j, then shrinks with slope -1 until it reaches 0 at lam = size_j
    breaks, order = torch.cat((size - room64, size), 1).sort(dim=1)
    shrinking = torch.where(order < y.shape[1], 1.0, -1.0).to(torch.float64).cumsum(1)  # just after each breakpoint
    drops = (shrinking[:, :-1] * breaks.diff(dim=1)).cumsum(1)
    l1_at = room64.sum(1, keepdim=True) - torch.cat((drops.new_zeros(n, 1), drops), 1)  # ||d||_1 at each breakpoint
    eps64 = eps_t.to(device=y.device, dtype=torch.float64).view(n, 1)
    over = (l1_at > eps64).sum(1, keepdim=True)  # breakpoints where the L1 norm is still above eps: a prefix
    last = over.clamp(1, breaks.shape[1] - 1) - 1  # the segment [last, last + 1] where the norm reaches eps
    start, rate = breaks.gather(1, last), shrinking.gather(1, last).clamp_min(1.0)
    lam = start + (l1_at.gather(1, last) - eps64) / rate
    lam = torch.minimum(lam, breaks.gather(1, last + 1)).clamp_min(0.0)
    lam = torch.where(over == 0, torch.zeros_like(lam), lam)  # the box alone keeps the point inside the ball
    # eps 0, or a norm still above eps at the last breakpoint (rounding in the sums): every coordinate to 0 exactly
    lam = torch.where((eps64 == 0) | (over == breaks.shape[1]), breaks[:, -1:], lam)
    d = torch.sign(y) * torch.minimum((size - lam).clamp_min(0.0), room64).to(y.dtype)
    # x_nat + (clip_max - x_nat) may round past clip_max; clamping moves a coordinate only towards x_nat
    return (xf + d).clamp(clip_min, clip_max).view_as(point)


def sum_at_any_thread_count(t, dim, keepdim=False):
    """``t.sum(dim, keepdim=keepdim)`` with the same bits at any CPU thread count. ATen sums a reduction to a single
    value (one sample's row of more than 32768 values: a one-sample batch, the last sample left to attack) by
    splitting the row between threads and adding their parts, while each of several outputs is summed whole by one
    thread: FAB and Square-L2 on one 3x112x112 image moved by up to 4.2e-7 and 6.6e-6 between 1 and 2 threads. Such
    a sum runs over two copies of the row (a stride-0 view, nothing copied) and keeps the first: one thread's bits,
    at the cost of summing the row twice. Other devices and several outputs sum as ``t.sum``."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if t.device.type != "cpu" or not t.numel() or t.numel() != math.prod(t.shape[d] for d in dims):
        return t.sum(dim, keepdim=keepdim)
    twice = t.unsqueeze(0).expand(2, *t.shape)
    return twice.sum(tuple(d % t.dim() + 1 for d in dims), keepdim=keepdim)[0]


def check_number(name, arg, value, n="N"):
    """A radius or step given as a number (not a per-sample tensor [n]) must be finite and >= 0: per_sample's check
    when run, and the attack classes' when built (``n`` then "N"), so that PGD(model, alpha="0.01") or alpha=-1 is
    refused where the other options are, not at the first call. ``n`` None: a number only (a defense's eps and
    step_size, uniform_ball's eps), in the same words. Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shapes = "" if n is None else f" or a tensor of shape [{n}]"
        raise TypeError(f"{name}: expected {arg} to be a number{shapes}, got {type(value).__name__}")
    # an int past float's range (eps=10**400) made float() raise a bare OverflowError naming neither
    if not fits_a_float(value) or value < 0:
        raise ValueError(f"{name}: expected {arg} >= 0 and finite, got {value}")
    return float(value)


def scalar_value(name, arg, value):
    """A 0-d tensor read as its value (a Python number; a bool or complex one refused), anything else as given: how
    the attack classes' eps and alpha (check_budget) and the defenses' eps and step_size read one, so that
    defenses.build("at", eps=torch.tensor(8 / 255)), refused until 2026-12-07 where np.float32(8 / 255) was taken,
    builds as PGD(model, eps=torch.tensor(8 / 255)) does."""
    if torch.is_tensor(value) and value.dim() == 0:
        check_real_tensor(name, arg, value)
        return value.item()
    return value


def check_real_tensor(name, arg, value):
    """A radius or step tensor must be real: a bool one, as a Python bool, would be a radius of 1 (True)."""
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name}: expected {arg} to be a real tensor, got {value.dtype}")


def per_sample(name, arg, value, x, with_max=False):
    """A float or a per-sample tensor [N] (finite, >= 0) as a tensor [N] in x's dtype on x's device. ``with_max``:
    (that tensor, its largest value as a float, None where N = 0), a tensor's maximum read with its check in one host
    read (a GPU sync) instead of a second one (:func:`check_linf_budget`'s ``eps_max``)."""
    n = x.shape[0]
    dtype = torch.promote_types(x.dtype, torch.float32)
    if torch.is_tensor(value):
        check_real_tensor(name, arg, value)
        if value.dim() == 0:
            value = value.reshape(1).expand(n)
        if value.dim() != 1 or value.shape[0] != n:
            raise ValueError(f"{name}: expected {arg} to be a number or a tensor of shape [{n}], got shape "
                             f"{tuple(value.shape)}")
        t = value.detach().to(device=x.device, dtype=dtype)
        bad = ~torch.isfinite(t) | (t < 0)
        if not with_max:
            any_bad = bool(bad.any())
        elif n == 0:
            any_bad, widest = False, None
        else:  # float64 holds t's maximum exactly
            any_bad, widest = torch.stack((bad.any().double(), t.max().double())).tolist()
        if any_bad:
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: expected every {arg} to be finite and >= 0, got {int(bad.sum())} bad value(s), "
                             f"e.g. {arg}[{i}] = {float(t[i]):.4g}")
        return (t.contiguous(), widest) if with_max else t.contiguous()
    check_number(name, arg, value, n)
    if float(value) > torch.finfo(dtype).max:  # torch.full's "cannot be converted to type float without overflow"
        largest = f"{torch.finfo(dtype).max:.4g}, the largest {str(dtype).replace('torch.', '')}"
        raise ValueError(f"{name}: expected {arg} <= {largest} (the attack's precision for {x.dtype} inputs), "
                         f"got {value}")
    t = torch.full((n,), float(value), dtype=dtype, device=x.device)
    return (t, _in_dtype(value, dtype) if n else None) if with_max else t


def linf_wider_than_range(radius, clip_min, clip_max):
    """Whether an L-inf radius (or step) exceeds the clip range: eps=8 meant as 8/255 (0-255 units), which would run
    as an unbounded attack without a word. A relative slack of 1e-5 lets eps == width through in float32 (0.4 vs
    0.6 - 0.2). The one rule of the attacks, IMA's radii and the evaluation's radii, decided in float32 whatever the
    inputs' dtype (:func:`_f32`), so that an attack built from a number decides as it runs, on float32 or float64."""
    width = clip_max - clip_min
    return _f32(radius) > _f32(width + _linf_slack(width))


def _f32(value):
    """A number as float32 holds it: the Linf range rules compare radii and bounds so. Decided in float64 when built
    and in the inputs' dtype when run, PGD(model, eps=1.0000099999) was built and refused at its first float32 call
    (float32's 1.0000100136 is past 1 + 1e-5), and an alpha of 1.0000100001 the other way round."""
    return _in_dtype(value, torch.float32)


def _linf_slack(width):
    return 1e-5 * max(width, 1e-12)


def check_start(name, random_start, start_noise, or_unset=False):
    """``start_noise`` as a float >= 0, refused beside ``random_start=True``: two starts, which one ran would be a
    guess. run_pgd's check and TRADES / MART's (``or_unset``: their random_start may be left None)."""
    start_noise = check_real(name, "start_noise", start_noise, minimum=0)
    if start_noise and random_start is True:
        raise ValueError(f"{name}: expected random_start=False{' (or unset)' * or_unset} with start_noise="
                         f"{start_noise:g} (the start is either uniform in the ball or x + start_noise * N(0, I)), got "
                         "random_start=True")
    return start_noise


def check_x_init(name, x_init, x, random_start, start_noise):
    """run_pgd's ``x_init``: None, or a finite tensor of ``x``'s shape, dtype and device, given without
    ``random_start`` or ``start_noise`` (two starts: which one ran would be a guess)."""
    if x_init is None:
        return
    if random_start is True or start_noise:
        raise ValueError(f"{name}: expected random_start=False and start_noise=0 with x_init (the start is x_init "
                         f"projected onto the ball), got random_start={random_start}, start_noise={start_noise:g}")
    if not torch.is_tensor(x_init):
        raise TypeError(f"{name}: expected x_init to be a tensor of x's shape, dtype and device, got "
                        f"{type(x_init).__name__}")
    if x_init.shape != x.shape or x_init.dtype != x.dtype or x_init.device != x.device:
        raise ValueError(f"{name}: expected x_init to have x's shape {tuple(x.shape)}, dtype {x.dtype} and device "
                         f"{x.device}, got {tuple(x_init.shape)}, {x_init.dtype} and {x_init.device}")
    if x_init.numel() and not bool(torch.isfinite(x_init).all()):
        raise ValueError(f"{name}: expected x_init to be finite, got NaN or Inf")


def check_linf_budget(name, norm, eps_t, clip_min, clip_max, alpha_t=None, arg="eps", alpha_arg="alpha", eps=None,
                      alpha=None, eps_max=None, alpha_max=None):
    """Linf: an ``arg`` (or a step while it fits) wider than the clip range is refused (:func:`linf_wider_than_range`).
    Per-sample tensors [N] as ``per_sample`` returns them. ``eps`` / ``alpha``: the values ``eps_t`` / ``alpha_t``
    were made from; where they are numbers the check decides on them (rounded as ``per_sample`` rounds them), without
    reading the tensors back (a host sync each on a GPU, once per attack call). ``eps_max`` / ``alpha_max``: the
    tensors' largest values where the caller read them already (``per_sample(with_max=True)``), not read again."""
    if norm != "linf" or eps_t.numel() == 0:
        return
    width = clip_max - clip_min
    slack = _linf_slack(width)
    eps_number, alpha_number = _in_dtype(eps, eps_t.dtype), _in_dtype(alpha, eps_t.dtype)
    steepest = None  # the widest step refused, if any (a number)
    checked = False  # bad's any() read already (bad then None where no step is refused)
    if alpha_t is None:
        bad = None
    elif eps_number is not None and alpha_number is not None:
        bad = None  # decided on the numbers, in float32 as the tensors' check below
        if _linf_step_refused(alpha_number, eps_number, width):
            steepest = alpha_number
    elif alpha_max is not None and not _f32(alpha_max) > _f32(width + slack):
        bad = None  # no step wider than the range (compared in float32, as below): none to refuse
    else:
        bad = _linf_step_refused(alpha_t, eps_t, width)
    if eps_number is not None:
        widest = eps_number
    elif eps_max is not None:
        widest = eps_max
    elif bad is None:
        widest = float(eps_t.max())
    else:  # both checks' values in one host read (float64 holds eps_t's maximum exactly)
        widest, any_bad = torch.stack((eps_t.max().double(), bad.any().double())).tolist()
        bad, checked = bad if any_bad else None, True
    if linf_wider_than_range(widest, clip_min, clip_max):
        raise _linf_refusal(name, arg, widest, width)
    if bad is not None and (checked or bool(bad.any())):
        steepest = float(alpha_t[bad].max())
    if steepest is not None:
        raise _linf_refusal(name, alpha_arg, steepest, width, "2/255")


def _linf_step_refused(alpha, eps, width):
    """Where a Linf step (numbers or tensors) is refused: wider than the clip range while the radius fits in it,
    compared in float32 (:func:`linf_wider_than_range`)."""
    slack = _linf_slack(width)
    if torch.is_tensor(alpha):  # a float32 tensor against a Python float compares in float32
        alpha, eps = alpha.float(), eps.float()
    else:
        alpha, eps = _f32(alpha), _f32(eps)
    return (alpha > _f32(width + slack)) & (eps < _f32(width - slack))


def _linf_refusal(name, arg, widest, width, example="8/255"):
    """The error of a Linf radius (a step: ``example`` "2/255") wider than the clip range, each value with the digits
    that tell them apart: 4 of 1.00002 read 'expected eps <= ... = 1, ..., got eps up to 1'."""
    shown_width = f"{width:g}"
    shown = next((text for text in (f"{widest:.{digits}g}" for digits in (4, 6, 8, 12, 17))
                  if float(text) > float(shown_width)), repr(widest))
    return ValueError(f"{name}: expected {arg} <= clip_max - clip_min = {shown_width} for norm='linf', got {arg} up "
                      f"to {shown} ({arg} in 0-255 units? pass e.g. {example})")


def check_budget(name, norm, eps, clip_min, clip_max, alpha=None, n="N", optional=False):
    """An attack's radius ``eps`` and step ``alpha`` (None: no step) where each is a number or a 0-d tensor, checked
    before the attack runs, in the words it uses when run: finite and >= 0 (:func:`check_number`), and for norm
    "linf" within the clip range (:func:`check_linf_budget`). A tensor [N] is checked per sample when run, against the
    batch. The attack classes' check when built (``PGD(model, eps=8)`` or ``eps=torch.tensor(-1.0)`` was refused only
    at the first call), ``AutoAttack``'s and an ensemble's before any of its attacks runs (``n``: the batch size;
    ``optional``: an eps of None, an attack of the caller's without one, is not checked)."""
    numbers_given = {}
    for arg, value in (("eps", eps), ("alpha", alpha)):
        if value is None and (arg == "alpha" or optional):
            continue
        if torch.is_tensor(value) and value.dim():  # per_sample's check when run, against the batch
            check_real_tensor(name, arg, value)
            continue
        value = scalar_value(name, arg, value)
        check_number(name, arg, value, n)
        numbers_given[arg] = float(value)
    if norm != "linf" or "eps" not in numbers_given:  # a per-sample eps: alpha's rule depends on each sample's eps
        return
    # check_linf_budget's rules on the numbers, in float32 as when run (no tensor made: building stays cheap)
    eps, alpha, width = numbers_given["eps"], numbers_given.get("alpha"), clip_max - clip_min
    if linf_wider_than_range(eps, clip_min, clip_max):
        raise _linf_refusal(name, "eps", eps, width)
    if alpha is not None and _linf_step_refused(alpha, eps, width):
        raise _linf_refusal(name, "alpha", alpha, width, "2/255")


def _in_dtype(value, dtype):
    """A real number ``value`` as a tensor of ``dtype`` (float32 or float64) would hold it, None for anything else."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or dtype not in (torch.float32, torch.float64):
        return None
    value = float(value)
    if dtype == torch.float64:
        return value
    try:  # float32's round-to-nearest, as torch.full rounds it
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # some Pythons refuse values past float32's range, where torch gives inf
        return math.copysign(math.inf, value)


def check_step_moves(name, eps, alpha, alpha_arg="alpha", hint=""):
    """A step of 0 beside a radius above 0 never leaves the start, so every sample scores as robust: CW(model, 1, 0,
    50), torchattacks' CW-L2 order (c, kappa, steps), ran as eps 1, alpha 0. A radius of 0 takes any step. Only an
    ``alpha`` given as a number (or a 0-D tensor) is checked: per-sample steps (AMAT's and DPAAT's, scaled from radii
    that may round to tiny values) are not. The attacks' and the defenses' check, at construction and in run_pgd."""
    if torch.is_tensor(alpha) and alpha.dim() == 0:
        alpha = float(alpha)
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or alpha != 0:
        return
    if torch.is_tensor(eps):
        widest = float(eps.max()) if eps.numel() else 0.0
    else:
        widest = float(eps) if isinstance(eps, numbers.Real) and not isinstance(eps, bool) else 0.0
    if widest > 0:
        raise ValueError(f"{name}: expected {alpha_arg} > 0 where eps > 0 (a step of 0 never leaves the start point), "
                         f"got {alpha_arg}=0 at a radius of {widest:.4g}{hint}")


def check_linf_step_resolution(name, norm, x, eps, alpha=None):
    """Half-precision Linf with a number for eps and alpha: a step min(alpha, eps) > 0 below half the spacing of
    ``x``'s dtype just below its largest |value| rounds back to the iterate there, so those inputs would never move,
    without a word (bfloat16's spacing below 1 is 2**-8: eps 1/255 with step eps/4 left every pixel in [0.5, 1] in
    place). Measured at the inputs, not at the clip range: a wide range given as "no clipping" refused float32 steps.
    Refused rather than computed in float32: the iterate is what the model is evaluated at, in its own dtype, and
    float32 inputs under torch.autocast are the documented way to attack a half-precision model. Per-sample tensors
    (DPAAT's and AMAT's data-dependent radii, which may be tiny by rule) are not checked. ``alpha`` None: attacks
    whose every move from x is at most eps (APGD's random start and adaptive steps, Square's +-eps squares), where
    an eps below the resolution leaves every input in place."""
    given = (eps,) if alpha is None else (eps, alpha)
    numbers_given = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in given)
    if norm != "linf" or not numbers_given or x.dtype not in (torch.float16, torch.bfloat16) or not x.numel():
        return
    near = x.detach().abs().max()
    spacing = float(near - torch.nextafter(near, torch.zeros((), dtype=x.dtype, device=x.device)))
    step = min(float(v) for v in given)
    what, fix = ("the Linf radius eps", "an eps") if alpha is None else ("the Linf step min(alpha, eps)", "a step")
    if 0 < step < spacing / 2:
        raise ValueError(f"{name}: {what} = {step:.3g} is below half of {x.dtype}'s "
                         f"spacing near the inputs' largest |value| {float(near):.3g} ({spacing:.3g}): inputs there "
                         f"would round back and never move; give float32 inputs (a half-precision model runs them "
                         f"under torch.autocast) or {fix} >= {spacing / 2:.3g}")


def check_emit(name, emit, steps):
    """emit: a sorted tuple of distinct ints in [1, steps] (or None)."""
    if emit is None:
        return None
    if isinstance(emit, numbers.Integral) and not isinstance(emit, bool):
        emit = (emit,)
    emit = tuple(emit)
    if not emit or not all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in emit):
        raise ValueError(f"{name}: expected emit to be a non-empty sorted tuple of step counts in [1, {steps}], "
                         f"got {emit!r}")
    if any(e < 1 or e > steps for e in emit):
        raise ValueError(f"{name}: expected emit step counts in [1, steps={steps}], got {emit!r}")
    if any(b <= a for a, b in zip(emit, emit[1:])):
        raise ValueError(f"{name}: expected emit sorted and without repeats, got {emit!r}")
    return tuple(int(e) for e in emit)


def check_early_stop(name, early_stop):
    """False -> None (off); True -> 0; an int tau >= 0 -> tau (FAT: a sample freezes at its (tau + 1)-th
    misclassified iterate)."""
    if early_stop is False or early_stop is None:
        return None
    if early_stop is True:
        return 0
    if isinstance(early_stop, numbers.Integral) and early_stop >= 0:
        return int(early_stop)
    raise ValueError(f"{name}: expected early_stop to be False, True or an integer tau >= 0, got {early_stop!r}")


def check_kappa(name, kappa, loss="cw"):
    """kappa: a finite number >= 0. A negative kappa clamps the CW margin at a positive value, so the loss is flat
    on both sides of the boundary and the attack never moves; NaN makes every gradient NaN. A kappa > 0 beside
    another ``loss`` than "cw" is refused: only the CW margin reads it (pgd(loss="ce", kappa=2) ran plain CE)."""
    kappa = check_real(name, "kappa", kappa, minimum=0)
    if kappa and loss != "cw":
        shown = f"loss={loss!r}" if isinstance(loss, str) else "a loss callable"
        refuse_unused(name, {"kappa": kappa}, f"{shown} (kappa is the CW margin's confidence)", "set loss='cw'")
    return kappa


def check_draws(name, arg, value, random_start):
    """Refuse a ``generator`` or ``seed`` (``arg``, ``value``; None: unset) where the attack draws nothing (PGD and CW
    without a random start). It was ignored silently, so pgd(random_start=False, generator=g) looked seeded. Not
    run_pgd's: the core takes a generator for any of its draws (random start, start_noise, step_noise), and a caller
    may pass one whether or not its settings draw (a test pins that step_noise=0 then draws nothing)."""
    if not random_start:
        refuse_unused(name, {arg: value}, "random_start=False (nothing is drawn at random)", "set random_start=True")


def check_loss(name, loss):
    if callable(loss) or loss in LOSSES:
        return loss
    raise ValueError(f"{name}: expected loss to be one of {', '.join(LOSSES)} or a callable (out, y) -> loss, "
                     f"got {loss!r}")


def forward(name, model, x, output_rule=check_output):
    # x of another dtype than the model's parameters: torch's "Input type (double) and bias type (float) should be
    # the same" from inside its first layer becomes fit's and evaluate's one-line TypeError naming the fix. The output
    # is checked by ``output_rule``: classifier logits, or (gen_adv's check_output_rows) any map with a row per input
    try:
        out = forward_naming_input_mismatch(name, "x", model, x)
    except ValueError as err:
        # torch's "Expected more than 1 value per channel when training" named neither the attack nor the fix
        reworded = one_sample_batch_norm_error(name, err, x)
        if reworded is None:
            raise
        raise reworded from None
    out = output_rule(name, out, x.shape[0])
    if x.requires_grad and torch.is_grad_enabled() and not out.requires_grad:
        # a forward under torch.no_grad() (a frozen backbone's) or through .detach()/.numpy(): the attack's backward
        # failed with autograd's "element 0 of tensors does not require grad and does not have a grad_fn"
        raise RuntimeError(f"{name}: the model's output does not depend on its input x (no gradient flows back to x: "
                           "torch.no_grad(), .detach() or a numpy round trip inside forward?); gradient attacks need a "
                           "model differentiable in its input")
    return out


FIRST_FORWARD = "at the attack's first forward"

# what the labels of the attack running in this thread are, where not the caller's (check_labels_against's words)
_labels_origin = threading.local()


@contextlib.contextmanager
def labels_made_by(origin):
    """Within the block, :func:`check_labels_against` names the labels ``origin`` (e.g. "the targets
    set_mode_targeted_by_function's f returned") and its refusal says how to fix them; None: the caller's labels.
    Nested blocks (an attack calling another) name the innermost."""
    previous = getattr(_labels_origin, "origin", None)
    _labels_origin.origin = origin
    try:
        yield
    finally:
        _labels_origin.origin = previous


def check_labels_against(name, y, out, finite_at=None, label_range=None):
    """Labels ``y`` in [0, K) for the model's output ``out``. ``finite_at`` (where ``out`` was computed, e.g. "at the
    attack's first forward"): also refuse output rows without class probabilities (NaN, +Inf, a row of only -Inf; a
    single logit: NaN), read on the label check's own device sync, so no step pays one more (docs/design.md,
    "Non-finite values"), and warn of outputs that look like probabilities (a final softmax) on that read too.
    ``label_range``: the labels' (min, max) as check_inputs(label_range=True) read them, so that they are not read
    again (None: those of labels_read_once's scope, else read here)."""
    finite = finite_at is not None
    k = num_classes_of(out)
    if not y.numel():
        return
    if label_range is None:
        label_range = range_read_before(y)
    if finite:
        z = out.detach()
        # a row's maximum is NaN, +Inf or -Inf exactly when it has no softmax probabilities (evaluate's rule)
        bad = torch.isnan(z.reshape(-1)) if is_single_logit(z) else ~torch.isfinite(z.amax(1))
        # a final softmax (AutoAttack's check), on the same read; not where evaluate or AutoAttack checked already
        probs = probabilities_flag(z) if probabilities_unwarned() else None
        read = [bad.sum()] + ([probs.to(torch.int64)] if probs is not None else [])
    if label_range is not None:
        top = label_range[1]
        count, *probs_read = torch.stack(read).tolist() if finite else (0,)
    elif finite:
        top, count, *probs_read = torch.stack([y.max()] + [v.to(y.dtype) for v in read]).tolist()
    else:
        top, count, probs_read = int(y.max()), 0, ()
    if top >= k:
        lo, hi = label_range if label_range is not None else labels_range(y)
        origin = getattr(_labels_origin, "origin", None)
        if origin is not None:  # "labels" named the caller's, which were in range
            raise ValueError(f"{name}: {origin} are no classes of the model (expected values in [0, {k}) for a model "
                             f"with {k} classes, got values in [{lo}, {hi}]); it must return classes in [0, {k}), e.g. "
                             f"lambda x, y: (y + 1) % {k}")
        raise ValueError(f"{name}: expected labels in [0, {k}) for a model with {k} classes, got values in "
                         f"[{lo}, {hi}]")
    if count:
        raise NonFiniteOutputError(f"{name}: the model's output is NaN or Inf for {count} of its {bad.numel()} "
                                   f"inputs {finite_at} (no class probabilities); check the model: a log or division "
                                   "of 0 in its forward, or weights that diverged (a learning rate too high)",
                                   count=count, inputs=bad.numel())
    if any(probs_read):
        warn_probabilities(name)


@torch.no_grad()
def clean_logits(name, model, x, y, label_range=None):
    """One forward on the clean inputs: labels checked against it (``label_range``: as check_labels_against's);
    returns the logits ``[N, K]`` (a single logit as the two logits ``[0, z]``) and which samples are classified
    correctly."""
    out = forward(name, model, x)
    check_labels_against(name, y, out, finite_at=FIRST_FORWARD, label_range=label_range)
    return (two_logits(out) if is_single_logit(out) else out), predict_from_output(out) == y


def runner_up_targets(z, n_target_classes):
    """AutoAttack's targets for APGD-T and FAB-T: per sample, the classes ranked 2nd, 3rd, ... by the clean logits
    ``z``, ``n_target_classes`` of them at most and K - 1 at most; a list of LongTensor[N], one per rank."""
    order = z.sort(dim=1)[1]  # ascending: the runner-up is last but one
    return [order[:, -rank] for rank in range(2, min(n_target_classes, z.shape[1] - 1) + 2)]


def random_start_(x_adv, x_nat, eps, eps_scalar, norm, clip_min, clip_max, generator=None):
    """Random start, in place. For a scalar eps the draws are torchattacks' (Linf: uniform in the box; L2: Gaussian
    direction scaled to radius eps*U(0, 1)), so a seeded run reproduces torchattacks' random start."""
    n = x_adv.shape[0]
    view = (n,) + (1,) * (x_adv.dim() - 1)
    # Drawn in logical (contiguous) order, so a seed gives one start whatever x's memory layout: empty_like would fill
    # a channels_last x in memory order (torchattacks' draws for contiguous inputs, the only ones it sees alike).
    fresh = dict(dtype=x_adv.dtype, device=x_adv.device)
    if norm == "linf":
        if eps_scalar is not None:
            noise = torch.empty(x_adv.shape, **fresh).uniform_(-eps_scalar, eps_scalar, generator=generator)
        else:
            noise = torch.rand(x_adv.shape, generator=generator, **fresh) * 2 - 1
            noise = noise * eps.view(view).to(x_adv.dtype)
    else:
        noise = torch.empty(x_adv.shape, **fresh).normal_(generator=generator)
        norms = noise.reshape(n, -1).norm(p=2, dim=1).view(view)
        r = torch.zeros_like(norms).uniform_(0, 1, generator=generator)
        radius = eps_scalar if eps_scalar is not None else eps.view(view).to(x_adv.dtype)
        noise = noise * (r / norms * radius)
    x_adv.copy_(torch.clamp(x_nat + noise, min=clip_min, max=clip_max))


def attack_loss(out, y, loss, targeted, kappa, reduction="mean"):
    """The objective the attack ascends. "ce": mean CE (BCE-with-logits for a single logit), negated when targeted
    (exactly torchattacks' reduction). "cw": -max(z_y - max_{j!=y} z_j, -kappa) untargeted (drive the true logit
    below the best other one, up to confidence kappa); min(z_t - max_{j!=t} z_j, kappa) targeted. A callable gives a
    scalar or a per-sample loss (averaged); it is negated when targeted."""
    if loss == "ce":
        value = classification_loss(out, y, reduction=reduction)
        return -value if targeted else value
    if loss == "cw":
        if targeted:
            per = torch.clamp(_target_margin(out, y), max=kappa)
        else:
            per = -margin(out, y, kappa)
        return per.mean() if reduction == "mean" else per
    value = loss(out, y)
    if not torch.is_tensor(value) or value.dim() > 1:
        raise ValueError(f"attack: expected the loss callable to return a scalar or a per-sample [N] tensor, got "
                         f"{getattr(value, 'shape', type(value))}")
    if value.dim() == 1 and reduction == "mean":
        value = value.mean()
    return -value if targeted else value


def _target_margin(out, t):
    """z_t - max_{j != t} z_j (positive once the target wins)."""
    z = two_logits(out) if is_single_logit(out) else out
    return z.gather(1, t.view(-1, 1)).squeeze(1) - best_other_logit(z, t)


def finite_direction(grad):
    """``grad`` with its NaN and +-Inf entries set to 0, for the L2 and L1 steps: one of them made ||g|| NaN or Inf
    and the fused L2 step's point NaN (a model taking sqrt(x) has an infinite derivative at a pixel of 0, where its
    output is finite), so PGD-L2 returned NaN inputs, and the L1 step's top-k sort put NaN entries on top, where they
    moved nothing. They carry no usable direction: the step follows the finite entries, as the Linf step's sign leaves
    a NaN entry in place. FAB's linearisation uses it too (a NaN boundary returned the clean point). An elementwise
    pass, no device sync; finite gradients are unchanged (bitwise)."""
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def succeeded(out, y, targeted):
    """Per-sample success of the attack at this output: misclassified (untargeted) or the target reached, by the
    library's prediction rule (argmax, first index on a tie; a single logit > 0): a margin of 0 -- tied logits, a
    single logit of 0 -- succeeds only when the tie goes against y (AutoAttack's clean rule, argmax)."""
    pred = predict_from_output(out)
    return pred == y if targeted else pred != y


# ---------------------------------------------------------------------------------------------------------------------
# The core


@names_foreign_options
def run_pgd(
    model,
    x,
    y,
    *,
    eps,
    alpha,
    steps,
    norm="linf",
    random_start=False,
    start_noise=0.0,
    loss="ce",
    targeted=False,
    kappa=0.0,
    emit=None,
    early_stop=False,
    clip_min=0.0,
    clip_max=1.0,
    model_mode="eval",
    param_grad_weights=None,
    generator=None,
    grad_transform=None,
    step_noise=0.0,
    x_init=None,
    name="run_pgd",
):
    r"""Projected gradient descent (Madry et al. 2018, arXiv:1706.06083) on one fused step op.

    Each step: forward and backward at the iterate, then ``robust_ops.pgd_step_``:
    Linf ``x <- clip(x_nat + clamp(x + alpha*sign(g) - x_nat, -eps, eps))``,
    L2 ``x <- clip(P_eps(x + alpha*g/||g||))``. With ``loss="ce"`` and no random start the iterates are bitwise those
    of torchattacks 3.5.1 PGD / PGDL2 (mean cross-entropy).

    Args:
        model: ``[N, ...] -> [N, K]`` logits or ``[N]`` / ``[N, 1]`` single logits.
        x (Tensor[N, ...]): clean inputs inside ``[clip_min, clip_max]``.
        y (LongTensor[N]): labels (targets when ``targeted``).
        eps, alpha (float or Tensor[N]): radius and step size, per sample if a tensor.
        steps (int >= 1): number of steps.
        norm: "linf" or "l2" (any case).
        random_start (bool): start at a random point of the ball (torchattacks' draws).
        start_noise (float >= 0): start at ``clip(x + start_noise * N(0, I))`` (drawn with ``generator``) instead, the
            near-x start of TRADES's and MART's reference code (0.001); 0: no draws. Not with ``random_start``.
        loss: "ce", "cw" (margin with confidence ``kappa``) or a callable ``(out, y) -> scalar or [N]``.
        kappa (float >= 0): the "cw" margin's confidence (default 0); above 0 only with ``loss="cw"``.
        targeted (bool): ``y`` are target labels; the loss is negated ("cw": the target margin is ascended).
        emit (tuple of int): step counts in [1, steps], sorted; ``iterates[j]`` is the iterate after ``emit[j]`` steps.
        early_stop: False; True: freeze a sample once the attack succeeds on it; int tau: FAT's rule, a sample
            freezes at an iterate where it succeeds after succeeding at tau earlier ones (0 is True's rule).
        clip_min, clip_max (float): valid input range.
        model_mode: "eval" (default), "train" or "keep".
        param_grad_weights (dict {j: w}): also accumulate ``w * d(loss)/d(theta)`` at the iterate after j steps
            (j in [0, steps]) from the same backward pass the attack does there (one extra forward/backward for
            j == steps). Parameter ``.grad`` is never touched; a parameter the forward does not use gets None.
        generator (torch.Generator): for the random start.
        grad_transform (callable ``(grad, t) -> Tensor``): what the step ``t`` (0-based) moves along instead of the
            input gradient ``grad`` (same shape; e.g. MI-FGSM's momentum, input-gradient smoothing): attacks that
            change the gradient between steps keep the checks, modes and fused step of this loop (docs/attacks.md).
            For float16 inputs ``grad`` is loss-scaled, times a power of two (InputGradScale's direction_only).
        step_noise (float >= 0): each step also adds ``step_noise * N(0, 1)`` (drawn with ``generator``) to the iterate
            of every sample still moving, before the projection: ``x <- clip(P(x + alpha*sign(g) + step_noise*n))``,
            FAT's reference code's omega. 0: no noise, no draws.
        x_init (Tensor, x's shape, dtype and device): start at ``x_init`` projected onto each sample's ball around
            ``x`` and clipped to ``[clip_min, clip_max]`` (the step's own projection, before the first step) instead of
            ``x``: e.g. continuing from an earlier attack's x_adv at new radii. Not with ``random_start`` or
            ``start_noise``. None (default): start at ``x``.
        name (str): the attack the errors are reported as (``pgd: expected steps ...``); the attacks built on this
            loop pass their own ("pgd", "fgsm", "ifgsm", "cw_linf"). Default "run_pgd".

    Returns:
        PGDResult(x_adv, iterates, param_grads, emitted_losses).

    Raises (the classes are in :mod:`robust_ops.attacks`; every attack here raises them, and fit and evaluate name
    the data and the step with them):
        NonFiniteInputError (a ValueError): ``x`` holds NaN or Inf.
        NonFiniteOutputError (a ValueError): the model's output has no class probabilities (NaN, +Inf or a row of
            only -Inf; a single logit: NaN) for some input at the attack's first forward.
        InputDtypeError (a TypeError), InputDeviceError, InputShapeError (ValueErrors): the model cannot take ``x``
            for its dtype (integer images, float64 ones on a float32 model), its device, or its channel (feature)
            count, at the first forward.
    """
    check_gradients_possible(name)
    y, y_range = check_inputs(name, x, y, clip_min, clip_max, label_range=True)
    check_flags(name, {"targeted": targeted, "random_start": random_start})  # targeted="no" ran a targeted attack
    steps = check_steps(name, steps)
    norm = check_norm(name, norm)
    loss = check_loss(name, loss)
    kappa = check_kappa(name, kappa, loss)
    emit = check_emit(name, emit, steps)
    tau = check_early_stop(name, early_stop)
    eps_t, eps_max = per_sample(name, "eps", eps, x, with_max=True)
    eps_scalar = float(eps) if isinstance(eps, numbers.Real) and not isinstance(eps, bool) else None
    alpha_t, alpha_max = per_sample(name, "alpha", alpha, x, with_max=True)
    check_linf_budget(name, norm, eps_t, clip_min, clip_max, alpha_t, eps=eps, alpha=alpha, eps_max=eps_max,
                      alpha_max=alpha_max)
    check_step_moves(name, eps_max, alpha)  # eps_max: None where N = 0 (no radius)
    check_linf_step_resolution(name, norm, x, eps, alpha)
    step_noise = check_real(name, "step_noise", step_noise, minimum=0)
    start_noise = check_start(name, random_start, start_noise)
    check_x_init(name, x_init, x, random_start, start_noise)
    if grad_transform is not None and not callable(grad_transform):
        raise TypeError(f"{name}: expected grad_transform to be a callable (grad, step) -> tensor, got "
                        f"{type(grad_transform).__name__}")
    if param_grad_weights is not None:
        if not isinstance(param_grad_weights, dict) or not all(
            isinstance(j, numbers.Integral) and not isinstance(j, bool) and 0 <= j <= steps
            for j in param_grad_weights
        ):
            raise ValueError(f"{name}: expected param_grad_weights to be a dict {{iterate j in [0, {steps}]: weight}}, "
                             f"got {param_grad_weights!r}")
        params = [p for p in model.parameters() if p.requires_grad]  # before attack_context turns them off
        param_grads = [torch.zeros_like(p) for p in params]
        reached = [False] * len(params)  # parameters the forward never uses keep None, as .grad would after backward
        emitted_losses = []
    else:
        params, param_grads, emitted_losses = None, None, None

    n = x.shape[0]
    x_nat = x.detach()
    x_adv = x_nat.clone()
    iterates = x.new_empty((len(emit),) + tuple(x.shape)) if emit is not None else None
    slot_of = {e: j for j, e in enumerate(emit)} if emit is not None else {}
    if n == 0:
        if iterates is not None:
            iterates.copy_(x_adv.expand_as(iterates))
        return PGDResult(x_adv, iterates, param_grads, emitted_losses)

    if tau is not None:
        alpha_t = alpha_t.clone()  # zeroed per sample as they freeze
        # FAT's budget (Zhang et al. 2020, Algorithm 1 and its code): a step at which the sample is misclassified
        # spends one of tau; a misclassified sample with nothing left freezes. A sample that is correct again spends
        # nothing (counting steps from the first success instead froze it while correct).
        successes = torch.zeros((n,), dtype=torch.long, device=x.device)
        frozen = torch.zeros((n,), dtype=torch.bool, device=x.device)
    # the fused step's backend and clip floats once, not in every step's functional.pgd_step_ (alpha_t and eps_t are
    # per_sample's [N] tensors in x's opmath dtype, as the wrapper would convert them)
    step_on, clips = _backend.resolve("pgd_step_", x.device), (float(clip_min), float(clip_max))

    with attack_context(model, model_mode, name):
        if x_init is not None:
            # the fused step at alpha 0 from x_init: its projection onto each ball and its clip, as every step's
            x_adv.copy_(x_init.detach())
            functional._pgd_step_on(step_on, x_adv, x_nat, torch.zeros_like(x_adv), torch.zeros_like(alpha_t), eps_t,
                                    *clips, norm, None, 0)
        elif random_start:
            random_start_(x_adv, x_nat, eps_t, eps_scalar, norm, clip_min, clip_max, generator)
        elif start_noise:
            # TRADES's / MART's x + 0.001 * randn, not projected (the first step projects), clipped as every iterate
            noise = torch.randn(x_adv.shape, generator=generator, dtype=x_adv.dtype, device=x_adv.device)
            x_adv.copy_(torch.clamp(x_nat + start_noise * noise, min=clip_min, max=clip_max))
        checked = False
        grad_scale = InputGradScale()  # loss scaling under float16 autocast (fit(amp=True)); a no-op otherwise
        for t in range(steps + 1):
            want_params = param_grads is not None and t in param_grad_weights
            if t == steps and not want_params:
                break
            xg = x_adv.detach().requires_grad_(True)
            if want_params:
                for p in params:
                    p.requires_grad_(True)
            try:
                with torch.enable_grad():
                    out = forward(name, model, xg)
                    if not checked:
                        check_labels_against(name, y, out, finite_at=FIRST_FORWARD, label_range=y_range)
                        checked = True
                    objective = attack_loss(out, y, loss, targeted, kappa)
                    if want_params:
                        grads = grad_scale.grad(objective, [xg] + params, allow_unused=True, direction_only=True)
                        grad = grads[0]
                        if grad is None:  # without param_grad_weights torch's own error says so
                            raise RuntimeError(f"{name}: the model's output does not depend on its input x")
                        w = float(param_grad_weights[t])
                        for i, g in enumerate(grads[1:]):
                            if g is not None:
                                param_grads[i].add_(g, alpha=w)
                                reached[i] = True
                        emitted_losses.append(objective.detach().reshape(()).to(torch.float64))  # read at the end
                    else:
                        (grad,) = grad_scale.grad(objective, [xg], direction_only=True)
                    # under float16 autocast the graph was retained: freed here, not after the next step's forward
                    out, objective = out.detach(), None
            finally:
                if want_params:
                    for p in params:
                        p.requires_grad_(False)
            if t == steps:
                break
            if tau is not None:
                with torch.no_grad():
                    ok = succeeded(out.detach(), y, targeted)
                    frozen |= ok & (successes >= tau)
                    successes += ok
                    alpha_t.masked_fill_(frozen, 0.0)
            if grad_transform is not None:
                moved = grad_transform(grad, t)
                if not torch.is_tensor(moved) or moved.shape != grad.shape:
                    got = f"shape {tuple(moved.shape)}" if torch.is_tensor(moved) else type(moved).__name__
                    raise ValueError(f"{name}: grad_transform returned {got} at step {t}; expected a tensor of the "
                                     f"gradient's shape {tuple(grad.shape)}")
                grad = moved
            if norm == "l2":
                grad = finite_direction(grad)
            if step_noise:
                # added to the iterate the fused step starts from, so the step projects the sum (FAT's earlystop:
                # x + eta + omega * randn, then the eps-ball and the clip); a frozen sample stays put
                noise = torch.randn(x_adv.shape, generator=generator, dtype=x_adv.dtype, device=x_adv.device)
                if tau is not None:
                    noise.masked_fill_(frozen.view((n,) + (1,) * (x_adv.dim() - 1)), 0.0)
                x_adv.add_(noise, alpha=step_noise)
            slot = slot_of.get(t + 1)
            functional._pgd_step_on(step_on, x_adv, x_nat, grad, alpha_t, eps_t, *clips, norm,
                                    iterates if slot is not None else None, slot if slot is not None else 0)
    if param_grads is not None:
        param_grads = [g if used else None for g, used in zip(param_grads, reached)]
        # one host read (a GPU sync) for them all, not one per emitted iterate; float64 holds each loss exactly
        emitted_losses = torch.stack(emitted_losses).tolist() if emitted_losses else []
    return PGDResult(x_adv, iterates, param_grads, emitted_losses)
