"""Options, checked with messages that name the fix: numbers, integers, choices and class labels (one wording for
every class and function of the library); which keyword options a class's constructor takes, so that
``build(name, **options)`` can name a misspelt option and list the right ones instead of Python's bare ``unexpected
keyword argument``; and the library's on/off environment switches, all parsed alike."""

import inspect
import math
import numbers
import os

import numpy as np
import torch

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def counted(n, noun):
    """"1 epoch", "2 epochs": a count and its noun for messages (plain English plurals only)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def option_defaults(cls, skip=("self", "model")):
    """{name: default} of the named parameters of ``cls.__init__``, followed into the base classes' constructors while
    each passes ``**kwargs`` on (in MRO order; the first class naming a parameter gives its default,
    ``inspect.Parameter.empty`` for a required one)."""
    defaults = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind in _NAMED and p.name not in skip:
                defaults.setdefault(p.name, p.default)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return defaults


def accepted_options(cls, skip=("self", "model")):
    """Named parameters of ``cls.__init__``, followed into the base classes' constructors while each passes
    ``**kwargs`` on (in MRO order)."""
    return list(option_defaults(cls, skip))


def check_options(owner, cls, options, hints=None, accepted=None, error=ValueError):
    """ValueError (``error``) naming every option of ``options`` that ``cls`` does not take (or not in ``accepted``,
    a function's options), and the ones it does; ``hints`` ({option: what to do instead}) adds the way for options
    known from another library (torchattacks' names)."""
    accepted = accepted_options(cls) if accepted is None else accepted
    unknown = [k for k in options if k not in accepted]
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no options"
        grouped = {}  # one hint given for two options (CW's c and lr) is said once, after both
        for k in unknown:
            if hints and k in hints:
                grouped.setdefault(hints[k], []).append(k)
        known = [f"{', '.join(keys)}: {hint}" for hint, keys in grouped.items()]
        raise error(f"{owner}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"{takes}" + (f" ({'; '.join(known)})" if known else ""))


def fits_a_float(value):
    """Whether the real ``value`` is a finite float: an int past float's range (10**400) made math.isfinite raise an
    OverflowError, not check_real's ValueError naming the argument."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_real(name, arg, value, minimum=None, maximum=None, allow_min=True, allow_max=True, optional=False):
    """``value`` as a float: a finite real number (not a bool: True would pass as 1.0) within the optional bounds
    (inclusive unless ``allow_min`` / ``allow_max`` is False); None passes through when ``optional``. ValueError
    naming ``name``, ``arg`` and the accepted range otherwise."""
    if optional and value is None:
        return None
    finite = not isinstance(value, bool) and isinstance(value, numbers.Real) and fits_a_float(value)
    low_ok = minimum is None or (finite and (value >= minimum if allow_min else value > minimum))
    high_ok = maximum is None or (finite and (value <= maximum if allow_max else value < maximum))
    if finite and low_ok and high_ok:
        return float(value)
    low = "" if minimum is None else f"{'>=' if allow_min else '>'} {minimum}"
    high = "" if maximum is None else f"{'<=' if allow_max else '<'} {maximum}"
    if low and high:
        wanted = f"a finite number with {minimum} {'<=' if allow_min else '<'} {arg} {high}"
    else:
        wanted = f"a finite number {low or high}".rstrip()
    raise ValueError(f"{name}: expected {arg} to be {wanted}{' or None' if optional else ''}, got {value!r}")


def check_int(name, arg, value, minimum=1, error=ValueError):
    """``value`` as an int >= ``minimum`` (not a bool); ``error`` (a ValueError subclass such as the data loaders'
    DataError) naming ``name`` and ``arg`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise error(f"{name}: expected {arg} to be an integer >= {minimum}, got {value!r}")
    return int(value)


MAX_SEED = 2**32 - 1


def check_seed(name, seed, optional=False):
    """``seed`` as an int from 0 to MAX_SEED (2**32 - 1), None passing through when ``optional`` (the global RNG),
    else a ValueError naming ``name``: the one rule for every seed the library takes (fit, the attacks, evaluate,
    simclr). numpy takes no other seeds and torch's CPU generator reads a seed's low 32 bits, so seed=2**32 drew
    seed 0's numbers and -1 those of 2**32 - 1."""
    if optional and seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name}: expected seed to be an integer from 0 to {MAX_SEED} (2**32 - 1: numpy's seeds; "
                         f"torch's CPU generator reads a seed's low 32 bits, so other seeds repeat one of these)"
                         f"{' or None' if optional else ''}, got {seed!r}")
    return int(seed)  # numpy's integers overflow in seed arithmetic (and need pickle in a checkpoint)


def allocated(name, arg, value, what, make):
    """``make()``, an allocation whose size ``arg`` = ``value`` sets, with torch's refusal (a size past 2**63 bytes,
    more memory than there is) naming ``name`` and ``arg``: alone it named neither ("Storage size calculation
    overflowed with sizes=[4611686018427387905, 1]" for APGD's steps=2**62). ``what``: what the allocation holds.
    A device's torch.OutOfMemoryError stays one (the code that retries with a smaller batch catches that class)."""
    try:
        return make()
    except RuntimeError as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        error = torch.OutOfMemoryError if isinstance(err, torch.OutOfMemoryError) else RuntimeError
        raise error(f"{name}: {arg}={value} needs {what}, which cannot be allocated ({first})") from None


def segmentation_masks(y):
    """Whether labels ``y`` look like per-pixel masks ([N, H, W] or [N, 1, H, W]) rather than one class per sample:
    the classification-only entry points say so instead of only refusing the shape."""
    return torch.is_tensor(y) and y.dim() >= 3 and math.prod(y.shape[1:]) > 1


def label_dtype_fix(y, convert=".long()"):
    """The fix to append to a refusal of labels of ``y``'s dtype (a tensor, or a numpy array with ``convert``
    ".astype(np.int64)"): "; convert them with <convert>" for bool labels (False is class 0), and for float ones
    stored class numbers (whole values; others are said to be no class numbers, which the conversion would truncate:
    0.5 to 0); their argmax(1) for one-hot rows [N, K] (bool or float) or probability rows; for numpy strings, class
    names mapped to indices; "" for other values (complex, not an array). Reads float labels' values only, on the
    refusal's path. Appended by the attacks' label check (attacks.context.check_class_labels), by class_labels
    (fit, evaluate, report, cross_validation) and by the .npz loader (data.core.labels_to_tensor)."""
    if torch.is_tensor(y):
        is_bool, is_float = y.dtype == torch.bool, y.dtype.is_floating_point
    elif isinstance(y, np.ndarray):
        if y.dtype.kind in "US":
            return "; class names? map each name to its index, 0 to K-1"
        is_bool, is_float = y.dtype == np.bool_, y.dtype.kind == "f"
    else:
        return ""
    if (is_bool or is_float) and y.ndim == 2 and y.shape[1] > 1:  # a bool row's .long() is still a row
        return f"; one-hot{'' if is_bool else ' or probability'} rows? take their .argmax(1)"
    if is_bool:
        return f"; convert them with {convert} (False is class 0, True class 1)"
    if not is_float:
        return ""
    values = y.detach().reshape(-1) if torch.is_tensor(y) else torch.from_numpy(np.asarray(y, np.float64).reshape(-1))
    if values.device.type != "meta":  # a meta tensor has no values to read
        broken = values[~(values.isfinite() & (values == values.round()))]
        if broken.numel():  # 0.5 would become class 0 silently: not class numbers
            return (f"; not class numbers ({broken[0].item():g} is not whole): soft labels or probabilities? give "
                    "each sample's class index, 0 to K-1")
    return f"; class numbers stored as floats (0., 1., ...)? convert them with {convert}"


def class_labels(name, y, n, what="y"):
    """``y`` as int64 class labels of shape [N] for ``n`` samples (None: not checked), the one label rule of fit and
    evaluate: shape [N] or [N, 1] (MedMNIST's); one-hot [N, C] and other shapes are a ValueError, float or bool
    labels a TypeError (converting them would turn 0.7 into 0 silently), each naming ``name`` and ``what``.
    Per-pixel masks ([N, H, W], [N, 1, H, W], any dtype) are refused first, saying fit and evaluate are for
    classifiers: a float mask's dtype error sent a segmentation user to convert it, only to meet the shape error."""
    if segmentation_masks(y):
        raise ValueError(f"{name}: expected one class label per sample ({what} of shape [N] or [N, 1]), got {what} of "
                         f"shape {tuple(y.shape)}: segmentation masks? fit and evaluate are for classifiers only "
                         f"(segmentation: docs/ima.md, Segmentation)")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer class labels, got {what} of dtype {y.dtype}{label_dtype_fix(y)}")
    if y.dim() == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.dim() != 1 or (n is not None and y.shape[0] != n):
        onehot = y.dim() == 2 and n in (None, y.shape[0])
        raise ValueError(f"{name}: expected one class label per sample ({what} of shape [N] or [N, 1]), got {what} of "
                         f"shape {tuple(y.shape)}" + (f" for {n} samples" if n is not None else "")
                         + ("; for one-hot labels pass their argmax(1)" if onehot else ""))
    return y.long()


def check_flags(name, flags, optional=()):
    """Each value of ``flags`` ({arg: value}) is True or False; args in ``optional`` may also be None. Never coerced:
    a string passed as True (``channels_last="no"`` trained channels_last)."""
    for arg, flag in flags.items():
        if not (isinstance(flag, bool) or (flag is None and arg in optional)):
            raise TypeError(f"{name}: expected {arg} to be True or False{' or None' * (arg in optional)}, "
                            f"got {flag!r}")


def check_device(name, device, arg="device"):
    """``device`` as a torch.device: whatever torch.device takes ("cpu", "cuda:1", a torch.device, a CUDA index).
    ValueError naming ``name`` and ``arg`` otherwise; torch's own error named neither the function nor the argument
    (a list of its overloads for None, "Invalid device string" for a typo)."""
    try:
        return torch.device(device)
    except (TypeError, RuntimeError):
        raise ValueError(f"{name}: expected {arg} to be a torch.device or a string such as 'cpu' or 'cuda:0', got "
                         f"{device!r}") from None


def cuda_device_problem(device):
    """Why this process cannot use ``device`` (a torch.device), or None: a CUDA device without a visible GPU, or an
    index past the last one (torch fails only at the first tensor moved there: "Found no NVIDIA driver", "invalid
    device ordinal")."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})"
    return None


def check_usable_device(name, device, arg="device"):
    """``check_device``'s torch.device, refused (ValueError naming ``name`` and ``arg``) where this process cannot
    use it (``cuda_device_problem``): before anything is changed for it, as fit's model by MIRST-DM's drop-max layer."""
    device = check_device(name, device, arg)
    problem = cuda_device_problem(device)
    if problem:
        fix = f"one of them or {arg}='cpu'" if torch.cuda.is_available() else f"{arg}='cpu'"
        raise ValueError(f"{name}: {arg}={str(device)!r} requested, but {problem}; pass {fix}")
    return device


def python_number(value):
    """A numpy scalar (np.float32(0.5), np.int64(3) of a np.linspace / np.arange sweep) as the Python number it holds;
    anything else as it is. Checkpoints load with weights_only=True, which refuses numpy scalars."""
    return value.item() if isinstance(value, (np.number, np.bool_)) else value


def _plain_value(value):
    return isinstance(value, (numbers.Number, str, tuple, list)) or value is None


def refuse_unused(name, given, because, otherwise):
    """Refuse options given explicitly that a setting makes meaningless: nothing given is dropped silently.
    ``given`` is {arg: value} with None for each option left unset (its default then applies); ``because`` names the
    setting ("adapt=False (no adaptive radii)"), ``otherwise`` the other fix ("set adapt=True"). One line:
    ``dpaat: momentum=0.2 has no effect with adapt=False (...); leave momentum out or set adapt=True``."""
    named = {k: v for k, v in given.items() if v is not None}
    if named:
        # a generator's repr is its address: named by its type
        listed = ", ".join(f"{k}={v!r}" if _plain_value(v) else f"{k}=<{type(v).__name__}>" for k, v in named.items())
        raise ValueError(f"{name}: {listed} {'has' if len(named) == 1 else 'have'} no effect with {because}; leave "
                         f"{' and '.join(named)} out or {otherwise}")


def check_choice(name, arg, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected {arg} to be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def env_switch(name, default):
    """The on/off environment variable ``name`` ($ROBUST_OPS_CPU_POOL, ...): 1/true/on/yes or 0/false/off/no, any
    case, spaces around ignored; unset or empty gives ``default``. ValueError naming the variable otherwise."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _ON or value in _OFF:
        return value in _ON
    raise ValueError(f"robust_ops: expected ${name} to be one of {'/'.join(_ON)} (on) or {'/'.join(_OFF)} (off), "
                     f"got {os.environ[name]!r}")


def listing(items, cap=12):
    """``a, b, c`` -- at most ``cap`` items, then how many more, so an error stays one readable line."""
    items = [str(i) for i in items]
    more = f", ... ({len(items) - cap} more)" if len(items) > cap else ""
    return (", ".join(items[:cap]) or "none") + more
