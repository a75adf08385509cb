"""Triton kernels, each registered as robust_ops::<op>_triton with torch.library.triton_op.

They run on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1 (set before import: triton.jit decides at
import time). Imported by robust_ops/__init__.py when triton is importable.
"""

from . import boundary_search_step, drop_max_pool2d, pgd_step  # noqa: F401  (registers the ops)
