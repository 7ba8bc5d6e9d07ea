"""The parity check: every exported artifact against the Keras model.

N validation images go through the original Keras model and through each
artifact in its own runtime (`runner_for`). Reported per artifact: max
absolute difference of probabilities, top-1 agreement, accuracy, file size,
mean latency per image (batch 1). A float artifact fails when its
difference exceeds the tolerance; a quantized one when its accuracy falls
more than the allowed drop (or, when asked, its agreement is too low);
`raise_on_failures` turns failures into a GateError (exit 4).

A multi-label model (`thresholds` given) is compared on label sets: the
agreement is the share of images whose set (every label at or above its
threshold) is the Keras model's, and the accuracy the share whose set is
the true one (subset accuracy); the probability difference is checked
as for any model.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from finetune_cli.errors import GateError
from finetune_cli.deploy.formats import Artifact


# Images for a 2-point accuracy gate to allow 5 flips rather than 1.
MIN_GATE_IMAGES = 250


def tflite_interpreter(path):
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
        return tflite_runner(artifact.path)
    if artifact.format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(
            str(artifact.path), providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x.astype(np.float32)})[0]
    raise ValueError(artifact.format)


def tflite_runner(path, batch: int | None = None):
    """float pixels [n, H, W, 3] -> probabilities through a TFLite model:
    batch 1 as converted, or `batch` images a call (a shorter last batch is
    padded). int8 models take uint8 pixels and give dequantised scores."""
    it = tflite_interpreter(path)
    if batch is not None:
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]

    def run(x):
        n = len(x)
        if batch is not None and n < batch:
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        if inp["dtype"] == np.uint8:
            x = np.clip(np.round(x), 0, 255).astype(np.uint8)
        it.set_tensor(inp["index"], x.astype(inp["dtype"]))
        it.invoke()
        y = it.get_tensor(out["index"])
        if out["dtype"] in (np.uint8, np.int8):
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y[:n]

    return run


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
    thresholds=None,
) -> dict:
    """Run every artifact on `images` and compare with `reference` (Keras).

    `labels` (model indices, or multi-hot rows with `thresholds`) may be
    None: quantized artifacts are then gated on top-1 (label set)
    agreement (`min_agreement`, 0.97 when not given).
    """

    def answers(probs):
        if thresholds is None:
            return probs.argmax(1)
        return probs >= np.asarray(thresholds)[None, :]

    def same(a, b) -> np.ndarray:
        a, b = np.asarray(a), np.asarray(b)
        return np.all(a == b, axis=1) if a.ndim == 2 else a == b

    ref = np.concatenate(
        [
            np.asarray(reference(images[i : i + 1], training=False))
            for i in range(len(images))
        ]
    )
    rows, failures, notes = [], [], []
    n = len(images)
    ref_acc = float(np.mean(same(answers(ref), labels))) if labels is not None else None
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
        agree = float(np.mean(same(answers(probs), answers(ref))))
        row = {
            "artifact": art.name,
            "format": art.format,
            "path": art.path.name,
            "quantized": art.quantized,
            "max_abs_diff": diff,
            "top1_agreement": agree,
            "accuracy": (
                float(np.mean(same(answers(probs), labels)))
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
                        f"{n} images, more than --max-accuracy-drop "
                        f"{max_accuracy_drop:g} allows (to accept it: "
                        f"--max-accuracy-drop {_above(drop)}; int8 may do better "
                        "calibrated on more images: --calibration-images)"
                    )
            if min_agreement is not None and agree < min_agreement:
                row["passed"] = False
                failures.append(
                    f"{art.name}: top-1 agreement with the Keras model "
                    f"{agree:.4f} < {min_agreement:g} on {n} images (to accept "
                    f"it: --min-agreement {_below(agree)})"
                )
        else:
            row["passed"] = diff <= tolerance
            if not row["passed"]:
                failures.append(
                    f"{art.name}: max probability difference {diff:.2e} > "
                    f"--tolerance {tolerance:g} (to accept it: --tolerance "
                    f"{float(f'{diff * 1.5:.0e}'):g})"
                )
        rows.append(row)
    return {
        "images": int(len(images)),
        "compared_on": "label sets" if thresholds is not None else "top-1 class",
        "reference_accuracy": ref_acc,
        "tolerance": tolerance,
        "max_accuracy_drop": max_accuracy_drop,
        "min_agreement": min_agreement,
        "artifacts": rows,
        "notes": notes,
        "failures": failures,
        "passed": not failures,
    }


def _above(drop: float) -> str:
    """The next hundredth above `drop`: a threshold that would pass it."""
    return f"{(int(drop * 100) + 1) / 100:g}"


def _below(agree: float) -> str:
    return f"{int(agree * 100) / 100:g}"


def raise_on_failures(report: dict, out_dir=None) -> None:
    """GateError (exit 4) naming every artifact that failed. The files stay
    in `out_dir` for inspection, and export_report.json says they failed."""
    if report and report["failures"]:
        kept = (
            f". The files are kept in {out_dir} for inspection; "
            "export_report.json marks them as failed: do not serve them"
            if out_dir is not None
            else ""
        )
        raise GateError("parity check failed: " + "; ".join(report["failures"]) + kept)
