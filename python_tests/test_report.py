"""Report formatting: radii, numbers, run marks, table layouts, figure titles, Grad-CAM and input-gradient maps."""

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from utils import run_python

from robust_ops import report, reproduce
from robust_ops.data import DatasetInfo


def test_format_eps_and_fmt():
    assert report.format_eps(4 / 255) == "4/255" and report.format_eps(0.0157) == "0.0157"  # 4.0035/255: not 4/255
    assert report.format_eps(0.0156) == "0.0156" and report.format_eps(0.123456) == "0.1235"
    assert report.format_eps(1.23456) == "1.235" and report.format_eps(None) == "0"
    assert report.format_eps(10.2) == "10.2"  # short decimals stay decimals, though 10.2 is 2601/255
    assert report.fmt(0.5) == "0.500" and report.fmt(2) == "2" and report.fmt(0.12345, 2) == "0.12"
    assert report.fmt(math.nan) == report.fmt(math.inf) == report.fmt(None) == "–"



def test_radii_that_read_the_same_to_4_digits_get_the_digits_that_tell_them_apart(tmp_path, monkeypatch):
    """0.0039216 and 0.0039219 both read "0.003922": a table showed two lines of one ε (and a figure two ticks).
    Within one table or axis they now get as many digits as tell them apart; other radii keep their labels."""
    assert report.format_eps(0.0039216, [0.0039216, 0.0039219, 2 / 255]) == "0.0039216"
    assert report.format_eps(0.0039219, {0.0039216, None, 0.0}) == "0.0039219"
    assert report.format_eps(2 / 255, [0.0039216, 0.0039219, 2 / 255]) == "2/255"
    assert report.format_eps(1 / 255, [1 / 255 + 1e-12]) != report.format_eps(1 / 255 + 1e-12, [1 / 255])
    rows = [{"method": "M", "attack": "pgd", "norm": "linf", "eps": e, "n": 4, "accuracy": 0.5,
             "confusion": [[1, 1], [1, 1]]} for e in (0.0039216, 0.0039219, 2 / 255)]
    pivot = [line.split(" | ")[1] for line in report.pivot_table(rows, "accuracy").splitlines()[2:]]
    assert pivot == ["0.0039216", "0.0039219", "2/255"]
    for table in (report.markdown_table(rows, ["accuracy"]), report.per_class_recall_table(rows, ["a", "b"])):
        assert [line.split(" | ")[3] for line in table.splitlines()[2:]] == ["0.0039216", "0.0039219", "2/255"]
    paper = [{"method": "M", "attack": "pgd", "eps": r["eps"], "accuracy": 0.5} for r in rows]
    lines = report.paper_comparison_table(rows, paper, ["accuracy"]).splitlines()[2:]
    assert [line.split(" | ")[2] for line in lines] == ["0.0039216", "0.0039219", "2/255"]
    note = report.missing_rows_note(rows + [dict(rows[0], method="B")])
    assert "B: pgd at 0.0039219, 2/255;" in note
    figures = _record_figures(monkeypatch)
    assert report.plot_metric_vs_radius(rows, tmp_path / "a.png")
    # every tick's label, the ones hidden as overlapping the one before too (these two lie 3e-7 apart)
    ticks = [t.label1.get_text() for t in figures[0].axes[0].xaxis.get_major_ticks()]
    assert ticks == ["0", "0.0039216", "0.0039219", "2/255"]


def test_fmt_rounds_the_decimal_a_published_number_was_written_as():
    # The paper columns showed DPAAT's 55.15% as 0.551 but its 62.25% as 0.623: rounding the binary float, which lies
    # just below 0.5515 and just above 0.6225, not the decimal the paper printed. Ties now go to even (as they did,
    # and do, for a value the float holds exactly: 13/16), whatever the float's last bits.
    cases = {55.15 / 100: "0.552", 0.6225: "0.622", 0.4855: "0.486", 0.5575: "0.558", 0.5305: "0.530",
             13 / 16: "0.812", 0.8135: "0.814", 1.0: "1.000", 0.00049: "0.000", 1e-300: "0.000",
             12345.6785: "12345.678"}
    assert {v: report.fmt(v) for v in cases} == cases
    assert report.fmt(0.5515, 2) == "0.55" and report.fmt(0.125, 2) == "0.12"
    assert report.fmt(1e300) == f"1{'0' * 300}.000"
    dpaat = next(r for r in reproduce.DPAAT_BUS.paper_rows if (r["method"], r["attack"]) == ("STD", "FGSM"))
    line = next(s for s in report.paper_comparison_table([], [dpaat], ["accuracy"]).splitlines() if "FGSM" in s)
    assert "| 0.552 | – |" in line

def test_fmt_of_numpy_scalars_rounds_the_number_they_hold():
    # metrics a user computes with numpy (acc = (pred == y).mean(): a np.float64) in rows or paper rows: numpy's repr,
    # "np.float64(0.5515)", stopped the tables with decimal's InvalidOperation, and a np.float32 came out unrounded
    assert report.fmt(np.float64(0.5515)) == "0.552" and report.fmt(np.float32(0.8269231)) == "0.827"
    assert report.fmt(np.float64("nan")) == "–" and report.fmt(np.int64(156)) == "156"
    rows = [{"method": "M", "attack": "none", "norm": None, "eps": 0.0, "n": np.int64(8),
             "accuracy": np.float64(0.625), "confusion": np.array([[2, 2], [1, 3]])}]
    assert report.pivot_table(rows, "accuracy").splitlines()[2] == "| no attack | 0 | 0.625 |"
    recall = report.per_class_recall_table(rows, ["a", "b"]).splitlines()[2]
    assert recall == "| M | no attack | – | 0 | 8 | 0.500 | 0.750 |"
    paper = [{"method": "M", "attack": "none", "eps": 0.0, "source": "T1", "accuracy": np.float64(0.6225)}]
    assert report.paper_comparison_table(rows, paper, ["accuracy"]).splitlines()[2] == \
        "| M | no attack | 0 | T1 | 0.622 | 0.625 |"
    # and the note under the tables counts a numpy NaN, which fmt writes as "–", as undefined
    rows[0]["auc"] = np.float32("nan")
    assert report.undefined_note(rows, ["accuracy", "auc"]).startswith("> **Undefined metrics** (–, `null` in "
                                                                        "results.json): AUC in 1 of 1 rows.")


def test_format_eps_keeps_radii_that_are_no_whole_255ths_as_decimals():
    # 100.2 is 25551/255, but short decimals stay decimals; a radius far below 1/255 rounds to 0 of them, yet is no
    # clean row: "0/255" would read as one
    assert report.format_eps(100.2) == "100.2" and report.format_eps(1.5e-10) == "1.5e-10"


def test_slug_of_a_label_without_letters_or_digits_is_model():
    # saliency_<slug>.png and reproduce's runs/<slug>/ folders: an empty slug named no file or folder of its own
    assert report.slug("MIRST-DM (eps 2/255)") == "mirst-dm-eps-2-255"
    assert report.slug("+++") == report.slug("") == "model"


def test_runs_mark_only_for_partially_defined_means():
    assert report.runs_mark({"auc_runs": 2, "repeats": 3}, "auc") == " (2 of 3 runs)"
    assert report.runs_mark({"auc_runs": 3, "repeats": 3}, "auc") == ""
    assert report.runs_mark({"auc_runs": 0, "repeats": 3}, "auc") == ""  # undefined everywhere: the cell says –
    assert report.runs_mark({"auc": 0.5}, "auc") == ""


def test_figure_metrics_by_task():
    binary = DatasetInfo("b", 2, 1, 8, ("a", "b"), positive_class=1)
    multi = DatasetInfo("m", 3, 1, 8, ("a", "b", "c"))
    assert report.figure_metrics(binary) == ("accuracy", "f1", "sensitivity", "specificity")
    assert report.figure_metrics(multi) == ("accuracy", "f1", "map")


def test_markdown_table_and_paper_table_cells():
    rows = [{"method": "AT", "attack": "none", "norm": None, "eps": 0.0, "n": 156, "accuracy": 0.25,
             "accuracy_std": 0.01, "auc": math.nan, "auc_std": 0.2},
            {"method": "AT", "attack": "pgd", "norm": "linf", "eps": 2 / 255, "n": 156, "accuracy": 0.125,
             "auc": 0.75}]
    lines = report.markdown_table(rows, ["accuracy", "auc"]).splitlines()
    assert lines[2] == "| AT | none | – | 0 | 156 | 0.250 | – |"
    assert lines[3] == "| AT | pgd | linf | 2/255 | 156 | 0.125 | 0.750 |"
    paper = [{"method": "AT", "attack": "none", "eps": 0.0, "source": "T1", "accuracy": 0.3, "auc": 0.9}]
    line = report.paper_comparison_table(rows, paper, ["accuracy", "auc"]).splitlines()[2]
    # paper value, then ours (± std over runs; no std beside an undefined mean)
    assert line == "| AT | no attack | 0 | T1 | 0.300 | 0.250 ± 0.010 | 0.900 | – |"


def test_pivot_table_takes_the_methods_and_their_order_given():
    # methods=: the columns, in that order; by default those of the rows
    rows = [{"method": m, "attack": "none", "norm": None, "eps": 0.0, "n": 4, "accuracy": acc}
            for m, acc in (("A", 0.5), ("B", 0.75))]
    lines = report.pivot_table(rows, "accuracy", methods=["B", "A"]).splitlines()
    assert lines[0] == "| Accuracy: attack | ε | B | A |" and lines[2] == "| no attack | 0 | 0.750 | 0.500 |"
    assert report.pivot_table(rows, "accuracy").splitlines()[0] == "| Accuracy: attack | ε | A | B |"


def test_a_misspelt_metric_is_refused_and_one_name_is_one_column():
    """pivot_table(rows, "acc") (or "Accuracy") gave a table whose every cell read "–", plot_metric_vs_radius drew
    nothing and returned False, as for a metric undefined in every row, and markdown_table stopped with "KeyError:
    'acc'"; markdown_table(rows, "accuracy") read the name letter by letter ("KeyError: 'a'") and
    pivot_table(rows, "accuracy", methods="A") made a column per letter."""
    rows = [{"method": m, "attack": "none", "norm": None, "eps": 0.0, "n": 4, "accuracy": acc, "accuracy_std": 0.1}
            for m, acc in (("A", 0.5), ("AB", 0.75))]
    calls = {"pivot_table": lambda m: report.pivot_table(rows, m),
             "markdown_table": lambda m: report.markdown_table(rows, [m]),
             "plot_metric_vs_radius": lambda m: report.plot_metric_vs_radius(rows, "unused.png", m)}
    for name, call in calls.items():
        for bad in ("acc", "Accuracy"):
            with pytest.raises(ValueError, match=rf"^{name}: no row holds the metric '{bad}'; expected one of "
                                                 r"accuracy, f1, sensitivity, specificity, precision, auc, map$"):
                call(bad)
    # a metric's name the rows lack (hand-made rows) reads "–", a key they hold (reproduce's std) is a column
    assert report.pivot_table(rows, "f1").splitlines()[2] == "| no attack | 0 | – | – |"
    assert report.markdown_table(rows, "accuracy_std").splitlines()[2] == "| A | none | – | 0 | 4 | 0.100 |"
    assert report.markdown_table(rows, "accuracy, auc").splitlines()[0] == (
        "| method | attack | norm | ε | n | Accuracy | AUC |")
    assert report.pivot_table(rows, "accuracy", methods="AB").splitlines()[:3] == [
        "| Accuracy: attack | ε | AB |", "|---|---|---|", "| no attack | 0 | 0.750 |"]


def test_a_method_that_no_row_has_is_refused_naming_the_rows_methods():
    """pivot_table(rows, "accuracy", methods="ST") (a misspelt "STD"), or a list holding one, gave a column whose every
    cell read "–" (the table of the others partial), without a word (found by the api2 helper). A method no row has
    is now refused as a metric no row holds is, naming it and the rows' methods; a method not run under one line's
    attack still reads "–" there."""
    rows = [{"method": m, "attack": a, "norm": None, "eps": 0.0, "n": 4, "accuracy": 0.5}
            for m, a in (("STD", "none"), ("AT", "none"), ("AT", "fgsm"))]
    for methods, bad in (("ST", "ST"), (["AT", "STD ", "STD"], "STD ")):
        with pytest.raises(ValueError, match=rf"^pivot_table: no row holds the method '{bad}'; expected one of "
                                             r"'STD', 'AT'$"):
            report.pivot_table(rows, "accuracy", methods=methods)
    with pytest.raises(ValueError, match=r"^pivot_table: no row holds the method 'AT'; expected one of none \(no "
                                         r"rows\)$"):
        report.pivot_table([], "accuracy", methods=["AT"])
    assert report.pivot_table(rows, "accuracy", methods=["AT", "STD"]).splitlines()[2:] == [
        "| no attack | 0 | 0.500 | 0.500 |", "| fgsm | 0 | 0.500 | – |"]


def test_a_metric_some_rows_hold_is_a_column_not_a_misspelling():
    """_check_metric refuses a name no row holds (mutation testing of 6e2285d, mut54 helper: refusing one that not
    every row holds survived): rows of two evaluations, one with a metric of its own, keep their tables."""
    rows = [{"method": "A", "attack": "none", "norm": None, "eps": 0.0, "n": 4, "accuracy": 0.5, "mine": 0.25},
            {"method": "B", "attack": "none", "norm": None, "eps": 0.0, "n": 4, "accuracy": 0.75}]
    assert report.pivot_table(rows, "mine").splitlines()[2] == "| no attack | 0 | 0.250 | – |"
    assert report.markdown_table(rows, "mine").splitlines()[3] == "| B | none | – | 0 | 4 | – |"


def test_an_empty_metrics_or_methods_string_is_the_default_as_before():
    """6e2285d split a metrics string and took a methods string as one name: markdown_table(rows, "") (the default
    table until then) became "ValueError: markdown_table: no row holds the metric ''", as did a trailing comma
    ("accuracy,"), and pivot_table(rows, "accuracy", methods="") a column named "" whose cells read "–" where it
    had each method's (found by the revB helper)."""
    rows = [{"method": m, "attack": "none", "norm": None, "eps": 0.0, "n": 4, "accuracy": acc, "f1": 0.5}
            for m, acc in (("A", 0.5), ("B", 0.75))]
    assert report.markdown_table(rows, "") == report.markdown_table(rows)
    assert report.markdown_table(rows, "accuracy,") == report.markdown_table(rows, ["accuracy"])
    assert report.pivot_table(rows, "accuracy", methods="") == report.pivot_table(rows, "accuracy")
    assert report.pivot_table(rows, "accuracy", methods="").splitlines()[2] == "| no attack | 0 | 0.500 | 0.750 |"


def test_markdown_table_of_no_rows_says_so():
    # an empty "All rows" section would read as a report cut short
    assert report.markdown_table([]) == "(no rows)"


def test_paper_table_reads_a_paper_rows_attack_and_norm_in_any_case():
    """A paper row written as the papers (and reproduce's paper rows) write it, attack "FGSM" or norm "Linf", found no
    row of evaluate's, whose attack reads "fgsm" and norm "linf" (evaluate takes "FGSM" as fgsm): its "ours" cells read
    "–", as for a method not run (found by the api3 helper). They are now matched in any case; an exact name is
    taken first, and a paper row whose method was not run keeps its line with "–" (docs/design.md)."""
    rows = [{"method": "AT", "attack": a, "norm": "linf", "eps": 1 / 255, "n": 4, "accuracy": acc}
            for a, acc in (("fgsm", 0.625), ("pgd", 0.5))]
    paper = [{"method": "AT", "attack": "FGSM", "eps": 1 / 255, "source": "T1", "accuracy": 0.7},
             {"method": "AT", "attack": "pgd", "norm": "Linf", "eps": 1 / 255, "source": "T1", "accuracy": 0.6},
             {"method": "MIRST-DM", "attack": "pgd", "eps": 1 / 255, "source": "T1", "accuracy": 0.8}]
    lines = report.paper_comparison_table(rows, paper, ["accuracy"]).splitlines()[2:]
    assert lines == ["| AT | FGSM | 1/255 | T1 | 0.700 | 0.625 |", "| AT | pgd | 1/255 | T1 | 0.600 | 0.500 |",
                     "| MIRST-DM | pgd | 1/255 | T1 | 0.800 | – |"]
    # a label of ours in that very case wins over one in another case
    rows.append(dict(rows[0], attack="FGSM", accuracy=0.25))
    assert report.paper_comparison_table(rows, paper[:1], ["accuracy"]).splitlines()[2].endswith("| 0.250 |")


def test_paper_table_reads_a_paper_row_of_no_attack_as_our_clean_row():
    """The tables name the clean rows (results.json's attack "none") "no attack", paper_comparison_table's own lines
    too; a paper row written so, {AT, "no attack", 0}, found none of ours: "–", as for a method not run (found by the
    api3 helper). It is now our clean row, in any case."""
    rows = [{"method": "AT", "attack": "none", "norm": None, "eps": 0.0, "n": 4, "accuracy": 0.625}]
    paper = [{"method": "AT", "attack": a, "eps": 0, "source": "T1", "accuracy": 0.7} for a in ("none", "No attack")]
    lines = report.paper_comparison_table(rows, paper, ["accuracy"]).splitlines()[2:]
    assert lines == ["| AT | no attack | 0 | T1 | 0.700 | 0.625 |", "| AT | No attack | 0 | T1 | 0.700 | 0.625 |"]


def test_paper_table_takes_our_row_at_the_paper_rows_radius():
    # ours are looked up by eps to 6 decimals: 1/255 and 2/255 (0.0039, 0.0078) are two radii, each paper row gets
    # the value at its own
    rows = [{"method": "AT", "attack": "pgd", "norm": "linf", "eps": k / 255, "n": 4, "accuracy": acc}
            for k, acc in ((1, 0.6), (2, 0.4))]
    paper = [{"method": "AT", "attack": "pgd", "eps": k / 255, "source": "T1", "accuracy": 0.5} for k in (1, 2)]
    lines = report.paper_comparison_table(rows, paper, ["accuracy"]).splitlines()
    assert lines[2:] == ["| AT | pgd | 1/255 | T1 | 0.500 | 0.600 |", "| AT | pgd | 2/255 | T1 | 0.500 | 0.400 |"]
    # radii that agree to those 6 decimals (0.0039216, 0.0039219) both matched each paper row, and the last one's
    # value stood beside both: each gets ours at its own radius
    rows = [{**r, "eps": e} for r, e in zip(rows, (0.0039216, 0.0039219))]
    paper = [{**p, "eps": r["eps"]} for p, r in zip(paper, rows)]
    lines = report.paper_comparison_table(rows, paper, ["accuracy"]).splitlines()
    cells = [[c.strip(" |") for c in line.split(" | ")] for line in lines[2:]]
    assert [(c[2], c[5]) for c in cells] == [("0.0039216", "0.600"), ("0.0039219", "0.400")]


def test_paper_table_reads_a_paper_radius_at_the_decimals_the_paper_writes():
    """A paper's eps=0.031 (its 8/255) read "–" beside our row at 8/255 = 0.0314, ours being looked up to 6 decimals
    (found by the cli12 helper). A paper row's radius is now ours at the decimals it gives (0.031, 0.03), the ε cell
    saying which radius of ours stands beside it; several such radii of ours: the nearest. A paper row naming
    another attack than our row's label (pgd for pgd(steps=2)) still reads "–": docs/design.md says to name it so."""
    rows = [{"method": "AT", "attack": "fgsm", "norm": "linf", "eps": k / 255, "n": 4, "accuracy": acc}
            for k, acc in ((8, 0.6), (9, 0.4))]
    rows.append({"method": "AT", "attack": "pgd(steps=2)", "norm": "linf", "eps": 8 / 255, "n": 4, "accuracy": 0.2})
    paper = [{"method": "AT", "attack": "FGSM", "eps": eps, "source": "T1", "accuracy": 0.5} for eps in (0.031, 0.03)]
    paper += [{"method": "AT", "attack": a, "eps": 8 / 255, "source": "T1", "accuracy": 0.1} for a in ("pgd",
                                                                                                      "pgd(steps=2)")]
    lines = report.paper_comparison_table(rows, paper, ["accuracy"]).splitlines()
    assert lines[2:] == ["| AT | FGSM | 0.031 (ours 8/255) | T1 | 0.500 | 0.600 |",
                         "| AT | FGSM | 0.03 (ours 8/255) | T1 | 0.500 | 0.600 |",
                         "| AT | pgd | 8/255 | T1 | 0.100 | – |",
                         "| AT | pgd(steps=2) | 8/255 | T1 | 0.100 | 0.200 |"]
    # a radius the paper writes to more decimals than ours agree to is no match
    assert report.paper_comparison_table(rows, [dict(paper[0], eps=0.0312)], "accuracy").endswith("| 0.500 | – |")


def _record_figures(monkeypatch):
    """The list the figures that report saves from now on are appended to."""
    figures, save = [], report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: (figures.append(fig), save(fig, path)))
    return figures


def test_a_figure_is_written_at_the_path_given_as_a_png_unless_its_suffix_names_another_format(tmp_path):
    """plot_metric_vs_radius(rows, "fig") returned True ("written") with nothing at "fig": matplotlib wrote
    "fig.png"; and an io.BytesIO (a notebook showing the figure inline) got rcParams["savefig.format"], a PDF where a
    notebook set it so (found by the api3 helper). A path without a suffix, or a file object, now gets the PNG the
    docstrings promise; a suffix still names the format."""
    import io

    import matplotlib

    rows = [{"method": "M", "attack": a, "norm": n, "eps": e, "n": 4, "accuracy": 0.5}
            for a, n, e in (("none", None, 0.0), ("pgd", "linf", 1 / 255))]
    png, buffer = b"\x89PNG", io.BytesIO()
    with matplotlib.rc_context({"savefig.format": "pdf"}):
        assert report.plot_metric_vs_radius(rows, tmp_path / "fig") is True
        assert report.plot_metric_vs_radius(rows, buffer) is True
        assert report.plot_metric_vs_radius(rows, str(tmp_path / "fig.pdf")) is True
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
        assert report.plot_saliency(model, torch.rand(2, 1, 8, 8), [0, 1], tmp_path / "sal") is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig", "fig.pdf", "sal"]
    assert (tmp_path / "fig").read_bytes().startswith(png) and (tmp_path / "sal").read_bytes().startswith(png)
    assert buffer.getvalue().startswith(png) and (tmp_path / "fig.pdf").read_bytes().startswith(b"%PDF")


def test_a_figure_whose_name_ends_in_a_suffix_that_names_no_format_is_a_png_at_that_name(tmp_path):
    """A name with a dot that names no format was no PNG at the path given: plot_metric_vs_radius(rows,
    "acc_eps0.5") stopped with matplotlib's "Format '5' is not supported", and "fig." returned True having written
    "fig.png" (found by the revA helper)."""
    rows = [{"method": "M", "attack": a, "norm": n, "eps": e, "n": 4, "accuracy": 0.5}
            for a, n, e in (("none", None, 0.0), ("pgd", "linf", 1 / 255))]
    for name in ("acc_eps0.5", "fig.", "run.v2"):
        assert report.plot_metric_vs_radius(rows, tmp_path / name) is True
    assert report.plot_metric_vs_radius(rows, str(tmp_path / "fig.SVG")) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc_eps0.5", "fig.", "fig.SVG", "run.v2"]
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in ("acc_eps0.5", "fig.", "run.v2"))
    assert b"<svg" in (tmp_path / "fig.SVG").read_bytes()
    # a bytes path's suffix names its format as a text path's does: matplotlib wrote b"fig.pdf" as a PNG (found by
    # the mut55b helper)
    assert report.plot_metric_vs_radius(rows, os.fsencode(tmp_path / "fig.pdf")) is True
    assert (tmp_path / "fig.pdf").read_bytes().startswith(b"%PDF")


def _doc(rows, synthetic=False, num_classes=2):
    info = DatasetInfo("d", num_classes, 1, 8, tuple("abc"[:num_classes]), positive_class=1, synthetic=synthetic)
    return {"dataset": info.to_dict(), "synthetic": synthetic, "rows": rows, "metrics": None, "config": {},
            "environment": {"robust_ops": "x", "torch": "y", "device": "cpu", "date": "today"}}


def test_markdown_report_pivots_and_run_counts():
    base = dict(method="M", norm=None, eps=0.0, n=300, n_min=100, n_max=100, repeats=3, accuracy=0.8, f1=0.7,
                sensitivity=0.6, specificity=0.5, precision=0.4, auc=0.9)
    text = report.markdown_report(_doc([dict(base, attack="none")]))
    headers = [line for line in text.splitlines() if re.match(r"\| \w+: attack \|", line)]
    assert [h.split(":")[0] for h in headers] == ["| F1", "| Sensitivity", "| Specificity", "| Accuracy", "| AUC"]
    assert "Test samples: 300 over 3 runs (100–100 per run)." in text
    text = report.markdown_report(_doc([dict(base, attack="none", repeats=2)]))
    assert "Test samples: 300 over 2 runs" in text and "Synthetic data" not in text
    assert "Synthetic data" in report.markdown_report(_doc([dict(base, attack="none")], synthetic=True))


_CLEAN_ROW = dict(method="M", attack="none", norm=None, eps=0.0, n=20, accuracy=0.9, f1=0.8, sensitivity=0.7,
                  specificity=0.6, precision=0.5, auc=0.9)


def test_markdown_report_gives_each_methods_sample_count_when_they_differ():
    # rows of models evaluated on other sets, concatenated into one report (getting-started's way to compare models),
    # all read as the first row's count: "Test samples: 156." above a column of 20 samples
    rows = [dict(_CLEAN_ROW, method="A", n=156), dict(_CLEAN_ROW, method="B", n=20),
            dict(_CLEAN_ROW, method="B", attack="pgd", norm="linf", eps=1 / 255, n=20)]
    assert "Test samples: 156 (A), 20 (B)." in report.markdown_report(_doc(rows))
    assert "Test samples: 20." in report.markdown_report(_doc(rows[1:]))
    means = [dict(_CLEAN_ROW, method=m, n=300, n_min=100, n_max=100, repeats=3) for m in "AB"]
    assert "Test samples: 300 over 3 runs (100–100 per run)." in report.markdown_report(_doc(means))
    means[1].update(n=200, n_min=90, n_max=110, repeats=2)
    assert ("Test samples: 300 over 3 runs (100–100 per run) (A), 200 over 2 runs (90–110 per run) (B)."
            in report.markdown_report(_doc(means)))


def _tiny_conv_net():
    """A conv layer for grad_cam on 1x4x4 images, then a linear head (2 classes)."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 16, 2))


def test_markdown_report_shows_only_the_metrics_its_document_names():
    # results.json's "metrics" list decides the pivots and the all-rows columns; the task's defaults only without one
    doc = _doc([dict(_CLEAN_ROW)])
    doc["metrics"] = ["accuracy"]
    text = report.markdown_report(doc)
    assert "| Accuracy: attack |" in text and "F1" not in text and "AUC" not in text


def test_markdown_report_names_the_positive_class_only_for_binary_tasks():
    """A multi-class report has no positive class: its metrics are macro averages (robust_ops.metrics)."""
    row = dict(method="M", attack="none", norm=None, eps=0.0, n=30, accuracy=0.8, f1=0.7, sensitivity=0.6,
               specificity=0.5, precision=0.4, auc=0.9, map=0.8)
    doc = _doc([row], num_classes=3)
    doc["dataset"]["positive_class"] = None
    text = report.markdown_report(doc)
    assert "(3 classes, macro-averaged metrics over the classes present; sensitivity is the mean per-class recall)" \
        in text
    assert "positive class" not in text
    # its pivots are the multi-class metrics: mAP, not the binary AUC
    assert "| mAP: attack |" in text and "| AUC: attack |" not in text
    # a class absent from the test split is left out of the averages: results.json named it, the report did not
    doc["dataset"]["classes_missing_from_split"] = {"train": ["a"], "test": ["c"]}
    assert "(3 classes, macro-averaged metrics over the classes present; sensitivity is the mean per-class recall; " \
           "absent from the test split: c)" in report.markdown_report(doc)
    # eval --split val: the record's part is "val" (the report looked up "validation" and named nothing)
    doc["config"], doc["dataset"]["classes_missing_from_split"] = {"split": "val"}, {"val": ["b"], "test": ["c"]}
    assert "per-class recall; absent from the validation split: b). Validation samples: 30." in \
        report.markdown_report(doc)
    text = report.markdown_report(_doc([row]))
    assert ("(2 classes, positive class 1 = b; sensitivity is the recall of the positive class, specificity that of "
            "class 0 = a)") in text


def test_markdown_report_gives_each_class_recall_for_multi_class_tasks():
    """A multi-class report showed macro averages only: an attack that breaks one class (melanoma) and spares the
    others was invisible. Its rows' confusion counts give each class's recall; "–" for a class without samples."""
    row = dict(method="M", attack="none", norm=None, eps=0.0, n=5, accuracy=0.6, f1=0.5, sensitivity=0.5,
               specificity=0.8, precision=0.5, auc=0.9, map=0.8, confusion=[[2, 1, 0], [0, 0, 0], [0, 1, 1]])
    adv = dict(row, attack="pgd", norm="linf", eps=2 / 255, confusion=[[0, 3, 0], [0, 0, 0], [0, 1, 1]])
    doc = _doc([row, adv], num_classes=3)
    doc["dataset"]["positive_class"] = None
    text = report.markdown_report(doc)
    assert "## Per-class recall" in text
    assert ("| method | attack | norm | ε | n | a | b | c |\n|---|---|---|---|---|---|---|---|\n"
            "| M | no attack | – | 0 | 5 | 0.667 | – | 0.500 |\n"
            "| M | pgd | linf | 2/255 | 5 | 0.000 | – | 0.500 |") in text
    # binary reports have sensitivity and specificity, the two recalls; rows without counts have no recall line
    assert "Per-class recall" not in report.markdown_report(_doc([dict(row, confusion=[[1, 0], [1, 1]])]))
    doc["rows"] = [{k: v for k, v in r.items() if k != "confusion"} for r in (row, adv)]
    assert "Per-class recall" not in report.markdown_report(doc)


def test_reproduce_report_gives_each_class_recall_over_its_runs():
    """reproduce's multi-class report had no per-class recall (its mean rows held no counts, where a binary report
    has sensitivity and specificity): the mean rows now sum their runs' confusion counts, and the table says so."""
    from robust_ops.reproduce import aggregate

    run = dict(method="M", attack="pgd", norm="linf", eps=2 / 255, n=5, accuracy=0.4,
               confusion=[[2, 1, 0], [0, 0, 0], [0, 1, 1]])
    rows = aggregate([run, dict(run, accuracy=0.6, confusion=[[0, 3, 0], [1, 1, 0], [0, 0, 1]])], ["accuracy"])
    assert rows[0]["confusion"] == [[2, 4, 0], [1, 1, 0], [0, 1, 2]]
    # eval.json rows cached before evaluate counted the confusion matrix: no sum that leaves a run out
    assert aggregate([run, {k: v for k, v in run.items() if k != "confusion"}], ["accuracy"])[0]["confusion"] is None
    doc = _doc(rows, num_classes=3)
    doc["dataset"]["positive_class"] = None
    text = report.markdown_report(doc)
    assert "(results.json's `confusion`, summed over the runs: row = true class" in text
    assert "| M | pgd | linf | 2/255 | 10 | 0.333 | 0.500 | 0.667 |" in text


def test_markdown_report_links_its_figures_and_states_its_configuration_and_environment():
    # report.md shows the figures written beside it, the settings results.json records and the versions that made
    # it ("git unknown" outside a checkout); an empty configuration gets no section
    doc = _doc([dict(_CLEAN_ROW)])
    doc["config"] = {"command": "eval", "eps": "1/255"}
    text = report.markdown_report(doc, figures=["accuracy_vs_eps.png"])
    assert "![accuracy_vs_eps.png](accuracy_vs_eps.png)" in text
    assert "## Configuration\n\n```\ncommand: eval\neps: 1/255\n```" in text
    assert text.endswith("robust_ops x, torch y, cpu, git unknown, today.\n")  # no git revision recorded
    doc["config"], doc["environment"]["git_revision"] = {}, "abc123"
    text = report.markdown_report(doc)
    assert "## Configuration" not in text and "![" not in text and "git abc123, today." in text


def test_markdown_report_refuses_a_title_or_extra_that_is_no_text_as_write_results_does():
    """markdown_report(doc, title=3) wrote the heading "# 3" where write_results(title=3) is refused (found by the
    cli12 helper): one check for both, each message naming its own function and argument."""
    doc = _doc([dict(_CLEAN_ROW)])
    cases = [({"title": 3}, "markdown_report: expected title to be a string or None, got 3; give report.md's heading "
                            "as text, such as title='3', or None for 'Robustness evaluation'"),
             ({"extra": ["a", "b"]}, "markdown_report: expected extra to be a string or None, got ['a', 'b']; join "
                                     "its lines into one text: extra='\\n'.join(lines)")]
    for kwargs, want in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
            report.markdown_report(doc, **kwargs)
    assert report.markdown_report(doc, title="3", extra="x").startswith("# 3\n")


def test_report_md_shows_the_paper_rows_and_notes_results_json_records(tmp_path):
    """write_results(paper=..., notes=...) recorded them in results.json, but report.md showed neither (measured:
    '"paper X" in report.md' False); reproduce added its own comparison through extra_markdown (found by the cli12
    helper). markdown_report now writes the comparison, a column pair per metric the paper rows give, and the notes."""
    from robust_ops.evaluate import write_results

    rows = [dict(_CLEAN_ROW), dict(_CLEAN_ROW, attack="pgd", norm="linf", eps=8 / 255, accuracy=0.4, f1=0.3)]
    paper = [{"source": "paper X", "method": "M", "attack": "PGD", "eps": 8 / 255, "f1": 0.35, "accuracy": 0.5}]
    info = DatasetInfo("d", 2, 1, 8, ("a", "b"), positive_class=1)
    text = write_results(tmp_path, rows, info, figures=False, paper=paper, notes=["one note"])["report"].read_text()
    assert ("## Published numbers beside ours\n\n| method | attack | ε | paper source | F1 (paper) | F1 (ours) | "
            "Accuracy (paper) | Accuracy (ours) |\n|---|---|---|---|---|---|---|---|\n"
            "| M | PGD | 8/255 | paper X | 0.350 | 0.300 | 0.500 | 0.400 |\n\n## Notes\n\n- one note\n") in text
    assert text.index("## Notes") < text.index("## All rows")
    text = write_results(tmp_path, rows, info, figures=False)["report"].read_text()
    assert "Published numbers" not in text and "## Notes" not in text


def test_radius_figure_title_marks_synthetic_data(tmp_path, monkeypatch):
    rows = [{"method": "m", "attack": "none", "norm": None, "eps": 0.0, "accuracy": 0.9},
            {"method": "m", "attack": "fgsm", "norm": "linf", "eps": 0.1, "accuracy": 0.5}]
    figures = _record_figures(monkeypatch)
    for synthetic in (True, False):
        info = DatasetInfo("d", 2, 1, 8, ("a", "b"), synthetic=synthetic)
        assert report.plot_metric_vs_radius(rows, tmp_path / "a.png", info=info)
    assert figures[0]._suptitle.get_text() == "Accuracy vs radius on d — SYNTHETIC DATA"
    assert figures[1]._suptitle.get_text() == "Accuracy vs radius on d"


def test_radius_figure_title_says_it_plots_means_over_runs(tmp_path, monkeypatch):
    # reproduce's rows are means over its seeds or folds: the figure, read without the report, showed them as the
    # values of one run
    rows = [{"method": "m", "attack": "none", "norm": None, "eps": 0.0, "accuracy": 0.9, "repeats": 3},
            {"method": "m", "attack": "fgsm", "norm": "linf", "eps": 0.1, "accuracy": 0.5, "repeats": 3}]
    figures = _record_figures(monkeypatch)
    info = DatasetInfo("d", 2, 1, 8, ("a", "b"))
    assert report.plot_metric_vs_radius(rows, tmp_path / "a.png", info=info)
    rows[1]["repeats"] = 2
    assert report.plot_metric_vs_radius(rows, tmp_path / "a.png", info=info)
    assert report.plot_metric_vs_radius([dict(r, repeats=1) for r in rows], tmp_path / "a.png", info=info)
    assert [f._suptitle.get_text() for f in figures] == [
        "Accuracy vs radius on d, mean over 3 runs", "Accuracy vs radius on d, mean over 2–3 runs",
        "Accuracy vs radius on d"]


def test_radius_figure_draws_the_std_of_reproduces_means_and_marks_means_of_fewer_runs(tmp_path, monkeypatch):
    """reproduce's figures plotted its means over seeds or folds without their spread, though every mean row holds
    ``<metric>_std`` and its tables show "± std": each point with a std now gets a ±1 std bar (the title says so),
    and a mean over only k of the n runs is marked "k of n runs", as the tables mark it."""
    rows = [{"method": "m", "attack": "none", "norm": None, "eps": 0.0, "accuracy": 0.9, "accuracy_std": 0.05,
             "accuracy_runs": 3, "repeats": 3},
            {"method": "m", "attack": "fgsm", "norm": "linf", "eps": 0.1, "accuracy": 0.5, "accuracy_std": None,
             "accuracy_runs": 1, "repeats": 3},
            {"method": "m", "attack": "fgsm", "norm": "linf", "eps": 0.2, "accuracy": 0.25, "accuracy_std": 0.1,
             "accuracy_runs": 2, "repeats": 3}]
    figures = _record_figures(monkeypatch)
    info = DatasetInfo("d", 2, 1, 8, ("a", "b"))
    assert report.plot_metric_vs_radius(rows, tmp_path / "a.png", info=info)
    ax = figures[0].axes[0]
    bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    segments = np.array([s for c in bars for s in c.lines[2][0].get_segments()])
    np.testing.assert_allclose(segments, [[[0, 0.85], [0, 0.95]], [[0.2, 0.15], [0.2, 0.35]]])  # none for 1 run
    assert sorted(t.get_text() for t in ax.texts) == ["1 of 3 runs", "2 of 3 runs"]
    title = " ".join(figures[0]._suptitle.get_text().split())  # wrapped to the one panel's width
    assert title == "Accuracy vs radius on d, mean over 3 runs, bars ±1 std"
    # one run's rows: no bar, no mark, the title as before
    assert report.plot_metric_vs_radius([{k: v for k, v in r.items() if not k.startswith(("accuracy_", "rep"))}
                                         for r in rows], tmp_path / "a.png", info=info)
    assert not figures[1].axes[0].containers and not figures[1].axes[0].texts
    assert figures[1]._suptitle.get_text() == "Accuracy vs radius on d"


def test_multiclass_radius_figures_say_their_metrics_are_macro_averages(tmp_path, monkeypatch):
    """A 7-class F1 figure was labelled "F1", though it plots the one-vs-rest macro average (the report says so, the
    figure stands alone); binary figures and accuracy keep their names."""
    rows = [{"method": "m", "attack": "none", "norm": None, "eps": 0.0, "accuracy": 0.9, "f1": 0.8},
            {"method": "m", "attack": "fgsm", "norm": "linf", "eps": 0.1, "accuracy": 0.5, "f1": 0.4}]
    figures = _record_figures(monkeypatch)
    for classes, metric in (((*"abcdefg",), "f1"), ((*"abcdefg",), "accuracy"), (("a", "b"), "f1")):
        info = DatasetInfo("d", len(classes), 3, 8, classes)
        assert report.plot_metric_vs_radius(rows, tmp_path / "a.png", metric=metric, info=info)
    labels = [(f._suptitle.get_text(), f.axes[0].get_ylabel()) for f in figures]
    assert labels == [("Macro F1 vs radius on d", "Macro F1"), ("Accuracy vs radius on d", "Accuracy"),
                      ("F1 vs radius on d", "F1")]


def test_binary_radius_figures_name_the_positive_class(tmp_path, monkeypatch):
    """A binary sensitivity or F1 figure was labelled "Sensitivity" alone: of which class only report.md's sentence
    said (melanoma = 0 in a folder of melanoma/ and nevus/, malignant = 0 in BreastMNIST), and a figure stands
    without it. Accuracy, and a binary set without a positive class, keep their names."""
    rows = [{"method": "m", "attack": "none", "norm": None, "eps": 0.0, "accuracy": 0.9, "f1": 0.8,
             "sensitivity": 0.7},
            {"method": "m", "attack": "fgsm", "norm": "linf", "eps": 0.1, "accuracy": 0.5, "f1": 0.4,
             "sensitivity": 0.3}]
    figures = _record_figures(monkeypatch)
    info = DatasetInfo("derm", 2, 3, 8, ("melanoma", "nevus"), positive_class=0)
    rows = [{**r, "precision": r["f1"]} for r in rows]  # not among figure_metrics, but plot_metric_vs_radius's own
    rows = [{**r, "specificity": r["accuracy"]} for r in rows]
    for metric in ("sensitivity", "f1", "precision", "accuracy", "specificity"):
        assert report.plot_metric_vs_radius(rows, tmp_path / "a.png", metric=metric, info=info)
    assert report.plot_metric_vs_radius(rows, tmp_path / "a.png", metric="f1",
                                        info=DatasetInfo("d", 2, 3, 8, ("a", "b")))
    labels = [(f._suptitle.get_text(), f.axes[0].get_ylabel()) for f in figures]
    assert labels == [("Sensitivity (melanoma) vs radius on derm", "Sensitivity (melanoma)"),
                      ("F1 (melanoma) vs radius on derm", "F1 (melanoma)"),
                      ("Precision (melanoma) vs radius on derm", "Precision (melanoma)"),
                      ("Accuracy vs radius on derm", "Accuracy"),
                      ("Specificity (nevus) vs radius on derm", "Specificity (nevus)"), ("F1 vs radius on d", "F1")]
    melanoma_second = DatasetInfo("derm", 2, 3, 8, ("nevus", "melanoma"), positive_class=1)
    assert report.figure_metric_label("sensitivity", melanoma_second) == "Sensitivity (melanoma)"
    assert report.figure_metric_label("specificity", melanoma_second) == "Specificity (nevus)"


def test_saliency_figure_title_marks_synthetic_data(tmp_path, monkeypatch):
    # as the radius figure's: maps of generated images must not pass for a patient's, with or without a title
    model = _tiny_conv_net()
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    figures = _record_figures(monkeypatch)
    for synthetic, title in ((True, "m"), (True, None), (False, "m")):
        info = DatasetInfo("d", 2, 1, 4, ("a", "b"), synthetic=synthetic)
        assert report.plot_saliency(model, x, y, tmp_path / "s.png", info=info, title=title)
    assert [f._suptitle.get_text().strip() for f in figures] == ["m (synthetic data)", "(synthetic data)", "m"]


def test_radius_figure_title_fits_a_long_dataset_name(tmp_path, monkeypatch):
    """One attack makes a one-panel figure, 3.6 in wide: a dataset named like Kaggle's COVID-19 set ran its title
    past both edges, cut off ("...ccuracy vs radius on COVID-19_Radiography_Datase..."). It is wrapped instead."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [{"method": "m", "attack": "none", "norm": None, "eps": 0.0, "accuracy": 0.9},
            {"method": "m", "attack": "pgd", "norm": "linf", "eps": 0.1, "accuracy": 0.5}]
    figures = _record_figures(monkeypatch)
    for name in ("COVID-19_Radiography_Dataset", "d", "M" * 30):  # 30 wide glyphs: past an average-width estimate
        info = DatasetInfo(name, 2, 1, 8, ("a", "b"), synthetic=True)
        assert report.plot_metric_vs_radius(rows, tmp_path / "a.png", info=info)
    for fig in (figures[0], figures[2]):
        box = fig._suptitle.get_window_extent(FigureCanvasAgg(fig).get_renderer())
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width
    assert " ".join(figures[0]._suptitle.get_text().split()) == ("Accuracy vs radius on "
                                                                 "COVID-19_Radiography_Dataset — SYNTHETIC DATA")
    assert figures[1]._suptitle.get_text() == "Accuracy vs radius on d — SYNTHETIC DATA"  # short: one line


def test_saliency_panel_titles_fit_long_class_names(tmp_path, monkeypatch):
    """A DermaMNIST-style set names its classes in words: "true actinic keratoses and intraepithelial carcinoma" over
    a 2.2 in column ran past the figure's left edge, cut off, and into the next column's title. Panel titles are
    wrapped to their column, as the figure's title is to the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    names = ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis-like lesions",
             "dermatofibroma", "melanoma", "melanocytic nevi", "colorectal adenocarcinoma epithelium")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 7))
    x, y = torch.rand(3, 3, 6, 6), torch.tensor([0, 6, 2])
    figures = _record_figures(monkeypatch)
    info = DatasetInfo("dermlike", 7, 3, 6, names)
    assert report.plot_saliency(model, x, y, tmp_path / "s.png", info=info, title="MIRST-DM")
    fig = figures[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes]
    assert all(0 <= b.x0 and b.x1 <= fig.bbox.width for b in boxes)
    for row in range(3):  # neighbours in a row do not overlap
        left, middle, right = boxes[3 * row:3 * row + 3]
        assert left.x1 <= middle.x0 and middle.x1 <= right.x0
    # wrapped, not cut: every word of the class names is still there
    assert " ".join(fig.axes[0].get_title().split()) == f"true {names[0]} pred " + names[int(model(x[:1]).argmax())]


class _Net(nn.Module):
    """conv -> linear; ``single``: one logit z, else the two logits (-z/2, z/2) (the same decision, half scale)."""

    def __init__(self, single):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 1)
        self.single = single

    def forward(self, x):
        z = self.fc(self.conv(x).flatten(1))[:, 0]
        return z if self.single else torch.stack([-z / 2, z / 2], 1)


def test_grad_cam_and_input_gradient_values():
    x = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 0, 1])
    two = _Net(single=False)
    # Grad-CAM by hand: channel weights = spatial mean of d score / d activation; ReLU of the weighted sum; per-image
    # peak normalisation (4x4 activations: the upsampling is the identity)
    act = two.conv(x)
    z = two.fc(act.flatten(1))[:, 0]
    score = torch.stack([-z / 2, z / 2], 1).gather(1, target[:, None]).sum()
    grad, = torch.autograd.grad(score, act)
    cam = torch.relu((grad.mean((2, 3), keepdim=True) * act).sum(1)).detach()
    want = cam / cam.flatten(1).amax(1).view(-1, 1, 1)
    torch.testing.assert_close(report.grad_cam(two, x, target=target), want)
    assert bool((want == 0).any())  # the ReLU cut something
    # a single-logit model: class 0's score is -z, so its map equals the two-logit model's
    torch.testing.assert_close(report.grad_cam(_Net(single=True), x, target=target), want)
    # input gradient: |d loss / d x| summed over channels (not |sum|), peak-normalised per image
    xg = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(nn.functional.cross_entropy(two(xg), target, reduction="sum"), xg)
    sal = g.abs().sum(1)
    torch.testing.assert_close(report.input_gradient(two, x, target), sal / sal.flatten(1).amax(1).view(-1, 1, 1))


@pytest.mark.parametrize("single", [False, True])
def test_grad_cam_maps_the_predicted_classes_by_default(single):
    # no target: each image's predicted class (a single logit: class 1 where z > 0), not the other one
    model, x = _Net(single=single), torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    z = _Net(single=True)(x)
    pred = (z > 0).long()
    assert 0 < int(pred.sum()) < 6  # both classes predicted
    torch.testing.assert_close(report.grad_cam(model, x), report.grad_cam(model, x, target=pred))


def test_plot_saliency_refuses_non_images(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    assert report.plot_saliency(model, torch.rand(3, 2), torch.tensor([0, 1, 0]), tmp_path / "s.png") is False
    assert not (tmp_path / "s.png").exists()
    with pytest.raises(ValueError, match="no Conv2d layer"):
        report.grad_cam(model, torch.rand(3, 2))


def test_plot_saliency_of_no_images_draws_nothing(tmp_path):
    # zero images: no figure of zero rows (nothing to show), False as for non-images
    model = _tiny_conv_net()
    assert report.plot_saliency(model, torch.rand(0, 1, 4, 4), torch.zeros(0, dtype=torch.long),
                                tmp_path / "s.png") is False
    assert not (tmp_path / "s.png").exists()


def test_markdown_report_notes_undefined_metrics():
    # a test set without positives: sensitivity and AUC are NaN; the report must say why, not only show "–"
    base = dict(method="M", attack="none", norm=None, eps=0.0, n=20, accuracy=0.9, f1=0.0, sensitivity=math.nan,
                specificity=0.9, precision=0.0, auc=None)
    text = report.markdown_report(_doc([base]))
    assert "Undefined metrics" in text and "Sensitivity in 1 of 1 rows, AUC in 1 of 1 rows" in text
    assert "sensitivity without positive-class samples" in text
    defined = dict(base, sensitivity=0.5, auc=0.7)
    assert "Undefined metrics" not in report.markdown_report(_doc([defined]))
    # multi-class: no positive class; macro precision is undefined when no class of the evaluated set is predicted
    # (a model predicting only a class absent from it), which the binary reasons did not describe
    doc = _doc([dict(base, sensitivity=0.0, auc=0.8, precision=math.nan, map=0.5)], num_classes=3)
    doc["dataset"]["positive_class"] = None
    text = report.markdown_report(doc)
    assert "Precision in 1 of 1 rows" in text and "positive" not in text.split("Undefined metrics")[1].split("\n")[0]
    assert "precision when none of them is predicted" in text


def test_markdown_report_names_the_cells_without_a_row():
    # models evaluated with other attacks, concatenated into one report: their pivot cells without a row read "–",
    # which the report explained only as 0/0 ("Undefined metrics"), and not at all for accuracy, never undefined
    rows = [dict(_CLEAN_ROW, method=m) for m in "AB"]
    rows += [dict(_CLEAN_ROW, method="A", attack=a, norm="linf", eps=k / 255) for a in ("fgsm", "pgd") for k in (1, 2)]
    rows += [dict(_CLEAN_ROW, method="B", attack="fgsm", norm="linf", eps=1 / 255)]
    text = report.markdown_report(_doc(rows))
    assert "| fgsm | 2/255 | 0.900 | – |" in text and "Undefined metrics" not in text
    assert ("> **Not evaluated** (–, no such row in results.json): B: fgsm at 2/255, pgd at 1/255, 2/255; evaluated "
            "with other attacks or radii") in text
    # an attack run under two norms is named with its norm, as in the tables
    rows += [dict(_CLEAN_ROW, method="A", attack="fgsm", norm="l2", eps=0.5)]
    assert "B: fgsm (linf) at 2/255, pgd at 1/255, 2/255, fgsm (l2) at 0.5;" in report.markdown_report(_doc(rows))
    assert "Not evaluated" not in report.markdown_report(_doc([r for r in rows if r["method"] == "A"]))


def test_pivot_lines_keep_each_attacks_radii_together_and_ascending():
    # two evaluate calls' rows concatenated (write_results takes them): B's fgsm at 2/255 came last, after A's
    # worst-case lines, apart from fgsm's other radii; the "Not evaluated" note listed A's radii in that order too
    rows = [dict(_CLEAN_ROW, method="A")]
    rows += [dict(_CLEAN_ROW, method="A", attack=a, norm="linf", eps=k / 255) for a in ("fgsm", "pgd", "worst-case")
             for k in (1, 4)]
    rows += [dict(_CLEAN_ROW, method="B"), dict(_CLEAN_ROW, method="B", attack="fgsm", norm="linf", eps=2 / 255)]
    lines = [line.split(" | ")[:2] for line in report.pivot_table(rows, "accuracy").splitlines()[2:]]
    assert lines == [["| no attack", "0"], ["| fgsm", "1/255"], ["| fgsm", "2/255"], ["| fgsm", "4/255"],
                     ["| pgd", "1/255"], ["| pgd", "4/255"], ["| worst-case", "1/255"], ["| worst-case", "4/255"]]
    assert "A: fgsm at 2/255; B: fgsm at 1/255, 4/255, pgd at" in report.missing_rows_note(rows)


def test_radius_figure_hides_tick_labels_that_would_overlap(tmp_path, monkeypatch):
    # radii that double (0.5/255 ... 32/255): "0", "0.001961", "1/255" and "2/255" were drawn on top of each other,
    # unreadable; the ones overlapping a label kept to their left are hidden (their ticks stay), evenly spaced radii
    # keep every label
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # the labels are drawn at 45 degrees: side by side, as 1/255 ... 16/255 on one panel are, their texts are apart
    # where the boxes around them overlap (every other one of 1/255 ... 12/255 was hidden, 12/255 too)
    figures = _record_figures(monkeypatch)
    for radii in ((0.5, 1, 2, 4, 8, 16, 32), range(1, 9), range(1, 13), range(1, 17)):
        rows = [dict(_CLEAN_ROW, method="A")]
        rows += [dict(_CLEAN_ROW, method="A", attack="pgd", norm="linf", eps=k / 255) for k in radii]
        assert report.plot_metric_vs_radius(rows, tmp_path / "a.png")
    shown = []
    for fig in figures:
        renderer = FigureCanvasAgg(fig).get_renderer()
        labels = [t.label1 for t in fig.axes[0].xaxis.get_major_ticks() if t.label1.get_visible()]
        shown.append([t.get_text() for t in labels])
        boxes = [t.get_window_extent(renderer) for t in labels]
        height = max(t.get_size() for t in labels) * fig.dpi / 72  # a line of 7-point text, in pixels
        for t in labels:
            assert t.get_rotation() == 45
        # two 45-degree lines of text: apart when their centres lie a text's height apart across the lines
        centres = [((b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2) for b in boxes]
        assert all(abs((b[1] - a[1]) - (b[0] - a[0])) / 2 ** 0.5 >= height for a, b in zip(centres, centres[1:]))
    assert shown[0][0] == "0" and shown[0][-4:] == ["4/255", "8/255", "16/255", "32/255"] and len(shown[0]) < 8
    for shown_even, radii in zip(shown[1:], (8, 12, 16)):
        assert shown_even == ["0"] + [f"{k}/255" for k in range(1, radii + 1)]


def test_a_tick_label_is_hidden_only_where_its_rectangle_overlaps_the_last_one_kept(tmp_path, monkeypatch):
    # the rule as _hide_overlapping_tick_labels words it: a label hidden beside one hidden before it, not beside the
    # last one kept, lost a readable radius; and the labels' rectangles lie at their 45 degrees, along their text
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figures = _record_figures(monkeypatch)
    for radii in ((0.5, 1, 2, 4, 8, 16, 32), range(1, 25)):  # 1/255 ... 24/255: each label overlaps the next
        rows = [dict(_CLEAN_ROW, method="A")]
        rows += [dict(_CLEAN_ROW, method="A", attack="pgd", norm="linf", eps=k / 255) for k in radii]
        assert report.plot_metric_vs_radius(rows, tmp_path / "a.png")
    for fig in figures:
        renderer = FigureCanvasAgg(fig).get_renderer()
        kept, hidden = None, 0
        for tick in fig.axes[0].xaxis.get_major_ticks():
            visible = tick.label1.get_visible()
            tick.label1.set_visible(True)  # a hidden text has no extent to measure
            rectangle = report._label_rectangle(tick.label1, renderer)
            if visible:
                assert kept is None or not report._rectangles_overlap(kept, rectangle)
                kept = rectangle
            else:
                hidden += 1
                assert report._rectangles_overlap(kept, rectangle), tick.label1.get_text()
        assert hidden
    text = Figure().add_subplot().text(0.5, 0.5, "12/255", rotation=45)
    centre, width, height, angle = report._label_rectangle(text, FigureCanvasAgg(text.figure).get_renderer())
    assert angle == pytest.approx(math.pi / 4) and text.get_rotation() == 45 and width > 2 * height
    for along, across, overlap in ((0.9, 0, True), (1.1, 0, False), (0, 0.9, True), (0, 1.1, False)):
        shift = (along * width - across * height) / 2 ** 0.5, (along * width + across * height) / 2 ** 0.5
        other = (centre[0] + shift[0], centre[1] + shift[1]), width, height, angle
        assert report._rectangles_overlap((centre, width, height, angle), other) == overlap, (along, across)


def test_radius_figure_skips_a_metric_undefined_in_every_row(tmp_path):
    # sensitivity on a test set without positives: an empty figure used to be written (and listed in report.md)
    rows = [{"method": "m", "attack": "none", "norm": None, "eps": 0.0, "sensitivity": math.nan},
            {"method": "m", "attack": "fgsm", "norm": "linf", "eps": 0.1, "sensitivity": None}]
    assert not report.plot_metric_vs_radius(rows, tmp_path / "s.png", metric="sensitivity")
    assert not (tmp_path / "s.png").exists()


def test_radius_figure_of_clean_rows_only_draws_nothing(tmp_path):
    # no attack, no radius axis: no figure (False), as for a metric undefined everywhere
    rows = [{"method": "m", "attack": "none", "norm": None, "eps": 0.0, "accuracy": 0.9}]
    assert not report.plot_metric_vs_radius(rows, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_radius_figure_gives_each_method_one_colour_and_legend_entry(tmp_path, monkeypatch):
    # F1 on a test set without positives: A predicts none (F1 undefined) on clean inputs and under FGSM. Each panel
    # coloured its own lines in turn, so under FGSM B took A's colour, and the legend (the last panel's lines) said
    # B was orange while B's FGSM line was blue.
    nan = math.nan
    rows = [{"method": "A", "attack": "none", "norm": None, "eps": 0.0, "f1": nan},
            {"method": "A", "attack": "fgsm", "norm": "linf", "eps": 0.1, "f1": nan},
            {"method": "A", "attack": "pgd", "norm": "linf", "eps": 0.1, "f1": 0.0},
            {"method": "B", "attack": "none", "norm": None, "eps": 0.0, "f1": 0.0},
            {"method": "B", "attack": "fgsm", "norm": "linf", "eps": 0.1, "f1": 0.0},
            {"method": "B", "attack": "pgd", "norm": "linf", "eps": 0.1, "f1": 0.0}]
    figures = _record_figures(monkeypatch)
    assert report.plot_metric_vs_radius(rows, tmp_path / "f1.png", metric="f1")
    fgsm, pgd = figures[0].axes
    colour = {line.get_label(): line.get_color() for ax in (fgsm, pgd) for line in ax.get_lines()}
    assert [line.get_label() for line in fgsm.get_lines()] == ["B"]
    assert fgsm.get_lines()[0].get_color() == pgd.get_lines()[1].get_color() == colour["B"] != colour["A"]
    legend = pgd.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["A", "B"]
    assert [h.get_color() for h in legend.legend_handles] == [colour["A"], colour["B"]]

    rows = [r for r in rows if r["attack"] != "pgd"]  # A has no line at all: B keeps its colour, A no legend entry
    report.plot_metric_vs_radius(rows, tmp_path / "f1.png", metric="f1")
    ax, = figures[1].axes
    assert ax.get_lines()[0].get_color() == colour["B"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["B"]


@pytest.mark.parametrize("frozen", ["all", "features"])
def test_grad_cam_on_a_model_with_frozen_convolutions(tmp_path, frozen):
    """A model frozen for evaluation, or fine-tuned head only, has activations that do not require grad: grad_cam
    failed with "can't retain_grad on Tensor that has requires_grad=False", and write_results (saliency) then wrote
    nothing. The maps are the trainable model's, and the parameter flags stay as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    x, y = torch.rand(3, 1, 6, 6), torch.tensor([0, 1, 0])
    want = report.grad_cam(model, x)
    frozen_params = list(model.parameters()) if frozen == "all" else list(model[0].parameters())
    for p in frozen_params:
        p.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    torch.testing.assert_close(report.grad_cam(model, x), want)
    assert [p.requires_grad for p in model.parameters()] == flags and not x.requires_grad
    assert report.plot_saliency(model, x, y, tmp_path / "s.png")


@pytest.mark.parametrize("channels", [2, 4, 5])
def test_saliency_figure_of_images_with_other_channel_counts(tmp_path, monkeypatch, channels):
    """matplotlib draws 1 or 3 channels: 2 or 5 raised "Invalid shape (H, W, C) for image data" (write_results then
    wrote nothing) and a 4th was taken as transparency. Such images are shown as their channel mean, titled so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    x, y = torch.rand(2, channels, 6, 6), torch.tensor([0, 1])
    figures = _record_figures(monkeypatch)
    assert report.plot_saliency(model, x, y, tmp_path / "s.png")
    first = figures[0].axes[0]
    torch.testing.assert_close(torch.as_tensor(first.get_images()[0].get_array()), x[0].mean(0))
    assert first.get_title().endswith(f"mean of {channels} channels")


def test_saliency_figure_leaves_out_constant_grad_cam_maps(tmp_path, monkeypatch):
    """vgg16 / densenet121 at 28x28 end in a 1x1 feature map: every Grad-CAM panel was one flat colour (all 0 or all
    1) without a word. The column is left out and the title says why; informative maps stay."""
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Conv2d(1, 4, 6), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))  # 6x6 input -> 1x1 map
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    figures = _record_figures(monkeypatch)
    assert report.plot_saliency(flat, x, y, tmp_path / "s.png")
    assert [ax.get_title() for ax in figures[0].axes[1:2]] == ["input gradient"]
    note = "Grad-CAM left out: its maps are constant here\n(a 1x1 last feature map, or no positive evidence)"
    assert figures[0]._suptitle.get_text() == note
    # on one line the note was wider than the two-column figure and cut off at both ends
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    box = figures[0]._suptitle.get_window_extent(FigureCanvasAgg(figures[0]).get_renderer())
    assert 0 <= box.x0 and box.x1 <= figures[0].bbox.width
    spatial = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    assert report.plot_saliency(spatial, x, y, tmp_path / "t.png")
    assert figures[1].axes[1].get_title() == "Grad-CAM" and figures[1]._suptitle is None
    # upsampled from 1x1 to 28x28 a map is constant up to rounding only (vgg16 at 28x28 on RGB images: 1.0 and
    # 0.99999994): an exact comparison kept those flat panels, without the note
    torch.manual_seed(1)
    rgb = nn.Sequential(nn.Conv2d(3, 4, 28), nn.ReLU(), nn.Flatten(), nn.Linear(4, 7))
    x = torch.rand(4, 3, 28, 28)
    cams = report.grad_cam(rgb, x)
    assert bool((cams.flatten(1).amax(1) > cams.flatten(1).amin(1)).any())  # the rounding this case is about
    assert report.plot_saliency(rgb, x, torch.arange(4), tmp_path / "u.png")
    assert [ax.get_title() for ax in figures[2].axes[1:2]] == ["input gradient"]
    assert figures[2]._suptitle.get_text() == note
    # all zero on a 6x6 map: every channel weighs negatively for the predicted class (the dermoscopy walk's resnet18
    # at 32x32, a 2x2 map): the note named only a 1x1 map
    negative = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    with torch.no_grad():
        negative[0].bias.fill_(1.0)  # positive activations everywhere
        negative[3].weight.copy_(torch.tensor([-1.0, -2.0]).view(2, 1).expand(2, 4 * 36))
        negative[3].bias.zero_()
    x = torch.rand(2, 1, 6, 6)
    assert not report.grad_cam(negative, x).any()
    assert report.plot_saliency(negative, x, torch.tensor([0, 1]), tmp_path / "v.png")
    assert figures[3]._suptitle.get_text() == note


def test_saliency_figure_names_a_single_constant_grad_cam_map(tmp_path, monkeypatch):
    """Only maps constant for every image were noted: one image's constant map beside informative ones was drawn as
    a flat overlay without a word, read as "attends to nothing" (found by the CT researcher's walk: small_cnn at 64x64).
    Its panel shows the image alone, titled so; the other panels keep their overlay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    x = torch.rand(2, 1, 6, 6)
    x[0] = 0  # no activation anywhere: an all-zero map
    cams = report.grad_cam(model, x)
    assert not cams[0].any() and bool(cams[1].amax() > cams[1].amin())
    figures = _record_figures(monkeypatch)
    assert report.plot_saliency(model, x, torch.tensor([0, 1]), tmp_path / "s.png")
    axes = figures[0].axes
    assert [axes[1].get_title(), axes[4].get_title()] == ["Grad-CAM: constant\n(not drawn)", "Grad-CAM"]
    assert [len(axes[1].get_images()), len(axes[4].get_images())] == [1, 2]  # the image; the image and its overlay


def test_tables_escape_a_pipe_in_labels():
    """A method label with a "|" (--method "AT|eps=2") split its cell: every value after it moved one column right,
    under the wrong header, in the all-rows, pivot and paper tables alike."""
    import re

    rows = [{"method": "AT|eps=2", "attack": "none", "norm": None, "eps": 0.0, "n": 4, "accuracy": 0.9},
            {"method": "AT|eps=2", "attack": "fgsm", "norm": "linf", "eps": 1 / 255, "n": 4, "accuracy": 0.5}]
    paper = [{"method": "AT|eps=2", "attack": "fgsm", "eps": 1 / 255, "source": "T1", "accuracy": 0.6}]
    for table in (report.markdown_table(rows, ["accuracy"]), report.pivot_table(rows, "accuracy"),
                  report.paper_comparison_table(rows, paper, ["accuracy"])):
        lines = table.splitlines()
        cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in lines]
        assert len({len(c) for c in cells}) == 1, table
        assert "AT\\|eps=2" in table


def test_tables_keep_a_line_break_in_a_label_on_its_row():
    """A line break in a label (e.g. a --method from a config file) would end its Markdown row, the cells after it
    out of the table: it is written as a space, in the all-rows, pivot and paper tables alike."""
    rows = [{"method": "AT\nv2", "attack": "none", "norm": None, "eps": 0.0, "n": 4, "accuracy": 0.9}]
    paper = [{"method": "AT\nv2", "attack": "none", "eps": 0.0, "source": "T1", "accuracy": 0.6}]
    for table in (report.markdown_table(rows, ["accuracy"]), report.pivot_table(rows, "accuracy"),
                  report.paper_comparison_table(rows, paper, ["accuracy"])):
        assert len(table.splitlines()) == 3 and "AT v2" in table, table


def test_saliency_figure_takes_labels_of_shape_n_by_1(tmp_path, monkeypatch):
    """evaluate takes MedMNIST's [N, 1] labels; the saliency figure of the same tensors failed in the loss ("0D or 1D
    target tensor expected"), and write_results then wrote nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([[1], [0]], dtype=torch.uint8)
    figures = _record_figures(monkeypatch)
    assert report.plot_saliency(model, x, y, tmp_path / "s.png")
    titles = [figures[0].axes[3 * i].get_title() for i in range(2)]
    assert titles[0].startswith("true 1\n") and titles[1].startswith("true 0\n")


def test_saliency_figure_of_a_model_without_parameters(tmp_path):
    """A model with no parameters (a fixed pooling read-out) failed with StopIteration finding its device."""
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # 2 channels: 2 class scores
    x, y = torch.rand(2, 2, 6, 6), torch.tensor([0, 1])
    assert report.plot_saliency(model, x, y, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saliency_figure_hands_matplotlib_arrays_without_a_warning(tmp_path, dtype):
    """imshow got tensors: numpy took them through its deprecated __array__ fallback (a DeprecationWarning, hidden by
    the suite's ignore::DeprecationWarning filter) and refused bfloat16 ones ("Got unsupported ScalarType BFloat16")."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)).to(dtype)
    x, y = torch.rand(2, 1, 6, 6, dtype=dtype), torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert report.plot_saliency(model, x, y, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_saliency_maps_of_a_float16_model_are_zero_not_nan_where_nothing_responds():
    """The per-image normalisation divided by max(peak, 1e-12), and 1e-12 is 0 in float16: a black image (zero
    activations, zero input gradient) got a NaN Grad-CAM and input-gradient map from a float16 model, where float32
    and bfloat16 give zeros. Half maps are now normalised in float32 (float32 unchanged, dtype kept)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2, 3)
            with torch.no_grad():
                self.conv.weight.fill_(1.0)
                self.conv.bias.zero_()

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    x, y = torch.rand(3, 1, 6, 6), torch.tensor([0, 1, 2])
    x[0] = 0
    ref_cam, ref_sal = report.grad_cam(Net(), x), report.input_gradient(Net(), x, y)
    assert not bool(ref_cam[0].any()) and not bool(ref_sal[0].any())
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        model = Net().to(dtype)
        cam, sal = report.grad_cam(model, x.to(dtype)), report.input_gradient(model, x.to(dtype), y)
        assert cam.dtype == sal.dtype == dtype
        assert bool(torch.isfinite(cam).all()) and bool(torch.isfinite(sal).all())
        assert not bool(cam[0].any()) and not bool(sal[0].any())
        torch.testing.assert_close(cam.float(), ref_cam, atol=0.02, rtol=0)


def test_grad_cam_reads_the_layer_output_before_an_inplace_relu():
    # an in-place ReLU after the hooked conv rewrote the stored activation: the map was the ReLU output's, unlike
    # that of the same model with ReLU(inplace=False)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    inplace = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 36, 3))
    inplace.load_state_dict(plain.state_dict())
    x = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(inplace(x), plain(x))
    torch.testing.assert_close(report.grad_cam(inplace, x), report.grad_cam(plain, x))


@pytest.mark.parametrize("single", [False, True])
def test_grad_cam_refuses_targets_that_are_not_one_class_per_image(single):
    # one target for 4 images mapped only the first (the others' maps were 0); on a single-logit model a target of
    # 2 or -1 was taken as class 0; on a two-logit model 2 was a bare gather error
    model, x = _Net(single=single), torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"grad_cam: expected one class label per sample \(target of shape"):
        report.grad_cam(model, x, target=torch.tensor([1]))
    for bad in (2, -1):
        with pytest.raises(ValueError, match=r"grad_cam: expected target classes in \[0, 2\)"):
            report.grad_cam(model, x, target=torch.tensor([0, 1, bad, 0]))
    with pytest.raises(TypeError, match="grad_cam: expected integer class labels"):
        report.grad_cam(model, x, target=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    # MedMNIST's [N, 1] labels and a list are one class per image
    want = report.grad_cam(model, x, target=torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(report.grad_cam(model, x, target=torch.tensor([[0], [1], [0], [1]])), want)
    torch.testing.assert_close(report.grad_cam(model, x, target=[0, 1, 0, 1]), want)


def test_grad_cam_refuses_a_layer_that_gives_no_feature_maps():
    # a layer of another model was a bare KeyError 'a'; a Linear layer's [N, K] output failed in the channel mean
    model, x = _Net(single=False), torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="grad_cam: expected layer .* but it did not run in the model's forward"):
        report.grad_cam(model, x, layer=nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match=r"grad_cam: expected layer .* but it gave \(2, 1\)"):
        report.grad_cam(model, x, layer=model.fc)


def test_grad_cam_takes_a_layer_by_its_name():
    """grad_cam(model, x, layer="features.0"), the layer as model.named_modules() names it, stopped with
    "AttributeError: 'str' object has no attribute 'register_forward_hook'" (found by the api2 helper). A name is
    now the model's layer of that name; one the model lacks is refused naming its Conv2d layers, as is a layer of
    another type than a module or a name."""
    model, x = _Net(single=False), torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(report.grad_cam(model, x, layer="conv"), report.grad_cam(model, x, layer=model.conv))
    with pytest.raises(ValueError, match=r"^grad_cam: the model has no layer 'features.0'; its Conv2d layers are "
                                         r"'conv'$"):
        report.grad_cam(model, x, layer="features.0")
    with pytest.raises(ValueError, match=r"^grad_cam: expected layer to be a layer of the model or its name, got 3$"):
        report.grad_cam(model, x, layer=3)


def test_input_gradient_and_saliency_figure_refuse_labels_outside_the_model_classes(tmp_path):
    # on a single-logit model y=5 (or -1) went into the binary cross-entropy as a target: class 1's (class 0's)
    # map came back without a word
    model, x = _Net(single=True), torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for bad in (5, -1):
        with pytest.raises(ValueError, match=r"input_gradient: expected y classes in \[0, 2\)"):
            report.input_gradient(model, x, torch.tensor([0, 1, bad]))
        with pytest.raises(ValueError, match=r"plot_saliency: expected y classes in \[0, 2\)"):
            report.plot_saliency(model, x, torch.tensor([0, 1, bad]), tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()
    with pytest.raises(ValueError, match=r"input_gradient: expected one class label per sample \(y of shape"):
        report.input_gradient(model, x, torch.tensor([1]))


def test_figures_leave_pyplot_as_they_found_it(tmp_path):
    """A notebook calls the figures many times: they forced pyplot's backend to Agg for the rest of the session
    (the notebook's own figures then no longer showed), and each call whose save failed left its figure open in
    pyplot (matplotlib warns from 20)."""
    script = f"""
import matplotlib
matplotlib.use("svg")  # the session's own backend
import matplotlib.pyplot as plt
import torch
from torch import nn
from robust_ops import report
mine = plt.figure()
rows = [{{"method": "m", "attack": "none", "norm": None, "eps": 0.0, "accuracy": 0.9}},
        {{"method": "m", "attack": "fgsm", "norm": "linf", "eps": 0.1, "accuracy": 0.5}}]
model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 16, 2))
x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
for folder in ({str(tmp_path)!r}, {str(tmp_path / "missing")!r}):
    for _ in range(3):
        try:
            report.plot_metric_vs_radius(rows, folder + "/a.png")
            report.plot_saliency(model, x, y, folder + "/s.png")
        except FileNotFoundError:
            pass
print(plt.get_backend(), plt.get_fignums() == [mine.number])
"""
    assert run_python(script).split() == ["svg", "True"]
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG") and (tmp_path / "s.png").exists()


def test_figures_take_the_dataset_of_a_results_json_as_their_info(tmp_path, monkeypatch):
    """Redrawing a figure from a saved results.json, plot_metric_vs_radius(doc["rows"], path, info=doc["dataset"])
    stopped with "AttributeError: 'dict' object has no attribute 'num_classes'" (plot_saliency alike; markdown_report
    reads that dict), found by the api2 helper. The dict is now read as the DatasetInfo it was written from: the
    same titles and labels; a dict without a DatasetInfo's fields is refused naming them."""
    info = DatasetInfo("d", 2, 1, 8, ("benign", "malignant"), positive_class=1, synthetic=True)
    rows = [{"method": "M", "attack": a, "norm": "linf", "eps": e, "n": 4, "sensitivity": 0.5}
            for a, e in (("none", 0.0), ("fgsm", 0.1))]
    figures = _record_figures(monkeypatch)
    for given in (info, info.to_dict()):
        assert report.plot_metric_vs_radius(rows, tmp_path / "a.png", "sensitivity", info=given)
        assert report.plot_saliency(_Net(single=False), torch.rand(1, 3, 4, 4), [1], tmp_path / "s.png", info=given)
    titles = [(f._suptitle.get_text(), [t.get_text() for ax in f.axes for t in (ax.title, ax.yaxis.label)])
              for f in figures]
    assert titles[:2] == titles[2:] and "Sensitivity (malignant)" in titles[0][0] and "SYNTHETIC" in titles[0][0]
    assert "true malignant" in " ".join(titles[1][1])
    with pytest.raises(ValueError, match=r"^plot_metric_vs_radius: info: expected a DatasetInfo or results.json's "
                                         r"dataset dict, got a dict without num_classes, class_names$"):
        report.plot_metric_vs_radius(rows, tmp_path / "b.png", "sensitivity", info={"name": "d"})


def test_paper_comparison_table_reads_its_metric_columns_as_markdown_table_reads_metrics():
    """paper_comparison_table(rows, paper, "accuracy") made a column pair per letter ("a (paper)", "c (paper)", ...)
    and a misspelt column ("acc") a pair of dashes, without a word (found by the api2 helper), where markdown_table
    splits a string of names and refuses such a name. It now reads them by markdown_table's rule."""
    rows = [{"method": "A", "attack": "fgsm", "norm": "linf", "eps": 1 / 255, "n": 4, "accuracy": 0.4}]
    paper = [{"method": "A", "attack": "fgsm", "eps": 1 / 255, "source": "T1", "accuracy": 0.5, "robust": 0.3}]
    want = report.paper_comparison_table(rows, paper, ["accuracy"])
    assert want.splitlines()[2] == "| A | fgsm | 1/255 | T1 | 0.500 | 0.400 |"
    assert report.paper_comparison_table(rows, paper, "accuracy") == want
    assert report.paper_comparison_table(rows, paper, "accuracy, robust").splitlines()[2].endswith("| 0.300 | – |")
    with pytest.raises(ValueError, match=r"^paper_comparison_table: no row holds the metric 'acc'; expected one of "
                                         r"accuracy, f1, sensitivity, specificity, precision, auc, map$"):
        report.paper_comparison_table(rows, paper, ["acc"])


def test_per_class_recall_table_refuses_class_names_of_another_count():
    """per_class_recall_table(rows of 2 classes, ["x"]) gave a header of one class over lines of two values, and 3
    names a header column with no values under it, without a word (found by the api2 helper). A count other than the
    rows' confusion holds is now refused naming the row and both counts."""
    rows = [{"method": "A", "attack": "none", "norm": None, "eps": 0.0, "n": 4, "confusion": [[1, 1], [0, 2]]}]
    for names, got in ((["x"], "1 class name"), (["x", "y", "z"], "3 class names")):
        with pytest.raises(ValueError, match=rf"^per_class_recall_table: got {got}, but the row "
                                             r"\(A, no attack\) counts 2 classes; give one name per class, label 0 "
                                             r"first$"):
            report.per_class_recall_table(rows, names)
    line = report.per_class_recall_table(rows, ["x", "y"]).splitlines()[2]
    assert line == "| A | no attack | – | 0 | 4 | 0.500 | 1.000 |"


def test_per_class_recall_table_reads_one_string_as_comma_separated_class_names():
    """per_class_recall_table(rows of 2 classes, "benign,malignant") was refused as "got 16 class names" (its
    letters), and "xy" headed the columns x and y (found by the revA helper), as markdown_table read one metric's
    name before 6e2285d. One string is now comma-separated names, as --classes takes them."""
    rows = [{"method": "A", "attack": "none", "norm": None, "eps": 0.0, "n": 4, "confusion": [[1, 1], [0, 2]]}]
    assert report.per_class_recall_table(rows, "benign, malignant") == report.per_class_recall_table(
        rows, ["benign", "malignant"])
    with pytest.raises(ValueError, match=r"^per_class_recall_table: got 1 class name, but the row \(A, no attack\) "
                                         r"counts 2 classes"):
        report.per_class_recall_table(rows, "xy")


def test_per_class_recall_table_takes_the_class_names_of_a_dataset_info_or_a_label_to_name_dict():
    """per_class_recall_table(rows, data.info) stopped with "TypeError: 'DatasetInfo' object is not iterable", None
    with "'NoneType' object is not iterable", results.json's dataset dict was refused as "got 9 class names" (its
    keys), and {0: "malignant", 1: "benign"} headed the columns "0" and "1" without a word (found by the api3
    helper). The DatasetInfo and the dataset dict give their class_names, a {label: name} dict its names in label
    order; another dict or no iterable is a ValueError saying what to give."""
    rows = [{"method": "A", "attack": "none", "norm": None, "eps": 0.0, "n": 4, "confusion": [[1, 1], [0, 2]]}]
    info = DatasetInfo("d", 2, 1, 8, ("malignant", "benign"), positive_class=0)
    want = report.per_class_recall_table(rows, ["malignant", "benign"])
    assert want.splitlines()[0].endswith("| malignant | benign |")
    for names in (info, info.to_dict(), {1: "benign", 0: "malignant"}, {"0": "malignant", "1": "benign"},
                  np.array(["malignant", "benign"])):
        assert report.per_class_recall_table(rows, names) == want
    for names, got in ((None, "got None"), ({"a": 1, "b": 2}, "got a dict of keys 'a', 'b'; give a list, or "
                                                              "{label: name} for labels 0 to K-1")):
        with pytest.raises(ValueError, match=r"^per_class_recall_table: expected class_names to be one name per "
                                             r"class, label 0 first.*" + re.escape(got)):
            report.per_class_recall_table(rows, names)


def test_per_class_recall_table_refuses_a_set_of_class_names_and_reads_a_generator():
    """A set of class names (set(df.dx)) headed the columns in its hash's order, {"malignant", "benign"} a
    column "benign" over class 0's recall in some processes, and a generator or map of names stopped with "object of
    type 'generator' has no len()" (found by the revA helper). A set is refused, naming a list; an iterator is read
    as the list it yields."""
    rows = [{"method": "A", "attack": "none", "norm": None, "eps": 0.0, "n": 4, "confusion": [[1, 1], [0, 2]]}]
    want = report.per_class_recall_table(rows, ["malignant", "benign"])
    for names in ({"malignant", "benign"}, frozenset(["malignant", "benign"])):
        with pytest.raises(ValueError, match=r"^per_class_recall_table: expected class_names to be one name per "
                                             r"class, label 0 first, got a set, which keeps no order \(.*\); give a "
                                             r"list in label order$"):
            report.per_class_recall_table(rows, names)
    assert report.per_class_recall_table(rows, (n for n in ("malignant", "benign"))) == want
    assert report.per_class_recall_table(rows, map(str.lower, ["MALIGNANT", "BENIGN"])) == want


def test_markdown_report_embeds_one_figure_given_as_a_string_once():
    """markdown_report(doc, figures="a.png") embedded the name letter by letter, ![a](a), ![.](.), ![p](p), ...
    (found by the api2 helper), as markdown_table read one metric's name before 6e2285d. One name is one figure."""
    doc = _doc([dict(_CLEAN_ROW)])
    text = report.markdown_report(doc, figures="accuracy_vs_eps.png")
    assert text == report.markdown_report(doc, figures=["accuracy_vs_eps.png"]) and text.count("![") == 1


def test_markdown_report_embeds_one_figure_given_as_a_path_once():
    """markdown_report(doc, figures=Path("accuracy_vs_eps.png")) stopped with "TypeError: 'PosixPath' object is not
    iterable" (found by the revA helper), where the name as a string was taken as one figure (51c46fa) and a list
    of paths embedded each. One path is one figure, as one name is."""
    doc = _doc([dict(_CLEAN_ROW)])
    text = report.markdown_report(doc, figures=Path("accuracy_vs_eps.png"))
    assert text == report.markdown_report(doc, figures="accuracy_vs_eps.png") and text.count("![") == 1


def test_write_results_refuses_paper_rows_report_md_cannot_compare(tmp_path):
    """write_results recorded any ``paper``, and since report.md shows the comparison a row without eps stopped it
    in ``KeyError: 'eps'``, one dict for the list in "string indices must be integers" (found by the revB helper).
    Each is now refused naming paper, before anything is written; paper_comparison_table refuses them alike."""
    from robust_ops.evaluate import EvalError, write_results

    rows = [dict(_CLEAN_ROW), dict(_CLEAN_ROW, attack="pgd", norm="linf", eps=8 / 255, accuracy=0.4, f1=0.3)]
    info = DatasetInfo("d", 2, 1, 8, ("a", "b"), positive_class=1)
    row = {"source": "X", "method": "M", "attack": "PGD", "eps": 8 / 255, "f1": 0.35}
    cases = [([{k: v for k, v in row.items() if k != "eps"}], r"paper\[0\] has no 'eps'; give each paper row its "),
             ([row, dict(row, eps="8/255")], r"expected paper\[1\]'s eps to be a finite number, such as 8/255, got "),
             (row, r"expected paper to be a list of dicts \(one per published number's row\), got \{"),
             ([("M", "PGD", 0.03)], r"expected paper\[0\] to be a dict of method, attack, eps, source and metrics")]
    for paper, said in cases:
        with pytest.raises(EvalError, match=f"^write_results: {said}") as err:
            write_results(tmp_path / "out", rows, info, figures=False, paper=paper)
        assert err.value.arg == "paper"
        with pytest.raises(ValueError, match=f"^paper_comparison_table: {said}"):
            report.paper_comparison_table(rows, paper, ["f1"])
    assert not (tmp_path / "out").exists()
    assert "| M | PGD | 8/255 | X | 0.350 | 0.300 |" in write_results(
        tmp_path / "out", rows, info, figures=False, paper=[row])["report"].read_text()


def test_paper_radius_of_0_or_a_half_decimal_away_is_not_ours():
    """A paper row's radius matched ours at its decimals (d076930), so its 0, one decimal, took our 8/255
    ('| AT | FGSM | 0 (ours 8/255) | T1 | 0.500 | 0.600 |') and its 0.1 our 0.05 (found by the revB helper). A radius
    of 0 is only our 0, and ours must be nearer than half the paper's last decimal; 0.031 and 0.03 still read 8/255."""
    rows = [{"method": "AT", "attack": "fgsm", "norm": "linf", "eps": eps, "n": 4, "accuracy": acc}
            for eps, acc in ((8 / 255, 0.6), (0.05, 0.4))]
    paper = [{"method": "AT", "attack": "FGSM", "eps": eps, "source": "T1", "accuracy": 0.5}
             for eps in (0, 0.0, 0.1, 0.031, 0.03, 0.2)]
    lines = report.paper_comparison_table(rows, paper, ["accuracy"]).splitlines()
    assert lines[2:] == ["| AT | FGSM | 0 | T1 | 0.500 | – |", "| AT | FGSM | 0 | T1 | 0.500 | – |",
                         "| AT | FGSM | 0.1 | T1 | 0.500 | – |",
                         "| AT | FGSM | 0.031 (ours 8/255) | T1 | 0.500 | 0.600 |",
                         "| AT | FGSM | 0.03 (ours 8/255) | T1 | 0.500 | 0.600 |",
                         "| AT | FGSM | 0.2 | T1 | 0.500 | – |"]
    # a row of ours at 0 is the paper's 0, and our 0.05 a paper's 0.05, not its 0.049 (three decimals)
    rows.append({"method": "AT", "attack": "fgsm", "norm": "linf", "eps": 0.0, "n": 4, "accuracy": 0.9})
    paper = [dict(paper[0], eps=eps) for eps in (0, 0.05, 0.049, 0.0314)]
    table = report.paper_comparison_table(rows, paper, "accuracy")
    assert [line.rsplit("|", 2)[1].strip() for line in table.splitlines()[2:]] == ["0.900", "0.400", "–", "0.600"]


def test_write_results_refuses_notes_that_are_no_list_of_text(tmp_path):
    """Since report.md shows results.json's notes (a559cdb), notes=3 stopped write_results in "'int' object is not
    iterable", and a dict's keys were the notes (found by the revB helper). Each is now refused naming notes, before
    anything is written; one text is one note."""
    from robust_ops.evaluate import EvalError, write_results

    info = DatasetInfo("d", 2, 1, 8, ("a", "b"), positive_class=1)
    for notes in (3, True, {"a": "b"}, ["one", None]):
        with pytest.raises(EvalError, match=r"^write_results: expected notes to be a list of text \(a note each\) or "
                                            rf"None, got {re.escape(repr(notes))}$") as err:
            write_results(tmp_path / "out", [dict(_CLEAN_ROW)], info, figures=False, notes=notes)
        assert err.value.arg == "notes"
    assert not (tmp_path / "out").exists()
    for notes, bullets in (("one note", "- one note\n"), (("a", "b"), "- a\n- b\n")):
        text = write_results(tmp_path / "out", [dict(_CLEAN_ROW)], info, figures=False, notes=notes)["report"]
        assert f"## Notes\n\n{bullets}\n" in text.read_text()


def test_a_row_of_ours_at_a_nan_radius_matches_no_paper_row():
    """The decimal radius match (c8f9b33) stopped paper_comparison_table in "decimal.InvalidOperation:
    [<class 'decimal.InvalidOperation'>]" at a row of ours whose eps is NaN, where the row read "–" before (found by
    the revC helper). A radius of ours that is no finite number matches no paper radius."""
    rows = [{"method": "AT", "attack": "fgsm", "eps": eps, "n": 4, "accuracy": acc}
            for eps, acc in ((float("nan"), 0.6), (float("inf"), 0.7), (0.03, 0.4))]
    paper = [{"method": "AT", "attack": "FGSM", "eps": eps, "source": "T1", "accuracy": 0.5} for eps in (0.03, 0.5)]
    lines = report.paper_comparison_table(rows, paper, ["accuracy"]).splitlines()
    assert lines[2:] == ["| AT | FGSM | 0.03 | T1 | 0.500 | 0.400 |", "| AT | FGSM | 0.5 | T1 | 0.500 | – |"]


def test_a_figure_at_a_pathlike_naming_bytes_is_written_in_its_suffix_format(tmp_path):
    """9dcac2e decoded a bytes path but not an os.PathLike whose __fspath__ gives bytes, which matplotlib, told the
    format, refused with "fname must be a PathLike or file handle", though it is one (found by the revC helper)."""
    rows = [{"method": "AT", "attack": "pgd", "norm": "linf", "eps": eps, "n": 4, "accuracy": acc}
            for eps, acc in ((0.0, 0.9), (0.03, 0.5))]

    class BytesPath(os.PathLike):
        def __fspath__(self):
            return os.fsencode(tmp_path / "fig.pdf")

    assert report.plot_metric_vs_radius(rows, BytesPath()) is True
    assert (tmp_path / "fig.pdf").read_bytes().startswith(b"%PDF")
