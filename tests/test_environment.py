"""Reproducible runs (`experiment.deterministic`), and what a run records
about where it ran."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from finetune_cli import config as config_lib
from finetune_cli.train import job as trainer
from finetune_cli.console import Output
from finetune_cli.run.folder import list_runs

from conftest import lively_weights
from conftest import tiny_config

PHASES = [
    {"name": "head", "epochs": 1, "learning_rate": 1e-2},
    {
        "name": "top",
        "epochs": 2,
        "trainable": {"top": 6},
        "learning_rate": 1e-3,
    },
]
AUGMENTATION = [
    {"type": "flip", "mode": "horizontal"},
    {"type": "rotation", "factor": 0.2},
    {"type": "contrast", "factor": 0.3},
]


def raw_config(shapes_dir, tmp_path, name, seed=3):
    raw = tiny_config(
        shapes_dir,
        tmp_path,
        phases=PHASES,
        augmentation=AUGMENTATION,
        head=[{"type": "dropout", "rate": 0.3}],
    )
    raw["model"]["weights"] = lively_weights(tmp_path / "pre.weights.h5")
    raw["experiment"].update(name=name, seed=seed, deterministic=True)
    # The base on freshly augmented images every epoch: the path whose
    # randomness used to depend on thread timing (views are the default).
    raw["feature_cache"]["augmented"] = "faithful"
    return raw


def run(raw):
    cfg = config_lib.validate(raw)
    return trainer.finetune(cfg, Output(file=open(os.devnull, "w"))).run_dir


def history(run_dir):
    """history.csv without its wall-clock column."""
    rows = list(csv.DictReader(open(run_dir / "history.csv")))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def weights(path):
    import keras

    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    return [np.asarray(v) for v in model.weights]


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return len(wa) == len(wb) and all(
        np.array_equal(x, y) for x, y in zip(wa, wb, strict=True)
    )


@pytest.mark.heavy
def test_same_seed_gives_bit_identical_runs_even_across_a_kill_and_resume(
    shapes_dir, tmp_path
):
    first = run(raw_config(shapes_dir, tmp_path, "a"))
    rows = history(first)
    assert [r["phase"] for r in rows] == ["head"] + ["top"] * 2
    # The second phase runs the base on augmented images every epoch: the
    # path whose randomness used to depend on thread timing.
    metrics = json.loads((first / "metrics.json").read_text())
    assert [p["path"] for p in metrics["phases"]][1] == "base"
    assert len({r["loss"] for r in rows}) == 3

    env = json.loads((first / "environment.json").read_text())
    assert env["runtime"]["deterministic"] is True
    listed = {r["path"]: r for r in list_runs(tmp_path / "runs")}
    assert listed[str(first)]["deterministic"] is True

    # The same config in another process, killed after the first augmented
    # epoch of phase 2 and resumed in a third: bit for bit the first run.
    raw = raw_config(shapes_dir, tmp_path, "killed")
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, FINETUNE_CLI_FAULT="epoch_saved@2")
    cli = [sys.executable, "-m", "finetune_cli"]
    killed = subprocess.run(
        cli + ["finetune", str(path), "--plain"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    (second,) = [
        p for p in (tmp_path / "runs" / "killed").iterdir() if p.name[0].isdigit()
    ]
    env.pop("FINETUNE_CLI_FAULT")
    resumed = subprocess.run(
        cli + ["finetune", "--resume", str(second), "--plain"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "after epoch 2, at phase 2" in resumed.stdout
    # TensorFlow's native log lines (cuInit, CPU features) are filtered out:
    # stderr holds only what the tool wrote (here: the killed run's lock).
    (line,) = resumed.stderr.splitlines()
    assert re.fullmatch(
        r"warning: the previous run of 'killed' \(process \d+\) ended "
        r"without releasing its lock",
        line,
    ), line
    assert history(second) == rows
    for name in ("best.keras", "last.keras"):
        assert same_weights(second / name, first / name), name

    other = run(raw_config(shapes_dir, tmp_path, "other", seed=4))
    assert history(other) != rows
    assert not same_weights(other / "last.keras", first / "last.keras")


def test_op_determinism_is_switched_on_and_off_with_the_config(shapes_dir, tmp_path):
    from finetune_cli.runtime import environment

    raw = tiny_config(shapes_dir, tmp_path)
    raw["experiment"]["deterministic"] = True
    chosen = environment.configure_runtime(config_lib.validate(raw), gpu=False)
    assert chosen["deterministic"] is True
    assert environment.op_determinism_enabled()
    raw["experiment"]["deterministic"] = False
    chosen = environment.configure_runtime(config_lib.validate(raw), gpu=False)
    assert chosen["deterministic"] is False
    assert not environment.op_determinism_enabled()


def test_an_op_without_a_deterministic_kernel_is_named_as_a_config_error(
    shapes_dir, tmp_path, monkeypatch
):
    import tensorflow as tf

    from finetune_cli.errors import ConfigError

    raw = tiny_config(shapes_dir, tmp_path)
    raw["experiment"]["deterministic"] = True
    cfg = config_lib.validate(raw)
    job = trainer.Trainer.prepare(cfg, Output(file=open(os.devnull, "w")))

    def unimplemented():
        raise tf.errors.UnimplementedError(
            None, None, "Deterministic GPU implementation of FooGrad not available"
        )

    monkeypatch.setattr(job, "run_all", unimplemented)
    with pytest.raises(ConfigError) as e:
        trainer.run_guarded(job)
    assert "experiment.deterministic" in str(e.value)
    assert "FooGrad" in str(e.value)
    status = json.loads((job.run.path / "status.json").read_text())
    assert status["state"] == "failed" and "FooGrad" in status["reason"]
    job.runtime["deterministic"] = False
    with pytest.raises(tf.errors.UnimplementedError):
        trainer.run_guarded(job)


@pytest.mark.parametrize(
    "setting, gpu, policy",
    [
        ("auto", False, "float32"),
        ("auto", True, "mixed_float16"),
        ("off", True, "float32"),
        ("on", False, "mixed_float16"),
        ("bfloat16", False, "mixed_bfloat16"),
        ("bfloat16", True, "mixed_bfloat16"),
    ],
)
def test_mixed_precision_auto_follows_the_device(
    shapes_dir, tmp_path, setting, gpu, policy
):
    import keras

    from finetune_cli.runtime import environment

    raw = tiny_config(shapes_dir, tmp_path)
    raw["runtime"] = {"mixed_precision": setting}
    try:
        chosen = environment.configure_runtime(config_lib.validate(raw), gpu)
        assert keras.mixed_precision.global_policy().name == policy
        assert chosen["mixed_precision"] == (policy != "float32")
        assert chosen["policy"] == policy
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize(
    "setting, gpu, deterministic, xla",
    [
        ("auto", False, False, False),  # slower on CPU (bench/throughput.py)
        ("auto", True, False, True),
        ("auto", True, True, False),
        (True, False, False, True),
        (False, True, False, False),
    ],
)
def test_xla_auto_follows_the_device(
    shapes_dir, tmp_path, setting, gpu, deterministic, xla
):
    from finetune_cli.runtime import environment

    raw = tiny_config(shapes_dir, tmp_path)
    raw["runtime"] = {"xla": setting}
    raw["experiment"]["deterministic"] = deterministic
    try:
        chosen = environment.configure_runtime(config_lib.validate(raw), gpu)
        assert chosen["xla"] is xla
    finally:
        import keras

        keras.mixed_precision.set_global_policy("float32")
        environment.configure_runtime(
            config_lib.validate(tiny_config(shapes_dir, tmp_path)), False
        )
