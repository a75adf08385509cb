"""Benchmark robust_ops.prepacked_conv against ATen's convolutions (the reference, and what a user runs anyway) in one
run: resnet18 on 1x28x28 (IMA's model) as an attack calls it -- eval mode, frozen weights, inside attack_context --
at the batch sizes IMA's compacted GenAdv works at, NCHW and channels_last.

    python benchmarks/bench_prepacked_conv.py [--quick] [--batches 4,16,64,128] [--rounds 9]

Per batch size and layout: forward without graph (IMA's search rounds) and forward + input gradient (an ascent
step), ATen vs prepacked on two copies of the model inside one attack each (packs made once, as an attack reuses
them), interleaved rounds, medians.
Before a case is timed, the prepacked outputs and input gradients are checked against ATen's (:func:`check_close`);
``max_abs_diff`` records how far they are (0 means bitwise equal). The memory
roofline row is a same-size copy of the model's float32 weights: what each ATen call spends at least reordering
them (forward once, input gradient once more), the per-call cost prepacking removes.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, which puts this checkout on the path

from common import (copy_roofline_seconds, interleaved_medians, positive_int, positive_int_list,  # noqa: E402
                    refuse_repeated, write_rows)

from robust_ops.attacks.context import attack_context  # noqa: E402
from robust_ops.models import build_model  # noqa: E402
from robust_ops import prepacked_conv as pc  # noqa: E402


def forward_fn(model, x):
    def run():
        with torch.no_grad():
            return (model(x),)
    return run


def forward_backward_fn(model, x, grad):
    def run():
        leaf = x.detach().requires_grad_(True)
        out = model(leaf)
        (g,) = torch.autograd.grad(out, leaf, grad)
        return out.detach(), g
    return run


# Relative L2 errors the prepacked results may have against ATen's. Outputs: other oneDNN kernels sum in another
# order (resnet18: ~1e-6). Input gradients: also a ReLU whose input is within rounding of zero may flip, and the
# gradient through it changes (resnet18 NCHW batch 64: 8e-4). A wrong kernel (a bias or layout mix-up) is off by ~1.
TOLERANCE = {"output": 1e-4, "input gradient": 1e-2}


def check_close(case, aten, packed):
    """Stops the run (one line, no traceback) when prepacked_conv's outputs or input gradients (``packed``) are not
    close to ATen's (``aten``) in relative L2 error (TOLERANCE): a wrong kernel is not timed. ``case`` names the
    layout, batch and pass."""
    for what, want, got in zip(TOLERANCE, aten, packed):
        error = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
        if not error <= TOLERANCE[what]:  # NaN too
            raise SystemExit(f"bench_prepacked_conv: {case}: the prepacked {what} differs from ATen's (relative "
                             f"error {error:.3g}, over {TOLERANCE[what]:g}); not timing a wrong kernel")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batches 4 and 16, 3 rounds (smoke run)")
    parser.add_argument("--batches", type=positive_int_list, default=None, help="comma list (default 4,16,64,128)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="interleaved rounds (default 9, --quick 3)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: torch's: $OMP_NUM_THREADS, else the cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batches or ([4, 16] if args.quick else [4, 16, 64, 128])
    refuse_repeated(parser, "--batches", batches)
    rounds = args.rounds or (3 if args.quick else 9)
    torch.manual_seed(0)
    base = build_model("resnet18", 1, 2, 28).eval()
    weight_bytes = sum(4 * m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Conv2d))
    copy_ms = copy_roofline_seconds(2 * weight_bytes, "cpu", 0.2 if args.quick else 1.0) * 1e3
    rows = []
    for layout_name, layout in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        aten_model = copy.deepcopy(base).to(memory_format=layout)
        packed_model = copy.deepcopy(aten_model)
        # Both inside an attack (frozen weights, memory pool, native layers); only one with prepacked convolutions:
        # the ATen side explicitly off, or $ROBUST_OPS_PREPACKED_CONV=1 would prepack it too (attacks follow it).
        with pc.prepacked_conv(aten_model, False), pc.prepacked_conv(packed_model, True), \
                attack_context(aten_model), attack_context(packed_model):
            for n in batches:
                g = torch.Generator().manual_seed(n)
                x = torch.rand(n, 1, 28, 28, generator=g).contiguous(memory_format=layout)
                grad = torch.randn(n, 2, generator=g)
                for pass_name, make in (("forward (no graph)", lambda m: forward_fn(m, x)),
                                        ("forward + input gradient", lambda m: forward_backward_fn(m, x, grad))):
                    aten, packed = make(aten_model), make(packed_model)
                    aten_results, packed_results = aten(), packed()
                    check_close(f"{layout_name} batch {n} {pass_name}", aten_results, packed_results)
                    diff = max(float((a - b).abs().max()) for a, b in zip(aten_results, packed_results))
                    (t_aten, t_packed), _ = interleaved_medians([aten, packed], rounds, "cpu")
                    for provider, seconds in (("ATen convolutions", t_aten), ("prepacked_conv", t_packed)):
                        rows.append({"layout": layout_name, "batch": n, "pass": pass_name, "provider": provider,
                                     "median_ms": seconds * 1e3, "x_aten": t_aten / seconds,
                                     "max_abs_diff": diff if provider == "prepacked_conv" else 0.0})
    rows.append({"layout": "-", "batch": "-", "pass": f"copy of the conv weights ({weight_bytes / 1e6:.1f} MB)",
                 "provider": "copy (roofline)", "median_ms": copy_ms, "x_aten": "", "max_abs_diff": ""})
    write_rows("bench_prepacked_conv", rows, "cpu")


if __name__ == "__main__":
    main()
