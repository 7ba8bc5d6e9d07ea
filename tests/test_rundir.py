"""Unattended runs: locks, atomic files, SIGKILL + resume."""

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
from finetune_cli.run.lock import Lock
from finetune_cli.run.folder import RunDir
from finetune_cli.files import atomic_write

import cli_process
from conftest import tiny_config


def test_lock_excludes_live_and_takes_over_dead(tmp_path):
    path = tmp_path / ".lock"
    with Lock(path, "experiment x"):
        with pytest.raises(LockedError, match=r"experiment x is in use by process"):
            Lock(path, "experiment x").acquire()
    assert not path.exists()
    # A lock left by a process that no longer exists is taken over.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    import socket

    path.write_text(
        json.dumps({"pid": int(dead), "host": socket.gethostname(), "since": "earlier"})
    )
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


def start_finetune(cfg, pause=None):
    """The CLI in a child process (so it can be signalled), plain output."""
    return cli_process.launch(
        ["finetune", cfg, "--plain"], pause=pause, stderr_to_stdout=True
    )


def run_dirs(root):
    """Run folders under runs/<experiment> (not `latest`, not the lock)."""
    return [p for p in root.iterdir() if p.name[0].isdigit()] if root.is_dir() else []


def test_sigterm_stops_with_exit_5_and_leaves_a_resumable_run(shapes_dir, tmp_path):
    phases = [
        {"name": "top", "epochs": 3, "trainable": {"top": 4}, "learning_rate": 1e-3}
    ]
    cfg = write_config(tmp_path, shapes_dir, phases, name="term")
    release = tmp_path / "release"
    # Held right after epoch 1's state is saved; SIGTERM arrives there.
    proc = start_finetune(cfg, pause=f"epoch_saved={release}")
    waiting = tmp_path / "release.waiting"
    assert wait_for(waiting.exists, proc), proc.communicate()[0][-2000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 5, output[-2000:]
    (run,) = run_dirs(tmp_path / "runs" / "term")
    assert (
        f"interrupted: stopped by Ctrl-C or SIGTERM after epoch 1; resume "
        f"with: finetune-cli finetune --resume {run}"
    ) in output
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["resumable"] is True
    assert not (tmp_path / "runs" / "term" / ".lock").exists()


def test_status_of_a_dead_run_reads_interrupted(tmp_path):
    run = RunDir.create(tmp_path, "e")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    run.set_status("running")
    record = json.loads((run / "status.json").read_text())
    record["pid"] = int(dead)
    (run / "status.json").write_text(json.dumps(record))
    (run / "resume.npz").write_bytes(b"state")
    assert run.live_status()["state"] == "interrupted"
    assert json.loads((run / "status.json").read_text())["state"] == "running"
    from finetune_cli.run.folder import list_runs

    (row,) = list_runs(tmp_path)
    assert row["state"] == "interrupted" and row["resumable"] is True
    assert "is gone" in row["reason"]
    # `runs list` wrote the truth back.
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    # A live run stays running.
    alive = RunDir.create(tmp_path, "e")
    alive.set_status("running")
    assert alive.settle()["state"] == "running"


def test_run_folder_appears_complete_or_not_at_all(tmp_path):
    def prepare(run):
        run.write_text("config.yaml", "x")
        raise KeyboardInterrupt  # killed while the folder is being filled

    with pytest.raises(KeyboardInterrupt):
        RunDir.create(tmp_path, "e", prepare=prepare)
    assert list((tmp_path / "e").iterdir()) == []
    run = RunDir.create(tmp_path, "e", prepare=lambda r: r.write_text("a", "1"))
    assert (run / "a").read_text() == "1"
    assert [p.name for p in (tmp_path / "e").iterdir()] == [run.path.name]


def test_remove_temporaries_deletes_hidden_leftovers_only(tmp_path):
    run = RunDir.create(tmp_path, "e")
    (run / "best.keras").write_text("model")
    (run / ".best.abc.keras").write_text("half")
    (run / "eval" / "test").mkdir(parents=True)
    (run / "eval" / "test" / ".metrics.x.json").write_text("half")
    run.remove_temporaries()
    assert sorted(str(p.relative_to(run.path)) for p in run.path.rglob("*")) == [
        "best.keras",
        "eval",
        "eval/test",
    ]


def test_two_runs_on_one_output_exactly_one_trains(shapes_dir, tmp_path):
    phases = [{"name": "top", "epochs": 1, "trainable": {"top": 4}}]
    cfg = write_config(tmp_path, shapes_dir, phases, name="twin")
    release = tmp_path / "release"
    # The first is held with the experiment locked and its run folder made.
    first = start_finetune(cfg, pause=f"run_created={release}")
    waiting = tmp_path / "release.waiting"
    assert wait_for(waiting.exists, first), first.communicate()[0][-2000:]
    second = cli_process.run(["finetune", cfg, "--plain"], stderr_to_stdout=True)
    assert second.returncode == EXIT_LOCKED, second.stdout[-2000:]
    assert "locked: experiment 'twin'" in second.stdout
    assert f"in use by process {first.pid}" in second.stdout
    release.write_text("go")
    assert first.wait(timeout=300) == 0, first.communicate()[0][-2000:]
    assert len(run_dirs(tmp_path / "runs" / "twin")) == 1


def test_runs_list_filters_by_experiment_and_limits_newest_first(tmp_path):
    from typer.testing import CliRunner

    from finetune_cli.cli.main import app
    from finetune_cli.run.folder import RunDir

    for exp, day in (("a", 1), ("a", 3), ("b", 4), ("a", 2)):
        run = RunDir.create(tmp_path, exp)
        run.set_status("completed", started=f"2026-11-0{day}T00:00:00+00:00")
    result = CliRunner().invoke(
        app,
        ["runs", "list", "--output-dir", str(tmp_path), "--experiment", "a"]
        + ["--limit", "2", "--json"],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["experiment"], r["started"][:10]) for r in rows] == [
        ("a", "2026-11-03"),
        ("a", "2026-11-02"),
    ]
    result = CliRunner().invoke(app, ["runs", "list", "--output-dir", str(tmp_path)])
    assert result.stdout.count("completed") == 4
