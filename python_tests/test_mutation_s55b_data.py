"""Tests that kill mutants of the 16-bit narrow-band advice and warning (NARROW_16_BIT_SPAN) and the complex .npz
advice landed in session 55, which the other tests let live (mut55b helper, session 55)."""

import re

import numpy as np
import pytest

from robust_ops.data import load_dataset
from robust_ops.data.core import _integer_images_fix

OFFSET = "-bit intensities with an offset added (as MATLAB's im2uint16 adds 32768 to signed CT Hounsfield units)?"


@pytest.mark.parametrize("lo, hi, said", [
    (20000, 24000, "12" + OFFSET),  # above 14 bits, below 15: a narrow band still
    (30000, 38191, "13" + OFFSET),  # the widest span said to be one
    (30000, 30100, "8" + OFFSET),  # a span under 8 bits is named as 8-bit data
    (30000, 38192, "16-bit intensities? store them as floats in [0, 1], images.astype(np.float32) / 65535"),
    (10000, 16383, "14-bit intensities? store them as floats in [0, 1], images.astype(np.float32) / 16383"),
])
def test_npz_16_bit_band_advice_bounds(lo, hi, said):
    assert f"with values in [{lo}, {hi}]; {said}" in _integer_images_fix(np.array([lo, hi], np.uint16))


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_npz_complex_images_of_either_width_are_told_their_magnitude(dtype):
    fix = _integer_images_fix(np.array([1 + 1j, 2], dtype))
    assert fix.startswith("; complex values (MRI data)? store their magnitude as floats in [0, 1], np.abs(images)")


def _save_set(root, bands):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, rows in bands.items():
        (root / c).mkdir(parents=True)
        for i, (lo, hi) in enumerate(rows):
            image = rng.integers(lo, hi + 1, (8, 8))
            image[0, 0], image[0, 1] = lo, hi
            Image.fromarray(image.astype(np.uint16)).save(root / c / f"{i}.png")


def test_the_narrow_band_warning_names_the_lowest_value_of_every_image(tmp_path):
    """The band's low end is the lowest of all images, not the last one read's."""
    rows = [(32000, 35000)] * 9
    _save_set(tmp_path / "ct", {"a": [(31744, 35000)] + rows, "b": [(32000, 35839)] + rows})
    with pytest.warns(UserWarning, match=re.escape("ct: every 16-bit image holds values in [31744, 35839] only") +
                      r".* \(12-bit data\?\); .* - 31744, 0, 4095\)"):
        load_dataset(tmp_path / "ct", size=8)


def test_a_narrow_band_under_8_bits_is_named_as_8_bit_data(tmp_path):
    _save_set(tmp_path / "ct", {"a": [(40000, 40100)] * 10, "b": [(40000, 40100)] * 10})
    with pytest.warns(UserWarning, match=re.escape("ct: every 16-bit image holds values in [40000, 40100] only") +
                      r".* \(8-bit data\?\); .* - 40000, 0, 255\)\..* bit_depth=8 \(--bit-depth 8\)$"):
        load_dataset(tmp_path / "ct", size=8)
