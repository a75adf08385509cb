"""torch.compile helpers that keep `import robust_ops` fast."""

import functools
import sys

import torch

_disable = getattr(torch, "_disable_dynamo", torch.compiler.disable)


def disable_dynamo(fn):
    """Marks ``fn`` for torch.compile to run eagerly (a graph break), as torch.compiler.disable does; but that one
    imports torch._dynamo when applied (~1 s at import), and torch._disable_dynamo -- what torch's own modules use --
    on the function's first call. Until something else has imported torch._dynamo no graph can be captured and no
    compiled frame runs, so ``fn`` is called as it is: the CPU pool's enter, in the first attack of a process
    without torchvision, imported torch._dynamo for nothing (measured: 157 MB of resident memory and 3-5 s)."""
    disabled = _disable(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "torch._dynamo" in sys.modules:
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def capturing():
    """Whether a graph is being captured now: torch.compile / torch.export (dynamo, or non-strict export's
    Python run) or torch.jit.trace (also torch.onnx.export's TorchScript exporter). Code that reads data pointers
    or values, or runs checks those tracers refuse, keeps to plain ATen ops there."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()
