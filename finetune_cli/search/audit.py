"""`finetune-cli audit`: likely label errors, near-duplicates and outliers
in a data folder or a run's split, from the frozen base's features.

Nothing is trained but a probe: the pretrained base's pooled features go
to the feature cache (a rerun, or a `finetune` of the same data, computes
nothing again), and three checks read them:

- **Label errors** (confident learning, Northcutt et al. 2021, as in
  cleanlab): k-fold cross-validated probabilities of a logistic-regression
  probe (`cache.heads.train_probe`), so each image is scored by a probe
  that never saw it. An image is flagged when the probe's most probable
  class is not its label, or when (class j's threshold t_j being the mean
  probability of j over the images labelled j) the classes whose
  probability reaches their threshold point, by the highest of them, to
  another class. Flagged images are ranked by the probability of their
  own label, lowest first.
- **Near-duplicates**: pairs whose features, centred on their mean and
  L2-normalised, have a cosine similarity of at least
  `duplicate_threshold` (byte copies score 1.0, resized or recompressed
  copies just under it): within a class, across
  classes (one label is wrong, or the image belongs to neither), and across
  the splits of a run (the held-out image was trained on).
- **Outliers**: images far from every class: the cosine similarity to the
  nearest class centroid, flagged when its robust z-score (median and
  median absolute deviation) is below -3.5.

It informs; a gate (`fail_over`) makes it fail.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import random
import time
from pathlib import Path
from typing import Optional

import keras
import numpy as np

from finetune_cli.cache import features
from finetune_cli.cache import heads
from finetune_cli.cache.extract import cache_root
from finetune_cli.data import index as data_lib
from finetune_cli.data import preflight as preflight_lib
from finetune_cli import faults
from finetune_cli.errors import ConfigError
from finetune_cli.errors import GateError
from finetune_cli.files import atomic_write
from finetune_cli.files import write_json
from finetune_cli.run.folder import staged_folder
from finetune_cli.runtime import environment
from finetune_cli.search.audit_report import KINDS
from finetune_cli.search.audit_report import describe  # noqa: F401 - the CLI's
from finetune_cli.search.audit_report import render_html

OUTLIER_Z = -3.5
# Epochs of each fold's probe: half a selection probe's (k of them run).
PROBE_EPOCHS = 30


@dataclasses.dataclass
class Finding:
    kind: str
    file: str
    label: str
    score: float  # own-label probability, similarity, or z-score
    other: str = ""  # suggested label, the other file, or the nearest class
    split: str = ""


@dataclasses.dataclass
class AuditResult:
    findings: list
    images: int
    classes: list
    out_dir: Path
    seconds: float
    params: dict

    def counts(self) -> dict:
        return {k: sum(f.kind == k for f in self.findings) for k in KINDS}


def audit(
    cfg,
    out,
    *,
    index=None,
    out_dir,
    folds: int = 5,
    duplicate_threshold: float = 0.98,
) -> AuditResult:
    """Audit the images of `index` (default: all of `cfg`'s data folder as
    one split) with `cfg`'s pretrained base; write `out_dir` whole.

    Raises:
        ConfigError, DataError: before anything is computed or written.
    """
    t0 = time.monotonic()
    skipped = []
    if index is None:
        index = data_lib.index_whole_folder(cfg.data.dir, "DATA")
        index, skipped = readable(index, cfg, out)
    if len(index.class_names) < 2:
        raise ConfigError(
            f"audit: {index.source} has one class; label errors need two or more"
        )
    if index.multi_label:
        raise ConfigError(
            f"audit: {index.source} is multi-label (task: multi_label); the "
            "audit's label-error ranking is single-label (one class an image)"
        )
    environment.configure_runtime(cfg, environment.has_gpu())
    extractor = features.build_extractor(cfg)
    x, y, files, splits = [], [], [], []
    for split in index.splits:
        root = cache_root(cfg) / split
        fs, _ = features.get_features(cfg, extractor, index, split, root, out)
        f, labels, paths = fs.load()
        x.append(f[0])
        y.append(labels)
        files += paths
        splits += [split] * len(paths)
    features.evict(cfg, out)
    keras.backend.clear_session()
    x, y = np.concatenate(x).astype("float32"), np.concatenate(y)
    names = index.class_names
    out.info(f"audit: {len(files)} images, {len(names)} classes; {folds}-fold probe")
    probs = out_of_fold(x, y, len(names), folds, cfg.experiment.seed)
    findings = [Finding("unreadable", p, "", 0.0, why) for p, why in skipped]
    findings += label_errors(probs, y, files, names, splits)
    findings += duplicates(x, y, files, names, splits, duplicate_threshold)
    findings += outliers(x, y, files, names, splits)
    params = {
        "model": cfg.model.name,
        "weights": cfg.model.weights,
        "image_size": list(cfg.data.image_size),
        "folds": folds,
        "duplicate_threshold": duplicate_threshold,
        "outlier_z": OUTLIER_Z,
        "probe_accuracy": float(np.mean(probs.argmax(1) == y)),
    }
    result = AuditResult(
        findings, len(files), names, Path(out_dir), time.monotonic() - t0, params
    )
    write(result)
    return result


def readable(index, cfg, out):
    """(the index without the images the pre-flight cannot decode, those
    images with why). Unlike training's pre-flight, copies are kept: the
    audit reports them."""
    verdicts, save = preflight_lib.scan_verdicts(index, cfg, out)
    paths = index.files("all")
    bad = [(p, verdicts[p][0]) for p in paths if verdicts[p][0] is not None]
    keep = [(p, lb) for p, lb in index.splits["all"] if verdicts[p][0] is None]
    save()
    return data_lib.DataIndex(index.class_names, {"all": keep}, index.source), bad


def folds_of(y, folds: int, seed: int) -> np.ndarray:
    """A fold number per image, every class dealt round the folds."""
    fold = np.zeros(len(y), dtype=int)
    rng = random.Random(f"audit-{seed}")
    for c in np.unique(y):
        members = list(np.flatnonzero(y == c))
        rng.shuffle(members)
        for k, i in enumerate(members):
            fold[i] = k % folds
    return fold


def out_of_fold(x, y, num_classes: int, folds: int, seed: int) -> np.ndarray:
    """Each image's class probabilities from a probe trained without it."""
    folds = max(2, min(folds, len(y)))
    fold = folds_of(y, folds, seed)
    probs = np.zeros((len(y), num_classes))
    for k in range(folds):
        held = fold == k
        if not held.any():
            continue
        probe, _, _ = heads.train_probe(
            x[~held], y[~held], x[held], y[held], num_classes, seed + k, PROBE_EPOCHS
        )
        probs[held] = probe.predict(x[held], batch_size=1024, verbose=0)
        keras.backend.clear_session()
    return probs


def label_errors(probs, y, files, names, splits) -> list[Finding]:
    """Images whose label the out-of-fold probabilities contradict, lowest
    own-label probability first (see the module doc)."""
    k = probs.shape[1]
    thresholds = np.array(
        [probs[y == j, j].mean() if (y == j).any() else 1.0 for j in range(k)]
    )
    found = []
    for i, p in enumerate(probs):
        suggested = int(np.argmax(p))
        if suggested == y[i]:
            # Confident learning: another class above its own threshold.
            confident = np.flatnonzero(p >= thresholds)
            if not len(confident):
                continue
            suggested = int(confident[np.argmax(p[confident])])
        if suggested != y[i]:
            found.append(
                Finding(
                    "label_error",
                    files[i],
                    names[y[i]],
                    float(p[y[i]]),
                    names[suggested],
                    splits[i],
                )
            )
    return sorted(found, key=lambda f: f.score)


def unit_rows(x) -> np.ndarray:
    """Features centred on their mean over the images, at unit length: the
    part all images share (large in pooled ReLU features) would make every
    pair look alike."""
    z = x - x.mean(axis=0, keepdims=True)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def duplicates(x, y, files, names, splits, threshold: float) -> list[Finding]:
    """Pairs at cosine similarity >= `threshold` (of centred features),
    most similar first; blockwise, so memory stays at a block of rows by
    all images."""
    z = unit_rows(x)
    found = []
    block = 1024
    for start in range(0, len(z), block):
        sims = z[start : start + block] @ z.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, j in zip(rows, cols, strict=True):
            i = start + r
            if j <= i:
                continue
            if splits[i] != splits[j]:
                kind = "cross_split_duplicate"
            elif y[i] != y[j]:
                kind = "cross_class_duplicate"
            else:
                kind = "duplicate"
            found.append(
                Finding(
                    kind,
                    files[i],
                    names[y[i]],
                    float(sims[r, j]),
                    f"{files[j]} ({names[y[j]]}, {splits[j]})",
                    splits[i],
                )
            )
    return sorted(found, key=lambda f: -f.score)


def outliers(x, y, files, names, splits) -> list[Finding]:
    """Images whose similarity to the nearest class centroid has a robust
    z-score below `OUTLIER_Z`, farthest first."""
    z = unit_rows(x)
    centroids = np.stack(
        [
            z[y == j].mean(0) if (y == j).any() else np.zeros(z.shape[1])
            for j in range(len(names))
        ]
    )
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    sims = z @ centroids.T
    nearest = sims.max(1)
    median = np.median(nearest)
    mad = np.median(np.abs(nearest - median)) or 1e-12
    score = 0.6745 * (nearest - median) / mad
    found = [
        Finding(
            "outlier",
            files[i],
            names[y[i]],
            float(score[i]),
            names[int(sims[i].argmax())],
            splits[i],
        )
        for i in np.flatnonzero(score < OUTLIER_Z)
    ]
    return sorted(found, key=lambda f: f.score)


def check_gates(result: AuditResult, fail_over: dict) -> list[str]:
    """The gates (`KIND=N`: more than N findings of KIND fails) that failed.

    Raises:
        GateError: naming each failed gate, its limit and the count.
    """
    counts = result.counts()
    failed = [
        f"{kind}: {counts[kind]} found, more than {limit}"
        for kind, limit in fail_over.items()
        if counts[kind] > limit
    ]
    if failed:
        raise GateError("audit gate failed: " + "; ".join(failed))
    return failed


def parse_gates(items) -> dict:
    """`--fail-over KIND=N` values -> {kind: N}.

    Raises:
        ConfigError: an unknown kind or a count that is not a whole number.
    """
    gates = {}
    for item in items or []:
        kind, sep, value = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise ConfigError(
                f"--fail-over expects KIND=N, KIND one of {', '.join(KINDS)}. "
                f"Received: {item!r}"
            )
        try:
            gates[kind] = int(value)
        except ValueError:
            raise ConfigError(
                f"--fail-over {kind}: expected a whole number. Received: {value!r}"
            ) from None
    return gates


def write(result: AuditResult) -> None:
    """`audit.csv`, `audit.json` and `audit.html`, whole or not at all."""
    with staged_folder(result.out_dir, "make room and audit again") as tmp:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["kind", "file", "label", "score", "other", "split"])
        for f in result.findings:
            w.writerow([f.kind, f.file, f.label, f"{f.score:.6f}", f.other, f.split])
        atomic_write(tmp / "audit.csv", buf.getvalue())
        faults.point("audit_report")
        write_json(
            tmp / "audit.json",
            {
                "images": result.images,
                "classes": result.classes,
                "counts": result.counts(),
                "seconds": round(result.seconds, 1),
                **result.params,
            },
        )
        atomic_write(tmp / "audit.html", render_html(result))


def data_config(folder, model: str, weights: str, image_size: Optional[int], name):
    """The config an audit of a plain folder extracts features with."""
    from finetune_cli import config as config_lib
    from finetune_cli.model import applications

    try:
        app = applications.get(model)
    except KeyError as e:
        raise ConfigError(f"--model: {e.args[0]}") from None
    size = image_size or app.default_size
    return config_lib.validate(
        {
            "experiment": {"name": name},
            "data": {"dir": str(folder), "image_size": size, "on_bad_image": "skip"},
            "model": {"name": app.name, "weights": weights},
            "phases": [{"name": "audit", "epochs": 1}],
        },
        source="the audit's options",
    )
