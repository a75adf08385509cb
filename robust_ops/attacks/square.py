"""Square Attack (Andriushchenko et al., ECCV 2020, arXiv:1912.00049), Linf and L2: score-based black-box random
search. The L2 start, window and proposal follow AutoAttack's ``square.py`` (fra31/auto-attack) and torchattacks
3.5.1's ``Square(norm='L2')``, both MIT-licensed, with per-sample draws."""

import numbers

import torch

from .. import functional
from .._options import check_flags, check_seed
from .base import Attack, norm_first_hint, refuse_positional_options
from .context import (attack_context, best_other_logit, check_inputs, check_not_half, classification_loss,
                      is_single_logit, two_logits)
from .core import (FIRST_FORWARD, check_budget, check_labels_against, check_linf_budget, check_linf_step_resolution,
                   check_norm, check_steps, forward, names_foreign_options, per_sample, succeeded,
                   sum_at_any_thread_count)
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
    """Untargeted: z_y - max_{j != y} z_j; targeted: max_{j != t} z_j - z_t. The loss proposals must lower; whether a
    sample is done is :func:`core.succeeded`'s (at a margin of exactly 0 the prediction decides)."""
    z = two_logits(out) if is_single_logit(out) else out
    zy = z.gather(1, y[:, None]).squeeze(1)
    other = best_other_logit(z, y)
    return other - zy if targeted else zy - other


# What a query must lower to be kept. "margin": the paper's untargeted loss, used targeted too (torchattacks' default);
# "ce": cross-entropy, the paper's code's and AutoAttack's targeted loss (AutoAttack's loss="ce" untargeted).
SQUARE_LOSSES = ("margin", "ce")


def _check_loss(name, loss):
    if not (isinstance(loss, str) and loss in SQUARE_LOSSES):
        raise ValueError(f"{name}: expected loss to be 'margin' or 'ce', got {loss!r}")
    return loss


def _loss(out, y, targeted, loss):
    """``loss`` per sample: "margin" is :func:`_margin`; "ce" the cross-entropy to the target (targeted) or minus the
    cross-entropy of y (untargeted), as AutoAttack's ``margin_and_loss`` (float32 for half outputs)."""
    if loss == "margin":
        return _margin(out, y, targeted)
    ce = classification_loss(out, y, reduction="none")
    return ce if targeted else -ce


def _check_images(name, x):
    if x.dim() != 4:
        # a 3-D x is one image without its batch dimension or images without their channel one: the refusal (in an
        # AutoAttack, "leave square out") said neither
        hint = (" (one image [C, H, W]? pass x.unsqueeze(0); grayscale images [N, H, W]? x.unsqueeze(1))"
                if x.dim() == 3 else "")
        raise ValueError(f"{name}: expected images [N, C, H, W], got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
                         f"{hint}")


def _check_dtype(name, norm, x):
    if norm == "l2":
        check_not_half(name, x, "the L2 proposal's arithmetic (1e-12 guards, float32 radii) is written for float32")


# Bound on the redraws of one query's colour: with eps > 0 at most one colour per sample leaves its square unchanged,
# so more rounds only happen when eps is below float resolution at x.
MAX_COLOUR_REDRAWS = 32


def _check_schedule(name, n_queries, p_init, rescale_schedule):
    """The checks of n_queries, p_init and rescale_schedule, run by :func:`square` and, when built, by ``Square`` (a
    bad one in an AutoAttack list surfaced only once the cascade reached it, after the attacks before it); returns
    n_queries."""
    n_queries = check_steps(name, n_queries, "n_queries")
    if isinstance(p_init, bool) or not isinstance(p_init, numbers.Real) or not 0 < float(p_init) <= 1:
        raise ValueError(f"{name}: expected p_init in (0, 1], got {p_init!r}")
    if not isinstance(rescale_schedule, bool):
        raise TypeError(f"{name}: expected rescale_schedule to be a bool, got {type(rescale_schedule).__name__}")
    return n_queries


def _resample_rule(name, norm, resample_unchanged):
    """``resample_unchanged`` as the norm uses it: None means True for Linf, False for L2. L2 proposals always move
    the point (new window mass, renormalized), so asking for redraws there is an error rather than ignored."""
    if resample_unchanged is not None and not isinstance(resample_unchanged, bool):
        raise TypeError(f"{name}: expected resample_unchanged to be a bool or None, got "
                        f"{type(resample_unchanged).__name__}")
    if norm == "l2" and resample_unchanged:
        raise ValueError(f"{name}: resample_unchanged=True applies to norm='linf' only (an L2 proposal always moves "
                         "the point); leave it unset or pass False")
    return norm == "linf" if resample_unchanged is None else resample_unchanged


def _rectangles(rows, cols, dtype, device):
    """AutoAttack's ``eta_rectangles``: centred nested rectangles, the k-th (k = 0, 1, ...) adding 1 / (k + 1)^2,
    scaled to unit L2 norm. Summed in AutoAttack's order, so the window is bitwise its own."""
    delta = torch.zeros(rows, cols, dtype=dtype, device=device)
    top, left = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(top - k, 0):min(top - k + 2 * k + 1, rows), max(left - k, 0):min(left - k + 2 * k + 1, cols)] += (
            1.0 / torch.tensor([k + 1.0], dtype=dtype, device=device).view(1, 1) ** 2)
    return delta / sum_at_any_thread_count(delta ** 2, (0, 1), keepdim=True).sqrt()


def pseudo_gaussian_window(side, dtype=torch.float32, device=None):
    """The L2 Square Attack's ``side x side`` window (the paper's ``meta_pseudo_gaussian_pert``; AutoAttack's and
    torchattacks' ``eta`` before its random transpose): nested rectangles on the top half, their negation on the
    bottom half, unit L2 norm."""
    window = torch.zeros(side, side, dtype=dtype, device=device)
    window[:side // 2] = _rectangles(side // 2, side, dtype, device)
    window[side // 2:] = -_rectangles(side - side // 2, side, dtype, device)
    return window / sum_at_any_thread_count(window ** 2, (0, 1), keepdim=True).sqrt()


def _oriented_windows(window, count, generator):
    """``count`` copies of ``window``, each transposed or not at random (rows or columns of alternating sign)."""
    flip = torch.randint(0, 2, (count, 1, 1), generator=generator, device=window.device).bool()
    return torch.where(flip, window.t(), window)


def _l2_start(x, eps_t, clip_min, clip_max, generator, rand_sign):
    """The L2 start (Algorithm 3's init, AutoAttack's ``attack_single_run`` for 'L2'): the image tiled with windows
    of side ``min(H, W) // 5`` (at least 1), centred, each a pseudo-gaussian window with a random orientation and a
    random sign per channel, all drawn per sample; then ``x + eps * delta / ||delta||``, clipped."""
    n, c, h, w = x.shape
    side = max(min(h, w) // 5, 1)
    tiles_h, tiles_w = h // side, w // side
    windows = _oriented_windows(pseudo_gaussian_window(side, x.dtype, x.device), n * tiles_h * tiles_w, generator)
    windows = windows.view(n, 1, tiles_h, tiles_w, side, side) * rand_sign((n, c, tiles_h, tiles_w, 1, 1))
    tiled = windows.permute(0, 1, 2, 4, 3, 5).reshape(n, c, tiles_h * side, tiles_w * side)
    top, left = max((h - 5 * side) // 2, 0), max((w - 5 * side) // 2, 0)  # AutoAttack's centring offset
    delta = torch.zeros_like(x)
    delta[:, :, top:top + tiles_h * side, left:left + tiles_w * side] = tiled[:, :, :h - top, :w - left]
    return _l2_point(x, delta, eps_t, clip_min, clip_max)


def _l2_point(x, delta, eps_t, clip_min, clip_max):
    """``clip(x + eps * delta / ||delta||)`` with the fused L2 step (zero delta: x itself)."""
    x_new = x.clone()
    functional.pgd_step_(x_new, x, delta, eps_t, eps_t, clip_min=clip_min, clip_max=clip_max, norm="l2")
    return x_new


def _window_index(top, left, side):
    """Indices of ``side x side`` windows at per-sample corners, for ``t[samples, rows, cols]`` on channels-last."""
    offsets = torch.arange(side, device=top.device)
    samples = torch.arange(top.numel(), device=top.device)[:, None, None]
    return samples, (top[:, None] + offsets)[:, :, None], (left[:, None] + offsets)[:, None, :]


def _l2_proposal(x_cur, x_best_cur, eps_cur, window, clip_min, clip_max, generator, rand_sign):
    """One L2 Square query per sample (Algorithm 3; AutoAttack's ``attack_single_run`` for 'L2', as torchattacks'
    ``Square(norm='L2')``), with positions, orientation and signs drawn per sample: the mass of a second window moves
    into the first, whose new content is a pseudo-gaussian window of random orientation and per-channel sign plus its
    old content (normalized per channel), rescaled per channel so the perturbation's L2 norm stays about eps; the
    point is ``x + eps * delta / ||delta||``, clipped. ``window``: :func:`pseudo_gaussian_window` of the side in use."""
    m, c, h, w = x_cur.shape
    dev, side = x_cur.device, window.shape[0]
    delta = x_best_cur - x_cur
    top, left, top_2, left_2 = (torch.randint(0, extent - side + 1, (m,), generator=generator, device=dev)
                                for extent in (h, w, h, w))
    first, second = _window_index(top, left, side), _window_index(top_2, left_2, side)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)

    def mask(top, left):
        """[m, 1, H, W]: 1 inside each sample's window."""
        inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
        inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
        return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None].to(x_cur.dtype)

    delta_last = delta.permute(0, 2, 3, 1)  # channels last: a window is delta_last[first] of shape [m, s, s, c]
    old = delta_last[first].permute(0, 3, 1, 2)
    old_norm = sum_at_any_thread_count(old ** 2, (-2, -1), keepdim=True).sqrt()
    image_norm = sum_at_any_thread_count((delta ** 2).flatten(1), 1).sqrt()
    windows = delta * torch.maximum(mask(top, left), mask(top_2, left_2))
    windows_norm = sum_at_any_thread_count((windows ** 2).flatten(1), 1).sqrt()
    new = _oriented_windows(window, m, generator)[:, None]
    new = new * rand_sign((m, c, 1, 1)) + old / (1e-12 + old_norm)
    # per channel: the mass the two windows held, plus what the eps budget leaves free, shared over the channels
    mass = ((eps_cur ** 2 - image_norm ** 2).clamp_min(0) / c + windows_norm ** 2).sqrt()
    new = new / (1e-12 + sum_at_any_thread_count(new ** 2, (-2, -1), keepdim=True).sqrt()) * mass[:, None, None, None]
    delta_last = delta_last.clone()
    delta_last[second] = 0.0
    delta_last[first] = new.permute(0, 2, 3, 1)
    return _l2_point(x_cur, delta_last.permute(0, 3, 1, 2).contiguous(), eps_cur, clip_min, clip_max)


@torch.no_grad()
@names_foreign_options
def square(model, x, y, *, eps, norm="linf", n_queries=5000, p_init=0.8, targeted=False, clip_min=0.0, clip_max=1.0,
           model_mode="eval", generator=None, resample_unchanged=None, rescale_schedule=True, loss="margin"):
    r"""Square Attack: random search over square-shaped updates (black-box: only model outputs are used, no
    gradients), Linf (Algorithm 2 of the paper) or L2 (Algorithm 3).

    Linf: starts from vertical stripes of ``+-eps``; each iteration draws, per sample, a square of side
    ``round(sqrt(p * H * W))`` at a random position with a random ``+-2 eps`` colour per channel, applies it with the
    fused PGD step (projection and clipping), and keeps it if the loss (default: the margin) decreased.
    L2 (``norm="l2"``, following AutoAttack's ``attack_single_run`` for 'L2' and torchattacks' ``Square(norm='L2')``):
    starts from a tiling of pseudo-gaussian windows of random signs scaled to norm eps; each iteration draws, per
    sample, two windows of side ``max(round(sqrt(p * H * W)), 3)`` (odd), moves the second's mass into the first (a
    fresh pseudo-gaussian window plus the first's old content), and keeps ``clip(x + eps * delta / ||delta||)`` if
    the loss decreased.
    ``loss``: "margin" (default; targeted: ``max_{j != t} z_j - z_t``, torchattacks' default) or "ce" (the
    cross-entropy to the target when targeted, the loss of the paper's code and of AutoAttack's targeted Square;
    untargeted, minus the cross-entropy of y, AutoAttack's ``loss='ce'``); with "ce" a query that fools the model is
    kept even where its loss is higher, as AutoAttack keeps it.
    ``p`` follows the paper's schedule from ``p_init``, its iterations rescaled to ``n_queries``
    (``rescale_schedule=True``, the default, as torchattacks' Square) or taken as they are (``False``, as
    AutoAttack's standard run). Samples stop once misclassified (targeted: once the target is predicted); samples the
    clean input already fools are returned unchanged, after one forward on the clean inputs that ``n_queries`` does
    not count (as AutoAttack).
    Linf, ``resample_unchanged`` (default None: True for Linf): a colour that would leave the square as it is (so the
    query would re-score the current point; on single-channel images half the draws once squares are small) is drawn
    again, as the paper's reference code does; ``False`` spends the query anyway, as AutoAttack's and torchattacks'
    PyTorch versions do. L2 proposals always move the point: True is an error there.

    Args:
        model; x (Tensor[N, C, H, W]) in the clip range; y (LongTensor[N]) labels (targets when targeted);
        eps (float or Tensor[N]); norm ("linf" or "l2", any case); n_queries (int): model queries per sample
        (default 5000); p_init (float): default 0.8 (AutoAttack's); targeted; clip_min, clip_max; model_mode;
        generator; resample_unchanged (bool or None): Linf only, draw a colour again when it would not change the
        point (default None: True for Linf, False for L2).
        rescale_schedule (bool): rescale the p schedule's iterations from 10000 to ``n_queries`` (default True).
        loss ("margin" or "ce"): the loss a query must lower to be kept (default "margin").

    Returns:
        x_adv (Tensor[N, C, H, W]): the clean input where it already fools the model, else the first point that
        fools it, else the lowest-loss point found (AutoAttack returns the clean input there).

    Raises:
        NonFiniteInputError, NonFiniteOutputError, InputDtypeError, InputDeviceError, InputShapeError: as
        :func:`run_pgd`.
    """
    name = "square"
    check_flags(name, {"targeted": targeted})  # targeted="no" ran a targeted attack
    norm = check_norm(name, norm)
    loss = _check_loss(name, loss)
    resample_unchanged = _resample_rule(name, norm, resample_unchanged)
    _check_dtype(name, norm, x)
    y = check_inputs(name, x, y, clip_min, clip_max)
    _check_images(name, x)
    n_queries = _check_schedule(name, n_queries, p_init, rescale_schedule)
    eps_t, eps_max = per_sample(name, "eps", eps, x, with_max=True)
    check_linf_budget(name, norm, eps_t, clip_min, clip_max, eps_max=eps_max)
    check_linf_step_resolution(name, norm, x, eps)  # x +- eps rounds back to x below the resolution
    x = x.detach()
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    dev = x.device

    def rand_sign(shape):
        return torch.randint(0, 2, shape, generator=generator, device=dev).to(x.dtype) * 2 - 1

    with attack_context(model, model_mode, name):
        # Samples the clean input already fools stay clean (AutoAttack, torchattacks): searching from the start
        # could end on a correctly classified point. This forward is not counted in n_queries (as AutoAttack).
        out = forward(name, model, x)
        check_labels_against(name, y, out, finite_at=FIRST_FORWARD)
        loss_best = _loss(out, y, targeted, loss)
        fooled = succeeded(out, y, targeted)
        todo = (~fooled).nonzero().squeeze(1)
        if norm == "linf":  # vertical stripes start: +-eps per (sample, channel, column)
            start = x.clone()
            functional.pgd_step_(start, x, rand_sign((n, c, 1, w)).expand(n, c, h, w).contiguous(), eps_t, eps_t,
                                 clip_min=clip_min, clip_max=clip_max, norm="linf")
        else:
            start = _l2_start(x, eps_t, clip_min, clip_max, generator, rand_sign)
        x_best = x.clone()
        if todo.numel():
            x_best[todo] = start[todo]
            out = forward(name, model, x_best[todo])
            loss_best[todo] = _loss(out, y[todo], targeted, loss)
            fooled[todo] = succeeded(out, y[todo], targeted)
        rows = torch.arange(h, device=dev)
        cols = torch.arange(w, device=dev)
        windows = {}  # L2: side -> pseudo-gaussian window, built once per side
        m = None
        for it in range(n_queries - 1):
            idx = (~fooled).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            if idx.numel() != m:  # fooled only ever turns True: the same count is the same samples
                m = idx.numel()
                x_cur, eps_cur, y_cur = x[idx], eps_t[idx], y[idx]
            x_best_cur = x_best[idx]
            p = p_schedule(p_init, it, n_queries, rescale_schedule)
            if norm == "l2":
                side = max(int(round((p * h * w) ** 0.5)), 3)
                side = min(side + 1 - side % 2, h, w)  # odd (the window's centre), at most the image
                if side not in windows:
                    windows[side] = pseudo_gaussian_window(side, x.dtype, dev)
                x_new = _l2_proposal(x_cur, x_best_cur, eps_cur, windows[side], clip_min, clip_max, generator,
                                     rand_sign)
            else:
                s = min(max(int(round((p * h * w) ** 0.5)), 1), h, w)
                vh = torch.randint(0, h - s + 1, (m,), generator=generator, device=dev)
                vw = torch.randint(0, w - s + 1, (m,), generator=generator, device=dev)
                inside = (((rows[None, :] >= vh[:, None]) & (rows[None, :] < vh[:, None] + s))[:, :, None]
                          & ((cols[None, :] >= vw[:, None]) & (cols[None, :] < vw[:, None] + s))[:, None, :])
                inside = inside[:, None].to(x.dtype)

                def paint(x_painted, x_at, inside_at, eps_at):
                    """x_painted (rows of x_best_cur, written in place) with its square set to a fresh random
                    colour."""
                    colour = rand_sign((x_painted.shape[0], c, 1, 1))  # sign of the update per channel
                    functional.pgd_step_(x_painted, x_at, inside_at * colour, 2 * eps_at, eps_at, clip_min=clip_min,
                                         clip_max=clip_max, norm="linf")
                    return x_painted

                # every row at once without gathering them (an index of all rows copied four tensors per query)
                x_new = paint(x_best_cur.clone(), x_cur, inside, eps_cur)
                if resample_unchanged:
                    redraw = ((x_new == x_best_cur).flatten(1).all(1) & (eps_cur > 0)).nonzero().squeeze(1)
                    for _ in range(MAX_COLOUR_REDRAWS):
                        if redraw.numel() == 0:
                            break
                        x_new[redraw] = paint(x_best_cur[redraw], x_cur[redraw], inside[redraw], eps_cur[redraw])
                        redraw = redraw[(x_new[redraw] == x_best_cur[redraw]).flatten(1).all(1)]
            out = forward(name, model, x_new)
            loss_new = _loss(out, y_cur, targeted, loss)
            better = loss_new < loss_best[idx]
            if loss == "ce":  # AutoAttack keeps a query that fools even at a higher cross-entropy
                better |= succeeded(out, y_cur, targeted)
            # every searched row written back, the improved ones' taken by torch.where: finding them (a nonzero, a
            # host sync on a GPU; seven boolean indexes before) cost a read per query beside idx's
            x_best[idx] = torch.where(better.view(-1, 1, 1, 1), x_new, x_best_cur)
            loss_best[idx] = torch.where(better, loss_new, loss_best[idx])
            fooled[idx] = torch.where(better, succeeded(out, y_cur, targeted), fooled[idx])
    return x_best


class Square(Attack):
    """``Square(model, eps=8/255, n_queries=5000, p_init=0.8, seed=0, norm="linf", resample_unchanged=None,
    rescale_schedule=True, loss="margin")(x, y)``; ``seed`` seeds the draws; see :func:`square`. ``norm="l2"`` is
    the L2 Square Attack (give an L2 ``eps``: the default is Linf's 8/255)."""

    name = "square"
    _FOREIGN_OPTIONS = {
        **Attack._FOREIGN_OPTIONS,
        "resc_schedule": "torchattacks' resc_schedule is rescale_schedule here",
        "n_restarts": "one run here, torchattacks' default n_restarts=1",
    }

    def __init__(self, model, eps=8 / 255, n_queries=5000, p_init=0.8, *positional, seed=0, norm="linf",
                 resample_unchanged=None, rescale_schedule=True, loss="margin", **options):
        refuse_positional_options(self.name, Square, positional, norm_first_hint("Square"))
        super().__init__(model, **options)
        self.eps, self.n_queries, self.p_init, self.seed = eps, n_queries, p_init, seed
        self.norm = check_norm(self.name, norm)
        self.resample_unchanged = _resample_rule(self.name, self.norm, resample_unchanged)
        self.rescale_schedule = rescale_schedule
        self.loss = _check_loss(self.name, loss)
        _check_schedule(self.name, n_queries, p_init, rescale_schedule)  # here too, as APGD's options
        check_seed(self.name, seed, optional=True)
        check_budget(self.name, self.norm, eps, self.clip_min, self.clip_max)

    def check_input_dtype(self, x):
        _check_dtype(self.name, self.norm, x)

    def check_input_shape(self, x):
        # asked by ensembles and AutoAttack only, whose callers did not name Square: say how to run without it
        try:
            _check_images(self.name, x)
        except ValueError as err:
            raise ValueError(f"{err}; in an ensemble or AutoAttack leave square out, e.g. AutoAttack(model, eps=..., "
                             "attacks=['apgd-ce', 'apgd-t', 'fab-t'])") from None

    def forward(self, x, y):
        return square(self.model, x, y, eps=self.eps, norm=self.norm, n_queries=self.n_queries, p_init=self.p_init,
                      targeted=self.targeted, clip_min=self.clip_min, clip_max=self.clip_max,
                      model_mode=self.model_mode, generator=make_generator(self.seed, x, self.name),
                      resample_unchanged=self.resample_unchanged, rescale_schedule=self.rescale_schedule,
                      loss=self.loss)
