"""One training step of every defense: time per step and the ratio to standard training.

Goals (issue 5): MIRST with reuse (parameter gradients from the attack's own backward passes) >= 1.25x faster than the
plain formulation (a second forward/backward over the 4 instances), and <= 1.35x the time of a PGD-10 AT step.
Same run, resnet18 at 1x64x64, batch 32 by default. The peer row is a PGD-10 AT step with torchattacks' PGD; the
reference row the same AT step on the library's plain-PyTorch reference ops ($ROBUST_OPS_BACKEND=reference).

    python benchmarks/bench_defenses.py --quick              # 1 warm-up + 3 timed steps per defense
    python benchmarks/bench_defenses.py --defenses mirst at  # a subset
"""

import argparse
import functools
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # robust_ops without pip install -e
from common import (device_arg, nonnegative_int, positive_int, refuse_one_image_batch_norm,  # noqa: E402
                    refuse_repeated, with_env, write_rows)

from robust_ops import defenses  # noqa: E402
from robust_ops._backend import ENV_VAR as BACKEND_SWITCH, resolve  # noqa: E402
from robust_ops.attacks.context import classification_loss  # noqa: E402
from robust_ops.memory import library_pool  # noqa: E402
from robust_ops.native_layers import library_speedups  # noqa: E402
from robust_ops.models import MODELS, build_model  # noqa: E402

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps (default: 2 + 7)")
    ap.add_argument("--defenses", nargs="+", default=list(ALL), choices=ALL)
    ap.add_argument("--model", default="resnet18", choices=MODELS)
    ap.add_argument("--size", type=positive_int, default=64)
    ap.add_argument("--batch", type=positive_int, default=32)
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=nonnegative_int, help="warm-up rounds (default 1 with --quick, else 2)")
    ap.add_argument("--rounds", type=positive_int, help="timed rounds (default 3 with --quick, else 7)")
    ap.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    refuse_repeated(ap, "--defenses", args.defenses)  # a repeat ran once, its second naming dropped without a word
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

    steps = {}
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

    # Round-robin timing: every round times one step of each defense, so load changes on a shared machine hit all
    # defenses alike; medians over rounds. Every step runs under library_speedups (CPU memory pool, native layers),
    # as robust_ops.train.fit runs them (the torchattacks peer too).
    samples = {name: [] for name in steps}
    with library_pool(device):  # held across steps, as fit holds it across epochs
        for r in range(warmup + reps):
            for name, fn in steps.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r >= warmup:
                    samples[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{warmup + reps} done", flush=True)
    times = {name: statistics.median(v) for name, v in samples.items()}
    rows = []
    for name, med in times.items():
        rows.append({"defense": name, "step_ms": med * 1e3, "min_ms": min(samples[name]) * 1e3,
                     "max_ms": max(samples[name]) * 1e3, "x_standard": med / times["standard"],
                     # the ops the library's attacks ran on ("-": the step runs none of them)
                     "backend": {"at-reference-ops": "reference", "standard": "-", "at-torchattacks": "-"}.get(
                         name, backend)})

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
