"""Stratified k-fold cross-validation (MIRST-DM and ARFL report 5-fold means) with scikit-learn's StratifiedKFold, or
StratifiedGroupKFold for data split by group (a CSV's lesion_id: every image of a lesion in one fold)."""

import dataclasses
import numbers

import numpy as np
import torch
from torch.utils.data import ConcatDataset, TensorDataset

from .._options import check_int, class_labels, counted
from .core import (DataError, DatasetSplits, _grouped_parts, _stratified_parts, check_rare_classes,
                   check_sklearn_seed, missing_classes_record, record_rare_classes)


def _tensors(dataset):
    if isinstance(dataset, TensorDataset):
        return dataset.tensors
    if isinstance(dataset, ConcatDataset):
        parts = [_tensors(d) for d in dataset.datasets]
        return tuple(torch.cat(t) for t in zip(*parts))
    raise DataError(f"cross_validation: expected TensorDatasets, got {type(dataset).__name__}")


def pooled(splits):
    """All samples of train, val and test as one (x, y) pair (k-fold protocols re-split the whole set)."""
    parts = [_tensors(d) for d in (splits.train, splits.val, splits.test) if len(d)]
    if not parts:  # torch.cat's "expected a non-empty list of Tensors"
        raise DataError("cross_validation: the splits hold no samples; nothing to fold")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def pooled_groups(splits, n):
    """The group keys of :func:`pooled`'s samples, in its order (None for data split by sample). Data that records a
    grouped split (``info.extra["split_by"]``) but carries no groups is refused: its folds would split groups."""
    split_by = splits.info.extra.get("split_by")
    if splits.groups is None:
        if split_by is not None:
            raise DataError(f"cross_validation: the data was split by {split_by!r} but carries no groups "
                            "(DatasetSplits.groups); pass the DatasetSplits load_dataset returned")
        return None
    groups = np.concatenate([np.asarray(g) for d, g in zip((splits.train, splits.val, splits.test), splits.groups)
                             if len(d)])
    if len(groups) != n:
        raise DataError(f"cross_validation: DatasetSplits.groups holds {len(groups)} group keys for {n} samples")
    return groups


def cross_validation(splits, k=5, seed=0, val_fraction=0.1, rare_classes="merge"):
    """k stratified folds over the pooled data: fold i tests on the i-th part, validates on a stratified
    ``val_fraction`` of the rest and trains on the remainder; the same ``seed`` (an integer from 0 to 2**32 - 1)
    gives the same folds. Data split by group (``splits.groups``: a CSV's lesion_id) is folded by group
    (StratifiedGroupKFold) and each fold's validation part drawn by group too: no group in two parts.
    ``rare_classes``: how the validation part treats classes too small to stratify, as in ``load_dataset``. Returns a
    list of DatasetSplits (same info)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if not isinstance(splits, DatasetSplits):  # its (train, val, test, info) tuple: "'tuple' object has no attribute"
        raise DataError(f"cross_validation: expected splits to be the DatasetSplits load_dataset returns, got "
                        f"{type(splits).__name__}")
    k = check_int("cross_validation", "k (the number of folds)", k, minimum=2, error=DataError)
    # None would draw other folds on every call (a fold could not be rebuilt to evaluate it); scikit-learn's own
    # refusal of a negative seed names neither the function nor the argument
    seed = check_sklearn_seed("cross_validation", seed)
    check_rare_classes("cross_validation", rare_classes)
    # a negative one would silently mean 0, 1 leaves no training data; a string or None failed in the comparison
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0 <= val_fraction < 1:
        raise DataError(f"cross_validation: expected 0 <= val_fraction < 1, got {val_fraction!r}")
    # scikit-learn refuses a numpy float32 train_size, which read as "too few samples for a 0.9/0.1 split"
    val_fraction = float(val_fraction)
    x, y = pooled(splits)
    try:  # MedMNIST's [N, 1] labels, which fit takes, were numpy's "object too deep for desired array"
        y = class_labels("cross_validation", y, len(x), what="the labels")
    except (TypeError, ValueError) as err:
        raise DataError(str(err)) from None
    groups = pooled_groups(splits, len(y))
    split_by = splits.info.extra.get("split_by", "group")
    if groups is None:
        counts, unit = np.bincount(y.numpy()), "sample"
    else:  # a class in fewer groups than folds leaves a fold's test part without it
        pairs = np.unique(np.stack([np.unique(groups, return_inverse=True)[1], y.numpy()], 1), axis=0)
        counts, unit = np.bincount(pairs[:, 1]), f"{split_by} group"
    if counts[counts > 0].min() < k:
        raise DataError(f"cross_validation: the smallest class has {counted(int(counts[counts > 0].min()), unit)}, "
                        f"fewer than k={k} folds")
    folds = []
    if groups is None:
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y.numpy())
    else:
        skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y.numpy(),
                                                                                       groups)
    for i, (train_idx, test_idx) in enumerate(skf):
        merged = ()
        if val_fraction > 0:
            source = f"{splits.info.source or splits.info.name} (fold {i})"
            if groups is None:
                (tr, va), merged = _stratified_parts(y[train_idx].numpy(), (1 - val_fraction, val_fraction), seed,
                                                     source, splits.info.class_names, rare_classes)
            else:
                (tr, va), merged = _grouped_parts(y[train_idx].numpy(), groups[train_idx],
                                                  (1 - val_fraction, val_fraction), seed, source,
                                                  splits.info.class_names, split_by, rare_classes)
            train_idx, val_idx = train_idx[tr], train_idx[va]
        else:
            val_idx = train_idx[:0]
        parts = (train_idx, val_idx, test_idx)
        folds.append(DatasetSplits(
            *(TensorDataset(x[p], y[p]) for p in parts), _fold_info(splits.info, y, parts, merged),
            None if groups is None else tuple(groups[p] for p in parts),
        ))
    return folds


def _fold_info(info, y, parts, merged):
    """The base info, but classes_missing_from_split describing this fold rather than the 7:1:2 split it came from
    (run.json records it), rare_classes recorded where this fold's validation part merged small classes, and a
    copy, so one fold's info cannot change another's."""
    extra = {k: v for k, v in info.extra.items() if k != "classes_missing_from_split"}
    record_rare_classes(extra, merged)
    names = [n for n, p in zip(("train", "val", "test"), parts) if len(p)]
    # an empty val (val_fraction=0) is deliberate
    missing = missing_classes_record(y.numpy(), [p for p in parts if len(p)], info.class_names, names)
    if missing:
        extra["classes_missing_from_split"] = missing
    return dataclasses.replace(info, extra=extra)
