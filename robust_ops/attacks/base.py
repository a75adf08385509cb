"""torchattacks-style attack objects: ``Attack(model, **options)(x, y) -> x_adv``, thin wrappers of the functions."""

import torch

from .context import MODEL_MODES


class Attack:
    """Base class. Subclasses set ``name`` and implement ``forward(x, y) -> x_adv`` with the functional attack.

    Options every attack understands (torchattacks' names where they exist):
      * ``model_mode``: "eval" (default), "train" or "keep"; ``set_model_mode(mode)`` changes it.
      * ``targeted``: labels given to ``__call__`` are target classes; ``set_mode_targeted_by_label()`` /
        ``set_mode_default()`` switch it.
      * ``clip_min``, ``clip_max``: the valid input range (default [0, 1]).
    """

    name = "attack"
    supports_targeted = True

    def __init__(self, model, *, targeted=False, model_mode="eval", clip_min=0.0, clip_max=1.0):
        self.model = model
        self.targeted = False
        if targeted:
            self.set_mode_targeted_by_label()
        self.set_model_mode(model_mode)
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)

    def set_model_mode(self, model_mode):
        if model_mode not in MODEL_MODES:
            raise ValueError(f"{self.name}: expected model_mode to be one of {', '.join(MODEL_MODES)}, "
                             f"got {model_mode!r}")
        self.model_mode = model_mode
        return self

    def set_mode_targeted_by_label(self):
        if not self.supports_targeted:
            raise ValueError(f"{self.name}: this attack has no targeted mode")
        self.targeted = True
        return self

    def set_mode_default(self):
        self.targeted = False
        return self

    def forward(self, x, y):
        raise NotImplementedError

    def __call__(self, x, y):
        return self.forward(x, y)

    def _options(self):
        return {k: v for k, v in vars(self).items() if k != "model" and not k.startswith("_")}

    def __repr__(self):
        def show(v):
            return f"Tensor(shape={tuple(v.shape)})" if torch.is_tensor(v) else repr(v)

        return f"{type(self).__name__}({', '.join(f'{k}={show(v)}' for k, v in self._options().items())})"
