"""Tests that kill mutants of fit's lazy-layer initialization and weights_module's DataParallel unwrap landed in
session 55, which the other tests let live (mut55b helper, session 55)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from robust_ops.train import fit, load_checkpoint, load_weights, save_checkpoint, weights_module


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 4, 4, generator=g)
    return TensorDataset(x, (x.flatten(1).mean(1) > 0.5).long())


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))


class _Holder(nn.Module):
    """A wrapper holding its module as torch.compile's does (``_orig_mod``), without compiling anything."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner

    def forward(self, x):
        return self._orig_mod(x)


def test_weights_module_unwraps_nested_wrappers_to_the_model():
    inner = _cnn()
    for wrapped in (nn.DataParallel(_Holder(inner)), _Holder(nn.DataParallel(inner)),
                    nn.DataParallel(_Holder(nn.DataParallel(inner)))):
        assert weights_module(wrapped) is inner


def test_an_old_data_parallel_checkpoint_loads_into_a_compiled_data_parallel(tmp_path):
    """A checkpoint written before 2026-12-07 for an nn.DataParallel ("module." before every name) loads into the
    model compiled around a DataParallel, as into the DataParallel itself."""
    torch.manual_seed(0)
    trained = _cnn()
    fit(trained, "standard", _data(), epochs=1, batch_size=8, lr=1e-2, out_dir=tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    old = {**state, "model": {f"module.{k}": v for k, v in state["model"].items()}}
    save_checkpoint(tmp_path / "old.pt", old)
    for wrap in (lambda m: nn.DataParallel(m), lambda m: _Holder(nn.DataParallel(m)),
                 lambda m: torch.compile(nn.DataParallel(m), backend="eager")):
        torch.manual_seed(1)
        plain = _cnn()
        load_weights(wrap(plain), tmp_path / "old.pt")
        for k, v in trained.state_dict().items():
            assert torch.equal(plain.state_dict()[k], v), k


def test_fit_initializes_a_lazy_layer_with_lazy_buffers_only(tmp_path):
    """nn.LazyBatchNorm1d(affine=False) has no lazy parameter, only lazy statistics: created before training too,
    the checkpoint holding them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.LazyBatchNorm1d(affine=False), nn.Linear(8, 2))
    fit(model, "standard", _data(), epochs=1, batch_size=8, lr=1e-2, out_dir=tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["model"]["2.running_mean"].shape == (8,)
    assert int(model[2].num_batches_tracked) == 2
