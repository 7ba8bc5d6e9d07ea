"""The export formats: the table of them and one writer each.

| file | format | loads with |
| --- | --- | --- |
| `model.keras` | native Keras | `keras.saving.load_model(p, safe_mode=True)` |
| `saved_model/` | TensorFlow SavedModel | `tf.saved_model.load(p)` (1) |
| `model*.tflite` (2) | TFLite | the TFLite interpreter (3) |
| `model.onnx` | ONNX (tf2onnx) | onnxruntime; input `pixels` |

(1) signatures `serve` (float pixels [batch, H, W, 3], 0-255) and
`serve_bytes` (encoded JPEG/PNG/BMP/GIF strings [batch], decoded as
training decodes them, EXIF orientation applied); both return
`probabilities`, `class_index`, `label`. (2) `model.tflite`,
`model_float16.tflite`, `model_dynamic.tflite`, `model_int8.tflite`.
(3) int8 takes uint8 pixels and returns uint8 scores (see its quantization
parameters). Every model takes raw RGB pixels in 0-255: preprocessing is
inside.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import keras
import tensorflow as tf

from finetune_cli.data import decode as decode_lib

from finetune_cli.model import saved as runmodel
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.files import atomic_write


FORMATS = ("keras", "saved_model", "tflite", "onnx")


QUANTIZATIONS = ("none", "float16", "dynamic", "int8")


TFLITE_NAMES = {
    "none": "model.tflite",
    "float16": "model_float16.tflite",
    "dynamic": "model_dynamic.tflite",
    "int8": "model_int8.tflite",
}


@dataclasses.dataclass
class Artifact:
    name: str
    format: str
    path: Path
    quantized: bool = False


def _pixels_spec(size):
    return tf.TensorSpec([None, size[0], size[1], 3], tf.float32, name="pixels")


def write_keras(model, path: Path) -> None:
    model.save(path)


def write_saved_model(model, path: Path, labels: list[str], thresholds=None) -> None:
    """SavedModel with a pixels signature and an encoded-bytes signature.

    With `thresholds` (a multi-label model's, in output order) both also
    return `label_mask` [batch, labels]: each label at or above its
    threshold (the image's label set)."""

    size = runmodel.model_image_size(model)
    label_table = tf.constant(labels)

    def outputs(probs):
        index = tf.argmax(probs, axis=-1, output_type=tf.int32)
        out = {
            "probabilities": probs,
            "class_index": index,
            "label": tf.gather(label_table, index),
        }
        if thresholds is not None:
            out["label_mask"] = probs >= tf.constant(thresholds, probs.dtype)
        return out

    def serve(pixels):
        return outputs(model(pixels, training=False))

    def decode(raw):
        # The decoder training used, EXIF orientation included (TensorFlow
        # ops only, so it is part of the exported graph).
        return tf.image.resize(decode_lib.decode(raw), size)

    def serve_bytes(image_bytes):
        pixels = tf.map_fn(
            decode,
            image_bytes,
            fn_output_signature=tf.TensorSpec([size[0], size[1], 3], tf.float32),
        )
        return outputs(model(pixels, training=False))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=[_pixels_spec(size)])
    archive.add_endpoint(
        "serve_bytes",
        serve_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        archive.write_out(str(path), verbose=False)


def _concrete(model):
    size = runmodel.model_image_size(model)

    @tf.function(input_signature=[_pixels_spec(size)])
    def probabilities(pixels):
        return model(pixels, training=False)

    return probabilities


def write_tflite(model, path: Path, quantize: str, calibration=None) -> None:
    import tempfile

    # The converter reads variables frozen from a plain SavedModel (a
    # concrete function of a Keras 3 model leaves READ_VARIABLE ops).
    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export(tmp, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        _configure_tflite(converter, quantize, calibration)
        flat = converter.convert()
    atomic_write(path, flat)


def _configure_tflite(converter, quantize: str, calibration) -> None:
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantize == "int8":
        if calibration is None or len(calibration) == 0:
            raise DataError(
                "int8 quantization needs calibration images "
                "(the run's training data or --data)"
            )
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [calibration[i : i + 1]] for i in range(len(calibration))
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # Pixels 0-255 are exactly uint8: the input needs no rescaling.
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8


def write_onnx(model, path: Path, opset: int) -> None:
    try:
        import tf2onnx
    except ImportError:
        raise ConfigError(
            "ONNX export needs the optional onnx extra: "
            "pip install 'finetune-cli[onnx]' (tf2onnx, onnxruntime)"
        ) from None
    fn = _concrete(model)
    size = runmodel.model_image_size(model)
    proto, _ = tf2onnx.convert.from_function(
        fn, input_signature=[_pixels_spec(size)], opset=opset
    )
    atomic_write(path, proto.SerializeToString())
