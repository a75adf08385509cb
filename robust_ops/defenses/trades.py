"""Output-consistency defenses: TRADES (Zhang et al., ICML 2019) and MART (Wang et al., ICLR 2020)."""

import torch
import torch.nn.functional as F

from ..attacks.context import classification_loss
from ..attacks.core import check_start, forward, scalar_value
from ._common import (PGDDefense, as_two_class, float32_or_wider, kl_per_sample, labels, metric_values, real_option,
                      unwrap, use_model_mode)
from .adversarial import Standard
from .base import DefenseOutput


class _ReferenceStart(PGDDefense):
    """TRADES and MART: their reference code starts PGD at x + 0.001 * N(0, I), near x, where the default here is
    the uniform start in the eps-ball (random_start). ``start_noise`` > 0 (0.001: the reference code's) starts at
    clip(x + start_noise * N(0, I)) instead (run_pgd(start_noise=...), drawn from torch's global generator) and
    implies random_start=False; 0 (default) keeps random_start's start."""

    def __init__(self, *, start_noise=0.0, random_start=None, **attack):
        start_noise = scalar_value(self.name, "start_noise", start_noise)  # a 0-d tensor: as real_option reads one
        self.start_noise = check_start(self.name, random_start, start_noise, or_unset=True)
        super().__init__(random_start=False if self.start_noise and random_start is None else random_start, **attack)

    def _starts_off_x(self):
        return self.random_start or self.start_noise > 0

    def options(self):
        options = super().options()
        if not options["start_noise"]:  # as checkpoints written before start_noise existed record it: absent
            del options["start_noise"]
        return options

    def attack(self, model, x, y, **overrides):
        if self.start_noise:
            overrides.setdefault("start_noise", self.start_noise)
        return super().attack(model, x, y, **overrides)


class TRADES(_ReferenceStart):
    """L = L(x) + beta * KL(p(x) || p(x_adv)), x_adv maximizing the KL (PGD on the KL from a random start: the KL's
    gradient vanishes at x_adv = x). beta = 1 (MIRST-DM's setting; the TRADES paper uses 6 on CIFAR-10).
    KL is summed over classes and averaged over the batch (TRADES's "batchmean"); single logits are treated as two
    classes. random_start=False is refused (the attack would start where the KL's gradient is zero) unless
    start_noise > 0 (0.001: the reference code's start near x; see _ReferenceStart)."""

    name = "trades"
    flat_at_x = True

    def __init__(self, beta=1.0, **attack):
        super().__init__(**attack)
        self.beta = real_option(self.name, "beta", beta, minimum=0)

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        if self.beta == 0:
            # standard training exactly: no attack (its forwards would still move BatchNorm's statistics)
            return Standard.__call__(self, model, x, y)
        with torch.no_grad(), use_model_mode(unwrap(model), self.attack_mode) as net:
            log_p_nat = F.log_softmax(float32_or_wider(as_two_class(forward(self.name, net, x))), 1)

        def kl_objective(out, _y):
            return kl_per_sample(log_p_nat, F.log_softmax(float32_or_wider(as_two_class(out)), 1))

        x_adv = self.attack(model, x, y, loss=kl_objective).x_adv
        logits = model(x)
        clean = classification_loss(logits, y)
        kl = kl_per_sample(F.log_softmax(float32_or_wider(as_two_class(logits)), 1),
                           F.log_softmax(float32_or_wider(as_two_class(model(x_adv))), 1)).mean()
        loss = clean + self.beta * kl
        return DefenseOutput(loss=loss, logits=logits, metrics=metric_values(loss=loss, loss_clean=clean, kl=kl))


class MART(_ReferenceStart):
    """Misclassification-aware adversarial training:
    L = BCE(p(x_adv), y) + beta * mean_i KL(p(x_i) || p(x_adv_i)) * (1 - p_y(x_i)), where
    BCE = -log p_y(x_adv) - log(1 - max_{k != y} p_k(x_adv)); beta = 6 (MART's default). x_adv: CE PGD (its reference
    code's start near x: start_noise=0.001)."""

    name = "mart"

    def __init__(self, beta=6.0, **attack):
        super().__init__(**attack)
        self.beta = real_option(self.name, "beta", beta, minimum=0)

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        x_adv = self.attack(model, x, y).x_adv
        logits = model(x)
        logits_adv = model(x_adv)
        z_adv, z_nat = float32_or_wider(as_two_class(logits_adv)), float32_or_wider(as_two_class(logits))
        adv_probs = F.softmax(z_adv, 1)
        top2 = torch.argsort(adv_probs, 1)[:, -2:]
        other = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        loss_adv = F.cross_entropy(z_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), other)
        nat_probs = F.softmax(z_nat, 1)
        true_probs = nat_probs.gather(1, y.view(-1, 1)).squeeze(1)
        kl = kl_per_sample(F.log_softmax(z_nat, 1), torch.log(adv_probs + 1e-12))
        loss_robust = (kl * (1.0000001 - true_probs)).mean()
        loss = loss_adv + self.beta * loss_robust
        return DefenseOutput(loss=loss, logits=logits, metrics=metric_values(
            loss=loss, loss_adv=loss_adv,
            kl=kl.detach().mean(),  # the plain KL, as TRADES's "kl"; the weighted term is loss_robust
            loss_robust=loss_robust))
