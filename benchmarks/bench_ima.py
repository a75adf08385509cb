"""One IMA training epoch on BreastMNIST: GenAdv with active-set compaction vs the masked full-batch baseline.

Same run, same initial weights, same data order, same optimizer: the compacted epoch; the masked epoch (every forward
and backward over the full batch, stopping once the whole batch has finished); the naive masked epoch (every sample
pays all K steps and N search rounds); and the compacted k-ary variant (k = 4). Reports the median epoch time, the
ratio to the masked baseline, the forward/backward passes GenAdv spent (batched calls and sample rows), and whether the
margin tables agree afterwards. Wall time and process CPU time are both reported: on a shared, oversubscribed machine
the CPU time of this process is the steadier measure.

Scenarios (the speed-up depends on where the margins are, see docs/bench-ima.md):
  init   -- the paper's first epoch: margins E(i) = delta for every sample;
  spread -- margins uniform in [0, eps_train] (fixed seed): margins that have spread out during training, so
            samples cross at different steps or not at all;
  cap    -- margins at eps_train (the state once margins have expanded): every sample searches its full ball.
  trained -- (with --state) the weights and margins of a real IMA training run of resnet18: a robust_ops fit
            checkpoint, e.g. runs/.../checkpoint.pt from `robust-ops train --defense ima --model resnet18 --data
            breastmnist` or `robust-ops reproduce ima-bus` (not --quick: small_cnn); no pretraining then, and the
            checkpoint's own eps_train and delta. Another model's weights are refused before any epoch.
Variants "masked channels_last" and "compacted channels_last" run the same epochs on a channels_last copy of the model;
"masked prepacked" and "compacted prepacked" run them under robust_ops.prepacked_conv.
The model is resnet18 (build_model("resnet18", 1, 2, 28)), first trained ``--pretrain-epochs`` standard epochs on
the full training split so that its boundaries are those of a working classifier.

    python benchmarks/bench_ima.py --quick          # 64 images (one batch), 1 repeat, spread, masked vs compacted
    python benchmarks/bench_ima.py                  # 546 images (the whole train split), 3 repeats
    add --threads 1 on a shared machine (see docs/bench-ima.md)
    python benchmarks/bench_ima.py --device cuda    # on a GPU (the default when one is visible)
    python benchmarks/bench_ima.py --state RUN/checkpoint.pt   # scenario "trained": a real run's model and margins
"""

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, which puts this checkout on the path

from common import (device_arg, nonnegative_int, positive_int, refuse_repeated, synchronize,  # noqa: E402
                    write_rows)

from robust_ops.native_layers import library_speedups  # noqa: E402
from robust_ops.attacks.context import attack_context  # noqa: E402
from robust_ops.ima import IMA, batch_invariant_sizes, gen_adv, paper_eps_train, probe_rows  # noqa: E402
from robust_ops.models import build_model  # noqa: E402
from robust_ops.prepacked_conv import prepacked_conv  # noqa: E402


def data_path():
    """breastmnist.npz where the library looks ($ROBUST_OPS_DATA: its folder or the file itself; ~/.medmnist), else
    ../shared/data. Another .npz in $ROBUST_OPS_DATA is not BreastMNIST: the epochs would run on other images."""
    from robust_ops.data.medmnist import candidate_dirs, find_medmnist

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = find_medmnist("breastmnist") or find_medmnist("breastmnist", root=shared)
    if path is None:
        where = ", ".join(str(d) for d in [*candidate_dirs(), shared])
        raise SystemExit(f"bench_ima: breastmnist.npz not found (looked in {where}); set $ROBUST_OPS_DATA to its "
                         f"folder")
    return path


def load_train():
    with np.load(data_path(), allow_pickle=False) as d:
        x = torch.from_numpy(d["train_images"].astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(d["train_labels"].astype(np.int64)).reshape(-1)
    return x, y


def batches(n, batch_size, seed):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def pretrain(model, x, y, epochs, batch_size):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for epoch in range(epochs):
        for ids in batches(x.shape[0], batch_size, 100 + epoch):
            opt.zero_grad()
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()


def make_model():
    """The model every epoch trains: the paper's 28x28 ResNet-18 for BreastMNIST (and a --state run's)."""
    return build_model("resnet18", 1, 2, 28)


def load_trained_state(path, num_samples):
    """(model state, IMA defense state) from a robust_ops fit checkpoint of an IMA run on the full training split."""
    from robust_ops.train import load_checkpoint, state_dict_mismatch

    if not Path(path).is_file():
        raise SystemExit(f"bench_ima: --state {path}: {'not a file' if Path(path).exists() else 'no such file'} "
                         f"(pass a fit checkpoint, e.g. RUN_DIR/checkpoint.pt)")
    try:
        ckpt = load_checkpoint(path)
    except Exception as err:  # torch.load's errors for a file that is not a checkpoint are multi-line tracebacks
        raise SystemExit(f"bench_ima: --state {path}: not a readable checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "defense" not in ckpt:
        raise SystemExit(f"bench_ima: --state {path}: not a robust_ops fit checkpoint (needs 'model' and 'defense')")
    try:  # a run of another --model (robust-ops train's default is small_cnn): load_state_dict's traceback otherwise
        make_model().load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise SystemExit(f"bench_ima: --state {path}: not the weights of the resnet18 this benchmark times "
                         f"(build_model('resnet18', 1, 2, 28): {state_dict_mismatch(err)}); train the IMA run with "
                         f"--model resnet18") from None
    margins = ckpt["defense"].get("margins") if isinstance(ckpt["defense"], dict) else None
    if margins is None:
        raise SystemExit(f"bench_ima: --state {path}: the checkpoint's defense has no IMA margins (train with "
                         f"--defense ima)")
    if margins.shape != (num_samples,):
        raise SystemExit(f"bench_ima: --state {path}: {margins.numel()} margins, but the BreastMNIST training split "
                         f"has {num_samples} images (train on the full split, e.g. `robust-ops reproduce ima-bus`)")
    return ckpt["model"], ckpt["defense"]


def default_warmup(device):
    """Untimed epochs per variant by default: one on a GPU, where the first epoch to meet a batch size pays its
    one-time costs for that shape -- the first compacted variant meets every working-batch size from 1 to
    the batch, and on an H200 (2026-12-04) took 2.0 s where "compacted unpadded", the same rows run after it, took
    1.2 s; none on the CPU, where an epoch takes tens of seconds (the earlier CPU numbers had none either)."""
    return 1 if torch.device(device).type == "cuda" else 0


def ima_epoch(state, x, y, ids_all, args, *, compact, arity, scenario, batch_exit=True, min_rows=None,
              channels_last=False, prepacked=False, defense_state=None):
    model = make_model().to(x.device)
    model.load_state_dict(state)
    if channels_last:  # oneDNN then skips its per-layer activation reorders (docs/benchmarks.md)
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    eps = paper_eps_train(tuple(x.shape[1:]), "l2")  # 3 sqrt(784/3072) = 1.52; delta = eps / 100 (IMA defaults)
    defense = IMA(num_samples=x.shape[0], eps_train=eps, steps=args.steps, search_steps=args.search_steps,
                  arity=arity, compact=compact, batch_exit=batch_exit, norm="l2", min_rows=min_rows)
    if scenario == "trained":  # the run's own margins, eps_train and delta
        defense.load_state_dict({k: (v.to(x.device) if torch.is_tensor(v) else v) for k, v in defense_state.items()})
    else:
        margins = {
            "init": torch.full((x.shape[0],), eps / 100),  # Algorithm 1: every E(i) starts at delta
            "spread": torch.rand(x.shape[0], generator=torch.Generator().manual_seed(2)) * eps,
            "cap": torch.full((x.shape[0],), eps),
        }[scenario].to(x.device)
        defense.load_state_dict({"margins": margins, "eps_train": eps, "delta": eps / 100, "init_margin": eps / 100})
    with prepacked_conv(model, prepacked):  # the probe too: its kernels set the padding sizes
        return _ima_epoch(model, opt, defense, x, y, ids_all, args, min_rows)


def _ima_epoch(model, opt, defense, x, y, ids_all, args, min_rows):
    crossed = seen = 0
    probe_seconds = 0.0
    if min_rows is None:  # GenAdv's padding sizes: measured once per training run, so outside the epoch's timer
        largest = min(args.batch_size, x.shape[0])
        with attack_context(model):
            probe_start = time.perf_counter()
            # IMA probes a batch's clean-correct samples, any number up to the batch size: warm every probe they map to
            for max_rows, reference_rows in sorted({probe_rows(rows) for rows in range(1, largest + 1)}):
                batch_invariant_sizes(model, x[:1], max_rows=max_rows, reference_rows=reference_rows)
            synchronize(x.device)
            probe_seconds = time.perf_counter() - probe_start
    synchronize(x.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with library_speedups(model, x.device):  # as robust_ops.train.fit runs its epochs
        for ids in batches(ids_all.numel(), args.batch_size, 0):
            ids = ids_all[ids]
            opt.zero_grad()
            out = defense(model, x[ids], y[ids], ids)
            out.loss.backward()
            opt.step()
            searched = out.metric_counts.get("crossed", 0)  # crossed is the mean over the searched samples
            crossed += out.metrics.get("crossed", 0.0) * searched
            seen += searched
    synchronize(x.device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    counts = dict(defense.counter.as_dict(), probe_s=round(probe_seconds, 2))
    return seconds, cpu_seconds, defense.margins.clone(), counts, crossed / max(seen, 1)


def same_kernels_masked(channels_last, prepacked):
    """The masked variant that runs the same convolution kernels (memory format, prepacking) as a variant."""
    return {(True, False): "masked channels_last", (False, True): "masked prepacked",
            (True, True): "masked channels_last prepacked"}.get((channels_last, prepacked), "masked")


def lockstep(state, x, y, ids_all, args, scenario):
    """Train with the compacted defense and, at every batch, also run GenAdv compacted and masked on the same
    model state and margins: do they agree batch by batch (float32)?"""
    model = make_model().to(x.device)
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    eps = paper_eps_train(tuple(x.shape[1:]), "l2")
    defense = IMA(num_samples=x.shape[0], eps_train=eps, steps=args.steps, search_steps=args.search_steps)
    margins = (torch.rand(x.shape[0], generator=torch.Generator().manual_seed(2)) * eps).to(x.device)
    defense.load_state_dict({"margins": margins, "eps_train": eps, "delta": eps / 100, "init_margin": eps / 100})
    flags_differ = samples = 0
    max_diff = 0.0
    for ids in batches(ids_all.numel(), args.batch_size, 0):
        ids = ids_all[ids]
        kw = dict(steps=args.steps, search_steps=args.search_steps, norm="l2")
        a, ca = gen_adv(model, x[ids], y[ids], defense.table.get(ids), compact=True, **kw)
        b, cb = gen_adv(model, x[ids], y[ids], defense.table.get(ids), compact=False, **kw)
        flags_differ += int((ca != cb).sum())
        samples += ids.numel()
        max_diff = max(max_diff, float((a - b).abs().max()))
        opt.zero_grad()
        defense(model, x[ids], y[ids], ids).loss.backward()
        opt.step()
    print(f"lockstep ({scenario}, {samples} images): crossed flags differ for {flags_differ}, "
          f"max |x_adv compacted - x_adv masked| = {max_diff:.3g}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 64 images (one batch), 1 repeat, scenario spread, masked vs compacted only "
                             "(unless --scenarios / --variants say otherwise)")
    parser.add_argument("--images", type=positive_int, default=None,
                        help="training images in the IMA epoch (default 546)")
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument("--warmup", type=nonnegative_int, default=None,
                        help="untimed epochs of every variant per scenario before the timed ones (default 1 on a GPU, "
                             "0 on the CPU): the first epoch to meet a batch size pays its one-time setup")
    parser.add_argument("--batch-size", type=positive_int, default=128,
                        help="IMA epoch batch (default 128, the paper's batch for its 28x28 ResNet-18)")
    parser.add_argument("--steps", type=positive_int, default=20, help="K (paper: 20)")
    parser.add_argument("--search-steps", type=positive_int, default=10, help="N (paper: 10)")
    parser.add_argument("--pretrain-epochs", type=nonnegative_int, default=None,
                        help="standard epochs before the IMA epochs (default 1)")
    parser.add_argument("--pretrain-batch-size", type=positive_int, default=None,
                        help="batch of the standard pretraining (default 64; fixed, so --batch-size changes only the "
                             "IMA epoch)")
    parser.add_argument("--scenarios", default=None,
                        help="comma list of init, spread, cap (default: all three) and, with --state, trained "
                             "(the default then)")
    parser.add_argument("--state", default=None, metavar="CHECKPOINT",
                        help="a robust_ops fit checkpoint of an IMA run on the full training split: its weights and "
                             "margins are scenario 'trained'; no pretraining, so the other scenarios then run on its "
                             "weights too")
    parser.add_argument("--variants", default=None,
                        help="comma list of variants besides masked (default: all): naive, compacted, "
                             "'compacted min_rows=16', 'compacted unpadded', 'compacted k=4', and masked / compacted "
                             "with ' channels_last', ' prepacked' or ' channels_last prepacked'")
    parser.add_argument("--lockstep", action="store_true",
                        help="only check, batch by batch on the same model state, that compacted and masked GenAdv "
                             "agree (spread margins)")
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the epochs run (default: cuda when a GPU is visible); the 'prepacked' variants "
                             "are CPU-only and equal their plain twins elsewhere")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: torch's); 1 keeps OpenMP spin-waits out of the CPU time on a "
                             "shared machine")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True) (and cuDNN's deterministic algorithms): on a "
                             "GPU the default algorithms use atomics, so even two masked epochs differ")
    args = parser.parse_args()
    if args.lockstep:  # it checks the spread scenario's masked / compacted pair once: these would be ignored
        ignored = [flag for flag, value in (("--scenarios", args.scenarios), ("--variants", args.variants),
                                            ("--repeats", args.repeats), ("--warmup", args.warmup))
                   if value is not None]
        if ignored:
            parser.error(f"argument --lockstep: {', '.join(ignored)} not used with it (it compares masked and "
                         "compacted GenAdv on the spread scenario, once)")
    if args.state:  # its weights are the start: nothing is pretrained, so these would be ignored
        ignored = [flag for flag, value in (("--pretrain-epochs", args.pretrain_epochs),
                                            ("--pretrain-batch-size", args.pretrain_batch_size)) if value is not None]
        if ignored:
            parser.error(f"argument --state: {', '.join(ignored)} not used with it (the checkpoint's weights are not "
                         "pretrained further)")
    pretrain_epochs = 1 if args.pretrain_epochs is None else args.pretrain_epochs
    pretrain_batch_size = args.pretrain_batch_size or 64
    images = args.images or (64 if args.quick else 546)
    repeats = args.repeats or (1 if args.quick else 3)
    warmup = default_warmup(args.device) if args.warmup is None else args.warmup
    # bad choices are usage errors before the data, the pretraining or a --state checkpoint is read
    # --quick is `robust-ops bench`'s smoke run: all 3 scenarios x 12 variants took many minutes even at 64 images
    default_scenarios = "trained" if args.state else ("spread" if args.quick else "spread,cap,init")
    scenarios = (args.scenarios or default_scenarios).split(",")
    refuse_repeated(parser, "--scenarios", scenarios)
    unknown = set(scenarios) - {"init", "spread", "cap", "trained"}
    if unknown:
        parser.error(f"--scenarios: unknown {sorted(unknown)}; choose from init, spread, cap, trained")
    if "trained" in scenarios and not args.state:
        parser.error("--scenarios trained needs --state CHECKPOINT (an IMA run's checkpoint)")
    # "masked" stops once the whole batch has finished; "naive" is the issue's "every sample pays all K steps and N
    # search forwards".
    # (name, compact, arity, batch_exit, min_rows, channels_last, prepacked). By default (min_rows=None) GenAdv pads
    # each working batch to the next batch size from which this machine's float32 results no longer depend on the
    # batch (measured once per model, ima.batch_invariant_sizes), so compacted margins are bitwise the masked ones.
    # "compacted min_rows=16" is the earlier fixed padding; "compacted unpadded" (min_rows=0) shows why padding is
    # needed. The channels_last pair runs the same epochs on a channels_last model: other convolution kernels, so
    # their margins match each other bitwise, not the NCHW ones. The prepacked pair runs them with
    # robust_ops.prepacked_conv (oneDNN inference convolutions on weights packed once per GenAdv call): other kernels
    # on NCHW, compared with each other; the channels_last prepacked pair, with both.
    variants = [("masked", False, 2, True, None, False, False), ("naive", False, 2, False, None, False, False),
                ("compacted", True, 2, True, None, False, False),
                ("compacted min_rows=16", True, 2, True, 16, False, False),
                ("compacted unpadded", True, 2, True, 0, False, False),
                ("compacted k=4", True, 4, True, None, False, False),
                ("masked channels_last", False, 2, True, None, True, False),
                ("compacted channels_last", True, 2, True, None, True, False),
                ("masked prepacked", False, 2, True, None, False, True),
                ("compacted prepacked", True, 2, True, None, False, True),
                ("masked channels_last prepacked", False, 2, True, None, True, True),
                ("compacted channels_last prepacked", True, 2, True, None, True, True)]
    if args.variants or args.quick:
        wanted = args.variants.split(",") if args.variants else ["compacted"]
        refuse_repeated(parser, "--variants", wanted)  # a repeat ran once, its second naming dropped without a word
        unknown = set(wanted) - {v[0] for v in variants}
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {[v[0] for v in variants]}")
        variants = [v for v in variants if v[0] == "masked" or v[0] in wanted]

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts; required by the flag
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    device = torch.device(args.device)
    x, y = load_train()
    x, y = x.to(device), y.to(device)
    if images > x.shape[0]:
        parser.error(f"--images: the BreastMNIST training split has {x.shape[0]} images, got {images}")
    defense_state = None
    if args.state:
        if images != x.shape[0] and "trained" in scenarios:
            parser.error("--state: the trained scenario runs the whole training split (drop --images / --quick)")
        state, defense_state = load_trained_state(args.state, x.shape[0])
    else:
        model = make_model().to(device)
        t = time.perf_counter()
        pretrain(model, x, y, pretrain_epochs, pretrain_batch_size)
        print(f"pretrained {pretrain_epochs} standard epoch(s) in {time.perf_counter() - t:.1f} s", flush=True)
        state = copy.deepcopy(model.state_dict())
    ids_all = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:images].sort().values

    if args.lockstep:
        lockstep(state, x, y, ids_all, args, "spread")
        return
    rows = []
    for scenario in scenarios:
        times = {v[0]: [] for v in variants}
        cpu_times = {v[0]: [] for v in variants}
        results = {}

        def epoch(compact, arity, batch_exit, min_rows, channels_last, prepacked):  # one variant's epoch
            return ima_epoch(state, x, y, ids_all, args, compact=compact, arity=arity, scenario=scenario,
                             batch_exit=batch_exit, min_rows=min_rows, channels_last=channels_last,
                             prepacked=prepacked, defense_state=defense_state)

        for _ in range(warmup):
            for name, *variant in variants:
                seconds, *_ = epoch(*variant)
                print(f"{scenario} warm-up {name}: {seconds:.1f} s wall (untimed)", flush=True)
        for r in range(repeats):
            for name, *variant in variants:  # interleaved
                seconds, cpu, margins, counts, crossed = epoch(*variant)
                times[name].append(seconds)
                cpu_times[name].append(cpu)
                results[name] = (margins, counts, crossed)
                print(f"{scenario} repeat {r} {name}: {seconds:.1f} s wall, {cpu:.1f} s cpu, {counts}, "
                      f"crossed {crossed:.2f}", flush=True)
        base = statistics.median(times["masked"])
        cpu_base = statistics.median(cpu_times["masked"])
        ref_margins = results["masked"][0]
        for name, *_, channels_last, prepacked in variants:
            margins, counts, crossed = results[name]
            diff = (margins - ref_margins).abs()
            med, cpu_med = statistics.median(times[name]), statistics.median(cpu_times[name])
            # The masked epoch on the same convolution kernels (memory format, prepacking): compaction's own
            # speed-up and margin check; "n/a" when --variants left that masked twin out.
            same = same_kernels_masked(channels_last, prepacked)
            if same not in results:
                print(f"{scenario} {name}: no {same!r} in --variants, so its *_same_layout columns are n/a",
                      flush=True)
            rows.append({
                "scenario": scenario, "variant": name, "ran_on": args.device, "deterministic": args.deterministic,
                "images": images, "warmup": warmup, "K": args.steps,
                "N": args.search_steps, "epoch_s_median": med, "speedup_vs_masked": base / med,
                "epoch_cpu_s_median": cpu_med, "cpu_speedup_vs_masked": cpu_base / cpu_med, **counts,
                "crossed_frac": crossed,
                "margins_equal_to_masked": bool(torch.equal(margins, ref_margins)),
                "margins_max_abs_diff": float(diff.max()), "margins_differing": int((diff > 0).sum()),
                "speedup_vs_masked_same_layout": (statistics.median(times[same]) / med if same in results
                                                  else "n/a"),
                "margins_equal_to_masked_same_layout": (bool(torch.equal(margins, results[same][0]))
                                                        if same in results else "n/a"),
            })
    write_rows("ima_deterministic" if args.deterministic else "ima", rows, device)


if __name__ == "__main__":
    main()
