"""Swapping module forwards while a ``with`` block lasts: shared by native_layers and prepacked_conv."""

import contextlib
import functools
import threading

from torch import nn

_lock = threading.Lock()
_patched = {}  # id(module) -> [module, depth]


@contextlib.contextmanager
def patched_forwards(model, replacements):
    """While active, run every module of ``model`` whose exact type is a key of ``replacements`` through
    ``replacements[type](module, *inputs)``. Nested and concurrent uses on one module are counted: the last exit
    restores its own forward. Skipped: modules with their own instance ``forward`` and torch.compile'd models."""
    modules = []
    # A torch.compile'd model (its modules live on in _orig_mod) keeps its own graph: changing forwards under it
    # would only force recompiles.
    if replacements and isinstance(model, nn.Module) and not hasattr(model, "_orig_mod"):
        with _lock:
            for module in model.modules():
                replacement = replacements.get(type(module))
                if replacement is None:
                    continue
                entry = _patched.get(id(module))
                if entry is not None:
                    entry[1] += 1
                elif "forward" in module.__dict__:
                    continue  # the user's own instance forward: leave it alone
                else:
                    module.forward = functools.partial(replacement, module)
                    _patched[id(module)] = [module, 1]
                modules.append(module)
    try:
        yield model
    finally:
        with _lock:
            for module in modules:
                entry = _patched[id(module)]
                entry[1] -= 1
                if entry[1] == 0:
                    del module.__dict__["forward"]
                    del _patched[id(module)]
