import numpy as np
import pytest

from finetune_cli.model import applications
from finetune_cli.model.build import build_preprocessing


def test_lookup_is_case_insensitive_and_hints():
    assert applications.get("mobilenetv2").name == "MobileNetV2"
    with pytest.raises(KeyError, match="did you mean 'ResNet50'"):
        applications.get("Resnet-50")


def test_every_entry_is_a_real_keras_application():
    import keras

    for name, app in applications.APPLICATIONS.items():
        module = getattr(keras.applications, app.module)
        assert callable(app.constructor()), name
        assert callable(module.preprocess_input), name
        assert app.min_size <= app.default_size


@pytest.mark.parametrize(
    "name", ["MobileNetV2", "DenseNet121", "ResNet50", "VGG16", "InceptionV3"]
)
def test_preprocessing_layers_equal_preprocess_input(name):
    app = applications.get(name)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 9, 7, 3)).astype("float32")
    expected = app.preprocess_input()(pixels.copy())
    got = np.asarray(build_preprocessing(app)(pixels))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_applications_with_own_rescaling_need_no_layer():
    assert build_preprocessing(applications.get("EfficientNetB0")) is None
    assert build_preprocessing(applications.get("ConvNeXtTiny")) is None
