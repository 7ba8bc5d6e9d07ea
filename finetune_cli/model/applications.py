"""Registry of the `keras.applications` image classifiers we can fine-tune.

A plain dict from the name users write in `model.name` to what we need to know
about it, plus one lookup function. Nothing here imports Keras, so config
validation stays instant; `constructor()` imports lazily.

`preprocess` is the application's own `preprocess_input` mode:
  - "tf":    x / 127.5 - 1
  - "torch": x / 255, then per-channel ImageNet mean/std
  - "caffe": RGB -> BGR, then subtract the ImageNet BGR mean
  - "none":  the application rescales inside itself (EfficientNet, ConvNeXt,
             MobileNetV3, EfficientNetV2 with include_preprocessing=True)
"""

from __future__ import annotations

import dataclasses

from finetune_cli.errors import did_you_mean


@dataclasses.dataclass(frozen=True)
class Application:
    name: str
    module: str
    preprocess: str
    default_size: int
    min_size: int = 32
    # NASNet only accepts its default size together with ImageNet weights.
    imagenet_fixed_size: bool = False

    def constructor(self):
        """The `keras.applications` constructor (imports Keras)."""
        import keras

        return getattr(keras.applications, self.name)

    def preprocess_input(self):
        """The application's own `preprocess_input` (imports Keras)."""
        import keras

        return getattr(keras.applications, self.module).preprocess_input


def _family(module, preprocess, sizes, min_size=32, **kwargs):
    return {
        name: Application(name, module, preprocess, size, min_size, **kwargs)
        for name, size in sizes.items()
    }


APPLICATIONS: dict[str, Application] = {
    **_family("vgg16", "caffe", {"VGG16": 224}),
    **_family("vgg19", "caffe", {"VGG19": 224}),
    **_family("resnet", "caffe", {"ResNet50": 224, "ResNet101": 224, "ResNet152": 224}),
    **_family(
        "resnet_v2",
        "tf",
        {"ResNet50V2": 224, "ResNet101V2": 224, "ResNet152V2": 224},
    ),
    **_family("mobilenet", "tf", {"MobileNet": 224}),
    **_family("mobilenet_v2", "tf", {"MobileNetV2": 224}),
    **_family(
        "mobilenet_v3",
        "none",
        {"MobileNetV3Small": 224, "MobileNetV3Large": 224},
    ),
    **_family(
        "efficientnet",
        "none",
        {
            "EfficientNetB0": 224,
            "EfficientNetB1": 240,
            "EfficientNetB2": 260,
            "EfficientNetB3": 300,
            "EfficientNetB4": 380,
            "EfficientNetB5": 456,
            "EfficientNetB6": 528,
            "EfficientNetB7": 600,
        },
    ),
    **_family(
        "efficientnet_v2",
        "none",
        {
            "EfficientNetV2B0": 224,
            "EfficientNetV2B1": 240,
            "EfficientNetV2B2": 260,
            "EfficientNetV2B3": 300,
            "EfficientNetV2S": 384,
            "EfficientNetV2M": 480,
            "EfficientNetV2L": 480,
        },
    ),
    **_family(
        "densenet",
        "torch",
        {"DenseNet121": 224, "DenseNet169": 224, "DenseNet201": 224},
    ),
    **_family("xception", "tf", {"Xception": 299}, min_size=71),
    **_family("inception_v3", "tf", {"InceptionV3": 299}, min_size=75),
    **_family("inception_resnet_v2", "tf", {"InceptionResNetV2": 299}, min_size=75),
    **_family(
        "convnext",
        "none",
        {
            "ConvNeXtTiny": 224,
            "ConvNeXtSmall": 224,
            "ConvNeXtBase": 224,
            "ConvNeXtLarge": 224,
            "ConvNeXtXLarge": 224,
        },
    ),
    **_family(
        "nasnet",
        "tf",
        {"NASNetMobile": 224, "NASNetLarge": 331},
        imagenet_fixed_size=True,
    ),
}


def get(name: str) -> Application:
    """Look up an application by name, case-insensitively.

    Raises:
        KeyError: with the list of known names and a "did you mean" hint.
    """
    for key, app in APPLICATIONS.items():
        if key.lower() == name.lower():
            return app
    raise KeyError(
        f"unknown application{did_you_mean(name, APPLICATIONS)}; expected one of "
        f"{', '.join(APPLICATIONS)}. Received: {name!r}"
    )
