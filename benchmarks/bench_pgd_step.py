"""Benchmark of the fused PGD step (torch.ops.robust_ops.pgd_step_) against the eager chain it replaces.

Providers, on [32, 3, 224, 224] float32 by default, L-inf and L2, with and without a history slot:
  native     the fused C++ (CPU) / CUDA kernel
  triton     robust_ops::pgd_step_triton (CUDA only)
  eager      robust_ops.reference.pgd_step_: the torchattacks expression chain, op by op, with per-sample alpha and
             eps tensors (the op's semantics; its eps clamp then broadcasts a [N, 1, 1, 1] tensor, several times
             slower on CPU than a clamp by a number)
  torchattacks  the peer: torchattacks 3.5.1's PGD / PGDL2 update as it runs it, alpha and eps Python numbers (the
             same for every sample here), written into x_adv (and the history slot) as the op writes them
  compiled   the same chain under torch.compile (skip with --no-compile)
  copy       a same-size copy of the minimum bytes a fused step must move (the memory roofline):
             read x_adv, x_nat, grad + write x_adv (+ the history slot) = 16 (20) bytes per float32 element.
Each provider is checked against the eager chain before it is timed -- x_adv and the history slot, bitwise in
float32/float64, within the tests' tolerance in float16/bfloat16; native and triton also with alpha and eps that
differ per sample -- and a provider that disagrees or raises stops
the run (except torch.compile's failures, inductor bugs, and a kernel this build lacks: reported, rows left out;
torch.compile's results that are not bitwise the eager chain are timed, their row saying how far off; where
inductor cannot compile the chain's in-place write (torch 2.14's KeyError 'buf1' on the L2 rows, pytorch/pytorch#196570)
the row is the chain compiled out of place plus a copy into x_adv, named so).

    python benchmarks/bench_pgd_step.py --quick            # CPU, $OMP_NUM_THREADS or 2 threads
    python benchmarks/bench_pgd_step.py --device cuda
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, which puts this checkout on the path

import common  # noqa: E402

import robust_ops  # noqa: E402,F401
from robust_ops import reference  # noqa: E402


ALPHA, EPS = 2 / 255, 8 / 255  # every sample's; the torchattacks provider holds them as Python numbers, as PGD does


def make_inputs(shape, dtype, device, alpha=ALPHA, eps=EPS):
    gen = torch.Generator().manual_seed(0)
    x_nat = torch.rand(shape, generator=gen).to(device=device, dtype=dtype)
    x_adv = (x_nat + (torch.rand(shape, generator=gen).to(device=device, dtype=dtype) - 0.5) * 2 * eps).clamp(0, 1)
    grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    n = shape[0]
    per_sample = torch.promote_types(dtype, torch.float32)
    alpha_t = torch.full((n,), alpha, dtype=per_sample, device=device)
    eps_t = torch.full((n,), eps, dtype=per_sample, device=device)
    return x_adv, x_nat, grad, alpha_t, eps_t


# float16/bfloat16: the kernels keep alpha/eps in float32 where the eager chain rounds them to the dtype
# (docs/ops/pgd_step.md); the tests' tolerance (python_tests/utils.py TOLERANCES), twice the atol.
HALF_TOLERANCE = {torch.float16: dict(rtol=1e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}


def max_abs_diff(got, expected):
    return (got.double() - expected.double()).abs().max().item()


def check_against_eager(name, dtype, got, expected, what):
    """True when bitwise equal; False when within HALF_TOLERANCE for half types; else stops the benchmark (one line,
    no traceback)."""
    if torch.equal(got, expected):
        return True
    beyond = ""
    if dtype in HALF_TOLERANCE:
        if torch.allclose(got.float(), expected.float(), **HALF_TOLERANCE[dtype]):
            return False
        beyond = f" beyond the {dtype} tolerance"
    diff = max_abs_diff(got, expected)
    raise SystemExit(f"{name}: {what} differs from the eager chain{beyond} (max |diff| {diff:.3g}); not timing a wrong "
                     f"kernel")


def per_sample_scalars(alpha, eps):
    """alpha and eps that differ per sample, for the check of our kernels: the timed ones are every sample's same
    numbers (torchattacks holds one), on which a kernel reading one sample's for all would pass."""
    scale = torch.linspace(0.5, 1.5, alpha.numel(), dtype=alpha.dtype, device=alpha.device)
    return alpha * scale, eps * scale


def compiled_agreement(x_adv, history_slot, expected):
    """True when torch.compile's x_adv (and history slot) equal the eager chain bitwise, else 'not bitwise (max |diff|
    D)' for its row."""
    written = [x_adv] if history_slot is None else [x_adv, history_slot]
    if all(torch.equal(t, expected) for t in written):
        return True
    diff = max(max_abs_diff(t, expected) for t in written)
    return f"not bitwise (max |diff| {diff:.3g})"


def torchattacks_step(x_adv, x_nat, grad, alpha, eps, clip_min, clip_max, norm, history=None, slot=0):
    """torchattacks 3.5.1's update, expression for expression (PGD.forward / PGDL2.forward), with its Python-number
    alpha and eps (ALPHA, EPS: the benchmark's per-sample values, checked against the eager chain before timing);
    the result is copied into x_adv (and history[slot]) as the in-place op leaves it."""
    del alpha, eps  # the tensors [N]: torchattacks holds one number for every sample
    if norm == "linf":
        adv = x_adv + ALPHA * grad.sign()
        delta = torch.clamp(adv - x_nat, min=-EPS, max=EPS)
    else:
        n = x_adv.shape[0]
        # torchattacks' view(n, 1, 1, 1) for its [N, C, H, W] images, here for any --shape (a [N, D] batch broadcast
        # the [N, 1, 1, 1] norms into 4 dims and stopped the run at its first L2 row)
        per_sample = (n,) + (1,) * (x_adv.dim() - 1)
        grad_norms = torch.norm(grad.view(n, -1), p=2, dim=1) + 1e-10
        adv = x_adv + ALPHA * (grad / grad_norms.view(per_sample))
        delta = adv - x_nat
        delta_norms = torch.norm(delta.view(n, -1), p=2, dim=1)
        factor = torch.min(EPS / delta_norms, torch.ones_like(delta_norms))
        delta = delta * factor.view(per_sample)
    adv = torch.clamp(x_nat + delta, min=clip_min, max=clip_max)
    x_adv.copy_(adv)
    if history is not None:
        history[slot].copy_(adv)


# torch 2.14's inductor fails to generate the CPU code of the L2 chain when it writes an input in place (its
# outer-loop fusion promotes the mutated buffer to a local one: InductorError KeyError 'buf1', pytorch/pytorch#196570;
# plain PyTorch, no op of ours, reproduces it). The chain compiled writing a new tensor compiles; this provider copies
# that into x_adv (and the history slot) outside the graph, one more read and write than the in-place chain.
COMPILED_OUT_OF_PLACE = "compiled out of place + copy"


def inductor_in_place_bug(err):
    """True for torch inductor's KeyError on an in-place write of an input (see COMPILED_OUT_OF_PLACE)."""
    first = (str(err).splitlines() or [""])[0]
    return type(err).__name__ == "InductorError" and first.startswith("KeyError")


def compiled_out_of_place():
    """The eager chain under torch.compile(fullgraph=True) on a clone of x_adv it returns, copied into x_adv (and
    history[slot]) outside the graph: the in-place provider's work plus one copy."""
    def chain(x_adv, x_nat, grad, alpha, eps, clip_min, clip_max, norm):
        new = x_adv.clone()
        reference.pgd_step_(new, x_nat, grad, alpha, eps, clip_min, clip_max, norm, None, 0)
        return new

    graph = torch.compile(chain, fullgraph=True, dynamic=False)

    def step(x_adv, x_nat, grad, alpha, eps, clip_min, clip_max, norm, history=None, slot=0):
        new = graph(x_adv, x_nat, grad, alpha, eps, clip_min, clip_max, norm)
        x_adv.copy_(new)
        if history is not None:
            history[slot].copy_(new)

    return step


def providers(device, use_compile):
    out = {"native": torch.ops.robust_ops.pgd_step_}
    if device.type == "cuda" and hasattr(torch.ops.robust_ops, "pgd_step_triton"):
        out["triton"] = torch.ops.robust_ops.pgd_step_triton
    elif device.type == "cuda":
        print("triton: skipped, robust_ops::pgd_step_triton is not registered (Triton missing or not importable)")
    out["eager"] = reference.pgd_step_
    out["torchattacks"] = torchattacks_step
    if use_compile:
        out["compiled"] = torch.compile(reference.pgd_step_, fullgraph=True, dynamic=False)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    parser.add_argument("--device", type=common.device_arg, default="cpu")
    parser.add_argument("--threads", type=common.positive_int, default=common.default_threads(),
                        help="CPU threads (torch.set_num_threads; default: $OMP_NUM_THREADS, else 2)")
    parser.add_argument("--shape", type=common.positive_int_list, default="32,3,224,224")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = tuple(args.shape)
    min_run_time = 0.3 if args.quick else 1.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    x_adv, x_nat, grad, alpha, eps = make_inputs(shape, dtype, device)
    numel = x_adv.numel()
    element = x_adv.element_size()
    history = torch.zeros((4,) + shape, dtype=dtype, device=device)
    impls = providers(device, not args.no_compile)
    rows = []
    out_of_place = None  # compiled_out_of_place(), made at the first inductor_in_place_bug
    for norm in ("linf", "l2"):
        for with_history in (False, True):
            hist = history if with_history else None
            nbytes = numel * element * (5 if with_history else 4)
            copy_s = common.copy_roofline_seconds(nbytes, device=device, min_run_time=min_run_time)
            expected = x_adv.clone()
            reference.pgd_step_(expected, x_nat, grad, alpha, eps, 0.0, 1.0, norm, None, 0)
            eager_s = peer_s = None
            for name, fn in impls.items():
                work = x_adv.clone()
                if hist is not None:  # not what the previous provider wrote: a provider must write the slot itself
                    hist.fill_(float("nan"))
                try:
                    try:
                        fn(work, x_nat, grad, alpha, eps, 0.0, 1.0, norm, hist, 1)  # also warms up / compiles
                        sync()
                    except Exception as err:
                        if name != "compiled" or not inductor_in_place_bug(err):
                            raise
                        print(f"{name} {norm} history={with_history}: failed: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120]} (torch inductor's bug on an in-place write of an "
                              f"input, pytorch/pytorch#196570); timing '{COMPILED_OUT_OF_PLACE}' instead")
                        out_of_place = out_of_place or compiled_out_of_place()
                        name, fn = COMPILED_OUT_OF_PLACE, out_of_place
                        fn(work, x_nat, grad, alpha, eps, 0.0, 1.0, norm, hist, 1)
                        sync()
                except Exception as err:
                    failed = (f"{name} {norm} history={with_history}: failed: {type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0][:120]}")  # inductor raises bare AssertionErrors
                    # torch.compile of the chain can fail (inductor bugs), and a build can lack a device's kernel
                    # (the dispatcher's NotImplementedError, e.g. a CPU-only build on a GPU): report, go on. Any
                    # other failure of a kernel fails the run, not just loses its row.
                    if not name.startswith("compiled") and not isinstance(err, NotImplementedError):
                        raise SystemExit(f"{failed}; not timing a failing kernel")
                    print(failed)
                    continue
                if name.startswith("compiled"):
                    # Inductor may round otherwise than the eager chain (contracted FMAs, a reordered L2 norm): it is
                    # the peer a user would pick, not a kernel of ours, so it is timed and its row says how far off.
                    same = compiled_agreement(work, hist[1] if hist is not None else None, expected)
                else:
                    same = check_against_eager(name, dtype, work, expected, "x_adv")
                    if hist is not None:
                        same &= check_against_eager(name, dtype, hist[1], expected, "history[1]")
                if name in ("native", "triton"):
                    varied = per_sample_scalars(alpha, eps)
                    got, want = x_adv.clone(), x_adv.clone()
                    fn(got, x_nat, grad, *varied, 0.0, 1.0, norm, None, 0)
                    reference.pgd_step_(want, x_nat, grad, *varied, 0.0, 1.0, norm, None, 0)
                    same &= check_against_eager(name, dtype, got, want, "x_adv with per-sample alpha and eps")

                def step(fn=fn, work=work):
                    fn(work, x_nat, grad, alpha, eps, 0.0, 1.0, norm, hist, 1)

                seconds = common.median_seconds(step, min_run_time)
                if name == "eager":
                    eager_s = seconds
                if name == "torchattacks":
                    peer_s = seconds
                rows.append({
                    "norm": norm, "history": with_history, "provider": name, "median_ms": seconds * 1e3,
                    "equal_to_eager": same if same else "within tolerance", "GB/s": common.gbps(nbytes, seconds),
                    "pct_of_copy": 100 * copy_s / seconds,
                    "speedup_vs_eager": None, "speedup_vs_torchattacks": None,
                })
            for row in rows:
                if row["norm"] == norm and row["history"] == with_history:
                    row["speedup_vs_eager"] = eager_s / (row["median_ms"] / 1e3)
                    row["speedup_vs_torchattacks"] = peer_s / (row["median_ms"] / 1e3) if peer_s else None
            rows.append({
                "norm": norm, "history": with_history, "provider": "copy (roofline)", "median_ms": copy_s * 1e3,
                "equal_to_eager": "", "GB/s": common.gbps(nbytes, copy_s), "pct_of_copy": 100.0,
                "speedup_vs_eager": eager_s / copy_s, "speedup_vs_torchattacks": peer_s / copy_s if peer_s else None,
            })
    print(f"pgd_step_ {list(shape)} {args.dtype} on {device}; bytes counted: read x_adv, x_nat, grad, write x_adv "
          f"(+ history slot)\n")
    common.write_rows(f"pgd_step_{device.type}", rows, device)


if __name__ == "__main__":
    main()
