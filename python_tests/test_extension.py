"""The build and load checks: the compiled library, CUDA-version mismatch and missing-build messages."""

import importlib

import pytest
import torch

import robust_ops
from robust_ops import _extension


def test_every_schema_is_registered():
    for name in ("drop_max_pool2d", "_drop_max_pool2d_backward", "pgd_step_", "boundary_search_step_"):
        assert hasattr(torch.ops.robust_ops, name), name


def test_mutating_ops_declare_their_mutated_arguments():
    schema = torch.ops.robust_ops.pgd_step_.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["x_adv", "history"] and len(schema.returns) == 0
    schema = torch.ops.robust_ops.boundary_search_step_.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["lo", "hi", "points"] and len(schema.returns) == 0


def test_cuda_version_matches_torch_or_cpu_only():
    built = _extension.cuda_version()
    if built == -1:
        assert not _extension.has_cuda_kernels()
    else:
        assert torch.version.cuda is not None
        assert f"{built // 1000}.{(built % 1000) // 10}" == ".".join(torch.version.cuda.split(".")[:2])


def test_cuda_version_mismatch_message(monkeypatch):
    monkeypatch.setattr(_extension, "cuda_version", lambda: 11080)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(RuntimeError, match="compiled with CUDA 11.8 but torch uses CUDA 13.0"):
        _extension._check_cuda_version()


def test_missing_build_message(monkeypatch):
    def fail(name):
        raise ImportError("No module named 'robust_ops._C'")

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(ImportError, match=r"couldn't load the compiled ops \(robust_ops._C\).*pip install"):
        _extension.load_library()


def test_lazy_submodules():
    assert robust_ops.models.build_model("small_cnn", 1, 2, 28) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        robust_ops.nope
