"""Attack benchmarks: robust_ops.attacks.pgd vs torchattacks.PGD (same output; also without the CPU memory pool,
without native layers, on a channels_last copy of the model, and with prepacked convolutions on either), the cost
of emitting iterates, an ensemble with the cascade vs every attack on every sample, and every attack against its
torchattacks counterpart, against itself on the plain-PyTorch reference ops and against the memory roofline of its
own updates (one same-size copy of the batch per iteration) (bench_attacks_peers.csv).

    python benchmarks/bench_attacks.py [--quick] [--device cpu|cuda] [--models small-resnet,resnet18]
                                       [--peers-only] [--peer-rounds N]

Models at 1x64x64, batch 32: a small ResNet-style CNN and torchvision resnet18 (robust_ops.models, 3x3 stem);
--quick: the small CNN at 1x32x32, batch 8 (--models, --size and --batch given are kept).
"""

import argparse
import copy
import functools
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, which puts this checkout on the path

from common import (copy_roofline_seconds, device_arg, interleaved_medians, nonnegative_int,  # noqa: E402
                    positive_int, refuse_one_image_batch_norm, refuse_repeated, with_env, write_rows)

from robust_ops import attacks  # noqa: E402
from robust_ops._backend import ENV_VAR as BACKEND_SWITCH, resolve  # noqa: E402
from robust_ops.memory import ENV_SWITCH as POOL_SWITCH  # noqa: E402
from robust_ops.native_layers import ENV_SWITCH as LAYERS_SWITCH  # noqa: E402
from robust_ops.models import MODELS, build_model  # noqa: E402
from robust_ops.prepacked_conv import ENV_SWITCH as PREPACKED_SWITCH, prepacked_conv  # noqa: E402


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    """A small ResNet-style CNN: stem, three basic blocks (16, 32, 64 channels), global pooling, linear."""

    def __init__(self, in_channels=1, num_classes=2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def make_model(name, device, size):
    torch.manual_seed(0)
    # built for the images it gets (--size), as build_model builds it for training: the stem and pools depend on it
    model = SmallResNet() if name == "small-resnet" else build_model(name, in_channels=1, num_classes=2,
                                                                     image_size=size)
    return model.to(device).eval()


def blobs(n, size, seed, device):
    """Synthetic 2-class images: noise in [0, 0.5] plus a brighter top-left (class 0) or bottom-right (class 1)
    quadrant -- enough for a model that is not constant, so attacks break some samples and not others."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, size, size, generator=g) * 0.5
    h = size // 2
    x[y == 0, :, :h, :h] += 0.25
    x[y == 1, :, h:, h:] += 0.25
    return x.clamp(0, 1).to(device), y.to(device)


def train_briefly(model, steps, batch, size, device):
    """A few Adam steps on blobs (an untrained CNN predicts one class everywhere and no attack changes that)."""
    x, y = blobs(256, size, 0, device)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for i in range(steps):
        idx = torch.arange(i * batch, (i + 1) * batch, device=device) % 256
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# The library's switches at their defaults. The rows are named against them ("ours", "without the CPU memory pool",
# ...), so each call of ours sets all three: one left in the caller's environment relabelled rows.
DEFAULT_SWITCHES = {POOL_SWITCH: "1", LAYERS_SWITCH: "1", PREPACKED_SWITCH: "0"}


def with_switches(fn, off=None):
    """Run fn with the library's switches at DEFAULT_SWITCHES, the one named ``off`` (its variable) set to 0."""
    for env_var, value in DEFAULT_SWITCHES.items():
        fn = functools.partial(with_env, env_var, "0" if env_var == off else value, fn)
    return fn()


def peer_cases(model, eps, steps, queries, size=64):
    """(case, ours, torchattacks counterpart or None, why there is none, iterations) for every attack, with the same
    settings on both sides; iterations: the attack's sequential updates of the batch (steps, queries, trials). The
    bench models are binary, as most medical sets are. ``size``: the images' side, which the L2 and L1 radii follow."""
    import torchattacks

    eps_l2 = eps * size / 8  # an L2 radius of the same order as the Linf ball's (8x eps on 64x64 inputs)
    # an L1 radius that breaks some samples: a quarter of the pixels at eps each (16 at 4/255 on 64x64 inputs)
    eps_l1 = eps * size * size / 4
    apgd_kw = dict(eps=eps, steps=steps, n_restarts=1, seed=0)
    return [
        ("fgsm", lambda x, y: attacks.fgsm(model, x, y, eps=eps), torchattacks.FGSM(model, eps=eps), "", 1),
        (f"pgd-{steps}", lambda x, y: attacks.pgd(model, x, y, eps=eps, alpha=eps / 4, steps=steps,
                                                  random_start=False),
         torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=steps, random_start=False), "", steps),
        (f"bim-{steps}", lambda x, y: attacks.bim(model, x, y, eps=eps, alpha=eps / 4, steps=steps),
         torchattacks.BIM(model, eps=eps, alpha=eps / 4, steps=steps), "", steps),
        (f"pgdl2-{steps}", lambda x, y: attacks.pgd(model, x, y, eps=eps_l2, alpha=eps_l2 / 4, steps=steps,
                                                    norm="l2", random_start=False),
         torchattacks.PGDL2(model, eps=eps_l2, alpha=eps_l2 / 4, steps=steps, random_start=False), "", steps),
        (f"cw-linf-{steps}", lambda x, y: attacks.cw_linf(model, x, y, eps=eps, alpha=eps / 4, steps=steps), None,
         "torchattacks' CW is the L2 optimisation attack, not CW-Linf", steps),
        (f"apgd-ce-{steps}", lambda x, y: attacks.APGD(model, loss="ce", **apgd_kw)(x, y),
         torchattacks.APGD(model, loss="ce", **apgd_kw), "", steps),
        # EOT as AutoAttack's rand version runs it (20 passes there; 4 keep the row affordable): passes x steps
        (f"apgd-ce-{steps} eot-4", lambda x, y: attacks.APGD(model, loss="ce", eot_iter=4, **apgd_kw)(x, y),
         torchattacks.APGD(model, loss="ce", eot_iter=4, **apgd_kw), "", 4 * steps),
        # L1-APGD as AutoAttack's L1 version runs it (use_largereps)
        (f"apgd-ce-{steps} l1", lambda x, y: attacks.APGD(model, loss="ce", **{**apgd_kw, "eps": eps_l1},
                                                          norm="l1", use_largereps=True)(x, y), None,
         "torchattacks has no L1 APGD", steps),
        # APGD-DLR as the registry's "apgd-dlr" runs it; below 3 classes its loss is the CW margin (docs/attacks.md)
        (f"apgd-dlr-{steps}", lambda x, y: attacks.APGD(model, loss="dlr", **apgd_kw)(x, y), None,
         "torchattacks' DLR reads the 3rd largest logit: fails on a binary model", steps),
        (f"apgd-t-{steps}", lambda x, y: attacks.APGDT(model, n_target_classes=1, **apgd_kw)(x, y), None,
         "torchattacks' targeted DLR reads the 3rd and 4th largest logits: fails on a binary model", steps),
        # untargeted FAB, the registry's "fab": bitwise torchattacks' FAB (its default, multi_targeted=False)
        (f"fab-{steps}", lambda x, y: attacks.FAB(model, eps=eps, steps=steps, seed=0)(x, y),
         torchattacks.FAB(model, eps=eps, steps=steps, n_classes=2, seed=0), "", steps),
        # FAB-T as AutoAttack runs it (9 targets, capped at K - 1 = 1 here); torchattacks' multi-targeted FAB takes
        # n_classes - 1 targets. Each step: one forward and backward for the boundary, one forward to check it.
        (f"fab-t-{steps}", lambda x, y: attacks.FABT(model, eps=eps, steps=steps, seed=0)(x, y),
         torchattacks.FAB(model, eps=eps, steps=steps, multi_targeted=True, n_classes=2, seed=0), "", steps),
        # L1 FAB-T at the L1-APGD row's radius; bitwise torchattacks' L1 iterations in the tests
        (f"fab-t-{steps} l1", lambda x, y: attacks.FABT(model, eps=eps_l1, norm="l1", steps=steps, seed=0)(x, y),
         None, "torchattacks 3.5.1's FAB(norm='L1') raises UnboundLocalError in its final check (no L1 distance)",
         steps),
        (f"square-{queries}", lambda x, y: attacks.Square(model, eps=eps, n_queries=queries, seed=0)(x, y),
         torchattacks.Square(model, eps=eps, n_queries=queries, seed=0), "", queries),
        (f"square-l2-{queries}",
         lambda x, y: attacks.Square(model, eps=eps_l2, norm="l2", n_queries=queries, seed=0)(x, y),
         torchattacks.Square(model, norm="L2", eps=eps_l2, n_queries=queries, seed=0), "", queries),
        ("white noise x10", lambda x, y: attacks.white_noise(model, x, y, eps=eps, trials=10,
                                                             generator=torch.Generator(x.device).manual_seed(0)),
         None, "torchattacks' GN adds one Gaussian draw, not uniform noise with all-trials-must-hold", 10),
        (f"cascade apgd-ce-{steps}>square-{queries}",
         lambda x, y: attacks.ensemble(model, x, y, [attacks.APGD(model, loss="ce", **apgd_kw),
                                                     attacks.Square(model, eps=eps, n_queries=queries, seed=0)]).x_adv,
         torchattacks.MultiAttack([torchattacks.APGD(model, loss="ce", **apgd_kw),
                                   torchattacks.Square(model, eps=eps, n_queries=queries, seed=0)]), "",
         steps + queries),
        (f"autoattack apgd-ce-{steps}>apgd-t-{steps}>fab-t-{steps}>square-{queries}",
         lambda x, y: attacks.AutoAttack(model, eps=eps, steps=steps, n_queries=queries)(x, y), None,
         "torchattacks' AutoAttack runs its targeted DLR, which fails on a binary model (see apgd-t)",
         3 * steps + queries),
    ]


def bench_peers(name, model, x, y, eps, args, backend):
    """Each attack of peer_cases: ours, its torchattacks counterpart and ours on the reference ops
    ($ROBUST_OPS_BACKEND=reference), in interleaved rounds; bitwise equality and the robust accuracy each reaches.
    Roofline: one same-size copy of the batch per iteration (read and write the iterate), the least memory traffic
    an attack's own update can do -- the model's passes come on top."""
    steps, queries = (5, 40) if args.quick else (20, 200)
    copy_s = copy_roofline_seconds(2 * x.numel() * x.element_size(), x.device, 0.05 if args.quick else 0.5)
    rows = []
    for case, ours, peer, why_none, iterations in peer_cases(model, eps, steps, queries, x.shape[-1]):
        def run_ours():  # at the library's defaults, as the pgd-10 rows: not whatever switch the caller left set
            return with_switches(lambda: ours(x, y))

        def run_reference():
            return with_env(BACKEND_SWITCH, "reference", run_ours)

        fns = [run_ours, run_reference] + ([lambda: peer(x, y)] if peer is not None else [])
        outputs = [fn() for fn in fns]
        times, _ = interleaved_medians(fns, args.peer_rounds or (1 if args.quick else 3), x.device)
        with torch.no_grad():
            robust = [float((model(out).argmax(1) == y).float().mean()) for out in outputs]
        # same_as_peer beside the ratio, and said in the line below: where the outputs differ (other random draws,
        # another returned point), the two sides did not do the same computation and the ratio times different work
        same_as_peer = torch.equal(outputs[0], outputs[2]) if peer is not None else "n/a"
        rows.append(dict(
            model=name, attack=case, eps=f"{eps * 255:g}/255", ours_ms=times[0] * 1e3,
            reference_ops_ms=times[1] * 1e3, reference_ratio=times[1] / times[0],
            peer=f"torchattacks.{type(peer).__name__}" if peer is not None else f"none: {why_none}",
            peer_ms=times[2] * 1e3 if peer is not None else float("nan"),
            peer_ratio=times[2] / times[0] if peer is not None else float("nan"), same_as_peer=same_as_peer,
            roofline_ms=iterations * copy_s * 1e3, ours_over_roofline=times[0] / (iterations * copy_s),
            same_as_reference_ops=torch.equal(outputs[0], outputs[1]),
            robust_acc_ours=robust[0], robust_acc_peer=robust[2] if peer is not None else float("nan"),
            backend=backend))
        differ = "" if same_as_peer is not False else "; outputs differ: not the same computation"
        print(f"{name} {case}: ours {times[0] * 1e3:.0f} ms, robust accuracy {robust[0]:.3f}"
              + (f"; {rows[-1]['peer']} {times[2] * 1e3:.0f} ms ({times[2] / times[0]:.2f}x{differ}), "
                 f"{robust[2]:.3f}" if peer is not None else ""), flush=True)
    return rows


def print_rows(rows):
    """A line per row of the PGD-10 table as it is measured (the table itself comes at the end)."""
    for row in rows:
        print(f"{row['model']} {row['case']}: ours {row['ours_ms']:.0f} ms, other {row['peer_ms']:.0f} ms "
              f"({row['ratio']:.2f}x), same output {row['same_output']}", flush=True)


def pick_ensemble_eps(model, x, y):
    """The smallest eps of 2^k/255 (k <= 4) at which FGSM breaks a quarter of the batch."""
    for k in range(5):
        eps = 2 ** k / 255
        with torch.no_grad():
            broken = float((model(attacks.fgsm(model, x, y, eps=eps)).argmax(1) != y).float().mean())
        if broken >= 0.25:
            break
    else:
        print(f"FGSM breaks {broken:.3f} (< 0.25) of the batch even at 16/255; using eps = 16/255", flush=True)
    return eps


def model_names(text):
    """argparse type: a comma list of small-resnet and robust_ops.models' image classifiers with a logit per class."""
    names = text.split(",")
    known = [m for m in MODELS if m != "mlp"]
    unknown = [m for m in names if m != "small-resnet" and m not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; expected small-resnet or "
                                         f"{', '.join(known)}")
    if "mlp" in names:  # build_model's mlp: one logit for two classes; torchattacks' cross-entropy needs one per class
        raise argparse.ArgumentTypeError(f"mlp gives one logit for two classes, which torchattacks' attacks cannot "
                                         f"take; expected small-resnet or {', '.join(known)}")
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short timing runs (noisy), of small-resnet at --size 32 and --batch 8 unless given")
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", type=model_names, default=None,
                        help="default small-resnet,resnet18; small-resnet with --quick")
    parser.add_argument("--batch", type=positive_int, default=None, help="images per attack (default 32; --quick 8)")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="interleaved timing rounds (default 7, --quick 2)")
    parser.add_argument("--size", type=positive_int, default=None, help="image side (default 64; --quick 32)")
    parser.add_argument("--train-steps", type=nonnegative_int, default=None,
                        help="Adam steps before the ensemble (default 30)")
    peers = parser.add_mutually_exclusive_group()
    peers.add_argument("--peers-only", action="store_true", help="only the table of attacks vs torchattacks")
    peers.add_argument("--no-peers", action="store_true",
                       help="skip that table (the longest part; bench_attacks_peers.csv is then left as it was)")
    parser.add_argument("--peer-rounds", type=positive_int, default=None,
                        help="interleaved rounds per attack in that table (default 3, --quick 1)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    # --quick's shapes, as bench_defenses': both models at 64x64, batch 32 took ~12 minutes on one thread, most of
    # them resnet18's peer table, and `robust-ops bench --only attacks` (quick) printed nothing for minutes
    args.models = args.models or (["small-resnet"] if args.quick else ["small-resnet", "resnet18"])
    args.size = args.size or (32 if args.quick else 64)
    args.batch = args.batch or (8 if args.quick else 32)
    refuse_repeated(parser, "--models", args.models)
    # an option the chosen tables never read is an error, not silently the default
    if args.peers_only and args.rounds is not None:
        parser.error("argument --rounds: not used with --peers-only (the peer table's rounds are --peer-rounds)")
    if args.no_peers and args.peer_rounds is not None:
        parser.error("argument --peer-rounds: not used with --no-peers (no peer table is run)")
    # 30 with --quick too: 12 steps of 8 images left the small CNN predicting one class, so no attack broke a sample
    train_steps = 30 if args.train_steps is None else args.train_steps
    for name in args.models:  # before any work: a model that cannot take --size images (densenet121 below 15x15)
        try:
            model = make_model(name, "cpu", args.size)
        except ValueError as err:
            parser.error(f"--size {args.size}: {err}")
        if args.batch == 1 and train_steps:  # train_briefly's steps take --batch images
            refuse_one_image_batch_norm(parser, model, args.size)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # a test-only dependency of the library (scripts/setup.sh), not installed with it
        import torchattacks
    except ImportError:
        raise SystemExit("bench_attacks: needs torchattacks 3.5.1, the peer both tables time ours against (install it "
                         "as scripts/setup.sh does: pip install --no-deps torchattacks==3.5.1)") from None

    device = torch.device(args.device)
    backend = resolve("pgd_step_", device)
    x, y = blobs(args.batch, args.size, 1, device)
    eps, alpha, steps = 8 / 255, 2 / 255, 10
    rows, peer_rows = [], []
    for name in args.models:
        model = make_model(name, device, args.size)
        if args.peers_only:
            train_briefly(model, train_steps, args.batch, args.size, device)
            with torch.no_grad():
                y_pred = model(x).argmax(1)
            peer_rows += bench_peers(name, model, x, y_pred, pick_ensemble_eps(model, x, y_pred), args, backend)
            continue

        def run_pgd(on_model, off=None, **kw):
            return with_switches(lambda: attacks.pgd(on_model, x, y, eps=eps, alpha=alpha, steps=steps,
                                                     random_start=False, **kw), off)

        def ours():
            return run_pgd(model)

        def ours_emit():
            return run_pgd(model, emit=(2, 4, 6, 8))

        ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)

        def theirs():
            return ta(x, y)

        def ours_no_pool():
            return run_pgd(model, POOL_SWITCH)

        def ours_no_native_layers():
            return run_pgd(model, LAYERS_SWITCH)

        # The same attack on a channels_last copy: oneDNN skips its per-layer activation reorders on CPU; other
        # convolution kernels, so the result matches NCHW up to rounding, not bitwise.
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)

        def ours_channels_last():
            return run_pgd(model_cl)

        # robust_ops.prepacked_conv: weights packed once per attack, oneDNN inference convolutions (not bitwise); the
        # explicit True wins over the variable's 0.
        def ours_prepacked():
            with prepacked_conv(model, True):
                return ours()

        def ours_channels_last_prepacked():
            with prepacked_conv(model_cl, True):
                return ours_channels_last()

        plain = ours()  # each resnet18 PGD call takes seconds: compute the reference output once
        same = (torch.equal(plain, theirs()) and torch.equal(ours_no_pool(), plain)
                and torch.equal(ours_no_native_layers(), plain))
        cl_diff = float((ours_channels_last() - plain).abs().max())
        packed_diff = float((ours_prepacked() - plain).abs().max())
        cl_packed_diff = float((ours_channels_last_prepacked() - plain).abs().max())
        # Interleaved rounds: ours, torchattacks, ours without the CPU memory pool, ours with emit, ours without
        # native layers, ours on the channels_last model, both with prepacked convolutions.
        (t_ours, t_theirs, t_no_pool, t_emit, t_no_layers, t_cl, t_packed, t_cl_packed), _ = interleaved_medians(
            [ours, theirs, ours_no_pool, ours_emit, ours_no_native_layers, ours_channels_last, ours_prepacked,
             ours_channels_last_prepacked],
            args.rounds or (2 if args.quick else 7), device)
        rows.append(dict(model=name, case="pgd-10 vs torchattacks.PGD", ours_ms=t_ours * 1e3, peer_ms=t_theirs * 1e3,
                         ratio=t_theirs / t_ours, images_per_s=args.batch / t_ours, same_output=same,
                         backend=backend))
        rows.append(dict(model=name, case="pgd-10 without the CPU memory pool vs torchattacks.PGD",
                         ours_ms=t_no_pool * 1e3, peer_ms=t_theirs * 1e3, ratio=t_theirs / t_no_pool,
                         images_per_s=args.batch / t_no_pool, same_output=same, backend=backend))
        rows.append(dict(model=name, case="pgd-10 without native layers vs torchattacks.PGD",
                         ours_ms=t_no_layers * 1e3, peer_ms=t_theirs * 1e3, ratio=t_theirs / t_no_layers,
                         images_per_s=args.batch / t_no_layers, same_output=same, backend=backend))
        for label, t_variant, diff in (("on a channels_last model", t_cl, cl_diff),
                                       ("with prepacked convolutions", t_packed, packed_diff),
                                       ("with prepacked convolutions on a channels_last model", t_cl_packed,
                                        cl_packed_diff)):
            rows.append(dict(model=name, case=f"pgd-10 {label} vs torchattacks.PGD (max diff {diff:.2g})",
                             ours_ms=t_variant * 1e3, peer_ms=t_theirs * 1e3, ratio=t_theirs / t_variant,
                             images_per_s=args.batch / t_variant, same_output=diff == 0.0, backend=backend))
        rows.append(dict(model=name, case="pgd-10 emit=(2,4,6,8) vs plain", ours_ms=t_emit * 1e3,
                         peer_ms=t_ours * 1e3, ratio=t_emit / t_ours, images_per_s=args.batch / t_emit,
                         same_output=torch.equal(ours_emit()[0], plain), backend=backend))
        print_rows(rows[-7:])

        # Ensemble on the briefly trained model: labels = clean predictions (clean accuracy 100%), three white-box
        # attacks, weakest first, at the smallest eps of 2^k/255 (k <= 4) where FGSM breaks a quarter of the batch.
        train_briefly(model, train_steps, args.batch, args.size, device)
        with torch.no_grad():
            y_pred = model(x).argmax(1)
        ens_eps = pick_ensemble_eps(model, x, y_pred)
        chain = [
            attacks.FGSM(model, eps=ens_eps),
            attacks.PGD(model, eps=ens_eps, alpha=ens_eps / 4, steps=10, random_start=False),
            attacks.APGD(model, eps=ens_eps, steps=10, loss="ce", seed=0),
        ]

        def run_cascade():
            return attacks.ensemble(model, x, y_pred, chain)

        def run_all():
            return attacks.ensemble(model, x, y_pred, chain, cascade=False)

        cascade, full = run_cascade(), run_all()
        (t_cascade, t_full), _ = interleaved_medians([run_cascade, run_all], args.rounds or (2 if args.quick else 7),
                                                     device)
        rows.append(dict(model=name, case=f"ensemble fgsm>pgd-10>apgd-10 eps={ens_eps * 255:g}/255: cascade vs all",
                         ours_ms=t_cascade * 1e3, peer_ms=t_full * 1e3, ratio=t_full / t_cascade,
                         images_per_s=args.batch / t_cascade,
                         same_output=cascade.robust_accuracy() == full.robust_accuracy(), backend=backend))
        print_rows(rows[-1:])
        print(f"{name}: trained {train_steps} steps, clean accuracy {float((y_pred == y).float().mean()):.3f}; "
              f"ensemble robust accuracy cascade {cascade.robust_accuracy():.3f}, all "
              f"{full.robust_accuracy():.3f}; broken per attack {cascade.counts()}", flush=True)
        if not args.no_peers:
            peer_rows += bench_peers(name, model, x, y_pred, ens_eps, args, backend)
    if rows:
        write_rows("bench_attacks", rows, device)
    if not args.no_peers:
        write_rows("bench_attacks_peers", peer_rows, device)


if __name__ == "__main__":
    main()
