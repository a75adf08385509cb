"""Test configuration: device markers, Triton interpreter gating, data location, RNG isolation."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

try:  # the randomized tests draw the same examples every run (a CI failure reproduces); explore with
    # HYPOTHESIS_PROFILE=explore, which draws new ones each run
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, database=None)
    _hypothesis_settings.register_profile("explore")
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def breastmnist_path():
    """BreastMNIST from $ROBUST_OPS_DATA (a file or a folder holding breastmnist.npz) or ../shared/data."""
    env = os.environ.get("ROBUST_OPS_DATA")
    candidates = []
    if env:
        p = Path(env)
        candidates += [p, p / "breastmnist.npz"]
    candidates.append(SHARED_DATA / "breastmnist.npz")
    for c in candidates:
        if c.is_file():
            return c
    return None


@pytest.fixture
def breastmnist():
    path = breastmnist_path()
    if path is None:
        pytest.skip("BreastMNIST not found: put breastmnist.npz in ../shared/data or set $ROBUST_OPS_DATA")
    return path


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        import triton  # noqa: F401

        has_triton = True
    except Exception:
        has_triton = False
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    skip_triton = pytest.mark.skip(
        reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 set before import to run on CPU"
        if has_triton
        else "triton is not installed"
    )
    for item in items:
        if "needs_cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)
        if "triton" in item.keywords and not (has_triton and (has_cuda or interpreted)):
            item.add_marker(skip_triton)


@pytest.fixture(autouse=True)
def _isolate_rng():
    """Each test starts from the same seeds and leaves the global RNG state as it found it."""
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    torch.random.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)


def cpu_and_cuda():
    return ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))
