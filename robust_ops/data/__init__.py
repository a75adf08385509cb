"""Datasets: MedMNIST npz, BUSI folders, CSV + images, two-moons, the synthetic default (see docs/design.md).

``load_dataset(spec, *, root=None, size=None, seed=0, ...) -> DatasetSplits(train, val, test, info)``; each split is a
TensorDataset of float inputs in ``info.value_range`` ([0, 1] for images, [N, C, H, W]) and int64 labels, declaring
its ``classes`` (``info.class_names``) as torchvision's datasets do.
"""

from .core import DataError, DatasetInfo, DatasetSplits, load_dataset  # noqa: F401
from .folders import load_busi, load_csv, pad_to_square_and_resize  # noqa: F401
from .medmnist import OFFICIAL_MD5, PLUS_MD5, check_md5, find_medmnist, load_npz  # noqa: F401
from .splits import cross_validation  # noqa: F401
from .synthetic import moons_splits, synthetic_splits, synthetic_ultrasound  # noqa: F401

from .indexed import IndexedDataset  # noqa: F401  (dataset ids for IMA's per-sample margins)

__all__ = [
    "load_dataset", "DatasetSplits", "DatasetInfo", "DataError", "IndexedDataset", "load_busi", "load_csv", "load_npz",
    "cross_validation", "synthetic_splits", "moons_splits"
]
