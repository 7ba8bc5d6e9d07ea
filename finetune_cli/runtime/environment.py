"""What a run ran on: versions, devices, git commit (for environment.json)."""

from __future__ import annotations

import platform
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import config as tf_config


def git_commit(cwd=".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def devices() -> list[dict]:
    """The devices TensorFlow found, CPU first."""

    found = []
    for d in tf.config.list_physical_devices():
        entry = {"name": d.name, "type": d.device_type}
        if d.device_type == "GPU":
            try:
                details = tf.config.experimental.get_device_details(d)
                entry["model"] = details.get("device_name")
                entry["compute_capability"] = details.get("compute_capability")
            except Exception:  # noqa: BLE001 - details are best effort
                pass
        found.append(entry)
    return found


def has_gpu() -> bool:
    return any(d["type"] == "GPU" for d in devices())


def describe(argv=None) -> dict:

    from finetune_cli import __version__

    return {
        "finetune_cli": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "numpy": np.__version__,
        "cuda_build": tf.test.is_built_with_cuda(),
        "devices": devices(),
        "git_commit": git_commit(),
        "argv": list(argv if argv is not None else sys.argv),
    }


def configure_runtime(cfg, gpu: bool) -> dict:
    """Seeds, op determinism and the dtype policy; returns what was chosen.

    `keras.utils.set_random_seed` seeds Python, NumPy, TensorFlow and
    Keras. With `experiment.deterministic`, TensorFlow's op determinism is
    switched on too: ops without a deterministic kernel raise instead of
    silently differing, and tf.data runs stateful map functions serially.
    It is process-wide, so it is also switched off when not asked for.
    """

    keras.utils.set_random_seed(cfg.experiment.seed)
    deterministic = cfg.experiment.deterministic
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    elif op_determinism_enabled():
        # TensorFlow exports no way back; the switch lives here.

        tf_config.disable_op_determinism()
    mp = cfg.runtime.mixed_precision
    mixed = mp in ("on", "bfloat16") or (mp == "auto" and gpu)
    policy = {"bfloat16": "mixed_bfloat16"}.get(mp, "mixed_float16")
    policy = policy if mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    xla = cfg.runtime.xla
    if xla == "auto":
        xla = gpu and not deterministic
    return {
        "mixed_precision": mixed,
        "policy": policy,
        "xla": xla,
        "deterministic": deterministic,
    }


def op_determinism_enabled() -> bool:
    """Whether TensorFlow's op determinism is on in this process."""

    return bool(tf_config.is_op_determinism_enabled())
