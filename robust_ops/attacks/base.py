"""torchattacks-style attack objects: ``Attack(model, **options)(x, y) -> x_adv``, thin wrappers of the functions."""

import inspect
import itertools
import threading

import torch

from .._options import accepted_options, check_flags, check_options, check_real
from .context import (_NO_LABELS, MODEL_MODES, attack_context, check_class_labels, check_inputs, check_model,
                      is_single_logit, two_logits)
from .core import NORMS, check_labels_against, foreign_name_hints, forward, labels_made_by


# ids of the attacks whose forward runs in this thread, innermost last: their forward's labels are already targets
_forwarding = threading.local()


def _refuse_positional(cls_name, model, positional):
    if isinstance(model, str) and len(positional) == 1:  # a port of torchattacks' Attack.__init__(self, name, model)
        raise TypeError(f"{cls_name}: Attack.__init__ takes (model, **options), not torchattacks' (name, model); "
                        f"call super().__init__(model, **options) and set the class attribute name = {model!r}")
    raise TypeError(f"{cls_name}: Attack.__init__ takes the model and keyword options only, got "
                    f"{1 + len(positional)} positional arguments; call super().__init__(model, **options)")


def refuse_positional_options(name, cls, positional, hint=""):
    """One refusal of option values given positionally past those ``cls.__init__`` takes so (``positional``, its
    ``*positional``), naming them and the keyword way: Python's "takes from 2 to 6 positional arguments but 7 were
    given" named no option. ``hint`` follows "pass them by name" (an example, another library's order)."""
    if not positional:
        return
    takes = [p.name for p in inspect.signature(cls.__init__).parameters.values()
             if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]
    n = len(positional)
    raise TypeError(f"{name}: {cls.__name__} takes {', '.join(takes[:-1])} and {takes[-1]} positionally and its other "
                    f"options by keyword, got {n} more positional argument{'s' * (n > 1)} "
                    f"({', '.join(map(repr, positional))}); pass them by name{hint}")


def norm_first_hint(cls_name):
    """refuse_positional_options' hint for a class whose torchattacks namesake takes norm before eps."""
    return f", e.g. {cls_name}(model, eps=8/255, norm='Linf', ...) (torchattacks' {cls_name} takes norm before eps)"


# APGDT's and AutoAttack's hint for torchattacks' n_classes (both refuse it with this text)
N_CLASSES_HINT = "torchattacks' n_classes=K is n_target_classes=K - 1 here"


def option_hints(cls):
    """The ways check_options names for options ``cls`` does not take: torchattacks' (``_FOREIGN_OPTIONS``), and the
    other libraries' names of its options (core.FOREIGN_NAMES: the defenses' step_size for a class with a step
    ``alpha``, advertorch's nb_iter for one with ``steps``, ...; PGD(model, step_size=0.01) listed the options only)."""
    return {**foreign_name_hints(accepted_options(cls)), **(getattr(cls, "_FOREIGN_OPTIONS", None) or {})}


class _NotHere:
    """A torchattacks method that has no counterpart here, read on an attack class as on an instance: torchattacks'
    load is a staticmethod, so a port calls ``PGD.load(path)``, which met Python's bare "type object 'PGD' has no
    attribute 'load'" where an instance names the way (a descriptor, not a metaclass: a subclass may mix in abc.ABC)."""

    def __set_name__(self, owner, key):
        self.key = key

    def __get__(self, obj, cls=None):
        owner = cls if cls is not None else type(obj)
        raise AttributeError(f"{owner.name}: torchattacks' {self.key} does not exist here: "
                             f"{Attack._TORCHATTACKS[self.key]}")


class Attack:
    """Base class. Subclasses set ``name`` and implement ``forward(x, y) -> x_adv`` with the functional attack.

    Options every attack understands (torchattacks' names where they exist):
      * ``model_mode``: "eval" (default), "train" or "keep"; ``set_model_mode(mode)`` changes it.
      * ``targeted``: labels given to ``__call__`` are target classes; ``set_mode_targeted_by_label()`` /
        ``set_mode_default()`` switch it.
      * ``clip_min``, ``clip_max``: the valid input range (default [0, 1]).

    torchattacks' ``set_mode_targeted_random()``, ``set_mode_targeted_least_likely(kth_min)``,
    ``set_mode_targeted_by_function(fn)``, ``device``, ``get_logits(x)`` and ``get_target_label(x, y)`` work as there
    (``set_device`` raises: the attack runs on its inputs' device); ``set_model_training_mode(...)`` maps to
    ``model_mode`` (its default train mode, BatchNorm and Dropout in eval, raises: see the method);
    ``set_normalization_used`` raises (wrap the model with :class:`Normalized`). See docs/attacks.md, "Porting
    torchattacks / AutoAttack code".

    Raises, when called (``attack(x, y)``): NonFiniteInputError, NonFiniteOutputError, InputDtypeError,
    InputDeviceError and InputShapeError, as :func:`run_pgd`.
    """

    name = "attack"
    supports_targeted = True
    # differentiates the model: an ensemble refuses such an attack under torch.inference_mode() before any runs, in
    # its own name (AutoAttack's was refused in apgd-ce's, after the clean check)
    uses_gradients = False
    # The norms the attack takes (NORMS_WITH_L1 where L1 is implemented), read before an attack is built
    # (evaluate's specs check a spec's norm with it)
    norms = NORMS

    # torchattacks 3.5.1's Attack methods and attributes that have no counterpart here (and set_return_type, of its
    # earlier releases): a port calling one met Python's bare "'PGD' object has no attribute 'save'"; each is an
    # AttributeError naming what to use instead
    _TORCHATTACKS = {
        **dict.fromkeys(("save", "load"),
                        "collect x_adv = atk(x, y) over the loader and torch.save the tensors yourself (robust-ops "
                        "eval scores a run's test split)"),
        **dict.fromkeys(("get_mode", "attack_mode"),
                        "read atk.targeted (set by set_mode_targeted_* and set_mode_default) and atk.model_mode"),
        "set_model": "build the attack again for the other model",
        "model_name": "type(atk.model).__name__ is the model's class name",
        "attack": "the attack's name is atk.name",
        **dict.fromkeys(("normalize", "inverse_normalize", "normalization_used"),
                        "attacks take and return pixel inputs in [clip_min, clip_max]; wrap the model instead, "
                        "attacks.Normalized(model, mean, std)"),
        "get_output_with_eval_nograd": "under torch.no_grad(), atk.get_logits(x) in a forward (it runs in "
                                       "atk.model_mode, eval by default), or robust_ops.models.predict(model, x)",
        **dict.fromkeys(("get_least_likely_label", "get_random_target_label"),
                        "call set_mode_targeted_least_likely(kth_min) or set_mode_targeted_random(), then "
                        "atk.get_target_label(x, y)"),
        **dict.fromkeys(("set_return_type", "return_type"),
                        "x_adv is always a float tensor; (x_adv * 255).round().to(torch.uint8) gives bytes"),
    }

    # torchattacks' and AutoAttack's constructor options that no attack here takes: the unknown-option error lists the
    # options, but not that n_classes=10 means n_target_classes=9, or that verbose has nothing to switch; subclasses
    # add their own (Square, APGDT, AutoAttack)
    _FOREIGN_OPTIONS = {
        "verbose": "nothing is printed here, drop it",
        "device": "an attack runs on its inputs' device, so give x and y on the model's device",
    }

    save, load = _NotHere(), _NotHere()  # on the class too: torchattacks' load is a staticmethod

    def __getattr__(self, key):  # only for attributes not found otherwise
        if key in Attack._TORCHATTACKS:
            raise AttributeError(f"{type(self).name}: torchattacks' {key} does not exist here: "
                                 f"{Attack._TORCHATTACKS[key]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def __init__(self, model, *positional, targeted=False, model_mode="eval", clip_min=0.0, clip_max=1.0, **unknown):
        if positional:  # Python's own error ("takes 2 positional arguments but 3 were given") said nothing of the fix
            _refuse_positional(type(self).__name__, model, positional)
        if unknown:  # Python's own error named Attack.__init__, not the class called, and listed nothing
            check_options(type(self).__name__, type(self), unknown, option_hints(type(self)))
        check_model(type(self).__name__, model)
        self.model = model
        self.targeted = False
        self._target_rule = None  # None: labels are targets; "random", "least_likely" or a callable: made from them
        self._kth_min = 1
        check_flags(self.name, {"targeted": targeted})  # targeted="no" ran a targeted attack
        if targeted:
            self.set_mode_targeted_by_label()
        self.set_model_mode(model_mode)
        self.clip_min = check_real(self.name, "clip_min", clip_min)  # float() took True as 1.0 and "0.1" as 0.1
        self.clip_max = check_real(self.name, "clip_max", clip_max, minimum=self.clip_min)

    def check_input_dtype(self, x):
        """Raise when this attack cannot run on ``x``'s dtype; ensembles ask every attack before running any (so a
        cascade does not fail at its third attack after minutes of the first two). Default: every float dtype."""

    def check_input_shape(self, x):
        """Raise when this attack cannot run on ``x``'s shape (Square: images ``[N, C, H, W]`` only); ensembles ask
        every attack before running any, as for the dtype. Default: any shape."""

    def set_model_mode(self, model_mode):
        """The model's mode during the attack: "eval", "train" or "keep" (its current modes)."""
        if model_mode not in MODEL_MODES:
            raise ValueError(f"{self.name}: expected model_mode to be one of {', '.join(MODEL_MODES)}, "
                             f"got {model_mode!r}")
        self.model_mode = model_mode
        return self

    def set_model_training_mode(self, model_training=False, batchnorm_training=False, dropout_training=False):
        """torchattacks' switch, mapped to ``model_mode``: eval (``model_training=False``, the others then unread), or
        train (``model_training``, ``batchnorm_training`` and ``dropout_training`` all True); other combinations raise.
        torchattacks' default train mode (BatchNorm / Dropout kept in eval) is a state of the model, not a mode:
        set it on the model and use ``set_model_mode("keep")``."""
        if not model_training:
            return self.set_model_mode("eval")
        if batchnorm_training and dropout_training:
            return self.set_model_mode("train")
        raise ValueError(f"{self.name}: set_model_training_mode(model_training=True) with batchnorm_training="
                         f"{batchnorm_training}, dropout_training={dropout_training} has no model_mode; put the "
                         "model in that state yourself and call set_model_mode('keep')")

    def set_normalization_used(self, mean, std):
        """Refused: torchattacks' takes normalized inputs and returns normalized adversarial inputs, while every
        attack here works on pixel inputs in [clip_min, clip_max]; a method that did either silently would hand back
        inputs in the other space. Wrap the model instead: ``Normalized(model, mean, std)``."""
        raise ValueError(f"{self.name}: set_normalization_used is not supported (torchattacks' takes and returns "
                         "normalized inputs); wrap the model instead, attacks.Normalized(model, mean, std), and pass "
                         "inputs in [0, 1]")

    @property
    def device(self):
        """The device of the model's first parameter or buffer (cpu for a model without any), as torchattacks."""
        first = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    def set_device(self, device):
        """Refused: torchattacks' moves every input to ``device``; here an attack runs where its inputs are, and those
        must be on the model's device (a one-line error otherwise), so a device set apart from both would be ignored."""
        raise ValueError(f"{self.name}: set_device is not supported (the attack runs on the device of the inputs it "
                         f"is given); move the inputs and labels to the model's device instead, "
                         f"x.to(atk.device), now {self.device}")

    def get_logits(self, x):
        """torchattacks': the model's output on ``x`` (checked: a logits tensor, one row per input), in the model's
        current mode and the caller's gradient setting."""
        return forward(self.name, self.model, x)

    def set_mode_targeted_by_label(self, quiet=False):
        """Labels given to the call are the targets. ``quiet`` is torchattacks' (nothing is printed here)."""
        self._set_targeted(None)
        return self

    def set_mode_targeted_random(self, quiet=False):
        """Targets drawn uniformly among the classes other than each label, from the global RNG. ``quiet``: as
        :meth:`set_mode_targeted_by_label`'s."""
        self._set_targeted("random")
        return self

    def set_mode_targeted_least_likely(self, kth_min=1, quiet=False):
        """Target: the class with the ``kth_min``-th lowest clean logit among those other than the label.
        ``quiet``: as :meth:`set_mode_targeted_by_label`'s."""
        if isinstance(kth_min, bool) or not isinstance(kth_min, int) or kth_min < 1:
            raise ValueError(f"{self.name}: expected kth_min to be an integer >= 1, got {kth_min!r}")
        self._set_targeted("least_likely")
        self._kth_min = kth_min
        return self

    def set_mode_targeted_by_function(self, target_map_function, quiet=False):
        """Targets ``target_map_function(x, y)`` (e.g. ``lambda x, y: (y + 1) % 10``), as torchattacks. ``quiet``:
        as :meth:`set_mode_targeted_by_label`'s."""
        if not callable(target_map_function):
            raise ValueError(f"{self.name}: expected target_map_function to be a callable (x, y) -> targets, got "
                             f"{type(target_map_function).__name__}")
        self._set_targeted(target_map_function)
        return self

    def _set_targeted(self, rule):
        if not self.supports_targeted:
            raise ValueError(f"{self.name}: this attack has no targeted mode")
        self.targeted, self._target_rule = True, rule

    def set_mode_default(self):
        """Untargeted: labels given to the call are the true labels (the default)."""
        self.targeted, self._target_rule = False, None
        return self

    def _targets(self, x, y):
        """Targets of ``set_mode_targeted_random`` / ``_least_likely`` / ``_by_function`` for labels ``y``; the first
        two from one clean forward in eval mode without gradients (as torchattacks: a train-mode forward would move
        BatchNorm's running statistics)."""
        y = check_inputs(self.name, x, y, self.clip_min, self.clip_max)
        if callable(self._target_rule):
            return self._function_targets(x, y)
        with torch.no_grad(), attack_context(self.model, "eval", self.name):
            out = forward(self.name, self.model, x.detach())
        check_labels_against(self.name, y, out)
        z = two_logits(out) if is_single_logit(out) else out
        k = z.shape[1]
        if self._target_rule == "random":
            return (y + torch.randint(1, k, y.shape, device=y.device)) % k
        if self._kth_min > k - 1:
            raise ValueError(f"{self.name}: expected kth_min <= {k - 1} (classes other than the label), got "
                             f"{self._kth_min}")
        # the label sorts last; a stable sort keeps ties in class order, so the choice is deterministic. Half
        # precision upcast, float64 kept: float() tied float64 logits closer than float32's resolution
        z = z.detach().to(torch.promote_types(z.dtype, torch.float32))
        return z.scatter(1, y[:, None], float("inf")).sort(dim=1, stable=True)[1][:, self._kth_min - 1]

    def _function_targets(self, x, y):
        """``set_mode_targeted_by_function``'s targets, checked here as labels: checked by the attack as its y, a
        function returning y[:2] was refused as 'expected y of shape [6], got (2,)' beside the y of shape [6] given.
        Their top is checked by the attack against the model's class count."""
        rule = self._target_rule
        targets = rule(x, y)
        try:
            return check_class_labels(self.name, targets, x.shape[0])
        except (TypeError, ValueError) as err:
            detail = str(err).split(": ", 1)[-1]
            raise type(err)(f"{self.name}: the targets set_mode_targeted_by_function's "
                            f"{getattr(rule, '__qualname__', type(rule).__name__)} returned are no labels of x "
                            f"({detail}); it must return an integer tensor [N] of classes, e.g. "
                            "lambda x, y: (y + 1) % K") from None

    def get_target_label(self, x, y):
        """torchattacks': the targets for labels ``y`` in targeted mode, which a ported forward asks for. Inside
        ``forward`` they are ``y`` itself: ``__call__`` made the targets from the labels before calling it.
        Elsewhere they are made by the mode's rule (by label: ``y``)."""
        if not self.targeted:  # torchattacks raises too ("target_map_function is not initialized")
            raise ValueError(f"{self.name}: get_target_label gives the targets of targeted mode; call "
                             "set_mode_targeted_by_label() or another set_mode_targeted_* first")
        if self._target_rule is None or id(self) in getattr(_forwarding, "ids", ()):
            return y
        return self._targets(x, y)

    def forward(self, x, y):
        """The attack on inputs ``x`` (Tensor[N, ...] in [clip_min, clip_max]) and labels ``y`` (LongTensor[N]; the
        targets in targeted mode), returning x_adv; call the attack itself, ``attack(x, y)``, which makes the
        targets and runs it."""
        raise NotImplementedError

    def __call__(self, x, y=_NO_LABELS):
        """``attack(x, y) -> x_adv``: x (Tensor[N, ...]) in [clip_min, clip_max], y (LongTensor[N]) true labels, or
        in targeted mode the labels its rule makes targets from (by label: the targets)."""
        if y is _NO_LABELS:  # atk(x), torchattacks' labels=None of TPGD and GN, met Python's bare "missing 1 required
            # positional argument" (atk(x, None) keeps check_inputs' "expected y to be an integer tensor")
            raise TypeError(f"{self.name}: expected labels, atk(x, y): every attack here takes them (true labels, or "
                            "targets in targeted mode); for a label-free attack, as torchattacks' TPGD and GN, give "
                            "the model's predictions, atk(x, robust_ops.models.predict(model, x))")
        origin = None
        if self.targeted and self._target_rule is not None:
            y = self._targets(x, y)
            if callable(self._target_rule):  # their range is checked against the model's class count when run
                origin = (f"the targets set_mode_targeted_by_function's "
                          f"{getattr(self._target_rule, '__qualname__', type(self._target_rule).__name__)} returned")
        running = vars(_forwarding).setdefault("ids", [])
        running.append(id(self))
        try:
            if (type(self).forward.__module__ or "").startswith(__package__):  # its function runs under attack_context
                with labels_made_by(origin):
                    return self.forward(x, y)
            # another forward in model_mode, as torchattacks' __call__ runs it: a port whose forward calls
            # get_logits itself ran in the model's own mode (a train-mode model attacked with dropout, its
            # batch-norm statistics moving); the library's functions it may call enter the context again, nested.
            # With gradients on, as the built-in attacks enable them: a ported forward differentiates without an
            # enable_grad of its own (torchattacks' PGD, MIFGSM), so under torch.no_grad() it stopped at autograd's
            # "element 0 of tensors does not require grad", inside AutoAttack or ensemble too
            with attack_context(self.model, self.model_mode, self.name), torch.enable_grad(), labels_made_by(origin):
                return self.forward(x, y)
        finally:
            running.pop()

    def _options(self):
        options = {k: v for k, v in vars(self).items() if k != "model" and not k.startswith("_")}
        rule = getattr(self, "_target_rule", None)  # getattr: a subclass may skip Attack.__init__
        if not options.get("targeted") or rule is None:  # by label: targeted=True says it all
            return options
        # how the targets are made decides the result: set_mode_targeted_random() and _by_label() both read
        # targeted=True alone. A function shows its name (its repr holds an address, which differs between runs).
        if not isinstance(rule, str):
            shown = getattr(rule, "__qualname__", type(rule).__name__)
        else:
            shown = f"least_likely(kth_min={getattr(self, '_kth_min', 1)})" if rule == "least_likely" else rule
        items = list(options.items())
        at = [k for k, _ in items].index("targeted") + 1
        return dict(items[:at] + [("targets", shown)] + items[at:])

    def __repr__(self):
        def show(v):
            return f"Tensor(shape={tuple(v.shape)})" if torch.is_tensor(v) else repr(v)

        return f"{type(self).__name__}({', '.join(f'{k}={show(v)}' for k, v in self._options().items())})"
