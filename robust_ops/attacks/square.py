"""Square Attack, Linf (Andriushchenko et al., ECCV 2020, arXiv:1912.00049): score-based black-box random search."""

import numbers

import torch

from .. import functional
from .base import Attack
from .context import attack_context, check_inputs, is_single_logit, two_logits
from .core import check_labels_against, check_linf_budget, check_norm, check_steps, forward, per_sample
from .pgd import make_generator


def p_schedule(p_init, it, n_queries, rescale=True):
    """Fraction of pixels changed at iteration ``it``: p_init halved at iterations 10, 50, 200, 500, 1000, 2000,
    4000, 6000, 8000 of a 10000-query budget, rescaled to ``n_queries`` (the schedule of the paper's code;
    AutoAttack's ``resc_schedule``). ``rescale=False`` applies those iterations as they are, whatever the budget
    (AutoAttack's standard evaluation: 5000 queries, so p never goes below p_init / 128)."""
    if rescale:
        it = int(it / n_queries * 10000)
    for bound, div in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16), (200, 8),
                       (50, 4), (10, 2)):
        if it > bound:
            return p_init / div
    return p_init


def _margin(out, y, targeted):
    """Untargeted: z_y - max_{j != y} z_j; targeted: max_{j != t} z_j - z_t. A sample is done once it is <= 0
    (AutoAttack's rule)."""
    z = two_logits(out) if is_single_logit(out) else out
    zy = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(torch.nn.functional.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    return other - zy if targeted else zy - other


# Bound on the redraws of one query's colour: with eps > 0 at most one colour per sample leaves its square unchanged,
# so more rounds only happen when eps is below float resolution at x.
MAX_COLOUR_REDRAWS = 32


@torch.no_grad()
def square(model, x, y, *, eps, n_queries=5000, p_init=0.8, targeted=False, clip_min=0.0, clip_max=1.0,
           model_mode="eval", generator=None, resample_unchanged=True, rescale_schedule=True):
    r"""Square Attack (Linf): random search over square-shaped updates of size ``2 * eps`` (black-box: only model
    outputs are used, no gradients).

    Starts from vertical stripes of ``+-eps``; each iteration draws, per sample, a square of side
    ``round(sqrt(p * H * W))`` at a random position with a random ``+-2 eps`` colour per channel, applies it with the
    fused PGD step (projection and clipping), and keeps it if the margin loss decreased. ``p`` follows the paper's
    schedule from ``p_init``, its iterations rescaled to ``n_queries`` (``rescale_schedule=True``, the default, as
    torchattacks' Square) or taken as they are (``False``, as AutoAttack's standard run). Samples stop once
    misclassified (targeted: once the target is predicted); samples the clean input already fools are returned
    unchanged, after one forward on the clean inputs that ``n_queries`` does not count (as AutoAttack).
    With ``resample_unchanged`` (default), a colour that would leave the square as it is (so the query would
    re-score the current point; on single-channel images half the draws once squares are small) is drawn again,
    as the paper's reference code does; ``False`` spends the query anyway, as AutoAttack's and torchattacks'
    PyTorch versions do.

    Args:
        model; x (Tensor[N, C, H, W]) in the clip range; y (LongTensor[N]) labels (targets when targeted);
        eps (float or Tensor[N]); n_queries (int): model queries per sample (default 5000);
        p_init (float): default 0.8 (AutoAttack's); targeted; clip_min, clip_max; model_mode; generator;
        resample_unchanged (bool): draw a colour again when it would not change the point (default True).
        rescale_schedule (bool): rescale the p schedule's iterations from 10000 to ``n_queries`` (default True).

    Returns:
        x_adv (Tensor[N, C, H, W]): the clean input where it already fools the model, else the first point that
        fools it, else the lowest-margin point found (AutoAttack returns the clean input there).
    """
    name = "square"
    y = check_inputs(name, x, y, clip_min, clip_max)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images [N, C, H, W], got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    n_queries = check_steps(name, n_queries, "n_queries")
    if isinstance(p_init, bool) or not isinstance(p_init, numbers.Real) or not 0 < float(p_init) <= 1:
        raise ValueError(f"{name}: expected p_init in (0, 1], got {p_init!r}")
    if not isinstance(rescale_schedule, bool):
        raise TypeError(f"{name}: expected rescale_schedule to be a bool, got {type(rescale_schedule).__name__}")
    eps_t = per_sample(name, "eps", eps, x)
    check_linf_budget(name, "linf", eps_t, clip_min, clip_max)
    x = x.detach()
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    dev = x.device

    def rand_sign(shape):
        return torch.randint(0, 2, shape, generator=generator, device=dev).to(x.dtype) * 2 - 1

    with attack_context(model, model_mode):
        # Samples the clean input already fools stay clean (AutoAttack, torchattacks): searching from the stripes
        # could end on a correctly classified point. This forward is not counted in n_queries (as AutoAttack).
        out = forward(name, model, x)
        check_labels_against(name, y, out)
        margin_best = _margin(out, y, targeted)
        todo = (margin_best > 0).nonzero().squeeze(1)
        # vertical stripes start: +-eps per (sample, channel, column)
        stripes = x.clone()
        functional.pgd_step_(stripes, x, rand_sign((n, c, 1, w)).expand(n, c, h, w).contiguous(), eps_t, eps_t,
                             clip_min=clip_min, clip_max=clip_max, norm="linf")
        x_best = x.clone()
        if todo.numel():
            x_best[todo] = stripes[todo]
            margin_best[todo] = _margin(forward(name, model, x_best[todo]), y[todo], targeted)
        rows = torch.arange(h, device=dev)
        cols = torch.arange(w, device=dev)
        for it in range(n_queries - 1):
            idx = (margin_best > 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            m = idx.numel()
            p = p_schedule(p_init, it, n_queries, rescale_schedule)
            s = min(max(int(round((p * h * w) ** 0.5)), 1), h, w)
            vh = torch.randint(0, h - s + 1, (m,), generator=generator, device=dev)
            vw = torch.randint(0, w - s + 1, (m,), generator=generator, device=dev)
            inside = (((rows[None, :] >= vh[:, None]) & (rows[None, :] < vh[:, None] + s))[:, :, None]
                      & ((cols[None, :] >= vw[:, None]) & (cols[None, :] < vw[:, None] + s))[:, None, :])
            inside = inside[:, None].to(x.dtype)
            x_cur, x_best_cur, eps_cur = x[idx], x_best[idx], eps_t[idx]

            def paint(rows_at):
                """x_best_cur[rows_at] with its square set to a fresh random colour."""
                x_painted = x_best_cur[rows_at]
                colour = rand_sign((rows_at.numel(), c, 1, 1))  # sign of the update per channel
                functional.pgd_step_(x_painted, x_cur[rows_at], inside[rows_at] * colour, 2 * eps_cur[rows_at],
                                     eps_cur[rows_at], clip_min=clip_min, clip_max=clip_max, norm="linf")
                return x_painted

            everyone = torch.arange(m, device=dev)
            x_new = paint(everyone)
            if resample_unchanged:
                redraw = everyone[eps_cur > 0]
                for _ in range(MAX_COLOUR_REDRAWS):
                    redraw = redraw[(x_new[redraw] == x_best_cur[redraw]).flatten(1).all(1)]
                    if redraw.numel() == 0:
                        break
                    x_new[redraw] = paint(redraw)
            margin = _margin(forward(name, model, x_new), y[idx], targeted)
            improved = margin < margin_best[idx]
            x_best[idx[improved]] = x_new[improved]
            margin_best[idx[improved]] = margin[improved]
    return x_best


class Square(Attack):
    """``Square(model, eps=8/255, n_queries=5000, p_init=0.8, seed=0, rescale_schedule=True)(x, y)``; see
    :func:`square`."""

    name = "square"

    def __init__(self, model, eps=8 / 255, n_queries=5000, p_init=0.8, *, seed=0, norm="linf",
                 resample_unchanged=True, rescale_schedule=True, **options):
        super().__init__(model, **options)
        if check_norm(self.name, norm) != "linf":
            raise ValueError(f"square: only the Linf Square Attack is implemented, got norm={norm!r}")
        self.eps, self.n_queries, self.p_init, self.seed, self.norm = eps, n_queries, p_init, seed, "linf"
        self.resample_unchanged, self.rescale_schedule = resample_unchanged, rescale_schedule

    def forward(self, x, y):
        return square(self.model, x, y, eps=self.eps, n_queries=self.n_queries, p_init=self.p_init,
                      targeted=self.targeted, clip_min=self.clip_min, clip_max=self.clip_max,
                      model_mode=self.model_mode, generator=make_generator(self.seed, x.device),
                      resample_unchanged=self.resample_unchanged, rescale_schedule=self.rescale_schedule)
