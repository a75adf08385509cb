"""Benchmark drop-max pooling (robust_ops.DropMax2d) against F.max_pool2d (the floor), the unfold+select reference and a
same-size copy (the memory roofline), all in one run.

    python benchmarks/bench_drop_max_pool2d.py  # fp32 [8, 64, 112, 112], k3 s2 p1, $OMP_NUM_THREADS or 2 threads
    python benchmarks/bench_drop_max_pool2d.py --quick  # small shape, short timing: a smoke run
    python benchmarks/bench_drop_max_pool2d.py --device cuda  # one device (default: the CPU, then a visible GPU)

Medians of forward and forward+backward for NCHW and channels_last input, and forward+backward for a channels_last
input with an NCHW upstream gradient (layout channels_last/nchw_grad: a flatten after the pool); ratios against
max_pool2d in the same layout(s) and in channels_last (its fast path), speedup over the reference, and achieved GB/s
against the copy.
Bytes counted per pass are the op's minimum traffic: forward reads the input and writes output + int64 indices;
backward reads grad_output + indices and writes grad_input. Peak memory: the native kernels allocate only the output
and indices (forward) and grad_input (backward) plus O(kernel area + one row) scratch per thread -- no unfold-sized
temporary (the reference materializes kh*kw copies of the input). On a GPU the script also times the CUDA and Triton
kernels and measures peak memory with torch.cuda.max_memory_allocated.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, which puts this checkout on the path
from common import (copy_roofline_seconds, default_threads, device_arg, gbps, median_seconds,  # noqa: E402
                    positive_int, write_rows)

import robust_ops  # noqa: E402
from robust_ops import _backend, reference  # noqa: E402


# the mixed case: a channels_last input whose upstream gradient is NCHW (what a flatten after the pool hands back);
# forward+backward only, its forward is the channels_last row's
MIXED = "channels_last/nchw_grad"
LAYOUTS = ("nchw", "channels_last", MIXED)


def forward_fn(provider, x, k, s, p):
    if provider == "max_pool2d":
        return lambda: F.max_pool2d(x, k, s, p)
    if provider == "reference":
        return lambda: reference.drop_max_pool2d(x, (k, k), (s, s), (p, p), (1, 1), False)[0]
    return lambda: robust_ops.drop_max_pool2d(x, k, s, p, backend=provider)


def forward_backward_fn(provider, x, grad, k, s, p):
    leaf = x.detach().clone().requires_grad_()
    fwd = forward_fn(provider, leaf, k, s, p)

    def run():
        leaf.grad = None
        fwd().backward(grad)

    return run


def backend_unavailable(backend, device):
    """Why ``backend`` cannot run drop_max_pool2d on ``device`` (None when it can), as the library decides it: a
    RuntimeError from the kernel itself is a failure to report, not a reason to skip its rows."""
    try:
        _backend.resolve("drop_max_pool2d", torch.device(device), backend)
    except RuntimeError as err:
        return str(err)
    return None


def check_equal(x, grad, k, s, p, backend):
    """Forward bitwise, backward to float32 summation order (overlapping windows add in another order), before
    either pass is timed."""
    leaf, ref_leaf = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    out, idx = robust_ops.drop_max_pool2d(leaf, k, s, p, return_indices=True, backend=backend)
    ref_out, ref_idx = reference.drop_max_pool2d(ref_leaf, (k, k), (s, s), (p, p), (1, 1), False)
    if not (torch.equal(out, ref_out) and torch.equal(idx, ref_idx)):
        raise SystemExit(f"drop_max_pool2d backend={backend} disagrees with the reference on {tuple(x.shape)}")
    out.backward(grad)
    ref_out.backward(grad)
    if not torch.allclose(leaf.grad, ref_leaf.grad, rtol=1e-6, atol=1e-6):
        raise SystemExit(f"drop_max_pool2d backend={backend}: its gradient disagrees with the reference's on "
                         f"{tuple(x.shape)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shape and short timing (smoke run)")
    parser.add_argument("--threads", type=positive_int, default=default_threads(),
                        help="CPU threads (default: $OMP_NUM_THREADS, else 2)")
    parser.add_argument("--shape", type=positive_int, nargs=4, default=None, metavar=("N", "C", "H", "W"))
    parser.add_argument("--device", type=device_arg, default=None,
                        help="time on this device only (default: the CPU, then CUDA when a GPU is visible)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape) if args.shape else ((2, 16, 56, 56) if args.quick else (8, 64, 112, 112))
    k, s, p = 3, 2, 1
    run_time = 0.2 if args.quick else 1.0
    torch.manual_seed(0)

    rows = []
    print("reference: NCHW only (it works on planes); channels_last rows' speedup_vs_reference is against it")
    if args.device is not None:  # device_arg made a cuda:i the current GPU, where "cuda" tensors go
        devices = [args.device.type]
    else:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        x = torch.randn(shape, device=device)
        out_shape = F.max_pool2d(x, k, s, p).shape
        n_in, n_out = x.numel(), out_shape.numel()
        fwd_bytes = 4 * n_in + (4 + 8) * n_out
        bwd_bytes = (4 + 8) * n_out + 4 * n_in
        copy_gbps = gbps(2 * 4 * n_in, copy_roofline_seconds(2 * 4 * n_in, device, run_time))
        grad = torch.randn(out_shape, device=device)

        providers = ["max_pool2d", "native", "reference"]
        if device == "cuda":
            providers.append("triton")
        results = {}
        for layout in LAYOUTS:
            xl = x if layout == "nchw" else x.contiguous(memory_format=torch.channels_last)
            gl = grad.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else grad
            for provider in providers:
                if provider == "reference" and layout != "nchw":
                    continue  # the reference works on planes; one layout is enough for the 10x goal
                if provider in ("native", "triton"):
                    unavailable = backend_unavailable(provider, device)
                    if unavailable:  # e.g. a CPU-only build on a GPU machine; a kernel that raises stops the run
                        print(f"skipping {provider} on {device}: {unavailable}")
                        continue
                    check_equal(xl, gl, k, s, p, provider)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                passes = (("forward", forward_fn(provider, xl, k, s, p), fwd_bytes),
                          ("forward+backward", forward_backward_fn(provider, xl, gl, k, s, p), fwd_bytes + bwd_bytes))
                for pass_name, fn, nbytes in passes[1:] if layout == MIXED else passes:  # its forward: channels_last's
                    seconds = median_seconds(fn, run_time)
                    results[(provider, layout, pass_name)] = seconds
                    rows.append({
                        "dev": device, "provider": provider, "layout": layout, "pass": pass_name,
                        "shape": "x".join(map(str, shape)), "median_ms": seconds * 1e3,
                        "GB/s": gbps(nbytes, seconds), "roofline_%": 100 * gbps(nbytes, seconds) / copy_gbps,
                    })
                if device == "cuda":
                    peak = torch.cuda.max_memory_allocated() / 2**20
                    rows[-1]["peak_MiB"] = peak
        copy_s = 2 * 4 * n_in / (copy_gbps * 1e9)
        rows.append({"dev": device, "provider": "copy (roofline)", "layout": "-", "pass": "copy_",
                     "shape": "x".join(map(str, shape)), "median_ms": copy_s * 1e3, "GB/s": copy_gbps,
                     "roofline_%": 100.0})
        for row in rows:
            key_same = ("max_pool2d", row["layout"], row["pass"])
            key_cl = ("max_pool2d", "channels_last", row["pass"])
            key_ref = ("reference", "nchw", row["pass"])
            if row["dev"] != device or row["provider"] == "copy (roofline)":
                continue
            row["x_maxpool_same_layout"] = row["median_ms"] / 1e3 / results[key_same] if key_same in results else ""
            row["x_maxpool_cl"] = row["median_ms"] / 1e3 / results[key_cl] if key_cl in results else ""
            row["speedup_vs_reference"] = results[key_ref] / (row["median_ms"] / 1e3) if key_ref in results else ""

        def ratio(a, b):
            return results[a] / results[b] if a in results and b in results else float("nan")

        print(f"\n{device}: goals (fp32 {shape}, k{k} s{s} p{p}, {torch.get_num_threads()} threads)")
        goals = [
            ("channels_last fwd+bwd <= 1.5x max_pool2d channels_last",
             ratio(("native", "channels_last", "forward+backward"),
                   ("max_pool2d", "channels_last", "forward+backward")),
             1.5),
            ("channels_last forward <= 1.5x max_pool2d channels_last",
             ratio(("native", "channels_last", "forward"), ("max_pool2d", "channels_last", "forward")), 1.5),
            ("NCHW fwd+bwd <= 0.5x max_pool2d NCHW",
             ratio(("native", "nchw", "forward+backward"), ("max_pool2d", "nchw", "forward+backward")), 0.5),
            ("NCHW fwd+bwd >= 10x faster than the reference (ratio <= 0.1)",
             ratio(("native", "nchw", "forward+backward"), ("reference", "nchw", "forward+backward")), 0.1),
        ]
        for text, value, limit in goals:
            if math.isnan(value):  # native was skipped above: no verdict on a kernel never timed
                print(f"  {text}: not measured (native skipped)")
            else:
                print(f"  {text}: {value:.3f} {'OK' if value <= limit else 'MISSED'}")
    print()
    keys = ["dev", "provider", "layout", "pass", "shape", "median_ms", "GB/s", "roofline_%", "x_maxpool_same_layout",
            "x_maxpool_cl", "speedup_vs_reference", "peak_MiB"]
    write_rows("drop_max_pool2d", [{key: row.get(key, "") for key in keys} for row in rows])


if __name__ == "__main__":
    main()
