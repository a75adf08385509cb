"""Model zoo used by the trainer, the CLI and the benchmarks: torchvision CNNs adapted to any channel count and small
medical images, plus tiny models for tests and two-moons.

Adaptation (documented in docs/getting-started.md): the first convolution takes ``in_channels``; for images of at most
64 pixels a ResNet's (and DenseNet-121's) 7x7/2 stem becomes 3x3/1 (as for CIFAR-sized inputs) so 28x28 images keep
spatial detail, while the first max-pooling layer is kept -- MIRST-DM replaces exactly that layer with drop-max pooling.
VGG-16 drops the 2x2 max-pools that would shrink its map below 1x1 (the last one at 28x28) and has a small
512-256-num_classes classifier after global pooling. The MLP flattens the image. The classifier head outputs
``num_classes`` logits, except the MLP's for two classes: one logit ``[N]`` (ARFL's 2-10-10-1). No weights are
downloaded.
"""

import torch
from torch import nn

from ._options import check_int

__all__ = ["build_model", "predict", "count_parameters", "MODELS", "SmallCNN", "MLP"]

MODELS = ("resnet18", "resnet50", "vgg16", "densenet121", "small_cnn", "mlp")


class SmallCNN(nn.Module):
    """A small VGG-style CNN for fast tests and the demo: (conv-BatchNorm-ReLU, max-pool) x2, conv-BatchNorm-ReLU,
    global average pooling, linear; ``width``, 2 x ``width`` and 4 x ``width`` channels (default 16). ``in_channels``:
    the images' channels (default 1); ``num_classes``: the logits per image, >= 2 (default 2)."""

    def __init__(self, in_channels=1, num_classes=2, width=16):
        super().__init__()
        # torch accepts 0 channels or 0 classes silently (the model fails later, mid-training): refused here
        check_int("SmallCNN", "in_channels", in_channels, 1)
        check_int("SmallCNN", "num_classes", num_classes, 2)
        check_int("SmallCNN", "width", width, 1)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class MLP(nn.Module):
    """Fully connected net, e.g. ARFL's two-moons model 2-10-10-1 (``MLP(2, 1, hidden=(10, 10))``), with a ReLU
    after each hidden layer. ``in_features``: the input's values per sample (default 2; inputs are flattened from
    dimension 1); ``num_outputs``: 1 (default) for a single logit [N], else K logits [N, K]; ``hidden``: the hidden
    layers' widths (default (10, 10))."""

    def __init__(self, in_features=2, num_outputs=1, hidden=(10, 10)):
        super().__init__()
        check_int("MLP", "in_features", in_features, 1)
        check_int("MLP", "num_outputs", num_outputs, 1)  # 1: a single logit (binary)
        if not isinstance(hidden, (tuple, list)):  # hidden=10 failed as "'int' object is not iterable"
            raise ValueError(f"MLP: expected hidden to be a tuple or list of widths such as (10, 10), got {hidden!r}")
        for h in hidden:
            check_int("MLP", "every hidden width", h, 1)
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        """The logits of ``x`` [N, ...] (flattened to [N, in_features]): [N] for one output, else [N, K]."""
        out = self.net(x.flatten(1))
        # a Python int: a branch on out.shape[1] failed torch.fx tracing; an unconditional squeeze(1) fails ONNX
        return out.squeeze(1) if self.net[-1].out_features == 1 else out


def build_model(name, in_channels=1, num_classes=2, image_size=28, width=None):
    """A freshly initialised model by name (one of MODELS); raises ValueError naming the known models otherwise.
    ``in_channels``: the images' channels (default 1; two-moons: the feature count); ``num_classes``: K >= 2 (default
    2; the mlp then has one logit); ``image_size``: the images' side length in pixels (default 28; 0, the mlp only:
    feature vectors of ``in_channels`` values). The resnets and densenet121 take a 3x3 stride-1 stem at 64 pixels or
    fewer, vgg16 drops the max-pools that would shrink its map below 1x1.
    ``width``: small_cnn's channel width (default 16); the other models have their architecture's own widths."""
    import torchvision.models as tvm

    if name not in MODELS:  # prefixed as attacks.build's and defenses.build's; the model's own errors name the model
        raise ValueError(f"build_model: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if width is not None and name != "small_cnn":  # it was ignored silently
        raise ValueError(f"{name}: width= applies to small_cnn only (got width={width!r}); leave it unset")
    check_int(name, "in_channels", in_channels, 1)
    check_int(name, "num_classes", num_classes, 2)
    # image_size 0 stands for feature vectors, which only the MLP takes
    check_int(name, "image_size", image_size, 0 if name == "mlp" else 1)
    if name == "small_cnn":
        if image_size < 3:
            # its 3x3/2 (padding 1) and 2x2 max-pools need 3 pixels; below, forward failed in the second pool
            raise ValueError(f"small_cnn needs images of at least 3x3 pixels, got image_size={image_size}")
        return SmallCNN(in_channels, num_classes, width=16 if width is None else width)
    if name == "mlp":
        # image_size 0 = a feature vector of in_channels values (two-moons); else the flattened image
        in_features = in_channels * image_size * image_size if image_size else in_channels
        return MLP(in_features, 1 if num_classes == 2 else num_classes)
    if name in ("resnet18", "resnet50"):
        model = getattr(tvm, name)(weights=None, num_classes=num_classes)
        if image_size <= 64:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model
    if name == "vgg16":
        model = tvm.vgg16_bn(weights=None, num_classes=num_classes)
        model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
        # Five 2x2 max-pools need 32 pixels; below that, the pools that would shrink the map under 1x1 are dropped
        # (28x28 keeps four: 28 -> 14 -> 7 -> 3 -> 1).
        size = image_size
        for i, layer in enumerate(model.features):
            if isinstance(layer, nn.MaxPool2d):
                if size < 2:
                    model.features[i] = nn.Identity()
                else:
                    size //= 2
        model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        model.classifier = nn.Sequential(nn.Linear(512, 256), nn.ReLU(True), nn.Dropout(0.5),
                                         nn.Linear(256, num_classes))
        return model
    # densenet121, the last of MODELS (an unknown name was refused at the top; test_models.py builds each)
    if 0 < image_size < 15:
        # its 3x3/2 (padding 1) max-pool rounds up (15 -> 8), then three 2x2 average-pool transitions halve it
        raise ValueError(f"densenet121 needs images of at least 15x15 pixels, got image_size={image_size}")
    model = tvm.densenet121(weights=None, num_classes=num_classes)
    model.features.conv0 = nn.Conv2d(
        in_channels, 64, kernel_size=3 if image_size <= 64 else 7, stride=1 if image_size <= 64 else 2,
        padding=1 if image_size <= 64 else 3, bias=False,
    )
    return model


def count_parameters(model):
    """The number of parameter elements in ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict(model, x):
    """Class predictions [N] (int64) of ``model`` at inputs ``x``: the argmax of [N, K] logits, or for [N] / [N, 1]
    single-logit (sigmoid) outputs 1 where the logit is > 0. Runs without autograd, in the model's current mode."""
    out = model(x)
    if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
        return (out.reshape(-1) > 0).long()
    return out.argmax(1)
