"""Auto-PGD (Croce & Hein, ICML 2020, arXiv:2003.01690): step-size-free PGD with momentum, CE / DLR losses,
untargeted, targeted and APGD-T (AutoAttack's top-k target classes), Linf, L2 and L1 (Croce & Hein, ICML 2021,
"Mind the box": a sparse step and the projection onto the L1 ball and the box; ``use_largereps``).

Schedule (as in the paper and AutoAttack's code): step size starts at 2*eps per sample; checkpoints at
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) of the iterations; at a checkpoint a sample's
step size is halved (and it restarts from its best point) if the loss increased in at most rho = 0.75 of the steps
since the last checkpoint (the first step counting as AutoAttack's code counts it: an increase when its loss is
positive), or if its step size was not halved last time and its best loss did not improve. Momentum 0.75 (none
on the first step). Restarts run on the samples still robust.

Every Linf / L2 gradient step goes through the fused ``robust_ops.pgd_step_``; the momentum combination is projected
with the same op (zero step), so APGD shares the PGD core's projection and clipping exactly. The L1 step (no momentum,
as AutoAttack's) is torch ops and ``core.project_l1``; see :func:`_apgd_run` for its schedule.
"""

import math
import numbers

import torch
import torch.nn.functional as F

from .. import _backend, functional
from .._options import allocated, check_flags, check_seed
from .base import N_CLASSES_HINT, Attack, norm_first_hint, refuse_positional_options
from .context import (InputGradScale, attack_context, best_other_logit, check_gradients_possible, check_inputs,
                      float32_or_wider, is_single_logit, predict_from_output, two_logits)
from .core import (NORMS_WITH_L1, check_budget, check_linf_budget, check_linf_step_resolution, check_norm, check_steps,
                   clean_logits, finite_direction, forward, names_foreign_options, per_sample, project_l1,
                   refuse_targeted, runner_up_targets)
from .pgd import make_generator

APGD_LOSSES = ("ce", "dlr", "cw")
# L1-APGD (Croce & Hein 2021, AutoAttack's constants): step size eps (alpha = 1), at first a step along the top 20% of
# the gradient's coordinates, checkpoints every 4% of the iterations; use_largereps: stages at 3, 2, 1 x eps
L1_TOPK_START, L1_CHECK_EVERY, L1_SPARSER, L1_TOPK_DIVISOR, L1_STEP_DIVISOR, L1_STEP_MIN_DIVISOR = (
    0.2, 0.04, 0.95, 1.5, 1.5, 10.0)
LARGEREPS_SCALES, LARGEREPS_FRACTIONS = (3.0, 2.0, 1.0), (0.3, 0.3)


def _in_range(z):
    """z, with the rows holding a logit past a quarter of its dtype's largest value divided by 16 (a power of two:
    exact), so the DLR ratios' differences and sums stay finite: logits near float32's maximum made them inf (inf / inf
    NaN or a finite / inf -0), no step was better and APGD-DLR and APGD-T returned the start. The ratio does not change
    with the scale beyond its 1e-12; other rows are multiplied by 1, so their values and gradients keep their bits."""
    big = z.abs().amax(1, keepdim=True) > torch.finfo(z.dtype).max / 4
    return z * torch.where(big, 0.0625, 1.0).to(z.dtype)


def dlr_loss(z, y):
    """Difference of logits ratio: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12) (needs >= 3 classes)."""
    z = _in_range(z)
    zs, idx = z.sort(dim=1)
    top_is_y = (idx[:, -1] == y).to(z.dtype)
    zy = z.gather(1, y[:, None]).squeeze(1)
    return -(zy - zs[:, -2] * top_is_y - zs[:, -1] * (1.0 - top_is_y)) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_loss_targeted(z, y, t):
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12) (needs >= 4 classes). Without the true
    labels (y None) z_y is the best logit other than the target."""
    z = _in_range(z)
    zs, _ = z.sort(dim=1)
    zt = z.gather(1, t[:, None]).squeeze(1)
    if y is None:
        zy = best_other_logit(z, t)
    else:
        zy = z.gather(1, y[:, None]).squeeze(1)
    return -(zy - zt) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def effective_loss(loss, num_classes, targeted):
    """DLR needs >= 3 classes (targeted: >= 4); below that APGD falls back to the CW margin loss."""
    if loss == "dlr" and num_classes < (4 if targeted else 3):
        return "cw"
    return loss


def per_sample_loss(out, loss, y, target):
    """Per-sample objective APGD ascends. Untargeted (target None): CE(z, y), DLR(z, y) or the CW margin
    -(z_y - max_{j!=y} z_j). Targeted: -CE(z, t), targeted DLR, or z_t - max_{j!=t} z_j."""
    # half precision upcast (classification_loss's reason; DLR's 1e-12 guard is 0 in float16)
    z = float32_or_wider(two_logits(out) if is_single_logit(out) else out)
    if target is None:
        if loss == "ce":
            return F.cross_entropy(z, y, reduction="none")
        if loss == "dlr":
            return dlr_loss(z, y)
        return best_other_logit(z, y) - z.gather(1, y[:, None]).squeeze(1)
    if loss == "ce":
        return -F.cross_entropy(z, target, reduction="none")
    if loss == "dlr":
        return dlr_loss_targeted(z, y, target)
    return z.gather(1, target[:, None]).squeeze(1) - best_other_logit(z, target)


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


def l0_norm(d):
    """Nonzero coordinates per sample [N] (AutoAttack's L0_norm)."""
    return (d.reshape(d.shape[0], -1) != 0).sum(1)


def largereps_schedule(steps):
    """AutoAttack's ``use_largereps`` stages as (eps factor, iterations): 3 x eps for ceil(0.3 steps), 2 x eps for
    ceil(0.3 steps), then eps for the rest (math.ceil(0.3 * steps), as AutoAttack computes it)."""
    first = [math.ceil(f * steps) for f in LARGEREPS_FRACTIONS]
    return list(zip(LARGEREPS_SCALES, first + [steps - sum(first)]))


def _l1_step(x_adv, x, grad, step_size, topk, eps_t, clip_min, clip_max):
    """L1-APGD's sparse step: along the signs of the coordinates whose |gradient| reaches the per-sample (1 - topk)
    quantile (ties included), step_size shared equally among them, then the projection onto the ball and the range."""
    n = x.shape[0]
    g = grad.reshape(n, -1)
    features = g.shape[1]  # >= 1: apgd and apgd_t return a batch without samples or pixels before any step
    rank = ((1.0 - topk) * features).clamp(0, features - 1).long()
    threshold = g.abs().sort(dim=1)[0].gather(1, rank.view(n, 1))
    direction = torch.sign(g) * (g.abs() >= threshold)
    # counted in the step size's dtype (float32 at least): in float16 the count + 1e-10 rounded to 0, so a zero
    # gradient (a confident sample's CE underflows) made the step 0 / 0 = NaN; half-precision counts also round
    count = direction.abs().to(step_size.dtype).sum(1, keepdim=True)
    step = step_size.view(n, 1) * direction / (count + 1e-10)
    return project_l1(x, x_adv + step.view_as(x_adv).to(x_adv.dtype), eps_t, clip_min, clip_max)


def _random_start(x, eps_t, norm, clip_min, clip_max, generator):
    """AutoAttack's start: Linf x + eps * t / max|t| with t ~ U(-1, 1); L2 a point on the sphere of radius eps; L1
    x + t with t ~ N(0, 1) projected onto the ball and the clip range."""
    n = x.shape[0]
    view = (n,) + (1,) * (x.dim() - 1)
    if norm == "l1":
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return project_l1(x, x + t, eps_t, clip_min, clip_max)
    if norm == "linf":
        t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        t = t / t.reshape(n, -1).abs().amax(1).clamp_min(1e-12).view(view)
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t = t / (t.reshape(n, -1).norm(dim=1).view(view) + 1e-12)
    return torch.clamp(x + eps_t.view(view).to(x.dtype) * t, clip_min, clip_max)


def _apgd_run(model, x, y, target, loss, eps_t, norm, steps, rho, clip_min, clip_max, generator, name,
              success_is_target=None, eot_iter=1, x_init=None):
    """One APGD run. Returns (x_best, success, x_best_adv): the highest-loss point, the per-sample success and the
    first successful iterate (x where none). Success: the target is predicted (targeted with user targets) or the
    true label is not (untargeted, and APGD-T: ``success_is_target=False``). ``eot_iter`` > 1: the gradient is the
    mean over that many forward/backward passes (Expectation over Transformation, for randomized models).

    L1 (Croce & Hein 2021): the sparse step of :func:`_l1_step` without momentum, step size eps, checkpoints every
    max(int(0.04 steps), 1) steps where a sample whose best point got >= 5% sparser restarts from it with step eps
    and the others' step shrinks by 1.5 (to eps / 10 at least); topk follows the best point's sparsity / 1.5; rho is
    not used. ``x_init`` (L1, use_largereps' stages): the start, projected onto this run's ball, instead of a random
    one; topk then starts from its sparsity."""
    n = x.shape[0]
    momentum = 0.75
    if x_init is None:
        x_adv = _random_start(x, eps_t, norm, clip_min, clip_max, generator)
    else:
        x_adv = project_l1(x, x_init, eps_t, clip_min, clip_max)
    if success_is_target is None:
        success_is_target = y is None
    label = target if success_is_target else y

    grad_scale = InputGradScale()  # loss scaling under float16 autocast; a no-op otherwise

    def evaluate(point):
        xg = point.detach().requires_grad_(True)
        g, g_scale = None, 1.0
        for _ in range(eot_iter):
            with torch.enable_grad():
                out = forward(name, model, xg)
                per = per_sample_loss(out, loss, y, target)
                (g_pass,) = grad_scale.grad(per.sum(), [xg], direction_only=True)
                # under float16 autocast the graph was retained: freed here, not after the next pass's forward
                out, per = out.detach(), per.detach()
            if g is None:
                g, g_scale = g_pass, grad_scale.first_scale
                continue
            if g.dtype in (torch.float16, torch.bfloat16):
                g = g.float()  # a float16 input's loss-scaled passes would overflow their sum
            if grad_scale.first_scale != g_scale:  # an overflow halved the scale: the sum so far at the new one
                g, g_scale = g * (grad_scale.first_scale / g_scale), grad_scale.first_scale
            g = g + g_pass
        if eot_iter > 1:  # AutoAttack's arithmetic, a sum then one division: a deterministic model gives its points
            g = (g / float(eot_iter)).to(xg.dtype)
        if norm != "linf":  # a NaN or Inf entry made the L2 step's point NaN (finite_direction); the L1 step's sort
            # put NaN entries on top, and once they filled its top-k share the step moved nothing
            g = finite_direction(g)
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
    loss_steps = allocated(name, "steps", steps, f"a record of {steps + 1} x {n} losses (steps + 1, N)",
                           lambda: torch.zeros(steps + 1, n, dtype=loss_now.dtype, device=x.device))
    x_old = x_adv.clone()
    if norm == "l1":
        step_size = eps_t.clone()
        features = math.prod(x.shape[1:])
        every = max(int(L1_CHECK_EVERY * steps), 1)
        checkpoints = set(range(every, steps + 1, every))
        if x_init is None:
            topk = torch.full((n,), L1_TOPK_START, dtype=torch.float32, device=x.device)
            sparsity_last = torch.full((n,), features, dtype=torch.long, device=x.device)
        else:
            sparsity_last = l0_norm(x_adv - x)
            topk = sparsity_last / features / L1_TOPK_DIVISOR
    else:
        step_size = 2.0 * eps_t.clone()
        checkpoints = set(checkpoint_schedule(steps))
        # the fused step's backend and clip floats, and the projection's zero step, once per run: through
        # functional.pgd_step_ each step checked and converted them twice (step_size and eps_t are [N] tensors in
        # x's opmath dtype, as the wrapper would make them)
        step_on, clips = _backend.resolve("pgd_step_", x.device), (float(clip_min), float(clip_max))
        no_step, no_alpha = torch.zeros_like(x), torch.zeros(n, dtype=eps_t.dtype, device=x.device)
    last_check = 0
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones(n, dtype=torch.bool, device=x.device)
    view = (n,) + (1,) * (x.dim() - 1)

    for i in range(steps):
        with torch.no_grad():
            if norm == "l1":
                stepped = _l1_step(x_adv, x, grad, step_size, topk, eps_t, clip_min, clip_max)
            else:
                stepped = x_adv.clone()
                functional._pgd_step_on(step_on, stepped, x, grad, step_size, eps_t, *clips, norm, None, 0)
                if i > 0:
                    stepped = x_adv + (stepped - x_adv) * momentum + (x_adv - x_old) * (1 - momentum)
                    # onto the ball and the clip range: the fused step with a zero step
                    functional._pgd_step_on(step_on, stepped, x, no_step, no_alpha, eps_t, *clips, norm, None, 0)
            x_old, x_adv = x_adv, stepped
        loss_now, grad, ok = evaluate(x_adv)
        with torch.no_grad():
            # selected by torch.where, not written at the masks' positions: finding them (nonzero, a boolean index)
            # is a host sync on a GPU, two a step
            x_best_adv = torch.where((ok & ~success).view(view), x_adv, x_best_adv)
            success |= ok
            loss_steps[i + 1] = loss_now
            better = loss_now > loss_best
            x_best = torch.where(better.view(view), x_adv, x_best)
            grad_best = torch.where(better.view(view), grad, grad_best)
            loss_best = torch.where(better, loss_now, loss_best)
            if i + 1 in checkpoints and norm == "l1":
                sparsity = l0_norm(x_best - x)
                sparser = sparsity / sparsity_last < L1_SPARSER  # 0 / 0 is NaN: not sparser, as AutoAttack's
                topk = sparsity / features / L1_TOPK_DIVISOR
                step_size = torch.where(sparser, eps_t, step_size / L1_STEP_DIVISOR)
                step_size = torch.minimum(torch.maximum(step_size, eps_t / L1_STEP_MIN_DIVISOR), eps_t)
                sparsity_last = sparsity
                hv = sparser.view(view)
                x_adv = torch.where(hv, x_best, x_adv)
                grad = torch.where(hv, grad_best, grad)
            elif i + 1 in checkpoints:
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


def _apgd_stages(model, x, y, target, loss, eps_t, norm, steps, rho, clip_min, clip_max, generator, name,
                 success_is_target=None, eot_iter=1, use_largereps=False):
    """:func:`_apgd_run`, or with ``use_largereps`` AutoAttack's decreasing radii (:func:`largereps_schedule`): each
    stage starts from the previous stage's highest-loss point (the first from x + N(0, 1)) projected onto its ball.
    The success and the points returned are the last stage's, the only one inside the eps ball."""
    run = dict(success_is_target=success_is_target, eot_iter=eot_iter)
    if not use_largereps:
        return _apgd_run(model, x, y, target, loss, eps_t, norm, steps, rho, clip_min, clip_max, generator, name,
                         **run)
    point = x + torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    for scale, stage_steps in largereps_schedule(steps):
        point, success, x_best_adv = _apgd_run(model, x, y, target, loss, eps_t * scale, norm, stage_steps, rho,
                                               clip_min, clip_max, generator, name, x_init=point, **run)
    return point, success, x_best_adv


def check_largereps(name, use_largereps, norm, steps=None, whose="use_largereps"):
    """``use_largereps`` is True or False, with norm "l1" only (AutoAttack's decr_eps_pgd asserts L1) and steps
    (checked ones; None: not known yet) leaving the last stage (at eps) at least one iteration; ``whose``: the
    schedule's words in that error (AutoAttack names its L1 version's, which its user did not ask for by name)."""
    if not isinstance(use_largereps, bool):
        raise ValueError(f"{name}: expected use_largereps to be True or False, got {use_largereps!r}")
    if use_largereps and norm != "l1":
        raise ValueError(f"{name}: use_largereps is AutoAttack's schedule for norm='l1' only, got norm={norm!r}")
    if use_largereps and steps is not None and largereps_schedule(steps)[-1][1] < 1:
        split = ", ".join(str(k) for _, k in largereps_schedule(steps))
        raise ValueError(f"{name}: {whose} splits steps={steps} into {split} iterations at 3, 2, 1 x eps, none at "
                         "eps; expected steps = 3 or >= 5")


def _best_loss_start(z, eps_t):
    """The per-sample best loss over restarts and targets, -inf at first, in a dtype that holds the model's losses:
    float64 logits (a float32 input) stopped the attack with an index_put dtype error."""
    dtype = torch.promote_types(z.dtype, eps_t.dtype)
    return torch.full((z.shape[0],), float("-inf"), dtype=dtype, device=eps_t.device)


def _keep_best(x_adv, best_loss, idx, x_best, x_best_adv, success, lb):
    """One run of :func:`_apgd_stages` on the samples ``idx`` (a restart, or a restart for one target) kept in
    ``x_adv``: per sample its first point that succeeded, else its highest-loss point where that loss ``lb`` beats
    ``best_loss``, raised to it. Written back at every position of idx, not indexed by the masks: each boolean index is
    a nonzero (a host sync on a GPU), three a restart."""
    keep = success | (lb > best_loss[idx])
    chosen = torch.where(success.view(-1, *([1] * (x_adv.dim() - 1))), x_best_adv, x_best)
    x_adv[idx] = torch.where(keep.view(-1, *([1] * (x_adv.dim() - 1))), chosen, x_adv[idx])
    best_loss[idx] = torch.maximum(best_loss[idx], lb)


def _check_apgd_options(name, norm, steps, n_restarts, loss, rho, eot_iter, use_largereps):
    """The checks of APGD's and APGD-T's options that x does not decide, run by the functions and, when built, by the
    classes (a bad option in an AutoAttack list surfaced only once the cascade reached it); returns (norm, steps,
    n_restarts, eot_iter)."""
    norm = check_norm(name, norm, NORMS_WITH_L1)
    steps = check_steps(name, steps)
    check_largereps(name, use_largereps, norm, steps)
    n_restarts = check_steps(name, n_restarts, "n_restarts")
    eot_iter = check_steps(name, eot_iter, "eot_iter")
    if loss not in APGD_LOSSES:
        # AutoAttack's APGDAttack_targeted spells its losses 'dlr-targeted' / 'ce-targeted'; here apgd_t's "dlr" / "ce"
        # are those (apgd's with targeted=True too)
        hint = (f" (AutoAttack's {loss!r} is loss={loss[:-len('-targeted')]!r} here: apgd_t / APGDT use it towards "
                "their targets)" if isinstance(loss, str) and loss in ("dlr-targeted", "ce-targeted") else "")
        raise ValueError(f"{name}: expected loss to be one of {', '.join(APGD_LOSSES)}, got {loss!r}{hint}")
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 < rho <= 1:  # True ran as rho=1
        raise ValueError(f"{name}: expected rho in (0, 1], got {rho!r}")
    return norm, steps, n_restarts, eot_iter


def _check_apgd_args(name, x, y, eps, norm, steps, n_restarts, loss, rho, clip_min, clip_max, eot_iter,
                     use_largereps=False):
    """The argument checks APGD and APGD-T share; returns (y as int64, norm, steps, n_restarts, eps as a per-sample
    tensor, eot_iter, the labels' range for clean_logits)."""
    check_gradients_possible(name)
    y, y_range = check_inputs(name, x, y, clip_min, clip_max, label_range=True)
    norm, steps, n_restarts, eot_iter = _check_apgd_options(name, norm, steps, n_restarts, loss, rho, eot_iter,
                                                            use_largereps)
    eps_t, eps_max = per_sample(name, "eps", eps, x, with_max=True)
    check_linf_budget(name, norm, eps_t, clip_min, clip_max, eps_max=eps_max)
    check_linf_step_resolution(name, norm, x, eps)  # no move from x exceeds eps: below the resolution none happens
    return y, norm, steps, n_restarts, eps_t, eot_iter, y_range


@names_foreign_options
def apgd(model, x, y, *, eps, norm="linf", steps=100, loss="ce", targeted=False, n_restarts=1, rho=0.75,
         eot_iter=1, use_largereps=False, clip_min=0.0, clip_max=1.0, model_mode="eval", generator=None):
    r"""Auto-PGD (Croce & Hein 2020), untargeted or targeted, Linf, L2 or L1 (Croce & Hein 2021's L1-APGD).

    Args:
        model: ``[N, K]`` logits or ``[N]`` / ``[N, 1]`` single logits.
        x (Tensor[N, ...]) in the clip range; y (LongTensor[N]): true labels, or target labels when ``targeted``.
        eps (float or Tensor[N]); norm: "linf" (default), "l2" or "l1" (any case); steps (int): iterations per
            restart (default 100).
        loss: "ce" (default), "dlr" (difference of logits ratio) or "cw" (margin). DLR is undefined below 3
            classes (targeted: 4): it then falls back to the CW margin loss (binary and single-logit models).
        targeted (bool): y are targets; success means the target is predicted.
        n_restarts (int): random restarts, each on the samples not yet broken. rho: checkpoint threshold (0.75).
        eot_iter (int): forward/backward passes per step whose gradients are averaged (Expectation over
            Transformation, for randomized models: AutoAttack's ``rand`` version uses 20); default 1. The loss and
            the success check of a step are those of its last pass, as AutoAttack's. The model's own randomness
            draws from torch's global generator (seed it with ``torch.manual_seed``), not from ``generator``.
        use_largereps (bool, norm "l1" only): AutoAttack's schedule, each restart runs ceil(0.3 steps) iterations at
            3 x eps, ceil(0.3 steps) at 2 x eps and the rest at eps, each stage from the previous one's best point;
            only the last stage counts. Default False (AutoAttack's standard L1 version sets it).
        clip_min, clip_max, model_mode, generator (random starts).

    Returns:
        x_adv: per sample the first iterate that succeeded, else the highest-loss point found (AutoAttack returns
        the clean input there).

    Raises:
        NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError, InputShapeError: as
        :func:`run_pgd`.
    """
    return _apgd("apgd", model, x, y, eps=eps, norm=norm, steps=steps, loss=loss, targeted=targeted,
                 n_restarts=n_restarts, rho=rho, eot_iter=eot_iter, use_largereps=use_largereps, clip_min=clip_min,
                 clip_max=clip_max, model_mode=model_mode, generator=generator)


def _apgd(name, model, x, y, *, eps, norm, steps, loss, targeted, n_restarts, rho, eot_iter, use_largereps, clip_min,
          clip_max, model_mode, generator):
    """:func:`apgd`, its errors naming ``name`` ("apgd", or ``APGD``'s "apgd-ce" / "apgd-dlr" / "apgd-cw", whose
    errors named apgd when run)."""
    y, norm, steps, n_restarts, eps_t, eot_iter, y_range = _check_apgd_args(
        name, x, y, eps, norm, steps, n_restarts, loss, rho, clip_min, clip_max, eot_iter, use_largereps)
    check_flags(name, {"targeted": targeted})  # targeted="no" ran a targeted attack
    x = x.detach()
    x_adv = x.clone()
    if x.numel() == 0:  # no samples, or images without pixels: nothing to perturb
        return x_adv
    with attack_context(model, model_mode, name):
        z, correct = clean_logits(name, model, x, y, y_range)
        used = effective_loss(loss, z.shape[1], targeted)
        todo = ~correct if targeted else correct
        best_loss = _best_loss_start(z, eps_t)
        for _ in range(n_restarts):
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            yi = y[idx]
            x_best, success, x_best_adv = _apgd_stages(
                model, x[idx], None if targeted else yi, yi if targeted else None, used, eps_t[idx], norm, steps,
                rho, clip_min, clip_max, generator, name, eot_iter=eot_iter, use_largereps=use_largereps)
            with torch.no_grad():
                z = forward(name, model, x_best)
                lb = per_sample_loss(z, used, None if targeted else yi, yi if targeted else None)
            _keep_best(x_adv, best_loss, idx, x_best, x_best_adv, success, lb)
            todo[idx] = todo[idx] & ~success
    return x_adv


@names_foreign_options
def apgd_t(model, x, y, *, eps, norm="linf", steps=100, n_target_classes=9, loss="dlr", n_restarts=1, rho=0.75,
           eot_iter=1, use_largereps=False, clip_min=0.0, clip_max=1.0, model_mode="eval", generator=None, **options):
    r"""APGD-T, AutoAttack's targeted APGD: for each of the ``n_target_classes`` classes with the highest clean
    logits after the top one, a targeted APGD (targeted DLR loss; falls back to the CW margin below 4 classes) runs
    on the samples still correctly classified. y are TRUE labels; success means any misclassification.
    With fewer classes the number of targets is capped at K - 1.

    Args:
        model: ``[N, K]`` logits or ``[N]`` / ``[N, 1]`` single logits.
        x (Tensor[N, ...]) in the clip range.
        y (LongTensor[N]): true labels (never targets: the targets are the runner-up classes).
        eps (float or Tensor[N]): radius, per sample if a tensor.
        norm: "linf" (default), "l2" or "l1" (any case).
        steps (int): iterations per restart (default 100).
        n_target_classes (int >= 1): how many runner-up classes are targeted in turn (default 9, AutoAttack's).
        loss: "dlr" (default; the targeted DLR loss, the CW margin below 4 classes), "ce" or "cw", each toward the
            target class.
        n_restarts (int): random restarts per target class, each on the samples not yet broken (default 1).
        rho (float): APGD's checkpoint threshold (0.75), as :func:`apgd`.
        eot_iter, use_largereps: as :func:`apgd`.
        clip_min, clip_max (float): valid input range.
        model_mode: "eval" (default), "train" or "keep".
        generator (torch.Generator): for the random starts.
        options: none; a ``targeted=`` is refused with a ValueError saying why (a TypeError names any other).

    Returns:
        x_adv as :func:`apgd`: per sample the first iterate that succeeded, else the highest-loss point found.

    Raises:
        NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError, InputShapeError: as
        :func:`run_pgd`.
    """
    refuse_targeted("apgd_t", options, "APGD-T is always targeted (y are true labels; its targets are the runner-up "
                    "classes)", ", or use apgd (untargeted, or with targeted=True y as the targets)")
    return _apgd_t("apgd_t", model, x, y, eps=eps, norm=norm, steps=steps, n_target_classes=n_target_classes,
                   loss=loss, n_restarts=n_restarts, rho=rho, eot_iter=eot_iter, use_largereps=use_largereps,
                   clip_min=clip_min, clip_max=clip_max, model_mode=model_mode, generator=generator)


def _apgd_t(name, model, x, y, *, eps, norm, steps, n_target_classes, loss, n_restarts, rho, eot_iter, use_largereps,
            clip_min, clip_max, model_mode, generator):
    """:func:`apgd_t`, its errors naming ``name`` ("apgd_t", or "apgd-t" for ``APGDT``, whose errors named apgd_t
    when run)."""
    y, norm, steps, n_restarts, eps_t, eot_iter, y_range = _check_apgd_args(
        name, x, y, eps, norm, steps, n_restarts, loss, rho, clip_min, clip_max, eot_iter, use_largereps)
    n_target_classes = check_steps(name, n_target_classes, "n_target_classes")
    x = x.detach()
    x_adv = x.clone()
    if x.numel() == 0:  # no samples, or images without pixels: nothing to perturb
        return x_adv
    with attack_context(model, model_mode, name):
        z, robust = clean_logits(name, model, x, y, y_range)
        used = effective_loss(loss, z.shape[1], True)
        best_loss = _best_loss_start(z, eps_t)
        for targets in runner_up_targets(z, n_target_classes):
            for _ in range(n_restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                yi, ti = y[idx], targets[idx]
                x_best, fooled, x_best_adv = _apgd_stages(model, x[idx], yi, ti, used, eps_t[idx], norm, steps, rho,
                                                          clip_min, clip_max, generator, name, success_is_target=False,
                                                          eot_iter=eot_iter, use_largereps=use_largereps)
                with torch.no_grad():
                    lb = per_sample_loss(forward(name, model, x_best), used, yi, ti)
                _keep_best(x_adv, best_loss, idx, x_best, x_best_adv, fooled, lb)
                robust[idx] = robust[idx] & ~fooled
    return x_adv


class APGD(Attack):
    """``APGD(model, eps=8/255, norm="linf", steps=100, loss="ce", n_restarts=1, rho=0.75, seed=0, eot_iter=1,
    use_largereps=False)(x, y)``; norm "linf", "l2" or "l1"; ``seed`` seeds the random starts; see :func:`apgd`."""

    name = "apgd"
    uses_gradients = True
    norms = NORMS_WITH_L1

    def __init__(self, model, eps=8 / 255, norm="linf", steps=100, loss="ce", n_restarts=1, *positional, rho=0.75,
                 seed=0, eot_iter=1, use_largereps=False, **options):
        refuse_positional_options(self.name, APGD, positional, norm_first_hint("APGD"))
        super().__init__(model, **options)
        if isinstance(loss, str) and loss in APGD_LOSSES:  # named as in an AutoAttack list and the CLI, built and run
            self.name = f"apgd-{loss}"
        self.eps, self.norm, self.steps, self.loss = eps, check_norm(self.name, norm, self.norms), steps, loss
        self.n_restarts, self.rho, self.seed, self.eot_iter = n_restarts, rho, seed, eot_iter
        self.use_largereps = use_largereps
        # here too, not only at the first call, which in an AutoAttack list came after the attacks before it
        _check_apgd_options(self.name, norm, steps, n_restarts, loss, rho, eot_iter, use_largereps)
        check_seed(self.name, seed, optional=True)
        check_budget(self.name, self.norm, eps, self.clip_min, self.clip_max)

    def forward(self, x, y):
        return _apgd(self.name, self.model, x, y, eps=self.eps, norm=self.norm, steps=self.steps, loss=self.loss,
                    targeted=self.targeted, n_restarts=self.n_restarts, rho=self.rho, eot_iter=self.eot_iter,
                    use_largereps=self.use_largereps, clip_min=self.clip_min, clip_max=self.clip_max,
                    model_mode=self.model_mode, generator=make_generator(self.seed, x, self.name))


class APGDT(Attack):
    """``APGDT(model, eps=8/255, norm="linf", steps=100, n_target_classes=9, loss="dlr", n_restarts=1, rho=0.75,
    seed=0, eot_iter=1, use_largereps=False)(x, y)``: AutoAttack's APGD-T (y are true labels); norm "linf", "l2" or
    "l1"; ``seed`` seeds the random starts; see :func:`apgd_t`."""

    name = "apgd-t"
    uses_gradients = True
    supports_targeted = False
    norms = NORMS_WITH_L1
    _FOREIGN_OPTIONS = {**Attack._FOREIGN_OPTIONS, "n_classes": N_CLASSES_HINT}

    def __init__(self, model, eps=8 / 255, norm="linf", steps=100, n_target_classes=9, *positional, loss="dlr",
                 n_restarts=1, rho=0.75, seed=0, eot_iter=1, use_largereps=False, **options):
        refuse_positional_options(self.name, APGDT, positional, norm_first_hint("APGDT"))
        super().__init__(model, **options)
        self.eps, self.norm, self.steps = eps, check_norm(self.name, norm, self.norms), steps
        self.n_target_classes = n_target_classes
        self.loss, self.n_restarts, self.rho, self.seed, self.eot_iter = loss, n_restarts, rho, seed, eot_iter
        self.use_largereps = use_largereps
        # here too, not only at the first call, which in an AutoAttack list came after the attacks before it
        _check_apgd_options(self.name, norm, steps, n_restarts, loss, rho, eot_iter, use_largereps)
        check_steps(self.name, n_target_classes, "n_target_classes")
        check_seed(self.name, seed, optional=True)
        check_budget(self.name, self.norm, eps, self.clip_min, self.clip_max)

    def forward(self, x, y):
        return _apgd_t(self.name, self.model, x, y, eps=self.eps, norm=self.norm, steps=self.steps,
                      n_target_classes=self.n_target_classes, loss=self.loss, n_restarts=self.n_restarts,
                      rho=self.rho, eot_iter=self.eot_iter, use_largereps=self.use_largereps, clip_min=self.clip_min,
                      clip_max=self.clip_max, model_mode=self.model_mode,
                      generator=make_generator(self.seed, x, self.name))
