r"""Increasing-Margin Adversarial (IMA) training: Ma & Liang, "Increasing-Margin Adversarial (IMA) Training to Improve
Adversarial Robustness of Neural Networks" (Algorithms 1-3). Semantics, choices and numbers: docs/ima.md.

* :func:`gen_adv` -- Algorithm 2 (GenAdv: normalized-gradient ascent inside each sample's margin ball, stop at the
  first misclassified iterate, then a boundary search between the last correct and the first wrong iterate) or
  Algorithm 3 (ascent for all K steps, then search between the clean x and the final iterate). Batched with
  active-set compaction: finished samples leave the working batch, so no forward or backward is spent on them.
  ``compact=False`` runs the same algorithm over the full batch with masks (the baseline the benchmark compares).
* :class:`MarginTable` -- the per-sample margins E(i) indexed by dataset id, updated per Algorithm 1, checkpointed,
  synchronised across ranks.
* :class:`IMA` -- the defense (Algorithm 1 for one mini-batch): loss ``(1 - beta) * L0 + beta * L1`` and the margin
  update.
* :func:`dice_criterion`, :func:`soft_dice_loss` -- the paper's segmentation extension (Dice > 0.6 counts as correct).
"""

import math
import numbers
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import _backend, functional
from ._meta import output_memory_format
from ._options import (allocated, check_device, check_flags, check_int, check_options, check_real, counted, listing,
                       refuse_unused, segmentation_masks)
from .attacks.context import (
    MODEL_MODES,
    InputGradScale,
    attack_context,
    autocast_dtype,
    check_gradients_possible,
    check_inputs,
    check_output,
    check_output_rows,
    is_one_sample_batch_norm,
    labels_range,
    predict_from_output,
)
from .attacks.core import (check_labels_against, check_linf_budget, check_norm, check_number, forward, per_sample,
                           sample_distance, scalar_value)
from .defenses._common import distributed_run, metric_values, per_sample_ce, unwrap
from .defenses.base import Defense, DefenseOutput, StateSettingError
from .prepacked_conv import prepacked_conv_active

__all__ = [
    "gen_adv",
    "gen_adv_masked",
    "batch_invariant_sizes",
    "probe_rows",
    "InvariantSizes",
    "GenAdvInfo",
    "PassCounter",
    "MarginTable",
    "IMA",
    "dice_criterion",
    "dice_score",
    "soft_dice_loss",
    "search_rounds",
    "sample_distance",
    "paper_eps_train",
]

ALGORITHMS = (2, 3)
SEARCH_RESULTS = ("correct_side", "midpoint")


# ---------------------------------------------------------------------------------------------------------------------
# Counting passes


@dataclass
class PassCounter:
    """Forward/backward passes spent by :func:`gen_adv`: ``*_calls`` counts batched model calls (sequential launches),
    ``*_rows`` counts the rows that went through them (the work, padding rows included). The constructor takes the
    four counts' starting values (forward_calls, forward_rows, backward_calls, backward_rows; default 0)."""

    forward_calls: int = 0
    forward_rows: int = 0
    backward_calls: int = 0
    backward_rows: int = 0

    def forward(self, rows):
        """Count one forward call of ``rows`` rows."""
        self.forward_calls += 1
        self.forward_rows += int(rows)

    def backward(self, rows):
        """Count one backward call of ``rows`` rows."""
        self.backward_calls += 1
        self.backward_rows += int(rows)

    def reset(self):
        """Every count back to 0."""
        self.forward_calls = self.forward_rows = self.backward_calls = self.backward_rows = 0

    def as_dict(self):
        """The four counts as a dict."""
        return dict(forward_calls=self.forward_calls, forward_rows=self.forward_rows,
                    backward_calls=self.backward_calls, backward_rows=self.backward_rows)


@dataclass
class GenAdvInfo:
    """Per-sample details of one :func:`gen_adv` call (``return_info=True``).

    clean_correct: bool [N], the criterion held at the clean x (samples where it did not are returned unchanged);
        True for margin-0 samples, whose x is not checked (they cost no forward pass).
    steps: int64 [N], ascent steps taken (Algorithm 2: the step that crossed, else K; 0 for margin-0 or wrong x).
    far_point: [N, ...] the far end of the final search bracket (a misclassified point for crossed samples; x_adv
        otherwise).
    gap: [N], the norm of ``far_point - x_adv`` (0 for samples that did not cross).
    counter: the :class:`PassCounter` that was updated.
    """

    clean_correct: torch.Tensor
    steps: torch.Tensor
    far_point: torch.Tensor
    gap: torch.Tensor
    counter: PassCounter = field(default_factory=PassCounter)


# ---------------------------------------------------------------------------------------------------------------------
# Criteria and losses


def _default_is_correct(out, y):
    return predict_from_output(out) == y


# What a segmentation user passes instead of each classification default (docs/ima.md, Segmentation).
_SEGMENTATION_CHOICE = {"is_correct": "is_correct=dice_criterion()",
                        "loss_fn": "loss_fn=soft_dice_loss (binary masks) or a per-sample loss of your own"}


def _check_default_output(name, out, n, arg):
    """The default ``is_correct`` / ``loss_fn`` read classifier outputs ([N, K] or single logits): a segmentation
    output there failed inside cross-entropy ("Target 1 is out of bounds") or named an option never passed."""
    try:
        check_output(name, out, n)
    except ValueError as err:
        raise ValueError(f"{err}; the default {arg} is for classifiers: for segmentation pass "
                         f"{_SEGMENTATION_CHOICE[arg]}") from None


def _check_default_labels(name, y):
    """The default criterion compares the argmax with one class label per sample: name the segmentation options
    when y looks like masks ([N, H, W] or [N, 1, H, W]) instead of only refusing its shape."""
    if segmentation_masks(y):
        raise ValueError(f"{name}: expected class labels y of shape [N] for the default is_correct (argmax == y), "
                         f"got {tuple(y.shape)}; for segmentation masks pass {_SEGMENTATION_CHOICE['is_correct']} "
                         f"and {_SEGMENTATION_CHOICE['loss_fn']}")


def _class_labels_expected(is_correct, loss_fn, y):
    """Whether y must be class labels [N] (made int64 by check_inputs): for the default criterion, and for the
    default loss (cross-entropy takes int64 targets only; an int32 y failed inside it with "expected target dtype to
    be Long") unless y is masks, whose classifier loss the output check names."""
    return is_correct is None or (loss_fn is None and not segmentation_masks(y))


def _check_batch(name, x, y, clip_min, clip_max, is_correct, loss_fn):
    """x finite and inside the clip range; y class labels [N] (returned as int64: cross-entropy takes no other label
    type) where the defaults read them, else any tensor with x's batch size (e.g. masks). IMA checks its whole batch
    so: with its own criterion and loss it checked neither, and a mask batch of 1 broadcast through the Dice.
    Returns ``(y, labels' (min, max))``, the range read once here for check_labels_against (None: not class labels,
    or none)."""
    if is_correct is None:
        _check_default_labels(name, y)
    if _class_labels_expected(is_correct, loss_fn, y):
        return check_inputs(name, x, y, clip_min, clip_max, label_range=True)
    check_inputs(name, x, clip_min=clip_min, clip_max=clip_max)
    if not torch.is_tensor(y) or y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: expected y with batch size {x.shape[0]}, got "
                         f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
    return y, None


def _flat(t):
    """[N, ...] -> [N, D]; unlike reshape(N, -1), also for an empty batch (N = 0)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _seg_masks(out, y, name):
    """Boolean masks (pred, target): [N, P] for binary outputs, one-hot [N, C, P] for multi-class ones. Multi-class
    means class logits out [N, C, ...] (C >= 2) against labels y [N, ...], i.e. one dimension more than y; anything
    else is binary logits with y's pixel count ([N, H, W] or [N, 1, H, W] against a [N, H, W] or [N, 1, H, W] mask)."""
    if out.dim() == y.dim() + 1 and out.dim() >= 3 and out.shape[1] >= 2:
        c = out.shape[1]
        pred = torch.nn.functional.one_hot(_flat(out.argmax(1)), c).transpose(1, 2)
        if y.is_floating_point():
            # .long() truncates: a label map resized with interpolation read its 1.7 as class 1, without a word
            fractional = ~(torch.isfinite(y) & (y == y.trunc()))
            if bool(fractional.any()):
                raise ValueError(f"{name}: expected whole-number class labels y for the {c}-class output "
                                 f"{tuple(out.shape)}, got {int(fractional.sum())} other value(s), e.g. "
                                 f"{float(y[fractional][0]):g} (a label map resized with interpolation? use nearest)")
        target_labels = _flat(y).long()
        if target_labels.shape[1] != pred.shape[2]:
            raise ValueError(f"{name}: expected y to have {pred.shape[2]} labels per sample to match the multi-class "
                             f"output {tuple(out.shape)}, got {tuple(y.shape)}")
        if target_labels.numel() and (int(target_labels.min()) < 0 or int(target_labels.max()) >= c):
            # one_hot's own error ("Class values must be smaller than num_classes") named neither y nor the output
            raise ValueError(f"{name}: expected labels y in [0, {c}) for the {c}-class output {tuple(out.shape)}, got "
                             f"values in [{int(target_labels.min())}, {int(target_labels.max())}]")
        target = torch.nn.functional.one_hot(target_labels, c).transpose(1, 2)
        return pred.bool(), target.bool()
    pred = _flat(out > 0)
    target = _flat(y)
    if target.shape[1] != pred.shape[1]:
        raise ValueError(f"{name}: expected y of {pred.shape[1]} pixels per sample to match the binary output "
                         f"{tuple(out.shape)} (multi-class outputs [N, C, ...] take labels y [N, ...]), "
                         f"got {tuple(y.shape)}")
    return pred, target > 0.5 if target.is_floating_point() else target.bool()


def dice_score(out, y):
    """Dice per sample [N] of a segmentation output (logits) against the target mask y.

    Binary: out [N, 1, H, W] or [N, H, W] logits (foreground where > 0), y a {0, 1} mask of the same pixel count.
    Multi-class: out [N, C, H, W] (C >= 2, argmax) and y [N, H, W] labels (out has one dimension more than y); the
    mean Dice over the foreground classes present in the prediction or the target. Empty prediction and empty
    target give Dice 1.
    """
    pred, target = _seg_masks(out, y, "dice_score")
    inter = (pred & target).sum(-1).double()
    total = (pred.sum(-1) + target.sum(-1)).double()
    dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    if dice.dim() == 2:  # multi-class: foreground classes 1..C-1 that appear in prediction or target
        present = total[:, 1:] > 0
        fg = dice[:, 1:]
        count = present.sum(1)
        mean_fg = (fg * present).sum(1) / count.clamp_min(1)
        dice = torch.where(count > 0, mean_fg, torch.ones_like(mean_fg))
    return dice


def dice_criterion(threshold=0.6):
    """The paper's segmentation criterion (Section 3.5.2): a segmentation counts as correct when the Dice of the
    thresholded output against the target mask exceeds ``threshold`` (0.6 in the paper). Use as ``is_correct``."""
    if isinstance(threshold, bool) or not (isinstance(threshold, numbers.Real) and 0 <= threshold < 1):  # False: 0
        raise ValueError(f"dice_criterion: expected threshold in [0, 1), got {threshold!r}")

    def is_correct(out, y):
        return dice_score(out, y) > threshold

    is_correct.threshold = threshold
    return is_correct


def soft_dice_loss(out, y, smooth=1.0):
    """Per-sample soft Dice loss [N] for binary segmentation logits (sigmoid) against a mask with values in [0, 1]
    (a {0, 1} mask, or a soft one; a 0/255 mask is refused): the ascent loss to pair with :func:`dice_criterion` (as
    nnU-Net trains with Dice loss). Multi-class outputs take a loss of your own (docs/ima.md, Segmentation).

    Args: out (Tensor[N, 1, H, W] or [N, H, W]): logits; y: the mask, of the same pixel count; smooth (float): added
    to the numerator ``2 * sum(p * y)`` and the denominator ``sum(p) + sum(y)`` (default 1.0). Returns Tensor[N]:
    ``1 - (2 * sum(p * y) + smooth) / (sum(p) + sum(y) + smooth)`` with ``p = sigmoid(out)``.
    """
    p = _flat(torch.sigmoid(out))
    t = _flat(y).to(p.dtype)
    if p.shape[1] != t.shape[1]:
        # e.g. multi-class logits [N, C, H, W] against labels [N, H, W]: sigmoid per channel is not their Dice
        raise ValueError(f"soft_dice_loss: expected binary logits ([N, 1, H, W] or [N, H, W]) and a {{0, 1}} mask of "
                         f"the same pixel count, got output {tuple(out.shape)} and y {tuple(y.shape)}; for "
                         f"multi-class outputs pass your own per-sample loss_fn (docs/ima.md, Segmentation)")
    low, high = (float(v) for v in torch.aminmax(t.detach())) if t.numel() else (0.0, 0.0)
    if low < 0 or high > 1:
        # A 0/255 mask (as stored in image files) gave a negative loss whose ascent and descent are not Dice's.
        raise ValueError(f"soft_dice_loss: expected a mask with values in [0, 1], got values in [{low:g}, {high:g}] "
                         f"(a 0/255 mask: divide it by 255)")
    return 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def search_rounds(search_steps, arity):
    """Rounds a k-ary search (``arity`` k >= 2) needs for the precision of ``search_steps`` (N) bisections:
    ceil(N log 2 / log k)."""
    if arity == 2:
        return search_steps
    rounds = math.ceil(search_steps * math.log(2) / math.log(arity) - 1e-12)
    return max(rounds, 0)


_NOT_GIVEN = object()


def _check_options(name, backend, is_correct, loss_fn, flags, search_result=_NOT_GIVEN, model_mode=_NOT_GIVEN):
    """Options that would otherwise be read wrongly or only when first used: a backend name (used only once a sample
    takes a step), callables (``is_correct=0.6`` is the threshold of dice_criterion), real booleans (the string
    "False" is true), and (when given) the search result and model mode, which IMA checks when built. A given None
    is refused like any other value: search_result=None ran the midpoint variant."""
    if search_result is not _NOT_GIVEN and search_result not in SEARCH_RESULTS:
        raise ValueError(f"{name}: expected search_result to be one of {', '.join(SEARCH_RESULTS)}, "
                         f"got {search_result!r}")
    if model_mode is not _NOT_GIVEN and model_mode not in MODEL_MODES:
        raise ValueError(f"{name}: expected model_mode to be one of {', '.join(MODEL_MODES)}, got {model_mode!r}")
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(f"{name}: expected backend to be one of {', '.join(_backend.BACKENDS)} or None, "
                         f"got {backend!r}")
    for arg, fn in (("is_correct", is_correct), ("loss_fn", loss_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}: expected {arg} to be a callable(output, y) or None, got {type(fn).__name__} "
                            f"{fn!r}" + (" (a Dice threshold goes to dice_criterion(threshold))"
                                         if arg == "is_correct" else ""))
    check_flags(name, flags)


def _criterion_result(name, ok, n):
    if not torch.is_tensor(ok) or ok.dtype != torch.bool or ok.shape != (n,):
        got = f"{ok.dtype} {tuple(ok.shape)}" if torch.is_tensor(ok) else type(ok).__name__
        raise ValueError(f"{name}: expected is_correct(output, y) to return a bool tensor of shape [{n}], got {got}")
    return ok


class _NaNSamples(ValueError):
    """NaN outputs or losses at some samples (a diverged model, or inputs it cannot take): NaN logits read as
    misclassified, so they counted as crossings and shrank those margins. ``positions``: the samples' indices in
    gen_adv's batch, which IMA names by dataset id instead (:meth:`naming`)."""

    def __init__(self, name, what, positions):
        positions = positions.tolist() if torch.is_tensor(positions) else positions
        self.name, self.what, self.positions = name, what, sorted(set(positions))
        super().__init__(self.naming(f"sample(s) {listing(self.positions, 8)} of the batch"))

    def __reduce__(self):
        # ValueError's default rebuilt it from its message alone: a TypeError for the missing arguments; the
        # instance's __dict__ goes with it, as with a plain exception's pickle: its __notes__ and any attribute
        return type(self), (self.name, self.what, self.positions), self.__dict__

    def naming(self, samples, name=None):
        return (f"{name or self.name}: {self.what} is NaN for {samples}; NaN would read as misclassified and shrink "
                "their margins -- fix the model (diverged?) or leave those samples out")


def _nan_rows(values, weight=None):
    """Bool [R]: the rows of ``values`` [R, ...] with a NaN (where ``weight``), on the device (no host read)."""
    nan = torch.isnan(values.detach().flatten(1) if values.dim() > 1 else values.detach())
    nan = nan.any(1) if nan.dim() > 1 else nan
    return nan & weight if weight is not None else nan


def _loss_result(name, loss, n):
    if not torch.is_tensor(loss) or not loss.is_floating_point() or loss.shape != (n,):
        got = f"{loss.dtype} {tuple(loss.shape)}" if torch.is_tensor(loss) else type(loss).__name__
        raise ValueError(f"{name}: expected loss_fn(output, y) to return per-sample floating-point losses of shape "
                         f"[{n}], got {got}")
    return loss


class _Problem:
    """Everything one gen_adv call needs, validated once."""

    def __init__(self, name, model, x, y, margin, steps, norm, search_steps, algorithm, is_correct, loss_fn, arity,
                 clip_min, clip_max, search_result, backend, model_mode="eval", min_rows=None, label_range=_NOT_GIVEN,
                 margin_read=None):
        norm = check_norm(name, norm)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"{name}: expected algorithm to be 2 (GenAdv) or 3 (GenAdv with data augmentation), "
                             f"got {algorithm!r}")
        _check_options(name, backend, is_correct, loss_fn, {}, search_result, model_mode)
        self.steps = check_int(name, "steps", steps, 0)
        self.search_steps = check_int(name, "search_steps", search_steps, 0)
        self.arity = _check_arity(name, arity, self.search_steps)
        check_gradients_possible(name)
        if label_range is _NOT_GIVEN:
            y, label_range = _check_batch(name, x, y, clip_min, clip_max, is_correct, loss_fn)
        # else (IMA's): x and y are rows of a batch the caller checked so (same clip range, criterion and loss), and
        # label_range is what its check read: checking them again read the same values back (two host reads)
        self.label_range = label_range
        self.name, self.model, self.x, self.y = name, model, x.detach(), y
        # Every forward runs in x's layout (the one batch_invariant_sizes probes): gathers, masks and padding return
        # contiguous batches, and a channels_last x then ran masked and compacted forwards in different layouts.
        self.memory_format = output_memory_format(x)
        if margin_read is None:
            self.margin, widest = per_sample(name, "margin", margin, x, with_max=True)
            # how many margins are positive (the samples the ascent takes), where known without a read: a number's
            self.positive = None if torch.is_tensor(margin) else x.shape[0] if widest else 0
        else:
            # IMA's: rows of its margins read with its batch's clean-correct rows (finite and >= 0, their largest and
            # how many are positive): per_sample's check of them, and the ascent's nonzero of the positive ones, read
            # them again
            widest, self.positive = margin_read
            self.margin = margin
        check_linf_budget(name, norm, self.margin, clip_min, clip_max, arg="margin", eps_max=widest)
        self.norm, self.algorithm = norm, algorithm
        self.is_correct = is_correct or _default_is_correct
        self.default_criterion = is_correct is None
        self.loss_fn = loss_fn or per_sample_ce
        self.default_loss = loss_fn is None
        self.labels_checked = False
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        self.search_result, self.backend = search_result, backend
        self.grad_scale = InputGradScale()  # loss scaling under float16 autocast (fit(amp=True)); a no-op otherwise
        coupled = _batch_coupled(model, model_mode)
        if min_rows is None and coupled:
            min_rows = 0
        # None (eval mode): sizes measured per model by batch_invariant_sizes once the attack context is on.
        self.min_rows = None if min_rows is None else check_int(name, "min_rows", min_rows, 0)
        self.invariant_sizes = None
        _check_min_rows(name, self.min_rows, coupled)
        self.rounds = search_rounds(self.search_steps, self.arity)
        # Algorithm 2: alpha = 4 E(i) / K.
        self.alpha = 4 * self.margin / self.steps if self.steps else torch.zeros_like(self.margin)
        self.backends = {}  # op name -> the backend that runs it, resolved at its first call

    def _on(self, op_name):
        """The backend of ``op_name`` for this call, resolved once: through the functional wrappers every step and
        round re-read $ROBUST_OPS_BACKEND and re-checked arguments the loops built (about the CPU op's own time on
        small batches). At the first use, so a call that never steps needs no backend for it."""
        if op_name not in self.backends:
            self.backends[op_name] = _backend.resolve(op_name, self.x.device, self.backend)
        return self.backends[op_name]

    def pgd_step(self, x_adv, x_nat, grad, alpha, margin):
        """functional.pgd_step_ on [N] alpha and margin in x's opmath dtype (per_sample's and rows of them)."""
        functional._pgd_step_on(self._on("pgd_step_"), x_adv, x_nat, grad, alpha, margin, self.clip_min,
                                self.clip_max, self.norm, None, 0)

    def search_step(self, lo, hi, points, crossed_at, active=None):
        """functional.boundary_search_step_ on the search's own tensors."""
        functional._boundary_search_step_on(self._on("boundary_search_step_"), lo, hi, points, crossed_at, active)

    def criterion(self, out, y):
        """The criterion on ``out``. NaN outputs are refused by the loops, which find their rows (:func:`_nan_rows`;
        masked loops: only the rows in play, those the compacted loops forward too) and read whether there are any
        with their step's other values (:func:`_read_counts`), so that a step reads once."""
        if self.default_criterion:
            _check_default_output(self.name, out, y.shape[0], "is_correct")
        if (self.default_criterion or self.default_loss) and not self.labels_checked:
            # Labels past the model's classes (1-based, or a binary 1/2) read as misclassified everywhere, and a
            # single logit's BCE took a target of 2 without a word: checked once, against the first output.
            if not self.default_criterion:  # a segmentation output: name loss_fn, not the label range
                _check_default_output(self.name, out, y.shape[0], "loss_fn")
            check_labels_against(self.name, self.y, out, label_range=self.label_range)  # not read again
            self.labels_checked = True
        return _criterion_result(self.name, self.is_correct(out, y), y.shape[0])

    def padded_rows(self, n):
        """Rows a forward over n samples runs on: at least min_rows, or (auto) the next batch size whose results
        are those of a large batch (above the probed sizes: the next multiple of their period)."""
        if n == 0:
            return 0
        sizes = self.invariant_sizes
        if sizes is None:
            return max(n, self.min_rows)
        if not sizes or n <= sizes[-1]:
            return next((s for s in sizes if s >= n), n)
        period = getattr(sizes, "period", 1)
        return -(-n // period) * period

    def forward(self, xs, counter, grad):
        """Model output at xs (with a graph to xs when grad); one counted forward. Batches are padded to
        ``padded_rows`` with copies of their first row (outside the graph) and the padding's outputs dropped."""
        n = xs.shape[0]
        rows_needed = self.padded_rows(n)
        pad = rows_needed - n
        counter.forward(rows_needed)
        if grad:
            xs = xs.detach().requires_grad_(True)
        with torch.set_grad_enabled(grad):
            rows = torch.cat([xs, xs.detach()[:1].expand((pad,) + tuple(xs.shape[1:]))]) if pad > 0 else xs
            try:
                out = forward(self.name, self.model, rows.contiguous(memory_format=self.memory_format),
                              check_output_rows)
            except ValueError as err:
                if rows.shape[0] != 1 or not is_one_sample_batch_norm(err):
                    raise
                # model_mode="train": compaction leaves single samples in play, which torch's error did not say
                raise ValueError(f"{self.name}: a training-mode batch-norm layer cannot normalize a forward of 1 "
                                 f"sample (a working batch down to its last sample, or a batch of 1); use "
                                 f"model_mode='eval' (the default), or compact=False on batches of 2 or more") from None
            return xs, (out[:n] if pad > 0 else out)

    def loss(self, out, y):
        """``loss_fn(out, y)`` with its graph, unchecked: :meth:`checked_loss` checks it where a gradient is taken
        (the compacted ascent computes it before its step's read, also when no sample goes on)."""
        if self.default_loss:
            _check_default_output(self.name, out, y.shape[0], "loss_fn")
        with torch.enable_grad():
            return self.loss_fn(out, y)

    def checked_loss(self, loss, n):
        """``loss`` refused unless per-sample floating-point [n] values with a gradient (NaN checked apart)."""
        loss = _loss_result(self.name, loss, n)
        if not loss.requires_grad:  # autograd's own error ("element 0 of tensors ...") named neither
            raise ValueError(f"{self.name}: expected loss_fn(output, y) to be differentiable in the output, got a "
                             f"loss without a gradient (computed from argmax, comparisons or .detach()?)")
        return loss

    def backward(self, xs, loss, weight, counter):
        """The input gradient at xs of ``loss``'s rows where ``weight`` (the others' samples are done); one counted
        backward. A NaN loss of a row where ``weight`` is refused before (its gradient would step it to NaN)."""
        with torch.enable_grad():
            total = torch.where(weight, loss, torch.zeros_like(loss)).sum()
        counter.backward(self.padded_rows(xs.shape[0]))
        (grad,) = self.grad_scale.grad(total, [xs], direction_only=True)
        return grad


# ---------------------------------------------------------------------------------------------------------------------
# The ascent and the search: compacted


def _ascent_compact(p, counter):
    """Algorithm 2/3 ascent over a working batch that holds only the unfinished samples.

    Returns x_adv (final iterates for samples that ended without crossing), lo/hi (search brackets), crossed,
    clean_correct and steps, all full-batch, and the host counts {"crossed", "clean_correct"} the steps' reads gave
    (the search and IMA find those rows by them without reading again). Each step reads once (a GPU sync): how
    many samples finished, with the NaN checks of its output and of the loss of the samples going on."""
    x, y, n = p.x, p.y, p.x.shape[0]
    x_adv = x.clone()
    lo, hi = x.clone(), x.clone()
    crossed = torch.zeros(n, dtype=torch.bool, device=x.device)
    clean_correct = torch.ones(n, dtype=torch.bool, device=x.device)
    steps = torch.zeros(n, dtype=torch.int64, device=x.device)
    counts = {"crossed": 0, "clean_correct": n}
    # Margin-0 samples: the ball is {x}; they do not move and cost nothing (x_adv = x, crossed False).
    idx = _rows(p.margin > 0) if p.positive is None else _grouped((p.margin > 0,), (p.positive,))[0]
    cur = x.index_select(0, idx)  # working iterates x_t of the active samples
    prev = cur  # x_{t-1} (Algorithm 2's x~1, the last correct iterate)
    for t in range(p.steps + 1):
        if idx.numel() == 0:
            break
        last = t == p.steps
        ya = y.index_select(0, idx)
        xs, out = p.forward(cur, counter, grad=not last)
        nan_out = _nan_rows(out) if out.is_floating_point() else None
        nans = [] if nan_out is None else [nan_out]
        ok = _nan_first(p, lambda: p.criterion(out.detach(), ya), nans, idx)
        if t == 0:
            done = ~ok  # clean x already wrong: returned unchanged, never searched
            clean_correct.index_copy_(0, idx, ok)
        elif p.algorithm == 2:
            done = ~ok  # first wrong iterate: bracket [x_{t-1}, x_t]
        else:
            done = torch.zeros_like(ok)
        keep = ~done
        # Algorithm 3, K steps taken: bracket [x, x_K] when x_K is misclassified
        wrong = keep & ~ok if last and p.algorithm == 3 else None
        loss = nan_loss = None
        if not last:  # the next step's loss, before the read, so that its NaN check shares it (checked once used)
            loss = _nan_first(p, lambda: p.loss(out, ya), nans, idx)
            if torch.is_tensor(loss) and loss.is_floating_point() and loss.shape == ya.shape[:1]:
                nan_loss = _nan_rows(loss, keep)
        n_done, n_wrong, out_nan, loss_nan = _read_counts((done, wrong), (nan_out, nan_loss))
        if out_nan:
            raise _NaNSamples(p.name, "the model's output", idx[nan_out])
        if t == 0:
            counts["clean_correct"] -= n_done
        if wrong is None:
            at_done, at = _grouped((done,), (n_done,))
        else:
            at_done, at_wrong, at = _grouped((done, wrong), (n_done, n_wrong))
        if t and p.algorithm == 2 and n_done:
            cidx = idx.index_select(0, at_done)
            crossed.index_fill_(0, cidx, True)
            lo.index_copy_(0, cidx, prev.index_select(0, at_done))
            hi.index_copy_(0, cidx, cur.index_select(0, at_done))
            steps.index_fill_(0, cidx, t)
            counts["crossed"] += n_done
        if last:  # K steps taken: the rest ends here
            if wrong is not None:
                widx = idx.index_select(0, at_wrong)
                steps.index_fill_(0, widx, p.steps)
                crossed.index_fill_(0, widx, True)
                hi.index_copy_(0, widx, cur.index_select(0, at_wrong))
                counts["crossed"] += n_wrong
            ridx = idx.index_select(0, at)
            steps.index_fill_(0, ridx, p.steps)
            x_adv.index_copy_(0, ridx, cur.index_select(0, at))
            break
        if not at.numel():  # every sample finished at this step: no backward needed
            break
        loss = p.checked_loss(loss, ya.shape[0])
        if loss_nan:  # its gradient would step them to NaN
            raise _NaNSamples(p.name, "loss_fn(output, y)", idx[nan_loss])
        grad = p.backward(xs, loss, keep, counter)
        del out, loss  # a graph retained under float16 autocast goes now, not after the next forward
        idx, prev = idx.index_select(0, at), cur.index_select(0, at)
        nxt = prev.clone()
        p.pgd_step(nxt, x.index_select(0, idx), grad.index_select(0, at), p.alpha.index_select(0, idx),
                   p.margin.index_select(0, idx))
        cur = nxt
    return x_adv, lo, hi, crossed, clean_correct, steps, counts


def _rows(mask):
    """The positions where a bool [N] mask is True: one nonzero (a host read, a GPU sync), where indexing k tensors
    with the mask itself ran k."""
    return mask.nonzero().squeeze(1)


def _read_counts(masks, flags):
    """One host read (a GPU sync) for a step: how many rows each bool [R] mask of ``masks`` holds, and whether each
    bool tensor of ``flags`` holds any True (a list: the counts, then the flags; None for a None entry)."""
    values = [m.sum() for m in masks if m is not None] + [f.any() for f in flags if f is not None]
    read = iter(torch.stack([v.to(torch.int64) for v in values]).tolist() if values else ())
    return [None if m is None else next(read) for m in masks] + [None if f is None else bool(next(read)) for f in flags]


def _grouped(masks, counts):
    """The positions of the True rows of each of the disjoint bool [R] ``masks``, then of the other rows, each
    ascending (as ``nonzero`` finds them), given how many rows each mask holds (``counts``, read already): one
    stable sort on the device, where a nonzero per group was a host read each."""
    key = torch.full(masks[0].shape, len(masks), dtype=torch.uint8, device=masks[0].device)
    for i, mask in enumerate(masks):
        key.masked_fill_(mask, i)
    order = torch.sort(key, stable=True).indices
    return order.split(list(counts) + [order.numel() - sum(counts)])


def _search_start(p, lo, hi):
    """Interior points of the first round: points = hi everywhere, then one search step with crossed_at = 0 keeps lo
    and hi (stacked[0] = lo, stacked[1] = points[0] = hi) and writes the k-1 interior points with the kernel's own
    arithmetic."""
    what = f"{p.arity - 1} search points for each of {counted(hi.shape[0], 'sample')}"
    points = allocated(p.name, "arity", p.arity, what,
                       lambda: hi.unsqueeze(0).expand((p.arity - 1,) + tuple(hi.shape)).clone())
    zero = torch.zeros(lo.shape[0], dtype=torch.int64, device=lo.device)
    p.search_step(lo, hi, points, zero)
    return points


def _first_crossed(p, out, y, k1, n, nans, rows, active=None):
    """Index of the first interior point (lo -> hi order) past the boundary, k-1 when none is. The rows with a NaN
    output (where ``active``) are appended to the list ``nans``, read once after the last round
    (:func:`_check_search_nans`; ``rows``: each point's sample)."""
    active = None if active is None else active.repeat(k1)
    if out.is_floating_point():
        nans.append(_nan_rows(out, active))
    ok = _nan_first(p, lambda: p.criterion(out, y.repeat(k1, *([1] * (y.dim() - 1)))), nans, rows).view(k1, n)
    wrong = ~ok
    first = wrong.to(torch.uint8).argmax(0)  # first True (argmax returns the first maximal index)
    return torch.where(wrong.any(0), first, torch.full_like(first, k1))


def _search_compact(p, lo, hi, crossed, counter, counts):
    """k-ary boundary search on the crossed samples only (all of them need the same number of rounds). ``counts``:
    the ascent's, whose number of crossed samples finds their rows without a read; the rounds' NaN checks are read
    once, after the last round (a NaN output is refused naming the first such round's samples, as before)."""
    n = counts["crossed"]
    idx = _grouped((crossed,), (n,))[0]
    if n == 0 or p.rounds == 0:
        return lo.index_select(0, idx), hi.index_select(0, idx), idx
    lo_c, hi_c = lo.index_select(0, idx), hi.index_select(0, idx)
    y_c = p.y.index_select(0, idx)
    points = _search_start(p, lo_c, hi_c)
    k1 = p.arity - 1
    nans, rows = [], idx.repeat(k1)
    for _ in range(p.rounds):
        _, out = p.forward(points.reshape((k1 * n,) + tuple(lo_c.shape[1:])), counter, grad=False)
        crossed_at = _first_crossed(p, out, y_c, k1, n, nans, rows)
        p.search_step(lo_c, hi_c, points, crossed_at)
    _check_search_nans(p, nans, rows)
    return lo_c, hi_c, idx


def _nan_first(p, call, nans, rows):
    """``call()``: the criterion or loss_fn on an output whose NaN flags (``nans``, as :func:`_check_search_nans`
    takes them) are read after it. Where it raises on an output with a NaN, the NaN refusal comes first, as when a
    read before it checked them (a criterion or loss validating its input, a torch.distributions one, named its own
    error in its place)."""
    try:
        return call()
    except Exception:
        try:
            _check_search_nans(p, nans, rows)
        except _NaNSamples as nan:
            raise nan from None
        raise


def _check_search_nans(p, nans, rows):
    """The search rounds' NaN outputs (``nans``: each round's rows with one, as _first_crossed found them), read once:
    _NaNSamples naming the first such round's samples (``rows``: each point's sample), as a read per round did."""
    found = torch.stack([nan.any() for nan in nans]).tolist() if nans else []
    if any(found):
        raise _NaNSamples(p.name, "the model's output", rows[nans[found.index(True)]])


# ---------------------------------------------------------------------------------------------------------------------
# The same algorithm with masks over the full batch (the baseline)


def _ascent_masked(p, counter):
    """The compacted ascent's algorithm over the full batch with masks; as there, a step reads once (a GPU sync):
    whether a sample is still in play, with the NaN checks of the step's output and of the loss of the samples in
    play."""
    x, y, n = p.x, p.y, p.x.shape[0]
    dev = x.device
    x_adv, lo, hi = x.clone(), x.clone(), x.clone()
    crossed = torch.zeros(n, dtype=torch.bool, device=dev)
    clean_correct = torch.ones(n, dtype=torch.bool, device=dev)
    steps = torch.zeros(n, dtype=torch.int64, device=dev)
    alive = p.margin > 0
    rows = torch.arange(n, device=dev)
    cur, prev = x.clone(), x.clone()
    view = (n,) + (1,) * (x.dim() - 1)
    if p.batch_exit and not bool(alive.any()):  # every margin 0: no forward (later steps' reads say it themselves)
        return x_adv, lo, hi, crossed, clean_correct, steps, None
    for t in range(p.steps + 1):
        last = t == p.steps
        xs, out = p.forward(cur, counter, grad=not last)
        nan_out = _nan_rows(out, alive) if out.is_floating_point() else None
        nans = [] if nan_out is None else [nan_out]
        ok = _nan_first(p, lambda: p.criterion(out.detach(), y), nans, rows)
        if t == 0:
            done = alive & ~ok
            clean_correct &= ~done
        elif p.algorithm == 2:
            done = alive & ~ok
            crossed |= done
            lo = torch.where(done.view(view), prev, lo)
            hi = torch.where(done.view(view), cur, hi)
            steps = torch.where(done, torch.full_like(steps, t), steps)
        else:
            done = torch.zeros_like(alive)
        alive = alive & ~done
        loss = nan_loss = None
        if not last:  # before the read, so that its NaN check shares it (checked once used), as the compacted loop
            loss = _nan_first(p, lambda: p.loss(out, y), nans, rows)
            if torch.is_tensor(loss) and loss.is_floating_point() and loss.shape == (n,):
                nan_loss = _nan_rows(loss, alive)
        going_on, out_nan, loss_nan = _read_counts((alive if p.batch_exit and not last else None,),
                                                   (nan_out, nan_loss))
        if out_nan:
            raise _NaNSamples(p.name, "the model's output", rows[nan_out])
        if last:
            steps = torch.where(alive, torch.full_like(steps, p.steps), steps)
            if p.algorithm == 3:
                wrong = alive & ~ok
                crossed |= wrong
                hi = torch.where(wrong.view(view), cur, hi)
                alive = alive & ok
            x_adv = torch.where(alive.view(view), cur, x_adv)
            break
        if p.batch_exit and not going_on:
            break
        loss = p.checked_loss(loss, n)
        if loss_nan:  # its gradient would step them to NaN
            raise _NaNSamples(p.name, "loss_fn(output, y)", rows[nan_loss])
        grad = p.backward(xs, loss, alive, counter)
        del out, loss  # a graph retained under float16 autocast goes now, not after the next forward
        nxt = cur.clone()
        p.pgd_step(nxt, x, grad, p.alpha, p.margin)
        prev = cur
        cur = torch.where(alive.view(view), nxt, cur)
    return x_adv, lo, hi, crossed, clean_correct, steps, None


def _search_masked(p, lo, hi, crossed, counter, counts=None):
    n = lo.shape[0]
    idx = crossed.nonzero().squeeze(1)
    if n == 0 or p.rounds == 0 or (p.batch_exit and idx.numel() == 0):
        return lo.index_select(0, idx), hi.index_select(0, idx), idx
    lo, hi = lo.clone(), hi.clone()
    points = _search_start(p, lo, hi)
    k1 = p.arity - 1
    rows, nans = torch.arange(n, device=lo.device).repeat(k1), []
    for _ in range(p.rounds):
        _, out = p.forward(points.reshape((k1 * n,) + tuple(lo.shape[1:])), counter, grad=False)
        crossed_at = _first_crossed(p, out, p.y, k1, n, nans, rows, crossed)
        p.search_step(lo, hi, points, crossed_at, crossed)
    _check_search_nans(p, nans, rows)
    return lo.index_select(0, idx), hi.index_select(0, idx), idx


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points


MAX_PROBED_ROWS = 16
_INVARIANT_SIZES = weakref.WeakKeyDictionary()  # model -> {input signature: batch sizes}


class InvariantSizes(tuple):
    """What :func:`batch_invariant_sizes` returns: the invariant batch sizes up to ``max_rows`` (a sorted tuple), and
    ``period``: batches above ``max_rows`` are taken to be invariant at the multiples of ``period`` (1: every size)."""

    def __new__(cls, sizes=(), period=1):
        self = super().__new__(cls, sizes)
        self.period = int(period)
        return self

    def __repr__(self):
        return f"InvariantSizes({tuple(self)!r}, period={self.period})"


def _probe_signature(model, x):
    # autocast too: fit(amp=True)'s float16 kernels settle at other batch sizes than float32's
    return (tuple(x.shape[1:]), x.dtype, x.device, output_memory_format(x), torch.get_num_threads(),
            prepacked_conv_active(model), autocast_dtype(x.device.type))


def probe_rows(rows):
    """``(max_rows, reference_rows)`` for :func:`batch_invariant_sizes` as :func:`gen_adv` probes a batch of
    ``rows``: the reference is the next power of two >= rows, at most ``2 * MAX_PROBED_ROWS``. A small batch thus
    runs no forward, the probe's included, on more than twice its rows (against a fixed 32-row reference a batch of
    8 ran every GenAdv forward padded to 16 on a machine whose results settle from 16 rows, and on large images the
    probe's 32 rows, not the training step, set the peak memory), while the few powers of two keep the probes few:
    IMA's working batches (the clean-correct samples of a batch) vary in size from batch to batch."""
    reference = min(2 * MAX_PROBED_ROWS, 1 << max(int(rows) - 1, 0).bit_length())
    return min(MAX_PROBED_ROWS, reference), reference


def batch_invariant_sizes(model, x, *, clip_min=0.0, clip_max=1.0, max_rows=MAX_PROBED_ROWS,
                          reference_rows=None):
    """The batch sizes n <= ``max_rows`` at which ``model`` computes a sample's result bitwise as inside a large
    batch (``x``: a batch whose sample shape, dtype, device and memory format the probes take; not its values):
    outputs (with and without grad) and input gradients (under random output gradients) of n rows equal those of
    the same rows inside a batch of ``reference_rows`` (default ``2 * max_rows``; at least ``max_rows``). Returns
    a sorted tuple that ends with ``max_rows``, or ``()`` when ``max_rows`` rows already differ (or the model is not
    deterministic): padding cannot help then. The tuple's ``period`` (:class:`InvariantSizes`) covers larger
    batches: 1 when ``max_rows + 1`` rows are invariant (every larger size is then taken to be), else the smallest
    listed p whose multiples up to ``max_rows`` are all listed and for which ``max_rows + p`` rows are invariant (at
    worst ``max_rows``): larger batches are invariant at the multiples of p; sizes above ``max_rows`` are checked
    within the reference only (none when ``reference_rows == max_rows``: the period is then ``max_rows``). Measured:
    a float64 CPU CNN's input gradient sums a row tail of 1-3 rows in another order at every batch size (MKL's
    float64 matrix multiply in the classifier's backward; sizes 4, 8, 12, 16, period 4).

    Why: CPU and GPU math libraries pick kernels by batch size (measured for resnet18 on 1x28x28: on this
    project's first AVX-512 machine results settle from 16 rows, on a later one from 4 rows at 1 thread; on its
    AVX2 machine from 12, and at 4 and 8, because MKL's small matrix multiply in the classifier's backward sums a
    row tail in another order), so :func:`gen_adv` pads each shrinking working batch to the next size listed here
    and returns bitwise what the full-batch computation returns. Measured once per model, sample shape, dtype,
    device, memory format, thread count,
    prepacked-convolution mode (robust_ops.prepacked_conv), autocast dtype and clip range (random inputs in
    [clip_min, clip_max], the model in its current mode -- run it inside the attack's mode; training-mode
    batch-norm layers are refused), then cached for the
    model's lifetime. Each size is checked on several disjoint batches covering ``max_rows`` rows, and the sizes
    above ``max_rows`` on batches at both ends of the large one: about ``max_rows * (max_rows + 6)`` sample forwards
    and backwards (up to ``max_rows * (max_rows + 10)`` when a period is found; 3 s for resnet18 on 1x28x28 on 2 CPU
    cores). Sizes above ``reference_rows`` are not measured. Changing the model's layers afterwards is not detected.

    :func:`gen_adv` probes with :func:`probe_rows` of its batch: a small batch gets a small reference."""
    return _measure_invariant_sizes("batch_invariant_sizes", model, x, clip_min=clip_min, clip_max=clip_max,
                                    max_rows=max_rows, reference_rows=reference_rows)


def _measure_invariant_sizes(name, model, x, *, clip_min, clip_max, max_rows, reference_rows):
    """batch_invariant_sizes, its model's first forward checked under ``name`` (the caller's)."""
    max_rows = check_int("batch_invariant_sizes", "max_rows", max_rows, 1)
    reference_rows = 2 * max_rows if reference_rows is None else check_int(
        "batch_invariant_sizes", "reference_rows", reference_rows, max_rows)
    # the probe's range: NaN measured NaN outputs and returned () (no padding), "0.1" failed in the arithmetic
    clip_min = check_real("batch_invariant_sizes", "clip_min", clip_min)
    clip_max = check_real("batch_invariant_sizes", "clip_max", clip_max, minimum=clip_min)
    if not torch.is_tensor(x) or x.dim() < 1:
        raise ValueError(f"batch_invariant_sizes: expected x to be a batch tensor [N, ...], got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    training_bn = [n for n, m in model.named_modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    if training_bn:
        # Such a layer couples the batch's samples, so no size is invariant; the probe's ~400 forwards moved its
        # running statistics without a word (BatchNorm2d) or died in torch's one-sample check (BatchNorm1d).
        raise ValueError(f"batch_invariant_sizes: expected the model in eval mode, got batch-norm layer(s) in training "
                         f"mode ({', '.join(repr(n) for n in training_bn)}), whose running statistics the probe "
                         f"would move; call model.eval() first (gen_adv probes in its eval mode)")
    key = _probe_signature(model, x) + (max_rows, reference_rows, float(clip_min), float(clip_max))
    cache = _INVARIANT_SIZES.setdefault(model, {})
    if key in cache:
        return cache[key]
    g = torch.Generator().manual_seed(0)
    probe = torch.rand((reference_rows,) + tuple(x.shape[1:]), generator=g, dtype=torch.float64)
    probe = (clip_min + (clip_max - clip_min) * probe).to(dtype=x.dtype, device=x.device)
    probe = probe.contiguous(memory_format=key[3])
    # the probe's first forward, checked (attacks.core.forward: input dtype, device and channels, one floating-point
    # output row per input -- two rows, so a fixed-size output shows -- with a gradient to the input); the probe's
    # other forwards are not. What gen_adv's forwards would otherwise meet deep inside torch is named here, once
    with torch.enable_grad():
        out_shape = forward(name, model, probe[:2].detach().requires_grad_(True), check_output_rows).shape[1:]
    # Random output gradients: all-ones ones can hide a batch-dependent matrix multiply in the backward.
    weights = torch.rand((probe.shape[0],) + tuple(out_shape), generator=g, dtype=torch.float64)
    weights = weights.to(dtype=x.dtype, device=x.device)

    def run(start, stop):
        rows = probe[start:stop].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(rows)
            (grad,) = torch.autograd.grad(out, rows, weights[start:stop])
        with torch.no_grad():
            plain = model(rows.detach())
        return out.detach(), grad, plain

    reference = run(0, probe.shape[0])

    def agrees(n, starts):
        for start in starts:
            got = run(start, start + n)
            if not all(torch.equal(a, b[start:start + n]) for a, b in zip(got, reference)):
                return False
        return True

    def invariant(n):
        # Several disjoint batches of n rows: one row's few logits can agree by chance when another kernel ran
        # (measured: 1 of 8 single rows of a float64 CNN differed).
        return agrees(n, range(0, max(max_rows // n, 1) * n, n))

    def invariant_above(n):
        # max_rows < n <= reference_rows: a batch at each end of the reference, so two different rows form the tail.
        return n <= reference_rows and agrees(n, sorted({0, reference_rows - n}))

    sizes = InvariantSizes()
    deterministic = all(torch.equal(a, b) for a, b in zip(run(0, probe.shape[0]), reference))
    if deterministic and invariant(max_rows):
        small = tuple(n for n in range(1, max_rows) if invariant(n)) + (max_rows,)
        period = 1
        if not invariant_above(max_rows + 1):
            # A row tail computed in another order at every size: pad to a period the small sizes show, checked
            # once above max_rows; max_rows itself always qualifies (its multiples are taken as large batches).
            period = next((p for p in small if max_rows % p == 0 and set(range(p, max_rows + 1, p)) <= set(small)
                           and invariant_above(max_rows + p)), max_rows)
        sizes = InvariantSizes(small, period)
    cache[key] = sizes
    return sizes


def _check_arity(name, arity, search_steps):
    """arity, an integer >= 2; another than the paper's 2 beside search_steps=0 is refused: no search round runs, so
    it was ignored silently (2, the default's value, cannot be told from the default and changes nothing)."""
    arity = check_int(name, "arity", arity, 2)
    if search_steps == 0 and arity != 2:
        refuse_unused(name, {"arity": arity}, "search_steps=0 (no search round runs)", "give search_steps > 0")
    return arity


def _check_min_rows(name, min_rows, coupled):
    """Padding (min_rows > 0) and an attack whose forwards couple the batch's samples do not go together."""
    if min_rows and coupled:
        raise ValueError(f"{name}: min_rows pads batches with copies of a sample, which would change batch-norm "
                         f"statistics when the attack runs in train mode; use model_mode='eval' or min_rows=0")


def _batch_coupled(model, model_mode):
    """Whether the attack's forwards couple the samples of a batch (batch-norm in train mode)."""
    if model_mode == "train":
        return True
    return model_mode == "keep" and any(m.training for m in model.modules())


def _unwrap_ddp(model):
    """GenAdv runs on a DistributedDataParallel model's inner module: a DDP forward is a collective (buffer
    broadcast), and ranks take different numbers of GenAdv forwards once samples finish at different steps."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _gen_adv(name, compact, model, x, y, margin, *, steps, norm, search_steps, algorithm, is_correct, loss_fn, arity,
             clip_min, clip_max, model_mode, search_result, counter, return_info, backend, batch_exit, min_rows=None,
             label_range=_NOT_GIVEN, host_counts=None, margin_read=None):
    """gen_adv; ``label_range`` (IMA's): x and y are rows of a batch the caller checked as _check_batch does, whose
    labels' range it read (None: no class labels), so they are not checked again (_Problem). ``host_counts`` (a
    dict, IMA's): filled with the compacted ascent's counts (``clean_correct``: how many samples are), not read
    again. ``margin_read`` (IMA's): ``(largest margin, how many are positive)`` of a margin tensor in x's opmath
    dtype that the caller read and found finite and >= 0 (_Problem)."""
    model = _unwrap_ddp(model)
    _check_options(name, None, None, None, {"compact": compact, "batch_exit": batch_exit, "return_info": return_info})
    p = _Problem(name, model, x, y, margin, steps, norm, search_steps, algorithm, is_correct, loss_fn, arity,
                 clip_min, clip_max, search_result, backend, model_mode, min_rows, label_range, margin_read)
    p.batch_exit = bool(batch_exit)
    if counter is not None and not isinstance(counter, PassCounter):
        # counter=5 failed after the first forward with "'int' object has no attribute 'forward'", or was never
        # touched (every margin 0) and passed
        raise TypeError(f"{name}: expected counter to be a robust_ops.ima.PassCounter or None, got "
                        f"{type(counter).__name__}")
    counter = counter if counter is not None else PassCounter()
    with attack_context(model, model_mode, name):
        if p.min_rows is None and p.x.shape[0]:
            max_rows, reference_rows = probe_rows(p.x.shape[0])
            p.invariant_sizes = _measure_invariant_sizes(name, model, p.x, clip_min=p.clip_min, clip_max=p.clip_max,
                                                         max_rows=max_rows, reference_rows=reference_rows)
        ascent, search = (_ascent_compact, _search_compact) if compact else (_ascent_masked, _search_masked)
        x_adv, lo, hi, crossed, clean_correct, steps_taken, counts = ascent(p, counter)
        lo_c, hi_c, idx = search(p, lo, hi, crossed, counter, counts)
    if host_counts is not None and counts is not None:
        host_counts.update(counts)
    # Land on the correct side (lo), or at the paper pseudo-code's final midpoint.
    landed = lo_c if search_result == "correct_side" else lo_c * 0.5 + hi_c * 0.5
    x_adv.index_copy_(0, idx, landed)
    x_adv = x_adv.detach()
    if not return_info:
        return x_adv, crossed
    far = x_adv.clone()
    far.index_copy_(0, idx, hi_c)
    info = GenAdvInfo(clean_correct=clean_correct, steps=steps_taken, far_point=far,
                      gap=sample_distance(far, x_adv, p.norm), counter=counter)
    return x_adv, crossed, info


def gen_adv(model, x, y, margin, *, steps=20, norm="l2", search_steps=10, algorithm=2, is_correct=None, loss_fn=None,
            arity=2, clip_min=0.0, clip_max=1.0, model_mode="eval", search_result="correct_side", compact=True,
            batch_exit=True, counter=None, return_info=False, backend=None, min_rows=None):
    r"""IMA's GenAdv (Algorithm 2, or Algorithm 3 for data augmentation), batched with per-sample early exit.

    Algorithm 2, per sample with margin E = E(i): from x_0 = x, up to K = ``steps`` normalized-gradient steps
    ``x_t = Proj_E(x_{t-1} + alpha * h(grad L(f(x_{t-1}), y)))`` with alpha = 4E/K (h: g/||g||_2 for l2, sign for
    linf; :func:`robust_ops.pgd_step_`). The first iterate x_t the criterion calls wrong stops the sample (crossed);
    a boundary search between x_{t-1} (correct) and x_t (wrong) then runs ``search_steps`` bisections. Samples that
    never cross return x_K. Algorithm 3 takes all K steps and searches between x and x_K when x_K is wrong.

    The returned point of a crossed sample is the search's last correct point (``search_result="correct_side"``),
    within ``(hi - lo) / 2**search_steps`` of a misclassified point; ``"midpoint"`` returns the final midpoint as
    the paper's pseudo-code does (which may lie on either side). Samples whose clean x is already wrong, and
    samples with margin 0 (the ball is {x}), are returned unchanged with ``crossed=False``; margin-0 samples cost no
    forward pass.

    Compaction: each forward and backward runs on the samples still in play only (gather, then scatter back), in the
    ascent and in the search; the forward at x_t both checks x_t and gives the gradient for the next step, so a
    sample that stops at step t costs t+1 forward rows and t+1 backward rows (the batched backward of step t still
    carries its row; t when it stops at x_K or nobody continues past t). ``compact=False`` gives the same results with
    every pass over the full batch (:func:`gen_adv_masked`).

    Args:
        model: classifier ([N, K] or single-logit output) or, with ``is_correct``, any model (e.g. segmentation).
        x (Tensor[N, ...]): clean inputs inside [clip_min, clip_max].
        y (Tensor[N] or Tensor[N, ...]): class labels, or with ``is_correct`` and ``loss_fn`` e.g. segmentation
            masks (:func:`dice_criterion`, :func:`soft_dice_loss`; the defaults are for classifiers).
        margin (float or Tensor[N]): per-sample radius E(i) >= 0 in the ``norm``.
        steps (int): K, the maximum number of ascent steps. Default: 20.
        norm (str): "l2" or "linf" (any case). Default: "l2".
        search_steps (int): N, the bisection count of the boundary search. Default: 10.
        algorithm (int): 2 (early exit, search between the last two iterates) or 3 (search between x and x_K).
        is_correct (callable, optional): ``is_correct(output, y) -> BoolTensor[N]``; default ``argmax == y``
            (single logit: ``logit > 0``). See :func:`dice_criterion` for segmentation.
        loss_fn (callable, optional): per-sample loss ``loss_fn(output, y) -> Tensor[N]`` to ascend; default
            cross-entropy (binary cross-entropy for single logits).
        arity (int): k of the k-ary search: k-1 interior points per round in one batched forward, and
            ``ceil(N log 2 / log k)`` rounds for the precision of N bisections; 2 is the paper's bisection.
        clip_min, clip_max (float): valid input range. Default: [0, 1].
        model_mode (str): "eval" (default), "train" or "keep" during the attack (restored afterwards). In train mode
            batch-norm statistics couple the samples, so compaction changes results.
        search_result (str): "correct_side" (default) or "midpoint" (see above).
        compact (bool): shrink the working batch as samples finish (default) or mask over the full batch.
        batch_exit (bool): with ``compact=False``, stop once every sample has finished (default). False gives the
            naive cost -- all K steps and N search rounds over the full batch, whatever has finished -- with the
            same results. The compacted loop always ends with its working batch.
        counter (PassCounter, optional): incremented with the forward/backward passes spent.
        return_info (bool): also return a :class:`GenAdvInfo`.
        backend (str, optional): backend of the pgd_step_ and boundary_search_step_ ops.
        min_rows (int, optional): pad every forward to at least this many rows (copies of its first sample, outputs
            dropped). Math libraries pick kernels by batch size, so a sample's float32 result can differ in the
            last bit between a batch of 5 and one of 64, and compaction would change results. Default (None), in
            eval mode: pad each batch to the next size :func:`batch_invariant_sizes` measured (once per model) to
            give large-batch results -- for resnet18 4, 8, 12 and up on an AVX2 machine, 16 and up or 4 and up on
            AVX-512 ones (by CPU and thread count, docs/ima.md), the multiples of 4 at every size for a float64 CNN
            (batches above the probed sizes go to the next multiple of the measured period) -- so compacted and
            masked GenAdv are bitwise equal at the least padding this machine needs. In train mode the default is
            0 (padding would change batch-norm statistics, so min_rows > 0 is an error there). 0 turns padding off.

    Returns:
        ``(x_adv, crossed)`` (plus ``info`` with ``return_info``): x_adv [N, ...] detached, crossed BoolTensor[N]
        (Algorithm 1's beta).

    Raises:
        NonFiniteInputError, InputDtypeError, InputDeviceError, InputShapeError: as
        :func:`robust_ops.attacks.run_pgd`. ValueError: the model's output (or ``loss_fn``'s loss) is NaN for some
        samples (it would read as misclassified), naming them.

    Example::

        >>> x_adv, crossed = gen_adv(model, x, y, margins, steps=20, search_steps=10)
    """
    return _gen_adv("gen_adv", compact, model, x, y, margin, steps=steps, norm=norm, search_steps=search_steps,
                    algorithm=algorithm, is_correct=is_correct, loss_fn=loss_fn, arity=arity, clip_min=clip_min,
                    clip_max=clip_max, model_mode=model_mode, search_result=search_result, counter=counter,
                    return_info=return_info, backend=backend, batch_exit=batch_exit, min_rows=min_rows)


def gen_adv_masked(model, x, y, margin, **kwargs):
    """:func:`gen_adv` without compaction: every forward and backward runs over the full batch and finished samples
    are frozen by masks. Same results; the baseline for benchmarks and equivalence tests. model, x, y, margin and
    the keyword arguments (kwargs) are :func:`gen_adv`'s, less ``compact`` (a TypeError)."""
    if "compact" in kwargs:  # compact=True was replaced by False without a word
        raise TypeError(f"gen_adv_masked: got compact={kwargs['compact']!r}, but it never compacts; call "
                        "gen_adv(..., compact=...) to choose")
    kwargs["compact"] = False
    return gen_adv(model, x, y, margin, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Margin table


def _bad_margins(margins):
    """How many margins are negative or not finite, with the first one, e.g. "2 bad value(s), e.g. margins[3] =
    -0.5"; None when every margin is finite and >= 0."""
    bad = ~torch.isfinite(margins) | (margins < 0)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0, 0])
    return f"{int(bad.sum())} bad value(s), e.g. margins[{i}] = {float(margins[i]):.4g}"


def _above_max(margins, max_margin, dtype):
    """The largest margin when one exceeds ``max_margin`` as ``dtype`` stores it (update's clamp rounds it so), else
    None."""
    m = margins.detach().to(dtype)
    top = m.max() if m.numel() else None
    if top is None or not bool(top > torch.tensor(max_margin, dtype=dtype, device=m.device)):
        return None
    return float(top)


_REFUSED_ARGUMENTS = 3  # MarginTable's sync: a rank's update refused for its ids, flags or distances' shape


class MarginTable:
    """Per-sample margins E(i), a float tensor [num_samples] indexed by dataset id (Algorithm 1).

    ``update`` applies lines 13-19 for one batch: expand by ``delta`` where the adversarial sample is still correct
    and no boundary was crossed; shrink to ``(||x - x_adv|| + E(i)) / 2`` where it crossed; clip into
    ``[0, max_margin]`` (clipping each update equals the paper's end-of-epoch clip, since an epoch visits each id
    once). Under torch.distributed (initialized, world size > 1, ``sync=True``) every update is followed by an
    all_gather of the (id, new margin) pairs of all ranks, applied in rank order, so every rank holds the same
    table; an id updated by two ranks in one step takes the highest rank's value. DistributedSampler's padding
    repeats ids, mostly in another step than their first: such an id is updated twice in that epoch (its
    ``drop_last=True`` repeats none; neither does ``fit``). An update refused on one rank (bad ids or flags,
    distances of crossed samples that are NaN, Inf or negative, ``problem``) raises on every rank at once.

    Args: num_samples (int >= 1): the dataset length; init_margin, max_margin (float, 0 <= init_margin <=
    max_margin): every E(i)'s start and the clip's top; norm ("l2" or "linf", any case): the norm the distances are
    measured in (recorded); device, dtype (floating point; default "cpu", float32) of the table; sync (bool,
    default True): the all_gather above; process_group: the group it runs in (None: the default group; only with
    ``sync``). ``update``'s ``adv_correct`` and ``crossed`` are BoolTensor[len(ids)], ``distance`` the crossed
    samples' ||x - x_adv|| (Tensor[len(ids)]), ``delta`` the expansion step.
    """

    def __init__(self, num_samples, init_margin, max_margin, norm="l2", *, device="cpu", dtype=torch.float32,
                 sync=True, process_group=None):
        check_int("MarginTable", "num_samples", num_samples, 1)
        for arg, v in (("init_margin", init_margin), ("max_margin", max_margin)):
            check_real("MarginTable", arg, v, minimum=0)
        if init_margin > max_margin:
            raise ValueError(f"MarginTable: expected init_margin <= max_margin, got {init_margin} > {max_margin}")
        self.max_margin = float(max_margin)
        self.norm = check_norm("MarginTable", norm)
        check_flags("MarginTable", {"sync": sync})  # sync="no" synchronised
        if not sync:  # the group is what the sync runs in: without it, it was ignored silently
            refuse_unused("MarginTable", {"process_group": process_group}, "sync=False (no exchange between ranks)",
                          "set sync=True")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):  # int64 stored every margin as 0
            raise TypeError(f"MarginTable: expected dtype to be a floating-point torch.dtype, got {dtype!r}")
        self.sync = sync
        self.process_group = process_group
        self.margins = torch.full((int(num_samples),), float(init_margin), dtype=dtype,
                                  device=check_device("MarginTable", device))

    def __len__(self):
        return self.margins.shape[0]

    def __repr__(self):
        return f"MarginTable(num_samples={len(self)}, max_margin={self.max_margin}, norm={self.norm!r})"

    def check_ids(self, ids, name="MarginTable"):
        """ids as an int64 tensor on the table's device; errors (naming ``name``) for non-integer, out-of-range or
        duplicate ids. Checked where they are, before the move: a DataLoader's CPU ids cost a CUDA table no sync."""
        # any integer dtype (int8 or numpy's uint32 index arrays too); bool would read as ids 0 and 1
        if not torch.is_tensor(ids) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name}: expected ids to be an integer tensor of dataset ids, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.dim() != 1:
            raise ValueError(f"{name}: expected ids to be 1-D [N], got shape {tuple(ids.shape)}")
        ids = ids.to(torch.int64)
        if ids.numel():
            lo, hi = labels_range(ids)  # both ends in one read
            if lo < 0 or hi >= len(self):
                raise IndexError(f"{name}: ids must lie in [0, {len(self)}) (the margin table has {len(self)} entries; "
                                 f"size it with the dataset length), got ids in [{lo}, {hi}]")
            if torch.unique(ids).numel() != ids.numel():
                raise ValueError(f"{name}: expected distinct ids in one batch (each sample's margin is updated once), "
                                 f"got {ids.numel() - torch.unique(ids).numel()} duplicate(s); a sampler drawing with "
                                 "replacement (WeightedRandomSampler) repeats samples: draw without replacement")
        return ids.to(self.margins.device)

    def get(self, ids):
        """Margins of ``ids`` (a copy)."""
        return self.margins.index_select(0, self.check_ids(ids))

    def __getitem__(self, ids):
        return self.get(ids)

    def new_margins(self, ids, *, adv_correct, crossed, distance, delta):
        """Algorithm 1 lines 13-19 for ``ids``: the updated (clipped) margins, without writing them."""
        return self._new_margins(self.check_ids(ids), adv_correct=adv_correct, crossed=crossed, distance=distance,
                                 delta=delta)

    def _new_margins(self, ids, *, adv_correct, crossed, distance, delta):
        """new_margins of ids that check_ids returned."""
        n = ids.numel()
        for arg, t in (("adv_correct", adv_correct), ("crossed", crossed)):
            if not torch.is_tensor(t) or t.dtype != torch.bool or t.shape != (n,):
                raise ValueError(f"MarginTable.update: expected {arg} to be a bool tensor of shape [{n}], got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if not torch.is_tensor(distance) or distance.shape != (n,):
            got = tuple(distance.shape) if torch.is_tensor(distance) else type(distance).__name__
            raise ValueError(f"MarginTable.update: expected distance to be a tensor of shape [{n}], got {got}")
        if distance.dtype == torch.bool or distance.is_complex():  # a bool (crossed passed twice?) shrank towards 1
            raise TypeError(f"MarginTable.update: expected real-valued distances, got {distance.dtype}")
        check_real("MarginTable.update", "delta", delta, minimum=0)
        dev = self.margins.device
        old = self.margins.index_select(0, ids)
        adv_correct, crossed = adv_correct.to(dev), crossed.to(dev)
        dist_ = distance.detach().to(device=dev, dtype=old.dtype)
        new = torch.where(adv_correct & ~crossed, old + delta, old)
        new = torch.where(crossed, (dist_ + old) / 2, new)
        return new.clamp(0.0, self.max_margin)

    def update(self, ids, *, adv_correct, crossed, distance, delta, problem=None):
        """Apply Algorithm 1's margin update for one batch (see the class docstring); returns the new margins.
        ``problem``: a refusal the caller found (IMA's NaN outputs), raised as ValueError instead of writing."""
        return self._update(ids, adv_correct=adv_correct, crossed=crossed, distance=distance, delta=delta,
                            problem=problem)

    def _update(self, ids, *, adv_correct, crossed, distance, delta, problem=None, ids_checked=False):
        """update; ``ids_checked``: ids are what check_ids returned (IMA's, checked once per batch), not read again."""
        try:
            if not ids_checked:  # checked once: update and new_margins read the ids twice
                ids = self.check_ids(ids)
            new = self._new_margins(ids, adv_correct=adv_correct, crossed=crossed, distance=distance, delta=delta)
        except (TypeError, ValueError, IndexError):
            if self._synchronised():  # the other ranks wait in the sync: they hear of it there and raise too
                self._gather_sizes(0, _REFUSED_ARGUMENTS)
            raise
        # A crossed sample's distance becomes half its margin: NaN/inf/negative ones (a diverged model) are refused
        # before anything is written -- under DDP on every rank at once, so that no rank waits in the sync.
        bad = (~torch.isfinite(distance.detach()) | (distance.detach() < 0)) & crossed.to(distance.device)
        given = problem is not None  # the other ranks' errors say which kind of refusal this rank's was
        if problem is None and bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            problem = (f"MarginTable.update: expected finite distances >= 0 for crossed samples, got {int(bad.sum())} "
                       f"bad value(s), e.g. distance[{i}] = {float(distance[i]):.4g} (id {int(ids[i])})")
        if not self._synchronised():
            if problem:
                raise ValueError(problem)
            self.margins.index_copy_(0, ids, new)
        else:
            self._sync(ids, new, problem, given)
        return new

    def _synchronised(self):
        return (self.sync and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def _sync(self, ids, values, problem, given=False):
        """Every rank's (id, margin) pairs written on every rank in rank order; ValueError on every rank when any
        rank's update was refused (``problem``; ``given``: the caller's refusal, not the distances')."""
        group = self.process_group
        world = dist.get_world_size(group)
        comm = self._comm_device()
        # 0: not refused, 1: the distances, 2: the caller's refusal (IMA's NaN outputs)
        sizes = self._gather_sizes(ids.numel(), 0 if problem is None else 1 + given, problem)
        m = max(sizes)
        pad_ids = torch.full((m,), -1, dtype=torch.int64, device=comm)
        pad_ids[: ids.numel()] = ids.to(comm)
        pad_vals = torch.zeros(m, dtype=self.margins.dtype, device=comm)
        pad_vals[: values.numel()] = values.to(comm)
        all_ids = [torch.empty_like(pad_ids) for _ in range(world)]
        all_vals = [torch.empty_like(pad_vals) for _ in range(world)]
        dist.all_gather(all_ids, pad_ids, group=group)
        dist.all_gather(all_vals, pad_vals, group=group)
        for r in range(world):  # rank order: every rank applies the same writes in the same order
            k = sizes[r]
            self.margins.index_copy_(0, all_ids[r][:k].to(self.margins.device), all_vals[r][:k].to(self.margins.device))

    def _comm_device(self):
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.process_group) == "nccl" \
            else torch.device("cpu")

    def _gather_sizes(self, n, kind, problem=None):
        """Every rank's update size; ValueError when any rank's update was refused (``kind``: 0 none, 1 the
        distances, 2 the caller's refusal, ``_REFUSED_ARGUMENTS``: its arguments, whose error that rank raises
        itself, the others this one)."""
        group = self.process_group
        world = dist.get_world_size(group)
        size = torch.tensor([n, kind], dtype=torch.int64, device=self._comm_device())
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        kinds = [int(s[1]) for s in sizes]
        if any(kinds) and kind != _REFUSED_ARGUMENTS:
            why = {1: "non-finite or negative distances of crossed samples there",
                   2: "the caller refused the update there, e.g. IMA's NaN model outputs; that rank's error names "
                      "the samples",
                   _REFUSED_ARGUMENTS: "its ids or other arguments were refused there; that rank's error names them"}
            raise ValueError(problem or "MarginTable.update: refused on " + "; ".join(
                f"rank(s) {', '.join(str(r) for r in range(world) if kinds[r] == k)} ({why[k]})"
                for k in why if k in kinds))
        return [int(s[0]) for s in sizes]

    def state_dict(self):
        """``{"margins": a copy of the table}``, for :meth:`load_state_dict`."""
        return {"margins": self.margins.clone()}

    def load_state_dict(self, state):
        """Restore the margins of :meth:`state_dict`'s ``state``, ``{"margins": Tensor[num_samples]}``."""
        if not isinstance(state, dict) or set(state) != {"margins"}:
            raise ValueError(f"MarginTable.load_state_dict: expected a dict with the key 'margins', got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        m = state["margins"]
        if not torch.is_tensor(m) or m.shape != self.margins.shape:
            raise ValueError(f"MarginTable.load_state_dict: expected margins of shape {tuple(self.margins.shape)} "
                             f"(one per dataset sample), got {tuple(getattr(m, 'shape', ()))}")
        if not m.is_floating_point():
            raise ValueError(f"MarginTable.load_state_dict: expected floating-point margins, got {m.dtype}")
        self._load_margins(m, "MarginTable.load_state_dict", "max_margin",
                           hint=" (a checkpoint of a run with a larger max_margin?)")

    def _load_margins(self, m, caller, limit_name, hint=""):
        """Copy checked margins in; ``caller``, ``limit_name`` (what the caller calls max_margin) and ``hint`` word
        the errors."""
        bad = _bad_margins(m)
        if bad is not None:
            raise ValueError(f"{caller}: expected finite margins >= 0, got {bad}")
        above = _above_max(m, self.max_margin, self.margins.dtype)
        if above is not None:
            raise ValueError(f"{caller}: expected margins in [0, {limit_name}={self.max_margin!r}], got {above}{hint}")
        self.margins.copy_(m)


# ---------------------------------------------------------------------------------------------------------------------
# The defense


def paper_eps_train(sample_shape, norm="l2"):
    """Default eps_train from the paper's per-pixel rule (Section 3.3, Eq. 5): the per-element noise of CIFAR10's
    L2 eps = 3 over 3x32x32 inputs, i.e. eps_train = 3 * sqrt(d / 3072) for d = prod(sample_shape) (about 1.52 for
    1x28x28, 2.6 for PathMNIST's 3x28x28 which the paper rounds to 3) for ``norm="l2"`` (the default); 8/255 for
    ``norm="linf"`` (no rule in the paper)."""
    dims = tuple(sample_shape) if isinstance(sample_shape, (tuple, list, torch.Size)) else None
    # an int failed with "'int' object is not iterable", a negative size with "math domain error", a 0 returned 0.0
    if dims is None or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise ValueError(f"paper_eps_train: expected sample_shape to be a tuple of sizes >= 1 (one sample's shape, "
                         f"e.g. (1, 28, 28)), got {sample_shape!r}")
    if check_norm("paper_eps_train", norm) == "linf":
        return 8 / 255
    return 3.0 * math.sqrt(math.prod(sample_shape) / 3072)


def _check_margins_can_grow(name, eps_train, delta, source=""):
    """eps_train and delta > 0 (Algorithm 1: "a positive scalar" step; None is automatic, positive): with either 0
    no margin could ever grow (every one stays 0 from the default init_margin = delta), so GenAdv returned x unchanged
    and IMA trained on clean data only, at twice a forward's cost, without a word."""
    for arg, value, what in (("eps_train", eps_train, "the largest margin"),
                             ("delta", delta, "Algorithm 1's margin expansion step")):
        if value is not None and float(value) == 0:
            raise ValueError(f"{name}: expected {arg} > 0 ({what}), got {source}{arg}={value!r}: no margin could "
                             f"grow, GenAdv would return x unchanged and IMA would train on clean data only")


def _check_init_margin(name, init_margin, eps_train):
    """Margins start at init_margin and are clipped into [0, eps_train]: one above it was refused by MarginTable at
    the first batch, naming max_margin, an argument IMA does not have."""
    if init_margin is not None and init_margin > eps_train:
        raise ValueError(f"{name}: expected init_margin <= eps_train (margins are clipped into [0, eps_train]), got "
                         f"init_margin={init_margin!r} > eps_train={eps_train!r}")


def _adversarial_output(model, x, x_adv, sel):
    """f(x~) of the clean-correct samples ``sel`` in the model's (training) mode. One sample alone meets a
    training-mode batch-norm layer on a 1x1 map (vgg16 and densenet121 at 28x28, a BatchNorm1d head) as one value
    per channel, which torch refuses, so a batch with one clean-correct sample stopped training: that sample is then
    forwarded inside its batch (the other rows clean, their outputs dropped), after the batch-norm buffers that the
    failed forward moved are put back. Under DDP a forward is a collective, and one that failed cannot be followed by
    another on this process only: there a forward of the inner module without gradients finds out first."""
    if sel.numel() != 1 or x.shape[0] < 2:
        return model(x_adv)
    buffers = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
               for b in m.buffers()]
    if not buffers:
        return model(x_adv)
    saved = [b.clone() for b in buffers]
    try:
        if not distributed_run():
            return model(x_adv)
        # no gradients, the RNG streams forked (dropout) and the buffers put back: the trial leaves no trace
        with torch.no_grad(), torch.random.fork_rng(devices=[x_adv.device] if x_adv.is_cuda else []):
            unwrap(model)(x_adv)
    except ValueError as err:
        if not is_one_sample_batch_norm(err):
            raise
        _put_back(buffers, saved)
        return model(x.detach().index_copy(0, sel, x_adv)).index_select(0, sel)
    _put_back(buffers, saved)  # the statistics the trial forward moved under DDP
    return model(x_adv)


def _attacked_rows(clean_ok, margins):
    """IMA's attacked rows (the clean-correct ones, ``sel``) and what gen_adv reads of their ``margins``, in one host
    read: ``(largest, how many are positive)``, or None when one is negative or not finite (gen_adv then reads them
    and refuses them by its own check)."""
    positive = clean_ok & (margins > 0)
    bad = (~torch.isfinite(margins) | (margins < 0)) & clean_ok
    top = torch.where(clean_ok, margins, torch.zeros_like(margins)).max() if margins.numel() else margins.sum()
    n, n_positive, any_bad, widest = torch.stack(  # float64 holds the counts and the largest margin exactly
        (clean_ok.sum().double(), positive.sum().double(), bad.any().double(), top.double())).tolist()
    sel = _grouped((clean_ok,), (int(n),))[0]
    return sel, None if any_bad else (widest, int(n_positive))


def _put_back(buffers, saved):
    for b, value in zip(buffers, saved):
        # through .data: a copy_ bumped the buffers' version counters, and the clean forward's batch-norm backward
        # (which saved the running statistics) then failed with "modified by an inplace operation"
        b.data.copy_(value)


class IMA(Defense):
    r"""Increasing-Margin Adversarial training (Algorithm 1 for one mini-batch; Ma & Liang).

    For the batch with dataset ids ``ids``: the clean forward z = f(x) (in the model's current mode) gives L0; samples
    that z classifies correctly get x_adv = GenAdv(x, y, E(i)) (:func:`gen_adv`, attack in ``model_mode``) and L1 =
    L(f(x_adv)); the others use L1 = L0. The loss is ``mean((1 - beta) * L0 + beta * L1)`` (beta = 0.5 is the
    paper's (L0 + L1)/2). Margins: expand by ``delta`` when f(x_adv) is correct and no boundary was crossed; shrink to
    ``(||x - x_adv|| + E(i))/2`` when one was crossed (``strict_shrink=True`` also requires f(x_adv) wrong, the
    literal line 15, which with the correct-side search result rarely holds); clip into ``[0, eps_train]``.
    Samples misclassified clean keep their margin.

    Args:
        num_samples (int, optional): dataset length (margin table size); or call :meth:`setup` before training.
        eps_train (float, optional): the largest margin. Default: the paper's per-pixel rule, 3*sqrt(d/3072) for l2
            (PathMNIST 3x28x28 -> 2.6, the paper rounds to 3; BreastMNIST 1x28x28 -> 1.52), 8/255 for linf.
        delta (float, optional): the margin expansion step. Default: eps_train / 100 (the paper's CIFAR10 value 0.03
            for eps_train 3; PathMNIST uses 0.04): margins can reach eps_train after 100 epochs.
        init_margin (float, optional): initial E(i). Default: delta (Algorithm 1).
        beta (float): weight of the adversarial loss. Default: 0.5.
        norm (str): "l2" (default, the paper's classification setting) or "linf" (any case).
        steps, search_steps, arity, algorithm: see :func:`gen_adv` (K = 20, N = 10, bisection, Algorithm 2).
        model_mode (str): the model's mode during GenAdv. Default: "eval".
        is_correct, loss_fn: criterion and per-sample loss (defaults: argmax == y and cross-entropy).
        compact, batch_exit (bool): active-set compaction in GenAdv (default True); for the masked form, whether it
            stops once the whole batch has finished (default True).
        min_rows (int, optional): pad GenAdv's forwards to at least this many rows so their float32 results do not
            depend on how many samples are still active (see :func:`gen_adv`). Default: measured per model in eval
            mode (:func:`batch_invariant_sizes`), else 0.
        clip_min, clip_max (float): valid input range. Default: [0, 1].
        search_result (str): "correct_side" (default) or "midpoint", as :func:`gen_adv`'s.
        sync (bool): under torch.distributed, share every margin update between the ranks (default True;
            :class:`MarginTable`); False merges the tables at each epoch's end.
        backend (str, optional): backend of GenAdv's ops, as :func:`gen_adv`'s.

    Calling it, ``ima(model, x, y, ids)`` with ``ids`` (LongTensor[N]) the batch's dataset ids (required: wrap the
    dataset in :class:`robust_ops.data.IndexedDataset`), updates the margins of ``ids`` and returns a
    ``DefenseOutput`` with the loss, the clean logits and metrics (margin_mean, clean_acc; adv_acc and crossed over
    the attacked samples).
    """

    name = "ima"
    needs_ids = True
    # eps_train / delta / init_margin are compared (or taken when not given) by load_state_dict; num_samples is
    # checked by fit; table and counter are state.
    _not_options = ("eps_train", "delta", "init_margin", "num_samples", "table", "counter")

    def __init__(self, num_samples=None, *, eps_train=None, delta=None, init_margin=None, beta=0.5, norm="l2",
                 steps=20, search_steps=10, arity=2, algorithm=2, model_mode="eval", clip_min=0.0, clip_max=1.0,
                 is_correct=None, loss_fn=None, strict_shrink=False, compact=True, search_result="correct_side",
                 batch_exit=True, sync=True, backend=None, min_rows=None, **unknown):
        if unknown:  # Python's own TypeError listed nothing, where build() and the other defenses list the options
            check_options(type(self).__name__, type(self), unknown)
        name = self.name  # as the other defenses name themselves ('at: ...'): the --defense name
        norm = check_norm(name, norm)
        # a 0-d tensor is read as its value, as the attacks' and the other defenses' eps (scalar_value)
        beta, eps_train, delta, init_margin = (scalar_value(name, arg, v) for arg, v in (
            ("beta", beta), ("eps_train", eps_train), ("delta", delta), ("init_margin", init_margin)))
        beta = check_real(name, "beta", beta, minimum=0, maximum=1)
        # radii, in the attacks' and the other defenses' words (a TypeError for text or a bool); None is automatic
        for arg, v in (("eps_train", eps_train), ("delta", delta), ("init_margin", init_margin)):
            if v is not None:
                check_number(name, arg, v, n=None)
        _check_margins_can_grow(name, eps_train, delta)
        check_int(name, "steps", steps, 0)
        _check_arity(name, arity, check_int(name, "search_steps", search_steps, 0))
        if algorithm not in ALGORITHMS:
            raise ValueError(f"{name}: expected algorithm to be 2 or 3, got {algorithm!r}")
        # Checked here rather than at the first batch, where the error would name gen_adv.
        check_real(name, "clip_min", clip_min)
        check_real(name, "clip_max", clip_max, minimum=clip_min)
        if eps_train is not None:
            check_linf_budget(name, norm, torch.tensor([float(eps_train)]), float(clip_min), float(clip_max),
                              arg="eps_train")
            _check_init_margin(name, init_margin, eps_train)
        _check_options(name, backend, is_correct, loss_fn, {"strict_shrink": strict_shrink, "compact": compact,
                                                            "batch_exit": batch_exit, "sync": sync},
                       search_result, model_mode)
        self.eps_train = None if eps_train is None else float(eps_train)
        self.delta = None if delta is None else float(delta)
        # Given values must match a checkpoint's; automatic ones (None) are taken from it (load_state_dict).
        self._given = {"eps_train": self.eps_train, "delta": self.delta}
        self.init_margin = None if init_margin is None else float(init_margin)
        self._given_init_margin = self.init_margin
        self.beta, self.norm = float(beta), norm
        self.steps, self.search_steps, self.arity, self.algorithm = steps, search_steps, arity, algorithm
        self.model_mode, self.clip_min, self.clip_max = model_mode, clip_min, clip_max
        self.strict_shrink, self.compact, self.search_result = strict_shrink, compact, search_result
        self.batch_exit = batch_exit
        self.sync, self.backend = sync, backend
        self.min_rows = None if min_rows is None else check_int(name, "min_rows", min_rows, 0)
        # "train" couples the samples whatever the model; "keep" depends on the model's modes (gen_adv checks it)
        _check_min_rows(name, self.min_rows, model_mode == "train")
        self._is_correct, self._loss_fn = is_correct, loss_fn
        self.num_samples = None if num_samples is None else check_int(name, "num_samples", num_samples, 1)
        self._given_num_samples = self.num_samples  # fit's setup() sizes an unset one to its train_data
        self.table = None
        self.counter = PassCounter()

    def setup(self, num_samples):
        """Size the margin table to the training set (``len(dataset)``); called by the trainer if not given."""
        n = check_int(self.name, "num_samples", num_samples, 1)
        if self.table is not None and len(self.table) != n:
            raise ValueError(f"{self.name}: the margin table holds {len(self.table)} samples, got num_samples={n}")
        self.num_samples = n

    def _resolve(self, x):
        if self.eps_train is None:
            self.eps_train = paper_eps_train(tuple(x.shape[1:]), self.norm)
        if self.delta is None:
            self.delta = self.eps_train / 100
        if self.init_margin is None:
            self.init_margin = min(self.delta, self.eps_train)
        _check_init_margin(self.name, self.init_margin, self.eps_train)
        if self.table is None:
            if self.num_samples is None:
                raise ValueError(f"{self.name}: the margin table needs the training set size: pass "
                                 "num_samples=len(train_set) or call defense.setup(len(train_set)) before the first "
                                 "batch")
            # x's precision (at least float32): a float32 table rounded float64 runs' margins, so one clipped at
            # eps_train 0.1 was 0.10000000149 and GenAdv's points lay outside the eps_train ball
            self.table = MarginTable(self.num_samples, self.init_margin, self.eps_train, self.norm,
                                     device=x.device, dtype=torch.promote_types(x.dtype, torch.float32),
                                     sync=self.sync)

    @property
    def margins(self):
        return None if self.table is None else self.table.margins

    def __repr__(self):
        # the options as given, as the other defenses' reprs: table and counter are run state, and the first batch
        # (or fit's setup) fills in eps_train, delta, init_margin and num_samples, so the same IMA printed differently
        # before and after training
        given = {"eps_train": self._given["eps_train"], "delta": self._given["delta"],
                 "init_margin": self._given_init_margin, "num_samples": self._given_num_samples}
        shown = {k: given.get(k, v) for k, v in vars(self).items()
                 if not k.startswith("_") and k not in ("table", "counter") and not torch.is_tensor(v)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __call__(self, model, x, y, ids=None):
        """Algorithm 1 on one batch of ``model``: x (Tensor[N, ...]), y (labels [N]), ids (LongTensor[N], required:
        the samples' dataset ids); updates their margins and returns a ``DefenseOutput`` (the class docstring)."""
        if ids is None:
            raise ValueError(f"{self.name}: needs the dataset ids of the batch (wrap the dataset in "
                             "robust_ops.data.IndexedDataset so batches are (x, y, ids))")
        if not torch.is_tensor(ids) or ids.dim() != 1 or ids.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: expected ids of shape [{x.shape[0]}] (one id per sample), got "
                             f"{tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__}")
        # checked before the clean loss, whose own error names neither IMA nor y
        y, label_range = _check_batch(self.name, x, y, self.clip_min, self.clip_max, self._is_correct, self._loss_fn)
        # before the margin table is made: made under inference_mode it became an inference tensor, so after
        # gen_adv's refusal (or a batch with no sample to attack, which ran) every later batch failed with "Inplace
        # update to inference tensor outside InferenceMode is not allowed"
        check_gradients_possible(self.name)
        self._resolve(x)
        # checked once, on the CPU where a DataLoader yields them (no GPU sync); the table's own calls below skip it
        ids = self.table.check_ids(ids, self.name).to(x.device)
        loss_fn = self._loss_fn or per_sample_ce
        criterion = self._is_correct or _default_is_correct

        out = model(x)
        for arg, given in (("is_correct", self._is_correct), ("loss_fn", self._loss_fn)):
            if given is None:
                _check_default_output(self.name, out, x.shape[0], arg)
        if self._is_correct is None or self._loss_fn is None:
            # a binary model's 1/2 labels trained on a BCE target of 2; the labels' range as _check_batch read it
            check_labels_against(self.name, y, out, label_range=label_range)
        l0 = _loss_result(self.name, loss_fn(out, y), x.shape[0])
        clean_ok = _criterion_result(self.name, criterion(out.detach(), y), x.shape[0])
        margins = self.table.margins.index_select(0, ids.to(self.table.margins.device)).to(
            device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        sel, margin_read = _attacked_rows(clean_ok, margins)
        l1 = l0
        # tensors, read back together at the end (metric_values: one host read); the mean of the margins before this
        # batch's update
        metrics = {"margin_mean": self.table.margins.mean().to(x.device), "clean_acc": clean_ok.float().mean()}
        attacked = {}  # adv_acc and crossed are means over the attacked samples: fit weighs them by their number
        problem = None
        if sel.numel():
            xs, ys = x.index_select(0, sel), y.index_select(0, sel)
            counts = {}
            try:
                # the rows of the batch checked above: gen_adv's own check of them read the same values again
                x_adv, crossed, info = _gen_adv(
                    "gen_adv", self.compact, model, xs, ys, margins.index_select(0, sel), steps=self.steps,
                    norm=self.norm, search_steps=self.search_steps, algorithm=self.algorithm,
                    is_correct=self._is_correct, loss_fn=self._loss_fn, arity=self.arity, clip_min=self.clip_min,
                    clip_max=self.clip_max, model_mode=self.model_mode, search_result=self.search_result,
                    counter=self.counter, return_info=True, backend=self.backend, batch_exit=self.batch_exit,
                    min_rows=self.min_rows, label_range=label_range, host_counts=counts, margin_read=margin_read,
                )
                # Samples the attack's mode finds wrong at x itself are treated as misclassified clean (L1 = L0).
                keep, kept = info.clean_correct, counts.get("clean_correct")
            except _NaNSamples as err:
                # named by dataset id and raised by the margin update below, which under DDP raises on every rank
                # together (this rank still takes the batch's other collective steps, with x_adv = x)
                problem = err.naming(f"dataset id(s) {listing(ids[sel[err.positions]].tolist(), 8)}", self.name)
                x_adv, crossed = xs, torch.zeros(sel.numel(), dtype=torch.bool, device=x.device)
                keep, kept = torch.ones_like(crossed), sel.numel()
            # the rows found once, where indexing the five with the mask ran five; by the count gen_adv's compacted
            # steps read (no read here), the masked loop's with a read
            at = _rows(keep) if kept is None else _grouped((keep,), (kept,))[0]
            sel, xs, ys, x_adv, crossed = (t.index_select(0, at) for t in (sel, xs, ys, x_adv, crossed))
        else:
            crossed = torch.zeros(0, dtype=torch.bool, device=x.device)
        if not sel.numel() and distributed_run():
            # Keep one adversarial forward per step on every rank (a DDP forward is a collective): a zero-weight
            # forward of the clean batch when this rank has no correctly classified sample (not of one sample:
            # training-mode BatchNorm1d refuses a batch of one, which the single-process run never forwards).
            l1 = l0 + 0 * _loss_result(self.name, loss_fn(model(x), y), x.shape[0]).sum()
        if sel.numel():
            out_adv = _adversarial_output(model, x, x_adv, sel)
            l1_sel = _loss_result(self.name, loss_fn(out_adv, ys), sel.numel())
            l1 = l0.index_put((sel,), l1_sel)
            adv_ok = _criterion_result(self.name, criterion(out_adv.detach(), ys), sel.numel())
            shrink = crossed & ~adv_ok if self.strict_shrink else crossed
            expand = adv_ok & ~crossed
            distance = sample_distance(x_adv, xs, self.norm)
            metrics.update(adv_acc=adv_ok.float().mean(), crossed=crossed.float().mean())
            attacked = {"adv_acc": sel.numel(), "crossed": sel.numel()}
        else:
            shrink = expand = torch.zeros(0, dtype=torch.bool, device=x.device)
            distance = torch.zeros(0, device=x.device)
        # Every rank calls update once per batch (possibly with no ids) so the margin sync stays collective.
        self.table._update(ids[sel].to(self.table.margins.device), adv_correct=expand, crossed=shrink,
                           distance=distance, delta=self.delta, problem=problem, ids_checked=True)
        loss = ((1 - self.beta) * l0 + self.beta * l1).mean()
        metrics["loss"] = loss  # last, where fit would add it, read with the others (fit read it on its own)
        return DefenseOutput(loss=loss, logits=out.detach(), metrics=metric_values(**metrics), metric_counts=attacked)

    def holds_state(self):
        """A margin table, or settings resolved by an earlier run (a num_samples fit sized, eps_train from a batch)."""
        return self.table is not None or (self.num_samples, self.eps_train, self.delta, self.init_margin) != (
            self._given_num_samples, self._given["eps_train"], self._given["delta"], self._given_init_margin)

    def reset_state(self):
        """No margin table and the num_samples / eps_train / delta / init_margin given to the constructor (unset ones
        are sized or resolved again from the next training set and batch): the state of a newly built IMA."""
        self.table, self.num_samples = None, self._given_num_samples
        self.eps_train, self.delta = self._given["eps_train"], self._given["delta"]
        self.init_margin = self._given_init_margin

    def state_dict(self):
        """The margin table and the settings it was made with; ``{}`` before the first batch (no table yet)."""
        if self.table is None:
            return {}
        return {"margins": self.table.margins.clone(), "eps_train": self.eps_train, "delta": self.delta,
                "init_margin": self.init_margin, "norm": self.norm}

    def merge_distributed_state(self, states, start_state):
        """The trainer's end-of-epoch merge hook (robust_ops.train): with ``sync`` the tables already agree on every
        rank; without it each margin takes the value of the rank that changed it (the highest such rank if several
        did), as the per-update sync would have. ``states``: each rank's :meth:`state_dict`, in rank order;
        ``start_state``: the state at the epoch's start. Returns the merged state."""
        merged = dict(states[0])
        if self.sync or not merged:
            return merged
        start = start_state.get("margins") if start_state else None
        if start is None:
            start = torch.full_like(merged["margins"], merged["init_margin"])
        result = start.clone()
        for state in states:
            m = state["margins"].to(start.device)
            result = torch.where(m != start, m, result)
        merged["margins"] = result
        return merged

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` gave (``state``); ``{}`` resets to a newly built IMA's state."""
        if not state:  # what state_dict() gives before the first batch: no table (a used IMA's would stay silently)
            self.reset_state()
            return
        missing = {"margins", "eps_train", "delta", "init_margin"} - set(state)
        if missing:
            raise ValueError(f"IMA.load_state_dict: missing keys {sorted(missing)}")
        margins = state["margins"]
        if not torch.is_tensor(margins) or not margins.is_floating_point() or margins.dim() != 1:
            got = f"{margins.dtype} {tuple(margins.shape)}" if torch.is_tensor(margins) else type(margins).__name__
            raise ValueError(f"IMA.load_state_dict: expected margins to be a 1-D float tensor, got {got}")
        if self.num_samples is not None and margins.shape != (self.num_samples,):
            raise ValueError(f"IMA.load_state_dict: expected margins of shape [{self.num_samples}] (the training set "
                             f"size), got {tuple(margins.shape)}")
        # Margins are radii in the checkpoint's norm: an l2 eps_train of 1.5 read as linf covers the whole image.
        # (Checkpoints written before the norm was recorded have no "norm" and pass.)
        if state.get("norm", self.norm) != self.norm:
            raise ValueError(f"IMA.load_state_dict: the checkpoint's margins are {state['norm']} radii, this defense "
                             f"has norm={self.norm!r}; pass norm={state['norm']!r}")
        # init_margin too: one given on resume was dropped for the checkpoint's without a word, as no other setting
        for arg, given in {**self._given, "init_margin": self._given_init_margin}.items():
            # A resumed run continues with the checkpoint's values: refuse to train silently with other ones.
            if given is not None and float(state[arg]) != given:  # one fit can name in its caller's words
                raise StateSettingError(arg, float(state[arg]), given,
                                        f"IMA.load_state_dict: the checkpoint was trained with {arg}="
                                        f"{float(state[arg])!r}, this defense has {arg}={given!r}; pass the "
                                        f"checkpoint's value (or leave {arg} unset to take it)")
        eps_train = float(state["eps_train"])
        delta, init_margin = float(state["delta"]), float(state["init_margin"])
        _check_margins_can_grow("IMA.load_state_dict", eps_train, delta, "the checkpoint's ")
        # An existing table keeps its device: all_gather_object (the trainer's epoch merge) unpickles rank 0's
        # margins onto rank 0's GPU on every rank.
        device = margins.device if self.table is None else self.table.margins.device
        # Build the new table before changing anything, so a refused checkpoint leaves this defense as it was.
        table = MarginTable(margins.shape[0], init_margin, eps_train, self.norm, device=device, dtype=margins.dtype,
                            sync=self.sync)
        table._load_margins(margins, "IMA.load_state_dict", "eps_train")
        self.eps_train, self.delta, self.init_margin = eps_train, delta, init_margin
        self.num_samples, self.table = margins.shape[0], table
