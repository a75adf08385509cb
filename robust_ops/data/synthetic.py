"""Generated datasets: the embedded breast-ultrasound-like default and ARFL's two moons.

The synthetic ultrasound set is procedural, not real data: every DatasetInfo built here has ``synthetic=True`` and a
name containing "synthetic", and reports say so. It imitates the BI-RADS cues a radiologist reads on B-mode images:

* benign (label 0): round or oval, wider-than-tall, circumscribed smooth margins (at most gently lobulated), a
  homogeneous hypoechoic interior, a thin echogenic capsule and posterior acoustic enhancement;
* malignant (label 1, the positive class): irregular, angular or spiculated margins, taller-than-wide orientation,
  a heterogeneous interior with bright microcalcification-like specks, and posterior acoustic shadowing;

on a layered tissue background (subcutaneous fat, glandular tissue, depth attenuation) with multiplicative Rayleigh
speckle. Images are rendered at twice the size and averaged down (anti-aliasing). Everything is drawn from one seed.
"""

import numbers
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .._options import check_int, check_real
from .core import DataError, DatasetInfo, DatasetSplits, check_images_fit, check_sklearn_seed

SYNTHETIC_CLASSES = ("benign", "malignant")
MOONS_CLASSES = ("upper moon", "lower moon")
SYNTHETIC_SIZES = {"train": 384, "val": 64, "test": 128}
MALIGNANT_FRACTION = 0.4  # BUS sets hold ~40% malignant lesions (BUSI+BUSIS: 464 of 1,190)


def _background(rng, yy, xx):
    fat_depth = rng.uniform(0.1, 0.22) + 0.03 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0, 1)))
    base = np.where(yy < fat_depth, 0.35, 0.62)  # hypoechoic fat above brighter glandular tissue
    base = base + 0.08 * np.tanh((yy - fat_depth) / 0.02)
    field = np.zeros_like(yy)
    for _ in range(4):  # smooth tissue heterogeneity
        fy, fx, ph = rng.uniform(1, 4), rng.uniform(1, 5), rng.uniform(0, 2 * np.pi)
        field += rng.uniform(0.02, 0.06) * np.sin(2 * np.pi * (fy * yy + fx * xx) + ph)
    for _ in range(rng.integers(2, 5)):  # Cooper's ligaments: thin bright oblique lines
        ang, off = rng.uniform(-0.6, 0.6), rng.uniform(0.0, 1.0)
        d = np.abs((yy - off) * np.cos(ang) - (xx - 0.5) * np.sin(ang))
        field += 0.12 * np.exp(-(d / 0.012) ** 2) * (yy > fat_depth)
    return (base + field) * (1.0 - 0.35 * yy)  # depth attenuation


def _lesion(rng, yy, xx, malignant):
    cy, cx = rng.uniform(0.38, 0.58), rng.uniform(0.32, 0.68)
    r0 = rng.uniform(0.11, 0.2)
    if malignant:
        ax, ay = r0 * rng.uniform(0.9, 1.15), r0 * rng.uniform(1.0, 1.35)  # taller than wide
    else:
        ax, ay = r0 * rng.uniform(1.15, 1.5), r0 * rng.uniform(0.7, 0.9)  # wider than tall (parallel)
    dy, dx = (yy - cy) / ay, (xx - cx) / ax
    theta, rho = np.arctan2(dy, dx), np.hypot(dy, dx)
    boundary = np.ones_like(theta)
    if malignant:
        subtle = rng.random() < 0.25  # some cancers look almost circumscribed: the classes overlap, as in BUS
        for k in range(3, 9):
            boundary += rng.uniform(0.01, 0.04 if subtle else 0.09) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        n_spic = rng.integers(0, 4) if subtle else rng.integers(4, 12)
        for ang in rng.uniform(-np.pi, np.pi, n_spic):  # spicules: narrow radial spikes
            width, length = rng.uniform(0.04, 0.1), rng.uniform(0.15, 0.5)
            diff = np.angle(np.exp(1j * (theta - ang)))
            boundary += length * np.exp(-(diff / width) ** 2)
    else:
        lobulated = rng.random() < 0.2  # gently lobulated fibroadenoma-like margins
        for k in range(2, 6):
            boundary += rng.uniform(0.0, 0.1 if lobulated else 0.03) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    edge = 0.02 if not malignant else 0.05
    inside = 1.0 / (1.0 + np.exp((rho - boundary) / edge))
    interior = rng.uniform(0.12, 0.25) * np.ones_like(yy)
    if malignant:
        texture = np.zeros_like(yy)
        for _ in range(5):
            fy, fx, ph = rng.uniform(-12, 12), rng.uniform(-12, 12), rng.uniform(0, 2 * np.pi)
            texture += np.sin(2 * np.pi * (fy * yy + fx * xx) + ph)
        interior = interior + 0.015 * texture
        for _ in range(rng.integers(0, 6)):  # microcalcification-like specks
            sy = cy + rng.normal(0, 0.3) * ay
            sx = cx + rng.normal(0, 0.3) * ax
            interior = interior + 0.7 * np.exp(-(((yy - sy) ** 2 + (xx - sx) ** 2) / 0.006 ** 2))
    capsule = 0.0 if malignant else 0.2 * np.exp(-((rho - boundary) / 0.05) ** 2)
    # Posterior acoustic features: a column below the lesion, shadow (malignant) or enhancement (benign).
    below = (yy > cy) * np.exp(-((xx - cx) / (ax * 0.9)) ** 2) * (1 - inside)
    posterior = 1.0 - rng.uniform(0.2, 0.55) * below if malignant else 1.0 + rng.uniform(0.1, 0.35) * below
    return inside, interior, capsule, posterior


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def synthetic_ultrasound(n, size=28, seed=0, malignant_fraction=MALIGNANT_FRACTION):
    """``n`` procedural breast-ultrasound-like images [n, 1, size, size] in [0, 1] and labels (1 = malignant), drawn
    from ``seed``: an integer >= 0 or a list of them (numpy's SeedSequence entropy)."""
    # not integers: "'<' not supported between 'str' and 'int'"; True passed as 1, 2.5 failed inside numpy
    if not _is_int(n) or n < 0:
        raise DataError(f"synthetic: expected n >= 0, got n={n!r}")
    if not _is_int(size) or size < 8:
        raise DataError(f"synthetic: expected size >= 8, got size={size!r}", arg="size")
    # else every label would silently be one class (a bool: True as 1)
    if isinstance(malignant_fraction, bool) or not isinstance(malignant_fraction, numbers.Real) \
            or not 0 <= malignant_fraction <= 1:
        raise DataError(f"synthetic: expected 0 <= malignant_fraction <= 1, got {malignant_fraction!r}")
    # numpy's refusals named neither synthetic nor seed ("expected non-negative integer"); True was seed 1
    for part in seed if isinstance(seed, (list, tuple)) else (seed,):
        check_int("synthetic", "seed", part, 0, error=DataError)
    render = 2 * size
    # besides the images: the float64 render of one, and its few same-size temporaries
    check_images_fit("synthetic", n, size, extra=8 * 8 * render * render)
    rng = np.random.default_rng(seed)
    coords = (np.arange(render) + 0.5) / render
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    labels = (rng.random(n) < malignant_fraction).astype(np.int64)
    images = np.empty((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        bg = _background(rng, yy, xx)
        inside, interior, capsule, posterior = _lesion(rng, yy, xx, bool(labels[i]))
        img = (bg * (1 - inside) + interior * inside + capsule) * posterior
        speckle = rng.rayleigh(scale=np.sqrt(2 / np.pi), size=img.shape)  # mean 1
        img = img * (0.55 + 0.45 * speckle)
        img = img.reshape(size, 2, size, 2).mean(axis=(1, 3))
        images[i, 0] = np.clip(np.round(img * 255.0), 0, 255) / 255.0
    return torch.from_numpy(images), torch.from_numpy(labels)


def synthetic_splits(size=28, seed=0, sizes=None):
    """The embedded default dataset: train/val/test drawn from independent streams of one seed (an integer >= 0,
    default 0) -> DatasetSplits. ``size``: the images' side length in pixels (an integer >= 8, default 28);
    ``sizes``: {split: sample count} replacing the default counts of train 384, val 64, test 128 (None: those)."""
    check_int("synthetic", "seed", seed, 0, error=DataError)  # True was seed 1, [] a seed of its own
    if not (sizes is None or isinstance(sizes, Mapping)):  # 0 or [] gave the default sizes, True a bare TypeError
        raise DataError(f"synthetic: expected sizes to be a dict {{split: count}} or None, got {sizes!r}")
    unknown = sorted(set(sizes or {}) - set(SYNTHETIC_SIZES))
    if unknown:  # a misspelt split would otherwise keep its default size silently
        raise DataError(f"synthetic: sizes has unknown split(s) {', '.join(map(repr, unknown))}; expected keys "
                        f"{', '.join(SYNTHETIC_SIZES)}")
    sizes = {**SYNTHETIC_SIZES, **(sizes or {})}
    sets = []
    for k, split in enumerate(("train", "val", "test")):
        x, y = synthetic_ultrasound(sizes[split], size=size, seed=[seed, k])
        sets.append(TensorDataset(x, y))
    info = DatasetInfo(
        name="synthetic-bus", num_classes=2, in_channels=1, image_size=size, class_names=SYNTHETIC_CLASSES,
        positive_class=1, synthetic=True,
        source=f"procedural breast-ultrasound-like images (seed {seed}); not real patient data",
    )
    return DatasetSplits(*sets, info)


MOONS_RANGE = (-4.0, 4.0)


def moons_splits(seed=0, n_train=10000, n_val=1000, n_test=1000, noise=0.2):
    """ARFL's two-moons set: scikit-learn make_moons, noise 0.2, 10,000 train and 1,000 test points (plus 1,000 for
    validation); features [N, 2] in raw coordinates, label 1 = lower moon (the positive class). ``seed``: make_moons'
    random_state, an integer in [0, 2**32) (default 0); ``n_train``, ``n_val``, ``n_test``: each split's point
    count (integers >= 1); ``noise``: the standard deviation of make_moons' Gaussian noise (default 0.2)."""
    from sklearn.datasets import make_moons

    # else scikit-learn's errors named make_moons' n_samples, True passed as 1 (one point, or noise 1)
    check_sklearn_seed("moons", seed)  # make_moons' RandomState: 2**32 was numpy's error, 2**64 a TypeError
    for arg, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        check_int("moons", arg, n, 1, error=DataError)
    try:
        check_real("moons", "noise", noise, minimum=0, optional=True)
    except ValueError as err:
        raise DataError(str(err)) from None
    sets = []
    for k, n in enumerate((n_train, n_val, n_test)):
        x, y = make_moons(n_samples=n, noise=noise, random_state=np.random.RandomState([seed, k]))
        x = torch.from_numpy(x.astype(np.float32))
        if x.numel() and (float(x.min()) < MOONS_RANGE[0] or float(x.max()) > MOONS_RANGE[1]):
            raise DataError(f"moons: a point fell outside {MOONS_RANGE}; lower the noise")
        sets.append(TensorDataset(x, torch.from_numpy(y.astype(np.int64))))
    info = DatasetInfo(
        name="two-moons", num_classes=2, in_channels=2, image_size=0, class_names=MOONS_CLASSES,
        positive_class=1, synthetic=True, value_range=MOONS_RANGE,
        source=f"scikit-learn make_moons(noise={noise}), seed {seed}",
    )
    return DatasetSplits(*sets, info)
