"""Backend resolution (robust_ops._backend): auto / native / triton / reference, $ROBUST_OPS_BACKEND, and the errors
of an explicitly requested backend that cannot run."""

import pytest
import torch

import robust_ops
from robust_ops import _backend, _extension


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


def test_triton_on_cpu_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "_triton_interpreted_at_import", True)
    if _backend._triton_import_error is not None:
        pytest.skip(f"triton not importable: {_backend._triton_import_error}")
    assert _backend.resolve("drop_max_pool2d", "cpu", "triton") == "triton"
    assert _backend.resolve("drop_max_pool2d", "cpu", "auto") == "native"  # auto never picks interpreted Triton


def test_triton_interpreter_enabled_after_import(monkeypatch):
    """triton.jit reads TRITON_INTERPRET at import: a later setting used to pass and then fail inside triton with
    "0 active drivers ([]). There should only be one."
    """
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "_triton_interpreted_at_import", False)
    if _backend._triton_import_error is not None:
        pytest.skip(f"triton not importable: {_backend._triton_import_error}")
    with pytest.raises(RuntimeError, match="drop_max_pool2d: backend='triton' is not available: TRITON_INTERPRET=1 "
                                           "was set after robust_ops was imported"):
        robust_ops.drop_max_pool2d(torch.randn(1, 1, 4, 4), 2, backend="triton")


def test_triton_import_error_is_reported(monkeypatch):
    monkeypatch.setattr(_backend, "_triton_import_error", "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(RuntimeError, match="the Triton kernels could not be imported"):
        _backend.resolve("drop_max_pool2d", "cpu", "triton")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.resolve("drop_max_pool2d", "cpu") == "reference"
    assert _backend.resolve("drop_max_pool2d", "cpu", "native") == "native"  # an explicit argument wins
    x = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(robust_ops.drop_max_pool2d(x, 2), robust_ops.drop_max_pool2d(x, 2, backend="native"))
    monkeypatch.setenv(_backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"drop_max_pool2d: expected \$ROBUST_OPS_BACKEND to be one of auto, native, "
                                         r"triton, reference, got 'fast'"):
        _backend.resolve("drop_max_pool2d", "cpu")


def test_bad_backend_argument():
    with pytest.raises(ValueError, match="drop_max_pool2d: expected backend to be one of auto, native, triton, "
                                         "reference, got 'cuda'"):
        robust_ops.drop_max_pool2d(torch.randn(1, 1, 4, 4), 2, backend="cuda")


def test_cuda_tensor_on_cpu_only_build(monkeypatch):
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: False)
    monkeypatch.setattr(_backend, "_triton_reason", lambda op, device: "no GPU Triton in this test")
    message = ("drop_max_pool2d: robust_ops was built without CUDA kernels; reinstall with FORCE_CUDA=1 and a CUDA "
               "toolkit")
    with pytest.raises(RuntimeError, match=message):
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
