"""AutoAttack-style cascades: run attacks one after another, each only on the samples still robust."""

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .._options import check_flags, check_seed
from .._warn import warn
from .base import N_CLASSES_HINT, Attack, refuse_positional_options
from .core import (NORMS_WITH_L1, check_budget, check_labels_against, check_linf_budget, check_norm, check_steps,
                   forward, per_sample)
from .context import (attack_context, check_attack_output, check_gradients_possible, check_inputs,
                      looks_like_probabilities, one_probabilities_warning, predict_from_output, recorded_bounds,
                      values_within, warn_probabilities)


# AutoAttack's standard settings (Croce & Hein 2020), for the options not given
STANDARD = dict(steps=100, n_target_classes=9, n_queries=5000, seed=0)
# AutoAttack's versions: "standard"; "plus" (restarts for APGD-CE, APGD-DLR and untargeted FAB); "rand" (APGD-CE and
# APGD-DLR with the gradient averaged over EOT_ITER_RAND passes, for randomized defenses). "custom": a list given.
VERSIONS = ("standard", "plus", "rand", "custom")
RESTARTS_PLUS = 5
EOT_ITER_RAND = 20
# AutoAttack's standard version for L1: APGD-CE with 5 restarts and APGD-T with 5 target classes, both with
# use_largereps (no FAB-T, no Square); "plus" and "rand" are defined for Linf and L2 only
L1_STANDARD = dict(apgd_restarts=5, n_target_classes=5)
# AutoAttack's check_randomized: two forwards of the same batch differing by more than this (outputs scaled to unit
# L2 norm per sample) or in a prediction make the model look randomized
RANDOMIZED_TOLERANCE = 1e-4


@dataclass
class EnsembleResult:
    """x_adv: per sample the adversarial input of the first attack that broke it (the clean input if none did or if
    it is misclassified already). robust: BoolTensor[N], correct on the clean input and under every attack.
    broken_by: LongTensor[N]: -1 robust, 0 misclassified clean, j + 1 broken by attack j; ``names[broken_by]``
    names it (names[0] == "clean"). Unpacks as ``x_adv, robust, broken_by = ensemble(...)``."""

    x_adv: torch.Tensor
    robust: torch.Tensor
    broken_by: torch.Tensor
    names: tuple

    def __iter__(self):
        return iter((self.x_adv, self.robust, self.broken_by))

    def robust_accuracy(self):
        """The fraction of samples robust (a float; NaN for no samples)."""
        return float(self.robust.float().mean()) if self.robust.numel() else float("nan")

    def counts(self):
        """{name: number of samples it broke} (plus "robust"); a name repeated in the list is keyed "name #2", ..."""
        out = {key: int((self.broken_by == i).sum()) for i, key in enumerate(_distinct_keys(self.names))}
        out["robust"] = int(self.robust.sum())
        return out


def _name(attack, i):
    return getattr(attack, "name", None) or getattr(attack, "__name__", None) or f"attack{i}"


def _distinct_keys(names):
    """``names`` as dict keys: the second, third, ... occurrence of a name is "name #2", "name #3", ... (one key per
    attack; keyed by the bare name, a repeated attack overwrote the entry of the first)."""
    seen, keys = {}, []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return keys


# The per-sample options an Attack may hold as a tensor [N] (docs/attacks.md: eps and alpha)
PER_SAMPLE_OPTIONS = ("eps", "alpha")


def _on_samples(attack, part, n):
    """``attack`` for the samples ``part`` of a batch of ``n``: a shallow copy of an :class:`Attack` with its
    per-sample tensor options ([n]: ``PER_SAMPLE_OPTIONS``; also inside an AutoAttack's list) cut to ``part``, since
    the cascade and ``batch_size`` attack subsets. Other callables are used as given."""
    if not isinstance(attack, Attack):
        return attack
    # eps and alpha only: another tensor option (class weights [K]) is not per sample, even when K happens to be n
    options = {k: vars(attack).get(k) for k in PER_SAMPLE_OPTIONS}
    cut = {k: v[part.to(v.device)] for k, v in options.items()
           if torch.is_tensor(v) and v.dim() == 1 and v.shape[0] == n}
    inner = vars(attack).get("attacks")
    if isinstance(inner, list):
        cut["attacks"] = [_on_samples(a, part, n) for a in inner]
    if not cut:
        return attack
    sub = copy.copy(attack)
    vars(sub).update(cut)
    return sub


def _check_per_sample_options(attack, x, label, name):
    """An :class:`Attack`'s ``eps`` / ``alpha`` tensor (also inside an AutoAttack's list) must be one value or one per
    sample of the batch [n]: the cascade attacks subsets, so a tensor of another length reached the attack only as
    long as a subset and ran there with the radii of other samples (or failed naming the subset's size). A number
    eps must fit the attack's clip range for Linf too, checked as the attack checks it when run."""
    if not isinstance(attack, Attack):
        return
    n = x.shape[0]
    for arg in PER_SAMPLE_OPTIONS:
        value = vars(attack).get(arg)
        if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != (n,):
            raise ValueError(f"{name}: attack {label!r} has {arg} of shape {tuple(value.shape)}; expected a number "
                             f"or a tensor of shape [{n}], one per sample of x")
    # a number the attack refuses only when it runs: after the attacks before it, and (a bool or text) as "a tensor of
    # shape [k]" for the k samples still robust; -0.1 passed when none was, and eps in 0-255 units (PGD(model, eps=8))
    # ran after the attacks before it. Checked as its class checks it when built, in the attack's words
    check_budget(attack.name, vars(attack).get("norm"), vars(attack).get("eps"), attack.clip_min, attack.clip_max,
                 vars(attack).get("alpha"), n=n, optional=True)
    inner = vars(attack).get("attacks")
    if isinstance(inner, list):
        for a in inner:
            _check_per_sample_options(a, x, label, name)


def _refuse_targeted_by_label(attack, label, name):
    """An attack targeted by label is refused: the cascade passes the true labels, which it would take as targets and
    push towards (every sample then scored robust); targets made from the labels (random, least likely, a function)
    are fine."""
    if isinstance(attack, Attack) and attack.targeted and attack._target_rule is None:
        raise ValueError(f"{name}: attack {label!r} is targeted by label, so it would take the true labels as its "
                         "targets; call its set_mode_default(), or a mode that makes targets from the labels "
                         "(set_mode_targeted_random(), set_mode_targeted_least_likely(), "
                         "set_mode_targeted_by_function())")


def _check_runs_on(attack, x, label, name):
    """Ask ``attack`` (also the attacks inside an AutoAttack's list) whether it runs on ``x``'s dtype and shape: a
    Square after APGD-CE, APGD-T and FAB-T refused flat [N, D] inputs only once those had run. An attack targeted by
    label is refused (:func:`_refuse_targeted_by_label`)."""
    for hook in ("check_input_dtype", "check_input_shape"):
        check = getattr(attack, hook, None)
        if check is not None:
            check(x)
    if getattr(attack, "uses_gradients", False):  # else refused after the clean check, in the attack's name
        check_gradients_possible(name)
    _refuse_targeted_by_label(attack, label, name)
    inner = vars(attack).get("attacks") if isinstance(attack, Attack) else None
    if isinstance(inner, list):
        for i, a in enumerate(inner):
            _check_runs_on(a, x, _name(a, i), name)  # named by its own name: the attack to change


@torch.no_grad()
def _predict(model, x, model_mode, name, y=None, where="at the clean inputs"):
    """The labels ``model`` predicts on ``x`` in ``model_mode``; ``y`` given: checked against its output first, and
    the output's finiteness with it (``where``: the inputs' words in the error), on the one device read."""
    with attack_context(model, model_mode, name):
        out = forward(name, model, x)
        if y is not None:
            check_labels_against(name, y, out, finite_at=where)
        return predict_from_output(out)


def _correct(model, x, y, model_mode, name, where="at the clean inputs"):
    return _predict(model, x, model_mode, name, y, where) == y


@one_probabilities_warning()  # one warning of a final softmax per call (model_check's), not one per attack
def ensemble(model, x, y, attacks, *, cascade=True, model_mode="eval", clip_min=0.0, clip_max=1.0, batch_size=None,
             names=None, model_check=None, name="ensemble"):
    r"""Evaluate ``attacks`` in order, AutoAttack style (Croce & Hein 2020): each next attack runs only on the
    samples that are still robust (``cascade=False`` runs every attack on every sample, for comparison; the
    per-sample worst case is then the same for deterministic attacks).

    Args:
        model: ``[N, K]`` logits or ``[N]`` / ``[N, 1]`` single logits.
        x (Tensor[N, ...]): clean inputs inside ``[clip_min, clip_max]``.
        y (LongTensor[N]): true labels.
        attacks (list): callables ``attack(x, y) -> x_adv`` such as :class:`APGD`, :class:`Square` or any
            :class:`Attack`; their ``name`` attribute labels the result. A per-sample ``eps`` / ``alpha`` tensor [N]
            of an :class:`Attack` is cut to the samples each call attacks; other callables get only the subset.
        cascade (bool): default True.
        model_mode: for the robustness checks (each attack has its own).
        clip_min, clip_max (float): the valid input range (default [0, 1]): ``x`` must lie in it, and each attack's
            output must too (a ValueError names the attack otherwise); the attacks clip with their own settings.
        batch_size (int, optional): attack (and check on clean inputs) at most this many samples at a time; None:
            all at once.
        names: labels overriding ``name``.
        model_check: a callable given the first batch (inputs already checked) before any forward, such as
            AutoAttack's checks for randomized and probability outputs.
        name: the caller its errors name (:class:`AutoAttack` passes "autoattack").

    Returns:
        :class:`EnsembleResult` ``(x_adv, robust, broken_by, names)``.

    Raises:
        NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError, InputShapeError: as
        :func:`run_pgd`, from the clean check or the attacks (NonFiniteOutputError also where an attack's points
        give outputs without class probabilities).
    """
    y, y_range = check_inputs(name, x, y, clip_min, clip_max, label_range=True)
    check_flags(name, {"cascade": cascade})  # cascade="no" cascaded
    given = attacks  # shown as given: a string's list was its characters, "got ['p', 'g', 'd']"
    # a string's list was its characters; None or one attack object, not in a list, failed in list() with
    # "'NoneType' object is not iterable": each is refused below, shown as given
    attacks = list(attacks) if isinstance(attacks, Iterable) and not isinstance(attacks, str) else []
    if not attacks or not all(callable(a) for a in attacks):
        # names are for AutoAttack's custom version, or attacks.build: ensemble(model, x, y, ["pgd"]) said only
        # "expected ... callables", leaving a user to guess how to make one from a name
        named = [given] if isinstance(given, str) else attacks
        hint = (f"; attack names make attacks with attacks.build(name, model, eps=...), or run them as "
                f"attacks.AutoAttack(model, attacks={named!r}, eps=...)"
                if named and all(isinstance(a, str) for a in named) else "")
        raise ValueError(f"{name}: expected a non-empty list of attacks (callables (x, y) -> x_adv), got {given!r}"
                         + hint)
    labels = tuple(names) if names is not None else tuple(_name(a, i) for i, a in enumerate(attacks))
    if len(labels) != len(attacks):
        raise ValueError(f"{name}: expected {len(attacks)} names, got {len(labels)}")
    if batch_size is not None:  # a negative step would skip every attack and report every sample robust
        batch_size = check_steps(name, batch_size, "batch_size")
    y_range = y_range or recorded_bounds(y)  # None: not read, the labels of an outer cascade (bounded there)
    x = x.detach()
    n = x.shape[0]
    for attack, label in zip(attacks, labels):  # before any attack runs: the cascade would otherwise stop minutes in
        _check_runs_on(attack, x, label, name)
        _check_per_sample_options(attack, x, label, name)
    if model_check is not None and n:
        model_check(x[:batch_size or n])
    x_adv = x.clone()
    broken_by = torch.full((n,), -1, dtype=torch.long, device=x.device)
    if n:
        for part in torch.arange(n, device=x.device).split(batch_size or n):  # the clean check batched too
            # written at every position of part through torch.where: a boolean index is a host read (a GPU sync)
            broken_by[part] = torch.where(_correct(model, x[part], y[part], model_mode, name), broken_by[part], 0)
    for j, attack in enumerate(attacks):
        idx = (broken_by == -1).nonzero().squeeze(1) if cascade else torch.arange(n, device=x.device)
        if idx.numel() == 0:
            break
        step = batch_size or idx.numel()
        for start in range(0, idx.numel(), step):
            part = idx[start:start + step]
            sub = _on_samples(attack, part, n)
            x_part, y_part = x[part], y[part]
            # checked above: the attack does not read their ranges back (only bounds that fail its checks)
            with values_within((x_part, clip_min, clip_max), *[(y_part, *y_range)] if y_range else ()):
                adv = sub(x_part, y_part).detach()
            # its own ball (per-sample radii cut to part) on the same read; other callables have none
            ball = (vars(sub).get("eps"), vars(sub).get("norm")) if isinstance(sub, Attack) else ()
            check_attack_output(f"{name}: attack {labels[j]!r}", adv, x[part], clip_min, clip_max, *ball)
            fooled = ~_correct(model, adv, y[part], model_mode, name, f"at the points of attack {labels[j]!r}")
            new = fooled & (broken_by[part] == -1)  # the first attack that breaks a sample keeps it
            # as the clean check's: x_adv[part[new]] = adv[new] and broken_by's were three reads per attack call
            x_adv[part] = torch.where(new.view((-1,) + (1,) * (adv.dim() - 1)), adv, x_adv[part])
            broken_by[part] = torch.where(new, j + 1, broken_by[part])
    return EnsembleResult(x_adv, broken_by == -1, broken_by, ("clean",) + labels)


class _SeedLeftOut(int):
    """AutoAttack's default seed, 0, told apart from a seed=0 given: a custom list's named attacks then keep their own
    defaults (PGD's None, APGD's 0), and seed=None is the global RNG, as for the attack classes."""

    __slots__ = ()

    def __reduce__(self):
        # the one marker after pickle, copy and deepcopy (a copy was a plain seed 0 given: PGD's None became 0)
        return "SEED_LEFT_OUT"


SEED_LEFT_OUT = _SeedLeftOut(STANDARD["seed"])


def autoattack_version(version, model, *, norm, eps, steps, n_target_classes, n_queries, seed, eot_iter, **common):
    """The attacks of AutoAttack's ``version`` ("standard", "plus" or "rand"; for norm "l1" "standard" only) with its
    settings; an option given as None takes AutoAttack's value (``seed``: None is the global RNG). Returns
    ``(attacks, unused)``: the attack objects in cascade order and the names of the given options none of them takes
    (n_target_classes and n_queries in "rand", n_queries in L1's "standard")."""
    from .apgd import APGD, APGDT, check_largereps
    from .fab import FAB, FABT
    from .square import Square

    if norm == "l1" and version != "standard":
        raise ValueError(f"autoattack: version={version!r} is defined for norm 'linf' and 'l2' here; for norm='l1' "
                         "give version='standard' (APGD-CE, APGD-T) or a custom list")
    given = dict(n_target_classes=n_target_classes, n_queries=n_queries)
    defaults = {**STANDARD, **({"n_target_classes": L1_STANDARD["n_target_classes"]} if norm == "l1" else {})}
    steps, n_target_classes, n_queries = (defaults[k] if v is None else v for k, v in (
        ("steps", steps), ("n_target_classes", n_target_classes), ("n_queries", n_queries)))
    seed = None if seed is None else int(seed)  # None: the global RNG, as the attack classes take it
    eot = eot_iter if eot_iter is not None else (EOT_ITER_RAND if version == "rand" else 1)
    shared = dict(eps=eps, norm=norm, steps=steps, seed=seed, **common)
    largereps = dict(use_largereps=True) if norm == "l1" else {}  # AutoAttack's L1 stages
    if largereps:  # here, not in the first attack built with them (apgd-t's name, an attack not asked for by name)
        check_largereps("autoattack", True, norm, steps, whose="the L1 version's use_largereps (APGD-CE's, APGD-T's)")

    def apgd(loss, n_restarts):
        return APGD(model, loss=loss, n_restarts=n_restarts, eot_iter=eot, **largereps, **shared)

    if version == "rand":  # its APGD-CE and APGD-DLR take neither target classes nor queries
        return [apgd("ce", 1), apgd("dlr", 1)], [k for k, v in given.items() if v is not None]
    apgd_t = APGDT(model, n_target_classes=n_target_classes, eot_iter=eot, **largereps, **shared)
    if norm == "l1":  # AutoAttack's set_version for L1; no Square in it
        return [apgd("ce", L1_STANDARD["apgd_restarts"]), apgd_t], [k for k in ("n_queries",) if given[k] is not None]
    fab_t = FABT(model, n_target_classes=n_target_classes, **shared)  # AutoAttack's FAB-T: 1 restart
    # AutoAttack's Square keeps its 10000-query p schedule whatever the budget (resc_schedule=False)
    square = Square(model, eps=eps, norm=norm, n_queries=n_queries, seed=seed, rescale_schedule=False, **common)
    if version == "standard":
        return [apgd("ce", 1), apgd_t, fab_t, square], []
    return [apgd("ce", RESTARTS_PLUS), apgd("dlr", RESTARTS_PLUS), FAB(model, n_restarts=RESTARTS_PLUS, **shared),
            square, apgd_t, fab_t], []


class AutoAttack(Attack):
    """AutoAttack-style evaluation (Croce & Hein 2020) as a cascade: ``AutoAttack(model, norm="linf", eps=8/255)``.

    ``version`` (AutoAttack's versions and settings, for Linf and L2 alike; norm "l1": "standard" and "custom"):

    * ``"standard"`` (default): APGD-CE, APGD-T (targeted DLR, 9 target classes), FAB-T (9 target classes, 1 restart)
      and Square (5000 queries, p schedule not rescaled, as AutoAttack's). For norm "l1", AutoAttack's L1 set:
      APGD-CE with 5 restarts and APGD-T (5 target classes, 1 restart), both with ``use_largereps``.
    * ``"plus"``: APGD-CE and APGD-DLR with 5 restarts each, untargeted FAB with 5 restarts, Square, APGD-T, FAB-T.
    * ``"rand"``, for randomized defenses: APGD-CE and APGD-DLR, 1 restart, each step's gradient averaged over
      ``eot_iter`` = 20 forward/backward passes (Expectation over Transformation).
    * ``"custom"`` with ``attacks`` (or AutoAttack's ``attacks_to_run``): a list of CLI names (see
      :func:`robust_ops.attacks.build`) or attack objects; a list given with the default version is custom too.

    ``steps`` (100: APGD's and FAB's iterations), ``n_target_classes`` (9; L1: 5), ``n_queries`` (5000), ``seed``
    (0; None: the global RNG, as for the attack classes) and ``eot_iter`` (APGD's passes per step; 20 in "rand", else
    1) set the version's attacks. With a custom list the options given (not None; a seed given, None too) are passed
    to the named attacks that take them (``steps``: apgd-*, fab, fab-t, pgd,
    pgdl2, ifgsm, cw; ``n_queries``: square; ``n_target_classes``: apgd-t, fab-t; ``eot_iter``: apgd-*; ``seed``),
    the others keep ``build``'s defaults; attack objects are used as they are. An option no attack takes is an
    error. ``model_mode``, ``clip_min`` and ``clip_max`` (default "eval", [0, 1]) hold for the cascade's checks and
    the attacks it builds (attack objects keep their own); ``cascade=False`` runs every attack on every sample, as
    :func:`ensemble`'s. ``__call__(x, y)`` and ``run_standard_evaluation(x_orig, y_orig, bs=None)`` (AutoAttack's
    names) return x_adv; ``run_standard_evaluation_individual(x_orig, y_orig, bs=None)`` runs each attack on every
    sample, {name: x_adv};
    ``run(x, y, batch_size=None)`` returns the full :class:`EnsembleResult`.

    Raises, when called or run: NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError and
    InputShapeError, as :func:`ensemble`.
    """

    name = "autoattack"
    supports_targeted = False
    norms = NORMS_WITH_L1  # "l1": the standard version's APGD-CE and APGD-T, or a custom list
    # Options baked into the attacks when they are built: setting one afterwards would be ignored silently.
    # attacks_to_run is AutoAttack's own spelling of ``attacks``.
    _BUILD_OPTIONS = ("norm", "eps", "version", "steps", "n_target_classes", "n_queries", "seed", "eot_iter",
                      "clip_min", "clip_max", "attacks_to_run")

    # AutoAttack's own attributes and methods (autoattack.AutoAttack): its users set sub-attack options on them
    # (aa.apgd.n_restarts = 1) or its epsilon / verbose, which here met Python's bare "no attribute 'apgd'" or, set,
    # were ignored silently; each is an AttributeError naming the way here
    _FOREIGN = {
        **dict.fromkeys(("apgd", "apgd_targeted", "fab", "square"),
                        "its attacks are built with the options given to the constructor (steps, n_target_classes, "
                        "n_queries, seed, eot_iter); for others (n_restarts, ...) pass your own objects, "
                        "AutoAttack(model, ..., attacks=[APGD(model, n_restarts=1, ...), ...]); aa.attacks lists them"),
        "epsilon": "the radius is eps, read when the attacks are built; build a new AutoAttack(model, ..., eps=...)",
        **dict.fromkeys(("verbose", "logger", "log_path"),
                        "nothing is printed or logged; res = aa.run(x, y) gives res.counts() (samples each attack "
                        "broke) and res.robust_accuracy()"),
        "set_version": "give the version to the constructor, AutoAttack(model, ..., version=...)",
        "clean_accuracy": "(robust_ops.models.predict(model, x) == y).float().mean() is the clean accuracy",
    }

    _FOREIGN_OPTIONS = {
        **Attack._FOREIGN_OPTIONS,
        "n_classes": N_CLASSES_HINT,
        "log_path": "nothing is logged, aa.run(x, y).counts() gives the samples each attack broke",
        "is_tf_model": "models are torch modules here (AutoAttack's default, is_tf_model=False), drop it",
    }

    def __getattr__(self, key):  # only for attributes not found otherwise
        if key in AutoAttack._FOREIGN:
            raise AttributeError(f"autoattack: AutoAttack's {key} does not exist here: {AutoAttack._FOREIGN[key]}")
        # set, these were refused by name, read, Python's bare "no attribute": the options the attacks were built
        # with are theirs (a custom list's may each differ), and AutoAttack's list of names is aa.attacks
        if key == "attacks_to_run":
            raise AttributeError("autoattack: AutoAttack's attacks_to_run is aa.attacks here, the attack objects in "
                                 "cascade order ([a.name for a in aa.attacks] gives their names)")
        if key in AutoAttack._BUILD_OPTIONS:
            raise AttributeError(f"autoattack: {key} is not kept on the AutoAttack, it went to its attacks when they "
                                 f"were built; read it on the attacks in aa.attacks that take it (repr(aa) shows "
                                 f"each attack's options)")
        return super().__getattr__(key)  # torchattacks' Attack names (its AutoAttack is one)

    def __setattr__(self, key, value):
        if key in self._FOREIGN:
            raise AttributeError(f"autoattack: AutoAttack's {key} does not exist here: {self._FOREIGN[key]}")
        if vars(self).get("_built") is not None:
            if key == "model":  # the clean check and the scoring took the new model, the built attacks the old one
                raise AttributeError("autoattack: model is read when the attacks are built, so its attacks would "
                                     "keep attacking the old one; build a new AutoAttack(new_model, ...)")
            if key in self._BUILD_OPTIONS:
                spelt = "attacks" if key == "attacks_to_run" else key
                raise AttributeError(f"autoattack: {key} is read when the attacks are built, so setting it "
                                     f"afterwards would be ignored; build a new AutoAttack(model, ..., {spelt}=...)")
            if key == "model_mode":  # as set_model_mode: the clean check ran in the new mode, the attacks in the old
                for a in self._built:
                    a.set_model_mode(value)  # checks the value before this object takes it
        super().__setattr__(key, value)

    def __init__(self, model, norm="linf", eps=8 / 255, *positional, version="standard", attacks=None, steps=None,
                 n_target_classes=None, n_queries=None, seed=SEED_LEFT_OUT, eot_iter=None, attacks_to_run=None,
                 model_mode="eval", clip_min=0.0, clip_max=1.0, cascade=True, **unknown):
        from . import attack_entry, build
        from .._options import option_defaults

        # Python's "takes from 2 to 4 positional arguments but 5 were given" named no keyword
        refuse_positional_options("autoattack", AutoAttack, positional, ", e.g. version='standard' (torchattacks' 4th "
                                  "argument is version, AutoAttack's seed)")
        if version not in VERSIONS:
            raise ValueError(f"autoattack: expected version to be one of {', '.join(map(repr, VERSIONS))}, "
                             f"got {version!r}")
        for arg, value in (("attacks", attacks), ("attacks_to_run", attacks_to_run)):
            if isinstance(value, str):  # list("apgd-ce") was its characters: "unknown attack 'a'"
                raise ValueError(f"autoattack: expected {arg} to be a list of attack names or objects, got the string "
                                 f"{value!r}; give a list, e.g. [{value!r}]")
        if attacks_to_run is not None:  # AutoAttack's spelling
            if attacks is not None:
                raise ValueError("autoattack: got both attacks and attacks_to_run (the same list); give one")
            attacks = attacks_to_run
        if attacks is not None:
            # empty: AutoAttack's default attacks_to_run=[], no list (it ran "standard"; here it made an empty
            # "custom" cascade that failed only when run)
            attacks = list(attacks) or None
        if attacks is not None and version in ("plus", "rand"):
            raise ValueError(f"autoattack: version={version!r} runs its own attacks, so the attacks list would be "
                             "ignored; give version='custom' with the list, or no list")
        if attacks is None and version == "custom":
            raise ValueError("autoattack: version='custom' needs the attacks to run: attacks=[...] (CLI names or "
                             "attack objects)")
        norm = check_norm(self.name, norm, self.norms)  # AutoAttack's own spellings 'Linf' / 'L2' / 'L1' too
        check_flags(self.name, {"cascade": cascade})  # else refused only when run, and in ensemble's name
        super().__init__(model, model_mode=model_mode, clip_min=clip_min, clip_max=clip_max, **unknown)
        # checked here, as the counts below and as an attack class checks its eps: eps=True or "0.03" failed only when
        # run, in the first attack's name, as "a tensor of shape [k]" for the k samples still correct; eps=-1 passed
        # when none was. A tensor [N] is checked per sample when run, as by every attack
        check_budget(self.name, norm, eps, self.clip_min, self.clip_max)
        self.version = "custom" if attacks is not None else version
        self.norm, self.eps, self.cascade = norm, eps, cascade
        common = dict(model_mode=model_mode, clip_min=clip_min, clip_max=clip_max)
        options = dict(steps=steps, n_target_classes=n_target_classes, n_queries=n_queries, seed=seed,
                       eot_iter=eot_iter)
        for key in ("steps", "n_target_classes", "n_queries", "eot_iter"):
            # checked here: an attack checks its own only when it runs, so n_queries=0 stopped the cascade at Square,
            # after APGD-CE, APGD-T and FAB-T had run
            if options[key] is not None:
                check_steps(self.name, options[key], key)
        check_seed(self.name, seed, optional=True)  # in its own name, not in that of the first attack built with it
        if attacks is None:
            self.attacks, unused = autoattack_version(version, model, norm=norm, eps=eps, **options, **common)
            self._built = list(self.attacks)
            if unused:
                scope = f"version {version!r}'s attacks" + (f" for norm={norm!r}" if norm == "l1" else "")
                raise ValueError(f"autoattack: {', '.join(f'{k}={options[k]!r}' for k in unused)} applies to none "
                                 f"of {scope} ({', '.join(a.name for a in self.attacks)}); expected None")
        else:
            attacks = list(attacks)
            # a name or dotted path it cannot resolve fails here with build's own error
            takes = {}
            for a in attacks:
                if isinstance(a, str):
                    cls, defaults = attack_entry(a)
                    takes[a] = option_defaults(cls)
                    # seed only to the attacks that draw (cw starts at x: its seed would be refused as unused)
                    if defaults.get("random_start", takes[a].get("random_start")) is False:
                        takes[a].pop("seed", None)
            # seed left out: the named attacks keep their own defaults (PGD's None, APGD's 0)
            given = {k: v for k, v in options.items() if v is not None and v is not SEED_LEFT_OUT}
            # build() reads steps as n_queries / trials for square / noise: pass each option only under its own name
            self.attacks = [
                build(a, model, eps=eps, norm=norm, **common, **{k: v for k, v in given.items() if k in takes[a]})
                if isinstance(a, str) else a
                for a in attacks
            ]
            self._built = [b for a, b in zip(attacks, self.attacks) if isinstance(a, str)]
            # refused here, in run's words: built, such a list was refused only when run (an object set targeted by
            # label afterwards still is then)
            for i, a in enumerate(self.attacks):
                _refuse_targeted_by_label(a, _name(a, i), self.name)
            for a, built in zip(attacks, self.attacks):
                if seed is None and isinstance(a, str) and "seed" in takes[a]:
                    built.seed = None  # build() ignores None options: the global RNG, as the classes take seed=None
            for key, value in given.items():
                if not any(key in t for t in takes.values()):
                    shown = [a if isinstance(a, str) else _name(a, i) for i, a in enumerate(attacks)]
                    raise ValueError(f"autoattack: {key}={value!r} applies to none of the attacks named in "
                                     f"attacks={shown} (attack objects are used as given); expected {key}=None")

    def run(self, x, y, batch_size=None):
        """The cascade on ``x``, ``y`` (true labels), ``batch_size`` samples at a time (None: all at once): the full
        :class:`EnsembleResult`."""
        # errors name autoattack: "ensemble: expected x inside the clip range" named a function its caller never met
        self._check_eps(x)
        return ensemble(self.model, x, y, self.attacks, cascade=self.cascade, model_mode=self.model_mode,
                        clip_min=self.clip_min, clip_max=self.clip_max, batch_size=batch_size,
                        model_check=self._check_model, name=self.name)

    def run_standard_evaluation(self, x_orig, y_orig, bs=None, return_labels=False, state_path=None):
        """AutoAttack's entry point, with its argument names (inputs ``x_orig``, true labels ``y_orig``): x_adv (the
        clean input where no attack succeeded), ``bs`` samples at a time (None: all at once); ``return_labels=True``
        gives ``(x_adv, y_adv)``, y_adv the labels predicted on x_adv. ``state_path`` (newer AutoAttack's resumable
        evaluation) is refused unless None."""
        if state_path is not None:  # Python's "unexpected keyword argument" said nothing of why
            raise ValueError(f"autoattack.run_standard_evaluation: state_path={state_path!r} asks to save and resume "
                             "the evaluation, which is not supported here; leave state_path out (the evaluation runs "
                             "from the start)")
        if bs is not None:  # named as the caller wrote it, not as ensemble's batch_size
            bs = check_steps("autoattack.run_standard_evaluation", bs, "bs")
        check_flags("autoattack.run_standard_evaluation", {"return_labels": return_labels})
        x_adv = self.run(x_orig, y_orig, batch_size=bs).x_adv
        return (x_adv, self._predicted(x_adv, bs)) if return_labels else x_adv

    @one_probabilities_warning()  # one warning of a final softmax for all its ensemble calls
    def run_standard_evaluation_individual(self, x_orig, y_orig, bs=None, return_labels=False):
        """AutoAttack's, with its argument names: each attack on every sample on its own (no cascade); {attack name:
        x_adv}, x_adv the clean input where that attack did not succeed (``return_labels=True``: {name: (x_adv,
        y_adv)}, as :meth:`run_standard_evaluation`). A name a custom list repeats is keyed "name #2", "name #3", ..."""
        if bs is not None:
            bs = check_steps("autoattack.run_standard_evaluation_individual", bs, "bs")
        check_flags("autoattack.run_standard_evaluation_individual", {"return_labels": return_labels})
        self._check_eps(x_orig)
        out = {}
        names = [_name(attack, i) for i, attack in enumerate(self.attacks)]
        for attack, name, key in zip(self.attacks, names, _distinct_keys(names)):
            # the model checks once, with the first attack
            x_adv = ensemble(self.model, x_orig, y_orig, [attack], model_mode=self.model_mode, clip_min=self.clip_min,
                             clip_max=self.clip_max, batch_size=bs, names=[name],
                             model_check=None if out else self._check_model, name=self.name).x_adv
            out[key] = (x_adv, self._predicted(x_adv, bs)) if return_labels else x_adv
        return out

    def _check_eps(self, x):
        """A per-sample eps tensor [N] checked per sample in AutoAttack's name, as a number is when built: a negative
        or (Linf) too wide radius was refused by the first attack of the list, in its name ('apgd: expected every eps
        to be finite and >= 0'). Another shape, or x no batch of floats, is left to the cascade's checks."""
        eps = self.eps
        if (torch.is_tensor(eps) and eps.dim() == 1 and torch.is_tensor(x) and x.is_floating_point() and x.dim()
                and eps.shape[0] == x.shape[0]):
            eps_t, eps_max = per_sample(self.name, "eps", eps, x, with_max=True)
            check_linf_budget(self.name, self.norm, eps_t, self.clip_min, self.clip_max, eps_max=eps_max)

    def _check_model(self, first):
        """AutoAttack's model checks (its checks.py), as warnings, on the first batch: a model whose two
        forwards of one batch differ (dropout in train mode, random transforms) is attacked by the deterministic
        versions' gradients of one draw each, which overestimates its robustness; a model that outputs
        probabilities (non-negative rows summing to 1) gives APGD-CE and APGD-T losses that saturate. Buffers
        (batch-norm statistics under model_mode="train") are restored, so the checks leave the model as it was."""
        buffers = [b.clone() for b in self.model.buffers()]
        try:
            with torch.no_grad(), attack_context(self.model, self.model_mode, self.name):
                outs = [forward(self.name, self.model, first).float() for _ in range(2)]
        finally:
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
        if self.version != "rand":
            unit = [o.reshape(o.shape[0], -1) for o in outs]
            unit = [o / (o.norm(dim=1, keepdim=True) + 1e-10) for o in unit]
            diff = float((unit[0] - unit[1]).abs().max())
            if diff > RANDOMIZED_TOLERANCE or not torch.equal(*map(predict_from_output, outs)):
                warn(f"autoattack: two forwards of the same inputs differ (by {diff:.3g} in outputs scaled to unit "
                     "norm), so the model looks randomized (dropout in train mode, random transforms, "
                     f"model_mode={self.model_mode!r}); version={self.version!r} then overestimates its robustness: "
                     "use version='rand' (gradients averaged over eot_iter passes; in a custom list, APGD's "
                     "eot_iter) or make the model deterministic", stacklevel=4)
        if looks_like_probabilities(outs[0]):
            warn_probabilities("autoattack")  # once: its attacks' first forwards then do not warn again

    def _predicted(self, x_adv, bs):
        """AutoAttack's y_adv: the labels the model predicts on x_adv, ``bs`` samples at a time, in the mode of the
        cascade's robustness checks."""
        parts = x_adv.split(bs or x_adv.shape[0]) if x_adv.shape[0] else ()
        preds = [_predict(self.model, part, self.model_mode, self.name) for part in parts]
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=x_adv.device)

    def forward(self, x, y):
        return self.run(x, y).x_adv

    def __repr__(self):
        # every setting that decides the result, as the other attacks' reprs: with the attacks' names only,
        # AutoAttack(model, steps=10, seed=1) and the standard 100 steps read the same in two runs' logs. A callable
        # that is no Attack shows its name (a function's repr holds its address, which differs between runs).
        shown = [repr(a) if isinstance(a, Attack) else _name(a, i) for i, a in enumerate(self.attacks)]
        return (f"AutoAttack(norm={self.norm!r}, eps={self.eps!r}, version={self.version!r}, "
                f"model_mode={self.model_mode!r}, clip_min={self.clip_min!r}, clip_max={self.clip_max!r}, "
                f"cascade={self.cascade!r}, attacks=[{', '.join(shown)}])")
