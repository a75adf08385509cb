"""Tests that kill mutants of the attacks' code landed in session 54 (run_pgd's x_init, the float32 Linf rule, 0-d
tensor options, sums at any thread count) which the other tests let live (mut55 helper, session 55)."""

import pytest
import torch
from torch import nn

from robust_ops.attacks.core import run_pgd


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double().eval()


def _data(n=3, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(1)
    x = low + (high - low) * torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.tensor([0, 1, 2][:n])


def test_x_init_with_one_inf_or_nan_is_refused():
    """x_init must be finite throughout: one Inf (or NaN) among finite values is refused as an x_init of NaNs is."""
    x, y = _data()
    for bad in (float("inf"), float("-inf"), float("nan")):
        x_init = x.clone()
        x_init[1, 0, 2, 3] = bad
        with pytest.raises(ValueError, match=r"^run_pgd: expected x_init to be finite, got NaN or Inf$"):
            run_pgd(_model(), x, y, eps=0.1, alpha=0.05, steps=1, x_init=x_init)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_x_init_is_projected_onto_the_ball_and_the_callers_clip_range(norm):
    """The start (the first forward's input) is x_init projected onto each ball around x and clipped to
    [clip_min, clip_max]: here [-1, 1], so a start below 0 stays below 0."""
    seen = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _model()

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.body(x)

    x, y = _data(low=-1.0, high=0.0)
    x_init = (x - 0.01).clamp(-1, 1)
    run_pgd(Recording(), x, y, eps=0.5, alpha=0.1, steps=1, norm=norm, x_init=x_init, clip_min=-1.0, clip_max=1.0)
    torch.testing.assert_close(seen[0], x_init, rtol=0, atol=1e-12)


def test_sum_at_any_thread_count_is_the_sum_over_every_dim_named():
    """Its single-output path (every dim named, one row summed) is t.sum's value, over all the dims given (Square-L2
    sums a window over (0, 1) and (-2, -1)), in the shape keepdim gives."""
    from robust_ops.attacks.core import sum_at_any_thread_count

    g = torch.Generator().manual_seed(0)
    t = torch.rand(3, 5, generator=g, dtype=torch.float64)
    for dims, keepdim in (((0, 1), True), ((0, 1), False), ((-2, -1), True), ((1, 0), False), (1, False), (-1, True)):
        whole = t[:1] if isinstance(dims, int) else t
        got = sum_at_any_thread_count(whole, dims, keepdim=keepdim)
        want = whole.sum(dims, keepdim=keepdim)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    column = torch.rand(3, 1, generator=g, dtype=torch.float64)  # one row of 3 values over both dims
    for keepdim in (True, False):
        got = sum_at_any_thread_count(column, (0, 1), keepdim=keepdim)
        assert got.shape == column.sum((0, 1), keepdim=keepdim).shape
        torch.testing.assert_close(got, column.sum((0, 1), keepdim=keepdim), rtol=1e-12, atol=0)
    four = torch.rand(1, 2, 3, 4, generator=g, dtype=torch.float64)
    got = sum_at_any_thread_count(four, (-2, -1), keepdim=True)  # several outputs: t.sum itself
    torch.testing.assert_close(got, four.sum((-2, -1), keepdim=True), rtol=0, atol=0)


def test_a_complex_tensor_radius_is_refused_as_not_real_where_0d_tensors_are_read():
    """A 0-d tensor eps is read as its value (scalar_value), a tensor [N] per sample: either refused when complex,
    in the words a bool one is refused in, naming the class or function and the argument."""
    from robust_ops import attacks, defenses

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    complex_eps = torch.tensor(0.1 + 0j)
    cases = ((lambda: defenses.build("at", eps=complex_eps), "at", "eps"),
             (lambda: defenses.build("ima", eps_train=complex_eps), "ima", "eps_train"),
             (lambda: attacks.PGD(model, eps=complex_eps), "pgd", "eps"),
             (lambda: run_pgd(model, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), eps=complex_eps.expand(2),
                              alpha=0.01, steps=1), "run_pgd", "eps"))
    for make, name, arg in cases:
        with pytest.raises(TypeError, match=rf"^{name}: expected {arg} to be a real tensor, got torch.complex64$"):
            make()
