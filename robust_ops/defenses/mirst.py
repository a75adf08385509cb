"""MIRST and MIRST-DM (Sun et al., MICCAI 2022): multi-instance robust self-training, optionally on a model whose first
max-pooling layer is replaced by drop-max pooling.

Loss (MIRST-DM eq. 2): L = L(x) + alpha * sum_j beta_j * L(x_bar_j), x_bar_j the iterates after emit[j] steps of ONE
PGD run from the clean image (eq. 3; x_bar_j = x^adv_{2j+1} with x^adv_1 = x, i.e. after 2, 4, 6, 8 steps), alpha = 1,
beta = [0.34, 0.28, 0.22, 0.16].

Reuse (default): the PGD attack already does a forward and a backward at every iterate. With
``run_pgd(param_grad_weights={2: alpha*beta_0, 4: alpha*beta_1, ...})`` the attack's backward at x_bar_j also yields
``alpha * beta_j * dL(x_bar_j)/dtheta`` (a positive weight does not change the sign of the input gradient, so the
attack's path is unchanged). The defense returns the clean loss as ``loss`` and these gradients as ``extra_grads``;
the trainer adds them to ``.grad``. No second forward/backward over the instances.

The iterates after 2..8 steps do not depend on the number of steps that follow, and the paper's last two steps
(9, 10) feed no term of the loss, so the attack stops after the forward/backward at the last emitted iterate.

BatchNorm: the attack runs in ``attack_mode`` ("train" by default), so each instance is normalized with the statistics
of its own PGD step's batch -- exactly as a separate training-mode forward of that instance batch would be. The
running statistics are updated by every attack forward (as in Madry-style training-mode attacks). The plain
formulation (``reuse=False``) runs the same attack, then forwards each instance batch separately in ``attack_mode``
and back-propagates the full eq. 2; on models without batch-dependent layers (GroupNorm, eval-mode BatchNorm) both
give the same parameter gradients up to floating-point rounding.
"""

import numbers

import torch

from ..attacks.context import classification_loss
from ._common import (PGDDefense, check_flags, check_int, check_real, labels, metric_values, real_option,
                      use_model_mode, unwrap)
from .adversarial import Standard
from .base import DefenseOutput

MIRST_BETA = (0.34, 0.28, 0.22, 0.16)
MIRST_EMIT = (2, 4, 6, 8)


class MIRST(PGDDefense):
    """Multi-instance RST (MIRST-DM eq. 2). Args: alpha (1.0), beta (4 weights, one per emitted iterate),
    emit ((2, 4, 6, 8) steps), reuse (True: parameter gradients from the attack's own backward passes), plus the PGD
    settings of PGDDefense (Linf eps 5/255, 10 steps as in the paper, step 2.5*eps/10, no random start -- eq. 3
    starts at the clean image -- and attack_mode "train")."""

    name = "mirst"
    default_random_start = False
    default_attack_mode = "train"

    def __init__(self, alpha=1.0, beta=MIRST_BETA, emit=MIRST_EMIT, reuse=True, **attack):
        super().__init__(**attack)
        self.alpha = real_option(self.name, "alpha", alpha, minimum=0)
        emit = tuple(check_int(self.name, "each emit step", e) for e in _numbers(self.name, "emit", emit))
        if not emit or any(b <= a for a, b in zip(emit, emit[1:])) or emit[-1] > self.steps:
            # steps=2 alone (a quick run) met the default emit (2, 4, 6, 8): say which options go with fewer steps
            fix = (f"; emit's last step {emit[-1]} needs steps >= {emit[-1]}, or, for fewer steps, give emit too (the "
                   f"steps whose iterates train, e.g. 1,2) with beta (one weight per emit step, e.g. 0.5,0.5)"
                   if emit and emit[-1] > self.steps and all(b > a for a, b in zip(emit, emit[1:])) else "")
            raise ValueError(f"{self.name}: expected emit to be increasing step counts in [1, steps={self.steps}], "
                             f"got {emit}{fix}")
        beta = tuple(check_real(self.name, "each beta weight", b, minimum=0) for b in _numbers(self.name, "beta", beta))
        if len(beta) != len(emit):
            raise ValueError(f"{self.name}: expected beta to have {len(emit)} weight{'s' * (len(emit) != 1)} (one per "
                             f"emitted iterate, emit={emit}), got {len(beta)}: {beta}")
        check_flags(self.name, {"reuse": reuse})  # reuse="no" ran the reuse formulation
        self.emit, self.beta, self.reuse = emit, beta, reuse

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        if self.alpha == 0 or not any(self.beta):
            # standard training exactly: no attack (its "train"-mode forwards would still move BatchNorm's statistics)
            return Standard.__call__(self, model, x, y)
        weights = [self.alpha * b for b in self.beta]
        if self.reuse:
            res = self.attack(model, x, y, steps=self.emit[-1],
                              param_grad_weights={e: w for e, w in zip(self.emit, weights)})
            logits = model(x)
            clean = classification_loss(logits, y)
            adv = sum(b * l for b, l in zip(self.beta, res.emitted_losses))
            loss = clean
            extra = res.param_grads
            values = metric_values(loss_clean=clean)
            values = {"loss": values["loss_clean"] + self.alpha * adv, **values, "loss_adv": adv}
        else:
            res = self.attack(model, x, y, steps=self.emit[-1], emit=self.emit)
            logits = model(x)
            clean = classification_loss(logits, y)
            with use_model_mode(unwrap(model), self.attack_mode):
                adv_terms = [classification_loss(model(res.iterates[j]), y) for j in range(len(self.emit))]
            adv_t = sum(b * l for b, l in zip(self.beta, adv_terms))
            loss = clean + self.alpha * adv_t
            extra, values = None, metric_values(loss=loss, loss_clean=clean, loss_adv=adv_t)
        return DefenseOutput(loss=loss, logits=logits, extra_grads=extra, metrics=values)


class MIRSTDM(MIRST):
    """MIRST on a model whose FIRST max-pooling layer is drop-max pooling (robust_ops.replace_maxpool(model,
    which="first")). ``prepare_model(model)`` does the replacement; ``fit`` calls it before building the optimizer."""

    name = "mirst-dm"

    def prepare_model(self, model):
        """``model`` with its first max-pooling layer replaced by drop-max pooling (replace_maxpool(model,
        which="first"), which returns the model; a first pool that is drop-max already is left alone)."""
        from ..nn import replace_maxpool

        # idempotent by replace_maxpool's rule (first pool drop-max already: left alone); a drop-max layer further on
        # must not stop the replacement of a max-pooling layer before it
        return replace_maxpool(model, which="first")

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        inner = unwrap(model)
        first = _first_pool(inner)
        if not _is_drop_max(first):
            # MIRST-DM's drop-max layer replaces the FIRST max-pooling layer: one further on is not it
            what = ("has no drop-max layer" if not any(_is_drop_max(m) for m in inner.modules()) else
                    f"has drop-max pooling, but its first pooling layer is a {type(first).__name__}")
            raise ValueError(f"{self.name}: the model {what}; pass it through defense.prepare_model(model) "
                             "(robust_ops.replace_maxpool(model, which='first')) first -- robust_ops.train.fit does "
                             "this automatically")
        return super().__call__(model, x, y, ids)


def _numbers(name, arg, value):
    """``value`` (emit or beta) as a tuple; one number is one instance's (the CLI's emit=8 beta=1 gives numbers)."""
    if torch.is_tensor(value):
        value = value.tolist()
    if isinstance(value, numbers.Real):
        return (value,)
    try:
        if isinstance(value, str):
            raise TypeError
        return tuple(value)
    except TypeError:
        raise TypeError(f"{name}: expected {arg} to be a number or a sequence of numbers (one per emitted iterate), "
                        f"got {value!r}") from None


def _is_drop_max(module):
    from ..nn import DropMax2d

    return isinstance(module, DropMax2d)


def _first_pool(model):
    """The first max-pooling or drop-max layer in registration order (replace_maxpool's "first"), or None."""
    return next((m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d) or _is_drop_max(m)), None)
