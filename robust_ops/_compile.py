"""torch.compile helpers that keep `import robust_ops` fast."""

import torch

# Marks a function for torch.compile to run eagerly (a graph break), as torch.compiler.disable does; but that one
# imports torch._dynamo when applied (~1 s at import), while torch._disable_dynamo -- what torch's own modules use --
# imports it on the function's first call.
disable_dynamo = getattr(torch, "_disable_dynamo", torch.compiler.disable)
