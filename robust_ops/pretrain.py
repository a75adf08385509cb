"""SimCLR pretraining (Chen et al., ICML 2020) as used by MIRST-DM's Table 2: contrastive pretraining of the backbone
with the NT-Xent loss (MIRST-DM eq. 4), before supervised / adversarial training with robust_ops.train.fit.

    simclr(model, train_set, epochs=100, temperature=0.5)   # pretrains model's backbone in place
    fit(model, defenses.build("mirst-dm"), train_set, ...)

The classifier head (the model's last ``fc`` / ``classifier`` / ``head`` linear layer) is replaced by an identity while
pretraining, so the representation is the backbone's pooled features; a 2-layer projection head maps them to the space
where NT-Xent is computed (and is returned, then discarded as in SimCLR). The model's own head is put back untouched,
every module's train/eval mode restored and no pretraining gradient left on a parameter, also when pretraining fails.
"""

import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._options import check_choice, check_flags, check_int, check_real, check_seed, check_usable_device
from .attacks.context import check_gradients_possible, float32_or_wider, use_model_mode
from .train import check_trainable_precision, weights_module

HEAD_NAMES = ("fc", "classifier", "head")
# What each image is paired with: "augmented" -- two augmented views (SimCLR's Algorithm 1); "original" -- the image
# itself and one augmented view (MIRST-DM's "pair each image with an augmented image", read literally)
PAIRINGS = ("augmented", "original")

__all__ = ["simclr", "PretrainResult", "nt_xent", "SimCLRAugment", "projection_head", "PAIRINGS"]


def nt_xent(z1, z2, temperature=0.5):
    """NT-Xent (MIRST-DM eq. 4) averaged over all 2N anchors: for anchor i with positive j,
    l(i, j) = -log(exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau)), sim the cosine similarity.

    Args: z1, z2 (Tensor[N, D]): projections of the two views (row i of z1 and of z2 form a positive pair);
    temperature (float > 0)."""
    # D = 0 gave the constant log(2N - 1) with zero gradient: a loss that trains nothing (as simclr's projection_dim=0)
    if z1.shape != z2.shape or z1.dim() != 2 or z1.shape[0] < 2 or z1.shape[1] < 1:
        raise ValueError(f"nt_xent: expected two [N, D] projections with N >= 2, D >= 1 and equal shapes, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    check_real("nt_xent", "temperature", temperature, minimum=0, allow_min=False)
    n = z1.shape[0]
    z = F.normalize(float32_or_wider(torch.cat([z1, z2])), dim=1)  # half precision upcast, float64 kept
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    # made on z's device: a CPU tensor moved there is a host copy, which on CUDA waits for the GPU every step
    targets = torch.cat([torch.arange(n, 2 * n, device=z.device), torch.arange(0, n, device=z.device)])
    return F.cross_entropy(sim, targets)


class SimCLRAugment(nn.Module):
    """SimCLR's augmentations for a batch of images in [0, 1], drawn independently per image: random resized crop
    (scale 0.2-1, back to the input size), horizontal flip, color jitter with probability 0.8 (brightness and contrast
    0.4 for grayscale; plus saturation 0.4 and hue 0.1 and random grayscale p=0.2 for RGB), Gaussian blur with
    probability 0.5 (kernel ~ 10% of the size, sigma in [0.1, 2]). Uses the global torch RNG (seeded by simclr).
    ``size``: the output side length in pixels (an integer >= 2, or a pair (height, width)); ``channels``: 1
    (default, grayscale recipe) or 3 (RGB recipe); ``crop_scale``: the crop's area fraction range (low, high),
    0 < low <= high <= 1 (default (0.2, 1.0))."""

    def __init__(self, size, channels=1, crop_scale=(0.2, 1.0)):
        super().__init__()
        from torchvision.transforms import v2

        if channels not in (1, 3):  # torchvision's colour ops take 1 or 3 channels and would fail mid-training
            raise ValueError(f"SimCLRAugment: expected channels to be 1 or 3, got {channels!r}")
        # else errors from inside torchvision ("'float' object is not iterable", "output (H: 0, W: 0)")
        pair = (size, size) if isinstance(size, numbers.Integral) else tuple(size) if isinstance(size, (tuple, list)) \
            else ()
        # >= 2: the Gaussian blur reflect-pads 1 pixel, which a 1-pixel side cannot give (it failed at random, p=0.5)
        if len(pair) != 2 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 2 for s in pair):
            raise ValueError(f"SimCLRAugment: expected size to be an integer >= 2 or a pair (height, width) of them, "
                             f"got {size!r}")
        h, w = (int(s) for s in pair)
        # torchvision checks it only when drawing (low > high: "uniform_ expects ... from=2 > to=1" at the first batch)
        # and turns areas outside (0, 1] into whole-image crops after 10 failed tries, silently
        scale = tuple(crop_scale) if isinstance(crop_scale, (tuple, list)) else ()
        if len(scale) != 2 or not all(not isinstance(v, bool) and isinstance(v, numbers.Real) and 0 < v <= 1
                                      for v in scale) or scale[0] > scale[1]:
            raise ValueError(f"SimCLRAugment: expected crop_scale to be a pair (low, high) with 0 < low <= high <= 1, "
                             f"got {crop_scale!r}")
        kernel = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
        scale = tuple(float(v) for v in scale)
        ops = [v2.RandomResizedCrop((h, w), scale=scale, antialias=True), v2.RandomHorizontalFlip()]
        if channels == 3:
            ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
        else:
            ops += [v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8)]
        ops += [v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5)]
        self.transform = v2.Compose(ops)
        self.channels = channels

    def forward(self, x):
        """Augmented copies [N, channels, height, width] (``size``'s) of the images ``x`` [N, channels, H, W] in
        [0, 1], one draw per image; other shapes or values are a ValueError."""
        # the recipe is chosen by channels: RGB images under channels=1 lost saturation/hue/grayscale without a word,
        # and a single [C, H, W] image was augmented channel by channel
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != self.channels:
            got = f"shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"SimCLRAugment: expected a batch [N, {self.channels}, H, W] (channels={self.channels}), "
                             f"got {got}")
        # the clamp below only removes float rounding (resize, blur of 1.0): images outside [0, 1] (0-255, normalized)
        # or integer images would be clamped into saturated garbage without a word
        low, high = float(x.min()), float(x.max())
        if not x.is_floating_point() or low < 0 or high > 1:
            raise ValueError(f"SimCLRAugment: expected float images in [0, 1], got {x.dtype} values in "
                             f"[{low:g}, {high:g}]; scale them to [0, 1] first")
        return torch.stack([self.transform(img).clamp(0, 1) for img in x])


def projection_head(in_features, out_features=128):
    """SimCLR's MLP projection head: Linear(in_features, in_features) - ReLU - Linear(in_features, out_features)
    (default 128 outputs)."""
    return nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(inplace=True),
                         nn.Linear(in_features, out_features))


@dataclass
class PretrainResult:
    """history: [{"epoch", "loss"}] per epoch; head: the trained projection head; removed_head: the name of the
    classifier head that was bypassed (None if the model was used as a feature extractor as is)."""

    history: list = field(default_factory=list)
    head: nn.Module = None
    removed_head: str = None


def _classifier_head(model, head):
    if head is None:
        return None
    if head != "auto":
        if not isinstance(getattr(model, head, None), nn.Module):
            raise ValueError(f"simclr: the model has no module attribute {head!r} to bypass")
        return head
    for name in HEAD_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Sequential) and len(module)
                                             and isinstance(module[-1], nn.Linear)):
            return name
    return None


def simclr(model_backbone, data, epochs, temperature=0.5, *, batch_size=64, lr=3e-4, weight_decay=1e-6,
           projection_dim=128, head="auto", augment=None, pair_with="augmented", device="cpu", seed=0, progress=True):
    """Pretrain ``model_backbone`` in place with SimCLR's NT-Xent loss on ``data`` (labels are ignored).

    Args:
        model_backbone (nn.Module): a feature extractor, or a classifier whose head (``fc``/``classifier``/``head``,
            found with head="auto", or named) is bypassed during pretraining and left untouched; in an
            ``nn.DataParallel`` or a ``torch.compile``'d model, the wrapped module's head.
        data (Dataset): yields ``x`` or ``(x, y, ...)`` with images [C, H, W] in [0, 1].
        epochs (int): passes over data. temperature (float): tau of eq. 4 (0.5).
        batch_size (int): N pairs per step (the last incomplete batch is dropped; N >= 2).
        lr, weight_decay: Adam settings. projection_dim: output size of the projection head.
        head: "auto", a module attribute name, or None (use the model's output as the representation).
        augment (callable, optional): batch -> augmented batch; default SimCLRAugment for the image size.
        pair_with (str): "augmented" (default, SimCLR's): a positive pair is two augmented views of the image;
            "original": the image itself and one augmented view (MIRST-DM's sentence read literally).
        device, seed, progress: as for robust_ops.train.fit.

    Returns:
        PretrainResult(history, head, removed_head).
    """
    # as fit: it trains with gradients enabled under a caller's torch.no_grad(); inference_mode cannot be lifted
    check_gradients_possible("simclr", "cannot train", "simclr")
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"simclr: expected epochs to be an integer >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 2:
        raise ValueError(f"simclr: expected batch_size to be an integer >= 2 (NT-Xent needs negatives), got "
                         f"{batch_size!r}")
    batch_size = int(batch_size)  # a NumPy integer passed the check above, then DataLoader refused it without our name
    if len(data) < batch_size:
        raise ValueError(f"simclr: data has {len(data)} samples, fewer than one batch of {batch_size}")
    check_real("simclr", "temperature", temperature, minimum=0, allow_min=False)
    check_real("simclr", "lr", lr, minimum=0, allow_min=False)
    check_real("simclr", "weight_decay", weight_decay, minimum=0)  # inf ran a step, then "NT-Xent loss is nan"
    check_flags("simclr", {"progress": progress})  # as fit: progress="false" showed the bar
    # 0 ran: NT-Xent of empty projections is a constant, so nothing was learnt and the loss said log(2N - 1)
    check_int("simclr", "projection_dim", projection_dim)
    check_choice("simclr", "pair_with", pair_with, PAIRINGS)
    if augment is not None and not callable(augment):  # else "'bool' object is not callable" at the first batch
        raise TypeError(f"simclr: expected augment to be a callable batch -> batch or None, got {augment!r}")
    seed = check_seed("simclr", seed)  # fit's rule: seed=2**32 (torch reads the low 32 bits) trained seed 0's weights
    if not (head is None or isinstance(head, str)):
        raise ValueError(f"simclr: expected head to be 'auto', a module attribute name or None, got {head!r}")
    device = check_usable_device("simclr", device)  # as fit: torch said "Found no NVIDIA driver" at model.to
    torch.manual_seed(seed)
    first = data[0]
    sample = first[0] if isinstance(first, (tuple, list)) else first
    # a 2-D image reached SimCLRAugment as "channels ... got <height>", a NumPy array failed in unsqueeze
    if not torch.is_tensor(sample) or (augment is None and sample.dim() != 3):
        got = f"shape {tuple(sample.shape)}" if torch.is_tensor(sample) else type(sample).__name__
        raise ValueError(f"simclr: expected data to yield image tensors [C, H, W] (alone or first in a tuple), "
                         f"got {got}")
    augment = augment if augment is not None else SimCLRAugment(tuple(sample.shape[-2:]), channels=sample.shape[0])

    # the head is looked up (and bypassed) in the module a DataParallel or torch.compile wrapper holds: the wrapper
    # has no fc, so "auto" found none and pretrained through the classifier, its 2 logits taken for the features
    holder = weights_module(model_backbone)
    head_name = _classifier_head(holder, head)
    original_head = getattr(holder, head_name) if head_name else None
    model = model_backbone.to(device)
    opt = bar = None
    with torch.enable_grad(), use_model_mode(model, "keep"):  # per module: one frozen in eval stays so, on failure too
        try:
            if head_name:
                setattr(holder, head_name, nn.Identity())
            model.train()
            # simclr has no amp: fit's "amp=True on CUDA computes in float16" would name a parameter it lacks
            check_trainable_precision("simclr", [p for p in model.parameters() if p.requires_grad],
                                      how="model.float() and float32 data")
            with torch.no_grad(), use_model_mode(model, "eval"):
                features = model(sample.unsqueeze(0).to(device))
            if features.dim() < 2:  # e.g. MLP's squeezed single logit: flatten(1) failed with an IndexError
                raise ValueError(f"simclr: expected the model to return [N, ...] features, got shape "
                                 f"{tuple(features.shape)} for 1 image; name the layer to bypass with head=")
            feat_dim = features.flatten(1).shape[1]
            # the backbone's dtype: a float32 head failed on float64 features with torch's dtype error
            proj = projection_head(feat_dim, projection_dim).to(device=device, dtype=features.dtype)
            params = list(model.parameters()) + list(proj.parameters())
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
            loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                                                 generator=torch.Generator().manual_seed(seed))
            history = []
            for epoch in range(epochs):
                total, steps = 0.0, 0
                if progress:
                    from tqdm.auto import tqdm

                    # a total, not the loader, as fit's bar: tqdm.auto's tqdm calls iter(loader) when made, an extra
                    # DataLoader iterator that draws from the loader's generator, so progress=True shuffled other
                    # batches than progress=False for the same seed
                    bar = tqdm(total=len(loader), desc=f"simclr {epoch + 1}/{epochs}", leave=False)
                for batch in loader:
                    x = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
                    v1 = x if pair_with == "original" else augment(x)
                    v2 = augment(x)
                    z = proj(model(torch.cat([v1, v2])).flatten(1))
                    loss = nt_xent(z[: x.shape[0]], z[x.shape[0]:], temperature)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"simclr: the NT-Xent loss is {float(loss.detach())} at epoch "
                                                 f"{epoch + 1}, step {steps + 1}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                    steps += 1
                    if bar is not None:
                        bar.update(1)
                if bar is not None:
                    bar.close()
                    bar = None
                history.append({"epoch": epoch + 1, "loss": total / max(steps, 1)})
        finally:
            if bar is not None:  # an interrupted epoch's bar, kept open by a notebook's traceback, as in fit
                bar.close()
            if opt is not None:  # the last step's gradients belong to pretraining, not to the caller (also on failure)
                opt.zero_grad(set_to_none=True)
            if head_name:
                setattr(holder, head_name, original_head)
    return PretrainResult(history=history, head=proj, removed_head=head_name)
