"""Adversarial attacks; the PGD family, APGD and Square on one shared PGD core, FAB on its own boundary projections
(see docs/design.md and docs/attacks.md).

Functions return ``x_adv`` (``pgd(..., emit=...)`` returns ``(x_adv, iterates)``); classes follow torchattacks:
``PGD(model, eps=...)(x, y)``; ``build(name, model, **kwargs)`` makes an attack from a CLI name (or your own
Attack subclass's dotted import path, package.module.Class).
"""

from .._import_path import PATH_HINT, class_from_path, is_import_path
from .._options import check_options
from . import base
from .base import Attack
from .context import (InputDeviceError, InputDtypeError, InputShapeError, NonFiniteInputError, NonFiniteOutputError,
                      Normalized, OneSampleBatchNormError, attack_context)
from .core import PGDResult, run_pgd
from .apgd import APGD, APGDT, apgd, apgd_t
from .ensemble import AutoAttack, EnsembleResult, ensemble
from .fab import FAB, FABT, fab, fab_t
from .noise import WhiteNoise, uniform_ball, white_noise
from .pgd import BIM, CW, FGSM, PGD, PGDL2, bim, cw_linf, fgsm, ifgsm, pgd
from .square import Square, square

__all__ = [
    "Attack", "Normalized", "attack_context", "PGDResult", "run_pgd", "build", "attack_entry", "ATTACKS",
    "fgsm", "ifgsm", "bim", "pgd", "cw_linf", "apgd", "apgd_t", "fab", "fab_t", "square", "white_noise", "uniform_ball",
    "ensemble", "EnsembleResult", "FGSM", "BIM", "PGD", "PGDL2", "CW", "APGD", "APGDT", "FAB", "FABT", "Square",
    "WhiteNoise", "AutoAttack",
    "NonFiniteInputError", "NonFiniteOutputError", "InputDtypeError", "InputDeviceError", "InputShapeError",
    "OneSampleBatchNormError",
]

# CLI name -> (class, defaults). Defaults follow the papers: MIRST-DM evaluates FGSM, PGD-20 with step 0.001 and
# CW-Linf-10 at eps = 5/255; DPAAT uses L2 eps = 0.3. CW's step is not the paper's 0.001 (10 such steps reach only
# half of the 5/255 ball, a weaker default attack) but 2.5 * eps / steps; `cw:alpha=0.001` and reproduce's protocols
# give the paper's. pgdl2's alpha None is pgd()'s 2.5 * eps / steps of the eps and steps in use (0.0375 for the
# defaults), so overriding eps or steps keeps the whole ball reachable.
ATTACKS = {
    "fgsm": (FGSM, dict(eps=5 / 255)),
    "ifgsm": (BIM, dict(eps=5 / 255, steps=10)),
    "pgd": (PGD, dict(eps=5 / 255, alpha=0.001, steps=20)),
    "pgdl2": (PGDL2, dict(eps=0.3, alpha=None, steps=20)),
    "cw": (CW, dict(eps=5 / 255, steps=10)),
    "apgd-ce": (APGD, dict(eps=5 / 255, steps=100, loss="ce")),
    "apgd-dlr": (APGD, dict(eps=5 / 255, steps=100, loss="dlr")),
    "apgd-t": (APGDT, dict(eps=5 / 255, steps=100)),
    "fab": (FAB, dict(eps=5 / 255, steps=100)),
    "fab-t": (FABT, dict(eps=5 / 255, steps=100)),
    "square": (Square, dict(eps=5 / 255, n_queries=5000)),
    "noise": (WhiteNoise, dict(eps=5 / 255, trials=10, seed=0)),
    "autoattack": (AutoAttack, dict(eps=5 / 255)),
}

STEPS_ALIAS = {"square": "n_queries", "noise": "trials"}


def attack_entry(name):
    """(class, defaults) of the attack ``name``: its ``ATTACKS`` entry, or for a dotted import path
    (package.module.Class; its module is imported) that Attack subclass with no defaults (its constructor's apply).
    ValueError naming the name or path otherwise."""
    if is_import_path(name):  # as given: module and class names are case-sensitive
        return class_from_path("attacks.build", "attack", name, Attack, "robust_ops.attacks.Attack",
                               "forward(x, y) -> x_adv"), {}
    if not isinstance(name, str) or name not in ATTACKS:  # ["pgd"] would fail as "unhashable type: 'list'"
        raise ValueError(f"attacks.build: unknown attack {name!r}; expected one of {', '.join(ATTACKS)}, {PATH_HINT}")
    return ATTACKS[name]


def build(name, model, **kwargs):
    """Make the attack called ``name`` on ``model`` (names: the keys of ``ATTACKS``: fgsm, ifgsm, pgd, pgdl2, cw,
    apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square, noise, autoattack; or the dotted import path of your own Attack
    subclass, package.module.Class). kwargs (eps, steps, alpha, norm, seed, ...) override the paper defaults in
    ``ATTACKS``; None values are ignored; ``steps`` means n_queries for square and trials for noise. An option the
    attack does not take raises ValueError."""
    cls, defaults = attack_entry(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "steps" in kwargs and name in STEPS_ALIAS:  # the CLI's --steps means queries / trials for these
        if STEPS_ALIAS[name] in kwargs:  # one would silently replace the other
            raise ValueError(f"attacks.build: {name}: steps means {STEPS_ALIAS[name]} here; give one of them, not both")
        kwargs[STEPS_ALIAS[name]] = kwargs.pop("steps")
    check_options(f"attacks.build: {name}", cls, kwargs, base.option_hints(cls))
    return cls(model, **{**defaults, **kwargs})
