"""Attacks under float16 autocast (what fit(amp=True) runs them in): the input gradients are loss-scaled
(attacks.context.InputGradScale), so a confident model's gradient no longer underflows to 0; float32 is unchanged.
CPU float16 autocast stands in for CUDA's here."""

import pytest
import torch
from torch import nn

from robust_ops.attacks import context
from robust_ops.attacks.context import InputGradScale
from robust_ops.attacks.core import run_pgd
from robust_ops.defenses import GR
from robust_ops.ima import gen_adv


pytestmark = pytest.mark.usefixtures("one_thread")


class Threshold(nn.Module):
    """Logits (-k, k) * (mean(x) - 0.5): confident (margin 2k * 0.02 = 20, 1 - p_y ~ 2e-9 on the data below) yet one
    8/255 step from the boundary. Conv, pooling and head run in float16 under autocast, as in a real network."""

    def __init__(self, k=500.0):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.head.weight.copy_(torch.tensor([[-k], [k]]))
            self.head.bias.copy_(torch.tensor([k / 2, -k / 2]))

    def forward(self, x):
        return self.head(self.pool(self.conv(x)).flatten(1))


def confident_data(n=16, offset=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    noise = 0.1 * (torch.rand(n, 1, 12, 12, generator=g) - 0.5)
    noise = noise - noise.mean((1, 2, 3), keepdim=True)  # every mean exactly 0.5 + side * offset
    x = 0.5 + side.view(n, 1, 1, 1) * offset + noise
    return x, (side > 0).long()


def fp16():
    return torch.autocast("cpu", dtype=torch.float16)


def pgd(model, x, y, steps=10, **kw):
    return run_pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=steps, **kw)


def success(model, x_adv, y):
    with torch.no_grad():
        return int((model(x_adv).argmax(1) != y).sum())


@pytest.fixture
def unscaled(monkeypatch):
    """The code before loss scaling: a scale of 1 is the plain float16 backward."""
    monkeypatch.setattr(InputGradScale, "initial", 1.0)


def test_the_model_is_confident_and_float32_pgd_breaks_every_sample():
    model, (x, y) = Threshold().eval(), confident_data()
    with torch.no_grad():
        p_wrong = model(x).softmax(1).gather(1, (1 - y).view(-1, 1))
    assert float(p_wrong.max()) < 1e-8
    assert success(model, pgd(model, x, y).x_adv, y) == 16


def test_unscaled_float16_gradient_underflows_and_pgd_leaves_samples_unattacked(unscaled):
    model, (x, y) = Threshold().eval(), confident_data()
    xg = x.clone().requires_grad_(True)
    with fp16():
        (grad,) = InputGradScale().grad(nn.functional.cross_entropy(model(xg), y), [xg])
    assert bool((grad == 0).all())  # dL/dlogit ~1e-10 is below float16's smallest subnormal (6e-8)
    with fp16():
        x_adv = pgd(model, x, y).x_adv
    assert torch.equal(x_adv, x) and success(model, x_adv, y) == 0


def test_scaled_float16_pgd_attacks_like_float32():
    model, (x, y) = Threshold().eval(), confident_data()
    xg = x.clone().requires_grad_(True)
    (g32,) = torch.autograd.grad(nn.functional.cross_entropy(model(xg), y), [xg])
    scale = InputGradScale()
    with fp16():
        (g16,) = scale.grad(nn.functional.cross_entropy(model(xg), y), [xg])
    assert g16.dtype == torch.float32 and scale.retries == 0
    assert torch.equal(g16.sign(), g32.sign())
    torch.testing.assert_close(g16, g32, rtol=0.05, atol=0)
    with fp16():
        x_adv = pgd(model, x, y).x_adv
    assert success(model, x_adv, y) == 16
    assert torch.equal(x_adv, pgd(model, x, y).x_adv)  # every sign step as in float32


def test_parameter_gradients_come_back_unscaled():
    model, (x, y) = Threshold().eval(), confident_data()
    x, y = x[y == 1], y[y == 1]  # one class: the parameter gradients sum without cancelling
    with fp16():
        got = pgd(model, x, y, param_grad_weights={0: 1.0, 1: 0.5})
    # exactly the float16 backward of the objective times 2**16, divided by 2**16
    params = list(model.parameters())
    xg = x.clone().requires_grad_(True)
    with fp16():
        scaled = torch.autograd.grad(nn.functional.cross_entropy(model(xg), y).float() * 2.0 ** 16, [xg] + params)
    with fp16():
        step0 = pgd(model, x, y, param_grad_weights={0: 1.0}, steps=1)
    assert all(torch.equal(a, b / 2.0 ** 16) for a, b in zip(step0.param_grads, scaled[1:]))
    # and close to float32 (float16 logits set the tolerance; a scale left over would be off by 2**16)
    ref = pgd(model, x, y, param_grad_weights={0: 1.0, 1: 0.5})
    for a, b in zip(got.param_grads, ref.param_grads):
        torch.testing.assert_close(a, b, rtol=0.3, atol=0)
    torch.testing.assert_close(torch.tensor(got.emitted_losses), torch.tensor(ref.emitted_losses), rtol=0.3, atol=0)


def test_overflow_halves_the_scale_and_redoes_the_backward():
    # one sample near the boundary: dL/dlogit ~0.5, times 2**16 and the head's 500 overflows float16 (max 65504)
    model, (x, y) = Threshold().eval(), confident_data(n=1, offset=0.0005)
    xg = x.clone().requires_grad_(True)
    (g32,) = torch.autograd.grad(nn.functional.cross_entropy(model(xg), y), [xg])
    scale = InputGradScale()
    with fp16():
        (g16,) = scale.grad(nn.functional.cross_entropy(model(xg), y), [xg])
    assert scale.retries > 0 and scale.value < InputGradScale.initial
    assert bool(torch.isfinite(g16).all()) and torch.equal(g16.sign(), g32.sign())
    torch.testing.assert_close(g16, g32, rtol=0.05, atol=0)
    # halved per overflow, and down to 1 only: a gradient that is not finite unscaled comes back as it is
    assert scale.value == InputGradScale.initial / 2 ** scale.retries
    scale = InputGradScale()
    with fp16():
        (g,) = scale.grad((xg * float("inf")).sum(), [xg])
    assert scale.value == 1.0 and scale.retries == 16 and bool(torch.isinf(g).all())


def test_float32_is_the_plain_autograd_grad(monkeypatch):
    model, (x, y) = Threshold(k=5.0).eval(), confident_data(offset=0.1)
    kw = dict(param_grad_weights={0: 1.0, 10: 0.25}, random_start=True, generator=torch.Generator().manual_seed(3))
    got = pgd(model, x, y, **kw)
    monkeypatch.setattr(InputGradScale, "grad",
                        lambda self, objective, inputs, create_graph=False, allow_unused=False, direction_only=False:
                        torch.autograd.grad(objective, list(inputs), create_graph=create_graph,
                                            allow_unused=allow_unused))
    kw["generator"] = torch.Generator().manual_seed(3)
    ref = pgd(model, x, y, **kw)
    assert torch.equal(got.x_adv, ref.x_adv)
    assert all(torch.equal(a, b) for a, b in zip(got.param_grads, ref.param_grads))
    assert got.emitted_losses == ref.emitted_losses
    assert not context.fp16_autocast("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not context.fp16_autocast("cpu")  # bfloat16 has float32's range: nothing to scale
    # a device type without autocast (meta) is "off", not torch's error from is_autocast_enabled (mutation testing)
    assert context.autocast_dtype("meta") is None and not context.fp16_autocast("meta")


@pytest.mark.parametrize("scaled", [False, True])
def test_ima_gen_adv_under_float16(monkeypatch, scaled):
    if not scaled:
        monkeypatch.setattr(InputGradScale, "initial", 1.0)
    model, (x, y) = Threshold().eval(), confident_data()
    margin = torch.full((16,), 0.05)
    ref_adv, ref_crossed = gen_adv(model, x, y, margin, steps=10, norm="linf", min_rows=0)
    assert bool(ref_crossed.all())
    with fp16():
        x_adv, crossed = gen_adv(model, x, y, margin, steps=10, norm="linf", min_rows=0)
    if scaled:
        assert torch.equal(crossed, ref_crossed)
    else:
        assert not bool(crossed.any()) and torch.equal(x_adv, x)  # underflow: no sample moved


@pytest.mark.parametrize("scaled", [False, True])
def test_gr_penalty_under_float16(monkeypatch, scaled):
    if not scaled:
        monkeypatch.setattr(InputGradScale, "initial", 1.0)
    model, (x, y) = Threshold().eval(), confident_data()
    ref = GR(norm="l1")(model, x, y).metrics["grad_norm"]  # l1: "l2" adds 1e-12 under its root, above these norms
    with fp16():
        out = GR(norm="l1")(model, x, y)
    out.loss.backward()  # double backpropagation through the scaled gradient
    if scaled:
        assert out.metrics["grad_norm"] == pytest.approx(ref, rel=0.05)
    else:
        assert out.metrics["grad_norm"] == 0.0


def test_a_linf_step_below_the_half_dtypes_resolution_is_refused_not_a_silent_no_op():
    """docs/attacks.md, Half-precision inputs: bfloat16's spacing below 1 is 2**-8 (0.0039), so eps = 1/255 with a
    step of eps/4 rounded every iterate back to x: PGD on inputs in [0.5, 1) returned them unmoved, scored as
    robust. Now a one-line ValueError naming the step, the dtype and the fix; a step of eps/2 (above half the
    spacing) moves, and float32 inputs, eps = 0 and per-sample tensors run as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(16, 3, 2, 2) * 0.5 + 0.5
    y = torch.randint(0, 3, (16,))
    eps = 1 / 255
    half_model, half_x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"^run_pgd: the Linf step min\(alpha, eps\) = 0\.00098 is below half of "
                                         r"torch\.bfloat16's spacing near the inputs' largest \|value\| 1 "
                                         r"\(0\.00391\).* "
                                         r"or a step >= 0\.00195$"):
        run_pgd(half_model, half_x, y, eps=eps, alpha=eps / 4, steps=3, random_start=False)
    moved = run_pgd(half_model, half_x, y, eps=eps, alpha=eps / 2, steps=3, random_start=False).x_adv
    assert (moved != half_x).float().mean() > 0.9
    run_pgd(half_model, half_x, y, eps=0.0, alpha=eps / 4, steps=1)  # no ball: nothing to refuse
    per_sample = torch.full((16,), eps / 4)
    run_pgd(half_model, half_x, y, eps=eps, alpha=per_sample, steps=1)  # data-dependent radii: not checked
    model = model.float()
    moved = run_pgd(model, x, y, eps=eps, alpha=eps / 4, steps=3, random_start=False).x_adv
    assert (moved != x).float().mean() > 0.9
    # a wide clip range ("no clipping") is not where the inputs are: float32 steps of 0.01 ran refused at +-1e6
    moved = run_pgd(model, x, y, eps=0.05, alpha=0.01, steps=1, clip_min=-1e6, clip_max=1e6,
                    random_start=False).x_adv
    assert (moved != x).float().mean() > 0.9


def test_the_step_resolution_check_is_linf_only():
    # An L2 step alpha * g / ||g|| is no per-coordinate move to compare with the spacing: bfloat16 L2 PGD with the
    # step the Linf rule refuses runs (mutation testing of attacks core: checking every norm survived)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).to(torch.bfloat16)
    x = (torch.rand(4, 3, 2, 2) * 0.5 + 0.5).to(torch.bfloat16)
    y = torch.randint(0, 3, (4,))
    x_adv = run_pgd(model, x, y, eps=1 / 255, alpha=1 / 1020, steps=1, norm="l2").x_adv
    assert x_adv.dtype == torch.bfloat16 and x_adv.shape == x.shape


def test_the_step_resolution_is_measured_at_the_largest_absolute_input():
    # inputs in [-1, -0.5]: the spacing that rounds steps away is bfloat16's near |-1|, not near max(x) = -0.5
    # (mutation testing of attacks core: measuring at max(x) survived, and a negative spacing refused nothing)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).to(torch.bfloat16)
    x = (-torch.rand(4, 3, 2, 2) * 0.5 - 0.5).to(torch.bfloat16)
    y = torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"^run_pgd: the Linf step min\(alpha, eps\) = 0\.00098 is below half of "
                                         r"torch\.bfloat16's spacing near the inputs' largest \|value\| 1 "):
        run_pgd(model, x, y, eps=1 / 255, alpha=1 / 1020, steps=1, clip_min=-1.0, clip_max=1.0)


def test_an_empty_half_precision_batch_is_returned_as_is():
    # no inputs, no spacing to measure (mutation testing of attacks core: measuring it on an empty batch survived)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).to(torch.bfloat16)
    x = torch.rand(0, 3, 2, 2).to(torch.bfloat16)
    x_adv = run_pgd(model, x, torch.zeros(0, dtype=torch.long), eps=1 / 255, alpha=1 / 1020, steps=1).x_adv
    assert x_adv.shape == x.shape and x_adv.dtype == torch.bfloat16


@pytest.mark.parametrize("attack", ["apgd", "apgd_t", "square"])
def test_apgd_and_square_refuse_a_linf_eps_below_the_half_dtypes_resolution(attack):
    """docs/attacks.md, Half-precision inputs: APGD's random start and steps and Square's +-eps squares never move an
    input farther than eps, so a float16 eps below half the spacing near 1 (2**-12) left every input in [0.5, 1)
    unmoved, scored as robust; now the same ValueError as PGD's, naming eps. An eps above it moves."""
    from robust_ops import attacks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3)).half()
    x = (torch.rand(4, 1, 28, 28) * 0.5 + 0.5).half()
    y = torch.tensor([0, 1, 2, 0])
    run = getattr(attacks, attack)
    budget = {"n_queries": 5} if attack == "square" else {"steps": 3}
    with pytest.raises(ValueError, match=rf"^{attack}: the Linf radius eps = 0\.0001 is below half of torch\.float16's "
                                         r"spacing .* \(0\.000488\).* or an eps >= 0\.000244$"):
        run(model, x, y, eps=1e-4, **budget)
    assert (run(model, x, y, eps=1e-3, **budget) != x).any()


def two_slopes():
    """Logits (sum(x) + 8, sum(x) / 2) over 16 inputs: at x = 0.5 the true class 0 leads by 12 (1 - p_y = 6e-6)
    and rises twice as fast, so every input gradient of the loss is negative: -(1 - p_y) * 1 from the true logit
    plus p_1 * 0.5 from the other."""
    model = nn.Linear(16, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [0.5]]).expand(2, 16))
        model.bias.copy_(torch.tensor([8.0, 0.0]))
    return model.eval(), torch.full((4, 16), 0.5), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attack", ["fgsm", "apgd", "gen_adv"])
def test_a_half_models_attack_loss_keeps_the_true_classs_gradient(dtype, attack):
    """docs/attacks.md, Half-precision inputs: the cross-entropy of float16 / bfloat16 logits was computed in their
    dtype, where 1 - p_y = 6e-6 rounds to 0 (bfloat16 below 2**-9, float16 2**-11), and the true class's term of
    the gradient with it: every step raised the inputs, along the other logit's rise alone, and the true logit rose
    faster (measured on a 10-class linear model: median cosine with the float32 gradient 0.66 in bfloat16, 0.99999
    with the loss in float32). It is computed in float32 now, as autocast does."""
    from robust_ops import attacks

    model, x, y = two_slopes()
    model, x = model.to(dtype), x.to(dtype)
    if attack == "fgsm":
        x_adv = attacks.fgsm(model, x, y, eps=8 / 255)
    elif attack == "apgd":
        x_adv = attacks.apgd(model, x, y, eps=8 / 255, steps=1)
    else:
        x_adv, _ = gen_adv(model, x, y, 8 / 255, steps=1, norm="linf")
    assert x_adv.dtype == dtype
    assert bool((x_adv < x).all())


@pytest.mark.parametrize("attack", ["pgd", "apgd", "gen_adv"])
def test_a_float16_models_own_input_gradient_is_loss_scaled(attack):
    """A model.half() attacked with float16 inputs (no autocast): its input gradient underflowed float16 just as
    under autocast, all 0 for these confident samples, and PGD, APGD and IMA's GenAdv returned all 16 unmoved.
    The attacks' steps use only the gradient's direction, so it is now loss-scaled and left scaled (divided back
    in float16 it would underflow again); a bfloat16 model's (float32's range) was never lost."""
    from robust_ops import attacks

    model, (x, y) = Threshold().eval().half(), confident_data()
    x = x.half()
    if attack == "pgd":
        x_adv = pgd(model, x, y).x_adv
    elif attack == "apgd":
        x_adv = attacks.apgd(model, x, y, eps=8 / 255, steps=10)
    else:
        x_adv, _ = gen_adv(model, x, y, 8 / 255, norm="linf")
    assert x_adv.dtype == torch.float16
    assert bool(((x_adv - x).flatten(1).abs().amax(1) > 0).all())
    if attack != "gen_adv":  # GenAdv returns the last point on the correct side
        assert success(model, x_adv, y) == 16


def test_apgd_eot_sums_its_passes_at_one_scale(monkeypatch):
    """A float16 input's EOT passes come back loss-scaled (direction_only), and an overflow can halve the scale
    between two passes: the sum so far is brought to the new scale, so the passes keep equal weight. Stand-in
    gradients a, b returned at scales 4 then 2 must step as a, b returned unscaled (before: 4a + 2b)."""
    from robust_ops.attacks import apgd

    model, (x, y) = Threshold().eval(), confident_data()
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    b = 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(torch.sign(a + b), torch.sign(4 * a + 2 * b))

    def passes(scales):
        calls = iter(range(10 ** 6))

        def grad(self, objective, inputs, create_graph=False, allow_unused=False, direction_only=False):
            k = next(calls) % 2
            self.first_scale = scales[k]
            return ((a, b)[k] * scales[k],)
        return grad

    runs = []
    for scales in ((1.0, 1.0), (4.0, 2.0)):
        monkeypatch.setattr(InputGradScale, "grad", passes(scales))
        runs.append(apgd(model, x, y, eps=8 / 255, steps=3, eot_iter=2, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(runs[0], runs[1])


def test_loss_scaled_attacks_run_on_a_torch_compiled_model_whose_backward_frees_its_graph():
    """A torch.compile'd model's backward with donated buffers (AOTAutograd's default) refuses retain_graph=True,
    which the loss-scaled backward passed for a redo at a smaller scale: APGD under float16 autocast and PGD on a
    float16 model stopped with torch's "compiled with non-empty donated buffers" error. The backward now runs once
    without the graph there (same points as the eager model), and an overflow it cannot redo says what to do."""
    from robust_ops.attacks import apgd
    from robust_ops.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=4).eval()
    x, y = torch.rand(4, 1, 12, 12), torch.tensor([0, 1, 0, 1])
    compiled = torch.compile(model, backend="aot_eager")
    with fp16():
        expected = apgd(model, x, y, eps=4 / 255, steps=5, generator=torch.Generator().manual_seed(0))
        got = apgd(compiled, x, y, eps=4 / 255, steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, expected)
    half = SmallCNN(in_channels=1, width=4).eval().half()
    expected = pgd(half, x.half(), y, steps=2).x_adv
    assert torch.equal(pgd(torch.compile(half, backend="aot_eager"), x.half(), y, steps=2).x_adv, expected)
    scale = InputGradScale()
    scale.value = 2.0 ** 200  # overflows float32: the redo the freed graph cannot give
    xg = x.clone().requires_grad_()
    with fp16(), pytest.raises(RuntimeError, match=r"InputGradScale: the float16 loss-scaled input gradient overflowed "
                                                    r"at scale .*donated_buffer = False before compiling"):
        scale.grad(nn.functional.cross_entropy(compiled(xg), y), [xg])


def test_a_backward_error_of_its_own_passes_through_the_scaled_gradient_unchanged():
    """Coverage found it unreached (covattacks helper, s48), checked by hand and right: only a compiled model's
    "donated buffers" refusal makes the loss-scaled backward retry without a retained graph; torch's other errors
    (here an input the objective does not use) pass through as they are, and the next call runs as before."""
    x = torch.rand(3, dtype=torch.float16, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    scale = InputGradScale()
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        scale.grad((w * 2).sum(), [x], direction_only=True)
    assert scale.retain_graph and scale.retries == 0
    (grad,) = scale.grad((x.float() * 2).sum(), [x], direction_only=True)
    assert torch.equal(grad.float() / scale.first_scale, torch.full((3,), 2.0))
