"""Gradient-based regularizers: GR (double backpropagation) and LLR (local linearity regularization)."""

import torch
from torch import nn

from ..attacks.context import InputGradScale, check_gradients_possible
from ..attacks.core import forward
from ._common import (PGDDefense, check_choice, check_labels_against, check_options, float32_or_wider, labels,
                      metric_values, per_sample_ce, real_option, unwrap, use_model_mode)
from .adversarial import Standard
from .base import Defense, DefenseOutput


def _input_gradient(name, model, x, y, create_graph=True):
    """Per-sample losses, logits and d l_i / d x_i (the gradient of the summed per-sample losses; create_graph so the
    regularizer is differentiable in the parameters). Loss-scaled under float16 autocast (``InputGradScale``): GR's
    penalty and LLR's first-order term would otherwise see underflowed gradients. Under torch.no_grad() (a loss
    computed for validation in a loop of one's own) the gradient is taken with gradients enabled, as the attacks
    take theirs, and nothing of it is kept for a backward: GR and LLR failed there with autograd's "element 0 of
    tensors does not require grad and does not have a grad_fn", where the attack-based defenses gave their loss.
    An x that requires grad (the output of a learnable step in front of the model, in a loop of one's own) is
    differentiated as it is, so the loss back-propagates into that step as Standard's and TRADES's clean terms do
    (detached, GR's loss gave it no gradient, while GR(lam=0), which is Standard, did)."""
    check_gradients_possible(name, "the input gradient cannot be taken", "the defense")  # enable_grad cannot lift it
    keep = torch.is_grad_enabled()
    xg = x if x.requires_grad and create_graph and keep else x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(name, model, xg)
        check_labels_against(name, y, logits)  # a single logit's BCE took a label 2 as its target silently
        losses = per_sample_ce(logits, y)
        (grad,) = InputGradScale().grad(losses.sum(), [xg], create_graph=create_graph and keep)
    if not keep:
        logits, losses = logits.detach(), losses.detach()
    return logits, losses, grad, xg


class GR(Defense):
    """Input-gradient regularization by double backpropagation (Drucker & LeCun 1991, MIRST-DM's reference for GR;
    Ross & Doshi-Velez 2018): L = L(x) + lam * mean_i ||d l_i / d x_i||. lam = 1 (MIRST-DM). norm: "l2" (default,
    MIRST-DM's "L_p norm of gradients"; sqrt(sum g^2 + 1e-12) so it is differentiable at 0), "l2sq" (the squared norm
    both originals penalize) or "l1" (docs/defenses/gr.md)."""

    name = "gr"

    def __init__(self, lam=1.0, norm="l2", **unknown):
        if unknown:  # Python's own TypeError named GR.__init__ and listed nothing, as PGDDefense's did
            check_options(type(self).__name__, type(self), unknown)
        self.lam = real_option(self.name, "lam", lam, minimum=0)
        self.norm = check_choice(self.name, "norm", norm, ("l2", "l2sq", "l1"))

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        if self.lam == 0:
            # standard training exactly, without the double backward a penalty of weight 0 would cost
            return Standard.__call__(self, model, x, y)
        logits, losses, grad, _ = _input_gradient(self.name, model, x, y)
        # half upcast: the 1e-12 below is 0 in float16, and sqrt(0)'s inf derivative made NaN parameter gradients
        g = float32_or_wider(grad).flatten(1)
        if self.norm == "l2":
            penalty = torch.sqrt(g.pow(2).sum(1) + 1e-12)
        elif self.norm == "l2sq":
            penalty = g.pow(2).sum(1)
        else:
            penalty = g.abs().sum(1)
        clean = losses.mean()
        penalty = penalty.mean()
        loss = clean + self.lam * penalty
        return DefenseOutput(loss=loss, logits=logits, metrics=metric_values(
            loss=loss, loss_clean=clean, grad_norm=penalty))


class _LinearityGap(nn.Module):
    """g_i(x') = |l(f(x'_i), y_i) - l(f(x_i), y_i) - (x'_i - x_i) . grad_i| per sample [N], the objective LLR's
    inner maximum ascends (PGDDefense.ascend). x, the clean losses and the gradients are fixed."""

    def __init__(self, model, x, y, clean_losses, grad):
        super().__init__()
        self.model = model
        self.x, self.y, self.clean_losses, self.grad = x, y, clean_losses, grad

    def forward(self, x_adv):
        losses = per_sample_ce(self.model(x_adv), self.y)
        first_order = ((x_adv - self.x) * self.grad).flatten(1).sum(1)
        return (losses - self.clean_losses - first_order).abs()


class LLR(PGDDefense):
    """Local linearity regularization (Qin et al., NeurIPS 2019):
    L = L(x) + lam * mean_i g_i(delta_i) + mu * mean_i |delta_i . grad_i|, with
    g_i(delta) = |l(x_i + delta) - l(x_i) - delta . grad_i| (the local linearity measure), grad_i = d l_i / d x_i and
    delta_i = argmax_{||delta|| <= eps} g_i(delta) found by PGD on g from a random start (g's gradient vanishes at
    delta = 0). lam = 3 and mu = 4 as in MIRST-DM's setup. Both regularizers are differentiated through grad_i
    (double backpropagation). random_start=False is refused (g's gradient is zero at delta = 0)."""

    name = "llr"
    flat_at_x = True

    def __init__(self, lam=3.0, mu=4.0, **attack):
        super().__init__(**attack)
        self.lam = real_option(self.name, "lam", lam, minimum=0)
        self.mu = real_option(self.name, "mu", mu, minimum=0)

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        if self.lam == 0 and self.mu == 0:
            # standard training exactly: no attack (its forwards would still move BatchNorm's statistics)
            return Standard.__call__(self, model, x, y)
        net = unwrap(model)
        attack_training = self.attack_mode == "train"
        x_adv = None
        if self.attack_mode != "keep" and any(m.training != attack_training for m in net.modules()):
            # g must vanish at delta = 0 in the mode the inner maximum runs in (eval-mode BatchNorm differs from
            # the training forward), so its l(x) and grad are taken in that mode. Every module counts: reading
            # net.training alone reused the training forward's for a training model with a frozen (eval) BatchNorm.
            # Before the training forward, as SAT's and ARFL's attacks: it moves BatchNorm's running statistics, so
            # the eval-mode attack ran on statistics already moved toward the batch it attacked.
            with use_model_mode(net, self.attack_mode):
                _, ref_losses, ref_grad, _ = _input_gradient(self.name, net, x, y, create_graph=False)
            x_adv = self.ascend(_LinearityGap(net, x.detach(), y, ref_losses.detach(), ref_grad.detach()), x).x_adv
        logits, losses, grad, _ = _input_gradient(self.name, model, x, y)
        if x_adv is None:  # the attack runs in the training forward's mode: its l(x) and grad serve
            x_adv = self.ascend(_LinearityGap(net, x.detach(), y, losses.detach(), grad.detach()), x).x_adv
        delta = (x_adv - x).detach()
        adv_losses = per_sample_ce(model(x + delta), y)
        first_order = (delta * grad).flatten(1).sum(1)
        linearity = (adv_losses - losses - first_order).abs().mean()
        grad_term = first_order.abs().mean()
        clean = losses.mean()
        loss = clean + self.lam * linearity + self.mu * grad_term
        return DefenseOutput(loss=loss, logits=logits, metrics=metric_values(
            loss=loss, loss_clean=clean, linearity=linearity, grad_term=grad_term))
