"""Evaluation rows, the cascade, results.json schema, figures as valid PNGs, atomic writes, argument parsing."""

import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import weakref
from decimal import Decimal
from fractions import Fraction
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import TensorDataset

from conftest import import_path_errors
from utils import TinyCNN, host_reads

from robust_ops import attacks, evaluate as evaluate_module, report
from robust_ops.data import DatasetInfo
from robust_ops.evaluate import AttackSpec, EvalError, check_radii, evaluate, parse_attacks, parse_eps, write_results
from robust_ops.metrics import classification_metrics, probabilities

# Most tests here run pgd's default step (0.001 x 20) at radii such as 0.2 on purpose (what they check is the
# protocol, not the attack's strength); its warning is tested once, in
# test_a_default_step_that_cannot_reach_the_radius_is_a_warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*default step alpha=:UserWarning")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INFO = DatasetInfo("tiny", 2, 1, 12, ("benign", "malignant"), positive_class=1, synthetic=True, source="random")


def tiny_data(n=24, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    y = (x[:, 0, :, : size // 2].mean((1, 2)) > x[:, 0, :, size // 2:].mean((1, 2))).long()
    return TensorDataset(x, y)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyCNN(1, 2, width=4)


def test_parse_eps():
    assert parse_eps("2/255, 1/255,0.03") == [1 / 255, 2 / 255, 0.03]
    assert parse_eps([0.1, "1/10"]) == [0.1]
    for bad in ("1/0", "a,b", "1/255,,x", "", "-1/255"):
        with pytest.raises(EvalError, match="eps: ") as err:
            parse_eps(bad)
        assert err.value.arg == "eps" and "\n" not in str(err.value)


def test_eps_given_as_a_numpy_grid_or_tensor_evaluates_its_radii():
    """eps=np.linspace(0, 8/255, 5)[1:] -- the usual robustness-curve grid -- was refused with "could not parse
    '[0.00784 0.0157 ...]'" (str() of the whole array), and so was a tensor; a list of np.float32 radii was read from
    their 7-digit str(). Arrays and tensors now give their radii, numpy scalars their exact values."""
    grid = np.linspace(0, 8 / 255, 5)[1:]
    assert parse_eps(grid) == [float(v) for v in grid]
    assert parse_eps(torch.tensor([2 / 255, 1 / 255], dtype=torch.float64)) == [1 / 255, 2 / 255]
    assert parse_eps(np.float64(0.03)) == [0.03]
    assert parse_eps([np.float32(1 / 255)]) == [float(np.float32(1 / 255))]
    with pytest.raises(EvalError, match=r"^eps: expected finite radii >= 0, got -0.5$"):
        parse_eps(np.array([0.1, -0.5]))
    rows = evaluate(tiny_model(), tiny_data(), INFO, attacks="fgsm", eps=np.array([0.01, 0.02]))
    assert [row["eps"] for row in rows] == [0.0, 0.01, 0.02]


def test_eps_given_as_a_numpy_string_is_read_as_text():
    """5f79554 read every numpy scalar as an array: np.str_("1/255,2/255"), a radii string from a numpy array of
    settings, became one item, "eps: could not parse '1/255,2/255' in ['1/255,2/255']", where it was two radii, as
    the same str is (found by the revB helper)."""
    assert parse_eps(np.array(["1/255,2/255"])[0]) == parse_eps("1/255,2/255") == [1 / 255, 2 / 255]


def test_eps_given_as_one_numpy_float32_radius_is_its_value_as_in_an_array():
    """A loop over a float32 grid (for e in np.linspace(0, 2/255, 3, dtype=np.float32)[1:]: evaluate(..., eps=e))
    passed each radius as a numpy scalar, read from its 7-digit str(): rows at eps 0.003921569 where the same grid
    given at once gave 0.003921568859368563, so a report of both had two lines per radius, each half "–"."""
    grid = np.linspace(0, 2 / 255, 3, dtype=np.float32)[1:]
    for e in grid:
        assert parse_eps(e) == parse_eps(np.array([e])) == [float(e)]
    assert parse_eps(np.float16(0.1)) == [float(np.float16(0.1))]
    looped = [row["eps"] for e in grid for row in evaluate(tiny_model(), tiny_data(), INFO, attacks="fgsm", eps=e)
              if row["attack"] == "fgsm"]
    at_once = [row["eps"] for row in evaluate(tiny_model(), tiny_data(), INFO, attacks="fgsm", eps=grid)
               if row["attack"] == "fgsm"]
    assert looped == at_once == [float(e) for e in grid]


def test_parse_attacks():
    specs = parse_attacks("fgsm,pgd:steps=5:alpha=eps/4,noise:norm=l2")
    assert [s.name for s in specs] == ["fgsm", "pgd", "noise"]
    assert specs[1].options["steps"] == 5 and specs[1].options["alpha"](0.04) == pytest.approx(0.01)
    assert specs[1].label == "pgd(steps=5,alpha=eps/4)" and specs[2].norm == "l2" and specs[0].norm == "linf"
    with pytest.raises(EvalError, match="attacks: unknown attack 'bogus'; expected one of fgsm"):
        parse_attacks("fgsm,bogus")
    with pytest.raises(EvalError, match="expected key=value options"):
        parse_attacks("pgd:steps")
    with pytest.raises(EvalError, match="listed twice"):
        parse_attacks("pgd,pgd")
    with pytest.raises(EvalError, match="not an expression in eps"):
        parse_attacks("pgd:alpha=eps.__class__")


def test_attacks_differing_in_an_eps_expression_are_two_attacks_labelled_by_it():
    # every expression was labelled alpha=f(eps): `pgd:alpha=eps/4,pgd:alpha=eps/2` (docs/reproduce/mirst-bus.md's
    # stronger PGD beside another step) was refused as "the same attack is listed twice", and a row's label did not
    # say which step ran; a callable given in Python keeps f(eps), its text being unknown
    quarter, half = parse_attacks("pgd:alpha=eps/4,pgd:alpha = EPS / 2:steps=3")
    assert (quarter.label, half.label) == ("pgd(alpha=eps/4)", "pgd(steps=3,alpha=eps/2)")
    assert quarter.options["alpha"](0.3) == pytest.approx(0.075) and half.options["alpha"](0.3) == pytest.approx(0.15)
    assert AttackSpec("pgd", {"alpha": lambda eps: eps / 4}).label == "pgd(alpha=f(eps))"


def test_a_step_of_k_over_255_is_labelled_as_the_eps_column_shows_it():
    # ifgsm:steps=20:alpha=1/255 was labelled ifgsm(steps=20,alpha=0.00392156862745098) beside an eps column of 1/255;
    # other numbers keep every digit (labels tell attacks apart)
    specs = parse_attacks("ifgsm:steps=20:alpha=1/255,pgd:alpha=0.2,pgd:alpha=0.0123456,cw:alpha=0.001")
    assert [s.label for s in specs] == ["ifgsm(steps=20,alpha=1/255)", "pgd(alpha=0.2)", "pgd(alpha=0.0123456)",
                                        "cw(alpha=0.001)"]


def test_an_attack_whose_options_are_listed_in_another_order_is_listed_twice():
    """pgd:steps=3:alpha=0.01,pgd:alpha=0.01:steps=3 is one attack under two labels: it was attacked twice and
    reported in two rows, where pgd,pgd is refused."""
    for text in ("pgd:steps=3:alpha=0.01,pgd:alpha=0.01:steps=3", "pgd:alpha=eps/4:steps=3,pgd:steps=3:alpha=eps/4"):
        with pytest.raises(EvalError, match="attacks: the same attack is listed twice: pgd"):
            parse_attacks(text)
    assert len(parse_attacks("pgd:steps=3:alpha=0.01,pgd:alpha=0.02:steps=3")) == 2
    assert len(parse_attacks("pgd:alpha=eps/4,pgd:alpha=eps/2")) == 2
    # an option set to the value the attack takes without it is the same attack too: pgd,pgd:steps=20 (pgd's 20
    # steps) ran twice in two rows; so is steps beside the option it stands for (square's n_queries)
    for text, default in (("pgd,pgd:steps=20", "pgd:steps=20 is its default"),
                          ("pgd:norm=Linf:alpha=0.001,pgd", "pgd:norm=linf, pgd:alpha=0.001 are defaults"),
                          ("square:steps=5000,square", "square:steps=5000 is its default"),
                          ("pgd:alpha=eps/4,pgd:steps=20:alpha=eps/4", "pgd:steps=20 is its default"),
                          ("square:steps=7,square:n_queries=7", ""),
                          # AutoAttack's seed 0, left out (since 2026-12-07 told apart from a seed given: its None is
                          # the global RNG): autoattack:seed=0 ran it twice before
                          ("autoattack,autoattack:seed=0", "autoattack:seed=0 is its default")):
        with pytest.raises(EvalError, match="attacks: the same attack is listed twice: ") as caught:
            parse_attacks(text)
        assert default in str(caught.value) if default else "default" not in str(caught.value), caught.value
    assert len(parse_attacks("pgd,pgd:steps=21,pgd:norm=l2,square:steps=7,noise:trials=10,noise:seed=1")) == 6
    # two names of one class with the same options are one attack: apgd-dlr:loss=ce is apgd-ce (APGD with the CE
    # loss), which was attacked twice and reported in two rows; so is an attack given by its class's import path
    for text, same in (("apgd-ce,apgd-dlr:loss=ce", "apgd-dlr(loss=ce) is apgd-ce"),
                       ("apgd-ce:loss=dlr,apgd-dlr", "apgd-dlr is apgd-ce(loss=dlr)"),
                       ("apgd-ce,robust_ops.attacks.APGD", "robust_ops.attacks.APGD is apgd-ce")):
        with pytest.raises(EvalError, match="attacks: the same attack is listed twice: ") as caught:
            parse_attacks(text)
        assert same in str(caught.value), caught.value
    assert len(parse_attacks("apgd-ce,apgd-dlr,apgd-dlr:loss=ce:steps=50,fab,fab-t,pgd:norm=l2,pgdl2")) == 7
    # specs labelled by the caller are the caller's: reproduce --quick caps 10-IFGSM and 20-IFGSM at 5 steps
    capped = [AttackSpec("ifgsm", {"steps": 5}, "10-IFGSM"), AttackSpec("ifgsm", {"steps": 5}, "20-IFGSM")]
    assert [s.label for s in parse_attacks(capped)] == ["10-IFGSM", "20-IFGSM"]


def test_integer_attack_options_keep_their_digits_and_fit_in_64_bits():
    """An integer option was read through a float: noise:seed=9007199254740993 ran with seed ...992 and
    fab:steps=99999999999999999999 was labelled steps=100000000000000000000; a count past torch's 64-bit integers
    (apgd-ce:steps=1e22) was torch's multi-line 'Overflow when unpacking long long' from the dry run, and pgd's
    accepted, to run without end."""
    (spec,) = parse_attacks("noise:trials=9007199254740993")
    assert spec.options["trials"] == 9007199254740993 and spec.label == "noise(trials=9007199254740993)"
    assert parse_attacks("pgd:steps=1e3")[0].options["steps"] == 1000
    assert parse_attacks("cw:steps=9223372036854775807")[0].options["steps"] == 2**63 - 1
    # a seed is one the attacks take: 0 to 2**32 - 1 (until 2026-12-07 up to 2**64 - 1, torch reading its low bits)
    assert parse_attacks("pgd:seed=4294967295")[0].options["seed"] == 2**32 - 1
    wide = "-2**63, 2**63"
    for text, bounds in (("apgd-ce:steps=1e22", wide), ("pgd:steps=9223372036854775808", wide),
                         ("noise:trials=99999999999999999999", wide), ("square:steps=-1e19", wide),
                         ("pgd:seed=4294967296", "0, 2**32"), ("pgd:seed=-1", "0, 2**32"),
                         ("noise:seed=9007199254740993", "0, 2**32")):
        name, option = text.split(":")
        key, value = option.split("=")
        with pytest.raises(EvalError, match=re.escape(f"attacks: option {key}={value!r} of {name!r}: expected an "
                                                      f"integer in [{bounds})")):
            parse_attacks(text)


def test_a_default_step_that_cannot_reach_the_radius_is_a_warning():
    """pgd's default step 0.001 x 20 steps (MIRST-DM's PGD-20, made for 5/255) moves at most 0.02 from its start:
    at 8/255, or as pgd:norm=l2 at 0.3, its rows silently measured a weaker attack (on two-moons at 0.3, weaker
    than FGSM). A step or steps the user gave are theirs, and the library's defaults at the CLI's radii pass."""
    import warnings

    from robust_ops.evaluate import warn_default_step_short_of_radii

    def warned(attacks, eps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_default_step_short_of_radii(parse_attacks(attacks), parse_eps(eps))
        return [str(w.message) for w in caught]

    assert warned("pgd", "8/255") == ["attacks: pgd's default step alpha=0.001 moves it at most 20 x 0.001 = 0.02 "
                                      "from its start, less than eps=8/255: its rows there measure a weaker attack "
                                      "than the radius allows; give pgd:alpha=eps/4"]
    assert "pgd(norm=l2)'s default step" in warned("pgd:norm=l2", "0.3")[0]
    for given, eps in (("fgsm,pgd,cw", "1/255,2/255,5/255"), ("pgd:steps=50", "8/255"), ("pgd:alpha=eps/4", "8/255"),
                       ("pgdl2,ifgsm,cw,apgd-ce", "0.3"), ("pgd", "0.02")):  # 0.02: reached exactly
        assert warned(given, eps) == [], (given, eps)


def test_unknown_attack_spec_and_attack_objects_are_one_line_errors():
    """AttackSpec("bogus") failed later with a bare KeyError from .norm; an attack class in the list was lower-cased
    into a name such as "<class '__main__.mifgsm'>" with no word on how to evaluate it."""
    with pytest.raises(EvalError, match="attacks: unknown attack 'bogus'; expected one of fgsm.*robust_ops.attacks."
                                        "ATTACKS") as err:
        AttackSpec("bogus")
    assert err.value.arg == "attacks" and "\n" not in str(err.value)
    with pytest.raises(EvalError, match=r"unknown attack <class .*PGD'> \(attacks are given by name\).*ATTACKS"):
        parse_attacks(["fgsm", attacks.PGD])
    with pytest.raises(EvalError) as err:  # a command line cannot register attacks: no hint there
        parse_attacks("bogus")
    assert "ATTACKS" not in str(err.value)


class _Halfway(attacks.Attack):
    """A user's attack: one step of half the radius against the gradient of the true-class logit."""

    name = "halfway"

    def __init__(self, model, eps=8 / 255, **options):
        super().__init__(model, **options)
        self.eps = eps

    def forward(self, x, y):
        return attacks.fgsm(self.model, x, y, eps=self.eps / 2)


def test_registered_attack_is_evaluated_by_name(monkeypatch):
    """docs/attacks.md, "Your own attack": a class added to attacks.ATTACKS works in specs, with its options."""
    monkeypatch.setitem(attacks.ATTACKS, "halfway", (_Halfway, dict(eps=5 / 255)))
    data, model = tiny_data(), tiny_model()
    rows = evaluate(model, data, INFO, attacks="halfway", eps="8/255")
    fgsm_rows = evaluate(model, data, INFO, attacks="fgsm", eps="4/255")
    assert rows[1]["attack"] == "halfway" and rows[1]["norm"] == "linf"
    assert rows[1]["accuracy"] == fgsm_rows[1]["accuracy"]  # half of 8/255 is FGSM at 4/255
    with pytest.raises(EvalError, match="unknown option"):
        parse_attacks("halfway:steps=3")


class _OutOfRange(_Halfway):
    """A buggy user's attack: its points leave the images' value range (or are NaN)."""

    name = "out-of-range"

    def forward(self, x, y):
        return x + 2 if self.eps > 0.02 else torch.full_like(x, float("nan"))


@pytest.mark.parametrize("eps", ["8/255", "4/255"])
def test_an_attack_returning_invalid_inputs_is_an_error_not_a_fooled_sample(monkeypatch, eps):
    """A point outside the value range was scored as an adversarial example (robust accuracy understated), a NaN
    one was blamed on the model ("check the checkpoint")."""
    monkeypatch.setitem(attacks.ATTACKS, "out-of-range", (_OutOfRange, dict(eps=5 / 255)))
    with pytest.raises(EvalError, match=r"^attacks: out-of-range returned points with NaN/Inf or outside the clip "
                                        r"range \[0.0, 1.0\]; it must return valid inputs$"):
        evaluate(tiny_model(), tiny_data(), INFO, attacks="out-of-range", eps=eps)


class _PastTheBall(_Halfway):
    """A buggy user's attack: FGSM at twice the radius it is given (inside the value range)."""

    name = "past-the-ball"

    def forward(self, x, y):
        return attacks.fgsm(self.model, x, y, eps=min(2 * self.eps, 1.0))  # the dry run's eps is 1


class _L2PastTheBall(_PastTheBall):
    default_norm = "l2"

    def forward(self, x, y):
        return attacks.fgsm(self.model, x, y, eps=1.5 * self.eps, norm="l2")


@pytest.mark.parametrize("cls", [_PastTheBall, _L2PastTheBall])
def test_an_attack_leaving_its_ball_is_an_error_not_a_fooled_sample(monkeypatch, cls):
    """Points inside the value range but outside the eps-ball were scored as adversarial examples at that radius
    (robust accuracy understated). The attacks the library ships end inside theirs (every evaluate test)."""
    monkeypatch.setitem(attacks.ATTACKS, "past-the-ball", (cls, dict(eps=5 / 255)))
    norm = cls.default_norm if hasattr(cls, "default_norm") else "linf"
    with pytest.raises(EvalError, match=rf"^attacks: past-the-ball returned \d+ of \d+ points outside the {norm} ball "
                                        r"around x \(sample \d+: distance [0-9.e-]+, radius 0.0156863\); it must "
                                        r"project onto the ball of the eps it is given$"):
        evaluate(tiny_model(), tiny_data(), INFO, attacks="past-the-ball", eps="4/255")


def test_evaluate_runs_where_the_model_is_by_default():
    """device=None (the default) is the model's device: a default of "cpu" moved a GPU model to the CPU in place."""
    from robust_ops.evaluate import model_device

    data, model = tiny_data(), tiny_model()
    assert evaluate(model, data, INFO, attacks="fgsm", eps="4/255") == evaluate(model, data, INFO, attacks="fgsm",
                                                                               eps="4/255", device="cpu")
    assert model_device(nn.Linear(2, 2, device="meta")).type == "meta"
    assert model_device(nn.Flatten()) == torch.device("cpu")


def test_evaluate_seed_makes_random_attacks_repeat_whatever_ran_before():
    """PGD's random start drew from the global RNG: `robust-ops eval` of one run gave 0.727, 0.734, 0.727 in three
    processes, and a demo resumed after its training evaluated from another RNG state than the uninterrupted one."""
    data, model = tiny_data(), tiny_model()
    kwargs = dict(attacks="pgd:steps=2:alpha=0.01,noise", eps="8/255,16/255", seed=5)
    torch.manual_seed(0)
    rows = evaluate(model, data, INFO, **kwargs)
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    assert evaluate(model, data, INFO, **kwargs) == rows
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    assert evaluate(model, data, INFO, **{**kwargs, "seed": 6}) != rows  # the seed does decide the random start
    for bad in (-1, 1.5, True, 2**32):  # 2**32 drew seed 0's numbers until 2026-12-07
        with pytest.raises(EvalError, match=rf"^seed: expected seed to be an integer from 0 to 4294967295 .*, "
                                            rf"got {bad!r}$"):
            evaluate(model, data, INFO, attacks="fgsm", seed=bad)


def test_evaluate_without_a_seed_draws_from_the_global_rng():
    # seed=None (the default) draws from the global RNG, as torchattacks does: after torch.manual_seed(5) it repeats
    # seed=5's random starts, and it moves the global RNG on (a fixed internal seed would hide the user's own)
    data, model = tiny_data(), tiny_model()
    kwargs = dict(attacks="pgd:steps=2:alpha=0.01,noise", eps="8/255,16/255")
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    assert evaluate(model, data, INFO, **kwargs) == evaluate(model, data, INFO, **kwargs, seed=5)
    assert not torch.equal(torch.random.get_rng_state(), state)


def test_evaluate_draws_one_stream_per_call_and_an_attack_seed_gives_rows_of_their_own():
    """docs/cli.md: seed=N is one stream for the call, drawn row by row, so PGD's random starts depend on the rows
    before it; pgd:seed=N (as square's default seed) gives rows that do not, here with cascade=False."""
    data = tiny_data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 2))  # logits linear in x: every draw moves the AUC
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(-1.0, 1.0, 288).view(2, 144))
        model[1].bias.zero_()

    def rows(attacks, eps):
        return {(r["attack"], r["eps"]): r for r in evaluate(model, data, INFO, attacks=attacks, eps=eps, seed=5,
                                                              cascade=False) if r["attack"] != "worst-case"}

    pgd, own = "pgd(steps=1,alpha=0.01)", "pgd(steps=1,alpha=0.01,seed=3)"
    alone = rows("pgd:steps=1:alpha=0.01,pgd:steps=1:alpha=0.01:seed=3", "0.05")
    after = rows("square:n_queries=3,pgd:steps=1:alpha=0.01,pgd:steps=1:alpha=0.01:seed=3", "0.02,0.05")
    assert after[own, 0.05] == alone[own, 0.05]
    # the random start of the unseeded PGD follows the draws of the rows before it (its 0.02 row here)
    assert after[pgd, 0.05]["auc"] != alone[pgd, 0.05]["auc"]


def test_evaluate_leaves_the_gpus_rng_alone():
    """evaluate(seed=N) and each attack's dry run seeded with torch.manual_seed, which reseeds every GPU too (queued
    until CUDA starts when it has not), while fork_rng restored the CPU's RNG only: a CPU evaluation replaced the seed
    a user had set for the GPU training after it (torch.manual_seed(0), then evaluate(seed=5): the GPUs got 5)."""
    def gpu_rng():  # the GPUs' states once CUDA has started, else the seed waiting for it to start
        if torch.cuda.is_initialized():
            return [state.clone() for state in torch.cuda.get_rng_state_all()]
        return torch.cuda._lazy_seed_tracker.get_calls()

    model, data = tiny_model(), tiny_data()
    torch.manual_seed(0)
    before = gpu_rng()
    for seed in (None, 5):
        evaluate(model, data, INFO, attacks="pgd:steps=2", eps="8/255", seed=seed, device="cpu")
    after = gpu_rng()
    assert len(after) == len(before)
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(after, before))


def test_own_attack_by_dotted_import_path(user_module):
    """docs/attacks.md, "Your own attack": an Attack subclass's dotted import path works wherever a registered name
    does (attacks.build, specs with typed options and the dry run, labels, default_norm, AutoAttack's list), kept as
    written; one that does not import, names nothing or names no Attack subclass is a one-line error naming it."""
    path = f"{user_module}.EvenBIM"
    data, model = tiny_data(), tiny_model()
    attack = attacks.build(path, model, steps=3)
    assert type(attack).__name__ == "EvenBIM" and (attack.steps, attack.eps) == (3, 8 / 255)
    rows = evaluate(model, data, INFO, attacks=f"{path}:steps=2", eps="8/255")
    same = evaluate(model, data, INFO, attacks="ifgsm:steps=2:alpha=eps/2", eps="8/255")
    assert rows[1]["attack"] == f"{path}(steps=2)" and rows[1]["norm"] == "linf"
    assert {**rows[1], "attack": None} == {**same[1], "attack": None}
    assert parse_attacks(f"{path}:steps=2")[0].options == {"steps": 2}
    assert AttackSpec(f"{user_module}.EvenBIML2").norm == "l2"
    assert attacks.AutoAttack(model, attacks=[path, "fgsm"], steps=2).attacks[0].steps == 2
    with pytest.raises(EvalError, match=f"^attacks: option steps='2.5' of '{re.escape(path)}': expected an integer$"):
        parse_attacks(f"{path}:steps=2.5")  # typed from the class's own default, steps=10
    with pytest.raises(EvalError, match=f"^attacks: attacks.build: {re.escape(path)}: unknown option 'stepz'; it "
                                        "takes eps, steps, norm, targeted, "):
        parse_attacks(f"{path}:stepz=2")  # the dry run
    errors = import_path_errors("attacks.build", "attack", "robust_ops.attacks.Attack", user_module, "EvenBIM",
                                "NoisyAT", "NoForward", "forward(x, y) -> x_adv")
    for bad, message in errors.items():
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            attacks.build(bad, model)
        for make in (parse_attacks, AttackSpec):
            with pytest.raises(EvalError, match=f"^attacks: {re.escape(message)}$") as err:
                make(bad)
            assert err.value.arg == "attacks"
    for make in (parse_attacks, AttackSpec):  # evaluation passes clip_min/clip_max: not "unknown options" of the user
        with pytest.raises(EvalError, match=f"^attacks: {user_module}.EpsOnly takes no clip_min/clip_max, which "
                                            r"evaluation gives every attack \(eps: each radius; clip_min/clip_max: "
                                            r"the data's value range\); take them in its __init__ \(clip_min/clip_max: "
                                            r"pass \*\*options on to Attack\)$"):
            make(f"{user_module}.EpsOnly")
    with pytest.raises(EvalError, match=r"unknown attack 'bogus'; expected one of fgsm, .*, autoattack, or a dotted "
                                        r"import path of your own class \(package.module.Class\)$"):
        parse_attacks("Bogus")


def test_own_attack_overriding_only_call_is_accepted(user_module, tmp_path):
    # An Attack subclass that overrides __call__ itself never reaches forward, so _import_path accepts either method
    # (mutation testing: requiring forward alone survived)
    package = user_module.rpartition(".")[0]
    (tmp_path / package / "call_only.py").write_text(
        "from robust_ops import attacks\n\n\nclass CallOnly(attacks.Attack):\n    def __call__(self, x, y):\n"
        "        return x\n")
    x, y = tiny_data().tensors
    assert attacks.build(f"{package}.call_only.CallOnly", tiny_model())(x, y) is x


def test_rows_and_cascade():
    data, model = tiny_data(), tiny_model()
    rows = evaluate(model, data, INFO, attacks="fgsm,pgd:steps=3", eps="2/255,8/255,32/255", method="tiny")
    assert [(r["attack"], round(r["eps"] * 255)) for r in rows] == [
        ("none", 0), ("fgsm", 2), ("fgsm", 8), ("fgsm", 32), ("pgd(steps=3)", 2), ("pgd(steps=3)", 8),
        ("pgd(steps=3)", 32), ("worst-case", 2), ("worst-case", 8), ("worst-case", 32)]
    for r in rows:
        assert set(r) >= {"method", "attack", "norm", "eps", "n", "accuracy", "f1", "sensitivity", "specificity",
                          "precision", "auc"}
        assert r["n"] == 24 and r["method"] == "tiny"
    assert [r["norm"] for r in rows] == [None] + ["linf"] * 9  # the clean row has no radius, so no norm
    by = {(r["attack"], r["eps"]): r["accuracy"] for r in rows}
    clean = rows[0]["accuracy"]
    for attack in ("fgsm", "pgd(steps=3)", "worst-case"):
        accs = [by[(attack, e)] for e in (2 / 255, 8 / 255, 32 / 255)]
        assert all(a <= clean + 1e-9 for a in accs) and accs == sorted(accs, reverse=True)  # cascade: monotone
    for e in (2 / 255, 8 / 255, 32 / 255):
        assert by[("worst-case", e)] <= min(by[("fgsm", e)], by[("pgd(steps=3)", e)]) + 1e-9


def test_worst_case_equals_per_sample_and():
    """Worst-case accuracy equals the fraction of samples no attack fooled (computed independently)."""
    from robust_ops import attacks

    data, model = tiny_data(32, seed=1), tiny_model(1)
    e = 16 / 255
    rows = evaluate(model, data, INFO, attacks="fgsm,cw:steps=3", eps=[e], cascade=False)
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        ok = model(x).argmax(1) == y
        for name, kw in (("fgsm", {}), ("cw", {"steps": 3})):
            adv = attacks.build(name, model, eps=e, **kw)(x, y)
            ok &= model(adv).argmax(1) == y
    worst = [r for r in rows if r["attack"] == "worst-case"][0]
    assert worst["accuracy"] == pytest.approx(float(ok.float().mean()))


def test_single_logit_model_and_ensemble():
    class OneLogit(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN(1, 1, width=4)

        def forward(self, x):
            return self.net(x).squeeze(1)

    torch.manual_seed(0)
    rows = evaluate(OneLogit(), tiny_data(), INFO, attacks="fgsm,pgd:steps=2", eps=[4 / 255], ensemble=True)
    assert [r["attack"] for r in rows] == ["none", "worst-case"]
    assert 0 <= rows[1]["accuracy"] <= rows[0]["accuracy"]
    assert rows[1]["norm"] == "linf"  # both attacks are Linf: not "mixed"


def test_worst_case_over_attacks_of_two_norms_is_mixed():
    # the worst case over an Linf and an L2 attack belongs to neither threat model: its rows say "mixed", per attack
    # and as one ensemble alike (the norm keys results.json's tables and figures)
    data, model = tiny_data(8), tiny_model()
    for ensemble in (False, True):
        rows = evaluate(model, data, INFO, attacks="fgsm,noise:norm=l2:trials=2", eps=[4 / 255], ensemble=ensemble)
        assert [(r["attack"], r["norm"]) for r in rows if r["attack"] == "worst-case"] == [("worst-case", "mixed")]


class _Recorder(_Halfway):
    """Returns its inputs unchanged and records how many samples it was given."""

    name = "recorder"
    seen = []

    def forward(self, x, y):
        self.seen.append(x.shape[0])
        return x.clone()


def test_ensemble_runs_each_attack_on_the_samples_the_earlier_ones_left_robust(monkeypatch):
    # ensemble=True is one AutoAttack-style cascade per radius: an attack after FGSM sees only the samples FGSM did
    # not fool (as many as the worst-case row counts robust: the recorder fools none), not the whole split
    monkeypatch.setitem(attacks.ATTACKS, "recorder", (_Recorder, {}))
    monkeypatch.setattr(_Recorder, "seen", [])
    data, model = tiny_data(48, seed=3), tiny_model(3)
    with torch.no_grad():
        model.head.weight.mul_(5)
    specs = parse_attacks("fgsm,recorder")
    _Recorder.seen.clear()  # the dry run's call
    rows = evaluate(model, data, INFO, attacks=specs, eps=[48 / 255], ensemble=True)
    robust = round(rows[1]["accuracy"] * 48)
    assert rows[1]["accuracy"] < rows[0]["accuracy"] and sum(_Recorder.seen) == robust


class _Bump(nn.Module):
    """Class 1 only near mean(x) = 0.5 + 1.5/255: FGSM from 0.5 (every pixel + eps) lands there at 1/255, and past it
    at 4/255."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        z1 = 5 - 3e5 * (x.flatten(1).mean(1) * self.w - (0.5 + 1.5 / 255)) ** 2
        return torch.stack([torch.zeros_like(z1), z1], 1)


def test_ensemble_keeps_a_sample_fooled_at_a_smaller_radius_fooled(monkeypatch):
    # each radius ran its own ensemble on every sample: FGSM fools these at 1/255 (inside the 4/255 ball too) but not
    # at 4/255, so the ensemble's robust accuracy rose from 0 to 1 while the per-attack cascade kept it at 0
    data = TensorDataset(torch.full((4, 1, 2, 2), 0.5), torch.zeros(4, dtype=torch.long))
    info = DatasetInfo("bump", 2, 1, 2, ("a", "b"), positive_class=1)
    for ensemble in (False, True):
        rows = evaluate(_Bump(), data, info, attacks="fgsm", eps="1/255,4/255", ensemble=ensemble)
        assert [r["accuracy"] for r in rows] == [1.0, 0.0, 0.0]
    # and not attacked again: a new fooling input at 4/255 would replace the one inside the smaller ball
    attacked, run_ensemble = [], attacks.ensemble
    monkeypatch.setattr(attacks, "ensemble", lambda model, x, *args, **kwargs: attacked.append(len(x))
                        or run_ensemble(model, x, *args, **kwargs))
    evaluate(_Bump(), data, info, attacks="fgsm", eps="1/255,4/255", ensemble=True)
    assert attacked == [4]


def test_multiclass_rows_have_map():
    info = DatasetInfo("tiny3", 3, 1, 12, ("a", "b", "c"))
    x = torch.rand(30, 1, 12, 12)
    y = torch.arange(30) % 3
    torch.manual_seed(0)
    rows = evaluate(TinyCNN(1, 3, width=4), TensorDataset(x, y), info, attacks="fgsm", eps=[1 / 255])
    assert "map" in rows[0] and len(rows) == 2  # no worst-case row for a single attack


def test_multiclass_positive_class_is_refused_not_ignored():
    """A positive class on a 3-class set was dropped silently: the rows held macro averages while results.json and
    the report named the class and called sensitivity its recall."""
    info = DatasetInfo("tiny3", 3, 1, 12, ("benign", "malignant", "normal"), positive_class=1)
    data = TensorDataset(torch.rand(6, 1, 12, 12), torch.arange(6) % 3)
    with pytest.raises(EvalError, match=r"^data: info: positive_class is only for binary tasks \(num_classes=3 "
                                        r"uses macro averages\), got 1$") as err:
        evaluate(TinyCNN(1, 3, width=4), data, info, attacks="fgsm", eps=[1 / 255])
    assert err.value.arg == "data"


@pytest.mark.parametrize("positive", [None, 2, 1.0, True])
def test_binary_set_without_a_valid_positive_class_is_refused_before_any_forward(positive):
    """A binary DatasetInfo with no positive class failed in the metrics, after the clean pass over the split."""
    info = DatasetInfo("tiny", 2, 1, 12, ("a", "b"), positive_class=positive)
    data = TensorDataset(torch.rand(6, 1, 12, 12), torch.arange(6) % 2)

    def no_forward(x):
        raise AssertionError("evaluate ran the model before checking info")

    with pytest.raises(EvalError, match=r"^data: info: binary tasks need positive_class 0 or 1, got ") as err:
        evaluate(no_forward, data, info, attacks="fgsm", eps=[1 / 255], device="cpu")
    assert err.value.arg == "data"


@pytest.mark.parametrize("labels, got", [([0, 1, 2, 5], r"\[0, 5\]"), ([0, -1, 1, 1], r"\[-1, 1\]"),
                                         ([0, 1, 2, 1], r"\[0, 2\]")])
def test_labels_outside_the_sets_classes_are_refused_before_any_forward(labels, got):
    """Labels 5 on a 2-class set ran the whole clean pass, then failed inside the metrics with "classification_metrics:
    expected y_true in [0, 2)", a ValueError naming neither evaluate's data nor its labels."""
    data = TensorDataset(torch.rand(4, 1, 12, 12), torch.tensor(labels))

    def no_forward(x):
        raise AssertionError("evaluate ran the model before checking the labels")

    with pytest.raises(EvalError, match=rf"^data: expected labels in \[0, 2\) for tiny's 2 classes, got values in "
                                        rf"{got}$") as err:
        evaluate(no_forward, data, INFO, attacks="fgsm", eps=[1 / 255], device="cpu")
    assert err.value.arg == "data"


@pytest.mark.parametrize("names, wrong", [(("a",), "1"), (("a", "b", "c"), "3"), (("a", "a"), "a twice")])
def test_class_names_not_one_per_class_are_refused_before_any_forward_and_by_write_results(names, wrong, tmp_path):
    """A hand-built DatasetInfo with one name for two classes passed evaluate and then stopped write_results with a
    bare IndexError (the report names the positive class by its name). One naming two classes alike was taken: the
    report's positive class, per-class recall columns and saliency titles could not tell them apart."""
    info = DatasetInfo("tiny", 2, 1, 12, names, positive_class=1)
    data = TensorDataset(torch.rand(6, 1, 12, 12), torch.arange(6) % 2)

    def no_forward(x):
        raise AssertionError("evaluate ran the model before checking info")

    distinct = "distinct " if len(names) == 2 else ""
    match = rf"^data: info: expected 2 {distinct}class_names \(one per class, label 0 first\), got {wrong}: "
    with pytest.raises(EvalError, match=match) as err:
        evaluate(no_forward, data, info, attacks="fgsm", eps=[1 / 255], device="cpu")
    assert err.value.arg == "data"
    rows = evaluate(tiny_model(), data, INFO, attacks="fgsm", eps=[1 / 255])
    with pytest.raises(EvalError, match=match):
        write_results(tmp_path / "out", rows, info)
    assert not (tmp_path / "out").exists()


def test_labels_of_shape_n_by_1_are_taken_as_fit_takes_them():
    """MedMNIST's labels are [N, 1]: fit took them and evaluate failed inside the metrics."""
    info = DatasetInfo("tiny", 2, 1, 12, ("a", "b"), positive_class=1)
    x, y = torch.rand(6, 1, 12, 12), torch.arange(6) % 2
    model = TinyCNN(1, 2, width=4)
    flat = evaluate(model, TensorDataset(x, y), info, attacks="fgsm", eps=[1 / 255])
    assert evaluate(model, TensorDataset(x, y[:, None]), info, attacks="fgsm", eps=[1 / 255]) == flat
    with pytest.raises(EvalError, match=r"^data: expected one class label per sample \(labels of shape \[N\] or "
                                        r"\[N, 1\]\), got labels of shape \(6, 2\) for 6 samples; for one-hot "
                                        r"labels pass their argmax\(1\)$"):
        evaluate(model, TensorDataset(x, torch.nn.functional.one_hot(y)), info, attacks="fgsm", eps=[1 / 255])
    with pytest.raises(EvalError, match=r"^data: .*got labels of shape \(6, 12, 12\): segmentation masks\? fit "
                                        r"and evaluate are for classifiers only \(segmentation: docs/ima.md, "
                                        r"Segmentation\)$"):
        evaluate(model, TensorDataset(x, (x[:, 0] > 0.5).long()), info, attacks="fgsm", eps=[1 / 255])
    # fit's rule (one helper): float labels would be truncated (0.7 -> 0) silently
    # with the fix the attacks' label check gives (it named only the dtype)
    with pytest.raises(EvalError, match=r"^data: expected integer class labels, got labels of dtype torch.float32; "
                                        r"class numbers stored as floats \(0\., 1\., \.\.\.\)\? convert them with "
                                        r"\.long\(\)$"):
        evaluate(model, TensorDataset(x, y.float()), info, attacks="fgsm", eps=[1 / 255])
    with pytest.raises(EvalError, match=r"^data: expected integer class labels, got labels of dtype torch.bool; "
                                        r"convert them with \.long\(\) \(False is class 0, True class 1\)$"):
        evaluate(model, TensorDataset(x, y > 0), info, attacks="fgsm", eps=[1 / 255])
    with pytest.raises(EvalError, match=r"^data: expected integer class labels, got labels of dtype torch.float32; "
                                        r"one-hot or probability rows\? take their \.argmax\(1\)$"):
        evaluate(model, TensorDataset(x, torch.nn.functional.one_hot(y).float()), info, attacks="fgsm", eps=[1 / 255])


def test_out_of_range_inputs_rejected():
    for value in (2.0, -0.5):  # above and below the range (a normalized split, mean subtracted, has negatives)
        bad = TensorDataset(torch.full((4, 1, 12, 12), value), torch.zeros(4, dtype=torch.long))
        with pytest.raises(EvalError, match=r"inputs outside the dataset's value range \[0.0, 1.0\]"):
            evaluate(tiny_model(), bad, INFO, attacks="fgsm", eps=[0.1])


def test_out_of_range_inputs_name_their_values_and_the_fix():
    """The refusal named only the range ("inputs outside the dataset's value range [0.0, 1.0]"), where fit's attacks
    name the values and the fix: a user's 0-255 images (uint8, ToTensor left out) or torchvision's Normalize in the
    data pipeline, the two usual causes, were not told apart."""
    y = torch.zeros(4, dtype=torch.long)
    pixels = TensorDataset(torch.arange(4 * 144).reshape(4, 1, 12, 12).remainder(256).to(torch.uint8), y)
    with pytest.raises(EvalError, match=r"^data: inputs outside the dataset's value range \[0.0, 1.0\], got values in "
                                        r"\[0, 255\]; 8-bit pixels\? divide them by 255 \(x.float\(\) / 255, "):
        evaluate(tiny_model(), pixels, INFO, attacks="fgsm", eps=[0.1])
    normalized = TensorDataset(torch.linspace(-2, 2, 4 * 144).reshape(4, 1, 12, 12), y)
    with pytest.raises(EvalError, match=r"^data: inputs outside the dataset's value range \[0.0, 1.0\], got values in "
                                        r"\[-2, 2\]; a mean/std normalization .* evaluate "
                                        r"robust_ops.attacks.Normalized\(model, mean, std\) on the unnormalized "):
        evaluate(tiny_model(), normalized, INFO, attacks="fgsm", eps=[0.1])
    # 12-bit intensities (x / 255 leaves them outside) and data divided by a std are no 8-bit pixels
    twelve_bit = TensorDataset(torch.arange(4 * 144).reshape(4, 1, 12, 12) * 7.0, y)
    with pytest.raises(EvalError, match=r"got values in \[0, 4025\]; 12- or 16-bit intensities\? divide them by "):
        evaluate(tiny_model(), twelve_bit, INFO, attacks="fgsm", eps=[0.1])
    scaled = TensorDataset(torch.linspace(0.1, 2.6, 4 * 144).reshape(4, 1, 12, 12), y)
    with pytest.raises(EvalError, match=r"got values in \[0.1, 2.6\]; a dark set of 0-255 pixels\? .* data scaled "
                                        r"otherwise \(divided by a std\)\? a mean/std normalization .* -- a clamp "
                                        r"would wipe them out$"):
        evaluate(tiny_model(), scaled, INFO, attacks="fgsm", eps=[0.1])
    overshoot = TensorDataset(torch.full((4, 1, 12, 12), 1.00001), y)  # shown past the bound, not rounded to 1
    with pytest.raises(EvalError, match=r"got values in \[1, 1.00001\]; .* x.clamp\(0.0, 1.0\)$"):
        evaluate(tiny_model(), overshoot, INFO, attacks="fgsm", eps=[0.1])
    # 0-255 pixels against a value range of [-1, 1]: x / 255 passed there in wrong units (found by the pixels helper)
    signed = dataclasses.replace(INFO, value_range=(-1, 1))
    with pytest.raises(EvalError, match=r"^data: inputs outside the dataset's value range \[-1, 1\], got values in "
                                        r"\[0, 255\]; 8-bit pixels\? map them onto the value range \[-1, 1\] "
                                        r"\(x.float\(\) / 255 \* 2 - 1\): the attacks' radii and clip range are in "
                                        r"the value range's units$"):
        evaluate(tiny_model(), pixels, signed, attacks="fgsm", eps=[0.1])
    # CT Hounsfield units were told the Normalized fix, whose inputs stay outside the range (found by the persona
    # helper)
    hounsfield = TensorDataset(torch.linspace(-1000, 3000, 4 * 144).reshape(4, 1, 12, 12), y)
    with pytest.raises(EvalError, match=r"^data: inputs outside the dataset's value range \[0.0, 1.0\], got values in "
                                        r"\[-1000, 3000\]; CT Hounsfield units\? window them onto the value range "
                                        r"\[0.0, 1.0\]: \(x.clamp\(lo, hi\) - lo\) / \(hi - lo\) for the window "):
        evaluate(tiny_model(), hounsfield, INFO, attacks="fgsm", eps=[0.1])


def test_the_value_range_check_reads_the_inputs_once():
    """evaluate read the inputs' min and max (a host read each), and both again for its error's values: one read of
    both ends now, whether they pass or not (found by the checks helper)."""
    def check(inputs):
        try:
            evaluate_module._check_value_range(inputs, 0.0, 1.0)
        except EvalError:
            pass

    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    for inputs in (x, x * 255, x - 0.5, x.to(torch.float64), (x * 255).to(torch.uint8), x[:0]):
        assert host_reads(lambda: check(inputs)) == {"item": 0, "nonzero": 0, "tolist": 1 if inputs.numel() else 0}
    with pytest.raises(EvalError, match=r"^data: inputs outside the dataset's value range \[0.0, 1.0\], got values in "
                                        r"\[-0.\d+, 0.\d+\]; a mean/std normalization "):
        evaluate_module._check_value_range(x - 0.5, 0.0, 1.0)


def test_the_label_range_check_reads_the_labels_once():
    """evaluate read the labels' min and max (a host read each), and both again for its error's values: one read of
    both ends now, whether they pass or not; the messages are unchanged."""
    def check(labels):
        try:
            evaluate_module._check_label_range(labels, INFO)
        except EvalError:
            pass

    for labels in ([0, 1, 1, 0], [0, 1, 2, 5], [0, -1, 1, 1], []):
        y = torch.tensor(labels, dtype=torch.long)
        assert host_reads(lambda: check(y)) == {"item": 0, "nonzero": 0, "tolist": 1 if labels else 0}
    with pytest.raises(EvalError, match=r"^data: expected labels in \[0, 2\) for tiny's 2 classes, got values in "
                                        r"\[-1, 5\]$"):
        evaluate_module._check_label_range(torch.tensor([0, -1, 5]), INFO)

@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_revision_is_the_checkouts_not_that_of_a_project_holding_the_installed_package(tmp_path, monkeypatch):
    """results.json's git_revision: robust_ops installed into a virtual environment inside the user's own git project
    (ignored there) recorded that project's commit, "-dirty" with its edits, as robust_ops's."""
    def git(*args):
        return subprocess.check_output(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                                       text=True, stderr=subprocess.DEVNULL).strip()

    git("init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    for folder in ("robust_ops", ".venv/site-packages/robust_ops"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "evaluate.py").write_text("")
    git("add", ".gitignore", "robust_ops/evaluate.py")
    git("commit", "-q", "-m", "project")
    head = git("rev-parse", "HEAD")
    monkeypatch.setattr(evaluate_module, "__file__", str(tmp_path / "robust_ops" / "evaluate.py"))
    assert evaluate_module.git_revision() == head  # a checkout of robust_ops
    (tmp_path / "robust_ops" / "evaluate.py").write_text("# edited\n")
    assert evaluate_module.git_revision() == head + "-dirty"
    monkeypatch.setattr(evaluate_module, "__file__", str(tmp_path / ".venv/site-packages/robust_ops/evaluate.py"))
    assert evaluate_module.git_revision() is None  # installed: not the project's commit


def test_write_results_schema_and_pngs(tmp_path):
    data, model = tiny_data(), tiny_model()
    rows = evaluate(model, data, INFO, attacks="fgsm,pgd:steps=2", eps="4/255,8/255", method="a")
    rows += evaluate(tiny_model(1), data, INFO, attacks="fgsm,pgd:steps=2", eps="4/255,8/255", method="b")
    x, y = data.tensors
    out = write_results(tmp_path / "run", rows, INFO, config={"attacks": "fgsm,pgd"},
                        saliency=({"a": model}, x[:3], y[:3]))
    doc = json.loads(out["results"].read_text())
    assert doc["schema"] == "robust_ops.results/1" and doc["synthetic"] is True
    assert doc["dataset"]["positive_class"] == 1 and doc["config"] == {"attacks": "fgsm,pgd"}
    assert {"robust_ops", "torch", "git_revision", "date", "device"} <= set(doc["environment"])
    assert len(doc["rows"]) == len(rows) and doc["rows"][1]["attack"] == "fgsm"
    names = sorted(p.name for p in out["figures"])
    assert names == ["accuracy_vs_eps.png", "f1_vs_eps.png", "saliency_a.png", "sensitivity_vs_eps.png",
                     "specificity_vs_eps.png"]
    for p in out["figures"]:
        assert p.read_bytes()[:8] == PNG_MAGIC
        import matplotlib.image

        assert matplotlib.image.imread(p).ndim == 3
    text = out["report"].read_text()
    assert "Synthetic data" in text and "| F1: attack | ε | a | b |" in text and "4/255" in text
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["run"]  # no staging folder left


def test_radius_plot_keeps_norms_apart(tmp_path, monkeypatch):
    # the worst-case row of an L-inf plan and of an L2 plan share a name; their radii are not one axis
    def row(attack, norm, eps, acc):
        return {"method": "m", "attack": attack, "norm": norm, "eps": eps, "n": 4, "accuracy": acc}

    rows = [row("none", None, 0.0, 0.9), row("fgsm", "linf", 1 / 255, 0.8), row("worst-case", "linf", 1 / 255, 0.7),
            row("pgd", "l2", 0.3, 0.5), row("worst-case", "l2", 0.3, 0.4)]
    figures, save = [], report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: (figures.append(fig), save(fig, path)))
    assert report.plot_metric_vs_radius(rows, tmp_path / "acc.png")
    titles = [ax.get_title() for ax in figures[0].axes]
    assert titles == ["fgsm", "worst-case (linf)", "pgd", "worst-case (l2)"]
    l2_panel = figures[0].axes[3].get_lines()[0]
    assert list(l2_panel.get_xdata()) == [0.0, 0.3] and list(l2_panel.get_ydata()) == [0.9, 0.4]


def test_nan_becomes_null(tmp_path):
    rows = [{"method": "m", "attack": "none", "norm": None, "eps": 0.0, "n": 2, "accuracy": 1.0, "auc": math.nan}]
    out = write_results(tmp_path / "r", rows, INFO, figures=False)
    assert json.loads(out["results"].read_text())["rows"][0]["auc"] is None


def test_test_set_without_positives_reports_undefined_metrics(tmp_path):
    """No positive sample: sensitivity is undefined, shown as null / "–", not as 0; means over repeats skip it."""
    x, _ = tiny_data().tensors
    rows = evaluate(tiny_model(), TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), INFO, attacks="fgsm",
                    eps=[4 / 255], method="m")
    assert all(math.isnan(r["sensitivity"]) for r in rows) and all(0 <= r["specificity"] <= 1 for r in rows)
    out = write_results(tmp_path / "r", rows, INFO, figures=False)
    assert all(r["sensitivity"] is None for r in json.loads(out["results"].read_text())["rows"])
    assert "| no attack | 0 | – |" in out["report"].read_text().split("| Sensitivity: attack")[1]
    from robust_ops.report import paper_comparison_table
    from robust_ops.reproduce import aggregate

    folds = [dict(rows[0], sensitivity=0.5), dict(rows[0], sensitivity=0.7), rows[0]]
    (mean,) = aggregate(folds, ["sensitivity"])
    assert mean["sensitivity"] == pytest.approx(0.6) and mean["sensitivity_runs"] == 2 and mean["repeats"] == 3
    paper = [{"method": mean["method"], "attack": mean["attack"], "eps": mean["eps"], "sensitivity": 0.9}]
    assert "(2 of 3 runs)" in paper_comparison_table([mean], paper, ["sensitivity"])


def test_atomic_on_error(tmp_path, monkeypatch):
    rows = evaluate(tiny_model(), tiny_data(), INFO, attacks="fgsm", eps=[4 / 255])

    def boom(*a, **k):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(report, "plot_metric_vs_radius", boom)
    with pytest.raises(RuntimeError, match="figure failed"):
        write_results(tmp_path / "run", rows, INFO)
    assert list(tmp_path.iterdir()) == []


def test_grad_cam_and_input_gradient_shapes():
    model = tiny_model()
    x, y = tiny_data(4).tensors
    cam = report.grad_cam(model, x)
    g = report.input_gradient(model, x, y)
    assert cam.shape == (4, 12, 12) and g.shape == (4, 12, 12)
    assert float(cam.max()) <= 1 + 1e-6 and float(cam.min()) >= 0 and float(g.max()) == pytest.approx(1.0)
    assert all(p.grad is None for p in model.parameters()) and model.training


@pytest.mark.parametrize("shape", [(3, 2), (3, 2, 5)])
def test_input_gradient_refuses_inputs_that_are_not_images(shape):
    # grad_cam's "use input_gradient instead" on a Conv2d-free model: feature vectors were an IndexError, and
    # [N, C, L] came back [N, N, L]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(shape[1:]), 2))
    with pytest.raises(ValueError, match=r"input_gradient: expected x to be images \[N, C, H, W\], got shape"):
        report.input_gradient(model, torch.rand(shape), torch.tensor([0, 1, 0]))


def test_format_eps():
    assert report.format_eps(5 / 255) == "5/255" and report.format_eps(0.3) == "0.3" and report.format_eps(0) == "0"
    assert report.format_eps(0.2) == "0.2" and report.format_eps(2 / 255) == "2/255"


@pytest.mark.parametrize("text, needle", [
    ("pgd:steps=2.5", "expected an integer"), ("pgd:steps=abc", "expected an integer"),
    ("pgd:steps=", "expected an integer"), ("pgd:steps=-1", "steps to be an integer >= 1"),
    ("ifgsm:steps=0", "steps to be an integer >= 1"), ("pgd:norm=l3", "norm to be one of linf, l2"),
    ("noise:trials=0", "trials to be an integer >= 1"), ("square:n_queries=1.5", "expected an integer"),
    ("cw:kappa=x", "expected a number"), ("pgd:random_start=maybe", "expected true or false"),
    ("pgd:loss=foo", "expected loss to be one of"), ("apgd-ce:rho=2", "rho in (0, 1]"),
    ("pgd:clip_min=0.5", "value range"), ("pgd:eps=0.1", "give radii with eps, not as an option of 'pgd'"),
])
def test_bad_attack_option_values_fail_when_parsed(text, needle):
    """Option values an attack checks only when run fail at parse time (before any training), as one line."""
    with pytest.raises(EvalError, match="attacks: ") as err:
        parse_attacks(text)
    assert err.value.arg == "attacks" and needle in str(err.value) and "\n" not in str(err.value)



@pytest.mark.parametrize("text, expected", [
    ("pgd:alpha=false", "a number, a fraction like 1/255 or an expression in eps"),
    ("cw:kappa=true", "a number, a fraction like 1/255 or an expression in eps"), ("pgd:steps=true", "an integer"),
    ("square:n_queries=false", "an integer"),
])
def test_true_or_false_for_a_numeric_attack_option_is_refused_as_not_a_number(text, expected):
    """true/false for a number option was passed on as a bool, for the attack to refuse: pgd:alpha=false was "pgd:
    expected alpha to be a number or a tensor of shape [2], got bool", the [2] the parse's dry-run batch."""
    name, option = text.split(":")
    key, value = option.split("=")
    with pytest.raises(EvalError, match=rf"^attacks: option {key}='{value}' of '{name}': expected {re.escape(expected)}"
                                        r"$") as err:
        parse_attacks(text)
    assert err.value.arg == "attacks"

def test_attack_option_values_are_typed():
    state = torch.get_rng_state()
    specs = parse_attacks("pgd:steps=1e1:random_start=0:early_stop=3,fgsm:norm=L2,noise:trials=2")
    assert torch.equal(state, torch.get_rng_state())  # the dry run leaves the global RNG alone
    assert specs[0].options == {"steps": 10, "random_start": False, "early_stop": 3}
    assert isinstance(specs[0].options["steps"], int) and specs[1].norm == "l2"
    assert parse_attacks("pgd:random_start=true:seed=3")[0].options == {"random_start": True, "seed": 3}
    assert parse_attacks("cw:kappa=1/10")[0].options["kappa"] == pytest.approx(0.1)
    spaced = parse_attacks("fgsm:norm= L2 ,pgd:loss= cw ")  # text values are stripped as numbers are
    options = {"norm": "L2"}
    assert AttackSpec("fgsm", options).options == {"norm": "l2"} and options == {"norm": "L2"}  # the caller's dict
    assert (spaced[0].options, spaced[1].options) == ({"norm": "l2"}, {"loss": "cw"})


def test_options_no_default_types_keep_integer_text_an_int():
    # fab's n_classes and autoattack's eot_iter default to None and no table types them: integer text must stay an
    # int (read as 3.0 / 2.0, the attacks' integer checks refused the spec at parse time)
    specs = parse_attacks("fab:n_classes=3:multi_targeted=true,autoattack:eot_iter=2:version=rand")
    assert specs[0].options == {"n_classes": 3, "multi_targeted": True} and type(specs[0].options["n_classes"]) is int
    assert specs[1].options == {"eot_iter": 2, "version": "rand"} and type(specs[1].options["eot_iter"]) is int


class _StepDefaultingToNone(attacks.Attack):
    """An own attack whose ``step`` defaults to None, so nothing tells its option's type."""

    def __init__(self, model, eps=8 / 255, step=None, **options):
        super().__init__(model, **options)
        self.eps, self.step = eps, step

    def forward(self, x, y):
        return x.clone()


def test_an_eps_expression_reaches_an_own_attack_option_whose_default_is_none():
    # an option nothing types (default None, not one of evaluate's known names) takes an expression in eps as
    # alpha does: evaluated per radius, not handed to the attack as the text 'eps/4'
    spec, = parse_attacks(f"{__name__}._StepDefaultingToNone:step=eps/4")
    assert spec.label.endswith("_StepDefaultingToNone(step=eps/4)")
    assert spec.build(tiny_model(), 0.2).step == pytest.approx(0.05)


def test_numeric_text_of_a_text_option_stays_text():
    # norm, loss and version take text: numeric text stays a string, so the attack's own check names the value it
    # refuses as given (read as a number, norm=2 was refused as 'got 2.0')
    for spec, message in (("pgd:norm=2", "norm to be one of linf, l2 (any case, e.g. 'Linf', 'L2'), got '2'"),
                          ("pgd:loss=1", "loss to be one of ce, cw or a callable (out, y) -> loss, got '1'")):
        with pytest.raises(EvalError, match=f"^attacks: pgd: expected {re.escape(message)}$"):
            parse_attacks(spec)


@pytest.mark.parametrize("ensemble", [False, True])
def test_attack_errors_at_other_radii_are_eval_errors(ensemble):
    """A value fine at the dry run's eps but not at a real radius (alpha = eps - 0.5 < 0 at eps 0.1; 1/(eps-0.5) at
    eps 0.5) ends as an EvalError, not a traceback from inside the attack."""
    data, model = tiny_data(8), tiny_model()
    for given, eps in (("pgd:alpha=eps-0.5:steps=2", [0.1]), ("pgd:alpha=1/(eps-0.5):steps=2", [0.5])):
        with pytest.raises(EvalError, match="attacks: ") as err:
            evaluate(model, data, INFO, attacks=given + ",fgsm", eps=eps, ensemble=ensemble)
        assert err.value.arg == "attacks"


def test_a_bad_option_value_of_a_spec_object_is_an_eval_error():
    # AttackSpec objects skip parse_attacks' dry run: an option value the attack refuses with a TypeError (pgd's
    # random_start="x"; seed="x" was one until 2026-12-07, a ValueError since) ends as an EvalError naming attacks, as
    # a ValueError does
    for option, message in (("random_start", "expected random_start to be True or False, got 'x'"),
                            ("seed", "expected seed to be an integer from 0 to .* or None, got 'x'")):
        with pytest.raises(EvalError, match=rf"^attacks: pgd: {message}$") as err:
            evaluate(tiny_model(), tiny_data(8), INFO, attacks=[AttackSpec("pgd", {option: "x", "steps": 1})],
                     eps=[0.1])
        assert err.value.arg == "attacks"


def test_empty_split_is_refused():
    info3 = DatasetInfo("tiny3", 3, 1, 12, ("a", "b", "c"))
    empty = TensorDataset(torch.rand(0, 1, 12, 12), torch.zeros(0, dtype=torch.long))
    for model, info in ((TinyCNN(1, 3, width=4), info3), (tiny_model(), INFO)):
        for data in (empty, []):  # an empty map-style dataset was torch.stack's "expects a non-empty TensorList"
            with pytest.raises(EvalError, match="no samples") as err:
                evaluate(model, data, info, attacks="fgsm", eps=[0.1])
            assert err.value.arg == "split"


def test_non_finite_inputs_and_outputs_are_refused():
    x, y = tiny_data(8).tensors
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    x[3, 0, 1, 1] = float("inf")
    with pytest.raises(EvalError, match="data: 2 of 8 inputs contain NaN or Inf") as err:
        evaluate(tiny_model(), TensorDataset(x, y), INFO, attacks="fgsm", eps=[0.1])
    assert err.value.arg == "data"
    model = tiny_model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(EvalError, match="tiny: model outputs NaN/Inf for 8 of 8 samples; check the checkpoint") as e:
        evaluate(model, tiny_data(8), INFO, attacks="fgsm", eps=[0.1], method="tiny")
    assert e.value.arg == "model"


class _NaNAtAZeroPixel(nn.Module):
    """tiny_model's logits, NaN for an input with a pixel at 0 (a log(x) in its forward): clean inputs in [0.05,
    0.95] are fine, an attack's points clipped to 0 are not."""

    def __init__(self):
        super().__init__()
        self.net = tiny_model()

    def forward(self, x):
        return self.net(x) + torch.log(x.flatten(1).amin(1, keepdim=True)) * 0  # -inf * 0 is NaN


def test_nan_outputs_at_an_attacks_points_name_the_method_attack_and_radius_not_the_checkpoint():
    # "model outputs NaN/Inf for 4 of 4 samples; check the checkpoint" named neither the method nor the attack,
    # though the clean outputs were finite; an attack meeting them at its first forward was "--attacks: ..."
    x, y = tiny_data(8).tensors
    data = TensorDataset(x * 0.9 + 0.05, y)
    with pytest.raises(EvalError, match=r"^m: model outputs NaN/Inf for \d of \d adversarial inputs of fgsm at "
                                        r"eps=0.1 \(finite on the clean ones\); check the model's forward ") as err:
        evaluate(_NaNAtAZeroPixel(), data, INFO, attacks="fgsm", eps=[0.1], method="m")
    assert err.value.arg == "model"
    with pytest.raises(EvalError, match=r"^m: pgd: the model's output is NaN or Inf for \d of its \d inputs at the "
                                        r"attack's first forward ") as err:
        evaluate(_NaNAtAZeroPixel(), data, INFO, attacks="pgd:random_start=True:alpha=0.05", eps=[0.1],
                 method="m")
    assert err.value.arg == "model"


def test_aggregate_n_and_partially_defined_metrics_in_every_table():
    from robust_ops.reproduce import aggregate

    base = dict(method="M", attack="none", norm=None, eps=0.0)
    runs = [dict(base, n=157, accuracy=0.9, precision=0.8), dict(base, n=156, accuracy=0.7, precision=math.nan),
            dict(base, n=155, accuracy=0.8, precision=math.nan)]
    rows = aggregate(runs, ["accuracy", "precision"])
    assert (rows[0]["n"], rows[0]["n_min"], rows[0]["n_max"], rows[0]["precision_runs"]) == (468, 155, 157, 1)
    assert "0.800 (1 of 3 runs)" in report.markdown_table(rows, ["accuracy", "precision"])
    assert "0.800 (1 of 3 runs)" in report.pivot_table(rows, "precision")
    assert "(1 of 3 runs)" not in report.pivot_table(rows, "accuracy")
    paper = [{"method": "M", "attack": "none", "eps": 0.0, "precision": 0.7}]
    assert "0.800 (1 of 3 runs)" in report.paper_comparison_table(rows, paper, ["precision"])


def test_predict_logits_restores_every_module_mode():
    """A submodule the caller froze in eval mode stays in eval mode (model.train(was) would flip it back)."""
    from robust_ops.evaluate import predict_logits

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.train()
    model[2].eval()
    predict_logits(model, torch.rand(5, 1, 2, 2))
    assert model.training and model[1].training and not model[2].training


def test_predict_logits_and_evaluates_clean_pass_run_the_model_without_autograd():
    """The clean and adversarial scoring keeps no graph: with grad enabled each batch's forward saved its activations
    for a backward that never comes (memory and time on top of the scores, which are detached either way)."""
    from robust_ops.evaluate import predict_logits

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.grad_enabled = nn.Linear(4, 2), []

        def forward(self, x):
            self.grad_enabled.append(torch.is_grad_enabled())
            return self.linear(x.flatten(1))

    model = Recording()
    predict_logits(model, torch.rand(5, 1, 2, 2), batch_size=2)
    assert model.grad_enabled == [False, False, False]
    info = DatasetInfo("t", 2, 1, 2, ("a", "b"), positive_class=1)
    x = torch.rand(3, 1, 2, 2)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample correct, so FGSM attacks and scores all three
    model.grad_enabled.clear()
    evaluate(model, TensorDataset(x, y), info, attacks="fgsm", eps="1/255")
    assert model.grad_enabled == [False, True, False]  # the clean pass, FGSM's gradient, the adversarial scoring


def test_predict_logits_empty_input_keeps_the_class_count():
    from robust_ops.evaluate import predict_logits

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    preds, logits = predict_logits(model, torch.rand(0, 1, 2, 2))
    assert preds.shape == (0,) and logits.shape == (0, 3)


def test_pivot_and_paper_tables_keep_norms_apart():
    rows = [{"method": "AT", "attack": "worst-case", "norm": "linf", "eps": 0.5, "n": 4, "accuracy": 0.2},
            {"method": "AT", "attack": "worst-case", "norm": "l2", "eps": 0.5, "n": 4, "accuracy": 0.7}]
    table = report.pivot_table(rows, "accuracy")
    assert "worst-case (linf)" in table and "worst-case (l2)" in table and "0.200" in table and "0.700" in table
    paper = [{"method": "AT", "attack": "worst-case", "eps": 0.5, "source": "T1", "accuracy": 0.3, "norm": "l2"}]
    assert "0.700" in report.paper_comparison_table(rows, paper, ["accuracy"])
    with pytest.raises(ValueError, match="give the paper row a 'norm'"):
        report.paper_comparison_table(rows, [{k: v for k, v in paper[0].items() if k != "norm"}], ["accuracy"])


def test_methods_sharing_a_slug_get_one_saliency_file_each(tmp_path):
    """"MIRST-DM" and "mirst dm" both wrote saliency_mirst-dm.png: the second map replaced the first one's."""
    x, y = torch.rand(4, 1, 12, 12), torch.tensor([0, 1, 0, 1])
    models = {name: TinyCNN(1, 2, width=4) for name in ("MIRST-DM", "mirst dm", "mirst-dm-2", "Mirst_DM")}
    rows = [dict(method=name, attack="none", norm=None, eps=0.0, n=4, accuracy=0.5) for name in models]
    paths = write_results(tmp_path, rows, INFO, saliency=(models, x[:2], y[:2]))
    names = [p.name for p in paths["figures"] if p.name.startswith("saliency_")]
    assert names == ["saliency_mirst-dm.png", "saliency_mirst-dm-2.png", "saliency_mirst-dm-2-2.png",
                     "saliency_mirst-dm-3.png"]


def test_write_results_refuses_a_saliency_of_another_form_before_writing_and_takes_numpy_images(tmp_path):
    """saliency=(model, x, y), the model where write_results takes {method: model}, stopped it after the figures
    with "AttributeError: 'SmallCNN' object has no attribute 'items'", a pair (models, x) with "ValueError: not
    enough values to unpack", numpy images with "'numpy.ndarray' object has no attribute 'dim'"."""
    x, y = torch.rand(4, 1, 12, 12), torch.tensor([0, 1, 0, 1])
    model = tiny_model()
    rows = evaluate(model, TensorDataset(x, y), INFO, attacks="fgsm", eps=[1 / 255], method="a")
    form = (r"^saliency: expected \(models, x, y\): a dict \{method: model\}, a few test images \[N, C, H, W\] and "
            r"their ")
    for bad, got in [((model, x, y), r"got the model itself \(TinyCNN\); pass \(\{'<method>': model\}, x, y\), the "
                                     r"method as its rows name it$"),
                     (({"a": model}, x), r"got a tuple of 2 items$"),
                     (([model], x, y), r"got its models as a list$"),
                     (({"a": "model.pt"}, x, y), r"got a str among the models$")]:
        with pytest.raises(EvalError, match=form + r"labels, " + got) as err:
            write_results(tmp_path / "out", rows, INFO, saliency=bad)
        assert err.value.arg == "saliency" and not (tmp_path / "out").exists()
    paths = write_results(tmp_path / "out", rows, INFO, saliency=({"a": model}, x[:2].numpy(), y[:2].numpy()))
    assert "saliency_a.png" in [p.name for p in paths["figures"]]


def test_saliency_maps_restore_every_module_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 16, 2))
    model.train()
    model[1].eval()
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    report.grad_cam(model, x, layer=model[0])
    report.input_gradient(model, x, y)
    assert model.training and model[0].training and not model[1].training


def test_saliency_figure_takes_two_eval_forwards_and_leaves_batch_norm_alone(tmp_path, monkeypatch):
    """Grad-CAM and the input gradient each need a forward; the predictions in the titles come from the input
    gradient's eval-mode one, not from a third forward in the model's current (after fit: train) mode, which
    normalised the few images with their own batch statistics and moved the running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 16, 2))
    model.train()
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 1])
    stats = [model[1].running_mean.clone(), model[1].running_var.clone(), model[1].num_batches_tracked.clone()]
    calls = []
    model.register_forward_hook(lambda m, inp, out: calls.append((m.training, out.detach().clone())))
    titles = []
    real_figure = report._figure

    def figure(*args, **kwargs):  # records the title texts the figure gets
        fig, axes = real_figure(*args, **kwargs)
        for ax in axes.flat:
            set_title = ax.set_title
            ax.set_title = lambda text, *a, _f=set_title, **k: (titles.append(text), _f(text, *a, **k))[1]
        return fig, axes

    monkeypatch.setattr(report, "_figure", figure)
    assert report.plot_saliency(model, x, y, tmp_path / "s.png", info=INFO, title="m")
    assert len(calls) == 2 and not any(training for training, _ in calls)
    assert all(torch.equal(a, b) for a, b in zip(stats, [model[1].running_mean, model[1].running_var,
                                                         model[1].num_batches_tracked]))
    assert model.training and model[1].training
    pred = calls[-1][1].argmax(1)
    shown = [t.split("pred ")[1] for t in titles if "pred " in t]
    assert shown == [INFO.class_names[int(k)] for k in pred]
    assert (tmp_path / "s.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("num_classes, positive_class", [(2, 1), (2, 0), (4, None)])
def test_metrics_take_one_precision_recall_pass_with_the_separate_scorers_values(monkeypatch, num_classes,
                                                                                 positive_class):
    """Every row's F1, sensitivity, specificity and precision come from one precision_recall_fscore_support call
    (f1_score, recall_score and precision_score each recounted the same confusion matrix), with the values those
    scorers give, undefined (0/0) ones included."""
    import numpy as np
    import sklearn.metrics as skm

    from robust_ops.metrics import classification_metrics

    calls = []
    real = skm.precision_recall_fscore_support
    monkeypatch.setattr(skm, "precision_recall_fscore_support", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    g = torch.Generator().manual_seed(1)
    random_labels = [torch.randint(0, num_classes, (30,), generator=g) for _ in range(2)]
    for y, pred in [random_labels,
                    (torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)),  # one class: 0/0 values
                    (torch.arange(6) % 2, torch.ones(6, dtype=torch.long))]:
        probs = torch.softmax(torch.randn(len(y), num_classes, generator=g), 1)
        calls.clear()
        got = classification_metrics(y, pred, probs, num_classes=num_classes, positive_class=positive_class)
        assert len(calls) == 1
        nan = dict(zero_division=np.nan)
        if num_classes == 2:
            want = {"f1": skm.f1_score(y, pred, pos_label=positive_class, **nan),
                    "sensitivity": skm.recall_score(y, pred, pos_label=positive_class, **nan),
                    "specificity": skm.recall_score(y, pred, pos_label=1 - positive_class, **nan),
                    "precision": skm.precision_score(y, pred, pos_label=positive_class, **nan)}
        else:
            present = np.bincount(y.numpy(), minlength=num_classes) > 0
            kw = dict(labels=list(range(num_classes)), average=None, **nan)

            def macro(v):
                v = v[present & ~np.isnan(v)]
                return float(v.mean()) if v.size else math.nan

            want = {"f1": macro(skm.f1_score(y, pred, **kw)), "sensitivity": macro(skm.recall_score(y, pred, **kw)),
                    "precision": macro(skm.precision_score(y, pred, **kw))}
        for key, value in want.items():
            assert (math.isnan(got[key]) and math.isnan(value)) or got[key] == float(value), key


# ---------------------------------------------------------------------------------------------------------------------
# What each row's metrics are computed on


@pytest.mark.parametrize("seed, eps255, case", [(0, 4, "robust samples"), (3, 48, "samples fooled by both")])
def test_rows_use_each_samples_final_input_and_the_worst_case_picks_per_sample(monkeypatch, seed, eps255, case):
    """The probabilities behind each row (so AUC and the other scores): an attack row uses the attack's output for
    every sample it attacked -- the robust ones too -- and the clean input for samples misclassified clean; the
    worst-case row takes, per sample, the input with the lowest true-class probability of those inside the ball: of
    the fooling ones when an attack fooled it, else of both attack outputs and the clean input. Two batches: one with
    robust samples on both sides of that comparison, one with samples both attacks fool (differently)."""
    module = sys.modules["robust_ops.evaluate"]
    seen, original = {}, module._row

    def spy(method, attack, norm, eps, y, pred, logits, info):  # rows get logits (metrics: logits=)
        seen[attack] = probabilities(logits)
        return original(method, attack, norm, eps, y, pred, logits, info)

    monkeypatch.setattr(module, "_row", spy)
    data, model = tiny_data(48, seed=seed), tiny_model(seed)
    with torch.no_grad():
        model.head.weight.mul_(5)
    e = eps255 / 255
    evaluate(model, data, INFO, attacks="fgsm,cw:steps=3", eps=[e])
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        clean = torch.softmax(model(x), 1)
        ok = clean.argmax(1) == y
        probs, fooled = [], []
        for name, label, kw in (("fgsm", "fgsm", {}), ("cw", "cw(steps=3)", {"steps": 3})):
            p = torch.softmax(model(attacks.build(name, model, eps=e, **kw)(x, y)), 1)
            probs.append(torch.where(ok[:, None], p, clean))
            fooled.append(~ok | (p.argmax(1) != y))
            torch.testing.assert_close(seen[label].float(), probs[-1], rtol=1e-4, atol=1e-5)
    (f, c), lower = probs, (probs[0].gather(1, y[:, None]) < probs[1].gather(1, y[:, None]))[:, 0]
    if case == "robust samples":
        robust = ~fooled[0] & ~fooled[1]
        assert bool((robust & lower).any()) and bool((robust & ~lower).any())
    else:
        by_both = ok & fooled[0] & fooled[1] & ((f - c).abs().amax(1) > 1e-3)
        assert bool(by_both.any())
    # inf: an input the sample may not take (a correct one when an attack fooled it)
    either = fooled[0] | fooled[1]
    scores = torch.stack([p.gather(1, y[:, None])[:, 0].masked_fill(either & ~hit, math.inf)
                          for p, hit in ((f, fooled[0]), (c, fooled[1]), (clean, ~either))])
    want = torch.stack([f, c, clean])[scores.argmin(0), torch.arange(len(y))]
    torch.testing.assert_close(seen["worst-case"].float(), want, rtol=1e-4, atol=1e-5)


class _PixelModel(nn.Module):
    """Two logits from pixel 1 of a [N, 1, 1, 2] input: class 1 when it is above 0.5 (pixel 0 holds a sample id)."""

    def forward(self, x):
        v = x.flatten(1)[:, 1]
        return torch.stack([0.5 - v, v - 0.5], 1) * 10


def test_without_cascade_each_radius_keeps_the_first_fooling_input_and_takes_later_ones(monkeypatch):
    # A scripted attack: at each radius it sets pixel 1 of sample i to table[eps][i] (> 0.5 fools label 0).
    # cascade=False attacks every sample at every radius: an input that fools replaces the earlier one (also for a
    # sample misclassified clean); one that does not fool never replaces an earlier fooling input, and the sample
    # stays fooled at every larger radius.
    module = sys.modules["robust_ops.evaluate"]
    table = {0.1: [0.9, 0.3, 0.3, 0.9], 0.2: [0.4, 0.7, 0.45, 0.7], 0.3: [0.4, 0.4, 0.4, 0.4]}

    def scripted(spec, model, eps, clip_min=0.0, clip_max=1.0):
        def attack(x, y):
            out = x.clone()
            if eps in table:
                ids = (out.flatten(1)[:, 0] * 10).round().long()
                out.view(out.shape[0], -1)[:, 1] = torch.tensor(table[eps])[ids]
            return out
        return attack

    monkeypatch.setattr(module.AttackSpec, "build", scripted)
    monkeypatch.setattr(module, "check_inside_ball", lambda *args: None)  # the scripted points ignore the radius
    seen, original = {}, module._row

    def spy(method, attack, norm, eps, y, pred, logits, info):  # rows get logits (metrics: logits=)
        seen[eps] = probabilities(logits)[:, 1]
        return original(method, attack, norm, eps, y, pred, logits, info)

    monkeypatch.setattr(module, "_row", spy)
    x = torch.tensor([[0.0, 0.2], [0.1, 0.2], [0.2, 0.2], [0.3, 0.8]]).view(4, 1, 1, 2)  # sample 3: wrong clean
    data = TensorDataset(x, torch.zeros(4, dtype=torch.long))
    rows = evaluate(_PixelModel(), data, INFO, attacks="fgsm", eps=[0.1, 0.2, 0.3], cascade=False, batch_size=3)
    assert [r["accuracy"] for r in rows] == [0.75, 0.5, 0.25, 0.25]
    p1 = lambda v: torch.softmax(torch.tensor([0.5 - v, v - 0.5]) * 10, 0)[1]  # noqa: E731
    for eps, inputs in ((0.1, [0.9, 0.3, 0.3, 0.9]), (0.2, [0.9, 0.7, 0.45, 0.7]), (0.3, [0.9, 0.7, 0.4, 0.7])):
        torch.testing.assert_close(seen[eps].float(), torch.stack([p1(v) for v in inputs]), msg=f"eps {eps}")



def test_progress_lines_round_accuracy_as_the_tables_do():
    # 1103 of 2000 correct: 0.5515, a float just below it. The progress lines formatted it with :.3f (0.551) while
    # the printed tables and report.md round the decimal, ties to even (0.552): two numbers for one row.
    x = torch.tensor([[0.0, 0.8 if i < 1103 else 0.2] for i in range(2000)]).view(2000, 1, 1, 2)
    lines = []
    rows = evaluate(_PixelModel(), TensorDataset(x, torch.ones(2000, dtype=torch.long)), INFO, attacks="fgsm",
                    eps=[0], progress=lines.append)
    assert rows[0]["accuracy"] == 0.5515 and report.fmt(rows[0]["accuracy"]) == "0.552"
    assert lines == ["model: clean accuracy 0.552", "model: fgsm eps=0 accuracy 0.552"]

def test_rows_rank_confident_predictions_by_their_scores():
    """Probabilities were float32: past a logit margin of ~17 the predicted class's rounds to 1.0, so confident
    predictions of the positive class tied and the rows' AUC (0.667 here) was not the model's scores' (0.833)."""
    class Confident(nn.Module):
        def forward(self, x):
            z = (x.flatten(1)[:, 0] - 0.5) * 160  # class 1's logit margin
            return torch.stack([torch.zeros_like(z), z], 1)

    margins = torch.tensor([18.0, 20.0, 25.0, 30.0, -3.0])
    x = (margins / 160 + 0.5).view(5, 1, 1, 1)
    y = torch.tensor([0, 1, 0, 1, 0])  # the two most confident predictions are the positives (INFO: class 1)
    rows = evaluate(Confident(), TensorDataset(x, y), INFO, attacks="fgsm", eps=[0.0])
    assert rows[0]["auc"] == pytest.approx(5 / 6)


@pytest.mark.parametrize("single", [False, True], ids=["two-logits", "single-logit"])
def test_rows_rank_predictions_whose_float64_probabilities_round_to_one(single):
    """Past a logit margin of ~37 the predicted class's float64 probability is 1.0: the positives at margins 50 and
    60 tied with the negatives at 40 and 45, and the rows' AUC was 0.667 where the model ranks them perfectly."""
    class Confident(nn.Module):
        def forward(self, x):
            z = (x.flatten(1)[:, 0] - 0.5) * 160  # class 1's logit margin
            return z if single else torch.stack([torch.zeros_like(z), z], 1)

    margins = torch.tensor([50.0, 60.0, 40.0, 45.0, -3.0])
    x = (margins / 160 + 0.5).view(5, 1, 1, 1)
    y = torch.tensor([1, 1, 0, 0, 0])  # the two most confident predictions are the positives (INFO: class 1)
    rows = evaluate(Confident(), TensorDataset(x, y), INFO, attacks="fgsm,pgd", eps=[0.0])
    assert [r["attack"] for r in rows] == ["none", "fgsm", "pgd", "worst-case"]
    from sklearn import metrics as skm

    want_map = np.mean([skm.average_precision_score(y == c, margins * (1 if c else -1)) for c in (0, 1)])
    for r in rows:
        assert r["auc"] == 1.0 and r["map"] == pytest.approx(want_map), r


def test_evaluate_batches_every_forward_and_checks_batch_size():
    data, model = tiny_data(11), tiny_model()
    sizes = []
    model.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    rows = evaluate(model, data, INFO, attacks="pgd:steps=2", eps=[8 / 255], batch_size=4)
    assert max(sizes) == 4 and rows[0]["n"] == rows[1]["n"] == 11
    for bad in (0, 2.5, "4", None, True):  # non-integers were TypeErrors from deep inside (split, range, <)
        with pytest.raises(EvalError, match=f"batch_size: expected batch_size to be an integer >= 1, got {bad!r}"):
            evaluate(model, data, INFO, attacks="fgsm", eps=[0.1], batch_size=bad)


def test_predict_logits_covers_the_last_partial_batch_and_refuses_any_non_finite_score():
    from robust_ops.evaluate import predict_logits

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(5, 1, 2, 2)
    preds, logits = predict_logits(model, x, batch_size=2)
    probs = probabilities(logits)
    with torch.no_grad():
        torch.testing.assert_close(probs.float(), torch.softmax(model(x), 1))
    assert torch.equal(preds, probs.argmax(1))

    class OneInfinite(nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 2)
            out[0, 0] = float("inf")  # one sample's scores are NaN
            return out

    with pytest.raises(EvalError, match="model outputs NaN/Inf for 1 of 3 samples"):
        predict_logits(OneInfinite(), torch.rand(3, 1, 2, 2))


class _TupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(144, 2)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out, out


class _OneRowPerBatch(_TupleOutput):
    def forward(self, x):
        return self.fc(x.flatten(1)).mean(0, keepdim=True)


@pytest.mark.parametrize("model, match", [
    (_TupleOutput(), "expected the model to return a logits tensor, got a tuple"),
    (_OneRowPerBatch(), r"expected the model to output \[N, K\] logits .* for N=24 inputs, got shape \(1, 2\)"),
])
def test_a_model_output_that_is_not_one_row_of_logits_per_input_is_an_error_naming_the_model(model, match):
    # a tuple was "'tuple' object has no attribute 'dim'"; one row per batch failed in the metrics on y_pred
    with pytest.raises(EvalError, match=f"^model: evaluate: {match}") as err:
        evaluate(model, tiny_data(), INFO, attacks="fgsm", eps=[0.1])
    assert err.value.arg == "model"


def test_predictions_use_eval_mode_and_the_label_tensor_of_a_dataset():
    from robust_ops.evaluate import dataset_tensors, predict_logits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).train()
    x = torch.rand(6, 1, 2, 2)
    _, logits = predict_logits(model, x, batch_size=4)
    probs = probabilities(logits)
    assert model.training
    with torch.no_grad():
        torch.testing.assert_close(probs.float(), torch.softmax(model.eval()(x), 1))  # running stats, no dropout
    y, ids = torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(10, 16)
    got_x, got_y = dataset_tensors(TensorDataset(x, y, ids))  # (x, y, ...): extra tensors are not labels
    assert got_x is x and torch.equal(got_y, y)
    got_x, got_y = dataset_tensors([(x[i], int(y[i]), "extra") for i in range(6)])
    assert torch.equal(got_x, x) and torch.equal(got_y, y)


def test_a_tensor_dataset_subclass_with_its_own_getitem_is_evaluated_on_its_items():
    # its raw .tensors were read instead: uint8 images served as floats in [0, 1] were refused as out of range, and
    # a transform in __getitem__ (which fit applies) was skipped without a word
    from robust_ops.evaluate import dataset_tensors

    class Scaled(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x.float() / 255, y

    data = tiny_data()
    x8 = (data.tensors[0] * 255).round().to(torch.uint8)
    got_x, got_y = dataset_tensors(Scaled(x8, data.tensors[1]))
    assert torch.equal(got_x, x8.float() / 255) and torch.equal(got_y, data.tensors[1])
    rows = evaluate(tiny_model(), Scaled(x8, data.tensors[1]), INFO, attacks="fgsm", eps=[0.1])
    assert rows == evaluate(tiny_model(), TensorDataset(x8.float() / 255, data.tensors[1]), INFO, attacks="fgsm",
                            eps=[0.1])


@pytest.mark.parametrize("flag", ["cascade", "ensemble"])
@pytest.mark.parametrize("value", ["false", "no", 0, None])
def test_cascade_and_ensemble_take_only_true_or_false(flag, value):
    # ensemble="false" (truthy) ran the ensemble; cascade="no" ran the cascade
    with pytest.raises(EvalError, match=f"evaluate: expected {flag} to be True or False, got {value!r}") as err:
        evaluate(tiny_model(), tiny_data(), INFO, attacks="fgsm", eps=[0.1], **{flag: value})
    assert err.value.arg == flag


def test_ensemble_without_cascade_is_refused_not_run_as_a_cascade():
    # cascade=False was ignored: the ensemble's cascade ran, as robust-ops eval --ensemble --no-cascade refuses
    with pytest.raises(EvalError, match="cascade: ensemble=True always runs its attacks as a cascade") as err:
        evaluate(tiny_model(), tiny_data(), INFO, attacks="fgsm,pgd:steps=2", eps=[0.1], cascade=False, ensemble=True)
    assert err.value.arg == "cascade"


def test_a_data_loader_or_iterable_dataset_is_refused_naming_the_fix():
    # a DataLoader failed with "'DataLoader' object is not subscriptable", as it did in fit
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from tiny_data(4)

    loader = torch.utils.data.DataLoader(tiny_data(), batch_size=4)
    for data, fix in ((loader, r"pass its dataset \(loader.dataset\): evaluate draws the batches itself "
                               r"\(batch_size=\)"), (Stream(), "wrap the samples in a map-style dataset")):
        with pytest.raises(EvalError, match=r"evaluate: expected dataset to be a map-style dataset \(len\(\) and "
                                            rf"data\[i\] -> \(x, y\)\), got {type(data).__name__}; {fix}") as err:
            evaluate(tiny_model(), data, INFO, attacks="fgsm", eps=[0.1])
        assert err.value.arg == "data"


def test_dict_single_field_and_pil_items_are_refused_naming_the_fix():
    # dict items were a bare "KeyError: 0", (x,) items an IndexError, PIL images "Could not infer dtype of Image";
    # fit names the first two with its item rule, which evaluate now shares
    from PIL import Image

    x, y = tiny_data(4).tensors
    cases = (([{"image": x[i], "label": y[i]} for i in range(4)], r"evaluate: expected the dataset to yield \(x, y\) "
              r"or \(x, y, ids\) tuples, got dict items \(keys \['image', 'label'\]\); make its items"),
             ([x[i] for i in range(4)], r"evaluate: expected the dataset to yield \(x, y\) or \(x, y, ids\) tuples, "
              r"got Tensor items of shape \[1, 12, 12\], not tuples; make its items \(image, label\)"),
             ([(Image.fromarray((x[i, 0] * 255).byte().numpy()), int(y[i])) for i in range(4)],
              r"evaluate: could not stack the dataset's items into one batch \(.*Image.*\); make each x a tensor of "
              r"one shape \(torchvision.transforms.ToTensor\(\) for PIL images\)"))
    for data, match in cases:
        with pytest.raises(EvalError, match=match) as err:
            evaluate(tiny_model(), data, INFO, attacks="fgsm", eps=[0.1])
        assert err.value.arg == "data" and "\n" not in str(err.value)


def test_a_tuple_of_the_inputs_and_labels_is_refused_naming_tensordataset():
    """evaluate(model, (x, y), info), the tensors as they come from a split, was read as a dataset of two items, x
    and y: "expected the dataset to yield (x, y) or (x, y, ids), got Tensor of length ?; make its items (image,
    label)", which named neither what was passed nor the fix."""
    x, y = tiny_data(4).tensors
    cases = (((x, y), r"got a tuple of 2 tensors \(\[4, 1, 12, 12\], \[4\]\), one per field; pass "
                      r"torch.utils.data.TensorDataset\(x, y\)$"),
             ([x, y, torch.arange(4)], r"got a list of 3 tensors .*TensorDataset\(x, y, ids\)$"),
             ((x.numpy(), y.numpy()), r"got a tuple of 2 arrays .*TensorDataset\(torch.as_tensor\(x\), "
                                      r"torch.as_tensor\(y\)\)$"))
    for data, match in cases:
        with pytest.raises(EvalError, match=r"^evaluate: expected a dataset of \(x, y(, ids)?\) items, " + match) \
                as err:
            evaluate(tiny_model(), data, INFO, attacks="fgsm", eps=[0.1])
        assert err.value.arg == "data"
    # a list of two (x, y) samples is a dataset
    assert evaluate(tiny_model(), [(x[0], y[0]), (x[1], y[1])], INFO, attacks="fgsm", eps=[0.1])[0]["n"] == 2


def test_a_map_style_dataset_keeps_its_labels_for_the_label_rule():
    # its labels went through int(): a float label 1.4 was evaluated as class 1, a one-hot one was a traceback
    import numpy as np

    x, y = torch.rand(6, 1, 12, 12), torch.tensor([0, 1, 0, 1, 1, 0])
    model = tiny_model()
    floats = [(x[i], float(y[i]) + 0.4) for i in range(6)]
    with pytest.raises(EvalError, match="data: expected integer class labels, got labels of dtype torch.float"):
        evaluate(model, floats, INFO, attacks="fgsm", eps=[0.1])
    onehot = [(x[i], nn.functional.one_hot(y[i], 2)) for i in range(6)]
    with pytest.raises(EvalError, match=r"shape \(6, 2\).*pass their argmax\(1\)"):
        evaluate(model, onehot, INFO, attacks="fgsm", eps=[0.1])
    want = evaluate(model, TensorDataset(x, y), INFO, attacks="fgsm", eps=[0.1])
    for labels in ([int(v) for v in y], [np.array([int(v)]) for v in y]):  # MedMNIST items hold [1]-arrays
        assert evaluate(model, list(zip(x, labels)), INFO, attacks="fgsm", eps=[0.1]) == want


def test_attack_option_given_twice_is_refused():
    # pgd:steps=3:steps=4 used to run steps=4 and drop steps=3 without a word
    with pytest.raises(EvalError, match="option 'steps' of 'pgd' is given twice"):
        parse_attacks("pgd:steps=3:steps=4")


def test_write_results_refuses_two_rows_under_one_key(tmp_path):
    # two runs evaluated under the same method label: the pivot tables kept only the last run's numbers
    row = dict(method="M", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0, f1=1.0, sensitivity=1.0,
               specificity=1.0, precision=1.0, auc=1.0, map=1.0)
    with pytest.raises(EvalError, match="two rows for method 'M', attack 'none', eps 0; give each run its own"):
        write_results(tmp_path / "out", [row, dict(row, accuracy=0.5)], INFO, figures=False)
    assert not (tmp_path / "out").exists()


def test_linf_radius_wider_than_value_range_is_refused():
    # --eps 8 meant as 8/255 ran every L-inf attack with a ball covering the whole image range
    x, y = torch.rand(4, 1, 12, 12), torch.tensor([0, 1, 0, 1])
    with pytest.raises(EvalError, match=r"eps: 8 is an L-inf radius \(fgsm\) wider than the inputs' value range"):
        evaluate(TinyCNN(), TensorDataset(x, y), INFO, attacks="fgsm", eps="8,1/255")  # the widest, in any order
    rows = evaluate(TinyCNN(), TensorDataset(x, y), INFO, attacks="noise:norm=l2:trials=1", eps="2")  # L2: fine
    assert rows[-1]["eps"] == 2.0


def test_a_linf_step_in_0_255_units_is_refused_with_the_radii_before_any_training():
    """pgd:alpha=2 passed parse_attacks (its dry run at eps 1 spans [0, 1], where a wide step is allowed) and
    check_radii, so `robust-ops demo --attacks pgd:alpha=2 --eps 8/255` trained every method and then ended
    '--attacks: pgd: expected alpha <= clip_max - clip_min = 1 ...' (found by the attacks4 helper)."""
    specs = parse_attacks("fgsm,pgd:alpha=2")
    with pytest.raises(EvalError, match=r"^attacks: pgd: expected alpha <= clip_max - clip_min = 1 for norm='linf', "
                                        r"got alpha up to 2 \(alpha in 0-255 units\? pass e.g. 2/255\)$"):
        check_radii(specs, [8 / 255], INFO)
    check_radii(specs, [1.0], INFO)  # a radius spanning the range takes any step
    check_radii(parse_attacks("pgd:alpha=2/255,autoattack"), [1 / 255, 8 / 255], INFO)


def test_l1_specs_parse_for_apgd_and_autoattack_and_their_rows_say_l1():
    """norm=L1 (any case) is APGD's, APGD-T's, FAB's, FAB-T's and AutoAttack's (canonical "l1" in labels and rows);
    an L1 radius wider than the value range is no L-inf mistake, so it is evaluated; other attacks refuse L1 when
    parsed."""
    specs = parse_attacks(["apgd-ce:norm=L1:steps=3", "apgd-t:norm=l1:use_largereps=true:steps=3",
                           "autoattack:norm=L1:steps=3"])
    assert [(s.label, s.norm) for s in specs] == [("apgd-ce(norm=l1,steps=3)", "l1"),
                                                  ("apgd-t(norm=l1,use_largereps=True,steps=3)", "l1"),
                                                  ("autoattack(norm=l1,steps=3)", "l1")]
    with pytest.raises(EvalError, match=r"^attacks: pgd: expected norm to be one of linf, l2 \(any case"):
        parse_attacks("pgd:norm=l1")
    fab_specs = parse_attacks(["fab:norm=l1:steps=3", "fab-t:norm=L1"])  # FAB / FAB-T take L1 too
    assert [(s.label, s.norm) for s in fab_specs] == [("fab(norm=l1,steps=3)", "l1"), ("fab-t(norm=l1)", "l1")]
    with pytest.raises(EvalError, match=r"^attacks: apgd-ce: use_largereps is AutoAttack's schedule for norm='l1'"):
        parse_attacks("apgd-ce:use_largereps=true")
    rows = evaluate(tiny_model(), tiny_data(8), INFO, attacks=specs[:2], eps="4")
    assert [(r["attack"], r["norm"], r["eps"]) for r in rows[1:]] == [
        ("apgd-ce(norm=l1,steps=3)", "l1", 4.0), ("apgd-t(norm=l1,use_largereps=True,steps=3)", "l1", 4.0),
        ("worst-case", "l1", 4.0)]


@pytest.mark.parametrize("expr", ["eps/", "(eps", "eps*1e", "eps..2"])
def test_malformed_eps_expression_is_a_one_line_error(expr):
    # compile() raised SyntaxError outside the try: the CLI printed a traceback
    with pytest.raises(EvalError, match=r"option alpha='.*' of 'pgd' is not an expression in eps"):
        parse_attacks(f"pgd:alpha={expr}")


def test_an_eval_error_survives_a_pickle_with_its_arg():
    # a worker process's EvalError reaches its parent pickled: EvalError(message) alone was a TypeError there (a
    # ProcessPoolExecutor's future said BrokenProcessPool, the error and its arg lost)
    with pytest.raises(EvalError) as caught:
        parse_eps("abc")
    copy_ = pickle.loads(pickle.dumps(caught.value))
    assert type(copy_) is EvalError and (copy_.arg, str(copy_)) == (caught.value.arg, str(caught.value))
    assert copy_.arg == "eps"


def test_an_eval_error_pickles_with_its_notes_and_attributes():
    # its __reduce__ rebuilt it from its arg and message alone: notes (add_note) and attributes set on it were lost,
    # which a plain ValueError's pickle keeps
    error = EvalError("eps", "eps: bad")
    error.add_note("from worker 2")
    error.where = "fold 1"
    copy_ = pickle.loads(pickle.dumps(error))
    assert (copy_.arg, str(copy_), copy_.__notes__, copy_.where) == ("eps", "eps: bad", ["from worker 2"], "fold 1")


@pytest.mark.parametrize("text", ["noise:seed=none", "pgd:alpha=None", "pgd:steps=null"])
def test_attack_option_none_is_refused(text):
    # build drops None values: noise:seed=none ran seeded with 0 and pgd:alpha=none with alpha 0.001, under labels
    # saying None
    with pytest.raises(EvalError, match="would be ignored .the attack's default applies.; give a value or leave"):
        parse_attacks(text)


def test_evaluate_memory_follows_the_batch_size_not_the_split(monkeypatch):
    """Each batch's adversarial inputs are scored and dropped before the next batch is attacked, and no copy of the
    whole split is made: evaluate kept every adversarial input of an attack and radius (and cloned the split once
    per attack), so peak memory grew with the split's size -- 200 CT slices at 512x512 are 800 MB per copy."""
    module = sys.modules["robust_ops.evaluate"]
    outputs, alive_at_call, original = [], [], module.run_attack

    def tracked(attack, xb, yb):
        alive_at_call.append(sum(ref() is not None for ref in outputs))
        adv = original(attack, xb, yb)
        outputs.append(weakref.ref(adv))
        return adv

    monkeypatch.setattr(module, "run_attack", tracked)
    data, model = tiny_data(48), tiny_model()
    largest = []

    class LargestNewTensor(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                largest.extend(t.numel() for t in pytree.tree_leaves(out)
                               if torch.is_tensor(t) and t.is_floating_point())
            return out

    with LargestNewTensor():
        evaluate(model, data, INFO, attacks="fgsm,pgd:steps=2", eps=[8 / 255, 16 / 255], batch_size=4)
    assert len(alive_at_call) > 4 and max(alive_at_call) <= 1  # only the previous batch's, until it is replaced
    assert max(largest) < data.tensors[0].numel()  # no float tensor the size of the split


def test_parse_attacks_refuses_targeted_specs_that_would_aim_at_the_true_labels():
    # Evaluation passes the true labels: pgd:targeted=true pushed towards them, so robust accuracy could only rise.
    for text in ("pgd:targeted=true", "apgd-ce:targeted=true", "square:targeted=true"):
        with pytest.raises(EvalError, match=r"attacks: targeted=true of '[a-z-]+' would take the true labels "
                                            r"evaluation passes as targets, pushing towards them; use apgd-t or fab-t"):
            parse_attacks(text)
    assert parse_attacks("pgd:targeted=false")[0].options["targeted"] is False


def test_a_model_built_for_another_class_count_is_refused_naming_both():
    """A 3-class model on a binary set (or a binary one on a 3-class set) failed in the metrics with "expected probs
    of shape [24, 2], got (24, 3)", an argument the caller never passed."""
    info3 = DatasetInfo("tiny3", 3, 1, 12, ("a", "b", "c"), synthetic=True, source="random")
    torch.manual_seed(0)
    for model, info, want in ((TinyCNN(1, 3, width=4), INFO, "scores 3 classes .* but tiny has 2"),
                              (TinyCNN(1, 1, width=4), info3, "scores 2 classes .* but tiny3 has 3")):
        with pytest.raises(EvalError, match=f"^m: the model {want}; build it for") as err:
            evaluate(model, tiny_data(8), info, attacks="fgsm", eps=[0.1], method="m")
        assert err.value.arg == "model" and "\n" not in str(err.value)


def test_write_results_removes_its_own_figures_that_a_later_write_does_not_draw(tmp_path):
    """A second write into the same folder left the first one's f1 / sensitivity / specificity curves (metrics now
    undefined in every row) and saliency maps beside results and a report.md that do not show them. Other files
    stay."""
    data, model = tiny_data(), tiny_model()
    rows = evaluate(model, data, INFO, attacks="fgsm", eps="4/255", method="a")
    x, y = data.tensors
    write_results(tmp_path, rows, INFO, saliency=({"a": model}, x[:2], y[:2]))
    (tmp_path / "notes.png").write_bytes(PNG_MAGIC)
    undefined = [dict(r, f1=math.nan, sensitivity=math.nan, specificity=math.nan) for r in rows]
    out = write_results(tmp_path, undefined, INFO)
    assert [p.name for p in out["figures"]] == ["accuracy_vs_eps.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_vs_eps.png", "notes.png", "report.md",
                                                           "results.json"]


def test_write_results_takes_numpy_values_in_config_and_extra_fields(tmp_path):
    """A config holding numpy scalars or arrays (a seed drawn with numpy, a radius list) failed in json.dump with
    "Object of type int64 is not JSON serializable", after the attacks had run."""
    row = dict(method="M", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0)
    config = {"seed": np.int64(3), "eps": np.array([1 / 255, 2 / 255], dtype=np.float32), "lr": np.float32(0.5),
              "bad": np.float64("nan")}
    out = write_results(tmp_path / "out", [row], INFO, config=config, figures=False, extra_fields={"k": np.int32(5)})
    doc = json.loads(out["results"].read_text())
    assert doc["config"] == {"seed": 3, "eps": [pytest.approx(1 / 255), pytest.approx(2 / 255)], "lr": 0.5,
                             "bad": None}
    assert doc["k"] == 5


def test_write_results_takes_a_torch_device_dtype_or_fraction_in_config_and_names_what_it_cannot(tmp_path):
    """A notebook's config={"device": torch.device("cpu"), ...} stopped write_results with json.dump's "TypeError:
    Object of type device is not JSON serializable" (torch.float32: "type dtype", Fraction(1, 255): "type Fraction"),
    naming neither config nor the entry. A device or dtype is recorded as its text, a fraction as its float, and what
    JSON has no type for is an EvalError naming the entry; nothing is written then."""
    row = dict(method="M", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0)
    config = {"device": torch.device("cpu"), "dtype": torch.float32, "eps": [Fraction(1, 255)],
              "out": PurePosixPath("runs/a")}
    out = write_results(tmp_path / "out", [row], INFO, config=config, figures=False)
    doc = json.loads(out["results"].read_text())
    assert doc["config"] == {"device": "cpu", "dtype": "torch.float32", "eps": [1 / 255], "out": "runs/a"}
    for arg, kwargs, where in [("config", {"config": {"opts": {"classes": {1, 2}}}}, "config['opts']['classes']"),
                               ("extra_fields", {"extra_fields": {"k": [object]}}, "extra_fields['k'][0]")]:
        with pytest.raises(EvalError, match=rf"^{re.escape(where)}: a (set|type) \(.*\), which results.json cannot "
                                            r"hold; give it as a string, number, bool, None, list or dict$") as err:
            write_results(tmp_path / arg, [row], INFO, figures=False, **kwargs)
        assert err.value.arg == arg and not (tmp_path / arg).exists()


def test_write_results_names_info_for_a_dataset_entry_results_json_cannot_hold(tmp_path):
    """_json_safe's refusal of the document's dataset entry names the argument it came from, info (mutation testing of
    bce14f7, mut54 helper: naming "dataset", no argument of write_results, survived)."""
    from robust_ops.data import DatasetInfo

    info = DatasetInfo("mine", num_classes=2, in_channels=1, image_size=4, class_names=("a", "b"), positive_class=1,
                       source={1, 2})
    row = dict(method="M", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0)
    refusal = r"^dataset\['source'\]: a set \(\{1, 2\}\), which results.json cannot hold"
    with pytest.raises(EvalError, match=refusal) as err:
        write_results(tmp_path / "out", [row], info, figures=False)
    assert err.value.arg == "info" and not (tmp_path / "out").exists()


def test_write_results_refuses_a_saliency_without_labels_before_writing(tmp_path):
    """_check_saliency (17ea1f2) read the models and images only: saliency=({"A": model}, x, None), Grad-CAM's
    labels left out, stopped after the metric figures with torch's "RuntimeError: Could not infer dtype of
    NoneType", naming neither saliency nor its labels (found by the revB helper)."""
    row = dict(method="A", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0)
    for y, got in ((None, "NoneType"), (1, "int")):
        with pytest.raises(EvalError, match=rf"^saliency: expected \(models, x, y\): .*, got labels of type {got}$"):
            write_results(tmp_path / "out", [row], INFO, saliency=({"A": tiny_model()}, torch.rand(2, 1, 8, 8), y))
        assert not (tmp_path / "out").exists()


def test_write_results_takes_a_decimal_in_config_as_its_float(tmp_path):
    """_json_safe took a Decimal for a numbers.Real, as its comment said, but a Decimal is none: config={"lr":
    Decimal("0.1")} was refused, "config['lr']: a Decimal (Decimal('0.1')), which results.json cannot hold" (found
    by the revB helper). It is recorded as its float, a NaN (quiet or signalling) as null, as a float NaN."""
    row = dict(method="M", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0)
    config = {"lr": Decimal("0.1"), "nan": Decimal("NaN"), "snan": [Decimal("sNaN")], "inf": Decimal("-Infinity")}
    out = write_results(tmp_path / "out", [row], INFO, config=config, figures=False)
    assert json.loads(out["results"].read_text())["config"] == {"lr": 0.1, "nan": None, "snan": [None], "inf": None}


@pytest.mark.parametrize("bad", [2.5, torch.zeros(1, dtype=torch.float64), "cpu "])
def test_a_bad_device_is_refused_before_the_model_is_moved(bad):
    # model.to(device) ran first: device=2.5 or a float64 tensor made the model float64 in place, then failed on labels
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EvalError, match="^device: expected device to be a torch.device or a string such as 'cpu'"):
        evaluate(model, tiny_data(), INFO, attacks=("fgsm",), eps=(0.01,), device=bad)
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_cuda_device_without_a_visible_gpu_is_refused_naming_the_fix(monkeypatch):
    # torch's "Found no NVIDIA driver on your system" came from model.to(device), naming neither evaluate nor device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EvalError, match=r"^device: device='cuda:0' requested, but no CUDA GPU is visible; pass "
                                        r"device='cpu'$"):
        evaluate(tiny_model(), tiny_data(), INFO, attacks=("fgsm",), eps=(0.01,), device="cuda:0")


@pytest.mark.parametrize("bad", [True, "yes", 1])
def test_a_progress_that_is_not_callable_is_refused_before_the_clean_pass(bad):
    # fit's progress is a bool: progress=True here failed after the clean pass with "'bool' object is not callable"
    with pytest.raises(EvalError, match=rf"^progress: expected a callable\(str\), or None or False for none, got "
                                        rf"{re.escape(repr(bad))}$"):
        evaluate(tiny_model(), tiny_data(), INFO, attacks=("fgsm",), eps=(0.01,), progress=bad)


@pytest.mark.parametrize("arg, bad", [("config", True), ("config", "seed=3"), ("config", 0), ("extra_fields", "x")])
def test_write_results_refuses_a_config_or_extra_fields_that_is_no_dict(tmp_path, arg, bad):
    # config=True met "'bool' object has no attribute 'get'" while writing the report, extra_fields="x" dict.update's
    # "dictionary update sequence element" error, and config=0 was written as {} without a word
    rows = evaluate(tiny_model(), tiny_data(), INFO, attacks=("fgsm",), eps=(0.01,))
    with pytest.raises(EvalError, match=rf"^{arg}: expected a dict or None, got {re.escape(repr(bad))}$"):
        write_results(tmp_path / "r", rows, INFO, figures=False, **{arg: bad})


def test_results_document_without_a_config_holds_an_empty_one():
    # config=None (write_results' default) is written as {}: readers of results.json look settings up in it
    doc = evaluate_module.results_document([], INFO)
    assert doc["config"] == {} and "paper" not in doc and "notes" not in doc


def test_parse_eps_refuses_bools_in_a_list():
    # isinstance(True, int): eps=[True] was the radius 1.0 and [False] the radius 0, without a word
    for bad in ([True], [0.1, False]):
        with pytest.raises(EvalError, match="^eps: could not parse '(True|False)' in "):
            parse_eps(bad)


@pytest.mark.parametrize("bad", [None, "", 2.5, ["a"]])
def test_evaluate_refuses_a_method_label_that_is_no_text(bad):
    # the rows' label: None and 2.5 went into results.json and the tables as such, ["a"] failed with "unhashable type"
    with pytest.raises(EvalError, match=rf"^method: expected a non-empty label such as 'model', got "
                                        rf"{re.escape(repr(bad))}$"):
        evaluate(tiny_model(), tiny_data(), INFO, attacks=("fgsm",), eps=(0.01,), method=bad)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_evaluate_refuses_a_model_that_is_no_module(device):
    """A plain function (AutoAttack takes any callable) failed with "'function' object has no attribute
    'parameters'" (or 'to' with a device), an AttributeError naming no argument; the attacks already refuse it."""
    with pytest.raises(EvalError, match=r"^model: expected a torch.nn.Module, got function; wrap a function in an "
                                        r"nn.Module whose forward calls it$") as err:
        evaluate(lambda x: tiny_model()(x), tiny_data(), INFO, attacks=("fgsm",), eps=(0.01,), device=device)
    assert err.value.arg == "model"


@pytest.mark.parametrize("bad", [None, {"num_classes": 2}])
def test_evaluate_refuses_an_info_that_is_no_dataset_info(bad):
    # None (or a dict of its fields) failed with "'NoneType' object has no attribute 'value_range'", naming no argument
    with pytest.raises(EvalError, match=rf"^info: expected the dataset's DatasetInfo \(load_dataset\(...\).info\), "
                                        rf"got {type(bad).__name__}$") as err:
        evaluate(tiny_model(), tiny_data(), bad, attacks=("fgsm",), eps=(0.01,))
    assert err.value.arg == "info"


@pytest.mark.parametrize("dtype, fix", [
    (torch.uint8, r"make them floating-point images in the value range \(x.float\(\) / 255 for 8-bit ones\)"),
    (torch.float64, r"convert the data \(x.to\(torch.float32\)\) or the model \(model.to\(torch.float64\)\)"),
    (torch.complex64, r"make them floating-point images in the value range \(x.float\(\) / 255 for 8-bit ones\)")])
def test_inputs_of_another_dtype_than_the_model_are_named_as_fit_names_them(dtype, fix):
    """uint8 or float64 inputs (in the value range) failed in the clean pass with torch's "Input type (unsigned char)
    and bias type (float) should be the same", from inside the model's first layer, naming neither data nor the fix.
    Complex ones failed before it, in the value-range check: torch's "aminmax_cpu" not implemented for
    'ComplexFloat'."""
    x, y = tiny_data().tensors
    data = TensorDataset((x > 0.5).to(dtype), y)
    with pytest.raises(EvalError, match=rf"^evaluate: the inputs of dataset are {dtype}, but the model's parameters "
                                        rf"are torch.float32; {fix}$") as err:
        evaluate(tiny_model(), data, INFO, attacks=("fgsm",), eps=(0.01,))
    assert err.value.arg == "data"

    class Raises(nn.Module):  # a TypeError of the model's own is not taken for the inputs' dtype
        def forward(self, x):
            raise TypeError("the model's own")

    with pytest.raises(TypeError, match=r"^the model's own$"):
        evaluate(Raises(), data, INFO, attacks=("fgsm",), eps=(0.01,))


def test_rows_carry_the_confusion_matrix_of_their_predictions():
    """A 7-class (DermaMNIST-like, RGB) set's rows held only macro averages: which classes an attack breaks was
    nowhere in results.json. Each row carries its confusion counts (row = true class), worst-case rows too."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(21, 3, 6, 6, generator=g), torch.arange(21) % 7
    info = DatasetInfo("dermlike", 7, 3, 6, tuple("abcdefg"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 7))
    rows = evaluate(model, TensorDataset(x, y), info, attacks="fgsm,pgd:steps=2", eps="8/255", method="m")
    assert [r["attack"] for r in rows] == ["none", "fgsm", "pgd(steps=2)", "worst-case"]
    for r in rows:
        cm = np.array(r["confusion"])
        assert cm.shape == (7, 7) and cm.sum(1).tolist() == [3] * 7
        assert cm.trace() / 21 == pytest.approx(r["accuracy"])
        assert np.nanmean(np.diag(cm) / cm.sum(1)) == pytest.approx(r["sensitivity"])
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert rows[0]["confusion"] == [[int(((y == i) & (pred == j)).sum()) for j in range(7)] for i in range(7)]


def test_images_in_hwc_layout_are_told_to_be_permuted_not_given_another_model():
    """A user's own images stacked from numpy or PIL as [N, H, W, C] reach a 1- or 3-channel model's first convolution
    with H channels: the error said "reach it with 28 channels; build the model for the data's channels", a model
    for 28 channels being the wrong fix. It names the layout and the permute (fit's and the attacks' error too)."""
    from robust_ops.models import build_model

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 0, 1])
    for c, info in ((1, INFO), (3, DatasetInfo("rgb", 2, 3, 12, ("a", "b"), positive_class=1))):
        hwc = TensorDataset(torch.rand(4, 12, 12, c, generator=g), y)
        with pytest.raises(EvalError, match=rf"^m: evaluate: the model's input layer 'features.0' \(Conv2d\) takes "
                                            rf"in_channels={c}, but the inputs of dataset \(\[12, 12, {c}\] each\) "
                                            r"reach it with 12 channels: images in \(H, W, C\) layout, as numpy "
                                            r"arrays and PIL give them\? permute them to \(C, H, W\): "
                                            r"x.permute\(0, 3, 1, 2\)$"):
            evaluate(build_model("small_cnn", c, 2, 12), hwc, info, attacks="fgsm", eps=[0.01], method="m")
    # grayscale images in (H, W, C) layout on a 3-channel model (and the other way round) were told only to build
    # the model for 12 channels: they are told both fixes, permute and the model for their channels (found by the
    # checks helper); an image whose last size is no channel count keeps the other fix alone
    for c, last in ((3, 1), (1, 3)):
        with pytest.raises(EvalError, match=rf"reach it with 12 channels: images in \(H, W, C\) layout, .* "
                                            rf"x.permute\(0, 3, 1, 2\); permuted, they have {last} channels? where {c} "
                                            r"are expected: build the model for the data's channels and image size "):
            evaluate(build_model("small_cnn", c, 2, 12), TensorDataset(torch.rand(4, 12, 12, last), y), INFO,
                     attacks="fgsm", eps=[0.01])
    with pytest.raises(EvalError, match=r"reach it with 12 channels; build the model for the data's channels"):
        evaluate(build_model("small_cnn", 3, 2, 12), TensorDataset(torch.rand(4, 12, 12, 12), y), INFO,
                 attacks="fgsm", eps=[0.01])


def test_images_in_hwc_layout_given_to_a_normalized_model_are_told_to_be_permuted():
    """getting-started's model trained on normalized inputs, evaluated as attacks.Normalized(model, mean, std), met
    [N, H, W, C] images at Normalized's own check of the channels, which named no fix ("Normalized: expected x with 3
    channels in dim 1 to match mean, got x of shape (4, 12, 12, 3)"), before the input layer's check that does."""
    from robust_ops.models import build_model

    hwc = torch.rand(4, 12, 12, 3, generator=torch.Generator().manual_seed(0))
    model = attacks.Normalized(build_model("small_cnn", 3, 2, 12), [0.5] * 3, [0.25] * 3)
    info = DatasetInfo("rgb", 2, 3, 12, ("a", "b"), positive_class=1)
    with pytest.raises(ValueError, match=r"^Normalized: expected x with 3 channels in dim 1 to match mean, got x of "
                                         r"shape \(4, 12, 12, 3\): images in \(H, W, C\) layout, as numpy arrays and "
                                         r"PIL give them\? permute them to \(C, H, W\): x.permute\(0, 3, 1, 2\)$"):
        evaluate(model, TensorDataset(hwc, torch.tensor([0, 1, 0, 1])), info, attacks="fgsm", eps=[0.01])
    # grayscale images in (H, W, C) layout: permuted they still have 1 channel of 3 (they were told nothing)
    with pytest.raises(ValueError, match=r"got x of shape \(4, 12, 12, 1\): images in \(H, W, C\) layout, .*; "
                                         r"permuted, they have 1 channel where 3 are expected: give mean one value "
                                         r"per channel of the data$"):
        model(hwc[..., :1])
    with pytest.raises(ValueError, match=r"got x of shape \(4, 12, 12, 12\)$"):  # 12 of 3: no layout to guess
        model(torch.rand(4, 12, 12, 12))


def test_a_model_built_for_other_channels_or_image_sizes_is_named_with_the_fix():
    """A DermaMNIST-like 3-channel model given 1-channel images (the info of another dataset, or the model of
    another run) failed in the clean pass with torch's "expected input[24, 1, 12, 12] to have 3 channels" from
    inside its first layer, and an MLP built for 8x8 images given 12x12 ones with "mat1 and mat2 shapes cannot be
    multiplied": neither named the data, the layer or the fix."""
    from robust_ops.models import build_model

    with pytest.raises(EvalError, match=r"^rgb: evaluate: the model's input layer 'features.0' \(Conv2d\) takes "
                                        r"in_channels=3, but the inputs of dataset \(\[1, 12, 12\] each\) reach it "
                                        r"with 1 channel; build the model for the data's channels and image size "
                                        r"\(robust_ops.models.build_model\(name, info.in_channels, info.num_classes, "
                                        r"info.image_size\)\)$") as err:
        evaluate(build_model("small_cnn", 3, 2, 12), tiny_data(), INFO, attacks=("fgsm",), eps=(0.01,), method="rgb")
    assert err.value.arg == "model"
    with pytest.raises(EvalError, match=r"input layer 'net.0' \(Linear\) takes in_features=64, but the inputs of "
                                        r"dataset \(\[1, 12, 12\] each\) reach it with 144 features; build the model"):
        evaluate(build_model("mlp", 1, 2, 8), tiny_data(), INFO, attacks=("fgsm",), eps=(0.01,))

    class FailsLater(nn.Module):  # its input layer takes the inputs: the model's own error is not renamed
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            self.conv(x)
            raise RuntimeError("the model's own")

    with pytest.raises(RuntimeError, match=r"^the model's own$"):
        evaluate(FailsLater(), tiny_data(), INFO, attacks=("fgsm",), eps=(0.01,))


def test_a_finished_write_removes_the_staging_folders_killed_writers_left(tmp_path):
    """docs/cli.md, Errors: results are staged in ``.<out>.partial-XXXXXXXX`` beside ``out`` and moved in when
    complete; a command killed before the move (SIGKILL) cannot remove its staging folder, and each kill left another
    one (probe: `robust-ops eval RUN_DIR` killed 0.2 s into writing its figures left RUN_DIR/.eval.partial-yjf3d5tc
    holding a results.json, still there after the next eval). The next finished write of the same ``out`` removes
    them; another output's, a live writer's (it holds the folder's lock) and one written since this write began
    stay, and so does everything when the write fails."""
    import fcntl

    from robust_ops.evaluate import AtomicOutput

    out = tmp_path / "eval"
    dead = [tmp_path / ".eval.partial-k1ll3d_a", tmp_path / ".eval.partial-0abcdefg"]
    kept = [tmp_path / ".other.partial-k1ll3d_a", tmp_path / ".eval.partial-toolong12", tmp_path / ".eval.partial-"]
    live, recent = tmp_path / ".eval.partial-l1vewrtr", tmp_path / ".eval.partial-st1llrun"
    for folder in dead + kept + [live, recent]:
        folder.mkdir()
        (folder / "results.json").write_text("{")
        os.utime(folder, (4e9, 4e9) if folder == recent else (1e9, 1e9))  # 2097: written after the write began
    with pytest.raises(RuntimeError, match="drawing failed"):
        with AtomicOutput(out) as stage:
            (stage / "results.json").write_text("{}")
            raise RuntimeError("drawing failed")
    assert all(folder.is_dir() for folder in dead) and not out.exists()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with AtomicOutput(out) as stage:
            (stage / "results.json").write_text("{}")
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in kept + [live, recent, out])
    assert os.listdir(out) == ["results.json"]


def test_atomic_output_stages_beside_out_under_a_lock_and_closes_what_it_opened(tmp_path, monkeypatch):
    """The staging folder is ``.<out>.partial-XXXXXXXX`` beside ``out`` (its parent made if missing; os.replace
    moves within one file system), named as a later write's cleanup looks for it and locked while in use, so that
    cleanup leaves a live one; a staged subfolder's files move in; no descriptor stays open. A move that fails
    leaves killed writers' staging folders as they are, as any failed write does."""
    import fcntl
    import re

    from robust_ops import evaluate
    from robust_ops.evaluate import AtomicOutput

    out = tmp_path / "new" / "eval"
    before = len(os.listdir("/proc/self/fd"))
    with AtomicOutput(out) as stage:
        assert stage.parent == out.parent and re.fullmatch(r"\.eval\.partial-[a-z0-9_]{8}", stage.name), stage
        fd = os.open(stage, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        (stage / "results.json").write_text("{}")
        staged = (stage / "results.json").stat().st_ino
        (stage / "sub").mkdir()
        (stage / "sub" / "a.txt").write_text("a")
    assert len(os.listdir("/proc/self/fd")) == before
    assert os.listdir(out.parent) == ["eval"] and (out / "sub" / "a.txt").read_text() == "a"
    assert (out / "results.json").stat().st_ino == staged  # moved, not copied: never half a file in ``out``
    dead = out.parent / ".eval.partial-k1ll3d_a"
    dead.mkdir()
    os.utime(dead, (1e9, 1e9))  # 2001: before the next write began

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate.os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        with AtomicOutput(out) as stage:
            (stage / "results.json").write_text("{}")
    assert sorted(os.listdir(out.parent)) == [dead.name, "eval"]


def _script_attacks(monkeypatch, table):
    """Make every attack scripted: ``name`` at radius eps sets pixel 1 of sample i (pixel 0 holds i / 10) to
    ``table[name][eps][i]``, or pixels 1, 2, ... to it where that is a tuple (no change at other radii, such as the
    dry run's 1), outside any ball check. Returns
    {(attack label, eps): each row's class-1 probabilities}, filled as the rows are made."""
    module = sys.modules["robust_ops.evaluate"]

    def scripted(spec, model, eps, clip_min=0.0, clip_max=1.0):
        def attack(x, y):
            out = x.clone()
            if eps in table[spec.name]:
                ids = (out.flatten(1)[:, 0] * 10).round().long()
                values = torch.tensor(table[spec.name][eps])[ids]
                out.view(out.shape[0], -1)[:, 1:1 + values[0].numel()] = values.view(len(ids), -1)
            return out
        return attack

    monkeypatch.setattr(module.AttackSpec, "build", scripted)
    monkeypatch.setattr(module, "check_inside_ball", lambda *args: None)  # the scripted points ignore the radius
    seen, original = {}, module._row

    def spy(method, attack, norm, eps, y, pred, logits, info):  # rows get logits (metrics: logits=)
        seen[(attack, eps)] = probabilities(logits)[:, 1]
        return original(method, attack, norm, eps, y, pred, logits, info)

    monkeypatch.setattr(module, "_row", spy)
    return seen


def test_worst_case_at_each_radius_uses_that_radius_inputs_and_the_lowest_fooling_input(monkeypatch):
    # Three scripted attacks over radii 0, 0.1, 0.2 (pixel 1 of sample i set to table[name][eps][i]; > 0.5 is class
    # 1). Each radius's worst case sees that radius's inputs and fooled flags, not those of a larger radius the
    # cascade reached later; a fooled sample takes its fooling input of the lowest true-class probability (sample 0
    # at 0.2: pgd's, not fgsm's that fooled it first), a robust one the lowest true-class probability of all three
    # attacks and the clean input (samples 1 and 4; sample 0 at 0.1, cw's, though only fgsm and pgd fool it at 0.2);
    # every attack's eps-0 row is the clean input.
    seen = _script_attacks(monkeypatch, {
        "fgsm": {0.1: [0.1, 0.45, 0.3, 0.6, 0.7], 0.2: [0.7, 0.45, 0.3, 0.6, 0.7]},
        "pgd": {0.1: [0.2, 0.4, 0.3, 0.6, 0.6], 0.2: [0.9, 0.4, 0.9, 0.6, 0.6]},
        "cw": {0.1: [0.3, 0.3, 0.3, 0.6, 0.65], 0.2: [0.15, 0.3, 0.3, 0.6, 0.65]}})
    x = torch.tensor([[0.0, 0.2], [0.1, 0.2], [0.2, 0.2], [0.3, 0.8], [0.4, 0.8]]).view(5, 1, 1, 2)
    data = TensorDataset(x, torch.tensor([0, 0, 0, 0, 1]))  # sample 3: wrong clean
    rows = evaluate(_PixelModel(), data, INFO, attacks="fgsm,pgd,cw", eps=[0, 0.1, 0.2], batch_size=3)
    assert [(r["attack"], r["eps"], r["accuracy"]) for r in rows] == [
        ("none", 0, 0.8), ("fgsm", 0, 0.8), ("fgsm", 0.1, 0.8), ("fgsm", 0.2, 0.6), ("pgd", 0, 0.8), ("pgd", 0.1, 0.8),
        ("pgd", 0.2, 0.4), ("cw", 0, 0.8), ("cw", 0.1, 0.8), ("cw", 0.2, 0.8), ("worst-case", 0, 0.8),
        ("worst-case", 0.1, 0.8), ("worst-case", 0.2, 0.4)]
    p1 = lambda v: torch.softmax(torch.tensor([0.5 - v, v - 0.5]) * 10, 0)[1]  # noqa: E731
    clean = [0.2, 0.2, 0.2, 0.8, 0.8]
    for key, inputs in ((("fgsm", 0), clean), (("pgd", 0), clean), (("cw", 0), clean),
                        (("worst-case", 0.1), [0.3, 0.45, 0.3, 0.8, 0.6]),
                        (("worst-case", 0.2), [0.9, 0.45, 0.9, 0.8, 0.6])):
        torch.testing.assert_close(seen[key].float(), torch.stack([p1(v) for v in inputs]), msg=f"{key}")


def test_worst_case_takes_the_lowest_scoring_input_inside_the_ball_whatever_the_attack_order(monkeypatch):
    # Two scripted attacks over radii 0.1 and 0.2 (pixel 1 of sample i set to table[name][eps][i]; > 0.5 is class 1,
    # the positive one). The worst case took a fooled sample's FIRST fooling attack and a robust sample's lowest
    # attack output: `fgsm,pgd` and `pgd,fgsm` gave two worst-case AUCs, one above fgsm's own row, and where both
    # attacks raised a robust sample's true-class score (samples 1, 3; sample 4 at 0.2) the worst case scored it
    # above the clean input and above the smaller radius. Now each sample takes the lowest true-class score of the
    # inputs inside the ball (a fooling one when an attack fooled it): every attack's at this radius, the clean input
    # and the smaller radius's worst case.
    seen = _script_attacks(monkeypatch, {
        "fgsm": {0.1: [0.7, 0.1, 0.75, 0.9, 0.48], 0.2: [0.7, 0.1, 0.75, 0.9, 0.35]},
        "pgd": {0.1: [0.9, 0.3, 0.8, 0.95, 0.3], 0.2: [0.9, 0.3, 0.8, 0.95, 0.2]}})
    clean = [0.2, 0.4, 0.8, 0.55, 0.45]
    x = torch.tensor([[i / 10, v] for i, v in enumerate(clean)]).view(5, 1, 1, 2)
    data = TensorDataset(x, torch.tensor([0, 0, 1, 1, 0]))
    by_order = {}
    for order in ("fgsm,pgd", "pgd,fgsm"):
        rows = evaluate(_PixelModel(), data, INFO, attacks=order, eps=[0.1, 0.2])
        by_order[order] = [r for r in rows if r["attack"] == "worst-case"]
        auc = {(r["attack"], r["eps"]): r["auc"] for r in rows}
        for e, smaller in ((0.1, ("none", 0.0)), (0.2, ("worst-case", 0.1))):
            assert auc[("worst-case", e)] <= min(auc[("fgsm", e)], auc[("pgd", e)], auc[smaller]), (order, e)
    assert by_order["fgsm,pgd"] == by_order["pgd,fgsm"]
    p1 = lambda v: torch.softmax(torch.tensor([0.5 - v, v - 0.5]) * 10, 0)[1]  # noqa: E731
    for e, inputs in ((0.1, [0.9, 0.4, 0.75, 0.55, 0.48]), (0.2, [0.9, 0.4, 0.75, 0.55, 0.48])):
        torch.testing.assert_close(seen[("worst-case", e)].float(), torch.stack([p1(v) for v in inputs]),
                                   msg=f"eps {e}")


def test_without_cascade_the_worst_case_keeps_a_smaller_radius_fooling_input_that_scores_lower(monkeypatch):
    # cascade=False: each attack's 0.2 row takes its later fooling input for sample 0 (pixel 1 at 0.7), which scores
    # its true class higher than the 0.9 that fooled it at 0.1, also inside the 0.2 ball. The worst case at 0.2 took
    # a fooled sample's 0.2 inputs only, so its AUC rose above the 0.1 worst case's (0 to 1); sample 1 stays robust.
    seen = _script_attacks(monkeypatch, {name: {0.1: [0.9, 0.8], 0.2: [0.7, 0.8]} for name in ("fgsm", "pgd")})
    x = torch.tensor([[0.0, 0.2], [0.1, 0.8]]).view(2, 1, 1, 2)
    rows = evaluate(_PixelModel(), TensorDataset(x, torch.tensor([0, 1])), INFO, attacks="fgsm,pgd", eps=[0.1, 0.2],
                    cascade=False)
    auc = {(r["attack"], r["eps"]): r["auc"] for r in rows}
    assert (auc[("fgsm", 0.1)], auc[("fgsm", 0.2)]) == (0.0, 1.0)  # the attack's own rows take the later input
    assert auc[("worst-case", 0.2)] == auc[("worst-case", 0.1)] == 0.0
    p1 = lambda v: torch.softmax(torch.tensor([0.5 - v, v - 0.5]) * 10, 0)[1]  # noqa: E731
    torch.testing.assert_close(seen[("worst-case", 0.2)].float(), torch.stack([p1(0.9), p1(0.8)]))


class _ThreeClassPixelModel(nn.Module):
    """Three logits from pixel 1 of a [N, 1, 1, 2] input: probabilities 0.4, 0.3, 0.3 up to 0.5 (class 0 predicted),
    0.45, 0.55, 0 above it (class 1 predicted, yet a higher class-0 log-odds)."""

    def forward(self, x):
        above = (x.flatten(1)[:, 1:2] > 0.5).float()
        return torch.log(above * torch.tensor([0.45, 0.55, 1e-9]) + (1 - above) * torch.tensor([0.4, 0.3, 0.3]))


def test_a_fooled_sample_ends_on_a_fooling_input_though_a_correct_one_scores_its_class_lower(monkeypatch):
    # multi-class: pgd's input fools sample 0 (class 1 predicted) with a class-0 log-odds of log(0.45 / 0.55), above
    # the correct clean input's log(0.4 / 0.6), and fgsm, listed first, does not fool it; the worst case must count
    # the sample as fooled, as pgd's row does, so it takes the fooling input, not the lowest-scoring one
    _script_attacks(monkeypatch, {"fgsm": {0.1: [0.2]}, "pgd": {0.1: [0.9]}})
    data = TensorDataset(torch.tensor([[0.0, 0.2]]).view(1, 1, 1, 2), torch.tensor([0]))
    rows = evaluate(_ThreeClassPixelModel(), data, DatasetInfo("tiny3", 3, 1, 12, ("a", "b", "c")), attacks="fgsm,pgd",
                    eps=[0.1])
    assert [(r["attack"], r["accuracy"]) for r in rows] == [("none", 1.0), ("fgsm", 1.0), ("pgd", 0.0),
                                                           ("worst-case", 0.0)]
    assert rows[-1]["confusion"] == [[0, 1, 0], [0, 0, 0], [0, 0, 0]]


class _LogitPixelsModel(nn.Module):
    """Two logits: pixels 1 and 2 of a [N, 1, 1, 3] input, times 10 (pixel 0 holds a sample id)."""

    def forward(self, x):
        return x.flatten(1)[:, 1:3] * 10


def test_worst_case_ranks_inputs_by_their_true_class_log_odds_not_its_logit(monkeypatch):
    # sample 0 (class 0) stays robust: fgsm's logits (9, 7) leave it a log-odds of 2, pgd's (3, 0) one of 3, so the
    # worst case is fgsm's input, though pgd's has the lower class-0 logit
    seen = _script_attacks(monkeypatch, {"fgsm": {0.1: [(0.9, 0.7)]}, "pgd": {0.1: [(0.3, 0.0)]}})
    data = TensorDataset(torch.tensor([[0.0, 0.8, 0.2]]).view(1, 1, 1, 3), torch.tensor([0]))
    evaluate(_LogitPixelsModel(), data, INFO, attacks="fgsm,pgd", eps=[0.1])
    torch.testing.assert_close(seen[("worst-case", 0.1)], seen[("fgsm", 0.1)])
    assert seen[("pgd", 0.1)] < seen[("fgsm", 0.1)]  # its class-1 probability: its class 0 is the likelier

@pytest.mark.parametrize("ensemble", [False, True])
def test_attacks_run_and_are_checked_in_the_datasets_value_range(ensemble):
    # two-moons inputs live in [-4, 4]: every attack clips to the dataset's value_range, not to images' [0, 1] (which
    # would move every negative input to 0, fooling samples the radius cannot reach)
    info = DatasetInfo("moons-like", 2, 2, 0, ("a", "b"), positive_class=1, synthetic=True, value_range=(-4.0, 4.0))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 2, generator=g) * 4 - 3
    y = (x[:, 0] > -1).long()
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        model.bias.copy_(torch.tensor([-1.0, 1.0]))
    rows = evaluate(model, TensorDataset(x, y), info, attacks="fgsm", eps=[0.5], ensemble=ensemble)
    with torch.no_grad():
        adv = attacks.build("fgsm", model, eps=0.5, clip_min=-4.0, clip_max=4.0)(x, y)
        want = float((model(adv).argmax(1) == y).float().mean())
    assert 0 < want < rows[0]["accuracy"] == 1.0
    assert rows[-1]["attack"] == ("worst-case" if ensemble else "fgsm") and rows[-1]["accuracy"] == want


def test_rows_take_the_datasets_positive_class():
    # BreastMNIST's positive (malignant) class is 0: sensitivity is class 0's recall, specificity class 1's
    info = DatasetInfo("tiny", 2, 1, 12, ("malignant", "benign"), positive_class=0, synthetic=True, source="random")
    data, model = tiny_data(), tiny_model()
    rows = evaluate(model, data, info, attacks="fgsm", eps=[4 / 255])
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        out = model(x)
    want, other = (classification_metrics(y, out.argmax(1), probabilities(out), num_classes=2, positive_class=c)
                   for c in (0, 1))
    assert want["sensitivity"] != other["sensitivity"]
    assert {k: rows[0][k] for k in want} == pytest.approx(want, nan_ok=True)


def test_write_results_keeps_rows_that_differ_only_in_their_norm(tmp_path):
    # the worst-case rows of an L-inf and an L2 plan share method, attack and eps: two rows, not one given twice
    row = dict(method="M", attack="worst-case", norm="linf", eps=0.5, n=4, accuracy=1.0, f1=1.0, sensitivity=1.0,
               specificity=1.0, precision=1.0, auc=1.0, map=1.0)
    out = write_results(tmp_path / "out", [row, dict(row, norm="l2", accuracy=0.5)], INFO, figures=False)
    doc = json.loads(out["results"].read_text())
    assert [(r["norm"], r["accuracy"]) for r in doc["rows"]] == [("linf", 1.0), ("l2", 0.5)]


def test_results_json_is_strict_json_and_names_every_metric(tmp_path):
    # Infinity, like NaN, is no JSON value (strict readers refuse the file); the report's columns follow "metrics"
    row = dict(method="M", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0, f1=1.0, sensitivity=1.0,
               specificity=1.0, precision=1.0, auc=1.0, map=0.25)
    out = write_results(tmp_path / "out", [row], INFO, config={"max_norm": math.inf}, figures=False)

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    doc = json.loads(out["results"].read_text(), parse_constant=refuse)
    assert doc["config"] == {"max_norm": None}
    assert doc["metrics"] == ["accuracy", "f1", "sensitivity", "specificity", "precision", "auc", "map"]
    assert "| mAP |" in out["report"].read_text()


def test_a_model_ending_in_a_softmax_is_a_warning_as_in_autoattack():
    """A model whose [N, K] outputs are probabilities (a final nn.Softmax): fit refuses it and AutoAttack warns, but
    evaluate ran its attacks on it without a word, and they are weaker there (the losses apply their own softmax,
    which saturates: on a confident model the CW margin of probabilities loses its gradient; measured, the synthetic
    set at eps 8/255, worst case 0.875 against the logits' 0.82). evaluate now warns once, at the clean pass's first
    batch, with AutoAttack's advice; the rows are still computed."""
    import warnings

    model = nn.Sequential(tiny_model(), nn.Softmax(1))
    with pytest.warns(UserWarning, match=r"^evaluate: the model's outputs are non-negative and sum to 1 per sample, "
                                         r"so they look like probabilities; the attacks' losses expect logits \(a "
                                         r"softmax output saturates them and overestimates robustness\): remove the "
                                         r"model's final softmax$") as caught:
        rows = evaluate(model, tiny_data(), INFO, attacks=("fgsm", "pgd"), eps=(0.01,), batch_size=8)
    assert [r["attack"] for r in rows] == ["none", "fgsm", "pgd", "worst-case"]
    (warned,) = [w for w in caught if "look like probabilities" in str(w.message)]  # not once per batch or attack
    assert warned.filename == __file__  # points at the evaluate call
    with warnings.catch_warnings():  # logits, and single logits (never read as probabilities), pass without it
        warnings.filterwarnings("error", message=".*look like probabilities")
        evaluate(tiny_model(), tiny_data(), INFO, attacks=("fgsm",), eps=(0.01,))
        single = nn.Sequential(nn.Flatten(), nn.Linear(144, 1), nn.Sigmoid())  # [N, 1] in (0, 1): a single logit
        evaluate(single, tiny_data(), INFO, attacks=("fgsm",), eps=(0.01,))


def test_evaluate_in_a_loop_warns_once_per_call_site_as_python_does():
    """scikit-learn's metrics each run in a warnings.catch_warnings() block, and leaving one makes Python forget
    every warning it showed: evaluate in a loop of 31 calls printed its default-step warning 31 times under the
    default filter, and so did an attack's warning of a final softmax at a line of the loop. Once per call site now,
    as Python shows a warning; "always" still shows every one and "error" raises at every call."""
    import warnings

    import sklearn.metrics  # noqa: F401 -- imported first: scipy adds filters of its own categories when imported

    softmax = nn.Sequential(tiny_model(), nn.Softmax(1))
    data = tiny_data(8)
    x, y = data.tensors

    def loop(action, calls=3):
        raised = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter(action)
            filters = list(warnings.filters)
            for _ in range(calls):
                try:
                    evaluate(tiny_model(), data, INFO, attacks="pgd:steps=2", eps=(8 / 255,))
                except UserWarning:
                    raised += 1
                try:
                    attacks.fgsm(softmax, x, y, eps=0.01)
                except UserWarning:
                    raised += 1
            assert warnings.filters == filters  # the caller's filters as they were
        said = [("step" if "default step" in str(w.message) else "softmax" if "probabilities" in str(w.message)
                 else str(w.message), w.filename == __file__) for w in caught]
        return sorted(said), raised

    once = [("softmax", True), ("step", False)]
    assert loop("default") == (once, 0)
    assert loop("always") == (sorted(once * 3), 0)
    assert loop("error") == ([], 6)


def test_no_attack_names_and_an_ensembles_nan_outputs_are_refused_by_name():
    """Refusals that coverage found unreached (coverage helper, s48): attacks text without a name, true for an option
    of no known type, and a model whose outputs turn NaN at the points of an ensemble's attack (the method leads, as
    on the per-attack path)."""
    for text in ("", " , ", []):
        with pytest.raises(EvalError, match=r"^attacks: expected at least one attack name such as fgsm,pgd,cw$") as e:
            parse_attacks(text)
        assert e.value.arg == "attacks"
    # an option of no known type (None default) takes true/false as a bool, which the attack then judges
    with pytest.raises(EvalError, match=r"^attacks: autoattack: expected eot_iter to be an integer >= 1, got True$"):
        parse_attacks("autoattack:eot_iter=true")
    x, y = tiny_data(8).tensors
    with pytest.raises(EvalError, match=r"^m: ensemble: the model's output is NaN or Inf for \d of its \d inputs at "
                                        r"the points of attack 'fgsm' ") as err:
        evaluate(_NaNAtAZeroPixel(), TensorDataset(x * 0.9 + 0.05, y), INFO, attacks="fgsm", eps=[0.1], method="m",
                 ensemble=True)
    assert err.value.arg == "model"


class _LibraryWarning(UserWarning):
    pass


def _library_warnings_shown(add_filters, message="the library says so", category=UserWarning, lines=None):
    """How many of 3 calls of robust_ops._warn.warn at one line show their warning, a catch_warnings block (as
    scikit-learn's metrics enter) after each, under the filters ``add_filters`` sets on an empty list; ``lines``
    (a list) gets the line of each shown."""
    import warnings

    from robust_ops import _warn

    default = warnings.defaultaction
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        try:
            add_filters()
            for _ in range(3):
                _warn.warn(message, category)
                with warnings.catch_warnings():
                    pass
        finally:
            warnings.defaultaction = default
    assert all(w.filename == __file__ for w in caught)
    if lines is not None:
        lines.extend(w.lineno for w in caught)
    return len(caught)


def test_library_warnings_are_remembered_only_where_pythons_own_filter_matching_gives_the_default_action():
    """robust_ops._warn.warn remembers a warning it showed (once per line across catch_warnings blocks) only where
    warnings.filters give it the default action as Python matches them: the message regex from its start, the
    module's name, the line, else warnings.defaultaction, and a Warning instance's own class; a filter that applies
    with "always" shows every call (mutation testing of _warn: search for match, the module's file for its name,
    the line or the module ignored, "default" for defaultaction, a Warning instance's class ignored: each
    survived)."""
    import warnings

    module = re.escape(__name__) + "$"
    cases = [(lambda: None, 1),
             (lambda: warnings.filterwarnings("always", message="the library"), 3),
             (lambda: warnings.filterwarnings("always", message="says"), 1),  # Python's re.match: from the start
             (lambda: warnings.filterwarnings("always", module=module), 3),
             (lambda: warnings.filterwarnings("always", module="elsewhere"), 1),
             (lambda: warnings.filterwarnings("always", lineno=1), 1),
             (lambda: setattr(warnings, "defaultaction", "always"), 3)]
    for i, (add_filters, expected) in enumerate(cases):
        assert _library_warnings_shown(add_filters) == expected, i
    assert _library_warnings_shown(lambda: warnings.filterwarnings("always", category=_LibraryWarning),
                                   message=_LibraryWarning("the library says so")) == 3
    # a filter for the very line of the call applies (mutation testing of _warn: a filter's lineno read as "any line"
    # only when 0, never as the line it names, survived)
    lines = []
    assert _library_warnings_shown(lambda: None, lines=lines) == 1
    assert _library_warnings_shown(lambda: warnings.filterwarnings("always", lineno=lines[0])) == 3


def test_library_warnings_are_remembered_per_line_per_module_and_per_filter_list_as_python_does():
    """Under "default" a library warning is shown once per line of its caller (two lines: twice), under "module"
    once per file; a catch_warnings block of the caller's own has a filter list of its own, so there, and after it,
    Python shows it again, and so does robust_ops._warn.warn (mutation testing of _warn: one memory per file under
    "default", per line under "module", the module action left to Python's registry, the filter lists compared by
    value or never, the line taken a frame too far out: each survived)."""
    import contextlib
    import warnings

    from robust_ops import _warn

    def say():
        _warn.warn("the library says so", stacklevel=2)

    def forget():  # as scikit-learn's metrics do
        with warnings.catch_warnings():
            pass

    def shown(action):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter(action)
            for _ in range(3):
                say()
                forget()
                say()
                forget()
        assert all(w.filename == __file__ for w in caught)
        return len({w.lineno for w in caught}), len(caught)

    assert shown("default") == (2, 2)
    assert shown("module") == (1, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for own_block in (False, True, False):
            with warnings.catch_warnings() if own_block else contextlib.nullcontext():
                say()
    assert len(caught) == 3


def test_a_library_warning_is_shown_again_when_the_filter_deciding_it_changes_in_place_and_only_then():
    """Python forgets the warnings it showed whenever the filters change, in place too; robust_ops._warn.warn kept
    its memory while warnings.filters was the same list, so a warning stayed silent at its line after a
    simplefilter('default', UserWarning) that decides it anew (1 of 3 shown where Python shows 3). Forgetting at
    every change, as Python does, showed a loop's first library warning twice in a fresh process: the first
    evaluate imports scikit-learn, whose scipy adds two filters that do not match it (reviewer, s48). So a warning
    is shown again when the filter that decides it changes, not when an unrelated one is added, nor when the same
    filter is set again (mutation testing of _warn: the memory keeping the filter it was first shown under, so every
    call after a change showed it, and the deciding filter compared by identity, each survived)."""
    import warnings

    from robust_ops import _warn

    def shown(warn, changes, forget=lambda: None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for change in changes:
                change()
                for _ in range(2):  # the second call at the same line: shown once per change
                    warn("the library says so", UserWarning)
                    forget()
        return len(caught)

    def scikit_learns():  # Python forgets at its end, robust_ops._warn.warn does not
        with warnings.catch_warnings():
            pass

    deciding_anew = (lambda: None, lambda: warnings.simplefilter("default", UserWarning),
                     lambda: warnings.filterwarnings("default", message="the library"), warnings.resetwarnings)
    assert shown(_warn.warn, deciding_anew, scikit_learns) == shown(warnings.warn, deciding_anew) == 4
    unrelated = (lambda: None, lambda: warnings.filterwarnings("ignore", category=DeprecationWarning),
                 lambda: warnings.filterwarnings("ignore", "the matrix subclass is not", Warning),  # scipy's, at import
                 lambda: warnings.filterwarnings("always", module="somewhere_else"),
                 lambda: warnings.simplefilter("default"))  # the deciding filter set again: an equal one, the same
    assert shown(_warn.warn, unrelated, scikit_learns) == 1
    assert shown(warnings.warn, unrelated) == 5  # Python's rule: what a process's first evaluate loop met


def test_library_warnings_are_remembered_per_message_and_category_as_python_does():
    """Python remembers a warning by its text and category too (at its line under "default", in its file under "module",
    anywhere under "once"): other texts or another category at the same line are shown, and so does
    robust_ops._warn.warn across catch_warnings blocks (mutation testing of _warn: the text left out of the
    "default" key, or the category out of any key, each survived)."""
    import warnings

    from robust_ops import _warn

    said = [("the library says so", UserWarning), ("the library says more", UserWarning),
            ("the library says so", FutureWarning)]

    def shown(action, warn, forget):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter(action)
            for _ in range(2):
                for text, category in said:
                    warn(text, category)
                    forget()
        return sorted((str(w.message), w.category.__name__) for w in caught)

    def scikit_learns():
        with warnings.catch_warnings():
            pass

    expected = sorted((text, category.__name__) for text, category in said)
    for action in ("default", "module", "once"):
        assert shown(action, _warn.warn, scikit_learns) == shown(action, warnings.warn, lambda: None) == expected


def test_warn_outside_attributes_its_warning_past_the_given_files_in_its_category():
    # (mutation testing of _warn: the category dropped for UserWarning survived, as every caller passed UserWarning)
    from robust_ops import _warn

    with pytest.warns(FutureWarning, match="^the library says so$") as caught:
        _warn.warn_outside("the library says so", (), FutureWarning)
    assert [w.filename for w in caught] == [__file__]


def test_write_results_refuses_two_keys_that_read_the_same_in_results_json(tmp_path):
    """JSON keys are strings: config={1: "a", "1": "b"} was recorded as {"1": "b"}, one entry lost without a word
    (found by the api2 helper). Two keys of one dict that read the same are refused naming both, before any file is
    written; keys that differ as text are kept, as before."""
    row = dict(method="M", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0)
    cases = [("config", {"config": {1: "a", "1": "b"}}, "config", "1", "'1'", "'1'"),
             ("extra_fields", {"extra_fields": {"k": {"x": {None: 1, "None": 2}}}}, "extra_fields['k']['x']", "None",
              "'None'", "'None'")]
    for arg, kwargs, where, first, second, text in cases:
        with pytest.raises(EvalError, match=rf"^{re.escape(where)}: the keys {re.escape(first)} and "
                                            rf"{re.escape(second)} both read {re.escape(text)} in results.json; "
                                            r"rename one of them$") as err:
            write_results(tmp_path / arg, [row], INFO, figures=False, **kwargs)
        assert err.value.arg == arg and not (tmp_path / arg).exists()
    out = write_results(tmp_path / "ok", [row], INFO, config={1: "a", "2": "b"}, figures=False)
    assert json.loads(out["results"].read_text())["config"] == {"1": "a", "2": "b"}


def test_write_results_refuses_a_saliency_model_that_no_row_is_of(tmp_path):
    """saliency=({"STD": model, "ATX": model}, x, y) beside rows of method STD alone drew saliency_atx.png, a map
    titled by a name that no row has (a misspelt method's map beside no results), without a word (found by the api2
    helper). A model keyed by a name that no row's method is now is refused naming it and the rows' methods,
    before any file is written."""
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    rows = [dict(method=m, attack="none", norm=None, eps=0.0, n=4, accuracy=1.0) for m in ("STD", "AT")]
    for models, bad in (({"STD": tiny_model(), "ATX": tiny_model()}, "ATX"), ({"std": tiny_model()}, "std")):
        with pytest.raises(EvalError, match=rf"^saliency: no row's method is '{bad}'; key each model by its rows' "
                                            r"method \('STD', 'AT'\)$") as err:
            write_results(tmp_path / "out", rows, INFO, saliency=(models, x, y))
        assert err.value.arg == "saliency" and not (tmp_path / "out").exists()
    paths = write_results(tmp_path / "out", rows, INFO, saliency=({"AT": tiny_model()}, x, y))
    assert [p.name for p in paths["figures"] if p.name.startswith("saliency_")] == ["saliency_at.png"]


def test_saliency_images_without_their_channel_dimension_are_refused_not_skipped(tmp_path):
    """MedMNIST's grayscale arrays are [N, H, W]: write_results(saliency=({"A": model}, x[:4, 0], y[:4])) drew every
    figure but the saliency map and said nothing, as plot_saliency returned False for them as for feature vectors
    (found by the api2 helper). A 3-D x is now refused naming its shape and the fix, before any file is written;
    feature vectors [N, D] still get no figure, as documented."""
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    model = tiny_model()
    row = dict(method="A", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0)
    want = (r"expected x to be images \[N, C, H, W\] \(or feature vectors \[N, D\]: no figure\), got shape "
            r"\[4, 8, 8\]; a batch of one-channel images \[N, H, W\] needs x.unsqueeze\(1\), one image \[C, H, W\] "
            r"x.unsqueeze\(0\)$")
    for images in (x[:, 0], x[:, 0].numpy()):
        with pytest.raises(EvalError, match="^saliency: " + want) as err:
            write_results(tmp_path / "out", [row], INFO, saliency=({"A": model}, images, y))
        assert err.value.arg == "saliency" and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="^plot_saliency: " + want):
        report.plot_saliency(model, x[:, 0], y, tmp_path / "s.png")
    assert report.plot_saliency(model, torch.rand(4, 3), y, tmp_path / "s.png") is False
    assert not (tmp_path / "s.png").exists()


def test_write_results_checks_its_info_flags_and_texts_as_evaluate_does(tmp_path):
    """write_results took what evaluate refuses (found by the api2 helper): info=results.json's dataset dict stopped
    with "AttributeError: 'dict' object has no attribute 'class_names'" (evaluate: "info: expected the dataset's
    DatasetInfo"), figures="no" drew every figure (evaluate refuses ensemble="false"), and extra_markdown=3 stopped
    with "TypeError: sequence item 14: expected str instance, int found". Each is now an EvalError naming the
    argument, before any file is written."""
    row = dict(method="A", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0)
    cases = [({"info": INFO.to_dict()}, "info",
              r"info: expected the dataset's DatasetInfo \(load_dataset\(...\).info\), got dict"),
             ({"figures": "no"}, "figures", r"write_results: expected figures to be True or False, got 'no'"),
             ({"extra_markdown": 3}, "extra_markdown",
              r"write_results: expected extra_markdown to be a string or None, got 3; give the Markdown as text, "
              r"such as extra_markdown='3', or None for none"),
             ({"title": ["T"]}, "title", r"write_results: expected title to be a string or None, got \['T'\]; give "
                                         r"report.md's heading as text, such as title='...', or None for 'Robustness "
                                         r"evaluation'")]
    for kwargs, arg, want in cases:
        kwargs = {"info": INFO, **kwargs}
        with pytest.raises(EvalError, match=f"^{want}$") as err:
            write_results(tmp_path / arg, [row], kwargs.pop("info"), **kwargs)
        assert err.value.arg == arg and not (tmp_path / arg).exists()
    out = write_results(tmp_path / "ok", [row], INFO, figures=False, title="T", extra_markdown="x")
    assert out["figures"] == [] and out["report"].read_text().startswith("# T\n")


def test_write_results_refusal_of_a_title_that_is_no_text_says_how_to_give_it(tmp_path):
    """write_results(title=3) wrote the heading "# 3" until 70b2765 refused it as the docs say (title: text or None),
    with "write_results: expected title to be a string or None, got 3" and no word of the fix (found by the api3
    helper). The refusal now says how to give it, as the number's text; Markdown lines (a list) get "join them"."""
    row = dict(method="A", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0)
    cases = [({"title": 3}, "title", "got 3; give report.md's heading as text, such as title='3', or None for "
                                     "'Robustness evaluation'"),
             ({"title": 2.5}, "title", "got 2.5; give report.md's heading as text, such as title='2.5', or None"),
             ({"extra_markdown": ["a", "b"]}, "extra_markdown",
              "got ['a', 'b']; join its lines into one text: extra_markdown='\\n'.join(lines)")]
    for kwargs, arg, want in cases:
        with pytest.raises(EvalError, match=re.escape(want)) as err:
            write_results(tmp_path / arg, [row], INFO, figures=False, **kwargs)
        assert err.value.arg == arg and str(err.value).startswith(f"write_results: expected {arg} to be a string")
        assert not (tmp_path / arg).exists()
    text = write_results(tmp_path / "ok", [row], INFO, figures=False, title=str(3))["report"].read_text()
    assert text.startswith("# 3\n")


def test_write_results_refuses_an_out_dir_it_cannot_write_before_any_figure(tmp_path, monkeypatch):
    """write_results(a file's path, ...) drew every figure and then stopped with "FileExistsError: [Errno 17] File
    exists", and out_dir="/proc/nope" with "FileNotFoundError: ... '/proc/.nope.partial-8phovyj7'", its staging
    folder's name (found by the api2 helper). Both are now refused naming out_dir, before any figure is drawn."""
    row = dict(method="A", attack="none", norm=None, eps=0.0, n=4, accuracy=1.0)
    (tmp_path / "afile").write_text("x")
    drawn = []
    monkeypatch.setattr(report, "plot_metric_vs_radius", lambda *args, **kwargs: drawn.append(args) or True)
    for out, problem in ((tmp_path / "afile", "it exists and is not a folder"),
                         (tmp_path / "afile" / "sub", f"{tmp_path / 'afile'} is a file, not a folder")):
        with pytest.raises(EvalError, match=f"^write_results: out_dir={re.escape(repr(str(out)))}: "
                                            f"{re.escape(problem)}$") as err:
            write_results(str(out), [row], INFO)
        assert err.value.arg == "out_dir"
    if os.path.isdir("/proc/self"):  # Linux: a folder no one can make entries in
        with pytest.raises(EvalError, match=r"^write_results: out_dir='/proc/nope': cannot write in /proc \("):
            write_results("/proc/nope", [row], INFO)
    assert drawn == [] and (tmp_path / "afile").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
