"""Robustness evaluation: a model, a test set, attacks x radii -> metric rows, results.json, a table and figures.

Protocol (``evaluate``):

* clean predictions first (row ``attack="none"``, ``eps=0``);
* each attack at each radius, radii in ascending order, runs only on the samples that are still robust (cascade):
  a sample misclassified on clean input, or already fooled by the same attack at a smaller radius, keeps that
  input (an adversarial example inside a smaller ball is inside every larger one). Metrics (accuracy, F1,
  sensitivity, specificity, precision, AUC and mAP, binary and multi-class alike) are computed on the inputs every
  sample ends with. ``cascade=False`` attacks every sample at every radius (costlier; AUC then reflects the
  attack's effect on the scores of already-misclassified samples too);
* the per-sample worst case over all attacks at each radius (row ``attack="worst-case"``): a sample counts as
  robust only if no attack fooled it; it takes, of the inputs evaluated inside the ball, the one with the lowest
  true-class probability -- a fooling one when an attack fooled it (its worst case at the smaller radii too, when
  that fooled: without the cascade an attack's row takes a later fooling input); a robust sample's candidates also
  hold its clean input and its worst case at the smaller radii (so, on a binary task, AUC and mAP of the worst case
  are at most every attack's, the clean row's and the smaller radii's, whatever the attacks' order);
* ``ensemble=True`` instead runs the attacks as one AutoAttack-style cascade per radius (each attack only on samples
  surviving the previous ones, :func:`robust_ops.attacks.ensemble`), radii ascending and only on the samples no
  smaller radius fooled (which keep that input, as above), and reports only the worst case (always a cascade:
  ``cascade=False`` with it is an error).

Attack specs are strings ``name[:key=value...]``: ``pgd``, ``pgd:steps=50``, ``noise:norm=l2:trials=100``,
``pgd:alpha=eps/4``, ``mypkg.attacks.MIFGSM:steps=5`` (your own Attack subclass by dotted import path). Values may
be numbers, fractions like ``1/255``, booleans, or expressions in ``eps``; each is read as the type its option takes,
and the attack is run once on a tiny dummy model, so a bad value fails when parsed.
A norm may be spelt in any case (``pgd:norm=Linf``): labels, rows and results hold the canonical ``linf`` / ``l2``
(``l1`` for the attacks that take it: ``apgd-ce:norm=l1``, ``apgd-t:norm=l1``, ``fab:norm=l1``, ``fab-t:norm=l1``,
``autoattack:norm=l1``).
"""

import contextlib
import datetime
import decimal
import inspect
import itertools
import json
import math
import numbers
import os
import platform
import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ._files import make_staging_folder, out_dir_problem, remove_staging_folder
from ._import_path import PATH_HINT, is_import_path
from ._options import (MAX_SEED, accepted_options, check_flags, check_int, check_seed, check_usable_device,
                       class_labels, listing, python_number)
from ._warn import warn
from .attacks.context import (InputDtypeError, InputShapeError, NonFiniteOutputError,
                              check_attack_output, check_inside_ball, check_output, forward_naming_input_mismatch,
                              looks_like_probabilities, model_device, one_probabilities_warning, past_bound,
                              predict_from_output, use_model_mode, value_range_fix, warn_probabilities)
from .metrics import (METRIC_LABELS, class_log_odds, class_logits, classification_metrics, confusion_counts,
                      metric_names, positive_class_problem, probabilities)

__all__ = ["evaluate", "write_results", "EvalError"]

SCHEMA = "robust_ops.results/1"


class EvalError(ValueError):
    """Bad evaluation input; ``arg`` names the option at fault (e.g. "eps", "attacks"), ``message`` is the error's
    text."""

    def __init__(self, arg, message):
        super().__init__(message)
        self.arg = arg

    def __reduce__(self):
        # the default rebuilt EvalError(message) alone: a TypeError for the missing argument; the instance's
        # __dict__ goes with it, as with the default: its __notes__ and any attribute set on it
        return type(self), (self.arg, str(self)), self.__dict__


_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")
_INTEGER = re.compile(r"\s*[-+]?\d+\s*")  # read with int(), not through a float (2**53 + 1 is exact)


def parse_number(text, what="value"):
    """A float from ``0.03``, ``1e-3`` or a fraction ``5/255``; raises ValueError naming ``what``."""
    s = str(text).strip()
    if "/" in s:
        num, _, den = s.partition("/")
        if _NUMBER.match(num) and _NUMBER.match(den) and float(den) != 0:
            return float(num) / float(den)
    elif _NUMBER.match(s):
        return float(s)
    raise ValueError(f"{what}: could not parse {text!r} as a number or a fraction like 5/255")


def parse_eps(text):
    """Radii from ``"1/255,2/255,0.03"`` (or a list, or a numpy array or tensor of them: np.linspace's grid); each must
    be finite and >= 0. Sorted, duplicates removed."""
    # an array was "could not parse '[0.00392 0.00784]'"; a numpy scalar (a float32 grid's radius in a loop) was
    # read from its 7-digit str(), another radius than the same value in an array or list; np.str_ is text
    if isinstance(text, (np.ndarray, np.generic)) and not isinstance(text, str) or torch.is_tensor(text):
        text = np.asarray(text.detach().cpu() if torch.is_tensor(text) else text).reshape(-1).tolist()
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    if not items or all(str(i).strip() == "" for i in items):
        raise EvalError("eps", "eps: expected a comma-separated list of radii such as 1/255,2/255, got an empty list")
    values = []
    for item in map(python_number, items):  # np.float32(1/255) at its value, not at its 7-digit str()
        try:
            # a bool is no radius: eps=[True] evaluated at 1.0 (parse_number refuses "True")
            v = item if isinstance(item, (int, float)) and not isinstance(item, bool) else parse_number(item, "eps")
        except ValueError:
            raise EvalError("eps", f"eps: could not parse {str(item).strip()!r} in {text!r}; expected numbers or "
                                   "fractions such as 1/255,2/255,0.03") from None
        if not math.isfinite(v) or v < 0:
            raise EvalError("eps", f"eps: expected finite radii >= 0, got {item!r}")
        values.append(float(v))
    return sorted(set(values))


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# Option kinds where the constructor's default (None) does not tell; the rest follow the defaults' types.
_NONE_DEFAULT_KINDS = {"alpha": float, "seed": int, "steps": int, "n_queries": int, "n_target_classes": int,
                       "norm": str, "resample_unchanged": bool}


def _option_kind(name, key):
    """bool, int, float or str for option ``key`` of attack ``name`` (from its defaults), else None."""
    from . import attacks

    cls, defaults = _attack_at_path(name) if is_import_path(name) else attacks.ATTACKS.get(name, (None, {}))
    default = defaults.get(key)
    for klass in (cls.__mro__ if cls is not None and default is None else ()):
        init = klass.__dict__.get("__init__")
        if init is not None and klass is not object:
            param = inspect.signature(init).parameters.get(key)
            if param is not None and param.default not in (None, inspect.Parameter.empty):
                default = param.default
                break
    if default is None:
        return _NONE_DEFAULT_KINDS.get(key)
    return next((t for t in (bool, int, float, str) if isinstance(default, t)), None)


def _attack_at_path(path):
    """(class, defaults) of your own attack at dotted import path ``path``; an EvalError naming the path if it does not
    import or is no Attack subclass."""
    from . import attacks

    try:
        return attacks.attack_entry(path)
    except ValueError as err:
        raise EvalError("attacks", f"attacks: {err}") from None


class EpsExpression:
    """An attack option written as an expression in eps (``alpha=eps/4``): called with each radius, and shown as
    written in labels (all expressions read ``f(eps)`` there, so ``pgd:alpha=eps/4,pgd:alpha=eps/2`` were one label,
    refused as an attack listed twice)."""

    def __init__(self, text, code):
        self.text, self.code = text, code

    def __call__(self, eps):
        return float(eval(self.code, {"__builtins__": {}}, {"eps": eps}))

    def __repr__(self):
        return self.text


def _parse_option(name, key, value):
    """An attack option's text as the type the option takes (bool, int, float, str), or a callable of eps."""
    def bad(expected):
        return EvalError("attacks", f"attacks: option {key}={value!r} of {name!r}: expected {expected}")

    kind = _option_kind(name, key)
    low = value.strip().lower()
    if low in ("none", "null"):  # attacks.build drops None values, so the attack's default would run instead
        raise EvalError("attacks", f"attacks: option {key}={value.strip()} of {name!r} would be ignored (the attack's "
                                   f"default applies); give a value or leave {key} out")
    if kind is bool:
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        if key == "early_stop" and re.fullmatch(r"\d+", low):  # early_stop also takes a step count tau >= 0
            return int(low)
        raise bad("true or false (also 1/0, yes/no, on/off)")
    if low in _TRUE[:1] + _FALSE[:1] and kind is None:  # a number option: "true" is no number (was passed as a bool)
        return low == "true"
    if "eps" in low and kind in (float, None):
        expr = low.replace(" ", "")
        if not re.fullmatch(r"[0-9eps.+\-*/()]+", expr):
            raise EvalError("attacks", f"attacks: option {key}={value!r} of {name!r} is not an expression in eps")
        try:  # compile inside: a malformed expression (`eps/`, `(eps`) is a SyntaxError, not a traceback
            code = compile(expr, "<attack option>", "eval")
            eval(code, {"__builtins__": {}}, {"eps": 1.0})
        except Exception:
            raise EvalError("attacks", f"attacks: option {key}={value!r} of {name!r} is not an expression in eps") \
                from None
        return EpsExpression(expr, code)
    try:
        v = parse_number(value)
    except ValueError:
        if kind in (int, float):
            raise bad("an integer" if kind is int else "a number, a fraction like 1/255 or an expression in eps") \
                from None
        return value.strip()  # a norm's spelling (norm=L2) is made canonical by AttackSpec
    if kind is int:
        # the digits as written: through a float, seed=9007199254740993 ran as ...992 (and steps=99999999999999999999
        # was labelled steps=100000000000000000000); 1e3 is 1000
        if _INTEGER.fullmatch(value):
            v = int(value)
        elif not (math.isfinite(v) and v == int(v)):
            raise bad("an integer")
        else:
            v = int(v)
        if key == "seed" and not 0 <= v <= MAX_SEED:  # the attacks' seeds (fit's): torch reads the low 32 bits
            raise bad("an integer in [0, 2**32)")
        if not -2**63 <= v < 2**63:  # apgd-ce:steps=1e22 was torch's multi-line "Overflow when unpacking long long"
            raise bad("an integer in [-2**63, 2**63)")
        return v
    if kind is str:
        return value.strip()
    return int(value) if kind is None and _INTEGER.fullmatch(value) else v


class _DryRunDone(Exception):
    """Raised by the dry-run model after a few forward passes: the attack accepted its options."""


class _DryRunModel(torch.nn.Module):
    def __init__(self, calls=4):
        super().__init__()
        self.calls = calls
        self.weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 32).view(2, 16))

    def forward(self, x):
        self.calls -= 1
        if self.calls < 0:
            raise _DryRunDone
        return x.flatten(1)[:, :16] @ self.weight.t()


@contextlib.contextmanager
def _seeded_rng(seed, device):
    """The block draws from torch's RNG seeded with ``seed`` (an integer from 0 to 2**32 - 1): the CPU's and, for an
    accelerator ``device`` (cuda:1, mps), that device's; both are restored afterwards. torch.manual_seed would also
    reseed every GPU (queued until CUDA starts when it has not), which fork_rng does not restore: a CPU evaluation
    replaced the seed a user had set for the GPU training after it."""
    device = torch.device(device)
    own = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=own, device_type=device.type if own else "cuda"):
        torch.random.default_generator.manual_seed(seed)
        if own:  # fork_rng has started the device's module (its get_rng_state)
            module = torch.get_device_module(device.type)
            with module.device(device) if hasattr(module, "device") else contextlib.nullcontext():
                module.manual_seed(seed)  # the current device's generator: ``device``'s
        yield


def _dry_run(spec):
    """Run ``spec`` on a tiny model and input at eps=1, stopped after a few forward passes: option values an attack
    only checks when called (steps=-1, norm=l3) fail here, before any training, not after it."""
    with _seeded_rng(0, "cpu"):
        x = torch.rand(2, 1, 4, 4)
        y = torch.tensor([0, 1])
        attack = spec.build(_DryRunModel(), eps=1.0)
        try:
            run_attack(attack, x, y)
        except _DryRunDone:
            pass


def run_attack(attack, xb, yb):
    """``attack(xb, yb)`` with a ValueError/TypeError (a bad option value the attack checks only when run) as an
    EvalError."""
    try:
        return attack(xb, yb)
    except NonFiniteOutputError as err:  # the model's fault, not the attack's options (the CLI's --attacks)
        raise EvalError("model", str(err)) from None
    except (ValueError, TypeError) as err:
        raise EvalError("attacks", f"attacks: {err}") from None


@dataclass
class AttackSpec:
    """One attack configuration: ``name`` known to :func:`robust_ops.attacks.build`, ``options`` (values may be
    callables of eps), and the ``label`` rows carry."""

    name: str
    options: dict = field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        from . import attacks

        if is_import_path(self.name):  # imported now: a wrong path fails here, not when the first radius runs
            _attack_at_path(self.name)
        elif self.name not in attacks.ATTACKS:  # else a bare KeyError from .norm or build, far from the cause
            raise EvalError("attacks", unknown_attack_message(self.name))
        # build() passes these to every attack: a class without them read as "unknown options 'clip_min',
        # 'clip_max'", options the user never gave (and which a spec may not give)
        takes = accepted_options(attacks.attack_entry(self.name)[0])
        missing = [k for k in ("eps", "clip_min", "clip_max") if k not in takes]
        if missing:
            them = "it" if len(missing) == 1 else "them"
            raise EvalError("attacks", f"attacks: {self.name} takes no {'/'.join(missing)}, which evaluation gives "
                                       "every attack (eps: each radius; clip_min/clip_max: the data's value range); "
                                       f"take {them} in its __init__ (clip_min/clip_max: pass **options on to Attack)")
        if "norm" in self.options:  # canonical ("Linf" -> "linf"), so labels, rows and radius checks see one spelling
            from .attacks.core import check_norm

            takes = attacks.attack_entry(self.name)[0].norms  # "l1": apgd-*, fab*, autoattack
            try:
                self.options = {**self.options, "norm": check_norm(self.name, self.options["norm"], takes)}
            except ValueError as err:
                raise EvalError("attacks", f"attacks: {err}") from None
        if not self.label:
            shown = [f"{k}={_option_text(v)}" for k, v in self.options.items() if not callable(v)]
            shown += [f"{k}={v if isinstance(v, EpsExpression) else 'f(eps)'}" for k, v in self.options.items()
                      if callable(v)]
            self.label = self.name + (f"({','.join(shown)})" if shown else "")

    @property
    def norm(self):
        from . import attacks

        cls = attacks.attack_entry(self.name)[0]  # checked in __post_init__
        return self.options.get("norm") or getattr(cls, "default_norm", None) or "linf"

    def build(self, model, eps, clip_min=0.0, clip_max=1.0):
        from . import attacks

        try:
            opts = {k: (v(eps) if callable(v) else v) for k, v in self.options.items()}
        except (ArithmeticError, ValueError) as err:  # e.g. alpha=1/(eps-0.5) at eps 0.5
            raise EvalError("attacks", f"attacks: an option of {self.name!r} fails at eps={eps:g} ({err})") from None
        try:
            return attacks.build(self.name, model, eps=eps, clip_min=clip_min, clip_max=clip_max, **opts)
        except (ValueError, TypeError) as err:
            raise EvalError("attacks", f"attacks: {err}") from None


def _option_text(value):
    """An option's value in an attack's label: a step of k/255 as the eps column shows it (alpha=1/255 was labelled
    alpha=0.00392156862745098); other values as Python prints them (every digit: labels tell attacks apart)."""
    if isinstance(value, float) and len(f"{value:g}") > 5:
        k = value * 255
        if abs(k - round(k)) < 1e-9 and round(k) > 0:
            return f"{round(k)}/255"
    return value


def unknown_attack_message(name, python=True):
    """The error for an attack name not in robust_ops.attacks.ATTACKS; ``python``: also say that one can be
    registered there (a command line cannot see a registration made in the user's own code; a dotted path it can)."""
    from . import attacks

    what = repr(name) if isinstance(name, str) else f"{name!r} (attacks are given by name)"
    hint = "; or register your own attack class in robust_ops.attacks.ATTACKS (docs/attacks.md)" if python else ""
    return f"attacks: unknown attack {what}; expected one of {', '.join(attacks.ATTACKS)}, {PATH_HINT}{hint}"


def parse_attack(text):
    from . import attacks

    if not isinstance(text, str):  # an attack class or object: str() of it would be lower-cased into a bogus name
        raise EvalError("attacks", unknown_attack_message(text))
    parts = [p for p in text.strip().split(":")]
    name = parts[0].strip()
    if is_import_path(name):  # your own class, imported now; module and class names keep their case
        _attack_at_path(name)
    else:
        name = name.lower()
        if name not in attacks.ATTACKS:
            raise EvalError("attacks", unknown_attack_message(name, python=False))
    options = {}
    for p in parts[1:]:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise EvalError("attacks", f"attacks: expected key=value options after {name!r}, got {p!r}")
        if key.strip() in options:  # the later value would silently replace the earlier one
            raise EvalError("attacks", f"attacks: option {key.strip()!r} of {name!r} is given twice in {text!r}; "
                                       "keep one")
        options[key.strip()] = _parse_option(name, key.strip(), value)
    if "eps" in options:
        raise EvalError("attacks", f"attacks: give radii with eps, not as an option of {name!r}")
    if "clip_min" in options or "clip_max" in options:
        raise EvalError("attacks", f"attacks: clip_min/clip_max of {name!r} come from the dataset's value range, not "
                                   "from attack options")
    if options.get("targeted") is True:  # apgd-t and fab-t aim at the other classes, taking the true labels
        raise EvalError("attacks", f"attacks: targeted=true of {name!r} would take the true labels evaluation passes "
                                   "as targets, pushing towards them; use apgd-t or fab-t for targeted evaluation")
    spec = AttackSpec(name, options)
    _dry_run(spec)  # an option the attack does not take, or a bad value, fails here, not after training
    return spec


def parse_attacks(text):
    """AttackSpecs from ``"fgsm,pgd,cw"`` (or a list of names / specs)."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    kept = [s for s in items if str(s).strip()]
    specs = [s if isinstance(s, AttackSpec) else parse_attack(s) for s in kept]
    if not specs:
        raise EvalError("attacks", "attacks: expected at least one attack name such as fgsm,pgd,cw")
    labels = [s.label for s in specs]
    # options in another order are the same attack under another label (pgd:steps=3:alpha=0.01 and
    # pgd:alpha=0.01:steps=3), which was attacked twice, in two rows; AttackSpecs labelled by the caller are the
    # caller's (reproduce's 10-IFGSM and 20-IFGSM, both capped at 5 steps under --quick)
    keyed = [(spec, *_attack_key(spec)) for spec, item in zip(specs, kept) if not isinstance(item, AttackSpec)]
    keys = [key for _, key, _ in keyed]
    if len(set(labels)) != len(labels) or len(set(keys)) != len(keys):
        twice = {key for key in keys if keys.count(key) > 1}
        same = [f"{spec.name}:{option}" for spec, key, at_default in keyed if key in twice for option in at_default]
        note = [f"{', '.join(same)} {'is its default' if len(same) == 1 else 'are defaults'}"] if same else []
        # two names of one class (apgd-dlr:loss=ce is apgd-ce): the first of its names stands for the others
        first = {}
        for spec, key, _ in keyed:
            if key in twice and first.setdefault(key, spec).name != spec.name:
                note.append(f"{spec.label} is {first[key].label}")
        note = f" ({'; '.join(note)})" if note else ""
        raise EvalError("attacks", f"attacks: the same attack is listed twice: {','.join(labels)}{note}")
    return specs


def _attack_key(spec):
    """(``spec``'s attack class and every option it is built with, whatever the order or the name they were given
    under, the ones left out that are set to the value the attack takes without them), as ``key=value`` texts.
    ``pgd:steps=20`` is pgd (20 steps is its default): attacks.build passes the ATTACKS entry's defaults and None as
    not given; ``steps`` is the option it stands for (square's n_queries); ``apgd-dlr:loss=ce`` is ``apgd-ce`` (one
    class, APGD, with the same options). A callable other than an eps expression, whose text is unknown, is only
    itself."""
    from . import attacks
    from ._options import option_defaults

    cls, entry = attacks.attack_entry(spec.name)  # checked by AttackSpec
    defaults = {**option_defaults(cls), **entry}
    # PGD's norm=None is its default_norm; the canonical spelling (check_norm) is what spec.options holds
    defaults["norm"] = getattr(cls, "default_norm", None) or defaults.get("norm") or "linf"
    alias = attacks.STEPS_ALIAS.get(spec.name)
    options, at_default = {}, []
    for k, v in spec.options.items():
        key = alias if alias and k == "steps" else k
        default = defaults.get(key, inspect.Parameter.empty)
        # an int default of a subclass (AutoAttack's seed: 0, left out) is an int's as written in a spec
        kind = int if isinstance(default, int) and not isinstance(default, bool) else type(default)
        if not callable(v) and type(v) is kind and v == default:
            at_default.append(f"{k}={v}")
        else:
            options[key] = repr(v) if isinstance(v, EpsExpression) or not callable(v) else id(v)
    # evaluation gives every attack its radius and value range
    built = {k: repr(v) for k, v in defaults.items() if k not in ("eps", "clip_min", "clip_max")}
    return (cls, tuple(sorted({**built, **options}.items()))), at_default


def dataset_tensors(dataset):
    """(x, y) of a TensorDataset, or stacked from any map-style dataset yielding (x, y, ...)."""
    # only where items are the stored rows: a subclass with its own __getitem__ (scaling uint8 images to [0, 1], a
    # transform) was evaluated on its raw .tensors, other inputs than fit trained on, without a word
    if getattr(type(dataset), "__getitem__", None) is TensorDataset.__getitem__:
        return dataset.tensors[0], dataset.tensors[1]
    from .train import _check_map_style, check_item_fields, refuse_fields_as_dataset, stack_field

    try:  # a DataLoader failed with "'DataLoader' object is not subscriptable"
        refuse_fields_as_dataset("evaluate", dataset)  # (x, y) itself: "got Tensor of length ?"
        _check_map_style("evaluate", "dataset", dataset, "batch_size=")
    except TypeError as err:
        raise EvalError("data", str(err)) from None
    items = [dataset[i] for i in range(len(dataset))]
    if not items:  # torch.stack of nothing is a traceback; evaluate refuses the empty split by name
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    try:  # fit's item rule: dict items were a bare "KeyError: 0", (x,) items an IndexError
        for item in items:
            check_item_fields("evaluate", item)
    except ValueError as err:
        raise EvalError("data", str(err)) from None
    try:  # a PIL image was "Could not infer dtype of Image", inputs of two shapes torch.stack's error
        # labels as they are, for evaluate's label rule: int() turned a float label 1.4 into 1 without a word and
        # failed on a one-hot label with "only one element tensors can be converted"
        return stack_field("evaluate", items, 0), stack_field("evaluate", items, 1)
    except TypeError as err:
        raise EvalError("data", str(err)) from None


def _check_label_range(y, info):
    """Labels ``y`` (int64) in [0, K) for ``info``'s K classes, before any forward (the metrics refused them after the
    clean pass), read in one host read: min and max were a read each, and each again for the error's values."""
    k = info.num_classes
    if y.numel():
        y_min, y_max = torch.stack(torch.aminmax(y)).tolist()
        if y_min < 0 or y_max >= k:
            raise EvalError("data", f"data: expected labels in [0, {k}) for {info.name}'s {k} classes, got values in "
                                    f"[{y_min}, {y_max}]")


def _check_value_range(x, lo, hi):
    """Inputs ``x`` inside the value range [lo, hi], read in one host read: min and max were a read each, and each
    again for the error's values. Complex inputs have no order (torch's "aminmax_cpu not implemented for
    'ComplexFloat'"): the clean pass's forward names their dtype, as fit's does."""
    if x.numel() and not x.is_complex():
        x_min, x_max = (float(v) for v in torch.stack(torch.aminmax(x)).tolist())
        if x_min < lo or x_max > hi:
            raise EvalError("data", _value_range_problem(x_min, x_max, lo, hi))


def _value_range_problem(x_min, x_max, lo, hi):
    """The one-line error for inputs ``x_min`` .. ``x_max`` outside the value range [lo, hi], saying what they look
    like and what to do: it named only the range, where the common causes are 0-255 pixels (uint8 images, ToTensor
    left out) and torchvision's Normalize in the data pipeline (fit's attacks say the same: check_inputs)."""
    got = f"got values in [{past_bound(x_min, lo, -1)}, {past_bound(x_max, hi, 1)}]"
    fix = value_range_fix(x_min, x_max, lo, hi,
                          "a mean/std normalization (torchvision's Normalize) belongs in the model: evaluate "
                          "robust_ops.attacks.Normalized(model, mean, std) on the unnormalized images, so the radii "
                          "and the clip range are in pixel units",
                          f"; clamp inputs that overshoot only by rounding or resampling, x.clamp({lo}, {hi})")
    return f"data: inputs outside the dataset's value range [{lo}, {hi}], {got}; {fix}"


@torch.no_grad()
def predict_logits(model, x, batch_size=256, device="cpu", adversarial=None):
    """(predictions [N], logits [N, K] float64, a single logit z as [0, z]: ``class_logits``) on CPU, in batches on
    ``device`` in eval mode. Evaluation carries logits, not probabilities: those round to 1.0 past a logit margin of
    ~37, tying the most confident predictions, so AUC, mAP and the worst case's pick among a robust sample's outputs
    would not rank them as the model does. NaN/Inf outputs are an EvalError ("model") naming ``adversarial`` (e.g.
    "fgsm at eps=0.1") for an attack's points."""
    preds, logits = [], []
    with use_model_mode(model, "eval"):  # restores each module's own mode (a frozen submodule stays in eval)
        # an empty x still gets one (empty) forward: its output says how many classes the probabilities have
        for start in range(0, max(x.shape[0], 1), batch_size):
            xb = x[start:start + batch_size].to(device)
            try:  # uint8 or float64 inputs met torch's "Input type (unsigned char) and bias type (float) should be
                # the same" from inside the model's first layer, as fit names them
                out = forward_naming_input_mismatch("evaluate", "dataset", model, xb)
            except InputDtypeError as err:
                raise EvalError("data", str(err)) from None
            except InputShapeError as err:  # a model built for another dataset's channels or image size
                raise EvalError("model", str(err)) from None
            try:  # a tuple output was "'tuple' object has no attribute 'dim'", one row per batch a metrics error
                check_output("evaluate", out, xb.shape[0])
            except ValueError as err:
                raise EvalError("model", str(err)) from None
            if start == 0 and adversarial is None and looks_like_probabilities(out):
                # fit refuses such a model and AutoAttack warns; evaluate's gradient attacks ran on it silently, CW's
                # margin of probabilities losing its gradient where a softmax saturates (rows overstated)
                warn_probabilities("evaluate")
            preds.append(predict_from_output(out).cpu())
            logits.append(class_logits(out).cpu())
    preds, logits = torch.cat(preds), torch.cat(logits)
    bad = int((~torch.isfinite(probabilities(logits)).all(1)).sum())
    if bad and adversarial is not None:  # clean outputs were finite: "check the checkpoint" pointed elsewhere
        raise EvalError("model", f"model outputs NaN/Inf for {bad} of {len(preds)} adversarial inputs of "
                                 f"{adversarial} (finite on the clean ones); check the model's forward near the "
                                 "value range's ends: a log or division of 0, an overflow")
    if bad:  # argmax of NaN is meaningless and the metrics would fail on it
        raise EvalError("model", f"model outputs NaN/Inf for {bad} of {len(preds)} samples; check the checkpoint")
    return preds, logits


def _attack_subset(attack, spec, eps, model, x, y, idx, batch_size, device, value_range):
    """(predictions, logits as ``predict_logits`` gives them) on the adversarial inputs of the samples ``idx``,
    attacked ``batch_size`` at a time. Each batch's adversarial inputs are scored and dropped before the next, so
    memory follows the batch size: holding them all cost a copy of the attacked split per attack and radius
    (docs/cli.md, "Memory")."""
    preds, logits = [], []
    for start in range(0, idx.numel(), batch_size):
        part = idx[start:start + batch_size]
        xb, yb = x[part].to(device), y[part].to(device)
        adv = run_attack(attack, xb, yb).detach()
        try:  # your own attack class (package.module.Class) may return anything
            check_attack_output(f"attacks: {spec.label}", adv, xb, *value_range)
            check_inside_ball(f"attacks: {spec.label}", adv, xb, eps, spec.norm)
        except ValueError as err:
            raise EvalError("attacks", str(err)) from None
        p_adv, lg_adv = predict_logits(model, adv, batch_size, device, adversarial=f"{spec.label} at eps={eps:.4g}")
        preds.append(p_adv)
        logits.append(lg_adv)
    return torch.cat(preds), torch.cat(logits)


def _row(method, attack, norm, eps, y, pred, logits, info):
    # evaluate refused a positive class that does not fit the class count before the first forward
    metrics = classification_metrics(y, pred, num_classes=info.num_classes, positive_class=info.positive_class,
                                     logits=logits)
    return {"method": method, "attack": attack, "norm": norm, "eps": float(eps), **metrics,
            "confusion": confusion_counts(y, pred, num_classes=info.num_classes)}


def check_radii(specs, radii, info):
    """Refuse an L-inf radius wider than the inputs' value range (``--eps 8`` meant as 8/255): that ball reaches
    every input, so the rows would silently measure something else."""
    from .attacks.core import linf_wider_than_range

    lo, hi = info.value_range
    widest = max(radii, default=0.0)
    for spec in specs:
        if spec.norm == "linf" and linf_wider_than_range(widest, lo, hi):
            raise EvalError("eps", f"eps: {widest:g} is an L-inf radius ({spec.label}) wider than the inputs' value "
                                   f"range [{lo:g}, {hi:g}]; give radii in its units, e.g. 8/255, not 8")
    # each attack as evaluate builds it, at each radius in the data's range (no forward: its checks when built): the
    # dry run's eps 1 spans [0, 1], so a step in 0-255 units beside a radius that fits (pgd:alpha=2 at 8/255) was
    # refused only then, after demo had trained every method
    for spec in specs:
        for eps in radii:
            spec.build(_DryRunModel(), eps, lo, hi)


def class_names_problem(info):
    """Why ``info.class_names`` does not name each of its classes, or None: a DatasetInfo built by hand with fewer
    names stopped write_results with a bare IndexError (the report names the positive class by its name)."""
    if len(info.class_names) != info.num_classes:
        return (f"expected {info.num_classes} class_names (one per class, label 0 first), got "
                f"{len(info.class_names)}: {list(info.class_names)}")
    # two classes named alike: the per-class recall table, the saliency titles and a binary set's positive class
    # could not tell them apart
    counts = Counter(map(str, info.class_names))
    twice = [f"{name} {'twice' if n == 2 else f'{n} times'}" for name, n in counts.items() if n > 1]
    if twice:
        return (f"expected {info.num_classes} distinct class_names (one per class, label 0 first), got "
                f"{listing(twice)}: {list(info.class_names)}")
    return None


def warn_default_step_short_of_radii(specs, radii):
    """Warn where an attack's *default* step cannot reach the radius: pgd's alpha 0.001 (MIRST-DM's PGD-20, made
    for 5/255) moves at most steps * 0.001 = 0.02 from its start, so at 8/255 (or pgd:norm=l2 at 0.3) its rows
    measure a weaker attack than the radius allows -- on two-moons at 0.3, weaker than FGSM. An alpha the user gave
    is theirs (reproduce gives the papers' own); only the default is questioned."""
    from . import attacks
    from .report import format_eps

    for spec in specs:
        if "alpha" in spec.options:
            continue
        defaults = attacks.attack_entry(spec.name)[1]  # {} for an Attack subclass given by import path
        alpha, steps = defaults.get("alpha"), spec.options.get("steps", defaults.get("steps"))
        if not isinstance(alpha, float) or not isinstance(steps, int):  # pgdl2's None scales with eps already
            continue
        short = [e for e in radii if e > alpha * steps * (1 + 1e-6)]
        if short:
            warn(f"attacks: {spec.label}'s default step alpha={alpha:g} moves it at most {steps} x {alpha:g} "
                 f"= {alpha * steps:g} from its start, less than eps={format_eps(max(short))}: its rows there "
                 f"measure a weaker attack than the radius allows; give {spec.name}:alpha=eps/4")


def evaluate(model, dataset, info, *, attacks=("fgsm", "pgd", "cw"), eps=(5 / 255,), method="model",
             batch_size=128, device=None, cascade=True, ensemble=False, progress=None, seed=None):
    """Evaluate ``model`` on ``dataset`` under ``attacks`` at each radius in ``eps``.

    Returns a list of rows ``{method, attack, norm, eps, n, accuracy, f1, sensitivity, specificity, precision, auc,
    map, confusion}`` (``confusion``: the confusion matrix of the row's predictions, one list per true class of the
    count predicted as each class, label order): one clean row, one per attack and radius, and a "worst-case" row
    per radius (when more than one attack is given); with ``ensemble=True`` the clean row and a "worst-case" row per
    radius only, also for one attack (protocol, ``cascade`` and ``ensemble``: the module docstring).

    Args:
        model (nn.Module): ``[N, K]`` logits or ``[N]`` / ``[N, 1]`` single logits.
        dataset: TensorDataset of [N, ...] inputs inside ``info``'s value range and labels. Labels follow ``fit``'s
            rule: one integer class per sample, [N] or MedMNIST's [N, 1]; one-hot, float or bool labels are an
            EvalError naming ``data``.
        info (DatasetInfo): the dataset's (number of classes, positive class, value range): ``load_dataset(...).info``.
        attacks: attack specs, ``"fgsm,pgd,cw"`` or a list of them (``name[:key=value...]``: the module docstring).
            Default ("fgsm", "pgd", "cw").
        eps: radii, ``"1/255,2/255"``, a list, a numpy array or a tensor of them, or one number (a numpy scalar
            at its value); sorted, duplicates removed. Default (5/255,).
        method (str): the rows' label (default "model").
        batch_size (int >= 1): samples per forward and attack call (default 128).
        device: where to run (default: the model's device, as torchattacks runs; a model elsewhere is moved there
            with ``model.to(device)``, in place).
        cascade, ensemble (bool): the protocol (module docstring); default True, False.
        progress: a callable(str) told about each step; None (default) or False: nothing is told (False as fit's
            ``progress=False``; True is an error, there is no bar to draw).
        seed: an integer from 0 to 2**32 - 1 (fit's seeds; torch reads a seed's low 32 bits, so others repeated one of
            these) seeds the random draws of the attacks that take them from torch's RNG (PGD's random
            start, attacks without their own ``seed``) inside ``torch.random.fork_rng``: the rows then do not
            depend on what ran before in the process, and the global RNG stays as it was; None (default) draws from
            the global RNG, as torchattacks does. Either way it is one stream for the call, drawn row by row, so such
            an attack's rows depend on the attacks and radii before it; an attack's own ``seed`` (``pgd:seed=N``)
            gives it draws of its own.

    Raises:
        EvalError (a ValueError): a bad input, its ``arg`` naming which: "eps" or "attacks" (a spec that does not
            parse or an option an attack refuses), "data" (labels that are not integer classes, inputs with NaN or
            Inf, outside ``info``'s value range or of another dtype than the model's), "model" (outputs without
            class probabilities, inputs of another channel count than its input layer takes), or another option.
    """
    if seed is not None:
        try:
            seed = check_seed("seed", seed)
        except ValueError as err:
            raise EvalError("seed", str(err)) from None
    _check_info(info)
    specs = parse_attacks(attacks)
    radii = parse_eps(eps)
    if not (isinstance(method, str) and method.strip()):  # the rows' label: None was written as "None", ["a"] failed
        raise EvalError("method", f"method: expected a non-empty label such as 'model', got {method!r}")
    try:  # 2.5 or "4" passed "< 1" (or failed it with a TypeError) and then failed in the first split or range
        batch_size = check_int("batch_size", "batch_size", batch_size)
    except ValueError as err:
        raise EvalError("batch_size", str(err)) from None
    # fit's progress is a bool: progress=True failed only after the clean pass ("'bool' object is not callable")
    if not (progress is None or progress is False or callable(progress)):
        raise EvalError("progress", f"progress: expected a callable(str), or None or False for none, got {progress!r}")
    if device is not None:  # model.to(2.5) or model.to(tensor) changed the model in place before any error
        try:
            device = check_usable_device("device", device)
        except ValueError as err:
            raise EvalError("device", str(err)) from None
    for arg, flag in (("cascade", cascade), ("ensemble", ensemble)):  # ensemble="false" is truthy: it ran
        try:
            check_flags("evaluate", {arg: flag})
        except TypeError as err:
            raise EvalError(arg, str(err)) from None
    if ensemble and not cascade:  # it ran the cascade anyway, as the CLI's --ensemble --no-cascade refusal says
        raise EvalError("cascade", "cascade: ensemble=True always runs its attacks as a cascade; drop cascade=False "
                                   "or ensemble=True")
    x, y = dataset_tensors(dataset)
    try:  # fit's rule: [N] or MedMNIST's [N, 1]; one-hot [N, K] would otherwise fail deep inside the metrics
        y = class_labels("data", y, x.shape[0], what="labels")
    except (TypeError, ValueError) as err:  # a dtype's error says the fix (.long(), .argmax(1)), as the attacks'
        raise EvalError("data", str(err)) from None
    if y.shape[0] == 0:
        raise EvalError("split", "split: the evaluated split has no samples")
    lo, hi = info.value_range
    check_radii(specs, radii, info)
    # before any forward: the metrics would refuse it only after the clean pass over the whole split
    problem = positive_class_problem(info.num_classes, info.positive_class) or class_names_problem(info)
    if problem:  # a positive class on a multi-class set would be ignored while the report still named it
        raise EvalError("data", f"data: info: {problem}")
    _check_label_range(y, info)
    # batch by batch: isfinite builds float and bool temporaries the size of what it checks
    chunks = x.split(batch_size) if x.is_floating_point() else ()
    bad = sum(int((~torch.isfinite(c.reshape(c.shape[0], math.prod(x.shape[1:])))).any(1).sum()) for c in chunks)
    if bad:  # NaN passes the range check below (every comparison with NaN is False)
        raise EvalError("data", f"data: {bad} of {x.shape[0]} inputs contain NaN or Inf")
    _check_value_range(x, lo, hi)
    if not isinstance(model, torch.nn.Module):  # "'function' object has no attribute 'parameters'" (or 'to')
        raise EvalError("model", f"model: expected a torch.nn.Module, got {type(model).__name__}; wrap a function in "
                                 "an nn.Module whose forward calls it")
    if device is None:  # a default of "cpu" moved a GPU model to the CPU, in place, and left it there
        device = model_device(model)
    model = model.to(device)
    # once every argument passed: a warning about a radius check_radii then refused (--eps 8) came before its error
    warn_default_step_short_of_radii(specs, radii)
    # one_probabilities_warning: evaluate's own check warns of a final softmax; its attacks do not again
    with contextlib.nullcontext() if seed is None else _seeded_rng(seed, device), one_probabilities_warning():
        return _evaluate_attacks(model, x, y, info, specs, radii, method, batch_size, device, cascade, ensemble,
                                 progress)


def _check_info(info):
    """An EvalError for an ``info`` that is no DatasetInfo: None failed in evaluate with "'NoneType' object has no
    attribute 'value_range'", results.json's dataset dict in write_results with "'dict' object has no attribute
    'class_names'"."""
    from .data import DatasetInfo

    if not isinstance(info, DatasetInfo):
        raise EvalError("info", f"info: expected the dataset's DatasetInfo (load_dataset(...).info), got "
                                f"{type(info).__name__}")


def _evaluate_attacks(model, x, y, info, specs, radii, method, batch_size, device, cascade, ensemble, progress):
    """evaluate's work on checked arguments: the clean pass, then every attack at every radius."""
    from .report import fmt  # the tables' rounding: ":.3f" rounded 0.5515 (1103 of 2000) to 0.551, they to 0.552

    lo, hi = info.value_range
    try:
        pred0, logits0 = predict_logits(model, x, batch_size, device)
    except EvalError as err:
        if err.arg == "model":
            raise EvalError("model", f"{method}: {err}") from None
        raise
    if logits0.shape[1] != info.num_classes:  # else the metrics refuse "logits", which the caller never passed
        raise EvalError("model", f"{method}: the model scores {logits0.shape[1]} classes (a single logit counts as "
                                 f"2), but {info.name} has {info.num_classes}; build it for this dataset's classes")
    rows = [_row(method, "none", None, 0.0, y, pred0, logits0, info)]
    say = progress or (lambda s: None)
    say(f"{method}: clean accuracy {fmt(rows[0]['accuracy'])}")
    n = y.shape[0]
    correct0 = pred0 == y
    per_eps = {e: [] for e in radii}  # eps -> [(fooled, pred, logits)] for the worst case
    if ensemble:
        return rows + _ensemble_rows(model, x, y, info, specs, radii, method, batch_size, device, say, pred0,
                                     logits0)
    for spec in specs:
        pred, logits = pred0.clone(), logits0.clone()
        fooled = ~correct0
        for e in radii:
            if e == 0:
                idx = torch.arange(0)
            else:
                idx = (~fooled).nonzero().squeeze(1) if cascade else torch.arange(n)
            if idx.numel():
                attack = spec.build(model, e, lo, hi)
                try:
                    p_adv, lg_adv = _attack_subset(attack, spec, e, model, x, y, idx, batch_size, device, (lo, hi))
                except EvalError as err:
                    if err.arg == "model":  # as the clean pass's: led by the method
                        raise EvalError("model", f"{method}: {err}") from None
                    raise
                newly = p_adv != y[idx]
                take = ~fooled[idx] | newly  # keep an earlier adversarial example unless this one also fools
                sel = idx[take]
                pred[sel], logits[sel] = p_adv[take], lg_adv[take]
                fooled[idx] = fooled[idx] | newly
            row = _row(method, spec.label, spec.norm, e, y, pred, logits, info)
            rows.append(row)
            per_eps[e].append((fooled.clone(), pred.clone(), logits.clone()))
            say(f"{method}: {spec.label} eps={e:.4g} accuracy {fmt(row['accuracy'])}")
    if len(specs) > 1:
        worst = pred0, logits0  # the clean input lies inside every ball
        norm = _worst_case_norm(specs)
        for e in radii:
            worst = _worst_case(y, per_eps[e], worst)
            rows.append(_row(method, "worst-case", norm, e, y, *worst, info))
    return rows


def _worst_case_norm(specs):
    """The worst-case rows' norm: the attacks', or "mixed" when they differ (the union of their balls)."""
    norms = {s.norm for s in specs}
    return norms.pop() if len(norms) == 1 else "mixed"


def _worst_case(y, results, smaller):
    """The worst case at one radius, (predictions, logits): per sample, of the inputs evaluated inside the ball, the
    one with the lowest true-class log-odds -- among the fooling ones when an attack fooled the sample. ``results``:
    each attack's (fooled, pred, logits) at this radius; ``smaller``: the worst case at the next smaller
    radius (the clean predictions before the first), whose inputs lie inside this ball too. A fooled sample took the
    first fooling attack's input and a robust one the lowest of the attack outputs alone: the rows' AUC and mAP
    changed with the order of the attacks, could exceed an attack's own row, and rose above the clean input's or a
    smaller radius's where every attack raised a robust sample's true-class score."""
    n = y.shape[0]

    def true_log_odds(lg):  # ranks as the true-class probability does, without its ties at 1.0
        return class_log_odds(lg).gather(1, y.view(-1, 1)).squeeze(1) if n else lg[:, 0]

    fooled = torch.zeros(n, dtype=torch.bool)
    for f, *_ in results:
        fooled |= f
    pred, logits = smaller[0].clone(), smaller[1].clone()
    # a fooled sample ends on a fooling input: the smaller radius's counts when it fools (without the cascade an
    # attack's row takes a later fooling input scoring higher), any fooling one scores below inf otherwise
    score = true_log_odds(logits).masked_fill(fooled & (pred == y), math.inf)
    for f, p, lg in results:
        s = true_log_odds(lg)
        take = (f | ~fooled) & (s < score)
        pred[take], logits[take], score[take] = p[take], lg[take], s[take]
    return pred, logits


def _ensemble_rows(model, x, y, info, specs, radii, method, batch_size, device, say, pred0, logits0):
    """One worst-case row per radius, radii ascending: the attacks' AutoAttack-style cascade runs only on the samples
    still robust after the smaller radii, and a sample fooled there keeps that input (it lies inside every larger
    ball), as the per-attack cascade does. Run afresh at each radius, a sample fooled at 1/255 but not at 4/255
    counted as robust at 4/255: robust accuracy rose with the radius."""
    from .attacks import ensemble as run_ensemble
    from .report import fmt

    lo, hi = info.value_range
    rows = []
    pred, logits = pred0.clone(), logits0.clone()
    fooled = pred0 != y
    for e in radii:
        idx = (~fooled).nonzero().squeeze(1) if e > 0 else torch.arange(0)
        if idx.numel():
            attacks = [s.build(model, e, lo, hi) for s in specs]
            try:
                res = run_ensemble(model, x[idx].to(device), y[idx].to(device), attacks, cascade=True, clip_min=lo,
                                   clip_max=hi, batch_size=batch_size, names=[s.label for s in specs])
            except NonFiniteOutputError as err:  # the model's fault, not the attacks' options
                raise EvalError("model", f"{method}: {err}") from None
            except (ValueError, TypeError) as err:  # a bad option value an attack checks only when run
                raise EvalError("attacks", f"attacks: {err}") from None
            # scored as AutoAttack returns them: a robust sample's clean input, so its clean scores
            try:
                p_adv, lg_adv = predict_logits(model, res.x_adv.cpu(), batch_size, device,
                                               adversarial=f"the ensemble at eps={e:.4g}")
            except EvalError as err:
                raise EvalError("model", f"{method}: {err}") from None
            newly = p_adv != y[idx]
            pred[idx[newly]], logits[idx[newly]] = p_adv[newly], lg_adv[newly]
            fooled[idx[newly]] = True
        row = _row(method, "worst-case", _worst_case_norm(specs), e, y, pred, logits, info)
        rows.append(row)
        say(f"{method}: ensemble eps={e:.4g} robust accuracy {fmt(row['accuracy'])}")
    return rows


# ----------------------------------------------------------------------------------------------- results files


def git_revision():
    """The robust_ops checkout's commit ("-dirty" when tracked files differ), None for an installed package: one in a
    virtual environment inside the user's own git project would otherwise report that project's commit."""
    path = Path(__file__).resolve()
    here = path.parent
    try:
        subprocess.check_call(["git", "ls-files", "--error-unmatch", "--", path.name], cwd=here,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # raises unless tracked here
        rev = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=here, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=here, stderr=subprocess.DEVNULL) != 0
        return rev + ("-dirty" if dirty else "")
    except Exception:
        return None


def environment(device="cpu"):
    import numpy
    import sklearn

    from . import __version__

    dev = str(device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
    return {
        "robust_ops": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "scikit_learn": sklearn.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": dev, "threads": torch.get_num_threads(), "git_revision": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _json_safe(value, where=None):
    """``value`` in plain JSON types: NaN and Inf as None, numpy and torch values as the numbers they hold, a path,
    torch.device or torch.dtype as its text, a fraction or Decimal as its float. Anything else is an EvalError naming
    its entry (``where``: the top-level key, e.g. "config"), where json.dump's "Object of type device is not JSON
    serializable" named neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, dict):
        out, keys = {}, {}
        for k, v in value.items():
            # json keys are strings: {1: "a", "1": "b"} kept only "b", without a word
            if str(k) in keys:
                raise _json_error(where, f"the keys {keys[str(k)]!r} and {k!r} both read {str(k)!r} in results.json; "
                                         "rename one of them")
            keys[str(k)] = k
            out[str(k)] = _json_safe(v, where and f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, where and f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (torch.device, torch.dtype)):  # config={"device": torch.device("cuda")}
        return str(value)
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return _json_safe(value.tolist(), where)
    if isinstance(value, np.generic):  # numpy scalars (np.int64 seeds, np.float32 values): json.dump refuses them
        return _json_safe(value.item(), where)
    if isinstance(value, numbers.Real):  # Fraction(1, 255)
        return _json_safe(float(value), where)
    if isinstance(value, decimal.Decimal):  # no numbers.Real: Decimal("0.1") was "a Decimal ..., which results.json
        return None if value.is_nan() else _json_safe(float(value), where)  # cannot hold"; float() of sNaN raises
    raise _json_error(where, f"a {type(value).__name__} ({value!r:.60}), which results.json cannot hold; give it as a "
                             "string, number, bool, None, list or dict")


def _json_error(where, problem):
    """_json_safe's EvalError for the entry ``where`` (None: "rows"), its ``arg`` the argument that holds it."""
    where = where or "rows"
    top = where.split("[")[0]
    return EvalError("info" if top == "dataset" else top, f"{where}: {problem}")


def results_document(rows, info, config=None, device="cpu", paper=None, notes=None, extra_fields=None):
    """The results.json document (plain JSON types; NaN becomes null)."""
    _check_info(info)
    problem = class_names_problem(info)
    if problem:
        raise EvalError("data", f"data: info: {problem}")
    for arg, value in (("config", config), ("extra_fields", extra_fields)):
        # config=True met "'bool' object has no attribute 'get'" in the report, extra_fields="x" dict.update's error,
        # and 0 or [] were dropped as "no settings"
        if not (value is None or isinstance(value, dict)):
            raise EvalError(arg, f"{arg}: expected a dict or None, got {value!r}")
    seen = set()
    for r in rows:  # two rows under one key: the tables and figures would show only the last one
        key = (r["method"], r["attack"], r.get("norm"), r["eps"])
        if key in seen:
            raise EvalError("method", f"method: two rows for method {r['method']!r}, attack {r['attack']!r}, "
                                      f"eps {r['eps']:g}; give each run its own method label")
        seen.add(key)
    doc = {
        "schema": SCHEMA,
        "dataset": info.to_dict(),
        "synthetic": bool(info.synthetic),
        "metrics": list(metric_names(info.num_classes)),
        "config": config or {},
        "environment": environment(device),
        "rows": rows,
    }
    if paper:
        doc["paper"] = paper
    if notes:
        doc["notes"] = notes
    doc.update(extra_fields or {})
    extra = set(extra_fields or ())
    return {key: _json_safe(value, f"extra_fields[{key!r}]" if key in extra else key) for key, value in doc.items()}


class AtomicOutput:
    """Collect output files in a staging folder beside ``out_dir`` and move them in only when everything was
    written (``with AtomicOutput(out_dir) as stage: ...``); on an error nothing new is left in ``out_dir``."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)

    def __enter__(self):
        self.stage, self._started, self._lock = make_staging_folder(self.out_dir)
        return self.stage

    def __exit__(self, exc_type, exc, tb):
        moved = False
        try:
            if exc_type is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                for path in sorted(self.stage.rglob("*")):
                    rel = path.relative_to(self.stage)
                    if path.is_dir():
                        (self.out_dir / rel).mkdir(parents=True, exist_ok=True)
                    else:
                        os.replace(path, self.out_dir / rel)
                moved = True
        finally:
            remove_staging_folder(self.out_dir, self.stage, self._started, self._lock, moved)
        return False


def _check_out_dir(out_dir):
    """An EvalError, before any work, for an ``out_dir`` write_results cannot write: a file there stopped it only
    once every figure was drawn (FileExistsError), and a folder it cannot write in (/proc, read-only) named its
    staging folder beside it, ".nope.partial-8phovyj7", not out_dir. Results are staged beside out_dir and moved
    into it, so both places must take files: the CLI's ``--out`` rule, one function (_files.out_dir_problem)."""
    problem = out_dir_problem(out_dir)
    if problem:
        raise EvalError("out_dir", f"write_results: out_dir={os.fspath(out_dir)!r}: {problem}")


def _check_saliency(saliency, rows):
    """write_results' ``saliency`` as it draws it, (models, x, y), numpy images and labels as tensors; an EvalError
    naming the fix otherwise, before any file is written: (model, x, y) stopped it with "'SmallCNN' object has no
    attribute 'items'", a pair with "not enough values to unpack", numpy images with "no attribute 'dim'". A model
    keyed by a name that no row's method is (a misspelt "MIRST_DM") drew a map under that name, beside no results."""
    if saliency is None:
        return None
    form = "(models, x, y): a dict {method: model}, a few test images [N, C, H, W] and their labels"
    if not (isinstance(saliency, (tuple, list)) and len(saliency) == 3):
        got = f"a {type(saliency).__name__} of {len(saliency)} items" if isinstance(saliency, (tuple, list)) else \
            f"a {type(saliency).__name__}"
        raise EvalError("saliency", f"saliency: expected {form}, got {got}")
    models, x, y = saliency
    if isinstance(models, torch.nn.Module):
        raise EvalError("saliency", f"saliency: expected {form}, got the model itself ({type(models).__name__}); "
                                    "pass ({'<method>': model}, x, y), the method as its rows name it")
    if not isinstance(models, dict):
        raise EvalError("saliency", f"saliency: expected {form}, got its models as a {type(models).__name__}")
    bad = [m for m in models.values() if not isinstance(m, torch.nn.Module)]
    if bad:
        raise EvalError("saliency", f"saliency: expected {form}, got a {type(bad[0]).__name__} among the models")
    x, y = (torch.as_tensor(v) if isinstance(v, np.ndarray) else v for v in (x, y))
    if not torch.is_tensor(x):
        raise EvalError("saliency", f"saliency: expected {form}, got images of type {type(x).__name__}")
    from .report import saliency_images_problem

    problem = saliency_images_problem(x)
    if problem:  # [N, H, W] drew no map and said nothing
        raise EvalError("saliency", f"saliency: {problem}")
    if not (torch.is_tensor(y) or isinstance(y, (list, tuple))):  # None: "Could not infer dtype of NoneType"
        raise EvalError("saliency", f"saliency: expected {form}, got labels of type {type(y).__name__}")
    methods = list(dict.fromkeys(r.get("method") for r in rows))
    unknown = [m for m in models if m not in methods]
    if unknown:
        raise EvalError("saliency", f"saliency: no row's method is {unknown[0]!r}; key each model by its rows' method "
                                    f"({', '.join(map(repr, methods)) or 'none: no rows'})")
    return models, x, y


def write_results(out_dir, rows, info, *, config=None, device="cpu", paper=None, notes=None, title=None,
                  figures=True, saliency=None, extra_markdown=None, extra_fields=None):
    """Write results.json, report.md and the figures into ``out_dir`` atomically; returns the written paths. Figures
    an earlier write left there (``<metric>_vs_eps.png``, ``saliency_*.png``) that this one does not draw are removed.

    Args:
        out_dir: the folder (str or path-like), made if missing.
        rows: the result rows, a list of :func:`evaluate`'s dicts (several calls' rows concatenated; two rows with
            the same method, attack, norm and eps are refused).
        info: the dataset's DatasetInfo (class names, positive class), recorded as results.json's ``dataset``.
        config: a dict of run settings for results.json's ``config`` and report.md's Configuration, or None ({});
            numpy and torch numbers are recorded as the numbers they hold, a path, torch.device or torch.dtype as
            its text, a fraction or Decimal as its float (a Decimal NaN as null, as a float NaN).
        device: the device the rows were computed on (default "cpu"), recorded in results.json's ``environment``.
        paper: the published numbers to compare with (reproduce's), recorded as results.json's ``paper`` and shown
            beside ours in report.md (report.paper_comparison_table); None (default) or empty: not recorded.
        notes: a list of text, recorded as results.json's ``notes`` and report.md's Notes; None (default) or empty:
            not recorded.
        title: report.md's heading, text (a number is refused, the message giving it as text: title='3'); None
            (default): "Robustness evaluation".
        figures: draw ``<metric>_vs_eps.png`` (and the saliency maps) when True (default); False draws none.
        saliency: optional ``(models: {method: model}, x, y)`` for Grad-CAM / input-gradient maps of a few images
            (tensors or numpy arrays); each model keyed by its rows' method.
        extra_markdown: Markdown text put into report.md before its "All rows" table, or None (default).
        extra_fields: a dict of more top-level results.json entries (they replace those of the same name), or None.

    Returns:
        {"results": Path of results.json, "report": Path of report.md, "figures": [Paths of the figures drawn]}.

    Raises:
        EvalError: out_dir is a file, or a folder it or the folder above it cannot be written (checked before any
            work), info is no DatasetInfo or its class_names are not one distinct name per class, figures is not
            True or False, title or extra_markdown neither a string nor None, config or extra_fields is neither a
            dict nor None, one of their values (or of rows, paper, notes) is none of those JSON can hold (a set,
            an object: its ``arg`` the argument, the message naming the entry) or two of one dict's keys read the
            same as results.json's text keys (``1`` and ``"1"``), paper is no list of dicts each with a method,
            attack and number eps (report.paper_rows_problem), notes neither text, a list of text nor None, two
            rows share a method, attack, norm and eps, or ``saliency`` is not ``(models, x, y)`` with models a dict
            of modules, each keyed by a method of the rows.
    """
    from . import report

    try:  # figures="no" is truthy: it drew them all
        check_flags("write_results", {"figures": figures})
    except TypeError as err:
        raise EvalError("figures", str(err)) from None
    for arg, text in (("title", title), ("extra_markdown", extra_markdown)):  # 3: a TypeError joining report.md
        problem = report.report_text_problem("write_results", arg, text)
        if problem:
            raise EvalError(arg, problem)
    problem = paper and report.paper_rows_problem("write_results", paper)  # report.md's comparison: a KeyError
    if problem:
        raise EvalError("paper", problem)
    if not (notes is None or isinstance(notes, str) or isinstance(notes, (list, tuple))
            and all(isinstance(n, str) for n in notes)):  # notes=3: "'int' object is not iterable" in report.md
        raise EvalError("notes", f"write_results: expected notes to be a list of text (a note each) or None, got "
                                 f"{notes!r:.60}")
    _check_out_dir(out_dir)
    saliency = _check_saliency(saliency, rows)
    doc = results_document(rows, info, config, device, paper, notes, extra_fields)
    with AtomicOutput(out_dir) as stage:
        with open(stage / "results.json", "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        figure_names = []
        if figures:
            for metric in report.figure_metrics(info):
                name = f"{metric}_vs_eps.png"
                if report.plot_metric_vs_radius(rows, stage / name, metric=metric, info=info):
                    figure_names.append(name)
            if saliency is not None:
                models, xs, ys = saliency
                taken = set()
                for method, model in models.items():
                    # "MIRST-DM" and "mirst dm" share a slug: the second map overwrote the first one's file
                    base = name = f"saliency_{report.slug(method)}"
                    for k in itertools.count(2):
                        if name not in taken:
                            break
                        name = f"{base}-{k}"
                    taken.add(name)
                    name += ".png"
                    if report.plot_saliency(model, xs, ys, stage / name, info=info, title=method):
                        figure_names.append(name)
        text = report.markdown_report(doc, title=title, figures=figure_names, extra=extra_markdown)
        (stage / "report.md").write_text(text)
    out = Path(out_dir)
    # figures an earlier write left here that this one did not draw (a metric now undefined in every row, another
    # method's saliency map) would stand beside results they do not show
    drawn_by_us = {f"{metric}_vs_eps.png" for metric in METRIC_LABELS}
    for path in out.glob("*.png"):
        if path.name not in figure_names and (path.name in drawn_by_us or path.name.startswith("saliency_")):
            path.unlink()
    return {"results": out / "results.json", "report": out / "report.md",
            "figures": [out / n for n in figure_names]}
