"""Chooses the implementation behind each op: "auto" | "native" | "triton" | "reference".

Policy: "auto" falls back quietly -- the native C++/CUDA kernel when it is built for the tensor's device, else Triton on
CUDA when its kernel is importable. Native first because on an H200 (torch 2.11) the CUDA kernels ran every op as fast
(drop-max channels_last forward) or up to 8.6x faster than the Triton ones, whose per-call host overhead (~0.1 ms)
exceeds these memory-bound kernels' run time (docs/benchmarks.md). An explicitly requested backend that cannot run
raises and says why.
"reference" runs the plain-PyTorch oracle in robust_ops.reference (slow; for checking and debugging).
The default comes from $ROBUST_OPS_BACKEND, else "auto".
"""

import importlib
import os
import sys

import torch

from . import _extension
from ._compile import capturing, disable_dynamo

BACKENDS = ("auto", "native", "triton", "reference")
ENV_VAR = "ROBUST_OPS_BACKEND"

_triton_import_error = None  # why robust_ops.triton could not be imported; set by load_triton_kernels
TRITON_MODULE = "robust_ops.triton"


# The values triton itself reads as "set" (its getenv_bool): TRITON_INTERPRET=true interprets as =1 does.
_TRITON_TRUE = ("1", "true", "yes", "on", "y")


def triton_interpreted():
    """Whether $TRITON_INTERPRET asks triton.jit for interpreted kernels, read as triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRITON_TRUE


def triton_kernels_loaded():
    return TRITON_MODULE in sys.modules  # a failed import leaves no entry


def triton_kernels_interpreted():
    """Whether the imported Triton kernels run interpreted: triton.jit reads TRITON_INTERPRET when their module is
    imported, not when they run. None before they are imported."""
    utils = sys.modules.get(TRITON_MODULE + "._utils")
    return None if utils is None or not triton_kernels_loaded() else bool(utils._INTERPRETED.value)


def should_load_triton_kernels_at_import():
    """Where the Triton kernels can run: a visible CUDA device, or TRITON_INTERPRET=1 (tests on CPU). Elsewhere
    robust_ops skips their ~1 s import (torch.library.triton_op imports torch._inductor) until a backend="triton" call
    needs them. device_count() asks NVML first, so unlike is_available() it does not initialise CUDA in this process
    on a GPU machine (a CUDA-initialised parent breaks forked children that use CUDA)."""
    return triton_interpreted() or torch.cuda.device_count() > 0


@disable_dynamo  # may run while torch.compile traces resolve(): dynamo must not trace the import
def load_triton_kernels():
    """Imports robust_ops.triton once (registers robust_ops::<op>_triton); returns None, or why the import failed.
    `import robust_ops.triton` does the same."""
    global _triton_import_error
    if _triton_import_error is None and not triton_kernels_loaded():
        try:
            importlib.import_module(TRITON_MODULE)
        except Exception as err:  # triton missing or broken: the native kernels still work; backend="triton" says why
            _triton_import_error = f"{type(err).__name__}: {err}"
    return _triton_import_error


def triton_op_name(op_name):
    """Triton variants are registered as robust_ops::<op>_triton (pgd_step_ -> pgd_step_triton)."""
    return op_name.rstrip("_") + "_triton"


def triton_device_reason(device):
    """Why no Triton kernel can run on device, or None when one can. The launchers call it too: a direct
    torch.ops.robust_ops.<op>_triton call on a CPU tensor failed in triton with "0 active drivers"."""
    # The interpreter runs kernels on CPU tensors only: a meta tensor failed in its copy ("Cannot copy out of meta").
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        return f"Triton kernels run on CUDA tensors (got {device.type}); on CPU only under TRITON_INTERPRET=1"
    if device.type != "cuda" and triton_kernels_interpreted() is False:  # else triton fails with "0 active drivers"
        return ("TRITON_INTERPRET=1 was set after robust_ops imported its Triton kernels; triton.jit reads it at "
                "import, so set it before importing robust_ops")
    return None


def _triton_reason(op_name, device):
    """Why the Triton kernel of op_name cannot run on device, or None when it can."""
    reason = triton_device_reason(device)
    if reason is not None:
        return reason
    if not triton_kernels_loaded():  # checked here too: calling the dynamo-disabled loader breaks a compiled graph
        error = load_triton_kernels()  # after a failed import: the recorded error, no second try
        if error is not None:
            return f"the Triton kernels could not be imported ({error})"
    if not hasattr(torch.ops.robust_ops, triton_op_name(op_name)):
        return f"no Triton kernel is registered for {op_name}"
    return triton_device_reason(device)  # again: the kernels may have been imported just now


def _native_reason(op_name, device):
    if device.type in ("cpu", "meta"):  # meta (shape inference, deferred init): the fake kernels of _meta.py run
        return None
    if device.type == "cuda":
        return None if _extension.has_cuda_kernels() else _extension.no_cuda_kernels_message(op_name)
    return f"{op_name}: no native kernel for device type {device.type!r} (CPU and CUDA are supported)"


def requested_backend(op_name, backend=None):
    """``backend``, else $ROBUST_OPS_BACKEND, else "auto"; ValueError naming op_name and where the value came from
    when it is not one of BACKENDS."""
    # The environment is read as the on/off switches are: case and spaces ignored, empty as unset.
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if requested not in BACKENDS:
        where = f"${ENV_VAR}" if backend is None else "backend"
        raise ValueError(f"{op_name}: expected {where} to be one of {', '.join(BACKENDS)}, got {requested!r}")
    return requested


def onnx_exporting():
    """Whether torch.onnx.export is capturing the model now (its TorchScript exporter traces with torch.jit.trace,
    its default one with torch.export, non-strict first, then strict under dynamo): its ONNX translation knows
    ATen's ops, not robust_ops' custom ones. is_in_onnx_export (~3 us) is asked only while tracing or compiling."""
    return capturing() and _in_onnx_export()


def _in_onnx_export():
    # dynamo folds torch.onnx.is_in_onnx_export to False: the exporter's strict capture (its fallback when the
    # non-strict one fails, e.g. on a refused backend) kept the custom op, and torch.onnx's "No ONNX function found"
    # came in place of the refusal. Marked constant, dynamo calls this at trace time, which reads the exporter's flag.
    return torch.onnx.is_in_onnx_export()


# torch.compiler.assume_constant_result(_in_onnx_export) sets only this mark, but imports torch._dynamo, which
# `import robust_ops` leaves unimported (test_backends); the ONNX tests check that strict captures read the flag.
_in_onnx_export._dynamo_marked_constant = True


def resolve(op_name, device, backend=None):
    """The backend that will run op_name on device: "native", "triton" or "reference". While torch.onnx.export
    captures the model, "auto" is "reference" (plain ATen ops, the same outputs) and "native" / "triton" a
    RuntimeError: torch.onnx has no translation of the custom ops (its own error came after a dump of the graph)."""
    requested = requested_backend(op_name, backend)
    device = torch.device(device)
    if requested == "reference":
        return "reference"
    if onnx_exporting():
        if requested == "auto":
            return "reference"
        source = "" if backend is not None else f" (from ${ENV_VAR})"
        raise RuntimeError(f"{op_name}: backend={requested!r}{source} cannot be exported to ONNX: torch.onnx has no "
                           f"translation of the custom op robust_ops::{op_name}; export with backend='auto' or "
                           "'reference', which torch.onnx.export captures as plain PyTorch ops with the same outputs")
    if requested == "auto":
        reason = _native_reason(op_name, device)
        if reason is None:
            return "native"
        # Interpreted Triton is for tests only: auto never picks it on CPU.
        if device.type == "cuda" and _triton_reason(op_name, device) is None:
            return "triton"
        raise RuntimeError(reason)
    reason = _triton_reason(op_name, device) if requested == "triton" else _native_reason(op_name, device)
    if reason is not None:
        # A value from the environment says so: the caller passed no backend= to look for (an attack failed with
        # "backend='triton' is not available" for an exported ROBUST_OPS_BACKEND=triton).
        source = "" if backend is not None else f" (from ${ENV_VAR})"
        raise RuntimeError(f"{op_name}: backend={requested!r}{source} is not available: {reason}")
    return requested
