"""Adversarial attacks on one shared PGD core (see docs/design.md and docs/attacks.md).

Functions return ``x_adv`` (``pgd(..., emit=...)`` returns ``(x_adv, iterates)``); classes follow torchattacks:
``PGD(model, eps=...)(x, y)``; ``build(name, **kwargs)`` makes an attack from a CLI name.
"""

from .base import Attack
from .context import Normalized, attack_context
from .core import PGDResult, run_pgd
from .ensemble import EnsembleResult, ensemble
from .noise import WhiteNoise, uniform_ball, white_noise
from .pgd import BIM, CW, FGSM, PGD, PGDL2, bim, cw_linf, fgsm, ifgsm, pgd

__all__ = [
    "Attack", "Normalized", "attack_context", "PGDResult", "run_pgd", "build", "ATTACKS",
    "fgsm", "ifgsm", "bim", "pgd", "cw_linf", "white_noise", "uniform_ball", "ensemble", "EnsembleResult",
    "FGSM", "BIM", "PGD", "PGDL2", "CW", "WhiteNoise",
]

# CLI name -> (class, defaults). Defaults follow the papers: MIRST-DM evaluates FGSM, PGD-20 with step 0.001 and
# CW-Linf-10 at eps = 5/255; DPAAT uses L2 eps = 0.3.
ATTACKS = {
    "fgsm": (FGSM, dict(eps=5 / 255)),
    "ifgsm": (BIM, dict(eps=5 / 255, steps=10)),
    "pgd": (PGD, dict(eps=5 / 255, alpha=0.001, steps=20)),
    "pgdl2": (PGDL2, dict(eps=0.3, alpha=0.0375, steps=20)),
    "cw": (CW, dict(eps=5 / 255, steps=10)),
    "noise": (WhiteNoise, dict(eps=5 / 255, trials=10, seed=0)),
}


def build(name, model, **kwargs):
    """Make the attack called ``name`` (fgsm, ifgsm, pgd, pgdl2, cw, ...) on ``model``; kwargs (eps, steps, alpha,
    norm, ...) override the paper defaults in ``ATTACKS``."""
    if name not in ATTACKS:
        raise ValueError(f"attacks.build: unknown attack {name!r}; expected one of {', '.join(ATTACKS)}")
    cls, defaults = ATTACKS[name]
    options = {**defaults, **{k: v for k, v in kwargs.items() if v is not None}}
    try:
        return cls(model, **options)
    except TypeError as err:
        raise ValueError(f"attacks.build: bad options for {name!r}: {err}") from None
