"""Tests that kill mutants of load_csv's export handling (Excel's sep= line, UTF-16, header case, other-case paths,
the group column's missing values, the image-list digests) which the other tests let live (mut55 helper,
session 55)."""

import numpy as np
import pytest

from robust_ops.data import DataError, load_dataset

N = 8


@pytest.fixture
def folder(tmp_path):
    """images/c0.png ... c7.png, 8x8 grey, classes a and b alternating."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    for k in range(N):
        Image.fromarray(np.full((8, 8), 20 * k, np.uint8)).save(tmp_path / "images" / f"c{k}.png")
    return tmp_path


def _rows():
    return [(f"images/c{k}.png", "ab"[k % 2]) for k in range(N)]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_long_row_after_excels_sep_line_is_named_by_its_line_in_the_file(folder):
    """The sep=, line is skipped but still counted: the row with a comma too many is the file's line 4 (sep=, is
    line 1, the header line 2)."""
    rows = [",".join(r) for r in _rows()]
    rows[1] = rows[1] + ",extra"
    path = _write(folder / "long.csv", ["sep=,", "image_id,dx", *rows])
    with pytest.raises(DataError, match=r"long\.csv: line 4: 3 values, but the header names 2 columns"):
        load_dataset(path, size=8, channels=1)


def test_rows_named_by_line_after_excels_sep_line_count_it(folder):
    """A duplicate id and labels that differ only in case are named by their lines in the file, the sep=, line
    counted: rows 1 and 8 of the data are the file's lines 3 and 10."""
    rows = [",".join(r) for r in _rows()]
    path = _write(folder / "twice.csv", ["sep=,", "image_id,dx", *rows, rows[0]])
    with pytest.raises(DataError, match=r"images/c0\.png \(lines 3 and 11\)"):
        load_dataset(path, size=8, channels=1)
    rows[3] = rows[3].replace(",b", ",B")
    path = _write(folder / "cased.csv", ["sep=,", "image_id,dx", *rows])
    with pytest.raises(DataError, match=r"labels 'B' and 'b' in column 'dx' differ only in case or leading zeros "
                                        r"\(first on lines 6 and 4\)"):
        load_dataset(path, size=8, channels=1)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_a_utf16_csv_of_either_byte_order_is_named_utf16(folder, encoding):
    """Excel's "Unicode Text" is UTF-16 little-endian; a big-endian one (its byte-order mark FE FF) is UTF-16 too, and
    told to be saved as UTF-8 in the same words."""
    text = "\r\n".join(["image_id\tdx"] + ["\t".join(r) for r in _rows()]) + "\r\n"
    path = folder / "unicode.csv"
    path.write_bytes("\ufeff".encode(encoding) + text.encode(encoding))
    with pytest.raises(DataError, match=r"unicode\.csv: not UTF-8 text \(UTF-16, as Excel's \"Unicode Text\" saves "
                                        r"it, tab-separated\); save it as UTF-8, comma-separated"):
        load_dataset(path, size=8, channels=1)


def test_a_header_with_one_column_in_capitals_is_told_to_rename_that_one_only(folder):
    """image_id written right and DX in capitals: the rename names DX alone, not image_id to what it spells."""
    path = _write(folder / "cap.csv", ["image_id,DX", *(",".join(r) for r in _rows())])
    with pytest.raises(DataError, match=r"cap\.csv: missing column 'dx' \(found: image_id, DX\); column names are "
                                        r"matched in case: rename DX to dx$"):
        load_dataset(path, size=8, channels=1)


def test_one_hot_columns_keep_their_advice_beside_an_id_column_in_capitals(folder):
    """ISIC's ground-truth layout (a 0/1 column per class) with its id column in capitals: no label column exists,
    so renaming IMAGE_ID cannot help alone; the one-hot advice, which names the label column to write, is kept."""
    lines = ["IMAGE_ID,MEL,NV"] + [f"images/c{k}.png,{1 - k % 2},{k % 2}" for k in range(N)]
    with pytest.raises(DataError, match=r"MEL, NV hold one-hot labels .*: write each row's class name into one "
                                        r"column 'dx'"):
        load_dataset(_write(folder / "onehot.csv", lines), size=8, channels=1)


def _refusal_of_one_more_id(folder, image_id):
    """load_dataset's DataError for the eight images' CSV with one more row, ``image_id`` of class a."""
    rows = [",".join(r) for r in _rows()] + [f"{image_id},a"]
    with pytest.raises(DataError) as caught:
        load_dataset(_write(folder / "one_more.csv", ["image_id,dx", *rows]), size=8, channels=1)
    return str(caught.value)


def test_a_folder_matching_a_missing_id_in_other_case_is_not_told_as_its_file(folder):
    """The other-case hint names a file only: an id images/scan0 (no such file) beside a folder IMAGES/SCAN0/ (a
    series of slices) is not told "images/scan0 is IMAGES/SCAN0 in other case"."""
    (folder / "IMAGES" / "SCAN0").mkdir(parents=True)
    message = _refusal_of_one_more_id(folder, "images/scan0")
    assert "1 image(s) listed but not found" in message and "in other case" not in message


def test_an_id_whose_folder_is_missing_is_not_told_a_file_of_its_name_elsewhere(folder):
    """The other-case hint follows the id's path folder by folder: xrays/C0.PNG (no folder xrays) is not the file
    images/c0.png, nor c0.png beside the CSV, in other case."""
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "c0.png")
    message = _refusal_of_one_more_id(folder, "xrays/C0.PNG")
    assert "e.g. xrays/C0.PNG" in message and "in other case" not in message


def test_the_as_written_digest_is_recorded_only_for_ids_mixing_both_separators(folder):
    """samples_digest_as_written is the digest of ids mixing "/" and "\\" (neither the "/" nor the all-"\\" digest
    was theirs); ids written with one separator record only the two others, as runs recorded them before."""
    from PIL import Image

    for k in range(N, 30):  # enough of each class to stratify the split without a warning
        Image.fromarray(np.full((8, 8), 5 * k, np.uint8)).save(folder / "images" / f"c{k}.png")

    def extra(ids):
        lines = ["image_id,dx"] + [f"{i},{'ab'[k % 2]}" for k, i in enumerate(ids)]
        return load_dataset(_write(folder / "ids.csv", lines), size=8, channels=1).info.extra

    slashes = [f"images/c{k}.png" for k in range(30)]
    backslashes = [i.replace("/", "\\") for i in slashes]
    mixed = slashes[:15] + backslashes[15:]
    for ids in (slashes, backslashes):
        record = extra(ids)
        assert "samples_digest_as_written" not in record and "samples_digest_backslashed" in record
    record = extra(mixed)
    assert record["samples_digest"] == extra(slashes)["samples_digest"]
    assert record["samples_digest_as_written"] not in (record["samples_digest"], record["samples_digest_backslashed"])


def test_resume_of_a_run_json_written_before_the_extra_digests_takes_its_own_csv(folder, tmp_path, capsys):
    """A run.json written before 2026-12-07 holds the digest of its ids as written ("\\") and none of the extra
    digests: --resume compares it with those of the CSV as loaded now, not with the old record's (it has none)."""
    import json

    from test_cli import run

    from robust_ops.data.folders import _samples_digest

    rows = [(f"images\\c{k}.png", "ab"[k % 2]) for k in range(N)]
    csv_path = _write(folder / "labels.csv", ["image_id,dx", *(",".join(r) for r in rows)])
    out = tmp_path / "run"
    train = ["train", "--data", csv_path, "--size", "8", "--channels", "1", "--model", "mlp", "--no-progress",
             "--device", "cpu", "--out", out]
    assert run(train + ["--epochs", "1"], capsys)[0] == 0
    doc = json.loads((out / "run.json").read_text())
    for key in ("samples_digest_backslashed", "samples_digest_as_written"):
        doc["dataset"].pop(key, None)
    doc["dataset"]["samples_digest"] = _samples_digest(rows)
    (out / "run.json").write_text(json.dumps(doc))
    rc, _, err = run(train + ["--epochs", "2", "--resume"], capsys)
    assert rc == 0, err
