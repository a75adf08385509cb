"""robust_ops: fast native ops, attacks and defenses for adversarially robust medical image classification.

Ops (torch.ops.robust_ops.*): drop_max_pool2d, pgd_step_, boundary_search_step_ -- each with a C++ CPU kernel, a CUDA
kernel and a Triton kernel -- and max_pool2d, a CPU-only exact replacement for ATen's slow NCHW max pooling.
Modules imported on first use: attacks, ima, defenses, train, data, evaluate, models, metrics, report, pretrain,
reproduce, memory, native_layers, prepacked_conv, reference, functional and cli.
"""

import importlib as _importlib

# `python -m robust_ops`: a Ctrl-C in these imports (seconds) ends as main ends one, not in a traceback (cli.py)
try:
    import torch

    if torch.distributed.is_available():
        # torch.distributed.nn.functional binds group.WORLD into its functions' defaults when first imported, which
        # DDP's first use does (through torch._dynamo): imported inside fit, with a process group up, those defaults
        # held the group, so destroy_process_group() never joined gloo's worker threads; one still releasing a work
        # object at interpreter exit aborts the process ("terminate called without an active exception", seen in CI).
        # Imported here, normally before any group exists, the defaults are None (the default group, when called).
        import torch.distributed.nn.functional  # noqa: F401

    from . import _extension

    _extension.load_library()

    from . import _autograd, _backend, _meta  # noqa: E402,F401  (register fake kernels and autograd)
    from .functional import boundary_search_step_, drop_max_pool2d, max_pool2d, pgd_step_  # noqa: E402

    # torch.fx leaves also when called as robust_ops.drop_max_pool2d (fx patches the globals of the calling module).
    torch.fx.wrap("drop_max_pool2d")
    torch.fx.wrap("max_pool2d")

    if _backend.should_load_triton_kernels_at_import():  # else on the first backend="triton" call (docs/backends.md)
        _backend.load_triton_kernels()

    from .nn import DropMax2d, replace_maxpool  # noqa: E402,F401

    del torch  # dir(robust_ops) and tab completion listed robust_ops.torch (and importlib) as the package's names
except (KeyboardInterrupt, RuntimeError) as _err:
    from .cli import exit_on_interrupted_package_import

    exit_on_interrupted_package_import(_err)
    raise

__version__ = "0.1.0"

__all__ = ["drop_max_pool2d", "max_pool2d", "pgd_step_", "boundary_search_step_", "DropMax2d", "replace_maxpool"]

_SUBMODULES = (
    "attacks", "ima", "defenses", "train", "data", "evaluate", "models", "metrics", "report", "pretrain", "cli",
    "reproduce", "memory", "native_layers", "prepacked_conv",
    "reference", "functional",
)


def __dir__():
    # the subpackages imported on first use too (PEP 562): dir() and tab completion listed none of attacks, train, ...
    return sorted(set(globals()) | set(_SUBMODULES))


def __getattr__(name):
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
