"""Auto-PGD (Croce & Hein, ICML 2020, arXiv:2003.01690): step-size-free PGD with momentum, CE / DLR losses,
untargeted, targeted and APGD-T (AutoAttack's top-k target classes), Linf and L2.

Schedule (as in the paper and AutoAttack's code): step size starts at 2*eps per sample; checkpoints at
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) of the iterations; at a checkpoint a sample's
step size is halved (and it restarts from its best point) if the loss increased in at most rho = 0.75 of the steps
since the last checkpoint (the first step counting as AutoAttack's code counts it: an increase when its loss is
positive), or if its step size was not halved last time and its best loss did not improve. Momentum 0.75 (none
on the first step). Restarts run on the samples still robust.

Every gradient step goes through the fused ``robust_ops.pgd_step_``; the momentum combination is projected with the
same op (zero step), so APGD shares the PGD core's projection and clipping exactly.
"""

import numbers

import torch
import torch.nn.functional as F

from .. import functional
from .base import Attack
from .context import (attack_context, check_gradients_possible, check_inputs, is_single_logit, predict_from_output,
                      two_logits)
from .core import (check_linf_budget, check_norm, check_steps, clean_logits, forward, per_sample,
                   runner_up_targets)
from .pgd import make_generator

APGD_LOSSES = ("ce", "dlr", "cw")


def dlr_loss(z, y):
    """Difference of logits ratio: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12) (needs >= 3 classes)."""
    zs, idx = z.sort(dim=1)
    top_is_y = (idx[:, -1] == y).to(z.dtype)
    zy = z.gather(1, y[:, None]).squeeze(1)
    return -(zy - zs[:, -2] * top_is_y - zs[:, -1] * (1.0 - top_is_y)) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_loss_targeted(z, y, t):
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12) (needs >= 4 classes). Without the true
    labels (y None) z_y is the best logit other than the target."""
    zs, _ = z.sort(dim=1)
    zt = z.gather(1, t[:, None]).squeeze(1)
    if y is None:
        zy = z.masked_fill(F.one_hot(t, z.shape[1]).bool(), float("-inf")).amax(1)
    else:
        zy = z.gather(1, y[:, None]).squeeze(1)
    return -(zy - zt) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def _best_other(z, c):
    return z.masked_fill(F.one_hot(c, z.shape[1]).bool(), float("-inf")).amax(1)


def effective_loss(loss, num_classes, targeted):
    """DLR needs >= 3 classes (targeted: >= 4); below that APGD falls back to the CW margin loss."""
    if loss == "dlr" and num_classes < (4 if targeted else 3):
        return "cw"
    return loss


def per_sample_loss(out, loss, y, target):
    """Per-sample objective APGD ascends. Untargeted (target None): CE(z, y), DLR(z, y) or the CW margin
    -(z_y - max_{j!=y} z_j). Targeted: -CE(z, t), targeted DLR, or z_t - max_{j!=t} z_j."""
    z = two_logits(out) if is_single_logit(out) else out
    if target is None:
        if loss == "ce":
            return F.cross_entropy(z, y, reduction="none")
        if loss == "dlr":
            return dlr_loss(z, y)
        return _best_other(z, y) - z.gather(1, y[:, None]).squeeze(1)
    if loss == "ce":
        return -F.cross_entropy(z, target, reduction="none")
    if loss == "dlr":
        return dlr_loss_targeted(z, y, target)
    return z.gather(1, target[:, None]).squeeze(1) - _best_other(z, target)


def checkpoint_schedule(steps):
    """AutoAttack's integer form of the checkpoints: first after max(int(0.22 n), 1) steps, then the interval
    shrinks by max(int(0.03 n), 1) down to max(int(0.06 n), 1). Returns the step counts (1-based) of checkpoints."""
    k, k_min, decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, at = [], 0
    while at + k <= steps:
        at += k
        out.append(at)
        k = max(k - decr, k_min)
    return out


def _project_(z, x_nat, eps_t, norm, clip_min, clip_max):
    """Projection onto the ball and the clip range: the fused PGD step with a zero step."""
    zeros = torch.zeros(z.shape[0], dtype=eps_t.dtype, device=z.device)
    functional.pgd_step_(z, x_nat, torch.zeros_like(z), zeros, eps_t, clip_min=clip_min, clip_max=clip_max,
                         norm=norm)
    return z


def _random_start(x, eps_t, norm, clip_min, clip_max, generator):
    """AutoAttack's start: Linf x + eps * t / max|t| with t ~ U(-1, 1); L2 a point on the sphere of radius eps."""
    n = x.shape[0]
    view = (n,) + (1,) * (x.dim() - 1)
    if norm == "linf":
        t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        t = t / t.reshape(n, -1).abs().amax(1).clamp_min(1e-12).view(view)
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t = t / (t.reshape(n, -1).norm(dim=1).view(view) + 1e-12)
    return torch.clamp(x + eps_t.view(view).to(x.dtype) * t, clip_min, clip_max)


def _apgd_run(model, x, y, target, loss, eps_t, norm, steps, rho, clip_min, clip_max, generator, name,
              success_is_target=None, eot_iter=1):
    """One APGD run. Returns (x_best, success, x_best_adv): the highest-loss point, the per-sample success and the
    first successful iterate (x where none). Success: the target is predicted (targeted with user targets) or the
    true label is not (untargeted, and APGD-T: ``success_is_target=False``). ``eot_iter`` > 1: the gradient is the
    mean over that many forward/backward passes (Expectation over Transformation, for randomized models)."""
    n = x.shape[0]
    momentum = 0.75
    x_adv = _random_start(x, eps_t, norm, clip_min, clip_max, generator)
    if success_is_target is None:
        success_is_target = y is None
    label = target if success_is_target else y

    def evaluate(point):
        xg = point.detach().requires_grad_(True)
        g = None
        for _ in range(eot_iter):
            with torch.enable_grad():
                out = forward(name, model, xg)
                per = per_sample_loss(out, loss, y, target)
                (g_pass,) = torch.autograd.grad(per.sum(), [xg])
            g = g_pass if g is None else g + g_pass
        if eot_iter > 1:  # AutoAttack's arithmetic, a sum then one division: a deterministic model gives its points
            g = g / float(eot_iter)
        # loss and success from the last pass, as AutoAttack's
        pred = predict_from_output(out.detach())
        return per.detach(), g, (pred == label) if success_is_target else (pred != label)

    loss_now, grad, ok = evaluate(x_adv)
    success = ok.clone()
    x_best_adv = torch.where(ok.view(-1, *([1] * (x.dim() - 1))), x_adv, x)
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss_now.clone()
    # loss_steps[j]: the loss after j steps. Entry 0 stays 0, not the start loss: AutoAttack's oscillation check
    # compares the first step's loss with that unfilled entry, and with the start loss instead the DLR losses
    # (negative until a sample breaks) halved the step less often and broke fewer samples in short runs
    # (docs/attacks.md, "Differences from torchattacks and AutoAttack").
    loss_steps = torch.zeros(steps + 1, n, dtype=loss_now.dtype, device=x.device)
    step_size = 2.0 * eps_t.clone()
    x_old = x_adv.clone()
    checkpoints = set(checkpoint_schedule(steps))
    last_check = 0
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones(n, dtype=torch.bool, device=x.device)
    view = (n,) + (1,) * (x.dim() - 1)

    for i in range(steps):
        with torch.no_grad():
            stepped = x_adv.clone()
            functional.pgd_step_(stepped, x, grad, step_size, eps_t, clip_min=clip_min, clip_max=clip_max, norm=norm)
            if i > 0:
                stepped = x_adv + (stepped - x_adv) * momentum + (x_adv - x_old) * (1 - momentum)
                _project_(stepped, x, eps_t, norm, clip_min, clip_max)
            x_old, x_adv = x_adv, stepped
        loss_now, grad, ok = evaluate(x_adv)
        with torch.no_grad():
            newly = ok & ~success
            x_best_adv[newly] = x_adv[newly]
            success |= ok
            loss_steps[i + 1] = loss_now
            better = loss_now > loss_best
            x_best[better] = x_adv[better]
            grad_best[better] = grad[better]
            loss_best = torch.where(better, loss_now, loss_best)
            if i + 1 in checkpoints:
                k = i + 1 - last_check
                increased = (loss_steps[last_check + 1:i + 2] > loss_steps[last_check:i + 1]).sum(0)
                oscillating = increased.to(loss_best.dtype) <= k * rho
                no_progress = ~reduced_last_check & (loss_best_last_check >= loss_best)
                halve = oscillating | no_progress
                reduced_last_check = halve
                loss_best_last_check = loss_best.clone()
                step_size = torch.where(halve, step_size / 2, step_size)
                hv = halve.view(view)
                x_adv = torch.where(hv, x_best, x_adv)
                grad = torch.where(hv, grad_best, grad)
                last_check = i + 1
    return x_best, success, x_best_adv


def _check_apgd_args(name, x, y, eps, norm, steps, n_restarts, loss, rho, clip_min, clip_max, eot_iter):
    """The argument checks APGD and APGD-T share; returns (y as int64, norm, steps, n_restarts, eps as a per-sample
    tensor, eot_iter)."""
    check_gradients_possible(name)
    y = check_inputs(name, x, y, clip_min, clip_max)
    norm = check_norm(name, norm)
    steps = check_steps(name, steps)
    n_restarts = check_steps(name, n_restarts, "n_restarts")
    eot_iter = check_steps(name, eot_iter, "eot_iter")
    if loss not in APGD_LOSSES:
        raise ValueError(f"{name}: expected loss to be one of {', '.join(APGD_LOSSES)}, got {loss!r}")
    if not isinstance(rho, numbers.Real) or not 0 < rho <= 1:
        raise ValueError(f"{name}: expected rho in (0, 1], got {rho!r}")
    eps_t = per_sample(name, "eps", eps, x)
    check_linf_budget(name, norm, eps_t, clip_min, clip_max)
    return y, norm, steps, n_restarts, eps_t, eot_iter


def apgd(model, x, y, *, eps, norm="linf", steps=100, loss="ce", targeted=False, n_restarts=1, rho=0.75,
         eot_iter=1, clip_min=0.0, clip_max=1.0, model_mode="eval", generator=None):
    r"""Auto-PGD (Croce & Hein 2020), untargeted or targeted, Linf or L2.

    Args:
        model: ``[N, K]`` logits or ``[N]`` / ``[N, 1]`` single logits.
        x (Tensor[N, ...]) in the clip range; y (LongTensor[N]): true labels, or target labels when ``targeted``.
        eps (float or Tensor[N]); norm: "linf" (default) or "l2" (any case); steps (int): iterations per restart
            (default 100).
        loss: "ce" (default), "dlr" (difference of logits ratio) or "cw" (margin). DLR is undefined below 3
            classes (targeted: 4): it then falls back to the CW margin loss (binary and single-logit models).
        targeted (bool): y are targets; success means the target is predicted.
        n_restarts (int): random restarts, each on the samples not yet broken. rho: checkpoint threshold (0.75).
        eot_iter (int): forward/backward passes per step whose gradients are averaged (Expectation over
            Transformation, for randomized models: AutoAttack's ``rand`` version uses 20); default 1. The loss and
            the success check of a step are those of its last pass, as AutoAttack's. The model's own randomness
            draws from torch's global generator (seed it with ``torch.manual_seed``), not from ``generator``.
        clip_min, clip_max, model_mode, generator (random starts).

    Returns:
        x_adv: per sample the first iterate that succeeded, else the highest-loss point found (AutoAttack returns
        the clean input there).
    """
    name = "apgd"
    y, norm, steps, n_restarts, eps_t, eot_iter = _check_apgd_args(name, x, y, eps, norm, steps, n_restarts, loss,
                                                                   rho, clip_min, clip_max, eot_iter)
    x = x.detach()
    x_adv = x.clone()
    if x.shape[0] == 0:
        return x_adv
    with attack_context(model, model_mode):
        z, correct = clean_logits(name, model, x, y)
        used = effective_loss(loss, z.shape[1], targeted)
        todo = ~correct if targeted else correct
        best_loss = torch.full((x.shape[0],), float("-inf"), dtype=eps_t.dtype, device=x.device)
        for _ in range(n_restarts):
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            yi = y[idx]
            x_best, success, x_best_adv = _apgd_run(
                model, x[idx], None if targeted else yi, yi if targeted else None, used, eps_t[idx], norm, steps,
                rho, clip_min, clip_max, generator, name, eot_iter=eot_iter)
            with torch.no_grad():
                z = forward(name, model, x_best)
                lb = per_sample_loss(z, used, None if targeted else yi, yi if targeted else None)
            keep = success | (lb > best_loss[idx])
            chosen = torch.where(success.view(-1, *([1] * (x.dim() - 1))), x_best_adv, x_best)
            x_adv[idx[keep]] = chosen[keep]
            best_loss[idx] = torch.maximum(best_loss[idx], lb)
            todo[idx[success]] = False
    return x_adv


def apgd_t(model, x, y, *, eps, norm="linf", steps=100, n_target_classes=9, loss="dlr", n_restarts=1, rho=0.75,
           eot_iter=1, clip_min=0.0, clip_max=1.0, model_mode="eval", generator=None):
    r"""APGD-T, AutoAttack's targeted APGD: for each of the ``n_target_classes`` classes with the highest clean
    logits after the top one, a targeted APGD (targeted DLR loss; falls back to the CW margin below 4 classes) runs
    on the samples still correctly classified. y are TRUE labels; success means any misclassification.
    With fewer classes the number of targets is capped at K - 1. ``eot_iter`` as :func:`apgd`. Returns x_adv as
    :func:`apgd`."""
    name = "apgd_t"
    y, norm, steps, n_restarts, eps_t, eot_iter = _check_apgd_args(name, x, y, eps, norm, steps, n_restarts, loss,
                                                                   rho, clip_min, clip_max, eot_iter)
    n_target_classes = check_steps(name, n_target_classes, "n_target_classes")
    x = x.detach()
    x_adv = x.clone()
    if x.shape[0] == 0:
        return x_adv
    with attack_context(model, model_mode):
        z, robust = clean_logits(name, model, x, y)
        used = effective_loss(loss, z.shape[1], True)
        best_loss = torch.full((x.shape[0],), float("-inf"), dtype=eps_t.dtype, device=x.device)
        for targets in runner_up_targets(z, n_target_classes):
            for _ in range(n_restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                yi, ti = y[idx], targets[idx]
                x_best, fooled, x_best_adv = _apgd_run(model, x[idx], yi, ti, used, eps_t[idx], norm, steps, rho,
                                                       clip_min, clip_max, generator, name, success_is_target=False,
                                                       eot_iter=eot_iter)
                with torch.no_grad():
                    lb = per_sample_loss(forward(name, model, x_best), used, yi, ti)
                keep = fooled | (lb > best_loss[idx])
                chosen = torch.where(fooled.view(-1, *([1] * (x.dim() - 1))), x_best_adv, x_best)
                x_adv[idx[keep]] = chosen[keep]
                best_loss[idx] = torch.maximum(best_loss[idx], lb)
                robust[idx[fooled]] = False
    return x_adv


class APGD(Attack):
    """``APGD(model, eps=8/255, norm="linf", steps=100, loss="ce", n_restarts=1, seed=0, eot_iter=1)(x, y)``; see
    :func:`apgd`."""

    name = "apgd"

    def __init__(self, model, eps=8 / 255, norm="linf", steps=100, loss="ce", n_restarts=1, *, rho=0.75, seed=0,
                 eot_iter=1, **options):
        super().__init__(model, **options)
        self.eps, self.norm, self.steps, self.loss = eps, check_norm(self.name, norm), steps, loss
        self.n_restarts, self.rho, self.seed, self.eot_iter = n_restarts, rho, seed, eot_iter
        self.name = f"apgd-{loss}"

    def forward(self, x, y):
        return apgd(self.model, x, y, eps=self.eps, norm=self.norm, steps=self.steps, loss=self.loss,
                    targeted=self.targeted, n_restarts=self.n_restarts, rho=self.rho, eot_iter=self.eot_iter,
                    clip_min=self.clip_min, clip_max=self.clip_max, model_mode=self.model_mode,
                    generator=make_generator(self.seed, x.device))


class APGDT(Attack):
    """``APGDT(model, eps=8/255, norm="linf", steps=100, n_target_classes=9, seed=0, eot_iter=1)(x, y)``:
    AutoAttack's APGD-T (y are true labels); see :func:`apgd_t`."""

    name = "apgd-t"
    supports_targeted = False

    def __init__(self, model, eps=8 / 255, norm="linf", steps=100, n_target_classes=9, *, loss="dlr",
                 n_restarts=1, rho=0.75, seed=0, eot_iter=1, **options):
        super().__init__(model, **options)
        self.eps, self.norm, self.steps = eps, check_norm(self.name, norm), steps
        self.n_target_classes = n_target_classes
        self.loss, self.n_restarts, self.rho, self.seed, self.eot_iter = loss, n_restarts, rho, seed, eot_iter

    def forward(self, x, y):
        return apgd_t(self.model, x, y, eps=self.eps, norm=self.norm, steps=self.steps,
                      n_target_classes=self.n_target_classes, loss=self.loss, n_restarts=self.n_restarts,
                      rho=self.rho, eot_iter=self.eot_iter, clip_min=self.clip_min, clip_max=self.clip_max,
                      model_mode=self.model_mode, generator=make_generator(self.seed, x.device))
