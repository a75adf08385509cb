"""torch.compile helpers that keep `import robust_ops` fast."""

import torch

# Marks a function for torch.compile to run eagerly (a graph break), as torch.compiler.disable does; but that one
# imports torch._dynamo when applied (~1 s at import), while torch._disable_dynamo -- what torch's own modules use --
# imports it on the function's first call.
disable_dynamo = getattr(torch, "_disable_dynamo", torch.compiler.disable)


def capturing():
    """Whether a graph is being captured now: torch.compile / torch.export (dynamo, or non-strict export's
    Python run) or torch.jit.trace (also torch.onnx.export's TorchScript exporter). Code that reads data pointers
    or values, or runs checks those tracers refuse, keeps to plain ATen ops there."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()
