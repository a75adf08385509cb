"""Published defenses as small per-batch loss objects (see docs/design.md and docs/defenses/<name>.md).

``build(name, **kwargs)`` makes one from its CLI name (or your own class's dotted import path, package.module.Class);
each defense is also importable by class:
Standard, AT, SAT, TRADES, RST, GR, LLR, MART, FAT, AMAT, MIRST, MIRSTDM, DPAAT, ARFL (IMA lives in robust_ops.ima).
Your own defense subclasses Defense, or PGDDefense for the shared attack settings (docs/defenses/index.md).
"""

import importlib

from .._import_path import PATH_HINT, class_from_path, is_import_path
from .._options import check_options
from ._common import PGDDefense, option_hints, unwrap  # noqa: F401  (for your own defense: docs/defenses/index.md)
from .adaptive import AMAT, DPAAT, synchronization_loss  # noqa: F401
from .adversarial import AT, FAT, RST, SAT, Standard  # noqa: F401
from .arfl import ARFL, robust_feature_loss  # noqa: F401
from .base import Defense, DefenseOutput  # noqa: F401
from .mirst import MIRST, MIRST_BETA, MIRST_EMIT, MIRSTDM  # noqa: F401
from .regularization import GR, LLR  # noqa: F401
from .trades import MART, TRADES  # noqa: F401

__all__ = [
    "build", "NAMES", "Defense", "DefenseOutput", "PGDDefense", "unwrap", "Standard", "AT", "SAT", "TRADES", "RST",
    "GR", "LLR", "MART", "FAT", "AMAT", "MIRST", "MIRSTDM", "DPAAT", "ARFL", "robust_feature_loss",
    "synchronization_loss"
]

# name -> "module:Class"; IMA is imported lazily (robust_ops.ima imports the attacks and the search op).
REGISTRY = {
    "standard": f"{__name__}.adversarial:Standard",
    "at": f"{__name__}.adversarial:AT",
    "sat": f"{__name__}.adversarial:SAT",
    "trades": f"{__name__}.trades:TRADES",
    "rst": f"{__name__}.adversarial:RST",
    "gr": f"{__name__}.regularization:GR",
    "llr": f"{__name__}.regularization:LLR",
    "mart": f"{__name__}.trades:MART",
    "fat": f"{__name__}.adversarial:FAT",
    "amat": f"{__name__}.adaptive:AMAT",
    "mirst": f"{__name__}.mirst:MIRST",
    "mirst-dm": f"{__name__}.mirst:MIRSTDM",
    "ima": "robust_ops.ima:IMA",
    "dpaat": f"{__name__}.adaptive:DPAAT",
    "arfl": f"{__name__}.arfl:ARFL",
}
NAMES = tuple(REGISTRY)


def refuse_a_class(where, defense, expected="a defense object or a defense name"):
    """TypeError for a Defense class given where an object or a name goes (``fit(model, AT, ...)``): it passed as a
    callable and failed inside, as "Defense.holds_state() missing 1 required positional argument: 'self'"."""
    if isinstance(defense, type):
        cls = defense.__name__
        key = next((k for k, path in REGISTRY.items() if path.endswith(f":{cls}")), None)
        named = f", or its name, {key!r}" if key and defense_class(key) is defense else ""
        raise TypeError(f"{where}: expected {expected}, got the class {cls}; build one, {cls}(...) with its "
                        f"options{named}")


def defense_class(name):
    """The class registered under ``name`` (one of NAMES), or the Defense subclass at the dotted import path ``name``
    (package.module.Class; its module is imported)."""
    refuse_a_class("defenses.build", name, "a defense name")
    if is_import_path(name):  # as given: module and class names are case-sensitive
        return class_from_path("defenses.build", "defense", name, Defense, "robust_ops.defenses.Defense",
                               "__call__(model, x, y, ids=None) -> DefenseOutput")
    # only a string names a registered defense (a list such as ["at"] failed as "unhashable type: 'list'")
    key = name.lower().replace("_", "-") if isinstance(name, str) else None
    if key not in REGISTRY:
        raise ValueError(f"defenses.build: unknown defense {name!r}; expected one of {', '.join(NAMES)}, {PATH_HINT}")
    module, cls = REGISTRY[key].split(":")
    return getattr(importlib.import_module(module), cls)


def build(name, **kwargs):
    """A defense from its name (standard, at, sat, trades, rst, gr, llr, mart, fat, amat, mirst, mirst-dm, ima, dpaat,
    arfl) or your own class's dotted import path (package.module.Class, a Defense subclass) with its papers' defaults,
    overridden by ``kwargs``; unknown names and options raise ValueError listing the known ones."""
    cls = defense_class(name)
    check_options(name, cls, kwargs, option_hints(cls))
    return cls(**kwargs)
