"""Scripted protocols of the four seed papers (``robust-ops reproduce NAME [--quick]``).

Each protocol trains its methods (over seeds or cross-validation folds), evaluates them the paper's way, and writes
``results.json`` (mean rows, per-run rows, the paper's published numbers) and ``report.md`` with the published numbers
beside ours. Where we must deviate from a paper (CPU budget, architecture, dataset) the protocol's ``notes`` say so
and the report repeats them. ``--quick`` is a smoke run (subsets, 2 epochs, small_cnn for resnet18) that checks the
pipeline end to end; its numbers mean nothing.
"""

import functools
import inspect
import json
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._options import counted
from .evaluate import AttackSpec
from .train import tensors_sha256

__all__ = ["PROTOCOLS", "run_protocol"]  # what ``robust-ops reproduce NAME`` runs: run_protocol(PROTOCOLS[NAME], ...)


@dataclass
class Method:
    label: str
    defense: str
    options: dict = field(default_factory=dict)
    dropmax: str = "none"


@dataclass
class EvalPlan:
    attacks: list
    eps: list
    ensemble: bool = False
    rename: str = None  # label for the worst-case rows (e.g. "AutoAttack-style (L2)")
    quick_options: dict = field(default_factory=dict)  # option overrides per attack name in --quick


@dataclass
class Protocol:
    name: str
    summary: str
    paper: str
    data: str
    model: str
    methods: list
    evals: list
    epochs: int
    batch_size: int
    lr: float
    repeats: int
    split: str = "seeds"  # "seeds": one run per seed on the data's own split; "kfold": stratified k-fold
    paper_rows: list = field(default_factory=list)
    paper_metrics: tuple = ("accuracy",)
    notes: list = field(default_factory=list)
    quick: dict = field(default_factory=dict)
    # the paper's own training schedule, run with --paper-schedule: {"warmup_epochs": N (the classifier head alone
    # before the protocol's epochs), "early_stopping": patience (on the validation loss)}; --quick's in quick
    paper_schedule: dict = field(default_factory=dict)
    # what the radii are measured in when the protocol's data are not [0, 1] images: a run given images keeps them
    radius_units: str = ""


def _paper(source, method, attack, eps, **metrics):
    return {"source": source, "method": method, "attack": attack, "eps": eps, **metrics}


def _radius_units_note(protocol):
    """The report's RADII: note for a protocol whose radii are set in its own data's units, run on images."""
    train = sorted({m.options["eps"] for m in protocol.methods if "eps" in m.options})
    attack = sorted({eps for plan in protocol.evals for eps in plan.eps})

    def listed(radii):
        return ", ".join(f"{eps:g} (= {eps * 255:.3g}/255)" for eps in radii)
    return (f"RADII: {protocol.name}'s radii are set in {protocol.radius_units}, and this run kept them: training "
            f"{listed(train)}, attack {listed(attack)}, here fractions of the [0, 1] pixel range.")


# ---------------------------------------------------------------------------------------------------- ARFL


_FGSM_005 = {"eps": 0.05, "steps": 1, "step_size": 0.05, "random_start": False}
_ARFL_T1 = {  # ARFL Table 1: two-moons, mean (std) test accuracy over 5 seeds, FGSM eps2 = 0.2
    "Standard training": (95.2, 71.4), "Standard training + ARFL": (93.8, 73.0),
    "Adversarial training": (84.4, 81.8), "Adversarial training + ARFL": (84.8, 81.8),
    "Dual adversarial training": (95.8, 72.6), "Dual adversarial training + ARFL": (96.0, 79.6),
    "TRADES": (95.6, 77.2), "MIRST": (92.0, 76.4),
}

ARFL_MOONS = Protocol(
    name="arfl-moons",
    summary="ARFL Table 1: two-moons, MLP 2-10-10-1, FGSM eps 0.05 (train) / 0.2 (attack), five seeds",
    paper="ARFL (adversarially robust feature learning), Table 1",
    data="moons", model="mlp", radius_units="the moons' coordinates (each moon spans about 2 by 1)",
    methods=[
        Method("Standard training", "standard"),
        Method("Standard training + ARFL", "arfl", {"lam": 0.5, "r": 1.0, **_FGSM_005}),
        Method("Adversarial training", "at", dict(_FGSM_005)),
        Method("Adversarial training + ARFL", "arfl", {"lam": 0.5, "r": 0.0, **_FGSM_005}),
        Method("Dual adversarial training", "sat", {"alpha": 0.5, **_FGSM_005}),
        Method("Dual adversarial training + ARFL", "arfl", {"lam": 0.5, "r": 0.5, **_FGSM_005}),
        # TRADES's code's start, x + 0.001 * N(0, I), then the FGSM step: the KL has a zero gradient at x itself
        Method("TRADES", "trades", {**_FGSM_005, "start_noise": 0.001}),
        Method("MIRST", "mirst", {"eps": 0.05}),
    ],
    evals=[EvalPlan([AttackSpec("fgsm", {}, "FGSM")], [0.2])],
    epochs=40, batch_size=128, lr=1e-2, repeats=5,
    paper_rows=[r for m, (std_acc, adv_acc) in _ARFL_T1.items() for r in (
        _paper("Table 1", m, "none", 0.0, accuracy=std_acc / 100),
        _paper("Table 1", m, "FGSM", 0.2, accuracy=adv_acc / 100))],
    paper_metrics=("accuracy",),
    notes=[
        "ARFL trains 5,000 epochs; we train 40 epochs of Adam (lr 1e-2, batch 128) on the 10,000 training points "
        "(the paper states no optimizer, learning rate or batch size).",
        "Dual adversarial training = SAT with alpha 0.5 (1:1 clean and FGSM data); ARFL rows use lam = 0.5 and "
        "r = 1 / 0 / 0.5 as in the paper; features from the penultimate layer (the ReLU output that feeds the last "
        "layer; the paper names no activation).",
        "TRADES and MIRST use the same training budget eps 0.05 (MIRST: 10-step PGD iterates). TRADES's KL attack "
        "starts where TRADES's code starts it, at x + 0.001 * N(0, I) (its gradient is zero at x), then takes the "
        "one step of 0.05; until 2026-12-03 it started at x and its step followed round-off noise, until 2026-12-05 "
        "at a uniform random point of the ball.",
        "TRADES: beta = 1, the library's default (MIRST-DM's setting); ARFL does not state the beta it ran. The "
        "TRADES paper's is 6 (robustness weighted more): defenses.build(\"trades\", beta=6) for that reading.",
    ],
    quick={"epochs": 2, "repeats": 2, "n_train": 1500, "n_test": 400},
)

# ---------------------------------------------------------------------------------------------------- MIRST-DM


def _mirst_rows():
    t1 = {  # Table 1 (ImageNet CE-pretrained ResNet50, 5-fold means): F1, sensitivity
        "Baseline": {"none": (0.798, 0.786), "FGSM": (0.014, 0.017), "PGD": (0.0, 0.0), "CW": (0.0, 0.0)},
        "RST": {"none": (0.757, 0.711), "FGSM": (0.519, 0.495), "PGD": (0.496, 0.478), "CW": (0.482, 0.463)},
        "MIRST": {"none": (0.748, 0.713), "FGSM": (0.542, 0.528), "PGD": (0.516, 0.513), "CW": (0.498, 0.492)},
    }
    t3 = {  # Table 3 (SimCLR-pretrained ResNet50): with and without the drop-max layer
        "RST": {"none": (0.802, 0.762), "FGSM": (0.620, 0.604), "PGD": (0.425, 0.420), "CW": (0.467, 0.463)},
        "RST-DM": {"none": (0.825, 0.806), "FGSM": (0.641, 0.628), "PGD": (0.580, 0.571), "CW": (0.740, 0.743)},
        "MIRST": {"none": (0.830, 0.805), "FGSM": (0.640, 0.622), "PGD": (0.544, 0.543), "CW": (0.512, 0.504)},
        "MIRST-DM": {"none": (0.823, 0.799), "FGSM": (0.655, 0.650), "PGD": (0.586, 0.587), "CW": (0.734, 0.720)},
    }
    rows = []
    for source, table in (("Table 1", t1), ("Table 3 (SimCLR)", t3)):
        for method, cells in table.items():
            for attack, (f1, sens) in cells.items():
                rows.append(_paper(source, method, attack, 0.0 if attack == "none" else 5 / 255, f1=f1,
                                   sensitivity=sens))
    return rows


MIRST_BUS = Protocol(
    name="mirst-bus",
    summary="MIRST-DM Tables 1 and 3 on BreastMNIST: Baseline, RST, MIRST, RST-DM, MIRST-DM; FGSM, PGD-20, CW-10 at "
            "eps 5/255; 5-fold CV",
    paper="MIRST-DM (Sun et al., MICCAI 2022), Tables 1 and 3",
    data="breastmnist", model="resnet18",
    methods=[
        Method("Baseline", "standard"),
        Method("RST", "rst"),
        Method("MIRST", "mirst"),
        Method("RST-DM", "rst", dropmax="first"),
        Method("MIRST-DM", "mirst-dm"),
    ],
    evals=[EvalPlan([AttackSpec("fgsm", {}, "FGSM"), AttackSpec("pgd", {"steps": 20, "alpha": 0.001}, "PGD"),
                     AttackSpec("cw", {"steps": 10, "alpha": 0.001}, "CW")], [5 / 255])],
    epochs=30, batch_size=32, lr=1e-3, repeats=5, split="kfold",
    paper_rows=_mirst_rows(), paper_metrics=("f1", "sensitivity"),
    notes=[
        "The paper: ResNet50 pretrained on ImageNet (CE, Table 1) or SimCLR (Tables 2-3), BUSI+BUSIS (1,190 images, "
        "224x224), 100 epochs of Adam lr 1e-4, batch 8. Ours: ResNet-18 from scratch on BreastMNIST (780 images, "
        "28x28, malignant = positive class), 30 epochs of Adam lr 1e-3, batch 32, so absolute numbers differ.",
        "5-fold stratified cross-validation over all 780 images (10% of each training part held out for "
        "validation); rows are fold means ± std.",
        "Attacks as in the paper: Linf eps 5/255; PGD 20 steps of 0.001, CW-Linf 10 steps of 0.001.",
        "Start points (not given in the paper): PGD from a random point of the ball (Madry's PGD, the library's pgd "
        "default), CW-Linf from the clean image (the library's cw default; 10 steps of 0.001 then reach about half of "
        "the 5/255 ball). The paper calls its CW-Linf \"similar to the PGD attack excepting the loss function\", "
        "which may include PGD's random start: `robust-ops eval RUN --attacks cw:steps=10:alpha=0.001:"
        "random_start=true --eps 5/255` for that reading.",
        "The paper says it defends \"targeted white-box attacks\" but describes untargeted FGSM, PGD and CW; with two "
        "classes the attack targeted at the other class is the untargeted one, so the untargeted attacks are run.",
        "Training attacks (not given in the paper beyond MIRST's T = 10): Linf 5/255, 10-step PGD with step "
        "2.5*eps/10 for RST and MIRST alike (MIRST's loss uses the iterates after 2, 4, 6 and 8 steps). RST keeps "
        "the library's AT defaults (random start, attack in eval mode), MIRST starts at the clean image (eq. 3) with "
        "the attack in train mode; the paper calls the number of adversarial instances the primary difference "
        "between them. rst(random_start=False, attack_mode='train') is the RST that differs from MIRST in that "
        "alone (not run here). The paper's attack step 0.001 as the training step is the other reading "
        "(step_size=0.001: MIRST's instances then lie within 0.002-0.008 of x; docs/defenses/mirst.md).",
    ],
    quick={"epochs": 2, "repeats": 1, "n_train": 96, "n_test": 48, "model": "small_cnn"},
)

# ---------------------------------------------------------------------------------------------------- IMA

IMA_EPS_TRAIN = math.sqrt(28 * 28 * 1 * 3 / (32 * 32))  # IMA's per-pixel rule (eps_p = 3 / 1024) for 1x28x28
IMA_AA_EPS, IMA_NOISE_EPS = (0.3, 0.6, 0.9), (1.0, 2.0, 3.0)  # PathMNIST's L2 radii, Table 2 (c) and (d)
IMA_EPOCHS = 30


def _per_pixel_equivalent(radii):
    """PathMNIST's radii (3x28x28) carried to 1x28x28 by IMA's per-pixel rule, as eps_train is: "0.173 / ..."."""
    return " / ".join(f"{r / math.sqrt(3):.3f}" for r in radii)


def _ima_ensemble(seed=None):
    """IMA's evaluation (Section 3.1): AutoAttack's standard cascade, in L2, with AutoAttack's settings (as
    ``attacks.AutoAttack(model, norm="l2")`` builds it, from the same ``STANDARD`` settings). ``seed``: the attacks'
    (AutoAttack's, 0, for None); a protocol's repeat k passes k, as its other random attacks draw from seed k."""
    from .attacks.ensemble import STANDARD

    steps, targets = STANDARD["steps"], STANDARD["n_target_classes"]
    seed = STANDARD["seed"] if seed is None else seed
    return [AttackSpec("apgd-ce", {"norm": "l2", "steps": steps, "seed": seed}, "APGD-CE"),
            AttackSpec("apgd-t", {"norm": "l2", "steps": steps, "n_target_classes": targets, "seed": seed}, "APGD-T"),
            AttackSpec("fab-t", {"norm": "l2", "steps": steps, "n_target_classes": targets, "seed": seed}, "FAB-T"),
            AttackSpec("square", {"norm": "l2", "n_queries": STANDARD["n_queries"], "rescale_schedule": False,
                                  "seed": seed}, "Square")]


def _ima_rows():
    aa = {"STD": (90.37, 0, 0, 0), "IMA": (83.07, 65.40, 46.66, 36.03), "TRADES": (56.08, 51.88, 48.55, 45.52),
          "SAT": (54.24, 50.64, 47.20, 44.67)}
    wn = {"STD": (56.72, 17.52, 3.74), "IMA": (80.72, 76.51, 69.81), "TRADES": (54.83, 53.05, 51.11),
          "SAT": (52.49, 47.17, 43.94)}
    rows = []
    for m, vals in aa.items():
        rows.append(_paper("Table 2(c) PathMNIST", m, "none", 0.0, accuracy=vals[0] / 100))
        for e, v in zip(IMA_AA_EPS, vals[1:]):
            rows.append(_paper("Table 2(c) PathMNIST", m, "AutoAttack-style (L2)", e, accuracy=v / 100))
    for m, vals in wn.items():
        for e, v in zip(IMA_NOISE_EPS, vals):
            rows.append(_paper("Table 2(d) PathMNIST", m, "white noise (L2)", e, accuracy=v / 100))
    return rows


IMA_BUS = Protocol(
    name="ima-bus",
    summary="IMA vs SAT and TRADES on BreastMNIST over a sweep of L2 radii: AutoAttack-style ensemble and white noise",
    paper="IMA (increasing-margin adversarial training), Table 2 (PathMNIST, L2)",
    data="breastmnist", model="resnet18",
    methods=[
        Method("STD", "standard"),
        Method("SAT", "at", {"norm": "l2", "eps": IMA_EPS_TRAIN, "steps": 10}),
        Method("TRADES", "trades", {"norm": "l2", "eps": IMA_EPS_TRAIN, "steps": 10}),
        Method("IMA", "ima", {"norm": "l2", "eps_train": IMA_EPS_TRAIN}),
    ],
    evals=[
        EvalPlan("ensemble", list(IMA_AA_EPS), ensemble=True, rename="AutoAttack-style (L2)"),
        EvalPlan([AttackSpec("noise", {"norm": "l2", "trials": 100}, "white noise (L2)")], list(IMA_NOISE_EPS),
                 quick_options={"noise": {"trials": 5}}),
    ],
    epochs=IMA_EPOCHS, batch_size=32, lr=1e-3, repeats=1,
    paper_rows=_ima_rows(), paper_metrics=("accuracy",),
    notes=[
        "IMA reports no breast-ultrasound numbers; the published column is PathMNIST (28x28x3, ResNet-18), shown for "
        "the shape of the trade-off, not for equality.",
        f"Training noise level: IMA's per-pixel rule gives eps_train = sqrt(28*28*1*3/1024) = {IMA_EPS_TRAIN:.3f} (L2) "
        "for 1x28x28 images, used by SAT (Madry AT, as IMA names it), TRADES and IMA alike.",
        "Evaluation radii: PathMNIST's L2 radii as published, not carried to 1x28x28 by that rule as eps_train is, "
        "so beside it they are twice the paper's: " + " / ".join(f"{e:g}" for e in IMA_AA_EPS) + " are "
        + " / ".join(f"{e / IMA_EPS_TRAIN:.2f}" for e in IMA_AA_EPS) + " of our eps_train, the paper's "
        + " / ".join(f"{e / 3:.2f}" for e in IMA_AA_EPS) + " of its 3.0 (per pixel sqrt(3) = 1.73 times "
        "PathMNIST's noise; white noise's 1 / 2 / 3 likewise). The rule's equivalents are "
        f"{_per_pixel_equivalent(IMA_AA_EPS)} (AutoAttack) and {_per_pixel_equivalent(IMA_NOISE_EPS)} (white "
        "noise): `robust-ops eval RUN --attacks autoattack:norm=l2 --eps "
        f"{_per_pixel_equivalent(IMA_AA_EPS).replace(' / ', ',')}`, and `--attacks noise:norm=l2:trials=100` at "
        "the latter.",
        "TRADES: beta = 1, the library's default (MIRST-DM's setting). The IMA paper runs the other methods with their "
        "own papers' settings, which for TRADES is beta = 6 (robustness weighted more), and TRADES's code starts its "
        "attack at x + 0.001 * N(0, I), not at a random point of the ball (the KL's gradient is zero at x itself; "
        "arfl-moons's TRADES starts so): defenses.build(\"trades\", beta=6, start_noise=0.001) for that reading, "
        "`--defense-opt beta=6 --defense-opt start_noise=0.001` in `robust-ops train`.",
        "SAT's and TRADES's attacks (the paper gives eps_train only): 10 steps of L2 PGD of 2.5*eps/10 (Madry's rule) "
        "from a random point of the ball, the model in eval mode (the library's AT defaults; TRADES's attack ascends "
        "the KL).",
        "AutoAttack-style: the library's cascade of AutoAttack's standard attacks in L2 (APGD-CE, APGD-T, FAB-T, "
        "Square with 5000 queries; as the paper's Section 3.1, with AutoAttack's settings; until 2026-12-02 it was "
        "L2 PGD-20, APGD-CE and APGD-DLR, as FAB-T and the L2 Square were not built; on a CPU Square's 5000 queries "
        "are most of the evaluation: a forward of 100 rows of resnet18 at 28x28 takes ~125 ms on the 2-core "
        "development machine, so ~10 min per model and radius with 100 samples left robust); white noise: uniform "
        "in the L2 ball, 100 draws, a sample counts as "
        "robust only if every draw leaves it correct (the paper's \"100 iterations to get a stable result\" may "
        "also mean the accuracy averaged over the draws, which is never lower).",
        "Training: the paper trains PathMNIST for 150 epochs of SGD with MMA's settings (Sections 3.4.1-3.4.2; batch "
        "128 is stated for CIFAR10), with data augmentation and hence GenAdv's Algorithm 3, and Delta-eps = 0.04 for "
        "eps_train 3. Ours: 30 epochs of Adam (lr 1e-3, batch 32) for every method, no augmentation (so Algorithm "
        "2), and IMA's delta = eps_train / epochs, so margins can reach eps_train by the last epoch. That is half "
        "the paper's PathMNIST pace (0.04 for eps_train 3 in 150 epochs reaches it after 75, half the training; "
        "docs/ima.md's rule for few epochs, delta >= eps_train / (0.5 * epochs)): at that pace delta = 2 * "
        f"eps_train / epochs, {2 * IMA_EPS_TRAIN / IMA_EPOCHS:.4f} for {IMA_EPOCHS} epochs, `robust-ops train --data "
        f"breastmnist --model resnet18 --epochs {IMA_EPOCHS} --batch-size 32 --lr 0.001 --defense ima --defense-opt "
        f"norm=l2 --defense-opt eps_train={IMA_EPS_TRAIN:.4f} --defense-opt "
        f"delta={2 * IMA_EPS_TRAIN / IMA_EPOCHS:.4f}`.",
    ],
    quick={"epochs": 2, "repeats": 1, "n_train": 96, "n_test": 48, "model": "small_cnn"},
)

# ---------------------------------------------------------------------------------------------------- DPAAT

# the paper's training adversary: 7-step L2 PGD, eps 0.3, step 0.15, started at x (eq. 9: x_0 = x) for every method
_DPAAT_TRAIN = {"norm": "l2", "eps": 0.3, "steps": 7, "step_size": 0.15, "random_start": False}
_DPAAT_T1 = {  # Table I, all six CNNs: FGSM, 10-IFGSM, 20-IFGSM, 20-PGD, 50-PGD, GAcc (%)
    "STD": (55.15, 2.36, 0.41, 12.34, 12.20, 73.96), "AT": (68.03, 56.56, 51.56, 62.25, 62.25, 69.12),
    "SAT": (68.38, 54.00, 44.09, 59.80, 59.80, 70.19), "AMAT": (68.28, 55.75, 48.22, 61.71, 61.84, 69.73),
    "DPAAT": (69.81, 60.31, 54.42, 64.70, 64.70, 70.71),
}
# Table II, all six CNNs: mAP (clean test set: "a more precise expression for generalization"), mARP ("mean average
# precision on adversarial dataset crafted from the testing dataset", 20-PGD), precision, recall, F1 (20-PGD, caption)
_DPAAT_T2 = {
    "AT": (0.6750, 0.6150, 0.7010, 0.6993, 0.6992), "SAT": (0.7350, 0.6717, 0.7103, 0.7103, 0.7082),
    "AMAT": (0.6400, 0.5800, 0.7068, 0.7027, 0.7015), "DPAAT": (0.8317, 0.8150, 0.7193, 0.7195, 0.7160),
}
DPAAT_LINF = 1 / 255


def _dpaat_rows():
    rows = []
    labels = ("FGSM", "10-IFGSM", "20-IFGSM", "20-PGD", "50-PGD")
    for m, vals in _DPAAT_T1.items():
        rows.append(_paper("Table I", m, "none", 0.0, accuracy=vals[5] / 100))
        for label, v in zip(labels, vals[:5]):
            rows.append(_paper("Table I", m, label, DPAAT_LINF if "PGD" not in label else 0.3, accuracy=v / 100))
    for m, (mp, marp, prec, rec, f1) in _DPAAT_T2.items():
        rows.append(_paper("Table II (mAP)", m, "none", 0.0, map=mp))
        rows.append(_paper("Table II (mARP)", m, "20-PGD", 0.3, map=marp, precision=prec, sensitivity=rec, f1=f1))
    return rows


DPAAT_BUS = Protocol(
    name="dpaat-bus",
    summary="DPAAT vs AT, SAT, AMAT on BreastMNIST under FGSM, IFGSM-10/20, PGD-20/50, with mAP",
    paper="DPAAT (dynamic perturbation-adaptive adversarial training), Tables I and II",
    data="breastmnist", model="resnet18",
    methods=[
        Method("STD", "standard"),
        Method("AT", "at", dict(_DPAAT_TRAIN)),
        Method("SAT", "sat", {"alpha": 0.5, **_DPAAT_TRAIN}),
        Method("AMAT", "amat"),
        Method("DPAAT", "dpaat"),
    ],
    evals=[
        EvalPlan([AttackSpec("fgsm", {}, "FGSM"), AttackSpec("ifgsm", {"steps": 10}, "10-IFGSM"),
                  AttackSpec("ifgsm", {"steps": 20}, "20-IFGSM")], [DPAAT_LINF]),
        EvalPlan([AttackSpec("pgd", {"norm": "l2", "steps": 20, "alpha": "eps/4"}, "20-PGD"),
                  AttackSpec("pgd", {"norm": "l2", "steps": 50, "alpha": "eps/4"}, "50-PGD")], [0.3]),
    ],
    epochs=30, batch_size=32, lr=1e-3, repeats=1,
    paper_rows=_dpaat_rows(), paper_metrics=("accuracy", "map", "precision", "sensitivity", "f1"),
    notes=[
        "DPAAT evaluates six ImageNet-pretrained CNNs on three HAM10000 classes (800/299 images per class); the "
        "published column is the six-CNN mean. Ours: ResNet-18 from scratch on BreastMNIST (binary, malignant "
        "positive): precision/recall/F1 are the positive class's, not a 3-class average.",
        "Training adversary as in the paper for AT, SAT, AMAT and DPAAT: 7-step L2 PGD, eps 0.3, step 0.15, started "
        "at the clean image (eq. 9: x_0 = x; AT and SAT are told random_start=False, their library default is a "
        "random start); SAT and DPAAT alpha 0.5. The paper does not say which mode the model is in during the "
        "attacks: eval mode here (BatchNorm's running statistics, not updated by the attacks; the library's default, "
        "attack_mode='train' for the training-mode attack).",
        "The paper does not state the test radii. Our choice: FGSM and IFGSM (Linf, as the paper describes IFGSM) at "
        "eps 1/255; PGD-20/50 in L2 at the training radius 0.3 with step eps/4, from a random point of the ball (the "
        "library's PGD default). Eq. 9 starts PGD at x, as the training adversary here does; that evaluation is "
        "`robust-ops eval RUN --attacks pgd:norm=l2:steps=20:alpha=eps/4:random_start=false --eps 0.3`.",
        "IFGSM's step (the paper gives none): eps/steps, the library's default, with which 10 and 20 steps both span "
        "the 1/255 ball from x; `robust-ops eval RUN --attacks ifgsm:steps=20:alpha=1/255 --eps 1/255` for steps of "
        "the whole radius.",
        "Radii are the paper's numbers on our [0, 1] images, not rescaled to their size (ima-bus rescales its "
        "eps_train by IMA's per-pixel rule, not its evaluation radii; DPAAT states neither its input size nor its "
        "pixel scale, its ImageNet CNNs take 3x224x224): L2 0.3 is a per-pixel RMS of 0.011 (2.7/255) at 1x28x28 "
        "and 0.0008 (0.2/255) at 3x224x224; the Linf 1/255 ball reaches L2 0.11 at 1x28x28 and 1.52 at 3x224x224.",
        "The paper fine-tunes ImageNet-pretrained CNNs: the fully connected layers alone for 10 epochs, then all "
        "layers for 50 epochs of Adam, lr 3e-4, batch 32, early stopping after 5 epochs without validation "
        "improvement. Ours: every method trains all layers from scratch for 30 epochs of Adam, lr 1e-3, batch 32, "
        "no early stopping. `--paper-schedule` adds the paper's schedule: the classifier head (resnet18's fc) alone "
        "for 10 epochs before the 30, early stopping after 5 epochs without a lower validation loss (on "
        "BreastMNIST's validation split), and the paper's lr 3e-4 (--epochs 50 for its 50). The paper does not say "
        "which epoch's weights its early stopping kept, the best one's or the last one's: the runs keep their last "
        "epoch's, as they always did (`robust-ops train --restore-best` hands back the best epoch's).",
        "Table II's mAP is measured on the clean test set and its mARP on the 20-PGD adversarial set: the mAP column "
        "compares the paper's mAP with our clean mAP, and its mARP with our mAP under 20-PGD (the row's precision, "
        "recall and F1 are under 20-PGD, as the table's caption says).",

        "Settings the paper leaves open, run at the library's defaults (docs/defenses/amat.md, dpaat.md): AMAT's xi = "
        "ln 2 and delta_eps = eps/2 (AMAT's thresholds came from an external network; DPAAT gives no values); "
        "DPAAT's beta = 1 (eq. 12 calls it tunable), L_syn as the Jensen-Shannon divergence (eq. 11 as printed is "
        "ln 2 minus it, which rises as the outputs agree, against the text; syn=\"printed\" for the formula as "
        "printed) and dL_avg over the mini-batch (eq. 14). AMAT's and DPAAT's second attack, at the per-sample radii "
        "eps_i (Alg. 1 line 12: \"returned new x^adv with eps_DPAAT\"), is 7 steps from x again with step "
        "eps_i * 0.15 / 0.3.",
    ],
    quick={"epochs": 2, "repeats": 1, "n_train": 96, "n_test": 48, "model": "small_cnn",
           "paper_schedule": {"warmup_epochs": 1, "early_stopping": 5, "lr": 3e-4}},
    paper_schedule={"warmup_epochs": 10, "early_stopping": 5, "lr": 3e-4},
)

PROTOCOLS = {p.name: p for p in (ARFL_MOONS, MIRST_BUS, IMA_BUS, DPAAT_BUS)}


def describe(p):
    """Markdown description of a protocol (docs/reproduce/<name>.md is generated from it)."""
    from .report import format_eps, paper_comparison_table

    split = f"{p.repeats}-fold stratified cross-validation" if p.split == "kfold" else f"{p.repeats} seed(s)"
    lines = [f"# Reproduction: `{p.name}`", "", f"**{p.summary}.** Source: {p.paper}.", "", "```bash",
             f"robust-ops reproduce {p.name}            # full protocol",
             f"robust-ops reproduce {p.name} --quick    # smoke run", "```", "", "## Protocol as implemented", "",
             f"* Data: `{p.data}`; model: `{p.model}` (quick: `{p.quick.get('model', p.model)}`); {p.epochs} epochs "
             f"of Adam, lr {p.lr}, batch {p.batch_size}; {split}.", "* Methods:"]
    for m in p.methods:
        opts = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.options.items())
        lines.append(f"  * {m.label}: `{m.defense}`" + (f" ({opts})" if opts else "")
                     + (f", drop-max `{m.dropmax}`" if m.dropmax != "none" else ""))
    lines.append("* Evaluation:")
    for e in p.evals:
        if e.attacks == "ensemble":
            att = "AutoAttack-style ensemble cascade (" + ", ".join(s.label for s in _ima_ensemble()) + ")"
        else:
            att = ", ".join(f"{a.label} (`{a.name}`" + "".join(f", {k}={v}" for k, v in a.options.items()) + ")"
                            for a in e.attacks)
        lines.append(f"  * {att} at ε = {', '.join(format_eps(x, e.eps) for x in e.eps)}"
                     + (" (worst case only)" if e.ensemble else ""))
    lines += ["", "## Deviations from the paper", ""] + [f"* {n}" for n in p.notes]
    lines += ["", "## Published numbers", "", paper_comparison_table([], p.paper_rows, p.paper_metrics), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- running


QUICK_STEPS = 5


def _own_seed(name):
    """The seed attack ``name`` draws from by default when it has one of its own (noise's, Square's, APGD's, FAB's:
    0), else None (PGD's random start: evaluate's seeded RNG)."""
    from . import attacks

    cls, defaults = attacks.attack_entry(name)
    if "seed" in defaults:
        return defaults["seed"]
    param = inspect.signature(cls).parameters.get("seed")
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _specs(plan, quick, seed=None):
    """The plan's attacks as run (``quick``: capped); ``seed``: the repeat's, for the attacks with a seed of their own
    (the ensemble's, white noise)."""
    specs = _ima_ensemble(seed) if plan.attacks == "ensemble" else list(plan.attacks)
    out = []
    for s in specs:
        opts = dict(s.options)
        if seed is not None and "seed" not in opts and _own_seed(s.name) not in (None, seed):
            # repeat k draws from seed k (its own default drew repeat 0's noise in every repeat); a repeat whose seed
            # is the default keeps the options as they were, and so its cached rows
            opts["seed"] = seed
        if quick:  # smoke run: at most QUICK_STEPS attack steps / noise draws (labels keep the full protocol's names)
            opts.update(plan.quick_options.get(s.name, {}))
            from . import attacks

            defaults = attacks.attack_entry(s.name)[1]
            for key in ("steps", "trials", "n_queries"):
                if key in opts or key in defaults:
                    opts[key] = min(opts.get(key, defaults.get(key, QUICK_STEPS)), QUICK_STEPS)
        opts = {k: (_eps_expr(v) if isinstance(v, str) and "eps" in v else v) for k, v in opts.items()}
        out.append(AttackSpec(s.name, opts, s.label))
    return out


def _eps_expr(text):
    from .evaluate import _parse_option

    return _parse_option("reproduce", "alpha", text)


EVAL_CACHE_FILE = "eval.json"


def run_fingerprint(model, dataset, method):
    """The part of an evaluation's key fixed by the trained run: the model's parameters and buffers, the test set,
    the library and torch versions."""
    from . import __version__
    from .evaluate import dataset_tensors

    state = model.state_dict()
    return {"method": method, "model_sha256": tensors_sha256(state[k] for k in sorted(state)),
            "test_sha256": tensors_sha256(dataset_tensors(dataset)), "robust_ops": __version__,
            "torch": torch.__version__}


def eval_key(fingerprint, specs, eps, ensemble, seed, positive_class=None):
    """What one evaluation plan's rows depend on, as stored JSON values: the run's ``fingerprint``, the attacks
    with their options resolved at every radius, the radii, the attacks' RNG seed (rows cached before it was
    recorded drew from whatever the process had done: their key lacks it, so they are evaluated again), and the
    class their sensitivity, precision and AUC are of (a folder named COVID / non-COVID took the negation as
    positive before 2026-12-05; rows scored so are evaluated again)."""
    from .evaluate import parse_eps

    radii = parse_eps(eps)
    attacks = [[s.name, s.label, {k: ([v(e) for e in radii] if callable(v) else v) for k, v in s.options.items()}]
               for s in specs]
    # "scores": rows cached before 2026-12-05 ranked AUC / mAP on probabilities, which tie past a logit margin of
    # ~37 (robust_ops.metrics): their key lacks it, so they are evaluated again
    key = {**fingerprint, "attacks": attacks, "eps": radii, "ensemble": bool(ensemble), "seed": seed,
           "scores": "log-odds", "positive_class": positive_class}
    if ensemble:  # ensemble rows cached before 2026-12-05 ran each radius afresh (a sample fooled at a smaller radius
        # could count as robust at a larger one): their key lacks this, so they are evaluated again
        key["ensemble_radii"] = "cascade"
    elif len(specs) > 1:  # worst-case rows cached before 2026-12-06 took a fooled sample's first fooling attack and a
        # robust one's lowest attack output (evaluate._worst_case): their key lacks this, so they are evaluated again
        key["worst_case"] = "lowest-inside-ball"
    return _json_copy(key)


def _json_copy(value):
    """``value`` as it reads back from JSON (tuples become lists); also a deep copy."""
    return json.loads(json.dumps(value))


class EvalCache:
    """Evaluation rows of one trained run, kept in a JSON file (written atomically) and looked up by ``eval_key``."""

    def __init__(self, path, enabled=True, writes=True):
        self.path = Path(path)
        self.enabled, self.writes = enabled, writes  # writes: rank 0 of a torchrun launch, or the only process
        self.entries = []
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                self.entries = [e for e in doc.get("entries", []) if isinstance(e, dict) and "key" in e and "rows" in e]
            except (ValueError, AttributeError, TypeError) as err:  # unreadable: evaluate again and overwrite it
                if writes:
                    print(f"{self.path}: unreadable evaluation cache ({err}); evaluating again", flush=True)

    def get(self, key):
        if not self.enabled:
            return None
        for e in self.entries:
            if e["key"] == key:
                return _json_copy(e["rows"])  # a copy: the caller relabels rows
        return None

    def put(self, key, rows):
        from .cli import write_json_atomic
        from .evaluate import _json_safe

        # NaN (an undefined metric) as null, as in results.json: a bare NaN token is no JSON to strict readers
        entry = {"key": key, "rows": _json_copy(_json_safe(rows))}
        self.entries = [e for e in self.entries if e["key"] != key] + [entry]
        if self.writes:
            write_json_atomic(self.path, {"format": "robust_ops.eval_cache/1", "entries": self.entries})


def aggregate(rows, metrics):
    """Mean and sample std over repeats for each (method, attack, norm, eps).

    ``n`` is the total number of test samples over the runs (folds differ in size by one or two), ``n_min`` and
    ``n_max`` the smallest and largest run's. A metric undefined in a run (NaN: e.g. sensitivity with no positive
    sample in a fold) is left out of that metric's mean and std; ``<metric>_runs`` counts the runs that did define
    it, ``repeats`` all runs. ``confusion`` is the runs' counts summed (every run's test samples, as ``n``), for
    report.md's per-class recall; None when a run has none."""
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["attack"], r["norm"], r["eps"]), []).append(r)
    out = []
    for (method, attack, norm, eps), rs in groups.items():
        sizes = [int(r["n"]) for r in rs]
        row = {"method": method, "attack": attack, "norm": norm, "eps": eps, "n": sum(sizes), "n_min": min(sizes),
               "n_max": max(sizes), "repeats": len(rs)}
        for m in metrics:
            vals = np.array([r.get(m, math.nan) for r in rs], dtype=float)
            vals = vals[np.isfinite(vals)]
            row[m] = float(vals.mean()) if vals.size else math.nan
            row[f"{m}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else None
            row[f"{m}_runs"] = int(vals.size)
        confusions = [r.get("confusion") for r in rs]
        row["confusion"] = (None if any(c is None for c in confusions) else
                            np.sum(np.asarray(confusions, dtype=np.int64), axis=0).tolist())
        out.append(row)
    return out


CV_SEED = 0  # the k-fold split's seed (fixed: every seed of a protocol sees the same folds)


def split_record(protocol, k, quick_sizes=None, size=None, bit_depth=None, channels=None, classes=None):
    """run.json's record of repeat ``k``'s data split, enough for :func:`rebuild_splits` (``robust-ops eval`` on a
    reproduce run) to rebuild the exact train/val/test sets it was trained and tested on."""
    if protocol.split == "kfold":
        record = {"kind": "kfold", "k": max(protocol.repeats, 2), "fold": k, "cv_seed": CV_SEED, "data_seed": 0}
    else:
        record = {"kind": "seeds", "data_seed": k}
    if size is not None:  # --size: the loaded image size (absent: the data's own / 224 for folders)
        record["size"] = size
    if bit_depth is not None:  # --bit-depth: the scale 16-bit images were read on
        record["bit_depth"] = bit_depth
    if channels is not None:  # --channels: grayscale or RGB
        record["channels"] = channels
    if classes is not None:  # --classes: the class folders / CSV labels kept, in label order
        record["classes"] = list(classes)
    if quick_sizes:
        record["subset"] = {"n_train": quick_sizes[0], "n_test": quick_sizes[1], "seed": k}
    return record


def load_pool(data, size, seed, bit_depth, split_by=None, channels=None, classes=None, rare_classes=None):
    """The data a k-fold protocol pools, loaded with the CLI's loader. Its own train/val/test split (7:1:2 for
    sources without one) is pooled again, so that split's warning about a class too small to stratify it would
    describe parts no run uses; the folds' own splits warn for themselves. ``split_by``, ``rare_classes``: as
    load_dataset's (the pool's order follows that split, and the folds follow the pool's order)."""
    import warnings

    from .cli import load_data

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*a class is too small to stratify the 0\.7/0\.1/0\.2 split")
        return load_data(data, size=size, seed=seed, bit_depth=bit_depth, split_by=split_by, channels=channels,
                         classes=classes, rare_classes=rare_classes)


def kfold_splits(data, base, k, seed, rare_classes=None):
    """The ``k`` stratified folds of the loaded ``data`` (``base``); data that cannot be split so (a class with
    fewer than ``k`` samples) is a one-line error naming ``--data``, not a traceback. ``rare_classes``: how the
    folds' validation parts treat classes too small to stratify (None: cross_validation's default)."""
    from .cli import CLIError
    from .data import DataError, cross_validation

    try:
        return cross_validation(base, k=k, seed=seed, **({} if rare_classes is None else
                                                          {"rare_classes": rare_classes}))
    except DataError as err:
        raise CLIError(f"--data: {data} cannot be split into {k} stratified cross-validation folds ({err})") from None


def rebuild_splits(data, record, base=None, folds=None, split_by=None, rare_classes=None):
    """The DatasetSplits a reproduce run used, from its run.json ``split`` record (see :func:`split_record`).
    ``base`` / ``folds``: the loaded data / its folds, when the caller has them already. ``split_by``: how a CSV's
    rows were split, as the run's dataset record says (eval's ``_trained_split_by``); None: load_dataset's default.
    ``rare_classes``: likewise, how its split treated classes too small to stratify (eval's
    ``_trained_rare_classes``); for a k-fold record both the 7:1:2 split its pool is read in the order of and the
    folds' validation parts."""
    from .cli import CLIError, load_data, subset_splits

    kind = record.get("kind")
    if kind == "kfold":
        if folds is None:
            base = base if base is not None else load_pool(data, record.get("size"), record.get("data_seed", 0),
                                                           record.get("bit_depth"), split_by, record.get("channels"),
                                                           record.get("classes"), rare_classes)
            folds = kfold_splits(data, base, record["k"], record["cv_seed"], rare_classes)
        splits = folds[record["fold"]]
    elif kind == "seeds":
        splits = base if base is not None else load_data(data, size=record.get("size"), seed=record["data_seed"],
                                                         bit_depth=record.get("bit_depth"), split_by=split_by,
                                                         channels=record.get("channels"),
                                                         classes=record.get("classes"), rare_classes=rare_classes)
    else:
        raise CLIError(f"run.json: unknown split record {record!r}; expected kind 'kfold' or 'seeds'")
    sub = record.get("subset")
    if sub:
        splits = subset_splits(splits, sub["n_train"], sub["n_test"], sub["seed"])
    return splits


def _trained_warmup(run_dir):
    """The warm-up epochs RUN_DIR/run.json records (0 when it records none); None where it cannot be read."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text()).get("warmup_epochs", 0)
    except (OSError, ValueError, AttributeError):
        return None


def _resume_error(protocol, run_dir, conflict, epochs, blocked=(), warmup=0):
    """A reproduce-specific one-line error for a run that cannot continue under this command's settings. ``blocked``:
    the run folders of this command that cannot continue, ``run_dir`` first: deleting only the named one led to the
    same error for the next (one per method and seed, after an --epochs change). ``warmup``: --paper-schedule's
    warm-up epochs, trained before --epochs (an epochs conflict counts them)."""
    from ._options import listing
    from .cli import CLIError

    key, was, now = conflict
    blocked = [Path(d) for d in blocked] or [Path(run_dir)]
    runs_dir = Path(run_dir).parent.parent  # OUT/runs/METHOD/seedK
    if len(blocked) == 1:
        way_out = f"delete {run_dir} or use another --out"
    elif set(blocked) == {p.parent for p in runs_dir.glob("*/*/run.json")}:  # every run there (an --epochs change)
        way_out = f"delete {runs_dir} (none of its {len(blocked)} runs can continue) or use another --out"
    else:
        way_out = (f"delete the {len(blocked)} run folders in {runs_dir} this command cannot continue "
                   f"({listing(d.relative_to(runs_dir) for d in blocked)}) or use another --out")
    paper_lr = protocol.paper_schedule.get("lr")  # --paper-schedule's learning rate: that flag's switch, not --lr's
    trained_warmup = _trained_warmup(run_dir)
    if key == "lr" and warmup and now == paper_lr and was != paper_lr and trained_warmup == warmup:
        # --paper-schedule's warm-up at the protocol's lr: made with the flag before it took the paper's lr, where
        # "trained without --paper-schedule ...; rerun without --paper-schedule" led to the opposite refusal
        return CLIError(f"--paper-schedule: {run_dir} was trained with --paper-schedule before it took the paper's lr "
                        f"(lr={was!r}, this command's lr={now!r}); no command continues it: {way_out}")
    # an lr between runs both with (or both without) --paper-schedule's warm-up is --lr's: the paper's 3e-4 given as
    # --lr, or taken from it, was blamed on --paper-schedule ("trained with --paper-schedule", of a run without)
    lr_flag = key == "lr" and trained_warmup is not None and bool(trained_warmup) == bool(warmup)
    if key in ("warmup_epochs", "early_stopping") or (key == "lr" and paper_lr is not None and paper_lr in (was, now)
                                                       and not lr_flag):
        def used(value):
            paper = value == paper_lr if key == "lr" else value
            return "with --paper-schedule" if paper else "without --paper-schedule"

        return CLIError(f"--paper-schedule: {run_dir} was trained {used(was)} ({key}={was!r}), this command runs "
                        f"{used(now)} ({key}={now!r}); rerun {used(was)}, or {way_out}")
    if key == "epochs":  # in --epochs' terms: the warm-up's epochs come on top of them
        warm = (f" ({warmup} of them --paper-schedule's warm-up)", " and the warm-up") if warmup else ("", "")
        return CLIError(f"--epochs: {run_dir} holds {was} epochs of training{warm[0]}, more than --epochs "
                        f"{now - warmup}{warm[1]}; rerun with --epochs {was - warmup}, or {way_out}")
    if key == "classes":  # the other classes are another task: other labels, another seeded split or folds
        def kept(classes):
            return "all of its data's classes" if classes is None else f"--classes {','.join(classes)}"

        rerun = "without --classes" if was is None else f"with --classes {','.join(was)}"
        return CLIError(f"--classes: {run_dir} was trained on {kept(was)}, this command keeps {kept(now)}; rerun "
                        f"{rerun}, or {way_out}")
    if key == "train_data_sha256":  # a checkpoint's fingerprint of its training images: as many, others
        from .cli import OTHER_TRAINING_IMAGES

        return CLIError(f"--data: {run_dir} {OTHER_TRAINING_IMAGES}; rerun with the --data, --size, --classes, "
                        f"--bit-depth and --channels it was trained on, or {way_out}")
    if key in ("num_samples", "train_samples"):  # another --data's training split (num_samples: the checkpoint's)
        return CLIError(f"--data: {run_dir} was trained on {was} training images, this command's --data has {now} in "
                        f"its training split; rerun with the --data and --classes it was trained on, or {way_out}")
    if key in ("split_by", "rare_classes"):  # a split rule changed: no option of reproduce draws the old split
        from .cli import rare_classes_refusal, split_by_refusal

        why = (split_by_refusal(run_dir, was, now, in_python=False) if key == "split_by" else
               rare_classes_refusal(run_dir, in_python=False))
        return CLIError(f"{protocol.name}: {why}; no option of reproduce draws that split again, so it cannot "
                        f"continue the run: {way_out}")
    old_epochs = None
    try:
        old = json.loads((Path(run_dir) / "run.json").read_text())
        # run.json's epochs count --paper-schedule's warm-up; IMA's delta follows --epochs, which leaves it out
        old_epochs = old.get("epochs") - (old.get("warmup_epochs") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    if old_epochs is None and key == "defense_options" and {"delta"} <= set(was or {}) & set(now or {}):
        # run.json gone (fit's refusal from the checkpoint): delta = eps_train / epochs gives the run's epochs
        ratio = (epochs - warmup) * now["delta"] / was["delta"]
        old_epochs = round(ratio) if round(ratio) >= 1 and math.isclose(ratio, round(ratio)) else None
    if key == "defense_options" and "delta" in (was or {}) and old_epochs not in (None, epochs - warmup):
        return CLIError(f"--epochs: {run_dir} was trained with --epochs {old_epochs}, and IMA's delta = eps_train / "
                        f"epochs follows it ({was['delta']:.4g} there, {now['delta']:.4g} now); rerun with "
                        f"--epochs {old_epochs}, or {way_out}")
    from .cli import REPRODUCE_FLAG_SETTINGS, _counts, _flag, resume_setting_error

    if key in ("class_counts", "samples_digest"):  # the run's own folder / CSV, changed since it trained
        what = (f"when its --data held {_counts(was)}, it now holds {_counts(now)}" if key == "class_counts" else
                "on other images, names or row order of its --data than it holds now (same class counts)")
        return CLIError(f"--data: {run_dir} was trained {what}; restore the data, or {way_out}")

    if key in REPRODUCE_FLAG_SETTINGS:  # named as the flag that sets it: it said `data='.../a.npz'`, a Python key
        flag = _flag(key)
        said = str(resume_setting_error(run_dir, key, was, now, REPRODUCE_FLAG_SETTINGS, lead=flag))
        return CLIError(f"{said}; rerun with the {flag} it was trained with, or {way_out}")
    return CLIError(f"{protocol.name}: {run_dir} was trained with {key}={was!r}, this command has {key}={now!r}; "
                    f"rerun with its settings, or {way_out}")


def _fit_refusal(protocol, run_dir, epochs, warmup, path, key, was, now):
    """fit's refusal to resume the checkpoint of ``run_dir`` (a run whose run.json is gone: nothing for reproduce's
    own check to compare) in reproduce's words: train_run's ``refusal``."""
    return _resume_error(protocol, run_dir, (key, was, now), epochs, warmup=warmup)


def _sources_over(info, repeats, kind):
    """``info`` with its source text naming every seed the means are over, not only the last run's."""
    import dataclasses
    import re

    seeds = ", ".join(str(k) for k in range(repeats))
    if kind != "seeds" or repeats == 1:
        return info
    return dataclasses.replace(info, source=re.sub(r"\bseed \d+", f"seeds {seeds}", info.source))


def _missing_over_runs(info, infos):
    """``info`` with ``classes_missing_from_split`` naming, per part, the classes absent from it in any of the runs'
    ``infos`` (each run's run.json keeps its own): the last run's record alone described one split of the means."""
    import dataclasses

    merged = {}
    for part in ("train", "val", "test"):
        names = {c for i in infos for c in i.extra.get("classes_missing_from_split", {}).get(part, [])}
        if names:
            merged[part] = [c for c in info.class_names if c in names]
    extra = {k: v for k, v in info.extra.items() if k != "classes_missing_from_split"}
    if merged:
        extra["classes_missing_from_split"] = merged
    return dataclasses.replace(info, extra=extra)


def pick_methods(protocol, labels):
    """The protocol's methods named in ``labels`` (their table labels, any case), in the protocol's order; all of
    them for ``labels=None``."""
    if labels is None:
        return list(protocol.methods)
    known = {m.label.lower() for m in protocol.methods}
    wanted = [label.strip().lower() for label in labels if label.strip()]  # STD, or STD,,IMA: as demo's --methods
    unknown = [label for label in wanted if label not in known]
    if unknown or not wanted:
        from .cli import CLIError

        raise CLIError(f"--methods: {protocol.name} has no method {', '.join(unknown) or '(none given)'}; "
                       f"choose from {', '.join(m.label for m in protocol.methods)}")
    from .cli import refuse_repeated

    refuse_repeated(wanted, "--methods")  # STD,std: lower-cased, as they are matched
    return [m for m in protocol.methods if m.label.lower() in wanted]


def _in_argument_words(func):
    """``func`` (run_protocol) with each refusal in the command's words (``--seeds: tiny-kfold has 2 folds, got 3``,
    a resume conflict's ``... or use another --out``) raised as cli.ArgumentError: a ValueError naming ``func``'s
    arguments (``run_protocol: seeds: ...``, ``... or use another out``), which `robust-ops reproduce` prints in its
    flags. Only the checks of its counts, lr and out were converted until 2026-12-07."""
    arguments = tuple(inspect.signature(func).parameters)

    @functools.wraps(func)
    def in_argument_words(*args, **kwargs):
        from .cli import ArgumentError, CLIError

        try:
            return func(*args, **kwargs)
        except ArgumentError:
            raise
        except CLIError as err:
            raise ArgumentError(func.__name__, err, arguments) from None

    return in_argument_words


@_in_argument_words
def run_protocol(protocol, *, out, quick=False, data=None, epochs=None, seeds=None, size=None, device="cpu",
                 progress=True, reevaluate=False, methods=None, bit_depth=None, channels=None, classes=None,
                 paper_schedule=False, dist_timeout=None, batch_size=None, lr=None):
    """Run ``protocol`` (one of ``PROTOCOLS``' values, or its name, a key of it) and write its results into
    ``out``; returns the aggregated rows. The other arguments are ``robust-ops reproduce``'s options: ``quick`` (its
    smoke run); ``data``, ``epochs`` and ``seeds`` (how many runs: seeds or folds), None for the protocol's own;
    ``size`` (the image side of a folder / CSV ``data`` or a MedMNIST size variant; None: the data's default);
    ``device`` (a torch device); ``progress`` (per-epoch lines).

    ``methods``: the labels of the methods to train and evaluate (default: all of the protocol's); the report shows
    the published numbers of the others beside no numbers of ours. ``bit_depth``: the scale of 16-bit image files
    in a folder / CSV ``data``, ``channels``: how many channels its images are read as, ``classes``: the class
    folders / CSV labels it keeps, in label order (all three as :func:`robust_ops.data.load_dataset` takes them).
    ``paper_schedule``: train with the protocol's ``paper_schedule`` (a head-only warm-up before its epochs, early
    stopping); a protocol without one refuses it.
    ``dist_timeout``: under torchrun, each run's ``fit(dist_timeout=)``. ``batch_size``, ``lr``: the training
    mini-batch size and Adam learning rate, None for the protocol's (``lr`` and ``paper_schedule``, which sets the
    paper's, are refused together).

    Training resumes from each run's checkpoint; every run is checked to be resumable under this command's settings
    before any is trained. Each run's evaluation rows are kept in ``EVAL_CACHE_FILE`` beside its checkpoint, keyed
    by the model's weights, the test set and the attack plan, and reused when all three are unchanged (a resumed
    protocol does not re-attack the finished folds); ``reevaluate=True`` ignores them."""
    from . import defenses, report
    from .cli import (CLIError, binary_only_error, check_count, check_optimiser_options, check_out,
                      checked_dist_timeout, checkpoint_epochs, data_spec, is_main_process, load_data,
                      refuse_train_folder, resume_conflict, run_record, train_run, write_results_to_out)
    from .evaluate import evaluate
    from .metrics import metric_names
    from .prepacked_conv import prepacked_conv_resolved
    from .train import train_data_fingerprint

    if isinstance(protocol, str):  # its name, as `robust-ops reproduce NAME` takes it
        if protocol not in PROTOCOLS:
            raise ValueError(f"run_protocol: unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)} "
                             "(a key of PROTOCOLS) or a Protocol")
        protocol = PROTOCOLS[protocol]
    # the command's rules, here so a Python caller meets them too before any run: lr=0 trained every run at lr 0,
    # epochs=0 trained the protocol's epochs, and batch_size=0, lr=nan or dist_timeout=0 failed in the first run's fit;
    # an out that was a file or a link to nowhere was a bare OSError, a demo's results were replaced
    for arg, value in (("epochs", epochs), ("seeds", seeds), ("batch_size", batch_size)):
        # their types before the command's ranges (an int from the command): epochs=1.5 wrote run.json's epochs 1.5,
        # refused then as damaged by every later run in out, epochs=True ran 1 epoch, "2" and seeds=1.0 were TypeErrors
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise ValueError(f"run_protocol: expected {arg} to be an integer >= 1 or None, got {value!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, numbers.Real)):  # lr=True: run.json's lr true
        raise ValueError(f"run_protocol: expected lr to be a number > 0 or None, got {lr!r}")
    # a Python caller reads its argument's name (run_protocol: lr: ...), the command its flag (--lr: ...): through
    # _in_argument_words, as every refusal of run_protocol's
    check_out(out)
    refuse_train_folder(out, f"reproduce {protocol.name}")
    check_count("--epochs", epochs)
    check_count("--seeds", seeds)
    check_optimiser_options(batch_size, lr)
    checked_dist_timeout(dist_timeout)
    q = protocol.quick if quick else {}
    chosen = pick_methods(protocol, methods)
    data = data_spec(data or protocol.data)  # as run.json records it (results.json, the DATA note): not as typed
    model_name = q.get("model", protocol.model)
    epochs = epochs or q.get("epochs", protocol.epochs)
    repeats = seeds or q.get("repeats", protocol.repeats)
    if paper_schedule and not protocol.paper_schedule:
        with_one = ", ".join(p.name for p in PROTOCOLS.values() if p.paper_schedule)
        raise CLIError(f"--paper-schedule: {protocol.name}'s paper trains without a warm-up or early stopping to "
                       f"add (protocols with one: {with_one}); leave --paper-schedule out")
    schedule = q.get("paper_schedule", protocol.paper_schedule) if paper_schedule else {}
    warmup, patience = schedule.get("warmup_epochs", 0), schedule.get("early_stopping")
    if lr is not None and "lr" in schedule:  # which of the two learning rates a run trained at would be a guess
        raise CLIError(f"--lr: --paper-schedule trains at the paper's lr {schedule['lr']:g}; leave one of them out")
    given_lr, given_batch = lr, batch_size  # the report's OPTIMISER: note names those given
    if lr is None:
        lr = schedule.get("lr", protocol.lr)  # the paper's Adam learning rate under --paper-schedule
    batch_size = protocol.batch_size if batch_size is None else batch_size
    train_epochs = epochs + warmup  # the warm-up comes before the protocol's epochs of all layers, as the paper's
    out = Path(out)
    runs_dir = out / ("runs-quick" if quick else "runs")
    t_start = time.perf_counter()
    base = load_pool(data, size, 0, bit_depth, channels=channels, classes=classes) if protocol.split == "kfold" \
        else None
    folds = kfold_splits(data, base, max(protocol.repeats, 2), CV_SEED) if base is not None else None
    if folds is not None and repeats > len(folds):
        raise CLIError(f"--seeds: {protocol.name} has {len(folds)} folds, got {repeats}")
    quick_sizes = (q["n_train"], q["n_test"]) if quick else None
    plan = []  # (k, tag, split record, splits, [(method, options, run_dir)]): all checked before training any
    conflicts = []  # (run_dir, conflict): every run that cannot continue, so the error names them all
    for k in range(repeats):
        record = split_record(protocol, k, quick_sizes, size, bit_depth, channels, classes)
        splits = rebuild_splits(data, record, folds=folds, base=None if folds is not None else load_data(
            data, size=size, seed=k, bit_depth=bit_depth, channels=channels, classes=classes))
        tag = f"fold{k}" if folds is not None else f"seed{k}"
        if not splits.info.image_size and model_name != "mlp":  # make_model would tell reproduce to use --model mlp
            raise CLIError(f"--data: {protocol.name} trains {model_name}, which takes images, and "
                           f"{splits.info.display_name} holds feature vectors of {splits.info.in_channels} values; "
                           f"give {protocol.name} image data (or run a protocol for feature vectors: arfl-moons)")
        if len(splits.test) == 0:  # evaluate refused it after the first run trained ("split: ... has no samples")
            raise CLIError(f"--data: the test split of {data} holds no samples; nothing to evaluate "
                           f"{protocol.name}'s runs on")
        runs = []
        fingerprint = train_data_fingerprint(splits.train)  # one training set for every method of the split
        for method in chosen:
            if getattr(defenses.defense_class(method.defense), "binary_only", False) and splits.info.num_classes != 2:
                # before any run is trained, not after the methods listed ahead of it; on a folder or CSV the error
                # names --classes, which makes a binary task of it
                raise binary_only_error("--data" if classes is None else "--classes",
                                        f"{protocol.name}'s {method.label} ({method.defense})", splits.info)
            options = dict(method.options)
            if method.defense == "ima" and "delta" not in options:
                options["delta"] = options.get("eps_train", 1.0) / max(epochs, 1)  # margins can reach eps_train
            run_dir = runs_dir / report.slug(method.label) / tag
            # prepacked_conv: as train_run records it ($ROBUST_OPS_PREPACKED_CONV decides), not False
            conflict = resume_conflict(run_dir, run_record(
                data=data, defense_name=method.defense, defense_options=options, model_name=model_name,
                epochs=train_epochs, batch_size=batch_size, lr=lr, seed=k, size=size,
                dropmax=method.dropmax, label=method.label, split=record, bit_depth=bit_depth, channels=channels,
                classes=classes, prepacked_conv=prepacked_conv_resolved(None), warmup_epochs=warmup,
                early_stopping=patience, info=splits.info,  # info: image size, class counts
                # a checkpoint without run.json: fit's count and fingerprint of the training images, compared now
                train_samples=len(splits.train), train_data_sha256=fingerprint))
            if conflict:
                conflicts.append((run_dir, conflict))
            runs.append((method, options, run_dir))
        plan.append((k, tag, record, splits, runs))
    if conflicts:
        raise _resume_error(protocol, *conflicts[0], train_epochs, [d for d, _ in conflicts], warmup)
    run_infos = [p[3].info for p in plan]  # for results.json's classes_missing_from_split, over every run
    all_rows, models, splits = [], {}, None
    # Under torchrun every process trains each run (fit's DDP) and evaluates it too: the next run's training needs
    # them all, and its process group would wait for a rank 0 still evaluating only up to its timeout. Rank 0 alone
    # prints and writes (the evaluation caches, results, report), as in train.
    main = is_main_process()
    say = print if main else lambda *_args, **_kwargs: None
    say(f"reproduce {protocol.name}{' --quick' if quick else ''}: {protocol.paper}")
    for k, tag, record, splits, runs in plan:
        info = splits.info
        for method, options, run_dir in runs:
            done = checkpoint_epochs(run_dir)  # 0 where it is gone: fit trains the run afresh
            doing = ("training" if done == 0 else f"resuming after epoch {done}:" if done < train_epochs
                     else "loading (already trained)")
            status = f"[{tag}] {doing} {method.label} ({method.defense}, {counted(train_epochs, 'epoch')}) ..."
            if done < train_epochs:  # before the epochs' progress
                say(status, flush=True)
            model, _, _, _ = train_run(
                data=data, defense_name=method.defense, defense_options=options, model_name=model_name,
                epochs=train_epochs, batch_size=batch_size, lr=lr, seed=k, device=device,
                out=run_dir, resume=True, dropmax=method.dropmax, size=size,
                progress=progress, splits=splits, label=method.label, split=record, bit_depth=bit_depth,
                channels=channels, classes=classes, warmup_epochs=warmup, early_stopping=patience,
                dist_timeout=dist_timeout, refusal=functools.partial(_fit_refusal, protocol, run_dir, train_epochs,
                                                                     warmup))
            if done >= train_epochs:  # once loaded: fit may still refuse the checkpoint (run.json gone, more epochs)
                say(status, flush=True)
            models[method.label] = model
            seen_clean = False
            cache = EvalCache(run_dir / EVAL_CACHE_FILE, enabled=not reevaluate, writes=main)
            fingerprint = run_fingerprint(model, splits.test, method.label)
            reused = 0
            for eval_plan in protocol.evals:
                specs = _specs(eval_plan, quick, seed=k)  # repeat k's random attacks draw from seed k, the cascade's
                key = eval_key(fingerprint, specs, eval_plan.eps, eval_plan.ensemble, seed=k,
                               positive_class=info.positive_class)
                rows = cache.get(key)
                if rows is None:
                    rows = evaluate(model, splits.test, info, attacks=specs, eps=eval_plan.eps,
                                    method=method.label, device=device, ensemble=eval_plan.ensemble, seed=k)
                    cache.put(key, rows)
                else:
                    reused += 1
                for r in rows:
                    if r["attack"] == "none":
                        if seen_clean:
                            continue
                        seen_clean = True
                    if eval_plan.rename and r["attack"] == "worst-case":
                        r["attack"] = eval_plan.rename
                    all_rows.append({**r, "repeat": k})
            if reused:  # once per run, not once per evaluation plan (dpaat-bus has two)
                which = "" if reused == len(protocol.evals) else f" ({reused} of {len(protocol.evals)} plans)"
                say(f"[{tag}] {method.label}: evaluation{which} reused from {cache.path} (--reevaluate to redo it)",
                    flush=True)
    metrics = list(metric_names(splits.info.num_classes))
    rows = aggregate(all_rows, metrics)
    if not main:
        return rows
    comparison = report.paper_comparison_table(rows, protocol.paper_rows, protocol.paper_metrics)
    notes = list(protocol.notes)
    # its notes describe its own data (BreastMNIST's 780 images), given by name or as its .npz; a folder or CSV
    # named like it holds other images
    if data != protocol.data and not (splits.info.name == protocol.data and str(splits.info.source).endswith(".npz")):
        inf = splits.info
        pos = (f"positive class {inf.class_names[inf.positive_class]}" if inf.positive_class is not None
               else "macro-averaged metrics")
        shape = f"{inf.image_size}x{inf.image_size}" if inf.image_size else "feature vectors"
        kept = " kept by --classes" if classes is not None else ""
        notes.insert(0, f"DATA: this run used {data} ({inf.num_classes} classes{kept}: "
                        f"{', '.join(map(str, inf.class_names))}"
                        f"; {shape}; {pos}) instead of the protocol's {protocol.data}; "
                        f"what the notes below say about {protocol.data} does not describe it.")
        if protocol.radius_units and inf.image_size:  # 0.2 of a moon's width is 51/255 of a pixel's range
            notes.insert(1, _radius_units_note(protocol))
    changed = [f"{what} {value:g}" for what, value, own in (("lr", given_lr, protocol.lr),
                                                             ("batch", given_batch, protocol.batch_size))
               if value is not None and value != own]
    if changed:  # its notes give its own optimiser settings ("30 epochs of Adam lr 1e-3, batch 32")
        notes.insert(0, f"OPTIMISER: this run trained at {', '.join(changed)} (--lr, --batch-size), the protocol at lr "
                        f"{protocol.lr:g}, batch {protocol.batch_size}; what the notes below say of them does not "
                        "describe it.")
    if epochs != protocol.epochs and not quick:  # its notes give its own training length ("we train 40 epochs")
        notes.insert(0, f"EPOCHS: this run trained {counted(epochs, 'epoch')} per method (--epochs), "
                        f"the protocol {protocol.epochs}; what the notes below say of its training length does not "
                        f"describe it.")
    if repeats != protocol.repeats and not quick:  # the protocol's notes describe its own number of runs
        unit = "folds" if protocol.split == "kfold" else "seeds"
        # more --seeds than the protocol's: 'covers 2 of the protocol's 1 seeds' was no count
        runs = (f"{repeats} of the protocol's {protocol.repeats} {unit}" if repeats < protocol.repeats else
                f"{repeats} {unit}, the protocol {protocol.repeats}")
        notes.insert(0, f"RUNS: this run covers {runs} (--seeds); "
                        f"the means in this report are over those{' (one run: no std)' if repeats == 1 else ''}.")
    if schedule:  # the protocol's notes describe its own schedule (no warm-up, no early stopping)
        notes.insert(0, f"SCHEDULE: this run trained with the paper's schedule (--paper-schedule): the classifier "
                        f"head alone for {counted(warmup, 'epoch')}, then all layers for {epochs}, at lr {lr:g}, "
                        f"stopping early after {counted(patience, 'epoch')} without a lower validation loss (each "
                        "run's checkpoint records where it stopped).")
    if len(chosen) < len(protocol.methods):
        notes.insert(0, f"METHODS: this run trained and evaluated {', '.join(m.label for m in chosen)} only "
                        f"(--methods); the protocol's other methods have no numbers of ours here.")
    if quick:
        notes.insert(0, f"QUICK MODE: a smoke run on small subsets for a few epochs, attacks capped at {QUICK_STEPS} "
                        "steps / draws; the numbers in this report mean nothing.")
    config = {"protocol": protocol.name, "paper": protocol.paper, "quick": quick, "data": data, "size": size,
              # the data settings each run.json records: which images of the data the rows are of
              "classes": list(classes) if classes is not None else None, "bit_depth": bit_depth, "channels": channels,
              "model": model_name, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              # --paper-schedule's {warmup_epochs, early_stopping}; None without it
              "paper_schedule": dict(schedule) or None,
              "repeats": repeats, "split": protocol.split, "methods": [vars(m) for m in chosen],
              # per repeat (per_run_rows' "repeat" k): the seed its random attacks drew from, as eval's attack_seed
              "attack_seeds": list(range(repeats)),
              "seconds": round(time.perf_counter() - t_start, 1)}
    saliency = None
    x, y = splits.test.tensors
    if x.dim() == 4:
        saliency = (models, x[:4], y[:4])
    info = _sources_over(splits.info, repeats, protocol.split)  # the means are over every seed, not the last one
    info = _missing_over_runs(info, run_infos)
    # report.md's notes come after its tables: a quick run's tables sat beside the paper's numbers without a word
    title = f"Reproduction: {protocol.paper}" + (" (QUICK MODE: a smoke run, its numbers mean nothing)" if quick
                                                 else "")
    paths = write_results_to_out(out, rows, info, config=config, device=device, paper=protocol.paper_rows,
                                 notes=notes, title=title, saliency=saliency, extra_fields={"per_run_rows": all_rows})
    print()
    # what the table's sensitivity is of, and the classes its macro averages leave out, as eval prints them
    described = info.to_dict()
    print(f"{info.name}: {report.positive_class_text(described)}{report.absent_classes_text(described, 'test')}")
    print(comparison)
    # as demo and eval say: the metric-vs-radius (and, on images, saliency) figures are written beside them
    # the time of the whole protocol: results.json's config.seconds (training and evaluation) is taken before its
    # files are written, and the figures took half of a quick run's ("9 figures (16 s)" of 75 s)
    print(f"\nwrote {paths['results']}, {paths['report']} and {counted(len(paths['figures']), 'figure')} "
          f"({time.perf_counter() - t_start:.0f} s)")
    return rows
