"""Helpers shared by the Triton kernels."""

import os

import torch


def launch(kernel):
    """The callable to launch a @triton.jit kernel with: wrapped for torch.compile on real GPUs, raw under the
    interpreter (torch.library.wrap_triton rejects interpreted kernels, pytorch#152868)."""
    return kernel if os.environ.get("TRITON_INTERPRET") == "1" else torch.library.wrap_triton(kernel)
