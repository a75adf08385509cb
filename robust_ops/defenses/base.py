"""The contract every defense follows: a small object that computes one batch's loss and keeps its own state."""

from dataclasses import dataclass, field

import torch


@dataclass
class DefenseOutput:
    """What a defense returns for one batch.

    loss: the scalar the trainer calls ``.backward()`` on.
    logits: clean logits when the defense computed them (used for the training accuracy), else None.
    extra_grads: parameter gradients computed already (MIRST's reuse of the attack's backward passes), in the order
        of ``[p for p in model.parameters() if p.requires_grad]``; the trainer adds them to ``.grad``. None if unused.
    metrics: plain floats for the progress bar and the metrics CSV.
    """

    loss: torch.Tensor
    logits: torch.Tensor = None
    extra_grads: list = None
    metrics: dict = field(default_factory=dict)


class Defense:
    """Base class. Subclasses set ``name`` and implement ``__call__(model, x, y, ids=None) -> DefenseOutput``."""

    name = "defense"
    needs_ids = False  # batches must carry dataset sample ids (IMA)
    binary_only = False  # ARFL

    def __call__(self, model, x, y, ids=None):
        raise NotImplementedError

    def check_labels(self, y, num_classes):
        if self.binary_only and num_classes != 2:
            raise ValueError(f"{self.name}: defined for binary tasks only, got {num_classes} classes")

    def state_dict(self):
        """Defense state for checkpoints (tensors and plain values only); stateless defenses return {}."""
        return {}

    def load_state_dict(self, state):
        if state:
            raise ValueError(f"{self.name}: this defense keeps no state, got keys {sorted(state)}")

    def __repr__(self):
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_") and not torch.is_tensor(v)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"
