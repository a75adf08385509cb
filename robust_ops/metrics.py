"""Classification metrics as the seed papers report them, computed with scikit-learn, with the positive class explicit.

Binary tasks: ``sensitivity`` is the recall of ``positive_class`` (malignant), ``specificity`` the recall of the
other class, ``precision`` / ``f1`` are those of the positive class, ``auc`` the ROC AUC of the positive class's
probability. Multi-class tasks: sensitivity, specificity, precision and F1 are macro averages over classes
(one-vs-rest) and ``auc`` is the macro one-vs-rest ROC AUC. ``map`` is the mean over classes of the one-vs-rest
average precision (DPAAT's mAP), for binary tasks too (the mean of both classes' AP).

Undefined values are NaN (``null`` in results.json, "–" in reports), as scikit-learn's ``zero_division=np.nan``
gives them: sensitivity (recall) of a class absent from ``y_true``, specificity when ``y_true`` holds no negatives,
precision of a class never predicted, F1 = 2TP / (2TP + FP + FN) when that denominator is 0, AUC and mAP with one
class present. Macro averages run over the classes present in ``y_true`` and skip a class whose value is undefined
(an absent class would otherwise count as 0 and a perfect prediction score below 1); they are NaN when no class has
a value.

Labels must be integers in [0, num_classes) and ``probs`` rows of class probabilities (finite, in [0, 1], summing
to 1 within 1e-4, or within the machine epsilon of float16 / bfloat16 rows: logits would rank the samples
otherwise); anything else is a ValueError naming the argument.

Give the model's ``logits`` instead of ``probs`` where you have them (evaluation does): AUC and mAP then rank the
samples on each class's log-odds against the other classes (:func:`class_log_odds`), which order them as the
probabilities do but keep apart what those round together. A probability rounds to 1.0 once the class's logit margin
passes ~37 in float64 (~17 in float32), tying every more confident prediction in that column: AUC 0.667 instead of
1.0 for margins 40, 45 (negatives) below 50, 60 (positives).
"""

import math
import numbers

import numpy as np
import torch

from ._options import label_dtype_fix
from .attacks.context import is_single_logit

__all__ = [
    "classification_metrics", "probabilities", "confusion_counts", "metric_names", "BINARY_METRICS",
    "MULTICLASS_METRICS"
]

BINARY_METRICS = ("accuracy", "f1", "sensitivity", "specificity", "precision", "auc", "map")
MULTICLASS_METRICS = BINARY_METRICS
METRIC_LABELS = {
    "accuracy": "Accuracy", "f1": "F1", "sensitivity": "Sensitivity", "specificity": "Specificity",
    "precision": "Precision", "auc": "AUC", "map": "mAP",
}


def metric_names(num_classes):
    """The metric names results carry for a ``num_classes``-class task, in report order: BINARY_METRICS for 2,
    else MULTICLASS_METRICS (the same seven names today)."""
    return BINARY_METRICS if num_classes == 2 else MULTICLASS_METRICS


def _check_logits(name, out):
    if not torch.is_tensor(out) or out.dim() not in (1, 2):
        got = f"{out.dim()}-D" if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"{name}: expected out to be [N, K] logits or [N] / [N, 1] single logits, got {got}")


def probabilities(out):
    """Class probabilities [N, K] (float64) from the model output ``out``: [N, K] logits (softmax) or [N] / [N, 1]
    single logits (sigmoid -> K = 2). Any other shape or a non-tensor is a ValueError."""
    _check_logits("probabilities", out)
    # float64: in float32 the predicted class's probability rounds to 1.0 once its logit margin passes ~17 (and to a
    # few values just below 1 from ~14), tying confident predictions in that column and so changing AUC and mAP;
    # float64 keeps them apart up to a margin of ~36
    out = out.detach().double()
    if is_single_logit(out):
        z = out.reshape(-1)
        # sigmoid(-z), not 1 - sigmoid(z): the latter rounds to 0 for z > ~37 in float64, tying confident
        # predictions in class 0's column (BreastMNIST's positive class) and so changing its AUC
        return torch.stack([torch.sigmoid(-z), torch.sigmoid(z)], 1)
    return torch.softmax(out, 1)


def class_logits(out):
    """[N, K] logits (float64) from [N, K] logits or [N] / [N, 1] single logits z, which are the two-class logits
    [0, z] (the same probabilities: softmax([0, z]) = [sigmoid(-z), sigmoid(z)])."""
    _check_logits("class_logits", out)
    z = out.detach().double()
    if is_single_logit(z):
        z = z.reshape(-1)
        return torch.stack([torch.zeros_like(z), z], 1)
    return z


def class_log_odds(out):
    """Each class's log-odds against the other classes, ``z_c - logsumexp_{j != c} z_j`` [N, K] (float64), from
    logits as :func:`class_logits` takes them. A strictly increasing function of the class's probability, so it
    ranks samples as the probability does, without its rounding to 1.0; with two classes it is exactly the logit
    difference (a single logit z: -z and z). A -inf logit gives -inf, a class whose others are all -inf +inf."""
    z = class_logits(out)
    k = z.shape[1]
    # -logsumexp_{j != c}(z_j - z_c), the largest term apart and the rest through log1p: z_c - logsumexp(others)
    # cancels where the class dominates (60 - 60.000000002), rounding log-odds such as -2.06e-9 to a few ulps of
    # 60 and so tying or swapping samples; sorted, the same other logits in another order round alike (no split tie)
    d = (z.unsqueeze(1) - z.unsqueeze(2)).masked_fill(torch.eye(k, dtype=torch.bool, device=z.device), -math.inf)
    d = d.sort(2, descending=True).values
    top, rest = d[..., 0], d[..., 1:]
    lse = top + torch.log1p(torch.exp(rest - top.unsqueeze(2)).nan_to_num(0.0).sum(2))
    lse = torch.where(torch.isfinite(top), lse, top)  # -inf: every other logit is -inf
    return torch.where(z == -math.inf, -math.inf, -lse)  # z_c = -inf: -inf - (-inf) above was NaN


def _as_numpy(a):
    if torch.is_tensor(a):
        a = a.detach().cpu()
        return (a.float() if a.dtype == torch.bfloat16 else a).numpy()  # numpy has no bfloat16
    return np.asarray(a)


def _sum_tolerance(probs):
    """How far from 1 a row of ``probs`` may sum: 1e-4 covers float32 softmax rows; a float16 / bfloat16 row is off
    by up to ~0.4 of its machine epsilon (half of float16 softmax rows missed 1e-4, refused as not probabilities)."""
    if torch.is_tensor(probs) and probs.is_floating_point():
        return max(1e-4, torch.finfo(probs.dtype).eps)
    probs = np.asarray(probs)
    return max(1e-4, float(np.finfo(probs.dtype).eps)) if np.issubdtype(probs.dtype, np.floating) else 1e-4


def _labels(owner, name, a, num_classes):
    """Integer class labels in [0, num_classes): a float label would be truncated and an out-of-range one dropped
    by the confusion matrix (or wrapped, -1 -> the last class) without a word."""
    a = _as_numpy(a)
    if a.size and not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)):
        if not np.issubdtype(a.dtype, np.floating) or not (np.isfinite(a).all() and (a == np.round(a)).all()):
            # the fix: class names mapped to indices, rows' argmax(1) (label_dtype_fix); a vector of scores is
            # the model's probabilities or logits, which go to probs= / logits= beside the predicted classes
            fix = label_dtype_fix(a) if a.dtype.kind != "f" or a.ndim == 2 else (
                "; probabilities or scores? pass the predicted classes (probs.argmax(1)) here and the scores as "
                "probs= or logits=")
            raise ValueError(f"{owner}: expected {name} to hold integer class labels, got dtype {a.dtype} with "
                             f"non-integer values{fix}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"{owner}: expected {name} in [0, {num_classes}), got values in [{a.min()}, {a.max()}]")
    return a


def _label_pair(owner, y_true, y_pred, num_classes):
    """``y_true`` and ``y_pred`` through _labels, of one shape [N]: confusion_counts broadcast a y_pred of one label
    against every y_true ([0, 1, 1, 0] against [1] counted four predictions of class 1) and failed with numpy's
    "object too deep for desired array" for [N, K] rows."""
    y_true, y_pred = _labels(owner, "y_true", y_true, num_classes), _labels(owner, "y_pred", y_pred, num_classes)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        rows = [(name, a.shape[1]) for name, a in (("y_true", y_true), ("y_pred", y_pred)) if a.ndim == 2]
        fix = "" if not rows else (f"; {rows[0][0]} of shape [N, 1]? pass its .reshape(-1)" if rows[0][1] == 1
                                   else f"; one-hot {rows[0][0]} rows? pass their .argmax(1)")
        raise ValueError(f"{owner}: expected y_true and y_pred of the same shape [N], got {y_true.shape} and "
                         f"{y_pred.shape}{fix}")
    return y_true, y_pred


def confusion_counts(y_true, y_pred, *, num_classes):
    """The confusion matrix as ``num_classes`` lists of ``num_classes`` ints: row i, column j counts the samples of
    class i predicted as class j (evaluation rows' ``confusion``; the per-class view macro averages hide).
    ``y_true``, ``y_pred``: the true and predicted labels [N] (arrays, lists or tensors of integers in
    [0, num_classes)), of one shape [N]; others are a ValueError naming the argument."""
    y_true, y_pred = _label_pair("confusion_counts", y_true, y_pred, num_classes)
    counts = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).tolist()


def positive_class_problem(num_classes, positive_class):
    """Why ``positive_class`` does not fit a ``num_classes``-class task, or None when it does."""
    # an int: 1.0 == 1 passed the membership test and then failed as an index
    if num_classes == 2 and (isinstance(positive_class, bool) or not isinstance(positive_class, numbers.Integral)
                             or positive_class not in (0, 1)):
        return f"binary tasks need positive_class 0 or 1, got {positive_class}"
    if num_classes > 2 and positive_class is not None:  # multi-class metrics are macro averages, never one class's
        return (f"positive_class is only for binary tasks (num_classes={num_classes} uses macro averages), "
                f"got {positive_class!r}")
    return None


def classification_metrics(y_true, y_pred, probs=None, *, num_classes, positive_class=None, logits=None):
    """Metrics dict for one prediction set: ``n`` (the sample count) and each of metric_names(num_classes) as a
    float (NaN where undefined, module docstring). ``y_true``, ``y_pred``: true and predicted labels [N] (arrays,
    lists or tensors of integers in [0, num_classes)); ``num_classes``: K >= 2; ``positive_class``: 0 or 1 for a
    binary task (required there), None (default) for a multi-class one. ``probs``: [N, K] class probabilities, or
    ``logits``: the model's [N, K] logits or [N] / [N, 1] single logits (a tensor), needed for AUC and mAP (NaN
    without either); ``logits`` rank samples whose probabilities round to a tie (module docstring). Bad arguments
    are a ValueError naming the argument."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"classification_metrics: expected num_classes to be an integer >= 2, got {num_classes!r}")
    # checked before anything else, so an empty set fails the same way as a full one
    problem = positive_class_problem(num_classes, positive_class)
    if problem:
        raise ValueError(f"classification_metrics: {problem}")
    y_true, y_pred = _label_pair("classification_metrics", y_true, y_pred, num_classes)
    if probs is not None and logits is not None:
        raise ValueError("classification_metrics: give probs or logits, not both")
    scores = None  # what AUC and mAP rank: probs, or the logits' dense ranks
    if logits is not None:
        logits = torch.as_tensor(logits)
        if not (logits.is_floating_point() and logits.dim() in (1, 2)
                and (len(logits), 2 if is_single_logit(logits) else logits.shape[1]) == (len(y_true), num_classes)):
            raise ValueError(f"classification_metrics: expected logits of shape [{len(y_true)}, {num_classes}]"
                             f"{' or [N] single logits' if num_classes == 2 else ''} (floating point), got "
                             f"{tuple(logits.shape)} {logits.dtype}")
        # -inf (probability 0) is a score; NaN, +inf or a row of -inf have no probabilities
        no_probs = int((~torch.isfinite(probabilities(logits)).all(1)).sum())
        if no_probs:
            raise ValueError(f"classification_metrics: logits holds {no_probs} row(s) with NaN, +Inf or only -Inf")
        # AUC and AP depend only on the order and ties of the scores: dense ranks keep both and are finite where a
        # log-odds is +-inf (a -inf logit)
        scores = np.stack([np.unique(c, return_inverse=True)[1].reshape(-1)
                           for c in class_log_odds(logits).cpu().numpy().T], 1).astype(np.float64)
    if probs is not None:
        tolerance = _sum_tolerance(probs)
        probs = _as_numpy(probs).astype(np.float64)
        if probs.shape != (len(y_true), num_classes):
            raise ValueError(f"classification_metrics: expected probs of shape [{len(y_true)}, {num_classes}], "
                             f"got {probs.shape}")
        if not np.isfinite(probs).all():
            raise ValueError(f"classification_metrics: probs holds {int((~np.isfinite(probs)).any(1).sum())} "
                             f"row(s) with NaN/Inf")
        # logits or other scores passed here rank the samples otherwise (AUC and mAP change without a word)
        off = (probs < 0).any(1) | (probs > 1).any(1) | (np.abs(probs.sum(1) - 1) > tolerance)
        if off.any():
            raise ValueError(f"classification_metrics: expected probs to hold class probabilities (rows in [0, 1] "
                             f"summing to 1), got {int(off.sum())} row(s) that do not; for logits pass "
                             "robust_ops.metrics.probabilities(logits) or logits=logits")
        scores = probs
    n = len(y_true)
    out = {"n": int(n)}
    if n == 0:
        return {**out, **{k: math.nan for k in metric_names(num_classes)}}
    out["accuracy"] = float((y_true == y_pred).mean())
    labels = list(range(num_classes))
    # Every class's precision, recall and F1 in one call (0/0 is undefined, not 0: module docstring): separate
    # f1_score / recall_score / precision_score calls each re-validate and recount the same confusion matrix, and
    # evaluation computes these for every row. Element for element the same values as those calls.
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None,
                                                               zero_division=np.nan)
    if num_classes == 2:
        neg = 1 - positive_class
        out["f1"] = float(f1[positive_class])
        out["sensitivity"] = float(recall[positive_class])
        out["specificity"] = float(recall[neg])
        out["precision"] = float(precision[positive_class])
        if scores is None or len(np.unique(y_true)) < 2:
            out["auc"] = out["map"] = math.nan
        else:
            out["auc"] = float(roc_auc_score(y_true == positive_class, scores[:, positive_class]))
            out["map"] = float(np.mean([average_precision_score(y_true == c, scores[:, c]) for c in (0, 1)]))
        return out
    cm = np.asarray(confusion_counts(y_true, y_pred, num_classes=num_classes))
    present = cm.sum(1) > 0

    def macro(per_class):
        vals = per_class[present & ~np.isnan(per_class)]
        return float(vals.mean()) if vals.size else math.nan

    out["f1"] = macro(f1)
    out["sensitivity"] = macro(recall)
    tn = cm.sum() - cm.sum(0) - cm.sum(1) + np.diag(cm)
    fp = cm.sum(0) - np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        spec = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), math.nan)
    # the binary rows' order (getting-started's results.json row): precision came before specificity here
    out["specificity"] = macro(spec)
    out["precision"] = macro(precision)
    if scores is None or present.sum() < 2:
        out["auc"] = out["map"] = math.nan
        return out
    onehot = np.eye(num_classes)[y_true]
    aucs = [roc_auc_score(onehot[:, c], scores[:, c]) for c in labels if 0 < onehot[:, c].sum() < n]
    out["auc"] = float(np.mean(aucs)) if aucs else math.nan
    aps = [average_precision_score(onehot[:, c], scores[:, c]) for c in labels if onehot[:, c].sum() > 0]
    out["map"] = float(np.mean(aps)) if aps else math.nan
    return out
