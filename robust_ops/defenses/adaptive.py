"""Per-sample perturbation radii: AMAT (loss-threshold margins, DPAAT eq. 5-7) and DPAAT (Dynamic Perturbation-Adaptive
Adversarial Training, eqs. 11-16 and Alg. 1).

Both craft x_adv with the fixed radius eps, derive a radius per sample from the losses, and craft a NEW x_adv with
those radii (run_pgd with a per-sample eps tensor, step size scaled by the same factor, eps_i * step_size / eps, or
step_size itself with radius_step="fixed"); DPAAT(adapt=False), the paper's ablation D-B, trains at the first x_adv.
Defaults follow DPAAT's experiments: 7-step PGD, L2, eps = 0.3, step eps/2 (0.15), no random start (eq. 9: x_0 = x).
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attacks.context import classification_loss
from ..attacks.core import check_number, check_step_moves, sample_distance, scalar_value
from ._common import (PGDDefense, as_two_class, check_choice, check_flags, distributed_run, float32_or_wider, labels,
                      metric_values, per_sample_ce, real_option, refuse_unused, unwrap, use_model_mode)
from .adversarial import Standard
from .base import DefenseOutput


def _global_mean(values, read=True):
    """The mean of ``values`` over all processes' shares of the batch (this process's mean outside DDP): a float, or
    with ``read=False`` a one-element tensor (for metric_values to read with the batch's metrics)."""
    if not distributed_run():
        mean = values.mean()
    else:
        total = torch.stack([values.sum().double(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                device=values.device)])
        dist.all_reduce(total)
        mean = total[0] / total[1]
    return float(mean) if read else mean


class _AdaptiveRadius(PGDDefense):
    default_eps = 0.3
    default_steps = 7
    default_norm = "l2"
    default_random_start = False

    def __init__(self, *, step_size=None, steps=None, eps=None, radius_step=None, **attack):
        steps = self.default_steps if steps is None else steps
        # checked before the step is derived from it: eps="0.3" failed as "unsupported operand type(s) for /"
        eps = check_number(self.name, "eps", scalar_value(self.name, "eps", self.default_eps if eps is None else eps),
                           n=None)
        # DPAAT's step 0.15 at eps 0.3, as a ratio: a default that jumped to 2.5*eps/steps off eps = 0.3 exactly
        # (0.11 at eps 0.31) made nearby radii train with another adversary
        step_size = eps / 2 if step_size is None else step_size
        super().__init__(eps=eps, step_size=step_size, steps=steps, **attack)
        # the second attack's step: "scaled" eps_i * step_size / eps (each radius spanned in the same steps), or
        # "fixed" step_size for every radius (the paper's one PGD step, 0.15, read literally)
        self.radius_step = check_choice(self.name, "radius_step", "scaled" if radius_step is None else radius_step,
                                        ("scaled", "fixed"))

    def options(self):
        options = super().options()
        if options["radius_step"] == "scaled":  # as checkpoints written before the option existed record it: absent
            del options["radius_step"]
        return options

    def _losses(self, model, y, *inputs):
        """Per-sample losses of each of ``inputs`` in the attack's mode, without gradients (only those the rule
        reads: a forward in "train" attack mode also moves BatchNorm's running statistics); float32 or wider, so a
        float64 model's radii are float64 arithmetic."""
        with torch.no_grad(), use_model_mode(unwrap(model), self.attack_mode) as net:
            losses = [float32_or_wider(per_sample_ce(net(v), y)) for v in inputs]
        # A diverged model's NaN or Inf losses give no radius: the NaN radii reached run_pgd, whose "expected every eps
        # to be finite" named an argument the caller never set (DPAAT's running mean turned NaN first). Named here,
        # before the rule reads them, as IMA names its NaN outputs.
        bad = torch.stack([~torch.isfinite(v) for v in losses]).any(0)
        if bool(bad.any()):
            raise ValueError(f"{self.name}: the model's loss is NaN or Inf for {int(bad.sum())} of the batch's "
                             f"{y.numel()} samples, so no per-sample radius can be derived -- fix the model "
                             "(diverged? try a lower learning rate)")
        return losses

    def _attack_with_radii(self, model, x, y, radii, x_init=None):
        """The new x_adv at per-sample ``radii``: PGD from x, or from ``x_init`` projected onto each new ball (then
        without a random start)."""
        radii = radii.to(x.dtype)
        if self.radius_step == "fixed":
            alpha = torch.full_like(radii, self.step_size)
        else:
            alpha = radii * (self.step_size / self.eps if self.eps > 0 else 1.0)
        eps = radii
        if self.norm == "linf":
            # A radius past the range's width (eps + delta_eps, norm + gamma) would be refused by run_pgd mid-training;
            # the box binds there, so the width gives the same x_adv. So would a step past it at a radius under it
            # (a step_size above eps scales such a radius past the width): a step of the width already reaches the box.
            width = self.clip_max - self.clip_min
            eps, alpha = radii.clamp_max(width), alpha.clamp_max(width)
        start = {} if x_init is None else {"x_init": x_init, "random_start": False}
        return self.attack(model, x, y, eps=eps, alpha=alpha, **start).x_adv


class AMAT(_AdaptiveRadius):
    """Adaptive-margin AT as written in DPAAT eq. 5-7: per sample, eps_i = eps + delta_eps if its adversarial loss
    L(x_adv_i) < xi (the sample is still robust: enlarge its margin), else (eps + ||x_adv_i - x_i||) / 2; a new x_adv
    with radii eps_i; L = (L(x_adv) + L(x)) / 2. AMAT's thresholds came from an external network and are not given
    in DPAAT; defaults here: xi = ln 2 (the adversarial example is still classified correctly with probability > 1/2
    in the binary case) and delta_eps = eps / 2. The second attack steps by eps_i * step_size / eps
    (radius_step="scaled") or by step_size at every radius (radius_step="fixed")."""

    name = "amat"

    def __init__(self, xi=math.log(2.0), delta_eps=None, **attack):
        super().__init__(**attack)
        self.xi = real_option(self.name, "xi", xi, minimum=0)
        self.delta_eps = real_option(self.name, "delta_eps", self.eps / 2 if delta_eps is None else delta_eps,
                                    minimum=0)
        if self.radius_step == "fixed":  # the second attack steps by step_size at radii up to eps + delta_eps
            check_step_moves(self.name, self.eps + self.delta_eps, self.step_size, "step_size",
                             " (eps + delta_eps, the second attack's radius under radius_step='fixed')")

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        first = self.attack(model, x, y).x_adv
        (adv_losses,) = self._losses(model, y, first)
        shrunk = 0.5 * (self.eps + float32_or_wider(sample_distance(first, x, self.norm)))
        radii = torch.where(adv_losses < self.xi, torch.full_like(shrunk, self.eps + self.delta_eps), shrunk)
        x_adv = self._attack_with_radii(model, x, y, radii)
        logits = model(x)
        clean = classification_loss(logits, y)
        adv = classification_loss(model(x_adv), y)
        loss = 0.5 * (adv + clean)
        return DefenseOutput(loss=loss, logits=logits, metrics=metric_values(
            loss=loss, loss_clean=clean, loss_adv=adv, radius_mean=radii.mean()))


def synchronization_loss(logits, logits_adv, form="js"):
    """Per-sample synchronization loss [N] between the softmax outputs p of the clean ``logits`` and q of the
    adversarial ``logits_adv`` (each [N, K], or [N] / [N, 1] single logits read as two classes), DPAAT eq. 11.

    form="printed": -1/2 * sum_k (p log(p/(p+q)) + q log(q/(p+q))) exactly as printed. It equals ln 2 - JS(p, q), so
    it is LARGEST (ln 2) when p == q and minimizing it pushes the outputs apart -- the opposite of what the text says
    ("smaller difference between y_ori and y_adv meant lower synchronization loss").
    form="js" (default): JS(p, q) = ln 2 - printed, the Jensen-Shannon divergence: 0 when p == q, so minimizing it
    aligns the outputs as the text intends (same gradient magnitude as the printed form, opposite sign)."""
    check_choice("synchronization_loss", "form", form, ("js", "printed"))  # "Printed" would have given "js"
    # In log-probabilities: a probability that rounds to 0 (a confident model, a logit gap past ~104 in float32)
    # made xlogy(p, p / (p + q))'s gradient 0/0, NaN in every weight under a finite loss
    log_p = F.log_softmax(float32_or_wider(as_two_class(logits)), 1)
    log_q = F.log_softmax(float32_or_wider(as_two_class(logits_adv)), 1)
    log_s = torch.logaddexp(log_p, log_q)
    printed = -0.5 * (log_p.exp() * (log_p - log_s) + log_q.exp() * (log_q - log_s)).sum(1)
    return printed if form == "printed" else math.log(2.0) - printed


class DPAAT(_AdaptiveRadius):
    """DPAAT: L = alpha * L(x_adv) + (1 - alpha) * L(x) + beta * L_syn (eq. 12), with per-sample radii (eqs. 13-15):
    dL_i = L(x_adv_i) - L(x_i), dL_avg their mini-batch mean (eq. 14), gamma_i = eps * |dL_i - dL_avg| / |dL_avg|,
    eps_i = ||x_adv_i - x_i|| - gamma_i if dL_i > dL_avg else ||x_adv_i - x_i|| + gamma_i, then a new x_adv with radii
    eps_i (Alg. 1 line 12). alpha = 1 with beta = 0 runs no clean training forward (L = L(x_adv), no clean logits).
    adapt=False trains at the first x_adv (fixed eps: no radii, no second attack), the paper's ablation D-B (Fig. 3:
    synchronization loss alone); beta = 0 is its D-A (adaptation alone).

    Choices (docs/defenses/dpaat.md): denominator="abs", |dL_avg| (so a negative mean does not flip the rule), or
    "printed", dL_avg as eq. 15 prints it (a negative mean grows the fragile samples and shrinks the stable ones);
    |dL_avg| < guard (or 0) -> gamma = 0 (radius unchanged); a negative radius means no perturbation (eps_i = 0);
    max_radius (None: no cap, as in the paper) caps eps_i; reference="batch" (eq. 14) or "running" (an exponential
    running mean of dL_avg over batches, momentum 0.1 -- the epoch-wide V of eq. 13); syn="js" (default) or "printed"
    (see synchronization_loss); radius_step="scaled" (the second attack steps by eps_i * step_size / eps) or "fixed"
    (step_size at every radius, the paper's 0.15 read literally); second_attack_start="x" (Alg. 1 line 12's new x_adv
    by a fresh PGD from x) or "first_adv" (PGD continued from the first x_adv, projected onto each new ball). beta = 1
    (the paper leaves it tunable). State (checkpointed): the running mean, the number of batches and the mean radius
    of the last batch.

    An option given where it has no effect is refused, naming it: guard, max_radius, reference, momentum,
    radius_step, denominator and second_attack_start under adapt=False, momentum under reference="batch", syn under
    beta=0.
    """

    name = "dpaat"

    # guard, reference, syn and momentum default to None, resolved to 1e-6, "batch", "js" and 0.1 below: None tells an
    # option left unset from one given where it has no effect, which is refused (adapt=False trained as if
    # reference="running", momentum=0.5 had not been asked for). options() records the resolved values, as before.
    def __init__(self, alpha=0.5, beta=1.0, guard=None, max_radius=None, reference=None, syn=None, momentum=None,
                 adapt=True, radius_step=None, denominator=None, second_attack_start=None, **attack):
        super().__init__(radius_step=radius_step, **attack)
        n = self.name
        self.alpha = real_option(n, "alpha", alpha, minimum=0, maximum=1)
        self.beta = real_option(n, "beta", beta, minimum=0)
        self.guard = real_option(n, "guard", 1e-6 if guard is None else guard, minimum=0)
        self.max_radius = None if max_radius is None else real_option(n, "max_radius", max_radius, minimum=0)
        self.reference = check_choice(n, "reference", "batch" if reference is None else reference, ("batch", "running"))
        self.syn = check_choice(n, "syn", "js" if syn is None else syn, ("js", "printed"))
        # gamma's denominator: |dL_avg| ("abs"), or eq. 15's dL_avg as printed (a negative mean swaps shrink and grow)
        self.denominator = check_choice(n, "denominator", "abs" if denominator is None else denominator,
                                        ("abs", "printed"))
        # Alg. 1 line 12's "returned new x^adv with eps_DPAAT": a fresh PGD from x ("x"), or PGD continued from the
        # first x_adv ("first_adv"), projected onto each sample's new ball before its first step
        self.second_attack_start = check_choice(n, "second_attack_start",
                                                "x" if second_attack_start is None else second_attack_start,
                                                ("x", "first_adv"))
        self.momentum = real_option(n, "momentum", 0.1 if momentum is None else momentum, minimum=0, maximum=1,
                                   allow_min=False)
        check_flags(n, {"adapt": adapt})  # adapt="no" would have adapted
        self.adapt = adapt
        if not adapt:
            refuse_unused(n, {"guard": guard, "max_radius": max_radius, "reference": reference, "momentum": momentum,
                              "radius_step": radius_step, "denominator": denominator,
                              "second_attack_start": second_attack_start},
                          "adapt=False (no adaptive radii: the first x_adv is trained on)", "set adapt=True")
        elif self.reference == "batch":
            refuse_unused(n, {"momentum": momentum}, "reference='batch' (eq. 14's mini-batch mean, no running mean)",
                          "set reference='running'")
        if self.beta == 0:
            refuse_unused(n, {"syn": syn}, "beta=0 (no synchronization loss)", "give beta > 0")
        self._running_dl = 0.0
        self._num_batches = 0
        self._radius_mean = 0.0

    def radii(self, norms, delta_losses):
        """eps_DPAAT per sample (eq. 15) from the perturbation norms ``norms`` [N] and the loss changes
        ``delta_losses`` [N] (the adversarial minus the clean per-sample loss); updates the running mean.
        Under torch.distributed each process holds a share of the batch: dL_avg and the recorded mean radius are
        means over the whole batch."""
        batch_avg = _global_mean(delta_losses)
        if self._num_batches == 0:
            self._running_dl = batch_avg
        else:
            self._running_dl = (1 - self.momentum) * self._running_dl + self.momentum * batch_avg
        self._num_batches += 1
        avg = batch_avg if self.reference == "batch" else self._running_dl
        if abs(avg) < self.guard or avg == 0:  # an exact 0 under guard=0 made 0/0 NaN radii
            gamma = torch.zeros_like(delta_losses)
        else:
            gamma = self.eps * (delta_losses - avg).abs() / (abs(avg) if self.denominator == "abs" else avg)
        radii = torch.where(delta_losses > avg, norms - gamma, norms + gamma).clamp_min(0.0)
        if self.max_radius is not None:
            radii = radii.clamp_max(self.max_radius)
        # over the whole batch (shares may be uneven, 2 / 1); a tensor until __call__ reads it with the metrics (one
        # host read), a float from then on; inside fit (metrics_read_by_fit) the float64 tensor fit's step reads
        # (state_dict's float() reads one left by a direct call of radii, or by fit's steps)
        self._radius_mean = _global_mean(radii, read=False)
        return radii

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        if self.alpha == 0 and self.beta == 0:
            # standard training exactly: no attack (its forwards would still move BatchNorm's statistics), no radii
            return Standard.__call__(self, model, x, y)
        x_adv = self.attack(model, x, y).x_adv
        radius = {}
        if self.adapt:
            clean_l, adv_l = self._losses(model, y, x, x_adv)
            radii = self.radii(float32_or_wider(sample_distance(x_adv, x, self.norm)), adv_l - clean_l)
            x_adv = self._attack_with_radii(model, x, y, radii,
                                            x_adv if self.second_attack_start == "first_adv" else None)
            radius = {"radius_mean": self._radius_mean}  # a tensor: read with the metrics below
        if self.alpha == 1 and self.beta == 0:
            # L = L(x_adv) alone: a clean training forward with weight 0 still moved BatchNorm's running statistics
            # (as SAT at alpha = 1); the radius rule's clean loss above ran in the attack's mode
            adv = classification_loss(model(x_adv), y)
            return DefenseOutput(loss=adv, metrics=self._read_radius_mean(metric_values(loss=adv, loss_adv=adv,
                                                                                       **radius)))
        logits = model(x)
        logits_adv = model(x_adv)
        clean = classification_loss(logits, y)
        adv = classification_loss(logits_adv, y)
        syn = synchronization_loss(logits, logits_adv, self.syn).mean()
        loss = self.alpha * adv + (1 - self.alpha) * clean + self.beta * syn
        return DefenseOutput(loss=loss, logits=logits, metrics=self._read_radius_mean(metric_values(
            loss=loss, loss_clean=clean, loss_adv=adv, loss_syn=syn, **radius)))

    def _read_radius_mean(self, metrics):
        """The batch's metrics, with the mean radius they hold kept as the state's: a float, or inside fit
        (metrics_read_by_fit) the float64 tensor fit's step reads."""
        if "radius_mean" in metrics:
            self._radius_mean = metrics["radius_mean"]
        return metrics

    def options(self):
        options = super().options()
        if options["adapt"]:  # as checkpoints written before adapt existed record it: absent
            del options["adapt"]
        if options["denominator"] == "abs":  # likewise
            del options["denominator"]
        if options["second_attack_start"] == "x":  # likewise
            del options["second_attack_start"]
        return options

    def holds_state(self):
        return self._num_batches > 0

    def reset_state(self):
        self._running_dl, self._num_batches, self._radius_mean = 0.0, 0, 0.0

    def state_dict(self):
        return {"running_delta_loss": float(self._running_dl), "num_batches": int(self._num_batches),
                "radius_mean": float(self._radius_mean)}

    def load_state_dict(self, state):
        """Restore ``state`` from ``state_dict()``: running_delta_loss, num_batches and radius_mean, exactly these
        keys (ValueError naming them otherwise)."""
        expected = {"running_delta_loss", "num_batches", "radius_mean"}
        if set(state) != expected:
            raise ValueError(f"{self.name}: expected state keys {sorted(expected)}, got {sorted(state)}")
        self._running_dl = float(state["running_delta_loss"])
        self._num_batches = int(state["num_batches"])
        self._radius_mean = float(state["radius_mean"])
