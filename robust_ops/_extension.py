"""Loads the compiled ops (robust_ops._C) and turns build problems into errors that say what to do."""

import importlib

import torch

_BUILD_HINT = "pip install --no-build-isolation -e ."


def load_library():
    """Import robust_ops._C, which registers every torch.ops.robust_ops.* kernel it was built with."""
    try:
        importlib.import_module("robust_ops._C")
    except ImportError as err:
        raise ImportError(
            "robust_ops: couldn't load the compiled ops (robust_ops._C). Either the package was not built, "
            f"or it was built against another torch than the one installed ({torch.__version__}), "
            f"or the build failed. Rebuild with `{_BUILD_HINT}` and read its output. Original error: {err}"
        ) from err
    _check_cuda_version()


def cuda_version():
    """CUDA version the CUDA kernels were compiled with (e.g. 13000), or -1 for a CPU-only build."""
    return int(torch.ops.robust_ops._cuda_version())


def has_cuda_kernels():
    return cuda_version() != -1


def _check_cuda_version():
    built = cuda_version()
    if built == -1 or torch.version.cuda is None:
        return
    built_major, built_minor = built // 1000, (built % 1000) // 10
    torch_major, torch_minor = (int(part) for part in torch.version.cuda.split(".")[:2])
    if (built_major, built_minor) != (torch_major, torch_minor):
        raise RuntimeError(
            f"robust_ops: the CUDA kernels were compiled with CUDA {built_major}.{built_minor} but torch uses CUDA "
            f"{torch.version.cuda}; PyTorch and robust_ops must be compiled with the same CUDA version. "
            f"Reinstall robust_ops (`{_BUILD_HINT}`) against the installed torch."
        )


def no_cuda_kernels_message(op_name):
    return (
        f"{op_name}: robust_ops was built without CUDA kernels; reinstall with FORCE_CUDA=1 and a CUDA toolkit "
        f"(`FORCE_CUDA=1 {_BUILD_HINT}`) or use backend='triton'"
    )
