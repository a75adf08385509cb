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
