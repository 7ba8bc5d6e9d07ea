"""Grad-CAM: where in an image the model looked for the class it predicted.

For a model built by finetune-cli (preprocessing, a `keras.applications`
base, a head), the heat map of class c is Grad-CAM (Selvaraju et al.,
2017) at the base's last spatial feature map A (found automatically: the
last layer of the base whose output is [batch, h, w, channels]):

    weights_k = mean over (h, w) of d logit_c / d A_k
    heat      = relu(sum_k weights_k * A_k), scaled to [0, 1], resized

The logit is the output layer's input to its softmax, so a confident
prediction still has gradients. `explain` writes an overlay per image;
evaluation reports show overlays for their worst mistakes and a few
correct images per class.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from finetune_cli.model import build as model_lib
from finetune_cli.data import pipeline
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError

OVERLAY_SIDE = 256  # longest side of an overlay, in pixels


def feature_layer(base) -> str:
    """The name of the base's last layer with a spatial output."""
    for layer in reversed(base.layers):
        shape = getattr(layer, "output", None)
        shape = getattr(shape, "shape", ())
        if len(shape) == 4 and (shape[1] or 0) > 0 and (shape[2] or 0) > 0:
            return layer.name
    raise ValueError(f"{base.name} has no layer with a spatial (4-D) output")


class GradCam:
    """Grad-CAM heat maps for a model built by `model.build_model`.

    Raises ValueError for a model of another structure (no base inside).
    """

    def __init__(self, model):
        base = model_lib.find_base(model)
        self.layer = feature_layer(base)
        self._inner = keras.Model(
            base.inputs, [base.get_layer(self.layer).output, base.output]
        )
        layers = [
            la for la in model.layers if not isinstance(la, keras.layers.InputLayer)
        ]
        at = layers.index(base)
        self._before, self._head = layers[:at], layers[at + 1 :]
        self._output = model.get_layer(model_lib.OUTPUT_NAME)
        if self._head[-1] is not self._output:
            raise ValueError(f"{model.name} does not end in its output layer")
        self.image_size = (int(model.input_shape[1]), int(model.input_shape[2]))

    def __call__(self, images, classes=None):
        """(heat maps [N, H, W] in [0, 1], probabilities [N, classes]).

        `images` are float 0-255 at the model's size; `classes` the class
        index to explain per image (default: the predicted one).
        """
        x = tf.convert_to_tensor(np.asarray(images, "float32"))
        for layer in self._before:
            x = layer(x, training=False)
        with tf.GradientTape() as tape:
            fmap, h = self._inner(x, training=False)
            for layer in self._head[:-1]:
                h = layer(h, training=False)
            h = tf.cast(h, "float32")
            logits = h @ self._output.kernel + self._output.bias
            probs = tf.nn.softmax(logits)
            if classes is None:
                classes = tf.argmax(logits, axis=-1)
            score = tf.reduce_sum(
                tf.gather(logits, tf.cast(classes, "int32"), axis=1, batch_dims=1)
            )
        grads = tf.cast(tape.gradient(score, fmap), "float32")
        fmap = tf.cast(fmap, "float32")
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(fmap * weights, axis=-1))
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        cam = tf.image.resize(cam[..., None], self.image_size, "bilinear")[..., 0]
        return np.clip(cam.numpy(), 0.0, 1.0), probs.numpy()


def overlay(path: str, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image at `path` (longest side OVERLAY_SIDE) with `heat` on top."""
    import matplotlib

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = OVERLAY_SIDE / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.BILINEAR)
    h = Image.fromarray((heat * 255).astype("uint8")).resize(size, Image.BILINEAR)
    colors = matplotlib.colormaps["jet"](np.asarray(h) / 255.0)[..., :3]
    mixed = (1 - alpha) * np.asarray(im, "float32") + alpha * 255 * colors
    return Image.fromarray(np.clip(mixed, 0, 255).astype("uint8"))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def load_images(paths, image_size) -> np.ndarray:
    """The images as the model sees them; a DataError names unreadable ones."""
    images, bad = [], []
    for path in paths:
        try:
            images.append(np.asarray(pipeline.load_image(path, image_size)))
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            bad.append((path, pipeline.decode_failure(path, e)))
    if bad:
        lines = "\n".join(f"  {p}: {why}" for p, why in bad[:5])
        raise DataError(f"cannot explain unreadable images:\n{lines}")
    return np.stack(images).astype("float32")


def explain_files(cam, labels, paths, out, batch_size: int = 16, progress=None):
    """Write `<out>/<nnnn>-<name>.png` overlays and `<out>/explanations.csv`.

    `cam` is the model's `GradCam`; `progress(done)` is called with the
    number of images done after each batch. The folder appears complete or
    not at all; an existing `out` is refused. Returns the rows written
    (file, predicted, confidence, overlay).
    """
    out = Path(out)
    if out.exists():
        raise ConfigError(
            f"--out {out} already exists; explain does not overwrite. "
            "Choose another folder or remove it."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    rows = []
    try:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            heat, probs = cam(load_images(batch, cam.image_size))
            for i, (path, h, p) in enumerate(zip(batch, heat, probs, strict=True)):
                name = f"{start + i:04d}-{Path(path).stem}.png"
                (tmp / name).write_bytes(png_bytes(overlay(path, h)))
                top = int(p.argmax())
                rows.append([path, labels[top], f"{p[top]:.6f}", name])
            if progress is not None:
                progress(start + len(batch))
        with open(tmp / "explanations.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["file", "predicted", "confidence", "overlay"])
            w.writerows(rows)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


@dataclasses.dataclass
class Overlay:
    """One explained image of an evaluation report."""

    file: str
    true: int
    predicted: int
    confidence: float
    kind: str  # "mistake" or "correct"
    png: bytes


def report_overlays(
    model, files, labels, probs, mistakes: int = 12, per_class: int = 2
) -> list[Overlay]:
    """Grad-CAM overlays for an evaluation report.

    The `mistakes` most confident misclassifications first, then up to
    `per_class` correctly classified images per class (most confident
    first). Empty when `model` has no base to explain (not ours).
    """
    try:
        cam = GradCam(model)
    except ValueError:
        return []
    pred = probs.argmax(axis=1)
    conf = probs[np.arange(len(pred)), pred]
    wrong = np.flatnonzero(pred != labels)
    chosen = [(i, "mistake") for i in wrong[np.argsort(-conf[wrong], kind="stable")]]
    chosen = chosen[:mistakes]
    for c in range(probs.shape[1]):
        right = np.flatnonzero((pred == labels) & (labels == c))
        best = right[np.argsort(-conf[right], kind="stable")][:per_class]
        chosen += [(i, "correct") for i in best]
    out = []
    for start in range(0, len(chosen), 16):
        batch = chosen[start : start + 16]
        paths = [files[i] for i, _ in batch]
        heat, _ = cam(load_images(paths, cam.image_size))
        for (i, kind), h in zip(batch, heat, strict=True):
            out.append(
                Overlay(
                    files[i],
                    int(labels[i]),
                    int(pred[i]),
                    float(conf[i]),
                    kind,
                    png_bytes(overlay(files[i], h)),
                )
            )
    return out


def explain(target_path, files, out=None, batch_size: int = 16, progress=None):
    """`finetune-cli explain`: Grad-CAM overlays for image files.

    `target_path` is a run folder or a .keras model with labels.txt;
    `files` the image files (`prediction.collect_images`). `out` defaults
    to `<run>/explain/<n>`, the first number not taken. Returns
    (out folder, rows).
    """
    from finetune_cli.model.saved import load_model
    from finetune_cli.model.saved import resolve_target

    target = resolve_target(target_path)
    model = load_model(target)
    try:
        cam = GradCam(model)
    except ValueError as e:
        raise ConfigError(
            f"{target.model_path} was not built by finetune-cli (a "
            f"keras.applications base inside), so it has no feature map to "
            f"explain: {e}"
        ) from None
    if out is None:
        root = Path(target.run_dir or target.model_path.parent) / "explain"
        n = 1
        while (root / str(n)).exists():
            n += 1
        out = root / str(n)
    rows = explain_files(cam, target.labels, files, out, batch_size, progress)
    return Path(out), rows
