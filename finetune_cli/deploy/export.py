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
`probabilities`, `class_index`, `label`, and for a multi-label model
`label_mask` (each label at or above its threshold; the thresholds are
also in `metadata.json` and `thresholds.json`). (2) `model.tflite`,
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

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from finetune_cli import remote
from finetune_cli.data import index as data_lib
from finetune_cli.data import pipeline
from finetune_cli.data import multilabel
from finetune_cli.data import records
from finetune_cli.model import build as model_lib
from finetune_cli.evaluate import evaluation
from finetune_cli.evaluate import labelsets
from finetune_cli.model import saved as runmodel
from finetune_cli.run import tracking
from finetune_cli.errors import ConfigError
from finetune_cli import faults
from finetune_cli.files import atomic_write
from finetune_cli.files import read_json
from finetune_cli.run.folder import staged_folder
from finetune_cli.run.lock import Lock
from finetune_cli.run.lock import run_lock
from finetune_cli.files import write_json
from finetune_cli.deploy.formats import TFLITE_NAMES
from finetune_cli.deploy.formats import Artifact
from finetune_cli.deploy.formats import write_keras
from finetune_cli.deploy.formats import write_onnx
from finetune_cli.deploy.formats import write_saved_model
from finetune_cli.deploy.formats import write_tflite
from finetune_cli.deploy.parity import MIN_GATE_IMAGES
from finetune_cli.deploy.parity import check_parity


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


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    artifacts: list[Artifact]
    report: Optional[dict]
    remote_dir: Optional[str] = None  # where a remote --out was uploaded


def _images(samples, size, limit: int, seed: int, num_classes: int = 0):
    """(pixels, labels) of up to `limit` samples: class indices, or
    multi-hot rows of `num_classes` for label sets."""
    rng = np.random.default_rng(seed)
    if len(samples) > limit:
        idx = sorted(rng.choice(len(samples), limit, replace=False))
        samples = [samples[i] for i in idx]
    if records.is_key(samples[0][0]):  # a pack's records, read shard by shard
        found = records.keyed_images([p for p, _ in samples], size)
        x = np.stack([found[p] for p, _ in samples])
    else:
        x = np.stack([np.asarray(pipeline.load_image(p, size)) for p, _ in samples])
    labels = [lb for _, lb in samples]
    if multilabel.is_multi(samples):
        return x.astype(np.float32), multilabel.targets(labels, num_classes) > 0.5
    return x.astype(np.float32), np.array(labels)


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
    # A remote --out (or a remote run's export/) is written in a local
    # mirror and uploaded once checked (`remote.py`).
    remote_out = str(out) if remote.is_remote(out) else None
    if remote_out is None and out is None and target.remote is not None:
        remote_out = remote.join(target.remote, "export")
    if remote_out is not None and out is not None:
        out = remote.mirror_of(remote_out)
        if tf.io.gfile.exists(remote_out) and not force:
            raise ConfigError(
                f"{remote_out} already exists; pass --force to replace it "
                "or --out to choose another folder"
            )
    out = Path(out) if out is not None else Path(base_dir) / "export"
    # Not while another command writes into the run folder, nor while
    # another export writes this folder (each waits for nothing: exit 6).
    with contextlib.ExitStack() as locks:
        if target.run_dir is not None:
            locks.enter_context(run_lock(target.run_dir))
        locks.enter_context(
            Lock(out.parent / f".{out.name}.lock", f"export folder {out}")
        )
        if out.exists() and any(out.iterdir()) and not force:
            raise ConfigError(
                f"{out} already exists; pass --force to replace it "
                "or --out to choose another folder"
            )
        model = runmodel.load_model(target)  # checks labels.txt first
        multi = model_lib.is_multi_label(model)
        # A multi-label model's thresholds, and the file they are read from.
        thresholds, th_file = labelsets.for_target(target) if multi else (None, None)
        needs_data = check or "int8" in quantize
        val = train = None
        if needs_data:
            val, train = _data_for(target, data, multi)
        size = runmodel.model_image_size(model)
        say = progress or (lambda msg: None)

        artifacts: list[Artifact] = []
        # --force: the old export steps aside, the new one takes its name,
        # then the old one goes (never a moment with neither).
        with staged_folder(out, "make room and export again") as tmp:
            if "keras" in formats:
                say("writing model.keras")
                write_keras(model, tmp / "model.keras")
                artifacts.append(Artifact("keras", "keras", tmp / "model.keras"))
                faults.point("export_written")
            if "saved_model" in formats:
                say("writing saved_model/")
                write_saved_model(
                    model,
                    tmp / "saved_model",
                    target.labels,
                    thresholds,
                )
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
            write_json(
                tmp / "metadata.json",
                metadata(target, model, artifacts, thresholds=thresholds),
            )
            if th_file is not None:  # predict/evaluate on model.keras
                atomic_write(tmp / th_file.name, th_file.read_text())
            report = None
            if check:
                say(f"parity check on {min(parity_images, len(val))} images")
                images, labels = _images(
                    val, size, parity_images, seed=0, num_classes=len(target.labels)
                )
                report = check_parity(
                    model,
                    artifacts,
                    images,
                    labels,
                    tolerance=tolerance,
                    max_accuracy_drop=max_accuracy_drop,
                    min_agreement=min_agreement,
                    thresholds=thresholds,
                )
                write_json(tmp / "export_report.json", report)
        arts = [dataclasses.replace(a, path=out / a.path.name) for a in artifacts]
        if report is not None:
            for row in report["artifacts"]:
                row["path"] = str(out / row["path"])
        result = ExportResult(out, arts, report)
        if target.run_dir is not None:
            _track(result, target.run_dir, warn)
        if remote_out is not None:
            remote.push(out, remote_out)
            result.remote_dir = remote_out
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


def _data_for(target, data, multi_label: bool = False):
    """(validation samples, training samples) with model label indices."""
    if data is not None:
        pairs, _, _ = evaluation.resolve_data(
            target, data=data, split="val", multi_label=multi_label
        )
        samples = evaluation.align_labels(pairs, target.labels)
        return samples, samples
    if target.run_dir is None:
        raise ConfigError(
            "the parity check and int8 calibration need images: "
            "pass --data DIR|CSV (or export a run folder)"
        )
    from finetune_cli import config as config_lib
    from finetune_cli.data import split as split_lib

    # The run's recorded files (a parity check needs images, not exactly
    # these: any that vanished are simply not used).
    index = split_lib.load(target.run_dir, ["val", "train"], allow_missing=True)
    if index is None:
        cfg = config_lib.load_run_config(target.run_dir)
        index = data_lib.index_config(cfg)
    to_model = lambda split: evaluation.align_labels(  # noqa: E731
        evaluation.pairs_of(index, split), target.labels
    )
    return to_model("val"), to_model("train")


def _calibration(rec) -> dict:
    if rec is None:
        return {"method": "none"}
    if rec.get("per_label"):
        return {
            "method": "temperature",
            "per_label": True,
            "temperatures": rec["temperatures"],
            "note": "folded into the output layer: the probabilities are calibrated",
        }
    return {
        "method": "temperature",
        "temperature": rec["temperature"],
        "note": "folded into the output layer: the probabilities are calibrated",
    }


def metadata(target, model, artifacts, thresholds=None) -> dict:
    """What `metadata.json` holds; `thresholds`: a multi-label model's (read
    from beside it when not given)."""
    from finetune_cli import __version__

    from finetune_cli.evaluate import calibration

    h, w = runmodel.model_image_size(model)
    multi = model_lib.is_multi_label(model)
    if multi and thresholds is None:
        thresholds, _ = labelsets.for_target(target)
    run_metrics = None
    preprocess = None
    reject_below = None
    if target.run_dir is not None:
        run_metrics = read_json(
            target.run_dir / "metrics.json",
            missing_ok=True,
            todo="it holds the run's metrics copied into the export's "
            "metadata; restore it, or copy best.keras and labels.txt to a "
            "folder of their own and export that with --data DIR",
        )
        from finetune_cli.model import applications
        from finetune_cli import config as config_lib

        # Through the schema, like every other reader of a config (the
        # preprocessing it names goes into the metadata: required).
        cfg = config_lib.load_run_config(target.run_dir)
        reject_below = cfg.calibration.reject_below
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
        "output": {
            "probabilities": [None, len(target.labels)],
            "activation": "sigmoid" if multi else "softmax",
        },
        "task": "multi_label" if multi else "single_label",
        "preprocessing": preprocess,
        "calibration": _calibration(calibration.for_target(target)),
        **(
            {
                # An image's labels: every one at or above its threshold
                # (chosen on val by max F1); an empty set is "none of them".
                "thresholds": dict(
                    zip(target.labels, map(float, thresholds), strict=True)
                )
            }
            if multi
            else {
                # Answer "unknown" when the top probability is below this
                # (null: always a class): the run's calibration.reject_below.
                "unknown": {"reject_below": reject_below, "label": "unknown"}
            }
        ),
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
