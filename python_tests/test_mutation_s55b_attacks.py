"""Tests that kill mutants of the attacks' other-library option names (core.FOREIGN_NAMES, names_foreign_options)
and the numpy / list hints (context._array_like) landed in session 55, which the other tests let live (mut55b
helper, session 55)."""

import re

import pytest
import torch
from torch import nn

from robust_ops import attacks
from robust_ops.attacks.core import run_pgd


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 1, 4, 4, generator=g), torch.tensor([0, 2])


def test_a_functions_refusal_lists_its_options_without_its_internal_name():
    """run_pgd's ``name`` (the caller's name for its errors) is no option to list: its options end with x_init."""
    x, y = _data()
    with pytest.raises(TypeError, match=r"^run_pgd: unknown option 'step_size'; it takes eps, alpha, steps, .*, "
                                        r"x_init \(step_size: the step is called alpha here"):
        run_pgd(_model(), x, y, eps=0.1, steps=1, step_size=0.01)


def test_labels_given_by_keyword_are_no_unknown_option():
    """pgd(model, x, y=y, step_size=...) names step_size alone: y, a parameter, is no option to refuse."""
    x, y = _data()
    for fn in (attacks.pgd, run_pgd):
        with pytest.raises(TypeError, match=rf"^{fn.__name__}: unknown option 'step_size'; it takes eps, "):
            fn(_model(), x, y=y, eps=0.1, steps=1, step_size=0.01)


def test_tuples_of_inputs_or_labels_are_told_the_conversion():
    """A tuple is converted by torch.as_tensor as a list is: its refusal names the conversion too."""
    x, y = _data()
    with pytest.raises(TypeError, match=r"^pgd: expected x to be a floating-point tensor, got <class 'tuple'>; "
                                        r"convert it with torch.as_tensor\(x, dtype=torch.float32\)$"):
        attacks.pgd(_model(), tuple(x.tolist()), y, eps=0.1)
    with pytest.raises(TypeError, match=re.escape("pgd: expected y to be an integer tensor of class labels, got "
                                                  "<class 'tuple'>; convert them with torch.as_tensor(y)")):
        attacks.pgd(_model(), x, tuple(y.tolist()), eps=0.1)


def test_foolboxs_epsilons_names_eps():
    x, y = _data()
    with pytest.raises(TypeError, match=r"^pgd: unknown option 'epsilons'; it takes eps, .*\(epsilons: the radius is "
                                        r"called eps here, epsilons in foolbox's\)$"):
        attacks.pgd(_model(), x, y, epsilons=0.1)
