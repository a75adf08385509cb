"""The robust-ops command line end to end (quick modes) and its one-line errors (exit status 2, no partial files)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from robust_ops import cli, defenses


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    """A small MedMNIST-layout file (not an official name, so no MD5 check)."""
    return _ultrasound_npz(tmp_path_factory.mktemp("data") / "smallbus.npz", (64, 16, 32), 28)


def _ultrasound_npz(path, counts, size):
    """A MedMNIST-layout .npz of synthetic ultrasound images: ``counts`` train, val and test images of ``size``."""
    from robust_ops.data import synthetic_ultrasound

    arrays = {}
    for seed, (split, n) in enumerate(zip(("train", "val", "test"), counts)):
        x, y = synthetic_ultrasound(n, size=size, seed=seed)
        arrays[f"{split}_images"] = (x[:, 0].numpy() * 255).round().astype(np.uint8)
        arrays[f"{split}_labels"] = y.numpy().reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def trained_run(small_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "std"
    assert cli.main(["train", "--data", str(small_npz), "--epochs", "1", "--out", str(out), "--no-progress",
                     "--device", "cpu"]) == 0
    return out


def _torchrun_train_worker(rank, world, port, npz, out):
    import contextlib
    import io
    import os

    # torchrun's environment: fit initializes the group itself (and destroys it when done)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    written = []
    write = cli.write_json_atomic
    cli.write_json_atomic = lambda path, data, **kw: (written.append(Path(path).name), write(path, data, **kw))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["train", "--data", npz, "--epochs", "1", "--batch-size", "16", "--model", "mlp", "--out", out,
                       "--device", "cpu"])
    torch.save((rc, stdout.getvalue(), stderr.getvalue(), written), f"{out}.{rank}")


def test_train_under_torchrun_prints_and_writes_run_json_on_rank_0_only(small_npz, tmp_path):
    """Under torchrun every process printed the summary and rewrote run.json (and deleted the old checkpoint) itself:
    the same lines twice, and files written by each process at once."""
    from test_train import _spawn_within
    from utils import free_port

    out = tmp_path / "run"
    _spawn_within(180, _torchrun_train_worker, (2, free_port(), str(small_npz), str(out)))
    (rc0, out0, err0, written0), (rc1, out1, err1, written1) = (
        torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2))
    assert rc0 == rc1 == 0, (err0, err1)
    assert out0.startswith("trained standard on smallbus for 1 epoch: ") and "epoch 1/1" in err0, (out0, err0)
    assert written0 == ["run.json"] and json.loads((out / "run.json").read_text())["epochs"] == 1
    assert (out1, err1, written1) == ("", "", [])
    assert (out / "checkpoint.pt").is_file()


class FailsOnProcess1(defenses.Standard):
    """Standard training whose 6th step (epoch 2, step 2 of 64 samples in batches of 16) fails on process 1 only."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = 0

    def __call__(self, model, x, y):
        import torch.distributed as dist

        self.steps += 1
        if self.steps == 6 and dist.get_rank() == 1:
            raise ValueError("a share this defense cannot train on")
        return super().__call__(model, x, y)


def _torchrun_one_process_fails_worker(rank, world, port, npz, out):
    import contextlib
    import io
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["train", "--data", npz, "--epochs", "2", "--batch-size", "16", "--model", "mlp", "--out", out,
                       "--device", "cpu", "--no-progress", "--defense", f"{__name__}.FailsOnProcess1",
                       "--dist-timeout", "30"])
    torch.save((rc, stderr.getvalue()), f"{out}.{rank}")


def test_train_under_torchrun_names_another_process_failure_in_one_line(small_npz, tmp_path):
    """A step failing on process 1 alone stopped process 0 with fit's 'fit: process 1 failed at ...; stopped here too',
    a RuntimeError that train let through: a traceback of gloo's error and fit's, where the failing process printed
    its one line. Now every process it stops prints one line, with the way to continue from the checkpoint."""
    from test_train import _spawn_within
    from utils import free_port

    out = tmp_path / "run"
    _spawn_within(180, _torchrun_one_process_fails_worker, (2, free_port(), str(small_npz), str(out)))
    (rc0, err0), (rc1, err1) = (torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2))
    assert (rc1, err1) == (2, f"robust-ops train: error: {out}: training failed: a share this defense cannot train "
                              "on\n"), err1
    assert (rc0, err0) == (2, f"robust-ops train: error: {out}: training failed: fit: process 1 failed at epoch 2, "
                              "step 2: ValueError: a share this defense cannot train on; stopped here too; "
                              f"{out / 'checkpoint.pt'} holds the last epoch saved: once fixed, continue with the same "
                              "command and --resume\n"), err0


def _torchrun_command_worker(rank, world, port, argv, out):
    import contextlib
    import io
    import os

    from robust_ops import evaluate

    # torchrun's environment: fit initializes the group itself (and destroys it when done)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    written = []
    write, write_results = cli.write_json_atomic, evaluate.write_results
    cli.write_json_atomic = lambda path, data, **kw: (written.append(Path(path).name), write(path, data, **kw))
    evaluate.write_results = lambda out_dir, *a, **k: (written.append("results"), write_results(out_dir, *a, **k))[1]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(argv + ["--out", out, "--device", "cpu", "--no-progress"])
    torch.save((rc, stdout.getvalue(), stderr.getvalue(), written), f"{out}.{rank}")


@pytest.mark.parametrize("command", ["demo", "reproduce"])
def test_demo_and_reproduce_under_torchrun_print_and_write_on_rank_0_only(small_npz, tmp_path, command):
    """Under torchrun demo and reproduce printed every line on every process, and each process wrote the results,
    the report and the evaluation caches itself (train's reports were rank 0's alone)."""
    from test_train import _spawn_within
    from utils import free_port

    argv = (["demo", "--quick", "--data", str(small_npz), "--model", "mlp", "--methods", "standard", "--attacks",
             "fgsm", "--eps", "1/255"] if command == "demo"
            else ["reproduce", "arfl-moons", "--quick", "--seeds", "1", "--methods", "Standard training"])
    out = tmp_path / command
    _spawn_within(240, _torchrun_command_worker, (2, free_port(), argv, str(out)))
    (rc0, out0, err0, written0), (rc1, out1, err1, written1) = (
        torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2))
    assert rc0 == rc1 == 0, (err0, err1)
    assert out0.startswith(f"{command} ") and "results" in written0 and "run.json" in written0, (out0, written0)
    assert (out / "results.json").is_file() and (out / "report.md").is_file()
    assert (out1, err1, written1) == ("", "", [])


_DIST_TIMEOUT_ARGV = {"train": ["train", "--model", "mlp"],
                      "demo": ["demo", "--quick", "--model", "mlp", "--methods", "standard", "--attacks", "fgsm"],
                      "reproduce": ["reproduce", "arfl-moons", "--quick", "--seeds", "1", "--methods",
                                    "Standard training"]}


@pytest.mark.parametrize("command", list(_DIST_TIMEOUT_ARGV))
def test_dist_timeout_reaches_fit_and_a_collective_timeout_is_one_line(small_npz, tmp_path, monkeypatch, capsys,
                                                                       command):
    """The commands that train under torchrun had no way to shorten the 30 minutes a process waits for a hung one;
    --dist-timeout reaches fit (not run.json: it changes no result), and a CollectiveTimeoutError is one line naming
    the flag, not fit's keyword, nor a traceback."""
    from robust_ops import train as trainer

    seen = []

    def times_out(*args, dist_timeout=None, **kwargs):
        seen.append(dist_timeout)
        raise trainer.CollectiveTimeoutError("fit", 0, dist_timeout, "dist_timeout", "epoch 1, step 2")

    monkeypatch.setattr(trainer, "fit", times_out)
    data = [] if command == "reproduce" else ["--data", str(small_npz)]
    out = tmp_path / command
    assert cli.main(_DIST_TIMEOUT_ARGV[command] + data + ["--dist-timeout", "2.5", "--out", str(out), "--device",
                                                         "cpu", "--no-progress"]) == 2
    assert seen == [2.5]
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"robust-ops {command}: error: \S+: training failed: fit: process 0 timed out after 2.5 s "
                        r"\(--dist-timeout\) waiting for the other processes at epoch 1, step 2: another process hung "
                        r"or died before reaching it .*; if a process may take longer than that between two steps "
                        r"\(process 0 writing a checkpoint, a slow batch\), raise --dist-timeout", err), err
    run_json = next(out.rglob("run.json"))
    assert not [key for key in json.loads(run_json.read_text()) if "timeout" in key]


@pytest.mark.parametrize("command", list(_DIST_TIMEOUT_ARGV))
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e10"])
def test_dist_timeout_must_be_a_positive_finite_number_of_seconds(tmp_path, capsys, command, value):
    """Refused in one line naming the flag, before any data is loaded (fit would refuse it only after run.json)."""
    assert cli.main(_DIST_TIMEOUT_ARGV[command] + [f"--dist-timeout={value}", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"robust-ops {command}: error: --dist-timeout: expected a number of seconds > 0 and <= 1e+09 (longer ones "
        f"overflow torch's collective deadlines), got {float(value)!r}")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.parametrize("command", ["eval", "bench"])
def test_eval_and_bench_under_torchrun_are_refused_on_every_process(trained_run, tmp_path, monkeypatch, capsys,
                                                                    rank, command):
    """Under torchrun eval ran the whole evaluation on every process, each printing the tables and writing the same
    results.json, report and figures into one folder (bench: each timing its benchmarks against the other's)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    argv = ([command, str(trained_run), "--attacks", "fgsm", "--eps", "1/255", "--out", str(tmp_path / "eval")]
            if command == "eval" else [command, "--only", "pgd_step"])
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"robust-ops {command}: error: runs in one process, and 2 were launched (torchrun, WORLD_SIZE=2): each would "
        + ("repeat the whole evaluation and write the same results and figures" if command == "eval" else
           "time its benchmarks while the others compete for the same cores, and write the same CSVs")
        + f"; run `robust-ops {command} ...` without torchrun (train, demo and reproduce are the commands that train "
        "over several processes)\n"), err
    assert not (tmp_path / "eval").exists()


def test_help_shows_defaults(capsys):
    for cmd in ("train", "eval", "demo", "bench", "reproduce"):
        with pytest.raises(SystemExit) as ex:
            cli.main([cmd, "--help"])
        assert ex.value.code == 0
        out = capsys.readouterr().out
        assert "default" in out, cmd
    r = subprocess.run([sys.executable, "-m", "robust_ops", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "reproduce" in r.stdout


def test_module_run_of_cli_py_refuses_in_one_line(tmp_path):
    """`python -m robust_ops.cli` ran cli.py as __main__, a second copy of the module: reproduce raised the imported
    copy's CLIError, which that main did not catch (a traceback ending in robust_ops.cli.CLIError)."""
    r = subprocess.run([sys.executable, "-m", "robust_ops.cli", "reproduce", "arfl-moons", "--quick", "--methods",
                        "XYZ", "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "robust-ops reproduce: error: --methods: arfl-moons has no method xyz; choose from Standard training, Standard "
        "training + ARFL, Adversarial training, Adversarial training + ARFL, Dual adversarial training, Dual "
        "adversarial training + ARFL, TRADES, MIRST"]


def test_option_names_are_exact_not_prefixes(tmp_path, capsys, monkeypatch):
    """argparse's prefix matching took `reproduce ... --seed 1` (train's and demo's RNG seed) as --seeds 1, the number
    of seeds / folds, and `train --epoch 2` as --epochs: a mistyped option is refused like an unknown config key."""
    monkeypatch.chdir(tmp_path)  # where the default --out folders would go if a command ran
    for argv, given in ((["reproduce", "mirst-bus", "--quick", "--seed", "1"], "--seed 1"),
                        (["train", "--epoch", "2"], "--epoch 2"), (["demo", "--method", "rst"], "--method rst"),
                        (["eval", "RUN", "--ep", "1/255"], "--ep 1/255")):
        rc, _, err = run(argv, capsys)
        one_line_error(rc, err, f"robust-ops {argv[0]}: error: unrecognized arguments: {given} "
                                f"(see robust-ops {argv[0]} --help)")


def test_eval_method_defaults_to_the_runs_label_as_its_help_says(trained_run, tmp_path, capsys):
    # --help said "default: the run's defense": a demo run's rows are labelled as run.json's label (Baseline for
    # standard), as docs/cli.md says
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("eval"))
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**record, "label": "Baseline"}))
    rc, _, err = run(["eval", run_dir, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0"], capsys)
    assert rc == 0, err
    rows = json.loads((run_dir / "eval" / "results.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"Baseline"}
    _, parsers = cli.build_parser()
    assert "default: the run's label in run.json" in parsers["eval"]._option_string_actions["--method"].help


def test_help_explains_every_option_once(capsys):
    from robust_ops.attacks import ATTACKS

    _, parsers = cli.build_parser()
    for cmd, parser in parsers.items():
        for action in parser._actions:
            assert action.help, f"{cmd} {action.option_strings or action.dest}: no help text"
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        out = capsys.readouterr().out
        for block in out.split("\n  -")[1:]:  # one option's help, wrapped over lines
            assert block.count("(default") <= 1, f"{cmd}: default stated twice in {block!r}"
        # a default of None, False or [] says nothing: not shown
        assert not re.search(r"\(default:\s+(None|False|\[\])\)", out), f"{cmd}: {out}"
        if cmd in ("eval", "demo"):
            listed = parser._option_string_actions["--attacks"].help
            assert all(name in listed for name in ATTACKS), listed


def test_train_writes_run_and_eval_end_to_end(trained_run, capsys):
    run_json = json.loads((trained_run / "run.json").read_text())
    assert run_json["defense"] == "standard" and run_json["dataset"]["positive_class"] == 1
    assert (trained_run / "checkpoint.pt").is_file()
    rc, out, err = run(["eval", trained_run, "--attacks", "fgsm,pgd:steps=3", "--eps", "1/255,4/255", "--saliency",
                        "2", "--device", "cpu"], capsys)
    assert rc == 0, err
    doc = json.loads((trained_run / "eval" / "results.json").read_text())
    assert [r["attack"] for r in doc["rows"]][:2] == ["none", "fgsm"] and doc["synthetic"] is False
    assert (trained_run / "eval" / "accuracy_vs_eps.png").read_bytes()[:4] == b"\x89PNG"
    assert (trained_run / "eval" / "saliency_standard.png").is_file()
    assert "| F1: attack | ε | standard |" in out and "| Specificity: attack | ε | standard |" in out
    # the printed tables' sensitivity is named as the report's is (label 0 is BreastMNIST's positive class)
    assert ("\nsmallbus: positive class 1 = 1; sensitivity is the recall of the positive class, specificity that of "
            "class 0 = 0\n") in out


def test_train_prints_an_eval_command_that_runs_as_printed(small_npz, tmp_path, capsys):
    """An --out with a space printed `robust-ops eval my run ...`: followed, eval read `my` and `run` as two
    arguments. The printed command (and the stale-eval warning's) quotes it."""
    import shlex

    out = tmp_path / "my run's"
    args = ["train", "--data", str(small_npz), "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu"]
    rc, printed, err = run(args, capsys)
    assert rc == 0, err
    command = shlex.split(printed.split("(evaluate with: ")[1].split(")\n")[0])
    assert command[:3] == ["robust-ops", "eval", str(out)]
    rc, _, err = run(command[1:] + ["--device", "cpu", "--saliency", "0"], capsys)
    assert rc == 0 and (out / "eval" / "results.json").is_file(), err
    rc, _, err = run(args, capsys)
    assert rc == 0 and f"rerun `robust-ops eval {shlex.quote(str(out))}` once training ends" in err, err


@pytest.mark.parametrize("defense, options, expected", [
    # the paper's rule at 1x28x28, each radius exact: it printed 0.379,0.758,1.52 (past the trained 1.5155...)
    ("ima", [], "--attacks pgdl2,apgd-ce:norm=l2 --eps 0.37888611415569196,0.7577722283113839,1.5155444566227678"),
    ("ima", ["--defense-opt", "eps_train=2"], "--attacks pgdl2,apgd-ce:norm=l2 --eps 0.5,1,2"),
    ("ima", ["--defense-opt", "eps_train=4.5"], "--attacks pgdl2,apgd-ce:norm=l2 --eps 1.125,2.25,4.5"),  # not 1.12
    ("dpaat", ["--defense-opt", "steps=1"], "--attacks pgdl2,apgd-ce:norm=l2 --eps 0.075,0.15,0.3"),
    ("ima", ["--defense-opt", "norm=linf"], "--attacks fgsm,pgd,cw --eps 1/255,2/255,5/255"),
    ("gr", [], "--attacks fgsm,pgd,cw --eps 1/255,2/255,5/255")])  # GR's norm is its penalty's, no radius
def test_train_prints_an_eval_command_in_the_runs_threat_model(defense, options, expected, small_npz, tmp_path,
                                                               capsys):
    """After an L2-trained run (IMA, DPAAT) train suggested eval's L-inf defaults (fgsm, pgd, cw at 1/255 to 5/255),
    a threat model the run was not trained for (found reviewing IMA against its paper). It now suggests L2 attacks at
    a quarter, half and all of the run's training radius; the printed command runs."""
    import shlex

    out = tmp_path / "run"
    rc, printed, err = run(["train", "--data", str(small_npz), "--defense", defense, *options, "--epochs", "1",
                            "--out", out, "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    command = printed.split("(evaluate with: ")[1].split(")\n")[0]
    assert command == f"robust-ops eval {shlex.quote(str(out))} {expected}"
    if defense == "dpaat":
        rc, _, err = run(shlex.split(command)[1:] + ["--device", "cpu", "--saliency", "0", "--no-progress"], capsys)
        assert rc == 0 and (out / "eval" / "results.json").is_file(), err


def test_eval_prints_the_classes_absent_from_the_attacked_split(tmp_path, capsys):
    """report.md named a class absent from the test split (its per-class metrics undefined, left out of the macro
    averages); eval's printed tables did not (found by the dermoscopy walk, where a 12-image class was absent)."""
    g = np.random.default_rng(0)
    arrays = {}
    for split, labels in (("train", [0, 1, 2] * 10), ("val", [0, 1, 1, 2]), ("test", [0, 1] * 4)):
        arrays[f"{split}_images"] = g.integers(0, 256, (len(labels), 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.uint8).reshape(-1, 1)
    np.savez(tmp_path / "three.npz", **arrays)
    out = tmp_path / "run"
    rc, _, err = run(["train", "--data", tmp_path / "three.npz", "--model", "mlp", "--epochs", "1", "--out", out,
                      "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    for split, expected in (("test", "; absent from the test split: 2\n"), ("val", "macro-averaged metrics over the "
                                                                             "classes present; sensitivity is the "
                                                                             "mean per-class recall\n")):
        rc, printed, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--split",
                                split, "--out", tmp_path / split, "--device", "cpu"], capsys)
        assert rc == 0, err
        assert expected in printed and (split == "test") == ("absent from" in printed), printed


def test_train_warns_of_a_class_the_npz_train_split_lacks(tmp_path, capsys):
    """An .npz keeps its own split: a class absent from its train split was recorded in run.json only, and train ran
    without a word, the model never learning that class (found by the CT researcher's walk: an 11-class set without
    spleen in train). train warns, naming it; demo checks the whole split the same way, once."""
    g = np.random.default_rng(0)
    arrays = {}
    for split, labels in (("train", [0, 1] * 10), ("val", [0, 1, 2]), ("test", [0, 1, 2] * 2)):
        arrays[f"{split}_images"] = g.integers(0, 256, (len(labels), 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.uint8).reshape(-1, 1)
    np.savez(tmp_path / "three.npz", **arrays)
    data = tmp_path / "three.npz"
    rc, _, err = run(["train", "--data", data, "--model", "mlp", "--epochs", "1", "--out", tmp_path / "run",
                      "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert lines == [f"robust-ops train: warning: --data: the train split of {data} holds no image of 2, so the model "
                     "never learns that class; its val / test images are scored all the same"], err
    rc, _, err = run(["demo", "--data", data, "--model", "mlp", "--methods", "standard", "--epochs", "1", "--attacks",
                      "fgsm", "--eps", "1/255", "--saliency", "0", "--out", tmp_path / "demo", "--no-progress",
                      "--device", "cpu"], capsys)
    assert rc == 0, err
    assert len([line for line in err.splitlines() if "never learns" in line]) == 1, err


def test_eval_on_data_with_other_classes_warns(trained_run, tmp_path, capsys):
    """--data whose classes are not the run's (synthetic's benign = 0, malignant = 1 for a model trained on labels
    0, 1 of another set): the predictions are scored against labels that may mean other classes -- said in one
    warning line, not silently."""
    argv = ["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    rc, _, err = run(argv + ["--data", "synthetic", "--out", tmp_path / "other"], capsys)
    assert rc == 0, err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("robust-ops eval: warning: --data: synthetic labels its classes "
                                                   "benign = 0, malignant = 1, but the run was trained on 0 = 0"), err
    rc, _, err = run(argv + ["--out", tmp_path / "own"], capsys)
    assert rc == 0 and "warning" not in err, err


def test_eval_of_a_run_repeats_its_random_attacks(trained_run, tmp_path, capsys):
    """PGD's random start drew from the process's RNG, whose seed torch picks at random: three evals of one run gave
    PGD accuracy 0.727, 0.734, 0.727. The attacks now draw from the run's seed, recorded in results.json."""
    argv = ["eval", trained_run, "--attacks", "pgd:steps=2:alpha=0.01", "--eps", "8/255", "--saliency", "0",
            "--device", "cpu"]
    results = []
    for k in range(2):
        torch.manual_seed(k)  # what the process did before must not matter
        rc, _, err = run(argv + ["--out", tmp_path / str(k)], capsys)
        assert rc == 0, err
        results.append(json.loads((tmp_path / str(k) / "results.json").read_text()))
    assert results[0]["rows"] == results[1]["rows"]
    assert results[0]["config"]["attack_seed"] == 0  # the run's --seed


def test_eval_bad_eps_no_partial_files(trained_run, tmp_path, capsys):
    out = tmp_path / "ev"
    rc, _, err = run(["eval", trained_run, "--eps", "1/255,x", "--out", out], capsys)
    one_line_error(rc, err, "robust-ops eval: error: --eps:", "'x'")
    rc, _, err = run(["eval", trained_run, "--attacks", "fgsm,bogus", "--out", out], capsys)
    one_line_error(rc, err, "--attacks:", "unknown attack 'bogus'")
    # one line: pgd's warning that its default step falls short of the radius came first, for a radius then refused
    rc, _, err = run(["eval", trained_run, "--eps", "8", "--out", out], capsys)
    one_line_error(rc, err, "robust-ops eval: error: --eps: 8 is an L-inf radius (fgsm) wider than the inputs'")
    # a radius listed twice (a typo for 1/255,2/255) was attacked once, silently
    for eps, message in (("1/255,1/255", "1/255 and 1/255"), ("2/255,1/255,4/510", "2/255 and 4/510")):
        rc, _, err = run(["eval", trained_run, "--eps", eps, "--out", out], capsys)
        one_line_error(rc, err, f"robust-ops eval: error: --eps: {message} are the same radius; list each radius once")
    (tmp_path / "c.yaml").write_text("eps: [1/255, 0.5/127.5]\n")
    rc, _, err = run(["demo", "--config", tmp_path / "c.yaml", "--out", out], capsys)
    one_line_error(rc, err, "robust-ops demo: error: --eps: 1/255 and 0.5/127.5 are the same radius")
    (tmp_path / "c.yaml").unlink()
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_download_only_with_the_flag(tmp_path, capsys, monkeypatch):
    import robust_ops.data

    asked = []

    def fake_load_dataset(spec, **kwargs):
        asked.append(kwargs["download"])
        raise robust_ops.data.DataError(f"{spec}: stop here")

    monkeypatch.setattr(robust_ops.data, "load_dataset", fake_load_dataset)
    for extra in ([], ["--download"]):
        rc, _, err = run(["train", "--data", "dermamnist", "--out", tmp_path / "a", *extra], capsys)
        one_line_error(rc, err, "--data: dermamnist: stop here")
    assert asked == [False, True] and cli._allow_download is False


def test_unknown_names(small_npz, tmp_path, capsys):
    rc, _, err = run(["train", "--data", small_npz, "--defense", "nope", "--out", tmp_path / "a"], capsys)
    one_line_error(rc, err, "--defense:", "unknown defense 'nope'")
    rc, _, err = run(["train", "--data", small_npz, "--model", "resnet9000", "--out", tmp_path / "b"], capsys)
    line = one_line_error(rc, err, "--model: unknown model 'resnet9000'; expected one of resnet18, resnet50")
    assert "build_model" not in line  # a CLI user never called it
    rc, _, err = run(["train", "--data", small_npz, "--defense-opt", "eps", "--out", tmp_path / "c"], capsys)
    one_line_error(rc, err, "--defense-opt:", "key=value")
    rc, _, err = run(["demo", "--methods", "standard,zzz", "--out", tmp_path / "d"], capsys)
    one_line_error(rc, err, "--methods:", "'zzz'")
    rc, _, err = run(["demo", "--methods", " , ", "--out", tmp_path / "d"], capsys)
    one_line_error(rc, err, "--methods: expected at least one defense")
    rc, _, err = run(["train", "--epochs", "0", "--out", tmp_path / "e"], capsys)
    one_line_error(rc, err, "--epochs:")
    rc, _, err = run(["train", "--defense", "at", "--defense-opt", "stepz=2", "--out", tmp_path / "f"], capsys)
    one_line_error(rc, err, "--defense-opt: at: unknown option 'stepz'; it takes eps, step_size, steps")
    for flag, value in (("--lr", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--seed", "-1"),
                        ("--batch-size", "0")):
        for cmd in ("train", "demo"):
            rc, _, err = run([cmd, flag, value, "--out", tmp_path / "g"], capsys)
            one_line_error(rc, err, f"{flag}: expected", value)
    rc, _, err = run(["demo", "--attacks", "fgsm,pgd:stepz=3", "--out", tmp_path / "h"], capsys)  # before training
    one_line_error(rc, err, "--attacks:", "pgd: unknown option 'stepz'; it takes eps, alpha, steps")
    rc, _, err = run(["demo", "--eval-batch-size", "0", "--out", tmp_path / "i"], capsys)  # before training
    one_line_error(rc, err, "--eval-batch-size: expected >= 1")
    rc, _, err = run(["eval", tmp_path / "no-run", "--attacks", "cw:stepz=3"], capsys)  # before loading the run
    one_line_error(rc, err, "--attacks:", "cw: unknown option 'stepz'")
    rc, _, err = run(["reproduce", "nothing"], capsys)
    one_line_error(rc, err, "invalid choice")
    for flag in ("--epochs", "--seeds"):  # 0 would otherwise fall back to the protocol's own value silently
        rc, _, err = run(["reproduce", "arfl-moons", "--quick", flag, "0", "--out", tmp_path / "j"], capsys)
        one_line_error(rc, err, f"robust-ops reproduce: error: {flag}: expected >= 1, got 0")
    assert list(tmp_path.iterdir()) == []


def test_a_negative_value_written_as_a_float_or_fraction_reaches_its_own_check(tmp_path, capsys):
    """argparse reads a value starting with '-' as a value only for -3 and -0.5: `--lr -1e-3`, `--eps -1/255`,
    `--lr -inf` were refused as "argument --lr: expected one argument", though one was given, not by the range check
    naming what to fix."""
    for argv, needle in ((["train", "--lr", "-1e-3"], "--lr: expected a finite learning rate > 0, got -0.001"),
                         (["demo", "--lr", "-inf"], "--lr: expected a finite learning rate > 0, got -inf"),
                         (["train", "--dist-timeout", "-1E3"], "--dist-timeout: expected a number of seconds > 0"),
                         (["eval", tmp_path / "no-run", "--eps", "-1/255"], "--eps: expected finite radii >= 0, got "
                                                                            "'-1/255'"),
                         (["demo", "--eps", "-.5,1/255"], "--eps: expected finite radii >= 0, got '-.5'")):
        rc, stdout, err = run(argv + ["--out", tmp_path / "o"], capsys)
        one_line_error(rc, err, needle)
        assert stdout == ""
    rc, _, err = run(["train", "--out", "-x"], capsys)  # a word after the flag is still taken for an option
    one_line_error(rc, err, "argument --out: expected one argument")
    assert list(tmp_path.iterdir()) == []


def test_demo_refuses_a_model_that_cannot_take_the_data_before_making_out(tmp_path, capsys):
    """demo --data moons with its default --model small_cnn was refused in the first method's training, after the
    folder lock had made --out: an empty folder was left behind."""
    out = tmp_path / "d"
    rc, stdout, err = run(["demo", "--quick", "--data", "moons", "--methods", "standard", "--out", out, "--device",
                           "cpu"], capsys)
    one_line_error(rc, err, "--model: small_cnn takes images, but two-moons (synthetic) holds feature vectors of 2 "
                            "values; use --model mlp")
    assert stdout == "" and list(tmp_path.iterdir()) == []


def test_demo_and_reproduce_refuse_data_without_a_test_split_before_training(small_npz, tmp_path, capsys):
    """demo on an .npz whose test split is empty trained every method, then was refused at the evaluation as
    '--split: the test split of ... has no samples', naming eval's flag, which demo does not have."""
    arrays = dict(np.load(small_npz))
    data = tmp_path / "notest.npz"
    np.savez(data, **{**arrays, "test_images": arrays["test_images"][:0], "test_labels": arrays["test_labels"][:0]})
    out = tmp_path / "d"
    rc, stdout, err = run(["demo", "--quick", "--data", data, "--model", "mlp", "--methods", "standard", "--out", out,
                           "--device", "cpu", "--no-progress"], capsys)
    one_line_error(rc, err, f"--data: the test split of {data} holds no samples; nothing to evaluate on")
    assert stdout == "" and not out.exists()
    # reproduce's seeded protocols test on the data's own test split: refused after the first run trained
    rc, stdout, err = run(["reproduce", "ima-bus", "--quick", "--seeds", "1", "--methods", "STD", "--data", data,
                           "--out", out, "--device", "cpu", "--no-progress"], capsys)
    one_line_error(rc, err, f"--data: the test split of {data} holds no samples; nothing to evaluate ima-bus's runs on")
    assert not out.exists()


def test_bad_data_files(tmp_path, capsys):
    rc, _, err = run(["train", "--data", tmp_path / "missing.npz", "--out", tmp_path / "r"], capsys)
    one_line_error(rc, err, "--data:", "missing.npz: no such file")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"garbage")
    rc, _, err = run(["train", "--data", corrupt, "--out", tmp_path / "r"], capsys)
    one_line_error(rc, err, "--data:", "not a readable .npz")
    fake = tmp_path / "breastmnist.npz"
    np.savez(fake, train_images=np.zeros((2, 28, 28), np.uint8))
    rc, _, err = run(["train", "--data", fake, "--out", tmp_path / "r"], capsys)
    one_line_error(rc, err, "--data:", "does not match the official breastmnist.npz")
    nokeys = tmp_path / "nokeys.npz"
    np.savez(nokeys, train_images=np.zeros((2, 28, 28), np.uint8))
    rc, _, err = run(["train", "--data", nokeys, "--out", tmp_path / "r"], capsys)
    one_line_error(rc, err, "--data:", "missing keys")
    assert not (tmp_path / "r").exists()


def test_checkpoint_needing_pickle_is_refused(trained_run, tmp_path, capsys):
    import argparse

    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "payload": argparse.Namespace(code="runs on load")}, bad)
    rc, _, err = run(["eval", bad, "--data", "synthetic", "--model", "small_cnn"], capsys)
    one_line_error(rc, err, "bad.pt: refusing to load", "weights_only=True")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 10)
    rc, _, err = run(["eval", junk, "--data", "synthetic", "--model", "small_cnn"], capsys)
    one_line_error(rc, err, "junk.pt: not a readable checkpoint")
    rc, _, err = run(["eval", tmp_path / "nothing"], capsys)
    one_line_error(rc, err, "no such run folder or checkpoint file")
    assert not (tmp_path / "eval").exists()


def test_eval_of_a_run_file_that_is_no_checkpoint_names_the_run_folder(trained_run, tmp_path, capsys):
    """eval RUN_DIR/run.json (or metrics.csv / metrics.json) said 'not a readable checkpoint (not a torch.save file:
    Unsupported operand 123)', not that RUN_DIR itself is what eval takes."""
    for name in ("run.json", "metrics.csv", "metrics.json"):
        rc, _, err = run(["eval", trained_run / name, "--out", tmp_path / "ev", "--device", "cpu"], capsys)
        one_line_error(rc, err, f"robust-ops eval: error: {trained_run / name}: is a run's {name}, not a checkpoint; "
                       f"pass the run folder {trained_run} (or its checkpoint.pt)")
    assert not (tmp_path / "ev").exists()


def test_eval_names_what_it_lacks_of_data_and_model(trained_run, tmp_path, capsys):
    # a run.json without "data" was reported as "no run.json beside the checkpoint; pass --data and --model", and a
    # bare checkpoint given --data was still told to pass both
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(trained_run / "checkpoint.pt", bare / "model.pt")
    rc, _, err = run(["eval", bare / "model.pt", "--data", "synthetic", "--out", tmp_path / "e"], capsys)
    one_line_error(rc, err, f"error: {bare / 'model.pt'}: no run.json beside the checkpoint; pass --model")
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    doc = json.loads((run_dir / "run.json").read_text())
    del doc["data"]
    (run_dir / "run.json").write_text(json.dumps(doc))
    rc, _, err = run(["eval", run_dir, "--out", tmp_path / "e"], capsys)
    one_line_error(rc, err, f"error: {run_dir / 'run.json'}: records no data; pass --data")
    assert not (tmp_path / "e").exists()


def test_resume_from_a_cut_short_checkpoint_says_what_to_do(trained_run, small_npz, tmp_path, capsys):
    """A checkpoint cut short (a copy interrupted, a full disk before atomic saves) made train --resume fail with
    torch's "failed finding central directory. This is an internal miniz error. If you are seeing this error,
    there is a high" -- cut off mid-sentence, and no word on how to go on."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("eval"))
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    rc, _, err = run(["train", "--data", small_npz, "--epochs", "2", "--out", run_dir, "--no-progress", "--device",
                      "cpu", "--resume"], capsys)
    line = one_line_error(rc, err, f"{ckpt}: not a readable checkpoint (PytorchStreamReader failed reading zip "
                          "archive: failed finding central directory); the run cannot continue from it: put back a "
                          "good copy of it, or train again from the start (without --resume)")
    assert "miniz" not in line
    rc, _, err = run(["eval", run_dir, "--out", tmp_path / "e"], capsys)
    assert "miniz" not in one_line_error(rc, err, f"{ckpt}: not a readable checkpoint (PytorchStreamReader failed")


def test_eval_of_a_run_whose_data_moved_says_to_pass_data(small_npz, tmp_path, capsys):
    # it said "RUN/run.json: data: /old/place.npz: no such file", not how to go on
    shutil.copy(small_npz, tmp_path / "old.npz")
    out = tmp_path / "run"
    assert run(["train", "--data", tmp_path / "old.npz", "--epochs", "1", "--model", "mlp", "--out", out,
                "--no-progress", "--device", "cpu"], capsys)[0] == 0
    (tmp_path / "old.npz").rename(tmp_path / "new.npz")
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "e"], capsys)
    one_line_error(rc, err, f"error: {out / 'run.json'}: data: {tmp_path / 'old.npz'}: no such file or folder (moved "
                   "or deleted since the run trained); pass --data with its place now")
    assert not (tmp_path / "e").exists()
    rc, _, err = run(["eval", out, "--data", tmp_path / "new.npz", "--attacks", "fgsm", "--eps", "1/255",
                      "--saliency", "0", "--out", tmp_path / "e"], capsys)
    assert rc == 0, err


def test_checkpoint_in_torch_saves_pre_1_6_format_is_read(trained_run, tmp_path):
    """A run's checkpoint re-saved in torch.save's pre-1.6 (non-zip) format loads as the zip one: eval refused it by
    its first bytes as "not a torch.save archive", though torch.load(weights_only=True) reads it."""
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(trained_run / "run.json", old)
    state = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    torch.save(state, old / "checkpoint.pt", _use_new_zipfile_serialization=False)
    assert (old / "checkpoint.pt").read_bytes()[:4] != b"PK\x03\x04"
    assert cli.read_checkpoint(old / "checkpoint.pt").keys() == state.keys()
    loaded, expected = cli.load_run(old)[0].state_dict(), cli.load_run(trained_run)[0].state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_config_file(small_npz, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {small_npz}\nepochs: 1\nbatch-size: 16\nno_progress: true\ndevice: cpu\n")
    out = tmp_path / "run"
    rc, _, err = run(["train", "--config", cfg, "--out", out], capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["batch_size"] == 16
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    rc, _, err = run(["train", "--config", bad, "--out", tmp_path / "x"], capsys)
    one_line_error(rc, err, "bad.yaml: unknown option 'epoch'")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    rc, _, err = run(["train", "--config", broken], capsys)
    one_line_error(rc, err, "broken.json: not valid JSON")


def test_a_count_past_64_bits_is_refused_by_its_flag(trained_run, tmp_path, capsys):
    """--batch-size 9223372036854775808 (2**63) trained into torch's 'Overflow when unpacking long long', blamed on
    RUN_DIR ('RUN_DIR: training failed: ...'), and eval's --eval-batch-size ended in its traceback."""
    big = str(2**63)
    for argv, flag in ((["train", "--data", "moons", "--model", "mlp", "--batch-size", big], "--batch-size"),
                       (["eval", trained_run, "--attacks", "fgsm", "--eval-batch-size", big], "--eval-batch-size"),
                       (["demo", "--data", "moons", "--model", "mlp", "--batch-size", big], "--batch-size"),
                       (["reproduce", "arfl-moons", "--seeds", big], "--seeds")):
        rc, stdout, err = run([*argv, "--out", tmp_path / "out", "--device", "cpu"], capsys)
        one_line_error(rc, err, f"error: {flag}: expected a count below 2**63 (a 64-bit integer), got {big}")
        assert stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, needle", [
    ("epoch: 3\n", "unknown option 'epoch' (expected one of "),
    ("epochs: abc\n", "option 'epochs': invalid int value: 'abc'"),
    ("epochs: 1\nepochs: 2\n", "'epochs' is given twice (lines 1 and 2)"),
    ("batch-size: 4\nbatch_size: 8\n", "'batch-size' and 'batch_size' are the same option"),
    ("[1, 2]\n", "expected a mapping of option names to values, got list"),
    ("a: [\n", "not valid YAML ("),
])
def test_config_file_content_errors_start_with_the_flag(tmp_path, capsys, text, needle):
    """Errors about a --config file's content began with the file name alone ('cfg.yaml: unknown option ...'), where
    every other command-line error, and the file's own (no such file, a folder, not UTF-8), begin with the flag."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    rc, _, err = run(["train", "--config", cfg, "--out", tmp_path / "run"], capsys)
    one_line_error(rc, err, f"robust-ops train: error: --config: {cfg}: {needle}")
    assert not (tmp_path / "run").exists()


def test_config_file_that_does_not_exist_is_a_one_line_error(tmp_path, capsys):
    # one line naming the flag, not the FileNotFoundError traceback reading it would give
    rc, _, err = run(["train", "--config", tmp_path / "missing.yaml", "--out", tmp_path / "run"], capsys)
    one_line_error(rc, err, f"robust-ops train: error: --config: {tmp_path / 'missing.yaml'}: no such file")
    assert list(tmp_path.iterdir()) == []
    # a folder given for the file (`--config configs/`): it said "no such file" of a folder that is there
    (tmp_path / "configs").mkdir()
    rc, _, err = run(["eval", "RUN", "--config", tmp_path / "configs"], capsys)
    one_line_error(rc, err, f"robust-ops eval: error: --config: {tmp_path / 'configs'}: is a folder; give the YAML or "
                   "JSON file in it")


def test_path_options_expand_the_home_folder(trained_run, tmp_path, capsys, monkeypatch):
    # a config file's `out: ~/evals/std` (and `--out=~/...`, which the shell leaves as it is) wrote into a folder
    # named "~" in the working directory; --data expanded it already
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    shutil.copytree(trained_run, home / "run", ignore=shutil.ignore_patterns("eval"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (home / "cfg.yaml").write_text("out: ~/evals/std\nattacks: fgsm\neps: 1/255\nsaliency: 0\n")
    rc, _, err = run(["eval", "~/run", "--config=~/cfg.yaml"], capsys)
    assert rc == 0, err
    assert (home / "evals" / "std" / "results.json").is_file() and list(work.iterdir()) == []
    (home / "bench_a.py").write_text("")
    rc, out, err = run(["bench", "--bench-dir=~", "--list"], capsys)
    assert rc == 0 and out == f"a\t{home / 'bench_a.py'}\n", err


def test_config_file_that_is_not_utf8_is_a_one_line_error(small_npz, tmp_path, capsys):
    """A config saved as Latin-1 (or a binary file given by mistake) ended in a UnicodeDecodeError traceback; then
    it named no flag, and told an .npz given as --config to be saved as UTF-8."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes("model: small_cnn  # r\xe9seau\n".encode("latin-1"))
    rc, _, err = run(["train", "--config", cfg, "--out", tmp_path / "run"], capsys)
    one_line_error(rc, err, f"robust-ops train: error: --config: {cfg}: not UTF-8 text (invalid continuation byte at "
                   "byte 21); --config takes a YAML or JSON file, saved as UTF-8")
    assert sorted(tmp_path.iterdir()) == [cfg]
    rc, _, err = run(["eval", tmp_path / "run", "--config", small_npz], capsys)
    one_line_error(rc, err, f"robust-ops eval: error: --config: {small_npz}: not UTF-8 text (",
                   "--config takes a YAML or JSON file")


def test_defense_opt_values():
    """--defense-opt values: integers, fractions, booleans, none, comma lists; dashed keys read as underscores."""
    options = cli.parse_key_values(["steps=10", "eps=5/255", "random_start=True", "reuse=false", "max-radius=none",
                                    "emit=2, 4", "norm=l2"], "--defense-opt")
    assert options == {"steps": 10, "eps": 5 / 255, "random_start": True, "reuse": False, "max_radius": None,
                       "emit": (2, 4), "norm": "l2"}
    assert type(options["steps"]) is int
    for bad in ("=5", " =5", "eps"):
        with pytest.raises(cli.CLIError, match=f"--defense-opt: expected key=value, got {bad!r}"):
            cli.parse_key_values([bad], "--defense-opt")


def test_defense_opt_value_forms_null_signed_integers_and_a_trailing_comma():
    """YAML's null reads as none; a signed whole number stays an integer (recorded so in run.json, compared so on
    --resume); an empty entry of a comma list (a trailing comma) is dropped, not a '' value."""
    options = cli.parse_key_values(["a=null", "b=-3", "c=+2", "d=2,4,"], "--defense-opt")
    assert options == {"a": None, "b": -3, "c": 2, "d": (2, 4)}
    assert type(options["b"]) is type(options["c"]) is int


def test_defense_opt_none_for_an_option_defaulting_to_none_is_refused(small_npz, tmp_path, capsys):
    # `--defense at --defense-opt eps=none` trained at AT's default 8/255, and run.json recorded eps: null (a later
    # --resume without it was then refused as other defense options); attacks refuse `pgd:steps=none` so already
    argv = ["train", "--data", small_npz, "--defense", "at", "--epochs", "1", "--out", tmp_path / "run", "--device",
            "cpu"]
    for spec, key in (("eps=none", "eps"), ("steps=null", "steps")):
        rc, _, err = run(argv + ["--defense-opt", spec], capsys)
        one_line_error(rc, err, f"--defense-opt: {key}=none would be ignored (at's default applies, and run.json "
                       f"would record none); give a value or leave {key} out")
    assert not (tmp_path / "run").exists()


def test_arfl_layer_the_model_lacks_is_refused_before_anything_is_written(small_npz, tmp_path, capsys):
    # `--defense arfl --defense-opt layer=conv9` failed at the first training step, after run.json was written, and
    # named no module the model has
    rc, _, err = run(["train", "--data", small_npz, "--defense", "arfl", "--defense-opt", "layer=conv9", "--epochs",
                      "1", "--out", tmp_path / "run", "--device", "cpu"], capsys)
    one_line_error(rc, err, "--defense-opt: arfl: no module named 'conv9' in the model (the convolutions and linear "
                   "layers of --model small_cnn: features.0, features.4, features.8, classifier)")
    assert not (tmp_path / "run").exists()


def test_defense_opt_key_given_twice_is_refused(tmp_path):
    """A key given twice on the command line (or twice in the file) would lose its first value: refused, naming both;
    the command line's key still overrides the file's."""
    with pytest.raises(cli.CLIError, match=r"--defense-opt: eps is given twice \('eps=2/255' and 'eps=4/255'\); "
                                           "give it once"):
        cli.parse_key_values(["eps=2/255", "steps=3", "eps=4/255"], "--defense-opt")
    with pytest.raises(cli.CLIError, match="max_radius is given twice"):  # dashes read as underscores
        cli.parse_key_values(["max-radius=1", "max_radius=2"], "--defense-opt")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("defense-opt: [eps=2/255, eps=3/255]\n")
    with pytest.raises(cli.CLIError, match="eps is given twice"):
        cli.parse_key_values(_config_args("train", ["--config", str(cfg)]).defense_opt, "--defense-opt")
    cfg.write_text("defense-opt: [eps=2/255]\n")
    args = _config_args("train", ["--config", str(cfg), "--defense-opt", "eps=3/255"])
    assert cli.parse_key_values(args.defense_opt, "--defense-opt")["eps"] == pytest.approx(3 / 255)
    args = _config_args("train", ["--config", str(cfg), "--defense-opt", "eps=3/255", "--defense-opt", "eps=4/255"])
    with pytest.raises(cli.CLIError, match=r"eps is given twice \('eps=3/255' and 'eps=4/255'\)"):
        cli.parse_key_values(args.defense_opt, "--defense-opt")


def _config_args(command, argv):
    parser, parsers = cli.build_parser()
    sub = parsers[command]
    return cli.apply_config(sub, sub.parse_args(argv), argv)


@pytest.mark.parametrize("text", ["defense-opt: [eps=2/255, steps=3]\n", "defense-opt: eps=2/255\n",
                                  "defense-opt: {eps: 2/255, steps: 3}\n"])
def test_config_defense_opt_is_a_list(tmp_path, text):
    """An append option from a file stays a list (one value: a one-item list), read as --defense-opt is."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    args = _config_args("train", ["--config", str(cfg)])
    assert args.defense_opt[0] == "eps=2/255"
    options = cli.parse_key_values(args.defense_opt, "--defense-opt")
    assert options["eps"] == pytest.approx(2 / 255) and options.get("steps") == (3 if "steps" in text else None)


def test_train_records_every_defense_setting_in_run_json_its_defaults_included(small_npz, tmp_path, capsys):
    """`train --defense dpaat` wrote defense_options {} to run.json: nothing there said the run trained with
    DPAAT's protocol (7-step L2 PGD at eps 0.3, step 0.15, alpha 0.5, beta 1, the JS synchronization loss); only
    checkpoint.pt held it. defense_settings records the defense's options() as the checkpoint does; defense_options
    keeps the options given (what --resume compares)."""
    out = tmp_path / "dpaat"
    rc, _, err = run(["train", "--data", small_npz, "--epochs", "1", "--model", "mlp", "--defense", "dpaat",
                      "--defense-opt", "steps=2", "--out", out, "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    record = cli.read_run_file(out / "run.json")
    assert record["defense_options"] == {"steps": 2}
    settings = record["defense_settings"]
    assert settings == torch.load(out / "checkpoint.pt", weights_only=True)["config"]["defense_options"]
    papers = {"eps": 0.3, "norm": "l2", "steps": 2, "step_size": 0.15, "random_start": False, "alpha": 0.5,
              "beta": 1.0, "syn": "js", "reference": "batch", "attack_mode": "eval"}
    assert {key: settings[key] for key in papers} == papers
    (out / "run.json").write_text(json.dumps({**record, "defense_settings": ["eps", 0.3]}))
    with pytest.raises(cli.CLIError, match=r"expected defense_settings to be an object, got \["):
        cli.read_run_file(out / "run.json")


def test_config_defense_opt_with_command_line_ones(small_npz, tmp_path, capsys):
    """--defense-opt on the command line is appended after the file's: its keys win, the file's others stay."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {small_npz}\nepochs: 1\nno-progress: true\ndevice: cpu\ndefense: at\n"
                   "defense-opt: [eps=2/255, steps=3]\n")
    args = _config_args("train", ["--config", str(cfg), "--defense-opt", "steps=1"])
    assert args.defense_opt == ["eps=2/255", "steps=3", "steps=1"]
    out = tmp_path / "run"
    rc, _, err = run(["train", "--config", cfg, "--defense-opt", "steps=1", "--out", out], capsys)
    assert rc == 0, err
    options = json.loads((out / "run.json").read_text())["defense_options"]
    assert options["steps"] == 1 and options["eps"] == pytest.approx(2 / 255)
    assert _config_args("train", ["--defense-opt", "steps=1"]).defense_opt == ["steps=1"]  # no file: unchanged


@pytest.mark.parametrize("command, text, needle", [
    ("eval", "split: train", "option 'split': invalid choice 'train' (expected one of test, val)"),
    ("train", "dropmax: some", "option 'dropmax': invalid choice 'some'"),
    ("train", "epochs: 1.5", "option 'epochs': invalid int value: '1.5'"),
    ("train", "lr: fast", "option 'lr': invalid float value: 'fast'"),
    ("train", "no-progress: 3", "option 'no-progress': expected true or false, got 3"),
    ("train", "defense-opt: [[eps, 1]]", "option 'defense-opt': expected a single value, got a list"),
    # a type's own refusal (argparse.ArgumentTypeError) is the file's one-line error too, not a traceback
    ("train", "classes: 'nv,'", "option 'classes': expected comma-separated class names such as benign,malignant"),
])
def test_config_values_are_checked_like_flags(tmp_path, capsys, command, text, needle):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text + "\n")
    argv = [command] + ([tmp_path / "no-run"] if command == "eval" else []) + ["--config", cfg, "--out", tmp_path]
    rc, _, err = run(argv, capsys)
    one_line_error(rc, err, f"robust-ops {command}: error: --config: {cfg}: {needle}")
    cfg.write_text("split: val\nsize: 28\n" if command == "eval" else "lr: 1e-3\nsize: 28\n")
    args = _config_args(command, ([str(tmp_path)] if command == "eval" else []) + ["--config", str(cfg)])
    assert args.size == 28 and (args.split == "val" if command == "eval" else args.lr == 1e-3)


@pytest.mark.parametrize("command, key", [("eval", "target"), ("reproduce", "name")])
def test_config_file_positional_key_is_unknown_not_ignored(tmp_path, capsys, command, key):
    # eval's RUN_DIR and reproduce's NAME were accepted as keys (and listed as expected ones), then always lost to
    # the command line's required positional: a file's `name: mirst-bus` ran arfl-moons
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"{key}: mirst-bus\n")
    # fails at once after the config file either way (no run folder; --epochs 0), never running a protocol
    positional = [tmp_path / "no-run"] if command == "eval" else ["arfl-moons", "--epochs", "0"]
    rc, _, err = run([command, *positional, "--config", cfg, "--out", tmp_path / "out"], capsys)
    line = one_line_error(rc, err, f"{cfg}: unknown option {key!r} (expected one of ")
    assert f" {key}," not in line and not line.endswith(f" {key})")


@pytest.mark.parametrize("name, text, needle", [
    ("cfg.yaml", "epochs: 1\nlr: 0.01\nepochs: 2\n", "'epochs' is given twice (lines 1 and 3); give it once"),
    ("cfg.yaml", "defense: at\ndefense-opt: {eps: 1/255, eps: 2/255}\n", "'eps' is given twice (line 2)"),
    ("cfg.json", '{"epochs": 1, "epochs": 2}', "'epochs' is given twice; give it once"),
    ("cfg.yaml", "batch-size: 4\nbatch_size: 8\n", "'batch-size' and 'batch_size' are the same option; give it once"),
])
def test_config_file_key_given_twice_is_refused(tmp_path, name, text, needle):
    # YAML and JSON keep a repeated key's last value: `epochs: 1` ... `epochs: 2` trained 2 epochs, silently
    cfg = tmp_path / name
    cfg.write_text(text)
    with pytest.raises(cli.CLIError, match=re.escape(f"{cfg}: {needle}")):
        _config_args("train", ["--config", str(cfg)])
    # a YAML merge's keys may be overridden: not a repeat
    assert cli._safe_load_unique_keys("a: &x {steps: 1, eps: 2}\nb:\n  <<: *x\n  steps: 2\n")["b"] == {
        "steps": 2, "eps": 2}


def test_config_given_twice_is_refused(tmp_path, capsys):
    # `--config base.yaml --config run.yaml` read run.yaml alone: base.yaml's options were silently lost
    (tmp_path / "base.yaml").write_text("epochs: 1\n")
    (tmp_path / "run.yaml").write_text("lr: 0.01\n")
    for command in ("train", "demo", "reproduce arfl-moons", f"eval {tmp_path}"):
        rc, _, err = run([*command.split(), "--config", tmp_path / "base.yaml", "--config", tmp_path / "run.yaml",
                          "--out", tmp_path / "out"], capsys)
        one_line_error(rc, err, f"robust-ops {command.split()[0]}: error: --config: given twice ("
                       f"{tmp_path / 'base.yaml'} and {tmp_path / 'run.yaml'}); config files do not merge -- give one")
    assert not (tmp_path / "out").exists()


def test_a_reader_leaving_stdout_ends_the_command_quietly():
    # `robust-ops bench --list | head -2` ended in a BrokenPipeError traceback; a shell tool stops with 128 + SIGPIPE
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first line
    try:
        result = subprocess.run([sys.executable, "-m", "robust_ops", "bench", "--list"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == "", result.stderr


@pytest.mark.parametrize("args", [["--epochs", "1"], ["--epochs", "0"]])
def test_a_reader_leaving_stderr_ends_the_command_quietly(args, small_npz, tmp_path):
    # `robust-ops train ... 2>&1 | head`: the progress bar's BrokenPipeError became "training failed: [Errno 32] Broken
    # pipe", whose own line then met the closed pipe too -- a traceback nobody saw, status 1; so did an error line
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "robust_ops", "train", "--data", str(small_npz), *args,
                                 "--out", str(tmp_path / "run"), "--device", "cpu"], stdout=subprocess.PIPE,
                                stderr=write_end, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stdout == "", result.stdout
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_list_option_given_twice_is_refused(trained_run, tmp_path, capsys):
    # `--attacks fgsm --attacks pgd` attacked with pgd alone (the repeatable --defense-opt adds up; these replaced)
    rc, _, err = run(["eval", trained_run, "--attacks", "fgsm", "--attacks", "pgd", "--out", tmp_path / "e"], capsys)
    one_line_error(rc, err, "robust-ops eval: error: --attacks: given twice ('fgsm' and 'pgd'); list them once, "
                   "comma-separated (fgsm,pgd)")
    for argv, flag in ((["eval", trained_run, "--eps", "1/255", "--eps", "2/255"], "--eps"),
                       (["demo", "--methods", "standard", "--methods", "rst"], "--methods"),
                       (["train", "--classes", "a,b", "--classes", "c"], "--classes"),
                       (["bench", "--only", "pgd_step", "--only", "ima", "--list"], "--only")):
        rc, _, err = run(argv + (["--out", tmp_path / "e"] if argv[0] != "bench" else []), capsys)
        one_line_error(rc, err, f"error: {flag}: given twice (")
    assert not (tmp_path / "e").exists()
    cfg = tmp_path / "cfg.yaml"  # a config file's list is replaced by the command line's, as any option's
    cfg.write_text("attacks: [fgsm, cw]\n")
    assert _config_args("eval", [str(tmp_path), "--config", str(cfg), "--attacks", "pgd"]).attacks == "pgd"


def test_config_file_that_names_another_config_file_is_refused(tmp_path):
    # a file's `config:` is never read (files do not nest): accepted, its options were silently lost
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"config: {tmp_path / 'other.yaml'}\n")
    with pytest.raises(cli.CLIError, match=r"cfg.yaml: unknown option 'config' \(expected one of "):
        _config_args("train", ["--config", str(cfg)])


def test_an_empty_value_is_refused_not_read_as_no_flag_or_the_current_folder(trained_run, tmp_path, capsys,
                                                                             monkeypatch):
    """`--out "$RUN"` with $RUN unset: train wrote its run into the current folder (replacing a run held there),
    eval's --out '' and --model '' fell back to the run's, --config '' was skipped, bench --only '' ran every
    benchmark; each is refused, naming the flag. A config file's `out: ''` is the default, as docs/cli.md says."""
    monkeypatch.chdir(tmp_path)
    for argv, flag in ((["train", "--epochs", "1", "--out", ""], "--out"),
                       (["train", "--data", " ", "--out", tmp_path / "r"], "--data"),
                       (["eval", trained_run, "--out", ""], "--out"),
                       (["eval", trained_run, "--model", "", "--out", tmp_path / "e"], "--model"),
                       (["eval", "", "--out", tmp_path / "e"], "RUN_DIR|CHECKPOINT"),
                       (["bench", "--only", "", "--list"], "--only"),
                       (["demo", "--quick", "--config", "", "--out", tmp_path / "d"], "--config")):
        rc, stdout, err = run(argv, capsys)
        one_line_error(rc, err, f"error: {flag}: expected a value, got ")
        assert stdout == ""
    assert list(tmp_path.iterdir()) == []
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("out: ''\nepochs: ''\n")
    args = _config_args("train", ["--config", str(cfg)])
    assert (args.out, args.epochs) == ("runs/train", 10)
    cfg.write_text("eps: []\n")  # named as the file's, not as an empty --eps on the command line
    with pytest.raises(cli.CLIError, match=re.escape(f"{cfg}: option 'eps': expected at least one value, got an "
                                                     "empty list")):
        _config_args("eval", [str(tmp_path), "--config", str(cfg)])


def test_config_lists_and_numbers_read_as_the_flags_text(tmp_path):
    """docs/cli.md: comma-separated options also take YAML lists; a YAML number is the text the flag would get."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("eps: [1/255, 0.1]\nattacks: [fgsm, 'pgd:steps=3']\n")
    args = _config_args("eval", [str(tmp_path), "--config", str(cfg)])
    assert (args.eps, args.attacks) == ("1/255,0.1", "fgsm,pgd:steps=3")
    cfg.write_text("eps: 0.1\nmethod: 7\n")
    args = _config_args("eval", [str(tmp_path), "--config", str(cfg)])
    assert (args.eps, args.method) == ("0.1", "7")
    assert cli.parse_eval_options(args)[1] == [0.1]


def test_config_list_for_a_single_value_option_is_refused(tmp_path, capsys):
    """A YAML list was joined with commas for every option, not only the comma-separated ones: `out: [a, b]` trained
    into a folder named "a,b" and eval's `method: [a, b]` labelled its rows "a,b", without a word."""
    cfg = tmp_path / "cfg.yaml"
    for command, key in (("train", "out"), ("eval", "method"), ("demo", "data")):
        cfg.write_text(f"{key}: [{tmp_path / 'a'}, b]\n")
        argv = [command] + ([str(tmp_path)] if command == "eval" else []) + ["--config", cfg, "--device", "cpu"]
        rc, stdout, err = run(argv, capsys)
        one_line_error(rc, err, f"{cfg}: option '{key}': expected a single value, got a list")
        assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_evaluate_models_rejects_unknown_split():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="unknown split 'train'; expected 'test' or 'val'"):
        cli.evaluate_models({}, None, SimpleNamespace(split="train"), [], [], "cpu", None, "t", {}, seed=0)


def _train_interrupted_after_one_epoch(small_npz, out, capsys, monkeypatch, extra=()):
    """`train --epochs 2` (and ``extra`` options) stopped by Ctrl-C after its first epoch's checkpoint; returns
    (argv, rc, stderr)."""
    from robust_ops import train

    real_fit = train.fit

    def fit_then_interrupt(*args, **kwargs):
        kwargs["epochs"] = 1
        real_fit(*args, **kwargs)  # one finished epoch, checkpoint written
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", fit_then_interrupt)
    argv = ["train", "--data", small_npz, "--epochs", "2", "--out", out, "--no-progress", "--device", "cpu", *extra]
    rc, _, err = run(argv, capsys)
    monkeypatch.setattr(train, "fit", real_fit)
    return argv, rc, err


def test_interrupted_train_resumes(small_npz, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv, rc, err = _train_interrupted_after_one_epoch(small_npz, out, capsys, monkeypatch)
    assert rc == 130 and "--resume" in err and (out / "checkpoint.pt").is_file()
    rc, _, err = run(argv + ["--resume"], capsys)
    assert rc == 0, err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    rc, _, err = run(["train", "--data", small_npz, "--epochs", "3", "--out", out, "--resume", "--model", "mlp"],
                     capsys)
    one_line_error(rc, err, "--resume:", "was trained with --model small_cnn, this command has --model mlp")
    run_json = (out / "run.json").read_text()
    # settings the weights depend on cannot change on resume, and the record is left as it was
    for extra, expected in ((["--lr", "0.5"], "with --lr 0.001, this command has --lr 0.5"),
                            (["--defense", "at"], "with --defense standard, this command has --defense at"),
                            (["--seed", "1"], "with --seed 0, this command has --seed 1"),
                            (["--batch-size", "8"], "with --batch-size 32, this command has --batch-size 8"),
                            (["--dropmax", "first"], "with --dropmax none, this command has --dropmax first"),
                            (["--epochs", "1"], "holds 2 epochs of training, more than --epochs 1")):
        rc, _, err = run(argv + ["--resume"] + extra, capsys)
        one_line_error(rc, err, "--resume:", expected)
        assert (out / "run.json").read_text() == run_json
    at = ["train", "--data", small_npz, "--epochs", "1", "--out", tmp_path / "at", "--no-progress", "--device", "cpu",
          "--defense", "at", "--defense-opt", "steps=1"]
    assert run(at, capsys)[0] == 0
    rc, _, err = run(at[:-1] + ["steps=2", "--resume"], capsys)
    one_line_error(rc, err, "--resume:", "was trained with --defense-opt steps=1, this command has --defense-opt "
                                         "steps=2")


def test_resume_of_a_finished_run_with_its_own_epochs_is_accepted(small_npz, tmp_path, capsys):
    # --epochs may grow on --resume, and rerunning a finished run's own command with --resume (a batch script's
    # retry) trains nothing more: only more epochs done than --epochs are refused
    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--model", "mlp", "--epochs", "1", "--out", out, "--no-progress", "--device",
            "cpu"]
    assert run(argv, capsys)[0] == 0
    rc, _, err = run(argv + ["--resume"], capsys)
    assert rc == 0, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_own_defense_and_attack_by_dotted_import_path(user_module, small_npz, tmp_path, capsys):
    """train --defense and eval --attacks take your own classes' dotted import paths: run.json records the path and
    --resume takes it (refusing another defense, named); a path that does not resolve is a one-line error naming it,
    before anything is written or trained."""
    defense = f"{user_module}.NoisyAT"
    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu",
            "--defense", defense, "--defense-opt", "steps=1"]
    rc, stdout, err = run(argv, capsys)
    assert rc == 0 and f"trained {defense} on" in stdout, err
    run_json = json.loads((out / "run.json").read_text())
    assert (run_json["defense"], run_json["defense_options"], run_json["label"]) == (defense, {"steps": 1}, defense)
    rc, _, err = run(argv[:4] + ["2"] + argv[5:] + ["--resume"], capsys)
    assert rc == 0, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    rc, _, err = run(argv[:4] + ["3"] + argv[5:10] + ["--resume"], capsys)  # the default defense, standard
    one_line_error(rc, err, f"--resume: {out / 'run.json'} was trained with --defense {defense}, this command has "
                            "--defense standard")
    attack = f"{user_module}.EvenBIM"
    rc, _, err = run(["eval", out, "--attacks", f"{attack}:steps=2,fgsm", "--eps", "2/255", "--saliency", "0",
                      "--device", "cpu"], capsys)
    assert rc == 0, err
    rows = json.loads((out / "eval" / "results.json").read_text())["rows"]
    assert [r["attack"] for r in rows] == ["none", f"{attack}(steps=2)", "fgsm", "worst-case"]
    assert rows[0]["method"] == defense
    for argv, message in (
            (["train", "--data", small_npz, "--defense", "no_such_pkg.defs.NoisyAT"],
             "robust-ops train: error: --defense: defenses.build: cannot import module 'no_such_pkg.defs' for defense "
             "'no_such_pkg.defs.NoisyAT' (No module named 'no_such_pkg'); is it on PYTHONPATH?"),
            (["train", "--data", small_npz, "--defense", f"{user_module}.Nope"],
             f"robust-ops train: error: --defense: defenses.build: module '{user_module}' has no attribute 'Nope' "
             f"(for defense '{user_module}.Nope')"),
            (["train", "--data", small_npz, "--defense", attack],
             f"robust-ops train: error: --defense: defenses.build: defense '{attack}' is a class but not a subclass "
             "of robust_ops.defenses.Defense"),
            (["eval", out, "--attacks", f"fgsm,{defense}:steps=2"],
             f"robust-ops eval: error: --attacks: attacks.build: attack '{defense}' is a class but not a subclass of "
             "robust_ops.attacks.Attack"),
            (["train", "--data", small_npz, "--defense", f"{user_module}.NoLoss"],  # a traceback after run.json
             f"robust-ops train: error: --defense: defenses.build: defense '{user_module}.NoLoss' does not implement "
             "__call__(model, x, y, ids=None) -> DefenseOutput; define it in the class"),
            (["eval", out, "--attacks", f"{user_module}.NoForward"],
             f"robust-ops eval: error: --attacks: attacks.build: attack '{user_module}.NoForward' does not implement "
             "forward(x, y) -> x_adv; define it in the class"),
            (["eval", out, "--attacks", "no_such_pkg.mod.EvenBIM"],
             "robust-ops eval: error: --attacks: attacks.build: cannot import module 'no_such_pkg.mod' for attack "
             "'no_such_pkg.mod.EvenBIM' (No module named 'no_such_pkg'); is it on PYTHONPATH?"),
            (["demo", "--quick", "--methods", f"standard,{user_module}.Nope"],
             f"robust-ops demo: error: --methods: defenses.build: module '{user_module}' has no attribute 'Nope' "
             f"(for defense '{user_module}.Nope')")):
        rc, _, err = run(argv + ["--out", tmp_path / "never", "--device", "cpu"], capsys)
        assert one_line_error(rc, err) == message
    rc, _, err = run(["train", "--data", small_npz, "--defense", "nope", "--out", tmp_path / "never"], capsys)
    one_line_error(rc, err, "--defense: defenses.build: unknown defense 'nope'; expected one of standard, ",
                   "arfl, or a dotted import path of your own class (package.module.Class)")
    assert not (tmp_path / "never").exists()


def test_channels_last_train_is_recorded_resumed_and_evaluated(small_npz, tmp_path, capsys):
    out = tmp_path / "cl"
    argv = ["train", "--data", small_npz, "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu"]
    rc, _, err = run(argv + ["--channels-last"], capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["channels_last"] is True
    # Resuming in the other memory format would change the numerics mid-run: refused.
    rc, _, err = run(argv[:4] + ["2"] + argv[5:] + ["--resume"], capsys)
    one_line_error(rc, err, "--resume:", "was trained with --channels-last, this command has no --channels-last")
    model, _, run_doc = cli.load_run(out)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and run_doc["channels_last"] is True
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "2/255", "--saliency", "0", "--device", "cpu"],
                     capsys)
    assert rc == 0, err
    doc = json.loads((out / "eval" / "results.json").read_text())
    assert doc["config"]["channels_last"] is True and [r["attack"] for r in doc["rows"]] == ["none", "fgsm"]
    assert doc["config"]["eval_batch_size"] == 128 and doc["config"]["saliency_images"] == 0  # how it was made
    # --no-channels-last attacks the channels_last run in NCHW (until 2026-12-02 it only undid a config file's true)
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "2/255", "--saliency", "0", "--device", "cpu",
                      "--no-channels-last", "--out", tmp_path / "nchw"], capsys)
    assert rc == 0, err
    nchw = json.loads((tmp_path / "nchw" / "results.json").read_text())
    assert nchw["config"]["channels_last"] is False
    assert [r["attack"] for r in nchw["rows"]] == [r["attack"] for r in doc["rows"]]
    conv = next(m for m in cli.load_run(out, channels_last=False)[0].modules()
                if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_train_warmup_and_early_stopping_are_recorded_resumed_and_refused_where_they_cannot_work(small_npz, tmp_path,
                                                                                                   capsys):
    out = tmp_path / "es"
    argv = ["train", "--data", small_npz, "--out", out, "--no-progress", "--device", "cpu", "--warmup-epochs", "1"]
    rc, _, err = run(argv + ["--epochs", "1", "--early-stopping", "1"], capsys)
    assert rc == 0, err
    run_doc = json.loads((out / "run.json").read_text())
    assert run_doc["warmup_epochs"] == 1 and run_doc["early_stopping"] == 1
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    names = [n for n, p in cli.load_run(out)[0].named_parameters()]
    assert sorted(names[i] for i in state["optimizer"]["state"]) == ["classifier.bias", "classifier.weight"]
    rc, _, err = run(argv + ["--epochs", "2", "--early-stopping", "2", "--resume"], capsys)
    one_line_error(rc, err, "--resume:", "was trained with --early-stopping 1, this command has --early-stopping 2")
    rc, _, err = run(argv[:-2] + ["--epochs", "2", "--early-stopping", "1", "--resume"], capsys)
    one_line_error(rc, err, "--resume:", "was trained with --warmup-epochs 1, this command has --warmup-epochs 0")
    rc, got, err = run(argv + ["--epochs", "8", "--early-stopping", "1", "--resume"], capsys)
    assert rc == 0, err
    history = json.loads((out / "metrics.json").read_text())
    stop = torch.load(out / "checkpoint.pt", weights_only=True)["early_stopping"]
    if stop["stopped_epoch"] is not None:
        assert len(history) == stop["stopped_epoch"] < 8 and "early stopping: stopped after epoch" in got
    else:
        assert len(history) == 8 and "early stopping: did not stop (best val_loss" in got
    rc, _, err = run(["train", "--data", small_npz, "--model", "mlp", "--epochs", "1", "--warmup-epochs", "1",
                      "--out", tmp_path / "mlp", "--device", "cpu"], capsys)
    one_line_error(rc, err, "--warmup-epochs:", "--model mlp has no classifier head")
    assert not (tmp_path / "mlp").exists()
    for flag, value, said in (("--warmup-epochs", "-1", "expected >= 0, got -1"),
                              ("--early-stopping", "0", "expected a patience >= 1, got 0")):
        rc, _, err = run(["train", "--data", small_npz, flag, value, "--out", tmp_path / "bad"], capsys)
        one_line_error(rc, err, f"{flag}:", said)


def test_train_restore_best_hands_back_the_best_epoch_which_eval_attacks(small_npz, tmp_path, capsys):
    """--restore-best: RUN_DIR/best_model.pt holds the best epoch's weights (checkpoint.pt the last epoch's), run.json
    records it, eval RUN_DIR attacks those weights (eval RUN_DIR/checkpoint.pt the last ones) and records which; a
    resume switching it on where the best epoch's weights are gone is refused naming the flag."""
    out = tmp_path / "best"
    argv = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--epochs", "6"]
    rc, _, err = run(argv + ["--out", out, "--restore-best"], capsys)
    one_line_error(rc, err, "--restore-best:", "pass --early-stopping PATIENCE too")
    assert not out.exists()
    rc, got, err = run(argv + ["--out", out, "--early-stopping", "2", "--restore-best"], capsys)
    assert rc == 0, err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    best = torch.load(out / "best_model.pt", weights_only=True)
    stop = state["early_stopping"]
    assert best["epoch"] == stop["best_epoch"] < state["epoch"]  # the seed's run: its best is not its last epoch
    assert json.loads((out / "run.json").read_text())["restore_best"] is True
    assert f"restore best: the model is epoch {stop['best_epoch']}'s, in {out / 'best_model.pt'}" in got
    model, _, run_doc = cli.load_run(out)
    last, _, last_doc = cli.load_run(out / "checkpoint.pt")
    for k, v in state["best_model"].items():
        assert torch.equal(v, best["model"][k]) and torch.equal(v, model.state_dict()[k]), k
        assert torch.equal(state["model"][k], last.state_dict()[k]), k
    assert (run_doc["weights"], run_doc["best_epoch"]) == ("best", stop["best_epoch"]) and "weights" not in last_doc
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"],
                     capsys)
    assert rc == 0, err
    assert json.loads((out / "eval" / "results.json").read_text())["config"]["run"]["best_epoch"] == stop["best_epoch"]
    # trained without it: switching it on would need the weights of an epoch the run no longer holds
    plain = tmp_path / "plain"
    rc, _, err = run(argv + ["--out", plain, "--early-stopping", "2"], capsys)
    assert rc == 0, err
    rc, _, err = run(argv + ["--out", plain, "--early-stopping", "2", "--restore-best", "--resume"], capsys)
    one_line_error(rc, err, "--restore-best:", f"holds the weights of its last epoch ({state['epoch']}), not of its "
                   f"best one ({stop['best_epoch']}); resume without --restore-best")
    assert json.loads((plain / "run.json").read_text())["restore_best"] is False
    rc, _, err = run(argv + ["--out", plain, "--early-stopping", "2", "--resume"], capsys)  # as the error says
    assert rc == 0, err
    # a fresh run into RUN_DIR removes the replaced run's best_model.pt with its checkpoint
    rc, _, err = run(argv + ["--out", out, "--epochs", "1"], capsys)
    assert rc == 0, err
    assert not (out / "best_model.pt").exists()


def test_train_restore_best_resumed_with_and_without_it_and_eval_of_what_run_json_records(small_npz, tmp_path, capsys,
                                                                                         monkeypatch):
    """An interrupted --restore-best run resumes with it (the checkpoint holds its best weights); resumed without it,
    run.json records that and eval attacks checkpoint.pt although the earlier best_model.pt stays, and train prints
    no "restore best:" line; a --restore-best run whose warm-up set no best yet prints none and eval attacks its
    checkpoint; a fresh run stopped before its first epoch leaves no replaced run's best_model.pt, and a run.json
    hand-edited to a restore_best that is no boolean is refused by name (mutation pass: each of these, T26 C03 C06-C10,
    passed every test)."""
    from robust_ops import train

    out = tmp_path / "best"
    argv = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--early-stopping", "2", "--out", out]
    rc, _, err = run(argv + ["--epochs", "2", "--restore-best"], capsys)
    assert rc == 0, err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["early_stopping"]["best_epoch"] < state["epoch"] == 2  # the best in the checkpoint's best_model only
    rc, got, err = run(argv + ["--epochs", "6", "--restore-best", "--resume"], capsys)
    assert rc == 0, err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert torch.load(out / "best_model.pt", weights_only=True)["epoch"] == state["early_stopping"]["best_epoch"]
    assert "restore best: the model is epoch" in got
    rc, got, err = run(argv + ["--epochs", "6", "--resume"], capsys)  # switched off: the last epoch's weights
    assert rc == 0, err
    assert "restore best" not in got and (out / "best_model.pt").is_file()
    assert json.loads((out / "run.json").read_text())["restore_best"] is False
    model, _, run_doc = cli.load_run(out)
    assert "weights" not in run_doc and run_doc["epochs_trained"] == state["epoch"]
    for k, v in state["model"].items():
        assert torch.equal(v, model.state_dict()[k]), k
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "restore_best": "yes"}))
    with pytest.raises(cli.CLIError, match=r"run.json: expected restore_best to be true or false, got \"yes\""):
        cli.load_run(out)
    (out / "run.json").write_text(json.dumps(record))
    # a warm-up that set no best yet: no best_model.pt, no line, eval attacks the checkpoint
    warm = tmp_path / "warm"
    rc, got, err = run(argv[:-1] + [warm, "--epochs", "1", "--warmup-epochs", "1", "--restore-best"], capsys)
    assert rc == 0, err
    assert not (warm / "best_model.pt").exists() and "restore best" not in got
    assert cli.load_run(warm)[2]["epochs_trained"] == 1

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # a fresh run into RUN_DIR stopped before its first epoch: the replaced run's best weights go with its checkpoint
    rc, _, err = run(argv + ["--epochs", "6", "--restore-best"], capsys)
    assert rc == 0 and (out / "best_model.pt").is_file(), err
    monkeypatch.setattr(train, "fit", interrupted)
    rc, _, err = run(argv + ["--epochs", "6", "--restore-best"], capsys)
    assert rc == 130 and not (out / "best_model.pt").exists() and not (out / "checkpoint.pt").exists(), err


def test_train_restore_best_resume_reads_the_checkpoint_once_beside_fits_read(small_npz, tmp_path, capsys,
                                                                            monkeypatch):
    """train --resume --restore-best read the whole checkpoint in the command (to refuse a switch fit cannot make
    exact) beside resume_conflict's read of its epochs, and fit then read it again: fit's own refusal is now reworded
    instead (test_train_restore_best_hands_back_the_best_epoch_which_eval_attacks checks its words). After training,
    train read it once more for the early-stopping lines, which fit's result holds."""
    from robust_ops import train

    out = tmp_path / "best"
    argv = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--early-stopping", "2", "--out", out,
            "--restore-best"]
    rc, _, err = run(argv + ["--epochs", "1"], capsys)
    assert rc == 0, err
    loads, load, fit = [], torch.load, train.fit
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (loads.append(Path(f).name), load(f, *a, **k))[1])
    monkeypatch.setattr(train, "fit", lambda *a, **k: (loads.append("fit"), fit(*a, **k))[1])
    rc, got, err = run(argv + ["--epochs", "2", "--resume"], capsys)
    assert rc == 0, err
    assert loads == ["checkpoint.pt", "fit", "checkpoint.pt"], loads  # resume_conflict's (its epochs), fit's own
    stop = load(out / "checkpoint.pt", weights_only=True)["early_stopping"]
    assert f"early stopping: did not stop (best val_loss {stop['best']:.4g} at epoch {stop['best_epoch']})" in got
    assert f"restore best: the model is epoch {stop['best_epoch']}'s" in got


def test_eval_of_a_restore_best_run_without_its_best_model_pt_attacks_the_checkpoints_best_weights(small_npz, tmp_path,
                                                                                                 capsys):
    """A --restore-best run folder without best_model.pt (deleted, or not copied with the run): eval RUN_DIR attacked
    checkpoint.pt's last epoch without a word; the checkpoint holds the best epoch's weights too (its best_model)."""
    out = tmp_path / "best"
    rc, _, err = run(["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--epochs", "2",
                      "--early-stopping", "2", "--restore-best", "--out", out], capsys)
    assert rc == 0, err
    (out / "best_model.pt").unlink()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    best_epoch = state["early_stopping"]["best_epoch"]
    assert best_epoch < state["epoch"]
    model, _, run_doc = cli.load_run(out)
    assert (run_doc["weights"], run_doc["best_epoch"]) == ("best", best_epoch) and "epochs_trained" not in run_doc
    for k, v in state["best_model"].items():
        assert torch.equal(v, model.state_dict()[k]), k
    last, _, last_doc = cli.load_run(out / "checkpoint.pt")  # the file named: the last epoch's, as before
    assert "weights" not in last_doc and last_doc["epochs_trained"] == state["epoch"]
    for k, v in state["model"].items():
        assert torch.equal(v, last.state_dict()[k]), k


def test_eval_of_a_restore_best_run_refuses_a_best_model_pt_it_cannot_attack_as_the_best_weights(small_npz, tmp_path,
                                                                                                   capsys):
    """eval RUN_DIR of a --restore-best run: a damaged best_model.pt was refused without saying that checkpoint.pt holds
    the same weights; checkpoint.pt, a bare state_dict or another run's checkpoint copied in as best_model.pt was
    attacked and recorded as the best epoch's weights without a word."""
    out = tmp_path / "best"
    rc, _, err = run(["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--epochs", "2",
                      "--early-stopping", "2", "--restore-best", "--out", out], capsys)
    assert rc == 0, err
    best = out / "best_model.pt"
    good = best.read_bytes()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    way_out = f"remove it, and `robust-ops eval {out}` attacks the best epoch's weights that checkpoint.pt holds too"
    ev = ["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu", "--out",
          tmp_path / "ev"]
    best.write_bytes(good[:len(good) // 2])  # cut short: a copy or a disk that failed
    rc, _, err = run(ev, capsys)
    line = one_line_error(rc, err, f"{best}: ", f"; {way_out}")
    assert "not" in line.split(way_out)[0], line  # the read error itself is kept ahead of the way out
    for copied, what in ((state, "a fit checkpoint"), (state["model"], "a bare state_dict")):
        torch.save(copied, best)
        rc, _, err = run(ev, capsys)
        one_line_error(rc, err, f"{best}: is not a best-model file of this run ({what}, without the weights='best' "
                       f"record train writes in it); put the run's own best_model.pt back, or {way_out}")
    assert not (tmp_path / "ev").exists()
    best.unlink()  # as the message says: the checkpoint's copy of the best weights
    _, _, run_doc = cli.load_run(out)
    assert (run_doc["weights"], run_doc["best_epoch"]) == ("best", state["early_stopping"]["best_epoch"])
    best.write_bytes(good)  # the run's own: attacked as before
    assert run(ev, capsys)[0] == 0


def test_eval_of_a_run_its_early_stopping_ended_does_not_call_it_unfinished(small_npz, tmp_path, capsys):
    """A run early stopping ended is finished (--resume trains no further epoch): eval warned that its checkpoint
    "holds 3 of the run's 6 epochs (training stopped early) ... `robust-ops train ... --resume` finishes it"."""
    out = tmp_path / "es"
    rc, _, err = run(["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--epochs", "6",
                      "--early-stopping", "2", "--out", out], capsys)
    assert rc == 0, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["early_stopping"]["stopped_epoch"] == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, run_doc = cli.load_run(out)
    assert not [w for w in caught if "epochs" in str(w.message)], [str(w.message) for w in caught]
    assert run_doc["epochs_trained"] == 3


def test_eval_of_an_early_stopping_run_interrupted_before_its_stop_still_warns(small_npz, tmp_path, capsys,
                                                                               monkeypatch):
    """A run interrupted after an epoch that set its best val_loss has not stopped: --resume trains on, so eval still
    warns (mutation pass: the warning silenced for any early-stopping state with a best, C15, passed every test)."""
    out = tmp_path / "es"
    _, rc, _ = _train_interrupted_after_one_epoch(small_npz, out, capsys, monkeypatch, ["--early-stopping", "2"])
    assert rc == 130
    assert torch.load(out / "checkpoint.pt", weights_only=True)["early_stopping"]["best_epoch"] == 1
    with pytest.warns(UserWarning, match=r"checkpoint.pt: holds 1 of the run's 2 epochs \(training stopped early\)"):
        cli.load_run(out)


def test_train_schedule_options_of_older_runs_empty_validation_and_the_run_that_did_not_stop(small_npz, tmp_path,
                                                                                            capsys):
    """A run.json written before --warmup-epochs, --early-stopping and --restore-best (none recorded) resumes as one
    without them, and a hand-edited one of the wrong type is refused naming the field; --early-stopping on data whose
    validation split is empty is refused before anything is written; a run that did not stop says so, with its best
    epoch (mutation pass: dropping each of these passed every test)."""
    out = tmp_path / "old"
    argv = ["train", "--data", small_npz, "--out", out, "--no-progress", "--device", "cpu", "--model", "mlp"]
    rc, _, err = run(argv + ["--epochs", "1"], capsys)
    assert rc == 0, err
    record = json.loads((out / "run.json").read_text())
    del record["warmup_epochs"], record["early_stopping"], record["restore_best"]
    (out / "run.json").write_text(json.dumps(record))
    rc, _, err = run(argv + ["--epochs", "2", "--resume"], capsys)
    assert rc == 0, err
    (out / "run.json").write_text(json.dumps({**record, "warmup_epochs": "1"}))
    rc, _, err = run(argv + ["--epochs", "3", "--resume"], capsys)
    one_line_error(rc, err, "run.json: expected warmup_epochs to be an integer, got \"1\"")
    noval = tmp_path / "noval.npz"
    arrays = dict(np.load(small_npz))
    np.savez(noval, **{**arrays, "val_images": arrays["val_images"][:0], "val_labels": arrays["val_labels"][:0]})
    rc, _, err = run(["train", "--data", noval, "--early-stopping", "2", "--out", tmp_path / "noval"], capsys)
    one_line_error(rc, err, f"--early-stopping: it stops on the validation loss, and the validation split of {noval} "
                            "holds no samples; leave --early-stopping out")
    assert not (tmp_path / "noval").exists()
    rc, got, err = run(argv[:-2] + ["--epochs", "1", "--early-stopping", "3", "--out", tmp_path / "es"], capsys)
    assert rc == 0, err
    assert re.search(r"^early stopping: did not stop \(best val_loss \S+ at epoch 1\)$", got, re.M), got


def test_train_timed_out_after_a_checkpoint_says_to_resume(small_npz, tmp_path, monkeypatch, capsys):
    """A process that gave up waiting for a hung one leaves the epochs saved before it: the one line says the
    checkpoint holds them and how to continue, as for a failed write (mutation pass: dropping it passed)."""
    from robust_ops import train as trainer

    def times_out(*args, out_dir=None, **kwargs):
        (Path(out_dir) / "checkpoint.pt").write_bytes(b"")
        raise trainer.CollectiveTimeoutError("fit", 1, 60.0, "dist_timeout", "epoch 3, step 1")

    monkeypatch.setattr(trainer, "fit", times_out)
    out = tmp_path / "run"
    rc, _, err = run(["train", "--data", small_npz, "--model", "mlp", "--dist-timeout", "60", "--out", out,
                      "--no-progress", "--device", "cpu"], capsys)
    line = one_line_error(rc, err, "training failed: fit: process 1 timed out after 60 s (--dist-timeout)")
    assert line.endswith(f"raise --dist-timeout; {out / 'checkpoint.pt'} holds the last epoch saved: once fixed, "
                         "continue with the same command and --resume"), line


@pytest.mark.parametrize("world", ["2", "1"])
def test_train_whose_other_process_was_killed_says_so_and_to_resume(small_npz, tmp_path, monkeypatch, capsys, world):
    """Under torchrun, a process killed outright (kill -9 of one worker, measured with 2 gloo processes) records
    nothing, and the survivor's collective failed with gloo's RuntimeError: a 60-line traceback ending 'Read error
    [127.0.0.1]:23966: Connection reset by peer. This is typically caused by a remote worker hanging ... GLHF!', with
    no word of the checkpoint kept (the run resumed bitwise exact). It is one line saying another process is gone and
    how to continue; in one process such an error is no peer's and keeps its traceback."""
    from robust_ops import train as trainer

    def peer_killed(*args, out_dir=None, **kwargs):
        (Path(out_dir) / "checkpoint.pt").write_bytes(b"")
        raise RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                           "[127.0.0.1]:23966: Connection reset by peer. This is typically caused by a remote worker "
                           "hanging or bugs in the application.")

    monkeypatch.setattr(trainer, "fit", peer_killed)
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--model", "mlp", "--out", out, "--no-progress", "--device", "cpu"]
    if world == "1":
        with pytest.raises(RuntimeError, match="Connection reset by peer"):
            run(argv, capsys)
        return
    rc, _, err = run(argv, capsys)
    line = one_line_error(rc, err, f"robust-ops train: error: {out}: training failed: another process of the run is "
                                   "gone (killed: SIGKILL, the out-of-memory killer; interrupted alone; or stopped by "
                                   "an error it printed; torchrun's summary names its rank), which stopped this one "
                                   "(gloo: Connection reset by peer)")
    assert line.endswith(f"; {out / 'checkpoint.pt'} holds the last epoch saved: once fixed, continue with the same "
                         "command and --resume"), line


def test_train_with_the_same_seed_gives_the_same_weights(small_npz, tmp_path, capsys):
    states = []
    for name in ("a", "b"):
        torch.randn(3)  # a different global RNG state before each run: --seed must fix the initial weights itself
        argv = ["train", "--data", small_npz, "--epochs", "1", "--out", tmp_path / name, "--no-progress",
                "--device", "cpu", "--seed", "3"]
        rc, _, err = run(argv, capsys)
        assert rc == 0, err
        states.append(torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_prepacked_conv_train_is_recorded_resumed_and_evaluated(small_npz, tmp_path, capsys, monkeypatch):
    from robust_ops import prepacked_conv

    packed = []
    real_pack = prepacked_conv._pack
    monkeypatch.setattr(prepacked_conv, "_pack", lambda *a: packed.append(1) or real_pack(*a))
    out = tmp_path / "packed"
    argv = ["train", "--data", small_npz, "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu",
            "--defense", "at", "--defense-opt", "steps=2"]
    rc, _, err = run(argv + ["--prepacked-conv"], capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["prepacked_conv"] is True
    assert packed  # AT's PGD ran on packed convolutions
    rc, _, err = run(argv[:4] + ["2"] + argv[5:] + ["--resume"], capsys)
    one_line_error(rc, err, "--resume:", "was trained with --prepacked-conv, this command has no --prepacked-conv")
    packed.clear()
    rc, _, err = run(["eval", out, "--attacks", "pgd:steps=2", "--eps", "2/255", "--saliency", "0", "--device", "cpu"],
                     capsys)
    assert rc == 0, err
    assert json.loads((out / "eval" / "results.json").read_text())["config"]["prepacked_conv"] is True
    assert packed  # eval follows the run
    packed.clear()  # ... unless told otherwise
    rc, _, err = run(["eval", out, "--attacks", "pgd:steps=2", "--eps", "2/255", "--saliency", "0", "--device", "cpu",
                      "--no-prepacked-conv", "--out", tmp_path / "unpacked"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "unpacked" / "results.json").read_text())["config"]["prepacked_conv"] is False
    assert not packed
    assert all("forward" not in m.__dict__ for m in cli.load_run(out)[0].modules())
    # the variable without the flag: run.json records what ran, and a resume without the variable is refused
    monkeypatch.setenv("ROBUST_OPS_PREPACKED_CONV", "1")
    packed.clear()
    env_out = tmp_path / "env"
    rc, _, err = run(argv[:6] + [env_out] + argv[7:], capsys)
    assert rc == 0, err
    assert json.loads((env_out / "run.json").read_text())["prepacked_conv"] is True and packed
    # ... and --no-prepacked-conv turns the variable's default off, as fit(prepacked_conv=False) does
    packed.clear()
    off_out = tmp_path / "off"
    rc, _, err = run(argv[:6] + [off_out] + argv[7:] + ["--no-prepacked-conv"], capsys)
    assert rc == 0, err
    assert json.loads((off_out / "run.json").read_text())["prepacked_conv"] is False and not packed
    monkeypatch.delenv("ROBUST_OPS_PREPACKED_CONV")
    rc, _, err = run(argv[:4] + ["2"] + argv[5:6] + [env_out] + argv[7:] + ["--resume"], capsys)
    one_line_error(rc, err, "--resume:", "was trained with --prepacked-conv, this command has no --prepacked-conv")


def test_train_resume_refusal_names_the_flags_as_typed(small_npz, tmp_path, capsys):
    """--resume's refusal of another setting named run.json's keys and Python values (``was trained with
    prepacked_conv=False, this command has prepacked_conv=True``, ``batch_size=32``), where every other message of
    the command line names its flags (found by the first-wave helpers): it names the flag as typed, a switch or an
    option left out as with / without it; demo, which has no flag for the memory format, keeps run.json's words."""
    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--model", "mlp", "--epochs", "1", "--out", out, "--no-progress",
            "--device", "cpu"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    again = argv[:6] + ["2"] + argv[7:] + ["--resume"]
    for extra, words in ((["--prepacked-conv"], "without --prepacked-conv, this command has --prepacked-conv"),
                         (["--channels-last"], "without --channels-last, this command has --channels-last"),
                         (["--batch-size", "16"], "with --batch-size 32, this command has --batch-size 16"),
                         (["--lr", "0.01"], "with --lr 0.001, this command has --lr 0.01"),
                         (["--early-stopping", "2"], "without --early-stopping, this command has --early-stopping 2"),
                         (["--defense", "at"], "with --defense standard, this command has --defense at"),
                         (["--model", "small_cnn"], "with --model mlp, this command has --model small_cnn")):
        rc, _, err = run(again + extra, capsys)
        line = one_line_error(rc, err, f"--resume: {out / 'run.json'} was trained {words}")
        assert not re.search(r"[a-z]_[a-z]+=|=True|=False", line), line
    err = cli.resume_setting_error(out / "run.json", "defense_options", {}, {"steps": 1, "eps": 0.5},
                                   cli.TRAIN_FLAG_SETTINGS)
    assert str(err).endswith("without --defense-opt, this command has --defense-opt steps=1 --defense-opt eps=0.5")
    err = cli.resume_setting_error(out / "run.json", "channels_last", True, False, cli.DEMO_FLAG_SETTINGS)
    assert str(err).endswith("was trained with channels_last=True, this command has channels_last=False"), err


def test_resume_of_a_run_trained_with_a_seed_out_of_range_says_it_cannot_continue(small_npz, tmp_path, capsys):
    """A run trained (before fit refused them) with a seed from 2**32 on: --resume said "rerun with the run's settings
    (--seed 1099511627776)", which --seed then refused ("expected 0 to 4294967295"). It says the run cannot be
    continued and how to go on, from run.json or, without one, from the checkpoint's record."""
    import torch

    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--model", "mlp", "--epochs", "1", "--out", out, "--no-progress",
            "--device", "cpu"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(record | {"seed": 2**40}))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["config"]["seed"] = 2**40
    torch.save(state, out / "checkpoint.pt")
    again = argv[:6] + ["2"] + argv[7:] + ["--resume"]
    for where in ("run.json", "checkpoint.pt"):
        if where == "checkpoint.pt":
            (out / "run.json").unlink()
        rc, _, err = run(again, capsys)
        line = one_line_error(rc, err, f"--resume: {out / where} was trained with --seed 1099511627776, outside 0 to "
                                       "4294967295", "so the run cannot be continued; train afresh without --resume")
        assert "rerun" not in line


def test_mirst_dm_with_dropmax_all_trains_what_run_json_records(small_npz, tmp_path, capsys, monkeypatch):
    """--defense mirst-dm --dropmax all: every max-pooling of the trained model is drop-max, as run.json records and
    eval rebuilds (the option was dropped: mirst-dm replaced only the first, and eval attacked another model)."""
    from robust_ops import train
    from robust_ops.nn import DropMax2d

    trained, fit = [], train.fit
    monkeypatch.setattr(train, "fit", lambda model, *a, **k: trained.append(model) or fit(model, *a, **k))
    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu",
            "--defense", "mirst-dm"]
    for dropmax, expected in (("all", 2), ("none", 1)):  # small_cnn has two max-poolings; mirst-dm's own: the first
        rc, _, err = run(argv + ["--dropmax", dropmax], capsys)
        assert rc == 0, err
        assert sum(isinstance(m, DropMax2d) for m in trained[-1].modules()) == expected
        assert sum(isinstance(m, DropMax2d) for m in cli.load_run(out)[0].modules()) == expected
        assert json.loads((out / "run.json").read_text())["dropmax"] == ("all" if expected == 2 else "first")
    # a checkpoint without its run.json (fit's out_dir from Python) was rebuilt without drop-max and evaluated as
    # another model, then refused with advice to put back a run.json fit never writes: it is rebuilt with the
    # DropMax2d layers it records
    (out / "run.json").rename(tmp_path / "run.json")
    net = cli.load_run(out / "checkpoint.pt", data=small_npz, model="small_cnn")[0]
    assert [n for n, m in net.named_modules() if isinstance(m, DropMax2d)] == ["features.3"]
    state = train.load_checkpoint(out / "checkpoint.pt")
    state["config"]["drop_max_layers"] = ["features.7"]  # the second alone: made drop-max by hand, not by --dropmax
    train.save_checkpoint(out / "checkpoint.pt", state)
    with pytest.raises(cli.CLIError, match=r"checkpoint.pt: was trained with DropMax2d layers \['features.7'\], the "
                                           r"model has \[\] \(rebuilt as small_cnn; --model makes the first "
                                           r"max-pooling layer or all of them drop-max only\); evaluate the model it "
                                           r"trained in Python: robust_ops.evaluate.evaluate$"):
        cli.load_run(out / "checkpoint.pt", data=small_npz, model="small_cnn")


def test_demo_quick_synthetic(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.DEMO_METHODS == ("standard", "rst", "mirst", "mirst-dm", "ima")  # the default set (all five)
    rc, stdout, err = run(["demo", "--quick", "--methods", "standard,mirst-dm,ima", "--out", out, "--attacks",
                           "fgsm,pgd:steps=2", "--eps", "2/255,8/255", "--no-progress", "--device", "cpu",
                           "--saliency", "2", "--data", "Synthetic-BUS"], capsys)
    assert rc == 0, err
    doc = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in doc["rows"]}
    assert methods == {"Baseline", "MIRST-DM", "IMA"} and doc["synthetic"] is True
    assert doc["config"]["data"] == "synthetic"  # as each run.json records it, not as typed
    assert (doc["config"]["epochs"], doc["config"]["train_images"]) == (2, 64)  # docs/cli.md: --quick
    assert "SYNTHETIC DATA" in stdout and "Synthetic data" in (out / "report.md").read_text()
    assert (out / "f1_vs_eps.png").read_bytes()[:4] == b"\x89PNG"
    run_json = json.loads((out / "runs" / "mirst-dm" / "run.json").read_text())
    assert run_json["dropmax"] == "first"


def test_eval_on_breastmnist(breastmnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROBUST_OPS_DATA", str(breastmnist.parent))
    out = tmp_path / "bm"
    rc, _, err = run(["train", "--data", "breastmnist", "--epochs", "1", "--out", out, "--no-progress", "--device",
                      "cpu"], capsys)
    assert rc == 0, err
    rc, stdout, err = run(["eval", out, "--attacks", "fgsm", "--eps", "5/255", "--saliency", "0"], capsys)
    assert rc == 0, err
    doc = json.loads((out / "eval" / "results.json").read_text())
    assert doc["dataset"]["name"] == "breastmnist" and doc["dataset"]["positive_class"] == 0
    assert doc["rows"][0]["n"] == 156 and not doc["synthetic"]


def test_reproduce_quick_arfl_moons(tmp_path, capsys):
    out = tmp_path / "arfl"
    rc, stdout, err = run(["reproduce", "arfl-moons", "--quick", "--seeds", "1", "--out", out, "--no-progress",
                           "--device", "cpu"], capsys)
    assert rc == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert doc["paper"] and {r["method"] for r in doc["rows"]} >= {"Standard training", "MIRST"}
    text = (out / "report.md").read_text()
    assert "Published numbers beside ours" in text and "QUICK MODE" in text and "| Standard training | FGSM" in text
    # said before the first table (the notes come after them all) and of the whole report, not of "the numbers below"
    assert text.startswith("# Reproduction: ARFL (adversarially robust feature learning), Table 1 (QUICK MODE: a smoke "
                           "run, its numbers mean nothing)\n")
    assert "the numbers in this report mean nothing" in text and "below mean nothing" not in text
    assert "RUNS:" not in text  # --seeds 1 of the protocol's 5 gets no RUNS note in --quick: QUICK MODE's covers it
    assert ("two-moons: positive class 1 = lower moon; sensitivity is the recall of the positive class, "
            "specificity that of class 0 = upper moon") in stdout
    # its metric-vs-radius figures were written without a word (docs/reproduce/README.md named results.json and
    # report.md only); no saliency figure on feature vectors
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == ["accuracy_vs_eps.png", "f1_vs_eps.png", "sensitivity_vs_eps.png", "specificity_vs_eps.png"]
    assert f"wrote {out / 'results.json'}, {out / 'report.md'} and 4 figures (" in stdout


def test_reproduce_records_the_protocols_data_by_its_name_whatever_its_spelling(tmp_path, capsys):
    # --data Moons was recorded as typed, and the report's DATA note said the run used "Moons" instead of the
    # protocol's moons: the same data, which its notes do describe
    out = tmp_path / "arfl"
    rc, _, err = run(["reproduce", "arfl-moons", "--quick", "--seeds", "1", "--methods", "mirst", "--data", "Two-Moons",
                      "--out", out, "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert json.loads((out / "results.json").read_text())["config"]["data"] == "moons"
    assert "DATA:" not in (out / "report.md").read_text()


def test_a_size_that_cannot_fit_in_memory_is_one_line_naming_size(tmp_path, capsys):
    # numpy's MemoryError traceback, after drawing for a while; the data layer's check, as its flag
    rc, _, err = run(["train", "--data", "synthetic", "--size", "1000000", "--out", tmp_path / "o", "--device",
                      "cpu"], capsys)
    one_line_error(rc, err, "error: --size: synthetic: 384 images of 1000000x1000000 pixels take at least ",
                   " GiB of memory; give a smaller --size")
    assert not (tmp_path / "o").exists()


def test_reproduce_arfl_moons_on_images_says_its_radii_are_the_moons(tmp_path, capsys):
    """arfl-moons given images kept its radii, set in the moons' coordinates (FGSM 0.2 of a moon's width), where
    they are 51/255 of the pixel range, and nothing said so: the report's notes now do."""
    out = tmp_path / "o"
    rc, _, err = run(["reproduce", "arfl-moons", "--quick", "--seeds", "1", "--methods", "Standard training", "--data",
                      _folder(tmp_path / "d"), "--size", "8", "--out", out, "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert ("RADII: arfl-moons's radii are set in the moons' coordinates (each moon spans about 2 by 1), and this run "
            "kept them: training 0.05 (= 12.8/255), attack 0.2 (= 51/255), here fractions of the [0, 1] pixel range."
            ) in (out / "report.md").read_text()


def test_reproduce_runs_the_methods_asked_for(tmp_path, capsys):
    out = tmp_path / "arfl"
    argv = ["reproduce", "arfl-moons", "--quick", "--seeds", "1", "--out", out, "--no-progress", "--device", "cpu"]
    rc, stdout, err = run(argv + ["--methods", "mirst,Standard training"], capsys)
    assert rc == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in doc["rows"]} == {"Standard training", "MIRST"}
    assert [m["label"] for m in doc["config"]["methods"]] == ["Standard training", "MIRST"]  # the protocol's order
    assert sorted(p.parent.name for p in out.glob("runs-quick/*/seed0")) == ["mirst", "standard-training"]
    assert "METHODS: this run trained and evaluated Standard training, MIRST only" in (out / "report.md").read_text()
    rc, more, err = run(argv + ["--methods", "MIRST,TRADES"], capsys)  # a later run with more: MIRST's is reused
    assert rc == 0, err
    assert "loading (already trained) MIRST" in more and "MIRST: evaluation reused" in more
    assert {r["method"] for r in json.loads((out / "results.json").read_text())["rows"]} == {"TRADES", "MIRST"}
    for methods, named in (("MIRST,nope", "nope"), ("", "(none given)")):
        rc, _, err = run(argv + ["--methods", methods], capsys)
        one_line_error(rc, err, f"--methods: arfl-moons has no method {named}; choose from Standard training, ")


def test_interrupted_reproduce_says_where_its_runs_are_and_how_to_continue(tmp_path, capsys, monkeypatch):
    # Ctrl-C / SIGTERM said only "no results were written": nothing of the finished runs kept in OUT/runs-quick
    # or of how to continue from them (train's and demo's lines say it); the rerun ends where an uninterrupted run does
    out = tmp_path / "arfl"
    argv = ["reproduce", "arfl-moons", "--quick", "--seeds", "1", "--methods", "Standard training,MIRST", "--out", out,
            "--no-progress", "--device", "cpu"]
    real, calls = cli.train_run, []

    def train_run(*args, **kwargs):  # Ctrl-C as the second method's training starts: the first run is finished
        calls.append(kwargs["label"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "train_run", train_run)
    rc, _, err = run(argv, capsys)
    monkeypatch.setattr(cli, "train_run", real)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 130 and calls == ["Standard training", "MIRST"] and len(lines) == 1, err
    assert lines[0] == (f"robust-ops reproduce: interrupted; {out / 'runs-quick'} keeps its runs' finished epochs and "
                        f"evaluations; rerun the same command to continue from them (results.json and report.md "
                        f"are written at the end)")
    assert not (out / "results.json").exists()
    rc, resumed, err = run(argv, capsys)
    assert rc == 0 and "loading (already trained) Standard training" in resumed, err
    assert "Standard training: evaluation reused" in resumed
    rc, _, err = run(argv[:-4] + [tmp_path / "whole", "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    rows = [json.loads((d / "results.json").read_text())["per_run_rows"] for d in (out, tmp_path / "whole")]
    assert rows[0] == rows[1]
    monkeypatch.setattr(cli, "train_run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, _, err = run(argv[:-4] + [tmp_path / "none", "--no-progress", "--device", "cpu"], capsys)
    assert rc == 130 and err.strip() == ("robust-ops reproduce: interrupted before any run finished an epoch; rerun "
                                         "the same command to start again"), err


def test_reproduce_evaluation_error_is_a_one_line_error_naming_the_protocol(tmp_path, capsys, monkeypatch):
    # an EvalError from a protocol's evaluation (e.g. a model giving NaN scores) ends in one line led by its name
    import robust_ops.reproduce
    from robust_ops.evaluate import EvalError

    def run_protocol(*args, **kwargs):
        raise EvalError("model", "MIRST: the model's scores are not finite")

    monkeypatch.setattr(robust_ops.reproduce, "run_protocol", run_protocol)
    rc, _, err = run(["reproduce", "arfl-moons", "--quick", "--out", tmp_path / "out", "--device", "cpu"], capsys)
    one_line_error(rc, err, "robust-ops reproduce: error: arfl-moons: MIRST: the model's scores are not finite")


def test_reproduce_writes_to_runs_reproduce_name_by_default(tmp_path, capsys, monkeypatch):
    # --out's default, runs/reproduce/NAME (docs/cli.md): where a rerun finds the protocol's runs to reuse
    import robust_ops.reproduce

    outs = []
    monkeypatch.setattr(robust_ops.reproduce, "run_protocol", lambda *a, out, **k: outs.append(out))
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(["reproduce", "arfl-moons", "--quick", "--device", "cpu"], capsys)
    assert rc == 0 and outs == [Path("runs") / "reproduce" / "arfl-moons"], err


def test_reproduce_reuses_evaluations_of_unchanged_runs(tmp_path, capsys):
    from robust_ops.reproduce import EVAL_CACHE_FILE

    out = tmp_path / "arfl"
    argv = ["reproduce", "arfl-moons", "--quick", "--seeds", "1", "--out", out, "--no-progress", "--device", "cpu"]
    rc, first, err = run(argv, capsys)
    assert rc == 0, err
    assert "evaluation reused" not in first
    rows = json.loads((out / "results.json").read_text())["per_run_rows"]
    caches = sorted(out.glob(f"runs-quick/*/seed0/{EVAL_CACHE_FILE}"))
    assert len(caches) == 8  # one per method
    first_history = torch.load(caches[0].parent / "checkpoint.pt", weights_only=True)["history"]
    rc, second, err = run(argv, capsys)  # the runs resume as finished: their evaluations are reused
    assert rc == 0, err
    assert second.count("evaluation reused") == 8 and second.count("loading (already trained)") == 8
    assert json.loads((out / "results.json").read_text())["per_run_rows"] == rows

    # a changed model is evaluated again (its weights are part of the key); so is everything under --reevaluate
    cache = caches[0]
    doc = json.loads(cache.read_text())
    doc["entries"][0]["key"]["model_sha256"] = "0" * 64
    cache.write_text(json.dumps(doc))
    rc, third, err = run(argv, capsys)
    assert rc == 0, err
    assert third.count("evaluation reused") == 7
    # a finished run is loaded, not trained again (its history keeps the first run's epoch times)
    assert torch.load(cache.parent / "checkpoint.pt", weights_only=True)["history"] == first_history
    assert len(json.loads(cache.read_text())["entries"]) == 2  # the stale entry stays beside the fresh one
    cache.write_text("{not json")
    rc, fourth, err = run(argv, capsys)
    assert rc == 0, err
    assert fourth.count("evaluation reused") == 7 and "unreadable evaluation cache" in fourth
    rc, fifth, err = run(argv + ["--reevaluate"], capsys)
    assert rc == 0, err
    assert "evaluation reused" not in fifth
    assert json.loads((out / "results.json").read_text())["per_run_rows"] == rows


def test_reproduce_says_once_per_run_that_its_evaluations_were_reused(tmp_path, capsys, monkeypatch):
    # a protocol with two evaluation plans (dpaat-bus: L-inf and L2) printed "evaluation reused" once per plan
    import dataclasses

    from robust_ops.reproduce import PROTOCOLS, AttackSpec, EvalPlan

    moons = PROTOCOLS["arfl-moons"]
    two_plans = dataclasses.replace(moons, evals=[*moons.evals, EvalPlan([AttackSpec("fgsm", {}, "FGSM")], [0.1])])
    monkeypatch.setitem(PROTOCOLS, "arfl-moons", two_plans)
    argv = ["reproduce", "arfl-moons", "--quick", "--seeds", "1", "--methods", "Standard training",
            "--out", tmp_path / "r", "--no-progress", "--device", "cpu"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    rc, second, err = run(argv, capsys)
    assert rc == 0, err
    assert second.count("evaluation reused") == 1 and "Standard training: evaluation reused" in second
    # one plan's rows stale (their key no longer matches): the line says how many plans were reused
    cache, = (tmp_path / "r").glob("runs-quick/*/seed0/eval.json")
    doc = json.loads(cache.read_text())
    doc["entries"][1]["key"]["eps"] = [9.0]
    cache.write_text(json.dumps(doc))
    rc, third, err = run(argv, capsys)
    assert rc == 0, err
    assert third.count(" reused from ") == 1 and "Standard training: evaluation (1 of 2 plans) reused from" in third


def test_run_protocol_takes_a_protocols_name(tmp_path, capsys):
    # run_protocol("arfl-moons", out=...) failed with "AttributeError: 'str' object has no attribute 'quick'"
    from robust_ops.reproduce import PROTOCOLS, run_protocol

    rows = run_protocol("arfl-moons", out=tmp_path / "r", quick=True, seeds=1, methods=["Standard training"],
                        progress=False)
    assert {r["method"] for r in rows} == {"Standard training"}
    assert json.loads((tmp_path / "r" / "results.json").read_text())["config"]["protocol"] == "arfl-moons"
    with pytest.raises(ValueError, match=r"^run_protocol: unknown protocol 'arfl_moons'; expected one of "
                                         rf"{', '.join(PROTOCOLS)} \(a key of PROTOCOLS\) or a Protocol$"):
        run_protocol("arfl_moons", out=tmp_path / "other")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("given,said", [(dict(lr=0.0), "--lr: expected a finite learning rate > 0, got 0.0"),
                                        (dict(lr=float("nan")), "--lr: expected a finite learning rate > 0, got nan"),
                                        (dict(batch_size=0), "--batch-size: expected >= 1, got 0"),
                                        (dict(epochs=0), "--epochs: expected >= 1, got 0"),
                                        (dict(seeds=-1), "--seeds: expected >= 1, got -1"),
                                        (dict(dist_timeout=0), "--dist-timeout: expected a number of seconds > 0 and "
                                                               "<= 1e+09 (longer ones overflow torch's collective "
                                                               "deadlines), got 0")],
                         ids=["lr0", "lr_nan", "batch0", "epochs0", "seeds_negative", "dist_timeout0"])
def test_run_protocol_checks_its_counts_and_lr_as_the_command_does(tmp_path, capsys, given, said):
    """run_protocol skipped the checks `robust-ops reproduce` makes: lr=0 trained every run at lr 0, epochs=0 trained
    the protocol's epochs, seeds=-1 was an AttributeError, and batch_size=0, lr=nan or dist_timeout=0 failed inside
    the first run's fit, its folder made. Each is the command's rule, before anything is written: a ValueError naming
    the argument for a Python caller (it was the command's CLIError naming the flag, '--lr: ...', for lr=-1 too), the
    flag's one line for the command."""
    from robust_ops.cli import CLIError
    from robust_ops.reproduce import run_protocol

    (arg, value), = given.items()
    flag, problem = said.split(": ", 1)
    options = dict(epochs=1, seeds=1) | given
    with pytest.raises(ValueError, match=f"^run_protocol: {arg}: {re.escape(problem)}$") as raised:
        run_protocol("arfl-moons", out=tmp_path / "r", quick=True, progress=False, **options)
    assert isinstance(raised.value, CLIError) and raised.value.command_words == said
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""
    rc, _, err = run(["reproduce", "arfl-moons", "--quick", "--out", tmp_path / "r", flag, value], capsys)
    one_line_error(rc, err, f"robust-ops reproduce: error: {flag}: expected ")
    assert list(tmp_path.iterdir()) == []


def test_run_protocol_checks_its_out_as_the_command_does(tmp_path, capsys):
    """run_protocol skipped the --out checks of `robust-ops reproduce`: an out that was a file, a link to a folder not
    made yet or /proc/x ended in a bare OSError ('[Errno 20] Not a directory: .../afile/runs-quick/...', '[Errno 17]
    File exists'), and a train RUN_DIR took the protocol's results beside its run. Each is the command's error,
    naming the argument out (the command names --out)."""
    from robust_ops.reproduce import run_protocol

    (tmp_path / "afile").write_text("x")
    (tmp_path / "lnk").symlink_to("nowhere/deeper")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    for out, said in ((tmp_path / "afile", f"--out: {tmp_path / 'afile'} exists and is not a folder"),
                      (tmp_path / "lnk", f"--out: {tmp_path / 'lnk'}: it is a link to nowhere/deeper, which does "
                                         "not exist; make that folder first"),
                      (tmp_path / "run", f"--out: {tmp_path / 'run'} holds a training run (run.json: a train --out), "
                                         "not reproduce's results; choose another --out for reproduce")):
        # its argument out, where the command says --out; train's --out stays
        python = said.split(": ", 1)[1].replace("another --out", "another out")
        with pytest.raises(ValueError, match=f"^run_protocol: out: {re.escape(python)}$"):
            run_protocol("arfl-moons", out=out, quick=True, epochs=1, seeds=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "lnk", "run"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["run.json"] and capsys.readouterr().out == ""



def test_run_protocol_refusals_name_its_arguments_and_the_command_its_flags(small_npz, tmp_path, capsys):
    """run_protocol's refusals other than its counts, lr and out spoke flags to a Python caller as a plain CLIError
    ('--paper-schedule: ...; leave --paper-schedule out', '--seeds: tiny-kfold has 2 folds, got 3', '--methods:
    ...', '--data: ...'), and the converted ones kept flags in their body ('choose another --out for reproduce');
    cli.ArgumentError failed on a message without a '--flag: ' lead (found by the cli12 helper). Each is now a
    ValueError in run_protocol's argument names; the command prints its flags."""
    from robust_ops.cli import ArgumentError, CLIError
    from robust_ops.reproduce import run_protocol

    cases = [("ima-bus", dict(paper_schedule=True), "paper_schedule: ima-bus's paper trains without a warm-up or early "
              "stopping to add (protocols with one: dpaat-bus); leave paper_schedule out", ["--paper-schedule"]),
             ("dpaat-bus", dict(paper_schedule=True, lr=0.1), "lr: paper_schedule trains at the paper's lr 0.0003; "
              "leave one of them out", ["--paper-schedule", "--lr", "0.1"]),
             ("arfl-moons", dict(methods=["nope"]), "methods: arfl-moons has no method nope; choose from ",
              ["--methods", "nope"]),
             (_tiny_protocol("kfold", [("Baseline", "standard")]), dict(data=str(small_npz), seeds=3),
              "seeds: tiny-kfold has 2 folds, got 3", None)]
    for protocol, given, said, flags in cases:
        with pytest.raises(ValueError, match=f"^run_protocol: {re.escape(said)}") as err:
            run_protocol(protocol, out=tmp_path / "r", quick=True, progress=False, **given)
        assert isinstance(err.value, CLIError) and "--" not in str(err.value), str(err.value)
        lead = said.split(": ", 1)[0]
        assert err.value.command_words.startswith(f"--{lead.replace('_', '-')}: "), err.value.command_words
        if flags:
            rc, _, out = run(["reproduce", protocol, "--quick", "--out", tmp_path / "r", *flags], capsys)
            assert rc == 2 and out.strip().startswith(f"robust-ops reproduce: error: --{lead.replace('_', '-')}: "), out
    assert str(ArgumentError("f", CLIError("tiny: RUN was trained with x=1; delete RUN or use another --out"),
                             ("out",))) == "f: tiny: RUN was trained with x=1; delete RUN or use another out"
    assert str(ArgumentError("f", CLIError("no lead --size 8"))) == "f: no lead --size 8"


@pytest.mark.parametrize("given", [dict(epochs=1.5), dict(epochs=True), dict(epochs="2"), dict(seeds=1.0),
                                   dict(batch_size=True), dict(lr=True), dict(lr="0.1")],
                         ids=["epochs_float", "epochs_bool", "epochs_str", "seeds_float", "batch_bool", "lr_bool",
                              "lr_str"])
def test_run_protocol_refuses_a_count_that_is_no_integer_before_any_run(tmp_path, capsys, given):
    """The command's counts are argparse ints; a Python caller's epochs=1.5 was refused only in the first run's fit,
    after its run.json recorded epochs 1.5 (every later run in out then refused it as damaged), epochs=True trained 1
    epoch, and epochs="2" or seeds=1.0 were bare TypeErrors (lr=True and lr="0.1" likewise). Each is one line naming
    the argument, nothing written."""
    from robust_ops.reproduce import run_protocol

    (arg, value), = given.items()
    options = dict(epochs=1, seeds=1) | given
    kind = "a number > 0" if arg == "lr" else "an integer >= 1"
    with pytest.raises(ValueError, match=f"^run_protocol: expected {arg} to be {kind} or None, got "
                                         f"{re.escape(repr(value))}$"):
        run_protocol("arfl-moons", out=tmp_path / "r", quick=True, progress=False, **options)
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""

def test_eval_cache_keeps_one_entry_per_key_and_hands_out_copies(tmp_path):
    # --reevaluate puts fresh rows under a key the cache holds: they replace the old entry (kept beside it, the next
    # run's lookup found the stale rows first); run_protocol relabels the rows it gets, which must not reach the
    # cache (its next write would store the relabelled rows)
    from robust_ops.reproduce import EvalCache

    path, key = tmp_path / "eval.json", {"model_sha256": "0" * 64, "eps": [0.1], "seed": 0}
    cache = EvalCache(path)
    cache.put(key, [{"attack": "worst-case", "accuracy": 0.5}])
    cache.put(key, [{"attack": "worst-case", "accuracy": 0.25}])
    for reader in (cache, EvalCache(path)):
        assert reader.get(key) == [{"attack": "worst-case", "accuracy": 0.25}] and len(reader.entries) == 1
    cache.get(key)[0]["attack"] = "AutoAttack-style (L2)"
    assert cache.get(key)[0]["attack"] == "worst-case"
    assert EvalCache(path, enabled=False).get(key) is None  # --reevaluate
    EvalCache(tmp_path / "rank1.json", writes=False).put(key, [])  # torchrun: rank 0 alone writes
    assert not (tmp_path / "rank1.json").exists()


def test_eval_cache_skips_malformed_entries_and_reads_a_document_of_another_shape_as_unreadable(tmp_path, capsys):
    # eval.json is a cache: an entry that is no object or lacks its key or rows, or a document (or its entries) of
    # another shape, is evaluated again (and overwritten), not a KeyError or TypeError that stops the protocol
    from robust_ops.reproduce import EvalCache

    path, key = tmp_path / "eval.json", {"model_sha256": "0" * 64, "eps": [0.1], "seed": 0}
    entries = [{"rows": []}, {"key": key}, "key rows", {"key": key, "rows": [{"accuracy": 0.5}]}]
    path.write_text(json.dumps({"entries": entries}))
    cache = EvalCache(path)
    assert cache.get(key) == [{"accuracy": 0.5}] and len(cache.entries) == 1
    cache.put({**key, "seed": 1}, [])
    assert len(json.loads(path.read_text())["entries"]) == 2
    for other_shape in ("[]", '{"entries": null}', '{"entries": 3}'):
        path.write_text(other_shape)
        cache = EvalCache(path)
        assert cache.get(key) is None and f"{path}: unreadable evaluation cache" in capsys.readouterr().out
        cache.put(key, [])
        assert json.loads(path.read_text())["entries"] == [{"key": key, "rows": []}]



def test_eval_cache_is_strict_json_with_undefined_metrics_as_null(tmp_path):
    # a run whose test fold lacks positives has sensitivity NaN: eval.json held the bare token NaN, which strict JSON
    # readers (jq, JavaScript, R's jsonlite) refuse, while results.json writes null; the means skip it either way
    from robust_ops.reproduce import EvalCache, aggregate

    path, key = tmp_path / "eval.json", {"model_sha256": "0" * 64, "eps": [0.1], "seed": 0}
    row = {"method": "M", "attack": "none", "norm": None, "eps": 0.0, "n": 4, "accuracy": 0.75,
           "sensitivity": math.nan}
    EvalCache(path).put(key, [row])

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    entry, = json.loads(path.read_text(), parse_constant=refuse)["entries"]
    assert entry["rows"][0]["sensitivity"] is None
    cached = EvalCache(path).get(key)
    mean, = aggregate(cached + [{**row, "sensitivity": 0.5}], ["accuracy", "sensitivity"])
    assert (mean["accuracy"], mean["sensitivity"], mean["sensitivity_runs"]) == (0.75, 0.5, 1)

def test_eval_key_changes_with_everything_the_rows_depend_on():
    # a cached evaluation is reused only under an equal key: the attacks' RNG seed, ensemble or per-attack rows, and
    # an eps expression's values at each radius (alpha=eps/4 and eps/2 run different attacks) must each change it
    from robust_ops.evaluate import AttackSpec
    from robust_ops.reproduce import EvalPlan, _specs, eval_key

    def key(alpha="eps/4", eps=(0.3,), ensemble=False, seed=0, positive_class=1):
        specs = _specs(EvalPlan([AttackSpec("pgd", {"norm": "l2", "alpha": alpha}, "PGD")], list(eps)), quick=False)
        return eval_key({"method": "M"}, specs, list(eps), ensemble, seed=seed, positive_class=positive_class)

    assert key() == key() and key()["attacks"] == [["pgd", "PGD", {"norm": "l2", "alpha": [0.075]}]]
    # the positive class: rows of a COVID / non-COVID folder were scored with the negation positive before 2026-12-05
    for other in (key(alpha="eps/2"), key(eps=(0.6,)), key(ensemble=True), key(seed=1), key(positive_class=0)):
        assert other != key()
    legacy = {k: v for k, v in key().items() if k != "seed"}  # rows cached before the seed was recorded
    assert legacy != key()
    # ensemble rows cached before a sample fooled at a smaller radius stayed fooled at the larger ones
    assert {k: v for k, v in key(ensemble=True).items() if k != "ensemble_radii"} != key(ensemble=True)
    # rows cached before AUC and mAP ranked log-odds (probabilities tied past a logit margin of ~37)
    assert {k: v for k, v in key().items() if k != "scores"} != key()
    # worst-case rows cached before they took the lowest-scoring input inside the ball (one attack: no such row)
    two = _specs(EvalPlan([AttackSpec("fgsm", {}, "FGSM"), AttackSpec("pgd", {}, "PGD")], [0.1]), quick=False)
    worst = eval_key({"method": "M"}, two, [0.1], False, seed=0)
    assert {k: v for k, v in worst.items() if k != "worst_case"} != worst and "worst_case" not in key()


def test_run_fingerprint_changes_with_the_method_label_and_with_dtype_and_shape():
    # the evaluation cache's key: rows hold the method label, so a relabelled method sharing a run folder ("RST-DM",
    # "rst dm") is evaluated again, not shown under the old label; the weights' and test set's digests hash dtype
    # and shape with the bytes (the same pixels in another shape, or bytes read as another dtype, are other data)
    from torch.utils.data import TensorDataset

    from robust_ops.reproduce import run_fingerprint
    from robust_ops.train import tensors_sha256 as _digest

    model, data = torch.nn.Linear(4, 2), TensorDataset(torch.rand(3, 4), torch.tensor([0, 1, 0]))
    a, b = run_fingerprint(model, data, "RST-DM"), run_fingerprint(model, data, "rst dm")
    assert a != b and {k: v for k, v in a.items() if k != "method"} == {k: v for k, v in b.items() if k != "method"}
    t = torch.arange(16, dtype=torch.float32)
    digests = {_digest([t]), _digest([t.view(4, 4)]), _digest([t.view(torch.int32)]), _digest([t[:8], t[8:]])}
    assert len(digests) == 4 and _digest([t.clone()]) == _digest([t])


def test_run_fingerprint_changes_with_the_weights_the_test_set_and_the_versions(monkeypatch):
    # a cached evaluation is reused only for the run it was made of: retrained weights, another test set, or another
    # robust_ops or torch (whose attacks and metrics may differ) must each change the key; the reuse test edited a
    # stored key's model_sha256, which a key without the weights' digest also failed to match
    from torch.utils.data import TensorDataset

    import robust_ops
    from robust_ops.reproduce import run_fingerprint

    torch.manual_seed(0)
    model, data = torch.nn.Linear(4, 2), TensorDataset(torch.rand(3, 4), torch.tensor([0, 1, 0]))
    base = run_fingerprint(model, data, "STD")
    retrained = torch.nn.Linear(4, 2)
    other_data = TensorDataset(torch.rand(3, 4), torch.tensor([0, 1, 0]))
    changed = {"model_sha256": run_fingerprint(retrained, data, "STD"),
               "test_sha256": run_fingerprint(model, other_data, "STD")}
    monkeypatch.setattr(robust_ops, "__version__", "0.0.0")
    changed["robust_ops"] = run_fingerprint(model, data, "STD")
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    changed["torch"] = run_fingerprint(model, data, "STD")
    for field, other in changed.items():
        assert {k for k in base if base[k] != other.get(k)} == {field}, field


@pytest.mark.slow
def test_reproduce_quick_mirst_bus(breastmnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROBUST_OPS_DATA", str(breastmnist.parent))
    out = tmp_path / "mirst"
    rc, _, err = run(["reproduce", "mirst-bus", "--quick", "--out", out, "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in doc["rows"]} == {"Baseline", "RST", "MIRST", "RST-DM", "MIRST-DM"}


def test_bench_list_and_unknown(capsys):
    rc, out, err = run(["bench", "--list"], capsys)
    assert rc == 0 and "pgd_step" in out
    rc, _, err = run(["bench", "--only", "nope"], capsys)
    one_line_error(rc, err, "--only:", "unknown benchmark(s) nope")
    rc, _, err = run(["bench", "--only", "pgd_step,pgd_step", "--list"], capsys)
    one_line_error(rc, err, "--only: pgd_step given more than once")
    # argparse reports a subcommand's unknown option from the top-level parser; the hint names the command's help
    rc, _, err = run(["bench", "--config", "x"], capsys)
    one_line_error(rc, err, "robust-ops bench: error: unrecognized arguments: --config x (see robust-ops bench --help)")


def test_dpaat_bus_notes_state_the_attack_settings_the_paper_leaves_open():
    """DPAAT gives no IFGSM step, no model mode for its training attacks and only "returned new x^adv with eps_DPAAT"
    for the second attack at the adaptive radii; the protocol ran eps/steps, eval mode and a 7-step PGD from x with
    step eps_i * 0.15 / 0.3 without saying so. The notes name what runs, and the IFGSM alternative parses and runs."""
    from robust_ops import defenses
    from robust_ops.evaluate import parse_attacks
    from robust_ops.reproduce import DPAAT_LINF, PROTOCOLS, _specs, describe

    p = PROTOCOLS["dpaat-bus"]
    text = describe(p)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    ifgsm = [s for plan in p.evals for s in _specs(plan, quick=False) if s.name == "ifgsm"]
    assert ifgsm and all(s.build(model, DPAAT_LINF).alpha is None for s in ifgsm)  # the ifgsm default: eps/steps
    note = next(n for n in p.notes if n.startswith("IFGSM's step"))
    assert "eps/steps, the library's default" in note
    (alternative,) = parse_attacks(re.search(r"--attacks (\S+)", note).group(1))
    built = alternative.build(model, DPAAT_LINF)
    assert built.steps == 20 and built.alpha == pytest.approx(DPAAT_LINF)
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1])
    assert (built(x, y) - x).abs().max() <= DPAAT_LINF + 1e-6
    assert "eval mode here" in text and "attack_mode='train' for the training-mode attack" in text
    assert "is 7 steps from x again with step eps_i * 0.15 / 0.3" in text
    for m in p.methods[1:]:
        d = defenses.build(m.defense, **m.options)
        assert (d.attack_mode, d.steps, d.random_start) == ("eval", 7, False), m.label
        assert d.step_size / d.eps == pytest.approx(0.15 / 0.3), m.label


def test_dpaat_bus_notes_state_how_its_pgd_evaluation_starts_and_the_alternative_runs():
    """DPAAT's eq. 9 starts PGD at x; the protocol's 20/50-PGD evaluation starts at a random point of the ball (the
    library default). The notes must say so and name the eq. 9 evaluation, whose attack spec must parse and run."""
    import re

    from robust_ops.evaluate import parse_attacks
    from robust_ops.reproduce import PROTOCOLS, _specs

    p = PROTOCOLS["dpaat-bus"]
    pgd = [s for plan in p.evals for s in _specs(plan, quick=False) if s.name == "pgd"]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    assert pgd and all(s.build(model, 0.3).random_start for s in pgd)
    note = next(n for n in p.notes if "PGD-20/50" in n)
    assert "random point of the ball" in note and "Eq. 9 starts PGD at x" in note
    (alternative,) = parse_attacks(re.search(r"--attacks (\S+)", note).group(1))
    built = alternative.build(model, 0.3)
    assert built.random_start is False and built.steps == 20 and built.alpha == pytest.approx(0.075)
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1])
    assert torch.equal(built(x, y), built(x, y))  # from x: deterministic


def test_protocols_describe_and_quick_caps():
    from robust_ops import attacks
    from robust_ops.attacks import ATTACKS
    from robust_ops.reproduce import PROTOCOLS, QUICK_STEPS, _specs, describe

    assert set(PROTOCOLS) == {"arfl-moons", "mirst-bus", "ima-bus", "dpaat-bus"}
    for p in PROTOCOLS.values():
        text = describe(p)
        assert f"`{p.name}`" in text and "Published numbers" in text and p.paper_rows
        for plan in p.evals:
            for spec in _specs(plan, quick=True):  # the cap covers an attack's own defaults (APGD's steps) too
                capped = {"steps", "trials", "n_queries"} & (set(spec.options) | set(ATTACKS[spec.name][1]))
                assert all(spec.options[key] <= QUICK_STEPS for key in capped), spec
    full = {s.label: s for plan in PROTOCOLS["mirst-bus"].evals for s in _specs(plan, quick=False)}
    assert full["PGD"].options == {"steps": 20, "alpha": 0.001} and full["CW"].options["steps"] == 10
    # IMA evaluates with AutoAttack's standard cascade (Section 3.1): the same attacks and settings AutoAttack builds
    ima = _specs(PROTOCOLS["ima-bus"].evals[0], quick=False)
    standard = attacks.AutoAttack(torch.nn.Linear(4, 2), norm="l2", eps=0.3).attacks
    assert [s.name for s in ima] == [a.name for a in standard] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for spec, built in zip(ima, standard):
        assert all(getattr(built, key) == value for key, value in spec.options.items()), spec
        ours = ATTACKS[spec.name][0](torch.nn.Linear(4, 2), eps=0.3, **spec.options)  # a key left out: its default
        for key in ("norm", "steps", "n_target_classes", "n_queries", "rescale_schedule", "seed"):
            assert getattr(ours, key, None) == getattr(built, key, None), (spec, key)
    dpaat = {s.label: s for plan in PROTOCOLS["dpaat-bus"].evals for s in _specs(plan, quick=False)}
    assert dpaat["20-PGD"].options["alpha"](0.3) == pytest.approx(0.075)  # "eps/4" resolved per radius
    # "docs/reproduce/<name>.md is generated from it": a protocol setting changed in code alone fails here
    docs = Path(cli.__file__).resolve().parents[1] / "docs" / "reproduce"
    for p in PROTOCOLS.values():
        assert (docs / f"{p.name}.md").read_text().startswith(describe(p)), f"regenerate docs/reproduce/{p.name}.md"


def test_ima_bus_notes_give_tradess_reference_start_with_its_beta():
    """ima-bus trains TRADES from a random point of the ball, and its notes gave TRADES's own-paper reading as beta = 6
    alone: the reference code's attack also starts at x + 0.001 * N(0, I) (start_noise=0.001, arfl-moons's), which
    that reading needs; the options named build a TRADES that trains so."""
    from robust_ops import defenses
    from robust_ops.reproduce import PROTOCOLS, describe

    note = next(line for line in describe(PROTOCOLS["ima-bus"]).splitlines() if line.startswith("* TRADES: beta"))
    assert 'defenses.build("trades", beta=6, start_noise=0.001)' in note, note
    assert "--defense-opt beta=6 --defense-opt start_noise=0.001" in note, note
    trades = dict(next(m.options for m in PROTOCOLS["ima-bus"].methods if m.defense == "trades"))
    built = defenses.build("trades", **trades, beta=6, start_noise=0.001).options()
    assert built["start_noise"] == 0.001 and built["random_start"] is False and built["beta"] == 6


def test_pick_methods_takes_labels_in_any_case_and_spacing():
    # --methods " mirst , Standard training": labels match whatever their case and surrounding spaces
    from robust_ops.reproduce import PROTOCOLS, pick_methods

    chosen = pick_methods(PROTOCOLS["arfl-moons"], [" mirst ", "Standard training "])
    assert [m.label for m in chosen] == ["Standard training", "MIRST"]


def test_results_source_names_every_seed_of_seed_runs_only():
    # the means over --seeds runs name each seed; k-fold runs all load seed 0's data, whose source stays as it is
    from robust_ops.data import DatasetInfo
    from robust_ops.reproduce import _sources_over

    info = DatasetInfo("d", 2, 1, 8, ("a", "b"), positive_class=1, source="d.npz (seed 2)")
    assert _sources_over(info, 3, "seeds").source == "d.npz (seeds 0, 1, 2)"
    assert _sources_over(info, 3, "kfold") is info and _sources_over(info, 1, "seeds") is info


def test_classes_missing_over_runs_are_listed_in_class_order():
    # results.json's classes_missing_from_split over every run: per part, in the dataset's class order (label 0
    # first), as each run's own record lists them
    from robust_ops.data import DatasetInfo
    from robust_ops.reproduce import _missing_over_runs

    def info(missing):
        return DatasetInfo("d", 3, 1, 8, ("normal", "benign", "aaa"), extra={"classes_missing_from_split": missing})

    merged = _missing_over_runs(info({}), [info({"val": ["aaa"]}), info({"val": ["normal"], "test": ["benign"]})])
    assert merged.extra["classes_missing_from_split"] == {"val": ["normal", "aaa"], "test": ["benign"]}
    # every part, train too; and what ``info`` itself records is replaced by the runs', not kept beside it
    merged = _missing_over_runs(info({"test": ["aaa"]}), [info({"train": ["benign"]}), info({})])
    assert merged.extra["classes_missing_from_split"] == {"train": ["benign"]}
    assert "classes_missing_from_split" not in _missing_over_runs(info({"test": ["aaa"]}), [info({})]).extra


def test_quick_caps_the_steps_a_plan_leaves_to_the_attacks_defaults():
    # every shipped plan spells out its steps, so the cap on an attack's own default (pgd's 20 steps, noise's 10
    # draws, square's 5000 queries) was not exercised: --quick of a protocol listing bare `pgd` would run all 20
    from robust_ops.evaluate import AttackSpec
    from robust_ops.reproduce import QUICK_STEPS, EvalPlan, _specs

    plan = EvalPlan([AttackSpec("pgd", {}, "PGD"), AttackSpec("noise", {}, "N"), AttackSpec("square", {}, "S")], [0.1])
    assert [s.options for s in _specs(plan, quick=True)] == [
        {"steps": QUICK_STEPS}, {"trials": QUICK_STEPS}, {"n_queries": QUICK_STEPS}]
    assert [s.options for s in _specs(plan, quick=False)] == [{}, {}, {}]


def test_quick_applies_a_plans_quick_options():
    # EvalPlan.quick_options overrides options in --quick only; ima-bus's (noise trials 5) equals the cap, so a
    # value below the cap and an option the cap does not touch pin that it is applied
    from robust_ops.evaluate import AttackSpec
    from robust_ops.reproduce import EvalPlan, _specs

    plan = EvalPlan([AttackSpec("noise", {"norm": "l2", "trials": 100}, "N")], [1.0],
                    quick_options={"noise": {"trials": 2, "seed": 7}})
    assert _specs(plan, quick=True)[0].options == {"norm": "l2", "trials": 2, "seed": 7}
    assert _specs(plan, quick=False)[0].options == {"norm": "l2", "trials": 100}


def test_mirst_bus_states_its_attack_start_points_and_the_cw_alternative_runs():
    """MIRST-DM calls its CW-Linf "similar to the PGD attack excepting the loss function"; the protocol ran PGD from a
    random start and CW from x without saying so. The choice is stated, and its alternative is an option that acts."""
    from robust_ops.attacks import build
    from robust_ops.reproduce import PROTOCOLS, describe

    text = describe(PROTOCOLS["mirst-bus"])
    assert "CW-Linf from the clean image" in text and "cw:steps=10:alpha=0.001:random_start=true" in text
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1])
    from_x = build("cw", model, eps=5 / 255, steps=1, alpha=0.001)(x, y)
    random = build("cw", model, eps=5 / 255, steps=1, alpha=0.001, random_start=True, seed=0)(x, y)
    assert (from_x - x).abs().max() <= 0.001 + 1e-6 < (random - x).abs().max()


def test_protocol_pages_state_the_settings_their_papers_leave_open():
    """DPAAT gives no values for AMAT's thresholds or for its own beta (eq. 12, "a tuneable hyper-parameter"), and
    prints an L_syn (eq. 11) that rises as the outputs agree; IMA gives SAT's and TRADES's eps_train only. The pages'
    deviations did not say what ran there; they now name the library defaults the methods run with."""
    import math

    from robust_ops import defenses
    from robust_ops.reproduce import IMA_EPS_TRAIN, PROTOCOLS, describe

    dpaat = describe(PROTOCOLS["dpaat-bus"])
    assert "AMAT's xi = ln 2 and delta_eps = eps/2" in dpaat and "DPAAT's beta = 1" in dpaat
    assert "L_syn as the Jensen-Shannon divergence" in dpaat and 'syn="printed"' in dpaat
    built = {m.label: defenses.build(m.defense, **m.options) for m in PROTOCOLS["dpaat-bus"].methods}
    assert built["AMAT"].xi == pytest.approx(math.log(2)) and built["AMAT"].delta_eps == pytest.approx(0.15)
    assert built["DPAAT"].beta == 1 and built["DPAAT"].syn == "js" and built["DPAAT"].reference == "batch"
    ima = describe(PROTOCOLS["ima-bus"])
    assert "SAT's and TRADES's attacks (the paper gives eps_train only): 10 steps of L2 PGD of 2.5*eps/10" in ima
    assert "from a random point of the ball, the model in eval mode" in ima
    for label in ("SAT", "TRADES"):
        method = next(m for m in PROTOCOLS["ima-bus"].methods if m.label == label)
        d = defenses.build(method.defense, **method.options)
        assert (d.norm, d.steps, d.random_start, d.attack_mode) == ("l2", 10, True, "eval"), label
        assert d.step_size == pytest.approx(2.5 * IMA_EPS_TRAIN / 10), label


def test_ima_bus_states_that_its_evaluation_radii_are_not_carried_to_its_image_size():
    """ima-bus carries PathMNIST's eps_train (3x28x28) to 1x28x28 by IMA's per-pixel rule but evaluates at PathMNIST's
    radii as published, twice as large beside eps_train as the paper's; its page did not say so (and dpaat-bus's said
    ima-bus rescales its radii). The deviation names the rule's equivalents of the radii the protocol evaluates."""
    import math

    from robust_ops.reproduce import IMA_EPS_TRAIN, PROTOCOLS, describe

    ima = " ".join(describe(PROTOCOLS["ima-bus"]).split())
    plans = {plan.rename or plan.attacks[0].name: plan.eps for plan in PROTOCOLS["ima-bus"].evals}
    assert plans == {"AutoAttack-style (L2)": [0.3, 0.6, 0.9], "noise": [1.0, 2.0, 3.0]}
    for radii in plans.values():
        carried = [r * math.sqrt(28 * 28 * 1 / (28 * 28 * 3)) for r in radii]
        assert " / ".join(f"{r:.3f}" for r in carried) in ima
    assert "0.3 / 0.6 / 0.9 are " + " / ".join(f"{r / IMA_EPS_TRAIN:.2f}" for r in (0.3, 0.6, 0.9)) in ima
    assert "--attacks autoattack:norm=l2 --eps 0.173,0.346,0.520" in ima
    dpaat = " ".join(describe(PROTOCOLS["dpaat-bus"]).split())
    assert "ima-bus rescales its eps_train by IMA's per-pixel rule, not its evaluation radii" in dpaat


def test_ima_bus_states_that_its_margin_pace_is_half_the_papers_and_how_to_train_at_it():
    """ima-bus trains IMA with delta = eps_train / epochs, half the paper's PathMNIST pace (0.04 for eps_train 3 in
    150 epochs reaches eps_train after 75) and below docs/ima.md's own rule for few epochs (delta >= eps_train /
    (0.5 * epochs)); its deviations called the choice ours without saying so. They now name the paper's pace and the
    train command for it, whose delta satisfies that rule with equality."""
    import shlex

    from robust_ops.reproduce import IMA_EPS_TRAIN, PROTOCOLS, describe

    protocol = PROTOCOLS["ima-bus"]
    text = " ".join(describe(protocol).split())
    assert "That is half the paper's PathMNIST pace" in text and "delta = 2 * eps_train / epochs" in text
    assert 3 / 0.04 == pytest.approx(150 / 2)  # the paper's PathMNIST pace: eps_train reached after half the epochs
    command = text[text.index("`robust-ops train --data breastmnist"):].split("`")[1]
    args = shlex.split(command)
    options = dict(args[i + 1].split("=") for i, a in enumerate(args) if a == "--defense-opt")
    epochs = int(args[args.index("--epochs") + 1])
    assert epochs == protocol.epochs and options["norm"] == "l2"
    assert float(options["eps_train"]) == pytest.approx(IMA_EPS_TRAIN, abs=1e-4)
    assert float(options["delta"]) == pytest.approx(IMA_EPS_TRAIN / (0.5 * epochs), abs=1e-4)
    assert "with few epochs pick delta >= eps_train / (0.5 * epochs)" in " ".join(
        (Path(__file__).resolve().parents[1] / "docs" / "ima.md").read_text().split())


def test_ima_bus_ensemble_of_repeat_k_draws_from_seed_k(small_npz, tmp_path, monkeypatch):
    """docs/reproduce/README.md: repeat k's random attacks (PGD's start, APGD, Square, white noise) draw from seed k,
    and config.attack_seeds lists k. ima-bus's AutoAttack cascade carried AutoAttack's own seed 0 in every repeat, and
    its white noise the noise attack's default seed 0."""
    import robust_ops.evaluate
    from robust_ops import reproduce

    seen = []

    class Enough(Exception):
        pass

    def evaluate(model, data, info, *, attacks, eps, ensemble, seed, **kwargs):
        seen.append((seed, {s.name: s.options.get("seed") for s in attacks}))
        if len(seen) == 4:  # repeat 1's white noise
            raise Enough
        return []

    monkeypatch.setattr(cli, "train_run", lambda **kwargs: (torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(28 * 28, 2)), None, None, []))
    monkeypatch.setattr(robust_ops.evaluate, "evaluate", evaluate)
    with pytest.raises(Enough):
        reproduce.run_protocol(reproduce.PROTOCOLS["ima-bus"], out=tmp_path, quick=True, data=str(small_npz), seeds=2,
                               methods=["STD"], progress=False)
    cascade = {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert seen[0] == (0, dict.fromkeys(cascade, 0)) and seen[1] == (0, {"noise": None})
    assert seen[2] == (1, dict.fromkeys(cascade, 1))
    assert seen[3] == (1, {"noise": 1})  # its own seed, 0 by default, drew repeat 0's noise in every repeat


def test_dpaat_bus_states_its_radii_are_not_rescaled_to_28x28():
    """DPAAT's L2 0.3 (training and 20/50-PGD) and Linf 1/255 are kept as numbers on 1x28x28 images, where they are
    other perturbations than on the ImageNet-sized inputs of the paper's CNNs (ima-bus rescales by IMA's rule); the
    deviations did not say so. The stated sizes are those of the protocol's radii."""
    import math

    from robust_ops.reproduce import DPAAT_LINF, PROTOCOLS, describe

    text = describe(PROTOCOLS["dpaat-bus"])
    l2 = PROTOCOLS["dpaat-bus"].evals[1].eps[0]
    assert l2 == 0.3 and all(m.options.get("eps", 0.3) == l2 for m in PROTOCOLS["dpaat-bus"].methods[1:3])
    rms = {d: l2 / math.sqrt(d) for d in (28 * 28, 3 * 224 * 224)}
    ball = {d: DPAAT_LINF * math.sqrt(d) for d in (28 * 28, 3 * 224 * 224)}
    stated = (f"L2 0.3 is a per-pixel RMS of {rms[784]:.3f} ({rms[784] * 255:.1f}/255) at 1x28x28 and "
              f"{rms[150528]:.4f} ({rms[150528] * 255:.1f}/255) at 3x224x224; the Linf 1/255 ball reaches L2 "
              f"{ball[784]:.2f} at 1x28x28 and {ball[150528]:.2f} at 3x224x224")
    assert stated in text, stated


def test_dpaat_bus_paper_schedule_adds_the_warmup_and_early_stopping_and_resume_refuses_a_switch(small_npz, tmp_path,
                                                                                                  monkeypatch):
    """DPAAT trains the fully connected layers alone for 10 epochs, then all layers with early stopping after 5
    (Section IV-A); the protocol documented both as missing. --paper-schedule runs them (before the protocol's epochs
    of all layers); without it the runs train as before, and a rerun with the other setting is refused."""
    from robust_ops import reproduce

    calls = []

    def train_run(**kwargs):  # records the run as train_run does (run.json, a checkpoint), without training
        calls.append(kwargs)
        fields = {k: kwargs[k] for k in ("data", "defense_name", "defense_options", "model_name", "epochs",
                                         "batch_size", "lr", "seed", "size", "dropmax", "label", "split",
                                         "warmup_epochs", "early_stopping")}
        out = Path(kwargs["out"])
        out.mkdir(parents=True, exist_ok=True)
        cli.write_json_atomic(out / "run.json", cli.run_record(**fields, info=kwargs["splits"].info))
        (out / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt  # one run is enough

    monkeypatch.setattr(cli, "train_run", train_run)
    dpaat = reproduce.PROTOCOLS["dpaat-bus"]
    common = dict(data=str(small_npz), methods=["STD"], progress=False)
    for quick, epochs, warmup in ((False, 30, 10), (True, 2, 1)):
        with pytest.raises(KeyboardInterrupt):
            reproduce.run_protocol(dpaat, out=tmp_path / f"paper{quick}", quick=quick, paper_schedule=True, **common)
        got = calls[-1]
        assert (got["epochs"], got["warmup_epochs"], got["early_stopping"]) == (epochs + warmup, warmup, 5)
        assert got["lr"] == 3e-4  # "a learning rate of 0.0003" (Section IV-A), not the protocol's 1e-3
    with pytest.raises(KeyboardInterrupt):
        reproduce.run_protocol(dpaat, out=tmp_path / "plain", quick=True, **common)
    assert (calls[-1]["epochs"], calls[-1]["warmup_epochs"], calls[-1]["early_stopping"]) == (2, 0, None)
    run_dir = tmp_path / "plain" / "runs-quick" / "std" / "seed0"
    with pytest.raises(cli.CLIError, match=rf"^run_protocol: paper_schedule: {re.escape(str(run_dir))} was trained "
                                           r"without paper_schedule \(lr=0\.001\), this command runs with "
                                           r"paper_schedule \(lr=0\.0003\); rerun without paper_schedule, "):
        reproduce.run_protocol(dpaat, out=tmp_path / "plain", quick=True, paper_schedule=True, **common)
    with pytest.raises(cli.CLIError, match=r"^run_protocol: paper_schedule: ima-bus's paper trains without a "
                                           r"warm-up or early stopping to add \(protocols with one: "
                                           r"dpaat-bus\); leave "):
        reproduce.run_protocol(reproduce.PROTOCOLS["ima-bus"], out=tmp_path / "ima", quick=True, paper_schedule=True,
                               **common)
    assert "--paper-schedule` adds the paper's schedule" in reproduce.describe(dpaat)
    # a --paper-schedule run made before the schedule took the paper's lr: its warm-up at the protocol's lr 1e-3 was
    # told "trained without --paper-schedule (lr=0.001) ...; rerun without --paper-schedule", whose rerun was refused
    # as "trained with --paper-schedule (warmup_epochs=1) ...; rerun with --paper-schedule"
    record = tmp_path / "paperTrue" / "runs-quick" / "std" / "seed0" / "run.json"
    cli.write_json_atomic(record, {**json.loads(record.read_text()), "lr": 1e-3})
    with pytest.raises(cli.CLIError, match=rf"^run_protocol: paper_schedule: {re.escape(str(record.parent))} was "
                                           r"trained with paper_schedule before it took the paper's lr "
                                           r"\(lr=0\.001, this command's lr=0\.0003\); no command continues it: "
                                           r"delete "):
        reproduce.run_protocol(dpaat, out=tmp_path / "paperTrue", quick=True, paper_schedule=True, **common)


def test_paper_schedule_runs_note_it_record_it_and_count_the_warmup_apart_from_epochs(small_npz, tmp_path, capsys):
    """A run with --paper-schedule trains warm-up + --epochs epochs: its report opens with the SCHEDULE line and
    results.json's config records the schedule; a rerun with more --epochs resumes it; one with fewer names the
    --epochs to rerun with, without the warm-up's epochs (it said "more than --epochs 2; rerun with --epochs 3" for
    a run of --epochs 2 and a 1-epoch warm-up, rerun with --epochs 1: --epochs 3 would train 4)."""
    from robust_ops.reproduce import run_protocol

    proto = _tiny_protocol("seeds", [("STD", "standard")])
    proto.paper_schedule = {"warmup_epochs": 1, "early_stopping": 5}
    out = tmp_path / "paper"

    def reproduce(epochs):
        run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=epochs, progress=False, paper_schedule=True)

    reproduce(1)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["paper_schedule"] == {"warmup_epochs": 1, "early_stopping": 5}
    assert ("SCHEDULE: this run trained with the paper's schedule (--paper-schedule): the classifier head alone for 1 "
            "epoch, then all layers for 1, at lr 0.001, stopping early after 5 epochs without a lower validation loss "
            "(each run's "
            "checkpoint records where it stopped).") in results["notes"], results["notes"]
    capsys.readouterr()
    reproduce(2)
    assert "[seed0] resuming after epoch 2: STD (standard, 3 epochs) ..." in capsys.readouterr().out
    run_dir = out / "runs" / "std" / "seed0"
    with pytest.raises(cli.CLIError, match=rf"^run_protocol: epochs: {re.escape(str(run_dir))} holds 3 epochs of "
                                           r"training \(1 of them paper_schedule's warm-up\), more than epochs 1 and "
                                           r"the warm-up; "
                                           r"rerun with epochs 2, or delete "):
        reproduce(1)


def test_dpaat_table_ii_map_is_clean_and_marp_is_under_20_pgd():
    # DPAAT: mAP is "a more precise expression for generalization" (clean test set), mARP the "mean average precision
    # on adversarial dataset crafted from the testing dataset"; Table II's adversarial set is 20-step PGD
    from robust_ops.reproduce import PROTOCOLS

    rows = [r for r in PROTOCOLS["dpaat-bus"].paper_rows if r["source"].startswith("Table II")]
    by = {(r["method"], r["attack"]): r for r in rows}
    assert len(rows) == len(by) == 8
    assert by[("DPAAT", "none")]["map"] == 0.8317 and by[("DPAAT", "none")]["eps"] == 0.0
    assert by[("DPAAT", "20-PGD")]["map"] == 0.8150 and by[("DPAAT", "20-PGD")]["eps"] == 0.3
    assert [by[(m, "20-PGD")]["map"] for m in ("AT", "SAT", "AMAT")] == [0.6150, 0.6717, 0.5800]
    assert [by[(m, "none")]["map"] for m in ("AT", "SAT", "AMAT")] == [0.6750, 0.7350, 0.6400]
    assert by[("DPAAT", "20-PGD")]["f1"] == 0.7160 and "f1" not in by[("DPAAT", "none")]


def test_dpaat_protocol_trains_every_method_with_the_papers_pgd_from_x():
    # DPAAT: "7-step PGD training adversary, with l2-norm, eps = 0.3, and step size of 0.15" for all models; eq. 9
    # starts PGD at x_0 = x, so AT and SAT must not take the library's random start
    from robust_ops import defenses
    from robust_ops.reproduce import PROTOCOLS

    for m in PROTOCOLS["dpaat-bus"].methods:
        if m.defense == "standard":
            continue
        d = defenses.build(m.defense, **m.options)
        assert (d.norm, d.eps, d.steps, d.step_size, d.random_start) == ("l2", 0.3, 7, 0.15, False), m.label
        if m.defense in ("sat", "dpaat"):
            assert d.alpha == 0.5


def test_bad_attack_values_fail_before_any_work(trained_run, tmp_path, capsys):
    out = tmp_path / "never"
    for flags, needle in ((["--attacks", "pgd:steps=2.5"], "expected an integer"),
                          (["--attacks", "fgsm:norm=l3"], "norm to be one of"),
                          (["--attacks", "pgd:random_start=maybe"], "expected true or false"),
                          (["--saliency", "-1"], "--saliency: expected >= 0, got -1"),
                          (["--ensemble", "--no-cascade"], "--no-cascade: --ensemble always")):
        rc, _, err = run(["eval", trained_run, "--out", out] + flags, capsys)
        one_line_error(rc, err, "robust-ops eval: error:", needle)
        rc, stdout, err = run(["demo", "--quick", "--methods", "standard", "--out", out, "--device", "cpu"] + flags,
                              capsys)
        one_line_error(rc, err, "robust-ops demo: error:", needle)
        assert "training" not in stdout
    assert not out.exists()


def test_norm_spellings_are_recorded_canonical_and_resume_as_the_same_run(small_npz, tmp_path, capsys):
    """AutoAttack's 'Linf' in a config file's defense-opt: run.json and the checkpoint record 'linf', so a resume
    spelling it 'linf' or 'LINF' on the command line is the same run; an unimplemented norm is a one-line error."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {small_npz}\nepochs: 1\nno-progress: true\ndevice: cpu\ndefense: at\n"
                   "defense-opt: [norm=Linf, steps=1]\n")
    out = tmp_path / "run"
    rc, _, err = run(["train", "--config", cfg, "--out", out], capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["defense_options"] == {"norm": "linf", "steps": 1}
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["defense_options"]["norm"] == "linf"
    again = ["train", "--data", small_npz, "--out", out, "--no-progress", "--device", "cpu", "--defense", "at",
             "--defense-opt", "steps=1", "--resume"]
    for epochs, spelt in ((2, "linf"), (3, "LINF")):
        rc, _, err = run(again + ["--epochs", epochs, "--defense-opt", f"norm={spelt}"], capsys)
        assert rc == 0, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3
    rc, _, err = run(again + ["--epochs", 3, "--defense-opt", "norm=L2"], capsys)  # another norm is another run
    one_line_error(rc, err, "--resume:", "this command has --defense-opt steps=1 --defense-opt norm=l2")
    rc, _, err = run(["train", "--data", small_npz, "--out", tmp_path / "never", "--defense", "at",
                      "--defense-opt", "norm=L1"], capsys)
    one_line_error(rc, err, "--defense-opt: at: expected norm to be one of linf, l2 (any case, e.g. 'Linf', 'L2'), "
                            "got 'L1'")
    assert not (tmp_path / "never").exists()
    rc, _, err = run(["train", "--data", small_npz, "--out", tmp_path / "unset", "--epochs", 1, "--no-progress",
                      "--device", "cpu", "--defense", "at", "--defense-opt", "steps=1"], capsys)
    assert rc == 0, err  # a norm not given is not recorded: run.json keeps the options as given
    assert json.loads((tmp_path / "unset" / "run.json").read_text())["defense_options"] == {"steps": 1}


def test_attack_norm_spellings_reach_results_canonical(trained_run, tmp_path, capsys):
    """--attacks pgd:norm=Linf (and noise:norm=L2) evaluate as linf (l2): labels and rows carry one spelling."""
    from robust_ops.evaluate import AttackSpec, parse_attacks

    spelt, canonical = (parse_attacks(text) for text in ("pgd:norm=Linf:steps=1,noise:norm=L2",
                                                         "pgd:norm=linf:steps=1,noise:norm=l2"))
    assert [(s.label, s.norm) for s in spelt] == [(s.label, s.norm) for s in canonical] == [
        ("pgd(norm=linf,steps=1)", "linf"), ("noise(norm=l2)", "l2")]
    assert AttackSpec("apgd-ce", {"norm": "L2"}).norm == "l2"  # Python API too
    out = tmp_path / "eval"
    rc, _, err = run(["eval", trained_run, "--attacks", "pgd:norm=LINF:steps=1", "--eps", "2/255", "--saliency", "0",
                      "--device", "cpu", "--out", out], capsys)
    assert rc == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["attack"], r["norm"]) for r in rows if r["attack"] != "none"] == [("pgd(norm=linf,steps=1)", "linf")]
    rc, _, err = run(["eval", trained_run, "--attacks", "fgsm:norm=L1", "--out", tmp_path / "never"], capsys)
    one_line_error(rc, err, "robust-ops eval: error:", "fgsm: expected norm to be one of linf, l2 (any case, e.g. "
                                                       "'Linf', 'L2'), got 'L1'")  # as the user spelt it


def test_out_that_is_a_file_fails_first(trained_run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for argv in (["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255"],
                 ["demo", "--quick", "--methods", "standard", "--device", "cpu"],
                 ["reproduce", "arfl-moons", "--quick", "--device", "cpu"],
                 ["train", "--epochs", "1", "--device", "cpu"]):
        rc, stdout, err = run(argv + ["--out", afile], capsys)
        one_line_error(rc, err, f"--out: {afile} exists and is not a folder")
        assert "training" not in stdout and "clean accuracy" not in stdout
        rc, stdout, err = run(argv + ["--out", afile / "sub"], capsys)  # a folder that could never be made
        one_line_error(rc, err, f"--out: {afile / 'sub'}: {afile} is a file, not a folder")
        assert "training" not in stdout and "clean accuracy" not in stdout
    assert afile.read_text() == "keep me"



def test_out_that_is_a_link_to_nowhere_fails_first(trained_run, tmp_path, capsys):
    # eval ran every attack and then stopped with "--out: link: cannot write the results (File exists)" (the staged
    # results' mkdir cannot follow a link to a folder not made yet); train stopped with "link: File exists"
    from robust_ops.evaluate import EvalError, _check_out_dir

    link = tmp_path / "link"
    link.symlink_to(tmp_path / "not-yet")
    problem = f"it is a link to {tmp_path / 'not-yet'}, which does not exist; make that folder first"
    for argv in (["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255"], ["train", "--epochs", "1"]):
        rc, stdout, err = run(argv + ["--device", "cpu", "--out", link], capsys)
        one_line_error(rc, err, f"--out: {link}: {problem}")
        assert "training" not in stdout and "clean accuracy" not in stdout
    with pytest.raises(EvalError, match=f"^write_results: out_dir={re.escape(repr(str(link)))}: it is a link to "):
        _check_out_dir(str(link))
    (tmp_path / "not-yet").mkdir()  # made: the link is an ordinary --out
    rc, _, err = run(["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--out", link],
                     capsys)
    assert rc == 0, err
    assert (tmp_path / "not-yet" / "results.json").is_file()


def test_out_that_is_a_link_loop_is_called_one(tmp_path, capsys):
    """--out out where out -> out2 -> out was refused as 'it is a link to out2, which does not exist; make that
    folder first' (out2 is there, a link), and --out out/run as 'out/run: Too many levels of symbolic links', with no
    flag named: both now say the links are a loop, in one line naming --out, before any work."""
    from robust_ops._files import out_dir_problem

    (tmp_path / "out").symlink_to("out2")
    (tmp_path / "out2").symlink_to("out")
    (tmp_path / "self").symlink_to("self")
    words = "the links lead back to themselves, not to a folder; point one of them at a folder or remove it"
    for out, problem in ((tmp_path / "out", "it is a link loop ({} -> out2 -> out)"),
                         (tmp_path / "out" / "run", "{} is a link loop ({} -> out2 -> out)")):
        rc, stdout, err = run(["train", "--epochs", "1", "--device", "cpu", "--out", out], capsys)
        link = tmp_path / "out"
        one_line_error(rc, err, f"--out: {out}: {problem.format(link, link)}: {words}")
        assert "training" not in stdout
    assert out_dir_problem(tmp_path / "self") == f"it is a link loop ({tmp_path / 'self'} -> self): {words}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2", "self"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nobody can make a folder")
def test_out_that_cannot_be_written_fails_first(trained_run, tmp_path, capsys, monkeypatch):
    # used to fail with a traceback only when the results were written: eval after every attack, bench after the
    # benchmark ran (os.access cannot tell: it says yes to root, who is refused in /proc all the same)
    for argv in (["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255"],
                 ["demo", "--quick", "--methods", "standard", "--device", "cpu"],
                 ["reproduce", "arfl-moons", "--quick", "--device", "cpu"],
                 ["train", "--epochs", "1", "--device", "cpu"]):
        for out in ("/proc/robust-ops-out", "/proc/robust-ops-out/sub", "/proc"):
            rc, stdout, err = run(argv + ["--out", out], capsys)
            one_line_error(rc, err, f"--out: {out}: cannot write in /proc (")
            assert "training" not in stdout and "clean accuracy" not in stdout
    monkeypatch.setenv("ROBUST_OPS_BENCH_DIR", "/proc/robust-ops-bench")
    rc, stdout, err = run(["bench", "--only", "pgd_step"], capsys)
    one_line_error(rc, err, "$ROBUST_OPS_BENCH_DIR: /proc/robust-ops-bench: cannot write in /proc (")
    assert "==" not in stdout
    assert not list(tmp_path.iterdir()) and not list(Path(trained_run).glob(".robust-ops-write-check-*"))
    rc, _, err = run(["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0",
                      "--out", tmp_path / "ok"], capsys)  # a writable one: the check leaves nothing behind
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"] and not list(tmp_path.glob("ok/.robust-ops*"))



def _refuse_writes_in(read_only, monkeypatch):
    """Fake a folder this process cannot write in (as root, CI's containers, permission bits refuse nothing)."""
    import errno

    from robust_ops import _files

    real = _files.check_writable

    def check_writable(folder):
        if Path(folder) == read_only:
            raise PermissionError(errno.EACCES, "Permission denied")
        real(folder)

    monkeypatch.setattr(_files, "check_writable", check_writable)


def test_train_into_its_own_folder_in_a_parent_it_cannot_write_trains(small_npz, tmp_path, capsys, monkeypatch):
    # A cluster job's folder: the user's own, in a scratch folder only the scheduler writes. train was refused
    # ("--out: .../job: cannot write in .../scratch") though it writes in RUN_DIR alone; eval, demo and reproduce
    # stage their results beside --out, so they still need the folder above. check_writable is faked for it: as
    # root (CI's containers) permission bits refuse nothing.
    scratch = tmp_path / "scratch"
    job = scratch / "job"
    job.mkdir(parents=True)
    _refuse_writes_in(scratch, monkeypatch)
    argv = ["train", "--data", small_npz, "--device", "cpu", "--no-progress"]
    rc, _, err = run(argv + ["--epochs", "1", "--out", job], capsys)
    assert rc == 0, err
    assert (job / "checkpoint.pt").is_file()
    rc, _, err = run(argv + ["--epochs", "2", "--out", job, "--resume"], capsys)
    assert rc == 0, err
    # a folder train would make there is still refused, naming the folder it cannot make it in
    rc, _, err = run(argv + ["--out", scratch / "new"], capsys)
    one_line_error(rc, err, f"--out: {scratch / 'new'}: cannot write in {scratch} (Permission denied)")
    rc, _, err = run(["eval", job, "--attacks", "fgsm", "--eps", "1/255", "--out", job], capsys)
    one_line_error(rc, err, f"--out: {job}: cannot write in {scratch} (Permission denied)")
    assert not (scratch / "new").exists()



def test_out_and_write_results_out_dir_are_checked_by_one_rule(tmp_path, monkeypatch):
    # cli.check_out and evaluate's write_results each held a copy of the --out rule; they agreed case by case, but a
    # change to one (here: check_writable refusing a folder) reached only the CLI. One function now decides for both.
    from robust_ops.cli import CLIError, check_out
    from robust_ops.evaluate import EvalError, _check_out_dir

    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("y")
    locked = tmp_path / "locked"
    locked.mkdir()
    _refuse_writes_in(locked, monkeypatch)
    monkeypatch.chdir(tmp_path)
    refused = {afile: "it exists and is not a folder", afile / "sub": f"{afile} is a file, not a folder",
               locked / "new": f"cannot write in {locked} (Permission denied)",
               locked: f"cannot write in {locked} (Permission denied)",
               tmp_path / "full": None, "new": None, "rel/new": None, "~": None}
    for out, problem in refused.items():
        for check, error in ((check_out, CLIError), (_check_out_dir, EvalError)):
            if problem is None:
                check(out)
                continue
            with pytest.raises(error) as caught:
                check(out)
            message = str(caught.value)
            assert message.endswith(problem) or message.endswith(f"{out} exists and is not a folder"), message


def test_eval_says_why_a_printed_table_shows_a_dash(trained_run, small_npz, tmp_path, capsys):
    """A test split without positives leaves sensitivity 0/0: eval's printed tables showed "–" and only report.md
    said why."""
    arrays = dict(np.load(small_npz))
    negatives = arrays["test_labels"][:, 0] == 0
    path = tmp_path / "nopositives.npz"
    np.savez(path, **{**arrays, "test_images": arrays["test_images"][negatives],
                      "test_labels": arrays["test_labels"][negatives]})
    rc, out, err = run(["eval", trained_run, "--data", path, "--attacks", "fgsm,pgd", "--eps", "1/255", "--out",
                        tmp_path / "ev", "--device", "cpu", "--no-progress"], capsys)
    assert rc == 0, err
    note = next(line for line in out.splitlines() if line.startswith("Undefined metrics"))
    # the printed tables' metrics (report.md's note names AUC too, whose table it has)
    assert note == ("Undefined metrics (–, null in results.json): Sensitivity in 4 of 4 rows. A value is undefined "
                    "when it is 0/0: sensitivity without positive-class samples, specificity without negatives, "
                    "precision without positive predictions, F1 with neither, AUC and mAP with one class in the "
                    "evaluated set.")
    rc, out, _ = run(["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "ev2",
                      "--device", "cpu", "--no-progress"], capsys)
    assert rc == 0 and "Undefined" not in out


def test_eval_of_an_empty_split_or_a_nan_checkpoint(trained_run, tmp_path, capsys):
    path = tmp_path / "noval.npz"
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 8, dtype=np.uint8).reshape(-1, 1)
    np.savez(path, train_images=rng.integers(0, 255, (16, 28, 28), dtype=np.uint8), train_labels=labels,
             val_images=np.zeros((0, 28, 28), np.uint8), val_labels=np.zeros((0, 1), np.uint8),
             test_images=rng.integers(0, 255, (16, 28, 28), dtype=np.uint8), test_labels=labels)
    rc, _, err = run(["eval", trained_run, "--data", path, "--split", "val", "--attacks", "fgsm", "--out",
                      tmp_path / "ev"], capsys)
    one_line_error(rc, err, f"--split: the val split of {path} has no samples")
    # an empty train split failed inside fit, after run.json was written, naming fit's argument: "fit: train_data is
    # empty (0 samples)"
    notrain = tmp_path / "notrain.npz"
    arrays = dict(np.load(path))
    np.savez(notrain, **{**arrays, "train_images": arrays["val_images"], "train_labels": arrays["val_labels"]})
    for command in ("train", "demo"):
        rc, _, err = run([command, "--data", notrain, "--epochs", "1", "--out", tmp_path / "run"], capsys)
        one_line_error(rc, err, f"error: --data: the train split of {notrain} holds no samples; nothing to train on")
        assert not (tmp_path / "run").exists()
    nan_run = tmp_path / "nan"
    nan_run.mkdir()
    (nan_run / "run.json").write_text((trained_run / "run.json").read_text())
    state = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    weights = state.get("model", state)
    last = [k for k in weights if k.endswith("weight")][-1]
    weights[last].fill_(float("nan"))
    torch.save(state, nan_run / "checkpoint.pt")
    rc, _, err = run(["eval", nan_run, "--attacks", "fgsm", "--eps", "1/255", "--device", "cpu"], capsys)
    one_line_error(rc, err, "error: standard: model outputs NaN/Inf for 32 of 32 samples; check the checkpoint")
    assert not (nan_run / "eval").exists()


def cmd_words(err):
    """The command's words (``--epochs: ...``, which `robust-ops reproduce` prints) of run_protocol's refusal ``err``
    (a pytest.raises' ExceptionInfo): a Python caller reads its arguments' names (cli.ArgumentError)."""
    return err.value.command_words


def _tiny_protocol(split, methods, quick=None):
    from robust_ops.evaluate import AttackSpec
    from robust_ops.reproduce import EvalPlan, Method, Protocol

    plans = [EvalPlan([AttackSpec("fgsm", {}, "FGSM")], [1 / 255])]
    return Protocol(name=f"tiny-{split}", summary="s", paper="p", data="unused", model="small_cnn",
                    methods=[Method(*m) for m in methods], evals=plans,
                    epochs=1, batch_size=32, lr=1e-3, repeats=2, split=split, quick=quick or {})


def test_reproduce_trains_a_methods_drop_max(small_npz, tmp_path, capsys):
    """A protocol method's dropmax (MIRST-DM's RST-DM: rst with the first max-pooling drop-max) reaches training and
    run.json, so eval rebuilds the model that was trained."""
    from robust_ops.nn import DropMax2d
    from robust_ops.reproduce import run_protocol

    proto = _tiny_protocol("seeds", [("RST-DM", "rst", {}, "first")])
    run_protocol(proto, out=tmp_path / "dm", data=str(small_npz), seeds=1, epochs=1, progress=False)
    run_dir = tmp_path / "dm" / "runs" / "rst-dm" / "seed0"
    assert json.loads((run_dir / "run.json").read_text())["dropmax"] == "first"
    assert sum(isinstance(m, DropMax2d) for m in cli.load_run(run_dir)[0].modules()) == 1
    # and the rerun's resume check asks for the same dropmax: it loads the run instead of refusing it
    run_protocol(proto, out=tmp_path / "dm", data=str(small_npz), seeds=1, epochs=1, progress=False)


def test_reproduce_kfold_refuses_more_seeds_than_folds(small_npz, tmp_path):
    """--seeds above a k-fold protocol's fold count is a one-line error before any training (a fold past the last
    one does not exist), not only far above it."""
    from robust_ops.reproduce import run_protocol

    proto = _tiny_protocol("kfold", [("Baseline", "standard")])
    with pytest.raises(cli.CLIError, match=r"^run_protocol: seeds: tiny-kfold has 2 folds, got 3$"):
        run_protocol(proto, out=tmp_path / "cv", data=str(small_npz), seeds=3, progress=False)
    assert not (tmp_path / "cv" / "runs").exists()


def test_reproduce_of_an_image_protocol_on_feature_vectors_names_data_not_model(tmp_path, capsys):
    # mirst-bus on two-moons said "--model: small_cnn takes images ...; use --model mlp": reproduce has no --model
    rc, stdout, err = run(["reproduce", "mirst-bus", "--quick", "--data", "moons", "--seeds", "1", "--device", "cpu",
                           "--out", tmp_path / "out"], capsys)
    one_line_error(rc, err, "robust-ops reproduce: error: --data: mirst-bus trains small_cnn, which takes images, and "
                   "two-moons (synthetic) holds feature vectors of 2 values; give mirst-bus image data (or run a "
                   "protocol for feature vectors: arfl-moons)")
    assert "training" not in stdout and not (tmp_path / "out").exists()


@pytest.mark.parametrize("quick", [False, True])
def test_eval_of_a_reproduce_fold_attacks_that_fold(small_npz, tmp_path, capsys, quick):
    """run.json records the k-fold split: `eval OUT/runs/METHOD/foldK` attacks fold K's held-out images, not the
    data's own test split (which holds images fold K trained on)."""
    from robust_ops.data import cross_validation
    from robust_ops.evaluate import dataset_tensors
    from robust_ops.reproduce import run_protocol
    from robust_ops.train import tensors_sha256

    q = {"epochs": 1, "repeats": 2, "n_train": 40, "n_test": 12, "model": "small_cnn"}
    proto = _tiny_protocol("kfold", [("Baseline", "standard")], q)
    out = tmp_path / "cv"
    run_protocol(proto, out=out, quick=quick, data=str(small_npz), seeds=2, progress=False)
    folds = cross_validation(cli.load_data(str(small_npz), seed=0), k=2, seed=0)
    for k, fold in enumerate(folds):
        if quick:
            fold = cli.subset_splits(fold, 40, 12, k)
        run_dir = out / ("runs-quick" if quick else "runs") / "baseline" / f"fold{k}"
        assert json.loads((run_dir / "run.json").read_text())["split"]["kind"] == "kfold"
        _, splits, _ = cli.load_run(run_dir)
        for got, want in ((splits.train, fold.train), (splits.test, fold.test)):
            assert all(torch.equal(a, b) for a, b in zip(got.tensors, want.tensors))
        # and the run was tested on that fold: its evaluation's key holds the test set it attacked
        key = json.loads((run_dir / "eval.json").read_text())["entries"][0]["key"]
        assert key["test_sha256"] == tensors_sha256(dataset_tensors(fold.test))
        # with the seed fold K's attacks drew from and the class its sensitivity is of (eval_key's docstring)
        assert (key["seed"], key["positive_class"]) == (k, splits.info.positive_class) != (k, None)
    with pytest.warns(UserWarning, match="synthetic labels its classes benign = 0, malignant = 1, but the run was"):
        _, other, run_doc = cli.load_run(run_dir, data="synthetic")  # other data: its own splits, not the run's folds
    assert torch.equal(other.test.tensors[0], cli.load_data("synthetic", seed=run_doc["seed"]).test.tensors[0])
    capsys.readouterr()
    rc, _, err = run(["eval", run_dir, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0"], capsys)
    assert rc == 0, err
    assert json.loads((run_dir / "eval" / "results.json").read_text())["rows"][0]["n"] == len(fold.test)
    # a fold run whose run.json predates the record cannot be rebuilt: refused, not evaluated on the wrong images
    doc = json.loads((run_dir / "run.json").read_text())
    doc_split = doc.pop("split")
    (run_dir / "run.json").write_text(json.dumps(doc))
    rc, _, err = run(["eval", run_dir, "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "e2"], capsys)
    one_line_error(rc, err, "predates the split record", "or pass --data to attack that data's own test split")
    rc, _, err = run(["eval", run_dir, "--data", small_npz, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0",
                      "--out", tmp_path / "e3"], capsys)  # the way out the error offers
    assert rc == 0, err
    assert json.loads((tmp_path / "e3" / "results.json").read_text())["rows"][0]["n"] == 32  # small_npz's test split
    # docs/cli.md: rerunning the same reproduce command records it, without retraining
    history = torch.load(run_dir / "checkpoint.pt", weights_only=True)["history"]
    run_protocol(proto, out=out, quick=quick, data=str(small_npz), seeds=2, progress=False)
    assert json.loads((run_dir / "run.json").read_text())["split"] == doc_split
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["history"] == history


def test_reproduce_resume_checks_every_run_first(small_npz, tmp_path, capsys):
    from robust_ops.cli import CLIError
    from robust_ops.reproduce import run_protocol
    from robust_ops.train import epochs_done

    proto = _tiny_protocol("seeds", [("STD", "standard"), ("IMA", "ima", {"eps_train": 0.5})])
    out = tmp_path / "ima"
    run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=1, progress=False)
    with pytest.raises(CLIError) as err:
        run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=2, progress=False)
    msg = cmd_words(err)
    assert msg.startswith("--epochs: ") and "--epochs 1" in msg and "delete" in msg and "--resume" not in msg
    assert epochs_done(out / "runs" / "std" / "seed0") == 1  # nothing trained further before the refusal
    assert json.loads((out / "runs" / "std" / "seed0" / "run.json").read_text())["epochs"] == 1
    proto.methods = proto.methods[:1]
    run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=2, progress=False)
    with pytest.raises(CLIError, match=r"^run_protocol: epochs: .* holds 2 epochs of training, more than epochs 1; "
                                       r"rerun with epochs 2"):
        run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=1, progress=False)


def test_reproduce_refuses_an_ima_run_of_other_epochs_under_paper_schedule_naming_the_epochs_typed(small_npz,
                                                                                                   tmp_path):
    """Under --paper-schedule run.json's epochs count the warm-up: an IMA run trained with --epochs 1 and a 1-epoch
    warm-up, rerun with --epochs 2, was refused with "was trained with --epochs 2 ...; rerun with --epochs 2", the
    command just refused (found by the mutation pass over reproduce). It names --epochs 1; delta follows --epochs
    without the warm-up (docs/reproduce/README.md), as run_protocol computes it."""
    from robust_ops.cli import CLIError
    from robust_ops.reproduce import _resume_error, run_protocol

    proto = _tiny_protocol("seeds", [("IMA", "ima", {"eps_train": 0.5, "steps": 1, "search_steps": 1})])
    proto.paper_schedule = {"warmup_epochs": 1, "early_stopping": 5}
    out = tmp_path / "ima"
    run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=1, progress=False, paper_schedule=True)
    run_doc = json.loads((out / "runs" / "ima" / "seed0" / "run.json").read_text())
    assert (run_doc["epochs"], run_doc["warmup_epochs"], run_doc["defense_options"]["delta"]) == (2, 1, 0.5)
    with pytest.raises(CLIError, match=r"^run_protocol: epochs: .* was trained with epochs 1, and IMA's delta = "
                                       r"eps_train / epochs follows it \(0\.5 there, 0\.25 now\); rerun with epochs 1, "
                                       r"or"):
        run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=2, progress=False, paper_schedule=True)
    # the same --epochs, another delta (the protocol's eps_train): the settings' refusal, not --epochs'
    delta = ("defense_options", {"eps_train": 0.5, "delta": 0.5}, {"eps_train": 1.0, "delta": 1.0})
    err = str(_resume_error(proto, out / "runs" / "ima" / "seed0", delta, 2, warmup=1))
    assert err.startswith("tiny-seeds: ") and "--epochs" not in err, err


def test_reproduce_refusal_of_a_run_without_run_json_names_reproduces_way_on(small_npz, tmp_path, capsys):
    """A run folder whose run.json was deleted leaves reproduce's own check nothing to compare, and fit's refusal
    reached reproduce in train's words: "--resume: ... or train afresh without --resume (another --out keeps ...)",
    a flag reproduce does not have. It names --epochs and deleting the run folder or another --out, as run.json's
    refusal does; and no status line before it says "[seed0] loading (already trained) STD", which the refusal
    contradicts (a run is said loaded once it is)."""
    from robust_ops.cli import CLIError
    from robust_ops.reproduce import run_protocol

    proto = _tiny_protocol("seeds", [("STD", "standard")])
    out = tmp_path / "r"
    run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=2, progress=False)
    run_dir = out / "runs" / "std" / "seed0"
    (run_dir / "run.json").unlink()
    capsys.readouterr()
    with pytest.raises(CLIError) as err:
        run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=1, progress=False)
    assert cmd_words(err) == (f"--epochs: {run_dir} holds 2 epochs of training, more than --epochs 1; rerun with "
                              f"--epochs 2, or delete {run_dir} or use another --out")
    assert "loading" not in capsys.readouterr().out
    assert not (run_dir / "run.json").exists()
    run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=2, progress=False)  # as it said
    assert "[seed0] loading (already trained) STD (standard, 2 epochs) ..." in capsys.readouterr().out


def test_reproduce_and_demo_check_a_run_without_run_json_before_training_any(small_npz, tmp_path, capsys):
    """A run folder whose run.json is gone was passed by the check of every run before any is trained, and refused by
    fit only when its turn came: reproduce trained seed0 first, then ended '--epochs: .../seed1 holds 2 epochs of
    training, more than --epochs 1'; demo trained Baseline before refusing AT's checkpoint. The checkpoint's own
    record (its epochs, the settings fit compares) is checked with the others now; its training-set size too, which
    reproduce left to fit (seed0 trained, then 'was trained with num_samples=64, this command has num_samples=48'),
    and its architecture: the --model whose parameters its weights are, built for the data; and, for as many training
    images, their fingerprint, which fit refused at the run's turn ('train_data is not the data it was trained on')."""
    from robust_ops.cli import CLIError
    from robust_ops.reproduce import run_protocol

    arrays = dict(np.load(small_npz))
    arrays.update(train_images=arrays["train_images"][:48], train_labels=arrays["train_labels"][:48])
    fewer = tmp_path / "smallbus_fewer.npz"
    np.savez(fewer, **arrays)
    arrays = dict(np.load(small_npz))
    arrays.update(train_images=arrays["train_images"][::-1], train_labels=arrays["train_labels"][::-1])
    others = tmp_path / "smallbus_others.npz"  # as many training images, in another order
    np.savez(others, **arrays)
    proto = _tiny_protocol("seeds", [("STD", "standard")])
    out = tmp_path / "r"
    run_protocol(proto, out=out, data=str(small_npz), seeds=2, epochs=2, progress=False)
    runs = out / "runs" / "std"
    shutil.rmtree(runs / "seed0")
    (runs / "seed1" / "run.json").unlink()
    with pytest.raises(CLIError) as err:
        run_protocol(proto, out=out, data=str(small_npz), seeds=2, epochs=1, progress=False)
    assert cmd_words(err).startswith(f"--epochs: {runs / 'seed1'} holds 2 epochs of training, more than --epochs 1")
    assert not (runs / "seed0").exists()
    with pytest.raises(CLIError) as err:  # another --data, of fewer training images
        run_protocol(proto, out=out, data=str(fewer), seeds=2, epochs=2, progress=False)
    # named as reproduce's flag: it said 'tiny-seeds: ... was trained with num_samples=64, this command has
    # num_samples=48; rerun with its settings', a setting no flag of reproduce takes
    assert cmd_words(err).startswith(f"--data: {runs / 'seed1'} was trained on 64 training images, this command's "
                                     "--data has 48 in its training split; rerun with the --data and --classes it "
                                     "was trained on")
    assert not (runs / "seed0").exists()
    with pytest.raises(CLIError) as err:  # as many training images, others: fit refused them after seed0 trained
        run_protocol(proto, out=out, data=str(others), seeds=2, epochs=2, progress=False)
    assert cmd_words(err).startswith(f"--data: {runs / 'seed1'} was trained on other training images than this "
                                     "command's (as many, but other images or labels); rerun with the --data, "
                                     "--size, --classes, --bit-depth and --channels it was trained on")
    assert not (runs / "seed0").exists()
    run_protocol(proto, out=out, data=str(small_npz), seeds=2, epochs=2, progress=False)  # the run's own settings
    demo = tmp_path / "demo"
    argv = ["demo", "--data", small_npz, "--methods", "standard,at", "--train-size", "32", "--out", demo,
            "--attacks", "fgsm", "--eps", "2/255", "--saliency", "0", "--no-progress", "--device", "cpu"]
    assert run(argv + ["--epochs", "2"], capsys)[0] == 0
    shutil.rmtree(demo / "runs" / "standard")
    (demo / "runs" / "at" / "run.json").unlink()
    for extra, words in ((["--epochs", "1"], f"--epochs: {demo / 'runs' / 'at'} holds 2 epochs of training, more "
                                             "than the 1 of this command"),
                         (["--epochs", "2", "--lr", "0.01"],
                          f"--resume: {demo / 'runs' / 'at' / 'checkpoint.pt'} was trained with --lr 0.001, this "
                          "command has --lr 0.01"),
                         # the architecture, which the checkpoint does not name: fit refused AT's weights after
                         # Baseline trained ("its weights do not fit this model"), naming no flag
                         # as many training images, others: fit refused them after Baseline trained
                         (["--epochs", "2", "--data", others],
                          f"--resume: {demo / 'runs' / 'at'} was trained on other training images than this "
                          "command's (as many, but other images or labels); rerun with the --data, --size"),
                         (["--epochs", "2", "--model", "mlp"],
                          f"--resume: {demo / 'runs' / 'at' / 'checkpoint.pt'} was trained with --model small_cnn, "
                          "this command has --model mlp")):
        rc, stdout, err = run(argv + extra + ["--resume"], capsys)
        one_line_error(rc, err, words)
        assert "training" not in stdout and not (demo / "runs" / "standard").exists()


def test_resume_checks_the_training_images_run_json_records_before_training_any(small_npz, tmp_path, capsys):
    """An .npz replaced in place by one of as many training images, others, under a run with its run.json: demo
    trained Baseline, then ended 'runs/at: training failed: fit: cannot resume ...: train_data is not the data it was
    trained on ...; pass the run's train_data (... `--data` of robust-ops train)'; reproduce trained seed0 first. The
    fingerprint run.json records is compared with the others now, as the checkpoint's is where run.json is gone."""
    from robust_ops.cli import CLIError
    from robust_ops.reproduce import run_protocol

    data = tmp_path / "bus.npz"
    shutil.copy(small_npz, data)
    arrays = dict(np.load(small_npz))
    arrays.update(train_images=arrays["train_images"][::-1], train_labels=arrays["train_labels"][::-1])
    demo = tmp_path / "demo"
    argv = ["demo", "--data", data, "--methods", "standard,at", "--train-size", "32", "--out", demo, "--attacks",
            "fgsm", "--eps", "2/255", "--saliency", "0", "--no-progress", "--device", "cpu", "--epochs", "1"]
    assert run(argv, capsys)[0] == 0
    proto = _tiny_protocol("seeds", [("STD", "standard")])
    run_protocol(proto, out=tmp_path / "r", data=str(data), seeds=2, epochs=1, progress=False)
    train = ["train", "--data", data, "--out", tmp_path / "t", "--epochs", "1", "--no-progress", "--device", "cpu"]
    assert run(train, capsys)[0] == 0
    shutil.rmtree(demo / "runs" / "standard")
    shutil.rmtree(tmp_path / "r" / "runs" / "std" / "seed0")
    np.savez(data, **arrays)  # in place: run.json's --data, --size and class counts are the same
    rc, stdout, err = run(argv + ["--resume"], capsys)
    one_line_error(rc, err, f"--resume: {demo / 'runs' / 'at'} was trained on other training images than this "
                            "command's (as many, but other images or labels); rerun with the --data, --size")
    assert "training" not in stdout and not (demo / "runs" / "standard").exists()
    seed1 = tmp_path / "r" / "runs" / "std" / "seed1"
    with pytest.raises(CLIError) as err:
        run_protocol(proto, out=tmp_path / "r", data=str(data), seeds=2, epochs=1, progress=False)
    assert cmd_words(err).startswith(f"--data: {seed1} was trained on other training images than this command's")
    assert not (seed1.parent / "seed0").exists()
    rc, _, err = run(train + ["--resume"], capsys)
    one_line_error(rc, err, f"--resume: {tmp_path / 't' / 'run.json'} was trained on other training images than "
                            "this command's")


def test_demo_and_reproduce_read_a_finished_runs_checkpoint_once_before_fit(small_npz, tmp_path, capsys, monkeypatch):
    """demo --resume and reproduce read a finished run's whole checkpoint four times (the check of every run, the
    status line, train_run's check, fit's load): 0.3 s a read for resnet18. Its epochs are read once per version of
    the file; a checkpoint rewritten since is read again."""
    import robust_ops.train as trainer
    from robust_ops.reproduce import run_protocol

    reads = []
    real = trainer.load_checkpoint

    def counted(path, *args, **kwargs):
        reads.append(Path(path))
        return real(path, *args, **kwargs)

    out = tmp_path / "demo"
    argv = ["demo", "--data", small_npz, "--methods", "standard", "--train-size", "32", "--out", out, "--attacks",
            "fgsm", "--eps", "2/255", "--saliency", "0", "--no-progress", "--device", "cpu", "--epochs"]
    assert run(argv + ["1"], capsys)[0] == 0
    monkeypatch.setattr(trainer, "load_checkpoint", counted)
    assert run(argv + ["1", "--resume"], capsys)[0] == 0
    assert reads == [out / "runs" / "standard" / "checkpoint.pt"] * 2, reads
    reads.clear()  # one epoch more: fit's load of the version read above; the file it rewrites is read anew
    assert run(argv + ["2", "--resume"], capsys)[0] == 0
    rc, stdout, _ = run(argv + ["2", "--resume"], capsys)
    assert rc == 0 and "Baseline: " in stdout and len(reads) == 3, reads
    assert cli.epochs_done(out / "runs" / "standard") == 2 == cli.checkpoint_epochs(out / "runs" / "standard")
    proto = _tiny_protocol("seeds", [("STD", "standard")])
    run_protocol(proto, out=tmp_path / "r", data=str(small_npz), seeds=1, epochs=1, progress=False)
    reads.clear()
    run_protocol(proto, out=tmp_path / "r", data=str(small_npz), seeds=1, epochs=1, progress=False)
    assert len(reads) == 2, reads


def test_demo_reads_a_checkpoint_without_run_json_once_before_fit(small_npz, tmp_path, capsys, monkeypatch):
    """demo --resume of a run whose run.json is gone read its whole checkpoint three times before fit's own read (the
    check of every run, the status line, train_run's check) and built the models it compares the weights with twice:
    one read of each version of the file, each model built once."""
    import robust_ops.models as models
    import robust_ops.train as trainer

    reads, builds = [], []
    real_load, real_build = trainer.load_checkpoint, models.build_model

    def counted(path, *args, **kwargs):
        reads.append(Path(path))
        return real_load(path, *args, **kwargs)

    def built(name, *args, **kwargs):
        builds.append(name)
        return real_build(name, *args, **kwargs)

    out = tmp_path / "demo"
    argv = ["demo", "--data", small_npz, "--methods", "standard", "--train-size", "32", "--out", out, "--attacks",
            "fgsm", "--eps", "2/255", "--saliency", "0", "--no-progress", "--device", "cpu", "--model", "mlp",
            "--epochs"]
    assert run(argv + ["1"], capsys)[0] == 0
    (out / "runs" / "standard" / "run.json").unlink()
    monkeypatch.setattr(trainer, "load_checkpoint", counted)
    monkeypatch.setattr(models, "build_model", built)
    assert run(argv + ["2", "--resume"], capsys)[0] == 0
    assert reads == [out / "runs" / "standard" / "checkpoint.pt"] * 2, reads
    # demo's own check of --model, the weights' comparison on the meta device, train_run's model, evaluate's none
    assert builds.count("mlp") <= 3, builds


def test_reproduce_fingerprints_each_splits_training_set_once_in_its_check(small_npz, tmp_path, monkeypatch):
    # the check of every run before any trains fingerprinted the training set once per method and split (0.5 s for
    # 400 RGB images of 224 pixels), though the methods of a split share it
    import robust_ops.train as trainer
    from robust_ops.reproduce import run_protocol

    proto = _tiny_protocol("seeds", [("STD", "standard"), ("AT", "at"), ("TRADES", "trades")])
    run_protocol(proto, out=tmp_path / "r", data=str(small_npz), seeds=2, epochs=1, progress=False)
    calls = []
    real = trainer.train_data_fingerprint
    monkeypatch.setattr(trainer, "train_data_fingerprint", lambda data: calls.append(len(data)) or real(data))

    class Stop(Exception):
        pass

    def stop(**kwargs):
        raise Stop

    monkeypatch.setattr(cli, "train_run", stop)
    with pytest.raises(Stop):  # stopped at the first run's training: the check alone counted
        run_protocol(proto, out=tmp_path / "r", data=str(small_npz), seeds=2, epochs=1, progress=False)
    assert len(calls) == 2, calls


def test_demo_checks_the_training_subset_of_a_run_without_run_json_first(small_npz, tmp_path, capsys):
    # a checkpoint without run.json drawn by another --train-size was refused by fit at its turn, after the methods
    # before it trained, as 'num_samples=64, this command has num_samples=48 (set by --data, --classes)'
    out = tmp_path / "demo"
    argv = ["demo", "--data", small_npz, "--methods", "standard,at", "--epochs", "1", "--out", out, "--attacks",
            "fgsm", "--eps", "2/255", "--saliency", "0", "--no-progress", "--device", "cpu", "--train-size"]
    assert run(argv + ["64"], capsys)[0] == 0
    shutil.rmtree(out / "runs" / "standard")
    (out / "runs" / "at" / "run.json").unlink()
    rc, stdout, err = run(argv + ["48", "--resume"], capsys)
    one_line_error(rc, err, f"--train-size: {out / 'runs' / 'at'} was trained on 64 training images, this command "
                            "draws 48; rerun with the --train-size / --quick it was made with, or use another --out")
    assert "training" not in stdout and not (out / "runs" / "standard").exists()


def test_demo_names_data_for_a_run_without_run_json_trained_on_another_datas_whole_split(small_npz, tmp_path, capsys):
    # --data of 48 training images under a run trained on another's 64 (no --train-size either time: each drew its
    # data's whole split) was refused as '--train-size: ... this command draws 48; rerun with the --train-size /
    # --quick it was made with', a rerun that gave the same error
    arrays = dict(np.load(small_npz))
    arrays.update(train_images=arrays["train_images"][:48], train_labels=arrays["train_labels"][:48])
    fewer = tmp_path / "smallbus_fewer.npz"
    np.savez(fewer, **arrays)
    out = tmp_path / "demo"
    argv = ["demo", "--methods", "standard,at", "--epochs", "1", "--out", out, "--attacks", "fgsm", "--eps", "2/255",
            "--saliency", "0", "--no-progress", "--device", "cpu", "--data"]
    assert run(argv + [small_npz], capsys)[0] == 0
    shutil.rmtree(out / "runs" / "standard")
    (out / "runs" / "at" / "run.json").unlink()
    rc, stdout, err = run(argv + [fewer, "--resume"], capsys)
    one_line_error(rc, err, f"--data: {out / 'runs' / 'at'} was trained on 64 training images, this command's --data "
                            "has 48 in its training split; rerun with the --data, --classes and --train-size")
    assert "training" not in stdout and not (out / "runs" / "standard").exists()


def test_resume_error_says_paper_schedule_for_either_of_its_settings_and_epochs_only_when_they_changed(tmp_path):
    """reproduce's refusal of a run that cannot continue: a changed early-stopping patience is --paper-schedule's, as a
    changed warm-up is; IMA's delta is blamed on --epochs only when the run was trained with other --epochs (a delta
    changed under the same --epochs, e.g. by the protocol's eps_train, is the generic settings refusal)."""
    from robust_ops.reproduce import _resume_error

    proto = _tiny_protocol("seeds", [("IMA", "ima")])
    run_dir = tmp_path / "runs" / "ima" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"epochs": 3}))
    err = str(_resume_error(proto, run_dir, ("early_stopping", 5, None), 3))
    assert err.startswith(f"--paper-schedule: {run_dir} was trained with --paper-schedule (early_stopping=5), this "
                          "command runs without --paper-schedule (early_stopping=None); rerun with --paper-schedule")
    delta = ("defense_options", {"eps_train": 0.5, "delta": 0.25}, {"eps_train": 1.0, "delta": 0.5})
    assert str(_resume_error(proto, run_dir, delta, 4)).startswith(f"--epochs: {run_dir} was trained with --epochs 3")
    err = str(_resume_error(proto, run_dir, delta, 3))
    assert err.startswith(f"tiny-seeds: {run_dir} was trained with defense_options=") and "--epochs" not in err, err


def test_reproduce_resume_refusal_names_every_run_to_delete(small_npz, tmp_path, capsys):
    """Following "delete OUT/runs/std/seed0" led to the same error for the next run (one per method and seed): the
    refusal names every run folder the command cannot continue, or the runs folder when none of its runs can."""
    import shutil

    from robust_ops.cli import CLIError
    from robust_ops.reproduce import run_protocol

    def protocol():
        return _tiny_protocol("seeds", [("STD", "standard"), ("AT", "at")])

    def run(out, epochs, proto=None):
        run_protocol(proto or protocol(), out=out, data=str(small_npz), seeds=2, epochs=epochs, progress=False)

    out = tmp_path / "all"
    run(out, 2)
    with pytest.raises(CLIError) as err:
        run(out, 1)
    # the error leads with the first run the command would train (seed 0's first method), as the listing does
    assert cmd_words(err).startswith(f"--epochs: {out / 'runs' / 'std' / 'seed0'} holds 2 epochs of training, ")
    assert f"or delete {out / 'runs'} (none of its 4 runs can continue) or use another --out" in cmd_words(err)
    shutil.rmtree(out / "runs")
    run(out, 1)  # as the error said
    out = tmp_path / "some"
    run(out, 2)
    shutil.rmtree(out / "runs" / "at" / "seed0")
    at_only = protocol()
    at_only.methods = at_only.methods[1:]
    run_protocol(at_only, out=out, data=str(small_npz), seeds=1, epochs=1, progress=False)  # resumable at --epochs 1
    with pytest.raises(CLIError) as err:
        run(out, 1)
    assert cmd_words(err).startswith(f"--epochs: {out / 'runs' / 'std' / 'seed0'} holds 2 epochs of training, ")
    assert (f"delete the 3 run folders in {out / 'runs'} this command cannot continue (std/seed0, std/seed1, "
            "at/seed1) or use another --out") in cmd_words(err)
    for name in ("std/seed0", "std/seed1", "at/seed1"):
        shutil.rmtree(out / "runs" / name)
    run(out, 1)


def test_reproduce_results_record_classes_missing_from_any_run(tmp_path, capsys):
    """results.json's dataset recorded the last run's classes_missing_from_split, though its means are over every
    run: here seed 0's split misses normal from val, seeds 1 and 2's from test."""
    from robust_ops.reproduce import run_protocol

    d = _folder(tmp_path / "d", n=15, classes=("benign", "malignant"))
    _folder(tmp_path / "d", n=4, classes=("normal",))  # 3 until the split kept the other classes stratified
    proto = _tiny_protocol("seeds", [("STD", "standard")])
    proto.model, proto.repeats = "mlp", 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each split's warning about the rare class
        run_protocol(proto, out=tmp_path / "r", data=str(d), size=8, progress=False)
    runs = [json.loads((tmp_path / "r" / "runs" / "std" / f"seed{k}" / "run.json").read_text()) for k in range(3)]
    assert [r["dataset"]["classes_missing_from_split"] for r in runs] == [{"val": ["normal"]}] + [
        {"test": ["normal"]}] * 2
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert doc["dataset"]["classes_missing_from_split"] == {"val": ["normal"], "test": ["normal"]}
    # report.md named it beside the tables, but the line printed above them did not, as eval's does
    assert "; absent from the test split: normal" in (tmp_path / "r" / "report.md").read_text()
    assert "mean per-class recall; absent from the test split: normal\n" in capsys.readouterr().out


def test_reproduce_over_seeds_names_every_seed(tmp_path, capsys, monkeypatch):
    from robust_ops import evaluate
    from robust_ops.reproduce import run_protocol

    q = {"epochs": 1, "repeats": 2, "n_train": 200, "n_test": 100, "model": "mlp"}
    proto = _tiny_protocol("seeds", [("STD", "standard")], q)
    proto.model, proto.epochs = "mlp", 3  # --quick trains the quick settings' 1 epoch
    out = tmp_path / "moons"
    attacked, real = [], evaluate.evaluate
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: attacked.append(k["seed"]) or real(*a, **k))
    run_protocol(proto, out=out, quick=True, data="moons", progress=False)
    assert attacked == [0, 1]  # repeat k's random attacks draw from seed k, as config.attack_seeds says
    doc = json.loads((out / "results.json").read_text())
    assert "seeds 0, 1" in doc["dataset"]["source"] and "seed 1" not in doc["dataset"]["source"]
    assert doc["rows"][0]["n"] == 200 and doc["rows"][0]["n_max"] == 100
    assert doc["config"]["attack_seeds"] == [0, 1]  # repeat k's random attacks draw from seed k, not all from 0
    # per_run_rows keep each run's repeat k apart (config.attack_seeds is indexed by it)
    assert [(r["attack"], r["repeat"]) for r in doc["per_run_rows"]] == [("none", 0), ("FGSM", 0), ("none", 1),
                                                                          ("FGSM", 1)]
    _, splits, run_doc = cli.load_run(out / "runs-quick" / "std" / "seed1")  # the quick subset is rebuilt too
    assert run_doc["seed"] == 1  # the seed fixes the initial weights and batches too, not only the data split
    assert run_doc["epochs"] == 1
    want = cli.subset_splits(cli.load_data("moons", seed=1), 200, 100, 1)
    assert torch.equal(splits.test.tensors[0], want.test.tensors[0])


def test_aggregate_mean_and_sample_std():
    """results.json's mean rows: mean and sample std (ddof=1) over the runs; no std from a single run."""
    from robust_ops.reproduce import aggregate

    base = dict(method="M", attack="none", norm=None, eps=0.0, n=10)
    (row,) = aggregate([dict(base, accuracy=0.5), dict(base, accuracy=0.7)], ["accuracy"])
    assert row["accuracy"] == pytest.approx(0.6) and row["accuracy_std"] == pytest.approx(0.02 ** 0.5)
    assert aggregate([dict(base, accuracy=0.5)], ["accuracy"])[0]["accuracy_std"] is None


def test_aggregate_keeps_rows_that_differ_only_in_their_norm_apart():
    # a method attacked in Linf and in L2 at one radius under one label (the worst case of each plan): one mean
    # over both would mix two threat models, and results.json would lose a row
    from robust_ops.reproduce import aggregate

    base = dict(method="M", attack="worst-case", eps=0.3, n=10)
    rows = aggregate([dict(base, norm="linf", accuracy=0.2), dict(base, norm="l2", accuracy=0.6)], ["accuracy"])
    assert [(r["norm"], r["accuracy"], r["repeats"]) for r in rows] == [("linf", 0.2, 1), ("l2", 0.6, 1)]


def test_aggregate_means_three_runs_and_leaves_out_a_run_without_the_metric():
    # two runs' median is their mean, so the mean of three skewed runs pins it; a row lacking a metric (none
    # measured) is left out as an undefined one is, not counted as 0
    from robust_ops.reproduce import aggregate

    base = dict(method="M", attack="none", norm=None, eps=0.0, n=10)
    runs = [dict(base, accuracy=0.1, f1=0.5), dict(base, accuracy=0.2, f1=0.7), dict(base, accuracy=0.9)]
    (row,) = aggregate(runs, ["accuracy", "f1"])
    assert row["accuracy"] == pytest.approx(0.4)
    assert row["accuracy_std"] == pytest.approx(np.std([0.1, 0.2, 0.9], ddof=1))
    assert (row["f1"], row["f1_runs"], row["repeats"]) == (pytest.approx(0.6), 2, 3)


def test_split_record_keeps_the_classes_in_label_order_and_draws_each_repeats_subset_with_its_seed():
    # eval rebuilds a run's data from this record: --classes malignant,benign sorted would swap the labels
    from robust_ops.reproduce import IMA_BUS, MIRST_BUS, split_record

    record = split_record(MIRST_BUS, 3, (96, 48), size=28, bit_depth=12, channels=1, classes=("malignant", "benign"))
    want = {"kind": "kfold", "k": 5, "fold": 3, "cv_seed": 0, "data_seed": 0, "size": 28, "bit_depth": 12,
            "channels": 1, "classes": ["malignant", "benign"], "subset": {"n_train": 96, "n_test": 48, "seed": 3}}
    assert record == want
    assert split_record(IMA_BUS, 2) == {"kind": "seeds", "data_seed": 2}


@pytest.mark.filterwarnings("ignore:.*default step alpha=:UserWarning")  # pgd:steps=1 on purpose
def test_reproduce_rows_per_run_and_cached_per_plan(small_npz, tmp_path, capsys):
    """Several evaluation plans: one clean row per run, renamed worst-case rows, rows keyed by repeat; plans that
    differ only in their radii are cached apart."""
    from robust_ops.evaluate import AttackSpec
    from robust_ops.reproduce import EvalPlan, rebuild_splits, run_fingerprint, run_protocol

    proto = _tiny_protocol("seeds", [("STD", "standard")])
    attacks = [AttackSpec("fgsm", {}, "FGSM"), AttackSpec("pgd", {"steps": 1}, "PGD")]
    proto.evals = [EvalPlan(attacks, [1 / 255], ensemble=True, rename="Worst (Linf)"),
                   EvalPlan(attacks, [2 / 255], ensemble=True)]
    out = tmp_path / "plans"
    run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=1, progress=False)
    doc = json.loads((out / "results.json").read_text())
    per_run = [(r["attack"], r["eps"], r["repeat"]) for r in doc["per_run_rows"]]
    assert per_run == [("none", 0.0, 0), ("Worst (Linf)", 1 / 255, 0), ("worst-case", 2 / 255, 0)]
    assert [r["repeats"] for r in doc["rows"]] == [1, 1, 1] and doc["config"]["repeats"] == 1
    assert (out / "saliency_std.png").is_file()  # image data: each method's maps of a few test images
    assert doc["config"]["attack_seeds"] == [0]  # repeat k's PGD / Square draws: seeded with k, as eval records it
    # the protocol's notes describe its 2 runs; the report said nothing of --seeds 1
    assert ("RUNS: this run covers 1 of the protocol's 2 seeds (--seeds); the means in this report are over those "
            "(one run: no std).") in (out / "report.md").read_text()
    model, splits, _ = cli.load_run(out / "runs" / "std" / "seed0")
    same, other = (run_fingerprint(model, ds, "STD") for ds in (splits.test, splits.val))
    assert same["test_sha256"] != other["test_sha256"]  # another test set is evaluated again
    with pytest.raises(cli.CLIError, match="run.json: unknown split record .*; expected kind 'kfold' or 'seeds'"):
        rebuild_splits(str(small_npz), {"kind": "bootstrap"})



def test_reproduce_says_how_long_it_took_with_its_files_written(small_npz, tmp_path, capsys, monkeypatch):
    # "wrote results.json, report.md and 9 figures (16 s)" of a 75 s run: the time was taken before the figures
    import time

    from robust_ops.reproduce import run_protocol

    write = cli.write_results_to_out  # run_protocol imports it from the CLI as it runs

    def slow_write(*args, **kwargs):
        time.sleep(3)
        return write(*args, **kwargs)

    monkeypatch.setattr(cli, "write_results_to_out", slow_write)
    out = tmp_path / "timed"
    run_protocol(_tiny_protocol("seeds", [("STD", "standard")]), out=out, data=str(small_npz), seeds=1, epochs=1,
                 progress=False)
    said = re.search(r"wrote .* figures? \((\d+) s\)", capsys.readouterr().out)
    # results.json's seconds are training and evaluation, taken before its files are written; the line's all of it
    before_writing = json.loads((out / "results.json").read_text())["config"]["seconds"]
    assert said and int(said.group(1)) >= before_writing + 2.5, (said, before_writing)


def test_reproduce_runs_note_for_more_seeds_than_the_protocols(small_npz, tmp_path):
    """--seeds above the protocol's count (a one-seed protocol run over 2 seeds): the RUNS note said 'this run covers
    2 of the protocol's 1 seeds', a count that does not add up."""
    from robust_ops.reproduce import run_protocol

    proto = _tiny_protocol("seeds", [("STD", "standard")])
    proto.repeats = 1
    run_protocol(proto, out=tmp_path / "more", data=str(small_npz), seeds=2, epochs=1, progress=False)
    assert ("RUNS: this run covers 2 seeds, the protocol 1 (--seeds); the means in this report are over those.\n"
            in (tmp_path / "more" / "report.md").read_text())


def test_reproduce_notes_open_with_the_departures_in_the_documented_order(small_npz, tmp_path):
    """docs/reproduce/README.md said the notes "start with" a DATA: line for its own-data command, which runs under
    --quick (whose QUICK MODE: line comes first), and with a METHODS: line too: each departure's line was said to
    come first. The page now gives their order; the notes follow it."""
    from robust_ops.reproduce import run_protocol

    page = (Path(__file__).resolve().parents[1] / "docs/reproduce/README.md").read_text()
    order = re.findall(r"`([A-Z ]+):`", page[page.index("The notes open with these lines"):].split(";")[0])
    assert order == ["QUICK MODE", "METHODS", "SCHEDULE", "RUNS", "EPOCHS", "OPTIMISER", "DATA"], order
    quick = {"epochs": 1, "repeats": 1, "n_train": 40, "n_test": 12, "model": "small_cnn"}
    proto = _tiny_protocol("seeds", [("STD", "standard"), ("AT", "at")], quick)  # 2 repeats, 1 epoch, data "unused"
    for out, kwargs in (("full", dict(seeds=1, epochs=2, lr=2e-3)), ("quick", dict(quick=True))):
        run_protocol(proto, out=tmp_path / out, data=str(small_npz), methods=["STD"], progress=False, **kwargs)
        notes = json.loads((tmp_path / out / "results.json").read_text())["notes"]
        opening = [n.split(":")[0] for n in notes if re.match(r"[A-Z ]+:", n)]
        full = ["METHODS", "RUNS", "EPOCHS", "OPTIMISER", "DATA"]
        expected = full if out == "full" else ["QUICK MODE", "METHODS", "DATA"]
        assert opening == expected == [name for name in order if name in expected]
        assert [n.split(":")[0] for n in notes[:len(expected)]] == expected  # before the protocol's own notes


def test_reproduce_epochs_note_when_epochs_override_the_protocols(small_npz, tmp_path):
    """--epochs other than the protocol's: its notes kept describing its own training length (arfl-moons: "we train 40
    epochs" over a --epochs 1 run) with no word of the override, as --seeds, --methods and --data each get."""
    from robust_ops.reproduce import run_protocol

    proto = _tiny_protocol("seeds", [("STD", "standard")])
    proto.epochs, proto.repeats = 3, 1
    run_protocol(proto, out=tmp_path / "fewer", data=str(small_npz), epochs=1, progress=False)
    note = ("EPOCHS: this run trained 1 epoch per method (--epochs), the protocol 3; what the notes below say of its "
            "training length does not describe it.")
    assert f"- {note}\n" in (tmp_path / "fewer" / "report.md").read_text()
    assert json.loads((tmp_path / "fewer" / "results.json").read_text())["notes"][0] == note
    run_protocol(proto, out=tmp_path / "own", data=str(small_npz), epochs=3, progress=False)  # the protocol's own
    assert "EPOCHS:" not in (tmp_path / "own" / "report.md").read_text()


def test_reproduce_lr_and_batch_size_train_record_note_and_are_compared_on_rerun(small_npz, tmp_path, capsys,
                                                                                 monkeypatch):
    """MIRST-DM's paper trains at Adam lr 1e-4, batch 8 (docs/reproduce/mirst-bus.md), and reproduce had neither
    --lr nor --batch-size to set them (`unrecognized arguments: --lr 0.0001`). Both now reach each run's training
    and run.json, results.json's config and an OPTIMISER: note, are checked as train checks them, in its words, and a
    rerun with others is refused naming the flag (the run's settings, before any is trained)."""
    from robust_ops import reproduce

    proto = _tiny_protocol("seeds", [("STD", "standard")])
    monkeypatch.setitem(reproduce.PROTOCOLS, proto.name, proto)
    out = tmp_path / "o"
    argv = ["reproduce", proto.name, "--data", small_npz, "--seeds", "1", "--out", out, "--no-progress", "--device",
            "cpu"]
    rc, _, err = run(argv + ["--lr", "2e-4", "--batch-size", "16"], capsys)
    assert rc == 0, err
    run_dir = out / "runs" / "std" / "seed0"
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["lr"], record["batch_size"]) == (2e-4, 16)
    results = json.loads((out / "results.json").read_text())
    assert (results["config"]["lr"], results["config"]["batch_size"]) == (2e-4, 16)
    assert results["notes"][1] == ("OPTIMISER: this run trained at lr 0.0002, batch 16 (--lr, --batch-size), the "
                                   "protocol at lr 0.001, batch 32; what the notes below say of them does not "
                                   "describe it.")
    way = f"or delete {run_dir} or use another --out"
    for given, message in (
            (["--batch-size", "16"], f"--lr: {run_dir} was trained with --lr 0.0002, this command has --lr 0.001; "
                                     f"rerun with the --lr it was trained with, {way}"),
            (["--lr", "0.0002"], f"--batch-size: {run_dir} was trained with --batch-size 16, this command has "
                                 f"--batch-size 32; rerun with the --batch-size it was trained with, {way}")):
        rc, _, err = run(argv + given, capsys)
        assert one_line_error(rc, err) == f"robust-ops reproduce: error: {message}"
    rc, said, err = run(argv + ["--lr", "0.0002", "--batch-size", "16"], capsys)
    assert rc == 0 and "loading (already trained) STD" in said, err
    for flags in (["--lr", "0"], ["--lr", "nan"], ["--batch-size", "0"], ["--batch-size", str(2**63)]):
        rc, _, train_err = run(["train", "--data", small_npz, "--out", tmp_path / "t", *flags], capsys)
        rc2, _, err = run(argv + flags, capsys)
        assert one_line_error(rc2, err).split("error: ")[1] == one_line_error(rc, train_err).split("error: ")[1]
    rc, _, err = run(["reproduce", "dpaat-bus", "--paper-schedule", "--lr", "1e-4", "--out", tmp_path / "d"], capsys)
    one_line_error(rc, err, "--lr: --paper-schedule trains at the paper's lr 0.0003; leave one of them out")
    assert not (tmp_path / "d").exists()


def test_reproduce_lr_change_between_runs_without_the_paper_schedule_is_blamed_on_lr(tmp_path):
    """dpaat-bus's paper schedule trains at lr 3e-4; a run trained without it at --lr 0.0003, rerun without --lr, was
    told it was `trained with --paper-schedule (lr=0.0003)`, a flag it never had."""
    from robust_ops.reproduce import _resume_error

    proto = _tiny_protocol("seeds", [("STD", "standard")])
    proto.paper_schedule = {"warmup_epochs": 1, "early_stopping": 5, "lr": 3e-4}
    run_dir = tmp_path / "runs" / "std" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"epochs": 1, "warmup_epochs": 0}))
    assert str(_resume_error(proto, run_dir, ("lr", 3e-4, 1e-3), 1)).startswith(
        f"--lr: {run_dir} was trained with --lr 0.0003, this command has --lr 0.001; rerun with the --lr it was")
    assert str(_resume_error(proto, run_dir, ("lr", 1e-3, 3e-4), 2, warmup=1)).startswith(
        f"--paper-schedule: {run_dir} was trained without --paper-schedule (lr=0.001), this command runs with")


def test_fresh_train_replaces_the_old_checkpoint(small_npz, tmp_path, capsys, monkeypatch):
    """A fresh run into an old RUN_DIR, interrupted before its first epoch, must not leave the old run's checkpoint
    under its own run.json: --resume would continue the old weights as the new run."""
    from robust_ops import train

    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu",
            "--defense", "at", "--defense-opt", "steps=1"]
    assert run(argv, capsys)[0] == 0
    monkeypatch.setattr(train, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, _, err = run(argv + ["--defense-opt", "eps=8/255"], capsys)
    assert rc == 130 and "no epoch finished yet" in err, err
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    assert json.loads((out / "run.json").read_text())["defense_options"]["eps"] == 8 / 255


def test_fresh_train_warns_that_the_old_eval_results_are_stale(small_npz, tmp_path, capsys):
    """RUN_DIR/eval (eval's default --out) of the run a fresh train replaces is kept, with a warning: its numbers
    describe the old weights."""
    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu"]
    assert run(argv, capsys)[0] == 0
    assert "holds results" not in run(argv, capsys)[2]  # no eval yet: nothing to say
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "2/255", "--saliency", "0", "--device", "cpu"], capsys)
    assert rc == 0, err
    rc, _, err = run(argv, capsys)
    assert rc == 0 and f"warning: {out / 'eval'} holds results of the run this one replaces; rerun" in err, err
    assert (out / "eval" / "results.json").is_file()


def test_fresh_train_warns_that_results_of_an_eval_into_the_run_folder_are_stale(small_npz, tmp_path, capsys):
    """eval RUN --out RUN (a run's folder holding an eval's results, which train keeps) then a fresh train into RUN:
    RUN/eval was warned of, RUN/results.json, report.md and figures (the old weights' numbers) kept without a word."""
    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu"]
    assert run(argv, capsys)[0] == 0
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "2/255", "--saliency", "0", "--device", "cpu",
                      "--out", out], capsys)
    assert rc == 0, err
    rc, _, err = run(argv + ["--epochs", "2", "--resume"], capsys)  # the same run, continued: nothing to say
    assert rc == 0 and "holds results" not in err, err
    rc, _, err = run(argv, capsys)
    assert rc == 0 and f"warning: {out / 'results.json'} holds results of the run this one replaces; rerun " \
        f"`robust-ops eval {out} --out {out}` once training ends" in err, err
    assert (out / "results.json").is_file()


def test_defense_options_training_would_refuse_are_refused_before_run_json(small_npz, tmp_path, capsys):
    """--defense-opt eps=8 (meant as 8/255) on [0, 1] images, or an IMA num_samples other than the training set's:
    refused naming the option before anything is written, not as a 'training failed' after run.json was written."""
    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu"]
    for defense, option, needle in (("at", "eps=8", "at: expected eps <= clip_max - clip_min = 1"),
                                    ("trades", "eps=8", "trades: expected eps <= clip_max"),
                                    ("at", "step_size=3", "at: expected step_size <= clip_max")):
        rc, _, err = run(argv + ["--defense", defense, "--defense-opt", option], capsys)
        one_line_error(rc, err, "--defense-opt:", needle, "0-255 units")
        assert not out.exists()
    rc, _, err = run(argv + ["--defense", "ima", "--defense-opt", "num_samples=5"], capsys)  # set automatically
    one_line_error(rc, err, "--defense-opt: num_samples=5, but the training set has 64 samples; leave")
    assert not out.exists()
    rc, _, err = run(argv + ["--defense", "at", "--defense-opt", "norm=l2", "--defense-opt", "eps=3",
                             "--defense-opt", "steps=1"], capsys)
    assert rc == 0, err  # an L2 radius may exceed the value range
    shutil.rmtree(out)
    # a clip range leaving out training inputs: the attack refused them at the first batch, after run.json
    for options, needle in ((["clip_min=0.5"], "clip_min=0.5 of at leaves out training inputs, which lie in [0"),
                            (["clip_min=0", "clip_max=0.9"], "clip_max=0.9 of at leaves out training inputs")):
        rc, _, err = run(argv + ["--defense", "at"] + [a for o in options for a in ("--defense-opt", o)], capsys)
        one_line_error(rc, err, f"--defense-opt: {needle}", "leave clip_min and clip_max out")
        assert not out.exists()
    rc, _, err = run(argv + ["--defense", "at", "--defense-opt", "clip_min=-1", "--defense-opt", "clip_max=2"], capsys)
    assert rc == 0, err  # a clip range wider than the inputs' is the user's


def test_sigterm_stops_train_like_ctrl_c_and_resume_continues(small_npz, tmp_path, capsys, monkeypatch):
    """SIGTERM (kill, a batch scheduler's stop) ended a command with status 143 and no word; now it says, as Ctrl-C
    does, which epoch the checkpoint holds and how to continue. The handler is the caller's again afterwards."""
    import os
    import signal

    from robust_ops import train

    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--epochs", "2", "--out", out, "--no-progress", "--device", "cpu"]
    fit = train.fit

    def one_epoch_then_sigterm(*args, **kwargs):
        fit(*args, **{**kwargs, "epochs": 1})
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(train, "fit", one_epoch_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    rc, _, err = run(argv, capsys)
    assert rc == 143, err
    assert err.strip() == (f"robust-ops train: interrupted; {out / 'checkpoint.pt'} holds the last finished epoch; "
                           "continue with the same command and --resume")
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(train, "fit", fit)
    rc, _, err = run(argv + ["--resume"], capsys)
    assert rc == 0, err
    assert len(json.loads((out / "metrics.json").read_text())) == 2


@pytest.mark.parametrize("first,status,absorbed,torchrun", [
    ("SIGINT", 130, ["SIGTERM"], False), ("SIGTERM", 143, ["SIGTERM"], False),
    ("SIGINT", 130, ["SIGINT", "SIGTERM"], True)])
def test_a_signal_while_train_stops_on_an_interrupt_raises_nothing_and_a_further_ctrl_c_still_does(
        small_npz, tmp_path, capsys, monkeypatch, first, status, absorbed, torchrun):
    """A terminal's Ctrl-C under torchrun reaches torchrun and its workers at once; torchrun then forwards the signal
    it got to the workers already stopping, which raised a second KeyboardInterrupt, met in a garbage-collector
    callback: an `Exception ignored ... KeyboardInterrupt` traceback after the interrupt line (found by the
    distributed walk). After the first interrupt a SIGTERM raises nothing, nor, under torchrun, the next Ctrl-C (its
    forward), and the status is the first one's; a further Ctrl-C still raises (a forced stop); the run resumes."""
    import os
    import signal

    from robust_ops import train

    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--epochs", "2", "--out", out, "--no-progress", "--device", "cpu"]
    fit = train.fit
    seen = []

    def one_epoch_then_interrupts(*args, **kwargs):
        fit(*args, **{**kwargs, "epochs": 1})
        try:
            os.kill(os.getpid(), getattr(signal, first))
        finally:  # the first interrupt is on its way out, as a process stopping
            for name in absorbed:
                os.kill(os.getpid(), getattr(signal, name))
                seen.append(f"{name} passed")
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
            seen.append("a further ctrl-c raised")
        raise AssertionError(f"{first} did not stop the command")

    monkeypatch.setattr(train, "fit", one_epoch_then_interrupts)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    rc, _, err = run(argv, capsys)
    assert seen == [f"{name} passed" for name in absorbed] + ["a further ctrl-c raised"]
    assert rc == status, err
    assert err.strip() == (f"robust-ops train: interrupted; {out / 'checkpoint.pt'} holds the last finished epoch; "
                           "continue with the same command and --resume")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    monkeypatch.setattr(train, "fit", fit)
    rc, _, err = run(argv + ["--resume"], capsys)
    assert rc == 0, err
    assert len(json.loads((out / "metrics.json").read_text())) == 2


def test_a_ctrl_c_after_the_command_returned_keeps_its_status_and_prints_no_traceback(small_npz, tmp_path, capsys,
                                                                                     monkeypatch):
    """A Ctrl-C once the command had returned -- its files written, its summary printed -- but before main returned:
    as _main's warning context closed it ended 'robust-ops train: interrupted', status 130, for a finished run (a
    script read it as failed); once _main had returned, as main's signal context closed, main raised the
    KeyboardInterrupt (a traceback). The command's status now stands, as it does after main (finished)."""
    import contextlib
    import types
    import warnings

    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--model", "mlp", "--epochs", "1", "--no-progress", "--device", "cpu",
            "--out", out]

    class InterruptedOnExit:  # warnings.catch_warnings, with a Ctrl-C as it closes after the command returned
        def __init__(self):
            self.inner = warnings.catch_warnings()

        def __enter__(self):
            return self.inner.__enter__()

        def __exit__(self, *exc):
            self.inner.__exit__(*exc)
            if exc[0] is None:
                raise KeyboardInterrupt

    class Warnings(types.SimpleNamespace):  # cli's warnings module, but for its catch_warnings
        def __getattr__(self, name):
            return getattr(warnings, name)

    monkeypatch.setattr(cli, "warnings", Warnings(catch_warnings=InterruptedOnExit))
    rc, said, err = run(argv, capsys)
    assert (rc, err) == (0, "") and "trained standard" in said
    assert json.loads((out / "run.json").read_text())["epochs"] == 1 and (out / "checkpoint.pt").is_file()
    monkeypatch.setattr(cli, "warnings", warnings)
    real = cli._sigterm_as_interrupt

    @contextlib.contextmanager
    def interrupted_as_it_closes(state=None):  # a Ctrl-C as main's signal context closes, after _main returned
        with real(state) as state:
            yield state
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_sigterm_as_interrupt", interrupted_as_it_closes)
    try:
        rc = cli.main([str(a) for a in argv + ["--epochs", "2", "--resume"]])
    except KeyboardInterrupt:
        rc = "raised"
    said, err = capsys.readouterr()
    assert (rc, err) == (0, "") and "trained standard" in said


def test_a_ctrl_c_as_main_opens_its_signal_context_is_an_interrupt(capsys, monkeypatch):
    """A Ctrl-C as main entered its signal context (before the command started) ended in `UnboundLocalError: cannot
    access local variable 'sigterm'`, a traceback, instead of the interrupt's one line and status 130."""
    import contextlib

    @contextlib.contextmanager
    def interrupted_as_it_opens(state=None):
        raise KeyboardInterrupt
        yield  # noqa: unreachable; makes this a generator

    monkeypatch.setattr(cli, "_sigterm_as_interrupt", interrupted_as_it_opens)
    rc, said, err = run(["bench", "--list"], capsys)
    assert (rc, said, err.strip()) == (130, "", "robust-ops: interrupted")


def test_a_sigterm_as_main_opens_its_signal_context_exits_143(capsys, monkeypatch):
    """A SIGTERM that arrived once the context's SIGTERM handler was set, before its ``with`` had bound what it yields,
    ended as a Ctrl-C (the handler marked the context's own state, not main's): status 130, not 143, and the handler
    stayed installed after main returned. Now 143, and the caller's handlers are back."""
    import os
    import signal
    import types

    def set_handler(signum, handler):  # the context sets its SIGTERM handler, then one arrives
        previous = signal.signal(signum, handler)
        if signum == signal.SIGTERM and handler is not before[0]:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs (and raises) before the call returns
        return previous

    class Signal(types.SimpleNamespace):  # cli's signal module, but for its signal
        def __getattr__(self, name):
            return getattr(signal, name)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "signal", Signal(signal=set_handler))
    rc, said, err = run(["bench", "--list"], capsys)
    assert (rc, said, err.strip()) == (143, "", "robust-ops: interrupted")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize("signum,status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_an_interrupt_inside_a_lazy_import_stops_train_with_its_one_line(small_npz, tmp_path, capsys, monkeypatch,
                                                                         signum, status):
    """train imports torchvision (and with it torch._dynamo) when it builds the model, seconds into the command: a
    SIGTERM or Ctrl-C while a class with a descriptor was being created there reached Python's __set_name__ call,
    which (Python 3.11) wraps the KeyboardInterrupt in `RuntimeError: Error calling __set_name__ on 'Field' instance
    ...`, and train ended in that traceback with status 1 (found by killing `python -m robust_ops train` at random
    moments). It is the interrupt: the one line and status 143 / 130, as anywhere else."""
    import os
    import signal

    sig = getattr(signal, signum)

    class Field:  # as torch's dataclass fields, created while torch.fx.experimental.symbolic_shapes is imported
        def __set_name__(self, owner, name):
            os.kill(os.getpid(), sig)  # the handler runs (and raises) before the call returns

    def make_model_in_a_lazy_import(*args, **kwargs):
        type("StatefulSymbolicContext", (), {"field": Field()})
        raise AssertionError(f"{signum} did not stop the command")

    monkeypatch.setattr(cli, "make_model", make_model_in_a_lazy_import)
    out = tmp_path / "run"
    rc, _, err = run(["train", "--data", small_npz, "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu"],
                     capsys)
    assert (rc, err.strip()) == (status, "robust-ops train: interrupted; no epoch finished yet; continue with the "
                                 "same command and --resume")


def _ctrl_c_hook(module, how):
    """Source of an import hook that, as the import of ``module`` starts, sends this process a SIGINT directly
    ("kill") or from a __set_name__ ("set_name", where Python 3.11 wraps it in a RuntimeError), or raises another
    error ("error")."""
    return f"""
import importlib.abc, os, signal, sys


class Field:
    def __set_name__(self, owner, name):
        os.kill(os.getpid(), signal.SIGINT)  # the handler raises before the call returns


class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            if {how!r} == "kill":
                os.kill(os.getpid(), signal.SIGINT)
            elif {how!r} == "set_name":
                type("Fields", (), {{"field": Field()}})
            else:
                raise RuntimeError("not an interrupt")
        return None


sys.meta_path.insert(0, CtrlC())
"""


CTRL_C_CASES = [("torch", "kill"), ("torch", "set_name"), ("robust_ops._C", "kill"), ("torch", "error")]


@pytest.mark.parametrize("module, how", CTRL_C_CASES)
def test_ctrl_c_while_the_console_script_imports_robust_ops_exits_quietly(module, how):
    """The console script imported robust_ops.cli -- the package's __init__, torch and the compiled ops, seconds --
    before main could catch anything: a Ctrl-C then was a KeyboardInterrupt traceback. Its entry point now guards
    that import (_robust_ops_launcher.py). The interrupt comes from an import hook of this test, as the import of
    `module` starts: directly, or from a __set_name__, where Python 3.11 wraps it in a RuntimeError."""
    pyproject = (Path(cli.__file__).parent.parent / "pyproject.toml").read_text()  # not tomllib: Python 3.10 too
    assert re.findall(r"^robust-ops = (.*)$", pyproject, flags=re.M) == ['"_robust_ops_launcher:main"']
    code = _ctrl_c_hook(module, how) + """
from _robust_ops_launcher import main  # what the generated robust-ops script runs
sys.exit(main())
"""
    done = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120)
    if how == "error":  # not an interrupt: a traceback, as any other failure
        assert done.returncode == 1 and "RuntimeError: not an interrupt" in done.stderr, done.stderr
    else:
        assert (done.returncode, done.stderr) == (130, "\nrobust-ops: interrupted\n"), done.stderr


@pytest.mark.parametrize("module, how", [*CTRL_C_CASES, ("torch", "library")])
def test_ctrl_c_while_python_m_robust_ops_imports_the_package_exits_quietly(tmp_path, module, how):
    """`python -m robust_ops`: Python imports the package (torch, the compiled ops: seconds) before __main__ runs
    main, and a Ctrl-C there was a KeyboardInterrupt traceback; now main's one line and status 130, as the console
    script's. The hook comes in as sitecustomize, which Python imports at start-up. A program's own `import
    robust_ops` ("library") keeps its KeyboardInterrupt."""
    (tmp_path / "sitecustomize.py").write_text(_ctrl_c_hook(module, "kill" if how == "library" else how))
    root = str(Path(cli.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), root,
                                                                     os.environ.get("PYTHONPATH")]))}
    argv = ["-c", "import robust_ops"] if how == "library" else ["-m", "robust_ops", "--help"]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env)
    if how == "error":  # not an interrupt: a traceback, as any other failure
        assert done.returncode == 1 and "RuntimeError: not an interrupt" in done.stderr, done.stderr
    elif how == "library":  # the traceback, after which Python ends by SIGINT
        assert done.stderr.rstrip().endswith("KeyboardInterrupt") and "robust-ops" not in done.stderr, done.stderr
    else:
        assert (done.returncode, done.stderr) == (130, "\nrobust-ops: interrupted\n"), done.stderr


@pytest.mark.parametrize("entry", ["python -m", "console script"])
def test_ctrl_c_after_the_command_finished_keeps_its_status(tmp_path, entry):
    """A Ctrl-C in the interpreter's shutdown (seconds: torch's exit callbacks), the command's last line printed and
    its files written, ended it with status 130 and nothing on stderr, or status 0 after a KeyboardInterrupt
    traceback from torch/library.py. The entry points now end the process at once with the command's own status.
    The Ctrl-C comes from an exit callback sitecustomize registers."""
    (tmp_path / "sitecustomize.py").write_text("import atexit, os, signal\n"
                                               "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n")
    root = str(Path(cli.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), root,
                                                                     os.environ.get("PYTHONPATH")]))}
    launcher = "import sys\nfrom _robust_ops_launcher import main\nsys.exit(main())\n"  # the robust-ops script's
    for argv, status in ((["bench", "--list"], 0), (["train", "--epochs", "0"], 2)):
        start = ["-m", "robust_ops"] if entry == "python -m" else ["-c", launcher]
        done = subprocess.run([sys.executable, *start, *argv], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == status, done.stderr
        if status == 0:
            assert done.stderr == "" and "pgd_step" in done.stdout, done.stderr
        else:
            one_line_error(status, done.stderr, "--epochs:")


@pytest.mark.parametrize("orig_argv, ours", [
    (["python", "-m", "robust_ops", "train"], True), (["python", "-mrobust_ops"], True),
    (["python", "-X", "dev", "-m", "robust_ops.cli"], True), (["python", "-m", "robust_ops_extras"], False),
    (["python", "-m", "mytool", "--data", "x"], False), (["python", "-mmytool"], False)])
def test_an_interrupted_package_import_ends_quietly_under_python_m_robust_ops_alone(monkeypatch, capsys, orig_argv,
                                                                                   ours):
    """While `python -m NAME` finds its module, sys.argv[0] is '-m' for any NAME: only robust_ops (or a module of
    it) ends in main's one line and 130; another package that imports robust_ops keeps its KeyboardInterrupt, as
    does a program's import (sys.argv[0] its script). The subprocess test covers `-m robust_ops` alone."""
    monkeypatch.setattr(sys, "orig_argv", orig_argv, raising=False)
    monkeypatch.setattr(sys, "argv", ["-m"])
    interrupt = KeyboardInterrupt()
    if ours:
        with pytest.raises(SystemExit) as exit_info:
            cli.exit_on_interrupted_package_import(interrupt)
        assert exit_info.value.code == 130 and capsys.readouterr().err == "\nrobust-ops: interrupted\n"
    else:
        assert cli.exit_on_interrupted_package_import(interrupt) is None
    monkeypatch.setattr(sys, "argv", ["myscript.py"])  # a program's own import robust_ops
    assert cli.exit_on_interrupted_package_import(interrupt) is None
    monkeypatch.setattr(sys, "argv", ["-m"])  # not an interrupt: the import's error stands
    assert cli.exit_on_interrupted_package_import(RuntimeError("not an interrupt")) is None
    assert capsys.readouterr().err == ""


def test_resume_of_a_run_stopped_before_its_first_epoch_takes_new_settings(small_npz, tmp_path, capsys,
                                                                           monkeypatch):
    """A RUN_DIR holding run.json but no checkpoint (interrupted or failed before epoch 1) has nothing to continue:
    --resume with corrected settings starts afresh instead of being refused as 'trained with' the old ones."""
    from robust_ops import train

    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu",
            "--defense", "at", "--defense-opt", "steps=1"]
    fit = train.fit
    monkeypatch.setattr(train, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run(argv + ["--defense-opt", "eps=4/255"], capsys)[0] == 130
    assert (out / "run.json").is_file() and not (out / "checkpoint.pt").exists()
    monkeypatch.setattr(train, "fit", fit)
    rc, _, err = run(argv + ["--defense-opt", "eps=2/255", "--resume"], capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["defense_options"]["eps"] == 2 / 255
    rc, _, err = run(argv + ["--defense-opt", "eps=4/255", "--resume"], capsys)  # now it holds an epoch: refused
    one_line_error(rc, err, "--resume:", "this command has --defense-opt steps=1 --defense-opt eps=")


def test_resume_refuses_another_image_size(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--out", out, "--no-progress", "--device", "cpu", "--model", "mlp"]
    assert run(argv + ["--size", "20"], capsys)[0] == 0
    run_json = (out / "run.json").read_text()
    rc, _, err = run(argv + ["--resume"], capsys)  # synthetic's own size is 28
    one_line_error(rc, err, "--resume:", "was trained on 20x20 images (--size 20), this command reads them at 28x28")
    assert (out / "run.json").read_text() == run_json
    out2 = tmp_path / "own"  # --size equal to the data's own size is the same run
    assert run(argv[:4] + [out2] + argv[5:], capsys)[0] == 0
    rc, _, err = run(argv[:2] + ["2"] + argv[3:4] + [out2] + argv[5:] + ["--size", "28", "--resume"], capsys)
    assert rc == 0, err


def test_demo_resume_refuses_another_training_subset(small_npz, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--data", small_npz, "--methods", "standard,ima", "--epochs", "1", "--out", out, "--attacks",
            "fgsm", "--eps", "2/255", "--saliency", "0", "--no-progress", "--device", "cpu"]
    rc, _, err = run(argv + ["--train-size", "32"], capsys)
    assert rc == 0, err
    assert json.loads((out / "runs" / "ima" / "run.json").read_text())["train_samples"] == 32
    # every run is checked before any is trained: the conflict in ima's run stops standard's from starting
    for p in (out / "runs" / "standard").iterdir():
        p.unlink()
    rc, _, err = run(argv + ["--train-size", "48", "--resume"], capsys)
    one_line_error(rc, err, "--train-size:", "trained on 32 training images, this command draws 48")
    assert list((out / "runs" / "standard").iterdir()) == []
    # a setting's refusal ended at 'this command has --lr 0.002', without the way on its other refusals give
    rc, _, err = run(argv + ["--train-size", "32", "--lr", "0.002", "--resume"], capsys)
    line = one_line_error(rc, err, "--resume:", "was trained with --lr 0.001, this command has --lr 0.002")
    assert line.endswith("; rerun with the run's settings to continue it, or use another --out"), line
    quick = [a for a in argv if a not in ("--epochs", "1")] + ["--quick"]  # --quick: 2 epochs on 64 images
    rc, _, err = run(quick + ["--resume"], capsys)
    one_line_error(rc, err, "--train-size:", "draws 64 (--quick)")
    for extra in (["--epochs", "1"], ["--train-size", "32"]):  # --quick would ignore them
        rc, _, err = run(quick + extra, capsys)
        one_line_error(rc, err, f"{extra[0]}: --quick sets its own")



def test_demo_resume_refuses_a_switch_of_quick_before_training_any(tmp_path, capsys):
    """--quick validates on 16 images, a run without it on half the test split (64 of synthetic data's): a --resume
    switching between them, with as many training images, trained the methods before the run, then fit refused it as
    'val_samples=16, this command has val_samples=64 (set by --data, --classes)', flags not given. Every run is now
    checked first on its validation count too (run.json's val_samples, or the checkpoint's where run.json is gone or,
    written before 2026-12-07, lacks it: that one was still refused by fit naming --data, --classes)."""
    common = ["demo", "--model", "mlp", "--attacks", "fgsm", "--eps", "2/255", "--saliency", "0", "--no-progress",
              "--device", "cpu"]
    plain = ["--epochs", "2", "--train-size", "64"]  # as many training images as --quick, the same ones
    for name, first, then, was, now in (("q", ["--quick"], plain, 16, "64 (without --quick); rerun with --quick"),
                                        ("p", plain, ["--quick"], 64, "16 (--quick); rerun without --quick")):
        out = tmp_path / name
        rc, _, err = run(common + first + ["--methods", "standard", "--out", out], capsys)
        assert rc == 0, err
        for gone in ((), ("val_samples",), ("run.json",)):
            run_file = out / "runs" / "standard" / "run.json"
            if gone == ("val_samples",):
                record = json.loads(run_file.read_text())
                del record["val_samples"]
                run_file.write_text(json.dumps(record))
            elif gone:
                run_file.unlink()
            rc, stdout, err = run(common + then + ["--methods", "at,standard", "--out", out, "--resume"], capsys)
            one_line_error(rc, err, f"--quick: {out / 'runs' / 'standard'} was validated on {was} images, this "
                                    f"command draws {now}, as it was made, or use another --out")
            assert "training" not in stdout and not (out / "runs" / "at").exists()


def test_demo_resume_blames_train_size_not_quick_for_another_validation_subset(tmp_path, capsys):
    """demo without --train-size keeps all of a 64-image train split but validates on half the test split (10 of
    20), --train-size 0 on the whole validation split (20): a --resume switching between them, neither with --quick,
    was told '--quick: ... rerun with --quick, as it was made'."""
    data = _ultrasound_npz(tmp_path / "d.npz", (64, 20, 20), 8)
    common = ["demo", "--data", data, "--model", "mlp", "--epochs", "1", "--attacks", "fgsm", "--eps", "2/255",
              "--saliency", "0", "--no-progress", "--device", "cpu", "--methods", "standard", "--out", tmp_path / "o"]
    rc, _, err = run(common, capsys)
    assert rc == 0, err
    rc, _, err = run(common + ["--train-size", "0", "--resume"], capsys)
    one_line_error(rc, err, f"--train-size: {tmp_path / 'o' / 'runs' / 'standard'} was validated on 10 images, this "
                            "command draws 20 (--train-size 0: the whole validation split; another: at most half the "
                            "test split); rerun with the --train-size and --data it was made with, or use another "
                            "--out")


def test_demo_train_seconds_are_the_runs_epochs_also_when_resumed(small_npz, tmp_path, capsys):
    """results.json's train_seconds (and the per-method line) timed the command: a demo interrupted in its evaluation
    and rerun with --resume recorded 0.1 s for each run it found trained (the load), measured 'IMA': 0.1 where the
    uninterrupted demo had 1.9. It is the sum of the run's epochs' time_s, those of an earlier command included."""
    out = tmp_path / "demo"
    argv = ["demo", "--data", small_npz, "--methods", "standard", "--epochs", "1", "--out", out, "--attacks", "fgsm",
            "--eps", "2/255", "--saliency", "0", "--no-progress", "--device", "cpu"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    ckpt = out / "runs" / "standard" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    seconds = json.loads((out / "results.json").read_text())["config"]["train_seconds"]
    assert seconds == {"Baseline": round(state["history"][0]["time_s"], 1)}
    state["history"][0]["time_s"] = 123.4  # as if the epoch had taken that long: a reused run reports its own
    torch.save(state, ckpt)
    rc, stdout, err = run(argv + ["--resume"], capsys)
    assert rc == 0, err
    assert json.loads((out / "results.json").read_text())["config"]["train_seconds"] == {"Baseline": 123.4}
    assert "Baseline: 123 s, train loss" in stdout


def test_demo_interrupted_while_evaluating_says_its_runs_are_trained_and_resume_reuses_them(small_npz, tmp_path,
                                                                                           capsys, monkeypatch):
    """Ctrl-C / SIGTERM in demo's evaluation said only 'robust-ops demo: interrupted': nothing of the runs it had
    trained, nor that --resume evaluates them without training again (the same command retrains them all)."""
    out = tmp_path / "demo"
    argv = ["demo", "--data", small_npz, "--methods", "standard", "--epochs", "1", "--out", out, "--attacks", "fgsm",
            "--eps", "2/255", "--saliency", "0", "--no-progress", "--device", "cpu"]
    real = cli.evaluate_models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "evaluate_models", interrupted)
    rc, _, err = run(argv, capsys)
    monkeypatch.setattr(cli, "evaluate_models", real)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 130 and lines == [f"robust-ops demo: interrupted while evaluating; every run is trained, in "
                                   f"{out / 'runs'}; rerun with --resume to evaluate them without training again"], err
    rc, stdout, err = run(argv + ["--resume"], capsys)
    assert rc == 0 and (out / "results.json").is_file(), err


def test_demo_names_a_finished_run_once_it_is_loaded(small_npz, tmp_path, capsys):
    """demo --resume printed 'training AT ...' before fit refused AT's checkpoint (run.json gone, and --data another
    file of as many images), a run it then did not train; a finished run is named once loaded, as reproduce's
    '[seed0] loading (already trained) ...' is."""
    arrays = dict(np.load(small_npz))
    arrays["train_images"] = arrays["train_images"][::-1].copy()  # as many images, in another order
    other = tmp_path / "smallbus_other.npz"
    np.savez(other, **arrays)
    out = tmp_path / "demo"
    argv = ["demo", "--methods", "at", "--epochs", "1", "--out", out, "--attacks", "fgsm", "--eps", "2/255",
            "--saliency", "0", "--no-progress", "--device", "cpu", "--train-size", "0", "--data"]
    assert run(argv + [small_npz], capsys)[0] == 0
    (out / "runs" / "at" / "run.json").unlink()
    rc, stdout, err = run(argv + [other, "--resume"], capsys)  # refused by demo's check of every run, before any
    one_line_error(rc, err, f"--resume: {out / 'runs' / 'at'} was trained on other training images than this command's")
    assert "training AT" not in stdout, stdout
    rc, stdout, err = run(argv + [small_npz, "--resume"], capsys)
    assert rc == 0, err
    assert "training AT ...\n  AT: " in stdout, stdout


def test_demo_and_reproduce_name_a_run_whose_checkpoint_is_gone_as_one_to_train(small_npz, tmp_path, capsys,
                                                                                  monkeypatch):
    """With a finished run's checkpoint.pt deleted and its metrics.json kept, fit trains the run afresh (and warns),
    but reproduce then printed '[seed0] loading (already trained) STD ...' and demo --resume 'training AT ...' only
    after training it: both counted the epochs metrics.json records. A run is finished only by its checkpoint now."""
    from robust_ops import train
    from robust_ops.reproduce import run_protocol

    proto = _tiny_protocol("seeds", [("STD", "standard")])
    out = tmp_path / "r"
    run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=1, progress=False)
    (out / "runs" / "std" / "seed0" / "checkpoint.pt").unlink()
    capsys.readouterr()
    with pytest.warns(UserWarning, match="training starts afresh"):
        run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=1, progress=False)
    stdout = capsys.readouterr().out
    assert "[seed0] training STD (standard, 1 epoch) ..." in stdout and "already trained" not in stdout, stdout
    demo = tmp_path / "demo"
    argv = ["demo", "--data", small_npz, "--methods", "at", "--epochs", "1", "--train-size", "16", "--out", demo,
            "--attacks", "fgsm", "--eps", "2/255", "--saliency", "0", "--no-progress", "--device", "cpu"]
    assert run(argv, capsys)[0] == 0
    (demo / "runs" / "at" / "checkpoint.pt").unlink()
    fit = train.fit
    monkeypatch.setattr(train, "fit", lambda *a, **k: (print("fit starts"), fit(*a, **k))[1])
    rc, stdout, err = run(argv + ["--resume"], capsys)
    assert rc == 0 and "training starts afresh" in err, err
    assert "training AT ...\nfit starts\n" in stdout, stdout


def test_demo_labels_every_registered_defense_upper_cased(small_npz, tmp_path, capsys):
    # only the default five had table labels: --methods at,mirst-dm,arfl gave the columns 'at', 'MIRST-DM', 'arfl'
    out = tmp_path / "demo"
    rc, stdout, err = run(["demo", "--data", small_npz, "--methods", "standard,at,mirst-dm,arfl", "--epochs", "1",
                           "--train-size", "16", "--out", out, "--attacks", "fgsm", "--eps", "2/255", "--saliency", "0",
                           "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert list(dict.fromkeys(r["method"] for r in rows)) == ["Baseline", "AT", "MIRST-DM", "ARFL"]
    assert "training AT ..." in stdout and "| F1: attack | ε | Baseline | AT | MIRST-DM | ARFL |" in stdout
    assert json.loads((out / "runs" / "arfl" / "run.json").read_text())["label"] == "ARFL"
    assert cli.demo_label("mypkg.defs.NoisyAT") == "mypkg.defs.NoisyAT"  # a class given by its path keeps it


def test_demo_train_size_above_the_train_split_warns(small_npz, tmp_path, capsys):
    # --train-size 1000 on a 64-image train split trained on 64, silently (the default 256 is capped without a word)
    argv = ["demo", "--data", small_npz, "--methods", "standard", "--epochs", "1", "--attacks", "fgsm", "--eps",
            "2/255", "--saliency", "0", "--no-progress", "--device", "cpu", "--model", "mlp"]
    rc, _, err = run(argv + ["--train-size", "1000", "--out", tmp_path / "a"], capsys)
    assert rc == 0, err
    assert err.splitlines() == ["robust-ops demo: warning: --train-size 1000: the train split of smallbus holds 64 "
                                "images; training on all 64 (--train-size 0 says so)"]
    assert json.loads((tmp_path / "a" / "runs" / "standard" / "run.json").read_text())["train_samples"] == 64
    for size in ("64", "0"):
        rc, _, err = run(argv + ["--train-size", size, "--out", tmp_path / size], capsys)
        assert rc == 0 and err == "", err


def test_demo_training_subset_records_and_warns_about_a_class_it_leaves_out(tmp_path, capsys):
    """--train-size draws a random (not stratified) subset: a rare class it leaves out of training was silent, and
    run.json's classes_missing_from_split described the whole split, not the images the run trained on."""
    from robust_ops.data import load_busi

    d = _folder(tmp_path / "d", n=15, classes=("benign", "malignant"))
    _folder(tmp_path / "d", n=3, classes=("normal",))  # 3 of 33 images: a rare third class

    def subset_misses_normal(seed):  # the full train split holds normal images, the 6-image subset none
        full = load_busi(d, size=8, seed=seed)
        return 2 in full.train.tensors[1].tolist() and 2 not in cli.subset_splits(full, 6, 100, seed).train.tensors[1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 7:1:2 split's own warning about the rare class
        seeds = [s for s in range(30) if subset_misses_normal(s)]
    assert seeds
    out = tmp_path / "demo"
    argv = ["demo", "--data", d, "--size", "8", "--methods", "standard", "--epochs", "1", "--out", out, "--attacks",
            "fgsm", "--eps", "2/255", "--saliency", "0", "--no-progress", "--device", "cpu", "--train-size", "6",
            "--seed", str(seeds[0]), "--model", "mlp"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    assert "warning:" in err and "leaves out normal from train" in err, err
    dataset = json.loads((out / "runs" / "standard" / "run.json").read_text())["dataset"]
    assert "normal" in dataset["classes_missing_from_split"]["train"]
    assert json.loads((out / "results.json").read_text())["dataset"]["classes_missing_from_split"] == \
        dataset["classes_missing_from_split"]


def test_demo_subset_warning_says_never_learned_only_for_a_class_left_out_of_train():
    """The warning about a class the random subset leaves out of a part ended "(a class left out of train is never
    learned)" also when every class was in train and only test lost one (found by the CT researcher's walk)."""
    from torch.utils.data import TensorDataset

    from robust_ops.data import DatasetInfo, DatasetSplits

    info = DatasetInfo(name="three", num_classes=3, in_channels=1, image_size=4, class_names=("a", "b", "c"),
                       positive_class=None, synthetic=False, value_range=(0.0, 1.0), source="three")

    def part(labels):
        return TensorDataset(torch.zeros(len(labels), 1, 4, 4), torch.tensor(labels))

    splits = DatasetSplits(part([0, 1, 2] * 4), part([0, 1, 2]), part([0] * 20 + [1, 2]), info)
    with pytest.warns(UserWarning, match="leaves out") as caught:
        cli.subset_splits(splits, 12, 2, 0)  # train kept whole; 2 of the 22 test images
    assert "from test" in str(caught[0].message) and "never learned" not in str(caught[0].message)
    splits = DatasetSplits(part([0] * 20 + [1, 2]), part([0, 1, 2]), part([0, 1, 2]), info)
    with pytest.warns(UserWarning, match="from train, which the split holds .a class left out of train is never "):
        cli.subset_splits(splits, 2, 6, 0)


def test_device_values(monkeypatch, capsys, tmp_path):
    for bad in ("cudax", "cpu0"):
        rc, _, err = run(["train", "--device", bad, "--out", tmp_path / "a"], capsys)
        one_line_error(rc, err, f"--device: expected cpu, cuda, cuda:N or auto, got '{bad}'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in ("train", "demo"):
        rc, _, err = run([cmd, "--device", "cuda", "--out", tmp_path / "a"], capsys)
        one_line_error(rc, err, f"robust-ops {cmd}: error: --device: cuda requested but no CUDA GPU is visible")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.pick_device("cuda:0") == "cuda:0" and cli.pick_device("cuda") == "cuda"
    assert cli.pick_device("auto") == "cuda" and cli.pick_device(None) == "cuda"
    with pytest.raises(cli.CLIError, match=r"--device: cuda:1 requested but only 1 CUDA GPU\(s\) are visible"):
        cli.pick_device("cuda:1")
    assert list(tmp_path.iterdir()) == []


def test_defenses_on_feature_vectors_clip_to_the_data_range():
    """Two-moons points are not images in [0, 1]: PGD-based defenses get the data's value range as clip range."""
    info = cli.load_data("moons").info
    assert tuple(info.value_range) != (0.0, 1.0)
    for name in ("at", "trades", "arfl"):
        defense = cli.make_defense(name, {}, 100, info)
        assert (defense.clip_min, defense.clip_max) == tuple(info.value_range), name
    assert cli.make_defense("at", {"clip_min": -1.0}, 100, info).clip_min == -1.0  # an explicit option wins


def test_own_pgd_defense_on_feature_vectors_takes_the_clip_range(user_module, tmp_path, capsys):
    """Your own PGDDefense subclass by path gets the data's value range too; one whose constructor takes no
    clip_min / clip_max is refused naming the fix, not as an unknown --defense-opt the user never gave (demo: before
    any method trains, named --methods)."""
    info = cli.load_data("moons").info
    defense = cli.make_defense(f"{user_module}.NoisyAT", {}, 100, info)
    assert (defense.clip_min, defense.clip_max) == tuple(info.value_range)
    problem = (f"{user_module}.FixedAT takes no clip_min/clip_max, which train gives PGD-based defenses as the data's "
               f"value range {list(info.value_range)} (not [0, 1]); take them in its __init__ and pass them on to "
               "PGDDefense")
    with pytest.raises(cli.CLIError, match=re.escape(f"--defense: {problem}")):
        cli.make_defense(f"{user_module}.FixedAT", {}, 100, info)
    rc, _, err = run(["demo", "--quick", "--data", "moons", "--model", "mlp", "--methods",
                      f"standard,{user_module}.FixedAT", "--out", tmp_path / "demo", "--device", "cpu"], capsys)
    assert one_line_error(rc, err) == f"robust-ops demo: error: --methods: {problem}"
    assert not (tmp_path / "demo").exists()


def test_eval_rebuilds_the_data_of_the_runs_seed(tmp_path, capsys):
    """The synthetic set is generated from --seed: eval attacks the test split the run was made with."""
    out = tmp_path / "synthetic"
    rc, _, err = run(["train", "--model", "mlp", "--size", "8", "--seed", "1", "--epochs", "1", "--out", out,
                      "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    _, splits, _ = cli.load_run(out)
    assert torch.equal(splits.test.tensors[0], cli.load_data("synthetic", size=8, seed=1).test.tensors[0])
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device",
                      "cpu"], capsys)
    assert rc == 0, err
    assert json.loads((out / "eval" / "results.json").read_text())["config"]["attack_seed"] == 1  # the run's --seed


def test_image_model_on_feature_vectors_is_refused(tmp_path, capsys):
    rc, _, err = run(["train", "--data", "moons", "--out", tmp_path / "m", "--device", "cpu"], capsys)
    one_line_error(rc, err, "--model: small_cnn takes images", "use --model mlp")
    assert not (tmp_path / "m").exists()


def test_bench_empty_dir_and_interrupt(tmp_path, capsys, monkeypatch):
    import subprocess as sp

    rc, _, err = run(["bench", "--bench-dir", tmp_path], capsys)
    one_line_error(rc, err, "--bench-dir:", "holds no bench_*.py scripts")
    rc, _, err = run(["bench", "--bench-dir", tmp_path / "missing"], capsys)
    one_line_error(rc, err, "missing: no such folder")
    (tmp_path / "bench_x.py").write_text("")
    rc, _, err = run(["bench", "--bench-dir", tmp_path / "bench_x.py"], capsys)
    one_line_error(rc, err, "bench_x.py: not a folder")
    rc, _, err = run(["bench", "--bench-dir", tmp_path, "--only", ","], capsys)
    one_line_error(rc, err, "--only: expected comma-separated topics")
    monkeypatch.setattr(sp, "call", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, _, err = run(["bench", "--bench-dir", tmp_path], capsys)
    assert rc == 130 and err.strip() == "robust-ops bench: interrupted", err


def test_non_finite_loss_is_a_one_line_error(small_npz, tmp_path, capsys):
    rc, _, err = run(["train", "--data", small_npz, "--epochs", "1", "--out", tmp_path / "r", "--no-progress",
                      "--device", "cpu", "--defense", "trades", "--defense-opt", "beta=1e300",
                      "--defense-opt", "steps=1"], capsys)
    one_line_error(rc, err, "training failed: fit: the trades loss is inf (the batch's inputs are finite: check the "
                   "learning rate for diverged weights, the defense's options, and the model and loss for a log or "
                   "division of 0) at epoch 1, step 1")


def test_a_one_sample_batch_names_the_batch_size_option(tmp_path, capsys):
    """fit's error for a batch of 1 under training-mode batch norm (resnet18's last stage is 1x1 at 8x8 inputs) said
    "pass a batch_size", fit's name, to users of --batch-size."""
    from robust_ops.data import synthetic_ultrasound

    arrays = {}
    for split, n in (("train", 10), ("val", 4), ("test", 4)):
        x, y = synthetic_ultrasound(n, size=8, seed=n)
        arrays[f"{split}_images"] = (x[:, 0].numpy() * 255).round().astype(np.uint8)
        arrays[f"{split}_labels"] = y.numpy().reshape(-1, 1).astype(np.uint8)
    np.savez(tmp_path / "tiny.npz", **arrays)
    fix = "; pass a --batch-size that leaves every batch at least 2 samples, or more training samples"
    for batch_size, why in (("3", "10 samples in batches of 3 leave a last batch of 1 sample (10 % 3 == 1)"),
                            ("1", "--batch-size=1")):
        rc, _, err = run(["train", "--data", tmp_path / "tiny.npz", "--model", "resnet18", "--batch-size", batch_size,
                          "--epochs", "1", "--out", tmp_path / batch_size, "--no-progress", "--device", "cpu"], capsys)
        one_line_error(rc, err, f"training failed: fit: the model's training-mode batch-norm layers cannot normalize "
                                f"a batch of 1 sample at epoch 1, step {4 if batch_size == '3' else 1}: {why}{fix}")


def test_resumed_train_equals_an_uninterrupted_one(small_npz, tmp_path, capsys):
    """docs/getting-started.md: --resume continues with the same result as an uninterrupted run (RNG streams of the
    attack's random start included)."""
    base = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--defense", "at",
            "--defense-opt", "steps=1", "--batch-size", "16"]
    assert run(base + ["--epochs", "2", "--out", tmp_path / "full"], capsys)[0] == 0
    assert run(base + ["--epochs", "1", "--out", tmp_path / "part"], capsys)[0] == 0
    assert run(base + ["--epochs", "2", "--out", tmp_path / "part", "--resume"], capsys)[0] == 0
    full, part = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("full", "part"))
    assert part["epoch"] == 2 and all(torch.equal(full["model"][k], part["model"][k]) for k in full["model"])
    drop_time = [{k: v for k, v in row.items() if k != "time_s"} for row in full["history"]]
    assert drop_time == [{k: v for k, v in row.items() if k != "time_s"} for row in part["history"]]


# Runs `robust-ops train` (argv) whose second checkpoint write stops halfway through its bytes, says so on stdout and
# waits there to be killed.
_STOPS_MID_SECOND_CHECKPOINT = """
import io, sys, time
from pathlib import Path
from robust_ops import cli, train

real, written = train.replace_atomically, []


def replace_atomically(path, write, **kwargs):
    if Path(path).name != "checkpoint.pt" or written.append(path) or len(written) < 2:
        return real(path, write, **kwargs)

    def half_then_wait(f):
        data = io.BytesIO()
        write(data)
        f.write(data.getvalue()[: len(data.getvalue()) // 2])
        f.flush()
        print("mid-write", flush=True)
        time.sleep(600)

    return real(path, half_then_wait, **kwargs)


train.replace_atomically = replace_atomically
sys.exit(cli.main(sys.argv[1:]))
"""


def test_train_killed_mid_checkpoint_write_resumes_to_the_uninterrupted_run(small_npz, tmp_path, capsys):
    """docs/training.md, Metrics and checkpoints and Exact resume, with a real SIGKILL: a `train` killed while writing
    epoch 2's checkpoint keeps epoch 1's whole beside its own temporary file, and `--resume` removes that file and ends
    bitwise equal to an uninterrupted run (IMA: the margin table too), with the same metrics files."""
    import csv
    import signal

    pytest.importorskip("fcntl")  # the dead writer's file is told by its lock
    argv = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--defense", "ima", "--batch-size", "16",
            "--epochs", "3", "--out"]
    full, out = tmp_path / "full", tmp_path / "killed"
    assert run(argv + [full], capsys)[0] == 0
    # the same thread count as this process's: another one may sum in another order (not bitwise exact)
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen([sys.executable, "-c", _STOPS_MID_SECOND_CHECKPOINT] + [str(a) for a in argv + [out]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "mid-write", child.communicate()[1]
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    (tmp,) = [name for name in os.listdir(out) if name.startswith(".checkpoint.pt.") and name.endswith(".tmp")]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    rc, _, err = run(argv + [out, "--resume"], capsys)
    assert rc == 0 and "warning" not in err, err
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.csv", "metrics.json", "run.json"]  # tmp removed
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (full, out))
    assert b["epoch"] == 3 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    margins = a["defense"].pop("margins")
    assert torch.equal(margins, b["defense"].pop("margins")) and a["defense"] == b["defense"]
    for name, read in (("metrics.json", json.loads), ("metrics.csv", lambda text: list(csv.DictReader(text.split())))):
        rows = [[{k: v for k, v in row.items() if k != "time_s"} for row in read((d / name).read_text())]
                for d in (full, out)]
        assert len(rows[1]) == 3 and rows[0] == rows[1], name


def test_resume_with_metrics_json_deleted_still_refuses_fewer_epochs_before_touching_run_json(small_npz, tmp_path,
                                                                                               capsys):
    # the epochs check read metrics.json only: with it deleted, --resume --epochs 1 on a 2-epoch run passed it,
    # rewrote run.json with epochs 1, and only then did fit refuse the checkpoint
    out = tmp_path / "run"
    base = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--batch-size", "32", "--out", out]
    assert run(base + ["--epochs", "2"], capsys)[0] == 0
    (out / "metrics.json").unlink()
    before = (out / "run.json").read_text()
    rc, _, err = run(base + ["--epochs", "1", "--resume"], capsys)
    one_line_error(rc, err, f"--resume: {out} holds 2 epochs of training, more than --epochs 1")
    assert (out / "run.json").read_text() == before


def test_resume_of_a_checkpoint_without_run_json_is_refused_in_the_command_lines_words(small_npz, tmp_path, capsys):
    # with run.json gone (deleted, or fit's out_dir from Python), fit's own check refuses another setting, and its
    # words reached the command line: "pass lr=0.001 ..., or train afresh with resume=False (another out_dir ...)"
    out = tmp_path / "run"
    base = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--batch-size", "32", "--out", out,
            "--defense", "at", "--epochs", "2", "--defense-opt"]
    assert run(base + ["steps=1"], capsys)[0] == 0
    (out / "run.json").unlink()
    way_on = "or train afresh without --resume (another --out keeps this run's files)"
    for extra, words in ((["steps=1", "--lr", "0.01"], "was trained with --lr 0.001, this command has --lr 0.01; "
                                                        "rerun with "),
                         (["steps=2"], "was trained with --defense-opt step_size=0.049019607843137254 --defense-opt "
                                       "steps=1, this command has --defense-opt step_size=0.024509803921568627 "
                                       "--defense-opt steps=2; rerun with "),
                         (["steps=1", "--epochs", "1"], "holds 2 epochs of training, more than --epochs 1; pass "
                                                        "--epochs 2 or more ")):
        rc, _, err = run(base + extra + ["--resume"], capsys)
        line = one_line_error(rc, err, f"--resume: {out / 'checkpoint.pt'} {words}", way_on)
        assert not re.search(r"resume=|out_dir|\blr=|\bepochs=|\bcall\b", line), line
        assert not (out / "run.json").exists()
    # run.json's own refusals give the same way on
    assert run(base + ["steps=1"], capsys)[0] == 0
    rc, _, err = run(base + ["steps=1", "--resume", "--lr", "0.01"], capsys)
    one_line_error(rc, err, f"--resume: {out / 'run.json'} was trained with --lr 0.001", way_on)


def test_resume_of_an_npz_replaced_by_other_counts_names_the_flags(small_npz, tmp_path, capsys):
    """An .npz replaced in place by one of other training counts: train --resume's refusal said 'run.json was
    trained with train_samples=64, this command has train_samples=32; rerun with the run's settings', naming no
    flag (fit's own num_samples refusal names them)."""
    data = tmp_path / "d.npz"
    shutil.copy(small_npz, data)
    argv = ["train", "--data", data, "--model", "mlp", "--no-progress", "--device", "cpu", "--out", tmp_path / "r",
            "--epochs"]
    assert run(argv + ["1"], capsys)[0] == 0
    _ultrasound_npz(data, (32, 16, 32), 28)
    rc, _, err = run(argv + ["2", "--resume"], capsys)
    one_line_error(rc, err, "was trained with train_samples=64, this command has train_samples=32 (set by --data, "
                            "--classes); rerun with the run's settings")


def test_resume_of_an_ima_checkpoint_without_run_json_records_the_options_its_state_fixes(small_npz, tmp_path,
                                                                                            capsys):
    """IMA takes eps_train, delta and init_margin from a resumed checkpoint's state where they are not given: a run
    given delta=0.1, its run.json deleted and resumed with steps=2 alone, trained on with delta 0.1 but rewrote
    run.json as {steps: 2}, and --resume with the run's true options was then refused as a change. The rewritten
    run.json records the given values the state holds (eps_train too: eval's suggested radii follow it), and none of
    a run trained with IMA's automatic ones."""
    out = tmp_path / "run"
    base = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--model", "mlp", "--out", out,
            "--defense", "ima", "--defense-opt", "steps=1", "--defense-opt", "search_steps=1", "--epochs"]
    given = ["--defense-opt", "delta=0.1", "--defense-opt", "eps_train=0.5"]
    assert run(base + ["1"] + given, capsys)[0] == 0
    (out / "run.json").unlink()
    rc, stdout, _ = run(base + ["2", "--resume"], capsys)
    assert rc == 0 and "--eps 0.125,0.25,0.5" in stdout, stdout
    options = json.loads((out / "run.json").read_text())["defense_options"]
    assert options == {"steps": 1, "search_steps": 1, "delta": 0.1, "eps_train": 0.5}, options
    assert run(base + ["3", "--resume"] + given, capsys)[0] == 0
    assert run(base + ["1"], capsys)[0] == 0  # IMA's automatic eps_train and delta: nothing more to record
    (out / "run.json").unlink()
    assert run(base + ["2", "--resume"], capsys)[0] == 0
    assert json.loads((out / "run.json").read_text())["defense_options"] == {"steps": 1, "search_steps": 1}


def test_resume_of_an_ima_checkpoint_without_run_json_of_another_delta_is_refused_in_flags(small_npz, tmp_path,
                                                                                              capsys):
    """IMA refuses a checkpoint of another delta in its load_state_dict (delta is its state's, not one of the options
    fit compares first): with run.json gone that refusal reached the command line in fit's Python words, 'RUN:
    training failed: fit: cannot resume RUN/checkpoint.pt: IMA.load_state_dict: ... delta=0.25, this defense has
    delta=0.125; pass the checkpoint's value (or leave delta unset ...)'. train names --defense-opt, and reproduce
    --epochs, which sets its IMA's delta = eps_train / epochs."""
    from robust_ops.cli import CLIError
    from robust_ops.reproduce import run_protocol

    out = tmp_path / "run"
    base = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--batch-size", "32", "--out", out,
            "--defense", "ima", "--epochs", "2", "--defense-opt", "eps_train=0.5", "--defense-opt", "steps=1",
            "--defense-opt", "search_steps=1", "--defense-opt"]
    assert run(base + ["delta=0.25", "--epochs", "1"], capsys)[0] == 0
    (out / "run.json").unlink()
    rc, _, err = run(base + ["delta=0.125", "--resume"], capsys)
    line = one_line_error(rc, err, f"--resume: {out / 'checkpoint.pt'} was trained with --defense-opt delta=0.25, "
                                   "this command has --defense-opt delta=0.125; rerun with the run's settings to "
                                   "continue it, or train afresh without --resume (another --out keeps this run's "
                                   "files)")
    assert "fit:" not in line and "load_state_dict" not in line, line
    assert not (out / "run.json").exists()
    proto = _tiny_protocol("seeds", [("IMA", "ima", {"eps_train": 0.5, "steps": 1, "search_steps": 1})])
    out = tmp_path / "r"
    run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=1, progress=False)
    run_dir = out / "runs" / "ima" / "seed0"
    (run_dir / "run.json").unlink()
    with pytest.raises(CLIError) as err:
        run_protocol(proto, out=out, data=str(small_npz), seeds=1, epochs=2, progress=False)
    assert cmd_words(err) == (f"--epochs: {run_dir} was trained with --epochs 1, and IMA's delta = eps_train / epochs "
                              f"follows it (0.5 there, 0.25 now); rerun with --epochs 1, or delete {run_dir} or use "
                              "another --out")


def test_resume_of_a_checkpoint_without_run_json_on_another_validation_split_is_refused_in_flags(small_npz, tmp_path,
                                                                                                    capsys):
    # fit's refusal of another validation split size reached the command line in its Python words: 'RUN: training
    # failed: fit: cannot resume RUN/checkpoint.pt: it was validated on val_samples=16, this call has val_samples=12;
    # pass the run's val_data', naming no flag and no way on
    arrays = dict(np.load(small_npz))
    arrays["val_images"], arrays["val_labels"] = arrays["val_images"][:12], arrays["val_labels"][:12]
    fewer = tmp_path / "smallbus_val12.npz"
    np.savez(fewer, **arrays)
    out = tmp_path / "run"
    base = ["train", "--no-progress", "--device", "cpu", "--batch-size", "32", "--epochs", "2", "--out", out, "--data"]
    assert run(base + [small_npz], capsys)[0] == 0
    (out / "run.json").unlink()
    rc, _, err = run(base + [fewer, "--resume"], capsys)
    line = one_line_error(rc, err, f"--resume: {out / 'checkpoint.pt'} was trained with val_samples=16, this command "
                                   "has val_samples=12 (set by --data, --classes); rerun with the run's settings to "
                                   "continue it, or train afresh without --resume (another --out keeps this run's "
                                   "files)")
    assert "fit:" not in line and "val_data" not in line, line


def test_eval_into_a_demos_or_reproduces_results_or_another_run_is_refused(trained_run, tmp_path, capsys):
    """`eval RUN --out runs/demo` (or a reproduce's --out) replaced that command's results.json, report.md and figures
    with those of RUN's weights beside its runs, exit 0; `eval RUN --out OTHER_RUN` wrote results of RUN's weights
    into another run's folder. Both are refused before any work; RUN's own folder (eval RUN --out RUN) and a folder
    of eval's earlier results are written as before."""
    ev = ["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu", "--out"]
    for command, config in (("demo", {"command": "demo"}), ("reproduce arfl-moons", {"protocol": "arfl-moons"})):
        folder = tmp_path / command.split()[0]
        (folder / "runs").mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"config": config}))
        rc, _, err = run(ev + [folder], capsys)
        one_line_error(rc, err, f"--out: {folder} holds {command}'s results (results.json, report.md and figures "
                                "beside its runs), which eval would replace; choose another --out for eval")
        assert json.loads((folder / "results.json").read_text()) == {"config": config}
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(trained_run / "run.json", other)
    rc, _, err = run(ev + [other], capsys)
    one_line_error(rc, err, f"--out: {other} holds another training run (run.json), not the one evaluated "
                            f"({trained_run}); choose another --out for eval")
    assert not (other / "results.json").exists()
    assert run(ev + [tmp_path / "ev"], capsys)[0] == 0
    assert run(ev + [tmp_path / "ev"], capsys)[0] == 0  # eval's own results: replaced


def test_train_into_another_commands_results_folder_is_refused(small_npz, tmp_path, capsys):
    # `train --out RUN/eval` (meant: RUN, or a new folder) trained a new run into eval's folder beside the results of
    # RUN's weights, and its own eval then wrote RUN/eval/eval
    # The command is the one results.json records: a demo's --out RUN/demo was called "eval's for the run in RUN"
    # (a guess from the run.json above it)
    run_dir = tmp_path / "run"
    base = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--epochs", "1", "--out"]
    assert run(base + [run_dir], capsys)[0] == 0
    other = str(tmp_path / "other" / "checkpoint.pt")
    for folder, config, whose in ((run_dir / "eval", {"command": "eval", "target": str(run_dir)},
                                   f"; here eval's of {run_dir}"),
                                  (run_dir / "other", {"command": "eval", "target": other},
                                   f"; here eval's of {other}"),
                                  (run_dir / "demo", {"command": "demo"}, "; here demo's"),
                                  (tmp_path / "repro", {"protocol": "arfl-moons"}, "; here reproduce arfl-moons's"),
                                  (tmp_path / "older", None, "")):
        folder.mkdir()
        (folder / "results.json").write_text("[]" if config is None else json.dumps({"config": config}))
        rc, _, err = run(base + [folder], capsys)
        one_line_error(rc, err, f"--out: {folder} holds another command's results (results.json of an eval, demo or "
                                f"reproduce --out{whose}), not a training run; choose another --out for this run")
        assert sorted(p.name for p in folder.iterdir()) == ["results.json"]
    # a run's own folder holding an eval's results.json (eval RUN --out RUN) trains, as before
    (run_dir / "results.json").write_text("{}")
    assert run(base + [run_dir, "--resume", "--epochs", "2"], capsys)[0] == 0


def test_demo_or_reproduce_into_a_training_runs_folder_is_refused(small_npz, tmp_path, capsys):
    # `demo --out RUN` / `reproduce ... --out RUN` (a train RUN_DIR given for a new folder) wrote results.json,
    # report.md, figures and runs/ in beside RUN's run, whose own eval then sat beside results of other weights
    run_dir = tmp_path / "run"
    assert run(["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--epochs", "1", "--out", run_dir],
               capsys)[0] == 0
    files = sorted(p.name for p in run_dir.iterdir())
    for argv, command in ((["demo", "--data", small_npz, "--quick", "--methods", "standard"], "demo"),
                          (["reproduce", "arfl-moons", "--quick"], "reproduce")):
        rc, _, err = run(argv + ["--no-progress", "--device", "cpu", "--out", run_dir], capsys)
        one_line_error(rc, err, f"--out: {run_dir} holds a training run (run.json and checkpoint.pt: a train --out), "
                                f"not {command}'s results; choose another --out for {command}")
        assert sorted(p.name for p in run_dir.iterdir()) == files


def test_demo_or_reproduce_into_a_folder_with_either_file_of_a_run_is_refused(small_npz, tmp_path, capsys):
    """Either file of a run is enough (docs/cli.md: run.json or checkpoint.pt): a fit out_dir from Python holds only
    checkpoint.pt, a run stopped before its first epoch only run.json. Refusing only where both are (any -> all)
    passed test_demo_or_reproduce_into_a_training_runs_folder_is_refused, whose RUN_DIR holds both."""
    for name in ("checkpoint.pt", "run.json"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_bytes(b"")
        for argv, command in ((["demo", "--data", small_npz, "--quick", "--methods", "standard"], "demo"),
                              (["reproduce", "arfl-moons", "--quick"], "reproduce")):
            rc, _, err = run(argv + ["--no-progress", "--device", "cpu", "--out", folder], capsys)
            one_line_error(rc, err, f"--out: {folder} holds a training run ({name}: a train --out), not {command}'s "
                                    f"results; choose another --out for {command}")
            assert [p.name for p in folder.iterdir()] == [name]


def test_demo_or_reproduce_into_another_commands_results_is_refused(small_npz, tmp_path, capsys):
    """`reproduce arfl-moons --out RUN/eval` (an eval's results), `demo --out runs/reproduce/arfl-moons` and
    `reproduce mirst-bus --out runs/reproduce/arfl-moons` replaced the results.json, report.md and figures of
    another command (or protocol) there, exit 0. They are refused before any work; a rerun of the same command (the
    same protocol) into its own --out is not."""
    from robust_ops.cli import CLIError, refuse_train_folder

    owners = {"eval": {"command": "eval"}, "demo": {"command": "demo"},
              "reproduce arfl-moons": {"protocol": "arfl-moons"}}
    for owner, config in owners.items():
        folder = tmp_path / owner.replace(" ", "-")
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"config": config}))
        if owner != "eval":
            refuse_train_folder(folder, owner)  # its own results: written again
        for argv, command in ((["demo", "--data", small_npz, "--quick", "--methods", "standard"], "demo"),
                              (["reproduce", "mirst-bus", "--quick"], "reproduce mirst-bus")):
            if command == owner:
                continue
            rc, _, err = run(argv + ["--no-progress", "--device", "cpu", "--out", folder], capsys)
            one_line_error(rc, err, f"--out: {folder} holds {owner}'s results (results.json, report.md and figures), "
                                    f"which {command} would replace; choose another --out for {command.split()[0]}")
            assert sorted(p.name for p in folder.iterdir()) == ["results.json"]
    with pytest.raises(CLIError, match=r"holds reproduce arfl-moons's results .* which reproduce ima-bus would"):
        refuse_train_folder(tmp_path / "reproduce-arfl-moons", "reproduce ima-bus")


def test_train_into_a_run_folder_another_process_is_writing_is_refused(small_npz, tmp_path, capsys):
    # a second train (other settings) or --resume into a RUN_DIR still training rewrote its checkpoint and run.json
    # under the first: both exited 0, leaving one run's checkpoint beside the other's run.json (probe: standard for
    # 150 epochs, then at --seed 1 for 3 epochs into the same --out)
    fcntl = pytest.importorskip("fcntl")
    import os

    out = tmp_path / "run"
    base = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--epochs", "1", "--out", out]
    assert run(base, capsys)[0] == 0
    before = {name: (out / name).read_bytes() for name in ("run.json", "checkpoint.pt", "metrics.json")}
    held = os.open(out, os.O_RDONLY)  # as the training process holds it (a flock is per open file, so this refuses)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for extra in (["--defense", "at", "--seed", "1"], ["--epochs", "2", "--resume"]):
            rc, _, err = run(base + extra, capsys)
            one_line_error(rc, err, f"--out: {out} is in use by process {os.getpid()}", "choose another --out")
            assert {name: (out / name).read_bytes() for name in before} == before
    finally:
        os.close(held)
    assert run(base + ["--epochs", "2", "--resume"], capsys)[0] == 0  # released: the lock is the folder's, not a file
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.csv", "metrics.json", "run.json"]


def test_a_folder_in_use_error_pickles_with_its_path_pid_notes_and_attributes(tmp_path):
    # the folder lock's error, as EvalError and OneSampleBatchNormError: OSError's default pickle rebuilt it from its
    # message alone, a TypeError for the missing pid (fit and the CLI reword it today, but a worker process running
    # exclusive_folder could not hand it to its parent)
    import pickle

    from robust_ops._files import FolderInUse

    for pid in (123, None):
        error = FolderInUse(tmp_path / "run", pid)
        error.add_note("from worker 2")
        error.where = "fold 1"
        copy_ = pickle.loads(pickle.dumps(error))
        assert type(copy_) is FolderInUse and (str(copy_), copy_.path, copy_.pid) == (str(error), error.path, pid)
        assert (copy_.__notes__, copy_.where) == (["from worker 2"], "fold 1")


def test_an_argument_error_pickles_with_its_text_command_words_notes_and_attributes():
    """run_protocol's ArgumentError, as EvalError: the default pickle rebuilt it from its message alone, "TypeError:
    ArgumentError.__init__() missing 1 required positional argument: 'err'" (found by the fix2 helper)."""
    import pickle

    from robust_ops.cli import ArgumentError, CLIError

    error = ArgumentError("run_protocol", CLIError("--lr: expected a finite learning rate > 0, got -1"), ("lr",))
    error.add_note("from worker 2")
    error.where = "fold 1"
    copy_ = pickle.loads(pickle.dumps(error))
    assert type(copy_) is ArgumentError and isinstance(copy_, ValueError)
    said = "run_protocol: lr: expected a finite learning rate > 0, got -1"
    assert (str(copy_), copy_.args) == (str(error), error.args) == (said, (said,))
    assert (copy_.command_words, copy_.__notes__, copy_.where) == (error.command_words, ["from worker 2"], "fold 1")


def _disk_full_at_fsync(monkeypatch, failing_call):
    """The files robust_ops writes find the disk full at their ``failing_call``-th fsync (1-based; NFS reports a full
    disk there, not at the write)."""
    import errno

    from robust_ops import _files

    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == failing_call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(_files.os, "fsync", fsync)


def test_train_on_a_full_disk_is_a_one_line_error_keeping_the_last_checkpoint(small_npz, tmp_path, capsys,
                                                                              monkeypatch):
    # a checkpoint write failing for want of space ended train with a 40-line traceback (probe: --out on a 600 KiB
    # tmpfs; epoch 2's save failed), its last line torch's "unexpected pos 225920 vs 225808"
    _disk_full_at_fsync(monkeypatch, 3)  # run.json's, epoch 1's checkpoint's, then epoch 2's
    out = tmp_path / "run"
    rc, _, err = run(["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--epochs", "2", "--out",
                      out], capsys)
    one_line_error(rc, err, f"{out}: training failed: [Errno 28] No space left on device: '{out / 'checkpoint.pt'}'",
                   "holds the last epoch saved: once fixed, continue with the same command and --resume")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.csv", "metrics.json", "run.json"]


def test_resume_on_a_full_disk_says_to_continue_with_the_same_command(small_npz, tmp_path, capsys, monkeypatch):
    # a --resume that fails so already has --resume: the way on is the same command, not one with --resume added
    out = tmp_path / "run"
    argv = ["train", "--data", small_npz, "--model", "mlp", "--no-progress", "--device", "cpu", "--out", out]
    assert run(argv + ["--epochs", "1"], capsys)[0] == 0
    _disk_full_at_fsync(monkeypatch, 2)  # run.json's, then epoch 2's checkpoint's
    rc, _, err = run(argv + ["--epochs", "2", "--resume"], capsys)
    line = one_line_error(rc, err, f"{out}: training failed: [Errno 28] No space left on device")
    assert line.endswith("holds the last epoch saved: once fixed, continue with the same command"), line
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_train_flushes_run_json_to_disk_as_it_does_checkpoints(small_npz, tmp_path, capsys, monkeypatch):
    # run.json was renamed into place unsynced while every checkpoint beside it was fsynced: after a power cut
    # --resume could find the checkpoint and an empty run.json. A refused resume's restored record is synced too.
    from robust_ops import _files

    real, synced = _files.replace_atomically, []

    def replace_atomically(path, write, **kwargs):
        synced.append((Path(path).name, kwargs.get("fsync", False)))
        return real(path, write, **kwargs)

    monkeypatch.setattr(_files, "replace_atomically", replace_atomically)
    out = tmp_path / "run"
    base = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--out", out]
    assert run(base + ["--epochs", "1"], capsys)[0] == 0
    assert ("run.json", True) in synced and ("run.json", False) not in synced
    at = tmp_path / "at"
    assert run(["train", "--data", small_npz, "--epochs", "1", "--out", at, "--no-progress", "--device", "cpu",
                "--defense", "at", "--defense-opt", "steps=1"], capsys)[0] == 0
    shutil.copy(at / "checkpoint.pt", out)
    synced.clear()
    rc, _, err = run(base + ["--epochs", "2", "--resume"], capsys)
    one_line_error(rc, err, "--resume:", "checkpoint.pt was trained with --defense at, this command has --defense "
                                         "standard")  # another run's checkpoint
    assert synced == [("run.json", True), ("run.json", True)]  # this command's record, then the one put back


def test_eval_results_that_cannot_be_written_are_a_one_line_error(trained_run, tmp_path, capsys, monkeypatch):
    # a full disk while writing the results ended eval (demo, reproduce) with matplotlib's savefig traceback, its
    # last line a bare "OSError: [Errno 28] No space left on device" (probe: --out on a nearly full 600 KiB tmpfs)
    import errno
    import os

    import robust_ops.report

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(robust_ops.report, "plot_metric_vs_radius", full_disk)
    out = tmp_path / "ev"
    rc, _, err = run(["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device",
                      "cpu", "--out", out], capsys)
    one_line_error(rc, err, f"--out: {out}: cannot write the results (No space left on device); nothing was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--data", "--config", "RUN_DIR"])
def test_a_path_with_a_name_too_long_is_a_one_line_error(flag, tmp_path, capsys):
    # a name over 255 bytes raised OSError "File name too long" from the first Path.exists(): a traceback
    long = tmp_path / ("y" * 256)
    argv = ["eval", long] if flag == "RUN_DIR" else ["train", "--no-progress", "--out", tmp_path / "run", flag, long]
    rc, _, err = run(argv, capsys)
    one_line_error(rc, err, f"{long}: File name too long")
    assert list(tmp_path.iterdir()) == []


def test_classes_name_an_npz_files_labels_and_eval_keeps_them(small_npz, tmp_path, capsys):
    # --classes was refused for every .npz: a renamed BreastMNIST subset (label 0 = malignant) trained and was scored
    # with label 1, benign, as its positive class
    out = tmp_path / "run"
    rc, printed, err = run(["train", "--data", small_npz, "--classes", "benign,malignant", "--epochs", "1",
                            "--no-progress", "--device", "cpu", "--out", out], capsys)
    assert rc == 0, err
    assert "classes: benign = 0, malignant = 1 (positive)" in printed
    assert json.loads((out / "run.json").read_text())["classes"] == ["benign", "malignant"]
    rc, printed, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0"], capsys)
    assert rc == 0, err
    assert json.loads((out / "eval" / "results.json").read_text())["dataset"]["class_names"] == ["benign", "malignant"]
    rc, _, err = run(["train", "--data", small_npz, "--classes", "benign", "--no-progress", "--out", out], capsys)
    one_line_error(rc, err, "--classes: ", "smallbus.npz: --classes names each label of an .npz, label 0 first: "
                   "expected 2 names (its labels run from 0 to 1), got 1")


@pytest.mark.parametrize("name", ["run.json", "checkpoint.pt"])
def test_a_folder_where_train_writes_a_file_is_a_one_line_error(name, small_npz, tmp_path, capsys):
    # a folder named run.json ended train in a traceback from os.replace ("Is a directory: '.run.json.x.tmp' ->
    # 'run.json'", naming the temporary file), one named checkpoint.pt in one from Path.unlink
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    rc, _, err = run(["train", "--data", small_npz, "--epochs", "1", "--no-progress", "--device", "cpu", "--out", out],
                     capsys)
    one_line_error(rc, err, f"robust-ops train: error: {out / name}: Is a directory")
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_an_oserror_naming_no_file_keeps_its_traceback(monkeypatch, tmp_path):
    # only errors about a path become one line; any other OSError is a fault whose traceback shows where it came from
    import errno

    def broken(args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli, "cmd_eval", broken)
    with pytest.raises(OSError, match="Input/output error"):
        cli.main(["eval", str(tmp_path)])


def test_demo_into_an_out_another_demo_is_writing_is_refused(small_npz, tmp_path, capsys):
    # each run folder's lock alone let a second demo retrain the first one's finished runs/standard while the first
    # trained its next method: the first one's results.json then described weights no longer on disk (probe: demo
    # standard,at --epochs 40, then demo standard --epochs 3 into the same --out; both exited 0)
    fcntl = pytest.importorskip("fcntl")
    import os

    out = tmp_path / "d"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)  # as the first demo holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, _, err = run(["demo", "--data", small_npz, "--quick", "--methods", "standard", "--attacks", "fgsm",
                          "--eps", "1/255", "--saliency", "0", "--no-progress", "--device", "cpu", "--out", out],
                         capsys)
        one_line_error(rc, err, f"--out: {out} is in use by process {os.getpid()}")
    finally:
        os.close(held)
    assert list(out.iterdir()) == []


def test_demo_records_cascade_and_ensemble_as_eval_does(small_npz, tmp_path, capsys):
    # demo's results.json config left them out: a --no-cascade or --ensemble table (other AUC / mAP) could not be
    # told from a cascaded per-attack one
    argv = ["demo", "--data", small_npz, "--quick", "--methods", "standard", "--attacks", "fgsm", "--eps", "1/255",
            "--saliency", "0", "--no-progress", "--device", "cpu"]
    for extra, expected in (([], (True, False)), (["--no-cascade"], (False, False)), (["--ensemble"], (True, True))):
        rc, _, err = run(argv + extra + ["--out", tmp_path / "d"], capsys)
        assert rc == 0, err
        config = json.loads((tmp_path / "d" / "results.json").read_text())["config"]
        assert (config["cascade"], config["ensemble"]) == expected


def test_demo_records_its_data_settings_as_reproduce_does(tmp_path, capsys):
    # demo's results.json config named the data but not --size, --classes, --bit-depth or --channels (each run.json
    # had them): its rows did not say which images, on which scale or in how many channels they were of
    root = _folder(tmp_path / "set", n=12, classes=("benign", "malignant", "normal"))
    argv = ["demo", "--data", root, "--size", "8", "--classes", "benign,malignant", "--channels", "1", "--quick",
            "--methods", "standard", "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--no-progress",
            "--device", "cpu", "--out", tmp_path / "d"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    config = json.loads((tmp_path / "d" / "results.json").read_text())["config"]
    assert {k: config[k] for k in ("size", "classes", "bit_depth", "channels")} == {
        "size": 8, "classes": ["benign", "malignant"], "bit_depth": None, "channels": 1}


def test_demo_warns_of_a_short_default_step_once_before_training(small_npz, tmp_path, capsys, monkeypatch):
    # pgd's warning that its default step falls short of --eps came from each method's evaluation: once per method
    # (five times by default), and only after all the training
    argv = ["demo", "--data", small_npz, "--epochs", "1", "--train-size", "16", "--methods", "standard,at", "--attacks",
            "pgd:steps=1", "--eps", "8/255", "--saliency", "0", "--no-progress", "--device", "cpu", "--out",
            tmp_path / "d"]
    warning = ("robust-ops demo: warning: attacks: pgd(steps=1)'s default step alpha=0.001 moves it at most 1 x 0.001 "
               "= 0.001 from its start, less than eps=8/255")

    def interrupted(**_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cli, "train_run", interrupted)
        rc, _, err = run(argv, capsys)
    assert rc == 130 and [line for line in err.splitlines() if "warning:" in line][0].startswith(warning), err
    rc, _, err = run(argv, capsys)
    assert rc == 0 and [line.startswith(warning) for line in err.splitlines() if "warning:" in line] == [True], err


def test_demo_methods_checked_before_training(tmp_path, capsys):
    """Repeated methods and a binary-only defense on a multi-class set are --methods errors, before any training."""
    path = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 24), ("val", 6), ("test", 9)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    argv = ["demo", "--data", path, "--out", tmp_path / "d", "--no-progress", "--device", "cpu", "--quick"]
    rc, _, err = run(argv + ["--methods", "standard,arfl"], capsys)
    one_line_error(rc, err, "--methods: arfl is defined for binary tasks only", "3 classes")
    rc, _, err = run(argv + ["--methods", "standard,at,standard"], capsys)
    one_line_error(rc, err, "--methods: standard given more than once")
    assert not (tmp_path / "d").exists()
    rc, _, err = run(["train", "--data", path, "--out", tmp_path / "t", "--device", "cpu", "--defense", "arfl"], capsys)
    # it named no way to a binary task: --classes, which folders' and CSVs' errors name, only names an .npz's labels
    one_line_error(rc, err, "--defense: arfl is defined for binary tasks only", "3 classes",
                   "--classes does not pick classes of an .npz", "of two of its classes as an .npz of their own")


@pytest.fixture
def evaluate_calls(monkeypatch):
    """The keyword arguments of every robust_ops.evaluate.evaluate call (which still runs)."""
    import robust_ops.evaluate

    calls, real_evaluate = [], robust_ops.evaluate.evaluate

    def spy(model, *args, **kwargs):
        calls.append(dict(kwargs, model=model))
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(robust_ops.evaluate, "evaluate", spy)
    return calls


def test_train_options_reach_the_run(small_npz, tmp_path, capsys):
    """--seed, --dropmax, --channels-last and the validation split reach training; eval rebuilds the architecture;
    --resume refuses another seed, batch size, data or drop-max setting (docs/cli.md)."""
    from robust_ops.nn import DropMax2d

    out = tmp_path / "run"
    options = {"--data": small_npz, "--seed": 2, "--dropmax": "first", "--batch-size": 32}

    def train(changes=(), extra=()):
        given = {**options, **dict(changes)}
        return run(["train", "--out", out, "--no-progress", "--device", "cpu", "--channels-last", *extra]
                   + [a for flag, value in given.items() for a in (flag, value)], capsys)

    rc, _, err = train(extra=["--epochs", "1"])
    assert rc == 0, err
    run_doc = json.loads((out / "run.json").read_text())
    assert (run_doc["seed"], run_doc["dropmax"], run_doc["batch_size"]) == (2, "first", 32)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"val_loss", "val_acc"} <= set(state["history"][0])
    convs = [w for w in state["model"].values() if w.dim() == 4 and w.shape[1] > 1]
    assert convs and all(not w.is_contiguous() for w in convs)  # trained in channels_last, not converted afterwards
    assert any(isinstance(m, DropMax2d) for m in cli.load_run(out)[0].modules())  # DropMax2d has no weights to check
    for flag, value, needle in (("--seed", 3, "with --seed 2, this command has --seed 3"),
                                ("--batch-size", 16, "with --batch-size 32, this command has --batch-size 16"),
                                ("--dropmax", "all", "with --dropmax first, this command has --dropmax all"),
                                ("--data", "synthetic", "this command has --data synthetic")):
        rc, _, err = train({flag: value}, ["--epochs", "2", "--resume"])
        one_line_error(rc, err, "--resume:", needle)
        assert json.loads((out / "run.json").read_text()) == run_doc


def test_eval_options_reach_the_evaluation(trained_run, tmp_path, capsys, monkeypatch, evaluate_calls):
    """--method, --no-cascade, --eval-batch-size, --ensemble, --channels-last, --prepacked-conv and --saliency are
    applied, not only recorded; a checkpoint file's default --out is RUN_DIR/eval (docs/cli.md)."""
    import shutil

    import robust_ops.evaluate
    from robust_ops import prepacked_conv

    saliency_images, real_write = [], robust_ops.evaluate.write_results

    def write_without_figures(*args, saliency=None, **kwargs):  # the figures themselves are tested elsewhere
        saliency_images.append(len(saliency[1]))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(robust_ops.evaluate, "write_results", write_without_figures)
    packed = []
    real_pack = prepacked_conv._pack
    monkeypatch.setattr(prepacked_conv, "_pack", lambda *a: packed.append(1) or real_pack(*a))
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("eval"))
    assert not json.loads((run_dir / "run.json").read_text())["channels_last"]
    rc, _, err = run(["eval", run_dir / "checkpoint.pt", "--attacks", "fgsm", "--eps", "2/255", "--saliency", "3",
                      "--device", "cpu", "--method", "Mine", "--no-cascade", "--eval-batch-size", "7",
                      "--channels-last", "--prepacked-conv"], capsys)
    assert rc == 0, err
    (call,) = evaluate_calls
    assert (call["method"], call["cascade"], call["batch_size"], call["ensemble"]) == ("Mine", False, 7, False)
    conv = next(m for m in call["model"].modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and packed and saliency_images == [3]
    doc = json.loads((run_dir / "eval" / "results.json").read_text())
    assert {r["method"] for r in doc["rows"]} == {"Mine"} and doc["config"]["cascade"] is False
    rc, _, err = run(["eval", run_dir, "--attacks", "fgsm,pgd:steps=1", "--eps", "2/255", "--saliency", "1",
                      "--device", "cpu", "--ensemble", "--out", tmp_path / "ens"], capsys)
    assert rc == 0, err
    assert evaluate_calls[-1]["ensemble"] is True and evaluate_calls[-1]["cascade"] is True


def test_eval_no_progress_drops_the_line_per_attack_and_keeps_the_tables(trained_run, tmp_path, capsys):
    """train and demo took --no-progress, eval refused it (a script passing it to every command failed there)."""
    argv = ["eval", trained_run, "--attacks", "fgsm", "--eps", "2/255", "--saliency", "0", "--device", "cpu"]
    rc, shown, err = run(argv + ["--out", tmp_path / "a"], capsys)
    assert rc == 0, err
    assert "standard: clean accuracy" in shown and "standard: fgsm eps=0.007843 accuracy" in shown
    rc, quiet, err = run(argv + ["--out", tmp_path / "b", "--no-progress"], capsys)
    assert rc == 0, err
    assert "clean accuracy" not in quiet and " eps=" not in quiet and "fgsm" in quiet and "wrote " in quiet
    assert _config_args("eval", ["run", "--no-progress", "--progress"]).no_progress is False


def test_eval_names_the_rows_by_the_runs_label(trained_run, tmp_path, capsys, evaluate_calls):
    # a demo or reproduce run records its table label ("Baseline" for demo's standard) in run.json: eval's rows keep
    # it, so they line up with that command's own table, unless --method says otherwise
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("eval"))
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**record, "label": "Baseline"}))
    rc, _, err = run(["eval", run_dir, "--attacks", "fgsm", "--eps", "2/255", "--saliency", "0", "--device", "cpu"],
                     capsys)
    assert rc == 0, err
    assert [call["method"] for call in evaluate_calls] == ["Baseline"]


def test_demo_options_reach_training_and_evaluation(small_npz, tmp_path, capsys, monkeypatch, evaluate_calls):
    from robust_ops import train

    fit_resume, real_fit = [], train.fit
    monkeypatch.setattr(train, "fit", lambda *a, **k: fit_resume.append(k["resume"]) or real_fit(*a, **k))
    out = tmp_path / "demo"
    argv = ["demo", "--data", small_npz, "--methods", "standard", "--epochs", "1", "--out", out, "--attacks", "fgsm",
            "--eps", "2/255", "--saliency", "0", "--no-progress", "--device", "cpu"]
    rc, shown, err = run(argv + ["--train-size", "0", "--lr", "0.01", "--batch-size", "16", "--seed", "2",
                                 "--eval-batch-size", "7", "--no-cascade", "--resume"], capsys)
    assert rc == 0, err
    assert "clean accuracy" not in shown and "fgsm" in shown  # --no-progress: eval's tables, not its progress lines
    run_doc = json.loads((out / "runs" / "standard" / "run.json").read_text())
    assert (run_doc["lr"], run_doc["batch_size"], run_doc["seed"], run_doc["epochs"]) == (0.01, 16, 2, 1)
    assert run_doc["train_samples"] == 64 and fit_resume == [True]  # --train-size 0: the whole train split
    (call,) = evaluate_calls
    assert (call["batch_size"], call["cascade"]) == (7, False)
    rc, _, err = run(argv + ["--train-size", "-1"], capsys)
    one_line_error(rc, err, "--train-size: expected >= 0, got -1")
    monkeypatch.setattr(train, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, _, err = run(argv + ["--out", tmp_path / "stopped"], capsys)
    assert rc == 130 and "rerun with --resume" in err, err


def test_demo_trains_on_256_images_by_default(tmp_path, capsys, monkeypatch):
    """docs/cli.md: --train-size defaults to 256 training images (the ~1 minute demo)."""
    from robust_ops import train

    sizes = []

    def fit(model, defense, train_set, *args, **kwargs):  # the size it would train on, then stop
        sizes.append(len(train_set))
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", fit)
    rc, _, err = run(["demo", "--methods", "standard", "--model", "mlp", "--size", "8", "--no-progress", "--device",
                      "cpu", "--out", tmp_path / "d"], capsys)
    assert rc == 130 and sizes == [256], err


def test_demo_trains_8_epochs_per_method_by_default_and_2_with_quick(tmp_path, capsys, monkeypatch):
    """docs/cli.md: demo's --epochs defaults to 8 per method, --quick's to 2."""
    from robust_ops import train

    epochs = []

    def fit(*args, **kwargs):  # the epochs it would train, then stop
        epochs.append(kwargs["epochs"])
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", fit)
    for extra in ([], ["--quick"]):
        rc, _, err = run(["demo", "--methods", "standard", "--model", "mlp", "--size", "8", "--no-progress", "--device",
                          "cpu", "--out", tmp_path / "d", *extra], capsys)
        assert rc == 130, err
    assert epochs == [8, 2]


def test_bench_runs_the_chosen_scripts_and_reports_failures(tmp_path, capsys):
    """--only runs just those topics, --full drops --quick (the default, which --quick names: it was argparse's
    "unrecognized arguments: --quick"), and a failing script makes the exit status 1."""
    for name, status in (("a", 3), ("b", 0)):
        (tmp_path / f"bench_{name}.py").write_text(
            f"import pathlib, sys\npathlib.Path(__file__).with_suffix('.args').write_text(repr(sys.argv[1:]))\n"
            f"sys.exit({status})\n")
    rc, _, err = run(["bench", "--bench-dir", tmp_path, "--only", "a"], capsys)
    assert rc == 1 and "bench: a exited with status 3" in err, err
    assert (tmp_path / "bench_a.args").read_text() == "['--quick']" and not (tmp_path / "bench_b.args").exists()
    rc, _, err = run(["bench", "--bench-dir", tmp_path, "--only", "b", "--full"], capsys)
    assert rc == 0, err
    assert (tmp_path / "bench_b.args").read_text() == "[]"
    rc, _, err = run(["bench", "--bench-dir", tmp_path, "--only", "b", "--quick"], capsys)
    assert rc == 0, err
    assert (tmp_path / "bench_b.args").read_text() == "['--quick']"
    rc, _, err = run(["bench", "--bench-dir", tmp_path, "--only", "b", "--quick", "--full"], capsys)
    assert rc == 2 and "not allowed with argument" in err, err


def test_bench_list_prints_each_topic_with_its_script_and_runs_none(tmp_path, capsys):
    # one line per topic --only picks: its name, a tab and the script it would run
    for name in ("a", "b"):
        (tmp_path / f"bench_{name}.py").write_text("raise SystemExit(3)\n")
    rc, out, err = run(["bench", "--bench-dir", tmp_path, "--only", "b", "--list"], capsys)
    assert rc == 0 and out == f"b\t{tmp_path / 'bench_b.py'}\n", err
    # --full has nothing to act on beside --list: refused, not ignored
    rc, out, err = run(["bench", "--bench-dir", tmp_path, "--list", "--full"], capsys)
    one_line_error(rc, err, "--full: --list only lists the benchmarks and runs none; drop one of the two")
    assert out == ""
    rc, out, err = run(["bench", "--bench-dir", tmp_path, "--list", "--quick"], capsys)
    one_line_error(rc, err, "--quick: --list only lists the benchmarks and runs none; drop one of the two")


def test_bench_checks_its_output_folder_variable_before_running_a_script(tmp_path, capsys, monkeypatch):
    # $ROBUST_OPS_BENCH_DIR (where the scripts write their CSVs) naming a file: one line before any script runs,
    # not each script failing at its start
    (tmp_path / "bench_a.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').touch()\n")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("ROBUST_OPS_BENCH_DIR", str(tmp_path / "file"))
    rc, _, err = run(["bench", "--bench-dir", tmp_path], capsys)
    one_line_error(rc, err, f"robust-ops bench: error: $ROBUST_OPS_BENCH_DIR: {tmp_path / 'file'} exists and is not a "
                            "folder")
    assert not (tmp_path / "bench_a.ran").exists()


def _folder(root, n=10, classes=("benign", "malignant")):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            value = 10 * i + (100 if c == "malignant" else 0)
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_eval_of_other_data_does_not_blame_a_size_only_run_json_gave(small_npz, tmp_path, capsys):
    """eval of a folder run trained with --size 8 on --data moons or an .npz (data of their own size) read them at
    run.json's size and was refused as '--size: ...; drop --size', a flag never given."""
    run_dir = tmp_path / "run"
    rc, _, err = run(["train", "--data", _folder(tmp_path / "d"), "--size", "8", "--epochs", "1", "--out", run_dir,
                      "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    argv = ["eval", run_dir, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--no-progress", "--device",
            "cpu"]
    rc, _, err = run(argv + ["--data", "moons", "--out", tmp_path / "e1"], capsys)
    line = one_line_error(rc, err, "--data: moons holds feature vectors of 2 values in 2 classes, but the run was "
                                   "trained on 1-channel images")
    assert "--size" not in line
    rc, _, err = run(argv + ["--data", small_npz, "--out", tmp_path / "e2"], capsys)  # small_cnn takes 28x28 too
    assert rc == 0 and "--size" not in err, err
    rc, _, err = run(argv + ["--data", small_npz, "--size", "8", "--out", tmp_path / "e3"], capsys)  # given: its own
    one_line_error(rc, err, f"--size: {small_npz}: images are 28x28, but --size 8 was requested")


def _csv_set(root, labels, prefix, ext):
    """A HAM10000-style set in ``root``: meta.csv (image_id, dx) and one 8x8 image per label, <prefix>K.<ext>."""
    from PIL import Image

    rows = ["image_id,dx"]
    for k, label in enumerate(labels):
        Image.fromarray(np.full((8, 8), 5 * k, np.uint8)).save(root / f"{prefix}{k}.{ext}")
        rows.append(f"{prefix}{k},{label}")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")


def test_folder_run_is_found_from_elsewhere_and_changed_data_is_refused(tmp_path, capsys, monkeypatch):
    """run.json keeps an absolute --data, so eval from another directory reads the same folder; a folder that gained
    an image would be split differently (test images trained on), so eval and --resume refuse it."""
    _folder(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "d", "--size", "8", "--model", "mlp", "--epochs", "1", "--out", tmp_path / "run",
            "--no-progress", "--device", "cpu"]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert "classes: benign = 0, malignant = 1 (positive)" in out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"] == str(tmp_path / "d")
    monkeypatch.chdir(tmp_path / "run")
    assert cli.load_run(tmp_path / "run")[1].info.source == str(tmp_path / "d")
    (tmp_path / "d" / "benign" / "9.png").rename(tmp_path / "d" / "malignant" / "extra.png")
    rc, _, err = run(["eval", tmp_path / "run", "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "e"], capsys)
    one_line_error(rc, err, "run.json: data:", "now holds 20 images (benign 9, malignant 11)",
                   "trained when it held 20 images (benign 10, malignant 10)")
    assert not (tmp_path / "e").exists()
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(argv[:8] + ["2"] + argv[9:] + ["--resume"], capsys)
    one_line_error(rc, err, "--resume:", "class_counts=")
    shutil.rmtree(tmp_path / "d" / "malignant")  # an error loading the run's data names run.json, not --data
    rc, _, err = run(["eval", tmp_path / "run", "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "e"], capsys)
    one_line_error(rc, err, f"robust-ops eval: error: {tmp_path / 'run' / 'run.json'}: data: {tmp_path / 'd'}: "
                            "expected at least two class folders")


def test_small_images_at_the_default_size_warn_in_train_not_in_eval(tmp_path, capsys):
    # 8 x 8 images read at the default 224 x 224: train says so once, naming --size; eval rebuilds the run's data as
    # it was read, so the advice for a new run is not repeated there
    out = tmp_path / "run"
    rc, _, err = run(["train", "--data", _folder(tmp_path / "d"), "--model", "mlp", "--epochs", "1", "--out", out,
                      "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0 and err.count("warning:") == 1, err
    assert "every image is at most 8 pixels a side, read at the default 224x224" in err and "--size 8" in err
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"],
                     capsys)
    assert rc == 0 and "warning" not in err, err
    assert json.loads((out / "eval" / "results.json").read_text())["rows"][0]["n"] == 4


def test_binary_only_defense_on_a_multi_class_folder_names_classes(tmp_path, capsys):
    # "arfl is defined for binary tasks only; d has 3 classes" did not say that --classes makes a binary task of it
    _folder(tmp_path / "d", classes=("benign", "malignant", "normal"))
    common = ["--data", tmp_path / "d", "--size", "8", "--model", "mlp", "--no-progress", "--device", "cpu"]
    hint = "keep two of its classes (benign, malignant, normal) with --classes, e.g. --classes benign,malignant"
    rc, _, err = run(["train", "--defense", "arfl", "--out", tmp_path / "t"] + common, capsys)
    one_line_error(rc, err, "--defense: arfl is defined for binary tasks only; d has 3 classes; " + hint)
    rc, _, err = run(["demo", "--methods", "standard,arfl", "--quick", "--out", tmp_path / "o"] + common, capsys)
    one_line_error(rc, err, "--methods: arfl is defined for binary tasks only; d has 3 classes; " + hint)
    rc, _, err = run(["train", "--defense", "arfl", "--epochs", "1", "--classes", "benign,malignant", "--out",
                      tmp_path / "t"] + common, capsys)
    assert rc == 0, err


def test_classes_select_folders_and_reach_run_json_eval_resume_and_demo(tmp_path, capsys):
    """--classes (Python's load_dataset(classes=)) on the command line: a binary task out of a 3-class folder, in the
    given label order; eval rebuilds the same classes and split from run.json; --resume refuses other classes."""
    _folder(tmp_path / "d", classes=("benign", "malignant", "normal"))
    out = tmp_path / "run"
    argv = ["train", "--data", tmp_path / "d", "--size", "8", "--model", "mlp", "--epochs", "1", "--out", out,
            "--no-progress", "--device", "cpu", "--classes", "malignant,normal"]
    rc, stdout, err = run(argv, capsys)
    assert rc == 0, err
    assert "classes: malignant = 0 (positive), normal = 1" in stdout
    doc = json.loads((out / "run.json").read_text())
    assert doc["classes"] == ["malignant", "normal"] and sum(doc["dataset"]["class_counts"].values()) == 20
    _, splits, _ = cli.load_run(out)
    assert splits.info.class_names == ("malignant", "normal") and len(splits.test) == 4
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"],
                     capsys)
    assert rc == 0 and "warning" not in err, err
    assert json.loads((out / "eval" / "results.json").read_text())["rows"][0]["n"] == 4
    for other in ("normal,malignant", "malignant,normal,benign"):  # another order or selection: another split
        rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--classes", other, "--out",
                          tmp_path / "other"], capsys)
        one_line_error(rc, err, f"--classes: {tmp_path / 'd'} is the run's own data, trained on malignant = 0, "
                                "normal = 1;", "could hold images the run trained on -- drop --classes")
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--classes",
                      "Malignant,Normal", "--out", tmp_path / "same", "--device", "cpu"], capsys)
    assert rc == 0 and "warning" not in err, err  # the run's own classes, spelled otherwise
    rc, _, err = run(argv[:-1] + ["benign,normal", "--epochs", "2", "--resume"], capsys)
    one_line_error(rc, err, "--resume:", "was trained with --classes malignant,normal, this command has --classes "
                                         "benign,normal")
    rc, _, err = run(argv[:-1] + ["malignant,,normal"], capsys)
    one_line_error(rc, err, "argument --classes: expected comma-separated class names")
    rc, _, err = run(["demo", "--data", tmp_path / "d", "--size", "8", "--model", "mlp", "--quick", "--methods",
                      "standard", "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "demo", "--no-progress",
                      "--device", "cpu", "--classes", "normal,malignant"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "demo" / "runs" / "standard" / "run.json").read_text())["classes"] == [
        "normal", "malignant"]
    rc, _, err = run(["demo", "--data", tmp_path / "d", "--size", "8", "--model", "mlp", "--quick", "--methods",
                      "standard", "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "demo", "--no-progress",
                      "--device", "cpu", "--classes", "normal,malignant", "--resume"], capsys)
    assert rc == 0, err  # demo's check before training compared the run's classes with none


def test_resume_takes_a_folders_classes_in_any_case(tmp_path, capsys):
    # a folder's classes match its folders in any case, and the run loads the same classes, but --resume compared
    # them as typed: '--resume: RUN/run.json was trained with --classes malignant,normal, this command has --classes
    # Malignant,NORMAL'
    _folder(tmp_path / "d", classes=("benign", "malignant", "normal"))
    out = tmp_path / "run"
    argv = ["train", "--data", tmp_path / "d", "--size", "8", "--model", "mlp", "--out", out, "--no-progress",
            "--device", "cpu", "--classes"]
    assert run(argv + ["malignant,normal", "--epochs", "1"], capsys)[0] == 0
    rc, _, err = run(argv + ["Malignant,NORMAL", "--epochs", "2", "--resume"], capsys)
    assert rc == 0, err
    assert json.loads((out / "metrics.json").read_text())[-1]["epoch"] == 2
    rc, _, err = run(argv + ["Normal,Malignant", "--epochs", "2", "--resume"], capsys)  # another order: other labels
    one_line_error(rc, err, "--resume:", "was trained with --classes Malignant,NORMAL, this command has --classes "
                                         "Normal,Malignant")


def test_classes_option_strips_spaces_around_names():
    # `--classes "nv, mel"` names the folders nv and mel, not " mel" (no such folder); an empty name is refused
    import argparse

    assert cli.parse_classes("nv, mel ") == ("nv", "mel")
    with pytest.raises(argparse.ArgumentTypeError, match="expected comma-separated class names"):
        cli.parse_classes("nv, ")


def _folder_16_bit(root, top=4095, n=10):
    """12-bit (CT-like) images saved as 16-bit PNGs, values up to ``top``."""
    from PIL import Image

    for c in ("benign", "malignant"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            value = top - top // 20 * i - (top // 4 if c == "benign" else 0)
            Image.fromarray(np.full((8, 8), value, np.uint16)).save(root / c / f"{i}.png")
    return root


def test_data_warnings_name_the_flag_alone(tmp_path, capsys):
    """The data layer's warnings name the keyword and the flag for both readers (`drop bit_depth= (--bit-depth)`,
    `pass size=8 (--size 8) ..., or size=224 to keep it`); the command line printed both, and the keyword."""
    common = ["--model", "mlp", "--epochs", "1", "--no-progress", "--device", "cpu"]
    cases = ((_folder(tmp_path / "d8"), ["--size", "8", "--bit-depth", "12"], "--bit-depth 12 scales 16-bit image "
              "files, and none of these images is one (8-bit files are read as they are): it changes nothing -- "
              "drop --bit-depth"),
             (_folder_16_bit(tmp_path / "ct"), ["--size", "8"], "-- pass --bit-depth 12 to scale 4095 to 255"),
             (tmp_path / "d8", [], "pass --size 8 to read them at their own size, or --size 224 to keep it"))
    for k, (data, argv, needle) in enumerate(cases):
        rc, _, err = run(["train", "--data", data, *argv, *common, "--out", tmp_path / f"run{k}"], capsys)
        said = [line for line in err.splitlines() if needle in line]
        assert rc == 0 and len(said) == 1, err
        assert said[0].startswith("robust-ops train: warning: ") and not re.search(r"\w=|\(--", said[0]), said[0]


def test_bit_depth_reaches_run_json_eval_resume_and_reproduce(tmp_path, capsys):
    """--bit-depth (load_dataset(bit_depth=)): 12-bit PNGs read on the 12-bit scale, recorded in run.json so eval
    and --resume read the same images; --resume refuses another bit depth; errors name --bit-depth."""
    data = _folder_16_bit(tmp_path / "ct")
    out = tmp_path / "run"
    argv = ["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--out", out, "--no-progress",
            "--device", "cpu", "--bit-depth", "12"]
    rc, _, err = run(argv, capsys)
    assert rc == 0 and "12-bit data?" not in err, err
    doc = json.loads((out / "run.json").read_text())
    assert doc["bit_depth"] == 12 and doc["dataset"]["bit_depth"] == 12
    _, splits, _ = cli.load_run(out)
    assert float(splits.train.tensors[0].max()) == 1.0  # 4095 -> 255, not 16 of 255
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"],
                     capsys)
    assert rc == 0 and "warning" not in err, err
    rc, _, err = run(argv[:-1] + ["16", "--epochs", "2", "--resume"], capsys)
    one_line_error(rc, err, "--resume:", "was trained with --bit-depth 12, this command has --bit-depth 16")
    rc, _, err = run(argv[:-2] + ["--out", tmp_path / "plain"], capsys)  # without it: said, with the flag to use
    assert rc == 0 and "12-bit data?" in err and "--bit-depth 12" in err, err
    for bits, message in (("11", "--bit-depth: " + str(data / "benign" / "0.png") + ": holds the value 3072, above "
                                 "the 11-bit maximum 2047 (--bit-depth 11); give the bit depth the images were saved "
                                 "with"),
                          ("4", "--bit-depth: expected 8 to 16 (the bits of a 16-bit image file that hold the "
                                "intensity, 12 for most CT and X-ray PNGs), got 4")):
        rc, _, err = run(argv[:-1] + [bits, "--out", tmp_path / f"bad{bits}"], capsys)
        one_line_error(rc, err, message)
    rc, _, err = run(["train", "--data", "synthetic", "--bit-depth", "12", "--out", tmp_path / "s", "--device", "cpu"],
                     capsys)
    one_line_error(rc, err, "--bit-depth: synthetic: --bit-depth scales 16-bit image files (class folders and CSV); "
                            "this source has none -- drop --bit-depth")
    eight = tmp_path / "eight"
    _folder_16_bit(eight, top=255, n=2)
    rc, _, err = run(["train", "--data", eight, "--size", "8", "--out", tmp_path / "e", "--device", "cpu"], capsys)
    one_line_error(rc, err, "--bit-depth:", "save them as 8-bit images or pass --bit-depth 8")


def test_eval_refuses_another_bit_depth_on_the_runs_own_data(tmp_path, capsys):
    """eval --bit-depth other than the run's on its own 16-bit folder read its images on another scale (a 12-bit run
    read on 16 bits: 16 times darker) and attacked them as the run's data, exit 0, without a word; it is refused as
    another --classes on the run's own data is."""
    data = _folder_16_bit(tmp_path / "ct", n=4)
    common = ["--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--no-progress", "--device", "cpu"]
    attack = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    for name, trained, given, was in (("bd", ["--bit-depth", "12"], "16", "with --bit-depth 12"),
                                      ("plain", [], "12", "without --bit-depth (the full 16 bits)")):
        rc, _, err = run(["train", *common, *trained, "--out", tmp_path / name], capsys)
        assert rc == 0, err
        rc, _, err = run(["eval", tmp_path / name, *attack, "--bit-depth", given], capsys)
        one_line_error(rc, err, f"--bit-depth: {data} is the run's own data, trained {was}; --bit-depth {given} reads "
                                "its 16-bit images on another scale than the model learned -- drop --bit-depth")
        assert not (tmp_path / name / "eval").exists()


def test_eval_takes_bit_depth_16_on_a_run_trained_without_it(tmp_path, capsys):
    """Without --bit-depth 16-bit images are read on the full 16 bits, as --bit-depth 16 reads them: eval of such a
    run with --bit-depth 16 on its own data was refused as 'another scale than the model learned'."""
    data = _folder_16_bit(tmp_path / "ct", n=4)
    rc, _, err = run(["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--no-progress",
                      "--device", "cpu", "--out", tmp_path / "plain"], capsys)
    assert rc == 0, err
    attack = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    rc, _, err = run(["eval", tmp_path / "plain", *attack, "--out", tmp_path / "own"], capsys)
    assert rc == 0, err
    rc, _, err = run(["eval", tmp_path / "plain", *attack, "--bit-depth", "16", "--out", tmp_path / "e"], capsys)
    assert rc == 0, err
    own, given = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("own", "e"))
    assert given["dataset"] == own["dataset"] and given["rows"] == own["rows"]  # the run's own test split, as read


def test_eval_does_not_repeat_the_bit_depth_advice_for_the_runs_own_data(tmp_path, capsys):
    """A run trained without --bit-depth on 12-bit PNGs: eval on its own data repeated the loader's "(12-bit data?)
    ... pass --bit-depth 12" advice for a new run, which for this one (trained on the images as read) is refused;
    so did a copy of its folder at another path, other data holding the images it trained on, whose advice read them on
    another scale than the model learned. Other images still hear it, and so does the copy of a run trained with
    --bit-depth 12 (read on the full 16 bits, as other data is, the advice names the run's reading)."""
    data = _folder_16_bit(tmp_path / "ct", n=4)
    rc, _, err = run(["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--no-progress",
                      "--device", "cpu", "--out", tmp_path / "plain"], capsys)
    assert rc == 0 and "(12-bit data?)" in err, err
    attack = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    for given in ([], ["--data", data]):
        rc, _, err = run(["eval", tmp_path / "plain", *attack, *given], capsys)
        assert rc == 0 and "bit" not in err, err
    shutil.copytree(data, tmp_path / "copy")
    rc, _, err = run(["eval", tmp_path / "plain", *attack, "--data", tmp_path / "copy", "--out", tmp_path / "e"],
                     capsys)
    assert rc == 0 and "bit" not in err, err
    other = _folder_16_bit(tmp_path / "other", top=3000, n=4)
    rc, _, err = run(["eval", tmp_path / "plain", *attack, "--data", other, "--out", tmp_path / "o"], capsys)
    assert rc == 0 and "(12-bit data?)" in err, err
    assert run(["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--no-progress",
                "--device", "cpu", "--bit-depth", "12", "--out", tmp_path / "b12"], capsys)[0] == 0
    rc, _, err = run(["eval", tmp_path / "b12", *attack, "--data", tmp_path / "copy", "--out", tmp_path / "c"],
                     capsys)
    assert rc == 0 and "pass --bit-depth 12" in err, err


def _folder_ct_offset(root, n=4, seed=0):
    """Class folders of 8x8 16-bit PNGs of CT slices saved with MATLAB's im2uint16 offset: Hounsfield units + 32768,
    air and the 12-bit top in each slice (as test_data.py's narrow-band test makes them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in ("normal", "nodule"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            hu = rng.integers(-1024, 3072, (8, 8))
            hu[0, 0], hu[0, 1] = -1024, 3071
            Image.fromarray((hu + 32768).astype(np.uint16)).save(root / c / f"{i}.png")
    return root


def test_eval_does_not_repeat_the_narrow_16_bit_band_advice_for_the_runs_own_data(tmp_path, capsys):
    """The loader's warning of 16-bit images in a narrow band far from 0 (CT slices with im2uint16's offset: '...
    (12-bit data?); scaled from the full 16-bit range they keep 16 of 256 grey levels -- save them with the offset
    subtracted ...') is advice for a new run, worded to match eval's filter of the bit-depth advice: eval of a run
    trained on them, on its own data or a copy of it, prints none (the run learned the images as read); other images
    in such a band still hear it (found by the data6 helper, checked by the cli12 helper)."""
    data = _folder_ct_offset(tmp_path / "ct")
    rc, _, err = run(["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--no-progress",
                      "--device", "cpu", "--out", tmp_path / "r"], capsys)
    assert rc == 0 and "an offset added to them" in err and "(12-bit data?)" in err, err
    attack = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    shutil.copytree(data, tmp_path / "copy")
    for k, given in enumerate(([], ["--data", data], ["--data", tmp_path / "copy"])):
        rc, _, err = run(["eval", tmp_path / "r", *attack, *given, "--out", tmp_path / f"e{k}"], capsys)
        assert rc == 0 and "offset" not in err and "bit" not in err, err
    other = _folder_ct_offset(tmp_path / "other", seed=1)
    rc, _, err = run(["eval", tmp_path / "r", *attack, "--data", other, "--out", tmp_path / "o"], capsys)
    assert rc == 0 and "an offset added to them" in err, err


def test_eval_does_not_repeat_the_missing_label_advice_for_the_runs_own_data(tmp_path, capsys):
    """A run trained without --classes on a CSV whose labels include 'nan' and 'NA': eval on its own data repeated the
    loader's "... missing values ..., each read as a class of its own; ... leave them out with --classes mel,nv",
    advice for a new run that this one (trained on those classes) cannot follow: its --classes mel,nv is refused
    (found by the cli7 helper)."""
    _csv_set(tmp_path, ["mel", "nv", "nan", "NA"] * 5, "im", "png")
    data = tmp_path / "meta.csv"
    rc, _, err = run(["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--no-progress",
                      "--device", "cpu", "--out", tmp_path / "r"], capsys)
    assert rc == 0 and "missing values" in err, err
    attack = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    for given in ([], ["--data", data]):
        rc, _, err = run(["eval", tmp_path / "r", *attack, *given], capsys)
        assert rc == 0 and "missing values" not in err, err
    rc, _, err = run(["eval", tmp_path / "r", *attack, "--classes", "mel,nv"], capsys)
    assert rc == 2 and "is the run's own data" in err and "drop --classes" in err, err


def test_resume_takes_bit_depth_16_as_the_reading_without_bit_depth(tmp_path, capsys):
    """--bit-depth 16 reads 16-bit images on the full 16 bits, as no --bit-depth does, and eval takes it on a run
    trained without it: train's and demo's --resume refused it ('was trained without --bit-depth, this command has
    --bit-depth 16'). Both continue the run either way round; another bit depth is still refused."""
    data = _folder_16_bit(tmp_path / "ct", n=4)
    train = ["train", "--data", data, "--size", "8", "--model", "mlp", "--no-progress", "--device", "cpu",
             "--out", tmp_path / "run"]
    assert run(train + ["--epochs", "1"], capsys)[0] == 0
    rc, _, err = run(train + ["--epochs", "2", "--bit-depth", "16", "--resume"], capsys)
    assert rc == 0, err
    rc, _, err = run(train + ["--epochs", "3", "--resume"], capsys)
    assert rc == 0, err
    rc, _, err = run(train + ["--epochs", "3", "--bit-depth", "12", "--resume"], capsys)
    assert rc == 2 and "error: --resume:" in err and "this command has --bit-depth 12;" in err, err
    demo = ["demo", "--data", data, "--size", "8", "--model", "mlp", "--methods", "standard", "--attacks", "fgsm",
            "--eps", "1/255", "--saliency", "0", "--no-progress", "--device", "cpu", "--out", tmp_path / "demo"]
    assert run(demo + ["--epochs", "1"], capsys)[0] == 0
    rc, _, err = run(demo + ["--epochs", "2", "--bit-depth", "16", "--resume"], capsys)
    assert rc == 0, err


def test_a_resume_keeps_the_bit_depth_the_run_recorded_of_its_reading(tmp_path, capsys):
    """--bit-depth 16 and none read 16-bit images alike, and a resume takes either for the other; but it rewrote
    run.json's record of the reading: train --resume --bit-depth 16 on a run recorded without it left bit_depth 16
    (and none -> null the other way), as demo's; and reproduce --bit-depth 16 on a run made without it was refused,
    `tiny-kfold: RUN_DIR was trained with split={...}, this command has split={..., 'bit_depth': 16}`."""
    from robust_ops.reproduce import run_protocol

    data = _folder_16_bit(tmp_path / "ct", top=65535, n=4)
    common = ["--data", data, "--size", "8", "--model", "mlp", "--no-progress", "--device", "cpu"]
    for first, then in (([], ["--bit-depth", "16"]), (["--bit-depth", "16"], [])):
        out = tmp_path / f"run{len(first)}"
        assert run(["train", *common, "--epochs", "1", "--out", out, *first], capsys)[0] == 0
        recorded = json.loads((out / "run.json").read_text())["bit_depth"]
        rc, _, err = run(["train", *common, "--epochs", "2", "--out", out, "--resume", *then], capsys)
        assert rc == 0 and json.loads((out / "run.json").read_text())["bit_depth"] == recorded == (16 if first else
                                                                                                   None), err
    demo = ["demo", *common, "--methods", "standard", "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0",
            "--out", tmp_path / "demo"]
    assert run(demo + ["--epochs", "1"], capsys)[0] == 0
    assert run(demo + ["--epochs", "2", "--bit-depth", "16", "--resume"], capsys)[0] == 0
    assert json.loads((tmp_path / "demo" / "runs" / "standard" / "run.json").read_text())["bit_depth"] is None
    proto = _tiny_protocol("kfold", [("Baseline", "standard")])
    proto.model = "mlp"
    common = dict(out=tmp_path / "o", data=str(data), seeds=1, size=8, progress=False)
    with pytest.warns(UserWarning, match="too small to stratify"):
        run_protocol(proto, **common)
        run_protocol(proto, **common, bit_depth=16)
    record = json.loads((tmp_path / "o" / "runs" / "baseline" / "fold0" / "run.json").read_text())
    assert record["bit_depth"] is None and "bit_depth" not in record["split"], record

def test_eval_does_not_give_the_size_advice_for_a_copy_of_the_runs_data(tmp_path, capsys):
    """A run trained at the default size on small images: eval of a copy of its folder (other data holding the images
    it trained on, as it read them) repeated the loader's 'pass --size 8' advice for a new run, which the run's mlp,
    trained at 224x224, refuses. Decided by the training-set fingerprint, as the bit-depth advice is: other images
    still hear it."""
    from PIL import Image

    for c, base in (("benign", 100), ("malignant", 0)):
        (tmp_path / "small" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8), base + 10 * i, np.uint8)).save(tmp_path / "small" / c / f"{i}.png")
    rc, _, err = run(["train", "--data", tmp_path / "small", "--model", "mlp", "--epochs", "1", "--no-progress",
                      "--device", "cpu", "--out", tmp_path / "run"], capsys)
    assert rc == 0 and "pass --size 8" in err, err
    shutil.copytree(tmp_path / "small", tmp_path / "copy")
    attack = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    rc, _, err = run(["eval", tmp_path / "run", *attack, "--data", tmp_path / "copy", "--out", tmp_path / "e"], capsys)
    assert rc == 0 and "--size" not in err, err
    # a run.json written before it recorded the fingerprint: the checkpoint's (it gave the advice for such runs)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    del record["train_data_sha256"]
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    rc, _, err = run(["eval", tmp_path / "run", *attack, "--data", tmp_path / "copy", "--out", tmp_path / "f"], capsys)
    assert rc == 0 and "--size" not in err, err
    (tmp_path / "copy" / "benign" / "0.png").unlink()  # other images: a new run's advice
    rc, _, err = run(["eval", tmp_path / "run", *attack, "--data", tmp_path / "copy", "--out", tmp_path / "o"], capsys)
    assert rc == 0 and "pass --size 8" in err, err



def test_eval_of_other_data_fingerprints_its_training_split_only_where_there_is_advice_to_drop(monkeypatch):
    """_other_data_read fingerprinted the training split of every other data eval read (0.3-520 ms by image size),
    though the fingerprint decides only whether the loader's --bit-depth / --size advice is dropped; its other
    warnings are shown as they came."""
    import robust_ops.train as trainer

    calls = []
    monkeypatch.setattr(trainer, "train_data_fingerprint", lambda split: calls.append(split) or "sha")
    splits = type("Splits", (), {"train": "the training split"})()

    def load(message):
        def read():
            warnings.warn(message)
            return splits
        return read

    with pytest.warns(UserWarning, match="^other data: a warning of its own$"):
        assert cli._other_data_read(load("other data: a warning of its own"), "sha") is splits
    assert calls == []
    advice = "ct: every 16-bit image holds values <= 4095 only (12-bit data?); scaled from the full 16-bit range ..."
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli._other_data_read(load(advice), "sha") is splits  # the run's own images: advice dropped
        # a copy of a run's CSV whose labels hold 'nan' (the cli7 helper's finding): --classes mel,nv was refused
        missing = ("c/meta.csv: column 'dx' holds 'nan' (2 rows): missing values (as pandas writes NaN), each read as "
                   "a class of its own; fill in those rows' labels, or leave them out with classes= (--classes mel,nv)")
        assert cli._other_data_read(load(missing), "sha") is splits
        groups = ("c/meta.csv: column 'lesion_id' holds 'NA' (20 rows): a missing value (as pandas writes NaN), its "
                  "rows kept as one lesion_id group, on one side of the split; give each such row its own lesion_id")
        assert cli._other_data_read(load(groups), "sha") is splits
    assert calls == ["the training split"] * 3

def test_eval_does_not_repeat_the_missing_group_advice_for_the_runs_own_data(tmp_path, capsys):
    """A run trained on a CSV whose lesion_id holds 'NA' in half its rows: eval on its own data, and on a copy of it,
    repeated the loader's "... kept as one lesion_id group ...; give each such row its own lesion_id, or remove those
    rows", advice for a new run that this one cannot follow: either draws another split, which eval refuses (found by
    the data4 helper)."""
    import shutil

    from PIL import Image

    data = tmp_path / "d"
    data.mkdir()
    rows = ["image_id,dx,lesion_id"]
    for k in range(20):
        Image.fromarray(np.full((8, 8), 5 * k, np.uint8)).save(data / f"im{k}.png")
        rows.append(f"im{k},{('mel', 'nv')[k % 2]},{'NA' if k < 10 else f'L{k}'}")
    (data / "meta.csv").write_text("\n".join(rows) + "\n")
    rc, _, err = run(["train", "--data", data / "meta.csv", "--size", "8", "--model", "mlp", "--epochs", "1",
                      "--no-progress", "--device", "cpu", "--out", tmp_path / "r"], capsys)
    assert rc == 0 and "kept as one lesion_id group" in err, err
    shutil.copytree(data, tmp_path / "copy")
    attack = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    for given in ([], ["--data", data / "meta.csv"], ["--data", tmp_path / "copy" / "meta.csv"]):
        rc, _, err = run(["eval", tmp_path / "r", *attack, *given, "--out", tmp_path / "e"], capsys)
        assert rc == 0 and "kept as one" not in err, (given, err)


def test_data_through_a_symbolic_link_is_the_runs_own_data(tmp_path, capsys):
    """data_spec makes paths absolute without following links: `eval RUN --data LINK` of a run trained on the linked
    folder with --bit-depth 12 attacked it as other data, read on the full 16 bits (16 times darker than the model
    learned, with the loader's advice to pass --bit-depth 12), and `train --resume --data LINK` was refused as
    another --data. A link to the run's data (or the data a run's link named) is its own data."""
    data = _folder_16_bit(tmp_path / "ct", n=4)
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    train = ["train", "--size", "8", "--model", "mlp", "--no-progress", "--device", "cpu", "--bit-depth", "12",
             "--out", tmp_path / "run", "--data"]
    assert run(train + [data, "--epochs", "1"], capsys)[0] == 0
    attack = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    rc, _, err = run(["eval", tmp_path / "run", *attack, "--data", tmp_path / "link", "--out", tmp_path / "e"],
                     capsys)
    assert rc == 0 and "bit" not in err, err
    assert json.loads((tmp_path / "e" / "results.json").read_text())["dataset"]["bit_depth"] == 12
    rc, _, err = run(train + [tmp_path / "link", "--epochs", "2", "--resume"], capsys)
    assert rc == 0, err
    rc, _, err = run(train + [data, "--epochs", "3", "--resume"], capsys)  # run.json now records the link
    assert rc == 0, err


def _grey_csv(root):
    """A CSV-described set of grayscale PNGs (image k a flat 10k grey, its class k % 2)."""
    from PIL import Image

    root.mkdir()
    for k in range(20):
        Image.fromarray(np.full((8, 8), 10 * k, np.uint8)).save(root / f"im{k}.png")
    (root / "meta.csv").write_text("image_id,dx\n" + "".join(f"im{k},{('a', 'b')[k % 2]}\n" for k in range(20)))
    return root / "meta.csv"


@pytest.mark.filterwarnings("ignore:.*a class is too small to stratify the 0.9/0.1 split")
def test_channels_reads_a_grayscale_csv_as_one_channel_and_reaches_run_json_eval_resume_and_reproduce(tmp_path,
                                                                                                     capsys):
    """A CSV's images are read as RGB, and no flag said otherwise: a grayscale CSV set (X-ray, ultrasound metadata)
    trained on three equal channels. --channels 1 (load_dataset(channels=)) reads it as one, recorded in run.json
    so eval and --resume read the same images; --resume refuses another; errors name --channels."""
    from robust_ops.data import load_dataset
    from robust_ops.reproduce import run_protocol

    data = _grey_csv(tmp_path / "d")
    assert load_dataset(data, size=8).info.in_channels == 3  # the CSV default, unchanged
    assert load_dataset(data, size=8, channels=1).info.in_channels == 1
    assert load_dataset(_folder(tmp_path / "f"), size=8, channels=3).info.in_channels == 3  # folders: 1 by default
    out = tmp_path / "run"
    argv = ["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--out", out, "--no-progress",
            "--device", "cpu", "--channels", "1"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    doc = json.loads((out / "run.json").read_text())
    assert doc["channels"] == 1 and doc["dataset"]["in_channels"] == 1
    model, splits, _ = cli.load_run(out)
    assert splits.info.in_channels == 1 and next(model.parameters()).shape[1] == 64  # mlp: 1 x 8 x 8 inputs
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"],
                     capsys)
    assert rc == 0, err
    rc, _, err = run(argv[:-1] + ["3", "--epochs", "2", "--resume"], capsys)
    one_line_error(rc, err, "--resume:", "was trained with --channels 1, this command has --channels 3")
    rc, _, err = run(argv[:-1] + ["2", "--out", tmp_path / "two"], capsys)
    one_line_error(rc, err, "--channels: invalid choice: 2 (choose from 1, 3)")
    rc, _, err = run(["train", "--data", "synthetic", "--channels", "1", "--out", tmp_path / "s", "--device", "cpu"],
                     capsys)
    one_line_error(rc, err, "--channels: synthetic: --channels picks how image files (class folders and CSV) are "
                            "read; this source's channels are fixed -- drop --channels")
    for wrong in (True, 3.0):  # equal to 1 and 3, not ints (3.0 was read as 3)
        with pytest.raises(Exception, match=rf"expected channels to be 1 \(grayscale\) or 3 \(RGB\), got {wrong}$"):
            load_dataset(data, channels=wrong)
    proto = _tiny_protocol("kfold", [("Baseline", "standard")])
    run_protocol(proto, out=tmp_path / "o", data=str(data), seeds=1, size=8, progress=False, channels=1)
    run_dir = tmp_path / "o" / "runs" / "baseline" / "fold0"
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["split"]["channels"] == doc["channels"] == 1
    assert json.loads((tmp_path / "o" / "results.json").read_text())["config"]["channels"] == 1  # as --bit-depth
    assert cli.load_run(run_dir)[1].info.in_channels == 1


@pytest.mark.filterwarnings("ignore:.*a class is too small to stratify the 0.9/0.1 split")
def test_eval_names_channels_when_the_runs_images_were_read_with_other_channels(tmp_path, capsys):
    """A run trained with --channels 1 on a CSV, attacked on another CSV (read as RGB by default) or with --channels 3,
    was refused as "holds 3-channel images ..., its model cannot take them", not naming the flag that reads them as
    the run's."""
    import shutil

    data = _grey_csv(tmp_path / "d")
    out = tmp_path / "run"
    rc, _, err = run(["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--out", out,
                      "--no-progress", "--device", "cpu", "--channels", "1"], capsys)
    assert rc == 0, err
    other = Path(shutil.copytree(tmp_path / "d", tmp_path / "copy")) / "meta.csv"
    evaluate = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    for extra in (["--data", other], ["--channels", "3"]):
        rc, _, err = run(["eval", out, *extra, *evaluate], capsys)
        one_line_error(rc, err, "holds 3-channel images in 2 classes, but the run was trained on 1-channel images",
                       "its model cannot take them; read them as 1-channel images with --channels 1")
    rc, _, err = run(["eval", out, "--data", other, "--channels", "1", *evaluate], capsys)
    assert rc == 0, err


@pytest.mark.filterwarnings("ignore:.*a class is too small to stratify the 0.9/0.1 split")
def test_reproduce_reads_16_bit_folders_at_the_bit_depth_given(tmp_path):
    """--bit-depth reaches the protocol's runs and their split record, so eval rebuilds the same 12-bit images."""
    from robust_ops.reproduce import run_protocol

    data = _folder_16_bit(tmp_path / "ct")
    proto = _tiny_protocol("kfold", [("Baseline", "standard")])
    run_protocol(proto, out=tmp_path / "o", data=str(data), seeds=1, size=8, progress=False, bit_depth=12)
    run_dir = tmp_path / "o" / "runs" / "baseline" / "fold0"
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["split"]["bit_depth"] == doc["bit_depth"] == 12
    # results.json's config too: it recorded data and size, not the scale the images were read on
    assert json.loads((tmp_path / "o" / "results.json").read_text())["config"]["bit_depth"] == 12
    _, splits, _ = cli.load_run(run_dir)
    x = torch.cat([splits.train.tensors[0], splits.val.tensors[0], splits.test.tensors[0]])
    assert float(x.max()) == 1.0
    refused = r"^run_protocol: bit_depth: .* was trained with bit_depth 12, this command has no bit_depth"
    with pytest.raises(cli.CLIError, match=refused), \
            pytest.warns(UserWarning, match="12-bit data"):
        run_protocol(proto, out=tmp_path / "o", data=str(data), seeds=1, size=8, progress=False)


@pytest.mark.filterwarnings("ignore:.*a class is too small to stratify the 0.9/0.1 split")
def test_reproduce_refusal_of_other_data_settings_names_the_flag(tmp_path):
    """reproduce's check of every run named run.json's keys for a run trained on other data settings: `tiny-kfold:
    RUN_DIR was trained with data='.../a', this command has data='.../b'; rerun with its settings, ...` (likewise
    bit_depth=12 / None, size, class_counts): Python keys, where train --resume and demo name the flag."""
    from robust_ops.reproduce import run_protocol

    data = _folder_16_bit(tmp_path / "ct")
    proto = _tiny_protocol("kfold", [("Baseline", "standard")])
    out, run_dir = tmp_path / "o", tmp_path / "o" / "runs" / "baseline" / "fold0"
    run_protocol(proto, out=out, data=str(data), seeds=1, size=8, progress=False, bit_depth=12)
    way = f"or delete {run_dir} or use another --out"
    other = shutil.copytree(data, tmp_path / "copy")
    for given, message in (
            ({"data": str(other), "bit_depth": 12}, f"--data: {run_dir} was trained with --data {data}, this command "
                                                    f"has --data {other}; rerun with the --data it was trained with"),
            ({"size": 6, "bit_depth": 12}, f"--size: {run_dir} was trained on 8x8 images (--size 8), this command "
                                           "reads them at 6x6; rerun with the --size it was trained with"),
            ({"bit_depth": 13}, f"--bit-depth: {run_dir} was trained with --bit-depth 12, this command has "
                                "--bit-depth 13; rerun with the --bit-depth it was trained with")):
        with pytest.raises(cli.CLIError) as err:
            run_protocol(proto, out=out, **{"data": str(data), "seeds": 1, "size": 8, "progress": False, **given})
        assert cmd_words(err) == f"{message}, {way}"
    (data / "benign" / "0.png").unlink()  # the run's own folder, changed since
    with pytest.raises(cli.CLIError) as err:
        run_protocol(proto, out=out, data=str(data), seeds=1, size=8, progress=False, bit_depth=12)
    assert cmd_words(err) == (f"--data: {run_dir} was trained when its --data held 20 images (benign 10, malignant "
                              f"10), it now holds 19 images (benign 9, malignant 10); restore the data, {way}")


def test_reproduce_data_note_for_a_folder_named_like_the_protocols_data(small_npz, tmp_path):
    """The report's DATA: note: none for the protocol's own .npz given by path, but a class folder that merely bears
    the protocol's data name (its info.name) holds other images, and the protocol's notes do not describe it."""
    from robust_ops.reproduce import run_protocol

    proto = _tiny_protocol("seeds", [("STD", "standard")])
    proto.data = "smallbus"  # small_npz's name
    run_protocol(proto, out=tmp_path / "npz", data=str(small_npz), seeds=1, epochs=1, progress=False)
    assert "DATA:" not in (tmp_path / "npz" / "report.md").read_text()
    folder = _folder(tmp_path / "smallbus")
    run_protocol(proto, out=tmp_path / "dir", data=str(folder), seeds=1, epochs=1, size=8, progress=False)
    assert f"DATA: this run used {folder} " in (tmp_path / "dir" / "report.md").read_text()


# 10 images per class: a fold's 9:1 train/val split of its 10 training images cannot hold both classes in val
@pytest.mark.filterwarnings("ignore:.*a class is too small to stratify the 0.9/0.1 split")
def test_reproduce_on_own_folder_with_size(tmp_path, capsys):
    """--size reaches the protocol's runs and their split record (eval rebuilds the same images), and the report
    says the data is not the protocol's."""
    from robust_ops.reproduce import run_protocol

    proto = _tiny_protocol("kfold", [("Baseline", "standard")])
    run_protocol(proto, out=tmp_path / "o", data=str(_folder(tmp_path / "d")), seeds=1, size=8, progress=False)
    run_dir = tmp_path / "o" / "runs" / "baseline" / "fold0"
    assert json.loads((run_dir / "run.json").read_text())["split"]["size"] == 8
    _, splits, _ = cli.load_run(run_dir)
    assert splits.info.image_size == 8 and splits.test.tensors[0].shape[-1] == 8
    assert "DATA: this run used " in (tmp_path / "o" / "report.md").read_text()
    # a binary-only defense on 3 classes is refused before the methods ahead of it are trained
    proto = _tiny_protocol("kfold", [("Baseline", "standard"), ("ARFL", "arfl")])
    three = _folder(tmp_path / "three", classes=("benign", "malignant", "normal"))
    with pytest.raises(cli.CLIError, match=r"ARFL \(arfl\) is defined for binary tasks only; three has 3 classes"):
        run_protocol(proto, out=tmp_path / "o3", data=str(three), seeds=1, size=8, progress=False)
    assert not (tmp_path / "o3").exists()


@pytest.mark.filterwarnings("ignore:.*a class is too small to stratify the 0.9/0.1 split")
def test_reproduce_classes_keeps_a_folders_classes_records_them_and_resume_refuses_others(tmp_path, capsys):
    """reproduce had no --classes: MIRST-DM's benign / malignant out of a BUSI folder with normal/ needed a hand-made
    copy. --classes reaches the runs (run.json and its split record, so eval rebuilds the same fold), results.json
    and the report's DATA: line; a rerun keeping other classes is refused naming --classes; sources with fixed
    classes refuse it as train does; a binary-only method on three classes names --classes."""
    data = _folder(tmp_path / "d", classes=("benign", "malignant", "normal"))
    out = tmp_path / "o"
    argv = ["reproduce", "mirst-bus", "--quick", "--data", data, "--size", "8", "--seeds", "1", "--methods",
            "Baseline", "--out", out, "--no-progress", "--device", "cpu"]
    rc, _, err = run(argv + ["--classes", "benign,malignant"], capsys)
    assert rc == 0, err
    run_dir = out / "runs-quick" / "baseline" / "fold0"
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["classes"] == doc["split"]["classes"] == ["benign", "malignant"]
    assert doc["dataset"]["class_names"] == ["benign", "malignant"]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["classes"] == ["benign", "malignant"]
    assert results["dataset"]["class_names"] == ["benign", "malignant"]
    assert (f"DATA: this run used {data} (2 classes kept by --classes: benign, malignant; 8x8; positive class "
            "malignant)") in (out / "report.md").read_text()
    _, splits, _ = cli.load_run(run_dir)  # eval rebuilds the fold of the two classes
    assert splits.info.num_classes == 2 and len(splits.test) == 4
    for other, kept in ((["--classes", "malignant,benign"], "--classes malignant,benign"),
                        ([], "all of its data's classes")):
        rc, _, err = run(argv + other, capsys)
        one_line_error(rc, err, f"error: --classes: {run_dir} was trained on --classes benign,malignant, this command "
                                f"keeps {kept}; rerun with --classes benign,malignant, or delete {run_dir}")
    for name, rest in (("mirst-bus", []), ("arfl-moons", [])):  # the protocol's own data: fixed classes
        rc, _, err = run(["reproduce", name, "--quick", "--classes", "a,b", "--out", tmp_path / "x", *rest,
                          "--device", "cpu"], capsys)
        one_line_error(rc, err, "error: --classes: ", "this source has fixed classes")
    rc, _, err = run(["reproduce", "arfl-moons", "--quick", "--data", data, "--size", "8", "--out", tmp_path / "x",
                      "--device", "cpu"], capsys)
    one_line_error(rc, err, "error: --data: arfl-moons's Standard training + ARFL (arfl) is defined for binary tasks "
                            "only; d has 3 classes; keep two of its classes (benign, malignant, normal) with --classes")
    assert not (tmp_path / "x").exists()


@pytest.mark.filterwarnings("ignore:.*a class is too small to stratify")
def test_reproduce_classes_picks_dpaats_three_lesions_of_a_csv(tmp_path, capsys):
    """DPAAT's task is HAM10000's mel, bkl and nv: --classes keeps those rows of the metadata CSV (no hand-made CSV),
    three classes whose metrics are macro-averaged, and eval on the run rebuilds its split of them."""
    root = tmp_path / "ham"
    root.mkdir()
    _csv_set(root, [("mel", "bkl", "nv", "df")[k % 4] for k in range(40)], "im", "jpg")
    out = tmp_path / "o"
    rc, _, err = run(["reproduce", "dpaat-bus", "--quick", "--data", root / "meta.csv", "--classes", "bkl,mel,nv",
                      "--size", "8", "--methods", "STD", "--out", out, "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    run_dir = out / "runs-quick" / "std" / "seed0"
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["classes"] == doc["split"]["classes"] == ["bkl", "mel", "nv"]
    assert doc["dataset"]["class_names"] == ["bkl", "mel", "nv"] and sum(doc["dataset"]["class_counts"].values()) == 30
    assert "3 classes kept by --classes: bkl, mel, nv; 8x8; macro-averaged metrics" in (out / "report.md").read_text()
    model, splits, _ = cli.load_run(run_dir)
    assert splits.info.num_classes == 3 and set(splits.test.tensors[1].tolist()) <= {0, 1, 2}


def test_reproduce_kfold_on_a_class_smaller_than_the_folds_is_a_one_line_error(tmp_path, capsys):
    """mirst-bus's 5 folds need 5 samples of every class: fewer is an error naming --data, not a traceback."""
    data = _folder(tmp_path / "d", n=4)
    rc, _, err = run(["reproduce", "mirst-bus", "--quick", "--data", data, "--size", "8", "--out", tmp_path / "o",
                      "--no-progress", "--device", "cpu"], capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"robust-ops reproduce: error: --data: {data} cannot be split into 5 stratified "
                                    "cross-validation folds (cross_validation: the smallest class has 4 samples, "
                                    "fewer than k=5 folds)")
    assert not (tmp_path / "o" / "runs-quick").exists()


def test_warnings_are_one_line(tmp_path, capsys):
    _folder(tmp_path / "d")
    _folder(tmp_path / "d", n=1, classes=("normal",))
    rc, out, err = run(["train", "--data", tmp_path / "d", "--size", "8", "--model", "mlp", "--epochs", "1", "--out",
                        tmp_path / "run", "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert err.strip().splitlines() == [f"robust-ops train: warning: {tmp_path / 'd'}: a class is too small to "
                                        "stratify the 0.7/0.1/0.2 split (smallest: normal, 1 sample); the other "
                                        "classes are stratified and normal placed at random and leaves out normal "
                                        "from val; normal from test"]
    assert "classes: benign = 0, malignant = 1, normal = 2; metrics macro-averaged over classes" in out


def test_a_split_made_by_the_old_rare_class_rule_is_rebuilt_by_eval_and_refused_by_resume(tmp_path, capsys):
    """A class too small to stratify made every class's split random until 2026-12-06 (now the others stay
    stratified, run.json's dataset records rare_classes 'merge'). A run whose run.json records no rule was split the
    old way: eval rebuilds that split (else it could test on training images), --resume is refused, saying so."""
    import warnings

    data = _folder(tmp_path / "d")
    _folder(tmp_path / "d", n=1, classes=("normal",))
    out = tmp_path / "run"
    args = ["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--out", out, "--no-progress",
            "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*too small to stratify")
        assert run(args, capsys)[0] == 0
        record = json.loads((out / "run.json").read_text())
        assert record["dataset"]["rare_classes"] == "merge"
        missing = {"new": record["dataset"]["classes_missing_from_split"]}
        eval_args = ["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
        assert run(eval_args + ["--out", tmp_path / "e1"], capsys)[0] == 0
        assert json.loads((tmp_path / "e1/results.json").read_text())["dataset"]["classes_missing_from_split"] == \
            missing["new"]
        rc, _, err = run(args[:8] + ["2"] + args[9:] + ["--resume"], capsys)  # the rule it records: continues
        assert rc == 0, err
        record = json.loads((out / "run.json").read_text())
        del record["dataset"]["rare_classes"]  # as a run trained before the rule was recorded
        (out / "run.json").write_text(json.dumps(record))
        rc, _, err = run(eval_args + ["--out", tmp_path / "e2"], capsys)
        assert rc == 0, err
        old = json.loads((tmp_path / "e2/results.json").read_text())["dataset"]["classes_missing_from_split"]
        assert old == {"train": ["normal"], "val": ["benign", "normal"]} != missing["new"]  # the old rule's parts
        rc, _, err = run(args[:8] + ["3"] + args[9:] + ["--resume"], capsys)
    assert rc == 2 and err.splitlines()[-1] == (
        f"robust-ops train: error: --resume: {out / 'run.json'} was trained on a split drawn before 2026-12-06, when a "
        "class too small to stratify made every class's split random; this version stratifies the other classes, so "
        "the training images would differ. `robust-ops eval` still tests the run on its own split; to continue it, "
        "in Python, load_dataset(..., rare_classes='random') and fit(..., resume=); or train it again without "
        "--resume"), err


def test_demo_and_reproduce_refuse_an_old_rare_class_split_naming_their_way_on(tmp_path, capsys):
    """demo's and reproduce's rerun of a run split by the old rare-class rule said only "was trained with
    rare_classes='random', this command has rare_classes='merge'" (reproduce: "rerun with its settings", which no
    option sets); they now say why, as train does, and what is left: demo the Python way, reproduce none."""
    import warnings

    from robust_ops.reproduce import run_protocol

    data = _folder(tmp_path / "d")
    _folder(tmp_path / "d", n=1, classes=("normal",))

    def forget_rule(run_dir):  # as a run trained before the rule was recorded
        record = json.loads((run_dir / "run.json").read_text())
        del record["dataset"]["rare_classes"]
        (run_dir / "run.json").write_text(json.dumps(record))

    demo = ["demo", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--train-size", "0",
            "--methods", "standard", "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--out",
            tmp_path / "demo", "--no-progress", "--device", "cpu"]
    protocol = _tiny_protocol("seeds", [("Baseline", "standard")])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*too small to stratify")
        assert run(demo, capsys)[0] == 0
        forget_rule(tmp_path / "demo" / "runs" / "standard")
        rc, _, err = run(demo + ["--resume"], capsys)
        run_protocol(protocol, out=tmp_path / "rep", data=str(data), seeds=1, size=8, progress=False)
        run_dir = tmp_path / "rep" / "runs" / "baseline" / "seed0"
        forget_rule(run_dir)
        with pytest.raises(cli.CLIError) as refused:
            run_protocol(protocol, out=tmp_path / "rep", data=str(data), seeds=1, size=8, progress=False)
    why = ("was trained on a split drawn before 2026-12-06, when a class too small to stratify made every class's "
           "split random; this version stratifies the other classes, so the training images would differ. "
           "`robust-ops eval` still tests the run on its own split; ")
    line = one_line_error(rc, err, f"--resume: {tmp_path / 'demo' / 'runs' / 'standard' / 'run.json'} {why}")
    assert line.endswith(f"{why}to continue it, in Python, load_dataset(..., rare_classes='random') and fit(..., "
                         "resume=); or rerun without --resume, or use another --out"), line
    assert cmd_words(refused) == (f"tiny-seeds: {run_dir / 'run.json'} {why}no option of reproduce draws that split "
                                  f"again, so it cannot continue the run: delete {run_dir} or use another --out")


def test_saliency_on_feature_vectors(tmp_path, capsys):
    """Saliency maps are drawn over images: on two-moons points the default makes none (docs/cli.md), an explicit
    --saliency N > 0 is an error (it gave no figure without a word), before demo trains anything."""
    out = tmp_path / "m"
    rc, _, err = run(["train", "--data", "moons", "--model", "mlp", "--epochs", "1", "--out", out, "--no-progress",
                      "--device", "cpu"], capsys)
    assert rc == 0, err
    evaluate = ["eval", out, "--attacks", "fgsm", "--eps", "0.1", "--device", "cpu"]
    rc, _, err = run(evaluate + ["--saliency", "2", "--out", tmp_path / "e1"], capsys)
    one_line_error(rc, err, "--saliency: two-moons (synthetic) holds feature vectors of 2 values, not images; "
                            "saliency maps need image inputs -- drop --saliency (or set it to 0)")
    assert not (tmp_path / "e1").exists()
    for extra in ([], ["--saliency", "0"]):  # the default, and an explicit none: no figure, no word
        rc, _, err = run(evaluate + extra + ["--out", tmp_path / "e2"], capsys)
        assert rc == 0 and err == "", err
        assert not list((tmp_path / "e2").glob("saliency*"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("saliency: 4\n")  # a config file's value is asked for, as the flag is
    rc, _, err = run(["demo", "--config", cfg, "--data", "moons", "--model", "mlp", "--quick", "--methods",
                      "standard", "--attacks", "fgsm", "--eps", "0.1", "--out", tmp_path / "d", "--device", "cpu"],
                     capsys)
    one_line_error(rc, err, "--saliency: two-moons (synthetic) holds feature vectors")
    assert not (tmp_path / "d" / "runs").exists()


def test_saliency_default_on_images_is_four():
    info = cli.load_data("synthetic", size=8).info
    args = _config_args("eval", ["run"])
    assert args.saliency is None and cli.saliency_count(args, info) == 4
    assert cli.saliency_count(_config_args("eval", ["run", "--saliency", "2"]), info) == 2


def test_evaluate_models_draws_as_many_saliency_images_as_asked(tmp_path, monkeypatch):
    """--saliency N puts N test images in the figure (4 by default, none for 0)."""
    import robust_ops.evaluate
    import robust_ops.report

    drawn = []

    def write_results(out, rows, info, saliency=None, **kwargs):
        drawn.append(None if saliency is None else len(saliency[1]))
        return {"results": "results.json", "report": "report.md", "figures": []}

    monkeypatch.setattr(robust_ops.evaluate, "evaluate", lambda *args, **kwargs: [])
    monkeypatch.setattr(robust_ops.evaluate, "write_results", write_results)
    monkeypatch.setattr(robust_ops.report, "pivot_table", lambda rows, metric: "")
    splits = cli.load_data("synthetic", size=8)
    for extra in ([], ["--saliency", "2"], ["--saliency", "0"]):
        args = _config_args("eval", ["run", *extra])
        cli.evaluate_models({"m": None}, splits, args, [], [], "cpu", tmp_path, "title", {}, seed=0)
    assert drawn == [4, 2, None]


def test_switches_a_config_file_sets_can_be_turned_off(tmp_path):
    """quick: true in a demo config could not be undone on the command line (store_true): every on/off flag a
    config file can set has its opposite (--quick / --no-quick, --no-progress / --progress), the command line wins."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("quick: true\nno-progress: true\nensemble: true\nresume: true\n")
    assert _config_args("demo", ["--config", str(cfg)]).quick is True
    args = _config_args("demo", ["--config", str(cfg), "--no-quick", "--progress", "--no-ensemble", "--no-resume"])
    assert (args.quick, args.no_progress, args.ensemble, args.resume) == (False, False, False, False)
    assert _config_args("demo", ["--no-quick", "--quick"]).quick is True  # the last one given wins, as for any flag
    for command, argv in (("train", []), ("eval", ["run"]), ("demo", []), ("reproduce", ["arfl-moons"])):
        parser = cli.build_parser()[1][command]
        switches = [a for a in parser._actions if a.nargs == 0 and a.dest not in ("help", "version")]
        assert switches and all(isinstance(a, cli.Switch) for a in switches), command
        for action in switches:
            flag = action.option_strings[0]
            args = _config_args(command, argv + [flag])
            assert getattr(args, action.dest) is True, flag
            opposite = action.option_strings[-1]
            assert getattr(_config_args(command, argv + [flag, opposite]), action.dest) is False, opposite
    cfg.write_text("quick: true\n")  # demo's --quick-versus---epochs refusal names the way out
    with pytest.raises(cli.CLIError, match=r"--epochs: --quick sets its own .* \(--no-quick turns off a config "):
        cli.cmd_demo(_config_args("demo", ["--config", str(cfg), "--epochs", "3", "--device", "cpu"]))
    args = _config_args("demo", ["--config", str(cfg), "--no-quick", "--epochs", "3"])
    assert (args.quick, args.epochs) == (False, 3)


def test_usage_line_shows_both_names_of_a_switch(capsys):
    """`--help`'s usage line listed only `[--quick]`: a user reading it could not know `--no-quick` exists."""
    for command, pair in (("demo", "[--quick | --no-quick]"), ("train", "[--no-progress | --progress]"),
                          ("eval", "[--no-cascade | --cascade]"), ("reproduce", "[--reevaluate | --no-reevaluate]")):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        usage = capsys.readouterr().out.split("\n\n")[0]
        assert pair in " ".join(usage.split()), (command, usage)


@pytest.mark.parametrize("argv, needle", [
    (["--data", "moons", "--size", "28"], "--size: moons: --size resizes images; two-moons holds 2-d points -- "
                                          "drop --size"),
    (["--data", "synthetic", "--classes", "a,b"],
     "--classes: synthetic: --classes selects class folders or CSV labels"),
    (["--data", "breastmnist", "--size", "30"], "--size: breastmnist: MedMNIST images come in sizes 28, 64, 128, 224, "
                                                "got --size 30; pick one of those"),
    (["--data", "synthetic", "--size", "4"], "--size: synthetic: expected size >= 8, got --size 4"),
    (["--data", "breastmnist_64", "--size", "28"], "--size: breastmnist_64: the name says size 64 but --size 28 was "
                                                   "requested"),
])
def test_data_errors_name_the_flag(argv, needle, tmp_path, capsys):
    """The data layer's messages name load_dataset's keywords (size=, classes=); the command line names its flags."""
    rc, _, err = run(["train", *argv, "--out", tmp_path / "r", "--device", "cpu"], capsys)
    line = one_line_error(rc, err, f"robust-ops train: error: {needle}")
    assert "size=" not in line and "classes=" not in line


def test_data_errors_name_the_flag_for_folders(small_npz, tmp_path, capsys):
    """Nor do they name the loader's function: a repeated --classes name on a folder or CSV said `--classes:
    load_busi(DIR): ...` (load_csv(FILE) on a CSV)."""
    _folder(tmp_path / "d")
    (tmp_path / "c").mkdir()
    _csv_set(tmp_path / "c", ["nv", "mel"] * 3, "im", "png")
    for argv, needle in ((["--data", small_npz, "--size", "64"], f"--size: {small_npz}: images are 28x28, but "
                                                                 "--size 64 was requested"),
                         (["--data", tmp_path / "d", "--size", "0"], "--size: expected an image side length >= 1"),
                         (["--data", tmp_path / "d", "--classes", "benign,benign"],
                          f"--classes: {tmp_path / 'd'}: --classes lists benign more than once"),
                         (["--data", tmp_path / "c" / "meta.csv", "--classes", "nv,nv"],
                          f"--classes: {tmp_path / 'c' / 'meta.csv'}: --classes lists nv more than once"),
                         (["--data", tmp_path / "d", "--classes", "benign,normal"], "--classes: "),
                         (["--data", tmp_path / "d", "--classes", "benign"], "--classes: ")):
        rc, _, err = run(["train", *argv, "--out", tmp_path / "r", "--device", "cpu"], capsys)
        line = one_line_error(rc, err, needle)
        assert "size=" not in line and "classes=" not in line and "load_" not in line, line
    rc, _, err = run(["train", "--data", tmp_path / "missing", "--out", tmp_path / "r", "--device", "cpu"], capsys)
    one_line_error(rc, err, "--data: ")  # not about a keyword: still the --data flag
    # only the keyword itself is rewritten, not a folder name that ends in it
    folder = _folder(tmp_path / "a_size=8" / "img_size=")
    rc, _, err = run(["train", "--data", folder, "--classes", "benign,benign", "--out", tmp_path / "r", "--device",
                      "cpu"], capsys)
    one_line_error(rc, err, f"--classes: {folder}: --classes lists benign")


@pytest.mark.parametrize("command", ["train", "eval", "demo", "reproduce"])
def test_size_and_bit_depth_out_of_range_are_refused_by_the_flag(command, small_npz, tmp_path, capsys):
    """--size 0 and --bit-depth 4 or 17 were refused by the loader in its own words, naming its function and keyword
    (`--bit-depth: load_busi(DIR): expected bit_depth to be an integer >= 8, got 4`), or on an .npz as a size to
    drop ('images are 28x28, but --size 0 was requested'); now by the flag's range, before any data is read."""
    head = {"train": ["train", "--data", small_npz], "eval": ["eval", tmp_path / "no-run"],
            "demo": ["demo", "--data", small_npz], "reproduce": ["reproduce", "mirst-bus"]}[command]
    for flag, value, needle in (("--size", "0", "--size: expected an image side length >= 1, got 0"),
                                ("--size", "-3", "--size: expected an image side length >= 1, got -3"),
                                ("--bit-depth", "17", "--bit-depth: expected 8 to 16 ("),
                                ("--bit-depth", "4", "--bit-depth: expected 8 to 16 (")):
        rc, stdout, err = run(head + [flag, value, "--out", tmp_path / "o", "--device", "cpu"], capsys)
        line = one_line_error(rc, err, needle)
        assert "load_" not in line and "bit_depth" not in line and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_npz_image_size_errors_say_what_to_do(small_npz, tmp_path, capsys):
    """An .npz of non-square images (RGB dermoscopy, 48x64) was refused as "expected square images, got 48x64", and a
    --size on an .npz as "images are 28x28, but --size 64 was requested": neither said how to go on (an .npz is never
    resized; image files are padded to square)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 48, 64, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 7).reshape(-1, 1).astype(np.uint8)
    np.savez(tmp_path / "derm.npz", **arrays)
    rc, _, err = run(["train", "--data", tmp_path / "derm.npz", "--out", tmp_path / "r", "--device", "cpu"], capsys)
    line = one_line_error(rc, err, f"--data: {tmp_path / 'derm.npz'}: expected square images, got 48x64 (height x "
                                   "width); an .npz is read as stored: pad or resize them to square before saving it, "
                                   "or save them as image files (class folders or a CSV), which are zero-padded to "
                                   "square and resized (--size)")
    assert "size=" not in line
    rc, _, err = run(["train", "--data", small_npz, "--size", "64", "--out", tmp_path / "r", "--device", "cpu"],
                     capsys)
    one_line_error(rc, err, f"--size: {small_npz}: images are 28x28, but --size 64 was requested; an .npz is read at "
                            "its own size -- drop --size or resize the file")


def test_eval_of_a_checkpoint_of_the_users_own_model_says_to_evaluate_it_in_python(small_npz, tmp_path, capsys):
    """A model of the user's own, saved as fit's out_dir in Python writes it (checkpoint.pt, no run.json), met "no
    run.json beside the checkpoint; pass --data and --model" and then "does not fit --model small_cnn ... (Missing
    key(s) ...)": no --model rebuilds it, and neither error said where such a model is evaluated."""
    own = tmp_path / "own"
    own.mkdir()
    torch.save({"head.weight": torch.zeros(2, 8), "head.bias": torch.zeros(2)}, own / "checkpoint.pt")
    hint = ("--model builds the library's models only; a model of your own, trained in Python, is evaluated in "
            "Python: robust_ops.evaluate.evaluate")
    rc, _, err = run(["eval", own, "--out", tmp_path / "e", "--device", "cpu"], capsys)
    one_line_error(rc, err, f"{own}: no run.json beside the checkpoint; pass --data and --model; {hint}")
    rc, _, err = run(["eval", own, "--data", small_npz, "--model", "small_cnn", "--out", tmp_path / "e", "--device",
                      "cpu"], capsys)
    assert one_line_error(rc, err, "checkpoint.pt: does not fit --model small_cnn on smallbus (Missing key(s) in "
                                   "state_dict: ").endswith(f"); {hint}")
    assert not (tmp_path / "e").exists()


def test_eval_of_a_checkpoint_trained_inside_normalized_says_so(small_npz, tmp_path, capsys):
    """A model trained in Python wrapped in attacks.Normalized (ImageNet mean / std) saves its weights under 'model.'
    beside 'mean' and 'std': eval refused it with load_state_dict's "Missing key(s) ..." alone."""
    from robust_ops.attacks import Normalized
    from robust_ops.models import build_model

    torch.save(Normalized(build_model("small_cnn", 1, 2, 28), 0.5, 0.25).state_dict(), tmp_path / "norm.pt")
    rc, _, err = run(["eval", tmp_path / "norm.pt", "--data", small_npz, "--model", "small_cnn", "--device", "cpu",
                      "--out", tmp_path / "e"], capsys)
    one_line_error(rc, err, "norm.pt: does not fit --model small_cnn", "; its weights are small_cnn's inside a "
                   "wrapper (under 'model.', beside mean, std: trained wrapped, e.g. in attacks.Normalized(model, "
                   "mean, std), whose input scaling the command line cannot rebuild) -- evaluate the wrapped model in "
                   "Python (robust_ops.evaluate.evaluate)")
    assert not (tmp_path / "e").exists()
    # another model's weights are not called wrapped
    torch.save(build_model("mlp", 1, 2, 28).state_dict(), tmp_path / "mlp.pt")
    rc, _, err = run(["eval", tmp_path / "mlp.pt", "--data", small_npz, "--model", "small_cnn", "--device", "cpu",
                      "--out", tmp_path / "e"], capsys)
    assert "wrapper" not in one_line_error(rc, err, "mlp.pt: does not fit --model small_cnn")


def test_the_wrapper_hint_names_the_same_prefix_whatever_the_hash_seed():
    """_wrapped_weights tried the prefixes in a set's order, so a file holding the weights twice (under 'a.' and
    'b.') was said to wrap them under either, run by run (string hashes are salted per process)."""
    # cli.py loaded alone: no torch import, 12 runs in a second or two
    probe = ("import sys, importlib.util as u; spec = u.spec_from_file_location('cli', sys.argv[1])\n"
             "cli = u.module_from_spec(spec); spec.loader.exec_module(cli)\n"
             "class Net:\n    def state_dict(self): return {'w': 0, 'b': 0}\n"
             "print(cli._wrapped_weights(Net(), {f'{p}.{k}': 0 for p in 'ba' for k in 'wb'}))")
    answers = {subprocess.run([sys.executable, "-c", probe, cli.__file__], capture_output=True,
                              text=True, check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
               for seed in range(12)}
    assert answers == {"under 'a.', beside b.b, b.w\n"}


def test_write_json_atomic_ends_in_a_newline_and_keeps_the_old_file_on_an_interrupt(tmp_path, monkeypatch):
    """run.json and the eval caches: the old file until the new one is complete, no temporary file left behind."""
    from robust_ops import _files

    path = tmp_path / "run.json"
    cli.write_json_atomic(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(_files.os, "replace", interrupted)  # the new file is written, not yet in place
    with pytest.raises(KeyboardInterrupt):
        cli.write_json_atomic(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_bare_state_dict_loads_unchecked_as_the_model_named(trained_run, small_npz, tmp_path):
    """A bare state dict (torch.save(model.state_dict()), no run.json) records no DropMax2d layers: it loads as
    --model, unchecked, rather than failing in the drop-max check."""
    import torch

    weights = torch.load(trained_run / "checkpoint.pt", weights_only=True)["model"]
    torch.save(weights, tmp_path / "weights.pt")
    model_name = json.loads((trained_run / "run.json").read_text())["model"]
    net = cli.load_run(tmp_path / "weights.pt", data=small_npz, model=model_name)[0]
    assert net.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())


@pytest.mark.filterwarnings("ignore:.*a class is too small to stratify the 0.9/0.1 split")
def test_demo_and_reproduce_resume_under_the_prepacked_conv_variable(tmp_path, capsys, monkeypatch):
    """$ROBUST_OPS_PREPACKED_CONV=1: training packs and run.json records prepacked_conv true; the checks of demo
    --resume and of a rerun reproduce, made before any training, compared it with false and refused the same
    command."""
    from robust_ops.reproduce import run_protocol

    monkeypatch.setenv("ROBUST_OPS_PREPACKED_CONV", "1")
    data = _folder(tmp_path / "d")
    argv = ["demo", "--data", data, "--size", "8", "--model", "mlp", "--quick", "--methods", "standard", "--attacks",
            "fgsm", "--eps", "1/255", "--saliency", "0", "--out", tmp_path / "demo", "--no-progress", "--device", "cpu"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "demo" / "runs" / "standard" / "run.json").read_text())["prepacked_conv"] is True
    rc, _, err = run(argv + ["--resume"], capsys)
    assert rc == 0, err
    proto = _tiny_protocol("seeds", [("STD", "standard")])
    proto.model = "mlp"
    run_protocol(proto, out=tmp_path / "o", data=str(data), seeds=1, size=8, progress=False)
    run_protocol(proto, out=tmp_path / "o", data=str(data), seeds=1, size=8, progress=False)  # the same command again
    monkeypatch.delenv("ROBUST_OPS_PREPACKED_CONV")  # another setting: still refused
    rc, _, err = run(argv + ["--resume"], capsys)
    one_line_error(rc, err, "--resume:", "prepacked_conv=True, this command has prepacked_conv=False")


def test_defense_spelled_otherwise_is_recorded_as_the_registry_names_it(tmp_path, capsys):
    """--defense MIRST-DM (or mirst_dm) trains mirst-dm, which makes the first max-pooling drop-max; run.json
    recorded the name as typed and dropmax none, so eval rebuilt plain max-pooling and refused the run's own
    checkpoint. The registered name is recorded, so eval rebuilds the model trained and --resume with either
    spelling is the same run."""
    out = tmp_path / "run"
    argv = ["train", "--data", _folder(tmp_path / "d"), "--size", "8", "--epochs", "1", "--out", out, "--no-progress",
            "--device", "cpu", "--defense", "MIRST-DM"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    doc = json.loads((out / "run.json").read_text())
    assert (doc["defense"], doc["dropmax"], doc["label"]) == ("mirst-dm", "first", "mirst-dm")
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"],
                     capsys)
    assert rc == 0, err
    rc, _, err = run(argv[:-1] + ["mirst_dm", "--epochs", "2", "--resume"], capsys)
    assert rc == 0, err
    # a run.json written before: the name as typed, dropmax none -- eval and the same command's --resume take it
    (out / "run.json").write_text(json.dumps({**doc, "defense": "MIRST-DM", "dropmax": "none", "epochs": 2}))
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu",
                      "--out", tmp_path / "old"], capsys)
    assert rc == 0, err
    rc, _, err = run(argv + ["--epochs", "3", "--resume"], capsys)
    assert rc == 0, err


def test_train_summary_names_the_defense_as_run_json_records_it(tmp_path, capsys):
    """train --defense MIRST_DM printed 'trained MIRST_DM on ...' while run.json, eval's tables and --resume call the
    run mirst-dm; the summary line now names it as run.json does."""
    out = tmp_path / "run"
    rc, stdout, err = run(["train", "--data", _folder(tmp_path / "d"), "--size", "8", "--epochs", "1", "--out", out,
                           "--no-progress", "--device", "cpu", "--defense", "MIRST_DM"], capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["defense"] == "mirst-dm"
    assert stdout.startswith("trained mirst-dm on "), stdout


def test_reproduce_methods_with_an_empty_entry(capsys):
    """--methods STD, (a trailing or doubled comma) was refused as 'has no method (none given)' although STD was
    given; empty entries are skipped, as demo's --methods skips them."""
    from robust_ops.reproduce import PROTOCOLS, pick_methods

    assert [m.label for m in pick_methods(PROTOCOLS["ima-bus"], "STD,,ima,".split(","))] == ["STD", "IMA"]
    for methods in (",", " "):
        rc, _, err = run(["reproduce", "ima-bus", "--methods", methods, "--device", "cpu"], capsys)
        one_line_error(rc, err, "--methods: ima-bus has no method (none given); choose from STD, SAT, TRADES, IMA")


def test_reproduce_methods_given_twice_are_refused_as_demo_refuses_them(tmp_path, capsys):
    """--methods STD,std ran STD once, silently (demo refuses a repeated method: a second entry was likely meant to be
    another method)."""
    rc, _, err = run(["reproduce", "ima-bus", "--methods", "STD,IMA,std", "--device", "cpu", "--epochs", "1",
                      "--seeds", "1", "--out", tmp_path / "o"], capsys)
    one_line_error(rc, err, "--methods: std given more than once")
    assert not (tmp_path / "o").exists()


def test_eval_of_a_run_without_its_checkpoint_or_of_a_pickle_that_holds_no_weights(trained_run, tmp_path, capsys):
    """Two refusals of eval no test reached: a run folder whose checkpoint.pt is gone (a run stopped before its first
    epoch ended keeps run.json alone), and a torch.save file that holds neither a fit checkpoint nor a state_dict."""
    import torch

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "checkpoint.pt").unlink()
    rc, _, err = run(["eval", run_dir, "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "ev"], capsys)
    one_line_error(rc, err, f"{run_dir / 'checkpoint.pt'}: no such checkpoint file")
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    rc, _, err = run(["eval", listed, "--data", "synthetic", "--size", "8", "--model", "mlp", "--attacks", "fgsm",
                      "--eps", "1/255", "--out", tmp_path / "ev"], capsys)
    one_line_error(rc, err, f"{listed}: expected a fit checkpoint or a state_dict, got list")
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("text, needle", [("[1, 2]", "expected a JSON object of the run's settings, got list"),
                                          ("{\"data\": ", "not valid JSON (")])
def test_run_json_that_is_not_an_object_is_a_one_line_error(trained_run, tmp_path, capsys, text, needle):
    # a list used to end eval and train --resume with AttributeError: 'list' object has no attribute 'get'; both
    # errors also say what to do, as one of a setting of another type does (they named the file alone)
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "run.json").write_text(text)
    way_out = "; the file was edited or damaged -- restore the run's own run.json, or train it again"
    rc, _, err = run(["eval", run_dir, "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "ev"], capsys)
    assert one_line_error(rc, err, f"{run_dir / 'run.json'}: {needle}").endswith(way_out)
    rc, _, err = run(["train", "--data", "synthetic", "--epochs", "2", "--out", run_dir, "--resume", "--no-progress",
                      "--device", "cpu"], capsys)
    assert one_line_error(rc, err, f"{run_dir / 'run.json'}: {needle}").endswith(way_out)
    assert (run_dir / "run.json").read_text() == text


@pytest.mark.parametrize("key, value, needle", [("dataset", "x", 'expected dataset to be an object, got "x"'),
                                               ("split", "x", 'expected split to be an object, got "x"'),
                                               ("classes", 5, "expected classes to be a list, got 5"),
                                               ("prepacked_conv", "x", 'expected prepacked_conv to be true or false'),
                                               ("epochs", True, "expected epochs to be an integer, got true"),
                                               # eval said "--dropmax: replace_maxpool: ...", a flag eval lacks
                                               ("dropmax", "some", 'expected dropmax to be one of none, first, all, '
                                                                   'got "some"')])
def test_run_json_setting_of_another_type_is_a_one_line_error(trained_run, tmp_path, capsys, key, value, needle):
    # a hand-edited value ended eval (and train --resume, for dataset) in a traceback: AttributeError: 'str' object has
    # no attribute 'get', TypeError: 'int' object is not iterable, TypeError from prepacked_conv
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    text = json.dumps({**json.loads((run_dir / "run.json").read_text()), key: value})
    (run_dir / "run.json").write_text(text)
    rc, _, err = run(["eval", run_dir, "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "ev"], capsys)
    one_line_error(rc, err, f"{run_dir / 'run.json'}: {needle}", "restore the run's own run.json")
    rc, _, err = run(["train", "--data", "synthetic", "--epochs", "2", "--out", run_dir, "--resume", "--no-progress",
                      "--device", "cpu"], capsys)
    one_line_error(rc, err, f"{run_dir / 'run.json'}: {needle}")
    assert (run_dir / "run.json").read_text() == text and not (tmp_path / "ev").exists()


def test_resume_of_a_checkpoint_without_run_json_on_another_model_is_a_one_line_error(trained_run, small_npz,
                                                                                      tmp_path, capsys):
    # no run.json to compare (a fit() run from Python, or run.json removed): fit's load_state_dict raised its
    # RuntimeError through the CLI as a traceback. The weights of another --model are refused before training, naming
    # it; weights no --model has are left to fit, which names the first mismatch
    import torch

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(trained_run / "checkpoint.pt", run_dir)
    argv = ["train", "--data", small_npz, "--model", "resnet18", "--epochs", "2", "--out", run_dir, "--resume",
            "--no-progress", "--device", "cpu"]
    rc, _, err = run(argv, capsys)
    one_line_error(rc, err, f"--resume: {run_dir / 'checkpoint.pt'} was trained with --model small_cnn, this command "
                   "has --model resnet18; rerun with the run's settings")
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["model"]["extra"] = torch.zeros(1)
    torch.save(state, run_dir / "checkpoint.pt")
    rc, _, err = run(argv, capsys)
    one_line_error(rc, err, f"{run_dir}: training failed: fit: cannot resume {run_dir / 'checkpoint.pt'}: its weights "
                   "do not fit this model (", 'key(s) in state_dict: ')


@pytest.mark.parametrize("flags", [["--dropmax", "all", "--channels-last"],
                                   ["--defense", "mirst-dm", "--prepacked-conv"],
                                   ["--defense", "arfl", "--model", "mlp"]])
def test_resume_of_a_checkpoint_without_run_json_continues_a_model_the_command_builds(small_npz, tmp_path, capsys,
                                                                                      flags):
    # the check naming the --model a checkpoint's weights are (no run.json to name it) compares them with the model
    # the command builds: DropMax2d layers, NHWC and prepacked convolutions, a single-logit head change none of them
    import torch

    argv = ["train", "--data", small_npz, "--out", tmp_path / "run", "--no-progress", "--device", "cpu", *flags]
    assert run(argv + ["--epochs", "1"], capsys)[0] == 0
    (tmp_path / "run" / "run.json").unlink()
    rc, _, err = run(argv + ["--epochs", "2", "--resume"], capsys)
    assert rc == 0, err
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_eval_refuses_a_checkpoint_from_another_run_beside_run_json(small_npz, tmp_path, capsys):
    # eval took the weights of whatever checkpoint.pt lay beside run.json: a TRADES checkpoint copied into an AT run
    # was attacked, labelled "at" and recorded with the AT run's settings, exit 0
    base = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--epochs", "1",
            "--defense-opt", "steps=1"]
    assert run(base + ["--defense", "at", "--out", tmp_path / "at"], capsys)[0] == 0
    assert run(base + ["--defense", "trades", "--out", tmp_path / "trades"], capsys)[0] == 0
    ev = ["eval", "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    assert run(ev + [tmp_path / "at", "--out", tmp_path / "ev_at"], capsys)[0] == 0
    shutil.copy(tmp_path / "trades" / "checkpoint.pt", tmp_path / "at" / "checkpoint.pt")
    rc, _, err = run(ev + [tmp_path / "at", "--out", tmp_path / "ev"], capsys)
    one_line_error(rc, err, f"{tmp_path / 'at' / 'checkpoint.pt'}: was trained with defense='trades', but "
                   f"{tmp_path / 'at' / 'run.json'} beside it records defense='at'", "comes from another run")
    assert not (tmp_path / "ev").exists()
    run_json = json.loads((tmp_path / "trades" / "run.json").read_text())
    (tmp_path / "trades" / "run.json").write_text(json.dumps({**run_json, "seed": 3}))
    rc, _, err = run(ev + [tmp_path / "trades" / "checkpoint.pt", "--out", tmp_path / "ev"], capsys)
    one_line_error(rc, err, "was trained with seed=0, but", "records seed=3")


def test_eval_refuses_a_checkpoint_of_another_memory_format_or_training_set_size_beside_run_json(small_npz, tmp_path,
                                                                                                  capsys):
    # a --channels-last (--prepacked-conv) run's checkpoint beside a plain run's run.json, defense, seed, batch size
    # and lr the same, was attacked as the plain run, exit 0; so was one trained on another number of samples (a demo
    # run's --train-size subset)
    base = ["train", "--data", small_npz, "--no-progress", "--device", "cpu", "--epochs", "1"]
    assert run(base + ["--out", tmp_path / "plain"], capsys)[0] == 0
    assert run(base + ["--channels-last", "--out", tmp_path / "cl"], capsys)[0] == 0
    ev = ["eval", "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    shutil.copy(tmp_path / "cl" / "checkpoint.pt", tmp_path / "plain" / "checkpoint.pt")
    rc, _, err = run(ev + [tmp_path / "plain", "--out", tmp_path / "ev"], capsys)
    one_line_error(rc, err, f"{tmp_path / 'plain' / 'checkpoint.pt'}: was trained with channels_last=True, but "
                   f"{tmp_path / 'plain' / 'run.json'} beside it records channels_last=False", "comes from another run")
    run_json = json.loads((tmp_path / "cl" / "run.json").read_text())
    (tmp_path / "cl" / "run.json").write_text(json.dumps({**run_json, "train_samples": 40}))
    rc, _, err = run(ev + [tmp_path / "cl", "--out", tmp_path / "ev"], capsys)
    one_line_error(rc, err, "was trained with train_samples=64, but", "records train_samples=40")
    assert not (tmp_path / "ev").exists()
    (tmp_path / "cl" / "run.json").write_text(json.dumps(run_json))
    assert run(ev + [tmp_path / "cl", "--out", tmp_path / "ev"], capsys)[0] == 0


def test_eval_refuses_a_checkpoint_trained_on_other_images_beside_run_json(tmp_path, capsys):
    # a run's checkpoint trained at --size 16 beside another run's run.json (--size 12; defense, seed, batch size, lr
    # and sample count the same) was attacked as that run, exit 0: small_cnn takes any size. run.json now records the
    # training set's fingerprint, which the checkpoint holds too
    base = ["train", "--data", "synthetic", "--model", "small_cnn", "--no-progress", "--device", "cpu", "--epochs", "1"]
    assert run(base + ["--size", "12", "--out", tmp_path / "a"], capsys)[0] == 0
    assert run(base + ["--size", "16", "--out", tmp_path / "b"], capsys)[0] == 0
    recorded = json.loads((tmp_path / "a" / "run.json").read_text())["train_data_sha256"]
    assert recorded == torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["config"]["train_data_sha256"]
    shutil.copy(tmp_path / "b" / "checkpoint.pt", tmp_path / "a" / "checkpoint.pt")
    ev = ["eval", "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    rc, _, err = run(ev + [tmp_path / "a", "--out", tmp_path / "ev"], capsys)
    one_line_error(rc, err, f"{tmp_path / 'a' / 'checkpoint.pt'}: was trained with train_data_sha256=",
                   f"but {tmp_path / 'a' / 'run.json'} beside it records train_data_sha256={recorded[:12] + '...'!r}",
                   "comes from another run")
    assert not re.search(r"[0-9a-f]{64}", err)  # 12 digits of each digest, not 64 (a line of 330 characters)
    assert not (tmp_path / "ev").exists()
    # a run.json written before the record: not compared (the weights load, as before)
    run_json = json.loads((tmp_path / "a" / "run.json").read_text())
    del run_json["train_data_sha256"]
    (tmp_path / "a" / "run.json").write_text(json.dumps(run_json))
    assert run(ev + [tmp_path / "a", "--out", tmp_path / "ev"], capsys)[0] == 0


def test_eval_of_an_interrupted_run_warns_and_records_the_epochs_trained(small_npz, tmp_path, capsys, monkeypatch):
    # eval of a run stopped after 1 of its 2 epochs said nothing, and results.json's config recorded "epochs": 2
    out = tmp_path / "run"
    argv, rc, _ = _train_interrupted_after_one_epoch(small_npz, out, capsys, monkeypatch)
    assert rc == 130
    ev = ["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"]
    rc, _, err = run(ev, capsys)
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"robust-ops eval: warning: {out / 'checkpoint.pt'}: holds 1 of the run's 2 epochs (training "
                     "stopped early); attacking it as it is -- `robust-ops train ... --resume` finishes it"]
    config = json.loads((out / "eval" / "results.json").read_text())["config"]["run"]
    assert (config["epochs"], config["epochs_trained"]) == (2, 1)
    # a run still training (its folder locked by train) had not "stopped early", and --resume would be refused
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = run(ev, capsys)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 0 and [line for line in err.splitlines() if line.strip()] == [
        f"robust-ops eval: warning: {out / 'checkpoint.pt'}: holds 1 of the run's 2 epochs (process {holder.pid} is "
        "still training it); attacking it as it is -- rerun eval once it ends"]
    assert run(argv + ["--resume"], capsys)[0] == 0
    rc, _, err = run(ev, capsys)
    assert rc == 0 and "warning" not in err
    assert json.loads((out / "eval" / "results.json").read_text())["config"]["run"]["epochs_trained"] == 2


def test_eval_on_the_val_split_says_so_in_the_report(trained_run, tmp_path, capsys):
    # report.md's header said "Test samples: 16" for eval --split val (16 validation images)
    rc, _, err = run(["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--split", "val",
                      "--out", tmp_path / "ev", "--device", "cpu"], capsys)
    assert rc == 0, err
    text = (tmp_path / "ev" / "report.md").read_text()
    assert "Validation samples: 16." in text and "Test samples" not in text


def test_resume_refused_by_a_checkpoint_without_run_json_leaves_no_run_json(trained_run, small_npz, tmp_path,
                                                                           capsys):
    # run.json was written before fit refused the checkpoint (seed 0, --seed 1): the corrected rerun with --seed 0 was
    # then refused by that run.json ("was trained with seed=1"), and eval would have recorded seed 1
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(trained_run / "checkpoint.pt", run_dir)
    argv = ["train", "--data", small_npz, "--epochs", "2", "--out", run_dir, "--resume", "--no-progress",
            "--device", "cpu"]
    rc, _, err = run(argv + ["--seed", "1"], capsys)
    one_line_error(rc, err, f"--resume: {run_dir / 'checkpoint.pt'} was trained with --seed 0, this command has "
                            "--seed 1")
    assert not (run_dir / "run.json").exists()
    rc, _, err = run(argv + ["--seed", "0"], capsys)
    assert rc == 0, err
    assert json.loads((run_dir / "run.json").read_text())["seed"] == 0
    # with a run.json there, one the checkpoint refuses (another run's checkpoint copied in) is put back as it was
    before = (run_dir / "run.json").read_text()
    at = tmp_path / "at"
    assert run(["train", "--data", small_npz, "--epochs", "1", "--out", at, "--no-progress", "--device", "cpu",
                "--defense", "at", "--defense-opt", "steps=1"], capsys)[0] == 0
    shutil.copy(at / "checkpoint.pt", run_dir)
    rc, _, err = run(argv + ["--epochs", "3"], capsys)
    one_line_error(rc, err, "--resume:", "checkpoint.pt was trained with --defense at, this command has --defense "
                                         "standard")
    assert (run_dir / "run.json").read_text() == before


def test_eval_size_zero_is_an_error_not_the_runs_size(trained_run, tmp_path, capsys):
    # --size 0 used to be read as "not given" (size or run's size): eval ran on the run's images, exit 0
    rc, stdout, err = run(["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--size",
                           "0", "--out", tmp_path / "ev", "--device", "cpu"], capsys)
    one_line_error(rc, err, "--size: expected an image side length >= 1, got 0")
    assert "clean accuracy" not in stdout and not (tmp_path / "ev").exists()


def test_eval_on_data_or_a_model_the_checkpoint_cannot_take_says_why(trained_run, tmp_path, capsys):
    # the error's detail used to be PyTorch's first line only: "(Error(s) in loading state_dict for SmallCNN:)"
    rng = np.random.default_rng(0)
    for name, shape, classes in (("rgb", (28, 28, 3), 2), ("three", (28, 28), 3)):
        arrays = {}
        for split, n in (("train", 16), ("val", 4), ("test", 8)):
            arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % classes).reshape(-1, 1).astype(np.uint8)
        np.savez(tmp_path / f"{name}.npz", **arrays)
    argv = ["eval", trained_run, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu",
            "--out", tmp_path / "ev"]
    rc, _, err = run(argv + ["--data", tmp_path / "rgb.npz"], capsys)
    one_line_error(rc, err, "--data: ", "rgb.npz holds 3-channel images in 2 classes, but the run was trained on "
                   "1-channel images in 2 classes (smallbus); its model cannot take them")
    rc, _, err = run(argv + ["--data", tmp_path / "three.npz"], capsys)
    one_line_error(rc, err, "three.npz holds 1-channel images in 3 classes, but the run was trained on 1-channel "
                   "images in 2 classes")
    rc, _, err = run(argv + ["--data", "moons", "--model", "mlp"], capsys)
    one_line_error(rc, err, "moons holds feature vectors of 2 values in 2 classes, but the run was trained on")
    rc, _, err = run(argv + ["--model", "resnet18"], capsys)
    one_line_error(rc, err, "checkpoint.pt: does not fit --model resnet18 on smallbus (Missing key(s) in state_dict: ",
                   "...); run.json says the run trained --model small_cnn")
    assert not (tmp_path / "ev").exists()


def test_eval_on_images_of_another_size_than_a_size_dependent_model_says_so(tmp_path, capsys):
    # resnet18's stem is 3x3 up to 64 pixels and 7x7 above: a 64x64 run attacked on 128x128 images failed with
    # "does not fit --model resnet18 (size mismatch for conv1.weight ...)" for the model the run itself trained
    rng = np.random.default_rng(0)
    for side in (16, 72):
        arrays = {}
        for split, n in (("train", 8), ("val", 2), ("test", 4)):
            arrays[f"{split}_images"] = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
        np.savez(tmp_path / f"s{side}.npz", **arrays)
    rc, _, err = run(["train", "--data", tmp_path / "s16.npz", "--model", "resnet18", "--epochs", "1", "--batch-size",
                      "8", "--no-progress", "--device", "cpu", "--out", tmp_path / "r"], capsys)
    assert rc == 0, err
    rc, _, err = run(["eval", tmp_path / "r", "--data", tmp_path / "s72.npz", "--attacks", "fgsm", "--eps", "1/255",
                      "--saliency", "0", "--device", "cpu", "--out", tmp_path / "ev"], capsys)
    one_line_error(rc, err, "checkpoint.pt: does not fit --model resnet18 on s72 (", "the run was trained on 16x16 "
                   "images and resnet18's layers depend on the image size, this data's are 72x72 -- evaluate on "
                   "16x16 images (--size 16 for a folder, a CSV or a MedMNIST name)")
    assert not (tmp_path / "ev").exists()


def test_demo_methods_take_train_defense_spellings(tmp_path, capsys):
    """docs/cli.md: demo's --methods takes any train --defense value; train takes MIRST-DM / mirst_dm (the registry
    reads names in any case, _ for -), but demo refused them as unknown defenses."""
    argv = ["demo", "--data", _folder(tmp_path / "d"), "--size", "8", "--quick", "--attacks", "fgsm", "--eps",
            "1/255", "--saliency", "0", "--out", tmp_path / "demo", "--no-progress", "--device", "cpu", "--methods"]
    rc, _, err = run(argv + ["Standard,MIRST_DM"], capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "demo" / "runs" / "mirst-dm" / "run.json").read_text())
    assert (doc["defense"], doc["dropmax"], doc["label"]) == ("mirst-dm", "first", "MIRST-DM")
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["config"]["methods"] == ["standard",
                                                                                                 "mirst-dm"]
    rc, _, err = run(argv + ["standard,STANDARD", "--out", tmp_path / "again"], capsys)
    one_line_error(rc, err, "--methods: standard given more than once")


def test_eval_size_equal_to_the_runs_image_size_is_the_runs_data(small_npz, tmp_path, capsys):
    """eval --size 28 on a run trained on 28x28 images without --size is the run's data (as --resume takes it): it
    attacked the data's own test split instead of a reproduce run's held-out fold (images that fold trained on)."""
    from robust_ops.reproduce import run_protocol

    proto = _tiny_protocol("kfold", [("Baseline", "standard")])
    proto.model = "mlp"
    run_protocol(proto, out=tmp_path / "cv", data=str(small_npz), seeds=1, progress=False)
    run_dir = tmp_path / "cv" / "runs" / "baseline" / "fold0"
    n_fold = len(cli.load_run(run_dir)[1].test)
    assert n_fold != 32  # small_npz's own test split
    rc, _, err = run(["eval", run_dir, "--size", "28", "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0",
                      "--device", "cpu"], capsys)
    assert rc == 0, err
    assert json.loads((run_dir / "eval" / "results.json").read_text())["rows"][0]["n"] == n_fold


@pytest.mark.filterwarnings("ignore:.*a class is too small to stratify the 0.9/0.1 split")
def test_reproduce_rerun_with_size_equal_to_the_loaded_size_resumes(tmp_path):
    """reproduce on a folder without --size (read at 224), rerun with --size 224: the same images, resumed as train
    --resume resumes it; the split record's size was compared as given and the rerun refused. Another size is still
    refused, before any training."""
    from robust_ops.reproduce import run_protocol
    from robust_ops.train import epochs_done

    data = str(_folder(tmp_path / "d"))
    proto = _tiny_protocol("kfold", [("Baseline", "standard")])
    proto.model = "mlp"
    with pytest.warns(UserWarning, match=r"every image is at most 8 pixels a side, read at the default 224x224"):
        run_protocol(proto, out=tmp_path / "o", data=data, seeds=1, progress=False)
    run_protocol(proto, out=tmp_path / "o", data=data, seeds=1, epochs=2, size=224, progress=False)
    run_dir = tmp_path / "o" / "runs" / "baseline" / "fold0"
    assert epochs_done(run_dir) == 2
    # a Python caller reads its argument size (the command: --size)
    refused = (r"^run_protocol: size: .* on 224x224 images \(size 224\), this command reads them at 8x8; rerun with "
               r"the size")
    with pytest.raises(cli.CLIError, match=refused):
        run_protocol(proto, out=tmp_path / "o", data=data, seeds=1, epochs=3, size=8, progress=False)
    assert epochs_done(run_dir) == 2


def test_own_mirst_dm_subclass_by_path_records_its_drop_max(tmp_path, capsys):
    """A MIRST-DM class given by dotted path (a subclass of yours, or the library's own) replaces the first
    max-pooling as mirst-dm does; run.json recorded dropmax none (only the name mirst-dm was looked for), so eval
    rebuilt plain max-pooling and refused the run's own checkpoint, telling to put run.json beside it."""
    out = tmp_path / "run"
    rc, _, err = run(["train", "--data", _folder(tmp_path / "d"), "--size", "8", "--epochs", "1", "--out", out,
                      "--no-progress", "--device", "cpu", "--defense", "robust_ops.defenses.mirst.MIRSTDM"], capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["dropmax"] == "first"
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"],
                     capsys)
    assert rc == 0, err


def test_mirst_dm_on_a_model_without_max_pooling_is_refused_first(tmp_path, capsys):
    """mirst-dm replaces the first max-pooling layer; on --model mlp (none) it failed inside training as
    'RUN_DIR: training failed: replace_maxpool: ...', after run.json was written -- and demo had trained the methods
    before it. Refused first, naming the flag."""
    data = _folder(tmp_path / "d")
    rc, _, err = run(["train", "--data", data, "--size", "8", "--model", "mlp", "--defense", "mirst-dm", "--out",
                      tmp_path / "run", "--device", "cpu"], capsys)
    one_line_error(rc, err, "robust-ops train: error: --defense: mirst-dm replaces the first max-pooling layer with "
                            "drop-max pooling, and --model mlp has none")
    assert not (tmp_path / "run").exists()
    rc, _, err = run(["demo", "--data", data, "--size", "8", "--model", "mlp", "--quick", "--methods",
                      "standard,mirst-dm", "--out", tmp_path / "demo", "--device", "cpu"], capsys)
    one_line_error(rc, err, "robust-ops demo: error: --methods: mirst-dm replaces the first max-pooling layer")
    assert not (tmp_path / "demo").exists()


def test_dropmax_on_a_model_without_max_pooling_names_the_flags_way_out(tmp_path, capsys):
    """--dropmax first (or all) on --model mlp passed replace_maxpool's refusal on, which spoke to code: '--dropmax:
    replace_maxpool: MLP has no nn.MaxPool2d layer to replace (...); if a forward pools with F.max_pool2d (a call,
    not a layer), call robust_ops.drop_max_pool2d there' (no test reached it). It now names the command's ways out,
    as the refusal of mirst-dm on such a model does; still before anything is written."""
    data = _folder(tmp_path / "d")
    for which in ("first", "all"):
        rc, _, err = run(["train", "--data", data, "--size", "8", "--model", "mlp", "--dropmax", which, "--out",
                          tmp_path / "run", "--device", "cpu"], capsys)
        line = one_line_error(rc, err, "robust-ops train: error: --dropmax: --model mlp has no max-pooling layer",
                              "leave --dropmax out or use a model with max pooling")
        assert "drop_max_pool2d" not in line
        assert not (tmp_path / "run").exists()


def test_eval_of_a_run_json_asking_drop_max_of_an_mlp_names_the_file_not_a_flag(tmp_path, capsys):
    """train refuses --dropmax on an mlp; a run.json edited to ask for it made eval name "--dropmax", a flag eval
    does not have, with train's advice ("leave --dropmax out"). It names the file's key and the way out of the
    other run.json refusals instead."""
    data = _folder(tmp_path / "d")
    rc, _, _ = run(["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--out",
                    tmp_path / "run", "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0
    run_json = tmp_path / "run" / "run.json"
    recorded = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**recorded, "dropmax": "first"}))
    rc, _, err = run(["eval", tmp_path / "run", "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "eval",
                      "--no-progress", "--device", "cpu"], capsys)
    line = one_line_error(rc, err, f"robust-ops eval: error: {run_json}: dropmax: --model mlp has no max-pooling "
                                   "layer to replace", "the file was edited or damaged")
    assert "--dropmax" not in line


def test_demo_refuses_an_eps_wider_than_the_range_and_a_resume_with_fewer_epochs(tmp_path, capsys):
    """Two refusals of demo no test reached, each before anything is trained or replaced: an L-inf radius past the
    inputs' value range (--eps 8 meant as 8/255), and --resume with fewer --epochs than its run holds."""
    data = _folder(tmp_path / "d")
    demo = ["demo", "--data", data, "--size", "8", "--model", "mlp", "--train-size", "0", "--methods", "standard",
            "--attacks", "fgsm", "--saliency", "0", "--out", tmp_path / "demo", "--no-progress", "--device", "cpu"]
    rc, _, err = run(demo + ["--epochs", "1", "--eps", "1/255,8"], capsys)
    one_line_error(rc, err, "robust-ops demo: error: --eps: 8 is an L-inf radius (fgsm) wider than the inputs' value "
                            "range [0, 1]", "e.g. 8/255, not 8")
    assert not (tmp_path / "demo").exists()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*too small to stratify")
        assert run(demo + ["--epochs", "2", "--eps", "1/255"], capsys)[0] == 0
        rc, _, err = run(demo + ["--epochs", "1", "--eps", "1/255", "--resume"], capsys)
    one_line_error(rc, err, f"robust-ops demo: error: --epochs: {tmp_path / 'demo' / 'runs' / 'standard'} holds 2 "
                            "epochs of training, more than the 1 of this command", "rerun with --epochs 2")


def test_data_names_spelled_otherwise_are_the_same_run(tmp_path, capsys):
    """run.json records a dataset name as load_dataset reads it: --resume with another spelling of the same set
    (synthetic-bus for synthetic; BreastMNIST for breastmnist) continues; eval reads it back."""
    assert [cli.data_spec(s) for s in ("Synthetic-Bus", "two_moons", "BreastMNIST", "breastmnist_64")] == [
        "synthetic", "moons", "breastmnist", "breastmnist_64"]
    out = tmp_path / "run"
    argv = ["train", "--data", "synthetic-bus", "--size", "8", "--model", "mlp", "--out", out, "--no-progress",
            "--device", "cpu"]
    rc, _, err = run(argv + ["--epochs", "1"], capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["data"] == "synthetic"
    rc, _, err = run(["train", "--data", "SYNTHETIC"] + argv[3:] + ["--epochs", "2", "--resume"], capsys)
    assert rc == 0, err
    assert cli.load_run(out, data="Synthetic_Bus")[1].info.image_size == 8  # the run's own data and size


def test_data_spec_makes_a_relative_npz_or_csv_path_absolute(small_npz, tmp_path, monkeypatch):
    # run.json records --data so, as a folder: eval and --resume from another working directory read the same file;
    # a path to no file is kept as given (load_dataset reports it)
    (tmp_path / "labels.csv").write_text("image,label\n")
    monkeypatch.chdir(tmp_path)
    assert cli.data_spec("labels.csv") == os.path.join(os.getcwd(), "labels.csv")
    monkeypatch.chdir(small_npz.parent)
    assert cli.data_spec(small_npz.name) == os.path.join(os.getcwd(), small_npz.name)
    assert cli.data_spec("missing.npz") == "missing.npz"


@pytest.mark.filterwarnings("ignore:.*a class is too small to stratify the 0.9/0.1 split")
def test_a_kfold_protocol_does_not_warn_about_the_7_1_2_split_it_pools(tmp_path):
    """A k-fold protocol pools the data's own train/val/test split: on a folder with a small class it printed that
    7:1:2 split's "too small to stratify ... leaves out malignant from val" warning, about parts no run used."""
    import warnings

    from robust_ops.reproduce import run_protocol

    data = _folder(tmp_path / "d", n=12, classes=("benign",))
    _folder(tmp_path / "d", n=2, classes=("malignant",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_protocol(_tiny_protocol("kfold", [("Baseline", "standard")]), out=tmp_path / "o", data=str(data),
                     seeds=1, size=8, progress=False)
    assert not [w for w in caught if "0.7/0.1/0.2" in str(w.message)]
    assert [w for w in caught if "0.9/0.1" in str(w.message)]  # the fold's own split still warns


def test_rebuild_splits_draws_a_kfold_runs_pool_and_folds_by_its_rare_class_rule(tmp_path):
    """A k-fold run's folds come from its data's 7:1:2 split, pooled in that split's order; both treat a class too
    small to stratify by the rule run.json records (eval's rare_classes). rebuild_splits drew the pool by the current
    rule whatever the run recorded, so for a run split the old way (before 2026-12-06) eval attacked another test
    fold than the run was tested on, holding images it trained on."""
    import warnings

    from robust_ops.data import cross_validation
    from robust_ops.reproduce import rebuild_splits

    data = _folder(tmp_path / "d")
    _folder(tmp_path / "d", n=3, classes=("normal",))
    record = {"kind": "kfold", "k": 2, "fold": 0, "cv_seed": 0, "data_seed": 0, "size": 8}
    tests = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*too small to stratify")
        for rule in ("random", "merge"):
            pool = cli.load_data(str(data), size=8, seed=0, rare_classes=rule)
            drawn = cross_validation(pool, k=2, seed=0, rare_classes=rule)[0]
            rebuilt = rebuild_splits(str(data), record, rare_classes=rule)
            for part in ("train", "val", "test"):
                ours, theirs = getattr(rebuilt, part).tensors, getattr(drawn, part).tensors
                assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), (rule, part)
            tests.append(drawn.test.tensors[0])
    assert not torch.equal(*tests)  # the two rules' test folds differ: the rule must be followed


@pytest.mark.parametrize("change", ["renamed", "csv_reordered"])
def test_data_reordered_or_renamed_with_the_same_class_counts_is_refused(tmp_path, capsys, change):
    """The seeded split cuts the images in the order they are read: a CSV saved with its rows in another order (or a
    folder image renamed) kept the class counts eval and --resume compared, so both ran -- eval on a test split
    holding 3 of 8 images the run had trained on."""
    root = _folder(tmp_path / "d")
    if change == "csv_reordered":
        for c in ("benign", "malignant"):  # ids are file stems: one folder of uniquely named images
            for i in range(10):
                (root / c / f"{i}.png").rename(root / f"{c}{i}.png")
        rows = [(f"{c}{i}", c) for c in ("benign", "malignant") for i in range(10)]
        data = root / "meta.csv"
        data.write_text("image_id,dx\n" + "".join(f"{i},{c}\n" for i, c in rows))
    else:
        data = root
    argv = ["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--out", tmp_path / "run",
            "--no-progress", "--device", "cpu"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    if change == "csv_reordered":
        data.write_text("image_id,dx\n" + "".join(f"{i},{c}\n" for i, c in reversed(rows)))
    else:
        (root / "benign" / "0.png").rename(root / "benign" / "zz.png")
    rc, _, err = run(["eval", tmp_path / "run", "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "e"], capsys)
    one_line_error(rc, err, "run.json: data:", "holds other images, names or row order than when the run was trained")
    rc, _, err = run(argv[:8] + ["2"] + argv[9:] + ["--resume"], capsys)
    one_line_error(rc, err, "--resume:", "samples_digest=")


def test_eval_rebuilds_the_csv_split_a_run_recorded_by_lesion_or_by_image(tmp_path, capsys):
    """docs/getting-started.md, Data: a CSV with lesion_id is split by lesion and run.json records split_by; a run
    recorded without it (trained when CSVs were split by image) is evaluated on its own image-level split, not the
    lesion split of the same data, whose test part could hold its training images; its --resume is refused."""
    from PIL import Image

    from robust_ops.data import load_dataset

    root = tmp_path / "d"
    root.mkdir()
    rows = ["lesion_id,image_id,dx"]
    for k in range(40):
        rows.append(f"L{k // 2},im{k},{('nv', 'mel')[k // 2 % 2]}")
        Image.fromarray(np.full((8, 8, 3), 5 * k, np.uint8)).save(root / f"im{k}.png")
    data = root / "meta.csv"
    data.write_text("\n".join(rows) + "\n")
    argv = ["train", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--out", tmp_path / "run",
            "--no-progress", "--device", "cpu"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["dataset"]["split_by"] == "lesion_id"
    rc, _, err = run(["eval", tmp_path / "run", "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "e1"],
                     capsys)
    assert rc == 0, err
    del record["dataset"]["split_by"]  # as an image-split run recorded it
    record["dataset"]["samples_digest"] = load_dataset(data, size=8, split_by="image").info.extra["samples_digest"]
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    rc, _, err = run(["eval", tmp_path / "run", "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "e2"],
                     capsys)
    assert rc == 0, err
    rc, _, err = run(argv[:8] + ["2"] + argv[9:] + ["--resume"], capsys)
    # the refusal names the changed split rule and what to do, not only the samples digest it changes too
    line = one_line_error(rc, err, "--resume:", "split by image", "no dataset.split_by", "splits it by lesion_id",
                          "eval` still tests the run on its own split", "split_by='image'", "without --resume")
    assert "samples_digest" not in line
    # demo's --resume, on the same run as demo's runs/standard
    (tmp_path / "demo" / "runs").mkdir(parents=True)
    shutil.copytree(tmp_path / "run", tmp_path / "demo" / "runs" / "standard")
    demo = ["demo", "--data", data, "--size", "8", "--model", "mlp", "--epochs", "1", "--train-size", "0",
            "--methods", "standard", "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "demo", "--no-progress",
            "--device", "cpu", "--resume"]
    rc, _, err = run(demo, capsys)
    one_line_error(rc, err, "--resume:", "split by image", "splits it by lesion_id", "use another --out")
    # reproduce's rerun named load_dataset(..., split_by='image'), which rebuilds no seed subset or fold of a protocol
    from robust_ops.reproduce import run_protocol

    protocol = _tiny_protocol("seeds", [("Baseline", "standard")])
    run_protocol(protocol, out=tmp_path / "rep", data=str(data), seeds=1, size=8, progress=False)
    run_dir = tmp_path / "rep" / "runs" / "baseline" / "seed0"
    record = json.loads((run_dir / "run.json").read_text())
    del record["dataset"]["split_by"]
    record["dataset"]["samples_digest"] = load_dataset(data, size=8, split_by="image").info.extra["samples_digest"]
    (run_dir / "run.json").write_text(json.dumps(record))
    with pytest.raises(cli.CLIError) as refused:
        run_protocol(protocol, out=tmp_path / "rep", data=str(data), seeds=1, size=8, progress=False)
    message = cmd_words(refused)
    assert "splits it by lesion_id" in message and "split_by='image'" not in message, message
    assert message.endswith("own split; no option of reproduce draws that split again, so it cannot continue the "
                            f"run: delete {run_dir} or use another --out"), message


def _lesions_csv(root, lesions=40, per_lesion=3):
    """HAM10000-like metadata (lesion_id, image_id, dx): image k a flat 2k grey, so its lesion is k // per_lesion."""
    from PIL import Image

    root.mkdir()
    rows = ["lesion_id,image_id,dx"]
    for k in range(lesions * per_lesion):
        rows.append(f"L{k // per_lesion},im{k},{('nv', 'mel')[k // per_lesion % 2]}")
        Image.fromarray(np.full((8, 8, 3), 2 * k, np.uint8)).save(root / f"im{k}.png")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return root / "meta.csv"


def test_eval_of_a_reproduce_run_on_a_csv_rebuilds_its_lesion_or_image_split(tmp_path):
    """docs/getting-started.md, Data: eval rebuilds the split a run recorded -- a reproduce run's too. Its folds /
    seeded split of a CSV with lesion_id are by lesion; a reproduce run recorded without split_by (trained when CSVs
    were split and folded by image) was rebuilt by lesion instead and refused as "other images"."""
    from robust_ops.data import cross_validation, load_dataset
    from robust_ops.reproduce import run_protocol

    data = str(_lesions_csv(tmp_path / "d"))
    run_protocol(_tiny_protocol("kfold", [("Baseline", "standard")]), out=tmp_path / "kf", data=data, seeds=2,
                 size=8, progress=False)
    run_protocol(_tiny_protocol("seeds", [("Baseline", "standard")]), out=tmp_path / "sd", data=data, seeds=2,
                 size=8, progress=False)
    runs = [(tmp_path / "kf" / "runs" / "baseline" / f"fold{k}", k) for k in (0, 1)]
    runs.append((tmp_path / "sd" / "runs" / "baseline" / "seed1", None))

    def expected(split_by):
        folds = cross_validation(load_dataset(data, size=8, split_by=split_by), k=2, seed=0)
        return [folds[k] if k is not None else load_dataset(data, size=8, seed=1, split_by=split_by) for _, k in runs]

    for split_by in ("lesion_id", "image"):
        for (run_dir, _), want in zip(runs, expected(split_by)):
            if split_by == "image":  # as a run trained before CSVs were split by lesion recorded it
                doc = json.loads((run_dir / "run.json").read_text())
                del doc["dataset"]["split_by"]
                doc["dataset"]["samples_digest"] = want.info.extra["samples_digest"]
                (run_dir / "run.json").write_text(json.dumps(doc))
            _, splits, _ = cli.load_run(run_dir)
            lesions = [set((d.tensors[0][:, 0, 0, 0] * 255 / 2).round().int().div(3, rounding_mode="floor").tolist())
                       for d in (splits.train, splits.test)]
            assert bool(lesions[0] & lesions[1]) == (split_by == "image")  # a by-image split leaks some lesions
            for got, ref in ((splits.train, want.train), (splits.test, want.test)):
                assert all(torch.equal(a, b) for a, b in zip(got.tensors, ref.tensors))
    # rerunning the protocols (a resume) refuses the runs recorded by image, saying why, before training any
    for out, split in (("kf", "kfold"), ("sd", "seeds")):
        with pytest.raises(cli.CLIError, match=r"split by image .*splits it by lesion_id.*so it cannot continue the "
                           r"run: delete .*or use another"):
            run_protocol(_tiny_protocol(split, [("Baseline", "standard")]), out=tmp_path / out, data=data, seeds=2,
                         size=8, progress=False)


@pytest.mark.parametrize("variable, values", [
    ("ROBUST_OPS_PREPACKED_CONV", "1/true/on/yes"), ("ROBUST_OPS_CPU_POOL", "1/true/on/yes"),
    ("ROBUST_OPS_NATIVE_LAYERS", "1/true/on/yes"), ("ROBUST_OPS_BACKEND", "auto, native, triton, reference")])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_bad_environment_switch_is_one_line_before_any_work(small_npz, tmp_path, capsys, monkeypatch, variable,
                                                              values, command):
    """A bad $ROBUST_OPS_PREPACKED_CONV was a ValueError traceback in train; $ROBUST_OPS_CPU_POOL / _BACKEND failed
    train after run.json was written, and in eval all of them were blamed on --attacks."""
    run_dir = tmp_path / "run"
    if command == "eval":
        rc, _, err = run(["train", "--data", small_npz, "--epochs", "1", "--out", run_dir, "--no-progress",
                          "--device", "cpu"], capsys)
        assert rc == 0, err
    monkeypatch.setenv(variable, "maybe")
    argv = (["train", "--data", small_npz, "--epochs", "1", "--out", tmp_path / "new", "--no-progress"]
            if command == "train" else
            ["eval", run_dir, "--attacks", "fgsm", "--eps", "1/255", "--out", tmp_path / "e"])
    rc, _, err = run(argv + ["--device", "cpu"], capsys)
    line = one_line_error(rc, err, f"robust-ops {command}: error: expected ${variable} to be one of {values}",
                          "got 'maybe'")
    assert "--attacks" not in line
    assert not (tmp_path / "new").exists() and not (tmp_path / "e").exists()


def test_a_bad_cpu_pool_limit_is_one_line_before_any_work(small_npz, tmp_path, capsys, monkeypatch):
    """The pool refuses a bad $ROBUST_OPS_CPU_POOL_LIMIT_MB when it starts, inside the first attack: train --defense
    at ended in a RuntimeError traceback after run.json was written (eval too, after loading everything)."""
    monkeypatch.setenv("ROBUST_OPS_CPU_POOL_LIMIT_MB", "4GB")
    rc, _, err = run(["train", "--data", small_npz, "--defense", "at", "--defense-opt", "steps=1", "--epochs", "1",
                      "--out", tmp_path / "new", "--no-progress", "--device", "cpu"], capsys)
    one_line_error(rc, err, "robust-ops train: error: expected $ROBUST_OPS_CPU_POOL_LIMIT_MB to be a whole number of "
                   "megabytes >= 0 (0 caches nothing), got '4GB'")
    assert not (tmp_path / "new").exists()


def test_a_bad_cpu_isa_cap_is_one_line_before_any_work(small_npz, tmp_path):
    """The pooling kernels check $ROBUST_OPS_CPU_ISA at their first call (once per process, so in a fresh one): train
    ended in a RuntimeError traceback at the first max pooling, after run.json was written."""
    r = subprocess.run([sys.executable, "-m", "robust_ops", "train", "--data", str(small_npz), "--epochs", "1",
                        "--out", str(tmp_path / "new"), "--no-progress", "--device", "cpu"], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1]),
                                                     "ROBUST_OPS_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "robust-ops train: error: expected $ROBUST_OPS_CPU_ISA to be avx512, avx2 or scalar, got 'AVX2'"], r.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command, text, dest, default", [
    ("train", "epochs:\n", "epochs", 10), ("train", "out: null\n", "out", "runs/train"),
    ("train", "no-progress: null\n", "no_progress", False), ("train", "defense-opt: null\n", "defense_opt", []),
    ("eval", "split: null\n", "split", "test"), ("demo", "methods: ~\n", "methods", "standard,rst,mirst,mirst-dm,ima"),
    ("train", "size: null\n", "size", None), ("train", "# every key commented out\n", "epochs", 10)])
def test_config_null_value_is_the_options_default(tmp_path, command, text, dest, default):
    """`epochs:` (YAML null) set the option to None: a TypeError traceback for epochs and out, split None a
    ValueError in evaluate_models; now it is the option's default, as if the key were left out."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    args = _config_args(command, ([str(tmp_path)] if command == "eval" else []) + ["--config", str(cfg)])
    assert getattr(args, dest) == default


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_seed_outside_the_split_seeds_is_refused(tmp_path, capsys, seed):
    """scikit-learn splits a folder / CSV with seeds below 2**32: --seed 2**32 on a 20-image folder failed as "too
    few samples (20) for a 0.7/0.1/0.2 split", and --seed 2**64 was torch.manual_seed's overflow traceback."""
    root = _folder(tmp_path / "d")
    for command in ("train", "demo"):
        out = tmp_path / command
        rc, _, err = run([command, "--data", root, "--size", "8", "--model", "mlp", "--epochs", "1", "--seed", seed,
                          "--out", out, "--no-progress", "--device", "cpu"], capsys)
        one_line_error(rc, err, f"robust-ops {command}: error: --seed: expected 0 to 4294967295, got {seed}")
        assert not out.exists()


def test_seed_range_includes_both_ends():
    # docs/cli.md: 0 to 2**32 - 1, the seeds scikit-learn's splits take; the last one is a seed like any other
    from types import SimpleNamespace

    for seed in (0, 2**32 - 1):
        cli.check_data_model_options(SimpleNamespace(epochs=1, batch_size=1, lr=1e-3, seed=seed))


def test_eval_records_the_saliency_images_drawn_not_asked_for(trained_run, tmp_path, capsys):
    # the val split holds 16 images: --saliency 20 draws 16, and results.json recorded 20
    rc, _, err = run(["eval", trained_run, "--split", "val", "--attacks", "fgsm", "--eps", "1/255", "--saliency", "20",
                      "--device", "cpu", "--out", tmp_path / "ev"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["config"]["saliency_images"] == 16


def test_eval_of_a_run_that_recorded_a_medmnist_sets_labels_numbered(tmp_path, capsys, as_official):
    """A run on OrganAMNIST trained before the loader knew its class names recorded them as "0" to "10"; its own
    file, now named bladder ... spleen, is the same labels: eval attacks it without a warning, and was refused as
    "--classes: ... is the run's own data" (no --classes was given)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "organamnist_64.npz"
    np.savez(data, **{f"{s}_{k}": (rng.integers(0, 256, (22, 8, 8), dtype=np.uint8) if k == "images" else
                                   (np.arange(22) % 11).reshape(-1, 1).astype(np.uint8))
                      for s in ("train", "val", "test") for k in ("images", "labels")})
    as_official(data)
    out = tmp_path / "run"
    rc, _, err = run(["train", "--data", data, "--model", "mlp", "--epochs", "1", "--out", out, "--no-progress",
                      "--device", "cpu"], capsys)
    assert rc == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["dataset"]["class_names"][10] == "spleen"
    record["dataset"]["class_names"] = [str(i) for i in range(11)]  # as such a run recorded them
    (out / "run.json").write_text(json.dumps(record))
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu"],
                     capsys)
    assert rc == 0 and "warning" not in err, err


def test_eval_of_a_csv_run_labelled_0_1_refuses_classes_that_reorder_them(tmp_path, capsys):
    """The numbered-labels allowance of a MedMNIST run's own file must not let --classes 1,0 re-split a CSV run
    trained on labels "0", "1": its test split could hold training images."""
    _csv_set(tmp_path, [str(i % 2) for i in range(40)], "i", "png")
    out = tmp_path / "run"
    rc, _, err = run(["train", "--data", tmp_path / "meta.csv", "--size", "8", "--model", "mlp", "--epochs", "1",
                      "--out", out, "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    rc, _, err = run(["eval", out, "--classes", "1,0", "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0",
                      "--device", "cpu"], capsys)
    one_line_error(rc, err, "--classes: ", "is the run's own data, trained on 0 = 0, 1 = 1")


def test_one_epoch_is_said_in_the_singular(small_npz, tmp_path, capsys):
    """demo and reproduce printed '1 epochs' (train said '1 epoch'): one helper, _options.counted, words them all."""
    from robust_ops._options import counted

    assert (counted(1, "epoch"), counted(0, "epoch"), counted(3, "sample")) == ("1 epoch", "0 epochs", "3 samples")
    rc, out, err = run(["demo", "--data", small_npz, "--model", "mlp", "--methods", "standard",
                        "--attacks", "fgsm", "--eps", "1/255", "--epochs", "1", "--out", tmp_path / "d",
                        "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert ", 1 epoch, device cpu" in out and "1 epochs" not in out, out
    rc, out, err = run(["reproduce", "arfl-moons", "--quick", "--seeds", "1", "--methods", "Standard training",
                        "--epochs", "1", "--out", tmp_path / "r", "--no-progress"], capsys)
    assert rc == 0, err
    assert "(standard, 1 epoch) ..." in out and "1 epochs" not in out, out


def test_every_protocol_training_trades_states_the_beta_it_runs():
    """arfl-moons trained TRADES at the library's beta = 1 without saying so, where ima-bus names its beta and the
    TRADES paper's 6 (found by the baseline-defense fidelity reviewer): a reader comparing the row with TRADES's own
    numbers could not tell which weight ran. Each protocol with a TRADES method now states it."""
    from robust_ops.defenses import TRADES
    from robust_ops.reproduce import PROTOCOLS, describe

    for protocol in PROTOCOLS.values():
        for method in protocol.methods:
            if method.defense == "trades":
                beta = method.options.get("beta", TRADES().beta)
                text = " ".join(describe(protocol).split())
                assert f"TRADES: beta = {beta:g}" in text and "beta=6" in text, protocol.name
