"""Evaluation: a saved model of ours scored on held-out images.

`evaluate(...)` resolves which images to score (a run's recorded split, a
config's, or a folder or CSV given with `--data`), predicts them, computes
the metrics (`metrics.py`) and writes the evaluation folder (`report.py`,
default `RUN_DIR/eval/<name or split>/`). Gates live in `gates.py`.
"""

from __future__ import annotations

import contextlib

from pathlib import Path
from typing import Optional

import numpy as np

from finetune_cli import remote
from finetune_cli.data import index as data_lib
from finetune_cli.data import multilabel
from finetune_cli.data import records
from finetune_cli.evaluate import labelsets
from finetune_cli.model import build as model_lib
from finetune_cli.run import tracking
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.evaluate import calibration
from finetune_cli.evaluate import selective
from finetune_cli.evaluate.explain import report_overlays
from finetune_cli.evaluate.metrics import compute_metrics
from finetune_cli.evaluate.prediction import collect_images
from finetune_cli.evaluate.prediction import predict_files
from finetune_cli.evaluate.report import write_report
from finetune_cli.model.saved import Target
from finetune_cli.model.saved import load_model
from finetune_cli.run.lock import run_lock
from finetune_cli.model.saved import resolve_target
from finetune_cli.evaluate.report import Evaluation


def resolve_data(
    target: Target,
    *,
    config=None,
    data=None,
    split="test",
    seed: Optional[int] = None,
    allow_missing: bool = False,
    warn=None,
    multi_label: bool = False,
):
    """The (path, class name) pairs to evaluate and a description of them
    (for `multi_label`, (path, tuple of label names) pairs; `--data` must
    then be a CSV of label sets, split on the run's data.label_separator).

    Precedence: `data` (a folder of class folders, a folder with train/val/
    test, or a CSV) > `config` > the run's recorded split (split.json: the
    files the run held out, checked by content hash; files added to the
    data folder since never enter it).
    """
    from finetune_cli import config as config_lib
    from finetune_cli.data import split as split_lib

    if data is not None:
        data = Path(data)
        if data.suffix.lower() == ".csv":
            section = config_lib.Data(csv=str(data), label_separator=_separator(target))
        elif multi_label:
            raise DataError(
                f"--data {data}: a multi-label model is evaluated on a CSV "
                "manifest whose label cells hold each image's labels; "
                "expected a .csv file"
            )
        else:
            section = config_lib.Data(dir=str(data))
        if not data.exists():
            raise DataError(f"--data: not found: {data}")
        if data.is_file() and data.suffix.lower() != ".csv":
            raise DataError(
                f"--data {data} is a file; expected a folder of "
                "class folders or a .csv manifest"
            )
        if data.is_dir() and data.suffix.lower() == ".csv":
            raise DataError(f"--data {data} is a folder; expected a .csv file")
        if data.is_dir() and records.is_pack(data):
            index = records.index_records(data, multi_label=multi_label)
            if split not in index.splits:
                raise DataError(
                    f"--split {split}: {data} has no {split} split (it has "
                    f"{', '.join(index.splits)})"
                )
            return pairs_of(index, split), str(data), split
        if data.is_dir() and not (data / "train").is_dir():
            # A plain folder of class folders: every image is held out.
            index = data_lib.index_whole_folder(data, "--data")
            return pairs_of(index, "all"), f"{data}", "all"
        index = data_lib.index_data(
            section, seed if seed is not None else 42, multi_label=multi_label
        )
        return pairs_of(index, split), str(data), split
    if config is None:
        if target.run_dir is None:
            raise ConfigError(
                "no data to evaluate on: pass --data DIR|CSV or "
                "--config CONFIG (or a run folder)"
            )
        recorded = split_lib.load(
            target.run_dir,
            [split],
            allow_missing=allow_missing,
            warn=warn,
            **_hashing(target.run_dir),
        )
        if recorded is not None:
            if split not in recorded.splits:
                raise DataError(
                    f"--split {split}: the run recorded no {split} split (it "
                    f"has {', '.join(split_lib.read(target.run_dir)['files'])})"
                    "; pass --split val or --data DIR"
                )
            source = (
                f"{recorded.source} (split recorded in "
                f"{target.run_dir / split_lib.FILE})"
            )
            return pairs_of(recorded, split), source, split
        if warn is not None:
            warn(
                f"{target.run_dir} has no recorded file list (made by an "
                "older finetune-cli): splitting its data folder again, which "
                "is only the same split if the folder has not changed"
            )
        config = config_lib.load_run_config(target.run_dir)
    index = data_lib.index_config(config)
    if split not in index.splits:
        raise DataError(
            f"--split {split}: the data has no {split} split (it has "
            f"{', '.join(index.splits)}); pass --split val or --data DIR"
        )
    return pairs_of(index, split), index.source, split


def pairs_of(index, split):
    names = index.class_names
    return [
        (p, tuple(names[i] for i in lb) if isinstance(lb, tuple) else names[lb])
        for p, lb in index.splits.get(split, [])
    ]


def _hashing(run_dir) -> dict:
    """`split.load`'s verdict cache and rehash setting, from the run's
    config (none: every file hashed)."""
    from finetune_cli import config as config_lib
    from finetune_cli.data import preflight

    try:
        cfg = config_lib.load_run_config(run_dir)
    except Exception:  # noqa: BLE001 - an older or damaged config: hash all
        return {}
    if remote.is_remote(cfg.feature_cache.dir) or not cfg.feature_cache.enabled:
        return {"rehash": cfg.data.rehash}  # not a whole cache for one file
    return {"cache_file": preflight.cache_file(cfg), "rehash": cfg.data.rehash}


def _separator(target) -> str:
    """The run's data.label_separator (`|` without a run)."""
    if target.run_dir is None:
        return "|"
    from finetune_cli import config as config_lib

    try:
        return config_lib.load_run_config(target.run_dir).data.label_separator
    except Exception:  # noqa: BLE001 - an older or damaged config: the default
        return "|"


def align_labels(pairs, model_classes) -> list[tuple[str, int]]:
    """Map class names in the data to the model's output indices.

    Raises:
        DataError: classes the model does not know, or model classes the
            data does not have, named.
    """
    multi = bool(pairs) and isinstance(pairs[0][1], tuple)
    data_classes = sorted({c for _, lb in pairs for c in (lb if multi else (lb,))})
    unknown = [c for c in data_classes if c not in model_classes]
    # A multi-label split may lack a label (its AP is then undefined).
    missing = [] if multi else [c for c in model_classes if c not in data_classes]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"classes in the data that the model does not know: {unknown}")
        if missing:
            parts.append(f"model classes with no images in the data: {missing}")
        raise DataError(
            "class mismatch between model and data: "
            + "; ".join(parts)
            + f". Model classes: {list(model_classes)}"
        )
    if multi:
        return [
            (p, tuple(sorted(model_classes.index(c) for c in lb))) for p, lb in pairs
        ]
    return [(p, model_classes.index(c)) for p, c in pairs]


def evaluate(
    target_path,
    *,
    config=None,
    data=None,
    split="test",
    out=None,
    name=None,
    top_k=5,
    write=True,
    batch_size=32,
    allow_missing=False,
    warn=None,
    track=True,
    tta="none",
    unknown=None,
    coverage=0.95,
) -> Evaluation:
    """Evaluate a run or model on held-out images and write the report.

    `tta="flip"` scores each image as the mean of it and its mirror image.
    The metrics hold the accuracy-coverage trade of answering only above a
    confidence (`selective`), calibration before and after when the
    model's run fitted a temperature (`calibration`), and, given `unknown`
    (a folder of images of none of the classes), what share of them each
    threshold rejects and the threshold that keeps `coverage` of the
    in-class images answered (`unknown`).

    A run folder is evaluated on its recorded split (see `resolve_data`);
    `allow_missing` leaves out recorded files that vanished or changed
    (reported through `warn`) instead of stopping. With `track`, a run
    tracked in MLflow gets the evaluation's metrics (`eval.<name>.<metric>`)
    and folder (artifacts under `eval/<name>`).

    The folder is `out`, else `eval/<name>` (replaced if there), else
    `eval/<split>`, or `eval/<split>-2`, `-3`, ... when that one is taken:
    without a name, an evaluation never replaces another (the run's own
    end-of-run report is `eval/test`).
    """
    target = resolve_target(target_path)
    # Writing into a run folder: not while another command writes there.
    lock = (
        run_lock(target.run_dir)
        if write and target.run_dir is not None
        else contextlib.nullcontext()
    )
    with lock:
        model = load_model(target)  # checks labels.txt against the outputs first
        multi = model_lib.is_multi_label(model)
        if multi and unknown is not None:
            raise ConfigError(
                "--unknown: a multi-label model answers an empty label set "
                "for an image of none of its labels; it has no reject "
                "threshold to measure. Evaluate without --unknown"
            )
        pairs, source, split = resolve_data(
            target,
            config=config,
            data=data,
            split=split,
            allow_missing=allow_missing,
            warn=warn,
            multi_label=multi,
        )
        if not pairs:
            raise DataError(f"no images to evaluate in {source} ({split})")
        samples = align_labels(pairs, target.labels)
        files = [p for p, _ in samples]
        probs = predict_files(model, files, batch_size, tta)
        if multi:
            labels = multilabel.targets([lb for _, lb in samples], len(target.labels))
        else:
            labels = np.array([lb for _, lb in samples])
        metrics = score(labels, probs, target, top_k)
        metrics.update(
            _calibration_multi(target, labels, probs)
            if multi
            else _confidence_metrics(target, model, labels, probs, batch_size, tta)
        )
        metrics.update(model=str(target.model_path), data=source, split=split, tta=tta)
        if unknown is not None:
            metrics["unknown"] = _unknown_metrics(
                model, unknown, probs, coverage, batch_size, tta
            )
        remote_out = str(out) if remote.is_remote(out) else None
        if remote_out is not None:  # written here, then uploaded
            out = remote.mirror_of(remote_out)
        if out is None:
            base = Path(target.run_dir or target.model_path.parent) / "eval"
            out = base / name if name is not None else _unused(base, split)
        out = Path(out)
        result = Evaluation(metrics, out, probs, labels, files, run_dir=target.run_dir)
        if write:
            # Grad-CAM reads images by path: not for the records of a pack.
            if not multi and not records.is_key(files[0]):
                result.overlays = report_overlays(model, files, labels, probs)
            write_report(result, target)
            if track and target.run_dir is not None:
                _track(result, target.run_dir, warn)
            if remote_out is not None:
                remote.push(out, remote_out)
            elif target.remote is not None:  # a remote run: its eval/ too
                remote.push(target.model_path.parent, target.remote)
        return result


def score(labels, probs, target, top_k: int = 5) -> dict:
    """The metrics of `probs` against `labels`: class indices (single
    label), or multi-hot rows scored at the thresholds stored beside the
    target's model (`labelsets.compute`)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        thresholds, found = labelsets.for_target(target)
        metrics = labelsets.compute(labels, probs, thresholds, target.labels)
        metrics["thresholds_from"] = (
            str(found) if found else "none stored: 0.5 for every label"
        )
        return metrics
    return compute_metrics(labels, probs, target.labels, top_k)


def _calibration_multi(target, y, probs) -> dict:
    """Multi-label calibration before/after, when the run fitted it."""
    rec = calibration.for_target(target)
    if rec is None or not rec.get("per_label"):
        return {}
    temps = [float(rec["temperatures"].get(c, 1.0)) for c in target.labels]
    before = labelsets.with_temperatures(probs, 1.0 / np.asarray(temps))
    return {
        "calibration": {
            "temperature": float(rec["temperature"]),
            "temperatures": dict(zip(target.labels, temps, strict=True)),
            **labelsets.calibration_summary(y, probs, temps),
            "fitted_on": f"{rec.get('split', 'val')} ({rec.get('images', '?')} images)",
            "reliability_before": labelsets.reliability(y, before),
            "reliability_after": labelsets.reliability(y, probs),
        }
    }


def _confidence_metrics(target, model, labels, probs, batch_size, tta) -> dict:
    """Selective prediction, and calibration before/after when fitted."""
    found = {
        "selective": {
            "curve": selective.coverage_curve(labels, probs),
            "at_coverage": selective.accuracy_at_coverage(labels, probs),
        }
    }
    rec = calibration.for_target(target)
    if rec is not None:
        t = float(rec["temperature"])
        before = calibration.with_temperature(probs, 1.0 / t)
        found["calibration"] = {
            **calibration.summary(labels, probs, t),
            "fitted_on": f"{rec.get('split', 'val')} ({rec.get('images', '?')} images)",
            "reliability_before": calibration.reliability(labels, before),
            "reliability_after": calibration.reliability(labels, probs),
        }
    return found


def _unknown_metrics(model, folder, probs, coverage, batch_size, tta) -> dict:
    """`selective.unknown_rejection` for the images of `folder`."""
    if not Path(folder).is_dir():
        raise DataError(f"--unknown: folder not found: {folder}")
    files = collect_images([folder])
    unknown_probs = predict_files(model, files, batch_size, tta)
    return {
        "folder": str(folder),
        **selective.unknown_rejection(
            np.asarray(probs).max(axis=1), unknown_probs.max(axis=1), coverage
        ),
    }


def _unused(base: Path, split: str) -> Path:
    if not (base / split).exists():
        return base / split
    n = 2
    while (base / f"{split}-{n}").exists():
        n += 1
    return base / f"{split}-{n}"


def _track(ev: Evaluation, run_dir, warn) -> None:
    name = ev.out_dir.name
    tracking.attach(
        run_dir,
        ev.out_dir,
        f"eval/{name}",
        warn=warn,
        metrics={f"eval.{name}.{k}": v for k, v in ev.metrics["summary"].items()},
    )
