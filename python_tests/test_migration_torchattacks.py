"""A torchattacks 3.5.1 evaluation script ported to robust_ops as docs/attacks.md ("Porting torchattacks / AutoAttack
code") says: the parity it promises for the ported calls that no other test pins -- targeted modes
(set_mode_targeted_*) and the model's mode (set_model_training_mode, a model left in train mode), measured against
torchattacks itself on a small Conv-BatchNorm-MaxPool CNN."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from robust_ops import attacks

try:
    import torchattacks
except ImportError:  # the parity tests skip; the AutoAttack settings tests below need no torchattacks
    torchattacks = None
needs_torchattacks = pytest.mark.skipif(torchattacks is None, reason="runs torchattacks 3.5.1 beside ours")

LINF = dict(eps=8 / 255, alpha=2 / 255, steps=5)
L2 = dict(eps=0.5, alpha=0.1, steps=5)


def make_model(num_classes, seed=0, dropout=0.0):
    """A BreastMNIST-sized CNN with batch norm, an in-place ReLU and max pooling, in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * 14 * 14, num_classes)).eval()


def make_data(n, num_classes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def pair(name, model, **kw):
    return getattr(attacks, name)(model, **kw), getattr(torchattacks, name)(model, **kw)


@needs_torchattacks
@pytest.mark.parametrize("name,kw", [("FGSM", dict(eps=8 / 255)),
                                     ("PGD", dict(LINF, random_start=False)),
                                     ("PGDL2", dict(L2, random_start=False))])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_targeted_by_label_gives_torchattacks_points(name, kw, num_classes):
    """docs/attacks.md: targeted=True takes y as targets and negates the loss, as torchattacks; with the CE loss and
    no random start the points are torchattacks' bit for bit, targeted too."""
    model = make_model(num_classes)
    x, y = make_data(8, num_classes)
    targets = (y + 1) % num_classes
    ours, theirs = pair(name, model, **kw)
    ours.set_mode_targeted_by_label(quiet=True)
    theirs.set_mode_targeted_by_label(quiet=True)
    got = ours(x, targets)
    assert torch.equal(got, theirs(x, targets)) and not torch.equal(got, x)
    ours.set_mode_default()
    theirs.set_mode_default()  # prints its mode: torchattacks' set_mode_default takes no quiet
    assert torch.equal(ours(x, y), theirs(x, y))


@needs_torchattacks
@pytest.mark.parametrize("name,kw", [("PGD", LINF), ("PGDL2", L2)])
def test_targeted_seeded_random_start_gives_torchattacks_points(name, kw):
    """The random start draws what torchattacks draws (docs/attacks.md, "The PGD core"), in a targeted mode too."""
    model = make_model(5)
    x, y = make_data(8, 5)
    ours, theirs = pair(name, model, **kw)
    ours.set_mode_targeted_by_label()
    theirs.set_mode_targeted_by_label(quiet=True)
    torch.manual_seed(3)
    expected = theirs(x, (y + 2) % 5)
    torch.manual_seed(3)
    assert torch.equal(ours(x, (y + 2) % 5), expected)


@needs_torchattacks
@pytest.mark.parametrize("kth_min", [1, 2])
def test_targeted_least_likely_and_by_function_give_torchattacks_points(kth_min):
    """set_mode_targeted_least_likely(kth_min) picks torchattacks' targets (docs/attacks.md), so the attack lands
    on torchattacks' points; set_mode_targeted_by_function(fn) uses fn's targets as torchattacks does."""
    model = make_model(5)
    x, y = make_data(8, 5)
    ours, theirs = pair("PGD", model, **LINF, random_start=False)
    ours.set_mode_targeted_least_likely(kth_min=kth_min)
    theirs.set_mode_targeted_least_likely(kth_min=kth_min, quiet=True)
    assert torch.equal(ours(x, y), theirs(x, y))

    def shift(images, labels):
        return (labels + 3) % 5

    ours.set_mode_targeted_by_function(shift)
    theirs.set_mode_targeted_by_function(shift, quiet=True)
    assert torch.equal(ours(x, y), theirs(x, y))


@needs_torchattacks
def test_targeted_random_on_a_binary_model_gives_torchattacks_points():
    """set_mode_targeted_random() draws uniformly among the other classes (torchattacks' distribution, other draws):
    with two classes the other class is the only target, so the points are torchattacks'."""
    model = make_model(2)
    x, y = make_data(8, 2)
    ours, theirs = pair("PGD", model, **LINF, random_start=False)
    ours.set_mode_targeted_random()
    theirs.set_mode_targeted_random(quiet=True)
    assert torch.equal(ours(x, y), theirs(x, y))


def batch_norm_state(model):
    return [t.clone() for t in model.buffers()]


@needs_torchattacks
@pytest.mark.parametrize("name,kw", [("FGSM", dict(eps=8 / 255)), ("PGD", LINF), ("PGDL2", L2)])
def test_a_model_left_in_train_mode_is_attacked_in_eval_mode_as_torchattacks_does(name, kw):
    """torchattacks' default set_model_training_mode() attacks in eval mode and puts the model back in train mode;
    model_mode="eval" (the default here) does the same: the same points, batch-norm statistics untouched, the model
    in train mode afterwards."""
    ours_model, theirs_model = make_model(3, dropout=0.5).train(), make_model(3, dropout=0.5).train()
    before = batch_norm_state(ours_model)
    x, y = make_data(8, 3)
    ours = getattr(attacks, name)(ours_model, **kw)
    theirs = getattr(torchattacks, name)(theirs_model, **kw)
    torch.manual_seed(5)
    expected = theirs(x, y)
    torch.manual_seed(5)
    assert torch.equal(ours(x, y), expected)
    assert ours_model.training and theirs_model.training
    assert all(torch.equal(a, b) for a, b in zip(batch_norm_state(ours_model), before))
    assert all(torch.equal(a, b) for a, b in zip(batch_norm_state(theirs_model), before))


@needs_torchattacks
@pytest.mark.parametrize("name,kw", [("FGSM", dict(eps=8 / 255)), ("PGD", LINF), ("PGDL2", L2)])
def test_set_model_training_mode_with_every_flag_gives_torchattacks_points_and_statistics(name, kw):
    """docs/attacks.md: set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=True)
    is model_mode="train": batch statistics, dropout from the global RNG and every forward's running-statistics
    update, as torchattacks. The model's own eval mode comes back (torchattacks leaves it in train mode)."""
    flags = dict(model_training=True, batchnorm_training=True, dropout_training=True)
    ours_model, theirs_model = make_model(3, dropout=0.5), make_model(3, dropout=0.5)
    x, y = make_data(8, 3)
    ours = getattr(attacks, name)(ours_model, **kw).set_model_training_mode(**flags)
    theirs = getattr(torchattacks, name)(theirs_model, **kw)
    theirs.set_model_training_mode(**flags)
    assert ours.model_mode == "train"
    torch.manual_seed(6)
    expected = theirs(x, y)
    torch.manual_seed(6)
    got = ours(x, y)
    assert torch.equal(got, expected) and not torch.equal(got, x)
    assert all(torch.equal(a, b) for a, b in zip(batch_norm_state(ours_model), batch_norm_state(theirs_model)))
    assert not torch.equal(ours_model[1].running_mean, make_model(3)[1].running_mean)  # the statistics moved
    assert not ours_model.training


@needs_torchattacks
def test_a_normalized_model_wrapped_gives_torchattacks_set_normalization_used_points():
    """docs/attacks.md: set_normalization_used(mean, std) is refused; attacks.Normalized(model, mean, std) on pixel
    inputs is the port. torchattacks' attack of the normalized inputs, normalized back, lands on the same points up
    to the rounding of its (un)normalization."""
    mean, std = [0.3], [0.2]
    pixel_model = make_model(3)

    class OnNormalizedInputs(nn.Module):  # a model trained on normalized inputs
        def forward(self, z):
            return pixel_model(z * std[0] + mean[0])

    model = OnNormalizedInputs().eval()
    x, y = make_data(8, 3)
    theirs = torchattacks.PGD(model, **LINF, random_start=False)
    theirs.set_normalization_used(mean=mean, std=std)
    expected = theirs((x - mean[0]) / std[0], y) * std[0] + mean[0]
    got = attacks.PGD(attacks.Normalized(model, mean, std), **LINF, random_start=False)(x, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.equal(got, x)


@needs_torchattacks
def test_a_ported_evaluation_loop_scores_the_samples_torchattacks_scores():
    """The ported script's robust accuracy loop (attack, predict, compare per sample) over batches agrees with
    torchattacks' sample for sample for FGSM, PGD (seeded start) and FAB, whose points the docs promise."""
    model = make_model(4)
    x, y = make_data(24, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample starts correct
    robust = {}
    for lib in (attacks, torchattacks):
        torch.manual_seed(9)
        runs = (lib.FGSM(model, eps=8 / 255), lib.PGD(model, **LINF),
                lib.FAB(model, eps=8 / 255, steps=5, n_classes=4))
        flags = []
        for atk in runs:
            for i in range(0, 24, 8):
                x_adv = atk(x[i:i + 8], y[i:i + 8])  # outside no_grad: torchattacks' attacks need autograd on
                with torch.no_grad():
                    flags.append(model(x_adv).argmax(1) == y[i:i + 8])
        robust[lib] = torch.cat(flags)
    assert torch.equal(robust[attacks], robust[torchattacks])
    assert not bool(robust[attacks].all())


DOCS = Path(__file__).resolve().parents[1] / "docs" / "attacks.md"


def docs_text():
    return re.sub(r"\s+", " ", DOCS.read_text())


def test_a_custom_lists_names_take_builds_settings_as_the_porting_notes_say():
    """AutoAttack's version='custom' runs its own objects: apgd-ce, apgd-dlr and fab with 5 restarts, square with the
    unrescaled schedule. A custom list's names here take build's settings (1 restart, rescaled square), which the
    porting notes now say (they called the list AutoAttack's version and said nothing of it), with the objects that
    give AutoAttack's."""
    model = make_model(10)
    names = ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    built = attacks.AutoAttack(model, eps=8 / 255, version="custom", attacks_to_run=names).attacks
    assert [a.n_restarts for a in built if not isinstance(a, attacks.Square)] == [1] * 5
    assert [(a.n_target_classes, a.steps) for a in built[4:]] == [(9, 100), (9, 100)]
    assert built[3].rescale_schedule and built[3].n_queries == 5000
    assert ("The names of a custom list take `build`'s settings, not those of AutoAttack's own objects: there "
            "`apgd-ce`, `apgd-dlr` and `fab` run 5 restarts and `square` the unrescaled schedule "
            "(`resc_schedule=False`), here 1 restart and `rescale_schedule=True`") in docs_text()
    eps = 8 / 255
    given = attacks.AutoAttack(model, eps=eps, attacks=[attacks.APGD(model, eps=eps, n_restarts=5),
                                                        attacks.Square(model, eps=eps, rescale_schedule=False)])
    assert given.attacks[0].n_restarts == 5 and not given.attacks[1].rescale_schedule


def test_autoattack_seed_none_is_the_global_rng_as_for_the_attack_classes():
    """torchattacks' AutoAttack example writes seed=None and AutoAttack's default is None, both the clock there; the
    attack classes here take seed=None as the global RNG, and AutoAttack(seed=None) was silently its default seed 0
    (the same draws whatever the global RNG held; this test pinned that until 2026-12-07). It is the global RNG now,
    for a version's attacks and a custom list's alike; AutoAttack's default stays seed 0, and a custom list left
    without a seed keeps each named attack's own default (APGD's and Square's 0, PGD's None)."""
    model = make_model(3)
    x, y = make_data(6, 3)

    def run(global_seed, **options):
        torch.manual_seed(global_seed)
        aa = attacks.AutoAttack(model, eps=8 / 255, attacks=["apgd-ce", "square", "pgd"], steps=3, n_queries=5,
                                **options)
        return [a.seed for a in aa.attacks], torch.cat(list(aa.run_standard_evaluation_individual(x, y).values()))

    (seeds, first), (_, second), (_, again) = run(1, seed=None), run(2, seed=None), run(1, seed=None)
    assert seeds == [None, None, None] and not torch.equal(first, second)
    assert torch.equal(first, again)  # the global RNG's draws: torch.manual_seed(1) repeats them
    assert run(1)[0] == [0, 0, None] and run(1, seed=0)[0] == [0, 0, 0]
    assert [a.seed for a in attacks.AutoAttack(model, seed=None).attacks] == [None] * 4
    assert [a.seed for a in attacks.AutoAttack(model).attacks] == [0] * 4
    assert ("`AutoAttack(..., seed=None)`, as torchattacks' `AutoAttack` example and AutoAttack's default write it, "
            "draws from the global RNG, as the attack classes' `seed=None` does") in docs_text()


def test_autoattack_seed_left_out_stays_left_out_after_pickle_and_copy():
    """AutoAttack's default seed (0, left out) is told apart from a seed=0 given by identity: a pickled or copied
    default (kwargs sent to a spawned process, a deepcopied config) was a new int 0, read as seed=0 given, so a custom
    list's PGD drew with seed 0 instead of its own default None."""
    import copy
    import pickle

    from robust_ops.attacks.ensemble import SEED_LEFT_OUT

    model = make_model(3)
    for copied in (copy.copy(SEED_LEFT_OUT), copy.deepcopy(SEED_LEFT_OUT), pickle.loads(pickle.dumps(SEED_LEFT_OUT)),
                   copy.deepcopy({"seed": SEED_LEFT_OUT})["seed"]):
        assert copied is SEED_LEFT_OUT and copied == 0 and repr(copied) == "0"
        aa = attacks.AutoAttack(model, eps=8 / 255, attacks=["apgd-ce", "pgd"], steps=3, seed=copied)
        assert [a.seed for a in aa.attacks] == [0, None]
