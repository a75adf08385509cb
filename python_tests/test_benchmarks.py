"""The benchmark scripts run and check what they time (tiny shapes; the timings themselves are not tested)."""

import csv
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_attack_peer_table_runs_and_matches_where_it_should(tmp_path):
    pytest.importorskip("torchattacks")
    env = {**os.environ, "ROBUST_OPS_BENCH_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_attacks.py"), "--quick", "--peers-only",
           "--models", "small-resnet", "--batch", "4", "--size", "16", "--train-steps", "2", "--peer-rounds", "1"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "bench_attacks_peers.csv") as f:
        rows = {row["attack"]: row for row in csv.DictReader(f)}
    # every attack of the registry (robust_ops.attacks.ATTACKS): untargeted FAB and APGD-DLR had no row
    assert list(rows) == ["fgsm", "pgd-5", "bim-5", "pgdl2-5", "cw-linf-5", "apgd-ce-5", "apgd-ce-5 eot-4",
                          "apgd-ce-5 l1", "apgd-dlr-5", "apgd-t-5", "fab-5", "fab-t-5", "fab-t-5 l1", "square-40",
                          "square-l2-40", "white noise x10", "cascade apgd-ce-5>square-40",
                          "autoattack apgd-ce-5>apgd-t-5>fab-t-5>square-40"]
    # The reference ops compute what the native ones do, bit for bit, in every attack.
    assert all(row["same_as_reference_ops"] == "True" for row in rows.values())
    # torchattacks' FGSM, PGDL2 and FAB (untargeted and FAB-T) are bitwise ours; every attack without a counterpart
    # says why.
    assert rows["fgsm"]["same_as_peer"] == rows["pgd-5"]["same_as_peer"] == rows["pgdl2-5"]["same_as_peer"] == "True"
    for case in ("fab-5", "fab-t-5"):
        assert rows[case]["same_as_peer"] == "True" and rows[case]["peer"] == "torchattacks.FAB"
    for case in ("cw-linf-5", "apgd-ce-5 l1", "apgd-dlr-5", "apgd-t-5", "fab-t-5 l1", "white noise x10",
                 "autoattack apgd-ce-5>apgd-t-5>fab-t-5>square-40"):
        assert rows[case]["peer"].startswith("none: ") and rows[case]["same_as_peer"] == "n/a"
    assert rows["square-40"]["peer"] == rows["square-l2-40"]["peer"] == "torchattacks.Square"
    assert all(float(row["ours_ms"]) > 0 for row in rows.values())
    # the roofline is one batch copy per iteration: a floor far below any attack that runs a model
    assert all(0 < float(row["roofline_ms"]) < float(row["ours_ms"]) for row in rows.values())
    assert float(rows["square-40"]["roofline_ms"]) == pytest.approx(40 * float(rows["fgsm"]["roofline_ms"]))


# robust_ops.attacks.ATTACKS' names and the peer-table row that times each (steps 5, queries 40)
REGISTRY_ROWS = {"fgsm": "fgsm", "ifgsm": "bim-5", "pgd": "pgd-5", "pgdl2": "pgdl2-5", "cw": "cw-linf-5",
                 "apgd-ce": "apgd-ce-5", "apgd-dlr": "apgd-dlr-5", "apgd-t": "apgd-t-5", "fab": "fab-5",
                 "fab-t": "fab-t-5", "square": "square-40", "noise": "white noise x10",
                 "autoattack": "autoattack apgd-ce-5>apgd-t-5>fab-t-5>square-40"}


def test_attack_peer_table_has_a_row_for_every_attack_of_the_registry(monkeypatch):
    """docs/benchmarks.md promises every attack beside its reference ops, its peer and its roofline: untargeted FAB
    (the registry's "fab", bitwise torchattacks.FAB) and APGD-DLR ("apgd-dlr") had no row. An attack added to the
    registry fails here until the table times it."""
    pytest.importorskip("torchattacks")
    from robust_ops.attacks import ATTACKS

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_attacks

    assert set(REGISTRY_ROWS) == set(ATTACKS)
    model = bench_attacks.make_model("small-resnet", "cpu", 16)
    cases = {case: (peer, iterations) for case, _, peer, _, iterations in bench_attacks.peer_cases(model, 4 / 255, 5,
                                                                                                   40)}
    missing = sorted(name for name, row in REGISTRY_ROWS.items() if row not in cases)
    assert not missing, f"attacks without a peer-table row: {missing}"
    peer, iterations = cases["fab-5"]
    assert type(peer).__name__ == "FAB" and not peer.multi_targeted and iterations == 5


BAD_FLAGS = [
    ("bench_drop_max_pool2d", ["--threads", "0"]),
    ("bench_drop_max_pool2d", ["--shape", "0", "1", "4", "4"]),
    ("bench_pgd_step", ["--shape", "abc"]),
    ("bench_pgd_step", ["--threads", "0"]),
    ("bench_pgd_step", ["--device", "bogus"]),
    ("bench_boundary_search", ["--device", "bogus"]),
    ("bench_boundary_search", ["--threads", "-1"]),
    ("bench_native_layers", ["--threads", "-1"]),
    ("bench_prepacked_conv", ["--batches", "4,x"]),
    ("bench_prepacked_conv", ["--rounds", "0"]),
    ("bench_defenses", ["--model", "nope"]),
    ("bench_defenses", ["--batch", "0"]),
    ("bench_defenses", ["--rounds", "0"]),
    ("bench_defenses", ["--warmup", "-1"]),
    ("bench_defenses", ["--defenses"]),  # none named: ran the standard step alone, no defense
    ("bench_attacks", ["--models", "small-resnet,nope"]),
    ("bench_attacks", ["--models", "mlp"]),  # one logit for two classes: crashed in torchattacks' cross-entropy
    ("bench_attacks", ["--rounds", "0"]),
    ("bench_attacks", ["--peer-rounds", "0"]),
    ("bench_attacks", ["--peers-only", "--no-peers"]),
    ("bench_attacks", ["--threads", "0"]),
    ("bench_defenses", ["--threads", "0"]),
    ("bench_defenses", ["--fit-steps", "-1"]),
    ("bench_ima", ["--images", "0"]),
    ("bench_ima", ["--repeats", "0"]),
]


@pytest.mark.parametrize("script,argv", BAD_FLAGS, ids=[f"{s}{''.join(a)}" for s, a in BAD_FLAGS])
def test_bad_flags_are_one_usage_error_before_any_work(script, argv, monkeypatch, capsys):
    """A bad value is argparse's usage error (exit status 2), not a traceback later on, nor silently the default
    (``--rounds 0`` used to mean 7 rounds)."""
    import argparse
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    module = importlib.import_module(script)
    parse_args = argparse.ArgumentParser.parse_args

    def parse_or_stop(self, *a, **kw):
        parse_args(self, *a, **kw)
        raise AssertionError(f"{script} {' '.join(argv)}: accepted")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_or_stop)
    monkeypatch.setattr(sys, "argv", [f"{script}.py"] + argv)
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err.strip().splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("script", ["bench_drop_max_pool2d", "bench_native_layers", "bench_pgd_step"])
@pytest.mark.parametrize("omp", [None, "1", "3"])
def test_op_benchmarks_default_threads_follow_omp_num_threads(script, omp, monkeypatch):
    """OMP_NUM_THREADS=1 (a shared machine) is what the run uses unless --threads says otherwise; unset: 2 threads,
    as the docs' numbers were taken."""
    import argparse
    import importlib

    import torch

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(torch, "get_num_threads", lambda: int(omp or 99))  # what torch read at start-up
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    module = importlib.import_module(script)
    parse_args, parsed = argparse.ArgumentParser.parse_args, []

    def parse_and_stop(self, *a, **kw):
        parsed.append(parse_args(self, *a, **kw))
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    for argv, expected in (([], int(omp) if omp else 2), (["--threads", "5"], 5)):
        monkeypatch.setattr(sys, "argv", [f"{script}.py"] + argv)
        with pytest.raises(SystemExit):
            module.main()
        assert parsed[-1].threads == expected


def test_cuda_device_flag_without_a_gpu_is_a_usage_error(monkeypatch, capsys):
    import argparse

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import common

    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", type=common.device_arg, default="cpu")
    assert parser.parse_args([]).device == common.torch.device("cpu")
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "cuda"])
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_interleaved_medians_on_cpu_leaves_cuda_alone(monkeypatch):
    """A CPU run on a GPU machine must not synchronize (and so initialise) CUDA inside its timed calls."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import common

    def no_sync(*_):
        raise AssertionError("torch.cuda.synchronize called in a CPU benchmark")

    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "synchronize", no_sync)
    calls = []
    medians, times = common.interleaved_medians([lambda: calls.append("a"), lambda: calls.append("b")], 3, "cpu")
    assert calls == ["a", "b"] * 4  # one warm-up call each, then 3 timed rounds, interleaved
    assert len(medians) == 2 and [len(t) for t in times] == [3, 3]


def test_rows_of_a_cpu_run_on_a_gpu_machine_name_the_cpu(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import common

    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "get_device_name", lambda *_: "Some GPU")
    assert common.environment("cpu")["device"] != "Some GPU"
    assert common.environment("cuda")["device"] == "Some GPU"
    assert common.environment()["device"] == "Some GPU"  # the default: the GPU when one is visible
    # the CPU kernels' vector path describes CPU rows only
    assert common.environment("cpu")["cpu_isa"] == common.torch.ops.robust_ops._cpu_vector_isa()
    assert common.environment("cuda")["cpu_isa"] == "n/a"


def _common(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import common

    return common


def test_median_seconds_is_the_median_of_blocked_autorange(monkeypatch):
    common = _common(monkeypatch)
    asked = []

    class Measurement:
        median, mean = 2.0, 3.0

    class Timer:
        def __init__(self, stmt, globals, num_threads):
            asked.append((globals["fn"], num_threads))

        def blocked_autorange(self, min_run_time):
            asked.append(min_run_time)
            return Measurement

    monkeypatch.setattr(common.tbench, "Timer", Timer)
    fn = object()
    monkeypatch.setattr(common.torch, "get_num_threads", lambda: 3)  # timed with the threads the run set
    assert common.median_seconds(fn, min_run_time=0.25) == 2.0
    assert asked == [(fn, 3), 0.25]


def test_interleaved_medians_time_each_call_with_its_sync(monkeypatch):
    """Medians (not means) of per-round times, each covering the call and the wait for ``device``'s GPU work, on a
    fake clock."""
    import time

    common = _common(monkeypatch)
    now = [0.0]
    synced = []

    def sync(device=None):
        synced.append(device)
        now[0] += 0.5  # queued GPU work finishing: part of the call's time

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(common, "synchronize", sync)

    def call(durations):
        return lambda: now.__setitem__(0, now[0] + durations.pop(0))

    # First duration of each: the warm-up call, never timed.
    fns = [call([100.0, 1.0, 1.0, 10.0]), call([100.0, 2.0, 3.0, 2.0])]
    medians, times = common.interleaved_medians(fns, 3, "cuda:1")
    assert times == [[1.5, 1.5, 10.5], [2.5, 3.5, 2.5]]
    assert medians == [1.5, 2.5]
    assert synced == ["cuda:1"] * 7  # one after the warm-ups, one per timed call


def test_interleaved_medians_keeps_the_warm_ups_gpu_work_out_of_the_first_timed_call(monkeypatch):
    """A GPU call returns before its work is done: the warm-ups' queued work must be waited for before the first
    timed call starts, not inside it."""
    import time

    common = _common(monkeypatch)
    now, queued = [0.0], [0.0]

    def sync(device=None):
        now[0] += queued[0]
        queued[0] = 0.0

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(common, "synchronize", sync)

    def call(gpu_seconds):  # returns at once, leaving gpu_seconds of work queued on the GPU
        return lambda: queued.__setitem__(0, queued[0] + gpu_seconds)

    _, times = common.interleaved_medians([call(1.0), call(2.0)], 3, "cuda")
    assert times == [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]


def test_synchronize_waits_for_the_named_gpu_only(monkeypatch):
    common = _common(monkeypatch)
    calls = []
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "synchronize", lambda *args: calls.append(args))
    common.synchronize("cpu")
    assert calls == []
    common.synchronize("cuda:1")
    assert calls == [("cuda:1",)]
    common.synchronize()
    assert calls == [("cuda:1",), ()]


def test_copy_roofline_moves_the_given_bytes(monkeypatch):
    """read + write of float32 elements = nbytes (at least one element); gbps in 1e9 bytes per second."""
    common = _common(monkeypatch)
    monkeypatch.setattr(common, "median_seconds", lambda fn, min_run_time: fn().numel())  # the copy's size
    assert common.copy_roofline_seconds(800) == 100
    assert common.copy_roofline_seconds(4) == 1
    assert common.gbps(3e9, 1.5) == 2.0


_FAKE_ENV = {"device": "cpu-x", "cpu_isa": "avx2", "threads": 2, "torch": "2.x", "git": "abc"}  # environment()'s keys


def test_write_rows_csv_and_markdown(monkeypatch, tmp_path, capsys):
    common = _common(monkeypatch)
    env = dict(_FAKE_ENV)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(common, "environment", lambda device=None: dict(env))
    path = common.write_rows("demo", [{"op": "a", "ms": 1.23456}, {"op": "b", "ms": 2.0}])
    assert path == tmp_path / "results" / "demo.csv"
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows == [["op", "ms", "device", "cpu_isa", "threads", "torch", "git"],
                    ["a", "1.23456", "cpu-x", "avx2", "2", "2.x", "abc"],
                    ["b", "2.0", "cpu-x", "avx2", "2", "2.x", "abc"]]
    table = capsys.readouterr().out.splitlines()
    assert table[:4] == ["| op | ms |", "|---|---|", "| a | 1.235 |", "| b | 2 |"]
    assert table[-1] == f"(cpu-x, avx2, 2 threads, torch 2.x, git abc; csv: {path})"


def test_write_rows_describes_each_row_by_its_own_device(monkeypatch, tmp_path):
    """A benchmark measuring CPU and GPU in one run (drop_max_pool2d) labels each row with the device it ran on."""
    common = _common(monkeypatch)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(common, "environment",
                        lambda device=None: dict(_FAKE_ENV, device=f"name of {device}"))
    path = common.write_rows("demo", [{"dev": "cpu", "op": "a"}, {"dev": "cuda", "op": "a"}, {"dev": "cpu", "op": "b"}],
                             device="cuda")
    with open(path) as f:
        assert [row["device"] for row in csv.DictReader(f)] == ["name of cpu", "name of cuda", "name of cpu"]


def test_write_rows_leaves_the_previous_results_when_interrupted_mid_write(monkeypatch, tmp_path):
    """The CSV is staged beside the file and moved over it: a Ctrl-C while writing keeps the last complete table."""
    common = _common(monkeypatch)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    env = dict(_FAKE_ENV)
    monkeypatch.setattr(common, "environment", lambda device=None: dict(env))
    path = common.write_rows("demo", [{"op": "old"}])
    before = path.read_text()

    def interrupted(self, rows):
        self.writerow(rows[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(common.csv.DictWriter, "writerows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.write_rows("demo", [{"op": "new"}, {"op": "newer"}])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["demo.csv"]  # no staging file left behind


def test_write_rows_of_two_processes_at_once_stage_in_files_of_their_own(monkeypatch, tmp_path):
    """Two runs writing the same CSV at once (one finishing while the other writes) each move their own staging file;
    a shared one would be moved away under the other, which would then fail. The last move wins."""
    common = _common(monkeypatch)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(common, "environment",
                        lambda device=None: dict(_FAKE_ENV))
    pid = [1]
    monkeypatch.setattr(common.os, "getpid", lambda: pid[0])
    writerows = common.csv.DictWriter.writerows

    def other_process_writes_meanwhile(self, rows):
        if pid[0] == 1:
            pid[0] = 2
            common.write_rows("demo", [{"op": "other"}])
            pid[0] = 1
        writerows(self, rows)

    monkeypatch.setattr(common.csv.DictWriter, "writerows", other_process_writes_meanwhile)
    path = common.write_rows("demo", [{"op": "mine"}])
    with open(path) as f:
        assert [row["op"] for row in csv.DictReader(f)] == ["mine"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo.csv"]


def test_environment_names_the_cpu_model_the_commit_and_the_command(monkeypatch, tmp_path):
    """Rows say which CPU they ran on (platform.processor() is empty on many Linux machines), which commit -- marked
    dirty when tracked files differ from it -- and the command line (a --quick run writes the same file)."""
    common = _common(monkeypatch)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9999 64-Core Processor\n")
    assert common.cpu_name(str(cpuinfo)) == "AMD EPYC 9999 64-Core Processor"
    monkeypatch.setattr(common.platform, "processor", lambda: "")
    monkeypatch.setattr(common.platform, "machine", lambda: "x86_64")
    assert common.cpu_name(str(tmp_path / "missing")) == "x86_64"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: \n")  # an empty model name is no name: the fallback
    assert common.cpu_name(str(cpuinfo)) == "x86_64"

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    (repo / "f.py").write_text("a\n")
    subprocess.run(git + ["add", "f.py"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "m"], cwd=repo, check=True)
    sha = common.git_sha(repo)
    assert re.fullmatch(r"[0-9a-f]{4,}", sha)
    (repo / "results.csv").write_text("untracked output\n")
    assert common.git_sha(repo) == sha  # untracked files (results) do not change what was measured
    (repo / "f.py").write_text("b\n")
    assert common.git_sha(repo) == f"{sha}-dirty"
    assert common.git_sha(tmp_path) == "unknown"

    monkeypatch.setattr(common, "cpu_name", lambda: "Some CPU")
    monkeypatch.setattr(common.sys, "argv", ["/x/benchmarks/bench_demo.py", "--quick", "--threads", "1"])
    env = common.environment("cpu")
    assert env["device"] == "Some CPU" and env["command"] == "bench_demo.py --quick --threads 1"


def test_environment_records_a_command_that_reruns_as_given(monkeypatch):
    """An argument holding a space (bench_ima.py --variants "compacted,compacted channels_last prepacked", as
    docs/benchmarks.md runs it) is quoted in the CSV's command: joined bare, it read as three arguments."""
    import shlex

    common = _common(monkeypatch)
    argv = ["/x/benchmarks/bench_ima.py", "--variants", "compacted,compacted channels_last prepacked", "--repeats", "2"]
    monkeypatch.setattr(common.sys, "argv", argv)
    command = common.environment("cpu")["command"]
    assert shlex.split(command) == ["bench_ima.py"] + argv[1:]


def test_argparse_types_accept_their_bounds(monkeypatch):
    import argparse

    common = _common(monkeypatch)
    assert common.positive_int("1") == 1 and common.nonnegative_int("0") == 0
    assert common.positive_int_list("32,1") == [32, 1]
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected a comma list of integers >= 1, got '4,0'$"):
        common.positive_int_list("4,0")


def test_device_arg_refuses_a_cuda_index_past_the_visible_gpus(monkeypatch):
    import argparse

    common = _common(monkeypatch)
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(common.torch.cuda, "set_device", lambda device: None)
    assert common.device_arg("cuda:0") == common.torch.device("cuda:0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"'cuda:1': only 1 CUDA device\(s\) visible"):
        common.device_arg("cuda:1")
    with pytest.raises(argparse.ArgumentTypeError, match="expected cpu or cuda, got 'meta'"):
        common.device_arg("meta")


def test_device_arg_makes_the_named_gpu_the_one_the_timers_wait_for(monkeypatch):
    """--device cuda:1 timed its calls with torch.utils.benchmark and bare torch.cuda.synchronize(), which wait for
    the current GPU (cuda:0) only: the readings missed the work queued on cuda:1."""
    common = _common(monkeypatch)
    current = []
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(common.torch.cuda, "set_device", current.append)
    common.device_arg("cuda")  # no index: the current GPU already
    common.device_arg("cpu")
    assert current == []
    common.device_arg("cuda:1")
    assert current == [common.torch.device("cuda:1")]


# In-process runs of each script's main() on tiny inputs, with its timers replaced by fakes that first run the call
# they were given (spies record what it did) and then return a time that encodes it: every CSV column can then be
# checked against what its row says was timed, and every ratio against its two times.


def _script(monkeypatch, name, argv):
    """(module, rows written per CSV name, torch.set_num_threads calls) for benchmarks/<name>.py run with ``argv``."""
    import importlib

    import torch

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    module = importlib.import_module(name)
    common = importlib.import_module("common")
    written = {}

    def capture(csv_name, rows, device=None):
        written[csv_name] = rows

    def copy_seconds(nbytes, device="cpu", min_run_time=1.0):
        return nbytes * 1e-9  # a 1 GB/s copy

    for target in (module, common):
        for attr, fake in (("write_rows", capture), ("copy_roofline_seconds", copy_seconds)):
            if hasattr(target, attr):
                monkeypatch.setattr(target, attr, fake)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # record, and leave this process's threads alone
    monkeypatch.setattr(sys, "argv", [f"{name}.py"] + argv)
    return module, written, threads


def _layout(t):
    return "nchw" if t.is_contiguous() else "channels_last"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pgd_step_rows_time_each_provider_on_its_own_case(monkeypatch, dtype):
    import torch

    from robust_ops import reference

    mod, written, threads = _script(monkeypatch, "bench_pgd_step",
                                    ["--shape", "2,3,4,4", "--no-compile", "--threads", "1", "--dtype", dtype])
    log = []

    def spy(name, real):
        def call(x_adv, x_nat, grad, alpha, eps, lo, hi, norm, hist, slot):
            log.append((name, norm, hist is not None, tuple(x_adv.shape), x_adv.dtype))
            return real(x_adv, x_nat, grad, alpha, eps, lo, hi, norm, hist, slot)
        return call

    monkeypatch.setattr(torch.ops.robust_ops, "pgd_step_", spy("native", torch.ops.robust_ops.pgd_step_))
    monkeypatch.setattr(reference, "pgd_step_", spy("eager", reference.pgd_step_))
    monkeypatch.setattr(mod, "torchattacks_step", spy("torchattacks", mod.torchattacks_step))

    def seconds(provider, norm, history):
        return {"native": 1, "eager": 5, "torchattacks": 4}[provider] * (2 if norm == "l2" else 1) * (
            3 if history else 1) * 1e-3

    def fake_median(fn, min_run_time=1.0):
        del log[:]
        fn()
        (call,) = log
        assert call[3:] == ((2, 3, 4, 4), getattr(torch, dtype))
        return seconds(*call[:3])

    monkeypatch.setattr(mod.common, "median_seconds", fake_median)
    mod.main()
    assert threads == [1]
    rows = written["pgd_step_cpu"]
    assert [(r["norm"], r["history"], r["provider"]) for r in rows] == [
        (n, h, p) for n in ("linf", "l2") for h in (False, True)
        for p in ("native", "eager", "torchattacks", "copy (roofline)")]
    element = 4 if dtype == "float32" else 8
    for r in rows:
        nbytes = 2 * 3 * 4 * 4 * element * (5 if r["history"] else 4)
        copy_s = nbytes * 1e-9
        copy = r["provider"] == "copy (roofline)"
        s = copy_s if copy else seconds(r["provider"], r["norm"], r["history"])
        assert r["median_ms"] == pytest.approx(s * 1e3)
        assert r["GB/s"] == pytest.approx(nbytes / s / 1e9)
        assert r["pct_of_copy"] == pytest.approx(100 * copy_s / s)
        assert r["speedup_vs_eager"] == pytest.approx(seconds("eager", r["norm"], r["history"]) / s)
        assert r["speedup_vs_torchattacks"] == pytest.approx(seconds("torchattacks", r["norm"], r["history"]) / s)
        assert r["equal_to_eager"] == ("" if copy else True)


@pytest.mark.parametrize("fault", ["x_adv", "history"])
def test_pgd_step_stops_at_a_provider_that_differs_from_eager(monkeypatch, fault):
    """Also a provider checked after others, which never writes the history slot: the slot must not still hold
    what an earlier provider wrote there."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_pgd_step", ["--shape", "2,3,4,4", "--no-compile"])
    real_providers = mod.providers

    def broken(x_adv, x_nat, grad, alpha, eps, lo, hi, norm, hist, slot):
        torch.ops.robust_ops.pgd_step_(x_adv, x_nat, grad, alpha, eps, lo, hi, norm,
                                       None if fault == "history" else hist, slot)
        if fault == "x_adv":
            x_adv.add_(1e-3)

    monkeypatch.setattr(mod, "providers", lambda device, use_compile: {**real_providers(device, use_compile),
                                                                        "broken": broken})
    monkeypatch.setattr(mod.common, "median_seconds", lambda fn, min_run_time=1.0: 1.0)
    what = "x_adv" if fault == "x_adv" else r"history\[1\]"
    with pytest.raises(SystemExit, match=rf"^broken: {what} differs from the eager chain"):
        mod.main()
    assert not written


def test_pgd_step_stops_at_a_kernel_that_reads_one_samples_alpha_and_eps_for_all(monkeypatch):
    """The timed inputs give every sample the same alpha and eps (torchattacks holds one number), so a kernel reading
    sample 0's for the whole batch passed the check and was timed; native and triton are also checked on per-sample
    values."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_pgd_step", ["--shape", "2,3,4,4", "--no-compile"])
    real_providers = mod.providers

    def first_samples(x_adv, x_nat, grad, alpha, eps, lo, hi, norm, hist, slot):
        torch.ops.robust_ops.pgd_step_(x_adv, x_nat, grad, alpha[:1].expand_as(alpha), eps[:1].expand_as(eps), lo,
                                       hi, norm, hist, slot)

    monkeypatch.setattr(mod, "providers", lambda device, use_compile: {**real_providers(device, use_compile),
                                                                        "native": first_samples})
    monkeypatch.setattr(mod.common, "median_seconds", lambda fn, min_run_time=1.0: 1.0)
    with pytest.raises(SystemExit, match=r"^native: x_adv with per-sample alpha and eps differs from the eager chain"):
        mod.main()
    assert not written


def _log_backward(out, log):
    """Log the layout of the gradient that reaches ``out`` (or its first element) in a backward pass."""
    first = out[0] if isinstance(out, tuple) else out
    if first.requires_grad:
        first.register_hook(lambda g: log.append(("backward", _layout(g))))


def _timed_case(log):
    """(provider, layout, backward?) of the one call in ``log``, checking its shape, arguments and gradient: the
    gradient in the input's layout, or NCHW for a channels_last input (layout channels_last/nchw_grad)."""
    calls = [c for c in log if c[0] != "backward"]
    backward = [c[1] for c in log if c[0] == "backward"]
    mixed = calls[0][1] == "channels_last" and backward == ["nchw"]
    assert len(calls) == 1 and (backward in ([], [calls[0][1]]) or mixed), log
    return calls[0][0], "channels_last/nchw_grad" if mixed else calls[0][1], bool(backward)


def _drop_max_spies(monkeypatch, mod, log, fault=None):
    import types

    import torch.nn.functional as F

    import robust_ops
    from robust_ops import reference

    def spy(provider, real):
        def call(x, *args, **kw):
            log.append((kw.get("backend", provider), _layout(x), tuple(x.shape), args))
            out = real(x, *args, **kw)
            _log_backward(out, log)
            if fault and kw.get("return_indices") and _layout(x) in fault:
                if fault.startswith("gradient"):  # the same values (2a - a == a), twice the gradient
                    out = (out[0] * 2 - out[0].detach(), out[1])
                else:
                    out = (out[0] + 1, out[1]) if fault.startswith("output") else (out[0], out[1].flip(-1))
            return out
        return call

    monkeypatch.setattr(mod, "F", types.SimpleNamespace(max_pool2d=spy("max_pool2d", F.max_pool2d)))
    monkeypatch.setattr(mod, "robust_ops", types.SimpleNamespace(drop_max_pool2d=spy("?", robust_ops.drop_max_pool2d)))
    monkeypatch.setattr(mod, "reference", types.SimpleNamespace(
        drop_max_pool2d=spy("reference", reference.drop_max_pool2d)))


def test_drop_max_pool2d_rows_time_what_they_name(monkeypatch):
    import torch

    mod, written, threads = _script(monkeypatch, "bench_drop_max_pool2d",
                                    ["--quick", "--threads", "1", "--shape", "2", "3", "6", "6"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    log = []
    _drop_max_spies(monkeypatch, mod, log)

    def seconds(provider, layout, backward):
        return ({"max_pool2d": 1, "native": 3, "reference": 40}[provider]
                * {"channels_last": 2, "channels_last/nchw_grad": 7}.get(layout, 1) * (5 if backward else 1) * 1e-3)

    def fake_median(fn, min_run_time=1.0):
        del log[:]
        fn()
        assert log[0][2:] == ((2, 3, 6, 6), {"reference": ((3, 3), (2, 2), (1, 1), (1, 1), False)}.get(
            log[0][0], (3, 2, 1)))
        return seconds(*_timed_case(log))

    monkeypatch.setattr(mod, "median_seconds", fake_median)
    mod.main()
    assert threads == [1]
    rows = written["drop_max_pool2d"]
    cases = [(p, layout, pass_name) for layout in ("nchw", "channels_last")
             for p in ("max_pool2d", "native", "reference") if not (p == "reference" and layout == "channels_last")
             for pass_name in ("forward", "forward+backward")]
    # a channels_last input with an NCHW upstream gradient: forward+backward against max_pool2d in the same layouts
    cases += [(p, "channels_last/nchw_grad", "forward+backward") for p in ("max_pool2d", "native")]
    assert [(r["provider"], r["layout"], r["pass"]) for r in rows] == cases + [("copy (roofline)", "-", "copy_")]
    n_in, n_out = 2 * 3 * 6 * 6, 2 * 3 * 3 * 3
    for r in rows[:-1]:
        backward = r["pass"] == "forward+backward"
        s = seconds(r["provider"], r["layout"], backward)
        nbytes = (4 * n_in + 12 * n_out) * (2 if backward else 1)
        assert (r["dev"], r["shape"], r["median_ms"]) == ("cpu", "2x3x6x6", pytest.approx(s * 1e3))
        assert r["GB/s"] == pytest.approx(nbytes / s / 1e9)
        assert r["roofline_%"] == pytest.approx(100 * nbytes / s / 1e9)  # the fake copy runs at 1 GB/s
        assert r["x_maxpool_same_layout"] == pytest.approx(s / seconds("max_pool2d", r["layout"], backward))
        assert r["x_maxpool_cl"] == pytest.approx(s / seconds("max_pool2d", "channels_last", backward))
        assert r["speedup_vs_reference"] == pytest.approx(seconds("reference", "nchw", backward) / s)
        assert r["peak_MiB"] == ""
    copy = rows[-1]
    assert (copy["median_ms"], copy["GB/s"], copy["roofline_%"]) == (pytest.approx(8 * n_in * 1e-6), pytest.approx(1),
                                                                    100.0)
    assert copy["x_maxpool_same_layout"] == copy["speedup_vs_reference"] == ""


def test_drop_max_pool2d_device_times_that_device_only(monkeypatch):
    """--device: one device's rows (device_check.sh passes its $DEVICE: the CPU half ran past the stage's limit on
    the GPU machine); without it a GPU machine times the CPU, then CUDA."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_drop_max_pool2d",
                              ["--quick", "--shape", "1", "2", "6", "6", "--device", "cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU visible: the default would time it too
    monkeypatch.setattr(mod, "median_seconds", lambda fn, min_run_time=1.0: 1e-3)
    mod.main()
    assert {row["dev"] for row in written["drop_max_pool2d"]} == {"cpu"}


@pytest.mark.parametrize("fault", ["output nchw", "indices nchw", "output channels_last", "gradient nchw",
                                   "gradient channels_last"])
def test_drop_max_pool2d_stops_when_the_kernel_disagrees_with_the_reference(monkeypatch, fault):
    import torch

    mod, written, _ = _script(monkeypatch, "bench_drop_max_pool2d", ["--quick", "--shape", "2", "3", "6", "6"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _drop_max_spies(monkeypatch, mod, [], fault)
    monkeypatch.setattr(mod, "median_seconds", lambda fn, min_run_time=1.0: 1.0)
    message = ("its gradient disagrees with the reference's on" if fault.startswith("gradient") else
               "disagrees with the reference on")
    with pytest.raises(SystemExit, match=rf"^drop_max_pool2d backend=native:? {message} \(2, 3, 6, 6\)$"):
        mod.main()
    assert not written


def test_drop_max_pool2d_goals_of_a_skipped_kernel_are_not_measured_rather_than_missed(monkeypatch, capsys):
    """With the native kernel skipped (a build without this device's kernels), every goal printed "nan MISSED": a
    verdict on a kernel that was never timed."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_drop_max_pool2d", ["--quick", "--shape", "1", "2", "6", "6"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mod, "median_seconds", lambda fn, min_run_time=1.0: 1e-3)
    monkeypatch.setattr(mod, "backend_unavailable", lambda backend, device: "built without it" if backend == "native"
                        else None)
    mod.main()
    goals = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(goals) == 4 and all(line.endswith(": not measured (native skipped)") for line in goals), goals
    assert "native" not in {row["provider"] for row in written["drop_max_pool2d"]}


def test_drop_max_pool2d_skips_only_a_backend_the_library_cannot_run(monkeypatch, capsys):
    """A native kernel that raised (any RuntimeError, a TORCH_CHECK included) was printed as "skipping native" and its
    rows dropped, exit status 0; only a backend the library reports unavailable (a CPU-only build on a GPU) is
    skipped now, with the library's reason."""
    import torch

    import robust_ops

    mod, written, _ = _script(monkeypatch, "bench_drop_max_pool2d", ["--quick", "--shape", "2", "3", "6", "6"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mod, "median_seconds", lambda fn, min_run_time=1.0: 1.0)
    real = robust_ops.drop_max_pool2d

    def broken(x, *args, backend=None, **kw):
        if backend == "native":
            raise RuntimeError("drop_max_pool2d: expected ... (a kernel check)")
        return real(x, *args, backend=backend, **kw)

    monkeypatch.setattr(mod.robust_ops, "drop_max_pool2d", broken)
    with pytest.raises(RuntimeError, match="a kernel check"):
        mod.main()
    assert not written

    monkeypatch.setattr(mod.robust_ops, "drop_max_pool2d", real)
    assert mod.backend_unavailable("native", "cpu") is None
    assert "backend='native' is not available" in mod.backend_unavailable("native", "xpu")
    monkeypatch.setattr(mod, "backend_unavailable",
                        lambda backend, device: "no CUDA kernels in this build" if backend == "native" else None)
    mod.main()
    assert "skipping native on cpu: no CUDA kernels in this build" in capsys.readouterr().out
    assert "native" not in {r["provider"] for r in written["drop_max_pool2d"]}


def _native_layers_spies(monkeypatch, mod, log, fault=None):
    import types

    import torch
    import torch.nn.functional as F

    import robust_ops

    class NCHWGradient(torch.autograd.Function):
        """The identity, whose backward hands back an NCHW gradient once ``upstream`` is set: the input gradient of
        a pool that takes grad_output's layout instead of the input's (before git 0686e0d)."""

        @staticmethod
        def forward(ctx, x, upstream):
            ctx.upstream = upstream
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad.contiguous() if ctx.upstream else grad, None

    def spy(provider, real):
        def call(x, *args, **kw):
            log.append((provider, _layout(x), tuple(x.shape), args))
            mixed = (fault == "gradient channels_last/nchw_grad" and provider == "robust_ops.max_pool2d"
                     and kw.get("return_indices") and _layout(x) == "channels_last")
            upstream = []
            out = real(NCHWGradient.apply(x, upstream) if mixed else x, *args, **kw)
            if mixed:  # an NCHW grad_output sets it
                out[0].register_hook(lambda g: upstream.append(True) if _layout(g) == "nchw" else None)
            _log_backward(out, log)
            if (fault and not fault.startswith("gradient") and provider == "robust_ops.max_pool2d"
                    and kw.get("return_indices") and _layout(x) in fault):
                if fault.startswith("output"):
                    out = (out[0] * 2, out[1])
                elif fault.startswith("indices"):
                    out = (out[0], out[1].flip(-1))
                else:  # the right values in NCHW strides
                    out = (out[0].contiguous(), out[1])
            return out
        return call

    monkeypatch.setattr(mod, "F", types.SimpleNamespace(max_pool2d=spy("F.max_pool2d", F.max_pool2d)))
    monkeypatch.setattr(mod, "robust_ops", types.SimpleNamespace(
        max_pool2d=spy("robust_ops.max_pool2d", robust_ops.max_pool2d)))


def test_native_layers_rows_time_what_they_name(monkeypatch):
    mod, written, threads = _script(monkeypatch, "bench_native_layers", ["--quick", "--threads", "1"])
    log = []
    _native_layers_spies(monkeypatch, mod, log)

    def pool_seconds(provider, layout, backward):
        return ({"F.max_pool2d": 4, "robust_ops.max_pool2d": 1}[provider]
                * {"channels_last": 2, "channels_last/nchw_grad": 5}.get(layout, 1) * (3 if backward else 1) * 1e-3)

    def bn_seconds(name, c, layout):
        return {"aten": 8, "ours": 2}[name] * c * (2 if layout == "channels_last" else 1) * 1e-6

    def fake_median(fn, min_run_time=1.0):
        del log[:]
        out = fn()
        if fn.__name__ in ("aten", "ours"):  # the batch-norm backward pair
            assert not log and out.shape[0] == 8
            return bn_seconds(fn.__name__, out.shape[1], _layout(out))
        assert log[0][2:] == ((8, 64, 64, 64), (3, 2, 1))
        return pool_seconds(*_timed_case(log))

    monkeypatch.setattr(mod, "median_seconds", fake_median)
    mod.main()
    assert threads == [1]
    rows = written["bench_native_layers"]
    pool_rows, copy, bn_rows = rows[:10], rows[10], rows[11:]
    mixed = "channels_last/nchw_grad"  # a channels_last input, an NCHW upstream gradient: forward+backward only
    assert [(r["provider"], r["layout"], r["pass"]) for r in pool_rows] == [
        (p, layout, pass_name) for p in ("F.max_pool2d", "robust_ops.max_pool2d")
        for layout in ("nchw", "channels_last", mixed) for pass_name in ("forward", "forward+backward")
        if (layout, pass_name) != (mixed, "forward")]
    n_in, n_out = 8 * 64 * 64 * 64, 8 * 64 * 32 * 32
    for r in pool_rows:
        backward = r["pass"] == "forward+backward"
        s = pool_seconds(r["provider"], r["layout"], backward)
        nbytes = (4 * n_in + 12 * n_out) * (2 if backward else 1)
        assert (r["shape"], r["median_ms"]) == ("8x64x64x64", pytest.approx(s * 1e3))
        assert r["x_aten_same_layout"] == pytest.approx(pool_seconds("F.max_pool2d", r["layout"], backward) / s)
        assert r["GB/s"] == pytest.approx(nbytes / s / 1e9) and r["roofline_%"] == pytest.approx(r["GB/s"] * 100)
    assert (copy["provider"], copy["median_ms"], copy["GB/s"]) == ("copy (roofline)", pytest.approx(8e-6 * n_in),
                                                                   pytest.approx(1))
    cases = [(c, s, layout) for c, s in ((64, 32), (128, 16), (256, 8), (512, 4))
             for layout in ("nchw", "channels_last")]
    assert len(bn_rows) == 3 * len(cases)
    for (c, s, layout), trio in zip(cases, zip(*[iter(bn_rows)] * 3)):
        nbytes = 8 * 8 * c * s * s
        want = [("aten native_batch_norm_backward", bn_seconds("aten", c, layout), 1.0),
                ("robust_ops._eval_batch_norm_backward", bn_seconds("ours", c, layout), 4.0),
                ("copy (roofline)", nbytes * 1e-9, "")]
        for r, (provider, seconds, ratio) in zip(trio, want):
            assert (r["provider"], r["layout"], r["shape"]) == (provider, layout, f"8x{c}x{s}x{s}")
            assert r["median_ms"] == pytest.approx(seconds * 1e3) and r["x_aten_same_layout"] == pytest.approx(ratio)
            assert r["GB/s"] == pytest.approx(nbytes / seconds / 1e9)
            assert r["roofline_%"] == pytest.approx(100 * nbytes * 1e-9 / seconds)


@pytest.mark.parametrize("switch, depth", [(None, 1), ("0", 0)])
def test_native_layers_times_under_the_memory_pool_as_attacks_decide(monkeypatch, switch, depth):
    """The ops are timed inside the CPU memory pool "as attacks and fit run these layers", but under
    $ROBUST_OPS_CPU_POOL=0, which turns the pool off for attacks and fit (and which docs/memory-pool.md says the
    benchmarks follow through library_pool), they were still timed inside it."""
    from robust_ops.memory import cpu_memory_pool_stats

    if switch is None:
        monkeypatch.delenv("ROBUST_OPS_CPU_POOL", raising=False)
    else:
        monkeypatch.setenv("ROBUST_OPS_CPU_POOL", switch)
    mod, written, _ = _script(monkeypatch, "bench_native_layers", ["--quick"])
    depths = set()
    monkeypatch.setattr(mod, "median_seconds", lambda fn, min_run_time=1.0: depths.add(cpu_memory_pool_stats().depth)
                        or 1.0)
    mod.main()
    assert depths == {depth} and written["bench_native_layers"]


@pytest.mark.parametrize("fault", ["output nchw", "indices nchw", "output channels_last", "strides channels_last",
                                   "gradient channels_last/nchw_grad", "batch-norm values", "batch-norm strides"])
def test_native_layers_stop_when_an_op_disagrees_with_aten(monkeypatch, fault):
    import torch

    mod, written, _ = _script(monkeypatch, "bench_native_layers", ["--quick"])
    _native_layers_spies(monkeypatch, mod, [], None if fault.startswith("batch-norm") else fault)
    real_bn = torch.ops.robust_ops._eval_batch_norm_backward

    def bn(grad, invstd, weight):
        out = real_bn(grad, invstd, weight)
        return out * 1.5 if fault == "batch-norm values" else out.contiguous()  # NCHW strides on channels_last

    monkeypatch.setattr(torch.ops.robust_ops, "_eval_batch_norm_backward", bn)
    monkeypatch.setattr(mod, "median_seconds", lambda fn, min_run_time=1.0: 1.0)
    if fault.startswith("batch-norm"):
        message = "_eval_batch_norm_backward disagrees with ATen at C=64, " + (
            "nchw" if fault == "batch-norm values" else "channels_last")
    elif fault.startswith("gradient"):  # a channels_last input's gradient in an NCHW grad_output's strides
        message = (r"robust_ops.max_pool2d disagrees with F.max_pool2d \(torch.channels_last with a "
                   r"torch.contiguous_format gradient, input gradient\)")
    else:
        layout = {"nchw": "contiguous_format", "channels_last": "channels_last"}[fault.split()[1]]
        what = "indices" if fault.startswith("indices") else "output"
        message = rf"robust_ops.max_pool2d disagrees with F.max_pool2d \(torch.{layout}, {what}\)"
    with pytest.raises(SystemExit, match=f"^{message}$"):
        mod.main()
    assert not written


@pytest.mark.parametrize("quick", [True, False])
def test_boundary_search_rows_time_what_they_name(monkeypatch, quick):
    import torch

    from robust_ops import reference

    mod, written, threads = _script(monkeypatch, "bench_boundary_search", [])
    shape = (3, 2, 8, 8)
    monkeypatch.setattr(mod, "SHAPES", (shape,))
    log, forwards = [], []

    def spy(name, real):
        def call(lo, hi, points, crossed_at, active):
            log.append((name, points.shape[0] + 1, tuple(lo.shape)))
            return real(lo, hi, points, crossed_at, active)
        return call

    monkeypatch.setattr(torch.ops.robust_ops, "boundary_search_step_",
                        spy("native", torch.ops.robust_ops.boundary_search_step_))
    monkeypatch.setattr(reference, "boundary_search_step_", spy("reference", reference.boundary_search_step_))
    monkeypatch.setattr(mod, "paper_bisection_", spy("peer", mod.paper_bisection_))

    def fake_median(fn, min_run_time=1.0):
        del log[:]
        fn()
        (call,) = log
        assert call[2] == shape
        return {"native": 1, "reference": 7, "peer": 3}[call[0]] * call[1] * 1e-3

    def fake_forward(model, shape_, batch, device, reps):
        forwards.append((batch, reps))
        return batch * 1e-3  # 1 ms per image

    monkeypatch.setattr(mod.common, "median_seconds", fake_median)
    monkeypatch.setattr(mod, "forward_seconds", fake_forward)
    mod.main((["--quick"] if quick else []) + ["--threads", "1", "--device", "cpu"])
    assert threads == [1]
    # --quick on CPU: one forward of N images, times k-1; else (k-1) N images
    assert forwards == ([(3, 1)] if quick else [(3, 3), (9, 3)])
    rows = written["boundary_search"]
    assert [(r["shape"], r["k"], r["provider"]) for r in rows] == [("3x2x8x8", 2, "native"), ("3x2x8x8", 4, "native")]
    d = 2 * 8 * 8
    for r in rows:
        k = r["k"]
        kern, ref, fwd = 1e-3 * k, 7e-3 * k, (k - 1) * 3e-3
        _, _, _, crossed_at, active = mod.make_round(shape, k, "cpu")
        min_bytes = 4 * d * sum(2 + (c > 0) + (c < k - 1) + (k - 1) for c, a in zip(crossed_at.tolist(), active) if a)
        all_bytes = 4 * 2 * (k + 1) * 3 * d
        assert (r["kernel_ms"], r["reference_ms"], r["forward_ms"]) == pytest.approx((kern * 1e3, ref * 1e3, fwd * 1e3))
        assert r["speedup_vs_ref"] == pytest.approx(7)
        if k == 2:  # the paper's bisection; the paper has no k-ary search, so no peer at k = 4
            assert (r["peer_ms"], r["speedup_vs_peer"]) == pytest.approx((3e-3 * k * 1e3, 3))
        else:
            assert math.isnan(r["peer_ms"]) and math.isnan(r["speedup_vs_peer"])
        assert r["roofline_min_ms"] == pytest.approx(min_bytes * 1e-6)
        assert r["pct_roofline_min"] == pytest.approx(100 * min_bytes * 1e-9 / kern)
        assert r["GB/s_min"] == pytest.approx(min_bytes / kern / 1e9)
        assert r["roofline_all_ms"] == pytest.approx(all_bytes * 1e-6)
        assert r["pct_roofline_all"] == pytest.approx(100 * all_bytes * 1e-9 / kern)
        assert r["kernel_share_of_round_pct"] == pytest.approx(100 * kern / (kern + fwd))
        assert r["ref_share_of_round_pct"] == pytest.approx(100 * ref / (ref + fwd))


def test_boundary_search_peer_is_the_papers_bisection_and_bitwise_the_reference(monkeypatch):
    """The peer, one round of the paper's bisection on a batch: the midpoint replaces hi where it crossed, lo where it
    did not (inactive samples untouched), then the new midpoint (lo + hi) / 2 -- bitwise the op's reference."""
    import torch

    from robust_ops import reference

    mod, _, _ = _script(monkeypatch, "bench_boundary_search", [])
    args = mod.make_round((64, 2, 4, 4), 2, "cpu")
    lo, hi, points, crossed_at, active = args
    assert active.any() and (~active).any() and (crossed_at == 0).any() and (crossed_at == 1).any()
    got, want = [t.clone() for t in args[:3]], [t.clone() for t in args[:3]]
    mod.paper_bisection_(*got, crossed_at, active)
    reference.boundary_search_step_(*want, crossed_at, active)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    moved_hi, moved_lo = active & (crossed_at == 0), active & (crossed_at == 1)
    assert torch.equal(got[1][moved_hi], points[0][moved_hi]) and torch.equal(got[0][moved_lo], points[0][moved_lo])
    assert torch.equal(got[2][0][active], (got[0][active] + got[1][active]) / 2)
    assert torch.equal(got[0][~active], lo[~active]) and torch.equal(got[1][~active], hi[~active])
    assert torch.equal(got[2][:, ~active], points[:, ~active])
    with pytest.raises(ValueError, match="bisection only"):
        mod.paper_bisection_(*mod.make_round((2, 1, 2, 2), 4, "cpu"))


@pytest.mark.parametrize("which", [0, 1, 2])
def test_boundary_search_stops_when_the_kernel_disagrees_with_the_reference(monkeypatch, which):
    """Any of lo, hi and the points written differently stops the run."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_boundary_search", [])
    monkeypatch.setattr(mod, "SHAPES", ((3, 2, 8, 8),))
    real = torch.ops.robust_ops.boundary_search_step_

    def broken(*args):
        real(*args)
        args[which].add_(1)

    monkeypatch.setattr(torch.ops.robust_ops, "boundary_search_step_", broken)
    # a one-line message naming the provider and the tensor (SystemExit: no traceback), not a bare AssertionError
    what = ("lo", "hi", "points")[which]
    with pytest.raises(SystemExit, match=f"native: {what} differs from the reference on \\(3, 2, 8, 8\\)"):
        mod.main(["--quick", "--device", "cpu"])
    assert not written


@pytest.mark.parametrize("switch", [None, "1"])
def test_prepacked_conv_rows_time_what_they_name(monkeypatch, switch):
    """With $ROBUST_OPS_PREPACKED_CONV=1 (prepacking on by default, as a user may run fit) the "ATen convolutions"
    rows timed prepacked convolutions too (x_aten ~1, max_abs_diff 0): the ATen side is now explicitly off."""
    import types

    import torch

    from robust_ops import prepacked_conv as pc
    from robust_ops.models import build_model

    if switch is None:
        monkeypatch.delenv(pc.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(pc.ENV_SWITCH, switch)
    mod, written, threads = _script(monkeypatch, "bench_prepacked_conv", ["--batches", "2", "--rounds", "2",
                                                                          "--threads", "1"])
    packed_models, seen = [], []

    def off(module, inputs, out):
        """Outputs 0.5 more and input gradients 100 * (the row's output gradient sum) more than ATen's."""
        x = inputs[0]
        return out + 0.5 + 100 * (x - x.detach()).flatten(1).sum(1, keepdim=True)

    def prepack(model, on):
        if on:
            packed_models.append(model)
            model.register_forward_hook(off)  # a difference max_abs_diff must show
        return pc.prepacked_conv(model, on)

    monkeypatch.setattr(mod, "pc", types.SimpleNamespace(prepacked_conv=prepack))
    checked = []  # the correctness gate would stop at the hook's difference: recorded here, tested on its own below
    monkeypatch.setattr(mod, "check_close", lambda case, aten, packed: checked.append(case))

    def case(fn):
        """(prepacked?, layout, pass, batch) of a timed call, from what it closes over."""
        cells = [c.cell_contents for c in fn.__closure__]
        (model,) = [c for c in cells if isinstance(c, torch.nn.Module)]
        (x,) = [c for c in cells if torch.is_tensor(c) and c.dim() == 4]
        backward = fn.__qualname__.startswith("forward_backward_fn")
        assert model.training is False and pc.prepacked_conv_active(model) == (model is packed_models[-1])
        assert not any(p.requires_grad for p in model.parameters())  # inside an attack: frozen weights
        return model is packed_models[-1], _layout(model.layer1[0].conv1.weight), backward, x.shape[0]

    def seconds(packed, layout, backward, batch):
        return (1 if packed else 4) * (2 if layout == "channels_last" else 1) * (3 if backward else 1) * batch * 1e-3

    def fake_interleaved(fns, rounds, device=None):
        cases = [case(fn) for fn in fns]
        assert (rounds, device, [c[0] for c in cases]) == (2, "cpu", [False, True]) and cases[0][1:] == cases[1][1:]
        seen.append(cases[0][1:])
        return [seconds(*c) for c in cases], None

    monkeypatch.setattr(mod, "interleaved_medians", fake_interleaved)
    mod.main()
    assert threads == [1]
    assert [_layout(m.layer1[0].conv1.weight) for m in packed_models] == ["nchw", "channels_last"]
    rows = written["bench_prepacked_conv"]
    passes = {False: "forward (no graph)", True: "forward + input gradient"}
    assert [(r["layout"], r["batch"], r["pass"]) for r in rows[:-1:2]] == [(c[0], c[2], passes[c[1]]) for c in seen]
    assert len(seen) == 4 and len(rows) == 9
    assert checked == [f"{layout} batch 2 {passes[backward]}" for layout, backward, _ in seen]
    for r in rows[:-1]:
        key = (r["layout"], r["pass"] == passes[True], r["batch"])
        packed = r["provider"] == "prepacked_conv"
        s = seconds(packed, *key)
        assert r["median_ms"] == pytest.approx(s * 1e3)
        assert r["x_aten"] == pytest.approx(seconds(False, *key) / s)
        if key[1]:  # the script's output gradient for this batch: after x, from a generator seeded with the batch
            g = torch.Generator().manual_seed(2)
            torch.rand(2, 1, 28, 28, generator=g)
            want = max(0.5, 100 * float(torch.randn(2, 2, generator=g).sum(1).abs().max()))
        else:
            want = 0.5
        assert r["max_abs_diff"] == (pytest.approx(want, rel=1e-3) if packed else 0.0)
    weight_bytes = sum(4 * m.weight.numel() for m in build_model("resnet18", 1, 2, 28).modules()
                       if isinstance(m, torch.nn.Conv2d))
    assert rows[-1]["median_ms"] == pytest.approx(2 * weight_bytes * 1e-6)


@pytest.mark.parametrize("wrong", ["output", "input gradient"])
def test_prepacked_conv_stops_before_timing_results_that_are_not_atens(monkeypatch, wrong):
    """The other op benchmarks check the timed kernel against the reference before timing it; this one only recorded
    max_abs_diff, so prepacked convolutions that gave wrong outputs (a strided bias did) or wrong input gradients
    were timed and written as a speed-up. It now stops in one line, before any timing, at the first case off."""
    import types

    import torch

    from robust_ops import prepacked_conv as pc
    from robust_ops.models import build_model

    mod, written, _ = _script(monkeypatch, "bench_prepacked_conv", ["--quick"])
    monkeypatch.setattr(mod, "build_model", lambda name, *args: build_model("small_cnn", *args))  # fast passes

    def off(module, inputs, out):  # the output 0.5 more, or the input gradient 100 * the output gradient's sum more
        x = inputs[0]
        return out + (0.5 if wrong == "output" else 100 * (x - x.detach()).flatten(1).sum(1, keepdim=True))

    def prepack(model, on):
        if on:
            model.register_forward_hook(off)
        return pc.prepacked_conv(model, on)

    monkeypatch.setattr(mod, "pc", types.SimpleNamespace(prepacked_conv=prepack))
    timed = []

    def interleaved(fns, rounds, device=None):
        timed.append(fns)
        return [1e-3, 1e-3], None

    monkeypatch.setattr(mod, "interleaved_medians", interleaved)
    case = "nchw batch 4 " + ("forward (no graph)" if wrong == "output" else "forward + input gradient")
    with pytest.raises(SystemExit, match=rf"^bench_prepacked_conv: {re.escape(case)}: the prepacked {wrong} differs "
                                         rf"from ATen's \(relative error .*\); not timing a wrong kernel$"):
        mod.main()
    assert len(timed) == (0 if wrong == "output" else 1) and not written
    # rounding (and a flipped ReLU's share of an input gradient) passes; NaN does not
    want = (torch.ones(2, 3), torch.ones(2, 3))
    mod.check_close("case", want, (want[0] + 1e-6, want[1] * (1 + 5e-3)))
    with pytest.raises(SystemExit, match=r"^bench_prepacked_conv: case: the prepacked output differs .*nan"):
        mod.check_close("case", want, (want[0] * float("nan"), want[1]))


def test_prepacked_conv_quick_is_batches_4_and_16_in_3_rounds(monkeypatch):
    """The smoke run `robust-ops bench` makes: batches 4 and 16, both layouts and passes, 3 interleaved rounds and a
    short copy timing (no other test runs the script's --quick path)."""
    from robust_ops.models import build_model

    mod, written, _ = _script(monkeypatch, "bench_prepacked_conv", ["--quick"])
    monkeypatch.setattr(mod, "build_model", lambda name, *args: build_model("small_cnn", *args))  # fast passes
    timed, copies = [], []
    monkeypatch.setattr(mod, "interleaved_medians", lambda fns, rounds, device=None: (
        timed.append((len(fns), rounds, device)) or [2e-3, 1e-3], None))
    monkeypatch.setattr(mod, "copy_roofline_seconds", lambda nbytes, device, run_time: copies.append(run_time) or 1e-3)
    mod.main()
    assert timed == [(2, 3, "cpu")] * 8 and copies == [0.2]
    rows = written["bench_prepacked_conv"]
    assert [(r["layout"], r["batch"]) for r in rows[:-1:4]] == [("nchw", 4), ("nchw", 16), ("channels_last", 4),
                                                                 ("channels_last", 16)]
    assert all(r["x_aten"] == pytest.approx(2 if r["provider"] == "prepacked_conv" else 1) for r in rows[:-1])


def test_pgd_step_quick_times_every_provider_briefly(monkeypatch):
    """--quick (the smoke run `robust-ops bench` makes) keeps the shape and times every provider and copy for 0.3 s
    instead of 1 s (no other test runs the script's --quick path)."""
    mod, written, _ = _script(monkeypatch, "bench_pgd_step", ["--quick", "--shape", "2,3,4,4", "--no-compile"])
    run_times = []
    monkeypatch.setattr(mod.common, "median_seconds", lambda fn, min_run_time=1.0: run_times.append(min_run_time)
                        or 1e-3)
    monkeypatch.setattr(mod.common, "copy_roofline_seconds", lambda nbytes, device="cpu", min_run_time=1.0:
                        run_times.append(min_run_time) or 1e-3)
    mod.main()
    assert len(written["pgd_step_cpu"]) == 16 and run_times == [0.3] * 16


@pytest.mark.parametrize("flags", [["--quick", "--warmup", "2"], ["--rounds", "3"]])  # 2 warm-ups by default
def test_defenses_rows_are_medians_of_the_timed_rounds_of_each_defense(monkeypatch, flags):
    """Warm-up rounds untimed; per defense the median, min and max of its own timed steps; ratio to standard."""
    import types

    mod, written, _ = _script(monkeypatch, "bench_defenses", [])
    clock, models, calls = [0.0], [], []
    real_runs = mod.as_fit_runs
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def spy(model, step):
        if model not in models:
            models.append(model)
        i = models.index(model)
        func = step.func.__name__
        defense = step.args[1] if func == "train_step" else None
        calls.append((i, func, type(defense).__name__, getattr(defense, "steps", None)))
        assert model.training
        real_runs(model, step)
        n = sum(c[0] == i for c in calls)
        clock[0] += 100.0 if n <= 2 else (i + 1) * {3: 1.0, 4: 3.0, 5: 2.0}[n]  # 2 warm-ups, then 3 timed steps

    monkeypatch.setattr(mod, "as_fit_runs", spy)
    mod.main(flags + ["--defenses", "at-torchattacks", "at", "--model", "small_cnn", "--size", "8", "--batch", "2",
                      "--device", "cpu"])
    kinds = [(0, "train_step", "Standard", None), (1, "torchattacks_at_step", "NoneType", None),
             (2, "train_step", "AT", 10)]
    assert calls == kinds * 5
    rows = written["defenses"]
    assert [r["defense"] for r in rows] == ["standard", "at-torchattacks", "at"]
    for i, r in enumerate(rows):
        assert (r["step_ms"], r["min_ms"], r["max_ms"]) == pytest.approx((2000 * (i + 1), 1000 * (i + 1),
                                                                         3000 * (i + 1)))
        assert r["x_standard"] == pytest.approx(i + 1)
        assert (r["model"], r["input"], r["reps"]) == ("small_cnn", "2x1x8x8", 3)


def test_defenses_quick_trains_small_shapes_unless_given(monkeypatch, capsys):
    """--quick cut the rounds only: every defense kept resnet18 at 64x64, batch 32, and `robust-ops bench --only
    defenses` (quick) printed nothing for 600 s on one thread. --quick now steps at 32x32, batch 8 (the full run at
    64x64, batch 32), and --size / --batch given are kept."""
    mod, written, _ = _script(monkeypatch, "bench_defenses", [])
    monkeypatch.setattr(mod, "train_step", lambda *args: None)
    argv = ["--defenses", "at", "--model", "small_cnn", "--device", "cpu", "--warmup", "0", "--rounds", "1"]
    for flags, shape in ((["--quick"], "8x1x32x32"), ([], "32x1x64x64"),
                         (["--quick", "--size", "16", "--batch", "4"], "4x1x16x16")):
        mod.main(argv + flags)
        assert {r["input"] for r in written["defenses"]} == {shape}, flags
    capsys.readouterr()


def test_defenses_reference_row_is_the_at_step_on_the_reference_ops(monkeypatch, capsys):
    """at-reference-ops: the same PGD-10 AT step, run with $ROBUST_OPS_BACKEND=reference (restored afterwards), so
    the table compares the native ops with their plain-PyTorch references in the same run."""
    mod, written, _ = _script(monkeypatch, "bench_defenses", [])
    monkeypatch.delenv(mod.BACKEND_SWITCH, raising=False)
    seen, real_step = [], mod.train_step

    def spy(model, defense, *args):
        seen.append((type(defense).__name__, getattr(defense, "steps", None), os.environ.get(mod.BACKEND_SWITCH)))
        return real_step(model, defense, *args)

    monkeypatch.setattr(mod, "train_step", spy)
    mod.main(["--defenses", "at", "at-reference-ops", "--model", "small_cnn", "--size", "8", "--batch", "2",
              "--device", "cpu", "--warmup", "0", "--rounds", "1"])
    assert seen == [("Standard", None, None), ("AT", 10, None), ("AT", 10, "reference")]
    assert mod.BACKEND_SWITCH not in os.environ
    assert [r["defense"] for r in written["defenses"]] == ["standard", "at", "at-reference-ops"]
    assert "AT (native ops) vs AT (reference ops)" in capsys.readouterr().out


def test_defenses_rows_name_the_backend_each_step_ran_on(monkeypatch, capsys):
    """With $ROBUST_OPS_BACKEND=reference in the caller's environment every AT step ran the reference ops, yet the
    summary said "AT (native ops) vs AT (reference ops)" and no row said which ops ran (bench_attacks' rows do)."""
    mod, written, _ = _script(monkeypatch, "bench_defenses", [])
    monkeypatch.setattr(mod, "train_step", lambda *args: None)
    argv = ["--defenses", "at", "at-reference-ops", "--model", "small_cnn", "--size", "8", "--batch", "2", "--device",
            "cpu", "--warmup", "0", "--rounds", "1"]
    for switch, backend in ((None, "native"), ("reference", "reference")):
        if switch is None:
            monkeypatch.delenv(mod.BACKEND_SWITCH, raising=False)
        else:
            monkeypatch.setenv(mod.BACKEND_SWITCH, switch)
        mod.main(argv)
        assert [r["backend"] for r in written["defenses"]] == ["-", backend, "reference"]  # standard runs none
        assert f"AT ({backend} ops) vs AT (reference ops)" in capsys.readouterr().out


def test_defenses_fit_rows_time_fits_step_as_the_difference_of_two_fits(monkeypatch, capsys):
    """--fit-steps N: in each round, after a defense's bare step, a fit of 1 step and one of 1 + N steps, each on a
    model and defense of its own; the fit row's sample is their difference over N (fit's setup cancels), its median
    compared with the bare step's (x_step) and with standard's fit step (x_standard). None for the torchattacks step."""
    import types

    mod, written, _ = _script(monkeypatch, "bench_defenses", [])
    clock, fits = [0.0], []
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(mod, "count_host_reads", lambda run, optimizer_steps: {"item": 0, "tolist": 0, "nonzero": 0})

    def bare(model, step):
        clock[0] += 1.0

    def fit_steps(model, defense, data, batch):
        fits.append((type(defense).__name__, len(data), batch, defense.needs_ids))
        n = sum(f[0] == fits[-1][0] for f in fits)  # per defense: 2 fits a round
        clock[0] += 50.0 + (len(data) // batch) * {"Standard": 2.0, "AT": 6.0}[fits[-1][0]] * (1 + (n > 4))

    monkeypatch.setattr(mod, "as_fit_runs", bare)
    monkeypatch.setattr(mod, "fit_steps", fit_steps)
    argv = ["--defenses", "at", "at-torchattacks", "--model", "small_cnn", "--size", "8", "--batch", "2", "--device",
            "cpu", "--warmup", "1", "--rounds", "3", "--fit-steps", "3"]
    mod.main(argv)
    assert fits == [(name, n, 2, False) for _ in range(4) for name in ("Standard", "AT") for n in (2, 8)]
    rows = written["defenses"]
    assert [(r["defense"], r["path"]) for r in rows] == [("standard", "step"), ("standard", "fit"), ("at", "step"),
                                                          ("at", "fit"), ("at-torchattacks", "step")]
    # the fits of the second and third timed rounds take twice as long per step: medians of 2, 4, 4 and 6, 12, 12
    assert [r["step_ms"] for r in rows] == pytest.approx([1000, 4000, 1000, 12000, 1000])
    assert [r["min_ms"] for r in rows] == pytest.approx([1000, 2000, 1000, 6000, 1000])
    assert [r["x_step"] for r in rows] == pytest.approx([1, 4, 1, 12, 1])
    assert [r["x_standard"] for r in rows] == pytest.approx([1, 1, 1, 3, 1])
    assert [r["reads_item"] for r in rows] == [0, 0, 0, 0, ""]
    assert "no fit row for at-torchattacks: fit trains with the library's defenses" in capsys.readouterr().out
    mod.main(argv[:-2])  # without --fit-steps: the bare rows and columns alone
    assert [r["defense"] for r in written["defenses"]] == ["standard", "at", "at-torchattacks"]
    assert "path" not in written["defenses"][0] and "reads_item" not in written["defenses"][0]


def test_defenses_fit_rows_run_fit_and_count_its_host_reads_per_step(monkeypatch):
    """The fit rows run robust_ops.train.fit itself, IMA (ids, a margin table of the data's size, state fit refuses to
    reuse unless reset) and the reference ops included; the reads per step are fit's own on top of the defense's:
    standard's are the gradient check (item), the labels' range, the step's flags and the sampler's index list
    (tolist), where its bare step reads the labels' range and its loss (python_tests/test_train.py counts them)."""
    mod, written, _ = _script(monkeypatch, "bench_defenses", ["--model", "small_cnn", "--size", "8", "--batch", "2",
                                                              "--warmup", "1", "--rounds", "1", "--fit-steps", "1",
                                                              "--defenses", "ima", "at-reference-ops"])
    mod.main()
    rows = {(r["defense"], r["path"]): r for r in written["defenses"]}
    assert list(rows) == [(name, path) for name in ("standard", "ima", "at-reference-ops") for path in ("step", "fit")]
    reads = {key: (r["reads_item"], r["reads_tolist"], r["reads_nonzero"]) for key, r in rows.items()}
    assert reads[("standard", "step")] == (0, 2, 0) and reads[("standard", "fit")] == (1, 3, 0)
    assert rows[("at-reference-ops", "fit")]["backend"] == "reference"


def test_host_reads_of_the_fit_rows_leave_out_the_optimizers_own(monkeypatch):
    """Adam reads its step counters (CPU tensors, no GPU sync) with one item per parameter in every step: counted,
    they made a bare small_cnn step 14 reads and hid the defense's. bench_defenses counts without them; the tests'
    count (python_tests/utils.py) keeps them."""
    import importlib

    import torch

    from utils import host_reads

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    bench = importlib.import_module("host_reads")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())

    def step():
        opt.zero_grad()
        loss = model(torch.ones(4, 3)).sum()
        loss.backward()
        opt.step()
        return float(loss.detach()), (loss > 0).tolist()

    step()
    assert bench.host_reads(step, optimizer_steps=False) == {"item": 1, "tolist": 1, "nonzero": 0}
    assert bench.host_reads(step) == host_reads(step) == {"item": 3, "tolist": 1, "nonzero": 0}  # weight and bias


def _attacks_script(monkeypatch, argv, cases=(0, 1, 4, 13)):
    """bench_attacks with its peer table cut to ``cases`` of peer_cases (fgsm, pgd, cw-linf, square by default)."""
    pytest.importorskip("torchattacks")
    mod, written, _ = _script(monkeypatch, "bench_attacks", argv)
    real_cases = mod.peer_cases
    monkeypatch.setattr(mod, "peer_cases", lambda *a: [real_cases(*a)[i] for i in cases])
    return mod, written


@pytest.mark.parametrize("callers_switches", [{}, {"ROBUST_OPS_CPU_POOL": "0", "ROBUST_OPS_NATIVE_LAYERS": "0",
                                                   "ROBUST_OPS_PREPACKED_CONV": "1"}])
def test_attacks_rows_time_what_they_name(monkeypatch, capsys, callers_switches):
    """The pgd-10 comparison and ensemble rows: each time from the call its row names (switches, layout, prepacking,
    emit), ratios the peer's time over ours, same_output from the outputs compared. The library's switches left in
    the caller's environment relabelled rows ("ours" ran without the pool, and "without the CPU memory pool" equalled
    it; prepacked "ours"): each call now sets them all."""
    import torch

    from robust_ops import attacks
    from robust_ops.prepacked_conv import prepacked_conv_active

    for var in ("ROBUST_OPS_CPU_POOL", "ROBUST_OPS_NATIVE_LAYERS", "ROBUST_OPS_PREPACKED_CONV"):
        monkeypatch.delenv(var, raising=False)
    for var, value in callers_switches.items():
        monkeypatch.setenv(var, value)
    mod, written = _attacks_script(monkeypatch, ["--models", "small-resnet", "--batch", "4", "--size", "16",
                                                 "--train-steps", "2", "--rounds", "2", "--peer-rounds", "2",
                                                 "--device", "cpu"])
    log, trained, timed = [], [], []

    class Spy:
        def __getattr__(self, name):
            return getattr(attacks, name)

        def pgd(self, model, x, y, **kw):
            log.append((os.environ.get(mod.POOL_SWITCH), os.environ.get(mod.LAYERS_SWITCH),
                        _layout(model.blocks[1].conv1.weight), prepacked_conv_active(model), kw.get("emit"),
                        tuple(x.shape)))
            return attacks.pgd(model, x, y, **kw)

    monkeypatch.setattr(mod, "attacks", Spy())
    real_train = mod.train_briefly
    monkeypatch.setattr(mod, "train_briefly", lambda model, steps, *a: (trained.append(steps),
                                                                         real_train(model, steps, *a))[1])
    plain = ("1", "1", "nchw", False, None, (4, 1, 16, 16))
    pgd_calls = {"ours": plain, "theirs": None, "ours_no_pool": ("0",) + plain[1:],
                 "ours_emit": plain[:4] + ((2, 4, 6, 8),) + plain[5:], "ours_no_native_layers": ("1", "0") + plain[2:],
                 "ours_channels_last": plain[:2] + ("channels_last",) + plain[3:], "ours_prepacked": plain[:3] + (True,)
                 + plain[4:], "ours_channels_last_prepacked": plain[:2] + ("channels_last", True) + plain[4:]}
    ms = {name: i + 1 for i, name in enumerate(list(pgd_calls) + ["run_cascade", "run_all", "run_ours",
                                                                  "run_reference", "<lambda>"])}

    def fake_interleaved(fns, rounds, device=None):
        names = [fn.__name__ for fn in fns]
        timed.append((names, rounds, device))
        for fn in fns:
            if fn.__name__ in pgd_calls:
                del log[:]
                fn()
                assert log == ([pgd_calls[fn.__name__]] if pgd_calls[fn.__name__] else []), fn.__name__
        return [ms[n] * 1e-3 for n in names], None

    monkeypatch.setattr(mod, "interleaved_medians", fake_interleaved)
    mod.main()
    assert trained == [2]
    cpu = torch.device("cpu")
    assert timed[:2] == [(list(pgd_calls), 2, cpu), (["run_cascade", "run_all"], 2, cpu)]
    assert [t[1:] for t in timed[2:]] == [(2, cpu)] * 4
    rows = written["bench_attacks"]
    names = ["ours", "ours_no_pool", "ours_no_native_layers", "ours_channels_last", "ours_prepacked",
             "ours_channels_last_prepacked"]
    for r, name in zip(rows, names):
        assert (r["ours_ms"], r["peer_ms"], r["ratio"]) == pytest.approx((ms[name], ms["theirs"],
                                                                          ms["theirs"] / ms[name]))
        assert r["images_per_s"] == pytest.approx(4 / (ms[name] * 1e-3))
    assert [r["same_output"] for r in rows[:3]] == [True] * 3  # bitwise: the pool and native layers change nothing
    for r in rows[3:6]:
        assert r["same_output"] == (float(r["case"].split("max diff ")[1].rstrip(")")) == 0)
    emit, ensemble = rows[6], rows[7]
    assert "emit" in emit["case"] and emit["same_output"] is True
    assert (emit["ours_ms"], emit["peer_ms"], emit["ratio"]) == pytest.approx((ms["ours_emit"], ms["ours"],
                                                                               ms["ours_emit"] / ms["ours"]))
    assert "cascade vs all" in ensemble["case"] and ensemble["same_output"] is True
    assert (ensemble["ours_ms"], ensemble["peer_ms"], ensemble["ratio"]) == pytest.approx(
        (ms["run_cascade"], ms["run_all"], ms["run_all"] / ms["run_cascade"]))
    assert len(rows) == 8 and len(written["bench_attacks_peers"]) == 4
    out = capsys.readouterr().out
    assert "small-resnet: trained 2 steps" in out
    # a line per row as it is measured (the table comes at the end, after every model's peer table)
    assert all(f"small-resnet {r['case']}: ours {r['ours_ms']:.0f} ms" in out for r in rows)


class _Built(Exception):
    pass


def test_attacks_quick_times_the_small_cnn_at_small_shapes_unless_given(monkeypatch):
    """--quick cut the rounds only: both models at 64x64, batch 32, so `robust-ops bench --only attacks` (quick) took
    ~12 minutes on one thread, most of it resnet18's peer table. --quick now times small-resnet at 32x32, batch 8, as
    bench_defenses' --quick; --models, --size and --batch given are kept, and the full run is unchanged. It trains 30
    steps, as the full run (12 steps of 8 images left a model predicting one class: no attack broke a sample). The L2
    and L1 radii of the peer table follow the image side (the 64x64 values at 64)."""
    mod, _ = _attacks_script(monkeypatch, [], cases=(3, 14))  # pgdl2, square-l2
    seen = []
    real_make, real_blobs = mod.make_model, mod.blobs
    monkeypatch.setattr(mod, "make_model", lambda name, device, size: (seen.append((name, size)),
                                                                       real_make(name, device, size))[1])
    monkeypatch.setattr(mod, "blobs", lambda n, size, *a: (seen.append((n, size)), real_blobs(n, size, *a))[1])

    def train_briefly(model, steps, batch, size, device):  # the first model's first work: stop there
        seen.append(("trained", steps, batch, size))
        raise _Built

    monkeypatch.setattr(mod, "train_briefly", train_briefly)
    for argv, expected in ((["--quick"], [("small-resnet", 32), (8, 32), ("small-resnet", 32), ("trained", 30, 8, 32)]),
                           ([], [("small-resnet", 64), ("resnet18", 64), (32, 64), ("small-resnet", 64),
                                 ("trained", 30, 32, 64)]),
                           (["--quick", "--models", "resnet18", "--size", "16", "--batch", "4", "--train-steps", "2"],
                            [("resnet18", 16), (4, 16), ("resnet18", 16), ("trained", 2, 4, 16)])):
        del seen[:]
        monkeypatch.setattr(sys, "argv", ["bench_attacks.py", "--peers-only"] + argv)
        with pytest.raises(_Built):
            mod.main()
        assert seen == expected, argv
    model = real_make("small-resnet", "cpu", 8)
    for size in (64, 32):
        peers = {case: peer for case, _, peer, _, _ in mod.peer_cases(model, 4 / 255, 5, 40, size)}
        assert peers["pgdl2-5"].eps == pytest.approx(4 / 255 * 8 * size / 64)
    assert peers["square-l2-40"].eps == peers["pgdl2-5"].eps


def test_attacks_no_peers_skips_the_peer_table_and_leaves_its_csv(monkeypatch):
    mod, written = _attacks_script(monkeypatch, ["--no-peers", "--models", "small-resnet", "--batch", "4", "--size",
                                                 "16", "--train-steps", "2", "--quick"])
    monkeypatch.setattr(mod, "interleaved_medians", lambda fns, rounds, device=None: ([1e-3] * len(fns), None))
    monkeypatch.setattr(mod, "bench_peers", lambda *a: pytest.fail("--no-peers ran the peer table"))
    mod.main()
    assert len(written["bench_attacks"]) == 8 and "bench_attacks_peers" not in written


@pytest.mark.parametrize("script,argv", [("bench_attacks", ["--peers-only", "--models", "small-resnet", "--batch",
                                                            "2", "--size", "8", "--train-steps", "0", "--quick"]),
                                         ("bench_defenses", ["--quick", "--defenses", "standard", "--model", "mlp",
                                                             "--size", "8", "--batch", "2"])])
def test_attack_and_defense_benchmarks_take_threads(script, argv, monkeypatch):
    """--threads N sets torch's threads before anything is timed (the op benchmarks' flag); without it, torch's."""
    for extra, expected in (([], []), (["--threads", "3"], [3])):
        mod, _, threads = _script(monkeypatch, script, argv + extra)
        if script == "bench_attacks":
            monkeypatch.setattr(mod, "peer_cases", lambda *a: [])  # nothing to time: the flag is what is tested
        mod.main()
        assert threads == expected


def test_attack_peer_rows_time_and_compare_what_they_name(monkeypatch):
    import math

    mod, written = _attacks_script(monkeypatch, ["--peers-only", "--models", "small-resnet", "--batch", "4", "--size",
                                                 "16", "--train-steps", "2", "--quick"])
    ms = {"run_ours": 2, "run_reference": 3, "<lambda>": 5}
    monkeypatch.setattr(mod, "interleaved_medians", lambda fns, rounds, device=None: (
        [ms[fn.__name__] * 1e-3 for fn in fns], None))
    mod.main()
    assert "bench_attacks" not in written
    rows = written["bench_attacks_peers"]
    assert [r["attack"] for r in rows] == ["fgsm", "pgd-5", "cw-linf-5", "square-40"]
    copy_s = 2 * 4 * 16 * 16 * 4 * 1e-9  # the fake copy: 1 GB/s; one read and one write of the batch
    for r, iterations in zip(rows, (1, 5, 5, 40)):
        assert (r["ours_ms"], r["reference_ops_ms"], r["reference_ratio"]) == pytest.approx((2, 3, 1.5))
        assert (r["roofline_ms"], r["ours_over_roofline"]) == pytest.approx((iterations * copy_s * 1e3,
                                                                            2e-3 / (iterations * copy_s)))
        assert r["same_as_reference_ops"] is True and 0 <= r["robust_acc_ours"] <= 1
        if r["attack"] == "cw-linf-5":
            assert r["same_as_peer"] == "n/a" and math.isnan(r["peer_ms"]) and math.isnan(r["peer_ratio"])
            assert math.isnan(r["robust_acc_peer"])
        else:
            assert (r["peer_ms"], r["peer_ratio"]) == pytest.approx((5, 2.5))
            if r["same_as_peer"]:
                assert r["robust_acc_peer"] == r["robust_acc_ours"]
    assert [r["same_as_peer"] for r in rows[:2]] == [True, True]


def test_attack_peer_rows_run_ours_at_the_library_defaults_whatever_the_callers_switches(monkeypatch):
    """As the pgd-10 rows: $ROBUST_OPS_CPU_POOL=0, $ROBUST_OPS_NATIVE_LAYERS=0 or $ROBUST_OPS_PREPACKED_CONV=1 left
    in the caller's environment made the table's "ours" (and its reference-ops twin) run without the pool, without
    native layers or prepacked, unrecorded, beside a table that credits its speed-ups to the pool and the layers."""
    from robust_ops import attacks
    from robust_ops.prepacked_conv import prepacked_conv_active

    for var, value in (("ROBUST_OPS_CPU_POOL", "0"), ("ROBUST_OPS_NATIVE_LAYERS", "0"),
                       ("ROBUST_OPS_PREPACKED_CONV", "1")):
        monkeypatch.setenv(var, value)
    mod, written = _attacks_script(monkeypatch, ["--peers-only", "--models", "small-resnet", "--batch", "4", "--size",
                                                 "16", "--train-steps", "0", "--quick"], cases=(0,))
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(attacks, name)

        def fgsm(self, model, x, y, **kw):
            seen.append((os.environ.get(mod.POOL_SWITCH), os.environ.get(mod.LAYERS_SWITCH),
                         os.environ.get(mod.PREPACKED_SWITCH)))
            with attacks.context.attack_context(model):
                seen[-1] += (prepacked_conv_active(model),)
            return attacks.fgsm(model, x, y, **kw)

    monkeypatch.setattr(mod, "attacks", Spy())
    monkeypatch.setattr(mod, "pick_ensemble_eps", lambda *a: 4 / 255)
    monkeypatch.setattr(mod, "interleaved_medians", lambda fns, rounds, device=None: ([1e-3] * len(fns), None))
    mod.main()
    assert seen and set(seen) == {("1", "1", "0", False)}
    assert [r["attack"] for r in written["bench_attacks_peers"]] == ["fgsm"]


IMA_VARIANTS = ["masked", "naive", "compacted", "compacted unpadded", "compacted k=4", "masked channels_last",
                "compacted channels_last", "compacted prepacked"]


def test_ima_rows_aggregate_each_variants_epochs_against_its_masked_twins(monkeypatch):
    """Medians over repeats, ratios masked / variant, margins compared with the masked epoch and with the masked one
    on the same kernels ("n/a" when --variants leaves that one out); each variant's epoch runs what its name says."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_ima", [
        "--quick", "--variants", ",".join(IMA_VARIANTS[1:]), "--repeats", "3", "--scenarios", "cap,init",
        "--images", "10",
        "--steps", "2", "--search-steps", "3", "--pretrain-epochs", "0", "--deterministic", "--device", "cpu"])
    monkeypatch.setattr(mod, "load_train", lambda: (torch.rand(10, 1, 28, 28), torch.randint(0, 2, (10,))))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on: None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    t = dict(zip(IMA_VARIANTS, (10, 20, 4, 3, 5, 8, 2, 6)))
    changed = {"naive": [7], "compacted unpadded": [1, 4], "masked channels_last": [0, 2, 3],
               "compacted channels_last": [0, 2, 3], "compacted prepacked": [5]}
    scenario_factor = {"cap": 1, "init": 2}
    epochs = []

    def fake_epoch(state, x, y, ids_all, args, *, compact, arity, scenario, batch_exit, min_rows, channels_last,
                   prepacked, defense_state):
        flags = dict(compact=compact, arity=arity, batch_exit=batch_exit, min_rows=min_rows,
                     channels_last=channels_last, prepacked=prepacked)
        (name,) = [n for n in IMA_VARIANTS if flags == dict(
            compact="compacted" in n, arity=4 if "k=4" in n else 2, batch_exit=n != "naive",
            min_rows=0 if "unpadded" in n else None, channels_last="channels_last" in n, prepacked="prepacked" in n)]
        assert (ids_all.numel(), args.steps, args.search_steps, defense_state) == (10, 2, 3, None)
        r = sum(e == (scenario, name) for e in epochs)
        epochs.append((scenario, name))
        margins = torch.arange(10.0)
        margins[changed.get(name, [])] += 0.5
        s = t[name] * scenario_factor[scenario] * (1, 3, 2)[r]
        return s, s + 1, margins, {"forward_calls": t[name], "probe_s": 0.5}, 0.1 * r

    monkeypatch.setattr(mod, "ima_epoch", fake_epoch)
    mod.main()
    assert epochs == [(s, n) for s in ("cap", "init") for _ in range(3) for n in IMA_VARIANTS]  # interleaved
    rows = written["ima_deterministic"]
    assert [(r["scenario"], r["variant"]) for r in rows] == [(s, n) for s in ("cap", "init") for n in IMA_VARIANTS]
    for r in rows:
        name, f = r["variant"], scenario_factor[r["scenario"]]
        med, base = 2 * t[name] * f, 2 * t["masked"] * f
        assert (r["ran_on"], r["deterministic"], r["images"], r["K"], r["N"]) == (torch.device("cpu"), True, 10, 2, 3)
        assert r["warmup"] == 0  # the CPU's default: no untimed epochs (the interleaved list above has none)
        assert (r["epoch_s_median"], r["speedup_vs_masked"]) == pytest.approx((med, base / med))
        assert (r["epoch_cpu_s_median"], r["cpu_speedup_vs_masked"]) == pytest.approx((med + 1, (base + 1) / (med + 1)))
        assert (r["forward_calls"], r["probe_s"], r["crossed_frac"]) == (t[name], 0.5, pytest.approx(0.2))
        diff = len(changed.get(name, []))
        assert (r["margins_equal_to_masked"], r["margins_max_abs_diff"], r["margins_differing"]) == (
            diff == 0, 0.5 if diff else 0.0, diff)
        twin = "masked channels_last" if "channels_last" in name else "masked"
        if name == "compacted prepacked":  # its twin "masked prepacked" was left out
            assert r["speedup_vs_masked_same_layout"] == r["margins_equal_to_masked_same_layout"] == "n/a"
        else:
            assert r["speedup_vs_masked_same_layout"] == pytest.approx(2 * t[twin] * f / med)
            assert r["margins_equal_to_masked_same_layout"] == (changed.get(name) == changed.get(twin))


def test_ima_warmup_epochs_run_first_in_each_scenario_and_are_not_timed(monkeypatch):
    """--warmup N: N untimed rounds of every variant per scenario before the timed ones (on a GPU the first epoch to
    meet a batch size pays its setup: the first compacted variant ran 1.7x slower than an identical one after it)."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_ima", [
        "--quick", "--variants", "compacted", "--repeats", "2", "--warmup", "2", "--scenarios", "cap,init",
        "--images", "10", "--steps", "2", "--search-steps", "3", "--pretrain-epochs", "0", "--device", "cpu"])
    monkeypatch.setattr(mod, "load_train", lambda: (torch.rand(10, 1, 28, 28), torch.randint(0, 2, (10,))))
    epochs = []

    def fake_epoch(state, x, y, ids_all, args, *, compact, scenario, **kwargs):
        earlier = sum(e[0] == scenario for e in epochs)
        epochs.append((scenario, compact))
        seconds = 1000.0 if earlier < 4 else (10.0 if compact else 20.0)  # a scenario's first 4: 2 warm-up rounds
        return seconds, seconds, torch.arange(10.0), {"forward_calls": 1}, 0.0

    monkeypatch.setattr(mod, "ima_epoch", fake_epoch)
    mod.main()
    assert epochs == [(s, c) for s in ("cap", "init") for _ in range(4) for c in (False, True)]
    assert [(r["scenario"], r["variant"], r["warmup"], r["epoch_s_median"]) for r in written["ima"]] == [
        (s, n, 2, t) for s in ("cap", "init") for n, t in (("masked", 20.0), ("compacted", 10.0))]
    assert mod.default_warmup("cpu") == 0
    assert mod.default_warmup("cuda") == mod.default_warmup(torch.device("cuda", 1)) == 1


@pytest.mark.parametrize("argv,message", [
    (["--images", "11"], "--images: the BreastMNIST training split has 10 images, got 11"),
    (["--images", "4", "--scenarios", "spread,bogus"], r"--scenarios: unknown \['bogus'\]"),
    (["--images", "4", "--scenarios", "trained"], "--scenarios trained needs --state CHECKPOINT"),
    (["--images", "4", "--variants", "compacted,nope"], r"unknown variants \['nope'\]"),
])
def test_ima_bad_choices_are_usage_errors_before_any_epoch(monkeypatch, capsys, argv, message):
    import torch

    mod, written, _ = _script(monkeypatch, "bench_ima", argv + ["--pretrain-epochs", "0", "--device", "cpu"])
    monkeypatch.setattr(mod, "load_train", lambda: (torch.rand(10, 1, 28, 28), torch.randint(0, 2, (10,))))
    monkeypatch.setattr(mod, "ima_epoch", lambda *a, **kw: pytest.fail("an epoch ran"))
    with pytest.raises(SystemExit) as exit_info:
        mod.main()
    assert exit_info.value.code == 2 and not written
    assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])


@pytest.mark.parametrize("argv,message", [
    (["--variants", "compacted,nope"], r"unknown variants \['nope'\]"),
    (["--scenarios", "spread,bogus"], r"--scenarios: unknown \['bogus'\]"),
    (["--scenarios", "trained"], "--scenarios trained needs --state CHECKPOINT"),
    (["--state", "run/checkpoint.pt", "--variants", "nope"], r"unknown variants \['nope'\]"),
])
def test_ima_bad_choices_are_refused_before_the_data_pretraining_or_state_is_read(monkeypatch, capsys, argv,
                                                                                   message):
    """A mistyped --variants / --scenarios is refused at once, not after the default pretraining epoch (or the
    --state checkpoint's load) it does not depend on."""
    mod, written, _ = _script(monkeypatch, "bench_ima", argv + ["--device", "cpu"])
    for name in ("load_train", "pretrain", "load_trained_state", "ima_epoch"):
        monkeypatch.setattr(mod, name, lambda *a, name=name, **kw: pytest.fail(f"{name} ran"))
    with pytest.raises(SystemExit) as exit_info:
        mod.main()
    assert exit_info.value.code == 2 and not written
    assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])


def test_ima_state_with_part_of_the_split_is_refused_before_the_checkpoint_is_read(monkeypatch, capsys):
    """--state's trained scenario runs the whole training split: --images (or --quick) beside it is refused before
    the checkpoint is loaded and its weights checked (a full run's: seconds), not after."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_ima", ["--state", "run/checkpoint.pt", "--images", "4", "--device",
                                                         "cpu"])
    monkeypatch.setattr(mod, "load_train", lambda: (torch.rand(10, 1, 28, 28), torch.randint(0, 2, (10,))))
    for name in ("pretrain", "load_trained_state", "ima_epoch"):
        monkeypatch.setattr(mod, name, lambda *a, name=name, **kw: pytest.fail(f"{name} ran"))
    with pytest.raises(SystemExit) as exit_info:
        mod.main()
    assert exit_info.value.code == 2 and not written
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --state: the trained scenario runs the whole training split (drop --images / --quick)")


@pytest.mark.parametrize("state,message", [("missing.pt", "no such file"), (".", "not a file"),
                                           ("garbage.pt", "not a readable checkpoint")])
def test_ima_state_that_is_not_a_checkpoint_is_a_one_line_error(monkeypatch, tmp_path, state, message):
    """A mistyped --state stops with one line naming the flag, not torch.load's traceback."""
    import torch

    (tmp_path / "garbage.pt").write_text("not a checkpoint\n")
    path = str(tmp_path / state)
    mod, written, _ = _script(monkeypatch, "bench_ima", ["--state", path, "--images", "10", "--device", "cpu"])
    monkeypatch.setattr(mod, "load_train", lambda: (torch.rand(10, 1, 28, 28), torch.randint(0, 2, (10,))))
    monkeypatch.setattr(mod, "ima_epoch", lambda *a, **kw: pytest.fail("an epoch ran"))
    with pytest.raises(SystemExit) as exit_info:
        mod.main()
    text = str(exit_info.value.code)
    assert text.startswith(f"bench_ima: --state {path}: {message}") and "\n" not in text and not written


def test_ima_state_of_another_model_is_refused_before_any_epoch(monkeypatch, tmp_path):
    """An IMA run of robust-ops train's default small_cnn (what `train --defense ima` gives) stops with one line naming
    the model the epochs train, not load_state_dict's traceback at the first epoch; resnet18's weights load."""
    import torch

    from robust_ops.models import build_model

    defense = {"margins": torch.full((10,), 0.1), "eps_train": 1.5, "delta": 0.015}
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": build_model("small_cnn", 1, 2, 28).state_dict(), "defense": defense}, path)
    mod, written, _ = _script(monkeypatch, "bench_ima", ["--state", str(path), "--images", "10", "--device", "cpu"])
    monkeypatch.setattr(mod, "load_train", lambda: (torch.rand(10, 1, 28, 28), torch.randint(0, 2, (10,))))
    monkeypatch.setattr(mod, "ima_epoch", lambda *a, **kw: pytest.fail("an epoch ran"))
    with pytest.raises(SystemExit) as exit_info:
        mod.main()
    text = str(exit_info.value.code)
    assert text.startswith(f"bench_ima: --state {path}: not the weights of the resnet18 this benchmark times "
                           "(build_model('resnet18', 1, 2, 28): Missing key(s)") and "\n" not in text and not written
    assert text.endswith("; train the IMA run with --model resnet18")
    state = mod.make_model().state_dict()
    torch.save({"model": state, "defense": defense}, path)
    assert mod.load_trained_state(str(path), 10)[0].keys() == state.keys()


def test_defenses_train_step_adds_the_extra_gradients_and_steps_once(monkeypatch):
    import types

    import torch

    mod, _, _ = _script(monkeypatch, "bench_defenses", [])
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.data.fill_(1.0)
    seen = []

    class Defense:
        needs_ids = True

        def __call__(self, model, x, y, ids):
            seen.append(ids)
            return types.SimpleNamespace(loss=model(x).sum(), extra_grads=[torch.full((1, 2), 10.0)])

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, ids = torch.tensor([[1.0, 2.0]]), torch.tensor([7])
    for _ in range(2):  # the gradient of each step is its own: zeroed first
        mod.train_step(model, Defense(), x, None, ids, opt)
    assert torch.equal(model.weight, torch.tensor([[1.0 - 2 * 11, 1.0 - 2 * 12]])) and seen == [ids, ids]


def test_attacks_ensemble_eps_is_the_smallest_power_of_two_that_breaks_a_quarter(monkeypatch, capsys):
    import types

    import torch

    mod, _, _ = _script(monkeypatch, "bench_attacks", [])
    monkeypatch.setattr(mod, "attacks", types.SimpleNamespace(fgsm=lambda model, x, y, eps: x + eps))

    def model_breaking_above(thresholds):
        """Predicts 1 for sample i once its input exceeds thresholds[i] / 255."""
        thresholds = torch.tensor(thresholds)[:, None]
        return lambda z: torch.cat([torch.zeros_like(z), z * 255 - thresholds], 1)

    x, y = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)
    assert mod.pick_ensemble_eps(model_breaking_above([0.5, 1.5, 100, 100]), x, y) == 1 / 255  # a quarter at 1/255
    assert mod.pick_ensemble_eps(model_breaking_above([2.5, 3.5, 8.5, 100]), x, y) == 4 / 255
    assert mod.pick_ensemble_eps(model_breaking_above([15.5, 100, 100, 100]), x, y) == 16 / 255
    assert "using eps" not in capsys.readouterr().out
    assert mod.pick_ensemble_eps(model_breaking_above([100] * 4), x, y) == 16 / 255
    assert "FGSM breaks 0.000 (< 0.25) of the batch even at 16/255" in capsys.readouterr().out


def test_attack_peer_rows_report_outputs_that_differ(monkeypatch, capsys):
    """same_as_* can be False, each from its own pair of outputs; robust accuracies of each side's own output. A
    ratio to a peer whose output differs times different work: its line said only '(1.00x)', as for a bitwise
    peer, and the table's same_as_peer stood four columns from the ratio."""
    import torch

    mod, written = _attacks_script(monkeypatch, ["--peers-only", "--models", "small-resnet", "--batch", "4", "--size",
                                                 "16", "--train-steps", "0", "--quick"], cases=())

    class Same:
        def __call__(self, x, y):
            return x.clone()

    class Shift(Same):
        def __call__(self, x, y):
            return x + 100  # the fake model below: class 1

    def ours(x, y):
        return x.clone()

    def ours_off_on_reference(x, y):
        return x + 1e-3 if os.environ.get(mod.BACKEND_SWITCH) == "reference" else x.clone()

    monkeypatch.setattr(mod, "peer_cases", lambda *a: [("reference differs", ours_off_on_reference, Same(), "", 3),
                                                       ("peer differs", ours, Shift(), "", 3)])
    monkeypatch.setattr(mod, "interleaved_medians", lambda fns, rounds, device=None: ([1.0] * len(fns), None))
    trained, peers = [], []
    monkeypatch.setattr(mod, "train_briefly", lambda model, steps, *a: trained.append(steps))
    real_peers = mod.bench_peers

    def bench_peers(name, model, x, y, *rest):
        peers.append((model, x, y))

        def class_1_above_10(z):
            return torch.stack([torch.zeros(len(z)), z.flatten(1)[:, 0] - 10], 1)

        return real_peers(name, class_1_above_10, x, torch.zeros_like(y), *rest)

    monkeypatch.setattr(mod, "bench_peers", bench_peers)
    mod.main()
    (model, x, y), = peers
    assert trained == [0] and torch.equal(y, model(x).argmax(1))  # labels: the clean predictions
    rows = written["bench_attacks_peers"]
    assert [(r["same_as_reference_ops"], r["same_as_peer"], r["peer"]) for r in rows] == [
        (False, True, "torchattacks.Same"), (True, False, "torchattacks.Shift")]
    assert [(r["robust_acc_ours"], r["robust_acc_peer"]) for r in rows] == [(1.0, 1.0), (1.0, 0.0)]
    columns = list(rows[0])
    assert columns.index("same_as_peer") == columns.index("peer_ratio") + 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "torchattacks." in line]
    assert lines[0].endswith("torchattacks.Same 1000 ms (1.00x), 1.000"), lines
    assert lines[1].endswith("torchattacks.Shift 1000 ms (1.00x; outputs differ: not the same computation), "
                             "0.000"), lines


def test_boundary_search_forward_seconds_is_the_median_of_timed_forwards_after_a_warm_up(monkeypatch):
    import types

    import torch

    mod, _, _ = _script(monkeypatch, "bench_boundary_search", [])
    clock, batches = [0.0], []
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def model(x):
        assert not torch.is_grad_enabled()
        batches.append(tuple(x.shape))
        clock[0] += [100.0, 1.0, 5.0, 2.0][len(batches) - 1]

    assert mod.forward_seconds(model, (7, 2, 8, 8), 6, "cpu", 3) == 2.0
    assert batches == [(6, 2, 8, 8)] * 4


def test_pgd_step_half_precision_rows_say_within_tolerance(monkeypatch):
    """float16: a provider off by a rounding step is timed, and its rows say so rather than "True"."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_pgd_step",
                              ["--shape", "2,3,4,4", "--no-compile", "--dtype", "float16"])
    real_providers = mod.providers

    def close(x_adv, x_nat, grad, alpha, eps, lo, hi, norm, hist, slot):
        torch.ops.robust_ops.pgd_step_(x_adv, x_nat, grad, alpha, eps, lo, hi, norm, hist, slot)
        x_adv.add_(1e-3)  # about two float16 rounding steps at 0.5; the tolerance is 2e-3
        if hist is not None:
            hist[slot].copy_(x_adv)

    monkeypatch.setattr(mod, "providers", lambda device, use_compile: {"eager": real_providers(device, use_compile)[
        "eager"], "close": close})
    monkeypatch.setattr(mod.common, "median_seconds", lambda fn, min_run_time=1.0: 1.0)
    mod.main()
    rows = written["pgd_step_cpu"]
    assert [r["equal_to_eager"] for r in rows] == [True, "within tolerance", ""] * 4


def test_pgd_step_compiled_provider_off_in_the_last_bit_is_timed_and_labelled(monkeypatch):
    """torch.compile's chain on CUDA rounded L2 a last bit off the eager chain (5.96e-08, H200 2026-12-04): the run
    stopped there ('not timing a wrong kernel') and lost every later row. Inductor's rounding is the peer's, not ours:
    its rows are timed and say how far off; a kernel of ours that is off still stops the run."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_pgd_step", ["--shape", "2,3,4,4"])

    def off_by_one_step(x_adv, x_nat, grad, alpha, eps, lo, hi, norm, hist, slot):
        torch.ops.robust_ops.pgd_step_(x_adv, x_nat, grad, alpha, eps, lo, hi, norm, hist, slot)
        x_adv.add_(2.0 ** -24)
        if hist is not None:
            hist[slot].copy_(x_adv)

    real_providers = mod.providers
    providers = {"eager": real_providers(torch.device("cpu"), False)["eager"], "compiled": off_by_one_step}
    monkeypatch.setattr(mod, "providers", lambda device, use_compile: providers)
    monkeypatch.setattr(mod.common, "median_seconds", lambda fn, min_run_time=1.0: 1.0)
    mod.main()
    labels = [r["equal_to_eager"] for r in written["pgd_step_cpu"]]
    assert labels[1].startswith("not bitwise (max |diff| ") and labels == [True, labels[1], ""] * 4, labels
    providers["native"] = providers.pop("compiled")
    with pytest.raises(SystemExit, match=r"native: x_adv differs from the eager chain .*not timing a wrong kernel"):
        mod.main()


def _run_on_dynamos_eager_backend(monkeypatch, mod):
    """bench_pgd_step's main() with torch.compile on Dynamo's eager backend (the same graph capture; inductor's code
    generation would take tens of seconds) and each timing one call."""
    import torch

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, backend="eager", **options))
    monkeypatch.setattr(mod.common, "median_seconds", lambda fn, min_run_time=1.0: (fn(), 1.0)[1])
    torch._dynamo.reset()
    try:
        mod.main()
    finally:
        torch._dynamo.reset()


def test_pgd_step_compiled_provider_traces_the_eager_chain_and_gets_its_rows(monkeypatch):
    """The `compiled` provider is reference.pgd_step_ under torch.compile(fullgraph=True). Its clip-bound rounding
    went through numpy's np.errstate, which Dynamo refuses ('attempted to trace numpy function'): every run printed
    'compiled ... failed' four times and had no torch.compile rows. Dynamo's eager backend here (the same graph
    capture; inductor's code generation would take tens of seconds)."""
    mod, written, _ = _script(monkeypatch, "bench_pgd_step", ["--shape", "2,3,4,4"])
    _run_on_dynamos_eager_backend(monkeypatch, mod)
    rows = [(r["norm"], r["history"], r["equal_to_eager"]) for r in written["pgd_step_cpu"]
            if r["provider"] == "compiled"]
    assert rows == [(norm, history, True) for norm in ("linf", "l2") for history in (False, True)]


def test_pgd_step_compiled_l2_on_inductors_in_place_bug_is_timed_out_of_place_and_says_why(monkeypatch, capsys):
    """torch 2.14.1's inductor cannot compile the L2 chain's in-place write of x_adv (InductorError KeyError 'buf1',
    pytorch/pytorch#196570, reproduced in plain PyTorch): the L2 rows had no torch.compile provider, and the run said
    only 'failed'. On that error the chain is compiled out of place and copied into x_adv and the slot, its row named
    so and the line saying why; any other failure of torch.compile is still reported and its row left out. Dynamo's
    eager backend here (inductor's code generation would take tens of seconds)."""
    from robust_ops import reference

    mod, written, _ = _script(monkeypatch, "bench_pgd_step", ["--shape", "2,3,4,4"])
    InductorError = type("InductorError", (RuntimeError,), {})
    real_providers = mod.providers

    def compiled(*args):  # the in-place chain, as inductor fails it on L2
        if args[7] == "l2":
            raise InductorError("KeyError: 'buf1'\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace")
        reference.pgd_step_(*args)

    monkeypatch.setattr(mod, "providers", lambda device, use_compile: {**real_providers(device, False),
                                                                        "compiled": compiled})
    _run_on_dynamos_eager_backend(monkeypatch, mod)
    rows = [(r["norm"], r["history"], r["provider"], r["equal_to_eager"]) for r in written["pgd_step_cpu"]
            if r["provider"].startswith("compiled")]
    assert rows == [("linf", False, "compiled", True), ("linf", True, "compiled", True),
                    ("l2", False, mod.COMPILED_OUT_OF_PLACE, True), ("l2", True, mod.COMPILED_OUT_OF_PLACE, True)]
    out = capsys.readouterr().out
    for history in (False, True):
        assert (f"compiled l2 history={history}: failed: InductorError: KeyError: 'buf1' (torch inductor's bug on an "
                f"in-place write of an input, pytorch/pytorch#196570); timing '{mod.COMPILED_OUT_OF_PLACE}' instead"
                in out)


def test_pgd_step_compiled_provider_is_there_unless_no_compile(monkeypatch):
    import torch

    from robust_ops import reference

    mod, _, _ = _script(monkeypatch, "bench_pgd_step", [])
    monkeypatch.setattr(torch, "compile", lambda fn, **options: ("compiled", fn, options))
    assert mod.providers(torch.device("cpu"), True) == {
        "native": torch.ops.robust_ops.pgd_step_, "eager": reference.pgd_step_, "torchattacks": mod.torchattacks_step,
        "compiled": ("compiled", reference.pgd_step_, {"fullgraph": True, "dynamic": False})}
    assert list(mod.providers(torch.device("cpu"), False)) == ["native", "eager", "torchattacks"]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_torchattacks_provider_is_torchattacks_own_step(monkeypatch, norm):
    """The peer row: torchattacks 3.5.1's PGD / PGDL2 update with its Python-number alpha and eps (the eager chain
    is the reference, whose per-sample tensors make its eps clamp a broadcast one): one step of torchattacks itself,
    fed the benchmark's gradient, lands on the same bits."""
    import torch

    torchattacks = pytest.importorskip("torchattacks")
    mod, _, _ = _script(monkeypatch, "bench_pgd_step", [])
    _, x_nat, grad, alpha, eps = mod.make_inputs((2, 3, 8, 8), torch.float32, torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    attack = cls(model, eps=mod.EPS, alpha=mod.ALPHA, steps=1, random_start=False)  # starts at x_nat
    monkeypatch.setattr(torch.autograd, "grad", lambda *args, **kwargs: [grad])
    expected = attack.forward(x_nat.clone(), torch.zeros(2, dtype=torch.long))
    got, history = x_nat.clone(), torch.full((2,) + tuple(x_nat.shape), float("nan"))
    mod.torchattacks_step(got, x_nat, grad, alpha, eps, 0.0, 1.0, norm, history, 1)
    assert torch.equal(got, expected) and torch.equal(history[1], expected)


@pytest.mark.parametrize("shape", ["4,8", "2,3,5", "2,3,2,4,4"])
def test_pgd_step_runs_on_a_batch_of_any_rank(monkeypatch, shape):
    """--shape takes any [N, ...] batch, as the op does: the torchattacks provider's L2 step viewed its per-sample
    norms as [N, 1, 1, 1] (its images' rank), which a [N, D] batch broadcast into 4 dims, stopping the run at the
    first L2 row after the L-inf rows had been timed."""
    mod, written, _ = _script(monkeypatch, "bench_pgd_step", ["--shape", shape, "--no-compile"])
    monkeypatch.setattr(mod.common, "median_seconds", lambda fn, min_run_time=1.0: fn() or 1e-3)
    mod.main()
    rows = written["pgd_step_cpu"]
    assert len(rows) == 16 and all(r["equal_to_eager"] is True for r in rows if r["provider"] != "copy (roofline)")


@pytest.mark.parametrize("scenario,channels_last,prepacked", [("init", False, True), ("cap", True, False),
                                                              ("spread", True, True)])
def test_ima_epoch_runs_the_defense_and_model_its_variant_names(monkeypatch, scenario, channels_last, prepacked):
    import argparse

    import torch

    from robust_ops.ima import paper_eps_train
    from robust_ops.models import build_model
    from robust_ops.prepacked_conv import prepacked_conv_active

    mod, _, _ = _script(monkeypatch, "bench_ima", [])
    seen = []

    def fake_epoch(model, opt, defense, x, y, ids_all, args, min_rows):
        seen.append((_layout(model.layer1[0].conv1.weight), prepacked_conv_active(model), model.training, min_rows))
        return defense

    monkeypatch.setattr(mod, "_ima_epoch", fake_epoch)
    torch.manual_seed(0)
    state = build_model("resnet18", 1, 2, 28).state_dict()
    x, y = torch.rand(5, 1, 28, 28), torch.zeros(5, dtype=torch.long)
    args = argparse.Namespace(steps=3, search_steps=4, batch_size=2)
    defense = mod.ima_epoch(state, x, y, torch.arange(5), args, compact=True, arity=4, scenario=scenario,
                            batch_exit=False, min_rows=16, channels_last=channels_last, prepacked=prepacked)
    assert seen == [("channels_last" if channels_last else "nchw", prepacked, True, 16)]
    assert (defense.compact, defense.arity, defense.batch_exit, defense.min_rows, defense.norm) == (True, 4, False, 16,
                                                                                                   "l2")
    assert (defense.steps, defense.search_steps, defense.num_samples) == (3, 4, 5)
    eps = paper_eps_train((1, 28, 28), "l2")
    assert defense.eps_train == pytest.approx(eps) and defense.delta == pytest.approx(eps / 100)
    margins = defense.margins
    if scenario == "spread":
        assert margins.min() >= 0 and margins.max() <= eps and len(set(margins.tolist())) == 5
    else:
        assert torch.allclose(margins, torch.full((5,), eps if scenario == "cap" else eps / 100))


@pytest.mark.parametrize("fault", ["torchattacks", "no pool", "no native layers", "variants"])
def test_attacks_same_output_columns_can_say_false(monkeypatch, fault):
    """Each equality in the pgd-10 and ensemble rows compares the outputs its row names: one side made to differ,
    its row says so."""
    import types

    import torchattacks

    from robust_ops import attacks
    from robust_ops.prepacked_conv import prepacked_conv_active

    mod, written = _attacks_script(monkeypatch, ["--models", "small-resnet", "--batch", "2", "--size", "8",
                                                 "--train-steps", "0", "--rounds", "1", "--device", "cpu"], cases=())
    monkeypatch.setattr(mod, "interleaved_medians", lambda fns, rounds, device=None: ([1.0] * len(fns), None))
    variants = fault == "variants"

    class Spy:
        def __getattr__(self, name):
            return getattr(attacks, name)

        def pgd(self, model, x, y, **kw):
            out = attacks.pgd(model, x, y, **kw)
            cl, packed = _layout(model.blocks[1].conv1.weight) == "channels_last", prepacked_conv_active(model)
            offset = {"no pool": os.environ.get(mod.POOL_SWITCH) == "0",
                      "no native layers": os.environ.get(mod.LAYERS_SWITCH) == "0"}.get(fault, False) * 1e-3
            if variants:
                offset += 2e-3 * cl + 4e-3 * packed
            if kw.get("emit"):
                return out[0] + 1e-3 * variants, out[1]
            return out + offset

        def ensemble(self, model, x, y, chain, cascade=True):
            result = attacks.ensemble(model, x, y, chain, cascade=cascade)
            if cascade or not variants:
                return result
            return types.SimpleNamespace(robust_accuracy=lambda: result.robust_accuracy() + 0.25)

    class PGD(torchattacks.PGD):
        def __call__(self, x, y):
            return super().__call__(x, y) + 1e-3 * (fault == "torchattacks")

    monkeypatch.setattr(mod, "attacks", Spy())
    monkeypatch.setattr(torchattacks, "PGD", PGD)
    mod.main()
    rows = written["bench_attacks"]
    assert [r["same_output"] for r in rows[:3]] == [variants] * 3  # one flag for the three bitwise comparisons
    diffs = [float(r["case"].split("max diff ")[1].rstrip(")")) for r in rows[3:6]]
    if variants:
        assert diffs == pytest.approx([2e-3, 4e-3, 6e-3], abs=1e-4)  # 2 significant digits
    assert [r["same_output"] for r in rows[3:6]] == [d == 0 for d in diffs]
    assert [r["same_output"] for r in rows[6:8]] == [not variants] * 2


def test_help_descriptions_are_whole_sentences():
    """`--help` opened with the docstring's first line, which for four scripts stopped mid-sentence ("... and a")."""
    import ast

    for path in sorted((REPO / "benchmarks").glob("bench_*.py")):
        source = path.read_text()
        (expression,) = re.findall(r"ArgumentParser\(description=(__doc__[^,)]*(?:\)\[0\])?)", source)
        if expression == "__doc__":  # the whole docstring, usage lines and all
            continue
        description = eval(expression, {"__doc__": ast.get_docstring(ast.parse(source), clean=False)})
        assert description.rstrip().endswith((".", ":")), f"{path.name}: {description!r}"


def test_with_env_sets_the_variable_for_the_call_and_restores_it(monkeypatch):
    """Set or unset before, the variable is as it was afterwards, also when the call raises."""
    common = _common(monkeypatch)
    monkeypatch.delenv("ROBUST_OPS_TEST_SWITCH", raising=False)
    assert common.with_env("ROBUST_OPS_TEST_SWITCH", "1", lambda: os.environ["ROBUST_OPS_TEST_SWITCH"]) == "1"
    assert "ROBUST_OPS_TEST_SWITCH" not in os.environ
    monkeypatch.setenv("ROBUST_OPS_TEST_SWITCH", "before")

    def fails():
        assert os.environ["ROBUST_OPS_TEST_SWITCH"] == "0"
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        common.with_env("ROBUST_OPS_TEST_SWITCH", "0", fails)
    assert os.environ["ROBUST_OPS_TEST_SWITCH"] == "before"


@pytest.mark.parametrize("batch_size", [4, 40])
def test_ima_epoch_probes_before_its_timer_whatever_a_batch_leaves_correct(monkeypatch, batch_size):
    """IMA probes a batch's clean-correct samples, any number of them: the epoch's warm-up probes every size that
    can take, so no probe runs inside the timer (a model that gets a different number right in every batch)."""
    import argparse
    import contextlib
    import itertools

    import torch

    from robust_ops import ima
    from robust_ops.ima import IMA

    mod, _, _ = _script(monkeypatch, "bench_ima", [])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    n = 45
    x = torch.rand(n, 1, 2, 2)
    y = model(x).argmax(1)
    y[torch.rand(n) < 0.5] ^= 1  # about half of each batch starts misclassified: the probed subsets vary in size
    cache_sizes = []

    @contextlib.contextmanager
    def timed_loop(model_, device):
        cache_sizes.append(len(ima._INVARIANT_SIZES[model_]))
        yield
        cache_sizes.append(len(ima._INVARIANT_SIZES[model_]))

    monkeypatch.setattr(mod, "library_speedups", timed_loop)
    defense = IMA(num_samples=n, eps_train=0.5, steps=2, search_steps=2, norm="l2")
    args = argparse.Namespace(batch_size=batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    clock = itertools.count()  # a second per reading: the tiny probes' real time rounded to probe_s = 0.0 at times
    monkeypatch.setattr(mod.time, "perf_counter", lambda: float(next(clock)))
    counts = mod._ima_epoch(model, opt, defense, x, y, torch.arange(n), args, None)[3]
    warmed = {ima.probe_rows(rows) for rows in range(1, batch_size + 1)}
    assert cache_sizes == [len(warmed)] * 2 and counts["probe_s"] > 0


def test_bench_cli_runs_the_scripts_in_the_callers_folder(tmp_path, monkeypatch, capsys):
    """A relative --bench-dir with a parent folder failed every script ("can't open file", run from the bench dir's
    parent), and a relative $ROBUST_OPS_BENCH_DIR / $ROBUST_OPS_DATA was read from there, not from where the user
    stood."""
    from robust_ops import cli

    (tmp_path / "sub" / "benches").mkdir(parents=True)
    (tmp_path / "sub" / "benches" / "bench_a.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['ROBUST_OPS_BENCH_DIR']).mkdir()\n"
        "(pathlib.Path(os.environ['ROBUST_OPS_BENCH_DIR']) / 'a.csv').write_text(os.getcwd())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUST_OPS_BENCH_DIR", "results")
    rc = cli.main(["bench", "--bench-dir", "sub/benches"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (tmp_path / "results" / "a.csv").read_text() == str(tmp_path)


@pytest.mark.parametrize("under", [False, True])
def test_results_dir_that_is_a_file_stops_a_benchmark_at_start(tmp_path, under):
    """$ROBUST_OPS_BENCH_DIR naming a file (or a path under one) failed only when the rows were written, minutes of
    timing later, with a FileExistsError traceback and without printing the table."""
    (tmp_path / "afile").write_text("")
    target = tmp_path / "afile" / "sub" if under else tmp_path / "afile"
    env = {**os.environ, "ROBUST_OPS_BENCH_DIR": str(target), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_pgd_step.py"), "--quick"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == (f"bench_pgd_step: $ROBUST_OPS_BENCH_DIR: {target}{f': {tmp_path}/afile' * under} "
                                f"is a file, not a folder (the CSVs go there)")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc, a folder nobody may write (root included)")
@pytest.mark.parametrize("kind", ["link", "unwritable"])
def test_results_dir_the_out_rule_refuses_stops_a_benchmark_at_start(tmp_path, kind):
    """$ROBUST_OPS_BENCH_DIR was checked by a copy of the --out rule that looked for a file in the way only: a link to
    a folder not made yet, or /proc/x, timed every shape (15 s of bench_boundary_search --quick here, minutes for
    others) and then stopped 'cannot write .../boundary_search.csv (File exists)' / '(No such file or directory)'.
    The scripts now check it by _files.out_dir_problem, the CLI's rule, before any timing."""
    if kind == "link":
        (tmp_path / "linkout").symlink_to("nowhere/deeper")
    target, said = {"link": (tmp_path / "linkout", "it is a link to nowhere/deeper, which does not exist; make that "
                                                   "folder first"),
                    "unwritable": ("/proc/robust-ops-bench", "cannot write in /proc (")}[kind]
    env = {**os.environ, "ROBUST_OPS_BENCH_DIR": str(target), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_pgd_step.py"), "--quick"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().startswith(f"bench_pgd_step: $ROBUST_OPS_BENCH_DIR: {target}: {said}"), r.stderr
    assert r.stderr.strip().endswith("(the CSVs go there)"), r.stderr


def test_bench_cli_takes_a_results_dir_whose_parent_it_cannot_write(tmp_path, monkeypatch, capsys):
    """The scripts replace each CSV inside $ROBUST_OPS_BENCH_DIR, but `robust-ops bench` checked it as a staged --out,
    so an existing folder in a parent this process cannot write (a shared results folder) was refused there: the CLI
    checks it as the scripts do."""
    import errno

    from robust_ops import _files, cli

    (tmp_path / "benches").mkdir()
    (tmp_path / "benches" / "bench_a.py").write_text(
        "import os, pathlib\n(pathlib.Path(os.environ['ROBUST_OPS_BENCH_DIR']) / 'a.csv').write_text('ran')\n")
    (tmp_path / "shared" / "results").mkdir(parents=True)
    real = _files.check_writable

    def check_writable(folder):
        if Path(folder) == tmp_path / "shared":
            raise PermissionError(errno.EACCES, "Permission denied")
        real(folder)

    monkeypatch.setattr(_files, "check_writable", check_writable)
    monkeypatch.setenv("ROBUST_OPS_BENCH_DIR", str(tmp_path / "shared" / "results"))
    rc = cli.main(["bench", "--bench-dir", str(tmp_path / "benches")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (tmp_path / "shared" / "results" / "a.csv").read_text() == "ran"


@pytest.mark.parametrize("variable,message", [
    ("ROBUST_OPS_CPU_ISA", "expected $ROBUST_OPS_CPU_ISA to be avx512, avx2 or scalar, got 'bogus'"),
    ("ROBUST_OPS_CPU_POOL", "expected $ROBUST_OPS_CPU_POOL to be one of 1/true/on/yes (on) or 0/false/off/no (off), "
                            "got 'bogus'"),
])
def test_a_bad_library_switch_stops_a_benchmark_at_start(tmp_path, variable, message):
    """A script run directly checks the library's $ROBUST_OPS_* switches as robust-ops does: a bad
    $ROBUST_OPS_CPU_ISA stopped bench_pgd_step only when its rows were written, after every timing, with a traceback
    and without the table; a bad $ROBUST_OPS_CPU_POOL at its first pooled call."""
    env = {**os.environ, variable: "bogus", "ROBUST_OPS_BENCH_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_pgd_step.py"), "--quick", "--shape", "4",
                        "--no-compile"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == "" and not list(tmp_path.iterdir())
    assert r.stderr.strip() == f"bench_pgd_step: {message}"


def test_write_rows_prints_the_table_before_a_write_that_fails(monkeypatch, tmp_path, capsys):
    """A results folder that turns unwritable during the run costs the CSV, not the table: printed first, then one
    line naming the file."""
    common = _common(monkeypatch)
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "afile")
    monkeypatch.setattr(common, "environment",
                        lambda device=None: dict(_FAKE_ENV))
    with pytest.raises(SystemExit, match=r"^cannot write .*afile/demo\.csv \(.*\); the table above is all"):
        common.write_rows("demo", [{"op": "a", "ms": 1.0}])
    assert capsys.readouterr().out.splitlines()[:3] == ["| op | ms |", "|---|---|", "| a | 1 |"]


def test_bench_cli_refuses_a_results_dir_that_is_a_file_before_running_anything(tmp_path, monkeypatch, capsys):
    from robust_ops import cli

    (tmp_path / "bench_a.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').write_text('')\n")
    monkeypatch.setenv("ROBUST_OPS_BENCH_DIR", str(tmp_path / "bench_a.py"))
    rc = cli.main(["bench", "--bench-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == (f"robust-ops bench: error: $ROBUST_OPS_BENCH_DIR: {tmp_path}/bench_a.py exists "
                                       f"and is not a folder"), err
    assert not (tmp_path / "bench_a.ran").exists()


def test_ima_reads_breastmnist_where_the_library_finds_it(monkeypatch, tmp_path):
    """bench_ima took any file $ROBUST_OPS_DATA named as BreastMNIST (a user's pneumoniamnist.npz: epochs on other
    images, labelled BreastMNIST) and never looked in ~/.medmnist, the library's own default folder."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_ima

    (tmp_path / "home" / ".medmnist").mkdir(parents=True)
    (tmp_path / "home" / ".medmnist" / "breastmnist.npz").write_bytes(b"")
    (tmp_path / "pneumoniamnist.npz").write_bytes(b"")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBUST_OPS_DATA", str(tmp_path / "pneumoniamnist.npz"))
    assert bench_ima.data_path() == tmp_path / "home" / ".medmnist" / "breastmnist.npz"
    monkeypatch.setenv("ROBUST_OPS_DATA", str(tmp_path / "home" / ".medmnist"))
    assert bench_ima.data_path() == tmp_path / "home" / ".medmnist" / "breastmnist.npz"
    (tmp_path / "home" / ".medmnist" / "breastmnist.npz").unlink()
    monkeypatch.setattr(bench_ima, "__file__", str(tmp_path / "a" / "b" / "bench_ima.py"))  # no ../shared/data
    with pytest.raises(SystemExit, match=r"^bench_ima: breastmnist\.npz not found \(looked in .*\.medmnist, "):
        bench_ima.data_path()


def test_pgd_step_a_provider_that_raises_stops_the_run_unless_it_is_torch_compile(monkeypatch, capsys):
    """Every provider's exception was reported as one "failed" line and skipped, so a native or Triton kernel that
    raised left a table without its rows and exit status 0; and an exception with an empty message (inductor's bare
    AssertionError) crashed the report with an IndexError. A kernel the build lacks (NotImplementedError from the
    dispatcher) is still reported and skipped."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_pgd_step", ["--shape", "2,3,4,4", "--no-compile"])
    real_providers = mod.providers

    def compiled(*args):
        raise AssertionError()

    monkeypatch.setattr(mod, "providers", lambda device, use_compile: {**real_providers(device, use_compile),
                                                                        "compiled": compiled})
    monkeypatch.setattr(mod.common, "median_seconds", lambda fn, min_run_time=1.0: 1.0)
    mod.main()
    assert capsys.readouterr().out.count("compiled linf history=False: failed: AssertionError: \n") == 1
    assert {r["provider"] for r in written["pgd_step_cpu"]} == {"native", "eager", "torchattacks", "copy (roofline)"}

    def missing(*args):
        raise NotImplementedError("Could not run 'robust_ops::pgd_step_' with arguments from the 'CUDA' backend.\n...")

    def broken(*args):
        raise RuntimeError("pgd_step_: eps must be >= 0\n...")

    written.clear()
    monkeypatch.setattr(mod, "providers", lambda device, use_compile: {**real_providers(device, use_compile),
                                                                        "missing": missing})
    mod.main()
    assert "missing linf history=False: failed: NotImplementedError: Could not run" in capsys.readouterr().out
    assert "missing" not in {r["provider"] for r in written["pgd_step_cpu"]}
    written.clear()
    monkeypatch.setattr(mod, "providers", lambda device, use_compile: {"broken": broken, "eager": torch.add})
    with pytest.raises(SystemExit, match=r"^broken linf history=False: failed: RuntimeError: pgd_step_: eps must be "
                                         r">= 0; not timing a failing kernel$"):
        mod.main()
    assert not written


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pgd_step_half_precision_provider_beyond_tolerance_stops_with_one_line(monkeypatch, dtype):
    """float16/bfloat16: a provider off by more than the tolerance stopped the run with assert_close's AssertionError,
    a traceback and a multi-line report, where float32 stops with one line."""
    import torch

    mod, written, _ = _script(monkeypatch, "bench_pgd_step", ["--shape", "2,3,4,4", "--no-compile", "--dtype", dtype])
    real_providers = mod.providers

    def far(x_adv, x_nat, grad, alpha, eps, lo, hi, norm, hist, slot):
        torch.ops.robust_ops.pgd_step_(x_adv, x_nat, grad, alpha, eps, lo, hi, norm, hist, slot)
        x_adv.add_(0.125)

    monkeypatch.setattr(mod, "providers", lambda device, use_compile: {**real_providers(device, use_compile),
                                                                        "far": far})
    monkeypatch.setattr(mod.common, "median_seconds", lambda fn, min_run_time=1.0: 1.0)
    with pytest.raises(SystemExit, match=rf"^far: x_adv differs from the eager chain beyond the torch\.{dtype} "
                                         r"tolerance \(max \|diff\| 0\.12\d\); not timing a wrong kernel$"):
        mod.main()
    assert not written


def test_bench_cli_list_shows_what_only_picks(tmp_path, capsys):
    """--list ignored --only: it listed every benchmark, and an unknown topic passed without a word."""
    from robust_ops import cli

    for name in ("a", "b", "c"):
        (tmp_path / f"bench_{name}.py").write_text("")
    assert cli.main(["bench", "--bench-dir", str(tmp_path), "--list", "--only", "c,a"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"c\t{tmp_path}/bench_c.py", f"a\t{tmp_path}/bench_a.py"]
    assert cli.main(["bench", "--bench-dir", str(tmp_path), "--list", "--only", "nope"]) == 2
    assert capsys.readouterr().err.strip() == ("robust-ops bench: error: --only: unknown benchmark(s) nope; expected "
                                               "some of a, b, c")


def test_bench_cli_refuses_a_topic_given_twice_in_only(tmp_path, capsys):
    """--only a,c,a ran (and listed) a once, silently: a repeated topic is refused as demo's and reproduce's repeated
    --methods are (a typo for another topic?)."""
    from robust_ops import cli

    for name in ("a", "b", "c"):
        (tmp_path / f"bench_{name}.py").write_text("")
    assert cli.main(["bench", "--bench-dir", str(tmp_path), "--list", "--only", "a,c, a"]) == 2
    assert capsys.readouterr().err.strip() == "robust-ops bench: error: --only: a given more than once"


def test_attacks_builds_each_model_for_the_size_of_its_images(monkeypatch):
    """The models were built for 64x64 whatever --size said: vgg16 at --size 8 kept five 2x2 pools and crashed on its
    first forward, resnet18 at --size 128 kept the small-image 3x3 stem (another network than build_model and
    `robust-ops train --size 128` use)."""
    mod, written = _attacks_script(monkeypatch, ["--peers-only", "--models", "vgg16", "--batch", "2", "--size", "8",
                                                 "--train-steps", "0", "--quick"], cases=())
    built = []
    real_build = mod.build_model
    monkeypatch.setattr(mod, "build_model", lambda name, **kw: (built.append((name, kw["image_size"])),
                                                                real_build(name, **kw))[1])
    mod.main()
    assert set(built) == {("vgg16", 8)} and written["bench_attacks_peers"] == []
    assert mod.make_model("resnet18", "cpu", 128).conv1.kernel_size == (7, 7)


@pytest.mark.parametrize("script,argv", [("bench_attacks", ["--models", "small-resnet,densenet121", "--size", "8"]),
                                         ("bench_defenses", ["--model", "densenet121", "--size", "8"])])
def test_a_model_that_cannot_take_the_size_is_a_usage_error_before_any_work(script, argv, monkeypatch, capsys):
    """densenet121 below 16x16 was build_model's ValueError traceback, in bench_attacks only after the models before it
    had been trained and timed."""
    mod, written, threads = _script(monkeypatch, script, argv)
    with pytest.raises(SystemExit) as exit_info:
        mod.main()
    assert exit_info.value.code == 2 and not written and not threads
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"{script}.py: error: --size 8: densenet121 needs images of at least 15x15 pixels, got "
                       f"image_size=8") and "Traceback" not in "".join(err)


def test_defenses_skip_what_the_model_cannot_run_with_a_line_saying_why(monkeypatch, capsys):
    """--model mlp with the default defenses crashed: MIRST-DM's prepare_model raised a ValueError traceback (no
    max-pool to replace) while setting up, and the torchattacks AT step one in torchattacks' cross-entropy (one
    logit for two classes) in the first timed round."""
    pytest.importorskip("torchattacks")
    mod, written, _ = _script(monkeypatch, "bench_defenses", ["--model", "mlp", "--size", "8", "--batch", "2",
                                                              "--warmup", "0", "--rounds", "1", "--defenses", "at",
                                                              "mirst-dm", "at-torchattacks"])
    mod.main()
    assert [r["defense"] for r in written["defenses"]] == ["standard", "at"]
    out = capsys.readouterr().out
    assert "skip mirst-dm: replace_maxpool: MLP has no nn.MaxPool2d layer" in out
    assert "skip at-torchattacks: torchattacks' PGD needs a logit per class" in out


def test_defenses_without_torchattacks_skip_its_row_saying_how_to_install_it(monkeypatch, capsys):
    """torchattacks is a test-only dependency: without it the at-torchattacks row was skipped as 'its module is not
    available in this checkout', as if the checkout lacked a file, not naming the package to install."""
    import importlib.util

    mod, written, _ = _script(monkeypatch, "bench_defenses", ["--model", "small_cnn", "--size", "8", "--batch", "2",
                                                              "--warmup", "0", "--rounds", "1", "--defenses",
                                                              "at-torchattacks"])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "torchattacks" else find_spec(name))
    mod.main()
    assert [r["defense"] for r in written["defenses"]] == ["standard"]
    assert ("skip at-torchattacks: torchattacks 3.5.1, its peer, is not installed (install it as scripts/setup.sh "
            "does: pip install --no-deps torchattacks==3.5.1)") in capsys.readouterr().out.splitlines()


def test_an_empty_results_dir_variable_is_unset(monkeypatch):
    """ROBUST_OPS_BENCH_DIR= (empty) wrote the CSVs into whatever folder the benchmark ran in (Path("") is ".");
    empty counts as unset, as the library's other environment switches."""
    common = _common(monkeypatch)
    monkeypatch.setenv("ROBUST_OPS_BENCH_DIR", "")
    assert common._results_dir() == REPO / "benchmarks" / "results"


def test_attacks_without_torchattacks_is_one_line_before_any_work(monkeypatch):
    """torchattacks is a test-only dependency (scripts/setup.sh), so an installed library may lack it: bench_attacks
    stopped with a ModuleNotFoundError traceback; bench_defenses skips its torchattacks row saying why."""
    mod, written, _ = _script(monkeypatch, "bench_attacks", ["--quick", "--models", "small-resnet", "--size", "8"])
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks raises ModuleNotFoundError
    monkeypatch.setattr(mod, "blobs", lambda *a, **kw: pytest.fail("work ran"))
    with pytest.raises(SystemExit) as exit_info:
        mod.main()
    assert str(exit_info.value.code) == ("bench_attacks: needs torchattacks 3.5.1, the peer both tables time ours "
                                         "against (install it as scripts/setup.sh does: pip install --no-deps "
                                         "torchattacks==3.5.1)") and not written


def _usage_error_before_any_work(script, argv, monkeypatch, capsys):
    """Runs benchmarks/<script>.py's main() on argv with its heavy functions stubbed to fail at once (an option let
    through fails in a second, not after minutes of pretraining); asserts exit status 2, returns stderr's last line."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    module = importlib.import_module(script)
    for name in ("make_model", "load_train", "build_model"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, name=name, **kw: pytest.fail(f"{name} ran"))
    monkeypatch.setattr(sys, "argv", [f"{script}.py"] + argv)
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


REPEATS = [
    ("bench_attacks", ["--models", "small-resnet,resnet18,small-resnet"],
     "--models: small-resnet given more than once"),
    ("bench_ima", ["--scenarios", "spread,cap,spread"], "--scenarios: spread given more than once"),
    ("bench_prepacked_conv", ["--batches", "4,16,4"], "--batches: 4 given more than once"),
    ("bench_defenses", ["--defenses", "at", "mirst", "at"], "--defenses: at given more than once"),
    ("bench_ima", ["--variants", "compacted,naive,compacted"], "--variants: compacted given more than once"),
]


@pytest.mark.parametrize("script,argv,message", REPEATS, ids=[s for s, _, _ in REPEATS])
def test_a_list_entry_given_twice_is_a_usage_error_before_any_work(script, argv, message, monkeypatch, capsys):
    """bench_attacks --models, bench_ima --scenarios and bench_prepacked_conv --batches ran (minutes for a resnet18)
    and wrote the rows of an entry given twice twice; bench_defenses --defenses and bench_ima --variants ran it once,
    the repeat dropped without a word. Refused as robust-ops bench refuses a topic given twice."""
    assert _usage_error_before_any_work(script, argv, monkeypatch, capsys) == f"{script}.py: error: {message}"


ONE_IMAGE_BATCHES = [
    ("bench_attacks", ["--batch", "1", "--size", "4", "--models", "small-resnet", "--peers-only"], 4),
    ("bench_defenses", ["--batch", "1", "--size", "8", "--model", "resnet18", "--defenses", "standard"], 8),
]


@pytest.mark.parametrize("script,argv,size", ONE_IMAGE_BATCHES, ids=[s for s, _, _ in ONE_IMAGE_BATCHES])
def test_a_one_image_batch_the_batch_norms_cannot_train_on_is_a_usage_error(script, argv, size, monkeypatch, capsys):
    """--batch 1 on images whose last feature maps are 1x1 stopped at the first training step with torch's "Expected
    more than 1 value per channel when training" traceback; a usage error before any work now."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py"] + argv)
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"{script}.py: error: --batch 1: a training step would normalize one {size}x{size} image, and the model's "
        "batch norm then sees a single value per channel (its last feature maps are 1x1); use --batch 2 or more, or "
        "a larger --size")


def test_a_one_image_batch_passes_where_the_batch_norms_see_more_than_one_value(monkeypatch):
    """The check refuses only what would fail: at 64x64 resnet18's last feature maps are 2x2 (no error), and a
    model without batch norm passes at any size."""
    import argparse
    import importlib

    import torch

    from robust_ops.models import build_model

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    common = importlib.import_module("common")

    parser = argparse.ArgumentParser()
    common.refuse_one_image_batch_norm(parser, build_model("resnet18", 1, 2, 64), 64)
    common.refuse_one_image_batch_norm(parser, build_model("mlp", 1, 2, 4), 4)
    with pytest.raises(ValueError, match="expected 2D or 3D input"):  # another error of the model is not reworded
        common.refuse_one_image_batch_norm(parser, torch.nn.BatchNorm1d(1), 4)


BAD_COMBINATIONS = [
    ("bench_attacks", ["--peers-only", "--rounds", "3"], "argument --rounds: not used with --peers-only"),
    ("bench_attacks", ["--no-peers", "--peer-rounds", "2"], "argument --peer-rounds: not used with --no-peers"),
    ("bench_ima", ["--lockstep", "--scenarios", "cap"], "argument --lockstep: --scenarios not used with it"),
    ("bench_ima", ["--lockstep", "--variants", "naive", "--repeats", "2"],
     "argument --lockstep: --variants, --repeats not used with it"),
    ("bench_ima", ["--lockstep", "--warmup", "1"], "argument --lockstep: --warmup not used with it"),
    ("bench_ima", ["--state", "run/checkpoint.pt", "--pretrain-epochs", "3"],
     "argument --state: --pretrain-epochs not used with it"),
    ("bench_ima", ["--state", "run/checkpoint.pt", "--pretrain-batch-size", "32", "--pretrain-epochs", "0"],
     "argument --state: --pretrain-epochs, --pretrain-batch-size not used with it"),
]


@pytest.mark.parametrize("script,argv,message", BAD_COMBINATIONS, ids=[" ".join(a) for _, a, _ in BAD_COMBINATIONS])
def test_options_the_run_would_ignore_are_a_usage_error(script, argv, message, monkeypatch, capsys):
    """bench_attacks --peers-only timed with the peer rounds whatever --rounds said (and --no-peers ignored
    --peer-rounds); bench_ima --lockstep ran its one spread check whatever --scenarios / --variants / --repeats /
    --warmup said, and --state skipped the pretraining whatever --pretrain-epochs / --pretrain-batch-size said."""
    assert f": error: {message}" in _usage_error_before_any_work(script, argv, monkeypatch, capsys)


@pytest.mark.parametrize("script", sorted(path.stem for path in (REPO / "benchmarks").glob("bench_*.py")))
def test_a_script_runs_on_the_robust_ops_pythonpath_names_before_its_checkouts(tmp_path, script):
    """`robust-ops bench --bench-dir CHECKOUT/benchmarks` of an installed (non-editable) robust_ops names its own
    package in $PYTHONPATH; every script put its checkout first on sys.path, so it imported that checkout's robust_ops,
    not built in place, and stopped ('couldn't load the compiled ops'). The checkout still comes before an installed
    or editable copy when $PYTHONPATH names none."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "benchmarks", checkout / "benchmarks", ignore=shutil.ignore_patterns("results", "__py*"))
    (checkout / "robust_ops").mkdir()
    (checkout / "robust_ops" / "__init__.py").write_text("raise ImportError('the checkout, not built')\n")
    # behind the last of several $PYTHONPATH folders, not the first (mutation testing: min for max survived) (found by
    # the mutB helper)
    (tmp_path / "elsewhere").mkdir()
    several = os.pathsep.join([str(tmp_path / "elsewhere"), str(REPO)])
    cases = [(str(REPO), 0)] + ([("", 1), (several, 0)] if script == "bench_pgd_step" else [])
    for pythonpath, status in cases:
        env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "ROBUST_OPS_BENCH_DIR": str(tmp_path)}
        r = subprocess.run([sys.executable, str(checkout / "benchmarks" / f"{script}.py"), "--help"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == status, r.stderr[-3000:]
        assert ("ImportError: the checkout, not built" in r.stderr) == bool(status), r.stderr[-3000:]
