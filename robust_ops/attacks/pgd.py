"""Gradient attacks on the PGD core: FGSM, iterative FGSM (BIM), PGD (Linf / L2) and CW-Linf.

All of them are ``run_pgd`` with particular settings; see docs/attacks.md for the defaults taken from the papers.
"""

import math
import numbers

import torch

from .._options import check_flags, check_seed, fits_a_float
from .base import Attack, refuse_positional_options
from .core import (check_budget, check_draws, check_early_stop, check_kappa, check_loss, check_norm, check_step_moves,
                   check_steps, names_foreign_options, run_pgd)


def default_alpha(name, eps, steps, factor, x):
    """factor * eps / steps (per sample when eps is a tensor). eps is type-checked here, before float() would fail
    on a list or array with a message about scalars; its values are checked with alpha's by run_pgd."""
    if torch.is_tensor(eps):
        return eps * (factor / steps)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        n = x.shape[0] if torch.is_tensor(x) and x.dim() else "N"
        raise TypeError(f"{name}: expected eps to be a number or a tensor of shape [{n}], got {type(eps).__name__}")
    if not fits_a_float(eps):  # eps=10**400: float() raised a bare OverflowError; run_pgd's check names eps
        return math.inf
    return float(eps) * factor / steps


def make_generator(seed, x, name="attack"):
    """A torch.Generator seeded with ``seed`` on the device of the inputs ``x`` (None: the global RNG); errors name the
    attack ``name``. Called before the attack checks ``x``: an x that is no tensor (a list) failed here with
    "'list' object has no attribute 'device'", where the attack's own check names x and what it takes."""
    if check_seed(name, seed, optional=True) is None:
        return None
    return torch.Generator(device=x.device if torch.is_tensor(x) else "cpu").manual_seed(int(seed))


@names_foreign_options
def fgsm(model, x, y, *, eps, norm="linf", loss="ce", targeted=False, clip_min=0.0, clip_max=1.0,
         model_mode="eval"):
    r"""Fast gradient sign method (Goodfellow et al. 2015, arXiv:1412.6572): ``x + eps * sign(grad)``, clipped;
    with ``norm="l2"`` the fast gradient method ``x + eps * grad / ||grad||``.

    One step of ``run_pgd`` with ``alpha = eps`` and no random start (the fused step's projection is then a no-op
    up to rounding; results are bitwise those of torchattacks.FGSM). Threat model: white-box, ball of radius eps.

    Args: model; x (Tensor[N, ...]) in [clip_min, clip_max]; y (LongTensor[N]); eps (float or Tensor[N]);
    norm ("linf" or "l2", any case); loss ("ce", "cw" or a callable); targeted; clip_min, clip_max; model_mode.
    Returns x_adv (Tensor[N, ...]).

    Raises NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError, InputShapeError as
    :func:`run_pgd`.

    Example::

        >>> x_adv = robust_ops.attacks.fgsm(model, x, y, eps=5 / 255)
    """
    return run_pgd(model, x, y, eps=eps, alpha=eps, steps=1, norm=norm, loss=loss, targeted=targeted,
                   clip_min=clip_min, clip_max=clip_max, model_mode=model_mode, name="fgsm").x_adv


@names_foreign_options
def pgd(model, x, y, *, eps, alpha=None, steps=10, norm="linf", random_start=True, loss="ce", targeted=False,
        kappa=0.0, emit=None, early_stop=False, clip_min=0.0, clip_max=1.0, model_mode="eval", generator=None):
    r"""Projected gradient descent (Madry et al. 2018, arXiv:1706.06083), Linf or L2.

    Args:
        model: ``[N, ...] -> [N, K]`` logits or ``[N]`` / ``[N, 1]`` single logits.
        x (Tensor[N, ...]): clean inputs in ``[clip_min, clip_max]``; y (LongTensor[N]): labels (targets if targeted).
        eps (float or Tensor[N]): radius. alpha (float or Tensor[N]): step size; default ``2.5 * eps / steps``.
        steps (int): default 10. norm: "linf" (default) or "l2" (any case). random_start (bool): default True.
        loss: "ce" (default), "cw" (margin, confidence ``kappa``) or a callable ``(out, y) -> scalar or [N]``.
        emit (tuple of int): also return the iterates after these step counts, stacked ``[len(emit), N, ...]``,
            written by the fused step (no extra copy).
        early_stop: False (default), True (freeze a sample once fooled) or an int tau (FAT).
        clip_min, clip_max, model_mode ("eval" default, "train", "keep"), generator (for the random start).

    Returns:
        x_adv, or ``(x_adv, iterates)`` when emit is given.

    Raises:
        NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError, InputShapeError: as
        :func:`run_pgd`.

    Example::

        >>> x_adv, its = robust_ops.attacks.pgd(model, x, y, eps=5 / 255, alpha=0.001, steps=10, emit=(2, 4, 6, 8))
    """
    return _pgd("pgd", model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start, loss=loss,
                targeted=targeted, kappa=kappa, emit=emit, early_stop=early_stop, clip_min=clip_min, clip_max=clip_max,
                model_mode=model_mode, generator=generator)


def _pgd(name, model, x, y, *, eps, alpha, steps, norm, random_start, loss, targeted, kappa, emit, early_stop,
         clip_min, clip_max, model_mode, generator):
    """:func:`pgd`, its errors naming ``name`` ("pgd", or "pgdl2" for ``PGDL2``, whose errors named pgd when run)."""
    steps = check_steps(name, steps)
    check_draws(name, "generator", generator, random_start)
    if alpha is None:
        alpha = default_alpha(name, eps, steps, 2.5, x)
    res = run_pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start, loss=loss,
                  targeted=targeted, kappa=kappa, emit=emit, early_stop=early_stop, clip_min=clip_min,
                  clip_max=clip_max, model_mode=model_mode, generator=generator, name=name)
    return (res.x_adv, res.iterates) if emit is not None else res.x_adv


@names_foreign_options
def ifgsm(model, x, y, *, eps, alpha=None, steps=10, norm="linf", loss="ce", targeted=False, emit=None,
          clip_min=0.0, clip_max=1.0, model_mode="eval"):
    r"""Iterative FGSM / BIM (Kurakin et al. 2017, arXiv:1607.02533): PGD without random start.

    Default ``alpha = eps / steps`` (the whole budget is reachable in ``steps`` steps). ``norm="l2"`` gives the L2
    iterative gradient method. DPAAT's 10-/20-IFGSM are Linf, as its text says (``reproduce dpaat-bus`` runs them at
    eps = 1/255).

    Args: model; x (Tensor[N, ...]) in [clip_min, clip_max]; y (LongTensor[N]) labels (targets if targeted);
    eps (float or Tensor[N]); alpha (float or Tensor[N]): default ``eps / steps``; steps (int): default 10;
    norm ("linf" or "l2", any case); loss ("ce", "cw" or a callable); targeted; emit (tuple of int, as
    :func:`pgd`); clip_min, clip_max; model_mode. Returns x_adv, or ``(x_adv, iterates)`` with emit.

    Raises NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError, InputShapeError as
    :func:`run_pgd`.
    """
    steps = check_steps("ifgsm", steps)
    if alpha is None:
        alpha = default_alpha("ifgsm", eps, steps, 1.0, x)
    res = run_pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=False, loss=loss,
                  targeted=targeted, emit=emit, clip_min=clip_min, clip_max=clip_max, model_mode=model_mode,
                  name="ifgsm")
    return (res.x_adv, res.iterates) if emit is not None else res.x_adv


bim = ifgsm


@names_foreign_options
def cw_linf(model, x, y, *, eps, alpha=None, steps=10, kappa=0.0, random_start=False, targeted=False, emit=None,
            early_stop=False, clip_min=0.0, clip_max=1.0, model_mode="eval", generator=None):
    r"""Carlini-Wagner Linf attack as PGD on the CW margin loss (Carlini & Wagner 2017, arXiv:1608.04644; the
    PGD form of Madry et al.): ascend ``-max(z_y - max_{j != y} z_j, -kappa)`` in the Linf ball (MIRST-DM: 10 steps
    at eps = 5/255). The best other logit is taken with the true class masked to -inf, so it is right when all
    logits are negative. Default ``alpha = 2.5 * eps / steps``, no random start.

    Args: model; x (Tensor[N, ...]) in [clip_min, clip_max]; y (LongTensor[N]) labels (targets if targeted);
    eps (float or Tensor[N]); alpha (float or Tensor[N]): default ``2.5 * eps / steps``; steps (int): default 10;
    kappa (float >= 0): the margin's confidence, default 0; random_start (bool): default False; targeted;
    emit, early_stop: as :func:`pgd`; clip_min, clip_max; model_mode; generator (for the random start).
    Returns x_adv, or ``(x_adv, iterates)`` with emit.

    Raises NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError, InputShapeError as
    :func:`run_pgd`.
    """
    return _cw_linf("cw_linf", model, x, y, eps=eps, alpha=alpha, steps=steps, kappa=kappa, random_start=random_start,
                    targeted=targeted, emit=emit, early_stop=early_stop, clip_min=clip_min, clip_max=clip_max,
                    model_mode=model_mode, generator=generator)


def _cw_linf(name, model, x, y, *, eps, alpha, steps, kappa, random_start, targeted, emit, early_stop, clip_min,
             clip_max, model_mode, generator):
    """:func:`cw_linf`, its errors naming ``name`` ("cw_linf", or "cw" for ``CW``, whose errors named cw_linf when
    run)."""
    steps = check_steps(name, steps)
    check_draws(name, "generator", generator, random_start)
    if alpha is None:
        alpha = default_alpha(name, eps, steps, 2.5, x)
    res = run_pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm="linf", random_start=random_start,
                  loss="cw", kappa=kappa, targeted=targeted, emit=emit, early_stop=early_stop, clip_min=clip_min,
                  clip_max=clip_max, model_mode=model_mode, generator=generator, name=name)
    return (res.x_adv, res.iterates) if emit is not None else res.x_adv


class FGSM(Attack):
    """``FGSM(model, eps=8/255, norm="linf", loss="ce")(x, y)``; see :func:`fgsm`."""

    name = "fgsm"
    uses_gradients = True

    def __init__(self, model, eps=8 / 255, *positional, norm="linf", loss="ce", **options):
        refuse_positional_options(self.name, FGSM, positional)
        super().__init__(model, **options)
        self.eps, self.norm, self.loss = eps, check_norm(self.name, norm), check_loss(self.name, loss)
        check_budget(self.name, self.norm, eps, self.clip_min, self.clip_max)

    def forward(self, x, y):
        return fgsm(self.model, x, y, eps=self.eps, norm=self.norm, loss=self.loss, targeted=self.targeted,
                    clip_min=self.clip_min, clip_max=self.clip_max, model_mode=self.model_mode)


class BIM(Attack):
    """``BIM(model, eps=8/255, alpha=None, steps=10, norm="linf", loss="ce")(x, y)``; see :func:`ifgsm`."""

    name = "ifgsm"
    uses_gradients = True

    def __init__(self, model, eps=8 / 255, alpha=None, steps=10, *positional, norm="linf", loss="ce", **options):
        refuse_positional_options(self.name, BIM, positional)
        super().__init__(model, **options)
        self.norm = check_norm(self.name, norm)
        check_budget(self.name, self.norm, eps, self.clip_min, self.clip_max, alpha)
        check_step_moves(self.name, eps, alpha)  # here, not at the first call, as the other attacks' settings
        check_steps(self.name, steps)
        self.eps, self.alpha, self.steps, self.loss = eps, alpha, steps, check_loss(self.name, loss)

    def forward(self, x, y):
        return ifgsm(self.model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                     loss=self.loss, targeted=self.targeted, clip_min=self.clip_min, clip_max=self.clip_max,
                     model_mode=self.model_mode)


class PGD(Attack):
    """``PGD(model, eps=8/255, alpha=2/255, steps=10, random_start=True)(x, y)`` (torchattacks' defaults);
    ``seed`` makes the random start reproducible. Keyword-only: ``norm`` (None: "linf"), ``loss`` ("ce"),
    ``kappa`` (0.0), ``early_stop`` (False), as :func:`pgd`'s."""

    name = "pgd"
    uses_gradients = True
    default_norm = "linf"

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, *positional, norm=None,
                 loss="ce", kappa=0.0, early_stop=False, seed=None, **options):
        refuse_positional_options(self.name, PGD, positional)
        super().__init__(model, **options)
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start
        self.norm = check_norm(self.name, self.default_norm if norm is None else norm)
        # here, not at the first call: a seed beside random_start=False, a kappa beside loss="ce" did nothing
        check_flags(self.name, {"random_start": random_start})  # "no" is true: it drew a start
        check_draws(self.name, "seed", seed, random_start)
        check_seed(self.name, seed, optional=True)
        check_kappa(self.name, kappa, check_loss(self.name, loss))
        check_budget(self.name, self.norm, eps, self.clip_min, self.clip_max, alpha)
        check_step_moves(self.name, eps, alpha)
        check_steps(self.name, steps)
        check_early_stop(self.name, early_stop)
        self.loss, self.kappa, self.early_stop, self.seed = loss, kappa, early_stop, seed

    def forward(self, x, y):
        return _pgd(self.name, self.model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                    random_start=self.random_start, loss=self.loss, targeted=self.targeted, kappa=self.kappa, emit=None,
                    early_stop=self.early_stop, clip_min=self.clip_min, clip_max=self.clip_max,
                    model_mode=self.model_mode, generator=make_generator(self.seed, x, self.name))


class PGDL2(PGD):
    """``PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=True)(x, y)`` (torchattacks' defaults)."""

    name = "pgdl2"
    default_norm = "l2"
    _FOREIGN_OPTIONS = {**Attack._FOREIGN_OPTIONS,
                        "eps_for_division": "torchattacks' eps_for_division is not an option: the step divides by "
                                            "||g|| + 1e-10, its default"}

    def __init__(self, model, eps=1.0, alpha=0.2, steps=10, random_start=True, *positional, **options):
        # torchattacks' 6th, eps_for_division, is the step's own 1e-10 here (docs/attacks.md, The PGD core)
        refuse_positional_options(self.name, PGDL2, positional, " (torchattacks' 6th, eps_for_division, is not an "
                                  "option: the step divides by ||g|| + 1e-10, its default)")
        super().__init__(model, eps, alpha, steps, random_start, **options)


class CW(Attack):
    """CW-Linf: ``CW(model, eps=8/255, alpha=None, steps=10, *, kappa=0.0, random_start=False, seed=None)(x, y)``,
    PGD on the CW margin loss (not torchattacks' optimisation-based CW-L2); ``seed`` makes the random start
    reproducible, ``norm`` takes "linf" only. See :func:`cw_linf`."""

    name = "cw"
    uses_gradients = True
    # torchattacks' CW(model, c=1, kappa=0, steps=50, lr=0.01), by keyword: "unknown options 'c', 'lr'" alone did not
    # say it is another attack
    _FOREIGN_OPTIONS = {**Attack._FOREIGN_OPTIONS,
                        **dict.fromkeys(("c", "lr"), "torchattacks' CW(model, c, kappa, steps, lr) is CW-L2, another "
                                                     "attack; CW here is CW-Linf, PGD on the CW margin loss: give its "
                                                     "eps, steps and kappa, e.g. CW(model, eps=8/255, steps=50)")}

    def __init__(self, model, eps=8 / 255, alpha=None, steps=10, *torchattacks_order, kappa=0.0, random_start=False,
                 seed=None, norm="linf", **options):
        if torchattacks_order:  # CW(model, 1, 0, 50, 0.01) ran with eps=1, alpha=0 (no step), kappa=0.01, unmoved
            raise TypeError(f"{type(self).__name__}: takes eps, alpha and steps positionally, got "
                            f"{3 + len(torchattacks_order)} values after the model; torchattacks' CW-L2 CW(model, c, "
                            "kappa, steps, lr) is another attack, whose values would land in eps, alpha, steps and "
                            "kappa: give CW-Linf's by keyword, e.g. CW(model, eps=8/255, steps=50, kappa=0.0)")
        super().__init__(model, **options)
        if check_norm(self.name, norm) != "linf":
            raise ValueError(f"cw: CW-Linf is defined for norm='linf' only, got norm={norm!r}")
        check_flags(self.name, {"random_start": random_start})
        check_draws(self.name, "seed", seed, random_start)  # here, not at the first call
        check_seed(self.name, seed, optional=True)
        check_kappa(self.name, kappa)
        check_budget(self.name, "linf", eps, self.clip_min, self.clip_max, alpha)
        check_step_moves(self.name, eps, alpha, hint=" (torchattacks' CW(model, c, kappa, steps) puts its kappa here: "
                         "give CW-Linf's by keyword, e.g. CW(model, eps=8/255, steps=50, kappa=0.0))")
        check_steps(self.name, steps)
        self.eps, self.alpha, self.steps, self.kappa = eps, alpha, steps, kappa
        # recorded as the other attacks do: the ensemble checks each attack's output against its own ball by it
        self.random_start, self.seed, self.norm = random_start, seed, "linf"

    def forward(self, x, y):
        return _cw_linf(self.name, self.model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps,
                        kappa=self.kappa, random_start=self.random_start, targeted=self.targeted, emit=None,
                        early_stop=False, clip_min=self.clip_min, clip_max=self.clip_max, model_mode=self.model_mode,
                        generator=make_generator(self.seed, x, self.name))
