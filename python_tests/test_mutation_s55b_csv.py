"""Tests that kill mutants of load_csv's recorded image-list digests (samples_digest_as_written / _slashed /
_backslashed, each only where it differs) landed in session 55, which the other tests let live (mut55b helper,
session 55)."""

import numpy as np
import pytest

from robust_ops.data import load_dataset
from robust_ops.data.folders import _samples_digest


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for k in range(20):
        Image.fromarray(np.full((8, 8), 10 * k, np.uint8)).save(tmp_path / "images" / f"case{k:03d}.png")
    return tmp_path


def _digests(folder, ids):
    rows = [(i, ("benign", "malignant")[k % 2]) for k, i in enumerate(ids)]
    path = folder / "labels.csv"
    path.write_text("\n".join(["image_id,dx"] + [f"{i},{lab}" for i, lab in rows]) + "\n")
    extra = load_dataset(path, size=8, channels=1).info.extra
    return {k: v for k, v in extra.items() if k.startswith("samples_digest")}, rows


@pytest.mark.parametrize("form, recorded", [
    ("images/case{:03d}.png", {"samples_digest": "/", "samples_digest_backslashed": "\\"}),
    # "./" before each id: as written (which "\\" as "/" also is: not recorded twice)
    ("./images/case{:03d}.png", {"samples_digest": "/", "samples_digest_backslashed": ".\\",
                                 "samples_digest_as_written": "./"}),
    ("images\\case{:03d}.png", {"samples_digest": "/", "samples_digest_backslashed": "\\"}),
    # Windows' .\\ ids: the slashed one keeps "./"
    (".\\images\\case{:03d}.png", {"samples_digest": "/", "samples_digest_backslashed": ".\\",
                                   "samples_digest_slashed": "./"}),
])
def test_each_digest_is_recorded_only_where_it_differs(folder, form, recorded):
    ids = [form.format(k) for k in range(20)]
    got, rows = _digests(folder, ids)
    assert sorted(got) == sorted(recorded)
    names = [f"case{k:03d}.png" for k in range(20)]
    prefix = {"/": "images/", "\\": "images\\", "./": "./images/", ".\\": ".\\images\\"}
    for key, how in recorded.items():
        assert got[key] == _samples_digest((prefix[how] + n, lab) for n, (_, lab) in zip(names, rows)), key
