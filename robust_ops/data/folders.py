"""Image-folder datasets: BUSI-style class folders and a CSV + images layout (HAM10000's metadata file).

Images are zero-padded to a square and then resized, as MIRST-DM does, so lesion shapes are not distorted.
Neither source has official splits: train/val/test are a stratified 7:1:2 split drawn from ``seed``
(use ``robust_ops.data.cross_validation`` for k-fold protocols).
"""

import csv
from pathlib import Path

import numpy as np
import torch

from .core import DataError, DatasetInfo, splits_from_arrays

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
BUSI_ORDER = ("benign", "malignant", "normal")
# Classes treated as "positive" (their recall is the sensitivity) when present.
POSITIVE_NAMES = ("malignant", "mel", "melanoma", "cancer", "positive")


def pad_to_square_and_resize(img, size):
    """Zero-pad a PIL image to a centred square, then resize to size x size (bilinear)."""
    from PIL import Image

    w, h = img.size
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), 0)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas.resize((size, size), Image.BILINEAR)


def read_image(path, size, mode):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            img = pad_to_square_and_resize(img, size)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    arr = np.asarray(img, dtype=np.uint8)
    return arr if arr.ndim == 3 else arr[:, :, None]


def _stack(arrays, labels):
    x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()).float().div_(255.0)
    return x, torch.tensor(labels, dtype=torch.int64)


def _positive(class_names):
    """Binary sets: the malignant-like class (else label 1). Multi-class sets: None (macro-averaged metrics)."""
    if len(class_names) != 2:
        return None
    low = [c.lower() for c in class_names]
    for name in POSITIVE_NAMES:
        if name in low:
            return low.index(name)
    return 1


def load_busi(folder, size=224, seed=0, classes=None, mode="L"):
    """BUSI layout: ``folder/<class>/*.png`` with ``*_mask*.png`` segmentation masks ignored.

    classes: which class folders to use, in label order (default: those of benign/malignant/normal present, in that
    order, then any others alphabetically). MIRST-DM uses ``("benign", "malignant")``.
    """
    folder = Path(folder)
    subdirs = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    if classes is None:
        classes = [c for c in BUSI_ORDER if c in subdirs] + sorted(c for c in subdirs if c not in BUSI_ORDER)
    classes = [c.lower() for c in classes]
    missing = [c for c in classes if c not in subdirs]
    if missing:
        found = ", ".join(sorted(subdirs))
        raise DataError(f"{folder}: class folder(s) {', '.join(missing)} not found (found: {found})")
    if len(classes) < 2:
        raise DataError(f"{folder}: expected at least two class folders (e.g. benign, malignant), got {classes}")
    arrays, labels = [], []
    for label, c in enumerate(classes):
        files = sorted(p for p in subdirs[c].iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem.lower())
        if not files:
            raise DataError(f"{subdirs[c]}: no images found")
        for p in files:
            arrays.append(read_image(p, size, mode))
            labels.append(label)
    x, y = _stack(arrays, labels)
    info = DatasetInfo(
        name=folder.name or "busi", num_classes=len(classes), in_channels=x.shape[1], image_size=size,
        class_names=tuple(classes), positive_class=_positive(classes), synthetic=False, source=str(folder),
    )
    return splits_from_arrays(x, y, info, seed)


def load_csv(csv_path, size=224, seed=0, classes=None, image_dir=None, id_column="image_id", label_column="dx",
             mode="RGB"):
    """CSV metadata + image folder (HAM10000 layout: ``image_id`` and ``dx`` columns; images named
    ``<image_id>.jpg`` anywhere under the CSV's folder, e.g. HAM10000_images_part_1/ and _part_2/)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such file")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        for col in (id_column, label_column):
            if col not in fields:
                raise DataError(f"{csv_path}: missing column {col!r} (found: {', '.join(fields) or 'none'})")
        rows = [(r[id_column], r[label_column]) for r in reader]
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    root = Path(image_dir) if image_dir else csv_path.parent
    index = {}
    for p in root.rglob("*"):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            index.setdefault(p.stem, p)
    names = sorted({label for _, label in rows}) if classes is None else list(classes)
    lookup = {n: i for i, n in enumerate(names)}
    arrays, labels, missing = [], [], []
    for image_id, label in rows:
        if label not in lookup:
            continue
        p = index.get(image_id)
        if p is None:
            missing.append(image_id)
            continue
        arrays.append(read_image(p, size, mode))
        labels.append(lookup[label])
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} image(s) listed but not found under {root}, "
                        f"e.g. {', '.join(missing[:3])}")
    if len(set(labels)) < 2:
        raise DataError(f"{csv_path}: expected at least two classes in column {label_column!r}, "
                        f"got {sorted(set(labels))}")
    x, y = _stack(arrays, labels)
    info = DatasetInfo(
        name=csv_path.stem, num_classes=len(names), in_channels=x.shape[1], image_size=size,
        class_names=tuple(names), positive_class=_positive(names), synthetic=False, source=str(csv_path),
    )
    return splits_from_arrays(x, y, info, seed)
