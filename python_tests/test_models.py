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
    assert pools(build_model("vgg16", 1, 2, 28)) == 4 and pools(build_model("vgg16", 3, 2, 32)) == 5


def test_mlp_on_images_and_on_feature_vectors():
    assert build_model("mlp", 1, 2, 28).net[0].in_features == 784
    model = build_model("mlp", 2, 2, 0)  # two-moons: 2 features, one logit
    assert model.net[0].in_features == 2 and model(torch.rand(5, 2)).shape == (5,)


def test_too_small_for_densenet_is_a_clear_error():
    with pytest.raises(ValueError, match="densenet121 needs images of at least 16x16 pixels, got image_size=8"):
        build_model("densenet121", 1, 2, 8)


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


def test_small_cnn_and_mlp_validate_their_own_arguments():
    from robust_ops.models import MLP, SmallCNN

    with pytest.raises(ValueError, match="SmallCNN: expected num_classes to be an integer >= 2, got 0"):
        SmallCNN(1, 0)
    with pytest.raises(ValueError, match="MLP: expected every hidden width to be an integer >= 1, got 0"):
        MLP(2, 1, hidden=(10, 0))
