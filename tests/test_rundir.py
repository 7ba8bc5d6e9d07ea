"""Unattended runs: locks, atomic files, SIGKILL + resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from finetune_cli.errors import EXIT_LOCKED
from finetune_cli.errors import LockedError
from finetune_cli.rundir import Lock
from finetune_cli.rundir import RunDir
from finetune_cli.rundir import atomic_write

from conftest import lively_weights
from conftest import tiny_config

CLI = [sys.executable, "-m", "finetune_cli"]


def test_lock_excludes_live_and_takes_over_dead(tmp_path):
    path = tmp_path / ".lock"
    with Lock(path, "experiment x"):
        with pytest.raises(LockedError, match=r"experiment x is in use by process"):
            Lock(path, "experiment x").acquire()
    assert not path.exists()
    # A lock left by a process that no longer exists is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket

    path.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(),
                                "since": "earlier"}))
    lock = Lock(path, "experiment x").acquire()
    assert lock.took_over["pid"] == int(dead)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_atomic_write_never_leaves_half_a_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write(target, "old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write(target, "new" * 1000)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_run_folders_are_never_reused(tmp_path):
    a = RunDir.create(tmp_path, "e")
    b = RunDir.create(tmp_path, "e")
    assert a.path != b.path and a.path.is_dir() and b.path.is_dir()


def write_config(tmp_path, data_dir, phases, name="t", weights=None):
    raw = tiny_config(data_dir, tmp_path, phases=phases)
    if weights:
        raw["model"]["weights"] = weights
    raw["experiment"]["name"] = name
    raw["data"]["split"] = {"train": 0.75, "val": 0.25, "test": 0.0}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def wait_for(predicate, proc, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def start_finetune(cfg):
    """The CLI in a child process (so it can be killed), plain output."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(CLI + ["finetune", str(cfg), "--plain"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, env


def run_dirs(root):
    """Run folders under runs/<experiment> (not `latest`, not the lock)."""
    return [p for p in root.iterdir() if p.name[0].isdigit()] \
        if root.is_dir() else []


def history(run):
    path = run / "history.csv"
    if not path.is_file():
        return []
    return list(csv.DictReader(open(path)))


def test_sigkill_mid_phase_two_then_resume(shapes_dir, tmp_path):
    phases = [
        {"name": "head", "epochs": 2, "learning_rate": 1e-2},
        {"name": "top", "epochs": 6, "trainable": {"top": 6},
         "optimizer": {"name": "sgd", "momentum": 0.9}, "learning_rate": 1e-3,
         "schedule": "cosine",
         "callbacks": {"early_stopping": {"patience": 50}}},
    ]
    weights = lively_weights(tmp_path / "pre.weights.h5")
    cfg = write_config(tmp_path, shapes_dir, phases, weights=weights)
    proc, env = start_finetune(cfg)
    root = tmp_path / "runs" / "t"
    runs = lambda: run_dirs(root)  # noqa: E731
    # Kill it (no chance to clean up) once phase 2 has completed 2 epochs.
    ok = wait_for(lambda: runs() and len(history(runs()[0])) >= 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ok, proc.stdout.read().decode()[-3000:]
    (run,) = runs()
    before = history(run)
    done = len(before)
    assert 4 <= done < 8, "the kill came too late to test a resume"
    assert json.loads((run / "status.json").read_text())["state"] == "running"

    result = subprocess.run(CLI + ["finetune", "--resume", str(run), "--plain"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    after = history(run)
    # Every epoch exactly once, the configured total, phases in order.
    assert [int(r["epoch"]) for r in after] == list(range(1, 9))
    assert [r["phase"] for r in after] == ["head"] * 2 + ["top"] * 6
    # Completed epochs were kept, not redone.
    assert after[:done] == before
    # The optimizer's iteration count continued across the kill: phase 2
    # adds the same number of steps every epoch, from where it stopped.
    its = [int(r["iterations"]) for r in after[2:]]
    steps = its[0]
    assert its == [steps * (i + 1) for i in range(6)]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["phases"][1]["optimizer_iterations"] == 6 * steps
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert not (run / "resume.npz").exists()
    import keras

    keras.saving.load_model(run / "best.keras", safe_mode=True)
    # Weights, optimizer state, schedule position and data order all came
    # back: the resumed run computes the losses an uninterrupted one does.
    straight = write_config(tmp_path, shapes_dir, phases, name="straight",
                            weights=weights)
    done_straight = subprocess.run(CLI + ["finetune", str(straight), "--quiet"],
                                   env=env, capture_output=True, text=True)
    assert done_straight.returncode == 0, done_straight.stderr[-2000:]
    (srun,) = [p for p in (tmp_path / "runs" / "straight").iterdir()
               if p.name[0].isdigit()]
    ref = history(srun)
    losses = [float(r["loss"]) for r in after]
    assert len(set(round(v, 4) for v in losses)) > 4  # they really vary
    for key in ("loss", "val_loss", "lr", "iterations"):
        assert [float(r[key]) for r in after] == pytest.approx(
            [float(r[key]) for r in ref], rel=1e-4, abs=1e-6), key
    # A completed run is not resumed again.
    again = subprocess.run(CLI + ["finetune", "--resume", str(run)], env=env,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already completed" in again.stderr


def test_sigterm_stops_with_exit_5_and_resumes(shapes_dir, tmp_path):
    phases = [{"name": "top", "epochs": 40, "trainable": {"top": 4},
               "learning_rate": 1e-3}]
    cfg = write_config(tmp_path, shapes_dir, phases, name="term")
    proc, _ = start_finetune(cfg)
    root = tmp_path / "runs" / "term"
    runs = lambda: run_dirs(root)  # noqa: E731
    assert wait_for(lambda: runs() and len(history(runs()[0])) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 5, output[-2000:]
    assert "finetune-cli finetune --resume" in output
    status = json.loads((runs()[0] / "status.json").read_text())
    assert status["state"] == "interrupted" and status["resumable"] is True
    assert not (root / ".lock").exists()


def test_two_runs_on_one_output_exactly_one_trains(shapes_dir, tmp_path):
    phases = [{"name": "top", "epochs": 3, "trainable": {"top": 4}}]
    cfg = write_config(tmp_path, shapes_dir, phases, name="twin")
    procs = [start_finetune(cfg)[0] for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, EXIT_LOCKED], outs
    loser = outs[[p.returncode for p in procs].index(EXIT_LOCKED)]
    assert "locked: experiment 'twin'" in loser and "in use by process" in loser
    assert len(run_dirs(tmp_path / "runs" / "twin")) == 1
