"""Test configuration: device markers, Triton interpreter gating, data location, RNG isolation, a user's own
defense and attack package."""

import os
import random
import sys
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


@pytest.fixture
def as_official(monkeypatch):
    """``as_official(path)``: a tiny .npz named as a MedMNIST+ file (breastmnist_64.npz ...) passes its MD5 check,
    its checksum made the table's for the test, so tests of what such a name means need not hold the real file."""
    from robust_ops.data import medmnist

    def mark(path):
        monkeypatch.setitem(medmnist.PLUS_MD5, Path(path).name.lower(), medmnist.file_md5(path))
        return path

    return mark


def pytest_collection_modifyitems(config, items):
    from robust_ops import _backend

    has_cuda = torch.cuda.is_available()
    interpreted = _backend.triton_interpreted()  # as triton reads it: TRITON_INTERPRET=true interprets too
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
        if "breastmnist" in getattr(item, "fixturenames", ()):  # pyproject's needs_data marker, so -m selects them
            item.add_marker(pytest.mark.needs_data)
        if "needs_cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)
        if "triton" in item.keywords and not (has_triton and (has_cuda or interpreted)):
            item.add_marker(skip_triton)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny tensors: threads only add overhead, and the test machine is shared);
    modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# Your own defense and attack by dotted import path (docs/defenses/index.md, docs/attacks.md): a package outside the
# library, as a user's own code would be.
USER_PACKAGE = "my_robust_extras"

_USER_MODULE_SOURCE = '''
import torch
import torch.nn.functional as F

from robust_ops import attacks
from robust_ops.defenses import DefenseOutput, PGDDefense


class NoisyAT(PGDDefense):
    """docs/defenses/index.md's example: AT from a Gaussian-noise start."""

    name = "noisy-at"

    def __init__(self, sigma=0.02, **attack):
        super().__init__(**attack)
        self.sigma = float(sigma)

    def __call__(self, model, x, y, ids=None):
        x_noisy = (x + self.sigma * torch.randn_like(x)).clamp(self.clip_min, self.clip_max)
        x_adv = self.attack(model, x_noisy, y).x_adv
        loss = F.cross_entropy(model(x_adv), y)
        return DefenseOutput(loss=loss, metrics={"loss": float(loss.detach())})


class EvenBIM(attacks.Attack):
    """BIM in steps of eps / steps: the points of the registered ifgsm:alpha=eps/steps."""

    name = "even-bim"

    def __init__(self, model, eps=8 / 255, steps=10, norm="linf", **options):
        super().__init__(model, **options)
        self.eps, self.steps, self.norm = eps, steps, norm

    def forward(self, x, y):
        return attacks.ifgsm(self.model, x, y, eps=self.eps, alpha=self.eps / self.steps, steps=self.steps,
                             norm=self.norm, clip_min=self.clip_min, clip_max=self.clip_max,
                             model_mode=self.model_mode)


class EvenBIML2(EvenBIM):
    default_norm = "l2"

    def __init__(self, model, eps=0.5, steps=10, norm="l2", **options):
        super().__init__(model, eps=eps, steps=steps, norm=norm, **options)


def not_a_class():
    pass


an_integer = 3


class FixedAT(PGDDefense):
    """A PGD defense whose constructor fixes its attack settings: it takes no clip_min / clip_max."""

    def __init__(self, sigma=0.0):
        super().__init__(eps=0.05, steps=1)
        self.sigma = sigma

    def __call__(self, model, x, y, ids=None):
        loss = F.cross_entropy(model(self.attack(model, x, y).x_adv), y)
        return DefenseOutput(loss=loss)


class NoLoss(PGDDefense):
    """A defense whose author forgot __call__."""


class NoForward(attacks.Attack):
    """An attack whose author forgot forward."""


class EpsOnly(attacks.Attack):
    """An attack whose constructor takes eps but not the clip range evaluation passes (no **options)."""

    def __init__(self, model, eps=8 / 255):
        super().__init__(model)
        self.eps = eps

    def forward(self, x, y):
        return x
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The dotted name of a user's module (USER_PACKAGE.defs: NoisyAT, EvenBIM, EvenBIML2, not_a_class, an_integer,
    FixedAT, NoLoss and NoForward without their required method, EpsOnly) written into ``tmp_path`` and put on
    sys.path; it leaves sys.modules afterwards, so each test imports its own copy."""
    package = tmp_path / USER_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "defs.py").write_text(_USER_MODULE_SOURCE)
    monkeypatch.syspath_prepend(tmp_path)
    yield f"{USER_PACKAGE}.defs"
    for name in (f"{USER_PACKAGE}.defs", USER_PACKAGE):
        sys.modules.pop(name, None)


def import_path_errors(owner, what, base_name, user_module, own, other, unfinished, required):
    """{bad dotted path: the exact one-line error ``owner`` gives} for each way a path to ``what`` (defense, attack)
    can fail: a missing module, a missing attribute (``own`` in the wrong case), a function, an int (the article
    follows the type's name), a class of the other kind (``other``), a malformed path, a subclass (``unfinished``)
    lacking the ``required`` method."""
    missing = f"no_such_pkg.mod.{own}"
    return {
        missing: f"{owner}: cannot import module 'no_such_pkg.mod' for {what} '{missing}' (No module named "
                 "'no_such_pkg'); is it on PYTHONPATH?",
        f"{user_module}.{own.lower()}": f"{owner}: module '{user_module}' has no attribute '{own.lower()}' (for {what} "
                                        f"'{user_module}.{own.lower()}')",
        f"{user_module}.not_a_class": f"{owner}: {what} '{user_module}.not_a_class' is a function, not a subclass of "
                                      f"{base_name}",
        f"{user_module}.an_integer": f"{owner}: {what} '{user_module}.an_integer' is an int, not a subclass of "
                                     f"{base_name}",
        f"{user_module}.{other}": f"{owner}: {what} '{user_module}.{other}' is a class but not a subclass of "
                                  f"{base_name}",
        f"{user_module}..{own}": f"{owner}: {what} '{user_module}..{own}' is not a dotted import path "
                                 "package.module.Class",
        f"{user_module}.{unfinished}": f"{owner}: {what} '{user_module}.{unfinished}' does not implement {required}; "
                                       "define it in the class",
    }
