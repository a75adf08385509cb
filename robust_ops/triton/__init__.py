"""Triton kernels, each registered as robust_ops::<op>_triton with torch.library.triton_op.

They run on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1 (set before this package is imported:
triton.jit decides at import time). `import robust_ops` imports it where the kernels can run (a visible CUDA device or
TRITON_INTERPRET=1), else the first backend="triton" call does (robust_ops._backend.load_triton_kernels).
"""

from . import boundary_search_step, drop_max_pool2d, pgd_step  # noqa: F401  (registers the ops)
