"""Standard training and the adversarial-data baselines: AT (Madry), SAT / dual AT, supervised RST, FAT.

Every loss is a batch mean of the per-sample classification loss (cross-entropy; BCE-with-logits for single-logit
models). Attacks run on robust_ops.attacks.core.run_pgd with the settings of PGDDefense.
"""

from ..attacks.context import classification_loss
from ..attacks.core import forward
from ._common import (PGDDefense, check_int, check_labels_against, check_options, labels, metric_values, real_option)
from .base import Defense, DefenseOutput


class Standard(Defense):
    """Standard training: L = L(x)."""

    name = "standard"

    def __init__(self, **unknown):
        if unknown:  # Python's own TypeError ("Standard() takes no arguments") listed nothing
            check_options(type(self).__name__, type(self), unknown)

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        logits = forward(self.name, model, x)  # checked: the defense's first forward (as TRADES's and GR's)
        check_labels_against(self.name, y, logits)  # a single logit's BCE took a label 2 as its target silently
        loss = classification_loss(logits, y)
        return DefenseOutput(loss=loss, logits=logits, metrics=metric_values(loss=loss))


class AT(PGDDefense):
    """Madry et al. adversarial training (arXiv:1706.06083): L = L(x_adv), x_adv = PGD(x) (random start)."""

    name = "at"

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        x_adv = self.attack(model, x, y).x_adv
        loss = classification_loss(model(x_adv), y)
        return DefenseOutput(loss=loss, metrics=metric_values(loss=loss, loss_adv=loss))


class SAT(PGDDefense):
    """Standard / dual adversarial training (DPAAT eq. 4): L = alpha * L(x_adv) + (1 - alpha) * L(x).

    alpha = 0.5 (DPAAT's setting; ARFL's dual AT with ratio r = 1 - alpha). alpha = 1 is AT (no clean forward, no
    clean logits), alpha = 0 standard training (no attack).
    """

    name = "sat"

    def __init__(self, alpha=0.5, **attack):
        super().__init__(**attack)
        self.alpha = real_option(self.name, "alpha", alpha, minimum=0, maximum=1)

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        if self.alpha == 0:  # standard training: no attack, so no adversarial loss to report (it read 0)
            return Standard.__call__(self, model, x, y)
        if self.alpha == 1:
            # AT exactly: a clean forward would, with a zero weight, still move BatchNorm's running statistics
            return AT.__call__(self, model, x, y)
        x_adv = self.attack(model, x, y).x_adv
        logits = model(x)
        clean = classification_loss(logits, y)
        adv = classification_loss(model(x_adv), y)
        loss = self.alpha * adv + (1 - self.alpha) * clean
        return DefenseOutput(loss=loss, logits=logits, metrics=metric_values(loss=loss, loss_clean=clean, loss_adv=adv))


class RST(PGDDefense):
    """Supervised robust self-training (MIRST-DM eq. 1): L = L_std(x) + lam * L_adv(x_adv); lam = 1 (MIRST-DM)."""

    name = "rst"

    def __init__(self, lam=1.0, **attack):
        super().__init__(**attack)
        self.lam = real_option(self.name, "lam", lam, minimum=0)

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        if self.lam == 0:  # standard training exactly: no attack (its forwards would still move BatchNorm's statistics)
            return Standard.__call__(self, model, x, y)
        x_adv = self.attack(model, x, y).x_adv
        logits = model(x)
        clean = classification_loss(logits, y)
        adv = classification_loss(model(x_adv), y)
        loss = clean + self.lam * adv
        return DefenseOutput(loss=loss, logits=logits, metrics=metric_values(loss=loss, loss_clean=clean, loss_adv=adv))


class FAT(PGDDefense):
    """Friendly adversarial training (Zhang et al., ICML 2020): L = L(x_adv) with early-stopped PGD -- each step at
    which a sample is misclassified spends one of its ``tau``, and a misclassified sample with none left stops
    (run_pgd(early_stop=tau), the paper's Algorithm 1); ``omega`` > 0 adds the reference code's ``omega * N(0, 1)``
    to each moving sample's step (run_pgd(step_noise=omega); default 0, none). tau = 0 (FAT's
    default; the paper also ramps tau up during training, which a scheduler can do by setting ``defense.tau``).
    The current tau is also the defense's state: like the optimizer's scheduled lr, a resume takes it from the
    checkpoint (the tau given to the constructor is an option, compared on resume)."""

    name = "fat"

    def __init__(self, tau=0, omega=0.0, **attack):
        super().__init__(**attack)
        self.tau = check_int(self.name, "tau", tau, minimum=0)
        self._built_tau = self.tau
        # the reference code's per-step Gaussian noise (its train_FAT.py: 0.001); 0 keeps the paper's Algorithm 1
        self.omega = real_option(self.name, "omega", omega, minimum=0)

    def options(self):
        # tau as built: the scheduled tau is state (checkpointed), so resuming with this same object once a scheduler
        # changed it was refused as "trained with tau=0, this call's defense has tau=2"
        options = {**super().options(), "tau": self._built_tau}
        if not options["omega"]:  # as checkpoints written before omega existed record it: absent
            del options["omega"]
        return options

    def _current_tau(self):
        # set between batches by the caller's scheduler: 1.5 was truncated to 1, -1 refused as run_pgd's early_stop
        return check_int(self.name, "tau", self.tau, minimum=0)

    def state_dict(self):
        return {"tau": self._current_tau()}

    def load_state_dict(self, state):
        """Restore ``state`` from ``state_dict()``: {"tau": int >= 0}, the early-stop count a scheduler had set; {}
        (checkpoints written before tau was kept) keeps this defense's own tau. Other keys: ValueError."""
        if not state:  # checkpoints written before tau was kept: the defense's own tau
            return
        if set(state) != {"tau"}:
            raise ValueError(f"{self.name}: expected state keys ['tau'], got {sorted(state)}")
        self.tau = check_int(self.name, "tau", state["tau"], minimum=0)

    def __call__(self, model, x, y, ids=None):
        """One training batch's DefenseOutput (loss, clean logits, metrics): ``model`` is fit's model (DDP-wrapped
        under torch.distributed; attacks run on ``unwrap(model)``), ``x`` the inputs [N, ...], ``y`` the labels [N]
        (int64 class indices); ``ids`` (dataset sample ids) is unused by this defense."""
        y = labels(self.name, x, y)
        noise = {"step_noise": self.omega} if self.omega else {}  # omega 0: the attack of the paper's Algorithm 1
        x_adv = self.attack(model, x, y, early_stop=self._current_tau(), **noise).x_adv
        loss = classification_loss(model(x_adv), y)
        return DefenseOutput(loss=loss, metrics=metric_values(loss=loss, loss_adv=loss))
