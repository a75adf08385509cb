"""Chooses the implementation behind each op: "auto" | "native" | "triton" | "reference".

Policy: "auto" falls back quietly -- the native C++/CUDA kernel when it is built for the tensor's device, else Triton on
CUDA when its kernel is importable. Native first because on an H200 (torch 2.11) the CUDA kernels ran every op as fast
(drop-max channels_last forward) or up to 8.6x faster than the Triton ones, whose per-call host overhead (~0.1 ms)
exceeds these memory-bound kernels' run time (docs/benchmarks.md). An explicitly requested backend that cannot run
raises and says why.
"reference" runs the plain-PyTorch oracle in robust_ops.reference (slow; for checking and debugging).
The default comes from $ROBUST_OPS_BACKEND, else "auto".
"""

import os

import torch

from . import _extension

BACKENDS = ("auto", "native", "triton", "reference")
ENV_VAR = "ROBUST_OPS_BACKEND"

_triton_import_error = None  # set by robust_ops/__init__.py when the Triton kernels could not be imported


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


# triton.jit decides at import whether kernels are interpreted; robust_ops imports them right after this module.
_triton_interpreted_at_import = triton_interpreted()


def triton_op_name(op_name):
    """Triton variants are registered as robust_ops::<op>_triton (pgd_step_ -> pgd_step_triton)."""
    return op_name.rstrip("_") + "_triton"


def _triton_reason(op_name, device):
    """Why the Triton kernel of op_name cannot run on device, or None when it can."""
    if _triton_import_error is not None:
        return f"the Triton kernels could not be imported ({_triton_import_error})"
    if not hasattr(torch.ops.robust_ops, triton_op_name(op_name)):
        return f"no Triton kernel is registered for {op_name}"
    if device.type != "cuda" and not triton_interpreted():
        return f"Triton kernels run on CUDA tensors (got {device.type}); on CPU only under TRITON_INTERPRET=1"
    if device.type != "cuda" and not _triton_interpreted_at_import:  # else triton fails with "0 active drivers"
        return ("TRITON_INTERPRET=1 was set after robust_ops was imported; triton.jit reads it at import, so set it "
                "before importing robust_ops")
    return None


def _native_reason(op_name, device):
    if device.type in ("cpu", "meta"):  # meta (shape inference, deferred init): the fake kernels of _meta.py run
        return None
    if device.type == "cuda":
        return None if _extension.has_cuda_kernels() else _extension.no_cuda_kernels_message(op_name)
    return f"{op_name}: no native kernel for device type {device.type!r} (CPU and CUDA are supported)"


def resolve(op_name, device, backend=None):
    """The backend that will run op_name on device: "native", "triton" or "reference"."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if requested not in BACKENDS:
        where = f"${ENV_VAR}" if backend is None else "backend"
        raise ValueError(f"{op_name}: expected {where} to be one of {', '.join(BACKENDS)}, got {requested!r}")
    device = torch.device(device)
    if requested == "reference":
        return "reference"
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
        raise RuntimeError(f"{op_name}: backend={requested!r} is not available: {reason}")
    return requested
