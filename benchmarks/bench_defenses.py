"""One training step of every defense: time per step and the ratio to standard training.

Goals (issue 5): MIRST with reuse (parameter gradients from the attack's own backward passes) >= 1.25x faster than the
plain formulation (a second forward/backward over the 4 instances), and <= 1.35x the time of a PGD-10 AT step.
Same run, resnet18 at 1x64x64, batch 32 by default (--quick: 1x32x32, batch 8). The peer row is a PGD-10 AT step
with torchattacks' PGD; the reference row the same AT step on the library's plain-PyTorch reference ops
($ROBUST_OPS_BACKEND=reference).
With --fit-steps N each defense also gets a fit row: its step inside robust_ops.train.fit (a fit of 1 + N steps less
a fit of 1 step, per step, timed in the same rounds), and both paths' host reads per step.

    python benchmarks/bench_defenses.py --quick              # 1 warm-up + 3 timed steps per defense, 1x32x32 x 8
    python benchmarks/bench_defenses.py --defenses mirst at  # a subset
    python benchmarks/bench_defenses.py --quick --model small_cnn --size 32 --batch 8 --fit-steps 3  # fit rows too
"""

import argparse
import functools
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, which puts this checkout on the path
from common import (device_arg, nonnegative_int, positive_int, refuse_one_image_batch_norm,  # noqa: E402
                    refuse_repeated, with_env, write_rows)
from host_reads import host_reads as count_host_reads  # noqa: E402

from robust_ops import defenses  # noqa: E402
from robust_ops._backend import ENV_VAR as BACKEND_SWITCH, resolve  # noqa: E402
from robust_ops.attacks.context import classification_loss  # noqa: E402
from robust_ops.data import IndexedDataset  # noqa: E402
from robust_ops.memory import library_pool  # noqa: E402
from robust_ops.native_layers import library_speedups  # noqa: E402
from robust_ops.models import MODELS, build_model  # noqa: E402
from robust_ops.train import fit  # noqa: E402

ALL = ("standard", "at", "sat", "trades", "rst", "gr", "llr", "mart", "fat", "amat", "mirst", "mirst-plain", "mirst-dm",
       "ima", "dpaat", "arfl", "at-torchattacks", "at-reference-ops")


def make_defense(name, num_samples):
    if name == "mirst-plain":
        return defenses.build("mirst", reuse=False)
    if name == "at-torchattacks":
        return None
    if name == "ima":
        return defenses.build("ima", num_samples=num_samples)
    if name in ("at", "at-reference-ops"):
        return defenses.build("at", steps=10)
    return defenses.build(name)


def unavailable(name):
    """Why defense ``name`` cannot run here (None when it can)."""
    if name == "mirst-dm" and importlib.util.find_spec("robust_ops.nn") is None:
        return "its module is not available in this checkout"
    if name == "ima" and importlib.util.find_spec("robust_ops.ima") is None:
        return "its module is not available in this checkout"
    # a test-only dependency of the library (scripts/setup.sh), not installed with it
    if name == "at-torchattacks" and importlib.util.find_spec("torchattacks") is None:
        return ("torchattacks 3.5.1, its peer, is not installed (install it as scripts/setup.sh does: pip install "
                "--no-deps torchattacks==3.5.1)")
    return None


def torchattacks_at_step(model, x, y, opt):
    import torchattacks

    eps = defenses.AT().eps
    attack = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / 10, steps=10, random_start=True)
    x_adv = attack(x, y)  # torchattacks puts the model in eval mode for the attack and restores it
    opt.zero_grad(set_to_none=True)
    loss = classification_loss(model(x_adv), y)
    loss.backward()
    opt.step()


def train_step(model, defense, x, y, ids, opt):
    params = [p for p in model.parameters() if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    out = defense(model, x, y, ids) if defense.needs_ids else defense(model, x, y)
    out.loss.backward()
    if out.extra_grads is not None:
        for p, g in zip(params, out.extra_grads):
            p.grad.add_(g)
    opt.step()


def as_fit_runs(model, step):
    with library_speedups(model, next(model.parameters()).device):
        return step()


def on_reference_ops(step):
    """step with the library's ops (pgd_step_, ...) on their plain-PyTorch references, robust_ops/reference.py."""
    return with_env(BACKEND_SWITCH, "reference", step)


def fit_steps(model, defense, data, batch):
    """One epoch of robust_ops.train.fit over ``data`` in batches of ``batch`` (as many steps as batches), with the
    bare steps' optimizer: Adam, lr 1e-4. The defense is reset first: fit refuses one that holds an earlier run's
    state (IMA's margins, DPAAT's running mean)."""
    defense.reset_state()
    fit(model, defense, IndexedDataset(data) if defense.needs_ids else data, epochs=1, batch_size=batch,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-4), progress=False,
        device=next(model.parameters()).device)


def fit_path(name, args, device, steps):
    """(short, long): fits of 1 and 1 + ``steps`` steps of defense ``name``, each on a model and defense of its own;
    their difference over ``steps`` is fit's time (or host reads) per step, its setup cancelled."""
    g = torch.Generator().manual_seed(1)
    n = args.batch * (1 + steps)
    x = torch.rand(n, 1, args.size, args.size, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    runs = []
    for count in (args.batch, n):
        torch.manual_seed(0)
        model = build_model(args.model, in_channels=1, num_classes=2, image_size=args.size)
        defense = make_defense(name, count)
        if hasattr(defense, "prepare_model"):
            model = defense.prepare_model(model)
        data = torch.utils.data.TensorDataset(x[:count], y[:count])
        runs.append(functools.partial(fit_steps, model.to(device), defense, data, args.batch))
    if name == "at-reference-ops":
        runs = [functools.partial(on_reference_ops, run) for run in runs]
    return tuple(runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 warm-up + 3 timed steps (default: 2 + 7), at --size 32 and --batch 8 unless given")
    ap.add_argument("--defenses", nargs="+", default=list(ALL), choices=ALL)
    ap.add_argument("--model", default="resnet18", choices=MODELS)
    ap.add_argument("--size", type=positive_int, help="image side (default 64; 32 with --quick)")
    ap.add_argument("--batch", type=positive_int, help="images per step (default 32; 8 with --quick)")
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=nonnegative_int, help="warm-up rounds (default 1 with --quick, else 2)")
    ap.add_argument("--rounds", type=positive_int, help="timed rounds (default 3 with --quick, else 7)")
    ap.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    ap.add_argument("--fit-steps", type=nonnegative_int, default=0, metavar="N",
                    help="also time each defense inside robust_ops.train.fit: a fit of 1 + N steps less a fit of 1 "
                         "step, per step, and count both paths' host reads per step (default 0: the bare steps only)")
    args = ap.parse_args(argv)
    refuse_repeated(ap, "--defenses", args.defenses)  # a repeat ran once, its second naming dropped without a word
    # --quick's shapes: resnet18 at 64x64, batch 32 took minutes a round on one thread (18 defenses), and `robust-ops
    # bench --quick` printed nothing for 10 minutes; 32x32, batch 8 is ~25 s a round there
    args.size = args.size or (32 if args.quick else 64)
    args.batch = args.batch or (8 if args.quick else 32)
    try:  # before any work: a model that cannot take --size images (densenet121 below 15x15)
        model = build_model(args.model, in_channels=1, num_classes=2, image_size=args.size)
    except ValueError as err:
        ap.error(f"--size {args.size}: {err}")
    if args.batch == 1:  # every step trains on --batch images
        refuse_one_image_batch_norm(ap, model, args.size)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backend = resolve("pgd_step_", device)  # what the steps' ops run on: $ROBUST_OPS_BACKEND may say reference
    warmup, reps = (1, 3) if args.quick else (2, 7)
    warmup = warmup if args.warmup is None else args.warmup
    reps = reps if args.rounds is None else args.rounds

    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, 2, (args.batch,), generator=g).to(device)
    ids = torch.arange(args.batch, device=device)

    steps, fits = {}, {}  # fits: (short, long) fit runs per defense (not for the torchattacks step: fit runs defenses)
    names = ["standard"] + [n for n in args.defenses if n != "standard"]
    for name in names:
        why = unavailable(name)
        if why:
            print(f"skip {name}: {why}")
            continue
        torch.manual_seed(0)
        model = build_model(args.model, in_channels=1, num_classes=2, image_size=args.size)
        defense = make_defense(name, args.batch)
        if defense is None and args.model == "mlp":  # the default list on a model a defense cannot run: skip it
            print(f"skip {name}: torchattacks' PGD needs a logit per class; mlp gives one for two classes")
            continue
        if defense is not None and hasattr(defense, "prepare_model"):
            try:
                model = defense.prepare_model(model)
            except ValueError as err:  # MIRST-DM on a model without max-pooling
                print(f"skip {name}: {err}")
                continue
        model = model.to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        step = (functools.partial(torchattacks_at_step, model, x, y, opt) if defense is None
                else functools.partial(train_step, model, defense, x, y, ids, opt))
        if name == "at-reference-ops":
            step = functools.partial(on_reference_ops, step)
        steps[name] = functools.partial(as_fit_runs, model, step)
        if args.fit_steps and defense is None:
            print(f"no fit row for {name}: fit trains with the library's defenses")
        elif args.fit_steps:
            fits[name] = fit_path(name, args, device, args.fit_steps)

    # Round-robin timing: every round times one step of each defense, so load changes on a shared machine hit all
    # defenses alike; medians over rounds. Every step runs under library_speedups (CPU memory pool, native layers),
    # as robust_ops.train.fit runs them (the torchattacks peer too).
    # A defense's fit row: in each round, right after its bare step, a fit of 1 step and one of 1 + --fit-steps steps;
    # their difference per step is the round's sample (fit's setup, first-batch checks and teardown cancel).
    samples = {name: [] for name in steps}
    fit_samples = {name: [] for name in fits}

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with library_pool(device):  # held across steps, as fit holds it across epochs
        for r in range(warmup + reps):
            for name, fn in steps.items():
                seconds = timed(fn)
                if name in fits:
                    short, long = (timed(run) for run in fits[name])
                if r >= warmup:
                    samples[name].append(seconds)
                    if name in fits:
                        fit_samples[name].append((long - short) / args.fit_steps)
            print(f"round {r + 1}/{warmup + reps} done", flush=True)
        # host reads (item, tolist, nonzero; each a GPU sync on a GPU) per step, counted after the timing (the
        # profiler that counts them slows what it watches): a bare step, and fit's long run less its short one
        reads = {}
        host_reads = functools.partial(count_host_reads, optimizer_steps=False)  # Adam's reads: CPU, no sync
        for name in fits:
            short, long = (host_reads(run) for run in fits[name])
            reads[name] = (host_reads(steps[name]), {k: (long[k] - short[k]) / args.fit_steps for k in long})
    times = {name: statistics.median(v) for name, v in samples.items()}
    fit_times = {name: statistics.median(v) for name, v in fit_samples.items()}
    rows = []
    for name, med in times.items():
        # the ops the library's attacks ran on ("-": the step runs none of them)
        ops = {"at-reference-ops": "reference", "standard": "-", "at-torchattacks": "-"}.get(name, backend)
        paths = [("step", med, samples[name], times["standard"])]
        if name in fits:
            paths.append(("fit", fit_times[name], fit_samples[name], fit_times["standard"]))
        for path, value, sample, standard in paths:
            row = {"defense": name}
            if fits:  # the columns of --fit-steps, in every row
                row["path"] = path
            row.update({"step_ms": value * 1e3, "min_ms": min(sample) * 1e3, "max_ms": max(sample) * 1e3,
                        "x_standard": value / standard})
            if fits:
                row["x_step"] = value / med  # fit's step against the bare step of the same defense
                counts = reads[name][path == "fit"] if name in fits else {}
                row.update({f"reads_{k}": counts.get(k, "") for k in ("item", "tolist", "nonzero")})
            row["backend"] = ops
            rows.append(row)

    for name, (bare, in_fit) in reads.items():
        print(f"{name}: fit's step {fit_times[name] / times[name]:.2f}x the bare step; host reads per step (item, "
              f"tolist, nonzero): bare {bare['item']}, {bare['tolist']}, {bare['nonzero']}; in fit "
              f"{in_fit['item']:g}, {in_fit['tolist']:g}, {in_fit['nonzero']:g}")
    if "mirst" in times and "mirst-plain" in times:
        print(f"\nMIRST reuse vs plain: {times['mirst-plain'] / times['mirst']:.2f}x faster (goal >= 1.25x)")
    if "mirst" in times and "at" in times:
        print(f"MIRST reuse vs PGD-10 AT: {times['mirst'] / times['at']:.2f}x its time (goal <= 1.35x)")
    if "at" in times and "at-torchattacks" in times:
        print(f"AT (run_pgd) vs AT (torchattacks PGD): {times['at-torchattacks'] / times['at']:.2f}x faster")
    if "at" in times and "at-reference-ops" in times:
        print(f"AT ({backend} ops) vs AT (reference ops): {times['at-reference-ops'] / times['at']:.2f}x faster")
    for row in rows:
        row.update(model=args.model, input=f"{args.batch}x1x{args.size}x{args.size}", reps=reps)
    write_rows("defenses", rows, device)


if __name__ == "__main__":
    main()
