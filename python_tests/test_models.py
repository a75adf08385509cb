"""The model zoo: every model runs on the sizes the datasets have (28x28 MedMNIST, larger images, two-moons)."""

import pytest
import torch

from robust_ops.models import MODELS, build_model


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_channels,image_size", [(1, 28), (3, 16), (3, 64)])
def test_every_model_runs_on_small_images(name, in_channels, image_size):
    model = build_model(name, in_channels, 3, image_size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, image_size, image_size))
    assert out.shape == (2, 3)


def test_vgg16_keeps_the_pools_that_fit():
    pools = lambda m: sum(isinstance(layer, torch.nn.MaxPool2d) for layer in m.features)  # noqa: E731
    small = build_model("vgg16", 1, 2, 28)
    assert pools(small) == 4 and pools(build_model("vgg16", 3, 2, 32)) == 5
    assert small.classifier[-1].out_features == 2  # the head has num_classes outputs (the others test 3)
    # global average pooling above 32 pixels too (mutation testing of models: max pooling survived; at 28 the map is
    # 1x1 and the two agree)
    assert isinstance(small.avgpool, torch.nn.AdaptiveAvgPool2d) and small.avgpool.output_size == (1, 1)


def test_mlp_on_images_and_on_feature_vectors():
    assert build_model("mlp", 1, 2, 28).net[0].in_features == 784
    model = build_model("mlp", 2, 2, 0)  # two-moons: 2 features, one logit
    assert model.net[0].in_features == 2 and model(torch.rand(5, 2)).shape == (5,)
    linear = [(m.in_features, m.out_features) for m in model.net if isinstance(m, torch.nn.Linear)]
    assert linear == [(2, 10), (10, 10), (10, 1)]  # docs/getting-started.md: ARFL's 2-10-10-1


def test_too_small_for_densenet_is_a_clear_error():
    for size in (8, 14):
        with pytest.raises(ValueError, match=f"densenet121 needs images of at least 15x15 pixels, got image_size="
                                             f"{size}"):
            build_model("densenet121", 1, 2, size)
    # 15x15 runs (its first max-pool rounds up: 15 -> 8 -> 4 -> 2 -> 1) and was refused as "at least 16x16"
    model = build_model("densenet121", 1, 2, 15).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 15, 15)).shape == (1, 2)


def test_too_small_for_small_cnn_is_a_clear_error():
    # It was built, and its forward failed in the second max-pool (torch's "Output size is too small"): mid-training
    # for the trainer, mid-run for bench_defenses --size 2.
    for size in (1, 2):
        with pytest.raises(ValueError, match=f"small_cnn needs images of at least 3x3 pixels, got image_size={size}"):
            build_model("small_cnn", 1, 2, size)
    model = build_model("small_cnn", 1, 2, 3).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 3, 3)).shape == (2, 2)


@pytest.mark.parametrize("name", MODELS)
def test_bad_channels_classes_and_size_are_clear_errors(name):
    for kwargs, msg in ((dict(in_channels=0), "in_channels to be an integer >= 1, got 0"),
                        (dict(in_channels=1.0), "in_channels to be an integer >= 1, got 1.0"),
                        (dict(num_classes=0), "num_classes to be an integer >= 2, got 0"),
                        (dict(num_classes=1), "num_classes to be an integer >= 2, got 1"),
                        (dict(image_size=-4), "image_size to be an integer >= ")):
        # torch built 0-channel / 0-class models silently (they failed mid-training) or raised deep in a layer
        with pytest.raises(ValueError, match=f"^{name}: expected {msg}"):
            build_model(name, **{"in_channels": 1, "num_classes": 2, "image_size": 28, **kwargs})


@pytest.mark.parametrize("name", MODELS)
def test_width_is_small_cnns_and_refused_elsewhere(name):
    """build_model(name, ..., width=64) built the architecture's own widths for every model but small_cnn, without a
    word."""
    if name == "small_cnn":
        assert build_model(name, width=8).state_dict().keys() == build_model(name).state_dict().keys()
        assert sum(p.numel() for p in build_model(name, width=8).parameters()) < sum(
            p.numel() for p in build_model(name).parameters())
        return
    with pytest.raises(ValueError,
                       match=f"^{name}: width= applies to small_cnn only \\(got width=64\\); leave it unset$"):
        build_model(name, width=64)


def test_small_cnn_and_mlp_validate_their_own_arguments():
    from robust_ops.models import MLP, SmallCNN

    with pytest.raises(ValueError, match="SmallCNN: expected num_classes to be an integer >= 2, got 0"):
        SmallCNN(1, 0)
    # (mutation testing of models: taking width 0 survived; torch builds the zero-channel layers silently)
    with pytest.raises(ValueError, match="SmallCNN: expected width to be an integer >= 1, got 0"):
        SmallCNN(1, 2, width=0)
    # (mutation testing of models: dropping SmallCNN's in_channels check and MLP's in_features / num_outputs checks
    # survived: torch builds those zero-sized layers silently, and build_model checks before them)
    with pytest.raises(ValueError, match="^SmallCNN: expected in_channels to be an integer >= 1, got 0$"):
        SmallCNN(0, 2)
    with pytest.raises(ValueError, match="^MLP: expected in_features to be an integer >= 1, got 0$"):
        MLP(0, 1)
    with pytest.raises(ValueError, match="^MLP: expected num_outputs to be an integer >= 1, got 0$"):
        MLP(2, 0)
    with pytest.raises(ValueError, match="MLP: expected every hidden width to be an integer >= 1, got 0"):
        MLP(2, 1, hidden=(10, 0))
    # a single width failed in Python's own words ("'int' object is not iterable"), a string was read digit by digit
    for bad in (10, None, "10"):
        with pytest.raises(ValueError,
                           match=r"^MLP: expected hidden to be a tuple or list of widths such as \(10, 10\), got "):
            MLP(2, 1, hidden=bad)
    assert MLP(2, 1, hidden=[4]).net[0].out_features == 4 and len(MLP(2, 3, hidden=()).net) == 1


def test_stems_follow_the_image_size_and_channel_count():
    """docs/getting-started.md: up to 64 pixels a 3x3/1 stem (max-pool kept, MIRST-DM replaces it); above, the
    7x7/2 stem, rebuilt for a channel count other than 3."""
    stem = lambda conv: (conv.in_channels, conv.kernel_size, conv.stride, conv.padding)  # noqa: E731
    small, large = build_model("resnet18", 1, 2, 64), build_model("resnet18", 1, 2, 65)
    assert stem(small.conv1) == (1, (3, 3), (1, 1), (1, 1)) and isinstance(small.maxpool, torch.nn.MaxPool2d)
    assert stem(large.conv1) == (1, (7, 7), (2, 2), (3, 3))
    assert small.training and large.training  # freshly built: in train mode, like any new nn.Module
    assert stem(build_model("densenet121", 2, 2, 64).features.conv0) == (2, (3, 3), (1, 1), (1, 1))
    assert stem(build_model("densenet121", 2, 2, 65).features.conv0) == (2, (7, 7), (2, 2), (3, 3))
    pools = [m for m in build_model("small_cnn", 1, 2, 28).modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 2  # SmallCNN: conv-ReLU-maxpool x2
    with pytest.raises(ValueError, match=r"^resnet18: expected image_size to be an integer >= 1, got 0"):
        build_model("resnet18", 1, 2, 0)  # 0 (feature vectors) is for the MLP only


def test_predict_single_logits_and_class_scores():
    from robust_ops.models import predict

    logits = torch.tensor([-1.0, 0.0, 2.0])  # a zero logit is probability 1/2: not positive
    assert predict(torch.nn.Identity(), logits).tolist() == [0, 0, 1]
    assert predict(torch.nn.Identity(), logits[:, None]).tolist() == [0, 0, 1]
    assert predict(torch.nn.Identity(), torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0]])).tolist() == [1, 0]
    # without autograd: evaluation loops call it on every batch (mutation testing of models: dropping no_grad survived)
    modes = []
    predict(lambda x: modes.append(torch.is_grad_enabled()) or x, logits.requires_grad_())
    assert modes == [False]


def test_parameter_counts_against_torchvision():
    """docs/getting-started.md: 3 channels above 64 pixels are torchvision's ResNets and DenseNet-121; VGG-16's head is
    a small 512-256-num_classes classifier after global pooling (15 M parameters, torchvision's vgg16_bn 134 M)."""
    import torchvision.models as tvm

    from robust_ops.models import count_parameters

    for name in ("resnet18", "resnet50", "densenet121"):
        assert count_parameters(build_model(name, 3, 2, 65)) == count_parameters(getattr(tvm, name)(num_classes=2))
    vgg = build_model("vgg16", 3, 2, 224)
    assert [m.out_features for m in vgg.classifier if isinstance(m, torch.nn.Linear)] == [256, 2]
    assert [type(m).__name__ for m in vgg.classifier] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert vgg.classifier[2].p == 0.5  # the head keeps vgg16_bn's dropout rate
    assert round(count_parameters(vgg) / 1e6) == 15
    assert round(count_parameters(tvm.vgg16_bn(num_classes=2)) / 1e6) == 134
    # every parameter, frozen ones too (mutation testing of models: counting those requiring grad survived)
    assert count_parameters(vgg.requires_grad_(False)) == count_parameters(build_model("vgg16", 3, 2, 224))


def test_small_cnn_is_its_documented_architecture():
    """SmallCNN's docstring: (conv-BatchNorm-ReLU, max-pool) x2, conv-BatchNorm-ReLU, global average pooling, linear,
    16, 32 and 64 channels by default; its first max-pool is 3x3/2 with padding 1 (build_model's 3-pixel minimum
    follows from it). Shape tests alone let another pool, a missing BatchNorm or other widths through."""
    model = build_model("small_cnn", 1, 2, 28)
    kinds = [type(m).__name__ for m in (*model.features, model.pool, model.classifier)]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2 + ["Conv2d", "BatchNorm2d", "ReLU",
                                                                         "AdaptiveAvgPool2d", "Linear"]
    assert [m.out_channels for m in model.features if isinstance(m, torch.nn.Conv2d)] == [16, 32, 64]
    first, second = (m for m in model.features if isinstance(m, torch.nn.MaxPool2d))
    assert (first.kernel_size, first.stride, first.padding) == (3, 2, 1) and second.kernel_size == 2


def test_small_cnn_convolutions_and_pools_keep_the_map_size_the_docs_give():
    """SmallCNN's docstring: 3x3 convolutions (padding 1, so only the pools shrink the map) and a 2x2/2 second
    max-pool. (Mutation testing of models: a 1x1 second convolution and a stride-1 second pool survived; both still
    give [N, num_classes] after global pooling.)"""
    model = build_model("small_cnn", 1, 2, 28)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(m.kernel_size, m.stride, m.padding) for m in convs] == [((3, 3), (1, 1), (1, 1))] * 3
    second = [m for m in model.features if isinstance(m, torch.nn.MaxPool2d)][1]
    assert (second.kernel_size, second.stride, second.padding) == (2, 2, 0)
    assert model.features(torch.rand(1, 1, 28, 28)).shape == (1, 64, 7, 7)  # 28 -> 14 -> 7


def test_mlp_defaults_are_arfls_two_moons_model():
    """MLP's docstring: ARFL's 2-10-10-1, which the defaults build, with ReLU hidden layers (the paper names no
    activation; trained two-moons results rest on this one). (Mutation testing of models: another activation and a
    default of two outputs survived here: the tests compared only the Linear layers of an MLP with explicit
    arguments.)"""
    from robust_ops.models import MLP

    model = MLP()
    assert [type(m).__name__ for m in model.net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in model.net[::2]] == [(2, 10), (10, 10), (10, 1)]
    assert model(torch.rand(5, 2)).shape == (5,)
    assert [type(m).__name__ for m in build_model("mlp", 1, 3, 4).net] == ["Linear", "ReLU"] * 2 + ["Linear"]


def test_mlp_flattens_strided_and_channels_last_images():
    """The MLP flattens any layout the attacks and loaders hand it: a view of a channels_last or sliced batch fails
    (mutation testing of models: `.view(len(x), -1)` instead of `.flatten(1)` survived)."""
    model = build_model("mlp", 3, 4, 6)
    x = torch.rand(2, 3, 6, 12)[..., ::2]  # a strided slice
    expected = model(x.contiguous())
    assert torch.equal(model(x), expected)
    assert torch.equal(model(x.contiguous(memory_format=torch.channels_last)), expected)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16", "densenet121"])
def test_layers_are_torchvisions_but_for_the_stem(name):
    """docs/getting-started.md: torchvision architectures whose first convolution takes the dataset's channel count
    (3x3 up to 64 pixels). Every other parameter and buffer has torchvision's name and shape -- VGG-16's features are
    vgg16_bn's, batch norm included, its dropped pools Identity so the indices stay -- and the rebuilt stem keeps
    torchvision's bias or lack of one. (Mutation testing of models: VGG-16 without batch norm, dropped pools deleted,
    a bias in a rebuilt stem, and a 7x7 stem rebuilt for 1 channel only -- 2 channels above 64 pixels kept the
    3-channel one -- survived the shape and parameter-count tests.)"""
    import torchvision.models as tvm
    from torchvision.models.vgg import cfgs, make_layers

    shapes = lambda m, prefix="": {prefix + k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    if name == "vgg16":
        reference, stem, kernels = shapes(make_layers(cfgs["D"], batch_norm=True), "features."), "features.0", (3, 3)
    else:
        stem = "features.conv0" if name == "densenet121" else "conv1"
        reference, kernels = shapes(getattr(tvm, name)(num_classes=2)), (3, 7)
    # VGG-16 at 7x7 keeps two of its five pools (at 28x28 only the last goes, whose index no layer follows)
    for (in_channels, size), kernel in zip(((1, 7 if name == "vgg16" else 28), (2, 65)), kernels):
        model = build_model(name, in_channels, 2, size)
        ours = shapes(model.features, "features.") if name == "vgg16" else shapes(model)
        assert ours == {**reference, f"{stem}.weight": (64, in_channels, kernel, kernel)}, (in_channels, size)
        model.eval()
        with torch.no_grad():
            assert model(torch.rand(1, in_channels, size, size)).shape == (1, 2)


@pytest.mark.parametrize("name,where", [("resnet18", "maxpool"), ("resnet50", "maxpool"), ("vgg16", "features.6"),
                                        ("densenet121", "features.pool0"), ("small_cnn", "features.3")])
def test_mirst_dm_replaces_the_first_max_pool_where_the_docs_say(name, where):
    """docs/getting-started.md: the small-image stems keep the first max-pooling layer, the one MIRST-DM (--dropmax
    first) turns into drop-max pooling: torchvision's 3x3/2 pool of the ResNets and DenseNet-121, VGG-16's first 2x2
    pool. (Mutation testing of models: DenseNet-121's pool0 made Identity survived; replace_maxpool then refused a
    model without max pooling.)"""
    import robust_ops

    model = robust_ops.replace_maxpool(build_model(name, 1, 2, 28))
    drop = model.get_submodule(where)
    assert isinstance(drop, robust_ops.DropMax2d)
    expected = (2, 2, 0) if name == "vgg16" else (3, 2, 1)
    assert (drop.kernel_size, drop.stride, drop.padding) == expected
    assert [n for n, m in model.named_modules() if isinstance(m, robust_ops.DropMax2d)] == [where]


def test_unknown_model_is_named_before_its_arguments_are_checked():
    # (mutation testing of models: without the first check the name was reported after the others, so a typo with an
    # odd argument was an error about the argument)
    for kwargs in (dict(in_channels=0), dict(width=8), dict(image_size=0)):
        # prefixed build_model: as attacks.build's and defenses.build's unknown names are (leftovers, s46)
        with pytest.raises(ValueError, match=r"^build_model: unknown model 'resnet9000'; expected one of resnet18, "
                                             r"resnet50, vgg16, densenet121, small_cnn, mlp$"):
            build_model("resnet9000", **kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_traces_with_torch_fx_as_torchvisions_do(name):
    """A deployed model goes through torch.fx (torchvision's create_feature_extractor, FX quantization) as
    torchvision's models do. The MLP's forward branched on its output's shape (`out.squeeze(1) if out.shape[1] == 1`),
    and symbolic_trace failed with "symbolically traced variables cannot be used as inputs to control flow". The
    branch is on the head's width: a squeeze of a dimension of K > 1 logits, a no-op in torch, is an error in ONNX
    (onnxruntime refused the default exporter's file: "Dimension of input 1 must be 1 instead of 3")."""
    for in_channels, image_size, classes in ((1, 28, 2), (3, 16, 3)):
        model = build_model(name, in_channels, classes, image_size).eval()
        x = torch.rand(2, in_channels, image_size, image_size)
        traced = torch.fx.symbolic_trace(model)
        with torch.no_grad():
            expected = model(x)
            assert expected.shape == ((2,) if name == "mlp" and classes == 2 else (2, classes))
            assert torch.equal(traced(x), expected)
        squeezes = [n for n in traced.graph.nodes if n.target in ("squeeze", torch.squeeze)]
        assert len(squeezes) == (name == "mlp" and classes == 2)
