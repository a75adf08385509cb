"""Uniform white-noise attack (IMA's protocol, Ma et al. 2023): random noise in the Linf or L2 ball, repeated."""

import torch

from .._options import check_seed
from .base import Attack, refuse_positional_options
from .core import (FIRST_FORWARD, check_budget, check_labels_against, check_linf_budget, check_norm, check_number,
                   check_steps, forward, names_foreign_options, per_sample, refuse_targeted)
from .context import attack_context, check_inputs, predict_from_output
from .pgd import make_generator


def uniform_ball(shape, eps, norm, *, generator=None, device=None, dtype=torch.float32):
    """Noise uniform in the ball of radius eps (float or Tensor[N]) around 0: Linf: every entry U(-eps, eps);
    L2: uniform in the ball, i.e. a direction uniform on the sphere (normalized Gaussian) times eps * U^(1/d)
    with d the number of entries per sample.

    Args: shape (tuple of int, (N, ...)); eps (float >= 0 or Tensor[N]); norm ("linf" or "l2", any case);
    generator (torch.Generator for the draws, None: the global one); device (None: torch's default), dtype
    (floating point, default float32) of the noise. Returns a Tensor of ``shape``.
    """
    norm = check_norm("uniform_ball", norm)
    # else "'NoneType' object is not subscriptable" or torch.rand's overload list; eps=nan made all-NaN noise
    sizes_ok = isinstance(shape, (tuple, list)) and all(type(s) is int and s >= 0 for s in shape)  # no bools
    if not (sizes_ok and shape):
        raise ValueError(f"uniform_ball: expected shape to be a non-empty tuple of sizes (N, ...), got {shape!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):  # torch's "'check_uniform_bounds' not
        # implemented for 'Long'" (or its overload list for "float32") named no argument
        raise TypeError(f"uniform_ball: expected dtype to be a floating-point torch.dtype, got {dtype!r}")
    n = shape[0]
    if not torch.is_tensor(eps):
        eps = check_number("uniform_ball", "eps", eps, n=None)  # the attacks' words for a bad eps
    elif eps.shape != (n,):  # values unchecked: white_noise checked them, and reading them would sync every trial
        raise ValueError(f"uniform_ball: expected eps to be a number or a tensor of shape [{n}], got shape "
                         f"{tuple(eps.shape)}")
    view = (n,) + (1,) * (len(shape) - 1)
    eps = eps.view(view).to(dtype) if torch.is_tensor(eps) else eps
    if norm == "linf":
        return (torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1) * eps
    direction = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    direction = direction / direction.reshape(n, -1).norm(dim=1).clamp_min(torch.finfo(dtype).tiny).view(view)
    d = direction[0].numel() if n else 1
    radius = torch.rand(view, generator=generator, device=device, dtype=dtype) ** (1.0 / d)
    return direction * radius * eps


@torch.no_grad()
@names_foreign_options
def white_noise(model, x, y, *, eps, norm="linf", trials=10, clip_min=0.0, clip_max=1.0, model_mode="eval",
                generator=None, **options):
    r"""Uniform white-noise attack (the IMA paper's evaluation): ``trials`` draws of noise uniform in the Linf or L2
    ball of radius eps, each added to the clean input and clipped to ``[clip_min, clip_max]``. A sample counts as
    robust only if ALL trials keep it correctly classified.

    Args:
        model; x (Tensor[N, ...]) in the clip range; y (LongTensor[N]); eps (float or Tensor[N]);
        norm: "linf" (default) or "l2", any case (uniform in the ball: direction uniform on the sphere, radius
            eps*U^(1/d));
        trials (int): default 10; clip_min, clip_max; model_mode; generator (torch.Generator for the draws);
        options: none; a ``targeted=`` is refused with a ValueError saying why (a TypeError names any other).

    Returns:
        x_adv (Tensor[N, ...]): per sample, the first noisy input that is misclassified, else the last trial.
        Samples already misclassified stop being tried once a trial fails (the first failing input is kept).

    Raises:
        NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError, InputShapeError: as
        :func:`run_pgd`.

    Example::

        >>> x_noisy = robust_ops.attacks.white_noise(model, x, y, eps=0.1, norm="l2", trials=10)
    """
    refuse_targeted("white_noise", options, "white noise is untargeted (y are true labels; any misclassification "
                    "breaks a sample)")
    return _white_noise("white_noise", model, x, y, eps=eps, norm=norm, trials=trials, clip_min=clip_min,
                        clip_max=clip_max, model_mode=model_mode, generator=generator)


def _white_noise(name, model, x, y, *, eps, norm, trials, clip_min, clip_max, model_mode, generator):
    """:func:`white_noise`, its errors naming ``name`` ("white_noise", or "noise" for ``WhiteNoise``, whose errors
    named white_noise when run)."""
    y = check_inputs(name, x, y, clip_min, clip_max)
    norm = check_norm(name, norm)
    trials = check_steps(name, trials, "trials")
    eps_t, eps_max = per_sample(name, "eps", eps, x, with_max=True)
    check_linf_budget(name, norm, eps_t, clip_min, clip_max, eps_max=eps_max)
    x_adv = x.detach().clone()
    n = x.shape[0]
    if n == 0:
        return x_adv
    alive = torch.ones(n, dtype=torch.bool, device=x.device)  # still robust: keep trying
    with attack_context(model, model_mode, name):
        for t in range(trials):
            idx = alive.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            noise = uniform_ball(x.shape, eps_t, norm, generator=generator, device=x.device, dtype=x.dtype)
            noisy = torch.clamp(x + noise, clip_min, clip_max)[idx]  # same draws whatever is still alive
            out = forward(name, model, noisy)
            if t == 0:
                check_labels_against(name, y, out, finite_at=FIRST_FORWARD)
            x_adv[idx] = noisy
            alive[idx] = predict_from_output(out) == y[idx]
    return x_adv


class WhiteNoise(Attack):
    """``WhiteNoise(model, eps=8/255, norm="linf", trials=10, seed=None)(x, y)``; see :func:`white_noise`."""

    name = "noise"
    supports_targeted = False

    def __init__(self, model, eps=8 / 255, norm="linf", trials=10, *positional, seed=None, **options):
        refuse_positional_options(self.name, WhiteNoise, positional)
        super().__init__(model, **options)
        self.eps, self.norm, self.trials, self.seed = eps, check_norm(self.name, norm), trials, seed
        check_steps(self.name, trials, "trials")  # here too, as every attack's options
        check_seed(self.name, seed, optional=True)
        check_budget(self.name, self.norm, eps, self.clip_min, self.clip_max)

    def forward(self, x, y):
        return _white_noise(self.name, self.model, x, y, eps=self.eps, norm=self.norm, trials=self.trials,
                            clip_min=self.clip_min, clip_max=self.clip_max, model_mode=self.model_mode,
                            generator=make_generator(self.seed, x, self.name))
