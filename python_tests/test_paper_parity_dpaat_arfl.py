"""DPAAT and ARFL against independent per-sample implementations written from the papers' text (float64, tiny
models, a fixed batch): one training step's loss and its parameter gradients, with the attacks inside them.

DPAAT (Li et al.): eq. 9's PGD from x_0 = x (L2 step eta * g / ||g||, projection onto the ball, clip to [0, 1]),
eqs. 13-14's loss changes and their mini-batch mean, eq. 15's radii, Alg. 1 line 12's second attack at those radii,
eq. 12's L_SAT + beta * L_syn with eq. 11's L_syn on softmax outputs (the documented choices of docs/defenses/dpaat.md:
the Jensen-Shannon sign by default, a negative radius as no perturbation, the second attack's step eps_i * eta / eps
or eta). ARFL (Hao et al.): eq. 1's L_robust on the last convolution's output (or the last Linear's input), eq. 2, and
eq. 5 with ratio r (as loss weights, or as the batch's share of standard samples), the attack on L_cls (or on eq. 5's
whole adversarial term). Each sample's attack here ascends its own loss, one sample at a time; the library attacks
the whole batch at once, so these also check that nothing couples the samples."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_ops.defenses import ARFL, DPAAT

TOL = dict(rtol=0, atol=1e-10)
# gradients: the library's L2 step divides by ||g|| + 1e-10 of the batch-mean loss's gradient (torchattacks' rule),
# eq. 9 by ||g||: the iterates differ in the last digits, which the BatchNorm case's gradients show at ~1e-10
GRAD_TOL = dict(rtol=0, atol=1e-9)


class _Net(nn.Module):
    """conv-ReLU-conv-ReLU-linear on 1x8x8 inputs; ``bn``: a BatchNorm after the first convolution."""

    def __init__(self, k, bn=False):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3) if bn else nn.Identity()
        self.c2 = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, k)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.bn(self.c1(x))))).flatten(1))


def _setup(k, seed=0, n=6, bn=False):
    torch.manual_seed(seed)
    model = _Net(k, bn).double()
    g = torch.Generator().manual_seed(seed + 100)
    x = 0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)  # inside the box: the clip never binds
    y = torch.arange(n) % k
    return model, x, y


def _grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


def _assert_same_step(model, ref, got, ref_model=None):
    """The same loss and the same parameter gradients (``ref_model``: the reference's own copy of ``model``)."""
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    for a, b in zip(_grads(model, got), _grads(model if ref_model is None else ref_model, ref)):
        torch.testing.assert_close(a, b, **GRAD_TOL)


# ------------------------------------------------------------------------------------------------------------ DPAAT


def _ce(model, xi, yi):
    return F.cross_entropy(model(xi[None]), yi[None])


def _project(xi, xa, eps, norm):
    """clip(Proj_B(xa)): onto the ball of radius eps around xi, then into [0, 1]."""
    d = xa - xi
    if norm == "l2":
        d = d * min(1.0, eps / float(d.norm())) if float(d.norm()) > 0 else d
    else:
        d = d.clamp(-eps, eps)
    return (xi + d).clamp(0, 1)


def _pgd_one(model, xi, yi, eps, eta, steps, norm, start=None):
    """Eq. 9 for one sample, from x_0 = x (or from ``start`` projected onto the ball): x <- clip(Proj_B(x + eta *
    step(g))), step = g / ||g||_2 (L2) or sign(g) (Linf)."""
    xa = xi.clone() if start is None else _project(xi, start, eps, norm)
    for _ in range(steps):
        z = xa.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_ce(model, z, yi), z)
        xa = _project(xi, xa + eta * (g / g.norm() if norm == "l2" else g.sign()), eps, norm)
    return xa.detach()


def _js(p, q):
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()


def _printed_syn(p, q):  # eq. 11 exactly as printed
    return -0.5 * ((p * (p / (p + q)).log()).sum() + (q * (q / (p + q)).log()).sum())


def dpaat_reference(model, x, y, eps=0.3, eta=0.15, steps=7, norm="l2", alpha=0.5, beta=1.0, syn="js", adapt=True,
                    radius_step="scaled", bn=False, second_attack_start="x"):
    """One DPAAT step's loss, sample by sample (Alg. 1). With ``bn`` the attacks and the loss changes run in eval
    mode and the training forwards in train mode (BatchNorm couples the batch: those two forwards are batched).
    ``second_attack_start="first_adv"``: line 12's PGD continues from the first x_adv instead of starting at x."""
    n = x.shape[0]
    model.eval()
    x_adv = [_pgd_one(model, x[i], y[i], eps, eta, steps, norm) for i in range(n)]  # Alg. 1 line 2
    if adapt:
        with torch.no_grad():
            dl = [float(_ce(model, x_adv[i], y[i]) - _ce(model, x[i], y[i])) for i in range(n)]  # eq. 13
        avg = sum(dl) / n  # eq. 14
        radii = []
        for i in range(n):
            gamma = eps * abs(dl[i] - avg) / avg  # eq. 15 (a positive mean here: |avg| = avg)
            dist = float((x_adv[i] - x[i]).norm(p=2 if norm == "l2" else math.inf))
            radii.append(max(dist - gamma if dl[i] > avg else dist + gamma, 0.0))
        x_adv = [_pgd_one(model, x[i], y[i], r, r * eta / eps if radius_step == "scaled" else eta, steps, norm,
                          x_adv[i] if second_attack_start == "first_adv" else None)
                 if r > 0 else x[i].clone() for i, r in zip(range(n), radii)]  # Alg. 1 line 12
    if bn:
        model.train()
        lo, la = model(x), model(torch.stack(x_adv))
    else:
        lo = torch.cat([model(x[i][None]) for i in range(n)])
        la = torch.cat([model(v[None]) for v in x_adv])
    total = 0.0
    for i in range(n):
        p, q = lo[i].softmax(0), la[i].softmax(0)
        syn_i = _js(p, q) if syn == "js" else _printed_syn(p, q)
        total = total + alpha * F.cross_entropy(la[i][None], y[i][None]) + (1 - alpha) * F.cross_entropy(
            lo[i][None], y[i][None]) + beta * syn_i  # eq. 12 with eq. 4's L_SAT
    return total / n


@pytest.mark.parametrize("kw", [
    {}, {"syn": "printed"}, {"radius_step": "fixed"}, {"alpha": 0.8, "beta": 0.3},
    {"norm": "linf", "eps": 0.05, "step_size": 0.02}, {"second_attack_start": "first_adv"},
    {"second_attack_start": "first_adv", "norm": "linf", "eps": 0.05, "step_size": 0.02},
], ids=["defaults", "syn-printed", "radius-step-fixed", "alpha-beta", "linf", "first-adv", "first-adv-linf"])
def test_dpaat_step_is_the_papers_per_sample_algorithm(kw):
    model, x, y = _setup(3)
    out = DPAAT(**kw)(model, x, y)
    assert out.metrics["loss_syn"] > 1e-6  # the attacks moved the inputs
    got = out.loss
    ref = dpaat_reference(model, x, y, eps=kw.get("eps", 0.3), eta=kw.get("step_size", kw.get("eps", 0.3) / 2),
                          norm=kw.get("norm", "l2"), alpha=kw.get("alpha", 0.5), beta=kw.get("beta", 1.0),
                          syn=kw.get("syn", "js"), radius_step=kw.get("radius_step", "scaled"),
                          second_attack_start=kw.get("second_attack_start", "x"))
    _assert_same_step(model, ref, got)


def test_dpaat_ablations_d_a_and_d_b_are_the_papers_parts_alone():
    """Fig. 3: D-A (beta = 0, the adaptation alone) and D-B (adapt=False, the synchronization loss at the fixed eps)."""
    model, x, y = _setup(3, seed=1)
    _assert_same_step(model, dpaat_reference(model, x, y, beta=0.0), DPAAT(beta=0)(model, x, y).loss)
    _assert_same_step(model, dpaat_reference(model, x, y, adapt=False), DPAAT(adapt=False)(model, x, y).loss)


def test_dpaat_with_batchnorm_attacks_in_eval_mode_and_trains_in_train_mode():
    model, x, y = _setup(3, seed=0, bn=True)
    with torch.no_grad():  # running statistics away from BatchNorm's (0, 1) start, so eval mode differs from train
        model.bn.running_mean.fill_(0.1)
        model.bn.running_var.fill_(2.0)
    twin = copy.deepcopy(model)  # the library's training forwards move the running statistics the reference reads
    model.train()
    out = DPAAT()(model, x, y)
    assert out.metrics["loss_syn"] > 1e-6 and out.metrics["radius_mean"] > 0  # the attacks moved the inputs
    got = out.loss
    ref = dpaat_reference(twin, x, y, bn=True)
    _assert_same_step(model, ref, got, twin)


def test_dpaat_radii_are_eq_15_on_the_measured_loss_changes():
    """The mean radius the step records is that of eq. 15's radii from the first attack's norms and loss changes;
    with every first perturbation on the sphere of radius eps, eq. 15's signed gammas cancel: mean radius = eps, while
    the radii themselves spread (docs/defenses/dpaat.md: radius_mean 0.3 does not mean the radii did not adapt)."""
    from robust_ops.attacks.core import sample_distance

    model, x, y = _setup(3, seed=0)
    d = DPAAT()
    out = d(model, x, y)
    assert out.metrics["radius_mean"] == pytest.approx(0.3, abs=1e-12)
    first = d.attack(model, x, y).x_adv
    clean, adv = d._losses(model, y, x, first)
    radii = d.radii(sample_distance(first, x, "l2"), adv - clean)
    assert float(radii.mean()) == pytest.approx(0.3, abs=1e-12) and float(radii.max() - radii.min()) > 0.05
    # the same rule on hand values: dL = (1, 2, 6), mean 3, eps 0.3 -> gamma = 0.3 * (2, 1, 3) / 3
    r = DPAAT().radii(torch.full((3,), 0.3, dtype=torch.float64), torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(r, torch.tensor([0.3 + 0.2, 0.3 + 0.1, 0.0], dtype=torch.float64), **TOL)


def test_dpaat_denominator_printed_is_eq_15_as_printed_for_a_negative_mean():
    """Eq. 15 divides by dL_avg itself: with a negative mean gamma turns negative, so 'fragile' samples grow.
    denominator="printed" is that formula; the default divides by |dL_avg| (the documented choice)."""
    norms = torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64)
    dl = torch.tensor([-3.0, -1.0, 1.0], dtype=torch.float64)  # mean -1
    avg = float(dl.mean())
    printed = [float(nm) - 0.3 * abs(float(d) - avg) / avg if float(d) > avg else float(nm) + 0.3 * abs(float(d) - avg)
               / avg for nm, d in zip(norms, dl)]
    got = DPAAT(denominator="printed").radii(norms, dl)
    torch.testing.assert_close(got, torch.tensor(printed, dtype=torch.float64).clamp_min(0), **TOL)
    absolute = DPAAT().radii(norms, dl)
    torch.testing.assert_close(absolute, torch.tensor([0.2 + 0.6, 0.3, 0.4 - 0.6], dtype=torch.float64).clamp_min(0),
                               **TOL)


def test_dpaat_running_reference_is_an_exponential_mean_of_the_batch_means():
    """reference="running" (eq. 13's V read as collected over the epoch): the first batch's mean starts it, then
    avg <- (1 - momentum) * avg + momentum * batch mean, and eq. 15 reads that mean."""
    d = DPAAT(reference="running", momentum=0.5)
    norms = torch.full((3,), 0.3, dtype=torch.float64)
    d.radii(norms, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))  # batch mean 2
    dl = [2.0, 4.0, 6.0]  # batch mean 4; running 0.5 * 2 + 0.5 * 4 = 3
    avg = 3.0
    want = [0.3 - 0.3 * abs(v - avg) / avg if v > avg else 0.3 + 0.3 * abs(v - avg) / avg for v in dl]
    got = d.radii(norms, torch.tensor(dl, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), **TOL)
    assert d.state_dict()["running_delta_loss"] == avg


# ------------------------------------------------------------------------------------------------------------- ARFL


def _logits_and_features(model, x, where):
    """The model's output and eq. 1's feature map: ``where`` = (module, "output" | "input")."""
    module, side = where
    box = []
    handle = module.register_forward_hook(lambda m, i, o: box.append(i[0] if side == "input" else o.clone()))
    out = model(x)
    handle.remove()
    return out, box[0]


def _l_robust(f, yi, channel_reduction):
    """Eq. 1 for one sample's features f ([C, H, W] or [D]) and label yi in {0, 1} (as -1/+1)."""
    s = 2.0 * float(yi) - 1.0
    if f.dim() == 3 and channel_reduction == "sum":
        f = f.sum(0)
    return -torch.sigmoid((f * s).abs()).mean()


def _l_cls(out, yi):
    """Binary cross-entropy: one logit (BCE with logits) or two (softmax CE)."""
    if out.dim() == 0:
        return F.binary_cross_entropy_with_logits(out, yi.to(out.dtype))
    return F.cross_entropy(out[None], yi[None])


def arfl_reference(model, x, y, where, lam=10.0, r=0.5, eps=0.01, steps=7, eta=None, sign=1.0, objective="cls",
                   channel_reduction="mean", bn=False, split=False):
    """Eq. 5 sample by sample, the expectation as the mean over the batch; the attack (Linf PGD from x) ascends
    L_cls, or with objective="adv_term" eq. 5's adversarial term L_cls + s * lam * L_robust. With ``bn`` the attack
    runs in eval mode and the training forwards, batched, in train mode. ``split``: eq. 4's r as the batch's share
    of standard samples, the first floor(r * N + 1/2) of it; the others adversarial, each term weighed 1 / N (with
    ``bn`` one training forward of the mixed batch)."""
    eta = 2.5 * eps / steps if eta is None else eta
    n = x.shape[0]
    k = math.floor(r * n + 0.5) if split else 0

    def terms(z, ys):  # per-sample L_cls and L_robust of the rows of z
        out, f = _logits_and_features(model, z, where)
        return [(_l_cls(out[i], ys[i]), _l_robust(f[i], ys[i], channel_reduction)) for i in range(z.shape[0])]

    if bn:
        model.eval()
    x_adv = []
    for i in range(k, n if r < 1 else 0):
        xi, yi = x[i], y[i]
        xa = xi.clone()
        for _ in range(steps):
            z = xa.clone().requires_grad_(True)
            ((cls, rob),) = terms(z[None], yi[None])
            (g,) = torch.autograd.grad(cls if objective == "cls" else cls + sign * lam * rob, z)
            xa = (xi + (xa + eta * g.sign() - xi).clamp(-eps, eps)).clamp(0, 1)
        x_adv.append(xa.detach())
    if split:
        if bn:
            model.train()
            rows = terms(torch.cat([x[:k]] + [torch.stack(x_adv)] * bool(x_adv)), y)
        else:
            rows = [terms(v[None], y[i][None])[0] for i, v in enumerate(list(x[:k]) + x_adv)]
        standard = sum(cls + lam * rob for cls, rob in rows[:k])  # eq. 2
        return (standard + sum(cls + sign * lam * rob for cls, rob in rows[k:])) / n
    if bn:
        model.train()
        clean, adv = terms(x, y) if r > 0 else [], terms(torch.stack(x_adv), y) if r < 1 else []
    else:
        clean = [terms(x[i][None], y[i][None])[0] for i in range(x.shape[0])] if r > 0 else []
        adv = [terms(v[None], y[i][None])[0] for i, v in enumerate(x_adv)]
    total = sum(r * (cls + lam * rob) for cls, rob in clean)  # eq. 2
    total = total + sum((1 - r) * (cls + sign * lam * rob) for cls, rob in adv)
    return total / x.shape[0]


@pytest.mark.parametrize("kw", [
    {}, {"adv_sign": "printed"}, {"attack_objective": "adv_term"},
    {"adv_sign": "printed", "attack_objective": "adv_term"}, {"r": 0.0}, {"r": 1.0},
    {"r": 0.25, "lam": 0.5, "channel_reduction": "sum"},
], ids=["defaults", "sign-printed", "adv-term", "printed-adv-term", "r0", "r1", "r-lam-sum"])
def test_arfl_step_is_eq_5_per_sample(kw):
    model, x, y = _setup(2, seed=4)
    got = ARFL(random_start=False, **kw)(model, x, y).loss
    ref = arfl_reference(model, x, y, (model.c2, "output"), lam=kw.get("lam", 10.0), r=kw.get("r", 0.5),
                         sign=-1.0 if kw.get("adv_sign") == "printed" else 1.0,
                         objective=kw.get("attack_objective", "cls"),
                         channel_reduction=kw.get("channel_reduction", "mean"))
    _assert_same_step(model, ref, got)


@pytest.mark.parametrize("kw", [
    {"r": 0.5}, {"r": 0.25, "adv_sign": "printed"}, {"r": 0.75, "attack_objective": "adv_term"},
    {"r": 0.4, "lam": 0.5, "channel_reduction": "sum", "attack_objective": "adv_term", "adv_sign": "printed"},
    {"r": 0.05}, {"r": 0.95},
], ids=["half", "quarter-printed", "three-quarters-adv-term", "r-lam-sum-printed-adv-term", "none-clean", "all-clean"])
def test_arfl_ratio_as_split_is_eq_4s_share_of_the_batch_per_sample(kw):
    """ratio_as="split": the batch's first round(r * N) samples (half up: 3, 2, 5, 2, 0 and 6 of 6) are standard data,
    the rest adversarial, every sample's term weighed 1 / N."""
    model, x, y = _setup(2, seed=4)
    out = ARFL(random_start=False, ratio_as="split", **kw)(model, x, y)
    ref = arfl_reference(model, x, y, (model.c2, "output"), lam=kw.get("lam", 10.0), r=kw["r"],
                         sign=-1.0 if kw.get("adv_sign") == "printed" else 1.0,
                         objective=kw.get("attack_objective", "cls"),
                         channel_reduction=kw.get("channel_reduction", "mean"), split=True)
    _assert_same_step(model, ref, out.loss)
    assert (out.logits is None) == (kw["r"] < 0.95)  # clean logits of the whole batch only where it is all clean


@pytest.mark.parametrize("kw", [{}, {"attack_objective": "adv_term"},
                                {"attack_objective": "adv_term", "adv_sign": "printed"},
                                {"ratio_as": "split", "r": 0.25}], ids=["cls", "adv-term", "adv-term-printed", "split"])
def test_arfl_with_batchnorm_attacks_in_eval_mode_and_trains_in_train_mode(kw):
    """ratio_as="split": one training forward of the mixed batch (its running statistics are the reference's)."""
    model, x, y = _setup(2, seed=0, bn=True)
    with torch.no_grad():  # running statistics away from BatchNorm's (0, 1) start, so eval mode differs from train
        model.bn.running_mean.fill_(0.1)
        model.bn.running_var.fill_(2.0)
    twin = copy.deepcopy(model)
    model.train()
    got = ARFL(random_start=False, **kw)(model, x, y).loss
    ref = arfl_reference(twin, x, y, (twin.c2, "output"), sign=-1.0 if kw.get("adv_sign") == "printed" else 1.0,
                         objective=kw.get("attack_objective", "cls"), bn=True, r=kw.get("r", 0.5),
                         split="ratio_as" in kw)
    _assert_same_step(model, ref, got, twin)
    torch.testing.assert_close(model.bn.running_mean, twin.bn.running_mean, **TOL)


def test_arfl_two_moons_mlp_reads_the_penultimate_layer_and_takes_bce():
    """The synthetic experiment: MLP 2-10-10-1 (one logit, BCE), features of the penultimate layer (the last Linear's
    input), lam 0.5, FGSM eps 0.05 (one step of 0.05 from x), in the moons' coordinates."""
    from robust_ops.models import MLP

    torch.manual_seed(5)
    model = MLP(2, 1, hidden=(10, 10)).double()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 2, generator=g, dtype=torch.float64)
    y = torch.arange(8) % 2
    opts = dict(lam=0.5, eps=0.05, steps=1, step_size=0.05, random_start=False, clip_min=-4.0, clip_max=4.0)
    for r in (1.0, 0.0, 0.5):
        got = ARFL(r=r, **opts)(model, x, y).loss
        # the box [-4, 4] never binds here: the reference's clip to [0, 1] is replaced by none
        ref = _moons_reference(model, x, y, r)
        _assert_same_step(model, ref, got)


def _moons_reference(model, x, y, r, lam=0.5, eps=0.05):
    where = (model.net[-1], "input")
    total = 0.0
    for i in range(x.shape[0]):
        xi, yi = x[i], y[i]
        if r < 1:
            z = xi.clone().requires_grad_(True)
            out, _ = _logits_and_features(model, z[None], where)
            (g,) = torch.autograd.grad(_l_cls(out.reshape(()), yi), z)
            xa = (xi + eps * g.sign()).detach()  # eq. 8: FGSM
            out, f = _logits_and_features(model, xa[None], where)
            total = total + (1 - r) * (_l_cls(out.reshape(()), yi) + lam * _l_robust(f[0], yi, "mean"))
        if r > 0:
            out, f = _logits_and_features(model, xi[None], where)
            total = total + r * (_l_cls(out.reshape(()), yi) + lam * _l_robust(f[0], yi, "mean"))
    return total / x.shape[0]
