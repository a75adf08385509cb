"""ARFL (Adversarially Robust Feature Learning): a feature-label correlation regularizer on the last convolutional
feature map, combined with adversarial data at ratio r (binary tasks only).

L_robust(x, y) = -(1/HW) * sum_ij sigmoid(|f_ij(x) * y|), y in {-1, +1}           (ARFL eq. 1)
L_overall(x, y) = L_cls(x, y) + lam * L_robust(x, y)                              (eq. 2)
L = r * L_overall(x, y) + (1 - r) * (L_cls(x_adv, y) + s * lam * L_robust(x_adv, y))   (eq. 5)

s = +1 by default: the text says robust features are encouraged on both standard and adversarial data, while eq. 5 as
printed subtracts lam * L_robust on adversarial data (s = -1, ``adv_sign="printed"``). Since |f * y| = |f| for
y = +-1, the label only fixes the sign convention; the term rewards large feature magnitudes.

Feature map: the output of the last nn.Conv1d/2d/3d (a forward hook); models without them (the two-moons MLP) use
the input of the last nn.Linear, i.e. the penultimate layer's features as in ARFL's synthetic experiment; or name a
module with ``layer`` (its output). Channels: ``channel_reduction="mean"`` (default) treats every channel's map as a
feature map and averages the per-position terms over channels and positions, -(1/CHW) sum_cij sigmoid(|f_cij y|);
``"sum"`` first sums the channels (f_ij = sum_c f_cij, as MIRST-DM's residual maps), then applies eq. 1. [N, D]
features count as a 1 x D map, [N] features as a 1 x 1 map.
"""

import math
from fractions import Fraction

import torch
from torch import nn

from ..attacks.context import classification_loss, labels_range, num_classes_of
from ._common import (PGDDefense, check_choice, float32_or_wider, labels, metric_values, per_sample_ce, real_option,
                      refuse_unused, unwrap)
from .base import DefenseOutput


def robust_feature_loss(features, y, channel_reduction="mean"):
    """Per-sample L_robust (ARFL eq. 1) for features [N, C, H, W], [N, C, L], [N, D] or [N] (one feature; more
    spatial dimensions also count as the map) and labels y in {0, 1}. ``channel_reduction``: "mean" (default)
    averages the loss over every channel's map, "sum" sums the channels into one map first."""
    return _robust_feature_loss(features, y, channel_reduction, labels_checked=False)


def _robust_feature_loss(features, y, channel_reduction, labels_checked):
    """robust_feature_loss; ``labels_checked``: y is known to hold 0/1 only (ARFL checked its labels), so the check's
    host read (a GPU sync per call: per attack step under attack_objective="adv_term") is skipped."""
    # "Sum" read as "mean" without a word
    check_choice("robust_feature_loss", "channel_reduction", channel_reduction, ("mean", "sum"))
    f = float32_or_wider(features)  # half precision upcast, float64 kept
    y = y.reshape(-1)
    if f.dim() == 0 or f.shape[0] != y.shape[0]:
        raise ValueError(f"robust_feature_loss: expected features with one row per sample ({y.shape[0]}), got shape "
                         f"{tuple(f.shape)}")
    # eq. 1's own -1/+1 labels (or 2, 0.5) gave 2y - 1 = -3 and a sigmoid of 3|f| without a word
    if not labels_checked and y.numel() and not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"robust_feature_loss: expected labels 0/1 (mapped to eq. 1's -1/+1 here), got values in "
                         f"[{float(y.min()):g}, {float(y.max()):g}]")
    sign = (2 * y - 1).to(f.dtype)
    if f.dim() == 1:  # a layer= module with one value per sample: a 1 x 1 map (the sign was broadcast across samples)
        f = f[:, None]
    if f.dim() == 2:
        f = f[:, None, None, :]
    elif f.dim() == 3:
        f = f[:, :, None, :]
    if channel_reduction == "sum":
        f = f.sum(1, keepdim=True)
    corr = torch.sigmoid((f * sign.view(-1, *[1] * (f.dim() - 1))).abs())
    return -corr.flatten(1).mean(1)


class _AdversarialTerm(nn.Module):
    """Eq. 5's adversarial term per sample, L_cls(x') + s * lam * L_robust(x') [N], the objective attack_objective=
    "adv_term" ascends (PGDDefense.ascend)."""

    def __init__(self, defense, model, y, sign):
        super().__init__()
        self.defense, self.model, self.y, self.sign = defense, model, y, sign

    def forward(self, x_adv):
        logits, feats = self.defense._forward_with_features(self.model, x_adv)
        robust = _robust_feature_loss(feats, self.y, self.defense.channel_reduction, labels_checked=True)
        return float32_or_wider(per_sample_ce(logits, self.y)) + self.sign * self.defense.lam * robust


class ARFL(PGDDefense):
    """Args: lam (10, the mammography setting; the paper uses 0.5 on two-moons), r (0.5: the share of standard data;
    r = 1 standard training, r = 0 adversarial only), adv_sign ("text" or "printed", see the module docstring),
    channel_reduction ("mean" or "sum"), layer (None: automatic, or a module name), attack_objective ("cls": PGD on
    L_cls alone, the text's reading of eq. 5; "adv_term": PGD on the whole adversarial term of eq. 5,
    L_cls + s * lam * L_robust), ratio_as ("weights": eq. 5's expectation, r and 1 - r weigh every sample's
    standard and adversarial terms; "split": the first round(r * N) samples of each batch, r * N rounded half up,
    are standard data and the rest adversarial, the batch's loss their mean), plus the PGD settings
    (7-step Linf PGD, eps 0.01 as in ARFL's mammography experiments; two-moons: steps=1, eps=0.05, step_size=0.05,
    random_start=False is FGSM). adv_sign and attack_objective given with r = 1 or lam = 0, and ratio_as with r = 0 or
    r = 1, where they have no effect, are refused."""

    name = "arfl"
    binary_only = True
    default_eps = 0.01
    default_steps = 7

    # adv_sign and attack_objective default to None, resolved to "text" and "cls": None tells an option left unset from
    # one given where the adversarial term it shapes is absent (r = 1) or has no L_robust (lam = 0), which is refused;
    # ratio_as likewise ("weights"), refused where r = 0 or r = 1 makes the batch all one kind
    def __init__(self, lam=10.0, r=0.5, adv_sign=None, channel_reduction="mean", layer=None, attack_objective=None,
                 ratio_as=None, **attack):
        super().__init__(**attack)
        n = self.name
        self.lam = real_option(n, "lam", lam, minimum=0)
        self.r = real_option(n, "r", r, minimum=0, maximum=1)
        self.adv_sign = check_choice(n, "adv_sign", "text" if adv_sign is None else adv_sign, ("text", "printed"))
        self.channel_reduction = check_choice(n, "channel_reduction", channel_reduction, ("mean", "sum"))
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"{n}: expected layer to be None or a module name (str), got {type(layer).__name__}")
        if layer == "":  # named_modules()'s name of the model itself: L_robust read the logits as the feature map
            raise ValueError(f"{n}: expected layer to name a submodule (as in model.named_modules(), e.g. 'net.2'), "
                             "got '' (the model itself, whose output is the logits, not a feature map)")
        self.layer = layer
        self.attack_objective = check_choice(n, "attack_objective", "cls" if attack_objective is None
                                             else attack_objective, ("cls", "adv_term"))
        given = {"adv_sign": adv_sign, "attack_objective": attack_objective}
        if self.r == 1:
            refuse_unused(n, given, "r=1 (standard data only: no adversarial term)", "give r < 1")
        elif self.lam == 0:
            # adv_term's objective is then L_cls alone, the "cls" attack
            refuse_unused(n, given, "lam=0 (no L_robust term for them to sign or attack)", "give lam > 0")
        # eq. 4's r as loss weights (the expectation) or as the share of each batch's samples left clean
        self.ratio_as = check_choice(n, "ratio_as", "weights" if ratio_as is None else ratio_as, ("weights", "split"))
        if self.r in (0, 1):
            kind = "standard" if self.r else "adversarial"
            refuse_unused(n, {"ratio_as": ratio_as}, f"r={self.r:g} (every sample is {kind} data either way)",
                          "give 0 < r < 1")

    def options(self):
        options = super().options()
        if options["attack_objective"] == "cls":  # as checkpoints written before the option existed record it: absent
            del options["attack_objective"]
        if options["ratio_as"] == "weights":  # likewise
            del options["ratio_as"]
        return options

    def feature_module(self, model):
        """(module, "output" | "input"): where the feature map of ``model`` is read: the module named ``layer``'s
        output, else the last convolution's output, else the last Linear's input."""
        if self.layer is not None:
            modules = dict(model.named_modules())
            if self.layer not in modules:
                raise ValueError(f"{self.name}: no module named {self.layer!r} in the model")
            return modules[self.layer], "output"
        # every dimensionality: a Conv1d / Conv3d model read the last Linear's input, as if it had no convolution
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if convs:
            return convs[-1], "output"
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if linears:
            return linears[-1], "input"
        raise ValueError(f"{self.name}: the model has no nn.Conv1d/2d/3d or nn.Linear layer to read features from; "
                         "name one with layer=")

    def _forward_with_features(self, model, x):
        module, where = self.feature_module(unwrap(model))
        captured = []
        if where == "output":
            # a copy: an in-place op after the layer (VGG16's Conv2d -> ReLU(inplace=True)) overwrote the captured
            # output, so L_robust read the post-ReLU map instead of the layer's own
            handle = module.register_forward_hook(
                lambda m, i, o: captured.append(o.clone() if torch.is_tensor(o) else o))
        else:
            handle = module.register_forward_pre_hook(lambda m, i: captured.append(i[0]))
        try:
            logits = model(x)
        finally:
            handle.remove()
        if not captured:  # a layer the forward skips (an unused head): say which, and how it was picked
            name = next(n for n, m in unwrap(model).named_modules() if m is module)
            how = "" if self.layer is not None else ", the default: the last convolution, else the last Linear"
            raise RuntimeError(f"{self.name}: the model's forward did not call the feature layer {name!r} "
                               f"({type(module).__name__}{how}); name a layer it calls with layer=")
        return logits, captured[-1]

    def _check_binary(self, y, logits=None):
        """Labels 0/1 (logits None: the call's first check, before an attack would fail on them) or a two-class
        output (logits given: the labels, the same, passed the first check)."""
        k = 2 if logits is None else num_classes_of(logits)
        # -1/+1 labels (eq. 1's y) included: BCE took -1 as a target and 2y - 1 = -3 without a word. Before the
        # label rule (`labels`), whose "non-negative" would not say why. Both ends in one host read (a GPU sync).
        low, top = 0, 1
        if logits is None and torch.is_tensor(y) and y.numel():
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                low, top = (int(v) for v in torch.stack([y.min(), y.max()]).tolist())
            else:  # labels_range's read: fit's check read it already, and the label rule next takes it
                low, top = labels_range(y)
        if k != 2 or top > 1 or low < 0:
            got = f"{k} classes" if k != 2 else f"labels in [{low}, {top}]"
            raise ValueError(f"{self.name}: defined for binary tasks only (labels 0/1, mapped to -1/+1), got {got}")

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        self._check_binary(y)
        y = labels(self.name, x, y)
        sign = 1.0 if self.adv_sign == "text" else -1.0
        if self.ratio_as == "split":
            return self._split_batch(model, x, y, sign)
        x_adv = None
        if self.r < 1:
            # before the clean training forward, as SAT: that forward moves BatchNorm's running statistics, which an
            # eval-mode attack reads, so with lam = 0 the dual AT + ARFL run trained another model than SAT's
            x_adv = self._adversarial(model, x, y, sign)
        logits = None
        loss, metrics = 0.0, {}
        if self.r > 0:
            logits, feats = self._forward_with_features(model, x)
            self._check_binary(y, logits)
            clean = classification_loss(logits, y)
            robust = _robust_feature_loss(feats, y, self.channel_reduction, labels_checked=True).mean()
            metrics.update(loss_clean=clean, loss_robust=robust)
            loss = self.r * (clean + self.lam * robust)
        if self.r < 1:
            # r = 0 (adversarial data only) runs no clean forward: with weight 0 it still moved BatchNorm's running
            # statistics, so the model trained was not adversarial training + ARFL (as SAT at alpha = 1)
            logits_adv, feats_adv = self._forward_with_features(model, x_adv)
            if logits is None:
                self._check_binary(y, logits_adv)
            adv = classification_loss(logits_adv, y)
            robust_adv = _robust_feature_loss(feats_adv, y, self.channel_reduction, labels_checked=True).mean()
            loss = loss + (1 - self.r) * (adv + sign * self.lam * robust_adv)
            metrics.update(loss_adv=adv, loss_robust_adv=robust_adv)
        metrics["loss"] = loss
        return DefenseOutput(loss=loss, logits=logits, metrics=metric_values(**metrics))  # one host read for all

    def _adversarial(self, model, x, y, sign):
        if self.attack_objective == "cls":
            return self.attack(model, x, y).x_adv
        return self.ascend(_AdversarialTerm(self, unwrap(model), y, sign), x).x_adv

    def _split_batch(self, model, x, y, sign):
        """ratio_as="split": the batch's first k = round(r * N) samples (r * N rounded half up) as standard data, the
        other N - k attacked; one training forward of the mixed batch (as a batch of both kinds would run), the loss
        the mean of the samples' eq. 2 terms (standard) and eq. 5 adversarial terms. Clean logits for the whole batch
        exist only where k = N."""
        n = x.shape[0]
        # r as written (0.29, not the float just below it): 0.29 * 50 is 14.499999999999998 in floats, which took 14
        # where 14.5 rounded half up is 15
        k = min(n, math.floor(Fraction(repr(float(self.r))) * n + Fraction(1, 2)))
        parts = [x[:k]]
        if k < n:
            parts.append(self._adversarial(model, x[k:], y[k:], sign))  # before the training forward, as above
        logits, feats = self._forward_with_features(model, torch.cat(parts) if len(parts) > 1 else parts[0])
        self._check_binary(y, logits)
        cls = float32_or_wider(per_sample_ce(logits, y))
        robust = _robust_feature_loss(feats, y, self.channel_reduction, labels_checked=True)
        weight = torch.ones_like(robust)
        weight[k:] = sign
        loss = (cls + weight * self.lam * robust).sum() / n
        metrics, counts = {}, {}
        if k > 0:  # each a mean over its part of the batch: fit weighs it by that part's count
            metrics.update(loss_clean=cls[:k].mean(), loss_robust=robust[:k].mean())
            counts.update(loss_clean=k, loss_robust=k)
        if k < n:
            metrics.update(loss_adv=cls[k:].mean(), loss_robust_adv=robust[k:].mean())
            counts.update(loss_adv=n - k, loss_robust_adv=n - k)
        metrics["loss"] = loss
        return DefenseOutput(loss=loss, logits=logits if k == n else None, metrics=metric_values(**metrics),
                             metric_counts=counts)
