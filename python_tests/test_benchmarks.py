"""The benchmark scripts run and check what they time (tiny shapes; the timings themselves are not tested)."""

import csv
import os
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
    assert list(rows) == ["fgsm", "pgd-5", "bim-5", "pgdl2-5", "cw-linf-5", "apgd-ce-5", "apgd-t-5", "square-40",
                          "white noise x10", "cascade apgd-ce-5>square-40", "autoattack apgd-ce-5>apgd-t-5>square-40"]
    # The reference ops compute what the native ones do, bit for bit, in every attack.
    assert all(row["same_as_reference_ops"] == "True" for row in rows.values())
    # torchattacks' FGSM and PGDL2 are bitwise ours; every attack without a counterpart says why.
    assert rows["fgsm"]["same_as_peer"] == rows["pgd-5"]["same_as_peer"] == rows["pgdl2-5"]["same_as_peer"] == "True"
    for case in ("cw-linf-5", "apgd-t-5", "white noise x10", "autoattack apgd-ce-5>apgd-t-5>square-40"):
        assert rows[case]["peer"].startswith("none: ") and rows[case]["same_as_peer"] == "n/a"
    assert rows["square-40"]["peer"] == "torchattacks.Square"
    assert all(float(row["ours_ms"]) > 0 for row in rows.values())
    # the roofline is one batch copy per iteration: a floor far below any attack that runs a model
    assert all(0 < float(row["roofline_ms"]) < float(row["ours_ms"]) for row in rows.values())
    assert float(rows["square-40"]["roofline_ms"]) == pytest.approx(40 * float(rows["fgsm"]["roofline_ms"]))


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
    ("bench_attacks", ["--models", "small-resnet,nope"]),
    ("bench_attacks", ["--rounds", "0"]),
    ("bench_attacks", ["--peer-rounds", "0"]),
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
    assert synced == ["cuda:1"] * 6


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


def test_write_rows_csv_and_markdown(monkeypatch, tmp_path, capsys):
    common = _common(monkeypatch)
    env = {"device": "cpu-x", "threads": 2, "torch": "2.x", "git": "abc"}
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(common, "environment", lambda device=None: dict(env))
    path = common.write_rows("demo", [{"op": "a", "ms": 1.23456}, {"op": "b", "ms": 2.0}])
    assert path == tmp_path / "results" / "demo.csv"
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows == [["op", "ms", "device", "threads", "torch", "git"], ["a", "1.23456", "cpu-x", "2", "2.x", "abc"],
                    ["b", "2.0", "cpu-x", "2", "2.x", "abc"]]
    table = capsys.readouterr().out.splitlines()
    assert table[:4] == ["| op | ms |", "|---|---|", "| a | 1.235 |", "| b | 2 |"]


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
    assert common.device_arg("cuda:0") == common.torch.device("cuda:0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"'cuda:1': only 1 CUDA device\(s\) visible"):
        common.device_arg("cuda:1")
    with pytest.raises(argparse.ArgumentTypeError, match="expected cpu or cuda, got 'meta'"):
        common.device_arg("meta")
