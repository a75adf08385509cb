"""Benchmark boundary_search_step_: one search round, kernel vs the plain-PyTorch reference, the peer and the memory
roofline, and the kernel's share of a round once the model forwards are counted (the number that matters: the
forwards of the k-1 interior points dominate).

Per round of a k-ary search on a batch of N samples:
  * kernel: boundary_search_step_ (native C++/CUDA; Triton too on CUDA)
  * reference: robust_ops.reference.boundary_search_step_ (eager PyTorch)
  * peer (k = 2 only): the paper's bisection (IMA, Algorithm 2) as eager PyTorch writes it for a batch -- the midpoint
    replaces hi where it crossed and lo where it did not, then the next midpoint (lo + hi) / 2 -- what a user without
    the op would run; the paper searches by bisection only, so k = 4 rows have no peer (peer_ms nan)
  * roofline, two counts, each timed as a same-size copy:
      - min: the least traffic a round needs: for each ACTIVE sample read its two bracketing slices, write the bound(s)
        that change (lo unless crossed_at = 0, hi unless crossed_at = k-1) and the k-1 new points (bytes read +
        bytes written, the kernel's own count). 100% is copy speed, not a bound: the copy writes a separate buffer
        (on CPU each written line is read first, write-allocate), while the kernel rewrites in place the point slice
        it has just read, so pct_roofline_min can exceed 100% (114% / 109% at 224x224 in docs/benchmarks.md);
      - all: read and write all of lo, hi, points, 2 (k + 1) N D elements (the GPU table in docs/benchmarks.md uses it).
  * forward: resnet18 (robust_ops.models, eval mode, no_grad) on the k-1 interior points, (k-1) N images
    (with --quick on CPU: one forward of N images, times k-1).

Usage: python benchmarks/bench_boundary_search.py [--quick] [--device cpu|cuda] [--threads T]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common, which puts this checkout on the path

import common  # noqa: E402

import robust_ops  # noqa: E402
from robust_ops import reference  # noqa: E402
from robust_ops.models import build_model  # noqa: E402

SHAPES = ((32, 1, 28, 28), (32, 3, 224, 224))
ARITIES = (2, 4)


def make_round(shape, k, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    lo = torch.rand(shape, generator=gen).to(device, dtype)
    hi = torch.rand(shape, generator=gen).to(device, dtype)
    points = torch.stack([lo * a + hi * b for a, b in reference.interpolation_weights(k)])
    crossed_at = torch.randint(0, k, (shape[0],), generator=gen).to(device)
    active = (torch.rand(shape[0], generator=gen) < 0.75).to(device)
    return lo, hi, points, crossed_at, active


def paper_bisection_(lo, hi, points, crossed_at, active=None):
    """The peer, k = 2: one round of the paper's bisection on a batch, in place, with the op's arguments (points[0]: the
    midpoint; crossed_at 0: it crossed). (lo + hi) / 2 rounds as the op's lo * 0.5 + hi * 0.5 away from subnormals
    and overflow; the run checks it against the reference before timing it."""
    if points.shape[0] != 1:
        raise ValueError(f"paper_bisection_: bisection only (k = 2), got k = {points.shape[0] + 1}")
    shape = (lo.shape[0],) + (1,) * (lo.dim() - 1)
    crossed = (crossed_at == 0).view(shape)
    live = torch.ones_like(crossed) if active is None else active.view(shape)
    mid = points[0]
    new_hi = torch.where(crossed & live, mid, hi)
    new_lo = torch.where(~crossed & live, mid, lo)
    new_mid = torch.where(live, (new_lo + new_hi) / 2, mid)
    lo.copy_(new_lo)
    hi.copy_(new_hi)
    mid.copy_(new_mid)


def min_traffic_elements(args):
    """Elements a round must move at least (see the module docstring), from its crossed_at and active mask."""
    lo, _, points, crossed_at, active = args
    k, d = points.shape[0] + 1, lo[0].numel()
    per_sample = 2 + (crossed_at > 0).long() + (crossed_at < k - 1).long() + (k - 1)
    return int((per_sample * active.long()).sum()) * d


def check_against_reference(name, fn, args):
    """Stops the run (one line, no traceback) when provider ``name`` writes lo, hi or the points differently from the
    reference: a wrong kernel is not timed."""
    got = [t.clone() for t in args[:3]]
    want = [t.clone() for t in args[:3]]
    fn(*got, *args[3:])
    reference.boundary_search_step_(*want, *args[3:])
    for what, g, w in zip(("lo", "hi", "points"), got, want):
        if not torch.equal(g, w):
            diff = (g.double() - w.double()).abs().max().item()
            raise SystemExit(f"bench_boundary_search: {name}: {what} differs from the reference on "
                             f"{tuple(args[0].shape)} (max |diff| {diff:.3g}); not timing a wrong kernel")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def forward_seconds(model, shape, batch, device, reps):
    """Median wall time of reps no_grad forwards of batch images (after one warm-up)."""
    x = torch.rand((batch,) + tuple(shape[1:]), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(reps):
            sync(device)
            start = time.perf_counter()
            model(x)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short timing runs (noisier)")
    parser.add_argument("--device", type=common.device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=common.positive_int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    scaled_forward = args.quick and torch.device(device).type == "cpu"
    min_time = 0.2 if args.quick else 1.0

    providers = {"native": torch.ops.robust_ops.boundary_search_step_}
    if torch.device(device).type == "cuda" and hasattr(torch.ops.robust_ops, "boundary_search_step_triton"):
        providers["triton"] = torch.ops.robust_ops.boundary_search_step_triton
    elif torch.device(device).type == "cuda":
        print("triton: skipped, robust_ops::boundary_search_step_triton is not registered (Triton missing or not "
              "importable)")

    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)  # the same weights in every run, as the other benchmarks
        model = build_model("resnet18", in_channels=shape[1], num_classes=2, image_size=shape[2]).to(device).eval()
        forward_cache = {}
        for k in ARITIES:
            args_ = make_round(shape, k, device)
            for name, fn in providers.items():
                check_against_reference(name, fn, args_)
            numel = args_[0].numel()
            nbytes = 2 * (k + 1) * numel * args_[0].element_size()
            min_bytes = min_traffic_elements(args_) * args_[0].element_size()

            def timed(fn):
                state = [t.clone() for t in args_[:3]]
                return common.median_seconds(lambda: (fn(*state, *args_[3:]), sync(device)), min_time)

            ref_s = timed(reference.boundary_search_step_)
            peer_s = float("nan")
            if k == 2:
                check_against_reference("peer", paper_bisection_, args_)
                peer_s = timed(paper_bisection_)
            roof_s = common.copy_roofline_seconds(nbytes, device, min_time)
            roof_min_s = common.copy_roofline_seconds(min_bytes, device, min_time)
            batch = shape[0] if scaled_forward else (k - 1) * shape[0]
            if batch not in forward_cache:
                forward_cache[batch] = forward_seconds(model, shape, batch, device, 1 if args.quick else 3)
            fwd_s = forward_cache[batch] * ((k - 1) if scaled_forward else 1)
            for name, fn in providers.items():
                kern_s = timed(fn)
                rows.append({
                    "shape": "x".join(map(str, shape)),
                    "k": k,
                    "provider": name,
                    "kernel_ms": kern_s * 1e3,
                    "reference_ms": ref_s * 1e3,
                    "speedup_vs_ref": ref_s / kern_s,
                    "peer_ms": peer_s * 1e3,
                    "speedup_vs_peer": peer_s / kern_s,
                    "roofline_min_ms": roof_min_s * 1e3,
                    "pct_roofline_min": 100 * roof_min_s / kern_s,
                    "GB/s_min": common.gbps(min_bytes, kern_s),
                    "roofline_all_ms": roof_s * 1e3,
                    "pct_roofline_all": 100 * roof_s / kern_s,
                    "forward_ms": fwd_s * 1e3,
                    "kernel_share_of_round_pct": 100 * kern_s / (kern_s + fwd_s),
                    "ref_share_of_round_pct": 100 * ref_s / (ref_s + fwd_s),
                })
                print(f"{rows[-1]['shape']} k={k} {name}: kernel {kern_s * 1e3:.3f} ms, reference {ref_s * 1e3:.3f} "
                      f"ms, peer {peer_s * 1e3:.3f} ms, forward {fwd_s * 1e3:.1f} ms", flush=True)  # progress
    common.write_rows("boundary_search", rows, device)


if __name__ == "__main__":
    main()
