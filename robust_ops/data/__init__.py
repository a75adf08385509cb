"""Datasets: MedMNIST npz, BUSI folders, CSV + images, two-moons, the synthetic default (see docs/design.md)."""

from .indexed import IndexedDataset  # noqa: E402,F401
