"""Loads the compiled ops (robust_ops._C) and turns build problems into errors that say what to do."""

import importlib
import os
import warnings
from pathlib import Path

import torch

from ._source_digest import source_digest

_BUILD_HINT = "pip install --no-build-isolation -e ."
# An installed (non-editable) package has no checkout to run `-e .` in: pip reinstalls a path it is given.
_REINSTALL_HINT = "pip install --no-build-isolation <the robust_ops source checkout or sdist it came from>"


def _in_checkout():
    """Whether this package sits in its source checkout (csrc/ beside it), as an editable install's does; an installed
    wheel has none."""
    return (Path(__file__).parent.parent / "csrc" / "robust_ops.cpp").is_file()


def _rebuild_hint(prefix=""):
    """The command that rebuilds _C, quoted, after ``prefix`` (switches such as FORCE_CUDA=1)."""
    return f"`{prefix}{_BUILD_HINT if _in_checkout() else _REINSTALL_HINT}`"


# Every op csrc/robust_ops.cpp defines, which the Python side registers fake kernels and autograd for: a _C built
# from an older checkout lacks the newer ones, and torch then fails inside that registration with an AttributeError
# that names no build.
OPS = (
    "drop_max_pool2d", "_drop_max_pool2d_backward", "max_pool2d", "_eval_batch_norm_backward", "pgd_step_",
    "boundary_search_step_", "_cuda_version", "_cpu_vector_isa", "_cpu_pool_enter", "_cpu_pool_exit",
    "_cpu_pool_stats",
)


def load_library():
    """Import robust_ops._C, which registers every torch.ops.robust_ops.* kernel it was built with."""
    try:
        module = importlib.import_module("robust_ops._C")
    except ImportError as err:
        raise ImportError(
            # the folder: a source checkout in the working directory shadows an installed (built) package
            f"robust_ops: couldn't load the compiled ops (robust_ops._C in {Path(__file__).parent}). Either the "
            "package was not built, "
            f"or it was built against another torch than the one installed ({torch.__version__}), "
            f"or the build failed. Rebuild with {_rebuild_hint()} and read its output. Original error: {err}"
        ) from err
    _check_own_build(module)
    _check_source_digest(module)
    _check_ops()
    _check_cuda_version()


def _check_own_build(module):
    """Refuse a _C from another copy of robust_ops. An editable install's import finder serves robust_ops._C from its
    own checkout whenever this copy's folder has none (a fresh clone or worktree on PYTHONPATH): its Python code then
    ran on the other checkout's kernels without a word."""
    found = getattr(module, "__file__", None)
    here = Path(__file__).parent
    # the folders, not the files resolved: a strict editable install links each file from elsewhere into one folder
    if found is not None and not os.path.samefile(Path(found).parent, here):
        raise ImportError(
            f"robust_ops: the compiled ops were loaded from {found}, another copy of robust_ops (an editable "
            f"install's), because this copy ({here}) has no build of its own. Build this one (`{_BUILD_HINT}` in its "
            "checkout) or import the other."
        )


def _check_source_digest(module):
    """Warn when the compiled ops were built from other C++ sources than the csrc/ beside the package: a source
    checkout not rebuilt after a pull (or an edit) that changed csrc/ ran on its old kernels without a word, unless
    the change added an op (_check_ops). Only in a source checkout (an installed wheel has no csrc/) and only for a
    build that carries its digest (setup.py's; CMakeLists.txt's and builds older than the digest carry none)."""
    built = getattr(module, "SOURCE_DIGEST", None)
    csrc = Path(__file__).parent.parent / "csrc"
    if built is None or not _in_checkout():
        return
    if source_digest(csrc) != built:
        warnings.warn(
            f"robust_ops: the compiled ops ({getattr(module, '__file__', 'robust_ops._C')}) were built from other "
            f"C++ sources than {csrc} holds now (changed since the build, e.g. by a git pull); rebuild with "
            f"`{_BUILD_HINT}`", stacklevel=3)


def _check_ops():
    missing = [name for name in OPS if not hasattr(torch.ops.robust_ops, name)]
    if missing:
        module = importlib.import_module("robust_ops._C")
        raise ImportError(
            f"robust_ops: the compiled ops ({getattr(module, '__file__', 'robust_ops._C')}) are older than the Python "
            f"code: they lack {', '.join('robust_ops::' + name for name in missing)}. Rebuild with {_rebuild_hint()}."
        )


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
            f"Reinstall robust_ops ({_rebuild_hint()}) against the installed torch."
        )


def no_cuda_kernels_message(op_name):
    return (
        f"{op_name}: robust_ops was built without CUDA kernels; reinstall with FORCE_CUDA=1 and a CUDA toolkit "
        f"({_rebuild_hint('FORCE_CUDA=1 ')}) or use backend='triton'"
    )
