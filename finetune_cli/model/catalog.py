"""What `finetune-cli models list` shows: every application we can
fine-tune, with its input sizes, where its ImageNet weights come from on
this machine, and (measured here, on request) its size and speed.

Weights: Keras downloads ImageNet weights once into its cache
(`$KERAS_HOME/models`, default `~/.keras/models`); an application whose
no-top weights file is there is usable offline. `weights_dirs` adds
folders of weights files of your own (`model.weights: PATH`).

Measurements (`measure`): each base is built with `weights=None` at its
default size (pooled, no top) to count its parameters, and timed on one
image at batch 1 on this machine (the median of a few calls after a
warm-up). They are kept in `$KERAS_HOME/finetune-cli-models.json`, keyed by
Keras version and machine, so a later `models list` shows them without
building anything. No TensorFlow at import.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

from finetune_cli.files import write_json
from finetune_cli.model.applications import APPLICATIONS


def keras_home() -> Path:
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def _pattern(name: str):
    """A file name Keras (or a converter) gives the no-top weights of
    `name`: its letters in order with optional `_`/`-` between them, then a
    separator that does not start another version (ResNet50 is not
    ResNet50V2, MobileNet is not MobileNetV2)."""
    chars = "[_-]?".join(re.escape(c) for c in name.lower())
    return re.compile(rf"^(weights_)?{chars}(?![_-]?v\d)[_.-]")


def local_weights(name: str, weights_dirs=()) -> str | None:
    """A no-top weights file for `name` in the Keras cache or in one of
    `weights_dirs`, or None."""
    pattern = _pattern(name)
    for folder in [keras_home() / "models", *map(Path, weights_dirs)]:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            low = p.name.lower()
            notop = "notop" in low or "no_top" in low or "no-top" in low
            if notop and low.endswith((".h5", ".keras")) and pattern.match(low):
                return str(p)
    return None


def _cache_file() -> Path:
    return keras_home() / "finetune-cli-models.json"


def _machine_key() -> str:
    import keras

    return f"keras {keras.__version__}, {platform.machine()}, {os.cpu_count()} cpus"


def recorded() -> dict:
    """Measurements made earlier on this machine: {name: {...}}."""
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    try:
        key = _machine_key()
    except ImportError:
        return {}
    return data.get(key, {}) if isinstance(data.get(key), dict) else {}


def measure(name: str, repeats: int = 5) -> dict:
    """Parameters and batch-1 latency of the pooled base at its default
    size (weights=None), measured here, and recorded for later listings."""
    import time

    import keras
    import numpy as np

    app = APPLICATIONS[name]
    size = app.default_size
    base = app.constructor()(
        include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
    )
    x = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
    base.predict_on_batch(x)  # warm-up: tracing not counted
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        base.predict_on_batch(x)
        times.append(time.perf_counter() - t0)
    row = {
        "params": int(base.count_params()),
        "features": int(base.output_shape[-1]),
        "latency_ms": round(1000 * sorted(times)[len(times) // 2], 1),
    }
    keras.backend.clear_session()
    data = {}
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        pass
    data = data if isinstance(data, dict) else {}
    data.setdefault(_machine_key(), {})[name] = row
    write_json(_cache_file(), data)
    return row


def rows(weights_dirs=(), measured: dict | None = None) -> list[dict]:
    """One row per application, in registry order."""
    measured = recorded() if measured is None else measured
    out = []
    for name, app in APPLICATIONS.items():
        local = local_weights(name, weights_dirs)
        m = measured.get(name) or {}
        out.append(
            {
                "name": name,
                "default_size": app.default_size,
                "min_size": app.default_size
                if app.imagenet_fixed_size
                else app.min_size,
                "preprocess": app.preprocess,
                "weights": "local" if local else "download",
                "weights_file": local,
                "params": m.get("params"),
                "features": m.get("features"),
                "latency_ms": m.get("latency_ms"),
            }
        )
    return out
