"""Benchmark the ops behind robust_ops.native_layers against ATen (their reference and the peer a user runs anyway)
and a same-size copy (the memory roofline), in one run, on resnet18's shapes from bench_attacks (1x64x64, batch 32).

    python benchmarks/bench_native_layers.py [--quick] [--threads N]

* max_pool2d (k3 s2 p1 on [32, 64, 64, 64]): robust_ops.max_pool2d vs F.max_pool2d (NCHW, and channels_last --
  ATen's fast layout), forward and forward+backward, and forward+backward of a channels_last input with an NCHW
  upstream gradient (layout channels_last/nchw_grad: a flatten after the pool); bitwise equality with F.max_pool2d
  (output, indices, strides, input gradient, all three cases) is checked first.
* eval-mode batch-norm input gradient on [32, C, S, S] for resnet18's four stages, NCHW and channels_last:
  _eval_batch_norm_backward vs aten::native_batch_norm_backward(train=False, input gradient only); bitwise equality
  (values and strides) checked first.
Bytes per pass are the minimum traffic: pooling forward reads the input, writes output + int64 indices; backward
reads grad_output + indices, writes grad_input. Batch-norm backward reads grad_output and writes grad_input.
Everything is timed inside the CPU memory pool, as attacks and fit run these layers (outside it, each call's fresh
32 MB grad_input page-faults in and the backward pass times are mostly the kernel zeroing pages); with
$ROBUST_OPS_CPU_POOL=0, as they run then, outside it.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, which puts this checkout on the path
from common import (copy_roofline_seconds, default_threads, gbps, median_seconds, positive_int,  # noqa: E402
                    write_rows)

import robust_ops  # noqa: E402
from robust_ops import reference  # noqa: E402
from robust_ops.memory import library_pool  # noqa: E402


def pool_fn(provider, x, grad, backward):
    leaf = x.detach().clone().requires_grad_(backward)
    pool = robust_ops.max_pool2d if provider == "robust_ops.max_pool2d" else F.max_pool2d

    def run():
        out = pool(leaf, 3, 2, 1)
        if backward:
            torch.autograd.grad(out, leaf, grad)

    return run


def check_max_pool2d(x, grad):
    """robust_ops.max_pool2d == F.max_pool2d bitwise in both layouts, and for a channels_last input with an NCHW
    gradient -- output, indices, strides, input gradient -- before anything is timed."""
    for layout, grad_layout in ((torch.contiguous_format,) * 2, (torch.channels_last,) * 2,
                                (torch.channels_last, torch.contiguous_format)):
        xl, gl = x.contiguous(memory_format=layout), grad.contiguous(memory_format=grad_layout)
        results = []
        for pool in (F.max_pool2d, robust_ops.max_pool2d):
            leaf = xl.detach().clone().requires_grad_(True)
            out, idx = pool(leaf, 3, 2, 1, return_indices=True)
            (grad_input,) = torch.autograd.grad(out, leaf, gl)
            results.append((out, idx, grad_input))
        for what, theirs, ours in zip(("output", "indices", "input gradient"), *results):
            if not (torch.equal(ours, theirs) and ours.stride() == theirs.stride()):
                given = f"{layout}" if grad_layout == layout else f"{layout} with a {grad_layout} gradient"
                raise SystemExit(f"robust_ops.max_pool2d disagrees with F.max_pool2d ({given}, {what})")


def main():
    with library_pool("cpu"):  # as attacks and fit decide: on unless $ROBUST_OPS_CPU_POOL is off
        rows = measure()
    write_rows("bench_native_layers", rows, "cpu")


def measure():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch and short timing (smoke run)")
    parser.add_argument("--threads", type=positive_int, default=default_threads(),
                        help="CPU threads (default: $OMP_NUM_THREADS, else 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = 8 if args.quick else 32
    run_time = 0.2 if args.quick else 1.0
    rows = []

    x = torch.randn(n, 64, 64, 64)
    ref_out, ref_idx = reference.max_pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1), False)
    grad = torch.randn(ref_out.shape)
    check_max_pool2d(x, grad)
    fwd_bytes = 4 * x.numel() + 12 * ref_out.numel()
    copy_s = copy_roofline_seconds(2 * 4 * x.numel(), "cpu", run_time)
    copy_gbps = gbps(2 * 4 * x.numel(), copy_s)
    times = {}
    mixed = "channels_last/nchw_grad"  # forward+backward only: its forward is the channels_last row's
    for provider, layout in ((p, layout) for p in ("F.max_pool2d", "robust_ops.max_pool2d")
                             for layout in ("nchw", "channels_last", mixed)):
        xl = x if layout == "nchw" else x.contiguous(memory_format=torch.channels_last)
        gl = grad.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else grad
        passes = (("forward", False, fwd_bytes), ("forward+backward", True, 2 * fwd_bytes))
        for pass_name, backward, nbytes in passes[1:] if layout == mixed else passes:
            seconds = median_seconds(pool_fn(provider, xl, gl, backward), run_time)
            times[(provider, layout, pass_name)] = seconds
            rows.append({"op": "max_pool2d", "provider": provider, "layout": layout, "pass": pass_name,
                         "shape": "x".join(map(str, x.shape)), "median_ms": seconds * 1e3,
                         "x_aten_same_layout": "", "GB/s": gbps(nbytes, seconds),
                         "roofline_%": 100 * gbps(nbytes, seconds) / copy_gbps})
    for row in rows:
        row["x_aten_same_layout"] = times[("F.max_pool2d", row["layout"], row["pass"])] / (row["median_ms"] / 1e3)
    rows.append({"op": "max_pool2d", "provider": "copy (roofline)", "layout": "-", "pass": "copy_",
                 "shape": "x".join(map(str, x.shape)), "median_ms": copy_s * 1e3, "x_aten_same_layout": "",
                 "GB/s": copy_gbps, "roofline_%": 100.0})

    for (c, s), layout in ((cs, layout) for cs in ((64, 32), (128, 16), (256, 8), (512, 4))
                           for layout in ("nchw", "channels_last")):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        bn = torch.nn.BatchNorm2d(c).eval()
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.normal_()
        with torch.no_grad():
            bn.weight.normal_()
        xb = torch.randn(n, c, s, s).contiguous(memory_format=fmt)
        gb = torch.randn(n, c, s, s).contiguous(memory_format=fmt)
        w, rm, rv = bn.weight.detach(), bn.running_mean, bn.running_var
        ones = torch.ones(1, c, 1, 1)
        invstd = torch.ops.aten.native_batch_norm_backward(ones, ones, None, rm, rv, None, None, False, bn.eps,
                                                           [True, False, False])[0].reshape(-1)

        def aten():
            return torch.ops.aten.native_batch_norm_backward(gb, xb, w, rm, rv, None, None, False, bn.eps,
                                                             [True, False, False])[0]

        def ours():
            return torch.ops.robust_ops._eval_batch_norm_backward(gb, invstd, w)

        expected, got = aten(), ours()
        if not torch.equal(expected, got) or expected.stride() != got.stride():
            raise SystemExit(f"_eval_batch_norm_backward disagrees with ATen at C={c}, {layout}")
        nbytes = 2 * 4 * gb.numel()
        copy_s = copy_roofline_seconds(nbytes, "cpu", run_time)
        t_aten, t_ours = median_seconds(aten, run_time), median_seconds(ours, run_time)
        shape = "x".join(map(str, gb.shape))
        for provider, seconds, ratio in (("aten native_batch_norm_backward", t_aten, 1.0),
                                         ("robust_ops._eval_batch_norm_backward", t_ours, t_aten / t_ours),
                                         ("copy (roofline)", copy_s, "")):
            rows.append({"op": "eval batch-norm backward", "provider": provider, "layout": layout,
                         "pass": "backward", "shape": shape, "median_ms": seconds * 1e3, "x_aten_same_layout": ratio,
                         "GB/s": gbps(nbytes, seconds), "roofline_%": 100 * copy_s / seconds})
    return rows


if __name__ == "__main__":
    main()
