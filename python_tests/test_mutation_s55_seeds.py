"""Tests that kill mutants of the seed rule (_options.check_seed) and its callers which the other tests let live
(mut55 helper, session 55)."""

import pytest
import torch

from robust_ops._options import MAX_SEED, check_seed
from robust_ops.train import GlobalBatchSampler, fit


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.rand(n, 1, 4, 4, generator=g), torch.tensor([0, 1] * (n // 2)))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))


def test_a_seed_of_none_is_refused_where_the_rule_is_not_optional():
    """check_seed's None passes only where the caller takes the global RNG (optional=True, the attacks); fit,
    GlobalBatchSampler and simclr take a seed, so None is refused in their names, without "or None"."""
    assert check_seed("attack", None, optional=True) is None
    message = (r"^{}: expected seed to be an integer from 0 to 4294967295 \(2\*\*32 - 1: numpy's seeds; torch's CPU "
               r"generator reads a seed's low 32 bits, so other seeds repeat one of these\), got None$")
    with pytest.raises(ValueError, match=message.format("fit")):
        check_seed("fit", None)
    with pytest.raises(ValueError, match=message.format("GlobalBatchSampler")):
        GlobalBatchSampler(10, 4, seed=None)
    with pytest.raises(ValueError, match=message.format("fit")):
        fit(_model(), "standard", _data(), epochs=1, batch_size=4, lr=0.1, seed=None, progress=False)


def test_a_run_trained_with_the_largest_seed_resumes(tmp_path):
    """The resume check refuses seeds recorded outside 0 to MAX_SEED (written when fit took any integer); the largest
    seed fit takes is inside, so its own checkpoint resumes and trains its next epoch."""
    kwargs = dict(batch_size=4, lr=0.1, progress=False, seed=MAX_SEED)
    fit(_model(), "standard", _data(), epochs=1, out_dir=tmp_path, **kwargs)
    result = fit(_model(), "standard", _data(), epochs=2, out_dir=tmp_path, resume=tmp_path / "checkpoint.pt",
                 **kwargs)
    assert len(result.history) == 2 and result.weights_epoch == 2


@pytest.mark.parametrize("old_seed", [-1, MAX_SEED + 1])
def test_a_checkpoint_of_a_seed_below_or_above_the_range_is_refused_as_out_of_range(tmp_path, old_seed):
    """A checkpoint written when fit took any integer: a negative seed is as far outside the range as 2**64, and is
    refused by the same rule, not met as another seed this call could pass (fit refuses -1)."""
    kwargs = dict(batch_size=4, lr=0.1, progress=False)
    fit(_model(), "standard", _data(), epochs=1, out_dir=tmp_path, **kwargs)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    state["config"]["seed"] = state["sampler"]["seed"] = old_seed
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=rf"^fit: cannot resume .*old.pt: it was trained with seed={old_seed}, "
                                         r"outside the seeds fit takes \(0 to 4294967295"):
        fit(_model(), "standard", _data(), epochs=2, resume=tmp_path / "old.pt", seed=0, **kwargs)


def test_an_attack_specs_seed_takes_both_ends_of_the_range_and_nothing_past_them():
    """--attacks pgd:seed=N is read by the seed rule's range: 0 and 2**32 - 1 are seeds, 2**32 and -1 are not."""
    from robust_ops.evaluate import EvalError, parse_attacks

    for seed in (0, MAX_SEED):
        assert parse_attacks(f"pgd:seed={seed}")[0].options == {"seed": seed}
    for seed in (-1, MAX_SEED + 1):
        with pytest.raises(EvalError, match=rf"option seed='{seed}' of 'pgd': expected an integer in \[0, 2\*\*32\)"):
            parse_attacks(f"pgd:seed={seed}")


def test_a_seed_set_on_an_attack_after_it_was_built_is_checked_when_it_runs():
    """The attacks check seed when built and again when they make their generator (a seed attribute set afterwards,
    as torchattacks' users set attributes): seed=2**32 would draw seed 0's numbers."""
    from robust_ops import attacks
    from robust_ops.attacks.pgd import make_generator

    x = torch.rand(2, 1, 4, 4)
    assert make_generator(None, x) is None
    assert make_generator(MAX_SEED, x).initial_seed() == MAX_SEED
    with pytest.raises(ValueError, match=r"^pgd: expected seed to be an integer from 0 to 4294967295 .* or None, got "
                                         r"4294967296$"):
        make_generator(MAX_SEED + 1, x, "pgd")
    attack = attacks.PGD(_model(), eps=0.1, alpha=0.05, steps=1, seed=0)
    attack.seed = MAX_SEED + 1
    with pytest.raises(ValueError, match=r"^pgd: expected seed to be an integer from 0 .* got 4294967296$"):
        attack(x, torch.tensor([0, 1]))
