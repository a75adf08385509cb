"""Backend resolution (robust_ops._backend): auto / native / triton / reference, $ROBUST_OPS_BACKEND, and the errors
of an explicitly requested backend that cannot run."""

import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import robust_ops
from robust_ops import _backend, _extension
from utils import run_python


def test_auto_on_cpu_is_native(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.resolve("drop_max_pool2d", "cpu") == "native"
    assert _backend.resolve("drop_max_pool2d", "cpu", "auto") == "native"


def test_explicit_backends(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _backend.resolve("drop_max_pool2d", "cpu", "native") == "native"
    assert _backend.resolve("drop_max_pool2d", "cpu", "reference") == "reference"
    with pytest.raises(RuntimeError, match=r"drop_max_pool2d: backend='triton' is not available: Triton kernels run "
                                           r"on CUDA tensors \(got cpu\)"):
        _backend.resolve("drop_max_pool2d", "cpu", "triton")


@pytest.mark.triton
@pytest.mark.skipif(not _backend.triton_interpreted(), reason="the CPU half of the Triton tests: TRITON_INTERPRET=1")
def test_triton_on_cpu_under_interpreter():
    # The triton session sets TRITON_INTERPRET=1 before import: the kernels were imported then, interpreted.
    assert _backend.triton_kernels_loaded() and _backend.triton_kernels_interpreted()
    assert _backend.resolve("drop_max_pool2d", "cpu", "triton") == "triton"
    assert _backend.resolve("drop_max_pool2d", "cpu", "auto") == "native"  # auto never picks interpreted Triton
    with pytest.raises(RuntimeError, match=r"^drop_max_pool2d: no native kernel for device type 'mps'"):
        _backend.resolve("drop_max_pool2d", torch.device("mps"), "auto")  # nor on another device
    with pytest.raises(RuntimeError, match="backend='triton' is not available: no Triton kernel is registered for "
                                           "no_such_op"):
        _backend.resolve("no_such_op", "cpu", "triton")
    assert _backend.triton_op_name("pgd_step_") == "pgd_step_triton"
    assert _backend.resolve("pgd_step_", "cpu", "triton") == "triton"


@pytest.mark.triton
@pytest.mark.parametrize("device", ["meta", "mps"])
def test_triton_under_interpreter_refuses_devices_other_than_cpu(device):
    """The interpreter runs kernels on CPU tensors only: under TRITON_INTERPRET=1 a meta tensor used to reach it and
    fail with NotImplementedError: Cannot copy out of meta tensor; no data!"""
    message = (r"^drop_max_pool2d: backend='triton' is not available: Triton kernels run on CUDA tensors "
               rf"\(got {device}\)")
    with pytest.raises(RuntimeError, match=message):
        _backend.resolve("drop_max_pool2d", torch.device(device), "triton")
    if device == "meta":
        with pytest.raises(RuntimeError, match=message):
            robust_ops.drop_max_pool2d(torch.empty(1, 1, 4, 4, device="meta"), 2, backend="triton")


@pytest.mark.triton
@pytest.mark.skipif(not _backend.triton_interpreted(), reason="the CPU half of the Triton tests: TRITON_INTERPRET=1")
def test_interpreted_triton_ops_refuse_fake_tensors_by_name():
    """torch.compile, torch.export and opcheck run a triton_op's launcher on fake tensors; an interpreted kernel runs at
    once on the data, and failed inside triton: 'Attempted to set the storage of a tensor on device "meta" to a
    storage on different device "cpu"'."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    message = ("Triton kernels interpreted under TRITON_INTERPRET=1 run eagerly only; torch.compile, torch.export "
               "and opcheck trace with fake tensors, which need the kernels compiled for a CUDA device")
    with FakeTensorMode():
        for name, call in triton_op_calls(torch.rand(2, 1, 4, 4)).items():
            with pytest.raises(RuntimeError, match=f"^{name}: {message}$"):
                call()
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(Exception, match=f"drop_max_pool2d_triton: {message}"):
        torch.compile(lambda t: robust_ops.drop_max_pool2d(t, 2, backend="triton"), backend="eager", fullgraph=True)(x)
    expected = robust_ops.drop_max_pool2d(x, 2)
    assert torch.equal(robust_ops.drop_max_pool2d(x, 2, backend="triton"), expected)
    # docs/backends.md: without fullgraph=True Dynamo either raises the refusal or takes it as a graph break and runs
    # the call eagerly (pgd_step_), with the eager result
    for call in (lambda t: robust_ops.drop_max_pool2d(t, 2, backend="triton"),
                 lambda t: robust_ops.pgd_step_(t.clone(), t, t, 0.01, 0.1, backend="triton")):
        torch._dynamo.reset()
        try:
            out = torch.compile(call, backend="eager")(x)
        except Exception as error:
            assert message in str(error)
        else:
            assert torch.equal(out, call(x))


def triton_op_calls(x):
    """{name: a call of each Triton launcher on x ([N, 1, 4, 4]) with valid arguments}; its source also runs in the
    subprocesses below."""
    ops = torch.ops.robust_ops
    one, index = torch.ones(x.shape[0]), torch.zeros(x.shape[0], dtype=torch.int64)
    return {
        "pgd_step_triton": lambda: ops.pgd_step_triton(x.clone(), x, x, one, one, 0.0, 1.0, "linf", None, 0),
        "boundary_search_step_triton": lambda: ops.boundary_search_step_triton(
            x.clone(), x.clone(), x.clone()[None], index, None),
        "drop_max_pool2d_triton": lambda: ops.drop_max_pool2d_triton(x, [2, 2], [2, 2], [0, 0], [1, 1], False),
        "_drop_max_pool2d_backward_triton": lambda: ops._drop_max_pool2d_backward_triton(
            x, x.to(torch.int64), [x.shape[0], 1, 8, 8]),
    }


def _run_without_gpu(code):
    """Runs code in a fresh interpreter with no visible GPU and no TRITON_INTERPRET: where import robust_ops skips the
    Triton kernels (their import costs ~1 s)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return run_python(textwrap.dedent(code), env)


def test_triton_ops_register_where_library_impl_refuses_overrides():
    """torch <= 2.11 (a GPU machine's image) defaults Library.impl to allow_override=False, and a triton_op already has
    Python Autograd and ADInplaceOrView kernels: replacing them (_autograd.register_in_place_without_gradient) raised
    'already a kernel registered from python', so every Triton op was missing there. Simulated here on the pinned
    torch, whose default is True."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = run_python(textwrap.dedent("""
        import torch.library

        impl = torch.library.Library.impl

        def refusing_impl(self, op_name, fn, dispatch_key="", *, with_keyset=False, allow_override=False):
            return impl(self, op_name, fn, dispatch_key, with_keyset=with_keyset, allow_override=allow_override)

        torch.library.Library.impl = refusing_impl
        import robust_ops
        from robust_ops import _backend
        print(_backend.load_triton_kernels(), _backend.triton_kernels_loaded())
    """), env)
    assert out.split() == ["None", "True"], out


def test_the_triton_tests_run_under_any_value_triton_reads_as_interpreted():
    """conftest read only TRITON_INTERPRET=1 as interpreted: with TRITON_INTERPRET=true (the kernels interpreted, as
    triton and _backend read it) every Triton test was skipped, telling to set TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="true", CUDA_VISIBLE_DEVICES="")
    test = os.path.join(os.path.dirname(__file__), "test_pgd_step_triton.py")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton", "-k",
                           "test_empty", test], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "2 passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


def test_triton_kernels_are_imported_on_first_use_without_gpu():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    out = _run_without_gpu("""
        import os, sys
        import torch
        import robust_ops
        from robust_ops import _backend
        print("at import:", _backend.triton_kernels_loaded(), "torch._inductor" in sys.modules,
              "torch._dynamo" in sys.modules)
        try:
            robust_ops.drop_max_pool2d(torch.randn(1, 1, 4, 4), 2, backend="triton")
        except RuntimeError as err:
            print("refused:", err)
        print("after refusal:", _backend.triton_kernels_loaded())
        os.environ["TRITON_INTERPRET"] = "1"  # after import robust_ops: fine, the kernels are not imported yet
        x = torch.randn(2, 3, 6, 6)
        same = torch.equal(robust_ops.drop_max_pool2d(x, 2, backend="triton"), robust_ops.drop_max_pool2d(x, 2))
        print("interpreted:", _backend.triton_kernels_loaded(), _backend.triton_kernels_interpreted(), same)
    """)
    assert "at import: False False False" in out  # nor torch._dynamo (robust_ops uses torch._disable_dynamo)
    assert "refused: drop_max_pool2d: backend='triton' is not available: Triton kernels run on CUDA tensors" in out
    assert "after refusal: False" in out
    assert "interpreted: True True True" in out


def test_triton_interpreter_enabled_after_the_kernels_were_imported():
    """triton.jit reads TRITON_INTERPRET when the kernels are imported: a later setting used to pass and then fail
    inside triton with "0 active drivers ([]). There should only be one."
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    out = _run_without_gpu("""
        import os
        import torch
        import robust_ops, robust_ops.triton  # imported explicitly: compiled (not interpreted) kernels
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            robust_ops.drop_max_pool2d(torch.randn(1, 1, 4, 4), 2, backend="triton")
        except RuntimeError as err:
            print("refused:", err)
    """)
    assert ("refused: drop_max_pool2d: backend='triton' is not available: TRITON_INTERPRET=1 was set after "
            "robust_ops imported its Triton kernels") in out


def test_triton_ops_called_directly_refuse_tensors_they_cannot_run_on():
    """torch.ops.robust_ops.<op>_triton called on CPU tensors without TRITON_INTERPRET failed inside triton with
    "0 active drivers ([]). There should only be one."; now each launcher refuses by name, as backend="triton" does."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    out = _run_without_gpu(inspect.getsource(triton_op_calls) + textwrap.dedent("""
        import os
        import torch
        import robust_ops, robust_ops.triton  # imported explicitly: compiled (not interpreted) kernels
        calls = triton_op_calls(torch.rand(1, 1, 4, 4))
        for name, call in calls.items():
            try:
                call()
            except RuntimeError as err:
                print("refused:", err)
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            calls["pgd_step_triton"]()
        except RuntimeError as err:
            print("late:", err)
    """))
    for name in ("pgd_step_triton", "boundary_search_step_triton", "drop_max_pool2d_triton",
                 "_drop_max_pool2d_backward_triton"):
        assert (f"refused: {name}: Triton kernels run on CUDA tensors (got cpu); on CPU only under "
                "TRITON_INTERPRET=1") in out, out
    assert ("late: pgd_step_triton: TRITON_INTERPRET=1 was set after robust_ops imported its Triton kernels; "
            "triton.jit reads it at import, so set it before importing robust_ops") in out, out


def test_triton_import_error_is_reported(monkeypatch):
    monkeypatch.setattr(_backend, "_triton_import_error", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(_backend, "triton_kernels_loaded", lambda: False)
    with pytest.raises(RuntimeError, match=r"drop_max_pool2d: backend='triton' is not available: the Triton kernels "
                                           r"could not be imported \(ModuleNotFoundError: No module named 'triton'\)"):
        _backend.resolve("drop_max_pool2d", torch.device("cuda"), "triton")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.resolve("drop_max_pool2d", "cpu") == "reference"
    assert _backend.resolve("drop_max_pool2d", "cpu", "native") == "native"  # an explicit argument wins
    x = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(robust_ops.drop_max_pool2d(x, 2), robust_ops.drop_max_pool2d(x, 2, backend="native"))
    monkeypatch.setenv(_backend.ENV_VAR, " Reference")
    assert _backend.resolve("drop_max_pool2d", "cpu") == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, "")  # empty reads as unset, as for the on/off switches
    assert _backend.resolve("drop_max_pool2d", "cpu") == _backend.resolve("drop_max_pool2d", "cpu", "auto")
    monkeypatch.setenv(_backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"drop_max_pool2d: expected \$ROBUST_OPS_BACKEND to be one of auto, native, "
                                         r"triton, reference, got 'fast'"):
        _backend.resolve("drop_max_pool2d", "cpu")


def test_unavailable_backend_from_the_environment_names_the_variable(monkeypatch):
    """A backend the caller never passed (an exported ROBUST_OPS_BACKEND=triton) was refused as
    "backend='triton' is not available", with no backend= in the caller's code to find."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"^pgd_step_: backend='triton' \(from \$ROBUST_OPS_BACKEND\) is not "
                                           r"available: Triton kernels run on CUDA tensors \(got cpu\)"):
        robust_ops.pgd_step_(x.clone(), x, x, 0.1, 0.1)
    with pytest.raises(RuntimeError, match=r"^drop_max_pool2d: backend='triton' is not available"):
        robust_ops.drop_max_pool2d(x, 2, backend="triton")  # an argument is named as before
    monkeypatch.setenv(_backend.ENV_VAR, "native")
    with pytest.raises(RuntimeError, match=r"^drop_max_pool2d: backend='native' \(from \$ROBUST_OPS_BACKEND\) is "
                                           r"not available: drop_max_pool2d: no native kernel for device type 'mps'"):
        _backend.resolve("drop_max_pool2d", torch.device("mps"))


def test_bad_backend_argument():
    with pytest.raises(ValueError, match="drop_max_pool2d: expected backend to be one of auto, native, triton, "
                                         "reference, got 'cuda'"):
        robust_ops.drop_max_pool2d(torch.randn(1, 1, 4, 4), 2, backend="cuda")


def test_cuda_tensor_on_cpu_only_build(monkeypatch):
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: False)
    monkeypatch.setattr(_backend, "_triton_reason", lambda op, device: "no GPU Triton in this test")
    message = ("drop_max_pool2d: robust_ops was built without CUDA kernels; reinstall with FORCE_CUDA=1 and a CUDA "
               "toolkit")
    with pytest.raises(RuntimeError, match="^" + message):  # auto raises the native reason as it is
        _backend.resolve("drop_max_pool2d", torch.device("cuda"), "auto")
    with pytest.raises(RuntimeError, match="backend='native' is not available: " + message):
        _backend.resolve("drop_max_pool2d", torch.device("cuda"), "native")


def test_cuda_auto_prefers_native_kernels_then_triton(monkeypatch):
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(_backend, "_triton_reason", lambda op, device: "no GPU Triton in this test")
    assert _backend.resolve("drop_max_pool2d", torch.device("cuda"), "auto") == "native"
    monkeypatch.setattr(_backend, "_triton_reason", lambda op, device: None)
    assert _backend.resolve("drop_max_pool2d", torch.device("cuda"), "auto") == "native"  # faster on an H200
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: False)
    assert _backend.resolve("drop_max_pool2d", torch.device("cuda"), "auto") == "triton"  # a CPU-only build


def test_unsupported_device():
    with pytest.raises(RuntimeError, match="drop_max_pool2d: no native kernel for device type 'mps'"):
        _backend.resolve("drop_max_pool2d", torch.device("mps"), "native")


def test_meta_device_runs_the_fake_kernels():
    # Shape inference on meta tensors, as torch's own pooling allows; it used to be refused.
    for backend in ("auto", "native"):
        assert _backend.resolve("drop_max_pool2d", torch.device("meta"), backend) == "native"


def test_triton_interpreted_reads_the_variable_as_triton_does(monkeypatch):
    """triton.jit interprets for 1/true/yes/on/y in any case; robust_ops must agree, or backend="triton" would refuse
    kernels that run interpreted."""
    for value in ("0", "false", "off", "2", "", " 1"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert not _backend.triton_interpreted(), value
    with pytest.raises(RuntimeError, match=r"Triton kernels run on CUDA tensors \(got cpu\)"):
        _backend.resolve("drop_max_pool2d", "cpu", "triton")
    for value in ("1", "true", "True", "YES", "on", "y"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _backend.triton_interpreted(), value
    if importlib.util.find_spec("triton") is not None:
        from triton._C.libtriton import getenv_bool  # triton's own reading, the rule above copies

        for value in ("0", "false", "off", "2", "", " 1", "1", "true", "True", "YES", "on", "y"):
            monkeypatch.setenv("TRITON_INTERPRET", value)
            assert getenv_bool("TRITON_INTERPRET", False) == _backend.triton_interpreted(), value


def test_where_the_triton_kernels_load_at_import(monkeypatch):
    """A visible GPU or TRITON_INTERPRET=1 (docs/backends.md), nowhere else."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for count, expected in ((0, False), (1, True)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        assert _backend.should_load_triton_kernels_at_import() is expected
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.should_load_triton_kernels_at_import()


def test_triton_kernels_interpreted_follows_the_imported_kernels(monkeypatch):
    class Utils:
        _INTERPRETED = type("Constexpr", (), {"value": True})

    monkeypatch.setitem(sys.modules, _backend.TRITON_MODULE + "._utils", Utils)
    monkeypatch.setattr(_backend, "triton_kernels_loaded", lambda: False)
    assert _backend.triton_kernels_interpreted() is None  # _utils alone: the package's import failed
    monkeypatch.setattr(_backend, "triton_kernels_loaded", lambda: True)
    assert _backend.triton_kernels_interpreted() is True
    monkeypatch.setattr(Utils._INTERPRETED, "value", False)
    assert _backend.triton_kernels_interpreted() is False


def test_failed_triton_import_is_recorded_once(monkeypatch):
    """The error names its type; after a failure load_triton_kernels returns it without importing again."""
    attempts = []

    def fail(name):
        attempts.append(name)
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(_backend, "_triton_import_error", None)
    monkeypatch.setattr(_backend, "TRITON_MODULE", "robust_ops._no_such_triton")  # never in sys.modules
    monkeypatch.setattr(_backend.importlib, "import_module", fail)
    expected = "ModuleNotFoundError: No module named 'robust_ops._no_such_triton'"
    assert _backend.load_triton_kernels() == expected
    assert _backend.load_triton_kernels() == expected
    assert attempts == ["robust_ops._no_such_triton"]


def test_cuda_default_backend_is_auto(monkeypatch):
    """Without backend= or $ROBUST_OPS_BACKEND: auto, so a CPU-only build takes Triton on a GPU."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: False)
    monkeypatch.setattr(_backend, "_triton_reason", lambda op, device: None)
    assert _backend.resolve("drop_max_pool2d", torch.device("cuda")) == "triton"


def test_reference_runs_anywhere():
    assert _backend.resolve("drop_max_pool2d", torch.device("mps"), "reference") == "reference"


def test_load_triton_kernels_is_not_traced_by_dynamo():
    """resolve() may import the Triton kernels while torch.compile traces it: dynamo must run the loader eagerly (a
    graph break, which fullgraph refuses by the loader's name), not trace into the import."""
    import torch._dynamo

    def f(x):
        _backend.load_triton_kernels()
        return x + 1

    with pytest.raises(torch._dynamo.exc.Unsupported, match="`load_triton_kernels`"):
        torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2))
