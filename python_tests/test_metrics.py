"""Metrics equal scikit-learn's on fixed prediction sets, with the positive class explicit."""

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from robust_ops.attacks.context import predict_from_output as predict
from robust_ops.metrics import classification_metrics, confusion_counts, probabilities

Y = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1])
P1 = np.array([0.1, 0.6, 0.3, 0.8, 0.4, 0.9, 0.7, 0.2, 0.55, 0.45, 0.35, 0.95])  # P(class 1)
PRED = (P1 > 0.5).astype(int)


@pytest.mark.parametrize("positive", [0, 1])
def test_binary_matches_sklearn(positive):
    probs = np.stack([1 - P1, P1], 1)
    m = classification_metrics(Y, PRED, probs, num_classes=2, positive_class=positive)
    neg = 1 - positive
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y, PRED))
    assert m["f1"] == pytest.approx(skm.f1_score(Y, PRED, pos_label=positive))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(Y, PRED, pos_label=positive))
    assert m["specificity"] == pytest.approx(skm.recall_score(Y, PRED, pos_label=neg))
    assert m["precision"] == pytest.approx(skm.precision_score(Y, PRED, pos_label=positive))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(Y == positive, probs[:, positive]))
    assert m["map"] == pytest.approx(np.mean([skm.average_precision_score(Y == c, probs[:, c]) for c in (0, 1)]))
    tn, fp, fn, tp = skm.confusion_matrix(Y == positive, PRED == positive).ravel()
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn)) and m["specificity"] == pytest.approx(tn / (tn + fp))


def test_breastmnist_convention_malignant_is_zero():
    """Label 0 = malignant: sensitivity is the recall of label 0, not of label 1."""
    y = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1, 1, 1])
    m = classification_metrics(y, pred, num_classes=2, positive_class=0)
    assert m["sensitivity"] == pytest.approx(0.25) and m["specificity"] == pytest.approx(1.0)
    assert math.isnan(m["auc"])  # no probabilities given


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(0)
    y = np.arange(30) % 3
    logits = rng.normal(size=(30, 3)) + 1.5 * np.eye(3)[y]
    probs = torch.softmax(torch.tensor(logits), 1).numpy()
    pred = probs.argmax(1)
    m = classification_metrics(y, pred, probs, num_classes=3)
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    onehot = np.eye(3)[y]
    aps = [skm.average_precision_score(onehot[:, c], probs[:, c]) for c in range(3)]
    assert m["map"] == pytest.approx(np.mean(aps))
    cm = skm.confusion_matrix(y, pred)
    spec = [(cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]) / (cm.sum() - cm[c].sum()) for c in range(3)]
    assert m["specificity"] == pytest.approx(np.mean(spec))


def test_single_class_auc_is_nan_and_empty():
    m = classification_metrics([1, 1], [1, 0], np.array([[0.2, 0.8], [0.6, 0.4]]), num_classes=2, positive_class=1)
    assert math.isnan(m["auc"]) and m["sensitivity"] == 0.5
    e = classification_metrics([], [], None, num_classes=2, positive_class=1)
    assert e["n"] == 0 and math.isnan(e["accuracy"])


def test_probabilities_single_logit_and_errors():
    p = probabilities(torch.tensor([0.0, 2.0]))
    assert torch.allclose(p[:, 1], torch.sigmoid(torch.tensor([0.0, 2.0], dtype=torch.float64))) and p.shape == (2, 2)
    with pytest.raises(ValueError, match="binary tasks need positive_class 0 or 1, got None"):
        classification_metrics([0, 1], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match=r"expected probs of shape \[2, 2\]"):
        classification_metrics([0, 1], [0, 1], np.ones((2, 3)), num_classes=2, positive_class=1)


def _nan(v):
    return isinstance(v, float) and math.isnan(v)


@pytest.mark.parametrize("y, pred", [([0, 0, 0], [0, 0, 0]), ([0, 0, 0], [0, 1, 0]), ([1, 1, 0], [0, 0, 0]),
                                     ([1, 1], [1, 0]), ([0, 1, 1, 0], [0, 1, 0, 0])])
def test_binary_undefined_values_are_nan_as_sklearn(y, pred):
    """0/0 is NaN, not 0: the values equal scikit-learn's with zero_division=np.nan."""
    m = classification_metrics(y, pred, num_classes=2, positive_class=1)
    nan = dict(zero_division=np.nan)
    expected = {"f1": skm.f1_score(y, pred, pos_label=1, **nan), "precision": skm.precision_score(y, pred, **nan),
                "sensitivity": skm.recall_score(y, pred, pos_label=1, **nan),
                "specificity": skm.recall_score(y, pred, pos_label=0, **nan)}
    for k, v in expected.items():
        assert (_nan(m[k]) and math.isnan(v)) or m[k] == v, (k, m[k], v)


def test_binary_positive_class_absent():
    m = classification_metrics([0, 0, 0], [0, 0, 0], num_classes=2, positive_class=1)
    assert all(_nan(m[k]) for k in ("sensitivity", "precision", "f1")) and m["specificity"] == 1.0
    m = classification_metrics([0, 0, 0], [0, 1, 0], num_classes=2, positive_class=1)
    assert _nan(m["sensitivity"]) and m["precision"] == 0.0 and m["f1"] == 0.0  # a false positive is defined
    m = classification_metrics([1, 1, 0], [0, 0, 0], num_classes=2, positive_class=1)
    assert _nan(m["precision"]) and m["sensitivity"] == 0.0 and m["f1"] == 0.0  # nothing predicted positive
    m = classification_metrics([1, 1], [1, 0], num_classes=2, positive_class=1)
    assert _nan(m["specificity"])  # no negatives


def test_multiclass_macro_averages_over_present_classes():
    y = np.array([0, 1, 0, 1, 0, 1])
    m = classification_metrics(y, y, num_classes=3)  # class 2 absent, perfect predictions
    assert all(m[k] == 1.0 for k in ("f1", "sensitivity", "precision", "specificity", "accuracy"))
    pred = np.array([0, 1, 2, 1, 0, 0])  # class 2 absent from y_true but predicted once
    m = classification_metrics(y, pred, num_classes=3)
    per = {k: f(y, pred, labels=[0, 1], average=None, zero_division=np.nan)
           for k, f in (("f1", skm.f1_score), ("sensitivity", skm.recall_score), ("precision", skm.precision_score))}
    for k, v in per.items():
        assert m[k] == pytest.approx(np.mean(v)), k
    cm = skm.confusion_matrix(y, pred, labels=[0, 1, 2])
    spec = [(cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]) / (cm.sum() - cm[c].sum()) for c in (0, 1)]
    assert m["specificity"] == pytest.approx(np.mean(spec))
    y3, p3 = np.array([0, 1, 2, 0, 1, 2]), np.array([0, 0, 0, 0, 1, 1])  # class 2 never predicted: precision undefined
    m = classification_metrics(y3, p3, num_classes=3)
    assert m["precision"] == pytest.approx(np.mean([0.5, 0.5])) and m["sensitivity"] == pytest.approx(0.5)
    m = classification_metrics([2, 2], [2, 1], num_classes=3)  # only one class: no negatives for it
    assert _nan(m["specificity"]) and m["sensitivity"] == 0.5
    # every negative of class 0 predicted as 0: its specificity is 0 of 2 (0), not undefined, so it counts
    m = classification_metrics([0, 1, 2], [0, 0, 0], num_classes=3)
    assert m["specificity"] == pytest.approx(np.mean([0.0, 1.0, 1.0]))


# ---------------------------------------------------------------------------------------------------------------------
# randomized parity with scikit-learn, input validation, single-logit probabilities


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_binary_random_parity_with_sklearn(seed):
    """Small random sets with tied scores and 0/0 cases, both positive classes."""
    rng = np.random.default_rng(seed)
    nan = dict(zero_division=np.nan)
    for _ in range(40):
        n, pos = int(rng.integers(1, 10)), int(rng.integers(0, 2))
        y, pred = rng.integers(0, 2, n), rng.integers(0, 2, n)
        p1 = rng.integers(0, 4, n) / 3  # few distinct values: ties in the ROC / PR curves
        probs = np.stack([1 - p1, p1], 1)
        m = classification_metrics(y, pred, probs, num_classes=2, positive_class=pos)
        exp = {"accuracy": skm.accuracy_score(y, pred), "f1": skm.f1_score(y, pred, pos_label=pos, **nan),
               "sensitivity": skm.recall_score(y, pred, pos_label=pos, **nan),
               "specificity": skm.recall_score(y, pred, pos_label=1 - pos, **nan),
               "precision": skm.precision_score(y, pred, pos_label=pos, **nan), "auc": math.nan, "map": math.nan}
        if len(set(y)) == 2:
            exp["auc"] = skm.roc_auc_score(y == pos, probs[:, pos])
            exp["map"] = np.mean([skm.average_precision_score(y == c, probs[:, c]) for c in (0, 1)])
        for k, v in exp.items():
            assert _same(m[k], float(v)), (k, y, pred, pos, m[k], v)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_random_parity_with_sklearn(seed):
    """Macro averages equal scikit-learn's over the classes present in y_true (labels=present)."""
    rng = np.random.default_rng(seed)
    for _ in range(30):
        n, k = int(rng.integers(2, 12)), int(rng.integers(3, 5))
        y, pred = rng.integers(0, k, n), rng.integers(0, k, n)
        probs = torch.softmax(torch.tensor(rng.integers(0, 3, (n, k)).astype(float)), 1).numpy()  # tied scores
        m = classification_metrics(y, pred, probs, num_classes=k)
        present = sorted(set(y.tolist()))
        kw = dict(labels=present, average="macro", zero_division=np.nan)
        exp = {"f1": skm.f1_score(y, pred, **kw), "sensitivity": skm.recall_score(y, pred, **kw),
               "precision": skm.precision_score(y, pred, **kw), "auc": math.nan, "map": math.nan}
        if len(present) >= 2:
            onehot = np.eye(k)[y]
            exp["auc"] = np.mean([skm.roc_auc_score(onehot[:, c], probs[:, c]) for c in present])
            exp["map"] = np.mean([skm.average_precision_score(onehot[:, c], probs[:, c]) for c in present])
            if len(present) == k:
                assert exp["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
        for key, v in exp.items():
            assert _same(m[key], float(v)), (key, y, pred, m[key], v)


@pytest.mark.parametrize("kwargs, match", [
    # out-of-range labels used to be dropped by the confusion matrix (or wrapped by one-hot: -1 -> last class)
    (dict(y_true=[0, -1, 2], y_pred=[0, 1, 2], num_classes=3), r"expected y_true in \[0, 3\), got values in \[-1, 2\]"),
    (dict(y_true=[0, 1, 2], y_pred=[0, 5, 2], num_classes=3), r"expected y_pred in \[0, 3\), got values in \[0, 5\]"),
    (dict(y_true=[0, 2, 1], y_pred=[0, 1, 1], num_classes=2, positive_class=1), r"expected y_true in \[0, 2\)"),
    (dict(y_true=[0.0, 0.7], y_pred=[0, 1], num_classes=2, positive_class=1),
     "expected y_true to hold integer class labels, got dtype float64"),
    # inf equals its own rounding: only the finiteness check names it (mutation testing of metrics: without it,
    # inf was cast to int64 and refused as a label of -9223372036854775808)
    (dict(y_true=[0.0, math.inf], y_pred=[0, 1], num_classes=2, positive_class=1),
     "expected y_true to hold integer class labels, got dtype float64"),
    (dict(y_true=[0, 1], y_pred=[0, 1], probs=np.array([[np.nan, np.nan], [0.2, 0.8]]), num_classes=2,
          positive_class=1), r"probs holds 1 row\(s\) with NaN/Inf"),
    # logits as probs ranked the samples otherwise: AUC 0.61 instead of 0.44 on 40 random two-logit outputs
    (dict(y_true=[0, 1], y_pred=[1, 1], probs=np.array([[-0.3, 1.2], [0.5, 0.6]]), num_classes=2, positive_class=1),
     r"expected probs to hold class probabilities \(rows in \[0, 1\] summing to 1\), got 2 row\(s\) that do not; "
     r"for logits pass robust_ops.metrics.probabilities\(logits\)"),
    (dict(y_true=[0, 1, 2], y_pred=[0, 1, 2], probs=np.eye(3) * 0.9, num_classes=3),
     r"expected probs .* got 3 row\(s\)"),
    # rows in [0, 1] is checked apart from the sum: a negative entry with the row summing to 1 is no probability
    (dict(y_true=[0, 1], y_pred=[0, 1], probs=np.array([[-0.2, 0.6, 0.6], [0.1, 0.8, 0.1]]), num_classes=3),
     r"expected probs .* got 1 row\(s\)"),
    # and an entry above 1 within the sum's tolerance (mutation testing of metrics: dropping the > 1 check survived)
    (dict(y_true=[0, 1], y_pred=[0, 1], probs=np.array([[1.00005, 0.0], [0.2, 0.8]]), num_classes=2,
          positive_class=1), r"expected probs .* got 1 row\(s\)"),
    (dict(y_true=[[0], [1]], y_pred=[[0], [1]], num_classes=2, positive_class=1),
     r"expected y_true and y_pred of the same shape \[N\], got \(2, 1\) and \(2, 1\)"),
    (dict(y_true=[0, 0], y_pred=[0, 0], num_classes=1), "expected num_classes to be an integer >= 2, got 1"),
    (dict(y_true=[], y_pred=[], num_classes=2), "binary tasks need positive_class 0 or 1, got None"),
    (dict(y_true=[0, 1], y_pred=[0, 1], num_classes=2, positive_class=True),
     "binary tasks need positive_class 0 or 1, got True"),
    (dict(y_true=[0, 1], y_pred=[0, 1], num_classes=2, positive_class=1.0),
     r"binary tasks need positive_class 0 or 1, got 1\.0"),
    (dict(y_true=[0, 1, 2], y_pred=[0, 1, 2], num_classes=3, positive_class=2),
     r"positive_class is only for binary tasks \(num_classes=3 uses macro averages\), got 2"),
])
def test_classification_metrics_rejects_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match="classification_metrics: " + match):
        classification_metrics(**kwargs)


def test_integer_valued_float_and_tensor_labels_are_accepted():
    m = classification_metrics(torch.tensor([0.0, 1.0, 1.0]), np.array([0, 1, 0]), num_classes=2, positive_class=1)
    assert m["sensitivity"] == 0.5 and m["accuracy"] == pytest.approx(2 / 3)


def test_bool_labels_are_class_zero_and_one():
    # y == positive_class comes out bool (mutation testing of metrics: refusing bool labels survived)
    m = classification_metrics(np.array([False, True, True]), torch.tensor([False, True, False]), num_classes=2,
                               positive_class=1)
    assert m == classification_metrics([0, 1, 1], [0, 1, 0], num_classes=2, positive_class=1)


def test_single_logit_probabilities_keep_class_zero_resolution():
    """1 - sigmoid(z) rounds to 0 for z > ~17 in float32: confident predictions tied in class 0's column, so the AUC
    of positive_class=0 (BreastMNIST's malignant) differed from the AUC of the logits themselves."""
    z = torch.tensor([18.0, 20.0, 25.0, 30.0, -3.0])
    y = np.array([0, 1, 0, 1, 0])
    p = probabilities(z)
    assert torch.equal(p, probabilities(z[:, None])) and p.shape == (5, 2)
    two = torch.stack([torch.zeros(5), z], 1).double()
    torch.testing.assert_close(p, torch.softmax(two, 1))  # [0, z] two-logit model
    assert len(set(p[:, 0].tolist())) == 5  # no ties
    m = classification_metrics(y, (z > 0).long(), p, num_classes=2, positive_class=0)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y == 0, -z.numpy()))


def test_probabilities_rejects_bad_shapes_and_keeps_float64():
    with pytest.raises(ValueError, match=r"probabilities: expected out to be \[N, K\] logits or \[N\] / \[N, 1\] "
                                         r"single logits, got 3-D"):
        probabilities(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="probabilities: .* got 0-D"):
        probabilities(torch.tensor(1.0))
    assert probabilities(torch.zeros(2, 3, dtype=torch.float64)).dtype == torch.float64
    assert probabilities(torch.zeros(2, 3, dtype=torch.float16)).dtype == torch.float64


@pytest.mark.parametrize("single", [True, False], ids=["single-logit", "two-logits"])
@pytest.mark.parametrize("positive", [0, 1])
def test_confident_predictions_of_the_positive_class_stay_ranked(single, positive):
    """In float32 the predicted class's probability rounds to 1.0 past a logit margin of ~17: confident predictions
    of the positive class tied in its column, and AUC and mAP were not those of the model's scores (0.667 here
    instead of 0.833; sigmoid(-z) only kept confident class-1 predictions apart in class 0's column)."""
    margin = torch.tensor([18.0, 20.0, 25.0, 30.0, -3.0])  # z_positive - z_other, float32 logits
    y = np.where(np.array([0, 1, 0, 1, 0]) == 1, positive, 1 - positive)  # the two most confident are positives
    z = margin if positive == 1 else -margin  # single logit z: class 1's
    out = z if single else torch.stack([torch.zeros(5), z], 1)
    p = probabilities(out)
    assert len(set(p[:, positive].tolist())) == 5  # no ties
    m = classification_metrics(y, predict(out), p, num_classes=2, positive_class=positive)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y == positive, margin.numpy())) == pytest.approx(5 / 6)
    aps = [skm.average_precision_score(y == c, margin.numpy() * (1 if c == positive else -1)) for c in (0, 1)]
    assert m["map"] == pytest.approx(np.mean(aps))


def test_confident_multiclass_predictions_stay_ranked():
    logits = torch.tensor([[30.0, 0, 0], [25.0, 0, 0], [20.0, 0, 0], [18.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]])
    y = np.array([1, 0, 2, 0, 1, 2])
    m = classification_metrics(y, logits.argmax(1), probabilities(logits), num_classes=3)
    scores = torch.log_softmax(logits.double(), 1).numpy()  # the same ranking, never saturated here
    assert m["auc"] == pytest.approx(np.mean([skm.roc_auc_score(y == c, scores[:, c]) for c in range(3)]))
    assert m["map"] == pytest.approx(np.mean([skm.average_precision_score(y == c, scores[:, c]) for c in range(3)]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, np.float16])
@pytest.mark.parametrize("num_classes", [2, 4])
def test_half_precision_probabilities_are_taken_as_they_are(dtype, num_classes):
    """Half of float16 softmax rows sum to 1 only within ~4e-4: they were refused as "not probabilities" (advising
    probabilities(logits)), and bfloat16 ones failed in numpy with "Got unsupported ScalarType BFloat16"."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % num_classes
    logits = torch.randn(40, num_classes, generator=g) * 3
    probs = torch.softmax(logits, 1).to(torch.float16 if dtype is np.float16 else dtype)
    scores = probs.float().numpy()  # the half-precision values the metrics must rank
    given = probs.numpy() if dtype is np.float16 else probs
    assert (np.abs(scores.astype(np.float64).sum(1) - 1) > 1e-4).any()  # the rows the old tolerance refused
    pred = scores.argmax(1)
    kwargs = dict(num_classes=num_classes, positive_class=0 if num_classes == 2 else None)
    m = classification_metrics(y, pred, given, **kwargs)
    if num_classes == 2:
        assert m["auc"] == pytest.approx(skm.roc_auc_score(y.numpy() == 0, scores[:, 0]))
    else:
        want = np.mean([skm.roc_auc_score(y.numpy() == c, scores[:, c]) for c in range(num_classes)])
        assert m["auc"] == pytest.approx(want)  # sklearn's multi_class="ovr" refuses half-precision rows
    with pytest.raises(ValueError, match=r"expected probs to hold class probabilities"):  # logits still refused
        classification_metrics(y, pred, logits.to(probs.dtype) if torch.is_tensor(given) else logits.half().numpy(),
                               **kwargs)


def test_single_logit_class_zero_column_stays_ranked_past_float64_saturation():
    # 1 - sigmoid(z) is 0 in float64 from z ~ 37: confident class-1 predictions tied in class 0's column (BreastMNIST's
    # positive class); sigmoid(-z) keeps them apart
    z = torch.tensor([38.0, 40.0, 45.0, 50.0, -3.0])
    y = np.array([0, 1, 0, 1, 0])
    p = probabilities(z)
    assert len(set(p[:, 0].tolist())) == 5
    m = classification_metrics(y, (z > 0).long(), p, num_classes=2, positive_class=0)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y == 0, -z.numpy()))


def test_multiclass_auc_and_map_are_nan_with_one_class_present():
    # module docstring: AUC and mAP are undefined with one class present (its AP alone would read as a perfect 1.0)
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    m = classification_metrics([0, 0, 0], [0, 1, 0], probs, num_classes=3)
    assert math.isnan(m["auc"]) and math.isnan(m["map"]) and m["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("kind", ["single-logit", "two-logits", "three-classes"])
@pytest.mark.parametrize("positive", [0, 1])
def test_logits_rank_predictions_whose_probabilities_round_to_one(kind, positive):
    """Past a logit margin of ~37 the predicted class's float64 probability is 1.0: the positives at margins 50 and
    60 tied with the negatives at 40 and 45, so AUC from probabilities was 0.667 where the model ranks them
    perfectly. ``logits=`` ranks on each class's log-odds against the others, which keep them apart."""
    margin = torch.tensor([50.0, 60.0, 40.0, 45.0, -3.0])  # the class's logit minus the others'
    y = np.where(np.array([1, 1, 0, 0, 0]) == 1, positive, 1 - positive)  # the two most confident are positives
    if kind == "single-logit":
        out = margin if positive == 1 else -margin
    elif kind == "two-logits":
        out = torch.zeros(5, 2).index_put_((torch.arange(5), torch.tensor(positive)), margin)
    else:  # the positive class's log-odds against two others at 0 is its logit minus log(2): the same order
        out = torch.zeros(5, 3).index_put_((torch.arange(5), torch.tensor(positive)), margin)
    k = 3 if kind == "three-classes" else 2
    assert len(set(probabilities(out)[:3, positive].tolist())) < 3  # the ties probabilities would give
    kwargs = dict(num_classes=k, positive_class=positive if k == 2 else None)
    m = classification_metrics(y, predict(out), logits=out, **kwargs)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y == positive, margin.numpy())) == 1.0
    if k == 2:
        aps = [skm.average_precision_score(y == c, margin.numpy() * (1 if c == positive else -1)) for c in (0, 1)]
        assert m["map"] == pytest.approx(np.mean(aps))
    assert classification_metrics(y, predict(out), probabilities(out), **kwargs)["auc"] < 1.0  # the old result
    # the other metrics do not depend on the scores
    assert {key: v for key, v in m.items() if key not in ("auc", "map")} == pytest.approx(
        {key: v for key, v in classification_metrics(y, predict(out), **kwargs).items() if key not in ("auc", "map")},
        nan_ok=True)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [2, 4])
def test_logits_give_the_probabilities_auc_and_map_where_they_do_not_saturate(seed, k):
    """Log-odds are a strictly increasing function of each class's probability: the same ranks, and with two
    classes the same ties (with more, rounding in another summation order can split an exact tie either way)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(30) % k
    # two classes: few distinct values, so ties
    logits = torch.randint(-2, 3, (30, k), generator=g).float() if k == 2 else torch.randn(30, k, generator=g) * 3
    pred = logits.argmax(1)
    kwargs = dict(num_classes=k, positive_class=1 if k == 2 else None)
    want = classification_metrics(y, pred, probabilities(logits), **kwargs)
    assert classification_metrics(y, pred, logits=logits, **kwargs) == pytest.approx(want)


def test_logits_with_minus_infinity_rank_last_and_bad_logits_are_refused():
    # a -inf logit is a probability of 0 (a masked class): ranked below every finite score, not refused
    y, out = np.array([0, 1, 0, 1]), torch.tensor([[0.0, -math.inf], [0.0, 1.0], [2.0, 0.0], [-math.inf, 0.0]])
    m = classification_metrics(y, out.argmax(1), logits=out, num_classes=2, positive_class=1)
    assert m["auc"] == 1.0 == skm.roc_auc_score(y, probabilities(out)[:, 1].numpy())
    with pytest.raises(ValueError, match="classification_metrics: give probs or logits, not both"):
        classification_metrics(y, y, probabilities(out), logits=out, num_classes=2, positive_class=1)
    with pytest.raises(ValueError, match=r"classification_metrics: expected logits of shape \[4, 3\] \(floating "
                                         r"point\), got \(4, 2\) "):
        classification_metrics(y, y, logits=out, num_classes=3)
    with pytest.raises(ValueError, match=r"expected logits of shape \[4, 2\] or \[N\] single logits \(floating "
                                         r"point\), got \(4,\) torch.int64"):
        classification_metrics(y, y, logits=torch.tensor([0, 1, 0, 1]), num_classes=2, positive_class=1)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=r"logits holds 1 row\(s\) with NaN, \+Inf or only -Inf"):
            classification_metrics(y, y, logits=out.index_put((torch.tensor(1), torch.tensor(1)), torch.tensor(bad)),
                                   num_classes=2, positive_class=1)


def test_log_odds_of_a_row_with_two_minus_infinity_logits():
    """A class whose logit is -inf has log-odds -inf, also where another class is -inf too (-inf - -inf is NaN, and
    np.unique ranked that NaN above every score: AUC 0.667 here, not 1). Mutation testing of metrics: dropping the
    -inf case of class_log_odds survived."""
    from robust_ops.metrics import class_log_odds

    inf = math.inf
    logits = torch.tensor([[0.0, 2.0, 0.0], [5.0, -inf, -inf], [0.0, 0.0, 3.0]])
    assert class_log_odds(logits)[1].tolist() == [inf, -inf, -inf]
    m = classification_metrics(np.array([1, 0, 2]), logits.argmax(1), logits=logits, num_classes=3)
    assert m["auc"] == 1.0 and m["map"] == 1.0


def test_log_odds_keep_apart_a_class_that_nearly_ties_with_another():
    """z_c - logsumexp(others) cancels where the class ties with another: 60 - (60 + 4e-18) is 0 in float64, so rows
    [60, 60, 20] and [60, 60, 21] tied in class 0's column (as their probabilities, 0.5, do) though the model ranks
    the first higher; -log1p(exp(-40)) and -log1p(exp(-39)) keep them apart, in either order of the other logits."""
    from robust_ops.metrics import class_log_odds

    logits = torch.tensor([[60.0, 60.0, 20.0], [60.0, 60.0, 21.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    got = class_log_odds(logits)
    assert got[0, 0] == -math.log1p(math.exp(-40.0)) and got[1, 0] == -math.log1p(math.exp(-39.0))
    assert torch.equal(class_log_odds(logits[:, [0, 2, 1]])[:, 0], got[:, 0])  # the others' order does not matter
    y = np.array([0, 1, 1, 2])
    m = classification_metrics(y, logits.argmax(1), logits=logits, num_classes=3)
    scores = got.numpy()
    assert m["auc"] == pytest.approx(np.mean([skm.roc_auc_score(y == c, scores[:, c]) for c in range(3)]))
    auc0 = skm.roc_auc_score(y == 0, scores[:, 0])
    assert auc0 == 1.0 and skm.roc_auc_score(y == 0, probabilities(logits)[:, 0].numpy()) < 1.0


@pytest.mark.parametrize("kwargs, fix", [
    (dict(y_pred=P1), r"; probabilities or scores\? pass the predicted classes \(probs\.argmax\(1\)\) here and the "
                      r"scores as probs= or logits="),
    (dict(y_pred=torch.tensor(np.stack([1 - P1, P1], 1))), r"; one-hot or probability rows\? take their \.argmax\(1\)"),
    (dict(y_true=np.where(Y == 1, "malignant", "benign")), r"; class names\? map each name to its index, 0 to K-1")])
def test_labels_that_are_scores_or_names_are_told_the_fix(kwargs, fix):
    """classification_metrics refused a y_pred of probabilities (probs[:, 1], or the rows) or a y_true of class names
    as "expected y_pred to hold integer class labels, got dtype float64 with non-integer values", naming no fix: it
    says what to pass (the rows' argmax(1) from the label rule's label_dtype_fix; a score vector's classes, the
    scores going to probs= / logits=; names mapped to indices)."""
    args = dict(y_true=Y, y_pred=PRED, num_classes=2, positive_class=1) | kwargs
    which = "y_pred" if "y_pred" in kwargs else "y_true"
    with pytest.raises(ValueError, match=rf"^classification_metrics: expected {which} to hold integer class labels, "
                                         rf"got dtype \S+ with non-integer values{fix}$"):
        classification_metrics(**args)

@pytest.mark.parametrize("kwargs, fix", [
    (dict(y_true=Y[:, None]), r"got \(12, 1\) and \(12,\); y_true of shape \[N, 1\]\? pass its \.reshape\(-1\)"),
    (dict(y_pred=np.eye(2, dtype=int)[PRED]), r"got \(12,\) and \(12, 2\); one-hot y_pred rows\? pass their "
                                               r"\.argmax\(1\)")])
def test_labels_of_shape_n_by_k_are_told_the_fix(kwargs, fix):
    """MedMNIST's [N, 1] labels or one-hot rows given as y_true / y_pred were "expected y_true and y_pred of the same
    shape [N], got (12, 1) and (12,)" alone: the error names the reshape or the argmax(1)."""
    args = dict(y_true=Y, y_pred=PRED, num_classes=2, positive_class=1) | kwargs
    with pytest.raises(ValueError, match=rf"^classification_metrics: expected y_true and y_pred of the same shape "
                                         rf"\[N\], {fix}$"):
        classification_metrics(**args)

def test_confusion_counts_match_sklearn_with_every_class_listed():
    # rows: true class, columns: predicted; a class absent from both (3 here) keeps its row and column of zeros
    y, pred = np.array([0, 1, 2, 2, 4, 4, 1]), np.array([0, 2, 2, 1, 4, 0, 1])
    assert confusion_counts(y, pred, num_classes=5) == skm.confusion_matrix(y, pred, labels=range(5)).tolist()
    assert confusion_counts(torch.tensor([1]), torch.tensor([0]), num_classes=2) == [[0, 0], [1, 0]]
    assert confusion_counts([], [], num_classes=3) == [[0] * 3] * 3
    with pytest.raises(ValueError, match=r"expected y_pred in \[0, 3\), got values in \[0, 3\]"):
        confusion_counts([0, 1], [0, 3], num_classes=3)


@pytest.mark.parametrize("y_true, y_pred, shapes", [
    ([0, 1, 1, 0], [1], r"\(4,\) and \(1,\)"),
    ([0, 1], [[1, 0], [0, 1]], r"\(2,\) and \(2, 2\); one-hot y_pred rows\? pass their \.argmax\(1\)")])
def test_confusion_counts_refuses_labels_of_two_shapes(y_true, y_pred, shapes):
    """confusion_counts broadcast a y_pred of one label against every y_true ([[0, 2], [0, 2]]: four predictions of
    class 1) and met numpy's "object too deep for desired array" for one-hot rows; it checks the shapes as
    classification_metrics does, and its errors name confusion_counts (they named classification_metrics)."""
    with pytest.raises(ValueError, match=rf"^confusion_counts: expected y_true and y_pred of the same shape \[N\], "
                                         rf"got {shapes}$"):
        confusion_counts(y_true, y_pred, num_classes=2)
    with pytest.raises(ValueError, match=r"^confusion_counts: expected y_pred in \[0, 2\)"):
        confusion_counts([0, 1], [0, 2], num_classes=2)
