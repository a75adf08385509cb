"""Benchmark helpers: median timing, the memory roofline (a same-size copy), GB/s, and a CSV/Markdown writer.

Timing uses torch.utils.benchmark (handles warm-up and CUDA sync). Report medians and ratios: the machine is shared.
"""

import csv
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

RESULTS_DIR = Path(os.environ.get("ROBUST_OPS_BENCH_DIR", Path(__file__).resolve().parent / "results"))


def median_seconds(fn, min_run_time=1.0):
    """Median wall time of fn() in seconds (blocked_autorange: repeated blocks, median over blocks)."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def synchronize(device=None):
    """Wait for queued GPU work (``device``'s, or every visible GPU's when None), so that a wall-clock reading
    covers it; nothing to wait for on CPU."""
    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns, rounds):
    """For calls too slow to repeat in blocks (seconds each): one warm-up call each, then ``rounds`` rounds calling
    every fn once in turn, so load on a shared machine hits all alike. Returns (median seconds per fn, per-round
    times per fn)."""
    import statistics
    import time

    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            synchronize()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], times


def copy_roofline_seconds(nbytes, device="cpu", min_run_time=1.0):
    """Time of a same-size copy (read + write nbytes/2 each way counts as moving nbytes): the memory roofline."""
    n = max(1, nbytes // 8)  # float32 elements per side so read + write = nbytes
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return median_seconds(lambda: dst.copy_(src), min_run_time)


def gbps(nbytes, seconds):
    return nbytes / seconds / 1e9


def git_sha():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).resolve().parent, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def environment():
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or 'cpu'}"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "n/a"
    return {
        "device": dev,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "n/a",
        "git": git_sha(),
        "python": sys.version.split()[0],
    }


def write_rows(name, rows):
    """Write rows (list of dicts) to benchmarks/results/<name>.csv and print them as a Markdown table."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = environment()
    rows = [{**row, **env} for row in rows]
    path = RESULTS_DIR / f"{name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    print(markdown_table(rows, exclude=env.keys()))
    print(f"\n({env['device']}, {env['threads']} threads, torch {env['torch']}, git {env['git']}; csv: {path})")
    return path


def markdown_table(rows, exclude=()):
    keys = [k for k in rows[0] if k not in exclude]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
