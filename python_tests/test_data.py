"""Dataset loaders: MedMNIST npz variants and their errors, BUSI folders, CSV layout, synthetic sets, k-fold."""

import hashlib
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from robust_ops.data import DataError, DatasetSplits, cross_validation, load_busi, load_dataset, synthetic_ultrasound
from robust_ops.data import medmnist as mm


def write_npz(path, n=(12, 4, 6), shape=(28, 28), labels_2d=True, drop=None, classes=2, **overrides):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(k, *shape), dtype=np.uint8)
        lab = np.arange(k) % classes
        arrays[f"{split}_labels"] = lab.reshape(-1, 1).astype(np.uint8) if labels_2d else lab.astype(np.int64)
    arrays.update(overrides)
    if drop:
        arrays.pop(drop)
    np.savez(path, **arrays)
    return path


def test_breastmnist_real(breastmnist):
    s = load_dataset(breastmnist)
    assert [len(s.train), len(s.val), len(s.test)] == [546, 78, 156]
    x, y = s.test.tensors
    assert x.shape == (156, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert s.info.positive_class == 0 and s.info.class_names[0] == "malignant" and not s.info.synthetic
    assert int((y == 0).sum()) == 42


def test_npz_records_a_class_its_test_split_lacks(tmp_path):
    """A multi-class npz keeps its own split: a class absent from its test split was recorded nowhere (a drawn split
    records it), though the macro averages then run over the other classes only."""
    test = np.array([0, 1, 2, 0, 1, 2], np.uint8)  # no class 3
    s = load_dataset(str(write_npz(tmp_path / "m4.npz", n=(12, 4, 6), classes=4, test_labels=test)))
    assert s.info.num_classes == 4 and s.info.extra["classes_missing_from_split"] == {"test": ["3"]}
    assert s.info.to_dict()["classes_missing_from_split"] == {"test": ["3"]}  # run.json and results.json
    assert "classes_missing_from_split" not in load_dataset(str(write_npz(tmp_path / "b.npz"))).info.extra


def test_tests_reading_breastmnist_carry_the_needs_data_marker():
    """pyproject declares the needs_data marker for them, but no test carried it: -m "not needs_data" (offline, no
    data) selected every one and -m needs_data none."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", "-m", "needs_data",
                           __file__], capture_output=True, text=True, timeout=300)
    selected = {line.split("::")[1] for line in done.stdout.splitlines() if "::" in line}
    assert selected == {"test_breastmnist_real", "test_breastmnist_by_name", "test_official_md5_matches",
                        "test_copy_of_official_file_under_other_name_is_not_md5_checked"}, done.stdout[-2000:]


def test_breastmnist_by_name(breastmnist, monkeypatch):
    monkeypatch.setenv("ROBUST_OPS_DATA", str(breastmnist.parent))
    assert load_dataset("breastmnist").info.name == "breastmnist"


def test_npz_variants_gray_rgb_labels(tmp_path):
    s = load_dataset(write_npz(tmp_path / "a.npz"))
    assert s.train.tensors[0].shape == (12, 1, 28, 28) and s.info.num_classes == 2 and s.info.positive_class == 1
    s = load_dataset(write_npz(tmp_path / "b.npz", shape=(64, 64, 3), labels_2d=False, classes=3))
    assert s.train.tensors[0].shape == (12, 3, 64, 64) and s.info.num_classes == 3 and s.info.positive_class is None


def test_npz_bad_images_are_refused(tmp_path):
    nan_images = np.random.default_rng(0).random((12, 28, 28)).astype(np.float32)
    nan_images[3, 4, 5] = np.nan
    with pytest.raises(DataError, match=r"e\.npz \[train\]: float images contain NaN or infinite values \(1 pixel\)"):
        load_dataset(write_npz(tmp_path / "e.npz", train_images=nan_images))
    channels_first = np.zeros((12, 1, 28, 28), np.uint8)
    with pytest.raises(DataError, match=r"look channels-first; expected \(N, H, W\) or \(N, H, W, C\)"):
        load_dataset(write_npz(tmp_path / "f.npz", train_images=channels_first))
    # told the transpose that loads them, as PyTorch's (N, C, H, W) RGB tiles are saved (found by the data4 helper)
    rgb = {f"{s}_images": np.random.default_rng(1).integers(0, 256, (k, 3, 28, 28), dtype=np.uint8)
           for s, k in (("train", 12), ("val", 4), ("test", 6))}
    with pytest.raises(DataError, match=r"rgb\.npz \[train\]: images of shape \(12, 3, 28, 28\) look channels-first; "
                                        r".* -- transpose them to channels-last, images\.transpose\(0, 2, 3, 1\)$"):
        load_dataset(write_npz(tmp_path / "rgb.npz", **rgb))
    s = load_dataset(write_npz(tmp_path / "rgb.npz", **{k: v.transpose(0, 2, 3, 1) for k, v in rgb.items()}))
    assert torch.equal(s.train.tensors[0], torch.from_numpy(rgb["train_images"]).float() / 255)


def test_npz_volumes_and_other_channel_counts_are_refused(tmp_path):
    """A MedMNIST3D-style volume (N, D, H, W) must not load as D-channel 2D images (D = H = W = 28 looked square)."""
    volume = np.zeros((12, 28, 28, 28), np.uint8)
    with pytest.raises(DataError, match=r"v\.npz \[train\]: images of shape \(12, 28, 28, 28\) have 28 channels; "
                                        r"expected \(N, H, W\) or \(N, H, W, C\) with C 1 or 3 -- save 3 \(RGB\) or 1 "
                                        r"\(grayscale\) channels \(3D volumes"):
        load_dataset(write_npz(tmp_path / "v.npz", train_images=volume))
    # RGBA (and gray + alpha) images were told of 3D volumes alone, not to drop the alpha (found by the data3 helper)
    for shape, fix, fixed in (((28, 28, 4), r"RGBA images\? drop the alpha channel, images\[\.\.\., :3\], or save 3",
                               lambda a: a[..., :3]),
                              ((28, 28, 2), r"grayscale \+ alpha images\? keep the gray channel, images\[\.\.\., 0\], "
                                            r"or", lambda a: a[..., 0])):
        path = write_npz(tmp_path / "alpha.npz", shape=shape)
        with pytest.raises(DataError, match=rf"have {shape[2]} channels; expected .* with C 1 or 3 -- {fix}"):
            load_dataset(path)
        with np.load(path) as npz:  # as told: it loads
            np.savez(path, **{k: fixed(v) if k.endswith("_images") else v for k, v in npz.items()})
        assert load_dataset(path).info.in_channels == (3 if shape[2] == 4 else 1)
    assert load_dataset(write_npz(tmp_path / "one.npz", shape=(28, 28, 1))).train.tensors[0].shape == (12, 1, 28, 28)


def test_npz_labels_must_be_class_indices(tmp_path, as_official):
    """A label no class list explains (255 as "unknown") made every value up to it a class: a binary set became
    256 classes, most without a sample; one class alone was a one-output classifier."""
    labels = (np.arange(12) % 2).reshape(-1, 1).astype(np.uint8)
    labels[5] = 255
    with pytest.raises(DataError, match=r"s\.npz: labels run from 0 to 255, but 253 of those 256 classes have no "
                                        r"sample \(the first: 2\); expected class indices 0 to K-1 -- relabel them$"):
        load_dataset(write_npz(tmp_path / "s.npz", train_labels=labels))
    labels[5] = 3  # one class without a sample: "has" (it said "1 of those 4 classes have")
    with pytest.raises(DataError, match=r"t\.npz: labels run from 0 to 3, but 1 of those 4 classes has no sample "):
        load_dataset(write_npz(tmp_path / "t.npz", train_labels=labels))
    # 1-based class numbers (1 to 7) were told "labels run from 0 to 7, ... (the first: 0)": they hold no 0
    with pytest.raises(DataError, match=r"b\.npz: labels run from 1 to 2, none is 0 \(1-based class numbers\?\); "
                                        r"expected class indices 0 to K-1 -- subtract 1 from every label$"):
        load_dataset(write_npz(tmp_path / "b.npz", **{f"{s}_labels": (np.arange(n) % 2 + 1).reshape(-1, 1)
                                                       for s, n in (("train", 12), ("val", 4), ("test", 6))}))
    # without 0 but not every one of 1 to K-1 either, subtracting 1 would not make them indices: relabel them
    with pytest.raises(DataError, match=r"c\.npz: labels run from 0 to 3, but 2 of those 4 classes have no sample "
                                        r"\(the first: 0\); expected class indices 0 to K-1 -- relabel them$"):
        load_dataset(write_npz(tmp_path / "c.npz", **{f"{s}_labels": (np.arange(n) % 2 * 2 + 1).reshape(-1, 1)
                                                       for s, n in (("train", 12), ("val", 4), ("test", 6))}))
    with pytest.raises(DataError, match=r"o\.npz: expected at least two classes, got 1 \(labels: 0\)$"):
        load_dataset(write_npz(tmp_path / "o.npz", classes=1))
    s = load_dataset(as_official(write_npz(tmp_path / "breastmnist_64.npz", classes=1)))  # named: 2 classes
    assert s.info.num_classes == 2 and s.info.class_names[0] == "malignant"


def test_arguments_a_source_cannot_honour_are_refused(tmp_path):
    with pytest.raises(DataError, match="synthetic: classes= selects class folders or CSV labels"):
        load_dataset("synthetic", classes=["malignant"])
    with pytest.raises(DataError, match=r"g\.npz: classes= names each label of an \.npz, label 0 first: expected 2 "
                                        r"names \(its labels run from 0 to 1\), got 1$"):
        load_dataset(write_npz(tmp_path / "g.npz"), classes=["a"])
    with pytest.raises(DataError, match="synthetic: expected size >= 8, got size=0"):
        load_dataset("synthetic", size=0)  # 0 is not "the default size"


def test_classes_name_the_labels_of_an_npz_not_named_after_a_medmnist_set(tmp_path, as_official):
    # a renamed BreastMNIST subset (label 0 = malignant) read as classes 0 / 1 with positive class 1, benign, and
    # classes= was refused for every .npz: its sensitivity was the benign class's, with no way to say otherwise
    path = write_npz(tmp_path / "bm_subset.npz")
    assert load_dataset(path).info.positive_class == 1
    info = load_dataset(path, classes=("malignant", "benign")).info
    assert (info.class_names, info.positive_class) == (("malignant", "benign"), 0)
    with pytest.raises(DataError, match=r"bm_subset\.npz: classes= lists m more than once; expected distinct names"):
        load_dataset(path, classes=("m", "m"))
    with pytest.raises(DataError, match=r"expected 2 names \(its labels run from 0 to 1\), got 3$"):
        load_dataset(path, classes=("a", "b", "c"))  # names, not a filter: one per label
    with pytest.raises(DataError, match=r"breastmnist_64\.npz: breastmnist names its own classes \(malignant, normal "
                                        r"or benign\); drop classes=$"):
        load_dataset(as_official(write_npz(tmp_path / "breastmnist_64.npz")), classes=("a", "b"))


def test_a_class_too_small_to_stratify_is_reported():
    from robust_ops.data.core import stratified_split

    # Unstratifiable: the seeded random split leaves class 1 out of the test part for this seed -- said, not silent.
    with pytest.warns(UserWarning, match=r"too small to stratify the 0.7/0.1/0.2 split \(smallest: 1, 2 samples\); "
                                         r".* leaves out \{2: \[1\]\}"):
        parts = stratified_split(np.array([0] * 20 + [1] * 2), (0.7, 0.1, 0.2), seed=2, rare_classes="random")
    assert sum(map(len, parts)) == 22
    # the warning names the smallest class and its size, so the user knows which class to collect more of
    y = np.array([0] * 40 + [1] * 40 + [2] * 4)
    with pytest.warns(UserWarning, match=r"^toy: a class is too small to stratify the 0.7/0.1/0.2 split \(smallest: c, "
                                         r"4 samples\); the split is seeded random instead and leaves out c from "):
        stratified_split(y, (0.7, 0.1, 0.2), seed=0, source="toy", class_names=("a", "b", "c"), rare_classes="random")
    with pytest.warns(UserWarning, match=r"^toy: a class is too small to stratify the 0.7/0.1/0.2 split \(smallest: c, "
                                         r"4 samples\); the other classes are stratified and c placed at random"):
        stratified_split(y, (0.7, 0.1, 0.2), seed=0, source="toy", class_names=("a", "b", "c"))


def test_classes_too_small_to_stratify_leave_the_others_stratified():
    """One class too small to stratify made the whole split seeded random, so classes of 12 and 6 samples went missing
    from the test and val parts of a 7-class set (found by the dermoscopy walk: HAM10000-like counts). The small
    classes are now placed at random as one stratum (joining the largest class's when they are one sample) and the
    others stay stratified; rare_classes="random" keeps the old rule for splits made by it. Recorded in the info."""
    from robust_ops.data.core import DatasetInfo, splits_from_arrays, stratified_split

    y = np.repeat(np.arange(7), [12, 18, 38, 4, 39, 233, 6])
    names = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    with pytest.warns(UserWarning, match=r"the other classes are stratified and df placed at random and leaves out "
                                         r"df from val$"):
        parts = stratified_split(y, (0.7, 0.1, 0.2), 0, class_names=names)
    counts = [np.bincount(y[p], minlength=7) for p in parts]
    for i in (0, 1, 2, 4, 5, 6):  # each class but df within one sample of its share of every part
        for c, f in zip(counts, (0.7, 0.1, 0.2)):
            assert abs(c[i] - f * (y == i).sum()) <= 1.5, (names[i], c[i], f)
    with pytest.warns(UserWarning, match=r"seeded random instead and leaves out vasc from val; akiec, df from test$"):
        legacy = stratified_split(y, (0.7, 0.1, 0.2), 0, class_names=names, rare_classes="random")
    assert not all(np.array_equal(a, b) for a, b in zip(parts, legacy))
    x = torch.zeros(len(y), 1, 2, 2)
    for rule, recorded in (("merge", {"rare_classes": "merge"}), ("random", {})):
        info = DatasetInfo("derm", 7, 1, 2, names)
        with pytest.warns(UserWarning, match="too small to stratify"):
            splits_from_arrays(x, torch.as_tensor(y), info, 0, rare_classes=rule)
        assert {k: v for k, v in info.extra.items() if k == "rare_classes"} == recorded
    info = DatasetInfo("even", 2, 1, 2, ("a", "b"))  # stratifiable: nothing recorded, the same split either rule
    splits_from_arrays(torch.zeros(40, 1, 2, 2), torch.arange(40) % 2, info, 0)
    assert "rare_classes" not in info.extra
    with pytest.raises(DataError, match=r"^toy: expected rare_classes to be 'merge' or 'random', got 'drop'$"):
        stratified_split(y, (0.7, 0.1, 0.2), 0, source="toy", rare_classes="drop")
    with pytest.raises(DataError, match=r"^synthetic: rare_classes= chooses how the split drawn for class folders and "
                                        r"CSV treats classes too small to stratify; this source has no drawn split -- "
                                        r"drop rare_classes=$"):
        load_dataset("synthetic", rare_classes="random")
    with pytest.raises(DataError, match=r"^cross_validation: expected rare_classes to be 'merge' or 'random', got "
                                        r"None$"):
        cross_validation(load_dataset("synthetic"), rare_classes=None)


def test_small_classes_of_one_size_merge_lowest_label_first():
    """The merge rule takes the smallest classes first, and of classes of one size the lowest labels: numpy's default
    argsort does not keep ties in order (here it put 6 before 5) and may order them otherwise on another CPU, so
    the split that eval rebuilds would depend on the machine. A 0.9/0.1 split of 57 samples in ten classes: its 6
    validation samples allow 6 strata, so 5 of the nine 3-sample classes merge."""
    from robust_ops.data.core import stratified_split

    y = np.repeat(np.arange(10), [30] + [3] * 9)
    with pytest.warns(UserWarning, match=r"the other classes are stratified and 1, 2, 3, 4, 5 placed at random"):
        stratified_split(y, (0.9, 0.1), 0)


def test_cross_validation_records_a_validation_part_that_merged_small_classes():
    """A fold's validation part of 3 samples cannot stratify 7 classes: the smallest classes are merged into one
    stratum (recorded as rare_classes 'merge' in that fold's info, which run.json keeps for eval); rare_classes=
    'random' draws it at random as before 2026-12-06, recording nothing."""
    import dataclasses
    import warnings

    splits, _ = _indexed_splits((5,) * 7 + (40,))
    by_rule = {}
    for rule, how in (("merge", r"the other classes are stratified and c\d, .* placed at random"),
                      ("random", "the split is seeded random instead")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            by_rule[rule] = cross_validation(splits, k=5, seed=0, rare_classes=rule)
        assert caught and all(re.search(rf"\(fold \d\): a class is too small to stratify the 0\.9/0\.1 split .*; {how}",
                                        str(w.message)) for w in caught), [str(w.message) for w in caught]
    merged, legacy = by_rule["merge"], by_rule["random"]
    assert merged[0].info.extra["rare_classes"] == "merge" and "rare_classes" not in legacy[0].info.extra
    assert torch.equal(merged[0].test.tensors[0], legacy[0].test.tensors[0])  # the folds themselves are the same
    # so for data split by group (one sample a group here): its validation parts are drawn by the rule given too
    parts = (splits.train, splits.val, splits.test)
    grouped = type(splits)(*parts, dataclasses.replace(splits.info, extra={"split_by": "id"}),
                           tuple(np.array([f"{i}.{j}" for j in range(len(p))]) for i, p in enumerate(parts)))
    for rule, recorded in (("merge", "merge"), ("random", None)):
        with pytest.warns(UserWarning, match="too small to stratify"):
            folds = cross_validation(grouped, k=5, seed=0, rare_classes=rule)
        assert folds[0].info.extra.get("rare_classes") == recorded


def test_npz_missing_keys(tmp_path):
    with pytest.raises(DataError, match=r"c\.npz: missing keys val_labels"):
        load_dataset(write_npz(tmp_path / "c.npz", drop="val_labels"))


def test_npz_of_other_keys_is_told_what_it_holds_and_the_way_to_medmnists(tmp_path):
    """An .npz of Keras's layout (x_train, y_train, x_test, y_test), or one set (images, labels), was refused listing
    the missing keys alone: the error now names the keys found and ends with the fix, a validation split where only
    it lacks (found by the data2 helper)."""
    images, labels = np.zeros((6, 8, 8), np.uint8), np.arange(6) % 2
    np.savez(tmp_path / "k.npz", x_train=images, y_train=labels, x_test=images, y_test=labels)
    with pytest.raises(DataError, match=r"k\.npz: missing keys train_images, .*; found: x_test, x_train, y_test, "
                                        r"y_train\) -- save the arrays under those names, np\.savez\(path, "
                                        r"train_images=\.\.\., .*split 7:1:2 first if they are one set$"):
        load_dataset(tmp_path / "k.npz")
    np.savez(tmp_path / "v.npz", train_images=images, train_labels=labels, test_images=images, test_labels=labels)
    with pytest.raises(DataError, match=r"v\.npz: missing keys val_images, val_labels \(.*\) -- it has no validation "
                                        r"split: save one, val_images and val_labels, split off the training "
                                        r"arrays \(MedMNIST's is about a tenth of the set\)$"):
        load_dataset(tmp_path / "v.npz")


def test_npz_mismatched_lengths(tmp_path):
    bad = np.zeros((3, 1), np.uint8)
    with pytest.raises(DataError, match=r"train_labels has 3 entries but the images have 12"):
        load_dataset(write_npz(tmp_path / "d.npz", train_labels=bad))


def test_npz_corrupt(tmp_path):
    p = tmp_path / "e.npz"
    p.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"e\.npz: not a readable \.npz file"):
        load_dataset(p)


def test_npz_pickle_refused(tmp_path):
    p = tmp_path / "f.npz"
    obj = np.empty(2, dtype=object)
    write_npz(p, train_images=obj)
    with pytest.raises(DataError, match="refusing to load arrays that need pickle"):
        load_dataset(p)


def test_npz_with_a_damaged_member_says_so(tmp_path):
    """A member cut short was refused as "arrays that need pickle", and one holding no .npy data (np.load hands back
    its bytes) as labels "of shape ()" with "multi-label sets are not supported": neither was the file's fault."""
    import io
    import zipfile

    arrays = dict(np.load(write_npz(tmp_path / "ok.npz")))
    for name, key, damage in (("cut.npz", "train_images", lambda b: b[:len(b) // 2]),
                              ("junk.npz", "val_labels", lambda b: b"not numpy data")):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            for k, v in arrays.items():
                buf = io.BytesIO()
                np.save(buf, v)
                z.writestr(f"{k}.npy", damage(buf.getvalue()) if k == key else buf.getvalue())
        with pytest.raises(DataError, match=rf"{name}: not a readable \.npz file \({key}") as err:
            load_dataset(tmp_path / name)
        assert "pickle" not in str(err.value) and "\n" not in str(err.value)


def test_official_name_md5_mismatch(tmp_path):
    p = write_npz(tmp_path / "breastmnist.npz")
    with pytest.raises(DataError, match=r"breastmnist\.npz: MD5 [0-9a-f]{32} does not match the official"):
        load_dataset(p)


def test_official_md5_matches(breastmnist, tmp_path):
    assert mm.check_md5(breastmnist) == mm.OFFICIAL_MD5["breastmnist.npz"]
    assert hashlib.md5(breastmnist.read_bytes()).hexdigest() == "750601b1f35ba3300ea97c75c52ff8f6"


def test_missing_medmnist_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUST_OPS_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError, match=r"dermamnist: dermamnist\.npz not found \(looked in .*\); download it from "
                                        r"MedMNIST v2 "):
        load_dataset("dermamnist")  # never downloads unless asked
    # the larger sizes are MedMNIST+'s alone: the message sent the user to v2 for them
    with pytest.raises(DataError, match=r"dermamnist_64: dermamnist_64\.npz not found \(looked in .*\); download it "
                                        r"from MedMNIST\+ \(v3\) and put it"):
        load_dataset("dermamnist_64")
    with pytest.raises(DataError,
                       match=r"allow a download through the medmnist package: download=True, CLI --download"):
        load_dataset("dermamnist")


def test_unknown_spec():
    with pytest.raises(DataError, match="no-such-thing: no such file or folder, and not a known dataset name"):
        load_dataset("no-such-thing")


@pytest.mark.parametrize("spec", ["", "  "])
def test_empty_spec_is_refused_not_read_as_the_working_folder(spec, tmp_path, monkeypatch):
    """load_dataset("") (an unset variable's value) read the working folder as a BUSI folder: its class folders
    loaded silently, and in a source checkout it failed with ".ci: no images found"."""
    for c, v in (("benign", 50), ("malignant", 200)):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{c} ({i}).png", (8, 8), v)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"^load_dataset: expected spec to be a name or a path, got {spec!r}; give a "
                                        r"dataset name such as synthetic or breastmnist, or a path \('\.' for the "
                                        r"working folder\)$"):
        load_dataset(spec, size=8)
    assert load_dataset(".", size=8).info.class_names == ("benign", "malignant")  # the folder itself, by its path


def _png(path, size, value, mode="L"):
    from PIL import Image

    arr = np.full((size[1], size[0]) + (() if mode == "L" else (3,)), value, np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def test_busi_folder(tmp_path):
    for c, v in (("benign", 50), ("malignant", 200), ("normal", 120)):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{c} ({i}).png", (40, 20), v)
            _png(tmp_path / c / f"{c} ({i})_mask.png", (40, 20), 255)
    s = load_dataset(tmp_path, size=16, classes=("benign", "malignant"))
    assert s.info.class_names == ("benign", "malignant") and s.info.positive_class == 1
    assert len(s.train) + len(s.val) + len(s.test) == 20  # masks ignored, normal left out
    x, y = s.train.tensors
    assert x.shape[1:] == (1, 16, 16)
    # zero padding: a 40x20 image becomes 40x40 with black bands above and below
    assert float(x[0, 0, 0].max()) == 0.0 and float(x[0, 0, 8].min()) > 0
    assert torch.allclose(x[y == 1][:, :, 8, 8], torch.tensor(200 / 255))
    extra = dict(s.info.extra)
    assert re.fullmatch("[0-9a-f]{16}", extra.pop("samples_digest"))  # eval and --resume compare it
    assert extra == {"excluded_samples": 10, "excluded_labels": {"normal": 10},  # the filter is recorded
                     "class_counts": {"benign": 10, "malignant": 10}}
    s3 = load_dataset(tmp_path, size=16)
    assert s3.info.class_names == ("benign", "malignant", "normal") and s3.info.positive_class is None
    assert s3.info.extra["excluded_samples"] == 0
    with pytest.raises(DataError, match=r"classes= lists benign more than once"):
        load_dataset(tmp_path, classes=("benign", "Benign"))


def test_busi_folder_given_as_the_working_folder_is_named_after_it(tmp_path, monkeypatch):
    """`load_dataset(".")` (`--data .`) of any class folders named the dataset "busi" in its info, results.json and
    report titles; it is the folder's own name, as for any other path to it (found by the data4 helper)."""
    data = tmp_path / "kather_tiles"
    for c in ("adipose", "debris"):
        (data / c).mkdir(parents=True)
        for i in range(10):
            _png(data / c / f"{i}.png", (8, 8), 10 * i)
    monkeypatch.chdir(data)
    assert {load_dataset(spec, size=8).info.name for spec in (".", "./", "../kather_tiles", data)} == {"kather_tiles"}
    (data / "adipose" / "inner").mkdir()
    monkeypatch.chdir(data / "adipose" / "inner")
    assert load_dataset("../..", size=8).info.name == "kather_tiles"


def test_busi_missing_class(tmp_path):
    (tmp_path / "benign").mkdir()
    with pytest.raises(DataError, match="class folder.s. malignant not found"):
        load_dataset(tmp_path, classes=("benign", "malignant"))


def test_csv_layout(tmp_path):
    rows = ["lesion_id,image_id,dx,age"]
    (tmp_path / "part_1").mkdir()
    for i in range(12):
        dx = ("nv", "mel", "bkl")[i % 3]
        rows.append(f"L{i},ISIC_{i:07d},{dx},50")
        _png(tmp_path / "part_1" / f"ISIC_{i:07d}.jpg", (30, 24), 30 * (i % 3), mode="RGB")
    (tmp_path / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(tmp_path / "HAM10000_metadata.csv", size=12)
    assert s.info.class_names == ("bkl", "mel", "nv") and s.info.in_channels == 3
    assert len(s.train) + len(s.val) + len(s.test) == 12
    assert s.info.extra["classes_missing_from_split"] == {"val": ["mel", "nv"]}  # 12 images: val holds one
    with pytest.warns(UserWarning, match="too small to stratify"):
        s2 = load_dataset(tmp_path / "HAM10000_metadata.csv", size=12, classes=("nv", "mel"))
    assert s2.info.positive_class == 1 and s2.info.num_classes == 2


def _lesions_csv(tmp_path, lesions=40, per_lesion=3, blank_row=None):
    """HAM10000-like metadata: ``per_lesion`` images per lesion (alternating nv / mel), image k a flat 2k grey, so a
    split's images name their lesion."""
    rows = ["lesion_id,image_id,dx"]
    (tmp_path / "imgs").mkdir()
    for k in range(lesions * per_lesion):
        lesion = "" if k == blank_row else f"HAM_{k // per_lesion:04d}"
        rows.append(f"{lesion},ISIC_{k:04d},{('nv', 'mel')[k // per_lesion % 2]}")
        _png(tmp_path / "imgs" / f"ISIC_{k:04d}.png", (8, 8), 2 * k, mode="RGB")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "meta.csv"


def _lesions_of(part, per_lesion=3):
    return {round(float(v) * 255) // 2 // per_lesion for v in part.tensors[0][:, 0, 0, 0]}


def test_csv_with_lesion_id_is_split_by_lesion_stratified_and_recorded(tmp_path):
    """docs/getting-started.md, Data: HAM10000 holds several images per lesion, and the image-level split put 17 of
    40 lesions' images in both train and test (inflated test accuracy). A lesion_id column now groups the split:
    no lesion on two sides, 7:1:2 of lesions with both classes in each part, split_by recorded and part of the
    digest; split_by="image" splits by image as before (no record, the same digest as before)."""
    path = _lesions_csv(tmp_path)
    s = load_dataset(path, size=8, seed=0)
    train, val, test = (_lesions_of(p) for p in (s.train, s.val, s.test))
    assert not (train & test or train & val or val & test) and len(train | val | test) == 40
    assert (len(train), len(val), len(test)) == (28, 4, 8)
    for part in (s.train, s.val, s.test):
        assert torch.bincount(part.tensors[1]).tolist() == [len(part) // 2] * 2  # stratified by lesion label
    # each part's group keys are its own samples' lesions, in its order (cross_validation folds by them)
    for part, keys in zip((s.train, s.val, s.test), s.groups):
        assert [int(k[4:]) for k in keys] == [round(float(v) * 255) // 6 for v in part.tensors[0][:, 0, 0, 0]]
    assert s.info.extra["split_by"] == "lesion_id" and s.info.to_dict()["split_by"] == "lesion_id"
    by_image = load_dataset(path, size=8, seed=0, split_by="image")
    assert _lesions_of(by_image.train) & _lesions_of(by_image.test)  # the leak the default now avoids
    assert "split_by" not in by_image.info.extra
    assert by_image.info.extra["samples_digest"] != s.info.extra["samples_digest"]
    same = load_dataset(path, size=8, seed=0, split_by="lesion_id")
    assert all(torch.equal(a.tensors[0], b.tensors[0]) for a, b in zip(same, s) if hasattr(a, "tensors"))


def test_cross_validation_of_data_split_by_lesion_folds_by_lesion(tmp_path):
    """docs/getting-started.md, Data: folds of a CSV split by lesion_id are grouped (StratifiedGroupKFold), and each
    fold's validation part is drawn by lesion too: image-level folds put about 20 of 40 lesions' images in a fold's
    train and test. A class in fewer lesions than folds is an error counting lesions."""
    s = load_dataset(_lesions_csv(tmp_path), size=8, seed=0)
    folds = cross_validation(s, k=5, seed=0)
    tested = []
    for f in folds:
        train, val, test = (_lesions_of(p) for p in (f.train, f.val, f.test))
        assert not (train & test or train & val or val & test) and len(train | val | test) == 40
        assert torch.bincount(f.test.tensors[1]).tolist() == [12, 12] and len(val) == 4
        assert [len(g) for g in f.groups] == [len(f.train), len(f.val), len(f.test)]
        tested += test
    assert sorted(tested) == list(range(40))  # every lesion tested once
    from sklearn.model_selection import StratifiedGroupKFold  # the folds of the seed, as documented

    groups, labels = np.concatenate(s.groups), torch.cat([p.tensors[1] for p in (s.train, s.val, s.test)]).numpy()
    drawn = StratifiedGroupKFold(5, shuffle=True, random_state=0).split(groups, labels, groups)
    assert [_lesions_of(f.test) for f in folds] == [{int(k[4:]) for k in groups[t]} for _, t in drawn]
    (tmp_path / "few").mkdir()
    with pytest.warns(UserWarning, match="too small to stratify"):  # 5 lesions of a class in 7:1:2
        few = load_dataset(_lesions_csv(tmp_path / "few", lesions=10), size=8, seed=0)
    with pytest.raises(DataError, match=r"^cross_validation: the smallest class has 5 lesion_id groups, fewer than "
                                        r"k=6 folds$"):
        cross_validation(few, k=6)
    with pytest.raises(DataError, match=r"the data was split by 'lesion_id' but carries no groups"):
        cross_validation(type(s)(s.train, s.val, s.test, s.info), k=5)  # its folds would split lesions


def test_csv_split_by_errors(tmp_path):
    path = _lesions_csv(tmp_path, lesions=10, blank_row=4)
    with pytest.raises(DataError, match=r"meta\.csv: line 6: empty 'lesion_id', which the split groups by; expected "
                                        r"a value in every row -- fill it in, or split by image: in Python "
                                        r"split_by='image', on the command line rename the column$"):
        load_dataset(path, size=8)
    assert len(load_dataset(path, size=8, split_by="image").train) == 21
    (tmp_path / "left_out").mkdir()
    other = _lesions_csv(tmp_path / "left_out", lesions=20)
    with open(other, "a") as f:  # a row of a label classes= leaves out needs no lesion (nor an image)
        f.write(",ISIC_9999,unk\n")
    assert len(load_dataset(other, size=8, classes=["nv", "mel"]).train) == 42
    with pytest.raises(DataError, match=r"meta\.csv: line 62: empty 'lesion_id', which the split groups by"):
        load_dataset(other, size=8)
    with pytest.raises(DataError, match=r"meta\.csv: split_by='patient' names no column \(found: lesion_id, image_id, "
                                        r"dx\); expected 'auto', 'image' or a column name$"):
        load_dataset(path, size=8, split_by="patient")
    with pytest.raises(DataError, match=r"expected split_by to be 'auto', 'image' or a column name, got None"):
        from robust_ops.data import load_csv
        load_csv(path, size=8, split_by=None)
    with pytest.raises(DataError, match=r"synthetic: split_by= chooses how a CSV's rows are split"):
        load_dataset("synthetic", split_by="image")


def test_csv_errors(tmp_path):
    (tmp_path / "m.csv").write_text("image_id,label\na,1\n")
    with pytest.raises(DataError, match=r"m\.csv: missing column 'dx'"):
        load_dataset(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("image_id,dx\nimg_a,nv\nimg_b,mel\n")
    with pytest.raises(DataError, match=r"n\.csv: 2 image\(s\) listed but not found"):
        load_dataset(tmp_path / "n.csv")


def _ham(tmp_path, labels, name="meta.csv", images=True):
    rows = ["image_id,dx"] + [f"im{i},{dx}" for i, dx in enumerate(labels)]
    (tmp_path / name).write_text("\n".join(rows) + "\n")
    if images:
        (tmp_path / "imgs").mkdir(exist_ok=True)
        for i in range(len(labels)):
            _png(tmp_path / "imgs" / f"im{i}.jpg", (8, 8), 8 * i % 256, mode="RGB")
    return tmp_path / name


def test_numeric_class_folders_sort_as_text_and_classes_orders_them(tmp_path):
    """Class folders 0, 1, 2, 10 are labelled in text order (10 before 2: label 2 is folder 10), as docs/getting-
    started.md now says, since sorting them numerically would give runs trained on such folders another split than
    the one eval and --resume rebuild; classes= (--classes 0,1,2,10) gives label k to folder k (found by the data2
    helper)."""
    for c in ("0", "1", "2", "10"):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{i}.png", (8, 8), 20 * i + int(c))
    assert load_dataset(tmp_path, size=8).info.class_names == ("0", "1", "10", "2")
    s = load_dataset(tmp_path, size=8, classes=("0", "1", "2", "10"))
    assert s.info.class_names == ("0", "1", "2", "10")
    assert s.info.extra["class_counts"] == {"0": 10, "1": 10, "2": 10, "10": 10}


def test_csv_labels_spelled_as_missing_values_are_said(tmp_path):
    """Labels 'nan' and 'NA' (pandas' df.astype(str) writes a missing label as 'nan') became classes of their own
    without a word, where an empty label is refused: said, naming the classes= that leaves them out; classes= given
    is silent (found by the data2 helper)."""
    path = _ham(tmp_path, ["mel", "nv", "nan", "NA"] * 10)
    with pytest.warns(UserWarning, match=r"meta\.csv: column 'dx' holds 'NA' \(10 rows\), 'nan' \(10 rows\): missing "
                                         r"values \(as pandas writes NaN\), each read as a class of its own; fill in "
                                         r"those rows' labels, or leave them out with classes= \(--classes "
                                         r"mel,nv\)$"):
        s = load_dataset(path, size=8)
    assert s.info.class_names == ("NA", "mel", "nan", "nv")  # loaded as before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = load_dataset(path, size=8, classes=("mel", "nv"))
    assert s.info.extra["excluded_samples"] == 20


@pytest.mark.parametrize("missing", ["None", "#NA", "-NaN", "#N/A N/A", "1.#QNAN", "-1.#QNAN", "1.#IND", "-1.#IND"])
def test_csv_labels_spelled_as_the_other_missing_values_pandas_reads_are_said(tmp_path, missing):
    """pandas' df.astype(str) writes a None label as 'None' (which pandas' read_csv reads back as missing, as it does
    '#NA', '-NaN' and '#N/A N/A'): such labels became a class of their own without the word 'nan' and 'NA' get
    (found by the data6 helper); so did the MSVC runtime's NaN spellings pandas reads as missing too, '1.#QNAN',
    '-1.#IND', ... (found by the revA helper)."""
    path = _ham(tmp_path, ["mel", "nv", missing] * 10)
    with pytest.warns(UserWarning, match=rf"meta\.csv: column 'dx' holds {re.escape(repr(missing))} \(10 rows\): "
                                         r"missing values \(as pandas writes NaN\), each read as a class of its own; "
                                         r"fill in those rows' labels, or leave them out with classes= \(--classes "
                                         r"mel,nv\)$"):
        load_dataset(path, size=8)


def test_csv_rows_naming_missing_images_are_told_the_fix(tmp_path):
    """Rows naming images that are not there were refused with their count and three ids, saying neither where the
    images go nor that the rows can go: the error now ends with the fix, for some rows missing and for all (found by
    the data2 helper)."""
    path = _ham(tmp_path, ["mel", "nv"] * 4)
    path.write_text(path.read_text() + "ISIC_9900000,nv\nISIC_9900001,mel\n")
    where = re.escape(str(tmp_path))
    with pytest.raises(DataError, match=rf"meta\.csv: 2 image\(s\) listed but not found under {where}, "
                                        r"e\.g\. ISIC_9900000, ISIC_9900001 -- put their image files under "
                                        rf"{where}, or remove their rows from the CSV$"):
        load_dataset(path, size=8)
    (tmp_path / "none.csv").write_text("image_id,dx\nX1,nv\nX2,mel\n")
    with pytest.raises(DataError, match=r"none\.csv: 2 image\(s\) listed but not found under .*, e\.g\. X1, X2 -- "
                                        r"put the image files \(or the folders holding them\) under "
                                        rf"{where}$"):
        load_dataset(tmp_path / "none.csv", size=8)


def test_csv_requested_class_without_rows(tmp_path):
    """The review's repro: 'BKL' (labels are case-sensitive) must not become an empty third class."""
    path = _ham(tmp_path, ["mel", "nv", "bkl"] * 10)
    with pytest.raises(DataError, match=r"meta\.csv: requested class\(es\) 'BKL' have no rows in column 'dx' "
                                        r"\(labels present: bkl, mel, nv\)$"):
        load_dataset(path, size=8, classes=("mel", "nv", "BKL"))
    many = _ham(tmp_path, [f"c{i:02d}" for i in range(15)], name="many.csv", images=False)
    with pytest.raises(DataError, match=r"'zz' have no rows .*c00, c01, .*c11, \.\.\. \(3 more\)\)$"):
        load_dataset(many, classes=("c00", "zz"))


def test_dpaat_bus_on_the_papers_three_ham10000_lesions_as_docs_reproduce_says(tmp_path):
    """DPAAT's data is three of HAM10000's seven lesions (mel, bkl, nv); the reproduce README named the route to
    MIRST-DM's two BUSI classes only. It names DPAAT's now: --classes bkl,mel,nv or a CSV of those rows, read as a
    three-class set whose metrics average the classes (no positive class), which every dpaat-bus method takes."""
    from robust_ops import defenses
    from robust_ops.reproduce import PROTOCOLS

    text = " ".join((Path(__file__).resolve().parents[1] / "docs/reproduce/README.md").read_text().split())
    assert "DPAAT's set is three of HAM10000's seven lesions (`dx` `mel`, `bkl` and `nv`;" in text
    assert ("`robust-ops reproduce dpaat-bus --data path/to/HAM10000_metadata.csv --classes bkl,mel,nv --size 28` (or "
            "a CSV holding those rows only)") in text
    s = load_dataset(_ham(tmp_path, ["mel", "bkl", "nv"] * 10), size=8)
    assert s.info.class_names == ("bkl", "mel", "nv") and s.info.positive_class is None
    assert not any(defenses.defense_class(m.defense).binary_only for m in PROTOCOLS["dpaat-bus"].methods)


def test_csv_subset_filter_is_recorded(tmp_path):
    path = _ham(tmp_path, ["mel", "nv", "bkl"] * 10)
    (tmp_path / "imgs" / "im2.jpg").unlink()  # an excluded row's image need not exist
    s = load_dataset(path, size=8, classes=("nv", "mel"))
    assert s.info.class_names == ("nv", "mel") and len(s.train) + len(s.val) + len(s.test) == 20
    extra = dict(s.info.extra)
    assert re.fullmatch("[0-9a-f]{16}", extra.pop("samples_digest"))  # eval and --resume compare it
    assert extra == {"excluded_samples": 10, "excluded_labels": {"bkl": 10}, "class_counts": {"nv": 10, "mel": 10}}
    assert s.info.to_dict()["excluded_labels"] == {"bkl": 10}  # so run.json / results.json show it
    with pytest.raises(DataError, match=r"1 image\(s\) listed but not found"):
        load_dataset(path, size=8)
    (tmp_path / "imgs" / "im2.jpg").touch()
    with pytest.raises(DataError, match=r"im2\.jpg: an empty file \(0 bytes\), no image"):
        load_dataset(path, size=8)


def test_csv_malformed_rows_and_classes(tmp_path):
    (tmp_path / "d.csv").write_text("image_id,dx\na,nv\nb,mel\na,mel\n")
    # with their lines, as a long export's rows are found (found by the data5 helper)
    with pytest.raises(DataError, match=r"d\.csv: 1 image_id\(s\) listed more than once, e\.g\. a \(lines 2 and 4\); "
                                        r"expected one"):
        load_dataset(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text("image_id,dx\na,nv\nb,\n")
    with pytest.raises(DataError, match=r"e\.csv: line 3: empty 'dx'; expected a value in every row"):
        load_dataset(tmp_path / "e.csv")
    (tmp_path / "f.csv").write_text("image_id,age,dx\na,50,nv\nb,60\n")
    with pytest.raises(DataError, match=r"f\.csv: line 3: empty 'dx'"):
        load_dataset(tmp_path / "f.csv")
    path = _ham(tmp_path, ["mel", "nv"] * 4)
    # a label holding an unquoted comma was cut at it, silently: 'mel, in situ' was read as 'mel'
    (tmp_path / "g.csv").write_text(path.read_text().replace("im2,mel", "im2,mel, in situ"))
    with pytest.raises(DataError, match=r"g\.csv: line 4: 3 values, but the header names 2 columns; quote a value "
                                        r"that holds a comma \(\"melanoma, in situ\"\) -- which column"):
        load_dataset(tmp_path / "g.csv", size=8)
    for bad, msg in (("mel", r"expected classes to be a sequence of names .* got the string 'mel'"),
                     (("mel", "nv", "mel"), r"classes= lists mel more than once")):
        with pytest.raises(DataError, match=msg):
            load_dataset(path, size=8, classes=bad)
    (tmp_path / "copy").mkdir()
    _png(tmp_path / "copy" / "im3.png", (8, 8), 0, mode="RGB")
    with pytest.raises(DataError,
                       match=r"1 image_id\(s\) match several files.*copy/im3\.png and .*imgs/im3\.jpg; write the "):
        load_dataset(path, size=8)
    from robust_ops.data import load_csv
    with pytest.warns(UserWarning, match="too small to stratify"):
        assert len(load_csv(path, size=8, image_dir=tmp_path / "imgs").train) > 0


def test_synthetic_deterministic_and_named():
    a, b = load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=3)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    c = load_dataset("synthetic", seed=4)
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert a.info.synthetic and "synthetic" in a.info.name and a.info.positive_class == 1
    assert (len(a.train), len(a.val), len(a.test)) == (384, 64, 128)  # docs/getting-started.md
    x, y = a.train.tensors
    assert x.shape[1:] == (1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert 0.33 < float(y.float().mean()) < 0.47  # MALIGNANT_FRACTION 0.4 (384 draws: standard deviation 0.025)
    assert torch.equal(x * 255, (x * 255).round())  # on the 8-bit grid, as real images are
    # train and test are different draws, from independent streams (not one stream's prefix)
    assert not torch.equal(a.train.tensors[0][:5], a.test.tensors[0][:5])
    assert not torch.equal(a.train.tensors[1][:128], a.test.tensors[1])


def test_each_split_declares_its_classes_and_fit_refuses_a_model_of_more():
    """load_dataset's splits are TensorDatasets, which declare no classes, so fit trained a torchvision resnet18 built
    without num_classes (1000 logits) on them without a word, and only evaluate refused it afterwards. Each split
    now carries the class names in ``classes``, as torchvision's datasets do, and fit compares at its first batch."""
    from robust_ops import defenses
    from robust_ops.train import fit

    splits = load_dataset("synthetic", seed=0)
    assert [splits.train.classes, splits.val.classes, splits.test.classes] == [list(splits.info.class_names)] * 3
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 1000))
    with pytest.raises(ValueError, match=r"^fit: the model scores 1000 classes .*, but train_data declares 2 in its "
                                         r"classes \(benign, malignant\); build it for this dataset's classes"):
        fit(model, defenses.Standard(), splits.train, epochs=1, batch_size=32, progress=False)


def test_splits_of_the_callers_own_datasets_keep_their_classes():
    """DatasetSplits gives its TensorDataset and Subset splits the info's class names; a dataset of the caller's that
    declares classes of its own (an ImageFolder's folder names) is not written over."""
    class Own(torch.utils.data.Dataset):
        classes = ["a", "b"]

        def __len__(self):
            return 0

    s = load_dataset("synthetic", seed=0)
    own = Own()
    splits = DatasetSplits(own, torch.utils.data.Subset(s.val, [0, 1]), s.test, s.info)
    assert own.classes == ["a", "b"] and splits.val.classes == ["benign", "malignant"] == splits.test.classes


def test_splits_of_an_info_naming_other_than_its_classes_declare_none_and_fit_trains_them():
    """An info whose class_names do not name num_classes classes (one built by hand) gives its splits no classes:
    fit would compare the model with a wrong count (mutation testing: giving them the names whatever their count
    passed this file, and then fit refused a 3-class model on 3-class data with 'train_data declares 2')."""
    import dataclasses

    from robust_ops import defenses
    from robust_ops.train import fit

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(8, 1, 28, 28, generator=g), torch.arange(8) % 3)
    info = dataclasses.replace(load_dataset("synthetic", seed=0).info, num_classes=3)  # names: benign, malignant
    for names in ((), ("a", "b", "c", "d"), info.class_names):
        splits = DatasetSplits(data, data, data, dataclasses.replace(info, class_names=names))
        assert not hasattr(splits.train, "classes"), names
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 3))
    run = fit(model, defenses.Standard(), splits.train, epochs=1, batch_size=8, progress=False)
    assert len(run.history) == 1


def test_synthetic_classes_differ():
    """Malignant lesions cast posterior shadows: the region below the lesion is darker on average."""
    x, y = synthetic_ultrasound(64, size=32, seed=0)
    lower = x[:, 0, 22:, 10:22].mean((1, 2))
    assert float(lower[y == 1].mean()) < float(lower[y == 0].mean())
    # malignant: taller than wide -- the dark region's (lesion plus shadow) height over width is larger
    dark = x[:, 0] < 0.2
    aspect = dark.any(2).sum(1).float() / dark.any(1).sum(1).float().clamp_min(1)
    assert float(aspect[y == 1].mean()) > float(aspect[y == 0].mean()) + 0.15
    # multiplicative speckle: neighbouring pixels differ (0.08 on average; 0.03 without speckle)
    assert float((x[..., 1:] - x[..., :-1]).abs().mean()) > 0.05


def test_moons():
    s = load_dataset("moons")
    assert len(s.train) == 10000 and len(s.test) == 1000 and s.train.tensors[0].shape == (10000, 2)
    assert s.info.value_range == (-4.0, 4.0) and s.info.num_classes == 2


def test_cross_validation_stratified():
    s = load_dataset("synthetic")
    folds = cross_validation(s, k=5, seed=0)
    assert len(folds) == 5
    total = len(s.train) + len(s.val) + len(s.test)
    test_sizes = [len(f.test) for f in folds]
    assert sum(test_sizes) == total
    for f in folds:
        assert len(f.train) + len(f.val) + len(f.test) == total
        frac = float(f.test.tensors[1].float().mean())
        overall = torch.cat([s.train.tensors[1], s.val.tensors[1], s.test.tensors[1]]).float().mean()
        assert abs(frac - float(overall)) < 0.05
    with pytest.raises(DataError, match=r"cross_validation: expected k \(the number of folds\) to be an integer >= 2"):
        cross_validation(s, k=1)


def test_copy_of_official_file_under_other_name_is_not_md5_checked(breastmnist, tmp_path):
    p = tmp_path / "mybreast.npz"
    shutil.copy(breastmnist, p)
    assert load_dataset(p).info.name == "mybreast"


def test_current_organ_release_md5_is_official(tmp_path, monkeypatch):
    """MedMNIST v3 re-released the 28x28 Organ{A,C,S}MNIST files; their new checksums are official too."""
    p = write_npz(tmp_path / "organamnist.npz", classes=11)
    monkeypatch.setattr(mm, "file_md5", lambda path: "68e3f8846a6bd62f0c9bf841c0d9eacc")
    assert load_dataset(p).info.name == "organamnist"
    monkeypatch.setattr(mm, "file_md5", lambda path: mm.OFFICIAL_MD5["organamnist.npz"])  # the v2 file
    assert load_dataset(p).info.name == "organamnist"
    monkeypatch.setattr(mm, "file_md5", lambda path: "0" * 32)
    with pytest.raises(DataError, match="does not match the official organamnist.npz"):
        load_dataset(p)


def test_medmnist_name_errors_say_what_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUST_OPS_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError, match=r"breastmnist: MedMNIST images come in sizes 28, 64, 128, 224, got size=100"):
        load_dataset("breastmnist", size=100)  # not "breastmnist_100.npz not found"
    with pytest.raises(DataError, match=r"chestmnist: a multi-label MedMNIST set .* only single-label sets"):
        load_dataset("chestmnist")  # not "not a known dataset name"


def test_too_few_samples_to_split_is_a_data_error():
    from robust_ops.data.core import stratified_split

    for y in ([0, 1], [0, 1, 0, 1]):  # scikit-learn raised its own ValueError from the fallback split
        with pytest.raises(DataError, match=r"too few samples \(\d\) for a 0.7/0.1/0.2 split"):
            stratified_split(np.array(y), (0.7, 0.1, 0.2), seed=0)
    with pytest.raises(DataError, match=r"too few samples \(20\) for a 0.8/0.2/0.0 split; expected at least one "):
        stratified_split(np.array([0, 1] * 10), (0.8, 0.2, 0.0), seed=0)  # an empty part, which scikit-learn never cut


def test_seed_and_size_a_source_cannot_use_are_refused():
    with pytest.raises(DataError, match=r"load_dataset: expected seed to be an integer >= 0, got -1"):
        load_dataset("synthetic", seed=-1)
    with pytest.raises(DataError, match=r"moons: size= resizes images; two-moons holds 2-d points"):
        load_dataset("moons", size=64)
    from robust_ops.data import synthetic_splits
    with pytest.raises(DataError, match=r"sizes has unknown split\(s\) 'tran'; expected keys train, val, test"):
        synthetic_splits(sizes={"tran": 10})


def test_busi_16_bit_images_are_scaled_not_clamped(tmp_path):
    from PIL import Image

    for c, levels in (("benign", (0, 10, 20, 30, 40)), ("malignant", (50, 100, 150, 200, 250))):
        (tmp_path / c).mkdir()
        for v in levels:  # 16-bit PNGs (I;16): Pillow's convert("L") turned every value above 255 white
            Image.fromarray(np.full((8, 8), 257 * v, np.uint16)).save(tmp_path / c / f"{v}.png")
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(tmp_path, size=8)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    values = sorted({round(float(v) * 255) for v in x[:, 0, 4, 4]})
    assert values == [0, 10, 20, 30, 40, 50, 100, 150, 200, 250]
    with pytest.raises(DataError, match=r"load_busi\(.*\): expected size \(pixels\) to be an integer >= 1, got 0"):
        load_dataset(tmp_path, size=0)


def test_csv_byte_order_mark_whitespace_and_encoding(tmp_path):
    path = _ham(tmp_path, ["mel", "nv"] * 5)
    text = path.read_text().replace("nv\n", "nv \n")  # a stray space must not make a class "nv " beside "nv"
    path.write_bytes(("\ufeff" + text).encode("utf-8"))  # spreadsheet exports start with a byte-order mark
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(path, size=8)
    assert s.info.class_names == ("mel", "nv") and len(s.train) + len(s.val) + len(s.test) == 10
    path.write_bytes(b"image_id,dx\nim0,caf\xe9\n")
    with pytest.raises(DataError, match=r"meta\.csv: not UTF-8 text \(invalid continuation byte at byte \d+\); save"):
        load_dataset(path, size=8)
    with pytest.raises(DataError, match=r"expected size \(pixels\) to be an integer >= 1, got -1"):
        load_dataset(path, size=-1)


def test_cross_validation_argument_errors():
    s = load_dataset("synthetic")
    assert len(cross_validation(s, k=np.int64(3))) == 3  # numpy ints count (numbers.Integral)
    for bad in (1.0, -0.1, "0.1", None, False):  # a string or None gave a TypeError traceback, False meant 0
        with pytest.raises(DataError, match=rf"expected 0 <= val_fraction < 1, got {bad!r}"):
            cross_validation(s, k=3, val_fraction=bad)
    # the seed makes the folds reproducible: None (other folds on every call) and negative seeds are refused
    for bad in (None, -1, 1.5):
        with pytest.raises(DataError, match=rf"cross_validation: expected seed to be an integer >= 0, got {bad}"):
            cross_validation(s, k=3, seed=bad)


def test_cross_validation_folds_describe_themselves(tmp_path):
    """A fold's info must not carry the 7:1:2 split's classes_missing_from_split (run.json records it)."""
    s = load_dataset("synthetic")
    s.info.extra["classes_missing_from_split"] = {"val": ["malignant"]}  # as splits_from_arrays records it
    folds = cross_validation(s, k=3, seed=0)
    assert all("classes_missing_from_split" not in f.info.extra for f in folds)
    assert s.info.extra["classes_missing_from_split"] == {"val": ["malignant"]}  # the base info is left alone
    folds[0].info.extra["note"] = 1
    assert "note" not in folds[1].info.extra and folds[0].info.name == s.info.name


def test_npz_images_and_labels_keep_their_values(tmp_path):
    # uint8 channels-last images -> float [N, C, H, W] / 255, pixel for pixel (H and W not swapped)
    path = write_npz(tmp_path / "v.npz", shape=(8, 8, 3), labels_2d=True, classes=3)
    s = load_dataset(path)
    with np.load(path) as raw:
        images, labels = raw["train_images"], raw["train_labels"]
    x, y = s.train.tensors
    expected = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-7)
    assert torch.equal(y, torch.from_numpy(labels[:, 0].astype(np.int64)))
    # float images are taken as they are, but only inside [0, 1]
    floats = np.random.default_rng(1).random((12, 28, 28)).astype(np.float32)
    s = load_dataset(write_npz(tmp_path / "f.npz", train_images=floats))
    assert torch.equal(s.train.tensors[0][:, 0], torch.from_numpy(floats))
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\], got \[0, 1.5\]"):
        load_dataset(write_npz(tmp_path / "g.npz", train_images=np.where(floats > 0.5, 1.5, 0.0).astype(np.float32)))
    # other integer images (16-bit CT, int64 from a pipeline): refused, saying what to convert them to
    # by their values: "convert them to uint8" alone led 12-bit CT's uint16 values to wrap modulo 256 into noise that
    # loaded without a word (found by the persona helper)
    u16 = (floats * 4095).astype(np.uint16)
    u16[0, 0, :2] = 0, 4095
    with pytest.raises(DataError, match=r"expected uint8 or float images, got dtype uint16 with values in \[0, 4095\]; "
                                        r"12-bit intensities\? store them as floats in \[0, 1\], "
                                        r"images.astype\(np.float32\) / 4095 \(astype\(np.uint8\) would wrap every "
                                        r"value above 255\)$"):
        load_dataset(write_npz(tmp_path / "u.npz", train_images=u16))
    with pytest.raises(DataError, match=r"uint16 with values in \[15, 65535\]; 16-bit intensities\? .* / 65535 "):
        load_dataset(write_npz(tmp_path / "u.npz", train_images=u16 * np.uint16(16) + np.uint16(15)))
    # a top below 1024 is named 10-bit, as the folder loader's warning: 12 bits, what it said until 2026-12-07, reads
    # 10-bit data 4 times dark (found by the data2 helper)
    with pytest.raises(DataError, match=r"uint16 with values in \[0, 1000\]; 10-bit intensities\? .* / 1023 "):
        load_dataset(write_npz(tmp_path / "u.npz", train_images=np.minimum(u16, np.uint16(1000))))
    from robust_ops.data.core import images_to_tensor

    # no values to name: numpy's "zero-size array to reduction operation" (mutation testing: it survived) (found by
    # the mutB helper)
    with pytest.raises(DataError, match=r"^s: expected uint8 or float images, got dtype uint16: convert them to uint8 "
                                        r"\(0-255\) or to floats in \[0, 1\]$"):
        images_to_tensor(np.zeros((0, 8, 8), np.uint16), "s")
    # a bool mask was told that generic fix, and its astype(np.uint8), 0 and 1 of 255, is refused as black: told the
    # binary images' fix, which loads (found by the data4 helper)
    mask = np.random.default_rng(2).random((12, 8, 8)) > 0.5
    with pytest.raises(DataError, match=r"^s: expected uint8 or float images, got dtype bool; \[0, 1\] pixels\? store "
                                        r"them as floats, images.astype\(np.float32\) \(as uint8 they would be 0 and "
                                        r"1 of 255, black\)$"):
        images_to_tensor(mask, "s")
    with pytest.raises(DataError, match=r"every uint8 image of train_images holds values 0 and 1 only"):
        load_dataset(write_npz(tmp_path / "b.npz", shape=(8, 8), train_images=mask.astype(np.uint8)))
    assert float(load_dataset(write_npz(tmp_path / "b.npz", shape=(8, 8), train_images=mask.astype(np.float32)))
                 .train.tensors[0].max()) == 1
    # a constant signed set: "(1 levels left)"
    with pytest.raises(DataError, match=r"got dtype int64 with values in \[-1, -1\]; .* \(1 level left\)\?"):
        images_to_tensor(np.full((2, 8, 8), -1, np.int64), "s")
    with pytest.raises(DataError, match=r"got dtype int16 with values in \[-1024, 3071\]; CT Hounsfield units\? window "
                                        r"them onto \[0, 1\] pixels: \(np.clip\(images, lo, hi\) - lo\) / \(hi - "
                                        r"lo\) as float32 for the window \[lo, hi\] they are read in \(e.g. -1000, "):
        load_dataset(write_npz(tmp_path / "u.npz", train_images=u16.astype(np.int16) - np.int16(1024)))
    with pytest.raises(DataError, match=r"got dtype int64 with values in \[0, 255\]: store them as uint8 "
                                        r"\(images.astype\(np.uint8\)\), 0-255 pixels$"):
        load_dataset(write_npz(tmp_path / "u.npz", train_images=(floats * 255).round().astype(np.int64)))
    with pytest.raises(DataError, match=r"got dtype int64 with values in \[-5, 250\]; signed intensities \(an offset "
                                        r"or a mean subtracted\)\? store them as floats in \[0, 1\], "):
        load_dataset(write_npz(tmp_path / "u.npz", train_images=(floats * 255).round().astype(np.int64) - 5))
    # binary images (np.where's int64) stored as uint8, as the line above told them, loaded black (1 of 255) without a
    # word (found by the revA helper)
    with pytest.raises(DataError, match=r"got dtype int64 with values in \[0, 1\]; \[0, 1\] pixels\? store them as "
                                        r"floats, images.astype\(np.float32\) \(as uint8 they would be 0 and 1 of "
                                        r"255, black\)$"):
        load_dataset(write_npz(tmp_path / "u.npz", train_images=(floats > 0.5).astype(np.int64)))
    # and stored as uint8, as that hint told them until 2026-12-07, they loaded with a largest pixel of 1 / 255 and no
    # word (found by the revC helper); a uint8 set of real pixels is never all 0 and 1, and an all-zero one passes
    binary = {f"{s}_images": (np.random.default_rng(2).random((k, 28, 28)) > 0.5).astype(np.uint8)
              for s, k in (("train", 12), ("val", 4), ("test", 6))}
    with pytest.raises(DataError, match=r"b\.npz: every uint8 image holds values 0 and 1 only; \[0, 1\] pixels\? store "
                                        r"them as floats, images.astype\(np.float32\) \(as uint8 they would be 0 and 1 "
                                        r"of 255, black\)$"):
        load_dataset(write_npz(tmp_path / "b.npz", **binary))
    # a uint8 train split of them beside float val and test splits loaded black, they not, without a word (found by
    # the mut53 helper)
    mixed = {k: v if k == "train_images" else v.astype(np.float32) for k, v in binary.items()}
    with pytest.raises(DataError, match=r"b\.npz: every uint8 image holds values 0 and 1 only; "):
        load_dataset(write_npz(tmp_path / "b.npz", **mixed))
    # and beside uint8 val and test splits of 0-255, whose largest value hid it: loaded with a train split of 1 / 255
    # at most and no word (found by the revB helper)
    beside = {**binary, "val_images": np.full((4, 28, 28), 200, np.uint8), "test_images": np.full((6, 28, 28), 255,
                                                                                                  np.uint8)}
    with pytest.raises(DataError, match=r"b\.npz: every uint8 image of train_images holds values 0 and 1 only "
                                        r"\(val_images up to 200, test_images up to 255\); \[0, 1\] pixels\? store "):
        load_dataset(write_npz(tmp_path / "b.npz", **beside))
    as_floats = load_dataset(write_npz(tmp_path / "b.npz", **{k: v.astype(np.float32) for k, v in binary.items()}))
    assert torch.equal(as_floats.train.tensors[0][:, 0], torch.from_numpy(binary["train_images"]).float())
    zeros = load_dataset(write_npz(tmp_path / "z.npz", **{k: np.zeros_like(v) for k, v in binary.items()}))
    assert float(zeros.train.tensors[0].max()) == 0.0
    # multi-label (N, 2) and negative labels are refused, not silently reshaped / kept
    with pytest.raises(DataError, match=r"expected train_labels of shape \(N,\) or \(N, 1\), got \(12, 2\)"):
        load_dataset(write_npz(tmp_path / "m.npz", train_labels=np.zeros((12, 2), np.int64)))
    with pytest.raises(DataError, match="expected train_labels >= 0, got -1"):
        load_dataset(write_npz(tmp_path / "n.npz", train_labels=np.full(12, -1, np.int64)))


def test_display_name_marks_only_synthetic_sets():
    from robust_ops.data import DatasetInfo

    def info(name, synthetic):
        return DatasetInfo(name, 2, 1, 28, ("a", "b"), synthetic=synthetic)

    assert info("breastmnist", False).display_name == "breastmnist"
    assert info("bus", True).display_name == "bus (synthetic)"
    assert info("synthetic-bus", True).display_name == "synthetic-bus"


def _indexed_splits(counts=(30, 20, 10)):
    """Pooled samples whose x is their index (train given as a ConcatDataset, as folders' loaders may)."""
    from torch.utils.data import ConcatDataset, TensorDataset

    from robust_ops.data import DatasetInfo, DatasetSplits

    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    x = torch.arange(len(y), dtype=torch.float32)[:, None]
    part = lambda a, b: TensorDataset(x[a:b], y[a:b])  # noqa: E731
    train = ConcatDataset([part(0, 20), part(20, 40)])
    info = DatasetInfo("toy", len(counts), 1, 1, tuple(f"c{k}" for k in range(len(counts))))
    return DatasetSplits(train, part(40, 48), part(48, len(y)), info), y


def test_cross_validation_folds_partition_the_pooled_data():
    from sklearn.model_selection import StratifiedKFold

    splits, y = _indexed_splits()
    n = len(y)
    folds = cross_validation(splits, k=5, seed=3)
    expected_tests = [sorted(t.tolist()) for _, t in
                      StratifiedKFold(5, shuffle=True, random_state=3).split(np.zeros(n), y.numpy())]
    seen_in_test = []
    for f, expected_test in zip(folds, expected_tests):
        ids = {}
        for part in ("train", "val", "test"):
            xs, ys = getattr(f, part).tensors
            ids[part] = xs[:, 0].long().tolist()
            assert torch.equal(ys, y[xs[:, 0].long()])  # every sample keeps its own label
        assert sorted(ids["test"]) == expected_test  # scikit-learn's StratifiedKFold with the seed
        assert sorted(ids["train"] + ids["val"] + ids["test"]) == list(range(n))  # disjoint, nothing lost
        rest = n - len(ids["test"])
        assert len(ids["val"]) == round(0.1 * rest)  # default val_fraction=0.1 of the non-test samples
        assert sorted(set(y[ids["val"]].tolist())) == [0, 1, 2]  # stratified: every class in val
        seen_in_test += ids["test"]
    assert sorted(seen_in_test) == list(range(n))  # each sample is tested exactly once
    # the seed picks the folds and the validation samples; the same seed gives the same folds
    again = cross_validation(splits, k=5, seed=3)
    assert all(torch.equal(a.val.tensors[0], b.val.tensors[0]) for a, b in zip(folds, again))
    other = cross_validation(splits, k=5, seed=4)
    assert any(not torch.equal(a.test.tensors[0], b.test.tensors[0]) for a, b in zip(folds, other))
    # val: the seeded stratified val_fraction of the samples not tested
    from robust_ops.data.core import stratified_split

    train_ids = torch.cat([folds[0].train.tensors[0], folds[0].val.tensors[0]])[:, 0].long().sort()[0]
    _, va = stratified_split(y[train_ids].numpy(), (0.9, 0.1), 3)
    assert sorted(folds[0].val.tensors[0][:, 0].long().tolist()) == train_ids[va].tolist()
    # val_fraction=0: no validation set, everything not tested trains
    for f in cross_validation(splits, k=4, seed=0, val_fraction=0):
        assert len(f.val) == 0 and len(f.train) + len(f.test) == n
    # the smallest class must have a sample for every test fold
    small, _ = _indexed_splits((30, 20, 4))
    assert len(cross_validation(small, k=4)) == 4
    with pytest.raises(DataError, match="the smallest class has 4 samples, fewer than k=5 folds"):
        cross_validation(small, k=5)
    with pytest.raises(DataError, match=r"the smallest class has 1 sample, fewer than k=2 folds$"):  # "1 samples"
        cross_validation(_indexed_splits((30, 20, 1))[0], k=2)


# ---------------------------------------------------------------------------------------------------------------------
# Mutation pass (data): MedMNIST lookup and layout checks, folder discovery, seeds


def test_medmnist_lookup_order_and_file_names(tmp_path, monkeypatch):
    """root, then $ROBUST_OPS_DATA (a folder or that very file), then ~/.medmnist; the 28x28 file has no size suffix;
    a size in the name must agree with size=."""
    root, env_dir, home = tmp_path / "root", tmp_path / "env", tmp_path / "home"
    for d in (root, env_dir, home / ".medmnist"):
        d.mkdir(parents=True)
        (d / "breastmnist.npz").touch()
    monkeypatch.setenv("ROBUST_OPS_DATA", str(env_dir))
    monkeypatch.setenv("HOME", str(home))
    assert mm.find_medmnist("breastmnist", root) == root / "breastmnist.npz"
    assert mm.find_medmnist("breastmnist") == env_dir / "breastmnist.npz"
    monkeypatch.setenv("ROBUST_OPS_DATA", str(env_dir / "breastmnist.npz"))  # a file: used only for its own name
    assert mm.find_medmnist("breastmnist") == env_dir / "breastmnist.npz"
    assert mm.find_medmnist("pneumoniamnist") is None
    monkeypatch.setattr(mm, "load_npz", lambda path, size=None: (path, size))
    assert load_dataset("breastmnist_28") == (env_dir / "breastmnist.npz", 28)  # not breastmnist_28.npz
    with pytest.raises(DataError, match=r"breastmnist_64: the name says size 64 but size=28 was requested"):
        load_dataset("breastmnist_64", size=28)
    assert "chestmnist" not in mm.MEDMNIST_NAMES  # the multi-label error must not suggest it


def test_npz_layout_errors_name_the_mismatch(tmp_path):
    """Splits of other sizes or channel counts were refused naming the shapes alone: the error now ends with the fix
    (found by the data2 helper)."""
    with pytest.raises(DataError, match=r"a\.npz: val_images have shape \(1, 14, 14\), train has \(1, 28, 28\); save "
                                        r"every split's images at one size \(an \.npz is read as stored, never "
                                        r"resized\)$"):
        load_dataset(write_npz(tmp_path / "a.npz", val_images=np.zeros((4, 14, 14), np.uint8)))
    rgb = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
    with pytest.raises(DataError, match=r"c\.npz: test_images have shape \(3, 28, 28\), train has \(1, 28, 28\); "
                                        r"save every split's images in one channel count \(a grayscale split as RGB: "
                                        r"np\.repeat\(images\[\.\.\., None\], 3, axis=-1\)\)$"):
        load_dataset(write_npz(tmp_path / "c.npz", test_images=rgb))
    with np.load(write_npz(tmp_path / "d.npz")) as grey:
        fixed = {k: np.repeat(v[..., None], 3, axis=-1) if k.endswith("_images") else v for k, v in grey.items()}
    assert load_dataset(write_npz(tmp_path / "d.npz", **fixed)).info.in_channels == 3  # the fix loads
    with pytest.raises(DataError, match=r"b\.npz: expected square images, got 28x20"):
        load_dataset(write_npz(tmp_path / "b.npz", shape=(28, 20)))
    with pytest.raises(DataError, match=r"c\.npz: images are 28x28, but size=64 was requested"):
        load_dataset(write_npz(tmp_path / "c.npz"), size=64)
    with pytest.raises(DataError, match=r"absent\.npz: no such file"):
        load_dataset(tmp_path / "absent.npz")
    # the class count covers every split, even a one-sample test split holding the highest label
    s = load_dataset(write_npz(tmp_path / "d.npz", shape=(8, 8, 3), test_labels=np.array([[2]]), n=(12, 4, 1)))
    assert (s.info.num_classes, s.info.in_channels, s.info.image_size) == (3, 3, 8)


def test_medmnist_names_with_a_size_keep_their_classes(tmp_path, as_official):
    """breastmnist_64.npz is BreastMNIST: 0 = malignant is the positive class; a DermaMNIST file whose labels
    happen to stop early still has DermaMNIST's seven classes."""
    s = load_dataset(as_official(write_npz(tmp_path / "breastmnist_64.npz", shape=(64, 64))))
    assert s.info.name == "breastmnist" and s.info.positive_class == 0 and s.info.class_names[0] == "malignant"
    s = load_dataset(as_official(write_npz(tmp_path / "dermamnist_64.npz", shape=(64, 64), classes=4)))
    assert s.info.num_classes == 7 and s.info.class_names[6] == "vasc" and s.info.positive_class is None


def test_busi_pads_tall_images_on_both_sides_and_resizes_bilinearly(tmp_path):
    for c in ("left", "right"):
        (tmp_path / c).mkdir()
        for i in range(5):
            _png(tmp_path / c / f"{i}.png", (10, 20), 200)  # 10 wide, 20 tall: black bands left and right
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(tmp_path, size=10)
    row = s.train.tensors[0][0, 0, 5] * 255
    assert float(row[0]) == 0 and float(row[-1]) == 0 and float(row[5]) == pytest.approx(200)
    assert 0 < float(row[2]) < 200  # bilinear: the band's edge blends (nearest-neighbour would give 0 or 200)
    assert s.info.positive_class == 1  # two classes, none malignant-like: label 1


def test_an_empty_class_folder_names_the_way_out(tmp_path):
    """An empty class folder beside the others (a class to come, an unzip mishap; here holding only a note) was
    "<folder>/normal: no images found", saying neither what is read nor what to do: it names the classes to read
    instead, or, when too few others hold images, the files it expects; a requested one is the classes' fault."""
    for c in ("benign", "malignant", "normal"):
        (tmp_path / c).mkdir()
    for c in ("benign", "malignant"):
        for i in range(5):
            _png(tmp_path / c / f"{i}.png", (8, 8), 40 * i)
    (tmp_path / "normal" / "notes.txt").write_text("scans to come")
    with pytest.raises(DataError, match=r"normal: no images found; leave it out with classes= \(--classes "
                                        r"benign,malignant\) or remove the empty folder$") as err:
        load_dataset(tmp_path, size=8)
    assert err.value.arg is None  # the data's fault: no --classes was given
    with pytest.raises(DataError, match=r"normal: no images found; put its images there \(\.png, \.jpg, \.jpeg, "
                                        r"\.jfif, \.jpe, \.bmp, \.tif, \.tiff files\)$") as err:
        load_dataset(tmp_path, size=8, classes=("benign", "normal"))
    assert err.value.arg == "classes"
    with pytest.raises(DataError, match=r"normal: no images found; leave it out with classes= \(--classes "
                                        r"benign,malignant\)$"):
        load_dataset(tmp_path, size=8, classes=("benign", "normal", "malignant"))


def test_busi_class_discovery_and_file_filters(tmp_path):
    """Default class order: benign, malignant, normal, then others alphabetically; image suffixes match in any case;
    *_mask* files (any case) are skipped; the split is drawn from seed, the same for the same seed."""
    for c in ("malignant", "benign", "abnormal"):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{c}{i}.png", (8, 8), 10 * i)
    _png(tmp_path / "benign" / "extra.PNG", (8, 8), 7)
    _png(tmp_path / "benign" / "benign0_Mask.png", (8, 8), 255)
    s = load_dataset(tmp_path, size=8)
    assert s.info.class_names == ("benign", "malignant", "abnormal")
    benign_count = sum(int((part.tensors[1] == 0).sum()) for part in (s.train, s.val, s.test))
    assert benign_count == 11  # the .PNG counts, the mask does not
    again, other = load_dataset(tmp_path, size=8), load_dataset(tmp_path, size=8, seed=1)
    assert torch.equal(s.train.tensors[0], again.train.tensors[0])
    assert not torch.equal(s.train.tensors[0], other.train.tensors[0])
    with pytest.raises(DataError, match=r"expected at least two class folders \(e\.g\. benign, malignant\)"):
        load_dataset(tmp_path, classes=("benign",))
    with pytest.raises(DataError, match=r"expected size \(pixels\) to be an integer >= 1, got True"):
        load_dataset(tmp_path, size=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images found"):
        load_dataset(tmp_path, size=8, classes=("benign", "empty"))
    (tmp_path / "Benign").mkdir()
    with pytest.raises(DataError, match=r"class folders Benign and benign differ only in case"):
        load_dataset(tmp_path, size=8)


def test_busi_skips_mask_files_by_their_name_s_end_only(tmp_path):
    """BUSI's masks (NAME_mask.png, NAME_mask_1.png, any case) are skipped; an image with _mask inside its name (a
    dermoscopy image with its background masked out, ISIC_0024306_masked.jpg) is read, where it was dropped
    silently."""
    for c in ("mel", "nv"):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{c}{i}.png", (8, 8), 10 * i)
    for name in ("mel0_mask.png", "mel0_mask_1.png", "mel1_Mask.png"):
        _png(tmp_path / "mel" / name, (8, 8), 255)
    for name in ("ISIC_0024306_masked.jpg", "hair_mask_removed.png"):
        _png(tmp_path / "mel" / name, (8, 8), 30)
    s = load_dataset(tmp_path, size=8)
    assert s.info.extra["class_counts"] == {"mel": 12, "nv": 10}


def test_busi_classes_match_a_folder_named_in_the_other_unicode_form(tmp_path):
    """A class typed composed (NFC, 'mélanome') matches the folder macOS named decomposed (NFD), and the other way;
    the class is named as its folder is, as without classes=; both forms at once are one class listed twice."""
    import unicodedata

    nfc = "m\u00e9lanome"
    nfd = unicodedata.normalize("NFD", nfc)
    for c in (nfd, "nv"):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{i}.png", (8, 8), 10 * i)
    for typed in (nfc, nfd, nfc.upper()):
        s = load_dataset(tmp_path, size=8, classes=(typed, "nv"))
        assert s.info.class_names == (nfd, "nv") and s.info.extra["class_counts"] == {nfd: 10, "nv": 10}
    assert load_dataset(tmp_path, size=8).info.class_names == (nfd, "nv")
    with pytest.raises(DataError, match="lists .* more than once"):
        load_dataset(tmp_path, size=8, classes=(nfc, "nv", nfd))


def test_busi_broken_links_are_said_not_left_out(tmp_path):
    """A class folder linked from a drive not mounted was left out without a word (two classes of three), and
    classes= naming it said 'not found (found: ...)'; an image's broken link said '[Errno 2] ...'. Each is named as
    a broken link; classes= leaving its class out reads the rest."""
    for c in ("mel", "nv"):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{i}.png", (8, 8), 10 * i)
    (tmp_path / "bcc").symlink_to(tmp_path / "gone" / "bcc")
    (tmp_path / "notes.txt").symlink_to(tmp_path / "gone" / "notes.txt")  # no class folder
    link = re.escape(f"{tmp_path / 'bcc'}: a link to {tmp_path / 'gone' / 'bcc'}, which does not exist (a drive not "
                     "mounted, or the target moved?); restore its target or remove the link")
    with pytest.raises(DataError, match=rf"^{link}, or leave it out with classes= \(--classes mel,nv\)$"):
        load_dataset(tmp_path, size=8)
    with pytest.raises(DataError, match=rf"^{link}$"):
        load_dataset(tmp_path, size=8, classes=("BCC", "mel"))
    assert load_dataset(tmp_path, size=8, classes=("mel", "nv")).info.extra["class_counts"] == {"mel": 10, "nv": 10}
    (tmp_path / "bcc").unlink()
    (tmp_path / "mel" / "x.png").symlink_to(tmp_path / "gone" / "x.png")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'mel' / 'x.png'}: a link to {tmp_path / 'gone'}")):
        load_dataset(tmp_path, size=8)


def test_an_empty_image_file_is_said_to_be_empty(tmp_path):
    """A 0-byte image file (an interrupted download) was 'not a readable image (cannot identify image file PATH)',
    its path twice and its emptiness unsaid."""
    for c in ("mel", "nv"):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{i}.png", (8, 8), 10 * i)
    (tmp_path / "mel" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'mel' / 'empty.jpg'}: an empty file (0 bytes), no "
                                                  "image (an interrupted download or copy?); copy it again or "
                                                  "remove it") + "$"):
        load_dataset(tmp_path, size=8)


def _assert_csv_reads_each_of_20_images(tmp_path, ids):
    """meta.csv of ``ids`` (classes mel and nv in turn) reads each of the 20 images, the i-th of value 8 * i, once."""
    rows = [f"{image_id},{'mel' if i % 2 else 'nv'}" for i, image_id in enumerate(ids)]
    (tmp_path / "meta.csv").write_text("image_id,dx\n" + "\n".join(rows) + "\n", encoding="utf-8")
    s = load_dataset(tmp_path / "meta.csv", size=8)
    assert s.info.extra["class_counts"] == {"mel": 10, "nv": 10}
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    assert sorted(round(float(v) * 255) for v in x[:, 0, 4, 4]) == [8 * i for i in range(20)]


def test_csv_ids_match_files_named_in_the_other_unicode_form(tmp_path):
    """CSV ids typed composed (NFC, 'lésion 0') name the files macOS's zip wrote decomposed (NFD): as a name with
    or without its extension, or a path relative to the CSV's folder; they were 'listed but not found'."""
    import unicodedata

    (tmp_path / "imgs").mkdir()
    ids = []
    for i in range(20):
        name = f"l\u00e9sion {i}"
        _png(tmp_path / "imgs" / f"{unicodedata.normalize('NFD', name)}.jpg", (8, 8), 8 * i, mode="RGB")
        ids.append([name, f"{name}.jpg", f"imgs/{name}.jpg", f"imgs/{name}"][i % 4])
    _assert_csv_reads_each_of_20_images(tmp_path, ids)


def test_csv_ids_match_folders_named_in_the_other_unicode_form(tmp_path):
    """CSV ids typed composed ('lésions/0.png', 'derm/lésions/1') name the files in folders macOS's zip named
    decomposed (NFD): they were '20 image(s) listed but not found', the file names alone compared composed. The
    ids are kept as written."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "l\u00e9sions")
    for folder in (tmp_path / nfd, tmp_path / "derm" / nfd):
        folder.mkdir(parents=True)
    ids = []
    for i in range(20):
        folder = (tmp_path / nfd) if i % 2 else (tmp_path / "derm" / nfd)
        _png(folder / unicodedata.normalize("NFD", f"\u00e9 {i}.png"), (8, 8), 8 * i)
        ids.append(("l\u00e9sions" if i % 2 else "derm/l\u00e9sions") + f"/\u00e9 {i}" + (".png" if i % 4 < 2 else ""))
    _assert_csv_reads_each_of_20_images(tmp_path, ids)


def test_csv_header_spaces_suffix_case_seed_and_class_count(tmp_path):
    path = _ham(tmp_path, ["mel", "nv"] * 10)
    path.write_text(path.read_text().replace("image_id,dx", "image_id, dx"))  # "dx" after a space still matches
    (tmp_path / "imgs" / "im0.jpg").rename(tmp_path / "imgs" / "im0.JPG")
    s = load_dataset(path, size=8)
    assert s.info.class_names == ("mel", "nv") and sum(len(part) for part in (s.train, s.val, s.test)) == 20
    assert s.info.positive_class == 0  # mel (melanoma) is the positive class wherever it stands
    other = load_dataset(path, size=8, seed=1)
    assert not torch.equal(s.train.tensors[0], other.train.tensors[0])
    (tmp_path / "one.csv").write_text("image_id,dx\nim0,mel\nim1,mel\n")
    with pytest.raises(DataError, match=r"one\.csv: expected at least two classes in column 'dx', got \['mel'\]"):
        load_dataset(tmp_path / "one.csv", size=8)
    (tmp_path / "none.csv").write_text("image_id,dx\n")
    with pytest.raises(DataError, match=r"none\.csv: no rows"):
        load_dataset(tmp_path / "none.csv", size=8)
    jpeg = (tmp_path / "imgs" / "im1.jpg").read_bytes()
    (tmp_path / "imgs" / "im1.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated: Pillow raises OSError
    with pytest.raises(DataError, match=r"im1\.jpg: not a readable image"):
        load_dataset(path, size=8)


@pytest.mark.parametrize("dtype, lo, hi, needle, fix", [
    ("int8", -128, 127, "0-255 pixels read as signed bytes? images.view(np.uint8) reads them back",
     lambda a: a.view(np.uint8)),
    ("int16", -3, 3, "normalized by a mean and std, then stored as integers (7 levels left)? store the [0, 1] pixels "
     "from before the normalization", None),
    ("int32", -100, 40000, "signed intensities (an offset or a mean subtracted)? store them as floats in [0, 1], "
     "(images.astype(np.float32) - lo) / (hi - lo)", lambda a: (a.astype(np.float32) + 100) / 40100),
    ("uint32", 0, 100000, "17-bit intensities? store them as floats in [0, 1], images.astype(np.float32) / 131071",
     lambda a: a.astype(np.float32) / 131071),
    # told "/ 65535", which kept them in [0.48, 0.55] (found by the data6 helper)
    ("uint16", 31744, 35839, "12-bit intensities with an offset added (as MATLAB's im2uint16 adds 32768 to signed CT "
     "Hounsfield units)? store them as floats in [0, 1], (images.astype(np.float32) - lo) / (hi - lo)",
     lambda a: (a.astype(np.float32) - 31744) / 4095)],
    ids=["int8", "int16_z_scores", "int32_signed", "uint32_17_bits", "uint16_ct_offset"])
def test_npz_integer_images_are_told_a_fix_that_keeps_their_values(tmp_path, dtype, lo, hi, needle, fix):
    """int8 images, small signed integers, int32 with negatives and uint32 past 65535 were all told "convert them to
    uint8 (0-255) or to floats in [0, 1]", which wraps their negatives and values past 255; each is now told the
    conversion that keeps them, and that conversion loads (found by the data2 helper)."""
    images = {f"{s}_images": np.linspace(lo, hi, k * 64).round().astype(dtype).reshape(k, 8, 8)
              for s, k in (("train", 12), ("val", 4), ("test", 6))}
    with pytest.raises(DataError) as info:
        load_dataset(write_npz(tmp_path / "i.npz", shape=(8, 8), **images))
    assert f"got dtype {dtype} with values in [{lo}, {hi}]; {needle}" in str(info.value), str(info.value)
    if fix is not None:
        s = load_dataset(write_npz(tmp_path / "f.npz", shape=(8, 8), **{k: fix(v) for k, v in images.items()}))
        x = s.train.tensors[0]
        assert float(x.min()) == 0 or dtype == "int8"
        assert len(torch.unique(x)) == len(np.unique(images["train_images"]))  # no two values merged


def test_npz_16_bit_images_in_a_narrow_band_beside_a_zero_padding_are_told_the_band(tmp_path):
    """uint16 CT at +32768 ([31744, 35839]) with a zero padding was told "16-bit intensities? ... / 65535", which
    keeps the band in [0.48, 0.55] (the narrow band's rule read the whole range, [0, 35839]); it is told the band,
    whose clipped shift loads with the padding at 0 (found by the fix2 helper)."""
    rng = np.random.default_rng(5)
    images = {f"{s}_images": rng.integers(31744, 35840, (k, 8, 8)).astype(np.uint16)
              for s, k in (("train", 12), ("val", 4), ("test", 6))}
    for a in images.values():
        a[0, 4, :2] = 31744, 35839
        a[:, :2] = 0
    with pytest.raises(DataError, match=r"got dtype uint16 with values in \[0, 35839\]; 12-bit intensities with an "
                                        r"offset added \(.*\), all but a padding of 0 in \[31744, 35839\]\? store them "
                                        r"as floats in \[0, 1\], np\.clip\(\(images\.astype\(np\.float32\) - lo\) / "
                                        r"\(hi - lo\), 0, 1\), lo and hi the lowest value above 0 and the highest of "
                                        r"every split together$"):
        load_dataset(write_npz(tmp_path / "p.npz", shape=(8, 8), **images))
    fixed = {k: np.clip((v.astype(np.float32) - 31744) / 4095, 0, 1) for k, v in images.items()}
    x = load_dataset(write_npz(tmp_path / "f.npz", shape=(8, 8), **fixed)).train.tensors[0]
    assert (float(x.min()), float(x.max())) == (0.0, 1.0) and len(torch.unique(x)) > 32


def test_npz_complex_images_are_told_to_store_their_magnitude(tmp_path):
    """Complex images (an MRI export's complex64) were told "convert them to uint8 (0-255) or to floats in [0, 1]",
    whose astype(np.float32) keeps the real part alone, signed, with numpy's ComplexWarning; they are told to store
    the magnitude, scaled on one top for every split, and that loads (found by the data6 helper)."""
    rng = np.random.default_rng(3)
    images = {f"{s}_images": (rng.normal(size=(k, 8, 8)) + 1j * rng.normal(size=(k, 8, 8))).astype(np.complex64)
              for s, k in (("train", 12), ("val", 4), ("test", 6))}
    with pytest.raises(DataError, match=r"i\.npz \[train\]: expected uint8 or float images, got dtype complex64; "
                                        r"complex values \(MRI data\)\? store their magnitude as floats in \[0, 1\], "
                                        r"np\.abs\(images\)\.astype\(np\.float32\) / top, top the largest magnitude "
                                        r"of every split together \(k-space reconstructed into images first\)$"):
        load_dataset(write_npz(tmp_path / "i.npz", shape=(8, 8), **images))
    top = max(float(np.abs(v).max()) for v in images.values())
    s = load_dataset(write_npz(tmp_path / "f.npz", shape=(8, 8), **{k: np.abs(v).astype(np.float32) / top
                                                                    for k, v in images.items()}))
    assert float(s.train.tensors[0].min()) >= 0 and float(s.test.tensors[0].max()) <= 1


def test_integer_images_up_to_10_either_side_of_0_are_told_of_a_rounded_normalization(tmp_path):
    """_integer_images_fix's z-score rule reaches |value| 10 (mutation testing of e2ca6cc, mut54 helper: < 10 survived
    the tests' [-3, 3]); one past it is told of signed intensities."""
    def refusal(lo, hi):
        images = {f"{s}_images": np.linspace(lo, hi, k * 64).round().astype(np.int16).reshape(k, 8, 8)
                  for s, k in (("train", 12), ("val", 4), ("test", 6))}
        with pytest.raises(DataError) as info:
            load_dataset(write_npz(tmp_path / "z.npz", shape=(8, 8), **images))
        return str(info.value)

    assert "normalized by a mean and std, then stored as integers (21 levels left)?" in refusal(-10, 10)
    assert "signed intensities (an offset or a mean subtracted)?" in refusal(-11, 10)


@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_signed_images_without_air_are_told_the_shift_beside_the_hounsfield_window(tmp_path, dtype):
    """Values in [-600, 600] are taken for CT Hounsfield units (a bottom at -500 or below), as a crop inside the body
    is, but 16-bit data with its mean subtracted holds them too, and the window named (-160, 240) would clip it; a set
    without air (-1000, around every CT slice's body) is now told the shift onto [0, 1] as well; one reaching air
    only the window, as before (found by the data2 helper)."""
    def refusal(lo, hi):
        images = {f"{s}_images": np.linspace(lo, hi, k * 64).astype(dtype).reshape(k, 8, 8)
                  for s, k in (("train", 12), ("val", 4), ("test", 6))}
        with pytest.raises(DataError, match=r"CT Hounsfield units\? window them onto \[0, 1\] pixels") as info:
            load_dataset(write_npz(tmp_path / "h.npz", shape=(8, 8), **images))
        return str(info.value)

    shift = ("; else (an offset or a mean subtracted) (images.astype(np.float32) - lo) / (hi - lo), lo and hi the "
             "lowest and highest value of every split together")
    assert shift in refusal(-600, 600)
    assert "mean subtracted" not in refusal(-1024, 3071)


@pytest.mark.parametrize("top, step, bits, dark", [(4095, 100, 12, 16), (16383, 1000, 14, 64), (1023, 30, 10, 4)])
def test_12_bit_data_in_16_bit_files_is_said(tmp_path, top, step, bits, dark):
    """CT / X-ray PNGs often hold 12-bit values (0..4095) in 16-bit files: scaled from 65535 they come out 16 times
    darker -- loaded as they are, but said, with how to fix it; a set reaching above 16383 (14 bits) is 16-bit data,
    silently. 14-bit X-ray PNGs (digital radiography's detectors store 14 bits) loaded silently at most 64 of 255, in
    65 grey levels, until the warning named the bit depth their top needs, as it does for 13 bits (found by the
    persona helper). 10-bit PNGs (1023) were told bit_depth=12, which still read them 4 times dark: the bit depth
    named is the fewest holding the top (found by the data2 helper)."""
    from PIL import Image

    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(np.full((8, 8), top - step * i, np.uint16)).save(tmp_path / c / f"{i}.png")
    with pytest.warns(UserWarning, match=rf"every 16-bit image holds values <= {top} only \({bits}-bit data\?\); "
                                         rf"scaled from the full 16-bit range they come out dark \(at most {dark} of "
                                         rf"255\) -- pass bit_depth={bits} \(--bit-depth {bits}\) to scale {top} to "
                                         r"255$"):
        s = load_dataset(tmp_path, size=8)
    assert float(s.train.tensors[0].max()) == pytest.approx(dark / 255)  # loaded as before: the warning changes nothing
    assert "bit_depth" not in s.info.extra
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = load_dataset(tmp_path, size=8, bit_depth=bits)  # what the warning says: read on the full 8-bit scale
    assert float(torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]]).max()) == 1.0
    Image.fromarray(np.full((8, 8), top + 1, np.uint16)).save(tmp_path / "benign" / "9.png")  # one bit more
    if bits < 14:
        with pytest.warns(UserWarning, match=rf"\({bits + 1}-bit data\?\); .* -- pass bit_depth={bits + 1} "):
            load_dataset(tmp_path, size=8)
    Image.fromarray(np.full((8, 8), 16384, np.uint16)).save(tmp_path / "benign" / "9.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(tmp_path, size=8)


def test_16_bit_data_in_a_narrow_band_far_from_0_is_said(tmp_path):
    """CT slices in Hounsfield units saved as 16-bit PNGs with MATLAB's im2uint16 (which adds 32768 to int16) hold
    [31744, 35839]: scaled from 65535 they loaded in 16 grey levels of 4096 without a word, too bright for the dark
    set's warning (found by the data6 helper). Said, with the offset and bit depth that keep them, which load."""
    from PIL import Image

    rng = np.random.default_rng(4)
    for c in ("normal", "nodule"):
        (tmp_path / "ct" / c).mkdir(parents=True)
        for i in range(10):
            hu = rng.integers(-1024, 3072, (8, 8))
            hu[0, 0], hu[0, 1] = -1024, 3071  # air and the 12-bit top in each slice: the set's span is known
            Image.fromarray((hu + 32768).astype(np.uint16)).save(tmp_path / "ct" / c / f"{i}.png")
    with pytest.warns(UserWarning, match=r"ct: every 16-bit image holds values in \[31744, 35839\] only, an offset "
                                         r"added to them, as MATLAB's im2uint16 adds 32768 to signed CT Hounsfield "
                                         r"units \(12-bit data\?\); scaled from the full 16-bit range they keep 16 of "
                                         r"256 grey levels -- save them with the offset subtracted, np\.clip\(image\."
                                         r"astype\(np\.int32\) - 31744, 0, 4095\)\.astype\(np\.uint16\) with one "
                                         r"offset for every image, read with bit_depth=12 \(--bit-depth 12\)$"):
        s = load_dataset(tmp_path / "ct", size=8)
    assert len(torch.unique(s.train.tensors[0])) <= 16  # loaded as before: the warning changes nothing
    for p in (tmp_path / "ct").rglob("*.png"):  # what it says
        image = np.asarray(Image.open(p))
        Image.fromarray(np.clip(image.astype(np.int32) - 31744, 0, 4095).astype(np.uint16)).save(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = load_dataset(tmp_path / "ct", size=8, bit_depth=12)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    assert (float(x.min()), float(x.max())) == (0.0, 1.0) and len(torch.unique(x)) > 200


def test_16_bit_data_in_a_narrow_band_beside_a_zero_padding_is_said(tmp_path):
    """The narrow band's warning read the whole range: CT at +32768 ([31744, 35839]) with a zero padding (a rotation's
    or resampling's fill) spanned [0, 35839] and loaded in 16 of 256 grey levels without a word (found by the fix2
    helper). Said, naming the band; 16-bit masks of 0 and 65535 and padded 16-bit data using its range are not."""
    from PIL import Image

    rng = np.random.default_rng(4)
    sets = {"ct": lambda: np.clip(rng.integers(-1024, 3072, (8, 8)), -1024, 3071) + 32768,
            "mask": lambda: rng.integers(0, 2, (8, 8)) * 65535, "full": lambda: rng.integers(1, 65536, (8, 8))}
    for name, make in sets.items():
        for c in ("normal", "nodule"):
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(10):
                image = make()
                if name == "ct":
                    image[4, 0], image[4, 1] = 31744, 35839
                image[:2] = 0  # the padding
                Image.fromarray(image.astype(np.uint16)).save(tmp_path / name / c / f"{i}.png")
    with pytest.warns(UserWarning, match=r"ct: every 16-bit image holds values in \[31744, 35839\] and 0 \(a padding\?"
                                         r"\) only, an offset added to them, .*; scaled from the full 16-bit range "
                                         r"they keep 16 of 256 grey levels -- save them with the offset subtracted, "
                                         r"np\.clip"
                                         r"\(image\.astype\(np\.int32\) - 31744, 0, 4095\)\.astype\(np\.uint16\)"):
        load_dataset(tmp_path / "ct", size=8)
    for name in ("mask", "full"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_dataset(tmp_path / name, size=8)


@pytest.mark.parametrize("value", [40000, 1000])
def test_16_bit_images_of_one_value_are_said_to_be_constant_not_told_an_offset_or_bit_depth(tmp_path, value):
    """A 16-bit set whose every pixel held 40000 was told the narrow band's "save them with the offset subtracted,
    np.clip(image.astype(np.int32) - 40000, 0, 255)", which makes them black, and one of 1000 the dark set's
    bit_depth=10, which leaves them one grey; the same values in an .npz were told "(images.astype(np.float32) - lo) /
    (hi - lo)", a division by zero. Each is said to be constant images (found by the fix2 helper)."""
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "s" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8), value, np.uint16)).save(tmp_path / "s" / c / f"{i}.png")
    with pytest.warns(UserWarning, match=rf"s: every 16-bit image holds the one value {value} only \(blank or constant "
                                         r"images\?\); no bit depth or offset gives them contrast -- check how the "
                                         r"images were exported$") as caught:
        load_dataset(tmp_path / "s", size=8)
    assert len(caught) == 1, [str(w.message) for w in caught]
    images = {f"{s}_images": np.full((k, 8, 8), value, np.uint16) for s, k in (("train", 12), ("val", 4), ("test", 6))}
    with pytest.raises(DataError, match=rf"i\.npz \[train\]: expected uint8 or float images, got dtype uint16 with "
                                        rf"values in \[{value}, {value}\]; every image holds the one value {value} "
                                        r"\(blank or constant images\?\): check how they were exported$"):
        load_dataset(write_npz(tmp_path / "i.npz", shape=(8, 8), **images))


def test_bit_depth_scales_16_bit_files_by_the_bits_they_hold(tmp_path):
    """bit_depth=12 reads 12-bit data in 16-bit files on its own scale (4095 -> 255, no warning), refuses a value
    above it naming the file, and is recorded in the dataset's info; bit_depth=8 reads 8-bit values saved in 16 bits
    (refused without it); 8-bit files are read as they are whatever the bit depth."""
    from PIL import Image

    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(np.full((8, 8), 4095 - 100 * i, np.uint16)).save(tmp_path / c / f"{i}.png")
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "benign" / "eight.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = load_dataset(tmp_path, size=8, bit_depth=12)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    expected = sorted({round((4095 - 100 * i) * 255 / 4095) for i in range(10)} | {77})
    assert sorted({round(float(v) * 255) for v in x[:, 0, 4, 4]}) == expected and float(x.max()) == 1.0
    assert s.info.extra["bit_depth"] == 12
    Image.fromarray(np.full((8, 8), 4096, np.uint16)).save(tmp_path / "malignant" / "over.png")
    with pytest.raises(DataError, match=r"over\.png: holds the value 4096, above the 12-bit maximum 4095 "
                                        r"\(bit_depth=12\); give the bit depth the images were saved with$") as info:
        load_dataset(tmp_path, size=8, bit_depth=12)
    assert info.value.arg == "bit_depth"
    s = load_dataset(tmp_path, size=8, bit_depth=13)  # 4096 fits 13 bits: 8191 -> 255
    assert float(torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]]).max()) == pytest.approx(
        round(4096 * 255 / 8191) / 255)

    eight = tmp_path / "eight_in_16"
    for c in ("benign", "malignant"):
        (eight / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((8, 8), 200 + i, np.uint16)).save(eight / c / f"{i}.png")
    with pytest.raises(DataError, match=r"save them as 8-bit images or pass bit_depth=8$") as info:
        load_dataset(eight, size=8)
    assert info.value.arg == "bit_depth"
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(eight, size=8, bit_depth=8)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    assert sorted({round(float(v) * 255) for v in x.flatten()}) == [200, 201, 202, 203, 204]  # as the values say


def test_bit_depth_refusing_a_few_bright_pixels_says_to_clip_them(tmp_path):
    """One metal pixel above 4095 in a 12-bit CT set: the refusal of bit_depth=12 says to clip the few pixels above
    (a deeper bit depth would darken every image of the set); many pixels above keep the bit-depth advice alone."""
    from PIL import Image

    for c in ("normal", "nodule"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((16, 16), 1000 + 500 * i, np.uint16)).save(tmp_path / c / f"{i}.png")
    metal = np.full((16, 16), 2000, np.uint16)
    metal[3, 3] = 6000
    Image.fromarray(metal).save(tmp_path / "nodule" / "metal.png")
    with pytest.raises(DataError, match=r"metal\.png: holds the value 6000, above the 12-bit maximum 4095 "
                                        r"\(bit_depth=12\) in 1 pixel of its 256: a few bright outliers \(metal in a "
                                        r"CT slice\)\? clip them, np\.clip\(image, 0, 4095\), in every image of the "
                                        r"set \(a deeper bit depth would darken the rest\); else give the bit depth "
                                        r"the images were saved with$") as info:
        load_dataset(tmp_path, size=8, bit_depth=12)
    assert info.value.arg == "bit_depth"
    metal[:4, :4] = 6000  # 16 of 256 pixels: data deeper than 12 bits
    Image.fromarray(metal).save(tmp_path / "nodule" / "metal.png")
    with pytest.raises(DataError, match=r"metal\.png: holds the value 6000, above the 12-bit maximum 4095 "
                                        r"\(bit_depth=12\); give the bit depth the images were saved with$"):
        load_dataset(tmp_path, size=8, bit_depth=12)


def test_bit_depth_reaches_csv_sets_and_is_refused_where_it_means_nothing(tmp_path):
    from PIL import Image

    path = _ham(tmp_path, ["mel", "nv"] * 5)
    for image in sorted((tmp_path / "imgs").iterdir()):
        image.unlink()
        Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(image.with_suffix(".png"))
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(path, size=8, bit_depth=10)  # 1023 -> 255
    assert float(s.train.tensors[0].max()) == pytest.approx(round(1000 * 255 / 1023) / 255)
    assert s.info.extra["bit_depth"] == 10
    for bad in (7, 17, True, 12.0, "12"):
        with pytest.raises(DataError, match=r"load_csv\(.*\): expected bit_depth to be an integer") as info:
            load_dataset(path, size=8, bit_depth=bad)
        assert info.value.arg == "bit_depth"
    for spec in ("synthetic", "moons", tmp_path / "x.npz", "breastmnist"):
        with pytest.raises(DataError, match=r": bit_depth= scales 16-bit image files \(class folders and CSV\); "
                                            r"this source has none -- drop bit_depth=$") as info:
            load_dataset(spec, bit_depth=12)
        assert info.value.arg == "bit_depth"
    # a set of 8-bit files only: bit_depth changed nothing, silently, while run.json recorded it as their scale
    (tmp_path / "eight").mkdir()
    eight = _ham(tmp_path / "eight", ["mel", "nv"] * 5)
    with pytest.warns(UserWarning) as caught:
        s = load_dataset(eight, size=8, bit_depth=12)
    assert [str(w.message) for w in caught if "bit_depth=12" in str(w.message)] == [
        f"{eight}: bit_depth=12 scales 16-bit image files, and none of these images is one (8-bit files "
        "are read as they are): it changes nothing -- drop bit_depth= (--bit-depth)"]
    with pytest.warns(UserWarning, match="too small to stratify"):
        plain = load_dataset(eight, size=8)
    assert torch.equal(s.train.tensors[0], plain.train.tensors[0])


@pytest.mark.parametrize("option", [{"classes": ["benign", "malignant"]}, {"bit_depth": 12}, {"root": "."},
                                    {"split_by": "image"}])
def test_a_mistyped_folder_is_missing_not_a_source_without_the_option(tmp_path, option):
    # a folder path with a typo was told "this source has fixed classes" / "drop bit_depth=": it may be a folder,
    # which takes them, and dropping them as told ended in "no such file or folder"
    with pytest.raises(DataError, match=r"busi_typo: no such file or folder, and not a known dataset name"):
        load_dataset(str(tmp_path / "busi_typo"), **option)


def test_busi_16_bit_dark_and_float_images(tmp_path):
    """A 16-bit image is on the 16-bit scale even when all its values are <= 255 (when another image of the set uses
    the 16-bit range; a set whose 16-bit images all would come out black is refused); float images above 255 are
    refused (their scale is unknown)."""
    from PIL import Image

    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8), 200, np.uint16)).save(tmp_path / c / f"{i}.png")
    with pytest.raises(DataError, match=r"every 16-bit image holds values <= 200 only .*save them as 8-bit images"):
        load_dataset(tmp_path, size=8)
    Image.fromarray(np.full((8, 8), 60000, np.uint16)).save(tmp_path / "benign" / "bright.png")
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(tmp_path, size=8)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    assert sorted({round(float(v) * 255) for v in x.flatten()}) == [1, 233]  # 200 / 257 -> 1, not 200
    (tmp_path / "benign" / "bright.png").unlink()
    Image.fromarray(np.full((8, 8), 300.0, np.float32)).save(tmp_path / "benign" / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: F image with values in \[300, 300\]; expected 8- or 16-bit"):
        load_dataset(tmp_path, size=8)


def test_busi_signed_ct_slices_in_hounsfield_units_are_told_to_save_them_shifted(tmp_path):
    """A signed 16-bit TIFF of a CT slice in Hounsfield units ([-1024, 3071], Pillow's mode I) was told "save it as
    an 8- or 16-bit image", as which its negatives wrap; the shift the error names reads at bit_depth=12 (found by the
    persona helper)."""
    from PIL import Image

    hounsfield = np.linspace(-1024, 3071, 64).astype(np.int16).reshape(8, 8)
    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(hounsfield).save(tmp_path / c / f"{i}.tif")
    with pytest.raises(DataError, match=r"0\.tif: I image with values in \[-1024, 3071\]; CT Hounsfield units\? "
                                        r"expected 8- or 16-bit intensities, which are never negative -- save them "
                                        r"shifted as 16-bit, np\.clip\(hu \+ 1024, 0, 4095\)\.astype\(np\.uint16\), "
                                        r"read with bit_depth=12 \(--bit-depth 12\), or windowed onto 0-255 as 8-bit$"):
        load_dataset(tmp_path, size=8)
    for c in ("benign", "malignant"):
        for i in range(5):
            Image.fromarray(np.clip(hounsfield + 1024, 0, 4095).astype(np.uint16)).save(tmp_path / c / f"{i}.tif")
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(tmp_path, size=8, bit_depth=12)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # air black, the top of the scale white
    for c in ("benign", "malignant"):  # small negatives are no Hounsfield units: the message as before (mutation
        # testing: every negative image told of CT survived) (found by the mutB helper)
        for i in range(5):
            Image.fromarray(np.linspace(-5, 250, 64).astype(np.int32).reshape(8, 8)).save(tmp_path / c / f"{i}.tif")
    with pytest.raises(DataError, match=r"0\.tif: I image with values in \[-5, 250\]; expected 8- or 16-bit "
                                        r"intensities -- save it as an 8- or 16-bit image$"):
        load_dataset(tmp_path, size=8)
    # 17-bit values in a 32-bit TIFF were told to save it as 16-bit without how to scale it (found by the data3
    # helper); as told, it loads
    for convert in (None, lambda a: (a >> 1).astype(np.uint16)):
        for c in ("benign", "malignant"):
            for i in range(5):
                image = np.linspace(0, 70000, 64).astype(np.int32).reshape(8, 8)
                Image.fromarray(convert(image) if convert else image).save(tmp_path / c / f"{i}.tif")
        if convert is None:
            with pytest.raises(DataError, match=r"0\.tif: I image with values in \[0, 70000\]; expected 8- or 16-bit "
                                                r"intensities -- save it as 16-bit, its 17-bit values shifted down, "
                                                r"\(image >> 1\)\.astype\(np\.uint16\), or scaled, np\.round\(image / "
                                                r"131071 \* 65535\)\.astype\(np\.uint16\), every image of the set on "
                                                r"one scale \(the bit depth of its largest value\)$"):
                load_dataset(tmp_path, size=8)
    with pytest.warns(UserWarning, match="too small to stratify"):
        assert float(load_dataset(tmp_path, size=8).train.tensors[0].max()) == pytest.approx(35000 / 65535, abs=1e-2)


def test_busi_float_images_in_0_1_are_refused_not_read_black(tmp_path):
    """Pillow's convert("L") truncates float (mode F) pixels: a float TIFF in [0, 1] came out all black."""
    from PIL import Image

    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8), 90.0 + i, np.float32)).save(tmp_path / c / f"{i}.tif")
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(tmp_path, size=8)  # whole numbers in [0, 255]: 8-bit values in a float file, as they are
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    assert sorted({round(float(v) * 255) for v in x.flatten()}) == [90, 91, 92, 93, 94]
    Image.fromarray(np.full((8, 8), 0.75, np.float32)).save(tmp_path / "benign" / "0.tif")
    with pytest.raises(DataError, match=r"0\.tif: F \(32-bit float\) image with fractional values in \[0\.75, 0\.75\]; "
                                        r"expected 8- or 16-bit intensities \(values in \[0, 1\] would come out "
                                        r"black\) -- save it as an 8- or 16-bit image$"):
        load_dataset(tmp_path, size=8)


def _png_16_bit_colour(path, rgb):
    """A 48-bit PNG (16 bits per channel): Pillow writes none, so the chunks are written here."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_busi_16_bit_colour_images_get_the_16_bit_checks(tmp_path):
    """Pillow reads a 48-bit PNG as 8-bit RGB (the top 8 bits): bit_depth=12 was ignored without a word (4095 -> 15)
    and neither the dark (12-bit) warning nor the black (8-bit values) refusal happened. Their fixes named
    bit_depth=12 and bit_depth=8, each refused for such images (found by the persona helper)."""
    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(10):  # 10 a class: a stratified split, no warning beside the 16-bit one
            rgb = np.zeros((8, 8, 3), np.uint16)
            rgb[..., 0] = 4000 + i
            _png_16_bit_colour(tmp_path / c / f"{i}.png", rgb)
    with pytest.raises(DataError, match=r"0\.png: a 16-bit colour \(or grey \+ alpha\) image; Pillow reads only "
                                        r"the top 8 bits of each channel, so bit_depth=12 cannot scale it") as info:
        load_dataset(tmp_path, size=8, bit_depth=12)
    assert info.value.arg == "bit_depth"
    colour = (r"save them as 16-bit grayscale or 8-bit colour images \(Pillow reads the top 8 bits of a 16-bit colour "
              r"image's channels: no bit_depth= scales them\)$")
    with pytest.warns(UserWarning, match=r"every 16-bit image holds values <= 4095 only \(12-bit data\?\); .* of 255\) "
                                         r"-- " + colour):
        s = load_dataset(tmp_path, size=8)
    assert s.info.in_channels == 3 and round(float(s.train.tensors[0].max()) * 255) == 4000 // 256
    for c in ("benign", "malignant"):
        for i in range(10):
            _png_16_bit_colour(tmp_path / c / f"{i}.png", np.full((8, 8, 3), 200, np.uint16))
    with pytest.raises(DataError, match=r"every 16-bit image holds values <= 255 only .* black -- " + colour) as info:
        load_dataset(tmp_path, size=8)
    assert info.value.arg is None  # no --bit-depth named on the command line
    with pytest.raises(DataError, match=r"so bit_depth=8 cannot scale it"):  # what the fix named before
        load_dataset(tmp_path, size=8, bit_depth=8)


def test_busi_image_above_pillows_size_limit_is_a_data_error(tmp_path):
    """Pillow's DecompressionBombError is no OSError: a huge image gave a PIL traceback, not a DataError."""
    import struct
    import zlib

    root = _class_folders(tmp_path / "d")

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 4e8 pixels: twice Pillow's limit; no pixel data
    (root / "benign" / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                              + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match=r"benign/big\.png: too large to read \(Image size \(400000000 pixels\) "
                                        r"exceeds limit .*\); downscale it$"):
        load_dataset(root, size=8)


def test_synthetic_sizes_and_small_arguments():
    from robust_ops.data import synthetic_splits

    s = synthetic_splits(size=12, seed=0, sizes={"train": 3, "val": 2, "test": 0})
    assert [len(s.train), len(s.val), len(s.test)] == [3, 2, 0] and s.train.tensors[0].shape == (3, 1, 12, 12)
    assert s.info.image_size == 12
    with pytest.raises(DataError, match="synthetic: expected size >= 8, got size=7") as info:
        synthetic_ultrasound(1, size=7)
    assert info.value.arg == "size"
    with pytest.raises(DataError, match=r"^synthetic: expected n >= 0, got n=-1$") as info:
        synthetic_ultrasound(-1)
    assert info.value.arg is None  # n is no argument of load_dataset: the CLI must not name --size
    for bad in (1.5, -0.1, float("nan")):  # a fraction outside [0, 1] made every image one class
        with pytest.raises(DataError, match=rf"^synthetic: expected 0 <= malignant_fraction <= 1, got {bad}$"):
            synthetic_ultrasound(4, malignant_fraction=bad)
    assert synthetic_ultrasound(4, malignant_fraction=1)[1].tolist() == [1, 1, 1, 1]


def test_moons_streams_noise_and_range():
    from robust_ops.data.synthetic import moons_splits

    s = moons_splits(seed=0, n_train=30, n_val=20, n_test=40)
    assert [len(s.train), len(s.val), len(s.test)] == [30, 20, 40] and s.info.positive_class == 1
    same_sizes = moons_splits(seed=0, n_train=30, n_val=20, n_test=20)
    assert not torch.equal(same_sizes.val.tensors[0], same_sizes.test.tensors[0])  # independent streams per split
    assert not torch.equal(s.train.tensors[0], moons_splits(seed=1, n_train=30).train.tensors[0])
    exact = moons_splits(seed=0, n_train=30, noise=0.0).train  # noise 0: the upper moon lies on the unit circle
    x, y = exact.tensors
    torch.testing.assert_close(x[y == 0].norm(dim=1), torch.ones(int((y == 0).sum())))
    with pytest.raises(DataError, match=r"moons: a point fell outside \(-4\.0, 4\.0\); lower the noise"):
        moons_splits(noise=5.0, n_train=200)


def _class_folders(root, classes=("benign", "malignant"), n=5, size=(8, 8), mode="L"):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _png(root / c / f"{i}.png", size, 7 * i + 40, mode=mode)
    return root


def test_busi_images_it_would_not_read_are_errors(tmp_path):
    """A .gif beside the PNGs, or a patient subfolder, must not make a class silently smaller."""
    from PIL import Image

    root = _class_folders(tmp_path / "d")
    Image.new("L", (8, 8), 90).save(root / "benign" / "extra.gif")
    with pytest.raises(DataError, match=r"benign/extra\.gif: \.gif files are not read \(expected \.png, .*\); "
                                        r"convert it"):
        load_dataset(root, size=8)
    (root / "benign" / "extra.gif").unlink()
    (root / "benign" / "patient7").mkdir()
    _png(root / "benign" / "patient7" / "p.png", (8, 8), 90)
    with pytest.raises(DataError, match=r"benign/patient7: a subfolder holding images; only the images directly in"):
        load_dataset(root, size=8)


def test_busi_folders_of_a_split_made_beforehand_are_named_as_such(tmp_path):
    """Train/<class>/ and Test/<class>/ (Kaggle's ISIC sets) were read as classes "test" and "train" whose class
    folders were 'a subfolder holding images ... move them up', which would make one class of each split."""
    root = tmp_path / "isic"
    _class_folders(root / "Train", ("melanoma", "nevus"))
    _class_folders(root / "Test", ("melanoma", "nevus"))
    with pytest.raises(DataError, match=r"isic: its folders Test, Train look like a train/val/test split, each holding "
                                        r"class folders \(melanoma, nevus in Test\); .* one folder per class "
                                        r"\(.*isic/<class>/\)"):
        load_dataset(root, size=8)
    # the class folders listed are those of the split folder named
    _class_folders(tmp_path / "isic2" / "Train", ("melanoma", "nevus"))
    _class_folders(tmp_path / "isic2" / "Test", ("melanoma",))
    with pytest.raises(DataError, match=r"isic2: its folders Test, Train .* \(melanoma in Test\)"):
        load_dataset(tmp_path / "isic2", size=8)
    # a lone Train/ is one folder given one level too high, told so after the two-class check
    _class_folders(tmp_path / "isic3" / "Train", ("melanoma", "nevus"))
    with pytest.raises(DataError, match=r"isic3: expected at least two class folders .* got \['train'\]; "
                                        r".*isic3/Train holds the folders melanoma, nevus: point the data path at "):
        load_dataset(tmp_path / "isic3", size=8)
    # so with the classes named: they were "class folder(s) melanoma, nevus not found (found: test, train)"
    with pytest.raises(DataError, match=r"isic: its folders Test, Train look like a train/val/test split"):
        load_dataset(root, size=8, classes=("melanoma", "nevus"))
    # a validation folder beside them is one of the split's too (mutation testing of f056d90: leaving val and
    # validation out of SPLIT_FOLDERS survived)
    for val in ("Val", "Validation"):
        _class_folders(tmp_path / f"isic_{val}" / "Train", ("melanoma", "nevus"))
        _class_folders(tmp_path / f"isic_{val}" / val, ("melanoma", "nevus"))
        with pytest.raises(DataError, match=rf"isic_{val}: its folders Train, {val} look like a train/val/test split"):
            load_dataset(tmp_path / f"isic_{val}", size=8)
    # a class folder that happens to be named so, holding its images directly, is a class as before
    _class_folders(tmp_path / "plain", ("test", "train"))
    _class_folders(tmp_path / "plain" / "test", (".thumbs",))  # a hidden folder of images inside it is no class
    with pytest.warns(UserWarning, match="too small to stratify"):
        assert load_dataset(tmp_path / "plain", size=8).info.class_names == ("test", "train")


def test_busi_colour_images_keep_their_colour(tmp_path):
    """Colour images are read as RGB; grayscale saved as RGB (BUSI's PNGs) stays one channel."""
    from PIL import Image

    grey = _class_folders(tmp_path / "grey", mode="RGB")
    with pytest.warns(UserWarning, match="too small to stratify"):
        assert load_dataset(grey, size=8).info.in_channels == 1
    colour = _class_folders(tmp_path / "colour")
    Image.fromarray(np.dstack([np.full((8, 8), v, np.uint8) for v in (200, 100, 0)])).save(colour / "benign" / "c.png")
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(colour, size=8)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    assert s.info.in_channels == 3 and x.shape[1] == 3
    assert any(torch.allclose(img[:, 4, 4], torch.tensor([200, 100, 0]) / 255) for img in x)


@pytest.mark.parametrize("classes, positive", [(("disease", "healthy"), "disease"),
                                               (("abnormal", "normal"), "abnormal"), (("tumour", "control"), "tumour"),
                                               (("0", "1"), "1"), (("COVID", "non-COVID"), "COVID"),
                                               (("no_tumor", "tumor"), "tumor"), (("glioma", "no glioma"), "glioma"),
                                               (("Pneumonia", "NonPneumonia"), "Pneumonia"),
                                               (("bcc", "nevus"), "bcc"), (("akiec", "bkl"), "akiec"),
                                               # every benign dermoscopy spelling, each sorting second (label 1)
                                               (("akiec", "nevi"), "akiec"), (("bcc", "naevus"), "bcc"),
                                               (("bcc", "naevi"), "bcc"),
                                               # names of several words, by their words, unless negated
                                               (("Basal Cell Carcinoma", "Benign Nevus"), "Basal Cell Carcinoma"),
                                               (("Malignant Melanoma", "Seborrheic Keratosis"), "Malignant Melanoma"),
                                               (("malignant lesion", "non-malignant lesion"), "malignant lesion"),
                                               # a name opening with a negation beside another finding's name
                                               # (NIH's "No Finding", a brain-MRI set's no_tumor, APTOS's No_DR),
                                               # and that set's newer spelling, notumor
                                               (("Effusion", "No Finding"), "Effusion"),
                                               (("glioma_tumor", "no_tumor"), "glioma_tumor"),
                                               (("glioma", "not glioma"), "glioma"),
                                               (("Mild", "No_DR"), "Mild"), (("glioma", "notumor"), "glioma"),
                                               # ... or ending with free, or opening with without
                                               (("Cancer-free", "Tumor"), "Tumor"),
                                               (("with cancer", "without cancer"), "with cancer"),
                                               (("tumor", "tumor_free"), "tumor"),
                                               (("Disease Free", "Pneumothorax"), "Pneumothorax"),
                                               # both names hit a positive word: the negative word tells them apart
                                               (("Cancer Negative", "Cancer Positive"), "Cancer Positive"),
                                               # no Latin letter or digit to read words from, or both names
                                               # negated: label 1, as any other pair no rule reads
                                               (("α", "β"), "β"), (("no tumor", "tumor-free"), "tumor-free")])
def test_binary_positive_class_without_a_malignant_name(tmp_path, classes, positive):
    """Label 1 alone would make "healthy" the positive class of disease/healthy, and "non-COVID" that of COVID /
    non-COVID (its sensitivity the recall of the negatives)."""
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(_class_folders(tmp_path, classes), size=8)
    assert s.info.class_names[s.info.positive_class] == positive.lower()  # folder names are read lower-cased


def test_binary_dermoscopy_csv_takes_the_lesion_beside_nevus_as_positive(tmp_path):
    """HAM10000's benign nv was the positive class of `--classes bcc,nv` (label 1): sensitivity was the recall of the
    nevi. The class beside a benign dermoscopy name (nv, nevus, bkl) is positive, in either order."""
    path = _ham(tmp_path, ["bcc", "nv", "bkl"] * 10)
    for classes, positive in ((("bcc", "nv"), "bcc"), (("nv", "bcc"), "bcc"), (("bcc", "bkl"), "bcc"),
                              (("nv", "mel"), "mel")):
        s = load_dataset(path, size=8, classes=classes) if "mel" not in classes else \
            load_dataset(_ham(tmp_path, ["mel", "nv"] * 10, name="mel.csv"), size=8, classes=classes)
        assert s.info.class_names[s.info.positive_class] == positive, classes


def test_csv_labels_in_two_cases_and_numeric_labels(tmp_path):
    path = _ham(tmp_path, ["mel", "nv", "Mel"] * 4)
    # with the lines they are first on, as the duplicate ids are (found by the data5 helper)
    with pytest.raises(DataError, match=r"meta\.csv: labels 'Mel' and 'mel' in column 'dx' differ only in case or "
                                        r"leading zeros \(first on lines 4 and 2\) and"):
        load_dataset(path, size=8)
    path = _ham(tmp_path, [str(i % 12) for i in range(24)], name="num.csv")
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(path, size=8)
    assert s.info.class_names == tuple(str(i) for i in range(12))  # "2" before "10": label k is class "k"
    # "01" beside "1" made two classes that sort alike (both 1)
    path = _ham(tmp_path, ["0", "1", "01"] * 4, name="zeros.csv")
    with pytest.raises(DataError, match=r"zeros\.csv: labels '01' and '1' in column 'dx' differ only in case or "
                                        r"leading zeros"):
        load_dataset(path, size=8)


def test_csv_hints_for_other_separators_and_file_names_as_ids(tmp_path):
    _ham(tmp_path, ["mel", "nv"] * 4)
    (tmp_path / "semi.csv").write_text("image_id;dx\nim0;mel\n")
    with pytest.raises(DataError, match=r"missing column 'image_id' \(found: image_id;dx\); the header looks "
                                        r"';'-separated: save the file comma-separated$"):
        load_dataset(tmp_path / "semi.csv", size=8)
    (tmp_path / "ext.csv").write_text("image_id,dx\nimgs/im9.jpg,mel\nim8.jpg,nv\n")
    # "'image_id' holds file names without folder or extension ..., matched anywhere under the CSV's folder" read as
    # a claim about a column holding paths, and named the CSV's folder where image_dir named another
    with pytest.raises(DataError, match=r"2 image\(s\) listed but not found .*; 'image_id' holds file names, each "
                                        r"matched anywhere under that folder \(img1 or img1.png for images/img1.png\), "
                                        r"or paths relative to it \(images/img1.png or images/img1\) -- put the "
                                        r"image files \(or the folders holding them\) under .*$"):
        load_dataset(tmp_path / "ext.csv", size=8)
    from robust_ops.data import load_csv

    (tmp_path / "pics").mkdir()
    with pytest.raises(DataError, match=rf"not found under {re.escape(str(tmp_path / 'pics'))}, e\.g\. "
                                        r"imgs/im9.jpg, im8.jpg; .* anywhere under that folder "):
        load_csv(tmp_path / "ext.csv", size=8, image_dir=tmp_path / "pics")


def _patient_views(tmp_path, id_of):
    """pat1/ and pat2/ under ``tmp_path``, 15 grey 8 x 8 views each (view{i}.png, pixel 8 i + p for patient p), and
    the CSV rows naming them by ``id_of(patient, i)``, three classes in turn."""
    rows = ["image_id,dx"]
    for p, patient in enumerate(("pat1", "pat2")):
        (tmp_path / patient).mkdir()
        for i in range(15):
            _png(tmp_path / patient / f"view{i}.png", (8, 8), 8 * i + p, mode="L")
            rows.append(f"{id_of(patient, i)},{('covid', 'normal', 'pneumonia')[i % 3]}")
    return rows


def test_csv_ids_may_be_paths_relative_to_the_image_folder(tmp_path):
    """A CSV of image paths (pat1/view1.png, CheXpert's layout) was refused as "listed but not found ... strip the
    folders and extensions from its values", and its ids stripped to names (view1 of every patient) as "listed more
    than once". A path relative to the folder, with or without its extension, and a name with its extension, now
    name their file; two rows naming one file are an error (found by the persona helper)."""
    suffix = {i: ".PNG" if i == 3 else ".png" for i in range(1, 15, 2)}  # odd views by path with extension
    rows = _patient_views(tmp_path, lambda patient, i: f"{patient}/view{i}{suffix.get(i, '')}")
    for patient in ("pat1", "pat2"):
        (tmp_path / patient / "view3.png").rename(tmp_path / patient / "view3.PNG")  # an upper-case extension too
        # beside view0.png, no image of pat1/view0: other suffixes, other stems (mutation testing: the upper-case
        # extension, and a path without its extension matching these, survived) (found by the mutB helper)
        (tmp_path / patient / "view0.json").write_text("{}")
        _png(tmp_path / patient / "view0.seg.png", (8, 8), 255, mode="L")
    (tmp_path / "paths.csv").write_text("\n".join(rows) + "\n")
    s = load_dataset(tmp_path / "paths.csv", size=8, channels=1)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    assert len(x) == 30 and s.info.extra["class_counts"] == {"covid": 10, "normal": 10, "pneumonia": 10}
    # each row read its own file: every (value, label) pair of the 30 written
    y = torch.cat([s.train.tensors[1], s.val.tensors[1], s.test.tensors[1]])
    assert sorted(zip((x[:, 0, 4, 4] * 255).round().int().tolist(), y.tolist())) == sorted(
        (8 * i + p, i % 3) for p in (0, 1) for i in range(15))
    one = tmp_path / "one"  # names with their extension, matched anywhere under the CSV's folder
    (one / "images").mkdir(parents=True)
    for i in range(20):
        _png(one / "images" / f"view{i}.png", (8, 8), i, mode="L")
    (one / "names.csv").write_text("image_id,dx\n" + "".join(f"view{i}.png,{i % 2}\n" for i in range(20)))
    s = load_dataset(one / "names.csv", size=8, channels=1)
    assert sorted((torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])[:, 0, 4, 4] * 255).round()
                  .int().tolist()) == list(range(20))
    # Windows' separator too (mutation testing: reading only / survived) (found by the mutB helper)
    (tmp_path / "back.csv").write_text("\n".join([rows[0]] + [r.replace("/", "\\") for r in rows[1:]]) + "\n")
    s = load_dataset(tmp_path / "back.csv", size=8, channels=1)
    assert sorted((torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])[:, 0, 4, 4] * 255).round()
                  .int().tolist()) == sorted(8 * i + p for p in (0, 1) for i in range(15))
    (tmp_path / "twice.csv").write_text("\n".join(rows + ["./pat1/view1.png,covid"]) + "\n")
    with pytest.raises(DataError, match=r"twice\.csv: rows 'pat1/view1\.png' and '\./pat1/view1\.png' name the same "
                                        r"file; expected one row per image$"):
        load_dataset(tmp_path / "twice.csv", size=8)
    # a path through .. too (mutation testing: comparing the paths unresolved survived) (found by the mutB helper)
    (tmp_path / "twice.csv").write_text("\n".join(rows + ["pat2/../pat1/view1.png,covid"]) + "\n")
    with pytest.raises(DataError, match=r"rows 'pat1/view1\.png' and 'pat2/\.\./pat1/view1\.png' name the same file"):
        load_dataset(tmp_path / "twice.csv", size=8)


def test_csv_rows_resolve_each_folder_once_and_still_refuse_one_file_in_two_rows(tmp_path, monkeypatch):
    """load_csv's check of two rows naming one file resolved every row's path (each of its components read): 0.15 s
    of 2,000 rows on a loaded 2-core machine, as much as reading those images at 8 x 8. Each folder is resolved once;
    a row through a linked folder still names the file it reaches (found by the bench helper)."""
    rows = _patient_views(tmp_path, lambda patient, i: f"{patient}/view{i}.png")
    (tmp_path / "paths.csv").write_text("\n".join(rows) + "\n")
    realpath, resolved = os.path.realpath, []
    monkeypatch.setattr(os.path, "realpath", lambda path, **kw: resolved.append(path) or realpath(path, **kw))
    s = load_dataset(tmp_path / "paths.csv", size=8, channels=1)
    monkeypatch.undo()
    assert len(s.train) + len(s.val) + len(s.test) == 30
    assert len(resolved) <= 2, f"{len(resolved)} paths resolved for 30 rows in 2 folders"
    try:
        os.symlink(tmp_path / "pat1", tmp_path / "linked", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("no symbolic links here")
    (tmp_path / "twice.csv").write_text("\n".join(rows + ["linked/view1.png,covid"]) + "\n")
    with pytest.raises(DataError, match=r"rows 'pat1/view1\.png' and 'linked/view1\.png' name the same file"):
        load_dataset(tmp_path / "twice.csv", size=8)


def test_csv_paths_without_extension_list_each_folder_once(tmp_path, monkeypatch):
    """An id holding a folder and no extension (pat1/view1) globbed its folder for its own name, a listing of the
    folder per row: 0.34 s of 2,000 rows in 200 folders on a loaded 2-core machine (a load_csv of 0.8 s by names).
    Each folder is now listed once; the file found is the one with that stem, two of them still ambiguous (found by
    the bench helper)."""
    rows = _patient_views(tmp_path, lambda patient, i: f"{patient}/view{i}") + ["pat1/view1.txt,normal"]
    for p, patient in enumerate(("pat1", "pat2")):
        _png(tmp_path / patient / "view1.txt.png", (8, 8), 200 + p, mode="L")  # the stem of pat1/view1.txt
    (tmp_path / "paths.csv").write_text("\n".join(rows) + "\n")
    listings = Counter()
    for name in ("scandir", "listdir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path=".", real=real: listings.update([path]) or real(path))
    s = load_dataset(tmp_path / "paths.csv", size=8, channels=1)
    monkeypatch.undo()
    # the data's folders only: a first import in the process lists sys.path's entries (python311.zip twice)
    ours = Counter({p: n for p, n in listings.items() if not isinstance(p, int)
                    and Path(os.fspath(p)).is_relative_to(tmp_path)})
    assert len(ours) == 2 and max(ours.values()) == 1, listings
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    assert sorted((x[:, 0, 4, 4] * 255).round().int().tolist()) == sorted([8 * i + p for p in (0, 1) for i in range(15)]
                                                                          + [200])
    _png(tmp_path / "pat2" / "view4.jpg", (8, 8), 9, mode="L")
    with pytest.raises(DataError, match=r"1 image_id\(s\) match several files under .*view4\.jpg and .*view4\.png"):
        load_dataset(tmp_path / "paths.csv", size=8)


def test_csv_paths_without_extension_find_a_suffix_in_capitals_and_skip_folders_named_as_images(tmp_path):
    # pat1/view0 names pat1/view0.PNG, as a name without folder names it (suffix case ignored), and not a folder
    # named view1.png beside view1.jpg (mutation testing of _images_by_stem: a case-sensitive suffix, and no
    # is_file, each survived) (found by the mut53 helper)
    rows = _patient_views(tmp_path, lambda patient, i: f"{patient}/view{i}")
    (tmp_path / "pat1" / "view0.png").rename(tmp_path / "pat1" / "view0.PNG")
    (tmp_path / "pat1" / "view1.png").rename(tmp_path / "pat1" / "view1.jpg")
    (tmp_path / "pat1" / "view1.png").mkdir()
    (tmp_path / "paths.csv").write_text("\n".join(rows) + "\n")
    s = load_dataset(tmp_path / "paths.csv", size=8, channels=1)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    assert sorted((x[:, 0, 4, 4] * 255).round().int().tolist()) == sorted(8 * i + p for p in (0, 1) for i in range(15))


def _all_values_and_labels(s):
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    y = torch.cat([s.train.tensors[1], s.val.tensors[1], s.test.tensors[1]])
    return sorted(zip((x[:, 0, 4, 4] * 255).round().int().tolist(), y.tolist()))


def test_csv_path_ids_find_an_other_case_extension_in_their_own_folder_only(tmp_path):
    """An id with a folder and an extension whose file was not in that folder read a file of that name from any
    other folder: pat3/view0.png (no pat3/) loaded pat1/view0.png, an image the CSV leaves out, under pat3's label;
    C:/data/images/img0.png (a drive) loaded images/img0.png; pat1/view0.png and pat2/view0.png for files named
    view0.PNG were 'listed but not found' (their names collided); images\\img0.PNG for images/img0.png was not
    found while images/img0.PNG loaded (found by the data5 helper)."""
    for p, (folder, base) in enumerate((("pat1", 0), ("pat2", 100))):
        (tmp_path / folder).mkdir()
        for i in range(0 if folder == "pat1" else 1, 12):  # no pat2/view0.png: pat1's is the only one
            _png(tmp_path / folder / f"view{i}.png", (8, 8), base + i)
    rows = [f"pat{p + 1}/view{i}.png,{p}" for p in (0, 1) for i in range(1, 12)]
    (tmp_path / "m.csv").write_text("image_id,dx\n" + "\n".join(rows + ["pat3/view0.png,1"]) + "\n")
    with pytest.raises(DataError, match=r"1 image\(s\) listed but not found under .*, e\.g\. pat3/view0\.png;"):
        load_dataset(tmp_path / "m.csv", size=8, channels=1)
    for drive in ("C:/data/pat1/view0.png", "C:\\data\\pat1\\view0.png"):  # either slash: no path under the folder
        (tmp_path / "d.csv").write_text("image_id,dx\n" + "\n".join(rows + [f"{drive},1"]) + "\n")
        with pytest.raises(DataError, match=r"1 image\(s\) listed but not found"):
            load_dataset(tmp_path / "d.csv", size=8, channels=1)
    # files with upper-case extensions in two folders: each id reads its own folder's
    for folder in ("pat1", "pat2"):
        (tmp_path / folder / "view1.png").rename(tmp_path / folder / "view1.PNG")
    expected = sorted((base + i, p) for p, base in ((0, 0), (1, 100)) for i in range(1, 12))
    for sep in ("/", "\\"):
        ids = [f"pat{p + 1}{sep}view{i}.png,{p}" for p in (0, 1) for i in range(1, 12)]
        (tmp_path / "u.csv").write_text("image_id,dx\n" + "\n".join(ids) + "\n")
        assert _all_values_and_labels(load_dataset(tmp_path / "u.csv", size=8, channels=1)) == expected
        # and the ids' extension in capitals for lower-case files (view1.PNG as written)
        ids = [f"pat{p + 1}{sep}view{i}.PNG,{p}" for p in (0, 1) for i in range(1, 12)]
        (tmp_path / "c.csv").write_text("image_id,dx\n" + "\n".join(ids) + "\n")
        assert _all_values_and_labels(load_dataset(tmp_path / "c.csv", size=8, channels=1)) == expected


def test_csv_rows_naming_two_links_to_one_blob_are_two_images(tmp_path):
    """Two names linked to one file (git-annex's, DVC's or a hub cache's store of byte-identical images) were refused
    as 'rows ... name the same file' once paths were read, where the set loaded before: the rows name two files of
    the folder. A path through a linked folder to a file another row names is still refused (found by the revA
    helper)."""
    (tmp_path / "blobs").mkdir()
    (tmp_path / "images").mkdir()
    for i in range(20):
        _png(tmp_path / "blobs" / f"b{i}.png", (8, 8), i)
    try:
        for i in range(20):
            os.symlink(tmp_path / "blobs" / f"b{i}.png", tmp_path / "images" / f"img{i}.png")
        os.symlink(tmp_path / "blobs" / "b3.png", tmp_path / "images" / "img20.png")  # a duplicate's link
        os.symlink(tmp_path / "images", tmp_path / "linked", target_is_directory=True)
    except (OSError, NotImplementedError) as err:  # Windows without the privilege
        pytest.skip(f"no symlinks here: {err}")
    for ids in ([f"img{i}" for i in range(21)], [f"images/img{i}.png" for i in range(21)]):
        (tmp_path / "m.csv").write_text("image_id,dx\n" + "".join(f"{i},{n % 2}\n" for n, i in enumerate(ids)))
        s = load_dataset(tmp_path / "m.csv", size=8, channels=1)
        assert len(s.train) + len(s.val) + len(s.test) == 21
    (tmp_path / "m.csv").write_text("image_id,dx\n" + "".join(f"images/img{i}.png,{i % 2}\n" for i in range(20))
                                    + "linked/img3.png,1\n")
    with pytest.raises(DataError, match=r"rows 'images/img3\.png' and 'linked/img3\.png' name the same file"):
        load_dataset(tmp_path / "m.csv", size=8, channels=1)


def test_csv_ids_matching_two_files_are_told_the_id_that_names_one(tmp_path):
    """An id matching view3.png and view3.jpg in one folder was told 'pass image_dir to choose one folder', which no
    folder does; ids may hold an extension or a path since 2026-12-07, so the error names the id that takes one file
    (found by the revA helper)."""
    (tmp_path / "pat1").mkdir()
    for i in range(20):
        _png(tmp_path / "pat1" / f"view{i}.png", (8, 8), i)
    _png(tmp_path / "pat1" / "view3.jpg", (8, 8), 3)
    for ids, told in (([f"pat1/view{i}" for i in range(20)], "pat1/view3"), ([f"view{i}" for i in range(20)], "view3")):
        (tmp_path / "m.csv").write_text("image_id,dx\n" + "".join(f"{i},{n % 2}\n" for n, i in enumerate(ids)))
        with pytest.raises(DataError, match=rf"match several files under .*; write the extension into the id "
                                            rf"\({told}\.jpg or {told}\.png\) to choose one$"):
            load_dataset(tmp_path / "m.csv", size=8, channels=1)
        ids[3] += ".png"  # as told
        (tmp_path / "m.csv").write_text("image_id,dx\n" + "".join(f"{i},{n % 2}\n" for n, i in enumerate(ids)))
        assert len(load_dataset(tmp_path / "m.csv", size=8, channels=1).train) > 0
    (tmp_path / "copy").mkdir()  # two folders: image_dir, or the path as the id (a byte-identical copy is read)
    _png(tmp_path / "copy" / "view5.png", (8, 8), 6)
    (tmp_path / "m.csv").write_text("image_id,dx\n" + "".join(f"view{i},{i % 2}\n" for i in range(20) if i != 3))
    # image_dir, which it told to pass first, is load_csv's alone: load_dataset and the command line take none (found
    # by the data4 helper)
    with pytest.raises(DataError, match=r"; write the file's path as the id \(copy/view5\.png\) to choose one, or "
                                        r"remove the other copies \(in Python, load_csv\(\.\.\., image_dir=\) reads "
                                        r"one folder\)$"):
        load_dataset(tmp_path / "m.csv", size=8, channels=1)
    with pytest.raises(TypeError, match="image_dir"):
        load_dataset(tmp_path / "m.csv", size=8, channels=1, image_dir=tmp_path / "pat1")
    (tmp_path / "m.csv").write_text((tmp_path / "m.csv").read_text().replace("view5,", "copy/view5.png,"))
    assert len(load_dataset(tmp_path / "m.csv", size=8, channels=1).train) > 0
    # a name with its extension beside a file of that stem (view7.png, view7.png.jpg) was told to write the extension
    # into the id, view7.png.png, which names no file (found by the revC helper)
    _png(tmp_path / "pat1" / "view7.png.jpg", (8, 8), 7)
    ids = [f"view{i}.png" for i in range(20) if i != 5]
    (tmp_path / "m.csv").write_text("image_id,dx\n" + "".join(f"{i},{n % 2}\n" for n, i in enumerate(ids)))
    with pytest.raises(DataError, match=r"match several files under .*; write the file's path as the id "
                                        r"\(pat1/view7\.png or pat1/view7\.png\.jpg\) to choose one$"):
        load_dataset(tmp_path / "m.csv", size=8, channels=1)
    for told in ("pat1/view7.png", "pat1/view7.png.jpg"):
        (tmp_path / "m.csv").write_text((tmp_path / "m.csv").read_text().replace("\nview7.png,", f"\n{told},"))
        assert len(load_dataset(tmp_path / "m.csv", size=8, channels=1).train) > 0
        (tmp_path / "m.csv").write_text((tmp_path / "m.csv").read_text().replace(f"\n{told},", "\nview7.png,"))


def test_csv_ids_matching_byte_identical_copies_read_one_of_them(tmp_path):
    """A download holding its image folders twice (HAM10000_images_part_1/ beside ham10000_images_part_1/, both
    copies byte for byte) was refused as ids matching several files, told to pass image_dir, which neither the
    command line nor load_dataset takes and which cannot choose one folder of two parts; copies with the same bytes
    are one image (found by the derm helper)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        (tmp_path / part).mkdir()
    rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    for i in range(60):
        part = f"HAM10000_images_part_{1 + i % 2}"
        Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).save(tmp_path / part / f"ISIC_{i:07d}.jpg")
        rows.append(f"HAM_{i // 2:07d},ISIC_{i:07d},{('nv', 'mel')[(i // 2) % 2]},histo,50.0,male,back")
    (tmp_path / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
    plain = load_dataset(tmp_path / "HAM10000_metadata.csv", size=8)
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        shutil.copytree(tmp_path / part, tmp_path / part.lower())
    copied = load_dataset(tmp_path / "HAM10000_metadata.csv", size=8)
    for a, b in zip((plain.train, plain.val, plain.test), (copied.train, copied.val, copied.test)):
        assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))
    assert copied.info == plain.info and copied.info.extra["split_by"] == "lesion_id"
    # copies that differ are still refused: which one is read would depend on the file-system order
    Image.fromarray(np.zeros((9, 12, 3), np.uint8)).save(tmp_path / "ham10000_images_part_2" / "ISIC_0000005.jpg")
    with pytest.raises(DataError, match=r"1 image_id\(s\) match several files under .*ISIC_0000005\.jpg and "):
        load_dataset(tmp_path / "HAM10000_metadata.csv", size=8)
    # a third copy, identical to the first: the refusal named the identical two, not the copy that differs (found by
    # the data3 helper)
    (tmp_path / "HAM10000_images_part_2_copy").mkdir()
    shutil.copy(tmp_path / "HAM10000_images_part_2" / "ISIC_0000005.jpg", tmp_path / "HAM10000_images_part_2_copy")
    with pytest.raises(DataError, match=r"1 image_id\(s\) match several files under .*/HAM10000_images_part_2/"
                                        r"ISIC_0000005\.jpg and .*/ham10000_images_part_2/ISIC_0000005\.jpg; "):
        load_dataset(tmp_path / "HAM10000_metadata.csv", size=8)


def test_csv_of_pixel_values_is_told_what_it_is_in_one_short_line(tmp_path):
    """A CSV of flattened images (hmnist_28_28_RGB.csv: 2352 columns pixel0000 ... pixel2351 and a label, which
    copies of HAM10000 hold beside HAM10000_metadata.csv) was refused in a 26 kB line listing every column, told to
    name its image column image_id, a column it does not have (found by the derm helper)."""
    rng = np.random.default_rng(0)
    header = [f"pixel{i:04d}" for i in range(2352)] + ["label"]
    rows = [",".join(map(str, rng.integers(0, 256, 2352).tolist() + [i % 7])) for i in range(10)]
    (tmp_path / "hmnist_28_28_RGB.csv").write_text("\n".join([",".join(header)] + rows) + "\n")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "hmnist_28_28_RGB.csv", size=8)
    message = str(err.value)
    assert re.search(r"hmnist_28_28_RGB\.csv: missing column 'image_id' \(found: pixel0000, pixel0001, .*, \.\.\. "
                     r"\(2341 more\)\); its 2352 columns pixel0000 \.\.\. pixel2351 hold pixel values \(a CSV of "
                     r"flattened images\)", message), message
    assert len(message) < 600 and "name the image column" not in message
    # a split_by column it does not have lists the columns as briefly
    (tmp_path / "wide.csv").write_text("image_id,dx," + ",".join(header) + "\n")
    with pytest.raises(DataError, match=r"split_by='patient' names no column \(found: image_id, dx, pixel0000, .*, "
                                        r"\.\.\. \(2343 more\)\)"):
        load_dataset(tmp_path / "wide.csv", size=8, split_by="patient")


def test_csv_split_by_image_beside_a_patient_column_warns(tmp_path):
    """A CSV without lesion_id but with a patient column (ISIC 2020's patient_id: several images per patient) was
    split by image without a word, a patient's images in train and test; the library splits HAM10000 by lesion for
    that reason, and the command line has no flag to group by another column (found by the derm helper)."""
    for i in range(80):
        _png(tmp_path / f"ISIC_{i:07d}.png", (8, 8), i)
    rows = "".join(f"ISIC_{i:07d},IP_{i // 4:07d},{('nevus', 'melanoma')[(i // 4) % 2]}\n" for i in range(80))
    (tmp_path / "train.csv").write_text("image_id,patient_id,dx\n" + rows)
    with pytest.warns(UserWarning, match=r"train\.csv: split by image, though column 'patient_id' holds several "
                                         r"images of one patient \(80 images of 20 patients\): a patient's images "
                                         r"can land in train and test, inflating test scores; .*"
                                         r"split_by='patient_id'.*rename the column lesion_id"):
        by_image = load_dataset(tmp_path / "train.csv", size=8, channels=1)
    assert "split_by" not in by_image.info.extra  # the split itself is unchanged
    grouped = load_dataset(tmp_path / "train.csv", size=8, channels=1, split_by="patient_id")  # as told: no warning
    assert grouped.info.extra["split_by"] == "patient_id"
    # one image per patient, or a split by image asked for, is nothing to warn of
    (tmp_path / "one.csv").write_text("image_id,patient_id,dx\n" + "".join(
        f"ISIC_{i:07d},IP_{i:07d},{('nevus', 'melanoma')[i % 2]}\n" for i in range(40)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(tmp_path / "one.csv", size=8, channels=1)
        load_dataset(tmp_path / "train.csv", size=8, channels=1, split_by="image")


def test_csv_patient_column_of_missing_values_is_not_one_patient(tmp_path):
    """A patient column of "NA" or "nan" (as R or pandas write a missing value) warned '12 images of 1 patients' and
    told to split by it, which would group every image into one patient; such values are no patient, as "" is
    (found by the data3 helper)."""
    for i in range(40):
        _png(tmp_path / f"im{i}.png", (8, 8), i)
    for spelling in ("NA", "nan", "<NA>", ""):
        (tmp_path / "m.csv").write_text("image_id,patient_id,dx\n" + "".join(
            f"im{i},{spelling if i % 4 else f'P{i}'},{('nevus', 'melanoma')[i % 2]}\n" for i in range(40)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_dataset(tmp_path / "m.csv", size=8, channels=1)
    (tmp_path / "m.csv").write_text("image_id,patient_id,dx\n" + "".join(
        f"im{i},{'P1' if i < 3 else 'NA'},{('nevus', 'melanoma')[i % 2]}\n" for i in range(40)))
    with pytest.warns(UserWarning, match=r"holds several images of one patient \(3 images of 1 patient\):"):
        load_dataset(tmp_path / "m.csv", size=8, channels=1)


def test_csv_group_column_of_missing_values_is_warned_of_as_one_group(tmp_path):
    """A lesion_id (or split_by column) spelled as missing, "NA" in 20 of 40 rows, made one group of those rows without
    a word (a 33/2/5 split), where an empty value is refused; kept, as runs trained on such a CSV must still load,
    but said, with the fix (found by the data4 helper)."""
    for i in range(40):
        _png(tmp_path / f"im{i}.png", (8, 8), i)

    def write(value, column="lesion_id"):
        (tmp_path / "m.csv").write_text(f"image_id,dx,{column}\n" + "".join(
            f"im{i},{('nv', 'mel')[i % 2]},{value(i) if i < 20 else f'L{i}'}\n" for i in range(40)))
        return tmp_path / "m.csv"

    with pytest.warns(UserWarning, match=r"m\.csv: column 'lesion_id' holds 'NA' \(20 rows\): a missing value \(as "
                                         r"pandas writes NaN\), its rows kept as one lesion_id group, on one side of "
                                         r"the split; give each such row its own lesion_id, or remove those rows from "
                                         r"the CSV$") as caught:
        s = load_dataset(write(lambda i: "NA"), size=8, channels=1)
    assert len(caught) == 1 and sorted(map(len, (s.train, s.val, s.test))) == [2, 5, 33]  # kept: the split as before
    with pytest.warns(UserWarning, match=r"column 'patient_id' holds 'N/A' \(10 rows\), 'nan' \(10 rows\): missing "
                                         r"values \(as pandas writes NaN\), each one's rows kept as one patient_id "
                                         r"group"):
        load_dataset(write(lambda i: ("nan", "N/A")[i % 2], "patient_id"), size=8, channels=1, split_by="patient_id")
    # rows classes= leaves out are not counted; their own ids, or a split by image, are nothing to warn of
    with open(write(lambda i: "NA"), "a") as f:
        f.write("".join(f"x{i},unk,NA\n" for i in range(5)))  # left out: neither read nor counted
    with pytest.warns(UserWarning, match=r"holds 'NA' \(20 rows\)"):
        load_dataset(tmp_path / "m.csv", size=8, channels=1, classes=["nv", "mel"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(write(lambda i: f"L{i}"), size=8, channels=1)
        load_dataset(write(lambda i: "NA"), size=8, channels=1, split_by="image")


def test_csv_id_with_an_extension_matches_it_in_any_case(tmp_path):
    """An id written with its extension, ISIC_0000001.jpg, was 'listed but not found' beside ISIC_0000001.JPG,
    which the same id without it matched (the suffix is matched in any case); an exact match is still preferred
    (found by the derm helper)."""
    for i in range(20):
        _png(tmp_path / f"ISIC_{i:07d}.PNG", (8, 8), i)
    (tmp_path / "m.csv").write_text("image_id,dx\n" + "".join(f"ISIC_{i:07d}.png,{i % 2}\n" for i in range(20)))
    (tmp_path / "bare.csv").write_text("image_id,dx\n" + "".join(f"ISIC_{i:07d},{i % 2}\n" for i in range(20)))
    a, b = load_dataset(tmp_path / "m.csv", size=8, channels=1), load_dataset(tmp_path / "bare.csv", size=8, channels=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    _png(tmp_path / "ISIC_0000003.png", (8, 8), 200)  # the exact name beside it: that one is read, as before
    c = load_dataset(tmp_path / "m.csv", size=8, channels=1)
    pixels = torch.cat([c.train.tensors[0], c.val.tensors[0], c.test.tensors[0]])
    assert round(float(pixels.max()) * 255) == 200



def test_csv_image_search_asks_the_file_system_only_of_files_an_id_may_name(tmp_path, monkeypatch):
    """load_csv's search under the CSV's folder asked every file's suffix, is_file() and hidden-ness before its name
    (since d66601b): a folder of many more images than the CSV lists paid a stat for each of them."""
    import pathlib

    (tmp_path / "imgs").mkdir()
    (tmp_path / "other").mkdir()
    for i in range(20):
        _png(tmp_path / "imgs" / f"ISIC_{i}.png", (8, 8), 10 * i)
    for i in range(30):  # images the CSV does not list
        _png(tmp_path / "other" / f"x{i}.png", (8, 8), i)
    (tmp_path / "m.csv").write_text("image_id,dx\n" + "".join(f"ISIC_{i},{i % 2}\n" for i in range(20)))
    asked, is_file = [], pathlib.Path.is_file
    monkeypatch.setattr(pathlib.Path, "is_file",
                        lambda self, *a, **k: asked.append(self.name) or is_file(self, *a, **k))
    from robust_ops.data.folders import load_csv

    assert len(load_csv(tmp_path / "m.csv", size=8, mode="L").train) == 14
    assert not [name for name in asked if name.startswith("x")], asked

def test_a_class_too_small_to_stratify_is_named(tmp_path):
    root = _class_folders(tmp_path, n=20)
    _class_folders(tmp_path, ("normal",), n=1)
    with pytest.warns(UserWarning, match=r"leaves out normal from val; normal from test$") as caught:
        s = load_dataset(root, size=8)
    assert s.info.extra["classes_missing_from_split"] == {"val": ["normal"], "test": ["normal"]}
    # docs/cli.md quotes this warning's end; it had a 1-sample class left out of test alone, which cannot happen
    page = " ".join((Path(__file__).resolve().parents[1] / "docs/cli.md").read_text().split())
    quoted = re.search(r"`\.\.\. (\(smallest: [^`]*)`", page).group(1)
    assert str(caught[0].message).endswith(quoted), (quoted, str(caught[0].message))


def test_the_warning_of_a_class_too_small_to_stratify_names_the_callers_line(tmp_path):
    """The warning named a line of the library for class folders (folders.py), a CSV or groups split by lesion
    (core.py) and cross_validation of such data (splits.py): it names the line that called the loader or split, as
    the loaders' 16-bit warnings do, and as it did for stratified_split and cross_validation of ungrouped data."""
    from robust_ops.data import load_csv
    from robust_ops.data.core import grouped_split, stratified_split

    root = _class_folders(tmp_path / "f", n=20)
    _class_folders(tmp_path / "f", ("normal",), n=1)
    (tmp_path / "c").mkdir()
    y = np.array([0] * 40 + [1] * 40 + [2] * 4)
    with pytest.warns(UserWarning, match="too small to stratify") as caught:
        load_busi(root, size=8)
        lesions = load_csv(_lesions_csv(tmp_path / "c", lesions=10), size=8)
        cross_validation(lesions, k=2)
        grouped_split(y, np.arange(len(y)), (0.7, 0.1, 0.2), 0)
        stratified_split(y, (0.7, 0.1, 0.2), 0)
    assert len(caught) >= 5 and {w.filename for w in caught} == {__file__}


def test_load_datasets_warnings_name_the_callers_line_as_the_loaders_do(tmp_path):
    """Through load_dataset the loaders' warnings (a class too small to stratify, 12-bit images, bit_depth= without
    16-bit images, small images upscaled) named a line of the library (data/core.py's call, or folders.py's for the
    upscale warning, which named itself when a loader was called directly too): each names the line that called."""
    from PIL import Image

    from robust_ops.data import load_csv

    rare = _class_folders(tmp_path / "rare", n=20)
    _class_folders(tmp_path / "rare", ("normal",), n=1)
    (tmp_path / "c").mkdir()
    lesions = _lesions_csv(tmp_path / "c", lesions=10)
    deep = tmp_path / "deep"
    for c in ("benign", "malignant"):
        (deep / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8), 3982 - 100 * i, np.uint16)).save(deep / c / f"{i}.png")
    small = _class_folders(tmp_path / "small", n=10, size=(28, 20))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "meta.csv").write_text("image_id,dx\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(20)))
    for i in range(20):
        _png(tmp_path / "s" / f"{i}.png", (28, 20), 5 * i)
    with pytest.warns(UserWarning) as caught:
        load_dataset(rare, size=8)
        load_dataset(lesions, size=8)
        load_dataset(deep, size=8)
        load_dataset(small, size=28, bit_depth=12)
        load_dataset(small)
        load_dataset(tmp_path / "s" / "meta.csv")
        load_busi(small)
        load_csv(tmp_path / "s" / "meta.csv")
    said = ["stratify" if "too small to stratify" in m else "12-bit" if "12-bit data" in m else
            "nothing" if "it changes nothing" in m else "upscaled" if "upscaled 8.0x" in m else m
            for m in map(str, (w.message for w in caught))]
    assert said == ["stratify", "stratify", "12-bit", "nothing"] + ["upscaled"] * 4
    assert {w.filename for w in caught} == {__file__}


def test_load_dataset_in_a_loop_warns_once_per_call_site_as_python_does(tmp_path):
    """scikit-learn's split runs in warnings.catch_warnings() blocks, after which Python shows every warning again:
    load_dataset in a loop (a folder of small images, one class too small to stratify) repeated its upscale and
    stratify warnings at every call under the default filter. Once per call site now; "always" still shows each."""
    import warnings

    root = _class_folders(tmp_path / "d", n=12)
    _class_folders(root, ("normal",), n=1)

    def loop(action, calls=3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter(action)
            for _ in range(calls):
                load_dataset(root)
        return sorted("stratify" if "too small to stratify" in str(w.message) else "upscaled" if "upscaled" in
                      str(w.message) else str(w.message) for w in caught)

    assert loop("default") == ["stratify", "upscaled"]
    assert loop("always") == ["stratify"] * 3 + ["upscaled"] * 3


def test_small_images_at_the_default_size_warn_of_the_upscale(tmp_path):
    # 28 x 28 PNGs (MedMNIST exported) were read at the default 224 x 224 without a word: 64 times the pixels
    import csv
    import warnings

    root = _class_folders(tmp_path / "f", n=20, size=(28, 20))
    (tmp_path / "c").mkdir()
    with open(tmp_path / "c" / "meta.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_id", "dx")] + [(f"{i}", "benign" if i < 20 else "malignant")
                                                        for i in range(40)])
    for i in range(40):
        _png(tmp_path / "c" / f"{i}.png", (28, 20), 5 * i)
    for source in (root, tmp_path / "c" / "meta.csv"):
        with pytest.warns(UserWarning, match=r"every image is at most 28 pixels a side, read at the default 224x224 "
                                             r"\(upscaled 8\.0x: 64 times the pixels .*pass size=28 \(--size 28\)"):
            s = load_dataset(source)
        assert s.info.image_size == 224
        for size in (224, 28):  # a size given is meant
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                load_dataset(source, size=size)
    mixed = _class_folders(tmp_path / "m", n=10, size=(28, 20))
    _png(mixed / "benign" / "0.png", (112, 20), 40)  # the largest side counts, not the last image's; half is small
    with pytest.warns(UserWarning, match=r"every image is at most 112 pixels a side, read at the default 224x224 "):
        load_dataset(mixed)


def test_layout_errors_say_how_to_lay_out_the_data(tmp_path):
    # images directly in the folder, class folders one level down and a CSV with other column names were refused
    # without a word on the fix ("got []", "got ['images']", "missing column 'image_id' (found: filename, label)")
    root = _class_folders(tmp_path / "top" / "images")
    with pytest.raises(DataError, match=r"got \['images'\]; .*images holds the folders benign, malignant: point the "
                                        r"data path at .*images if they are the classes"):
        load_dataset(tmp_path / "top", size=8)
    (tmp_path / "flat").mkdir()
    for p in list((root / "benign").iterdir())[:3]:
        p.rename(tmp_path / "flat" / p.name)
    with pytest.raises(DataError, match=r"got \[\]; 3 image\(s\) lie directly in .*flat: put each class's images "
                                        r"in a folder named after the class"):
        load_dataset(tmp_path / "flat", size=8)
    csv_path = tmp_path / "top" / "labels.csv"
    csv_path.write_text("filename,label\n0,benign\n")
    with pytest.raises(DataError, match=r"missing column 'image_id' \(found: filename, label\); name the image column "
                                        r"image_id and the label column dx .*load_csv\(\.\.\., id_column="):
        load_dataset(csv_path, size=8)
    with pytest.raises(DataError) as info:  # a single class folder of images: no layout hint
        load_dataset(_class_folders(tmp_path / "one", ("benign",)), size=8)
    assert str(info.value).endswith("got ['benign']")


def test_csv_with_one_hot_label_columns_is_named_as_such(tmp_path):
    # ISIC's ground-truth CSVs hold a 0/1 column per class (image, MEL, NV, ...), not one label column: the error told
    # the user to name "the label column dx", which such a file does not have (and its load_csv(..., label_column=)
    # given one of them, MEL, reads a binary MEL-vs-rest task labelled '0.0' / '1.0')
    from robust_ops.data import load_csv

    csv_path = tmp_path / "ISIC2019_Training_GroundTruth.csv"
    csv_path.write_text("image,MEL,NV,BCC,UNK\nISIC_1,1.0,0.0,0.0,0.0\nISIC_2,0.0,1.0,0.0,0.0\nISIC_3,0,0,1,0\n")
    with pytest.raises(DataError, match=r"missing column 'image_id' \(found: image, MEL, NV, BCC, UNK\); MEL, NV, "
                                        r"BCC, UNK hold one-hot labels \(a column per class.*write each row's class "
                                        r"name into one column 'dx', and name the image column 'image_id'") as info:
        load_dataset(csv_path, size=8)
    assert "name the image column image_id and the label column dx" not in str(info.value)
    with pytest.raises(DataError, match=r"missing column 'label'.*MEL, NV, BCC, UNK hold one-hot labels.*one column "
                                        r"'label'$"):
        load_csv(csv_path, size=8, id_column="image", label_column="label")
    csv_path.write_text("image,MEL,NV\nISIC_1,1,1\nISIC_2,0,1\n")  # two 1s in a row: not one-hot, the usual hint
    with pytest.raises(DataError, match=r"found: image, MEL, NV\); name the image column image_id and the label "
                                        r"column dx"):
        load_dataset(csv_path, size=8)


def test_data_errors_name_the_classes_argument_only_when_it_was_given(tmp_path):
    """DataError.arg is "classes" (the CLI's --classes) only for an error about classes= the caller passed; a source
    that holds a single class by itself is an error about the data (--data)."""
    root = _class_folders(tmp_path / "one", ("benign",))
    for classes, arg in ((None, None), (["benign"], "classes")):
        with pytest.raises(DataError, match="expected at least two class folders") as info:
            load_dataset(root, size=8, classes=classes)
        assert info.value.arg == arg, classes
    with pytest.raises(DataError, match="expected classes to be a sequence of names") as info:
        load_dataset(root, size=8, classes="benign")
    assert info.value.arg == "classes"
    path = _ham(tmp_path, ["mel"] * 4)
    for classes, arg in ((None, None), (["mel"], "classes")):
        with pytest.raises(DataError, match="expected at least two classes in column 'dx'") as info:
            load_dataset(path, size=8, classes=classes)
        assert info.value.arg == arg, classes
    with pytest.raises(DataError, match="requested class") as info:
        load_dataset(path, size=8, classes=["mel", "nv"])
    assert info.value.arg == "classes"


def test_the_unstratified_split_names_every_smallest_class(tmp_path):
    from robust_ops.data.core import stratified_split

    y = np.array([0] * 40 + [1] * 2 + [2] * 2)
    with pytest.warns(UserWarning, match=r"\(smallest: b, c, 2 samples\)"):
        stratified_split(y, (0.7, 0.1, 0.2), seed=0, class_names=("a", "b", "c"))


def test_the_12_bit_warning_points_at_the_caller_and_gives_the_8_bit_maximum(tmp_path):
    """A 16-bit value v is v / 257 of 255 (65535 -> 255): 3982 is 15.49, said as 15; the warning is attributed to
    the code that called the loader, not to the library."""
    from PIL import Image

    from robust_ops.data.folders import load_busi

    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(np.full((8, 8), 3982 - 100 * i, np.uint16)).save(tmp_path / c / f"{i}.png")
    with pytest.warns(UserWarning, match=r"\(at most 15 of 255\)") as caught:
        load_busi(tmp_path, size=8)
    assert [w.filename for w in caught] == [__file__]


def test_16_bit_images_reaching_exactly_255_are_8_bit_data(tmp_path):
    """255 is still an 8-bit value: a set whose 16-bit images reach 255 and no more is refused like one reaching 200."""
    from PIL import Image

    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8), 255 - i, np.uint16)).save(tmp_path / c / f"{i}.png")
    with pytest.raises(DataError, match=r"every 16-bit image holds values <= 255 only"):
        load_dataset(tmp_path, size=8)


def test_load_dataset_refuses_a_bare_medmnist_name_that_is_also_a_folder_and_root_for_paths(tmp_path, monkeypatch):
    # `--data breastmnist` beside a folder named breastmnist read the folder ("expected at least two class folders"),
    # and root= was ignored silently for paths and synthetic names.
    monkeypatch.chdir(tmp_path)
    _class_folders(tmp_path / "breastmnist", n=10)
    with pytest.raises(DataError, match=r"breastmnist: names a MedMNIST set and a folder here; write ./breastmnist "
                                        r"for the folder, or the .npz file's path"):
        load_dataset("breastmnist", size=8)
    assert load_dataset("./breastmnist", size=8).info.num_classes == 2
    for spec in ("synthetic", "./breastmnist"):
        with pytest.raises(DataError, match=r"root= is where MedMNIST files are looked up by name; this source is not "
                                            r"one -- drop root="):
            load_dataset(spec, root=tmp_path, size=8)


def test_busi_damaged_image_files_are_data_errors_not_pillow_tracebacks(tmp_path):
    """Pillow raises SyntaxError (broken PNG chunk) and ValueError (bad BMP palette, TIFF tag) besides OSError."""
    import io
    import struct

    from PIL import Image

    def saved(fmt):
        out = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 18), np.uint8)).save(out, fmt)
        return bytearray(out.getvalue())

    png = saved("png")  # IDAT's length halved: the next "chunk" is read from the middle of the pixel data
    at = png.index(b"IDAT") - 4
    png[at:at + 4] = struct.pack(">I", struct.unpack(">I", png[at:at + 4])[0] // 2)
    bmp = saved("bmp")
    bmp[46:50] = struct.pack("<I", 0xB700)  # colours used: more than the palette the file holds
    tif = saved("tiff")
    ifd = struct.unpack("<I", tif[4:8])[0]
    for k in range(struct.unpack("<H", tif[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack("<H", tif[entry:entry + 2])[0] == 256:  # ImageWidth, typed as a double
            tif[entry + 2:entry + 4] = struct.pack("<H", 12)
    for name, data in (("broken.png", png), ("palette.bmp", bmp), ("width.tif", tif)):
        root = _class_folders(tmp_path / name)
        (root / "benign" / name).write_bytes(bytes(data))
        with pytest.raises(DataError, match=rf"benign/{name.replace('.', '[.]')}: not a readable image \("):
            load_dataset(root, size=8)


def test_busi_image_whose_padded_square_is_above_pillows_limit_is_refused(tmp_path, monkeypatch):
    """The zero-padded square is allocated before resizing: a damaged TIFF header claiming 18 x 9,000,000 pixels
    asked for 81e12 bytes and was killed for memory. Shown here with a lowered limit (the same rule, a small file)."""
    from PIL import Image

    root = _class_folders(tmp_path / "d")
    _png(root / "benign" / "strip.png", (10, 60), 90)  # 600 pixels, under the limit; its square 3600, above
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"benign/strip\.png: a 10x60 image, zero-padded to a 60x60 square, is above "
                                        r"Pillow's size limit \(2000 pixels\); crop or downscale it$"):
        load_dataset(root, size=8)
    # the bound is twice the limit, Pillow's own error threshold: at 2.4 times (a bound of 3 times let it through)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    with pytest.raises(DataError, match=r"benign/strip\.png: .* is above Pillow's size limit \(3000 pixels\)"):
        load_dataset(root, size=8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1800)  # the square at the limit: read
    with pytest.warns(UserWarning, match="too small to stratify"):
        assert load_dataset(root, size=8).info.extra["class_counts"] == {"benign": 6, "malignant": 5}


def test_image_modes_other_than_grayscale_and_rgb_are_refused(tmp_path):
    """mode="1" read every image as pixels of 0 or 1/255 (black), "P" as palette indices, "CMYK" as 4 channels."""
    from robust_ops.data import load_busi, load_csv

    root = _class_folders(tmp_path / "d", n=10)
    for mode in ("1", "P", "CMYK", "rgb"):
        with pytest.raises(DataError, match=rf"load_busi\(.*d\): expected mode to be None \(colour decides\), 'L' "
                                            rf"\(grayscale\) or 'RGB', got '{mode}'$"):
            load_busi(root, size=8, mode=mode)
    assert load_busi(root, size=8, mode="RGB").info.in_channels == 3
    assert load_busi(root, size=8, mode=None).info.in_channels == 1
    (root / "labels.csv").write_text("image_id,dx\n0,benign\n")  # checked before the rows are read
    with pytest.raises(DataError, match=r"load_csv\(.*labels\.csv\): expected mode to be 'L' \(grayscale\) or 'RGB', "
                                        r"got None$"):
        load_csv(root / "labels.csv", size=8, mode=None)


def test_busi_images_with_transparent_pixels_are_refused(tmp_path):
    """The alpha channel was dropped: a transparent pixel read as the colour stored under it (white in one file, black
    in another that looks the same). An alpha channel opaque everywhere is read as before."""
    from PIL import Image

    rgba = np.full((8, 8, 4), 255, np.uint8)
    rgba[..., :3] = 90
    root = _class_folders(tmp_path / "opaque", n=10)
    Image.fromarray(rgba, "RGBA").save(root / "benign" / "rgba.png")
    assert load_dataset(root, size=8).info.extra["class_counts"] == {"benign": 11, "malignant": 10}
    rgba[:2, :, 3] = 0  # a transparent band, white under it
    rgba[:2, :, :3] = 255
    palette = Image.fromarray(np.full((8, 8), 90, np.uint8)).convert("P")
    for name, save in (("rgba.png", lambda p: Image.fromarray(rgba, "RGBA").save(p)),
                       ("grey.png", lambda p: Image.fromarray(rgba[..., [0, 3]], "LA").save(p)),
                       ("palette.png", lambda p: palette.save(p, transparency=int(np.asarray(palette)[0, 0])))):
        root = _class_folders(tmp_path / name, n=10)
        save(root / "malignant" / name)
        with pytest.raises(DataError, match=rf"malignant/{name.replace('.', '[.]')}: has transparent pixels, which "
                                            r"would be read as the colour stored under them; save it without "
                                            r"transparency \(flattened onto black, as the padding is\)$"):
            load_dataset(root, size=8)


def test_busi_multi_page_tiffs_and_animated_pngs_are_refused(tmp_path):
    """Only the first page of a TIFF stack (or frame of an animated PNG) was read, the rest dropped silently."""
    from PIL import Image

    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 120, 240)]
    for name in ("stack.tif", "anim.png"):
        root = _class_folders(tmp_path / name, n=10)
        frames[0].save(root / "benign" / name, save_all=True, append_images=frames[1:])
        with pytest.raises(DataError, match=rf"benign/{name.replace('.', '[.]')}: holds 3 frames \(pages\); only the "
                                            r"first would be read -- save each frame as an image of its own$"):
            load_dataset(root, size=8)
        frames[0].save(root / "benign" / name)  # one frame: read
        assert load_dataset(root, size=8).info.extra["class_counts"] == {"benign": 11, "malignant": 10}


def test_busi_32_bit_integer_images_share_one_scale(tmp_path):
    """A 32-bit integer TIFF (mode I) holding values <= 255 was read as 8-bit while its brighter neighbours took the
    16-bit scale: 200 -> 200 beside 1000 -> 4 in one set. Every integer image now takes the 16-bit (or bit_depth)
    scale, as 16-bit files do."""
    from PIL import Image

    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8), 200 if i == 0 else 1000, np.int32)).save(tmp_path / c / f"{i}.tif")

    def values(**kw):
        with pytest.warns(UserWarning) as caught:
            s = load_dataset(tmp_path, size=8, **kw)
        x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
        return sorted({round(float(v) * 255) for v in x.flatten()}), " ".join(str(w.message) for w in caught)

    found, said = values()
    assert found == [1, 4] and "pass bit_depth=10" in said  # 200 / 257, 1000 / 257: 10-bit data
    assert values(bit_depth=12)[0] == [12, 62]  # 200 / (4095 / 255), 1000 / (4095 / 255)
    for c in ("benign", "malignant"):
        for i in range(1, 5):
            Image.fromarray(np.full((8, 8), 90, np.int32)).save(tmp_path / c / f"{i}.tif")
    with pytest.raises(DataError, match=r"every 16-bit image holds values <= 200 only \(8-bit values saved in 16 "
                                        r"bits\?\)"):
        load_dataset(tmp_path, size=8)
    assert values(bit_depth=8)[0] == [90, 200]


def test_busi_jfif_nifti_gz_and_other_image_files_are_errors_not_skipped(tmp_path):
    """A .jif, .avif or .nii.gz file in a class folder was skipped silently, though the docs say other image files
    are errors; .nii.gz matched neither list (its suffix is .gz). (.jfif and .jpe, JPEGs, are read.)"""
    import shutil as _shutil

    root = _class_folders(tmp_path / "d")
    for name in ("x.jif", "scan.nii.gz", "x.avif", "x.JXL"):
        _shutil.copy(root / "benign" / "0.png", root / "benign" / name)
        suffix = name[name.index("."):].lower()
        with pytest.raises(DataError, match=rf"benign/{name.replace('.', '[.]')}: {suffix.replace('.', '[.]')} files "
                                            r"are not read \(expected \.png, .*\); convert it or move it out of"):
            load_dataset(root, size=8)
        (root / "benign" / name).unlink()
    (root / "benign" / "patient7").mkdir()
    _shutil.copy(root / "benign" / "0.png", root / "benign" / "patient7" / "scan.nii.gz")
    with pytest.raises(DataError, match=r"benign/patient7: a subfolder holding images; only the images directly in"):
        load_dataset(root, size=8)


def test_jfif_and_jpe_files_are_read_as_the_jpegs_they_are(tmp_path):
    """.jfif (a JPEG as browsers save it) and .jpe files, which Pillow reads as JPEGs, were refused as other image
    files ("convert it"); they are read, in class folders and by a CSV's ids with or without the extension."""
    from PIL import Image

    ids = []
    for i in range(20):
        c, name = ("mel", f"m{i}.jfif") if i % 2 else ("nv", f"n{i}.JPE")
        (tmp_path / c).mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8), 8 * i, np.uint8)).save(tmp_path / c / name, format="JPEG", quality=100)
        ids.append(f"{c}/{name}" if i % 4 < 2 else Path(name).stem)
    assert load_dataset(tmp_path, size=8).info.extra["class_counts"] == {"mel": 10, "nv": 10}
    _assert_csv_reads_each_of_20_images(tmp_path, ids)


@pytest.mark.parametrize("suffix,fmt", [(".mpo", "JPEG"), (".JPC", "JPEG2000"), (".pcx", "PCX"), (".fits", None)])
def test_busi_image_files_pillow_opens_in_other_formats_are_errors_not_skipped(tmp_path, suffix, fmt):
    """A camera's .mpo (a multi-picture JPEG), a .jpc JPEG 2000 codestream, a .pcx or .fits image in a class folder,
    each a file Pillow opens, was skipped without a word (its class silently smaller)."""
    from PIL import Image

    root = _class_folders(tmp_path / "d")
    if fmt is None:
        (root / "benign" / f"x{suffix}").write_bytes(b"SIMPLE  =                    T")
    else:
        Image.fromarray(np.full((8, 8), 9, np.uint8)).save(root / "benign" / f"x{suffix}", format=fmt)
    with pytest.raises(DataError, match=rf"benign/x\{suffix}: \{suffix.lower()} files are not read \(expected \.png, "):
        load_dataset(root, size=8)


def test_generated_sets_refuse_non_integer_sizes_seeds_and_counts_by_name():
    # "'<' not supported between instances of 'str' and 'int'", numpy's and scikit-learn's errors (naming make_moons'
    # n_samples), or silently: seed=True as 1, sizes=0 as the defaults, n_train=True as one point, noise=True as 1
    from robust_ops.data import moons_splits, synthetic_splits

    with pytest.raises(DataError, match=r"^synthetic: expected size >= 8, got size='16'$"):
        synthetic_ultrasound(2, size="16")
    with pytest.raises(DataError, match=r"^synthetic: expected n >= 0, got n=2.5$"):
        synthetic_ultrasound(2.5)
    with pytest.raises(DataError, match=r"^synthetic: expected 0 <= malignant_fraction <= 1, got True$"):
        synthetic_ultrasound(2, malignant_fraction=True)
    with pytest.raises(DataError, match=r"^synthetic: expected seed to be an integer >= 0, got True$"):
        synthetic_splits(seed=True)
    with pytest.raises(DataError, match=r"^synthetic: expected sizes to be a dict \{split: count\} or None, got 0$"):
        synthetic_splits(sizes=0)
    with pytest.raises(DataError, match=r"^moons: expected n_train to be an integer >= 1, got True$"):
        moons_splits(n_train=True)
    with pytest.raises(DataError, match=r"^moons: expected seed to be an integer >= 0, got '1'$"):
        moons_splits(seed="1")
    with pytest.raises(DataError, match=r"^moons: expected noise to be a finite number >= 0 or None, got True$"):
        moons_splits(noise=True, n_train=4, n_val=4, n_test=4)


@pytest.mark.parametrize("bad", ["no", None, 0])
def test_load_dataset_download_must_be_a_bool(bad):
    # download is a permission to go online: download="no" was truthy and allowed the download
    message = rf"^load_dataset: expected download to be True or False, got {re.escape(repr(bad))}$"
    with pytest.raises(DataError, match=message):
        load_dataset("synthetic", download=bad)


@pytest.mark.parametrize("bad", [2, 0, True])
def test_load_dataset_channels_must_be_one_or_three(bad):
    # checked before the source: 2 failed as a KeyError (the channel modes known), True passed as 1
    message = rf"^synthetic: expected channels to be 1 \(grayscale\) or 3 \(RGB\), got {bad}$"
    with pytest.raises(DataError, match=message):
        load_dataset("synthetic", channels=bad)


def test_cross_validation_takes_a_numpy_float32_val_fraction():
    # scikit-learn refused train_size=np.float32(0.9), which surfaced as "too few samples (20) for a 0.9/0.1 split"
    from robust_ops.data import synthetic_splits

    splits = synthetic_splits(size=8, seed=0, sizes={"train": 20, "val": 10, "test": 10})
    folds = cross_validation(splits, k=2, val_fraction=np.float32(0.1))
    assert len(folds) == 2 and all(len(f.val) > 0 for f in folds)


@pytest.mark.parametrize("seed", [-1, 2**32, "a", 1.5, None])
def test_a_bad_split_seed_is_named_not_called_too_few_samples(tmp_path, seed):
    """scikit-learn refuses such a seed with a ValueError, which stratified_split read as a class too small and then
    as "too few samples (20) for a 0.7/0.1/0.2 split"; None drew another split on every call of load_busi."""
    from robust_ops.data import load_busi, load_csv
    from robust_ops.data.core import stratified_split

    for c, v in (("benign", 50), ("malignant", 200)):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{c}{i}.png", (8, 8), v)
    csv = _ham(tmp_path, ["mel", "nv"] * 10)
    calls = {"stratified_split": lambda: stratified_split(np.array([0, 1] * 20), (0.7, 0.1, 0.2), seed, "toy"),
             "load_busi": lambda: load_busi(tmp_path, size=8, seed=seed),
             "load_csv": lambda: load_csv(csv, size=8, seed=seed),
             "cross_validation": lambda: cross_validation(load_dataset("synthetic", size=8), k=3, seed=seed)}
    if seed == 2**32:
        calls["load_dataset"] = lambda: load_dataset(tmp_path, size=8, seed=seed)
    for name, call in calls.items():
        with pytest.raises(DataError, match=r"expected seed to be an integer (>= 0|from 0 to 4294967295 \(the seeds "
                                            rf"scikit-learn takes\)), got {re.escape(repr(seed))}$") as err:
            call()
        assert err.value.arg == "seed", name


def test_npz_uint64_labels_above_int64_are_refused(tmp_path):
    """uint64 label 2**64 - 1 (an "unknown" marker) wrapped to -1 on the cast to int64 and loaded as a label."""
    labels = (np.arange(12) % 2).reshape(-1, 1).astype(np.uint64)
    labels[3] = 2**64 - 1
    with pytest.raises(DataError, match=r"u\.npz \[train\]: expected train_labels to be class indices 0 to K-1, got "
                                        r"18446744073709551615$"):
        load_dataset(write_npz(tmp_path / "u.npz", train_labels=labels))
    s = load_dataset(write_npz(tmp_path / "v.npz", train_labels=(np.arange(12) % 2).astype(np.uint64)))
    assert s.train.tensors[1].dtype == torch.int64 and s.train.tensors[1].tolist() == [0, 1] * 6


@pytest.mark.parametrize("seed", [2**32, 2**70])
def test_moons_seed_above_what_scikit_learn_takes_is_refused_by_name(seed):
    """make_moons' RandomState takes seeds below 2**32: 2**32 was numpy's bare "Seed must be between 0 and 2**32 - 1",
    2**70 a TypeError about casting dtype('O')."""
    with pytest.raises(DataError, match=rf"^moons: expected seed to be an integer from 0 to 4294967295 \(the seeds "
                                        rf"scikit-learn takes\), got {seed}$") as err:
        load_dataset("moons", seed=seed)
    assert err.value.arg == "seed"


def test_classes_must_be_an_ordered_list_of_names(tmp_path):
    """classes= a set took the set's order, which string hashing changes from run to run (so did the labels);
    int names were a TypeError traceback for folders and, for a CSV of labels 0/1, "requested class(es) 0, 1 have no
    rows (labels present: 0, 1)"; classes=5 was "'int' object is not iterable"."""
    for c, v in (("benign", 50), ("malignant", 200)):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{c}{i}.png", (8, 8), v)
    csv = _ham(tmp_path, ["0", "1"] * 10)
    for source in (tmp_path, csv):
        with pytest.raises(DataError, match=r"expected classes to be a list or tuple of names in label order such as "
                                            r"\('benign', 'malignant'\), got \{") as err:
            load_dataset(source, size=8, classes={"benign", "malignant"})
        assert err.value.arg == "classes"
        with pytest.raises(DataError, match=r"expected classes to be a list or tuple of names .*, got 5$"):
            load_dataset(source, size=8, classes=5)
        with pytest.raises(DataError, match=r"expected classes to be names \(strings\), got 0 of type int; write '0'$"):
            load_dataset(source, size=8, classes=(0, 1))
        with pytest.raises(DataError, match=r"expected classes to be names \(strings\), got None of type NoneType$"):
            load_dataset(source, size=8, classes=("1", None))
    assert load_dataset(tmp_path, size=8, classes=["malignant", "benign"]).info.class_names == ("malignant", "benign")
    assert load_dataset(csv, size=8, classes=("1", "0")).info.class_names == ("1", "0")


@pytest.mark.parametrize("size", ["28", True, 28.0])
def test_medmnist_size_must_be_an_integer(tmp_path, size):
    """size="28" on a 28x28 .npz was "images are 28x28, but size=28 was requested"."""
    path = write_npz(tmp_path / "g.npz")
    for spec in (path, "breastmnist"):  # the name is refused before any file is looked up
        with pytest.raises(DataError, match=rf"expected size to be an integer \(pixels\), got "
                                            rf"size={re.escape(repr(size))}$") as err:
            load_dataset(spec, size=size)
        assert err.value.arg == "size"
    assert load_dataset(path, size=28).info.image_size == 28


def test_cross_validation_takes_medmnist_column_labels_and_names_float_ones():
    """Labels [N, 1] (MedMNIST's shape, which fit takes) were numpy's "object too deep for desired array"; float
    labels numpy's "Cannot cast array data from dtype('float32') to dtype('int64')"."""
    from torch.utils.data import TensorDataset

    from robust_ops.data import DatasetSplits, synthetic_splits

    s = synthetic_splits(size=8, sizes={"train": 24, "val": 6, "test": 6})
    column = DatasetSplits(*(TensorDataset(d.tensors[0], d.tensors[1][:, None]) for d in (s.train, s.val, s.test)),
                           s.info)
    for a, b in zip(cross_validation(column, k=3), cross_validation(s, k=3)):  # the same folds
        for part in ("train", "val", "test"):
            assert all(torch.equal(p, q) for p, q in zip(getattr(a, part).tensors, getattr(b, part).tensors))
    floats = DatasetSplits(*(TensorDataset(d.tensors[0], d.tensors[1].float()) for d in (s.train, s.val, s.test)),
                           s.info)
    with pytest.raises(DataError, match=r"^cross_validation: expected integer class labels, got the labels of dtype "
                                        r"torch.float32; class numbers stored as floats \(0\., 1\., \.\.\.\)\? "
                                        r"convert them with \.long\(\)$"):
        cross_validation(floats, k=3)


def test_fits_label_dtype_error_says_the_fix():
    """fit's label rule (class_labels, shared with evaluate, report and cross_validation) refused bool or float labels
    naming only the dtype ("fit: expected integer class labels, got y of dtype torch.bool"), where the attacks' and
    evaluate's said the fix: it appends the same context.label_dtype_fix (.long() or .argmax(1)). The refusal stays:
    converting silently would turn 0.7 into 0."""
    from torch.utils.data import TensorDataset

    from robust_ops import defenses
    from robust_ops.attacks.context import label_dtype_fix
    from robust_ops.train import fit

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1])
    for labels, fix in ((y > 0, r"; convert them with \.long\(\) \(False is class 0, True class 1\)"),
                        (y.float()[:, None], r"; class numbers stored as floats \(0\., 1\., \.\.\.\)\? convert them "
                                             r"with \.long\(\)"),
                        (torch.nn.functional.one_hot(y).float(), r"; one-hot or probability rows\? take their "
                                                                 r"\.argmax\(1\)"),
                        (torch.nn.functional.one_hot(y).bool(), r"; one-hot rows\? take their \.argmax\(1\)")):
        with pytest.raises(TypeError, match=rf"^fit: expected integer class labels, got y of dtype {labels.dtype}"
                                            rf"{fix}$"):
            fit(model, defenses.Standard(), TensorDataset(x, labels), epochs=1, progress=False)
        assert re.fullmatch(fix, label_dtype_fix(labels))  # the attacks' one function, not a copy of its rule


@pytest.mark.parametrize("seed", [-1, "a", 1.5, True, [0, -1]])
def test_synthetic_ultrasound_refuses_a_bad_seed_by_name(seed):
    """numpy's "expected non-negative integer" / "SeedSequence expects int ..." named neither function nor argument,
    and seed=True drew seed 1's images (synthetic_splits already refused it)."""
    bad = seed[1] if isinstance(seed, list) else seed
    with pytest.raises(DataError, match=rf"^synthetic: expected seed to be an integer >= 0, got "
                                        rf"{re.escape(repr(bad))}$"):
        synthetic_ultrasound(2, size=8, seed=seed)
    assert torch.equal(synthetic_ultrasound(2, size=8, seed=[3, 1])[0], synthetic_ultrasound(2, size=8, seed=[3, 1])[0])


def test_npz_float_images_above_one_are_told_the_fix_their_values_call_for(tmp_path):
    """Every float set without negatives was told "divide them by 255 or store them as uint8": an overshoot of
    resampling ([0, 1.02]) and 12-bit intensities ([0, 4095]) too. The rule is the attacks' and evaluate's
    (pixel_scale): 8-bit pixels, higher bit depths, or an overshoot to clip (found by the checks helper)."""
    floats = np.random.default_rng(1).random((12, 28, 28)).astype(np.float32)
    floats[0, 0, :2] = 0.0, 1.0
    for top, fix in ((255, r"divide them by 255 or store them as uint8"),
                     (4095, r"12- or 16-bit intensities\? divide them by their scale's top \(4095 for 12 bits, 65535 "
                            r"for 16\) or store them as 8-bit images"),
                     (1.02, r"clip an overshoot of rounding or resampling \(np.clip\(images, 0, 1\)\), or scale them "
                            r"to \[0, 1\] pixels: the attacks' radii and clip range are in \[0, 1\] pixels")):
        with pytest.raises(DataError, match=rf"float images must lie in \[0, 1\], got \[0, {top}\]; {fix}$"):
            load_dataset(write_npz(tmp_path / f"{top}.npz", train_images=(floats * top).astype(np.float32)))


def test_npz_float_images_of_a_dark_or_overshooting_set_are_told_the_fix_for_them(tmp_path):
    """A dark 0-255 set ([0, 8]) was told to clip (np.clip(images, 0, 1) wipes it out), 0-255 pixels overshooting to
    262 "12- or 16-bit intensities?", and a resampling's small negatives ([-1e-05, 1], [-0.03, 1.04]) a mean/std
    normalization, where [0, 1.02] was told to clip (found by the pixels helper)."""
    floats = np.random.default_rng(1).random((12, 28, 28)).astype(np.float32)
    floats[0, 0, :2] = 0.0, 1.0
    clip = r"clip an overshoot of rounding or resampling \(np.clip\(images, 0, 1\)\)"
    for name, images, fix in (
            ("dark", floats * 8, r"got \[0, 8\]; a dark set of 0-255 pixels\? divide them by 255 or store them as "
                                 r"uint8; else scale them to \[0, 1\] pixels -- clipping would wipe them out: "),
            ("over", floats * 262, r"got \[0, 262\]; divide them by 255 \(then np.clip\(images, 0, 1\) for the "
                                   r"overshoot past 255\) or store them as uint8$"),
            ("tiny", floats - np.float32(1e-05) * (floats == 0), r"got \[-1e-05, 1\]; " + clip),
            ("ring", floats * np.float32(1.07) - np.float32(0.03), r"got \[-0.03, 1.04\]; " + clip)):
        with pytest.raises(DataError, match=rf"float images must lie in \[0, 1\], {fix}"):
            load_dataset(write_npz(tmp_path / f"{name}.npz", train_images=images.astype(np.float32)))


def test_npz_float_images_in_ct_hounsfield_units_are_told_to_window_them(tmp_path):
    """CT slices saved in Hounsfield units ([-1000, 3000]: air -1000) were told "store the pixels in [0, 1], not
    normalized by a mean and std: normalize inside the model (robust_ops.attacks.Normalized)", which they are not
    (found by the persona helper)."""
    floats = np.random.default_rng(1).random((12, 28, 28)).astype(np.float32)
    floats[0, 0, :2] = 0.0, 1.0
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\], got \[-1000, 3000\]; CT Hounsfield "
                                        r"units\? window them onto \[0, 1\] pixels: \(np.clip\(images, lo, hi\) - "
                                        r"lo\) / \(hi - lo\) for the window \[lo, hi\] they are read in \(e.g. "
                                        r"-1000, 400 for lung or -160, 240 for soft tissue\) -- the attacks' radii and "
                                        r"clip range are in \[0, 1\] pixels$"):
        load_dataset(write_npz(tmp_path / "ct.npz", train_images=floats * np.float32(4000) - np.float32(1000)))


def test_npz_float_images_past_every_bit_depth_are_told_to_scale_them(tmp_path):
    """Floats without negatives past every bit depth's top (and a quarter more: 65535 * 1.25) are told to scale them
    to [0, 1] pixels, not the mean/std normalization fix of negatives; no test read that branch (found by the mut50
    helper)."""
    floats = np.random.default_rng(1).random((12, 28, 28)).astype(np.float32)
    floats[0, 0, :2] = 0.0, 1.0
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\], got \[0, 1e\+05\]; scale them to "
                                        r"\[0, 1\] pixels: the attacks' radii and clip range are in \[0, 1\] "
                                        r"pixels$"):
        load_dataset(write_npz(tmp_path / "wide.npz", train_images=floats * np.float32(100000)))


def test_npz_float_images_just_past_the_range_show_the_values_past_it(tmp_path):
    """The .npz loader showed the values of a float set outside [0, 1] in 4 digits: a resampling's overshoot to
    1.00001 read "float images must lie in [0, 1], got [0, 1]", values that seem inside it (-1e-05 read so already).
    They are shown in as many digits as show them past the range now, as the attacks' and evaluate's refusals show
    them (past_bound) (found by the revA helper)."""
    floats = np.random.default_rng(1).random((12, 28, 28)).astype(np.float32)
    floats[0, 0, :2] = 0.0, 1.00001
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\], got \[0, 1.00001\]; clip an overshoot "):
        load_dataset(write_npz(tmp_path / "over.npz", train_images=floats))


def test_npz_float_images_below_zero_are_refused(tmp_path):
    """docs/getting-started.md: float images are read only when already in [0, 1]; a normalized set (values below 0,
    none above 1) must be refused like one above 1, not read as is."""
    floats = np.random.default_rng(1).random((12, 28, 28)).astype(np.float32) - 0.5
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\], got \[-0\.4999, 0\.4999\]; store the "
                                        r"pixels in \[0, 1\], not normalized by a mean and std: normalize inside the "
                                        r"model \(robust_ops\.attacks\.Normalized\), as the attacks' radii and clip "
                                        r"range are in \[0, 1\] pixels$"):
        load_dataset(write_npz(tmp_path / "neg.npz", train_images=floats))


def test_npz_float_images_out_of_range_say_how_to_fix_them(tmp_path):
    """An RGB set saved as floats 0-255 (numpy's astype(float)) or normalized with ImageNet's mean / std was refused as
    "float images must lie in [0, 1], got [...]" alone: the error now says what to do with each."""
    rgb = np.random.default_rng(1).random((12, 8, 8, 3)).astype(np.float32)
    with pytest.raises(DataError, match=r"got \[[\d.]+, [\d.]+\]; divide them by 255 or store them as uint8$"):
        load_dataset(write_npz(tmp_path / "f255.npz", shape=(8, 8, 3), train_images=rgb * 255))
    # numpy's astype(float) of uint8 pixels: 0-255 floats whose darkest pixel is 0, not a normalized set
    pixels = np.random.default_rng(2).integers(0, 256, (12, 8, 8, 3)).astype(np.float32)
    pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255
    with pytest.raises(DataError, match=r"got \[0, 255\]; divide them by 255 or store them as uint8$"):
        load_dataset(write_npz(tmp_path / "u8.npz", shape=(8, 8, 3), train_images=pixels))
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    with pytest.raises(DataError, match=r"not normalized by a mean and std: normalize inside the model "
                                        r"\(robust_ops\.attacks\.Normalized\)"):
        load_dataset(write_npz(tmp_path / "imagenet.npz", shape=(8, 8, 3), train_images=(rgb - mean) / std))


def test_npz_float_labels_are_refused_not_truncated(tmp_path):
    """Labels are class indices: float labels (1.5) would be truncated to 1 by the int64 cast without a word. Whole
    float labels are told .astype(np.int64); a 1.5 was told it too, which truncates it (found by the fix2 helper)."""
    labels = (np.arange(12) % 2).astype(np.float32)
    with pytest.raises(DataError, match=r"t\.npz \[train\]: expected integer train_labels, got dtype float32; class "
                                        r"numbers stored as floats \(0\., 1\., \.\.\.\)\? convert them with "
                                        r"\.astype\(np\.int64\)$"):
        load_dataset(write_npz(tmp_path / "t.npz", train_labels=labels))
    labels[1] = 1.5
    with pytest.raises(DataError, match=r"s\.npz \[train\]: expected integer train_labels, got dtype float32; not "
                                        r"class numbers \(1\.5 is not whole\): soft labels or probabilities\? give "
                                        r"each sample's class index, 0 to K-1$"):
        load_dataset(write_npz(tmp_path / "s.npz", train_labels=labels))


def test_npz_one_hot_labels_are_told_the_argmax(tmp_path):
    """One-hot label rows (N, K) in an .npz were "expected train_labels of shape (N,) or (N, 1), got (12, 2)
    (multi-label sets are not supported)", naming no fix for a single-label set stored one-hot."""
    onehot = np.eye(2, dtype=np.float32)[np.arange(12) % 2]
    with pytest.raises(DataError, match=r"o\.npz \[train\]: expected train_labels of shape \(N,\) or \(N, 1\), got "
                                        r"\(12, 2\); one-hot rows\? store their \.argmax\(1\) \(multi-label sets are "
                                        r"not supported\)$"):
        load_dataset(write_npz(tmp_path / "o.npz", train_labels=onehot))
    assert len(load_dataset(write_npz(tmp_path / "a.npz", train_labels=onehot.argmax(1))).train) == 12


@pytest.mark.parametrize("labels, fix", [
    (np.arange(12) % 2 == 1, r"bool; convert them with \.astype\(np\.int64\) \(False is class 0, True class 1\)"),
    ((np.arange(12) % 2).astype(np.float64)[:, None], r"float64; class numbers stored as floats \(0\., 1\., "
                                                      r"\.\.\.\)\? convert them with \.astype\(np\.int64\)"),
    (np.array(["benign", "malignant"] * 6), r"<U9; class names\? map each name to its index, 0 to K-1"),
    (np.array([b"benign", b"malignant"] * 6), r"\|S9; class names\? map each name to its index, 0 to K-1"),
    ((np.arange(12) % 2).astype(np.complex64), r"complex64")])
def test_npz_labels_of_another_dtype_are_told_the_fix(tmp_path, labels, fix):
    """The .npz loader refused bool, float and string labels naming only the dtype ("expected integer train_labels,
    got dtype bool"): it appends the fix (the label rule's one label_dtype_fix, with numpy's conversion); complex
    labels have none."""
    with pytest.raises(DataError, match=rf"l\.npz \[train\]: expected integer train_labels, got dtype {fix}$"):
        load_dataset(write_npz(tmp_path / "l.npz", train_labels=labels))


def test_load_dataset_looks_a_medmnist_name_up_in_root(tmp_path, monkeypatch, as_official):
    """docs/getting-started.md: load_dataset(..., root=) is where MedMNIST names are looked up (before
    $ROBUST_OPS_DATA and ~/.medmnist)."""
    root = tmp_path / "root"
    root.mkdir()
    path = as_official(write_npz(root / "breastmnist_64.npz", shape=(64, 64)))
    monkeypatch.setenv("ROBUST_OPS_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_dataset("breastmnist_64", root=root).info.source == str(path)


def test_cross_validation_refuses_groups_that_do_not_match_the_samples():
    """A DatasetSplits whose groups hold fewer keys than samples: a DataError naming both counts, not scikit-learn's
    "inconsistent numbers of samples"."""
    from robust_ops.data import DatasetSplits, synthetic_splits

    s = synthetic_splits(size=8, sizes={"train": 24, "val": 6, "test": 6})
    short = DatasetSplits(s.train, s.val, s.test, s.info, groups=(np.arange(24), np.arange(6), np.arange(5)))
    with pytest.raises(DataError, match=r"^cross_validation: DatasetSplits.groups holds 35 group keys for 36 "
                                        r"samples$"):
        cross_validation(short, k=3)


def test_grouped_split_labels_a_group_by_its_most_frequent_label_ties_the_lowest(monkeypatch):
    """core.grouped_split's contract: each group is stratified by its most frequent label, a tie going to the lowest
    label, and every sample follows its group."""
    from robust_ops.data import core

    seen = {}
    real = core._stratified_parts

    def spy(y, *args, **kwargs):
        seen["y"] = np.asarray(y).tolist()
        return real(y, *args, **kwargs)

    monkeypatch.setattr(core, "_stratified_parts", spy)
    y = np.array([1, 0, 1, 0, 0, 1, 1, 1] + [0, 1] * 6)
    groups = np.array(["a", "a", "a", "b", "b", "b", "c", "c"] + [f"g{i // 2}" for i in range(12)])
    parts = core.grouped_split(y, groups, (0.5, 0.5), 0)
    assert seen["y"] == [1, 0, 1] + [0] * 6  # a: 2 x 1; b: 2 x 0; c: 1; g0..g5: one 0 and one 1 each -> 0
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))
    assert not set(groups[parts[0]]) & set(groups[parts[1]])


def test_grouped_split_messages_count_groups_in_their_own_noun():
    """grouped_split stratifies groups, so its warning and error count groups: they said '3 samples' of a class in 3
    lesions (6 images), and 'too few samples (1)' of one lesion of three images."""
    from robust_ops.data import core

    y = np.array([0] * 40 + [1] * 40 + [2] * 6)
    groups = np.array([f"g{i // 2}" for i in range(80)] + ["r1", "r1", "r2", "r2", "r3", "r3"])
    with pytest.warns(UserWarning, match=r"^toy \(split by lesion_id\): a class is too small to stratify the "
                                         r"0.7/0.1/0.2 split \(smallest: rare, 3 lesion_id groups\)"):
        core.grouped_split(y, groups, (0.7, 0.1, 0.2), 0, source="toy", class_names=["a", "b", "rare"],
                           group_name="lesion_id")
    with pytest.raises(DataError, match=r"^toy \(split by lesion_id\): too few lesion_id groups \(1\) for a "
                                        r"0.7/0.1/0.2 split; expected at least one lesion_id group per part$"):
        core.grouped_split(np.array([0, 0, 1]), np.array(["a"] * 3), (0.7, 0.1, 0.2), 0, source="toy",
                           group_name="lesion_id")


def test_npz_with_more_classes_than_its_medmnist_name_lists_keeps_them(tmp_path, as_official):
    """A breastmnist_64.npz holding labels 0-2: its two BreastMNIST names cannot describe label 2, so the classes are
    its label indices (all three), never two classes with a label 2 no output can take."""
    s = load_dataset(as_official(write_npz(tmp_path / "breastmnist_64.npz", shape=(64, 64), classes=3)))
    assert s.info.num_classes == 3 and s.info.class_names == ("0", "1", "2") and s.info.positive_class is None


def test_a_name_that_only_starts_like_a_medmnist_set_is_not_one():
    """breastmnist_65 (no such size) or breastmnistx must not load breastmnist.npz: the whole name is matched."""
    for spec in ("breastmnist_65", "breastmnistx"):
        with pytest.raises(DataError, match=rf"^{spec}: no such file or folder, and not a known dataset name"):
            load_dataset(spec)


def test_csv_image_lookup_skips_files_that_are_not_images(tmp_path):
    """docs/getting-started.md: images are <image_id>.<ext> with <ext> an image suffix; an annotation beside an image
    (img_0.json, img_0.txt) is neither a second match nor read as the image."""
    rows = ["image_id,dx"]
    for i in range(10):
        rows.append(f"img_{i},{('nv', 'mel')[i % 2]}")
        _png(tmp_path / f"img_{i}.png", (8, 8), 20 * i)
        (tmp_path / f"img_{i}.json").write_text("{}")
    (tmp_path / "img_0.txt").write_text("note")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="too small to stratify"):
        s = load_dataset(tmp_path / "meta.csv", size=8)
    assert len(s.train) + len(s.val) + len(s.test) == 10


def test_busi_image_coloured_only_in_blue_keeps_its_colour(tmp_path):
    """An image is colour when any channel differs from another: one whose red and green agree but blue differs
    (a blue-tinted scan) must not be read as grayscale, dropping its colour."""
    from PIL import Image

    colour = _class_folders(tmp_path / "blue")
    Image.fromarray(np.dstack([np.full((8, 8), v, np.uint8) for v in (90, 90, 200)])).save(colour / "benign" / "b.png")
    with pytest.warns(UserWarning, match="too small to stratify"):
        assert load_dataset(colour, size=8).info.in_channels == 3


# ---------------------------------------------------------------------------------------------------------------------
# Mutation pass (data, 2): download permission, names, value ranges, seeds, moons defaults, IndexedDataset, lookup


def test_a_missing_medmnist_file_is_downloaded_only_when_asked(tmp_path, monkeypatch):
    """docs/getting-started.md: a MedMNIST name is never downloaded unless asked (download=True, --download)."""
    monkeypatch.setenv("ROBUST_OPS_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(mm, "_try_download", lambda *args: calls.append(args) or "the reason it could not")
    with pytest.raises(DataError, match=r"dermamnist\.npz not found"):
        load_dataset("dermamnist")
    assert calls == []
    with pytest.raises(DataError, match=r"\(download=True: the reason it could not\)$"):
        load_dataset("dermamnist_64", root=tmp_path, download=True)
    assert calls == [("dermamnist", tmp_path, 64)]


def _fake_medmnist(monkeypatch, init, version="2.2.3"):
    """A medmnist module of ``version`` whose DermaMNIST's constructor is ``init``, in place of the package."""
    import types

    module = types.ModuleType("medmnist")
    module.__version__, module.INFO = version, {"dermamnist": {"python_class": "DermaMNIST"}}
    module.DermaMNIST = type("DermaMNIST", (), {"__init__": init})
    monkeypatch.setitem(sys.modules, "medmnist", module)


def _failed_download(spec, root):
    with pytest.raises(DataError) as err:
        load_dataset(spec, root=root, download=True)
    return str(err.value)


def test_a_failed_download_says_why(tmp_path, monkeypatch):
    """Every failure of a download through the medmnist package read "not installed, or offline": a medmnist 2.x
    without MedMNIST+'s size argument, or the download's own error, was swallowed. The error now names the cause."""
    monkeypatch.setenv("ROBUST_OPS_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))

    def fake_medmnist(init, version="2.2.3"):
        _fake_medmnist(monkeypatch, init, version)

    def load(spec):
        return _failed_download(spec, tmp_path)

    monkeypatch.setitem(sys.modules, "medmnist", None)  # import fails
    assert load("dermamnist").endswith("(download=True: the medmnist package is not installed)")
    fake_medmnist(lambda self, split, download, root: None)  # 2.x: no size
    assert load("dermamnist_64").endswith("(download=True: medmnist 2.2.3 has no size argument; MedMNIST+ files "
                                          "need medmnist 3 or later)")
    assert load("dermamnist").endswith(f"(download=True: the medmnist package left no dermamnist.npz in {tmp_path})")

    def offline(self, split, download, root, size=28):
        raise OSError("Network is unreachable\nsecond line")

    fake_medmnist(offline, "3.0.2")
    assert load("dermamnist_64").endswith("(download=True: the medmnist package could not download it: OSError: "
                                          "Network is unreachable)")


def test_a_28x28_download_passes_no_size_and_an_error_without_text_is_named_by_its_type(tmp_path, monkeypatch):
    """28x28 is MedMNIST v2's own size: dermamnist_28 goes to a medmnist 2.x without a size argument (not "needs
    medmnist 3") and is sent to v2 when missing; a download error with no text ends with its type alone (mutation
    pass: passing size=28, naming MedMNIST+ for an explicit 28, and a trailing ": " all passed)."""
    monkeypatch.setenv("ROBUST_OPS_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    _fake_medmnist(monkeypatch, lambda self, split, download, root: None)  # 2.x: no size
    message = _failed_download("dermamnist_28", tmp_path)
    assert "download it from MedMNIST v2 and put it" in message, message
    assert message.endswith(f"(download=True: the medmnist package left no dermamnist.npz in {tmp_path})"), message

    def silent(self, split, download, root, size=28):
        raise OSError()

    _fake_medmnist(monkeypatch, silent, "3.0.2")
    assert _failed_download("dermamnist_64", tmp_path).endswith(
        "(download=True: the medmnist package could not download it: OSError)")


def test_a_large_official_file_rewritten_in_place_at_the_same_size_is_hashed_again(tmp_path, monkeypatch):
    """The remembered checksum is keyed by the file's time stamps too: a same-size rewrite of the same inode (an
    editor, a failed copy over it) is another file (mutation pass: a key of path, inode and size alone passed)."""
    p = write_npz(tmp_path / "breastmnist_64.npz", shape=(8, 8))
    monkeypatch.setitem(mm.PLUS_MD5, "breastmnist_64.npz", mm.file_md5(p))
    monkeypatch.setattr(mm, "_REMEMBER_FROM_BYTES", 0)
    mm.check_md5(p)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    st = os.stat(p)
    with open(p, "r+b") as f:  # the same inode and size, other bytes
        f.write(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later stamp, whatever the clock's resolution
    with pytest.raises(DataError, match=r"breastmnist_64\.npz: MD5 [0-9a-f]{32} does not match"):
        mm.check_md5(p)


def test_a_name_ending_in_mnist_that_medmnist_lacks_is_not_a_known_name():
    """Only MedMNIST's own sets are names: fashionmnist is "not a known dataset name", not "fashionmnist.npz not
    found" (which told the user to go and download a file MedMNIST never released)."""
    with pytest.raises(DataError, match=r"^fashionmnist: no such file or folder, and not a known dataset name"):
        load_dataset("fashionmnist")


def test_npz_file_names_in_other_case_keep_their_medmnist_classes(tmp_path, as_official):
    """The file name's set is matched case-insensitively: BreastMNIST_64.npz is BreastMNIST (0 = malignant, the
    positive class), not two unnamed classes with 1 positive."""
    s = load_dataset(as_official(write_npz(tmp_path / "BreastMNIST_64.npz", shape=(64, 64))))
    assert s.info.name == "breastmnist" and s.info.class_names[0] == "malignant" and s.info.positive_class == 0


def test_npz_float_images_may_reach_both_ends_of_0_1(tmp_path):
    """Float images are read when in [0, 1], both ends included (black and white pixels), as float32 even when
    stored as float64 (the models' and attacks' dtype)."""
    floats = np.random.default_rng(1).random((12, 28, 28))
    floats[0], floats[1] = 0.0, 1.0
    s = load_dataset(write_npz(tmp_path / "f.npz", train_images=floats))  # float64
    x = s.train.tensors[0]
    assert x.dtype == torch.float32 and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(x[:, 0], torch.from_numpy(floats.astype(np.float32)))


def test_the_largest_seed_scikit_learn_takes_is_taken():
    """Seeds run from 0 to 2**32 - 1 (MAX_SKLEARN_SEED) inclusive: the last one splits, 2**32 is refused."""
    from robust_ops.data.core import MAX_SKLEARN_SEED, stratified_split

    y = np.array([0, 1] * 20)
    parts = stratified_split(y, (0.7, 0.1, 0.2), MAX_SKLEARN_SEED)
    assert [len(p) for p in parts] == [28, 4, 8]
    with pytest.raises(DataError, match=r"from 0 to 4294967295"):
        stratified_split(y, (0.7, 0.1, 0.2), MAX_SKLEARN_SEED + 1)


def test_moons_defaults_are_arfls_noise_and_sizes():
    """docs/getting-started.md: noise 0.2, 10,000 train / 1,000 test points (plus 1,000 for validation), each split
    scikit-learn's make_moons drawn from its own stream [seed, split]; label 1 (positive) is the lower moon."""
    from sklearn.datasets import make_moons

    s = load_dataset("moons", seed=5)
    assert [len(s.train), len(s.val), len(s.test)] == [10000, 1000, 1000]
    x, y = make_moons(n_samples=1000, noise=0.2, random_state=np.random.RandomState([5, 2]))
    assert torch.equal(s.test.tensors[0], torch.from_numpy(x.astype(np.float32)))
    assert torch.equal(s.test.tensors[1], torch.from_numpy(y))
    assert s.info.class_names == ("upper moon", "lower moon") and s.info.positive_class == 1
    assert float(s.test.tensors[0][y == 1, 1].mean()) < float(s.test.tensors[0][y == 0, 1].mean())


def test_cross_validation_folds_record_the_classes_their_parts_lack():
    """A fold's info records its own classes_missing_from_split (run.json): a validation part too small to hold every
    class says which it lacks, so its macro averages are known to run over the others."""
    splits, _ = _indexed_splits()
    with pytest.warns(UserWarning, match="too small to stratify"):  # 2 validation samples for 3 classes
        folds = cross_validation(splits, k=5, seed=0, val_fraction=0.03)
    for f in folds:
        lacking = sorted(set(range(3)) - set(f.val.tensors[1].tolist()))
        assert lacking and f.info.extra["classes_missing_from_split"] == {"val": [f"c{c}" for c in lacking]}
    # without a validation part the others keep their names: lesions L1 and L2 hold every b, and scikit-learn's
    # StratifiedGroupKFold puts both in one fold's test part
    from torch.utils.data import TensorDataset

    from robust_ops.data import DatasetInfo, DatasetSplits

    y = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0])
    groups = np.array(["L0", "L1", "L1", "L1", "L2", "L2", "L3", "L3"])
    info = DatasetInfo(name="t", num_classes=2, in_channels=1, image_size=0, class_names=("a", "b"),
                       extra={"split_by": "lesion_id"})
    none = TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.int64))
    lesions = DatasetSplits(TensorDataset(torch.zeros(8, 1), y), none, none, info, (groups, groups[:0], groups[:0]))
    folds = cross_validation(lesions, k=2, seed=0, val_fraction=0)
    assert [f.info.extra["classes_missing_from_split"] for f in folds] == [{"train": ["b"]}, {"test": ["b"]}]


def test_indexed_dataset_first_index_list_items_and_map_style_only():
    """IndexedDataset: -len is the first sample (id 0), a list item gains its id as a last field like a tuple item,
    and a dataset without __len__ (an iterable) is refused when wrapped, not at the first item."""
    from torch.utils.data import TensorDataset

    from robust_ops.data import IndexedDataset

    base = TensorDataset(torch.rand(5, 1, 2, 2), torch.arange(5))
    assert IndexedDataset(base)[-5][2] == 0

    class Lists(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return [torch.zeros(1), i * 10]

    item = IndexedDataset(Lists())[2]
    assert len(item) == 3 and item[1:] == (20, 2)
    with pytest.raises(TypeError, match=r"^IndexedDataset: expected a map-style dataset \(with __getitem__ and "
                                        r"__len__\), got generator$"):
        IndexedDataset(x for x in range(3))

    class Stream(torch.utils.data.IterableDataset):  # torch's Dataset gives it a __getitem__, not a __len__
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match=r"^IndexedDataset: expected a map-style dataset .*, got Stream$"):
        IndexedDataset(Stream())


def test_npz_with_an_empty_split_of_float_images_loads(tmp_path):
    """A split may be empty (the class count skips it): an empty float split has no minimum to check against
    [0, 1], which must not stop the load."""
    s = load_dataset(write_npz(tmp_path / "e.npz", n=(12, 0, 6), val_images=np.zeros((0, 28, 28), np.float32)))
    assert len(s.val) == 0 and s.val.tensors[0].shape == (0, 1, 28, 28) and s.info.num_classes == 2


def test_load_dataset_reads_names_and_the_npz_suffix_in_any_case(tmp_path):
    """Generated sets' names and the .npz suffix are matched in any case: "Synthetic-BUS" is the generated set, and
    A.NPZ an npz file (not "not a dataset this library reads")."""
    assert load_dataset("Synthetic-BUS").info.name == "synthetic-bus"
    assert load_dataset(write_npz(tmp_path / "a.npz").rename(tmp_path / "A.NPZ")).info.source == str(tmp_path / "A.NPZ")


def test_synthetic_labels_default_to_the_documented_malignant_fraction():
    """MALIGNANT_FRACTION 0.4 (BUS sets' share of malignant lesions) is the default: its labels are exactly those of
    malignant_fraction=0.4 (a share within sampling noise of 0.4, as the 384-image check allows, is not)."""
    default = synthetic_ultrasound(200, size=8, seed=0)[1]
    assert torch.equal(default, synthetic_ultrasound(200, size=8, seed=0, malignant_fraction=0.4)[1])


def test_medmnist_lookup_skips_a_folder_named_like_the_file(tmp_path, monkeypatch):
    """A folder named breastmnist.npz in root is not the file: the lookup goes on to $ROBUST_OPS_DATA."""
    (tmp_path / "root" / "breastmnist.npz").mkdir(parents=True)
    env = tmp_path / "env"
    env.mkdir()
    (env / "breastmnist.npz").touch()
    monkeypatch.setenv("ROBUST_OPS_DATA", str(env))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert mm.find_medmnist("breastmnist", tmp_path / "root") == env / "breastmnist.npz"


def test_download_goes_through_the_medmnist_package_into_root(tmp_path, monkeypatch, as_official):
    """download=True fetches a missing file with the medmnist package into root (the folder the user named, where
    the lookup then finds it), passing size= for sizes other than 28."""
    import sys
    import types

    calls = []

    class DermaMNIST:
        def __init__(self, split, download, root, **kwargs):
            calls.append((split, download, root, kwargs))
            as_official(write_npz(Path(root) / f"dermamnist_{kwargs['size']}.npz", shape=(64, 64), classes=7,
                                  n=(14, 7, 7)))

    fake = types.ModuleType("medmnist")
    fake.INFO, fake.DermaMNIST = {"dermamnist": {"python_class": "DermaMNIST"}}, DermaMNIST
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    monkeypatch.setenv("ROBUST_OPS_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    s = load_dataset("dermamnist_64", root=tmp_path / "root", download=True)
    assert calls == [("test", True, str(tmp_path / "root"), {"size": 64})]
    assert s.info.source == str(tmp_path / "root" / "dermamnist_64.npz") and s.info.num_classes == 7


def test_busi_image_with_one_nearly_opaque_pixel_is_refused(tmp_path):
    """Opaque everywhere means alpha 255 in every pixel: a single pixel of alpha 254 is transparency too (the colour
    under it is blended by any viewer, dropped here), so it is refused like alpha 0."""
    from PIL import Image

    rgba = np.full((8, 8, 4), 90, np.uint8)
    rgba[..., 3] = 255
    rgba[3, 4, 3] = 254
    root = _class_folders(tmp_path / "d", n=10)
    Image.fromarray(rgba, "RGBA").save(root / "malignant" / "rgba.png")
    with pytest.raises(DataError, match=r"malignant/rgba\.png: has transparent pixels"):
        load_dataset(root, size=8)


def test_csv_integer_labels_with_a_sign_sort_numerically(tmp_path):
    """Integer labels with a minus sign sort numerically too: -1, 2, 10 (as text "10" would come before "2")."""
    s = load_dataset(_ham(tmp_path, ["-1", "2", "10"] * 10), size=8)
    assert s.info.class_names == ("-1", "2", "10")


def test_csv_sets_get_the_16_bit_set_checks(tmp_path):
    """The set-wide 16-bit check holds for CSV sets as for class folders: 16-bit images all <= 255 would be black."""
    from PIL import Image

    path = _ham(tmp_path, ["mel", "nv"] * 5)
    for image in sorted((tmp_path / "imgs").iterdir()):
        image.unlink()
        Image.fromarray(np.full((8, 8), 200, np.uint16)).save(image.with_suffix(".png"))
    with pytest.raises(DataError, match=r"meta\.csv: every 16-bit image holds values <= 200 only"):
        load_dataset(path, size=8)


def test_load_csv_checks_the_seed_before_looking_for_images(tmp_path):
    """A bad seed is named before any image is looked for or read (not after reading the whole set)."""
    from robust_ops.data import load_csv

    path = _ham(tmp_path, ["mel", "nv"] * 10, images=False)
    with pytest.raises(DataError, match=r"expected seed to be an integer"):
        load_csv(path, size=8, seed=-1)


def test_csv_blank_split_by_is_refused_as_the_argument(tmp_path):
    """split_by "" or "  " is a bad argument (named as split_by=), not a column the CSV lacks (a header's trailing
    comma makes a column named "", which it would then have grouped by)."""
    from robust_ops.data import load_csv

    path = _ham(tmp_path, ["mel", "nv"] * 4, images=False)
    for blank in ("", "  "):
        with pytest.raises(DataError, match=r"expected split_by to be 'auto', 'image' or a column name, got") as info:
            load_csv(path, size=8, split_by=blank)
        assert info.value.arg == "split_by"


def test_hidden_files_and_folders_are_not_data(tmp_path):
    """docs/getting-started.md: names starting with "." and macOS's __MACOSX/ are skipped -- a folder copied from a
    Mac (._NAME.png AppleDouble files, which are no image: they were 'not a readable image'), .DS_Store, a Jupyter
    .ipynb_checkpoints/ (which became a class without images) -- in class folders and under a CSV's folder."""
    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{c}{i}.png", (8, 8), 10 * i)
        (tmp_path / c / f"._{c}0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(64))
        (tmp_path / c / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
        (tmp_path / c / ".thumbnails").mkdir()
        _png(tmp_path / c / ".thumbnails" / f"{c}0.png", (4, 4), 0)
    for hidden in (".ipynb_checkpoints", "__MACOSX", ".Trash-1000"):
        (tmp_path / hidden).mkdir()
        _png(tmp_path / hidden / "benign0.png", (8, 8), 0)
    s = load_dataset(tmp_path, size=8)
    assert s.info.class_names == ("benign", "malignant")
    assert s.info.extra["class_counts"] == {"benign": 10, "malignant": 10}
    assert s.info.extra["excluded_samples"] == 0
    rows = ["image_id,dx"] + [f"{c}{i},{c}" for c in ("benign", "malignant") for i in range(10)]
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    s = load_dataset(tmp_path / "meta.csv", size=8)  # each id matches one file: the hidden copies are no second match
    assert len(s.train) + len(s.val) + len(s.test) == 20


def test_folder_loading_holds_the_images_as_float_once(tmp_path):
    """The loaded set is float32, 4 bytes a pixel: loading built a float copy of the whole pool and then the parts
    beside it (peak 2.3x the data above the imports, 995 MB for 750 RGB images at 224); now the pool stays uint8 and
    each part becomes float alone (1.5x, 633 MB). Measured in a fresh process (ru_maxrss is the process's peak; the
    imports' own peak hides a little of the load's, so this set measured 1.76x before, 0.84x after)."""
    import os

    import robust_ops
    from PIL import Image
    from utils import run_python

    rng = np.random.default_rng(0)
    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(30):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(tmp_path / c / f"{c}{i}.png")
    out = run_python(f"""
import resource
import sklearn.model_selection  # imported first: its import is not the data's memory
from robust_ops.data import load_dataset
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
s = load_dataset({str(tmp_path)!r}, size=256)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / sum(
    p.tensors[0].numel() * p.tensors[0].element_size() for p in (s.train, s.val, s.test)))
""", env={**os.environ, "PYTHONPATH": str(Path(robust_ops.__file__).parents[1])})
    assert float(out) < 1.3, f"peak memory above the imports is {float(out):.2f}x the loaded data"


def test_splits_from_arrays_makes_uint8_parts_float_in_0_1():
    from robust_ops.data import DatasetInfo
    from robust_ops.data.core import splits_from_arrays

    x = torch.arange(40, dtype=torch.uint8).mul(6).reshape(20, 1, 2, 1)
    info = DatasetInfo(name="t", num_classes=2, in_channels=1, image_size=2, class_names=("a", "b"))
    s = splits_from_arrays(x, torch.arange(20) % 2, info, seed=0)
    for part in (s.train, s.val, s.test):
        assert part.tensors[0].dtype == torch.float32
    got = torch.cat([part.tensors[0] for part in (s.train, s.val, s.test)]).flatten().sort().values
    assert torch.equal(got, x.float().div(255.0).flatten().sort().values)


def test_split_parts_keep_the_pool_order_and_unpack_as_train_val_test():
    """Each part of a drawn split lists its samples in the pool's order (sorted indices, not scikit-learn's draw
    order), merged rare classes included; a DatasetSplits unpacks as train, val, test, info (docs/design.md)."""
    from robust_ops.data import DatasetInfo
    from robust_ops.data.core import splits_from_arrays, stratified_split

    y = np.repeat(np.arange(7), [12, 18, 38, 4, 39, 233, 6])
    with pytest.warns(UserWarning, match="too small to stratify"):
        parts = stratified_split(y, (0.7, 0.1, 0.2), 0)
    assert all(np.all(np.diff(p) > 0) for p in parts)
    x = torch.arange(60, dtype=torch.float32).reshape(60, 1, 1, 1)
    info = DatasetInfo(name="t", num_classes=2, in_channels=1, image_size=1, class_names=("a", "b"))
    s = splits_from_arrays(x, torch.arange(60) % 2, info, seed=0)
    for part in (s.train, s.val, s.test):
        assert torch.all(part.tensors[0].flatten().diff() > 0)
    train, val, test, got_info = s
    assert train is s.train and val is s.val and test is s.test and got_info is s.info


def test_folder_images_are_decoded_once_in_threads_first_error_in_order(tmp_path, monkeypatch):
    """Choosing one channel or three (mode None) opened every image that is not grey by its mode a second time before
    reading it (BUSI's grayscale saved as RGB: every image decoded twice, 5.4 s of CPU for 750 images, now 3.5 s);
    now each file is opened once and the choice made as it is read, in torch.get_num_threads() threads, with the
    same pixels as converting each image to the set's mode, and the first damaged file in order named."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (9, 13), dtype=np.uint8)
    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.stack([grey + i] * 3, -1)).save(tmp_path / c / f"{c}{i}_rgb_grey.png")
            Image.fromarray(grey + i).convert("P").save(tmp_path / c / f"{c}{i}_palette.png")
            Image.fromarray((grey + i).astype(np.uint16) * 257).save(tmp_path / c / f"{c}{i}_16.png")
    opened = Counter()
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened[Path(fp).name] += 1
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        s = load_dataset(tmp_path, size=16)
        assert s.info.in_channels == 1 and set(opened.values()) == {1} and len(opened) == 30
        as_l = load_busi(tmp_path, size=16, mode="L")
        for a, b in zip(s, list(as_l)[:3]):
            assert torch.equal(a.tensors[0], b.tensors[0])
        Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).save(tmp_path / "benign" / "colour.png")
        s, as_rgb = load_dataset(tmp_path, size=16), load_busi(tmp_path, size=16, mode="RGB")
        assert s.info.in_channels == 3
        for a, b in zip(s, list(as_rgb)[:3]):
            assert torch.equal(a.tensors[0], b.tensors[0])
        for name in ("benign0_palette.png", "benign1_palette.png"):  # both damaged: the first in order is named
            (tmp_path / "benign" / name).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
        with pytest.raises(DataError, match=r"benign0_palette\.png: not a readable image"):
            load_dataset(tmp_path, size=16)
    finally:
        torch.set_num_threads(threads)


def test_folder_pixels_are_read_as_stored_padded_and_resized_antialiased_as_documented(tmp_path):
    """getting-started.md's folder row said "zero-padded to square then resized" only: the filter (Pillow's bilinear,
    antialiased) and that a JPEG's EXIF orientation is not applied were left to guess; it says both now."""
    from PIL import Image

    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
        for i in range(10):  # 10 a class: a stratified split, no warning
            board = (np.indices((64, 32)).sum(0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard, 32 wide
            Image.fromarray(board).save(tmp_path / c / f"{c}{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to show": a viewer shows this 60 x 20 image as 20 wide, 60 tall
    Image.fromarray(np.full((20, 60), 200, np.uint8)).save(tmp_path / "benign" / "phone.jpg", exif=exif)
    s = load_busi(tmp_path, size=16, mode="L")
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])[:, 0] * 255
    boards = x[(x[:, 8, 8] - 127.5).abs() < 20]  # antialiased: the checkerboard averages to grey, not 0 / 255
    assert len(boards) == 20 and bool((boards[:, :, 4:12] - 127.5).abs().max() < 20)
    assert bool((boards[:, :, :3] == 0).all() and (boards[:, :, 13:] == 0).all())  # padded left and right, black
    (phone,) = x[(x[:, 8, 8] - 200).abs() < 20]  # as stored: wide, so padded above and below
    assert bool((phone[:4] == 0).all() and (phone[12:] == 0).all() and (phone[6:10] > 150).all())
    row = next(line for line in (Path(__file__).parents[1] / "docs/getting-started.md").read_text().splitlines()
               if line.startswith("| `path/to/BUSI/`"))
    assert "antialiased" in row and "EXIF orientation tag is not applied" in row and "aspect ratio kept" in row


# ---------------------------------------------------------------------------------------------------------------------
# MedMNIST family audit: class lists, file-name sizes, official names in any case


def test_every_2d_medmnist_set_names_its_classes(tmp_path, as_official):
    """OCTMNIST, TissueMNIST and Organ{A,C,S}MNIST had no class list: their labels were numbered by the largest one
    present, so a subset lacking the last organ (spleen) loaded as 10 classes and one lacking another was refused as
    holding a gap ("relabel them"). Every single-label 2D set now names its classes, in MedMNIST's label order."""
    counts = {"pathmnist": 9, "dermamnist": 7, "octmnist": 4, "pneumoniamnist": 2, "retinamnist": 5,
              "breastmnist": 2, "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11, "organcmnist": 11,
              "organsmnist": 11}
    assert {name: len(mm.CLASS_NAMES[name][0]) for name in mm.MEDMNIST_NAMES} == counts
    no_spleen = as_official(write_npz(tmp_path / "organamnist_64.npz", n=(20, 10, 10), shape=(8, 8), classes=10))
    s = load_dataset(no_spleen)
    assert s.info.num_classes == 11 and s.info.class_names[10] == "spleen" and s.info.positive_class is None
    no_heart = np.array([0, 1, 2, 4, 5, 6, 7, 8, 9, 10] * 2, np.uint8).reshape(-1, 1)  # label 3 absent
    s = load_dataset(as_official(write_npz(tmp_path / "organsmnist_128.npz", n=(20, 10, 10), shape=(8, 8), classes=11,
                                           train_labels=no_heart)))
    assert s.info.num_classes == 11 and s.info.class_names[3] == "heart"
    s = load_dataset(as_official(write_npz(tmp_path / "octmnist_64.npz", shape=(8, 8), classes=4)))
    assert s.info.class_names == ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal")
    assert s.info.positive_class is None


@pytest.mark.parametrize("file_name", ["BreastMNIST.npz", "breastmnist_28.npz", "BreastMNIST_28.npz"])
def test_an_official_name_in_other_spellings_is_md5_checked(tmp_path, monkeypatch, file_name):
    """BreastMNIST.npz and breastmnist_28.npz take breastmnist.npz's classes from their name (0 = malignant, the
    positive class; load_dataset("breastmnist_28") reads breastmnist.npz) but skipped its MD5 check (MedMNIST names
    no *_28.npz): any file so named loaded as the official set. Both are now checked as breastmnist.npz."""
    p = write_npz(tmp_path / file_name)
    with pytest.raises(DataError, match=rf"{re.escape(file_name)}: MD5 [0-9a-f]{{32}} does not match the official "
                                        r"breastmnist\.npz \(750601b1f35ba3300ea97c75c52ff8f6\)"):
        load_dataset(p)
    monkeypatch.setattr(mm, "file_md5", lambda path: mm.OFFICIAL_MD5["breastmnist.npz"])  # the official bytes
    assert load_dataset(p).info.class_names[0] == "malignant"


def test_an_organ_file_in_other_case_passes_with_its_revised_checksum(tmp_path, monkeypatch):
    """Organ{A,C,S}MNIST's 28x28 files were re-released in MedMNIST v3: either checksum passes, in any case."""
    monkeypatch.setattr(mm, "file_md5", lambda path: mm.REVISED_MD5["organamnist.npz"])
    assert mm.check_md5(write_npz(tmp_path / "OrganAMNIST.npz")) == mm.REVISED_MD5["organamnist.npz"]


def test_an_official_medmnist_plus_name_is_md5_checked(tmp_path, monkeypatch):
    """breastmnist_64.npz, _128 and _224 (MedMNIST+) were checked for layout only: any file so named loaded as
    BreastMNIST. They are now checked against MedMNIST's published checksums, in any case, as the 28x28 files are."""
    p = write_npz(tmp_path / "BreastMNIST_224.npz", shape=(8, 8))
    with pytest.raises(DataError, match=r"BreastMNIST_224\.npz: MD5 [0-9a-f]{32} does not match the official "
                                        r"breastmnist_224\.npz \(b56378a6eefa9fed602bb16d192d4c8b\); the file is "
                                        r"corrupt or not the official release -- download it again, or rename it if "
                                        r"it is a deliberate variant$"):
        load_dataset(p)
    monkeypatch.setitem(mm.PLUS_MD5, "breastmnist_224.npz", mm.file_md5(p))  # as if p held the official bytes
    assert mm.check_md5(p) == mm.file_md5(p)
    assert load_dataset(p).info.class_names[0] == "malignant"
    other = shutil.copy(p, tmp_path / "my_breastmnist_224.npz")  # not an official name: layout only
    assert mm.check_md5(other) is None and load_dataset(other).info.name == "my_breastmnist"


def test_a_large_official_file_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """A MedMNIST+ file of many GB read once more to hash it at every load would double each later load's reading;
    a large file's checksum is remembered by its identity (inode, size, time stamps), a changed file hashed again.
    Small files are always hashed (a same-size rewrite within a time stamp's resolution would look unchanged)."""
    p = write_npz(tmp_path / "breastmnist_64.npz", shape=(8, 8))
    hashed = []
    real_md5 = mm.file_md5
    monkeypatch.setattr(mm, "file_md5", lambda path: hashed.append(path) or real_md5(path))
    monkeypatch.setitem(mm.PLUS_MD5, "breastmnist_64.npz", real_md5(p))
    mm.check_md5(p), mm.check_md5(p)
    assert len(hashed) == 2  # small: hashed every time
    monkeypatch.setattr(mm, "_REMEMBER_FROM_BYTES", 0)
    mm.check_md5(p), mm.check_md5(p), load_dataset(p)
    assert len(hashed) == 3
    write_npz(p, shape=(9, 9))  # another file now: hashed again, and refused
    with pytest.raises(DataError, match=r"breastmnist_64\.npz: MD5 [0-9a-f]{32} does not match"):
        mm.check_md5(p)
    assert len(hashed) == 4


def test_every_2d_medmnist_set_has_a_checksum_for_each_size():
    """One MD5 per official file of each 2D set (ChestMNIST's too, as for 28x28), 32 hex digits; no other entry."""
    names = mm.MEDMNIST_NAMES + mm.MULTI_LABEL_NAMES
    assert set(mm.OFFICIAL_MD5) == {mm._file_name(n, 28) for n in names}
    assert set(mm.PLUS_MD5) == {mm._file_name(n, size) for n in names for size in mm.MEDMNIST_SIZES if size != 28}
    for table in (mm.OFFICIAL_MD5, mm.REVISED_MD5, mm.PLUS_MD5):
        assert all(re.fullmatch(r"[0-9a-f]{32}", md5) for md5 in table.values()), table
    assert mm.PLUS_MD5["breastmnist_64.npz"] == "742edef2a1fd1524b2efff4bd7ba9364"


@pytest.mark.parametrize("spec", ["organmnist3d", "NoduleMNIST3D_64"])
def test_a_medmnist3d_name_is_refused_as_3d_not_as_unknown(spec, tmp_path, monkeypatch):
    """A MedMNIST3D name was "no such file or folder, and not a known dataset name", as a typo would be; it is now
    refused as a 3D set, as its file's (N, D, H, W) volumes are."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"^{spec.lower()}: a MedMNIST3D set \(volumes of D x H x W voxels\); only 2D "
                                        r"images are supported, e.g. pathmnist"):
        load_dataset(spec)
    volume = np.zeros((12, 28, 28, 28), np.uint8)
    with pytest.raises(DataError, match=r"organmnist3d\.npz \[train\]: .*3D volumes such as MedMNIST3D's"):
        load_dataset(write_npz(tmp_path / "organmnist3d.npz", train_images=volume))


def test_a_size_whose_images_cannot_fit_in_memory_is_refused_before_reading(tmp_path, monkeypatch):
    """--size 22400 for 224 ended in numpy's or Pillow's MemoryError traceback (or the kernel's kill) after reading
    for minutes: a folder, a CSV and the synthetic set are refused first, naming size= and the memory each needs."""
    from robust_ops.data import core, folders, load_csv

    def unread(*args, **kwargs):
        raise AssertionError("read before the memory check")

    monkeypatch.setattr(folders, "read_images", unread)
    fits = r"take at least [\d,.]+ GiB as float32, more than this machine's [\d.]+ GiB of memory; give a smaller size=$"
    for load in (lambda: load_busi(_class_folders(tmp_path / "d"), size=10 ** 6),
                 lambda: load_csv(_ham(tmp_path, ["mel", "nv"] * 3), size=10 ** 6),
                 lambda: synthetic_ultrasound(4, size=10 ** 6)):
        with pytest.raises(DataError, match=r"(load_busi|load_csv|synthetic).*: (10|6|4) images of 1000000x1000000 "
                                            r"pixels " + fits) as err:
            load()
        assert err.value.arg == "size"
    # what the machine holds decides: 4 images of 8x8 (1 KiB) and the synthetic set's working space against 1 KiB
    monkeypatch.setattr(core, "physical_memory", lambda: 1024)
    with pytest.raises(DataError, match=r"^synthetic: 4 images of 8x8 pixels take at least .* GiB of memory"):
        synthetic_ultrasound(4, size=8)
    monkeypatch.setattr(core, "physical_memory", lambda: None)  # an OS that does not tell: not checked
    assert synthetic_ultrasound(4, size=8)[0].shape == (4, 1, 8, 8)


def test_load_busi_of_a_file_and_load_csv_of_a_folder_say_what_the_path_is(tmp_path):
    """load_busi of an existing file said "FILE: no such folder" and load_csv of an existing folder "DIR: no such
    file", as for a missing path: each now says what the path is and which loader reads it."""
    from robust_ops.data import load_csv

    (tmp_path / "labels.csv").write_text("image_id,dx\n")
    with pytest.raises(DataError, match=r"^.*labels\.csv: a file, not a folder; load_busi reads a folder of class "
                                        r"folders \(a CSV file: load_csv\)$"):
        load_busi(tmp_path / "labels.csv")
    with pytest.raises(DataError, match=r"^.*: a folder, not a file; load_csv reads a CSV file \(a folder of class "
                                        r"folders: load_busi\)$"):
        load_csv(tmp_path)
    with pytest.raises(DataError, match=r"absent: no such folder$"):  # a missing path: as before
        load_busi(tmp_path / "absent")
    with pytest.raises(DataError, match=r"absent\.csv: no such file$"):
        load_csv(tmp_path / "absent.csv")


def test_cross_validation_refuses_what_is_not_a_dataset_splits_and_data_without_samples():
    """DatasetSplits unpacks as (train, val, test, info): that tuple was "AttributeError: 'tuple' object has no
    attribute 'train'", and splits without a sample torch.cat's "expected a non-empty list of Tensors"; a Subset
    split (no tensors to pool) is named."""
    from torch.utils.data import Subset, TensorDataset

    from robust_ops.data import DatasetSplits

    s = load_dataset("synthetic", size=8)
    with pytest.raises(DataError, match=r"^cross_validation: expected splits to be the DatasetSplits load_dataset "
                                        r"returns, got tuple$"):
        cross_validation(tuple(s), k=2)
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match=r"^cross_validation: the splits hold no samples"):
        cross_validation(DatasetSplits(empty, empty, empty, s.info), k=2)
    with pytest.raises(DataError, match=r"^cross_validation: expected TensorDatasets, got Subset$"):
        cross_validation(DatasetSplits(Subset(s.train, [0, 1]), s.val, s.test, s.info), k=2)


def test_refusals_of_specs_and_image_arrays_no_other_test_reached(tmp_path):
    """Refusals that coverage found unreached (coverage helper, s48): a spec that is not text or a path, an existing
    file of no readable kind, and an .npz whose images are neither (N, H, W) nor (N, H, W, C); and a dict item of an
    IndexedDataset, which its docstring says becomes (item, id)."""
    from robust_ops.data import IndexedDataset

    (tmp_path / "notes.txt").write_text("not images")
    for spec, pattern in (
            (3, r"^load_dataset: expected spec to be a name or a path, got int$"),
            (None, r"^load_dataset: expected spec to be a name or a path, got NoneType$"),
            (tmp_path / "notes.txt", r"notes\.txt: not a dataset this library reads \(expected an \.npz file, a "
                                     r"\.csv file or a folder\)$"),
            (write_npz(tmp_path / "flat.npz", shape=(28,)), r"flat\.npz \[train\]: expected images of shape "
                                                            r"\(N, H, W\) or \(N, H, W, C\), got \(12, 28\)$")):
        with pytest.raises(DataError, match=pattern):
            load_dataset(spec)
    assert IndexedDataset([{"a": 1}, {"a": 2}])[1] == ({"a": 2}, 1)


@pytest.mark.parametrize("spec, named", [("synthetic", "0 = benign, 1 = malignant"),
                                         ("moons", "0 = upper moon, 1 = lower moon"),
                                         ("breastmnist", "0 = malignant, 1 = normal or benign"),
                                         ("dermamnist_64", "0 = akiec, 1 = bcc, 2 = bkl, ")])
def test_classes_on_a_source_with_fixed_classes_names_them(spec, named):
    # "this source has fixed classes" named neither the classes (--classes benign,malignant on breastmnist: is benign
    # label 1?) nor the way on
    with pytest.raises(DataError) as err:
        load_dataset(spec, classes=["benign", "malignant"])
    assert str(err.value).startswith(f"{spec}: classes= selects class folders or CSV labels, or names an .npz "
                                     f"file's labels; this source has fixed classes ({named}"), err.value
    assert str(err.value).endswith(") -- drop classes="), err.value
    assert err.value.arg == "classes"


def test_npz_class_names_key_names_the_classes(tmp_path):
    """An .npz with a class_names key (as some exports write beside MedMNIST's keys) had it ignored: its classes were
    named 0, 1 and label 1 scored as positive, benign in a file naming label 0 malignant (found by the data3
    helper)."""
    path = write_npz(tmp_path / "cn.npz", class_names=np.array(["malignant", "benign"]))
    info = load_dataset(path).info
    assert info.class_names == ("malignant", "benign") and info.positive_class == 0
    assert load_dataset(write_npz(tmp_path / "b.npz", class_names=np.array([b"benign", b"malignant"]))).info \
        .class_names == ("benign", "malignant")  # bytes, as h5py-converted exports hold them
    assert load_dataset(path, classes=["malignant", "benign"]).info.positive_class == 0  # agreeing: as given
    with pytest.raises(DataError, match=r"cn\.npz: class_names \(malignant, benign\) name its labels, and classes= "
                                        r"\(benign, malignant\) differs; drop classes="):
        load_dataset(path, classes=["benign", "malignant"])
    for bad, msg in ((np.array(["a", "b", "c"]), r"class_names holds 3 names; expected 2 distinct names, one per "
                                                 r"label 0 to 1, label 0 first -- fix the array"),
                     (np.array(["a", "a"]), r"class_names lists 'a' more than once; expected 2 distinct"),
                     (np.array(["a", " "]), r"class_names holds an empty name"),
                     (np.array([0, 1]), r"expected class_names to be the class names as strings, label 0 first "
                                        r"\(np\.array\(\['benign', 'malignant'\]\)\), got int64 values of shape")):
        with pytest.raises(DataError, match=msg):
            load_dataset(write_npz(tmp_path / "bad.npz", class_names=bad))
    # read under a MedMNIST set's name (not MD5-checked): its own names, which class_names must agree with
    official = mm.load_npz(write_npz(tmp_path / "p.npz", class_names=np.array(["normal", "pneumonia"])),
                           name="pneumoniamnist")
    assert official.info.class_names == ("normal", "pneumonia")
    with pytest.raises(DataError, match=r"class_names \(a, b\) differ from pneumoniamnist's own \(normal, pneumonia\); "
                                        r"save the file without class_names, or rename it"):
        mm.load_npz(write_npz(tmp_path / "p.npz", class_names=np.array(["a", "b"])), name="pneumoniamnist")


def test_busi_a_broken_link_named_with_a_dot_is_said_as_a_class_folder(tmp_path):
    """A broken link to a class folder named with a dot (bcc.v2, as a real folder so named is a class) was taken for
    a file and its class left out without a word; classes= naming it said 'not found (found: mel, nv)'. Links named
    as files (notes.txt, x.png, labels.csv) are still no class."""
    for c in ("mel", "nv"):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{i}.png", (8, 8), 10 * i)
    for name in ("notes.txt", "x.png", "labels.csv", "scan.nii.gz"):
        (tmp_path / name).symlink_to(tmp_path / "gone" / name)
    (tmp_path / "bcc.v2").symlink_to(tmp_path / "gone" / "bcc.v2")
    link = re.escape(f"{tmp_path / 'bcc.v2'}: a link to {tmp_path / 'gone' / 'bcc.v2'}, which does not exist")
    with pytest.raises(DataError, match=rf"^{link}.*, or leave it out with classes= \(--classes mel,nv\)$"):
        load_dataset(tmp_path, size=8)
    with pytest.raises(DataError, match=rf"^{link}.*remove the link$"):
        load_dataset(tmp_path, size=8, classes=("bcc.v2", "mel", "nv"))
    (tmp_path / "bcc.v2").unlink()
    (tmp_path / "bcc.v2").mkdir()
    for i in range(10):
        _png(tmp_path / "bcc.v2" / f"{i}.png", (8, 8), 5 * i)
    assert load_dataset(tmp_path, size=8).info.class_names == ("bcc.v2", "mel", "nv")



def test_busi_a_broken_link_named_in_the_other_unicode_form_is_said_when_classes_names_it(tmp_path):
    """classes= typing a broken class-folder link's name composed (NFC) where macOS wrote it decomposed (NFD) said
    'class folder(s) mélanome not found (found: mel, nv)' of a link the user sees."""
    import unicodedata

    for c in ("mel", "nv"):
        (tmp_path / c).mkdir()
        for i in range(10):
            _png(tmp_path / c / f"{i}.png", (8, 8), 10 * i)
    link = tmp_path / unicodedata.normalize("NFD", "m\u00e9lanome")
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match=rf"^{re.escape(str(link))}: a link to .*remove the link$"):
        load_dataset(tmp_path, size=8, classes=("m\u00e9lanome", "mel"))
