"""`finetune-cli benchmark RUN`: is an exported model fit to serve?

For every artifact of the run's export folder (`metadata.json` lists
them), each in its own runtime: accuracy on the run's recorded test split
(images the model never trained on), latency p50/p95 at batch 1 (after a
warm-up call, on up to `latency_images` images), throughput at `batch`
images a call (the first call not timed) and file size. The table goes to
`benchmark.json` in the export folder (written whole, then renamed);
`min_accuracy` turns it into a gate: a GateError (exit 4) naming every
format below it. The files are never changed or removed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from finetune_cli.data import pipeline
from finetune_cli.data import split as split_lib
from finetune_cli.deploy.formats import Artifact
from finetune_cli.deploy.parity import tflite_runner
from finetune_cli.deploy.parity import runner_for
from finetune_cli.deploy.parity import size_of
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.errors import GateError
from finetune_cli.evaluate import evaluation
from finetune_cli.files import write_json
from finetune_cli.files import damaged
from finetune_cli.files import read_json
from finetune_cli.model.saved import resolve_target

FILE = "benchmark.json"


@dataclasses.dataclass
class BenchmarkResult:
    path: Path  # benchmark.json
    report: dict


def benchmark(
    run_path,
    *,
    export_dir=None,
    batch: int = 32,
    latency_images: int = 50,
    min_accuracy: Optional[float] = None,
    progress: Callable[[str], None] = lambda _: None,
) -> BenchmarkResult:
    """Benchmark every exported artifact of a run; see the module doc.

    Raises:
        ConfigError: not a run folder, or no export in it.
        DataError: the run has no test split, or its files changed.
        GateError: `min_accuracy` given and an artifact below it.
    """
    target = resolve_target(run_path)
    if target.run_dir is None:
        raise ConfigError(
            f"{run_path}: benchmark needs a run folder (it scores the run's "
            "recorded test split); export a run, then benchmark the run"
        )
    folder = Path(export_dir) if export_dir is not None else target.run_dir / "export"
    artifacts = _artifacts(folder, target.run_dir)
    index = split_lib.load(target.run_dir, ["test"])
    samples = (index.splits.get("test") or []) if index is not None else []
    if not samples:
        raise DataError(
            f"{target.run_dir}: no recorded test split to score the exports on"
        )
    pairs = [(p, index.class_names[lb]) for p, lb in samples]
    samples = evaluation.align_labels(pairs, target.labels)
    meta = read_json(folder / "metadata.json", todo="export again with --force")
    size = tuple(meta["input"]["shape"][1:3])
    rows = []
    for art in artifacts:
        progress(f"benchmark {art.name}")
        rows.append(_measure(art, samples, size, batch, latency_images))
    failures = []
    if min_accuracy is not None:
        failures = [
            f"{r['artifact']}: accuracy {r['accuracy']:.4f} < {min_accuracy:g}"
            for r in rows
            if r["accuracy"] < min_accuracy
        ]
    report = {
        "run": str(target.run_dir),
        "export": str(folder),
        "split": "test",
        "images": len(samples),
        "batch": batch,
        "latency_images": min(latency_images, len(samples)),
        "min_accuracy": min_accuracy,
        "artifacts": rows,
        "failures": failures,
        "passed": not failures,
    }
    path = write_json(folder / FILE, report)
    if failures:
        raise GateError(
            "benchmark: below --min-accuracy on the run's test split "
            f"({len(samples)} images): " + "; ".join(failures)
        )
    return BenchmarkResult(path, report)


def _artifacts(folder: Path, run_dir: Path) -> list[Artifact]:
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        raise ConfigError(
            f"{folder}: no export here (no metadata.json); run "
            f"finetune-cli export {run_dir} first"
        )
    todo = f"export again with: finetune-cli export {run_dir} --force"
    meta = read_json(meta_path, todo=todo)
    listed = meta.get("artifacts")
    if not isinstance(listed, list):
        raise damaged(meta_path, "no list of artifacts", todo)
    artifacts = []
    for a in listed:
        path = folder / a["file"]
        if not path.exists():
            raise ConfigError(
                f"{path}: listed in {meta_path.name} but missing; export again "
                "with --force"
            )
        artifacts.append(Artifact(a["name"], a["format"], path, a["quantized"]))
    return artifacts


def _batched_runner(art: Artifact, batch: int):
    """float pixels [n <= batch, H, W, 3] -> probabilities, at `batch` a call."""
    if art.format == "tflite":
        return tflite_runner(art.path, batch)
    return runner_for(art)


def _load(samples, size) -> np.ndarray:
    return np.stack(
        [np.asarray(pipeline.load_image(p, size)) for p, _ in samples]
    ).astype(np.float32)


def _measure(art: Artifact, samples, size, batch: int, latency_images: int) -> dict:
    labels = np.array([lb for _, lb in samples])
    run = _batched_runner(art, batch)
    predicted, timed, seconds = [], 0, 0.0
    first = None
    for start in range(0, len(samples), batch):
        x = _load(samples[start : start + batch], size)
        t0 = time.perf_counter()
        y = np.asarray(run(x))
        dt = time.perf_counter() - t0
        if start > 0:  # the first call warms up (graphs, allocations)
            timed, seconds = timed + len(x), seconds + dt
        else:
            first = x
        predicted.append(y.argmax(1))
    if timed == 0:  # one batch in all: time it again, warm
        t0 = time.perf_counter()
        run(first)
        timed, seconds = len(first), time.perf_counter() - t0
    accuracy = float(np.mean(np.concatenate(predicted) == labels))
    single = runner_for(art)
    few = _load(samples[: max(1, latency_images)], size)
    single(few[:1])  # warm-up
    times = []
    for i in range(len(few)):
        t0 = time.perf_counter()
        single(few[i : i + 1])
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "artifact": art.name,
        "format": art.format,
        "file": art.path.name,
        "quantized": art.quantized,
        "size_bytes": size_of(art.path),
        "accuracy": accuracy,
        "latency_ms_p50": float(np.percentile(times, 50)),
        "latency_ms_p95": float(np.percentile(times, 95)),
        "throughput": timed / seconds if seconds > 0 else None,
    }
