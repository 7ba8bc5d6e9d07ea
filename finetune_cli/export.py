"""Export: deployable artifacts, each checked against the original model.

`export(...)` writes into one folder (default `RUN_DIR/export/`), built in a
temporary folder and renamed into place at the end, never over an existing
export unless `force`:

| file | format | loads with |
| --- | --- | --- |
| `model.keras` | native Keras | `keras.saving.load_model(p, safe_mode=True)` |
| `saved_model/` | TensorFlow SavedModel | `tf.saved_model.load(p)` (1) |
| `model*.tflite` (2) | TFLite | the TFLite interpreter (3) |
| `model.onnx` | ONNX (tf2onnx) | onnxruntime; input `pixels`, output probabilities |
| `labels.txt`, `metadata.json` | | class names; input, preprocessing, run, versions |
| `export_report.json` | | the parity check below |

(1) signatures `serve` (float pixels [batch, H, W, 3], 0-255) and
`serve_bytes` (encoded JPEG/PNG/BMP/GIF strings [batch]); both return
`probabilities`, `class_index`, `label`. (2) `model.tflite`,
`model_float16.tflite`, `model_dynamic.tflite`, `model_int8.tflite`.
(3) int8 takes uint8 pixels and returns uint8 scores (see its quantization
parameters).

Every model takes raw RGB pixels in 0-255: preprocessing is inside.

Parity check (after every export unless disabled): N validation images go
through the original Keras model and through each artifact in its own
runtime. Reported per artifact: max absolute difference of probabilities,
top-1 agreement, accuracy, file size, mean latency per image (batch 1).
It fails (GateError, exit 4) when a float artifact differs by more than
`tolerance` (1e-4), or when a quantized one's accuracy on the labelled
images is more than `max_accuracy_drop` (0.02) below the Keras model's on
the same images. Quantization moves probabilities and flips a few
uncertain images either way, so what matters is whether it costs accuracy;
`min_agreement` adds a top-1 agreement gate where that is wanted too. With
fewer than `MIN_GATE_IMAGES` images the accuracy gate moves in steps too
coarse to mean much, and the report says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from finetune_cli import data as data_lib
from finetune_cli import pipeline
from finetune_cli import evaluation
from finetune_cli import runmodel
from finetune_cli import tracking
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.errors import GateError
from finetune_cli.rundir import atomic_write
from finetune_cli.rundir import write_json

FORMATS = ("keras", "saved_model", "tflite", "onnx")
# Images for a 2-point accuracy gate to allow 5 flips rather than 1.
MIN_GATE_IMAGES = 250
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


def parse_list(value: str, allowed, option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        from finetune_cli.errors import did_you_mean

        hint = did_you_mean(bad[0], allowed) if bad else ""
        raise ConfigError(
            f"{option}: expected a comma-separated list of "
            f"{', '.join(allowed)}{hint}. Received: {value!r}"
        )
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def _pixels_spec(size):
    return tf.TensorSpec([None, size[0], size[1], 3], tf.float32, name="pixels")


def write_keras(model, path: Path) -> None:
    model.save(path)


def write_saved_model(model, path: Path, labels: list[str]) -> None:
    """SavedModel with a pixels signature and an encoded-bytes signature."""

    size = runmodel.model_image_size(model)
    label_table = tf.constant(labels)

    def outputs(probs):
        index = tf.argmax(probs, axis=-1, output_type=tf.int32)
        return {
            "probabilities": probs,
            "class_index": index,
            "label": tf.gather(label_table, index),
        }

    def serve(pixels):
        return outputs(model(pixels, training=False))

    def decode(raw):
        image = tf.io.decode_image(raw, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return tf.image.resize(image, size)

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


# --------------------------------------------------------------------------
# Runtimes (each artifact in its own, none of our code)
# --------------------------------------------------------------------------


def _tflite_interpreter(path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Interpreter(model_path=str(path))


def runner_for(artifact: Artifact):
    """A function: float pixels [1, H, W, 3] -> probabilities [1, C]."""
    if artifact.format == "keras":
        m = keras.saving.load_model(artifact.path, compile=False, safe_mode=True)
        return lambda x: np.asarray(m.predict_on_batch(x))
    if artifact.format == "saved_model":
        loaded = tf.saved_model.load(str(artifact.path))
        serve = loaded.signatures["serve"]
        return lambda x: serve(pixels=tf.constant(x))["probabilities"].numpy()
    if artifact.format == "tflite":
        it = _tflite_interpreter(artifact.path)
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]

        def run(x):
            if inp["dtype"] == np.uint8:
                x = np.clip(np.round(x), 0, 255).astype(np.uint8)
            it.set_tensor(inp["index"], x.astype(inp["dtype"]))
            it.invoke()
            y = it.get_tensor(out["index"])
            if out["dtype"] in (np.uint8, np.int8):
                scale, zero = out["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            return y

        return run
    if artifact.format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(
            str(artifact.path), providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x.astype(np.float32)})[0]
    raise ValueError(artifact.format)


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def check_parity(
    reference,
    artifacts,
    images,
    labels,
    *,
    tolerance=1e-4,
    max_accuracy_drop=0.02,
    min_agreement=None,
) -> dict:
    """Run every artifact on `images` and compare with `reference` (Keras).

    `labels` (model indices) may be None: quantized artifacts are then
    gated on top-1 agreement (`min_agreement`, 0.97 when not given).
    """
    ref = np.concatenate(
        [
            np.asarray(reference(images[i : i + 1], training=False))
            for i in range(len(images))
        ]
    )
    rows, failures, notes = [], [], []
    n = len(images)
    ref_acc = float(np.mean(ref.argmax(1) == labels)) if labels is not None else None
    if labels is None and min_agreement is None:
        min_agreement = 0.97
    quantized = any(a.quantized for a in artifacts)
    if quantized and labels is not None and n < MIN_GATE_IMAGES:
        notes.append(
            f"only {n} labelled images: one image is {1 / n:.3f} of accuracy, "
            f"so the {max_accuracy_drop:g} drop gate allows "
            f"{int(max_accuracy_drop * n + 1e-9)} more mistake(s); "
            f"--parity-images {MIN_GATE_IMAGES} (or more validation images) "
            "makes it finer"
        )
    for art in artifacts:
        run = runner_for(art)
        run(images[:1])  # warm-up, not timed
        outs, t0 = [], time.perf_counter()
        for i in range(len(images)):
            outs.append(np.asarray(run(images[i : i + 1]), dtype=np.float64))
        latency = (time.perf_counter() - t0) / len(images) * 1000
        probs = np.concatenate(outs)
        diff = float(np.abs(probs - ref).max())
        agree = float(np.mean(probs.argmax(1) == ref.argmax(1)))
        row = {
            "artifact": art.name,
            "format": art.format,
            "path": art.path.name,
            "quantized": art.quantized,
            "max_abs_diff": diff,
            "top1_agreement": agree,
            "accuracy": (
                float(np.mean(probs.argmax(1) == labels))
                if labels is not None
                else None
            ),
            "size_bytes": size_of(art.path),
            "latency_ms": latency,
        }
        if art.quantized:
            row["passed"] = True
            if labels is not None:
                drop = ref_acc - row["accuracy"]
                row["accuracy_drop"] = drop
                if drop > max_accuracy_drop + 1e-9:
                    row["passed"] = False
                    failures.append(
                        f"{art.name}: accuracy {row['accuracy']:.4f} is "
                        f"{drop:.4f} below the Keras model's {ref_acc:.4f} on "
                        f"{n} images (allowed: --max-accuracy-drop "
                        f"{max_accuracy_drop:g})"
                    )
            if min_agreement is not None and agree < min_agreement:
                row["passed"] = False
                failures.append(
                    f"{art.name}: top-1 agreement with the Keras model "
                    f"{agree:.4f} < {min_agreement:g} on {n} images (allowed: "
                    "--min-agreement)"
                )
        else:
            row["passed"] = diff <= tolerance
            if not row["passed"]:
                failures.append(
                    f"{art.name}: max probability difference {diff:.2e} > "
                    f"{tolerance:g} (allowed: --tolerance)"
                )
        rows.append(row)
    return {
        "images": int(len(images)),
        "reference_accuracy": ref_acc,
        "tolerance": tolerance,
        "max_accuracy_drop": max_accuracy_drop,
        "min_agreement": min_agreement,
        "artifacts": rows,
        "notes": notes,
        "failures": failures,
        "passed": not failures,
    }


# --------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    artifacts: list[Artifact]
    report: Optional[dict]


def _images(samples, size, limit: int, seed: int):
    rng = np.random.default_rng(seed)
    if len(samples) > limit:
        idx = sorted(rng.choice(len(samples), limit, replace=False))
        samples = [samples[i] for i in idx]
    x = np.stack([np.asarray(pipeline.load_image(p, size)) for p, _ in samples])
    return x.astype(np.float32), np.array([lb for _, lb in samples])


def export(
    target_path,
    *,
    formats=("keras", "saved_model", "tflite"),
    quantize=("none",),
    out=None,
    force=False,
    data=None,
    parity_images=MIN_GATE_IMAGES,
    calibration_images=128,
    opset=17,
    tolerance=1e-4,
    max_accuracy_drop=0.02,
    min_agreement=None,
    check=True,
    progress=None,
    warn=None,
) -> ExportResult:
    """Export a run (its best.keras) or a .keras model; see the module doc."""
    target = runmodel.resolve_target(target_path)
    if "onnx" in formats:
        try:
            import onnxruntime  # noqa: F401 - only checking it is there
            import tf2onnx  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--format onnx needs the optional onnx extra: "
                "pip install 'finetune-cli[onnx]' (tf2onnx, onnxruntime)"
            ) from None
    base_dir = target.run_dir or target.model_path.parent
    out = Path(out) if out is not None else Path(base_dir) / "export"
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"{out} already exists; pass --force to replace it "
            "or --out to choose another folder"
        )
    needs_data = check or "int8" in quantize
    val = train = None
    if needs_data:
        val, train = _data_for(target, data)
    model = runmodel.load_model(target)
    size = runmodel.model_image_size(model)
    say = progress or (lambda msg: None)

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    artifacts: list[Artifact] = []
    try:
        if "keras" in formats:
            say("writing model.keras")
            write_keras(model, tmp / "model.keras")
            artifacts.append(Artifact("keras", "keras", tmp / "model.keras"))
        if "saved_model" in formats:
            say("writing saved_model/")
            write_saved_model(model, tmp / "saved_model", target.labels)
            artifacts.append(
                Artifact("saved_model", "saved_model", tmp / "saved_model")
            )
        if "tflite" in formats:
            calib = None
            if "int8" in quantize:
                calib, _ = _images(train, size, calibration_images, seed=1)
            for q in quantize:
                say(f"writing {TFLITE_NAMES[q]}")
                write_tflite(model, tmp / TFLITE_NAMES[q], q, calib)
                artifacts.append(
                    Artifact(
                        "tflite" + ("" if q == "none" else f"_{q}"),
                        "tflite",
                        tmp / TFLITE_NAMES[q],
                        quantized=q != "none",
                    )
                )
        if "onnx" in formats:
            say("writing model.onnx")
            write_onnx(model, tmp / "model.onnx", opset)
            artifacts.append(Artifact("onnx", "onnx", tmp / "model.onnx"))
        atomic_write(tmp / "labels.txt", "\n".join(target.labels) + "\n")
        write_json(tmp / "metadata.json", metadata(target, model, artifacts))
        report = None
        if check:
            say(f"parity check on {min(parity_images, len(val))} images")
            images, labels = _images(val, size, parity_images, seed=0)
            report = check_parity(
                model,
                artifacts,
                images,
                labels,
                tolerance=tolerance,
                max_accuracy_drop=max_accuracy_drop,
                min_agreement=min_agreement,
            )
            write_json(tmp / "export_report.json", report)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    arts = [dataclasses.replace(a, path=out / a.path.name) for a in artifacts]
    if report is not None:
        for row in report["artifacts"]:
            row["path"] = str(out / row["path"])
    result = ExportResult(out, arts, report)
    if target.run_dir is not None:
        _track(result, target.run_dir, warn)
    return result


def _track(result: ExportResult, run_dir, warn) -> None:
    """Attach the export folder to the run's MLflow run, if it has one."""
    tracking.attach(
        run_dir,
        result.out_dir,
        f"export/{result.out_dir.name}",
        warn=warn,
        tags={"finetune.export": str(result.out_dir)},
    )


def _data_for(target, data):
    """(validation samples, training samples) with model label indices."""
    if data is not None:
        pairs, _, _ = evaluation.resolve_data(target, data=data, split="val")
        samples = evaluation.align_labels(pairs, target.labels)
        return samples, samples
    if target.run_dir is None or not (target.run_dir / "config.yaml").is_file():
        raise ConfigError(
            "the parity check and int8 calibration need images: "
            "pass --data DIR|CSV (or export a run folder)"
        )
    from finetune_cli import config as config_lib
    from finetune_cli import split as split_lib

    # The run's recorded files (a parity check needs images, not exactly
    # these: any that vanished are simply not used).
    index = split_lib.load(target.run_dir, ["val", "train"], allow_missing=True)
    if index is None:
        cfg = config_lib.load_config(target.run_dir / "config.yaml")
        index = data_lib.index_data(cfg.data, cfg.experiment.seed)
    to_model = lambda split: evaluation.align_labels(  # noqa: E731
        [(p, index.class_names[lb]) for p, lb in index.splits[split]], target.labels
    )
    return to_model("val"), to_model("train")


def metadata(target, model, artifacts) -> dict:
    from finetune_cli import __version__

    h, w = runmodel.model_image_size(model)
    run_metrics = None
    preprocess = None
    if target.run_dir is not None:
        mpath = target.run_dir / "metrics.json"
        if mpath.is_file():
            run_metrics = json.loads(mpath.read_text())
        cpath = target.run_dir / "config.yaml"
        if cpath.is_file():
            from finetune_cli import applications
            from finetune_cli import config as config_lib

            # Through the schema, like every other reader of a config.
            cfg = config_lib.load_config(cpath)
            app = applications.get(cfg.model.name)
            preprocess = {
                "application": app.name,
                "mode": app.preprocess,
                "inside_model": True,
            }
    return {
        "class_names": target.labels,
        "input": {
            "shape": [None, h, w, 3],
            "dtype": "float32",
            "range": [0, 255],
            "color": "RGB",
            "note": "raw pixels; preprocessing is inside the model",
        },
        "output": {"probabilities": [None, len(target.labels)]},
        "preprocessing": preprocess,
        "source": {
            # The files themselves, not through the moving `latest` link.
            "model": str(target.model_path.resolve()),
            "run": str(target.run_dir.resolve()) if target.run_dir else None,
            "metrics": run_metrics,
        },
        "artifacts": [
            {
                "name": a.name,
                "format": a.format,
                "file": a.path.name,
                "quantized": a.quantized,
            }
            for a in artifacts
        ],
        "versions": {
            "finetune_cli": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    }


def raise_on_failures(report: dict) -> None:
    if report and report["failures"]:
        raise GateError("parity check failed: " + "; ".join(report["failures"]))
