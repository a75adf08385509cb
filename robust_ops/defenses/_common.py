"""What the defenses share: argument checks, unwrapping DDP for attacks, the PGD settings every adversarial defense
takes (composed on robust_ops.attacks.core.run_pgd -- no defense has its own PGD loop), and small losses."""

import contextlib
import contextvars

import torch
import torch.distributed as dist
from torch import nn

from .._options import (check_choice, check_flags, check_int, check_options, check_real,  # noqa: F401  (the defenses
                        refuse_unused)  # noqa: F401  (import them here)
from ..attacks.context import (MODEL_MODES, check_class_labels, check_input_batch, classification_loss,
                               float32_or_wider,  # noqa: F401  (the defenses import it here)
                               is_single_logit, range_known, two_logits, use_model_mode)
from ..attacks.core import check_labels_against, scalar_value
from .base import Defense

# MIRST-DM's threat model (Linf, eps = 5/255) with Madry's step-size rule (2.5 * eps / steps) is the default of the
# defenses from MIRST-DM's comparison; DPAAT/AMAT and ARFL use their own papers' settings.
DEFAULT_EPS = 5 / 255


def real_option(name, arg, value, **bounds):
    """A defense's real option (a loss weight, a radius, a rate) by check_real's rule (``bounds`` its minimum,
    maximum, ...), a 0-d tensor read as its value as eps and step_size are (scalar_value): build("sat",
    alpha=torch.tensor(0.5)) was "expected alpha to be a finite number ..., got tensor(0.5000)" until 2026-12-07."""
    return check_real(name, arg, scalar_value(name, arg, value), **bounds)


def distributed_run():
    """Whether a torch.distributed group of more than one process is running (DDP): per-process shares of a batch
    must then be combined."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_read_by_fit = contextvars.ContextVar("robust_ops_metrics_read_by_fit", default=False)


@contextlib.contextmanager
def metrics_read_by_fit(defense):
    """Inside, metric_values leaves its tensors unread: fit reads them with its own read of the step (the loss flags
    and the correct count), where each defense's metrics were one more host read (a GPU sync) per step. Only for the
    library's own defense classes: a class of the caller's (a subclass, or a wrapper calling built-in defenses) may
    use the metrics as floats (statistics.mean, json), so its built-in parts keep reading them as outside fit."""
    if not type(defense).__module__.startswith("robust_ops."):
        yield
        return
    token = _read_by_fit.set(True)
    try:
        yield
    finally:
        _read_by_fit.reset(token)


def metric_values(**values):
    """{name: float} of a batch's metrics, given as one-element tensors (or numbers), with the tensors read back in one
    host read (a GPU sync) rather than one per value. float64 holds every float32, float16 and bfloat16 value
    exactly, so each float is the one float(value) gives. Inside metrics_read_by_fit (fit's step), the tensors are
    left as float64 scalars on their device for fit's one read of the step."""
    tensors = {k: v.detach().reshape(()).to(torch.float64) for k, v in values.items() if torch.is_tensor(v)}
    if _read_by_fit.get():
        return {k: tensors[k] if k in tensors else float(v) for k, v in values.items()}
    read = dict(zip(tensors, torch.stack(list(tensors.values())).tolist())) if tensors else {}
    return {k: read[k] if k in read else float(v) for k, v in values.items()}


def unwrap(model):
    """The module inside ``model`` when it is a DistributedDataParallel / DataParallel wrapper, else ``model``
    itself: attacks run on it (no gradient-sync hooks)."""
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                              torch.nn.DataParallel)) else model


def labels(name, x, y):
    """``y`` as int64 class labels [N] under the attacks' rule (any integer dtype, converted losslessly; float, bool
    or negative labels refused naming ``name``): a defense passes the same labels to its attack and its own losses.
    Cross-entropy takes int64 only, so int32 labels failed there, after the attack had already run. ``x`` must be a
    floating-point batch (check_input_batch): GR's and TRADES's clean forward came before any check of it."""
    check_input_batch(name, x)
    return check_class_labels(name, y, x.shape[0])


def per_sample_ce(out, y):
    return classification_loss(out, y, reduction="none")


def as_two_class(out):
    """[N, K] logits unchanged; single logits as the equivalent [N, 2] logits (softmax == [1 - sigmoid, sigmoid])."""
    return two_logits(out) if is_single_logit(out) else out


def kl_per_sample(log_p, log_q):
    """KL(p || q) per sample from log-probabilities [N, K]."""
    return (log_p.exp() * (log_p - log_q)).sum(1)


# the attacks' name for the step (PGD(model, alpha=...)), given to a defense that calls it step_size
ALPHA_HINT = "the attack's step is called step_size here, alpha in the attacks"


def option_hints(cls):
    """The ways check_options names for options ``cls`` does not take: for a defense with a ``step_size`` and no
    ``alpha`` of its own (SAT's, MIRST's and DPAAT's alpha is a loss weight), the attacks' ``alpha``
    (AT(alpha=0.01) listed the options only), and the other libraries' names of its options (attacks.core's
    FOREIGN_NAMES: TRADES' code's epsilon and perturb_steps, advertorch's nb_iter, ...). None where there is none."""
    from .._options import accepted_options
    from ..attacks.core import foreign_name_hints

    accepted = accepted_options(cls)
    hints = foreign_name_hints(accepted)
    if "step_size" in accepted and "alpha" not in accepted:
        hints["alpha"] = ALPHA_HINT
    return hints or None


class PGDDefense(Defense):
    """A defense that crafts adversarial examples with run_pgd. Attack settings (all keyword arguments):

    eps: radius (Linf or L2 per ``norm``); step_size: PGD step (default 2.5 * eps / steps, Madry's rule); steps;
    norm: "linf" | "l2" (any case, stored lowercase); random_start; attack_mode: the model mode during the attack
    ("eval": BatchNorm uses its running statistics and is not updated by the attack; "train"; "keep"); clip_min /
    clip_max: the valid input range.
    """

    default_eps = DEFAULT_EPS
    default_steps = 10
    default_norm = "linf"
    default_random_start = True
    default_attack_mode = "eval"
    # True for objectives whose input gradient is zero at x (TRADES's KL, LLR's linearity gap): started at x, the
    # attack would move only along round-off noise, or not at all, so random_start=False is refused
    flat_at_x = False

    def __init__(self, *, eps=None, step_size=None, steps=None, norm=None, random_start=None, attack_mode=None,
                 clip_min=0.0, clip_max=1.0, **unknown):
        from ..attacks.core import check_linf_budget, check_norm, check_number, check_step_moves, scalar_value

        if unknown:  # Python's own TypeError named PGDDefense.__init__, not the defense built, and listed nothing
            check_options(type(self).__name__, type(self), unknown, option_hints(type(self)))
        n = self.name
        # the attacks' rule and words ('at: expected eps >= 0 and finite, got -0.1'), a number or a 0-d tensor
        self.eps = check_number(n, "eps", scalar_value(n, "eps", self.default_eps if eps is None else eps), n=None)
        self.steps = check_int(n, "steps", self.default_steps if steps is None else steps)
        step_size = 2.5 * self.eps / self.steps if step_size is None else scalar_value(n, "step_size", step_size)
        self.step_size = check_number(n, "step_size", step_size, n=None)
        check_step_moves(n, self.eps, self.step_size, "step_size")  # AT(step_size=0) trained on its start points
        self.norm = check_norm(n, self.default_norm if norm is None else norm)  # "Linf" is stored as "linf"
        check_flags(n, {"random_start": random_start}, optional=("random_start",))  # "no" would have meant True
        self.random_start = self.default_random_start if random_start is None else random_start
        if self.flat_at_x and not self._starts_off_x():
            raise ValueError(f"{n}: expected random_start=True: the attack's objective has a zero gradient at x, so "
                             "from x it would move only along round-off noise or not at all; got random_start=False")
        self.attack_mode = check_choice(n, "attack_mode", self.default_attack_mode if attack_mode is None
                                        else attack_mode, MODEL_MODES)
        self.clip_min = check_real(n, "clip_min", clip_min)
        self.clip_max = check_real(n, "clip_max", clip_max, minimum=self.clip_min)
        # Checked here rather than at the first batch (as IMA does), where the error would name run_pgd only after
        # the CLI had written run.json: eps=8 meant as 8/255 is refused before anything runs.
        check_linf_budget(n, self.norm, torch.tensor([float(self.eps)]), self.clip_min, self.clip_max,
                          torch.tensor([float(self.step_size)]), alpha_arg="step_size")

    def _starts_off_x(self):
        """Whether the attack starts away from x (what a flat_at_x objective needs)."""
        return self.random_start

    def attack(self, model, x, y, **overrides):
        """run_pgd on ``model`` from inputs ``x`` with labels ``y`` under this defense's settings, each overridable
        for this call by a run_pgd keyword in ``overrides``; returns the PGDResult."""
        from ..attacks.core import run_pgd

        if "eps" not in vars(self):  # Python's bare "'NoisyAT' object has no attribute 'eps'" named no fix
            raise TypeError(f"{self.name}: {type(self).__name__}.__init__ did not call super().__init__(**attack), "
                            "which sets the attack settings (eps, steps, norm, ...) that self.attack uses; call it "
                            "there, with the attack's keyword arguments")
        # named by the defense: called outside fit (which rewords them), its refusals said "run_pgd: x contains NaN
        # or Inf", naming a function the caller never called
        kwargs = dict(eps=self.eps, alpha=self.step_size, steps=self.steps, norm=self.norm,
                      random_start=self.random_start, model_mode=self.attack_mode, clip_min=self.clip_min,
                      clip_max=self.clip_max, name=self.name)
        if "step_size" in overrides:  # run_pgd's bare "unexpected keyword argument 'step_size'" named no fix
            raise TypeError(f"{self.name}: attack() takes run_pgd's keywords, where the step is alpha (step_size is "
                            f"this defense's option for it): pass alpha={overrides['step_size']!r}")
        kwargs.update(overrides)
        return run_pgd(unwrap(model), x, y, **kwargs)

    def ascend(self, objective, x):
        """``attack`` (this defense's settings) ascending ``objective``, a module x' [N, ...] -> one value per sample
        [N] (ARFL's adversarial term, LLR's linearity gap): the mean of its output itself, not a loss of logits.
        run_pgd requires labels; the zeros it gets never reach the loss. Another output shape is refused naming the
        defense. Returns the PGDResult."""
        # run_pgd read a [N, 1] or [N, K] output as logits and a scalar as a wrong logits shape, naming itself
        zeros = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        range_known(zeros, (0, 0))  # in a defense's call: run_pgd's label check does not read them back
        return self.attack(_PerSampleObjective(self.name, objective), x, zeros, loss=_output_itself)


def _output_itself(out, _labels):
    return out


class _PerSampleObjective(nn.Module):
    """``objective`` with its output checked to be [N]: what PGDDefense.ascend hands run_pgd as the model."""

    def __init__(self, defense_name, objective):
        super().__init__()
        self.defense_name, self.objective = defense_name, objective

    def forward(self, x):
        out = self.objective(x)
        if not torch.is_tensor(out) or out.shape != (x.shape[0],):
            got = f"shape {tuple(out.shape)}" if torch.is_tensor(out) else f"a {type(out).__name__}"
            raise ValueError(f"{self.defense_name}: expected the attack objective {type(self.objective).__name__} to "
                             f"return one value per sample, shape ({x.shape[0]},), got {got}")
        return out
