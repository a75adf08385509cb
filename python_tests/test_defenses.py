"""Defenses: each trains (finite, decreasing loss) on a tiny model; adversarial training beats standard training on
two-moons; MIRST's reuse of the attack's backward passes gives the plain formulation's gradients; DPAAT/AMAT radius
rules; ARFL's loss and options; the registry and the input checks."""

import importlib.util
import math

import pytest
import torch
from torch import nn

from robust_ops import defenses
from robust_ops.defenses import MIRST, DPAAT, ARFL, synchronization_loss, robust_feature_loss

NAMES = ("standard", "at", "sat", "trades", "rst", "gr", "llr", "mart", "fat", "amat", "mirst", "mirst-dm", "ima",
         "dpaat", "arfl")


class GNNet(nn.Module):
    """Conv + GroupNorm + max-pool: no batch-dependent layer, so per-sample computations are independent."""

    def __init__(self, num_classes=2, width=6):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _batch(n=8, num_classes=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _step(model, defense, opt, x, y, ids=None):
    opt.zero_grad(set_to_none=True)
    out = defense(model, x, y, ids) if ids is not None else defense(model, x, y)
    out.loss.backward()
    if out.extra_grads is not None:
        for p, g in zip(_params(model), out.extra_grads):
            p.grad.add_(g)
    opt.step()
    return out


def _build(name):
    if name == "ima" and importlib.util.find_spec("robust_ops.ima") is None:
        pytest.skip("robust_ops.ima (the IMA helper's module) is not merged yet")
    if name == "mirst-dm" and importlib.util.find_spec("robust_ops.nn") is None:
        pytest.skip("robust_ops.nn (replace_maxpool) is not merged yet")
    small = dict(steps=8) if name in ("mirst", "mirst-dm") else {}
    if name in ("at", "sat", "trades", "rst", "llr", "mart", "fat"):
        small = dict(steps=3)
    if name in ("amat", "dpaat"):
        small = dict(steps=2)
    if name == "arfl":
        small = dict(steps=2)
    if name == "ima":
        return defenses.build(name, num_samples=8, steps=3, search_steps=3)
    return defenses.build(name, **small)


@pytest.mark.parametrize("name", NAMES)
def test_each_defense_trains_with_finite_decreasing_loss(name):
    torch.manual_seed(0)
    defense = _build(name)
    model = GNNet()
    if hasattr(defense, "prepare_model"):
        model = defense.prepare_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    x, y = _batch()
    ids = torch.arange(x.shape[0]) if defense.needs_ids else None
    losses = []
    for _ in range(6):
        out = _step(model, defense, opt, x, y, ids)
        total = out.metrics.get("loss", float(out.loss.detach()))
        assert math.isfinite(total) and torch.isfinite(out.loss).all()
        losses.append(total)
    assert losses[-1] < losses[0], losses
    state = defense.state_dict()
    reloaded = defenses.build(name) if name != "ima" else defense
    reloaded.load_state_dict(state)


def test_build_registry_names_and_unknown_name():
    assert defenses.NAMES == NAMES
    assert isinstance(defenses.build("SAT", alpha=0.3), defenses.SAT)
    with pytest.raises(ValueError, match="defenses.build: unknown defense 'pgd-at'; expected one of standard, at, sat, "
                                         "trades, rst, gr, llr, mart, fat, amat, mirst, mirst-dm, ima, dpaat, arfl"):
        defenses.build("pgd-at")
    with pytest.raises(ValueError, match="gr: unknown option 'eps'; it takes lam, norm$"):
        defenses.build("gr", eps=0.1)
    with pytest.raises(ValueError, match="standard: unknown option 'eps'; it takes no options$"):
        defenses.build("standard", eps=0.1)
    with pytest.raises(ValueError, match="sat: unknown option 'stepsize'; it takes alpha, eps, step_size, steps, "):
        defenses.build("sat", stepsize=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# MIRST: reuse of the attack's backward passes


@pytest.mark.parametrize("eval_bn", [False, True])
def test_mirst_reuse_gives_the_plain_formulation_gradients(eval_bn):
    torch.manual_seed(0)
    if eval_bn:  # eval-mode BatchNorm: no batch dependence
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 64, 3))
        model[1].running_mean.uniform_(-0.1, 0.1)
        model.eval()
        kwargs = dict(attack_mode="keep")
    else:
        model = GNNet(num_classes=3)
        kwargs = {}
    x, y = _batch(6, num_classes=3)
    grads = {}
    for reuse in (True, False):
        for p in model.parameters():
            p.grad = None
        out = MIRST(reuse=reuse, **kwargs)(model, x, y)
        out.loss.backward()
        if out.extra_grads is not None:
            for p, g in zip(_params(model), out.extra_grads):
                p.grad.add_(g)
        grads[reuse] = [p.grad.clone() for p in model.parameters()]
        grads[(reuse, "loss")] = out.metrics["loss"]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert grads[(True, "loss")] == pytest.approx(grads[(False, "loss")], rel=1e-5)


def test_mirst_beta_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"mirst: expected beta to have 4 weights \(one per emitted iterate, "
                                         r"emit=\(2, 4, 6, 8\)\), got 3"):
        MIRST(beta=(0.5, 0.3, 0.2))
    with pytest.raises(ValueError, match=r"mirst: expected emit to be increasing step counts in \[1, steps=10\]"):
        MIRST(emit=(2, 12), beta=(0.5, 0.5))


# ---------------------------------------------------------------------------------------------------------------------
# DPAAT / AMAT


@pytest.mark.parametrize("attack_mode", ["eval", "train"])
def test_llr_linearity_gap_vanishes_at_the_clean_point_in_the_attack_mode(monkeypatch, attack_mode):
    """g(0) = 0 in the mode the inner maximum runs in, also when eval-mode BatchNorm differs from the training forward
    (running statistics far from the batch's)."""
    from robust_ops.attacks.context import use_model_mode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 2))
    model[1].running_mean.fill_(0.5)
    model[1].running_var.fill_(3.0)
    model.train()
    llr = defenses.build("llr", steps=1, attack_mode=attack_mode)
    attack, gaps = type(llr).attack, []

    def spy(self, gap_model, x, y, **kwargs):
        with torch.no_grad(), use_model_mode(gap_model, self.attack_mode):
            gaps.append(gap_model(x))
        return attack(self, gap_model, x, y, **kwargs)

    monkeypatch.setattr(type(llr), "attack", spy)
    llr(model, *_batch())
    assert model.training and len(gaps) == 1
    assert float(gaps[0].abs().max()) < 1e-5


def test_dpaat_radius_rule_and_guard():
    d = DPAAT()
    norms = torch.tensor([0.3, 0.3, 0.3])
    dl = torch.tensor([1.0, 2.0, 3.0])  # mean 2: fragile sample 3 shrinks, stable sample 1 grows
    r = d.radii(norms, dl)
    torch.testing.assert_close(r, torch.tensor([0.3 + 0.3 * 0.5, 0.3, 0.3 - 0.3 * 0.5]))
    r = d.radii(norms, torch.tensor([1e-9, -1e-9, 0.0]))  # dL_avg ~ 0: gamma = 0, radii unchanged
    torch.testing.assert_close(r, norms)
    r = d.radii(norms, torch.tensor([0.1, 0.1, 10.0]))  # huge shrink: a negative radius is no perturbation
    assert float(r[2]) == 0.0 and bool((r >= 0).all())
    state = d.state_dict()
    assert state["num_batches"] == 3
    fresh = DPAAT()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    with pytest.raises(ValueError, match="dpaat: expected state keys"):
        fresh.load_state_dict({"x": 1})


def test_synchronization_loss_forms():
    z = torch.randn(5, 3)
    torch.testing.assert_close(synchronization_loss(z, z, "js"), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(synchronization_loss(z, z, "printed"), torch.full((5,), math.log(2)))
    w = torch.randn(5, 3)
    torch.testing.assert_close(synchronization_loss(z, w, "js") + synchronization_loss(z, w, "printed"),
                               torch.full((5,), math.log(2)))
    assert bool((synchronization_loss(z, w, "js") > 0).all())


def test_amat_and_dpaat_use_per_sample_radii():
    torch.manual_seed(0)
    model = GNNet()
    x, y = _batch(6)
    out = defenses.build("amat", steps=2)(model, x, y)
    eps = 0.3
    assert 0 < out.metrics["radius_mean"] <= eps * 1.5 + 1e-6
    out = defenses.build("dpaat", steps=2, max_radius=0.4)(model, x, y)
    assert 0 <= out.metrics["radius_mean"] <= 0.4 + 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# ARFL


def test_arfl_robust_loss_and_options():
    f = torch.tensor([[[[0.0, 2.0]], [[-2.0, 0.0]]]])  # [1, 2, 1, 2]
    y = torch.tensor([0])
    s = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(robust_feature_loss(f, y, "mean"), -(0.5 + s + s + 0.5).reshape(1) / 4)
    torch.testing.assert_close(robust_feature_loss(f, y, "sum"), -(s + s).reshape(1) / 2)
    torch.testing.assert_close(robust_feature_loss(torch.tensor([[1.0, -1.0]]), torch.tensor([1])),
                               -torch.sigmoid(torch.tensor([1.0])))

    torch.manual_seed(0)
    model = GNNet()
    x, y = _batch(6)
    text = ARFL(steps=2, random_start=False)(model, x, y)
    printed = ARFL(steps=2, random_start=False, adv_sign="printed")(model, x, y)
    m = text.metrics
    assert m["loss"] == pytest.approx(0.5 * (m["loss_clean"] + 10 * m["loss_robust"])
                                      + 0.5 * (m["loss_adv"] + 10 * m["loss_robust_adv"]), rel=1e-5)
    assert printed.metrics["loss"] == pytest.approx(0.5 * (m["loss_clean"] + 10 * m["loss_robust"])
                                                    + 0.5 * (m["loss_adv"] - 10 * m["loss_robust_adv"]), rel=1e-5)


def test_arfl_is_binary_only():
    model = GNNet(num_classes=5)
    x, y = _batch(4, num_classes=5)
    with pytest.raises(ValueError, match="arfl: defined for binary tasks only .* got 5 classes"):
        ARFL(steps=1)(model, x, y)
    with pytest.raises(ValueError, match="arfl: defined for binary tasks only, got 5 classes"):
        ARFL().check_labels(y, 5)


def test_defense_argument_errors():
    with pytest.raises(ValueError, match=r"sat: expected 0 <= alpha <= 1, got 1.5"):
        defenses.SAT(alpha=1.5)
    with pytest.raises(ValueError, match="at: expected norm to be one of 'linf', 'l2', got 'l3'"):
        defenses.AT(norm="l3")
    with pytest.raises(ValueError, match="dpaat: expected syn to be one of 'js', 'printed', got 'x'"):
        DPAAT(syn="x")
    with pytest.raises(ValueError, match="arfl: expected adv_sign to be one of 'text', 'printed'"):
        ARFL(adv_sign="minus")
    with pytest.raises(ValueError, match="fat: expected tau to be an integer >= 0, got -1"):
        defenses.FAT(tau=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Two-moons (ARFL's synthetic benchmark): MLP 2-10-10-1, FGSM


def _moons(n, seed):
    from sklearn.datasets import make_moons

    x, y = make_moons(n, noise=0.2, random_state=seed)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_two_moons_adversarial_training_beats_standard_training():
    from robust_ops.attacks.core import run_pgd
    from robust_ops.models import MLP, predict

    x, y = _moons(400, 0)
    xt, yt = _moons(500, 1)
    box = dict(clip_min=-4.0, clip_max=4.0)
    fgsm_train = dict(eps=0.2, step_size=0.2, steps=1, random_start=False, **box)

    def train(defense):
        torch.manual_seed(1)
        model = MLP(2, 1, (10, 10))
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        for _ in range(150):
            _step(model, defense, opt, x, y)
        xa = run_pgd(model, xt, yt, eps=0.2, alpha=0.2, steps=1, **box).x_adv  # FGSM, eps_2 = 0.2
        return float((predict(model, xt) == yt).float().mean()), float((predict(model, xa) == yt).float().mean())

    std_clean, std_adv = train(defenses.Standard())
    at_clean, at_adv = train(defenses.AT(**fgsm_train))
    assert std_clean > 0.9 and at_clean > 0.85
    assert at_adv > std_adv + 0.05, (std_adv, at_adv)


def test_mirst_dm_needs_and_prepares_a_drop_max_model():
    pytest.importorskip("robust_ops.nn")
    from robust_ops.nn import DropMax2d
    from robust_ops.train import fit
    from torch.utils.data import TensorDataset

    defense = defenses.build("mirst-dm", steps=4, emit=(2, 4), beta=(0.5, 0.5))
    x, y = _batch(4)
    with pytest.raises(ValueError, match="mirst-dm: the model has no drop-max layer; pass it through "
                                         r"defense.prepare_model\(model\)"):
        defense(GNNet(), x, y)
    model = fit(GNNet(), defense, TensorDataset(x, y), epochs=1, batch_size=4, progress=False).model
    pools = [type(m) for m in model.modules() if isinstance(m, (nn.MaxPool2d, DropMax2d))]
    assert pools == [DropMax2d]
    assert defense.prepare_model(model) is model
