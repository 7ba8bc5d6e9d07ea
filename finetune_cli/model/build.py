"""The model builder: raw pixels -> preprocessing -> base -> head -> softmax.

The built model takes float32 pixels in 0-255, shape [batch, H, W, 3], and
returns class probabilities. The application's own `preprocess_input` is
expressed with built-in Keras layers (Rescaling, Normalization, a fixed 1x1
convolution for the RGB->BGR flip), so a saved `.keras` file takes raw
pixels and loads in safe mode with no code of ours.

Only Keras APIs are used here, so the same code runs on any Keras backend.
"""

from __future__ import annotations

import re
import warnings

import keras

from finetune_cli.model import applications
from finetune_cli.errors import did_you_mean
from finetune_cli.errors import ConfigError

PREPROCESS_NAME = "preprocess"
OUTPUT_NAME = "predictions"

# ImageNet statistics used by keras.applications.imagenet_utils.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def build_preprocessing(app: applications.Application, name=PREPROCESS_NAME):
    """The application's `preprocess_input` as a Keras Sequential of built-ins.

    Returns None for applications that rescale inside themselves.
    """
    import numpy as np

    if app.preprocess == "none":
        return None
    if app.preprocess == "tf":
        layers = [keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32")]
    elif app.preprocess == "torch":
        layers = [
            keras.layers.Rescaling(1 / 255.0, dtype="float32"),
            keras.layers.Normalization(
                mean=list(_TORCH_MEAN),
                variance=[s * s for s in _TORCH_STD],
                dtype="float32",
            ),
        ]
    elif app.preprocess == "caffe":
        # out[..., i] = in[..., 2 - i] - mean_bgr[i]: a fixed 1x1 convolution.
        flip = np.zeros((1, 1, 3, 3), dtype="float32")
        for i in range(3):
            flip[0, 0, 2 - i, i] = 1.0
        conv = keras.layers.Conv2D(
            3,
            1,
            kernel_initializer=keras.initializers.Constant(flip),
            bias_initializer=keras.initializers.Constant([-m for m in _CAFFE_MEAN_BGR]),
            trainable=False,
            dtype="float32",
            name="rgb_to_bgr_minus_mean",
        )
        layers = [conv]
    else:  # pragma: no cover - the registry only holds the modes above
        raise ValueError(f"unknown preprocess mode {app.preprocess!r}")
    seq = keras.Sequential(layers, name=name)
    seq.trainable = False
    return seq


def build_base(model_cfg, image_size):
    """The application without its top, pooled to a feature vector.

    Raises:
        ConfigError: weights file missing or not matching the architecture,
            ImageNet download failing, or options the constructor rejects.
    """
    app = applications.get(model_cfg.name)
    weights = model_cfg.weights
    if weights == "none":
        keras_weights = None
    elif weights == "imagenet":
        keras_weights = "imagenet"
    else:
        from finetune_cli import remote
        from finetune_cli.model import weights as weights_lib

        # A weights file on object storage: a local copy (kept, by size).
        keras_weights = remote.fetch(weights)
        weights_lib.check_weights(keras_weights)
    h, w = image_size
    check_options(app, model_cfg.options)
    try:
        # A weights file is loaded below, by us, so that its failures are
        # told apart from the constructor's.
        base = app.constructor()(
            include_top=False,
            weights="imagenet" if keras_weights == "imagenet" else None,
            input_shape=(h, w, 3),
            pooling=model_cfg.pooling,
            **model_cfg.options,
        )
    except TypeError as e:
        raise ConfigError(
            f"model.options: {app.name} does not accept these options: {e}. "
            f"Received: {model_cfg.options}"
        ) from None
    except Exception as e:  # noqa: BLE001 - Keras raises many kinds here
        if keras_weights == "imagenet":
            raise ConfigError(
                f"model.weights: could not load the ImageNet weights of "
                f"{app.name} ({_first_line(e)}). They are downloaded on first "
                "use; on a machine without internet, set model.weights to a "
                "local .h5 file."
            ) from None
        raise ConfigError(
            f"model: {app.name} rejected the config: {_first_line(e)}"
        ) from None
    if keras_weights not in (None, "imagenet"):
        try:
            # Keras only warns when it leaves part of a model at its random
            # initialisation: for us that is a file that does not fit.
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                base.load_weights(keras_weights)
        except Exception as e:  # noqa: BLE001 - any failure: it does not fit
            raise ConfigError(
                f"model.weights: {weights} does not fit {app.name} "
                f"(include_top=False, input {h}x{w}, options "
                f"{model_cfg.options}): {_first_line(e)}"
            ) from None
    if model_cfg.bn_momentum is not None:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = model_cfg.bn_momentum
    return base


def check_options(app, options: dict) -> None:
    """Check `model.options` against the application constructor's own
    signature: known names, and values of the type of each default.

    Raises:
        ConfigError: naming the option, what it expects and the value.
    """
    import inspect

    from finetune_cli.errors import short

    params = inspect.signature(app.constructor()).parameters
    reserved = {
        "weights",
        "include_top",
        "input_shape",
        "pooling",
        "classes",
        "input_tensor",
    }
    known = [p for p in params if p not in reserved]
    for key, value in options.items():
        if key not in params:
            raise ConfigError(
                f"model.options.{key}: {app.name} has no such option"
                f"{did_you_mean(key, known)}; its options: {', '.join(known)}."
                f" Received: {key}={short(value)}"
            )
        default = params[key].default
        if default is None or default is inspect.Parameter.empty:
            continue
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            want = "a number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ConfigError(
                f"model.options.{key}: expected {want} (the default is "
                f"{default!r}). Received: {key}={short(value)}"
            )


def is_multi_label(model) -> bool:
    """Whether a model of ours answers label sets: its output layer is a
    sigmoid per label (a softmax answers one class)."""
    try:
        layer = model.get_layer(OUTPUT_NAME)
    except ValueError:
        layer = model.layers[-1]
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "") == "sigmoid"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def build_head(head_cfg, num_classes: int, multi_label: bool = False):
    """The head layers (from the config) and the float32 output: softmax
    (one class an image), or sigmoid per label for `multi_label`."""

    layers = []
    for i, spec in enumerate(head_cfg):
        if spec.type == "dense":
            reg = keras.regularizers.L2(spec.l2) if spec.l2 else None
            layers.append(
                keras.layers.Dense(
                    spec.units,
                    activation=spec.activation or "relu",
                    kernel_regularizer=reg,
                    name=f"head_{i}_dense",
                )
            )
        elif spec.type == "dropout":
            layers.append(keras.layers.Dropout(spec.rate, name=f"head_{i}_dropout"))
        elif spec.type == "batchnorm":
            layers.append(keras.layers.BatchNormalization(name=f"head_{i}_batchnorm"))
    # float32 output: softmax under float16 loses too much precision.
    layers.append(
        keras.layers.Dense(
            num_classes,
            activation="sigmoid" if multi_label else "softmax",
            dtype="float32",
            name=OUTPUT_NAME,
        )
    )
    return layers


def build_model(cfg, num_classes: int):
    """The full classifier for a config; returns (model, base)."""

    app = applications.get(cfg.model.name)
    h, w = cfg.data.image_size
    base = build_base(cfg.model, (h, w))
    inputs = keras.Input((h, w, 3), name="image", dtype="float32")
    x = inputs
    preprocess = build_preprocessing(app)
    if preprocess is not None:
        x = preprocess(x)
    # training=False as the Keras guide does. Note that Keras 3 overrides it
    # with the outer `training` during fit (keras-team/keras#20285), so the
    # BN policy is enforced through `trainable` in `apply_trainable`.
    x = base(x, training=False)
    for layer in build_head(cfg.head, num_classes, cfg.task == "multi_label"):
        x = layer(x)
    model = keras.Model(inputs, x, name=f"{app.name.lower()}_classifier")
    return model, base


def find_preprocessing(model):
    """The preprocessing layer in front of the base (None if the
    application needs none)."""
    names = [la.name for la in model.layers]
    return model.get_layer(PREPROCESS_NAME) if PREPROCESS_NAME in names else None


def find_base(model):
    """The application sub-model inside a model built by `build_model`."""

    for layer in model.layers:
        if isinstance(layer, keras.Model) and layer.name != PREPROCESS_NAME:
            return layer
    raise ValueError(f"no base model found in {model.name}")


def base_layers(base):
    """The base's layers that `top: N` counts (every layer but the input)."""

    return [la for la in base.layers if not isinstance(la, keras.layers.InputLayer)]


def select_layers(base, trainable, key: str) -> list[str]:
    """Names of the base layers a phase's `trainable` spec unfreezes.

    Args:
        trainable: "none", "all" or a `TrainableLayers` config.
        key: the config key path, for error messages.

    Raises:
        ConfigError: a missing layer name, a too-large N or a regex that
            matches nothing, naming `key`.
    """
    layers = base_layers(base)
    names = [la.name for la in layers]
    if trainable == "none":
        return []
    if trainable == "all":
        return names
    if trainable.top is not None:
        if trainable.top > len(names):
            raise ConfigError(
                f"{key}.top: {base.name} has {len(names)} layers. "
                f"Received: top={trainable.top}"
            )
        return names[-trainable.top :]
    if trainable.from_layer is not None:
        if trainable.from_layer not in names:
            raise ConfigError(
                f"{key}.from_layer: no layer named {trainable.from_layer!r} "
                f"in {base.name}{did_you_mean(trainable.from_layer, names)}. "
                f"Received: from_layer={trainable.from_layer!r}"
            )
        return names[names.index(trainable.from_layer) :]
    pattern = re.compile(trainable.regex)
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise ConfigError(
            f"{key}.regex: matches no layer of {base.name} (e.g. "
            f"{', '.join(names[-3:])}). Received: regex={trainable.regex!r}"
        )
    return chosen


def apply_trainable(model, base, layer_names, batchnorm: str, sync: bool = False):
    """Set what trains for a phase: the named base layers and the head.

    Under `batchnorm: frozen`, BatchNormalization layers of the base stay
    non-trainable, which in Keras 3 also keeps them in inference mode (moving
    statistics used and never updated). With `sync` (several replicas), the
    BatchNormalization layers that train compute their batch statistics over
    the global batch, not each replica's slice. The caller must recompile.
    """

    chosen = set(layer_names)
    # Setting a container's flag sets all its sublayers: do it first.
    base.trainable = bool(chosen)
    if chosen:
        for layer in base_layers(base):
            train = layer.name in chosen
            if batchnorm == "frozen" and isinstance(
                layer, keras.layers.BatchNormalization
            ):
                train = False
            layer.trainable = train
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = sync and train
    for layer in model.layers:
        if layer is base or layer.name == PREPROCESS_NAME:
            continue
        if not isinstance(layer, keras.layers.InputLayer):
            layer.trainable = True


def count_params(weights) -> int:
    import math

    return int(sum(math.prod(w.shape) for w in weights))
