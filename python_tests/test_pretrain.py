"""SimCLR pretraining: NT-Xent against the SimCLR paper's definition, and what simclr leaves behind on the model.
(The eq. 4 loop test and the basic head / backbone test live in test_train.py.)"""

import math
import re

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from robust_ops.pretrain import SimCLRAugment, nt_xent, simclr


def _nt_xent_paper(z1, z2, tau):
    """SimCLR Algorithm 1: for each of the 2N anchors, its positive against the 2N - 2 other images' views."""
    z = nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    losses = []
    for i in range(n2):
        j = (i + n2 // 2) % n2
        negatives = [k for k in range(n2) if k not in (i, j)]
        assert len(negatives) == n2 - 2
        pos = z[i] @ z[j] / tau
        neg = torch.stack([z[i] @ z[k] / tau for k in negatives])
        losses.append(-pos + torch.logsumexp(torch.cat([pos[None], neg]), 0))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("n, d, tau", [(2, 3, 0.5), (5, 4, 0.1), (3, 7, 1.0)])
def test_nt_xent_matches_simclr_algorithm_1(n, d, tau):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    loss = nt_xent(z1, z2, tau)
    torch.testing.assert_close(loss.double(), _nt_xent_paper(z1, z2, tau), rtol=1e-5, atol=1e-5)
    # symmetric in the two views, invariant to the projections' scale (cosine similarity) and to the pair order
    torch.testing.assert_close(nt_xent(z2, z1, tau), loss)
    torch.testing.assert_close(nt_xent(3 * z1, 0.5 * z2, tau), loss)
    perm = torch.randperm(n, generator=g)
    torch.testing.assert_close(nt_xent(z1[perm], z2[perm], tau), loss)


def test_nt_xent_keeps_float64():
    """float64 projections were cut to float32 (.float()): the loss was float32 and off the float64 value."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    loss = nt_xent(z1, z2, 0.1)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, _nt_xent_paper(z1, z2, 0.1), rtol=1e-12, atol=1e-12)
    assert nt_xent(z1.half(), z2.half(), 0.1).dtype == torch.float32


def test_nt_xent_makes_its_tensors_on_the_device_of_the_projections():
    # The targets were made on the CPU and moved: on CUDA a host copy that waits for the GPU every training step.
    # Meta tensors show it without a GPU: every tensor the loss makes must be on their device.
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class RecordDevices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.made += [(str(func), t.device.type) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    z1, z2 = torch.randn(4, 8, device="meta"), torch.randn(4, 8, device="meta")
    with RecordDevices() as record:
        nt_xent(z1, z2)
    assert [made for made in record.made if made[1] != "meta"] == []


def test_nt_xent_gradients_reach_both_views():
    z1, z2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    nt_xent(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [0, -1.0, math.inf, math.nan, True, "0.5"])
def test_nt_xent_rejects_bad_temperature(tau):
    with pytest.raises(ValueError, match="nt_xent: expected temperature to be a finite number > 0, got"):
        nt_xent(torch.randn(2, 3), torch.randn(2, 3), tau)


def test_nt_xent_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"nt_xent: expected two \[N, D\] projections with N >= 2, D >= 1 and equal "
                                         r"shapes, got \(1, 3\) and \(1, 3\)"):
        nt_xent(torch.randn(1, 3), torch.randn(1, 3))
    # empty projections gave the constant log(2N - 1) = log(5) with zero gradient, a loss that trains nothing
    with pytest.raises(ValueError, match=r"nt_xent: expected two \[N, D\] projections with N >= 2, D >= 1 and equal "
                                         r"shapes, got \(3, 0\) and \(3, 0\)"):
        nt_xent(torch.randn(3, 0), torch.randn(3, 0))


def test_augment_grayscale_views_are_random_and_in_range():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 12, 12)
    aug = SimCLRAugment(12, channels=1)
    v1, v2 = aug(x), aug(x)
    assert v1.shape == x.shape and float(v1.min()) >= 0 and float(v1.max()) <= 1
    assert not torch.equal(v1, v2)  # two independent draws per image
    assert SimCLRAugment(12, channels=3)(torch.rand(2, 3, 12, 12)).shape == (2, 3, 12, 12)
    # torchvision's colour ops take 1 or 3 channels: used to fail with a TypeError at the first training step
    with pytest.raises(ValueError, match="SimCLRAugment: expected channels to be 1 or 3, got 2"):
        SimCLRAugment(12, channels=2)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.features(x))


def _data(n=16):
    return TensorDataset(torch.rand(n, 1, 10, 10, generator=torch.Generator().manual_seed(1)), torch.zeros(n).long())


def _model():
    torch.manual_seed(7)
    return Tiny()


def test_simclr_restores_every_module_mode_and_leaves_no_gradients():
    model = _model()
    model.eval()
    head = model.fc
    head_state = {k: v.clone() for k, v in head.state_dict().items()}
    simclr(model, _data(), epochs=1, batch_size=8, progress=False)
    assert not any(m.training for m in model.modules())  # was left in train mode
    assert model.fc is head and all(torch.equal(head.state_dict()[k], v) for k, v in head_state.items())
    assert all(p.grad is None for p in model.parameters())  # no stale pretraining gradients on the model
    model.train()
    model.features[1].eval()  # a frozen batch norm stays frozen
    simclr(model, _data(), epochs=1, batch_size=8, progress=False)
    assert model.training and model.features[0].training and not model.features[1].training


def test_simclr_restores_head_and_modes_after_a_failure():
    model = _model()
    model.eval()
    head = model.fc

    def bad_augment(x):
        return torch.full_like(x, math.nan)

    with pytest.raises(FloatingPointError, match="simclr: the NT-Xent loss is nan at epoch 1, step 1"):
        simclr(model, _data(), epochs=1, batch_size=8, augment=bad_augment, progress=False)
    assert model.fc is head and not any(m.training for m in model.modules())

    # failing at step 2 left step 1's pretraining gradients on every backbone parameter
    calls = []

    def augment_failing_at_step_2(x):
        calls.append(x)
        return torch.rand_like(x) if len(calls) <= 2 else torch.full_like(x, math.nan)

    with pytest.raises(FloatingPointError, match="simclr: the NT-Xent loss is nan at epoch 1, step 2"):
        simclr(model, _data(), epochs=1, batch_size=8, augment=augment_failing_at_step_2, progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_simclr_is_deterministic_with_a_seed():
    runs = []
    for seed in (3, 3, 4):
        model = _model()
        res = simclr(model, _data(), epochs=1, batch_size=8, seed=seed, progress=False)
        runs.append((res.history[0]["loss"], model.state_dict()))
    assert runs[0][0] == runs[1][0] and all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    assert runs[0][0] != runs[2][0]


def test_simclr_shows_its_bar_and_trains_the_same_with_progress_on_or_off(capsys):
    """progress=True (the default; no test ran it) wrapped the DataLoader in tqdm.auto's tqdm, which calls
    iter(loader) when made: an extra iterator drew from the loader's generator, so the same seed shuffled other
    batches than with progress=False (seed 0: epoch losses 2.6886, 2.6954 against 2.7063, 2.6986)."""
    runs = []
    for progress in (True, False):
        model = _model()
        res = simclr(model, _data(), epochs=2, batch_size=8, seed=3, progress=progress)
        runs.append((res.history, model.state_dict()))
        bar = capsys.readouterr().err
        assert ("simclr 2/2" in bar) == progress, bar
    assert runs[0][0] == runs[1][0] and all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


def test_an_interrupted_simclr_closes_its_progress_bar():
    """A KeyboardInterrupt mid-epoch, its traceback kept (as a notebook keeps sys.last_traceback): simclr's epoch bar
    stayed open ("open bars after KI: 1 ['simclr 1/1']"), pushing every later bar one line down; it is closed, as
    fit's is."""
    from tqdm.auto import tqdm

    calls = []

    def interrupted(batch):
        calls.append(1)
        if len(calls) == 3:  # the second step's first view
            raise KeyboardInterrupt
        return batch

    before = len(getattr(tqdm, "_instances", ()))
    with pytest.raises(KeyboardInterrupt) as kept:
        simclr(_model(), _data(), epochs=1, batch_size=8, augment=interrupted, progress=True)
    assert kept.tb is not None and len(getattr(tqdm, "_instances", ())) == before


def test_simclr_trains_under_a_callers_no_grad_and_refuses_inference_mode():
    """Under a caller's torch.no_grad() simclr stopped at its first backward with autograd's bare "element 0 of
    tensors does not require grad", naming neither simclr nor the block; it trains as outside it (as fit), and
    torch.inference_mode(), which no block inside lifts, is refused by name before any work."""
    runs = []
    for grad_mode in (torch.enable_grad, torch.no_grad):
        model = _model()
        with grad_mode():
            res = simclr(model, _data(), epochs=1, batch_size=8, seed=3, progress=False)
        runs.append((res.history[0]["loss"], model.state_dict()))
    assert runs[0][0] == runs[1][0] and all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"^simclr: cannot train under "
                                               r"torch\.inference_mode\(\); call it outside that block "
                                               r"\(torch\.no_grad\(\) is fine: simclr enables gradients itself\)$"):
        simclr(model, _data(), epochs=1, batch_size=8, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # before any work: the global stream not seeded (mutation testing: the refusal moved to just before the model's
    # move to the device, past torch.manual_seed, survived), the arguments not checked first
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"^simclr: cannot train under "):
        simclr(model, _data(), epochs=0, batch_size=8, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=math.inf), "simclr: expected temperature to be a finite number > 0, got inf"),
    (dict(temperature=True), "simclr: expected temperature to be a finite number > 0, got True"),
    (dict(lr=-1.0), "simclr: expected lr to be a finite number > 0, got -1.0"),
    # weight_decay went to Adam unchecked: True failed in its update, inf as "the NT-Xent loss is nan", "0.1" in a <=
    (dict(weight_decay=True), "simclr: expected weight_decay to be a finite number >= 0, got True"),
    (dict(weight_decay=math.inf), "simclr: expected weight_decay to be a finite number >= 0, got inf"),
    (dict(weight_decay="0.1"), "simclr: expected weight_decay to be a finite number >= 0, got '0.1'"),
    (dict(seed=None), r"simclr: expected seed to be an integer from 0 to 4294967295 \(2\*\*32 - 1: .*\), got None"),
    (dict(seed=True), r"simclr: expected seed to be an integer from 0 to 4294967295 \(.*\), got True"),  # as fit
    (dict(head=5), "simclr: expected head to be 'auto', a module attribute name or None, got 5"),
    (dict(head="missing"), "simclr: the model has no module attribute 'missing' to bypass"),
    # an attribute that is no module (a method): replaced by an identity, the model would have returned its input
    (dict(head="forward"), "simclr: the model has no module attribute 'forward' to bypass"),
    (dict(epochs=0), "simclr: expected epochs to be an integer >= 1, got 0"),
    (dict(projection_dim=0), "simclr: expected projection_dim to be an integer >= 1, got 0"),
    (dict(projection_dim=2.5), "simclr: expected projection_dim to be an integer >= 1, got 2.5"),
    (dict(batch_size=32), "simclr: data has 16 samples, fewer than one batch of 32"),
    (dict(batch_size=1), r"simclr: expected batch_size to be an integer >= 2 \(NT-Xent needs negatives\), got 1"),
])
def test_simclr_bad_arguments(kwargs, match):
    model = _model()
    model.eval()
    args = {"epochs": 1, "batch_size": 8, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        simclr(model, _data(), **args)
    assert not any(m.training for m in model.modules())


def test_augment_uses_simclr_parameters():
    # SimCLRAugment's docstring (SimCLR's recipe): crop scale 0.2-1, jitter p=0.8 (0.4/0.4/0.4/0.1 for RGB),
    # grayscale p=0.2, blur p=0.5 with kernel ~10% of the size (odd, >= 3) and sigma in [0.1, 2].
    from torchvision.transforms import v2

    def parts(aug):
        return {type(t).__name__ + (type(t.transforms[0]).__name__ if isinstance(t, v2.RandomApply) else ""): t
                for t in aug.transform.transforms}

    rgb = parts(SimCLRAugment((64, 40), channels=3))
    assert tuple(rgb["RandomResizedCrop"].size) == (64, 40) and rgb["RandomResizedCrop"].scale == (0.2, 1.0)
    assert tuple(rgb["RandomResizedCrop"].ratio) == (3 / 4, 4 / 3)  # SimCLR's crop aspect ratios
    jitter = rgb["RandomApplyColorJitter"]
    assert jitter.p == 0.8 and jitter.transforms[0].brightness == (0.6, 1.4) and jitter.transforms[0].hue == (-0.1, 0.1)
    assert jitter.transforms[0].saturation == (0.6, 1.4) and rgb["RandomGrayscale"].p == 0.2
    assert jitter.transforms[0].contrast == (0.6, 1.4)
    blur = rgb["RandomApplyGaussianBlur"]
    assert blur.p == 0.5 and tuple(blur.transforms[0].kernel_size) == (5, 5)
    assert list(blur.transforms[0].sigma) == [0.1, 2.0]
    gray = parts(SimCLRAugment(12, channels=1))
    jitter = gray["RandomApplyColorJitter"]
    assert jitter.p == 0.8 and jitter.transforms[0].contrast == (0.6, 1.4) and jitter.transforms[0].saturation is None
    assert jitter.transforms[0].brightness == (0.6, 1.4) and jitter.transforms[0].hue is None
    assert "RandomGrayscale" not in gray and tuple(gray["RandomApplyGaussianBlur"].transforms[0].kernel_size) == (3, 3)
    assert rgb["RandomHorizontalFlip"].p == 0.5 and gray["RandomHorizontalFlip"].p == 0.5  # SimCLR flips too
    # in SimCLR's order (the docstring's): crop, flip, colour (jitter, then grayscale), blur
    assert list(rgb) == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApplyColorJitter", "RandomGrayscale",
                         "RandomApplyGaussianBlur"]
    assert list(gray) == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApplyColorJitter",
                          "RandomApplyGaussianBlur"]


class TinySequentialHead(Tiny):
    def __init__(self):
        super().__init__()
        del self.fc
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_simclr_training_loop_wiring(monkeypatch):
    """What simclr hands NT-Xent: temperature, two augmented views of full (drop_last) shuffled batches, the model in
    train mode; the history is the mean step loss; Adam gets lr and weight_decay."""
    import robust_ops.pretrain as pretrain

    steps, optimizers = [], []
    model = _model()
    model.eval()

    def spy_nt_xent(z1, z2, temperature):
        loss = nt_xent(z1, z2, temperature)
        steps.append((temperature, z1.shape[0], model.training, model.features[1].training, float(loss.detach())))
        return loss

    class SpyAdam(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    augmented = []

    def augment(x):
        augmented.append(x.clone())
        return torch.rand_like(x)

    monkeypatch.setattr(pretrain, "nt_xent", spy_nt_xent)
    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    data = _data(20)  # 20 samples, batches of 8: two full batches per epoch, the last 4 samples dropped
    res = simclr(model, data, epochs=2, temperature=0.2, batch_size=8, lr=2e-3, weight_decay=0.01, projection_dim=16,
                 augment=augment, progress=False)
    assert [s[:4] for s in steps] == [(0.2, 8, True, True)] * 4
    assert len(augmented) == 8 and all(torch.equal(a, b) for a, b in zip(augmented[::2], augmented[1::2]))
    assert not torch.equal(augmented[0], data.tensors[0][:8])  # shuffled
    assert [h["loss"] for h in res.history] == [(steps[0][4] + steps[1][4]) / 2, (steps[2][4] + steps[3][4]) / 2]
    assert [h["epoch"] for h in res.history] == [1, 2]  # counted from 1, as fit counts
    # lr 2e-3, not Adam's default 1e-3: with 1e-3 an lr never handed to Adam passed
    assert optimizers[0].defaults["lr"] == 2e-3 and optimizers[0].defaults["weight_decay"] == 0.01
    assert res.head[-1].out_features == 16
    # the feature-size probe runs in eval mode: only the 4 training steps update the batch-norm statistics
    assert int(model.features[1].num_batches_tracked) == 4
    # a classifier head given as Sequential(..., Linear) is found by head="auto"
    assert simclr(TinySequentialHead(), data, epochs=1, batch_size=8, progress=False).removed_head == "classifier"


def test_simclr_pairs_each_image_with_an_augmented_copy_or_two_views(monkeypatch):
    """MIRST-DM: "pair each image with an augmented image"; SimCLR pairs two augmented views. The paper is ambiguous,
    and only the two-view reading could run: pair_with="original" is the literal one (the image and one view)."""
    import robust_ops.pretrain as pretrain

    pairs = []

    def spy_nt_xent(z1, z2, temperature):
        pairs.append(z1.shape[0])
        return nt_xent(z1, z2, temperature)

    monkeypatch.setattr(pretrain, "nt_xent", spy_nt_xent)
    data = _data(16)
    for pair_with, calls in (("augmented", 2), ("original", 1)):
        seen = []

        def augment(x):
            seen.append(x.clone())
            return torch.rand_like(x)

        inputs = []
        model = _model()
        hook = model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
        simclr(model, data, epochs=1, batch_size=8, augment=augment, pair_with=pair_with, progress=False)
        hook.remove()
        assert len(seen) == 2 * calls  # two batches
        views = inputs[-1]  # the last training forward: both views of the second batch
        assert torch.equal(views[:8], seen[-1]) == (pair_with == "original")
    with pytest.raises(ValueError, match="simclr: expected pair_with to be one of 'augmented', 'original', got 'x'"):
        simclr(_model(), data, epochs=1, batch_size=8, pair_with="x", progress=False)


def test_nt_xent_rejects_unpaired_or_flat_views():
    # Row i of z1 pairs with row i of z2: unequal batches or 1-D projections have no such pairing.
    for a, b in (((2, 3), (3, 3)), ((4,), (4,))):
        with pytest.raises(ValueError, match=r"nt_xent: expected two \[N, D\] projections"):
            nt_xent(torch.randn(a), torch.randn(b))


def test_simclr_head_none_uses_the_model_output():
    # head=None: nothing is bypassed, the classifier's 2 logits are the representation the projection head takes
    res = simclr(_model(), _data(), epochs=1, batch_size=8, head=None, progress=False)
    assert res.removed_head is None and res.head[0].in_features == 2


def test_simclr_seed_also_fixes_the_augmentations():
    # simclr seeds the global RNG that SimCLRAugment and the projection head draw from: the caller's state must not
    # matter (_model() reseeds it, which hid this from the seed test above)
    losses = []
    for outer in (0, 1):
        model = _model()
        torch.manual_seed(outer)
        losses.append(simclr(model, _data(), epochs=1, batch_size=8, seed=3, progress=False).history[0]["loss"])
    assert losses[0] == losses[1]


def test_augment_output_stays_in_range_for_saturated_images():
    # Resize and blur of an all-ones image round to 1.0000002 in float32: the views are clamped back into [0, 1].
    torch.manual_seed(0)
    for channels in (1, 3):
        views = SimCLRAugment(32, channels=channels)(torch.ones(32, channels, 32, 32))
        assert float(views.max()) <= 1.0 and float(views.min()) >= 0.0


@pytest.mark.parametrize("images, match", [
    (torch.rand(4, 1, 8, 8) * 255, r"torch.float32 values in \[[0-9.]+, 2[0-9.]+\]"),
    (torch.rand(4, 1, 8, 8) - 0.5, r"torch.float32 values in \[-0.[0-9]+, 0.[0-9]+\]"),
    (torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), "torch.uint8 values in"),
    # integer images already in [0, 1] (a 0/1 mask) pass the range check: torchvision reads uint8 as 0-255
    (torch.randint(0, 2, (4, 1, 8, 8), dtype=torch.uint8), r"torch.uint8 values in \[0, 1\]"),
])
def test_augment_refuses_images_outside_0_1(images, match):
    # 0-255 or normalized images were clamped into [0, 1] (saturated) and simclr trained on them without a word
    with pytest.raises(ValueError, match="SimCLRAugment: expected float images in \\[0, 1\\], got " + match):
        SimCLRAugment(8, channels=1)(images)
    with pytest.raises(ValueError, match="SimCLRAugment: expected float images in"):
        simclr(_model(), TensorDataset(torch.rand(8, 1, 8, 8) * 255), epochs=1, batch_size=4, progress=False)


def test_simclr_takes_every_integer_seed_fit_takes():
    # "seed: as for robust_ops.train.fit": numpy integers failed in torch.Generator().manual_seed ("an integer is
    # required"), seeds outside [-2**63, 2**64) with "Overflow when unpacking long long"; since 2026-12-07 the seeds
    # fit takes, 0 to 2**32 - 1, and no others (torch's CPU generator reads a seed's low 32 bits: 2**32 + 3, taken
    # until then, trained seed 3's weights)
    import numpy as np

    def loss(seed):
        return simclr(_model(), _data(), epochs=1, batch_size=8, seed=seed, progress=False).history[0]["loss"]

    assert loss(np.int64(3)) == loss(3)
    loss(2**32 - 1)
    for seed in (2**32 + 3, 2**64 + 3, -1):
        with pytest.raises(ValueError, match=rf"^simclr: expected seed to be an integer from 0 to 4294967295 .*, "
                                             rf"got {seed}$"):
            loss(seed)


def test_simclr_refuses_a_model_returning_one_value_per_image():
    # build_model("mlp") for two classes squeezes its single logit to [N]: flatten(1) raised an IndexError traceback
    from robust_ops.models import build_model

    model = build_model("mlp", 1, 2, 10)
    with pytest.raises(ValueError, match=r"^simclr: expected the model to return \[N, \.\.\.\] features, got shape "
                                         r"\(1,\) for 1 image; name the layer to bypass with head=$"):
        simclr(model, _data(), epochs=1, batch_size=8, progress=False)
    assert model.training


def test_simclr_refuses_samples_that_are_not_image_tensors():
    # [H, W] images failed as "SimCLRAugment: expected channels to be 1 or 3, got <H>", NumPy ones in unsqueeze
    import numpy as np

    for data, got in ((TensorDataset(torch.rand(8, 10, 10)), r"shape \(10, 10\)"),
                      (TensorDataset(torch.rand(8, 1, 1, 10, 10)), r"shape \(1, 1, 10, 10\)"),
                      ([np.zeros((1, 10, 10), np.float32)] * 8, "ndarray")):
        with pytest.raises(ValueError, match=r"^simclr: expected data to yield image tensors \[C, H, W\] \(alone or "
                                             r"first in a tuple\), got " + got + "$"):
            simclr(_model(), data, epochs=1, batch_size=8, progress=False)


def test_simclr_progress_takes_only_true_or_false():
    # "progress: as for robust_ops.train.fit", which refuses strings; progress="false" showed the bar
    with pytest.raises(TypeError, match="^simclr: expected progress to be True or False, got 'false'"):
        simclr(_model(), _data(), epochs=1, batch_size=8, progress="false")


def test_simclr_trains_a_float64_model_and_refuses_half_precision_weights():
    """The projection head simclr builds stayed float32: a float64 backbone stopped at its first step with torch's
    "mat1 and mat2 must have the same dtype, but got Double and Float" (a head the caller never sees). It now takes the
    features' dtype. Half-precision backbones got the same error; they are refused as fit refuses them (Adam would
    update float16 / bfloat16 weights in that precision), naming simclr's own way out: fit's "amp=True on CUDA computes
    in float16" named a parameter simclr does not have."""
    model = _model().double()
    data = TensorDataset(_data().tensors[0].double())
    result = simclr(model, data, epochs=1, batch_size=8, progress=False)
    assert math.isfinite(result.history[0]["loss"])
    assert all(p.dtype == torch.float64 for p in result.head.parameters())
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match=rf"^simclr: the model's trainable parameters are {dtype} .*; train "
                                             r"float32 weights \(model\.float\(\) and float32 data\) and convert the "
                                             r"trained model$"):
            simclr(_model().to(dtype), TensorDataset(_data().tensors[0].to(dtype)), epochs=1, batch_size=8,
                   progress=False)


def test_simclr_refuses_a_bad_device_by_name():
    # as fit: torch.device's own error named neither simclr nor device
    with pytest.raises(ValueError, match="^simclr: expected device to be a torch.device or a string such as 'cpu'"):
        simclr(_model(), _data(), epochs=1, batch_size=8, device="cpu ", progress=False)


@pytest.mark.parametrize("gpus", [0, 1])
def test_simclr_refuses_a_cuda_device_this_process_cannot_use_as_fit_does(gpus, monkeypatch):
    """simclr(..., device="cuda") without a visible GPU failed with torch's "Found no NVIDIA driver on your system"
    at model.to(device), and cuda:1 with one GPU with "invalid device ordinal", where fit (whose device simclr's
    docstring refers to) names the argument and the fix."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    device, problem, fix = (("cuda", "no CUDA GPU is visible", "device='cpu'") if not gpus else
                            ("cuda:1", r"only 1 CUDA GPU\(s\) are visible \(cuda:0 to cuda:0\)",
                             "one of them or device='cpu'"))
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^simclr: device='{device}' requested, but {problem}; pass {fix}$"):
        simclr(model, _data(), epochs=1, batch_size=8, device=device, progress=False)
    assert all(torch.equal(v, before[k]) and v.device.type == "cpu" for k, v in model.state_dict().items())


def test_simclr_augment_and_simclr_augment_size_are_checked_by_name():
    # augment=True failed at the first batch ("'bool' object is not callable"); SimCLRAugment(2.5) in torchvision
    # ("'float' object is not iterable") and SimCLRAugment(0) at its first call ("output (H: 0, W: 0)")
    with pytest.raises(TypeError, match="^simclr: expected augment to be a callable batch -> batch or None, got True$"):
        simclr(_model(), _data(), epochs=1, batch_size=8, augment=True, progress=False)
    for bad in (2.5, 0, (8,), True, None):
        with pytest.raises(ValueError, match=r"^SimCLRAugment: expected size to be an integer >= 2 or a pair"):
            SimCLRAugment(bad)
    assert SimCLRAugment([8, 6])(torch.rand(2, 1, 10, 10)).shape == (2, 1, 8, 6)


def test_simclr_takes_a_numpy_integer_batch_size():
    # np.int64(8) passed simclr's check, then DataLoader refused it: "batch_size should be a positive integer value,
    # but got batch_size=8" (fit takes NumPy integers; epochs= and projection_dim= already did here)
    import numpy as np

    result = simclr(_model(), _data(), epochs=1, batch_size=np.int64(8), progress=False)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["loss"])


def test_augment_refuses_a_one_pixel_side():
    # Its Gaussian blur (p=0.5, 3x3 kernel) reflect-pads 1 pixel: on a 1-pixel side it failed at random, mid-training,
    # with torch's "Padding size should be less than the corresponding input dimension"; 2 pixels work
    for bad in (1, (1, 8), (8, 1)):
        with pytest.raises(ValueError, match=r"^SimCLRAugment: expected size to be an integer >= 2 or a pair"):
            SimCLRAugment(bad)
    torch.manual_seed(0)
    aug = SimCLRAugment(2)
    assert all(aug(torch.rand(4, 1, 2, 2)).shape == (4, 1, 2, 2) for _ in range(5))


def test_augment_refuses_images_of_other_channels_or_rank():
    # channels picks the recipe: RGB images under channels=1 got no saturation / hue / random grayscale, grayscale
    # ones under channels=3 a colour recipe, both without a word; a single [3, H, W] image failed as "not enough
    # values to unpack (expected 3, got 2)" and a [1, H, W] one was augmented as a batch of [H, W] planes
    for channels, shape in ((1, (2, 3, 8, 8)), (3, (2, 1, 8, 8)), (3, (3, 8, 8)), (1, (1, 8, 8)), (1, (2, 1, 1, 8, 8))):
        with pytest.raises(ValueError, match=rf"^SimCLRAugment: expected a batch \[N, {channels}, H, W\] \(channels="
                                             rf"{channels}\), got shape {re.escape(str(shape))}$"):
            SimCLRAugment(8, channels=channels)(torch.rand(shape))
    assert SimCLRAugment(8, channels=3)(torch.rand(2, 3, 8, 8)).shape == (2, 3, 8, 8)


def test_augment_checks_crop_scale_by_name():
    # (2, 1) was taken and failed at the first batch in torch ("uniform_ expects to return a [from, to) range");
    # areas outside (0, 1] became a whole-image crop after torchvision's 10 failed tries, silently
    for bad in ((2, 1), (0.5, 0.2), (0, 1), (0.5, 4), (0.2,), 0.5, (True, 1), (0.2, math.nan), None):
        with pytest.raises(ValueError, match=r"^SimCLRAugment: expected crop_scale to be a pair \(low, high\) with "
                                             r"0 < low <= high <= 1, got "):
            SimCLRAugment(8, crop_scale=bad)
    assert SimCLRAugment(8, crop_scale=[0.08, 1])(torch.rand(2, 1, 8, 8)).shape == (2, 1, 8, 8)


def test_projection_head_is_simclrs_nonlinear_mlp():
    """SimCLR's projection head is Linear - ReLU - Linear (a linear head, ReLU dropped, loses the non-linear
    projection the paper found to matter); its output has projection_dim features."""
    from robust_ops.pretrain import projection_head

    head = projection_head(6, 3)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (6, 6, 3)
    x = torch.randn(5, 6)
    assert not torch.allclose(head(x) + head(-x), 2 * head(torch.zeros(1, 6)))  # not affine


def test_simclr_optimizes_backbone_and_projection_head_with_fresh_gradients_each_step(monkeypatch):
    """Adam steps the backbone and the projection head (a head left out stays random, the NT-Xent space untrained),
    not the bypassed classifier head, and every step's gradients are cleared first (else each step would add up the
    gradients of all before it)."""
    events, params = [], []

    class SpyAdam(torch.optim.Adam):
        def __init__(self, ps, **kwargs):
            ps = list(ps)
            params.extend(ps)
            super().__init__(ps, **kwargs)

        def zero_grad(self, set_to_none=True):
            events.append("zero")
            super().zero_grad(set_to_none=set_to_none)

        def step(self, closure=None):
            events.append("step")
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    model = _model()
    res = simclr(model, _data(16), epochs=2, batch_size=8, progress=False)
    ids = {id(p) for p in params}
    assert all(id(p) in ids for p in (*model.features.parameters(), *res.head.parameters()))
    assert not any(id(p) in ids for p in model.fc.parameters())  # the bypassed classifier head is untouched
    assert events == ["zero", "step"] * 4 + ["zero"]  # the last: no pretraining gradient left behind


def test_augment_draws_each_image_of_a_batch_on_its_own():
    """SimCLRAugment's docstring: augmentations are drawn independently per image; one draw for the whole batch
    would give every copy of an image the same view (and every image the same crop)."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 12, 12).expand(8, 1, 12, 12).contiguous()
    views = SimCLRAugment(12, channels=1)(x)
    assert not all(torch.equal(views[0], v) for v in views[1:])


@pytest.mark.parametrize("tau", [0.5, 1e-2, 1e-5])
def test_nt_xent_excludes_self_similarity_exactly_at_any_temperature(tau):
    """Eq. 4's indicator drops k = i from the denominator outright: a finite mask (-100, -1e4 instead of -inf) passed
    the tests at tau >= 0.1, where every other similarity / tau is above -10, yet counts an anchor against itself at
    small temperatures. A regular tetrahedron's 4 vertices have pairwise cosine -1/3: every anchor's positive and 2
    negatives tie, so the loss is log(3) for every tau."""
    t = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    torch.testing.assert_close(nt_xent(t[:2], t[2:], tau), torch.tensor(math.log(3), dtype=torch.float64))


def test_simclr_pairs_row_i_of_both_views_and_projects_them_with_its_head(monkeypatch):
    """NT-Xent's positive pair is row i of z1 and of z2: both must be views of the same image, and both the projection
    head's outputs (the head simclr trains and returns). With an identity augmentation the two views are equal, so
    z1 == z2 exactly; rolled or interleaved rows, or the backbone's features fed to NT-Xent unprojected, differ."""
    import robust_ops.pretrain as pretrain
    from robust_ops.pretrain import projection_head

    heads, calls = [], []

    def recording_head(*args, **kwargs):
        head = projection_head(*args, **kwargs)
        head.register_forward_hook(lambda m, inputs, out: heads.append(out.detach().clone()))
        return head

    def spy_nt_xent(z1, z2, temperature):
        calls.append((z1.detach().clone(), z2.detach().clone()))
        return nt_xent(z1, z2, temperature)

    monkeypatch.setattr(pretrain, "projection_head", recording_head)
    monkeypatch.setattr(pretrain, "nt_xent", spy_nt_xent)
    simclr(_model(), _data(16), epochs=1, batch_size=8, projection_dim=5, augment=lambda x: x.clone(), progress=False)
    assert len(calls) == 2 and len(heads) == 2
    for (z1, z2), out in zip(calls, heads):
        assert z1.shape == (8, 5) and torch.equal(z1, z2) and torch.equal(torch.cat([z1, z2]), out)
        assert not torch.equal(z1, z1.roll(1, 0))  # the rows differ: a shifted pairing would show


def test_simclr_defaults_are_the_documented_ones():
    """docs/training.md and docs/defenses/mirst-dm.md give simclr's defaults: tau = 0.5 (also nt_xent's), batch 64,
    Adam lr 3e-4, a 128-d projection, two augmented views; weight decay 1e-6 is SimCLR's. No other test runs them."""
    import inspect

    from robust_ops.pretrain import projection_head

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}

    assert {k: v for k, v in defaults(simclr).items() if k not in ("augment", "device", "seed", "progress")} == {
        "temperature": 0.5, "batch_size": 64, "lr": 3e-4, "weight_decay": 1e-6, "projection_dim": 128, "head": "auto",
        "pair_with": "augmented"}
    assert defaults(nt_xent) == {"temperature": 0.5} and defaults(projection_head) == {"out_features": 128}


class TinyNamedHead(nn.Module):
    """Tiny with its classifier head under another attribute name."""

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.features = _model().features
        setattr(self, name, nn.Linear(4, 2))

    def forward(self, x):
        return getattr(self, self.name)(self.features(x))


def test_simclr_bypasses_a_head_called_head_or_named_by_the_caller():
    # head="auto" looks for fc, classifier and head (the docstring's three); any other name is bypassed when given
    res = simclr(TinyNamedHead("head"), _data(), epochs=1, batch_size=8, progress=False)
    assert res.removed_head == "head" and res.head[0].in_features == 4
    assert simclr(TinyNamedHead("out"), _data(), epochs=1, batch_size=8, progress=False).removed_head is None
    res = simclr(TinyNamedHead("out"), _data(), epochs=1, batch_size=8, head="out", progress=False)
    assert res.removed_head == "out" and res.head[0].in_features == 4


def test_simclr_bypasses_the_head_of_the_model_a_data_parallel_wraps():
    """nn.DataParallel has no fc of its own: head="auto" found none and pretrained through the classifier, the
    projection head taking its 2 logits as the features and the fc's weights changed (head="head" was refused as
    "the model has no module attribute"). The wrapped model's head is bypassed now, and put back."""
    for head in ("auto", "head"):
        torch.manual_seed(0)
        model = TinyNamedHead("head")
        before = model.head.weight.clone()
        res = simclr(nn.DataParallel(model), _data(), epochs=1, batch_size=8, head=head, progress=False)
        assert res.removed_head == "head" and res.head[0].in_features == 4
        assert isinstance(model.head, nn.Linear) and torch.equal(model.head.weight, before)


def test_simclr_default_augment_fits_rgb_non_square_images():
    """The default SimCLRAugment takes the data's channels (the RGB recipe for RGB images) and its height and width
    in that order: every test ran square grayscale images, where channels=1 or a transposed size could not show."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    data = TensorDataset(torch.rand(8, 3, 10, 14, generator=torch.Generator().manual_seed(1)))
    res = simclr(model, data, epochs=1, batch_size=4, head=None, progress=False)
    assert math.isfinite(res.history[0]["loss"]) and shapes[1:] == [(8, 3, 10, 14)] * 2  # after the size probe


def test_simclr_flattens_feature_maps_for_the_projection_head():
    # a representation that is not flat ([N, C, H, W], head=None) is flattened: the head takes C * H * W features
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    res = simclr(model, _data(), epochs=1, batch_size=8, head=None, progress=False)
    assert res.head[0].in_features == 2 * 8 * 8 and math.isfinite(res.history[0]["loss"])


def test_simclr_seed_sets_the_batch_order():
    # "seed: as for fit", where the seed also fixes the shuffling: an unseeded loader generator gave every seed the
    # same batch order (the seed tests above still passed, through the augmentations and the head's initialisation)
    def order(seed):
        batches = []
        simclr(_model(), _data(), epochs=1, batch_size=8, seed=seed, progress=False,
               augment=lambda x: batches.append(x.clone()) or x.clone())
        return torch.cat(batches)

    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))


def test_simclr_takes_a_model_whose_head_was_emptied():
    # "model.fc = nn.Sequential()" is a common way to strip a classifier: head="auto" finds nothing to bypass there
    model = _model()
    model.fc = nn.Sequential()
    res = simclr(model, _data(), epochs=1, batch_size=8, progress=False)
    assert res.removed_head is None and res.head[0].in_features == 4 and isinstance(model.fc, nn.Sequential)


class TinyPooledHead(nn.Module):
    """A backbone whose last stage, named head, pools and flattens: no classifier to bypass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.head(self.features(x))


def test_simclr_auto_keeps_a_sequential_head_that_does_not_end_in_a_linear_layer():
    # head="auto" bypasses fc / classifier / head only as a Linear or a Sequential ending in one (mutation testing of
    # pretrain: taking any non-empty Sequential survived, which would pretrain this model on its unpooled maps)
    model = TinyPooledHead()
    res = simclr(model, _data(), epochs=1, batch_size=8, progress=False)
    assert res.removed_head is None and res.head[0].in_features == 4
