"""Benchmark helpers: median timing, the memory roofline (a same-size copy), GB/s, and a CSV/Markdown writer.

Timing uses torch.utils.benchmark (handles warm-up and CUDA sync). Report medians and ratios: the machine is shared.
"""

import argparse
import csv
import logging
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch


def _put_checkout_on_path():
    """This checkout's robust_ops for the scripts, ahead of an installed or editable one (run without
    `pip install -e`), but behind $PYTHONPATH's folders: `robust-ops bench --bench-dir` names its own package there,
    and an installed robust-ops running a checkout's scripts ran them on that checkout, not built in place, which
    stopped at `import robust_ops`."""
    explicit = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    at = max((i + 1 for i, entry in enumerate(sys.path) if os.path.abspath(entry or os.curdir) in explicit), default=0)
    sys.path.insert(at, str(Path(__file__).resolve().parents[1]))


_put_checkout_on_path()


def _import_torch_benchmark():
    # torch.utils.benchmark imports cpp_extension, which on a machine without CUDA logs "No CUDA runtime is found,
    # using CUDA_HOME=..." at import: about compiling extensions, which no benchmark does.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.benchmark as benchmark
    finally:
        log.setLevel(level)
    return benchmark


tbench = _import_torch_benchmark()


def _results_dir():
    """benchmarks/results/, or $ROBUST_OPS_BENCH_DIR. Checked when a benchmark starts, by the --out rule of the CLI
    (robust-ops bench checks it so too): a file in the way, a folder that cannot be written or a link to a folder not
    made yet would otherwise only fail when the rows are written, after minutes of timing."""
    from robust_ops._files import NOT_A_FOLDER, out_dir_problem

    # empty counts as unset, as the library's environment switches (Path("") would be the current folder)
    d = Path(os.environ.get("ROBUST_OPS_BENCH_DIR") or Path(__file__).resolve().parent / "results")
    problem = out_dir_problem(d, staged=False)  # each CSV is replaced inside the folder
    if problem:
        where = f"{d} is a file, not a folder" if problem == NOT_A_FOLDER else f"{d}: {problem}"
        raise SystemExit(f"{Path(sys.argv[0]).stem}: $ROBUST_OPS_BENCH_DIR: {where} (the CSVs go there)")
    return d


RESULTS_DIR = _results_dir()


def _check_library_switches():
    """The library's $ROBUST_OPS_* switches (backend, memory pool, native layers, prepacked convolutions, CPU vector
    path), checked at start as robust-ops checks them: a bad value was a traceback at the first call that read it --
    for $ROBUST_OPS_CPU_ISA in bench_pgd_step only when the rows were written, after every timing, table included."""
    from robust_ops.cli import CLIError, check_environment_switches

    try:
        check_environment_switches()
    except CLIError as err:
        raise SystemExit(f"{Path(sys.argv[0]).stem}: {err}") from None


_check_library_switches()


def median_seconds(fn, min_run_time=1.0):
    """Median wall time of fn() in seconds (blocked_autorange: repeated blocks, median over blocks)."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def synchronize(device=None):
    """Wait for queued GPU work (``device``'s, or the current GPU's when None), so that a wall-clock reading
    covers it; nothing to wait for on CPU."""
    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns, rounds, device=None):
    """For calls too slow to repeat in blocks (seconds each): one warm-up call each, then ``rounds`` rounds calling
    every fn once in turn, so load on a shared machine hits all alike. ``device``: where the calls run (waits for
    its queued GPU work after each call; pass it, or a CPU run on a GPU machine syncs, and first initialises, CUDA
    inside the timed calls). Returns (median seconds per fn, per-round times per fn)."""
    import statistics
    import time

    for fn in fns:
        fn()
    synchronize(device)  # else the warm-ups' queued GPU work lands in the first timed call
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], times


def with_env(env_var, value, fn):
    """Run fn with the environment variable env_var set to value (the library reads its switches, e.g.
    $ROBUST_OPS_BACKEND, per call), then restore it."""
    before = os.environ.get(env_var)
    os.environ[env_var] = value
    try:
        return fn()
    finally:
        if before is None:
            del os.environ[env_var]
        else:
            os.environ[env_var] = before


def default_threads(fallback=2):
    """--threads default of the op benchmarks: what $OMP_NUM_THREADS gave torch when it is set (a user pinning
    threads on a shared machine must not get ``fallback`` instead), else ``fallback`` (the docs' 2-thread numbers)."""
    return torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else fallback


def _int_at_least(text, minimum):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def positive_int(text):
    """argparse type: an integer >= 1 (a bad value is a one-line usage error, not a traceback)."""
    return _int_at_least(text, 1)


def nonnegative_int(text):
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def positive_int_list(text):
    """argparse type: a comma list of integers >= 1, e.g. 32,3,224,224."""
    try:
        return [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 1, got {text!r}") from None


def refuse_repeated(parser, flag, values):
    """A list option naming what to run, each entry at most once, as robust-ops bench's --only (cli.refuse_repeated):
    a repeat ran, and wrote its rows, twice -- likely a typo for another entry. A usage error otherwise."""
    from robust_ops.cli import CLIError, refuse_repeated as refuse

    try:
        refuse([str(v) for v in values], flag)
    except CLIError as err:
        parser.error(str(err))


def refuse_one_image_batch_norm(parser, model, size, in_channels=1):
    """--batch 1 where the model's training-mode batch norm would see one value per channel (its last feature maps
    are 1x1 at this --size): a usage error before any work, instead of torch's traceback at the first training step.
    ``model`` is a throwaway copy (its running statistics move)."""
    try:
        with torch.no_grad():
            model.train()(torch.zeros(1, in_channels, size, size))
    except ValueError as err:
        if "Expected more than 1 value per channel" not in str(err):
            raise
        parser.error(f"--batch 1: a training step would normalize one {size}x{size} image, and the model's batch "
                     "norm then sees a single value per channel (its last feature maps are 1x1); use --batch 2 or "
                     "more, or a larger --size")


def device_arg(text):
    """argparse type: a torch device this machine has (cpu, or cuda[:i] when a GPU is visible). cuda:i becomes the
    current GPU: torch.utils.benchmark's timer and a bare torch.cuda.synchronize() wait for that one only."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (expected cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is visible on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def copy_roofline_seconds(nbytes, device="cpu", min_run_time=1.0):
    """Time of a same-size copy (read + write nbytes/2 each way counts as moving nbytes): the memory roofline."""
    n = max(1, nbytes // 8)  # float32 elements per side so read + write = nbytes
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return median_seconds(lambda: dst.copy_(src), min_run_time)


def gbps(nbytes, seconds):
    return nbytes / seconds / 1e9


def git_sha(cwd=None):
    """The checkout's short commit, with "-dirty" when tracked files differ from it (the rows then measured code
    that commit does not hold); "unknown" outside a git checkout."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=cwd,
                                      stderr=subprocess.DEVNULL).strip()
        changed = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], text=True,
                                          cwd=cwd, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"
    return f"{sha}-dirty" if changed else sha


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name (Linux /proc/cpuinfo; else platform.processor(), which is often empty on Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device=None):
    """Where and with what the rows were measured. ``device``: where the benchmark ran (default: the GPU when one is
    visible); a CPU run on a GPU machine names the CPU, not the GPU it did not use."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    cpu_isa = "n/a"
    if device.type == "cpu":
        import robust_ops  # noqa: F401  (loads the ops)

        # the vector path the CPU pooling kernels took: AVX-512 and AVX2 machines differ (docs/benchmarks.md)
        cpu_isa = torch.ops.robust_ops._cpu_vector_isa()
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "n/a"
    return {
        "device": dev,
        "cpu_isa": cpu_isa,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "n/a",
        "git": git_sha(),
        "python": sys.version.split()[0],
        # a --quick smoke run writes the same file as a full run: the flags tell them apart; quoted as a shell
        # reads it (bench_ima's --variants "compacted,compacted channels_last" is one argument)
        "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def write_rows(name, rows, device=None):
    """Write rows (list of dicts) to RESULTS_DIR/<name>.csv (benchmarks/results/, or $ROBUST_OPS_BENCH_DIR) and print
    them as a Markdown table. ``device``: where they were measured (see environment); a row with its own "dev" (a
    benchmark that measures CPU and GPU in one run) is described by that device instead."""
    env = environment(device)
    envs = {}  # one environment() (two git calls) per device, not per row
    for dev in {row["dev"] for row in rows if "dev" in row}:
        envs[dev] = environment(dev)
    rows = [{**row, **(envs[row["dev"]] if "dev" in row else env)} for row in rows]
    path = RESULTS_DIR / f"{name}.csv"
    from robust_ops._files import replace_atomically

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)

    # the table first: a folder that cannot be written (full disk, permissions) costs the CSV, not the run's numbers
    print(markdown_table(rows, exclude=env.keys()))
    try:
        # a Ctrl-C or crash mid-write leaves the previous results, never half a table
        replace_atomically(path, write_csv, newline="")
    except OSError as err:
        raise SystemExit(f"cannot write {path} ({err.strerror or err}); the table above is all this run kept "
                         f"(set $ROBUST_OPS_BENCH_DIR to a writable folder)") from None
    isa = f"{env['cpu_isa']}, " if env["cpu_isa"] != "n/a" else ""
    print(f"\n({env['device']}, {isa}{env['threads']} threads, torch {env['torch']}, git {env['git']}; csv: {path})")
    return path


def markdown_table(rows, exclude=()):
    keys = [k for k in rows[0] if k not in exclude]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
