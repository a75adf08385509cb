"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020, arXiv:1907.02044), untargeted and FAB-T (AutoAttack's targeted version), Linf, L2
and L1.

Follows AutoAttack's ``FABAttack_PT`` (fab_base.py / fab_pt.py) and torchattacks 3.5.1's ``FAB`` (both MIT-licensed),
step for step: per iteration the decision boundary of the chosen class is linearised at the iterate, the iterate
and the original point are projected onto that hyperplane intersected with the box [clip_min, clip_max]
(``projection_linf`` / ``projection_l2`` / ``projection_l1``: the reference's batched, sort-and-bisect solvers), the
step is the overshot (``eta``) convex combination of both projections, biased towards the original point by
``alpha = min(|d_x| / (|d_x| + |d_orig|), alpha_max)``, and once the iterate is adversarial it is recorded if it is
the closest so far and pulled back towards the original point by ``beta``. The result is a minimal-norm attack; as
AutoAttack, a sample counts as broken only when its closest adversarial lies within ``eps``. L1: torchattacks 3.5.1
runs the L1 iterations but its final check computes no L1 distance (``FAB(norm='L1')`` raises UnboundLocalError);
the acceptance here is AutoAttack's (``||x_adv - x||_1 <= eps``).
"""

import math

import torch
import torch.nn.functional as F

from .._options import check_flags, check_real, check_seed
from .base import Attack, norm_first_hint, refuse_positional_options
from .context import (attack_context, check_gradients_possible, check_inputs, check_not_half, is_single_logit,
                      predict_from_output, two_logits)
from .core import (NORMS_WITH_L1, check_budget, check_linf_budget, check_norm, check_steps, clean_logits,
                   finite_direction, forward, names_foreign_options, per_sample, refuse_targeted, runner_up_targets,
                   sum_at_any_thread_count)
from .pgd import make_generator

# "no adversarial found yet" as the reference writes it: any real distance is smaller
NOT_FOUND = 1e10
FLOAT16_UNSUPPORTED = "FAB's distances and thresholds (1e10, 1e12, 1e-8) lie outside float16's range"


def projection_linf(points, w, b):
    """Per row: the displacement ``d`` of least Linf norm with ``w . (points + d) = b`` and ``points + d`` in the
    box [0, 1]^D (or the best feasible one towards the hyperplane). Rows [M, D]; AutoAttack's ``projection_linf``:
    the optimal displacement is ``+-lambda`` clipped to the box, with lambda found by sorting the coordinates by the
    ``lambda`` at which they hit the box and bisecting over that order, for every row at once."""
    t, w, b = points, w.clone(), b.clone()
    sign = 2 * (sum_at_any_thread_count(w * t, 1) - b >= 0) - 1
    w.mul_(sign.unsqueeze(1))
    b.mul_(sign)

    a = (w < 0).to(t.dtype)
    d = (a - t) * (w != 0).to(t.dtype)
    p = a - t * (2 * a - 1)
    indp = torch.argsort(p, dim=1)
    b = b - sum_at_any_thread_count(w * t, 1)
    b0 = sum_at_any_thread_count(w * d, 1)

    indp2 = indp.flip((1,))
    ws = w.gather(1, indp2)
    bs2 = -ws * d.gather(1, indp2)
    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(bs2, dim=1) + b0.unsqueeze(1)

    b2 = sb[:, -1] - s[:, -1] * p.gather(1, indp[:, 0:1]).squeeze(1)
    c_l = b - b2 > 0
    # rows of each case found once: a boolean index is a nonzero of its own (a host sync on a GPU)
    rows_l, rows_2 = c_l.nonzero().squeeze(1), ((b - b0 > 0) & (~c_l)).nonzero().squeeze(1)
    lb = torch.zeros(rows_2.numel(), device=t.device)
    ub = torch.full_like(lb, w.shape[1] - 1)
    indp_, sb_, s_, p_, b_ = indp[rows_2], sb[rows_2], s[rows_2], p[rows_2], b[rows_2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        mid_index = mid.long().unsqueeze(1)
        indcurr = indp_.gather(1, indp_.size(1) - 1 - mid_index)
        b2 = (sb_.gather(1, mid_index) - s_.gather(1, mid_index) * p_.gather(1, indcurr)).squeeze(1)
        c = b_ - b2 > 0
        lb = torch.where(c, mid, lb)
        ub = torch.where(c, ub, mid)
    lb = lb.long()

    if rows_l.numel():
        lmbd_opt = torch.clamp_min((b[rows_l] - sb[rows_l, -1]) / (-s[rows_l, -1]), min=0).unsqueeze(-1)
        d[rows_l] = (2 * a[rows_l] - 1) * lmbd_opt
    lmbd_opt = torch.clamp_min((b_ - sb[rows_2, lb]) / (-s[rows_2, lb]), min=0).unsqueeze(-1)
    d_, a_ = d[rows_2], a[rows_2]
    d[rows_2] = torch.min(lmbd_opt, d_) * a_ + torch.max(-lmbd_opt, d_) * (1 - a_)
    return d * (w != 0).to(t.dtype)


def projection_l2(points, w, b):
    """As :func:`projection_linf` for the L2 norm (AutoAttack's ``projection_l2``): the displacement is ``-lambda * w``
    clipped to the box; the coordinates are sorted by the ``lambda`` at which they hit it and the right ``lambda``
    found by bisection, for every row at once."""
    t, w = points, w.clone()
    c = sum_at_any_thread_count(w * t, 1) - b
    ind2 = 2 * (c >= 0) - 1
    w.mul_(ind2.unsqueeze(1))
    c.mul_(ind2)

    r = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)
    r.masked_fill_(w.abs() < 1e-8, 1e12)
    r.masked_fill_(r == -1e12, 1e12)  # the reference negates them: the same value, without a boolean index
    rs, indr = torch.sort(r, dim=1)
    rs2 = F.pad(rs[:, 1:], (0, 1))
    rs.masked_fill_(rs == 1e12, 0)
    rs2.masked_fill_(rs2 == 1e12, 0)

    w3s = (w ** 2).gather(1, indr)
    w5 = sum_at_any_thread_count(w3s, 1, keepdim=True)
    ws = w5 - torch.cumsum(w3s, dim=1)
    d = -(r * w)
    d.mul_((w.abs() > 1e-8).to(t.dtype))
    s = torch.cat((-w5 * rs[:, 0:1], torch.cumsum((-rs2 + rs) * ws, dim=1) - w5 * rs[:, 0:1]), 1)

    c4 = s[:, 0] + c < 0
    c3 = sum_at_any_thread_count(d * w, 1) + c > 0
    # rows of each case found once (as projection_linf)
    rows_4, rows_2 = c4.nonzero().squeeze(1), (~(c4 | c3)).nonzero().squeeze(1)
    lb = torch.zeros(rows_2.numel(), device=t.device)
    ub = torch.full_like(lb, w.shape[1] - 1)
    s_, c_ = s[rows_2], c[rows_2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        above = s_.gather(1, mid.long().unsqueeze(1)).squeeze(1) + c_ > 0
        lb = torch.where(above, mid, lb)
        ub = torch.where(above, ub, mid)
    lb = lb.long()

    if rows_4.numel():
        alpha = c[rows_4] / w5[rows_4].squeeze(-1)
        d[rows_4] = -alpha.unsqueeze(-1) * w[rows_4]
    if rows_2.numel():
        ws_ = ws[rows_2, lb]
        alpha = ((s[rows_2, lb] + c_) / ws_ + rs[rows_2, lb]).masked_fill_(ws_ == 0, 0)
        c5 = (alpha.unsqueeze(-1) > r[rows_2]).to(t.dtype)
        d[rows_2] = d[rows_2] * c5 - alpha.unsqueeze(-1) * w[rows_2] * (1 - c5)
    return d * (w.abs() > 1e-8).to(t.dtype)


def projection_l1(points, w, b):
    """As :func:`projection_linf` for the L1 norm (AutoAttack's ``projection_l1``): the cheapest L1 move spends on
    the coordinates with the largest ``|w|`` first, each up to its box face, so the coordinates are sorted by
    ``1 / |w|``, the first ones (found by bisection on the cumulative reach) are moved to the box and the last one
    covers the rest of the distance to the hyperplane, for every row at once."""
    t, w = points, w.clone()
    c = sum_at_any_thread_count(w * t, 1) - b
    ind2 = 2 * (c >= 0) - 1
    w.mul_(ind2.unsqueeze(1))
    c.mul_(ind2)

    r = (1 / w).abs().clamp_max(1e12)
    indr = torch.argsort(r, dim=1)
    indr_rev = torch.argsort(indr)

    c6 = (w < 0).to(t.dtype)
    d = (-t + c6) * (w != 0).to(t.dtype)
    ds = torch.min(-w * t, w * (1 - t)).gather(1, indr)
    ds2 = torch.cat((c.unsqueeze(-1), ds), 1)
    s = torch.cumsum(ds2, dim=1)

    rows_2 = (s[:, -1] < 0).nonzero().squeeze(1)  # found once (as projection_linf)
    lb = torch.zeros(rows_2.numel(), device=t.device)
    ub = torch.full_like(lb, s.shape[1])
    s_ = s[rows_2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        above = s_.gather(1, mid.long().unsqueeze(1)).squeeze(1) > 0
        lb = torch.where(above, mid, lb)
        ub = torch.where(above, ub, mid)
    lb2 = lb.long()

    if rows_2.numel():
        last = indr[rows_2].gather(1, lb2.unsqueeze(1)).squeeze(1)  # per row: the coordinate that covers the rest
        rows = torch.arange(0, w.shape[0], device=t.device).unsqueeze(1)
        positions = torch.arange(0, w.shape[1], device=t.device, dtype=t.dtype).unsqueeze(0)
        alpha = -s[rows_2, lb2] / w[rows_2, last]
        before = positions < lb.unsqueeze(-1)  # sorted positions moved to the box; the reference's float lb
        keep = before[rows[: before.shape[0]], indr_rev[rows_2]]
        d[rows_2] = d[rows_2] * keep.to(t.dtype)
        d[rows_2, last] = alpha
    return d * (w.abs() > 1e-8).to(t.dtype)


PROJECTIONS = {"linf": projection_linf, "l2": projection_l2, "l1": projection_l1}


def project_onto_boundary(points, w, b, norm, clip_min, clip_max):
    """:func:`projection_linf` / :func:`projection_l2` / :func:`projection_l1` for the box [clip_min, clip_max]: the
    solvers assume [0, 1], so the problem is rescaled to it (exact: every norm scales with the box, and for [0, 1]
    every operation below is the identity, so the reference's bits are kept)."""
    width = clip_max - clip_min
    if clip_min == 0.0 and clip_max == 1.0:
        return PROJECTIONS[norm](points, w, b)
    # w . (lo + width * t') = b  <=>  (width * w) . t' = b - lo * sum(w); the displacement scales back by width
    d = PROJECTIONS[norm]((points - clip_min) / width, w * width, b - clip_min * sum_at_any_thread_count(w, 1))
    return d * width


def _norm_rows(d, norm):
    if norm == "l1":
        return sum_at_any_thread_count(d.abs(), 1)
    return d.abs().amax(1) if norm == "linf" else sum_at_any_thread_count(d ** 2, 1).sqrt()


def _in_range(df, dg):
    """``df`` [n, k] and ``dg`` [n, k, D] divided per sample by a power of two (exact) that brings the largest finite
    |dg| into [0.5, 1) where it passes 2^32: the linearised boundaries are the same (each w . x = b scales as a whole),
    but the dual norms, the projections' w . x and L2's squared w no longer overflow (float32 gradients past ~2^64
    made L2's squares inf, past ~2^120 Linf's sums, and FAB returned the clean points). Other samples are multiplied
    by 1: their bits are kept."""
    top = dg.abs().reshape(dg.shape[0], -1).amax(1) if dg.numel() else dg.new_zeros(dg.shape[0])
    big = (top > 2.0 ** 32) & torch.isfinite(top)
    scale = torch.where(big, torch.ldexp(torch.ones_like(top), -torch.frexp(top)[1]), torch.ones_like(top))
    return df * scale.unsqueeze(1), dg * scale.view(-1, 1, 1)


def _boundary_untargeted(name, model, x1, y):
    """Logit differences ``z_k - z_y`` [n, K] (``1e10`` at k = y, never chosen) and their input gradients
    [n, K, D] at ``x1``: one backward per class, as the reference (K is small for medical tasks)."""
    n = x1.shape[0]
    xg = x1.detach().requires_grad_(True)
    with torch.enable_grad():
        out = forward(name, model, xg)
        z = two_logits(out) if is_single_logit(out) else out
        # a one-hot output gradient per class (the reference's), not z[:, k].sum(): no indexing in the graph. As the
        # gradient of (z * one-hot).sum(), exactly that one-hot: torch.autograd.grad given grad_outputs imports
        # torch.fx's symbolic shapes (sympy), 0.9 s and 35 MB of resident memory at a process's first FAB
        picks = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        grads, zk, retain = [], z, True
        for k in range(z.shape[1]):
            if zk is None:  # the graph is gone: a forward of this class's own (the same logits)
                out = forward(name, model, xg)
                zk = two_logits(out) if is_single_logit(out) else out
            keep = retain and k + 1 < z.shape[1]
            try:
                grads.append(torch.autograd.grad((zk * picks[k]).sum(), [xg], retain_graph=keep)[0])
            except RuntimeError as err:
                # a torch.compile'd model's backward with donated buffers (AOTAutograd's default, met once its
                # batch size varies: dynamic shapes) refuses retain_graph=True ("compiled with non-empty donated
                # buffers"), where FAB stopped, and frees the graph: from this class on each class forwards again
                # (K forwards a step; the same points)
                if not keep or "donated buffers" not in str(err):
                    raise
                retain = keep = False
                out = forward(name, model, xg)
                zk = two_logits(out) if is_single_logit(out) else out
                grads.append(torch.autograd.grad((zk * picks[k]).sum(), [xg])[0])
            if not keep:
                zk = None
    g = finite_direction(torch.stack(grads, 1).reshape(n, z.shape[1], -1))
    rows = torch.arange(n, device=x1.device)
    z = z.detach()
    # in the input's dtype, as the gradients: float64 logits of a float32 input stopped the projection's index_put
    df = (z - z[rows, y].unsqueeze(1)).to(g.dtype)
    df, dg = _in_range(df, g - g[rows, y].unsqueeze(1))
    df[rows, y] = NOT_FOUND
    return df, dg


def _boundary_targeted(name, model, x1, y, target):
    """The target's logit difference ``z_t - z_y`` [n, 1] and its input gradient [n, 1, D] at ``x1``."""
    n = x1.shape[0]
    rows = torch.arange(n, device=x1.device)
    xg = x1.detach().requires_grad_(True)
    with torch.enable_grad():
        out = forward(name, model, xg)
        z = two_logits(out) if is_single_logit(out) else out
        diff = -(z[rows, y] - z[rows, target])  # the reference's arithmetic, for its bits
        (g,) = torch.autograd.grad(diff.sum(), [xg])
    # in the input's dtype, as untargeted
    return _in_range(diff.detach().to(g.dtype).unsqueeze(1), finite_direction(g.reshape(n, 1, -1)))


def _random_start(x, eps_t, norm, clip_min, clip_max, generator):
    """The reference's restart point: a random direction scaled to half of eps (Linf: max entry eps / 2; L2 / L1: a
    Gaussian point on the L2 / L1 sphere of radius eps / 2), clipped to the box."""
    n = x.shape[0]
    view = (n,) + (1,) * (x.dim() - 1)
    radius = eps_t.view(view).to(x.dtype)
    if norm == "linf":
        t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
        x1 = x + radius * t / t.reshape(n, -1).abs().amax(1).view(view) * 0.5
    elif norm == "l2":
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x1 = x + radius * t / sum_at_any_thread_count((t ** 2).reshape(n, -1), -1).sqrt().view(view) * 0.5
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x1 = x + radius * t / sum_at_any_thread_count(t.abs().reshape(n, -1), -1).view(view) / 2
    return x1.clamp(clip_min, clip_max)


def _fab_run(model, x, y, target, eps_t, norm, steps, alpha_max, eta, beta, clip_min, clip_max, random_start,
             generator, name):
    """One FAB run on correctly classified samples ``x`` (labels ``y``; ``target`` None: untargeted). Returns
    ``x_best``: the closest adversarial found (``x`` where none); the caller judges it against eps with a fresh
    forward, as the reference does."""
    n = x.shape[0]
    view = (n,) + (1,) * (x.dim() - 1)
    rows = torch.arange(n, device=x.device)
    x0 = x.reshape(n, -1)
    x_best = x.clone()
    dist_best = torch.full((n,), NOT_FOUND, dtype=x.dtype, device=x.device)
    x1 = _random_start(x, eps_t, norm, clip_min, clip_max, generator) if random_start else x.clone()
    for _ in range(steps):
        if target is None:
            df, dg = _boundary_untargeted(name, model, x1, y)
        else:
            df, dg = _boundary_targeted(name, model, x1, y, target)
        with torch.no_grad():
            # the closest linearised boundary: |f_k| / ||grad f_k||_* (dual norm: L1 for Linf, L2 for L2, Linf for L1)
            if norm == "l1":
                dual = dg.abs().amax(-1)
            else:
                dual = (sum_at_any_thread_count(dg.abs(), -1) if norm == "linf" else
                        sum_at_any_thread_count(dg ** 2, -1).sqrt())
            closest = (df.abs() / (1e-12 + dual)).min(dim=1)[1]
            w = dg[rows, closest]
            x1_flat = x1.reshape(n, -1)
            b = -df[rows, closest] + sum_at_any_thread_count(w * x1_flat, -1)
            # project the iterate and the original point in one batch, as the reference
            d = project_onto_boundary(torch.cat((x1_flat, x0), 0), torch.cat((w, w), 0), torch.cat((b, b), 0),
                                      norm, clip_min, clip_max)
            d_iterate, d_orig = d[:n].reshape(x.shape), d[n:].reshape(x.shape)
            size = torch.clamp_min(_norm_rows(d, norm), 1e-8).view(-1, *view[1:])
            size_iterate, size_orig = size[:n], size[n:]
            alpha = torch.clamp(size_iterate / (size_iterate + size_orig), min=0, max=alpha_max)
            x1 = ((x1 + eta * d_iterate) * (1 - alpha) + (x + d_orig * eta) * alpha).clamp(clip_min, clip_max)
            adversarial = predict_from_output(forward(name, model, x1)) != y
            found = adversarial.nonzero().squeeze(1)
            if found.numel():
                x1_found, x_found = x1[found], x[found]  # gathered once (three times each, and nonzeros, before)
                dist = _norm_rows((x1_found - x_found).reshape(found.numel(), -1), norm)
                closer = (dist < dist_best[found]).nonzero().squeeze(1)
                x_best[found[closer]] = x1_found[closer]
                dist_best[found[closer]] = dist[closer]
                # backward step: restart the search closer to the original point
                x1[found] = x_found + (x1_found - x_found) * beta
    return x_best


def _check_fab_options(name, norm, steps, n_restarts, n_target_classes, alpha_max, eta, beta):
    """The checks of FAB's options that x does not decide, run by :func:`fab` and, when built, by ``FAB`` and
    ``FABT`` (a bad option in an AutoAttack list surfaced only once the cascade reached it, after APGD had run)."""
    norm = check_norm(name, norm, NORMS_WITH_L1)
    steps = check_steps(name, steps)
    n_restarts = check_steps(name, n_restarts, "n_restarts")
    n_target_classes = check_steps(name, n_target_classes, "n_target_classes")
    alpha_max = check_real(name, "alpha_max", alpha_max, minimum=0, allow_min=False, maximum=1)
    eta = check_real(name, "eta", eta, minimum=1)
    beta = check_real(name, "beta", beta, minimum=0, allow_min=False, maximum=1)
    return norm, steps, n_restarts, n_target_classes, alpha_max, eta, beta


def _check_fab_args(name, x, y, eps, norm, steps, n_restarts, alpha_max, eta, beta, n_target_classes, clip_min,
                    clip_max):
    check_gradients_possible(name)
    check_not_half(name, x, FLOAT16_UNSUPPORTED, (torch.float16,))
    y = check_inputs(name, x, y, clip_min, clip_max)
    norm, steps, n_restarts, n_target_classes, alpha_max, eta, beta = _check_fab_options(
        name, norm, steps, n_restarts, n_target_classes, alpha_max, eta, beta)
    eps_t, eps_max = per_sample(name, "eps", eps, x, with_max=True)
    check_linf_budget(name, norm, eps_t, clip_min, clip_max, eps_max=eps_max)
    return y, norm, steps, n_restarts, n_target_classes, alpha_max, eta, beta, eps_t


@names_foreign_options
def fab(model, x, y, *, eps, norm="linf", steps=100, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
        targeted=False, n_target_classes=9, clip_min=0.0, clip_max=1.0, model_mode="eval", generator=None):
    r"""FAB (Croce & Hein 2020), untargeted or FAB-T, Linf, L2 or L1: a minimal-norm attack, reported within ``eps``.

    ``y`` are the TRUE labels in both modes. Untargeted (``targeted=False``, torchattacks' ``FAB`` default): each
    step linearises the boundary of the class closest under that linearisation (one backward per class).
    ``targeted=True`` is FAB-T, AutoAttack's standard: for each of the ``n_target_classes`` classes ranked 2nd, 3rd,
    ... by the clean logits (capped at K - 1; binary and single-logit models: one target) a run pushes towards that
    class only (one backward per step) on the samples not yet broken; success is any misclassification, as in
    :func:`apgd_t`. ``n_restarts`` runs per target (untargeted: in all); the first starts at the clean input, later
    ones from a random point at half of eps (the reference's ``use_rand_start = counter > 0``), drawn from
    ``generator``.

    Args:
        model: ``[N, K]`` logits or ``[N]`` / ``[N, 1]`` single logits.
        x (Tensor[N, ...]) in the clip range; y (LongTensor[N]): true labels.
        eps (float >= 0 or Tensor[N]): the radius a found adversarial must lie within to count (0: the sample
            is returned unchanged, not attacked).
        norm: "linf" (default), "l2" or "l1" (any case). steps (int): iterations per run (default 100, AutoAttack's).
        n_restarts (int): runs per target class (default 1). alpha_max (float in (0, 1]): cap on the bias towards
            the original point (0.1). eta (float >= 1): overshoot of the projection (1.05). beta (float in (0, 1]):
            backward step once adversarial (0.9). targeted (bool): FAB-T. n_target_classes (int): FAB-T's targets (9).
        clip_min, clip_max, model_mode, generator (random restarts only).

    Returns:
        x_adv: per sample the closest adversarial found if within ``eps``, else the clean input (also for samples
        misclassified on the clean input), as AutoAttack.

    Raises:
        NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError, InputShapeError: as
        :func:`run_pgd`.
    """
    return _fab("fab", model, x, y, eps=eps, norm=norm, steps=steps, n_restarts=n_restarts, alpha_max=alpha_max,
                eta=eta, beta=beta, targeted=targeted, n_target_classes=n_target_classes, clip_min=clip_min,
                clip_max=clip_max, model_mode=model_mode, generator=generator)


def _fab(name, model, x, y, *, eps, norm, steps, n_restarts, alpha_max, eta, beta, targeted, n_target_classes,
         clip_min, clip_max, model_mode, generator):
    """:func:`fab`, its errors naming ``name`` ("fab", "fab_t" for :func:`fab_t`, "fab-t" for ``FABT``, as the
    other classes' their own name)."""
    y, norm, steps, n_restarts, n_target_classes, alpha_max, eta, beta, eps_t = _check_fab_args(
        name, x, y, eps, norm, steps, n_restarts, alpha_max, eta, beta, n_target_classes, clip_min, clip_max)
    check_flags(name, {"targeted": targeted})  # targeted="no" ran FAB-T
    x = x.detach()
    x_adv = x.clone()
    if x.numel() == 0 or clip_max == clip_min:  # no samples or pixels, or an empty box: no point other than x
        return x_adv
    with attack_context(model, model_mode, name):
        z, correct = clean_logits(name, model, x, y)
        # samples still to attack: correct on the clean input, with a radius any adversarial could lie within
        robust = correct & (eps_t > 0)
        for targets in runner_up_targets(z, n_target_classes) if targeted else [None]:
            for restart in range(n_restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                target = None if targets is None else targets[idx]
                x_best = _fab_run(model, x[idx], y[idx], target, eps_t[idx], norm, steps, alpha_max, eta, beta,
                                  clip_min, clip_max, restart > 0, generator, name)
                with torch.no_grad():
                    # the reference's acceptance: misclassified by a fresh forward and within eps
                    fooled = predict_from_output(forward(name, model, x_best)) != y[idx]
                    dist = _norm_rows((x_best - x[idx]).reshape(idx.numel(), -1), norm)
                    broken = fooled & (dist <= eps_t[idx])
                # written at every position of idx through torch.where: the boolean indexes were three host reads
                # (GPU syncs) a run
                x_adv[idx] = torch.where(broken.view((-1,) + (1,) * (x.dim() - 1)), x_best, x_adv[idx])
                robust[idx] &= ~broken
    return x_adv


@names_foreign_options
def fab_t(model, x, y, *, eps, norm="linf", steps=100, n_target_classes=9, n_restarts=1, alpha_max=0.1, eta=1.05,
          beta=0.9, clip_min=0.0, clip_max=1.0, model_mode="eval", generator=None, **options):
    """FAB-T, AutoAttack's targeted FAB: :func:`fab` with ``targeted=True`` (y are true labels); its errors name
    fab_t.

    Args: model, x, y, eps, norm (default "linf"), steps (default 100), n_target_classes (default 9), n_restarts,
    alpha_max, eta, beta, clip_min, clip_max, model_mode, generator as :func:`fab`'s; options: none, a
    ``targeted=`` is refused with a ValueError saying why (a TypeError names any other). Returns x_adv as
    :func:`fab`.

    Raises NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError, InputShapeError as
    :func:`run_pgd`.
    """
    name = "fab_t"
    refuse_targeted(name, options, "FAB-T is always targeted (y are true labels; its targets are the runner-up "
                    "classes)", ", or use fab for untargeted FAB")
    return _fab(name, model, x, y, eps=eps, norm=norm, steps=steps, n_restarts=n_restarts, alpha_max=alpha_max,
                eta=eta, beta=beta, targeted=True, n_target_classes=n_target_classes, clip_min=clip_min,
                clip_max=clip_max, model_mode=model_mode, generator=generator)


class FAB(Attack):
    """``FAB(model, eps=8/255, norm="linf", steps=10, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
    multi_targeted=False, n_classes=None, seed=0)(x, y)``: torchattacks' ``FAB`` (y are true labels); see :func:`fab`.
    ``multi_targeted=True`` is FAB-T over ``n_classes - 1`` targets (torchattacks' rule; ``n_classes=None``: every
    class other than the top one, whatever the model's K). No targeted-by-label mode (torchattacks' indexes its
    targets by the wrong batch once a sample is misclassified)."""

    name = "fab"
    uses_gradients = True
    supports_targeted = False
    norms = NORMS_WITH_L1

    def __init__(self, model, eps=8 / 255, norm="linf", steps=10, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
                 multi_targeted=False, n_classes=None, *positional, seed=0, **options):
        refuse_positional_options(self.name, FAB, positional, norm_first_hint("FAB"))
        super().__init__(model, **options)
        if n_classes is not None:
            check_steps(self.name, n_classes, "n_classes", minimum=2)
        self.eps, self.norm = eps, check_norm(self.name, norm, self.norms)
        self.steps, self.n_restarts = steps, n_restarts
        self.alpha_max, self.eta, self.beta = alpha_max, eta, beta
        check_flags(self.name, {"multi_targeted": multi_targeted})  # bool("no") is True: FAB-T would have run
        self.multi_targeted, self.n_classes, self.seed = multi_targeted, n_classes, seed
        # here too, not only at the first call, which in an AutoAttack list came after the attacks before it
        _check_fab_options(self.name, norm, steps, n_restarts, 1, alpha_max, eta, beta)
        check_seed(self.name, seed, optional=True)
        check_budget(self.name, self.norm, eps, self.clip_min, self.clip_max)

    def check_input_dtype(self, x):
        check_not_half(self.name, x, FLOAT16_UNSUPPORTED, (torch.float16,))

    def forward(self, x, y):
        # n_classes None: as many targets as any model can have; fab caps them at K - 1
        n_targets = self.n_classes - 1 if self.n_classes is not None else 2 ** 31 - 1
        return fab(self.model, x, y, eps=self.eps, norm=self.norm, steps=self.steps, n_restarts=self.n_restarts,
                   alpha_max=self.alpha_max, eta=self.eta, beta=self.beta, targeted=self.multi_targeted,
                   n_target_classes=n_targets, clip_min=self.clip_min, clip_max=self.clip_max,
                   model_mode=self.model_mode, generator=make_generator(self.seed, x, self.name))


class FABT(Attack):
    """``FABT(model, eps=8/255, norm="linf", steps=100, n_target_classes=9, n_restarts=1, alpha_max=0.1, eta=1.05,
    beta=0.9, seed=0)(x, y)``: AutoAttack's FAB-T (y are true labels); ``seed`` seeds the random restarts; see
    :func:`fab`."""

    name = "fab-t"
    uses_gradients = True
    supports_targeted = False
    norms = NORMS_WITH_L1

    def __init__(self, model, eps=8 / 255, norm="linf", steps=100, n_target_classes=9, *positional, n_restarts=1,
                 alpha_max=0.1, eta=1.05, beta=0.9, seed=0, **options):
        refuse_positional_options(self.name, FABT, positional)
        super().__init__(model, **options)
        self.eps, self.norm, self.steps = eps, check_norm(self.name, norm, self.norms), steps
        self.n_target_classes, self.n_restarts = n_target_classes, n_restarts
        self.alpha_max, self.eta, self.beta, self.seed = alpha_max, eta, beta, seed
        # as FAB's
        _check_fab_options(self.name, norm, steps, n_restarts, n_target_classes, alpha_max, eta, beta)
        check_seed(self.name, seed, optional=True)
        check_budget(self.name, self.norm, eps, self.clip_min, self.clip_max)

    def check_input_dtype(self, x):
        check_not_half(self.name, x, FLOAT16_UNSUPPORTED, (torch.float16,))

    def forward(self, x, y):
        return _fab(self.name, self.model, x, y, eps=self.eps, norm=self.norm, steps=self.steps,
                    n_restarts=self.n_restarts, alpha_max=self.alpha_max, eta=self.eta, beta=self.beta, targeted=True,
                    n_target_classes=self.n_target_classes, clip_min=self.clip_min, clip_max=self.clip_max,
                    model_mode=self.model_mode, generator=make_generator(self.seed, x, self.name))
