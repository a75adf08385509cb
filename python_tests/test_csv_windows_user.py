"""A CSV prepared on Windows, used from the command line alone: a spreadsheet's export (byte-order mark, CRLF line
ends, spaces around names and values, folders written with backslashes) of 16-bit grayscale PNGs with a few 8-bit
ones trains and evaluates with every image read on one scale under its own label, and each export that cannot be
read (semicolons, other column names, other encodings, a row twice, a file missing) is one line naming the fix."""

import json
import re

import numpy as np
import pytest
import torch

from test_cli import one_line_error, run

N = 20


def _value(k):
    """Image k's grey level on the 8-bit scale: one per image, so each sample can be traced to its file."""
    return 10 * k + 5


def _label(k):
    return ("Benign", "Malignant")[k % 2]


def _images(root):
    """images/case000.png ...: 16-bit grayscale PNGs (the grey level times 257, the full 16-bit scale) and, every
    fifth, an 8-bit one, as a colleague's export mixes them."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    for k in range(N):
        if k % 5 == 3:
            arr = np.full((8, 8), _value(k), np.uint8)
        else:
            arr = np.full((8, 8), _value(k) * 257, np.uint16)
        Image.fromarray(arr).save(root / "images" / f"case{k:03d}.png")


def _write(path, header, rows, sep=",", encoding="utf-8", bom=True, eol="\r\n"):
    text = eol.join([sep.join(header)] + [sep.join(r) for r in rows]) + eol
    path.write_bytes((("\ufeff" if bom else "") + text).encode(encoding))
    return path


def _windows_rows(ids=range(N)):
    return [(f"images\\case{k:03d}.png", _label(k) + " ") for k in ids]


@pytest.fixture
def data(tmp_path):
    _images(tmp_path / "d")
    return tmp_path / "d"


def test_a_windows_export_trains_and_evaluates_with_each_image_under_its_label_on_one_scale(data, tmp_path, capsys):
    from robust_ops.data import load_dataset

    csv_path = _write(data / "labels.csv", [" image_id ", " dx "], _windows_rows())
    out = tmp_path / "run"
    argv = ["train", "--data", csv_path, "--size", "8", "--channels", "1", "--model", "mlp", "--epochs", "1",
            "--out", out, "--no-progress", "--device", "cpu"]
    rc, stdout, err = run(argv, capsys)
    assert rc == 0 and "warning" not in err, err
    assert "classes: Benign = 0, Malignant = 1 (positive)" in stdout
    doc = json.loads((out / "run.json").read_text())
    assert doc["dataset"]["class_counts"] == {"Benign": N // 2, "Malignant": N // 2}
    # the cross-check: every sample is its own file's grey level (16-bit / 257 == 8-bit) under that file's label
    s = load_dataset(csv_path, size=8, channels=1)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    y = torch.cat([s.train.tensors[1], s.val.tensors[1], s.test.tensors[1]])
    assert sorted(zip((x[:, 0, 4, 4] * 255).round().int().tolist(), y.tolist())) == [
        (_value(k), k % 2) for k in range(N)]
    # the colleague opens and saves it again without the spaces, the mark and the CRLFs: the same data for eval
    _write(csv_path, ["image_id", "dx"], [(i, lab.strip()) for i, lab in _windows_rows()], bom=False, eol="\n")
    rc, _, err = run(["eval", out, "--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu",
                      "--out", tmp_path / "e"], capsys)
    assert rc == 0 and "warning" not in err, err
    assert json.loads((tmp_path / "e" / "results.json").read_text())["rows"][0]["n"] == len(s.test)


@pytest.mark.parametrize("variant, needles", [
    ("semicolons", ["missing column 'image_id' (found: image_id;dx); the header looks ';'-separated: save the file "
                    "comma-separated"]),
    ("header", ["missing column 'image_id' (found: Filename, Label); name the image column image_id and the label "
                "column dx"]),
    # was told to "name the image column image_id and the label column dx" (found by the data5 helper)
    ("capitals", ["missing column 'image_id' (found: IMAGE_ID, DX); column names are matched in case: rename "
                  "IMAGE_ID to image_id and DX to dx"]),
    # was told to put the files under the folder, which holds them (found by the data5 helper)
    ("case", [f"{N} image(s) listed but not found under", "; Images\\CASE000.PNG is images/case000.png in other case "
              "-- write the ids as the files are named: their folders and names are matched in case"]),
    # written from the CSV's folder (.\\Images\\...): told to put the files under it again (found by the revB helper)
    ("case_dot", [f"{N} image(s) listed but not found under", "; .\\Images\\CASE000.PNG is images/case000.png in "
                  "other case -- write the ids as the files are named: their folders and names are matched in case"]),
    # a bare name, or a path without its extension, in other case: the generic "put their image files under" the
    # folder holding them (found by the data6 helper)
    ("case_bare", ["1 image(s) listed but not found under", "e.g. CASE000.PNG; ", "; CASE000.PNG is case000.png in "
                   "other case -- write the ids as the files are named: their folders and names are matched in case"]),
    ("case_stem", ["1 image(s) listed but not found under", "e.g. CASE000; CASE000 is case000 in other case -- write "
                   "the ids as the files are named"]),
    ("case_path_stem", ["1 image(s) listed but not found under", "; Images\\CASE000 is images/case000 in other "
                        "case -- write the ids as the files are named"]),
    ("cp1252", ["not UTF-8 text (", "); save it as UTF-8"]),
    # named as UTF-16: "(invalid start byte at byte 0)" named no encoding to change (found by the data5 helper)
    ("utf16", ["not UTF-8 text (UTF-16, as Excel's \"Unicode Text\" saves it, tab-separated); save it as UTF-8, "
               "comma-separated (Excel's \"CSV UTF-8\")"]),
    ("twice", ["1 image_id(s) listed more than once, e.g. images\\case005.png (lines 7 and 22); expected one row "
               "per image"]),
    # quoted as written: repr doubled the backslashes, 'images\\case005.png' (found by the data5 helper)
    ("samefile", ["rows 'images\\case005.png' and 'images\\.\\case005.png' name the same file; expected one row "
                  "per image"]),
    ("missing", ["1 image(s) listed but not found under", "e.g. images\\case099.png",
                 "-- put their image files under", "or remove their rows from the CSV"]),
    ("drive", [f"{N} image(s) listed but not found under", "e.g. C:\\data\\images\\case000.png, ",
               "or paths relative to it (images/img1.png or images/img1) -- put the image files"]),
])
def test_an_export_that_cannot_be_read_is_one_line_naming_the_file_and_the_fix(data, tmp_path, capsys, variant,
                                                                               needles):
    path, rows = data / f"{variant}.csv", _windows_rows()
    if variant == "semicolons":  # Excel's "CSV" where the decimal separator is a comma
        _write(path, ["image_id", "dx"], rows, sep=";")
    elif variant == "header":
        _write(path, ["Filename", "Label"], rows)
    elif variant == "capitals":
        _write(path, ["IMAGE_ID", "DX"], rows)
    elif variant == "case":  # typed by hand: the folder and a name in other case
        _write(path, ["image_id", "dx"], [(i.replace("images", "Images").replace("case000.png", "CASE000.PNG"), lab)
                                          for i, lab in rows])
    elif variant == "case_dot":
        _write(path, ["image_id", "dx"], [(".\\" + i.replace("images", "Images").replace("case000.png", "CASE000.PNG"),
                                           lab) for i, lab in rows])
    elif variant.startswith("case_"):  # case000.png written CASE000.PNG, CASE000 or Images\CASE000
        name = {"case_bare": "CASE000.PNG", "case_stem": "CASE000", "case_path_stem": "Images\\CASE000"}[variant]
        _write(path, ["image_id", "dx"], [(name if k == 0 else i.split("\\")[-1], lab) for k, (i, lab) in
                                          enumerate(rows)])
    elif variant == "cp1252":  # Excel's "CSV" in the machine's ANSI code page
        _write(path, ["image_id", "dx"], [(i, "B\u00e9nin") for i, _ in rows], encoding="cp1252", bom=False)
    elif variant == "utf16":  # Excel's "Unicode Text"
        _write(path, ["image_id", "dx"], rows, sep="\t", encoding="utf-16-le")
    elif variant == "twice":
        _write(path, ["image_id", "dx"], rows + _windows_rows([5]))
    elif variant == "samefile":
        _write(path, ["image_id", "dx"], rows + [("images\\.\\case005.png", _label(5))])
    elif variant == "missing":
        _write(path, ["image_id", "dx"], rows + _windows_rows([99]))
    else:  # absolute Windows paths: no path relative to the CSV's folder here
        _write(path, ["image_id", "dx"], [("C:\\data\\" + i, lab) for i, lab in rows])
    out = tmp_path / "run"
    rc, _, err = run(["train", "--data", path, "--size", "8", "--model", "mlp", "--epochs", "1", "--out", out,
                      "--no-progress", "--device", "cpu"], capsys)
    one_line_error(rc, err, f"robust-ops train: error: --data: {path}: ", *needles)
    assert not out.exists()


def test_missing_ids_holding_a_folder_read_no_file_list_for_the_bare_name_hint(data, monkeypatch):
    """The other-case hint for bare names (621942e) walked every file under the image folder on each refusal, also
    where every missing id holds a folder and there is no bare name to look for: 0.83 s of a 0.86 s refusal with
    20,000 other images there (found by the revA helper). The hint's walk runs for bare names only."""
    import pathlib

    from robust_ops.data import DataError
    from robust_ops.data.folders import load_csv

    path, walked = _write(data / "gone.csv", ["image_id", "dx"], _windows_rows() + _windows_rows([99])), []
    rglob = pathlib.Path.rglob
    monkeypatch.setattr(pathlib.Path, "rglob", lambda self, *a, **k: walked.append(self) or rglob(self, *a, **k))
    with pytest.raises(DataError, match=r"1 image\(s\) listed but not found under .*e\.g\. images\\case099\.png; "):
        load_csv(path, size=8)
    assert walked == []

def test_classes_match_a_csvs_labels_in_case(data, tmp_path, capsys):
    # class folders match --classes in any case; a CSV's labels are matched as written, and the error lists them
    csv_path = _write(data / "labels.csv", ["image_id", "dx"], _windows_rows())
    rc, _, err = run(["train", "--data", csv_path, "--size", "8", "--model", "mlp", "--epochs", "1", "--classes",
                      "benign,malignant", "--out", tmp_path / "run", "--no-progress", "--device", "cpu"], capsys)
    one_line_error(rc, err, f"--classes: {csv_path}: requested class(es) 'benign', 'malignant' have no rows in "
                            "column 'dx' (labels present: Benign, Malignant)")
    assert not (tmp_path / "run").exists()


def test_getting_started_says_how_a_windows_export_is_read():
    # its CSV row said "comma-separated" and "a file's path relative to that folder" alone: nothing of the
    # byte-order mark, CRLFs, spaces and backslashes read above, of the exports refused, or of --classes' case
    from pathlib import Path

    text = " ".join((Path(__file__).parents[1] / "docs" / "getting-started.md").read_text().split())
    for sentence in ("comma-separated (a spreadsheet's semicolon-separated export, Excel's \"CSV\" where the decimal "
                     "separator is a comma, is an error saying so), UTF-8 text (with or without the byte-order mark "
                     "Excel's \"CSV UTF-8\" writes, Windows' CRLF line ends too; another encoding, Excel's ANSI "
                     "\"CSV\" or UTF-16 \"Unicode Text\", is an error saying to save it as UTF-8), its column names "
                     "and values read without the spaces around them (`Benign ` is `Benign`)",
                     "its folders written with `/` or Windows' `\\` (`pat1\\view1.png`; a path with a drive, "
                     "`C:\\data\\pat1\\view1.png`, is no path relative to the folder: it is listed as not found, so "
                     "write the paths relative to the CSV's folder)",
                     "matched by `--classes` as written, in case (`--classes benign,malignant` on labels `Benign`, "
                     "`Malignant` is an error listing the labels present, where class folders match in any case)"):
        assert sentence in text, sentence


def test_excels_sep_line_is_skipped_and_counted_in_line_numbers(data):
    """Excel writes a first line "sep=," when asked to name the separator: a comma CSV otherwise right was refused as
    "missing column 'image_id' (found: sep=, )". It is skipped, its line still counted in the errors' line numbers;
    "sep=;" and "sep=<tab>" keep the separator advice (found by the data5 and mut55 helpers)."""
    from robust_ops.data import DataError, load_dataset

    text = "\r\n".join(["sep=,", "image_id,dx"] + [",".join(r) for r in _windows_rows()]) + "\r\n"
    (data / "sep.csv").write_bytes(("\ufeff" + text).encode("utf-8"))
    s = load_dataset(data / "sep.csv", size=8, channels=1)
    x = torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])
    y = torch.cat([s.train.tensors[1], s.val.tensors[1], s.test.tensors[1]])
    assert sorted(zip((x[:, 0, 4, 4] * 255).round().int().tolist(), y.tolist())) == [
        (_value(k), k % 2) for k in range(N)]
    (data / "empty.csv").write_text(text.replace("case002.png,Benign ", "case002.png,"))  # the file's line 5
    with pytest.raises(DataError, match=r"empty\.csv: line 5: empty 'dx'"):
        load_dataset(data / "empty.csv", size=8, channels=1)
    for sep in (";", "\t"):  # "sep=\t": its tab was stripped with the header's names, and no hint was given
        (data / "other.csv").write_text(text.replace(",", sep))
        with pytest.raises(DataError, match=re.escape(f"the header looks {sep!r}-separated: save")):
            load_dataset(data / "other.csv", size=8, channels=1)


@pytest.mark.parametrize("name, fix", [("labels.csv.txt", "a CSV whose name ends in .txt (which Windows hides): "
                                                          "rename it labels.csv"),
                                       ("labels.tsv", "tab-separated: save it comma-separated, its name ending in "
                                                      ".csv")])
def test_a_csv_saved_under_another_name_is_told_the_rename(data, tmp_path, capsys, name, fix):
    """Saved as text, labels.csv is labels.csv.txt, shown as labels.csv where Windows hides known extensions: it was
    "not a dataset this library reads", and with --channels 1 told to drop --channels, which cannot help (found by
    the data5 helper)."""
    sep = "\t" if name.endswith(".tsv") else ","
    path = _write(data / name, ["image_id", "dx"], _windows_rows(), sep=sep)
    for extra in ([], ["--channels", "1"]):
        rc, _, err = run(["train", "--data", path, "--size", "8", "--model", "mlp", "--epochs", "1", *extra,
                          "--out", tmp_path / "run", "--no-progress", "--device", "cpu"], capsys)
        one_line_error(rc, err, f"robust-ops train: error: --data: {path}: not a dataset this library reads "
                                f"(expected an .npz file, a .csv file or a folder); {fix}")
    assert not (tmp_path / "run").exists()


def test_a_run_trained_on_rows_mixing_slashes_and_backslashes_evaluates_on_its_unchanged_csv(data, tmp_path, capsys):
    """A run trained before ids' "\\" were read as "/" recorded the digest of its ids as written; where the rows mix
    the two (images/case000.png on some, images\\case001.png on others) that digest is neither the "/" one nor the
    all-"\\" one, so eval and --resume refused the run's own unchanged CSV as "holds other images, names or row order"
    (found by the revB helper). The ids as written are recorded too where they mix; other rows are still refused."""
    from robust_ops.data.folders import _samples_digest

    rows = [(i.replace("\\", "/") if k % 2 else i, lab) for k, (i, lab) in enumerate(_windows_rows())]
    csv_path = _write(data / "labels.csv", ["image_id", "dx"], rows)
    out = tmp_path / "run"
    train = ["train", "--data", csv_path, "--size", "8", "--channels", "1", "--model", "mlp", "--no-progress",
             "--device", "cpu", "--out", out]
    assert run(train + ["--epochs", "1"], capsys)[0] == 0
    doc = json.loads((out / "run.json").read_text())
    # the digest before 2026-12-07: the ids and labels as read, the ids' separators as written
    doc["dataset"]["samples_digest"] = _samples_digest((i, lab.strip()) for i, lab in rows)
    (out / "run.json").write_text(json.dumps(doc))
    attack = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu", "--out", tmp_path / "e"]
    rc, _, err = run(["eval", out, *attack], capsys)
    assert rc == 0, err
    assert run(train + ["--epochs", "2", "--resume"], capsys)[0] == 0
    _write(csv_path, ["image_id", "dx"], rows[1:] + rows[:1])
    rc, _, err = run(["eval", out, *attack], capsys)
    assert rc == 2 and "holds other images, names or row order than when the run was trained" in err, err


def test_ids_saved_with_slashes_instead_of_backslashes_are_the_runs_own_data(data, tmp_path, capsys):
    """The image list's fingerprint hashed ids as written, so a run's own CSV saved again with images/case000.png for
    images\\case000.png (the same files, in the same order) was refused by eval as "holds other images, names or row
    order than when the run was trained" (found by the csvuser helper). Ids' folders are now hashed with "/"; a run
    recorded before that (its digest of the ids as written with "\\") is accepted as well; other rows still differ."""
    from robust_ops.data import load_dataset

    csv_path = _write(data / "labels.csv", ["image_id", "dx"], _windows_rows())
    out = tmp_path / "run"
    train = ["train", "--data", csv_path, "--size", "8", "--channels", "1", "--model", "mlp", "--no-progress",
             "--device", "cpu", "--out", out]
    assert run(train + ["--epochs", "1"], capsys)[0] == 0
    attack = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu", "--out", tmp_path / "e"]
    slashed = [(i.replace("\\", "/"), lab) for i, lab in _windows_rows()]
    for recorded_as_written in (False, True):
        if recorded_as_written:  # as a run trained before: its run.json holds the digest of the ids as written
            _write(csv_path, ["image_id", "dx"], _windows_rows())
            extra = load_dataset(csv_path, size=8, channels=1).info.extra
            doc = json.loads((out / "run.json").read_text())
            doc["dataset"]["samples_digest"] = extra["samples_digest_backslashed"]
            (out / "run.json").write_text(json.dumps(doc))
        _write(csv_path, ["image_id", "dx"], slashed)
        rc, _, err = run(["eval", out, *attack], capsys)
        assert rc == 0, (recorded_as_written, err)
    assert run(train + ["--epochs", "2", "--resume"], capsys)[0] == 0
    _write(csv_path, ["image_id", "dx"], slashed[1:] + slashed[:1])
    rc, _, err = run(["eval", out, *attack], capsys)
    assert rc == 2 and "holds other images, names or row order than when the run was trained" in err, err


def test_ids_written_from_the_csvs_folder_or_with_doubled_slashes_are_the_runs_own_data(data, tmp_path, capsys):
    """./images/case000.png, images//case000.png and images/case000.png name one file, yet hashed to three image-list
    fingerprints, so a run's own CSV saved again with "./" before each id (as many tools write them) was refused by
    eval as "holds other images, names or row order than when the run was trained" (found by the data6 helper). Ids
    are hashed as the lookup reads them (pathlib's parts); the digests earlier runs recorded for the rows as written
    are recorded too, and other rows still differ."""
    from robust_ops.data import load_dataset
    from robust_ops.data.folders import _samples_digest

    slashed = [(i.replace("\\", "/"), lab.strip()) for i, lab in _windows_rows()]
    csv_path = _write(data / "labels.csv", ["image_id", "dx"], slashed)
    out = tmp_path / "run"
    train = ["train", "--data", csv_path, "--size", "8", "--channels", "1", "--model", "mlp", "--no-progress",
             "--device", "cpu", "--out", out]
    assert run(train + ["--epochs", "1"], capsys)[0] == 0
    attack = ["--attacks", "fgsm", "--eps", "1/255", "--saliency", "0", "--device", "cpu", "--out", tmp_path / "e"]
    for rows in ([("./" + i, lab) for i, lab in slashed], [(i.replace("/", "//"), lab) for i, lab in slashed]):
        _write(csv_path, ["image_id", "dx"], rows)
        rc, _, err = run(["eval", out, *attack], capsys)
        assert rc == 0, (rows[0], err)
    assert run(train + ["--epochs", "2", "--resume"], capsys)[0] == 0
    # a run trained before on ./ ids recorded them as written: its own unchanged CSV is its data
    dotted = [("./" + i, lab) for i, lab in slashed]
    _write(csv_path, ["image_id", "dx"], dotted)
    doc = json.loads((out / "run.json").read_text())
    doc["dataset"]["samples_digest"] = _samples_digest(dotted)
    (out / "run.json").write_text(json.dumps(doc))
    assert run(["eval", out, *attack], capsys)[0] == 0
    # Windows' .\images\case000.png: recorded from 2026-12-07 with its "\" as "/", before as written
    _write(csv_path, ["image_id", "dx"], [(".\\" + i, lab) for i, lab in _windows_rows()])
    extra = load_dataset(csv_path, size=8, channels=1).info.extra
    assert extra["samples_digest_slashed"] == _samples_digest(dotted)
    assert extra["samples_digest_backslashed"] == _samples_digest((".\\" + i, lab.strip()) for i, lab in
                                                                   _windows_rows())
    # a run trained in between on those Windows ids recorded the slashed digest: its unchanged CSV is its data
    doc["dataset"]["samples_digest"] = extra["samples_digest_slashed"]
    (out / "run.json").write_text(json.dumps(doc))
    rc, _, err = run(["eval", out, *attack], capsys)
    assert rc == 0, err
    _write(csv_path, ["image_id", "dx"], slashed[1:] + slashed[:1])
    rc, _, err = run(["eval", out, *attack], capsys)
    assert rc == 2 and "holds other images, names or row order than when the run was trained" in err, err
