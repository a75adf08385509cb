"""Triton kernels, each registered as robust_ops::<op>_triton with torch.library.triton_op.

They run on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1 (set before import: triton.jit decides at
import time). Imported by robust_ops/__init__.py when triton is importable.
"""

import importlib

_KERNEL_MODULES = ("drop_max_pool2d", "pgd_step", "boundary_search_step")

for _name in _KERNEL_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as err:  # a kernel module not written yet is not an import failure of the others
        if err.name != f"{__name__}.{_name}":
            raise
