"""The contract every defense follows: a small object that computes one batch's loss and keeps its own state."""

import functools
from dataclasses import dataclass, field

import torch

from .._options import python_number
from ..attacks.context import labels_read_once, one_sample_batch_norm_error


@dataclass
class DefenseOutput:
    """What a defense returns for one batch.

    loss: the scalar the trainer calls ``.backward()`` on.
    logits: clean logits when the defense computed them (used for the training accuracy), shaped as the model's
        output for x (fit refuses others), else None.
    extra_grads: parameter gradients computed already (MIRST's reuse of the attack's backward passes), in the order
        of ``[p for p in model.parameters() if p.requires_grad]``; the trainer adds them to ``.grad`` (an entry None:
        that parameter's ``.grad`` is left as the loss's backward made it). None if unused.
    metrics: numbers (floats or one-element tensors) for the progress bar and the metrics CSV; fit refuses others.
    metric_counts: for a metric that is a mean over some of the batch's samples only (IMA's adv_acc and crossed:
        the attacked ones), how many (an int >= 0); fit then weighs the batch's value by it, so the epoch's value is
        the mean over those samples (also under DDP, where the processes' shares differ). Metrics not named here
        weigh the batch's sample count.
    """

    loss: torch.Tensor
    logits: torch.Tensor = None
    extra_grads: list = None
    metrics: dict = field(default_factory=dict)
    metric_counts: dict = field(default_factory=dict)


def _plain(value):
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    # a numpy scalar (np.float32 from a np.linspace sweep) was no option: recorded and compared on resume never
    return value is None or isinstance(python_number(value), (bool, int, float, str))


def _as_tuples(value):  # emit=[2, 4] and emit=(2, 4) are the same setting; np.float32(0.5) and 0.5 too
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (tuple, list)) else python_number(value)


class StateSettingError(ValueError):
    """A defense's ``load_state_dict`` refusing a state made under another setting than the defense's own (IMA's
    checkpoint trained with delta=0.25, a defense built with delta=0.125). ``option`` (the defense's option that sets
    it), ``saved`` (the state's value) and ``now`` (the defense's) let fit refuse the resume as a ResumeMismatchError
    of its defense options, which ``robust-ops train --resume`` words with ``--defense-opt``."""

    def __init__(self, option, saved, now, message):
        self.facts = (option, saved, now, message)
        self.option, self.saved, self.now = option, saved, now
        super().__init__(message)

    def __reduce__(self):  # with the instance's __dict__, as a plain exception's: its __notes__ and attributes
        return type(self), self.facts, self.__dict__


def _refuse_a_forward_never_called(cls):
    """nn.Module's habit: class MyAT(AT) with its batch's loss in forward trained as AT, forward never called (fit
    calls the defense, robust_ops' __call__). A TypeError when the forward found first comes before the __call__
    that runs in ``cls``'s MRO, that __call__ being robust_ops' own: one in robust_ops.ima (IMA's), and a mixin's
    forward, class MyAT(Mixin, AT), were taken without a word until 2026-12-07. A forward below a __call__ of the
    user's own (which may call it), or nn.Module's __call__ first (which does), is left alone."""
    mro = cls.__mro__
    forward = next((i for i, k in enumerate(mro) if "forward" in vars(k)), None)
    call = next(i for i, k in enumerate(mro) if "__call__" in vars(k))
    if forward is not None and forward < call and mro[call].__module__.split(".")[0] == __name__.split(".")[0]:
        what = "defines forward" if forward == 0 else f"takes forward from {mro[forward].__name__}"
        raise TypeError(f"{cls.__name__}: {what}, which fit never calls: a defense computes a batch in "
                        f"__call__(self, model, x, y, ids=None) ({mro[call].__name__}'s would run); rename forward to "
                        "__call__")


class Defense:
    """Base class. Subclasses set ``name`` and implement ``__call__(model, x, y, ids=None) -> DefenseOutput``."""

    name = "defense"
    needs_ids = False  # batches must carry dataset sample ids (IMA)
    binary_only = False  # ARFL

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__call__" in vars(cls):  # each defense's own forwards (and a user's defense's) name it
            cls.__call__ = _reading_labels_once(_naming_one_sample_batch_norm(vars(cls)["__call__"]))
        else:
            _refuse_a_forward_never_called(cls)

    def __new__(cls, *args, **kwargs):
        # the attack classes take the model first (AT(model) as PGD(model)): it landed in the first option (SAT's
        # alpha, IMA's num_samples) and met a check printing the whole module, or Python's positional-count TypeError
        if any(isinstance(a, torch.nn.Module) for a in args):  # options by keyword keep their own checks (ARFL's layer)
            # the call named fit(model, data, defense=...), which fit refuses: its defense is the second argument
            raise TypeError(f"{cls.__name__}: takes no model (it gets one with each batch: {cls.__name__}(...)(model, "
                            f"x, y), as fit(model, {cls.__name__}(...), train_data) passes it); give its options by "
                            "keyword")
        return super().__new__(cls)

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput: ``model`` is fit's model (DDP-wrapped under torch.distributed: attacks
        run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N] (int64 class indices), ``ids`` the
        samples' dataset ids (a tensor [N] when ``needs_ids`` is True, else None). Subclasses implement it; the base
        class raises NotImplementedError."""
        raise NotImplementedError

    def check_labels(self, y, num_classes):
        """fit's check that this defense is defined for the task: ValueError when ``binary_only`` is True and
        ``num_classes`` (the dataset's class count) is not 2. ``y`` (the training labels) is unused here; a subclass
        may check it."""
        if self.binary_only and num_classes != 2:
            raise ValueError(f"{self.name}: defined for binary tasks only, got {num_classes} classes")

    def state_dict(self):
        """Defense state for checkpoints (tensors and plain values only); stateless defenses return {}."""
        return {}

    def load_state_dict(self, state):
        """Restore ``state``, a dict from ``state_dict()`` (a checkpoint's); a stateless defense takes only {} and
        raises ValueError naming the keys of any other."""
        if state:
            raise ValueError(f"{self.name}: this defense keeps no state, got keys {sorted(state)}")

    def holds_state(self):
        """Whether this object holds run state (IMA's margins, DPAAT's running mean) from an earlier run: ``fit``
        refuses to start a fresh run from it (it resumes from a checkpoint's instead). Stateless defenses: never."""
        return False

    def reset_state(self):
        """Back to the state of a newly built defense (``holds_state()`` then False); stateless defenses have
        nothing to do."""

    def options(self):
        """The settings that shape training, as plain values: public attributes holding a number, string, bool, None or
        a tuple/list of these. ``fit`` records them in its checkpoints and refuses to resume under other ones;
        callables, modules and tensors given as options are not compared."""
        return {k: _as_tuples(v) for k, v in vars(self).items() if not k.startswith("_") and k not in self._not_options
                and _plain(v)}

    _not_options = ()  # public attributes that are state or checked elsewhere, not settings to compare

    def __repr__(self):
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_") and not torch.is_tensor(v)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def _naming_one_sample_batch_norm(call):
    """A defense's ``__call__`` whose batch of 1 sample met the model's training-mode batch norm: torch's "Expected
    more than 1 value per channel when training" (from the defense's training forwards, or an attack's in
    model_mode="train") named neither the defense nor the fix; it is a OneSampleBatchNormError naming both (fit
    words its own from it)."""

    @functools.wraps(call)
    def checked(self, *args, **kwargs):  # the call's own parameters: a user's may name them other than model and x
        try:
            return call(self, *args, **kwargs)
        except ValueError as err:
            x = args[1] if len(args) > 1 else kwargs.get("x")  # the batch, as fit passes it (else not reworded)
            reworded = one_sample_batch_norm_error(getattr(self, "name", type(self).__name__), err, x, defense=True)
            if reworded is None:
                raise
            raise reworded from None

    return checked


def _reading_labels_once(call):
    """A defense's ``__call__`` under labels_read_once: its labels() check and its attacks' label checks read the
    labels' range once (a host read, a GPU sync), not once each; in fit, none after fit's own check."""

    @functools.wraps(call)
    def reading_once(*args, **kwargs):
        with labels_read_once():
            return call(*args, **kwargs)

    return reading_once
