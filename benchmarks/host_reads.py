"""Counting a call's host reads (each a GPU sync on a GPU), for bench_defenses.py and python_tests/utils.py's
host_reads: one way to count them for the benchmark and the tests that pin the counts. Imports torch only (no
benchmark setup), so the tests can load it."""

import torch


def _in_optimizer_step(event):
    while event is not None:
        if event.name.startswith("Optimizer.step#"):
            return True
        event = event.cpu_parent
    return False


def host_reads(run, optimizer_steps=True):
    """``run()``'s reads of tensor values back to Python, {"item": items (float(t), int(t), bool(t), t.item()),
    "nonzero": nonzeros (boolean indexing), "tolist": tolist calls}: the profiler's aten::_local_scalar_dense and
    aten::nonzero events, and Tensor.tolist wrapped (it dispatches no aten op on CPU). ``optimizer_steps=False``
    leaves out the reads inside an optimizer's step: Adam reads its step counters, CPU tensors (no sync), one item per
    parameter and step."""
    from torch.profiler import ProfilerActivity, profile

    tolists = []
    tolist = torch.Tensor.tolist

    def counted(self):
        tolists.append(self.shape)
        return tolist(self)

    torch.Tensor.tolist = counted
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    finally:
        torch.Tensor.tolist = tolist
    names = [e.name for e in prof.events() if optimizer_steps or not _in_optimizer_step(e)]
    return {"item": names.count("aten::_local_scalar_dense"), "nonzero": names.count("aten::nonzero"),
            "tolist": len(tolists)}
