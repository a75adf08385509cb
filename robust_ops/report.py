"""Reports: Markdown tables (our rows, and the papers' published numbers beside them), metric-vs-radius curves per
method, and saliency maps (Grad-CAM as in DPAAT Fig. 4; input gradients as in ARFL Fig. 5). Figures are
drawn outside pyplot (no display needed; pyplot's backend and open figures are left alone)."""

import decimal
import math
import numbers
import os
import re
import textwrap
from collections import Counter
from collections.abc import Iterable
from types import SimpleNamespace

import torch

from ._options import counted, python_number
from .attacks.context import classification_loss, float32_or_wider, is_single_logit, model_device, use_model_mode
from .metrics import METRIC_LABELS, metric_names

__all__ = [
    "markdown_report", "markdown_table", "pivot_table", "paper_comparison_table", "plot_metric_vs_radius",
    "plot_saliency", "grad_cam", "input_gradient"
]


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "model"


def format_eps(eps, among=()):
    """``5/255`` when eps is a whole number of 255ths, else a short decimal; ``0`` for clean rows. ``among``: the
    other radii of the same table or axis; where one of them would get the same label (0.0039216 and 0.0039219 both
    read "0.003922", one ε on two lines), each gets the significant digits that tell them apart."""
    label = _eps_label(eps)
    clash = [e for e in among if e is not None and e != eps and _eps_label(e) == label]
    digits = 5
    while clash and digits <= 17:  # 17 significant digits tell any two floats apart
        label = f"{eps:.{digits}g}"
        clash = [e for e in clash if f"{e:.{digits}g}" == label]
        digits += 1
    return label


def _eps_label(eps):
    """format_eps's label of ``eps`` alone."""
    if eps is None or eps == 0:
        return "0"
    short = f"{eps:g}"
    if len(short) <= 5:  # 0.2, 0.05, 1.5 read better as decimals
        return short
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{int(round(k))}/255"
    return f"{eps:.4g}"


def fmt(value, digits=3):
    """``value`` to ``digits`` decimals, "–" when undefined. A float is rounded as the decimal it stands for (its
    shortest repr), ties to even: rounding its binary value turned a published 55.15% (0.5515, a float just below)
    into 0.551 and 62.25% (just above) into 0.623. A numpy scalar is the Python number it holds (numpy's repr of a
    np.float64 is "np.float64(0.5515)", which failed here; a np.float32 came out unrounded)."""
    value = python_number(value)
    if _undefined(value):
        return "–"
    if isinstance(value, float):
        exact = decimal.Decimal(repr(value))
        with decimal.localcontext() as context:  # the default 28 digits cannot hold 1e30 to three decimals
            context.prec = max(context.prec, exact.adjusted() + digits + 2)
            return f"{exact.quantize(decimal.Decimal(1).scaleb(-digits), rounding=decimal.ROUND_HALF_EVEN):f}"
    return str(value)


def runs_mark(row, metric):
    """" (k of n runs)" when ``row`` is a mean over n runs of which only k defined ``metric`` (reproduce.aggregate's
    ``<metric>_runs`` and ``repeats``), else ""."""
    defined, repeats = row.get(f"{metric}_runs"), row.get("repeats")
    if defined is not None and repeats is not None and 0 < defined < repeats:
        return f" ({defined} of {repeats} runs)"
    return ""


def figure_metrics(info):
    """Curves worth drawing: accuracy and F1 always; sensitivity and specificity for binary tasks (a clinical reader
    reads the two together), mAP for multi-class."""
    return ("accuracy", "f1", "sensitivity", "specificity") if info.num_classes == 2 else ("accuracy", "f1", "map")


def pivot_metrics(binary, terminal=False):
    """The metrics report.md pivots, in its order: F1, sensitivity, specificity (the recall of the other class, read
    beside sensitivity), accuracy and AUC for a binary task; accuracy, F1 and mAP for a multi-class one. ``terminal``:
    the tables eval and demo print, without AUC."""
    if not binary:
        return ("accuracy", "f1", "map")
    return ("f1", "sensitivity", "specificity", "accuracy") + (() if terminal else ("auc",))


def _table_line(cells):
    """One Markdown table line; a ``|`` in a cell (a method label such as ``AT|eps=2``) is escaped, else it split
    the cell and shifted every value after it into the next column (a line break would end the row)."""
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _methods(rows):
    seen = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _attack_panels(rows):
    """(attack, norm) pairs in order of appearance: radii of different norms are not one axis, so an attack name run
    under two norms (e.g. the worst-case row of an L-inf and of an L2 plan) gets one panel per norm."""
    seen = []
    for r in rows:
        key = (r["attack"], r.get("norm"))
        if r["attack"] != "none" and key not in seen:
            seen.append(key)
    return seen


def _attack_label(attack):
    """A table's name for a row's attack: "no attack" for the clean rows (results.json's "none")."""
    return "no attack" if attack == "none" else attack


def _row_cells(r, attack, radii=()):
    """The cells that say which evaluation row a table line is: method, attack (as given), norm, ε (told apart from
    the table's other ``radii``) and n."""
    return [r["method"], attack, r.get("norm") or "–", format_eps(r["eps"], radii), str(r.get("n", ""))]


def _radii(items):
    """The distinct radii of a table's rows (dicts with "eps") or keys (tuples ending in eps), for format_eps."""
    return {(i["eps"] if isinstance(i, dict) else i[-1]) for i in items}


def _check_metric(name, metric, rows):
    """A ValueError naming ``name`` for a ``metric`` that is no metric's name and no row holds (a misspelt "acc" or
    "Accuracy"): the table's cells all read "–" and the figure was not drawn, as for a metric undefined in every row,
    without a word. A metric's name that hand-made rows lack stays "–", as before."""
    if metric not in METRIC_LABELS and not any(metric in r for r in rows):
        _refuse_unknown(name, "metric", metric, METRIC_LABELS)


def _check_methods(name, methods, rows):
    """A ValueError naming ``name`` for a method of ``methods`` that no row has (a misspelt "MIRST_DM"): its column
    read "–" in every cell, as for a method not run under the line's attack, without a word."""
    known = _methods(rows)
    for method in methods:
        if method not in known:
            _refuse_unknown(name, "method", method, [repr(m) for m in known])


def _refuse_unknown(name, what, value, expected):
    """The one-line ValueError of a ``what`` (metric, method) ``value`` that no row holds, listing ``expected``."""
    listed = ", ".join(expected) or "none (no rows)"
    raise ValueError(f"{name}: no row holds the {what} {value!r}; expected one of {listed}")


def _metric_list(name, metrics, rows):
    """``metrics`` as a list of names, one string of comma-separated names split ("accuracy" was read letter by
    letter; "" is none), each checked by _check_metric against ``rows``."""
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    for m in metrics or ():
        _check_metric(name, m, rows)
    return metrics


def markdown_table(rows, metrics=None):
    """A Markdown table of ``rows`` (evaluate's result dicts), one line per row: method, attack, norm, eps, n and the
    ``metrics`` (names, or one string of comma-separated names; None, the default: each of the seven metric names
    the first row has). "(no rows)" for none. A name that is no metric's and that no row holds (``"acc"``) is a
    ValueError."""
    if not rows:
        return "(no rows)"
    metrics = _metric_list("markdown_table", metrics, rows)
    metrics = metrics or [m for m in ("accuracy", "f1", "sensitivity", "specificity", "precision", "auc", "map")
                          if m in rows[0]]
    head = ["method", "attack", "norm", "ε", "n"] + [METRIC_LABELS.get(m, m) for m in metrics]
    lines = [_table_line(head), "|" + "---|" * len(head)]
    radii = _radii(rows)
    for r in rows:
        cells = _row_cells(r, r["attack"], radii)
        cells += [fmt(r.get(m)) + runs_mark(r, m) for m in metrics]
        lines.append(_table_line(cells))
    return "\n".join(lines)


def _pivot_lines(rows):
    """The pivot tables' lines: ((attack, norm, eps), the line's attack label), each (attack, norm) in order of
    appearance with its radii ascending (two evaluate calls' rows concatenated put the second's other radius after
    the first's worst-case lines, apart from its attack's). The norm is part of the key (an L-inf and an L2 row at
    one eps are two lines) and of the label of an attack run under two."""
    groups = {}  # (attack, norm) -> its radii
    for r in rows:
        radii = groups.setdefault((r["attack"], r.get("norm")), [])
        if r["eps"] not in radii:
            radii.append(r["eps"])
    keys = [(attack, norm, eps) for (attack, norm), radii in groups.items() for eps in sorted(radii)]
    norms_of = {}
    for attack, norm, _ in keys:
        norms_of.setdefault(attack, set()).add(norm)
    return [(k, _attack_label(k[0]) + (f" ({k[1] or '–'})" if len(norms_of[k[0]]) > 1 else "")) for k in keys]


def pivot_table(rows, metric, methods=None):
    """The seed papers' layout as a Markdown table of ``rows`` (evaluate's result dicts): one line per (attack,
    norm, eps), one column per method, for one ``metric`` (a name such as "accuracy"). ``methods``: the columns in
    order, or one method's name (None, the default: each method of ``rows`` in order of appearance); a missing
    row's cell reads "–". A ``metric`` that is no metric's name and that no row holds (``"acc"``), or a method that
    no row has, is a ValueError."""
    _check_metric("pivot_table", metric, rows)
    if isinstance(methods, str):  # "STD" was read letter by letter: a column per letter, each cell "–"
        methods = [methods] if methods else None  # "": the default, as it was
    methods = methods or _methods(rows)
    _check_methods("pivot_table", methods, rows)
    index = {(r["method"], r["attack"], r.get("norm"), r["eps"]): r for r in rows}
    head = [f"{METRIC_LABELS.get(metric, metric)}: attack", "ε"] + list(methods)
    lines = [_table_line(head), "|" + "---|" * len(head)]
    keys = _pivot_lines(rows)
    radii = _radii(k for k, _ in keys)
    for (attack, norm, eps), label in keys:
        cells = [label, format_eps(eps, radii)]
        found = [index.get((m, attack, norm, eps), {}) for m in methods]
        cells += [fmt(r.get(metric)) + runs_mark(r, metric) for r in found]
        lines.append(_table_line(cells))
    return "\n".join(lines)


def missing_rows_note(rows):
    """A line naming the pivot tables' cells that have no row (a method not run under an attack or at a radius the
    others were: "–" there in every table, which undefined_note's reasons do not explain), or "" when none."""
    have = {(r["method"], r["attack"], r.get("norm"), r["eps"]) for r in rows}
    lines = _pivot_lines(rows)
    radii = _radii(k for k, _ in lines)  # as the tables write them
    missing = []
    for m in _methods(rows):
        by_label = {}  # label -> the radii without a row, in the tables' order
        for key, label in lines:
            if (m, *key) not in have:
                by_label.setdefault(label, []).append(format_eps(key[2], radii))
        if by_label:
            missing.append(f"{m}: " + ", ".join(f"{label} at {', '.join(r)}" for label, r in by_label.items()))
    if not missing:
        return ""
    return (f"> **Not evaluated** (–, no such row in results.json): {'; '.join(missing)}; evaluated with other "
            "attacks or radii (with one attack, no worst case).")


def per_class_recall_table(rows, class_names):
    """One line per row that holds ``confusion`` counts (evaluation rows; reproduce's mean rows sum their runs'), one
    column per class: the share of the class's samples predicted as it (its recall), "–" for a class without samples
    in the evaluated set. A multi-class report's macro averages do not show which classes an attack breaks.
    ``class_names``: one per class, label 0 first (or one string of comma-separated names, as --classes takes
    them), or the DatasetInfo or results.json's ``dataset`` dict whose ``class_names`` they are; another count than
    a row's confusion holds is a ValueError, as is a set of names (no order)."""
    if isinstance(class_names, str):  # "benign,malignant" was counted letter by letter: "got 16 class names"
        class_names = [c.strip() for c in class_names.split(",") if c.strip()]
    elif hasattr(class_names, "class_names"):  # data.info: "'DatasetInfo' object is not iterable"
        class_names = class_names.class_names
    elif isinstance(class_names, dict):
        # its keys were the names: results.json's dataset dict gave "got 9 class names", {0: "malignant", 1: "benign"}
        # columns "0" and "1"
        if "class_names" in class_names:
            class_names = class_names["class_names"]
        elif sorted(map(str, class_names)) == sorted(map(str, range(len(class_names)))):  # labels, "0" as in JSON
            class_names = [class_names.get(k, class_names.get(str(k))) for k in range(len(class_names))]
        else:
            raise ValueError(f"per_class_recall_table: expected class_names to be one name per class, label 0 first, "
                             f"got a dict of keys {', '.join(map(repr, list(class_names)[:4]))}; give a list, or "
                             "{label: name} for labels 0 to K-1")
    elif isinstance(class_names, (set, frozenset)):  # set(df.dx): its order is the hash's, the columns misnamed
        raise ValueError(f"per_class_recall_table: expected class_names to be one name per class, label 0 first, "
                         f"got a set, which keeps no order ({class_names!r:.60}); give a list in label order")
    elif not isinstance(class_names, Iterable):  # None: "'NoneType' object is not iterable"
        raise ValueError(f"per_class_recall_table: expected class_names to be one name per class, label 0 first "
                         f"(a list, or the DatasetInfo: data.info), got {class_names!r:.60}")
    class_names = list(class_names)  # a generator or map: "object of type 'generator' has no len()"
    head = ["method", "attack", "norm", "ε", "n"] + [str(c) for c in class_names]
    lines = [_table_line(head), "|" + "---|" * len(head)]
    with_counts = [r for r in rows if r.get("confusion") is not None]
    for r in with_counts:  # the header's columns and the lines' cells did not line up
        if len(r["confusion"]) != len(class_names):
            raise ValueError(f"per_class_recall_table: got {counted(len(class_names), 'class name')}, but the row "
                             f"({r['method']}, {_attack_label(r['attack'])}) counts {len(r['confusion'])} classes; "
                             "give one name per class, label 0 first")
    radii = _radii(with_counts)
    for r in with_counts:
        recall = [fmt(line[i] / sum(line) if sum(line) else None) for i, line in enumerate(r["confusion"])]
        lines.append(_table_line(_row_cells(r, _attack_label(r["attack"]), radii) + recall))
    return "\n".join(lines)


def _paper_match(candidates, paper_row):
    """Our row for a paper row: the one with the paper row's norm when it names one, at the radius nearest the paper
    row's (two of ours that agree to 6 decimals, 0.0039216 and 0.0039219, both matched it, and the last one's value
    stood beside each); a ValueError when rows of several norms match and the paper row does not say which (the
    last one would silently win)."""
    if "norm" in paper_row:  # "Linf" is "linf", as the attacks read a norm
        candidates = [r for r in candidates if _folded(r.get("norm")) == _folded(paper_row["norm"])]
    if candidates:
        nearest = min(abs(r["eps"] - paper_row["eps"]) for r in candidates)
        candidates = [r for r in candidates if abs(r["eps"] - paper_row["eps"]) == nearest]
    if len({r.get("norm") for r in candidates}) > 1:
        raise ValueError(f"paper_comparison_table: rows of norms {sorted({str(r.get('norm')) for r in candidates})} "
                         f"match the paper row {paper_row['method']} / {paper_row['attack']} at eps "
                         f"{paper_row['eps']:g}; give the paper row a 'norm'")
    return candidates[-1] if candidates else {}


def _same_radius(ours, paper):
    """Whether our radius ``ours`` is the paper row's ``paper`` as the paper writes it: equal at the decimals the
    paper's number gives, at most 6 (a paper's 0.031 is our 8/255 = 0.0314, its 0.03 too; a radius given as 8/255
    matches to 6 decimals, as every radius did until 2026-12-07, when 0.031 read "–" beside our 8/255). A radius of 0
    (no attack's, a sweep's first) is only our 0, and ours must be nearer than half the paper's last decimal: the
    paper's 0 stood beside our 8/255 and its 0.1 beside our 0.05 (one decimal) later on 2026-12-07. A radius of ours
    that is no finite number (NaN) is no paper's: it stopped paper_comparison_table in decimal.InvalidOperation."""
    if not paper or not ours or not math.isfinite(ours):  # a NaN radius of ours: decimal's InvalidOperation
        return ours == paper
    places = min(max(-decimal.Decimal(repr(float(paper))).as_tuple().exponent, 0), 6)
    gap = abs(decimal.Decimal(repr(float(ours))) - decimal.Decimal(repr(float(paper))))
    return gap < decimal.Decimal(5).scaleb(-places - 1)


def paper_rows_problem(func, paper):
    """The one-line refusal of ``func``'s ``paper`` rows (paper_comparison_table's, write_results'), else None: a
    list of dicts, each with a ``method``, an ``attack`` and a radius ``eps`` (a number). write_results recorded any
    ``paper`` until 2026-12-07, when report.md's comparison met a row without ``eps`` as ``KeyError: 'eps'`` and one
    dict for the list as "string indices must be integers"."""
    if isinstance(paper, dict) or not isinstance(paper, (list, tuple)):
        return f"{func}: expected paper to be a list of dicts (one per published number's row), got {paper!r:.60}"
    for i, p in enumerate(paper):
        if not isinstance(p, dict):
            return f"{func}: expected paper[{i}] to be a dict of method, attack, eps, source and metrics, got {p!r:.60}"
        missing = [k for k in ("method", "attack", "eps") if k not in p]
        if missing:
            return (f"{func}: paper[{i}] has no {' or '.join(map(repr, missing))}; give each paper row its method, "
                    "attack and eps (and source and its metrics)")
        if isinstance(p["eps"], bool) or not isinstance(p["eps"], numbers.Real) or not math.isfinite(p["eps"]):
            return f"{func}: expected paper[{i}]'s eps to be a finite number, such as 8/255, got {p['eps']!r:.60}"
    return None


def _folded(name):
    """``name`` as paper_comparison_table compares attacks and norms: case folded (None stays None)."""
    return name.casefold() if isinstance(name, str) else name


def paper_comparison_table(ours, paper, metric_columns):
    """Published numbers beside ours. ``paper`` rows: {method, attack, eps, source, <metric>: value[, norm]}; ours are
    looked up by (method, attack, eps[, norm]), the attack and norm in any case ("FGSM", "Linf"; "no attack", the
    tables' name of the clean rows, is "none"), and shown as mean ± std when several seeds or folds were run, with
    "(k of n runs)" when the metric was undefined (NaN) in some of them. A paper row without a row of ours (a method
    not run, or not under that attack, radius or norm) keeps its line, each "ours" cell "–", as is an undefined value
    of ours: the published numbers stand whatever was run.
    ``metric_columns``: the metric names to compare, each a column pair (paper, ours), or one string of
    comma-separated names; a name that is no metric's and that no row of ours or the paper's holds (``"acc"``) is a
    ValueError."""
    problem = paper_rows_problem("paper_comparison_table", paper)
    if problem:
        raise ValueError(problem)
    metric_columns = _metric_list("paper_comparison_table", metric_columns, [*ours, *paper]) or []
    index, folded = {}, {}
    for r in ours:
        index.setdefault((r["method"], r["attack"]), []).append(r)
        folded.setdefault((r["method"], _folded(r["attack"])), []).append(r)
    head = ["method", "attack", "ε", "paper source"]
    for m in metric_columns:
        head += [f"{METRIC_LABELS.get(m, m)} (paper)", f"{METRIC_LABELS.get(m, m)} (ours)"]
    lines = [_table_line(head), "|" + "---|" * len(head)]
    radii = _radii(paper)
    for p in paper:
        # an attack named in other case ("FGSM", as the papers and reproduce's paper rows write it; evaluate's rows
        # read "fgsm") is that attack, as evaluate reads its names: its row of ours read "–" as if not run
        key = (p["method"], p["attack"])
        # "no attack", the tables' own name of the clean rows (results.json's "none"), read "–" too
        attack = "none" if _folded(key[1]) == "no attack" else _folded(key[1])
        at_radius = [[r for r in rows if _same_radius(r["eps"], p["eps"])]
                     for rows in (index.get(key, []), folded.get((key[0], attack), []))]
        r = _paper_match(at_radius[0] or at_radius[1], p)
        shown = format_eps(p["eps"], radii)
        if r and round(r["eps"], 6) != round(p["eps"], 6):  # the paper's 0.031 beside our 8/255: which one it is
            shown += f" (ours {format_eps(r['eps'])})"
        cells = [p["method"], _attack_label(p["attack"]), shown, p.get("source", "")]
        for m in metric_columns:
            ours_text = fmt(r.get(m))
            if r.get(f"{m}_std") is not None and ours_text != "–":
                ours_text += f" ± {fmt(r[f'{m}_std'])}"
            ours_text += runs_mark(r, m)
            cells += [fmt(p.get(m)), ours_text]
        lines.append(_table_line(cells))
    return "\n".join(lines)


def _undefined(value):
    value = python_number(value)  # a numpy NaN too, which fmt writes as "–"
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def undefined_note(rows, metrics, binary=True):
    """A line saying which metrics are undefined ("–") in how many rows, and why, or "" when all are defined: a bare
    dash would leave the reader guessing whether it is a bug or, e.g., a test set without positives. ``binary``:
    False gives the reasons of multi-class macro averages (robust_ops.metrics), which have no positive class."""
    missing = [(m, sum(_undefined(r.get(m)) for r in rows)) for m in metrics if any(m in r for r in rows)]
    missing = [(m, k) for m, k in missing if k]
    if not missing:
        return ""
    which = ", ".join(f"{METRIC_LABELS.get(m, m)} in {k} of {len(rows)} rows" for m, k in missing)
    why = ("A value is undefined when it is 0/0: sensitivity without positive-class samples, specificity without "
           "negatives, precision without positive predictions, F1 with neither, AUC and mAP with one class in the "
           "evaluated set." if binary else
           "A macro average is undefined when it is 0/0 for every class present in the evaluated set: precision when "
           "none of them is predicted, specificity when only one class is present; AUC and mAP with one class.")
    return f"> **Undefined metrics** (–, `null` in results.json): {which}. {why}"


def positive_class_text(info):
    """What sensitivity, precision and F1 are of, for ``info`` (a DatasetInfo's ``to_dict()``): the positive class's
    label and name, and the other class, whose recall specificity is; or the macro averages of a multi-class set."""
    pos = info.get("positive_class")
    if pos is not None:
        names = info["class_names"]
        return (f"positive class {pos} = {names[pos]}; sensitivity is the recall of the positive class, specificity "
                f"that of class {1 - pos} = {names[1 - pos]}")
    # multi-class: no positive class; each metric is a one-vs-rest macro average (robust_ops.metrics)
    return "macro-averaged metrics over the classes present; sensitivity is the mean per-class recall"


def absent_classes_text(info, part):
    """``"; absent from the test split: df, vasc"`` for the classes ``info`` (a DatasetInfo's ``to_dict()``) records
    as missing from ``part`` ("test" or "val"), else "": their per-class metrics are undefined and the macro
    averages leave them out, which the reader of the tables should know."""
    absent = (info.get("classes_missing_from_split") or {}).get(part)
    return f"; absent from the {part if part == 'test' else 'validation'} split: {', '.join(map(str, absent))}" \
        if absent else ""


def _samples(row):
    """How many samples ``row`` was evaluated on: ``n``, or for reproduce's means the total over their runs."""
    text = str(row.get("n", 0))
    if row.get("repeats", 1) > 1:  # reproduce means: n is the total over the runs
        text += f" over {row['repeats']} runs ({row.get('n_min')}–{row.get('n_max')} per run)"
    return text


def _samples_text(rows):
    """The report's sample count: one when every method was evaluated on as many samples, else each method's (rows of
    models evaluated on other sets, concatenated into one report, all read as the first row's count)."""
    per_method = {}
    for r in rows:
        per_method.setdefault(r["method"], _samples(r))
    if len(set(per_method.values())) <= 1:
        return next(iter(per_method.values()), "0")
    return ", ".join(f"{text} ({method})" for method, text in per_method.items())


def report_text_problem(func, arg, value):
    """The one-line refusal of ``func``'s (markdown_report's, write_results') ``arg``, report.md's ``title`` or
    extra Markdown, for a ``value`` that is neither text nor None, else None: title=3 was written as the heading "# 3"
    by markdown_report, refused by write_results. The message says how to give it: a number as its text, Markdown
    lines joined into one text."""
    if value is None or isinstance(value, str):
        return None
    lines = isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)
    if arg != "title" and lines:
        hint = f"join its lines into one text: {arg}='\\n'.join(lines)"
    else:
        example = repr(str(value)) if isinstance(value, numbers.Number) and not isinstance(value, bool) else "'...'"
        hint = (f"give report.md's heading as text, such as title={example}, or None for 'Robustness evaluation'"
                if arg == "title" else f"give the Markdown as text, such as {arg}={example}, or None for none")
    return f"{func}: expected {arg} to be a string or None, got {value!r:.60}; {hint}"


def _paper_metrics(paper):
    """The metrics ``paper`` rows (results.json's ``paper``) give numbers of, in order of first appearance: report.md's
    comparison columns."""
    seen = []
    for p in paper:
        seen += [k for k in p if k in METRIC_LABELS and k not in seen]
    return seen


def markdown_report(doc, title=None, figures=(), extra=None):
    """report.md's text for ``doc``, a results.json document (write_results's): the dataset line, a pivot table per
    reported metric, notes on undefined values and missing rows, per-class recall (multi-class), the published numbers
    of its ``paper`` rows beside ours (paper_comparison_table, a column pair per metric they give) and its ``notes``
    (a list, each a bullet) when it holds them, ``extra`` (Markdown text or None, the default), the table of all
    rows, ``figures`` (image file names, each embedded; default none), the configuration and the environment.
    ``title``: the heading; None (default): "Robustness evaluation". One file name as a string or a path
    (``Path("a.png")``) is that one figure. A ``title`` or ``extra`` that is neither text nor None (``title=3``) is a
    ValueError, as write_results refuses it."""
    for arg, text in (("title", title), ("extra", extra)):  # title=3: "# 3", as write_results refuses it
        problem = report_text_problem("markdown_report", arg, text)
        if problem:
            raise ValueError(problem)
    info = doc["dataset"]
    rows = doc["rows"]
    env = doc["environment"]
    name = info["name"]
    lines = [f"# {title or 'Robustness evaluation'}", ""]
    if doc.get("synthetic"):
        lines += [f"> **Synthetic data** ({name}): {info.get('source', 'generated')}. These numbers say nothing "
                  "about real patients.", ""]
    pos_text = positive_class_text(info)
    first = rows[0] if rows else {}
    # eval --split val attacks the validation split: results.json's config says which
    split = "Validation" if (doc.get("config") or {}).get("split") == "val" else "Test"
    pos_text += absent_classes_text(info, "val" if split == "Validation" else "test")
    lines += [f"Dataset: **{name}** ({info['num_classes']} classes, {pos_text}). {split} samples: "
              f"{_samples_text(rows)}.", ""]
    metrics = doc.get("metrics") or list(metric_names(info["num_classes"]))
    binary = info["num_classes"] == 2
    for metric in pivot_metrics(binary):
        if metric in metrics:
            lines += [pivot_table(rows, metric), ""]
    for note in (undefined_note(rows, metrics, binary), missing_rows_note(rows)):
        if note:
            lines += [note, ""]
    if not binary and any(r.get("confusion") is not None for r in rows):  # binary: sensitivity and specificity
        summed = ", summed over the runs" if first.get("repeats", 1) > 1 else ""
        lines += ["## Per-class recall", "", "Share of each class's samples predicted as that class (results.json's "
                  f"`confusion`{summed}: row = true class, column = predicted class, label order).", "",
                  per_class_recall_table(rows, info["class_names"]), ""]
    paper, notes = doc.get("paper"), doc.get("notes")
    if paper:  # write_results(paper=...) recorded them in results.json, and report.md showed no comparison
        lines += ["## Published numbers beside ours", "", paper_comparison_table(rows, paper, _paper_metrics(paper)),
                  ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in ([notes] if isinstance(notes, str) else notes)), ""]
    if extra:
        lines += [extra, ""]
    lines += ["## All rows", "", markdown_table(rows, metrics), ""]
    # "a.png" was embedded letter by letter: ![a](a), ![.](.), ...; Path("a.png") stopped: "not iterable"
    if isinstance(figures, (str, os.PathLike)):
        figures = [figures]
    for fig in figures:
        lines += [f"![{fig}]({fig})", ""]
    cfg = doc.get("config") or {}
    if cfg:
        lines += ["## Configuration", "", "```", *(f"{k}: {v}" for k, v in cfg.items()), "```", ""]
    lines += [f"robust_ops {env['robust_ops']}, torch {env['torch']}, {env['device']}, git "
              f"{env.get('git_revision') or 'unknown'}, {env['date']}.", ""]
    return "\n".join(lines)


def _figure(rows, cols, figsize, **kwargs):
    """A new figure and its [rows, cols] axes, outside pyplot: forcing pyplot onto Agg switched a notebook's own
    backend for the rest of the session, and a figure whose save failed stayed open in pyplot, one per call."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False, **kwargs)


def _save(fig, path):
    """Write ``fig`` at ``path``: in the format its suffix names (".pdf", ".svg"), a PNG without one or with one that
    names no format ("acc_eps0.5"). A path without a suffix ("fig") was written to "fig.png" (matplotlib appends its
    default format) while True said it was at "fig", and a file object (io.BytesIO) got whatever format
    rcParams["savefig.format"] names."""
    _wrap_titles(fig)
    fig.tight_layout()
    _hide_overlapping_tick_labels(fig)
    # a suffix that names no format ("acc_eps0.5", "fig.") is part of the name: matplotlib refused "Format '5' is not
    # supported", and wrote "fig." to "fig.png"
    # matplotlib reads no suffix from a bytes path (b"fig.pdf" was written as a PNG) and refuses one with a format, a
    # PathLike naming bytes too ("fname must be a PathLike or file handle")
    path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else path
    suffix = os.path.splitext(path)[1][1:].lower() if isinstance(path, str) else ""
    fig.savefig(path, dpi=110, format=suffix if suffix in fig.canvas.get_supported_filetypes() else "png")


def _hide_overlapping_tick_labels(fig):
    """Hide, in the ticks' order, each x tick label that overlaps the last one kept: radii that double (0, 1/255, 2/255,
    4/255 ... 32/255) drew the small ones' labels on top of each other, unreadable. Their ticks stay, and the
    tables give every radius; evenly spaced radii keep every label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    for ax in fig.axes:
        if not ax.axison:  # the saliency panels
            continue
        kept = None
        labels = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
        for label in sorted(labels, key=lambda t: t.get_position()[0]):  # in the ticks' order, 0 first
            box = _label_rectangle(label, renderer)
            if kept is not None and _rectangles_overlap(kept, box):
                label.set_visible(False)
            else:
                kept = box


def _label_rectangle(label, renderer):
    """A tick label's own rectangle, (centre, width, height, angle) in pixels: its window extent is the box around
    the rotated text, and the boxes of neighbouring 45-degree labels overlap where the texts lie side by side
    (1/255 ... 12/255 on one panel lost every other label, 12/255 too)."""
    box, rotation = label.get_window_extent(renderer), label.get_rotation()
    label.set_rotation(0)
    flat = label.get_window_extent(renderer)
    label.set_rotation(rotation)
    return ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2), flat.width, flat.height, math.radians(rotation)


def _rectangles_overlap(a, b):
    """Whether two rectangles of one angle overlap: along their text's direction and across it (separating axes)."""
    (ca, wa, ha, angle), (cb, wb, hb, _) = a, b
    dx, dy = cb[0] - ca[0], cb[1] - ca[1]
    along = abs(dx * math.cos(angle) + dy * math.sin(angle))
    across = abs(-dx * math.sin(angle) + dy * math.cos(angle))
    return along < (wa + wb) / 2 and across < (ha + hb) / 2


def _wrap_titles(fig):
    """Wrap the figure's title to its width and each panel's title to its column's: a long dataset name on a
    one-panel figure (one attack: 3.6 in wide, e.g. "COVID-19_Radiography_Dataset") ran past both edges, and a long
    class name in a saliency panel's "true ... / pred ..." (2.2 in a column, e.g. DermaMNIST-style "actinic keratoses
    and intraepithelial carcinoma") ran into the next column's title and past the figure's edge, cut off."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    if fig._suptitle is not None:
        _wrap_text(fig._suptitle, 0.95 * fig.bbox.width, renderer)
    for ax in fig.axes:
        spec = ax.get_subplotspec()
        if spec is not None and ax.title.get_text():
            _wrap_text(ax.title, 0.95 * fig.bbox.width / spec.get_gridspec().ncols, renderer)


def _wrap_text(text, width, renderer):
    """Wrap a matplotlib Text's lines until it is at most ``width`` pixels wide (or lines are 10 characters)."""
    lines = text.get_text().split("\n")
    chars = max(map(len, lines))
    # measured after each try: glyph widths differ ("MMMM" is wider than the average a single estimate assumed)
    while text.get_window_extent(renderer).width > width and chars > 10:
        chars = max(10, int(chars * 0.85))
        text.set_text("\n".join(textwrap.fill(line, chars) for line in lines))


# one-vs-rest macro averages on a multi-class set (robust_ops.metrics); accuracy and mAP read the same either way
_MACRO_AVERAGED = ("sensitivity", "specificity", "precision", "f1", "auc")
# a binary task's metrics of its positive class alone (robust_ops.metrics); specificity is the other class's recall
_OF_POSITIVE = ("sensitivity", "precision", "f1")


def figure_metric_label(metric, info=None):
    """A figure's name for ``metric``: "Macro F1" on a multi-class set, whose figures stand without the report's
    sentence that its metrics are macro averages; "Sensitivity (melanoma)" on a binary set for the metrics of its
    positive class, which only that sentence named (label 0, malignant, in BreastMNIST; melanoma or nevus in a
    user's set), and "Specificity (nevus)" for the recall of the other class; the table label otherwise."""
    label = METRIC_LABELS.get(metric, metric)
    if info is not None and info.num_classes > 2 and metric in _MACRO_AVERAGED:
        return f"Macro {label}"
    if info is not None and info.num_classes == 2 and info.positive_class is not None:
        if metric in _OF_POSITIVE:
            return f"{label} ({info.class_names[info.positive_class]})"
        if metric == "specificity":
            return f"{label} ({info.class_names[1 - info.positive_class]})"
    return label


def _figure_info(name, info):
    """A figure's ``info``: a DatasetInfo, None, or results.json's ``dataset`` dict (``doc["dataset"]``, which
    stopped plot_metric_vs_radius with "'dict' object has no attribute 'num_classes'"), read as one."""
    if not isinstance(info, dict):
        return info
    missing = [k for k in ("name", "num_classes", "class_names") if k not in info]
    if missing:
        raise ValueError(f"{name}: info: expected a DatasetInfo or results.json's dataset dict, got a dict without "
                         f"{', '.join(missing)}")
    return SimpleNamespace(name=info["name"], num_classes=info["num_classes"], class_names=tuple(info["class_names"]),
                           positive_class=info.get("positive_class"), synthetic=bool(info.get("synthetic")))


def plot_metric_vs_radius(rows, path, metric="accuracy", info=None):
    """One panel per (attack, norm), one line per method: ``metric`` against the radius (clean value at eps = 0),
    from ``rows`` (evaluate's result dicts), saved as a PNG at ``path`` (a name or a file object; a suffix such as
    ".pdf" names another format). ``info``: the DatasetInfo, for the axis
    label's class name (sensitivity of "malignant") and a synthetic-data tag; None (default): neither. Returns True
    when the figure was written.
    A mean row (reproduce) with a ``<metric>_std`` gets a ±1 std error bar, and one that is the mean of only k of
    its n runs is marked "k of n runs", as the tables mark it. Returns False (nothing written) when no row has a
    defined value of the metric (an empty figure would say nothing; the report's note says why it is undefined);
    a ``metric`` that is no metric's name and that no row holds (``"acc"``) is a ValueError. ``info`` may be
    results.json's ``dataset`` dict too."""
    _check_metric("plot_metric_vs_radius", metric, rows)
    info = _figure_info("plot_metric_vs_radius", info)
    panels = _attack_panels(rows)
    methods = _methods(rows)
    if not panels or all(_undefined(r.get(metric)) for r in rows):
        return False
    several_norms = {a for a, count in Counter(a for a, _ in panels).items() if count > 1}
    fig, axes = _figure(1, len(panels), (3.6 * len(panels), 3.2), sharey=True)
    clean = {r["method"]: r for r in rows if r["attack"] == "none"}
    lines = {}  # method -> its first line, for the one legend
    spread = False  # whether any point got an error bar, for the title
    for ax, (attack, norm) in zip(axes[0], panels):
        in_panel = [r for r in rows if r["attack"] == attack and r.get("norm") == norm]
        for i, m in enumerate(methods):
            pts = sorted(((r["eps"], r) for r in in_panel if r["method"] == m), key=lambda p: p[0])
            if m in clean and (not pts or pts[0][0] > 0):
                pts = [(0.0, clean[m])] + pts
            pts = [(e, r) for e, r in pts if not _undefined(r.get(metric))]
            if not pts:
                continue
            # one colour per method in every panel: each panel's own colour cycle gave the next method the colour of
            # one left out of it (no defined value there), unlike the legend
            color = f"C{i % 10}"
            line, = ax.plot([e for e, _ in pts], [python_number(r[metric]) for _, r in pts], marker="o", label=m,
                            color=color)
            lines.setdefault(m, line)
            # reproduce's means: a bar of ±1 std where several runs defined the metric (the tables' "± std")
            bars = [(e, python_number(r[metric]), python_number(r.get(f"{metric}_std"))) for e, r in pts]
            bars = [b for b in bars if not _undefined(b[2])]
            if bars:
                spread = True
                ax.errorbar([b[0] for b in bars], [b[1] for b in bars], yerr=[b[2] for b in bars], fmt="none",
                            ecolor=color, elinewidth=0.8, capsize=2)
            for e, r in pts:
                mark = runs_mark(r, metric).strip(" ()")
                if mark:
                    ax.annotate(mark, (e, python_number(r[metric])), textcoords="offset points", xytext=(3, 3),
                                fontsize=6, color=color)
        ax.set_title(f"{attack} ({norm})" if attack in several_norms else attack, fontsize=10)
        ax.set_xlabel("ε")
        ax.grid(alpha=0.3)
        ticks = sorted({r["eps"] for r in in_panel} | {0.0})
        ax.set_xticks(ticks)
        ax.set_xticklabels([format_eps(t, ticks) for t in ticks], fontsize=7, rotation=45)
    axes[0][0].set_ylabel(figure_metric_label(metric, info))
    axes[0][0].set_ylim(-0.02, 1.02)
    # every method drawn in any panel (the last panel's own lines left out one without a value there)
    axes[0][-1].legend(handles=[lines[m] for m in methods if m in lines], fontsize=7, loc="best")
    if info is not None:
        tag = " — SYNTHETIC DATA" if info.synthetic else ""
        bars = ", bars ±1 std" if spread else ""
        fig.suptitle(f"{figure_metric_label(metric, info)} vs radius on {info.name}{_means_text(rows)}{bars}{tag}",
                     fontsize=10)
    _save(fig, path)
    return True


def _means_text(rows):
    """", mean over 3 runs" for reproduce's mean rows (``repeats``; "2–3 runs" when they differ), else "": a figure of
    fold or seed means, which stands without the report's sample line, read as one run's values."""
    repeats = sorted({r.get("repeats") or 1 for r in rows})
    if repeats[-1] <= 1:
        return ""
    return f", mean over {repeats[0]}{f'–{repeats[-1]}' if len(repeats) > 1 else ''} runs"


def last_conv(model):
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[-1] if convs else None


def grad_cam(model, x, target=None, layer=None):
    """Grad-CAM (Selvaraju et al. 2017) maps [N, H, W] in [0, 1] for ``target`` classes (default: the predicted
    ones) at ``layer``'s output (default: the last Conv2d; an in-place ReLU after it does not change the map),
    upsampled to the input size, of ``model`` at images ``x`` [N, C, H, W]. ``target``: one class in [0, K) per
    image, [N] or [N, 1] (a single logit counts as K = 2); anything else is an error. Model mode and parameter
    flags are left as they were. ``layer``: a module of ``model`` or its name as ``model.named_modules()`` gives it
    ("features.3")."""
    if isinstance(layer, str):  # stopped with "'str' object has no attribute 'register_forward_hook'"
        try:
            layer = model.get_submodule(layer)
        except AttributeError:
            convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
            raise ValueError(f"grad_cam: the model has no layer {layer!r}; its Conv2d layers are "
                             f"{', '.join(map(repr, convs)) or 'none'}") from None
    elif layer is not None and not isinstance(layer, torch.nn.Module):
        raise ValueError(f"grad_cam: expected layer to be a layer of the model or its name, got {layer!r:.60}")
    layer = layer or last_conv(model)
    if layer is None:
        raise ValueError("grad_cam: the model has no Conv2d layer; use input_gradient instead")
    store = {}

    def hook(_, __, out):
        store["a"] = out
        # the next layers get a copy: an in-place op after ``layer`` (ReLU(inplace=True)) rewrote the stored map,
        # so the map was taken at the ReLU's output, not at ``layer``'s, and differed from the same model's without
        # inplace=True
        return out.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad(), use_model_mode(model, "eval"):  # each module's own mode comes back
            # an input that requires grad: with the layers up to ``layer`` frozen (a head-only fine-tune, a model
            # frozen for evaluation) the activation would not, and retain_grad / autograd.grad failed on it
            out = model(x.detach().requires_grad_(True))
            single = out.dim() == 1 or out.shape[1] == 1
            if target is not None:
                target = _class_indices("grad_cam", "target", target, x.shape[0], 2 if single else out.shape[1])
                target = target.to(out.device)
            if single:  # single logit: the positive class score is +z, negative -z
                z = out.reshape(-1)
                pred = (z > 0).long()
                t = pred if target is None else target
                score = torch.where(t == 1, z, -z).sum()
            else:
                t = out.argmax(1) if target is None else target
                score = out.gather(1, t.view(-1, 1)).sum()
            act = store.get("a")
            # else a bare KeyError 'a' (a layer of another model) or an error in the channel mean below
            if act is None or not torch.is_tensor(act) or act.dim() != 4:
                got = ("it did not run in the model's forward" if act is None else
                       f"it gave {tuple(act.shape) if torch.is_tensor(act) else type(act).__name__}")
                raise ValueError(f"grad_cam: expected layer to be a layer of the model giving [N, C, H, W] feature "
                                 f"maps, but {got}")
            grad, = torch.autograd.grad(score, act)
    finally:
        handle.remove()
    weights = grad.mean((2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _per_image_unit_max(cam)


def _class_indices(name, what, labels, n, num_classes):
    """``labels`` as [N] class indices in [0, num_classes) (``name``'s ``what``): grad_cam's single target for N
    images mapped only the first one (the others' maps were 0), and on a single-logit model any class but 1 was
    taken as class 0 by grad_cam and as class 1 by input_gradient's loss."""
    from ._options import class_labels

    t = class_labels(name, torch.as_tensor(labels), n, what=what)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"{name}: expected {what} classes in [0, {num_classes}) (the model's classes), got values "
                         f"in [{int(t.min())}, {int(t.max())}]")
    return t


def input_gradient(model, x, y):
    """|∂ loss / ∂ x| of ``model``'s cross-entropy, summed over channels and normalised per image to [0, 1]: maps
    [N, H, W] (ARFL's feature saliency maps). ``x``:
    images [N, C, H, W]. ``y``: one class in [0, K) per image, [N] or [N, 1] (a single logit counts as K = 2)."""
    # feature vectors [N, F] failed with an IndexError, and [N, C, L] came back [N, N, L] (maps broadcast across
    # images) -- the inputs grad_cam's "use input_gradient instead" sends a Conv2d-free model's user to
    if x.dim() != 4:
        raise ValueError(f"input_gradient: expected x to be images [N, C, H, W], got shape {tuple(x.shape)}; "
                         "saliency maps need image inputs")
    return _input_gradient(model, x, y)[0]


def _input_gradient(model, x, y, name="input_gradient"):
    """(input_gradient's maps, the eval-mode model output at x it was taken from); ``name``: the caller, for errors."""
    with torch.enable_grad(), use_model_mode(model, "eval"):  # each module's own mode comes back
        xg = x.detach().clone().requires_grad_(True)
        out = model(xg)
        classes = 2 if is_single_logit(out) else out.shape[1]
        y = _class_indices(name, "y", y, x.shape[0], classes).to(out.device)
        loss = classification_loss(out, y, reduction="sum")
        grad, = torch.autograd.grad(loss, xg)
    return _per_image_unit_max(grad.abs().sum(1)), out.detach()


def _per_image_unit_max(maps):
    """``maps`` [N, H, W] >= 0 divided by each image's maximum (an all-zero map stays 0), in their dtype. Half
    precision is divided in float32: the 1e-12 guard is 0 in float16, where an all-zero map came out NaN."""
    wide = float32_or_wider(maps)
    return (wide / wide.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)).to(maps.dtype)


def saliency_images_problem(x):
    """What is wrong with ``x`` as plot_saliency's images, or None: images [N, C, H, W] are drawn, feature vectors
    [N, D] get no figure; a grayscale batch [N, H, W] (MedMNIST's arrays) or one image [C, H, W] was taken for
    feature vectors too, so no figure was drawn, without a word."""
    if x.dim() in (2, 4):
        return None
    hint = ""
    if x.dim() == 3:
        hint = "; a batch of one-channel images [N, H, W] needs x.unsqueeze(1), one image [C, H, W] x.unsqueeze(0)"
    return f"expected x to be images [N, C, H, W] (or feature vectors [N, D]: no figure), got shape {list(x.shape)}" \
        + hint


def plot_saliency(model, x, y, path, info=None, title=None):
    """Rows of images: the input, its Grad-CAM overlay and its input-gradient map, of ``model`` at images ``x``
    [N, C, H, W] with labels ``y`` (one class per image), saved as a PNG at ``path``. ``info``: the DatasetInfo,
    or results.json's ``dataset`` dict, for class names in the panel titles and a synthetic-data tag (None, the
    default: label numbers); ``title``: the
    figure's title (None: none). Returns True when written, False for inputs that are not images (e.g. two-moons
    features [N, D]); x of another shape ([N, H, W]) is a ValueError. A model without Conv2d, or whose Grad-CAM maps
    are all constant (a 1x1 last feature map), gets no Grad-CAM column; the title says why for the latter. A single
    constant map (an image without positive evidence for its predicted class) is not overlaid, its panel titled so."""
    problem = saliency_images_problem(x)
    if problem:
        raise ValueError(f"plot_saliency: {problem}")
    info = _figure_info("plot_saliency", info)
    if x.dim() != 4 or x.shape[0] == 0:
        return False
    from ._options import class_labels

    # evaluate's label rule: MedMNIST's [N, 1] labels failed in the loss ("0D or 1D target tensor expected")
    y = class_labels("plot_saliency", torch.as_tensor(y), x.shape[0])
    device = model_device(model)  # a model without parameters (a fixed filter bank) has a device too: CPU
    x, y = x.to(device), y.to(device)
    cams = grad_cam(model, x) if last_conv(model) is not None else None
    note = None
    # constant up to rounding: upsampling a 1x1 map gives v * w0 + v * w1, a few ulps off v (vgg16 at 28x28: 1.0 and
    # 0.99999994 once normalised), which an exact comparison took for a map with a spread
    spread = (cams.flatten(1).amax(1) - cams.flatten(1).amin(1)) if cams is not None else None
    flat = (spread <= 8 * torch.finfo(cams.dtype).eps).tolist() if cams is not None else None
    if cams is not None and all(flat):
        # e.g. vgg16 / densenet121 at 28x28, whose last feature map is 1x1: every panel one flat colour, read as if
        # the whole image mattered equally
        # two lines: on one it was wider than the two-column figure and cut off at both ends
        # or all zero on a larger map: no channel weighs positively for the predicted class (resnet18 at 32x32, 2x2)
        cams, note = None, ("Grad-CAM left out: its maps are constant here\n(a 1x1 last feature map, or no "
                            "positive evidence)")
    # The predictions shown come from the input gradient's own eval-mode forward: no third forward, and not one in
    # the model's current mode (after fit, train mode: batch-norm statistics of these few images, running stats
    # updated).
    grads, out = _input_gradient(model, x, y, "plot_saliency")
    from .attacks.context import predict_from_output

    pred = predict_from_output(out).cpu()
    cols = 3 if cams is not None else 2
    n = x.shape[0]
    fig, axes = _figure(n, cols, (2.2 * cols, 2.2 * n))
    names = info.class_names if info is not None else None
    # matplotlib gets float32 numpy arrays: a tensor went through numpy's deprecated __array__ fallback (no copy=
    # keyword; a DeprecationWarning the suite's filter hid), and a bfloat16 one failed ("unsupported ScalarType")
    cams = cams.float().cpu().numpy() if cams is not None else None
    grads = grads.float().cpu().numpy()
    for i in range(n):
        img = x[i].detach().float().cpu()
        channels = img.shape[0]
        # matplotlib draws 1 (gray) or 3 (RGB) channels; it refused 2 or 5+ and took a 4th as transparency, so other
        # counts (e.g. MRI sequences) are shown as their mean, and the title says so
        img = (img.permute(1, 2, 0) if channels == 3 else img.mean(0)).numpy()
        cmap = "gray" if img.ndim == 2 else None
        label = (lambda k: names[k] if names else str(k))
        shown = f"\nmean of {channels} channels" if channels not in (1, 3) else ""
        axes[i][0].imshow(img, cmap=cmap, vmin=0, vmax=1)
        axes[i][0].set_title(f"true {label(int(y[i]))}\npred {label(int(pred[i]))}{shown}", fontsize=7)
        if cams is not None:
            axes[i][1].imshow(img, cmap=cmap, vmin=0, vmax=1)
            if flat[i]:  # one image's map constant while others are not: a flat overlay read as "attends to nothing"
                axes[i][1].set_title("Grad-CAM: constant\n(not drawn)", fontsize=7)
            else:
                axes[i][1].imshow(cams[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
                axes[i][1].set_title("Grad-CAM", fontsize=7)
        axes[i][cols - 1].imshow(grads[i], cmap="hot", vmin=0, vmax=1)
        axes[i][cols - 1].set_title("input gradient", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    if title or info is not None or note:
        tag = " (synthetic data)" if info is not None and info.synthetic else ""
        fig.suptitle("\n".join(filter(None, (f"{title or ''}{tag}", note))), fontsize=9)
    _save(fig, path)
    return True
