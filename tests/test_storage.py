"""Full and read-only disks, on real mounts: a small tmpfs that fills up
mid-write (the test fills it at a named instant, `faults.point`), and a
tmpfs remounted read-only. Needs root and mount(2); skipped elsewhere.

Each case asserts exit 9, a message naming a path on that disk, nothing
half-written that looks complete, and (for a run) that it resumes to the
end once there is room again.
"""

import contextlib
import json
import os
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli import faults
from finetune_cli.cli.main import app
from finetune_cli.errors import EXIT_STORAGE

from conftest import copy_run
from conftest import tiny_config

runner = CliRunner()


def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


class Disk:
    """A tmpfs of `size` mounted at `path`."""

    def __init__(self, path, size="64m"):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or not _mount(
            "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)
        ):
            pytest.skip("needs root and mount(2) for a real small disk")
        self.ballast = path / "ballast"

    def fill(self):
        """Leave (almost) no free byte."""
        with open(self.ballast, "wb") as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * (1 << 20))
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 1024)
            with contextlib.suppress(OSError):
                f.flush()

    def free(self):
        self.ballast.unlink()

    def read_only(self):
        assert _mount("-o", "remount,ro", str(self.path))

    def umount(self):
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def disk(tmp_path):
    d = Disk(tmp_path / "disk")
    yield d
    d.umount()


def fill_at(monkeypatch, disk, name, nth=1):
    """Fill the disk the `nth` time the code reaches faults.point(name)."""
    hits = {"n": 0}
    real = faults.point

    def point(at):
        if at == name:
            hits["n"] += 1
            if hits["n"] == nth:
                disk.fill()
        real(at)

    monkeypatch.setattr(faults, "point", point)


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _assert_storage_error(result, disk):
    out = result.output
    assert result.exit_code == EXIT_STORAGE, out
    assert "Traceback" not in out and "please report" not in out, out
    assert str(disk.path) in out, out
    assert "full" in out or "read-only" in out, out


def test_a_disk_that_fills_mid_run_stops_with_exit_9_and_the_run_resumes(
    disk, shapes_dir, tmp_path, monkeypatch
):
    raw = tiny_config(shapes_dir, tmp_path, phases=[{"name": "head", "epochs": 3}])
    raw["experiment"]["output_dir"] = str(disk.path / "runs")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    fill_at(monkeypatch, disk, "epoch_saved")  # after epoch 1 is committed
    result = runner.invoke(app, ["finetune", str(tmp_path / "c.yaml"), "--plain"])
    _assert_storage_error(result, disk)
    (run,) = [p for p in (disk.path / "runs" / "t").iterdir() if p.name[0] == "2"]
    assert f"finetune-cli finetune --resume {run}" in result.output
    # Nothing presented as complete, no temporary left behind.
    assert not (run / "eval").exists()
    assert not [f for f in _files(run) if "/." in f or f.startswith(".")]
    assert json.loads((run / "status.json").read_text())["state"] != "completed"
    disk.free()
    monkeypatch.setattr(faults, "point", lambda name: None)
    result = runner.invoke(app, ["finetune", "--resume", str(run), "--plain"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert (run / "eval" / "test" / "metrics.json").is_file()


def test_a_read_only_output_folder_is_refused_before_anything_runs(
    disk, shapes_dir, tmp_path
):
    raw = tiny_config(shapes_dir, tmp_path)
    raw["experiment"]["output_dir"] = str(disk.path / "runs")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    disk.read_only()
    result = runner.invoke(app, ["finetune", str(tmp_path / "c.yaml"), "--plain"])
    _assert_storage_error(result, disk)
    assert "experiment.output_dir" in result.output
    assert not (tmp_path / "features").exists()  # not even the cache started


def test_a_feature_cache_on_a_full_disk_is_not_left_looking_complete(
    disk, shapes_dir, tmp_path, monkeypatch
):
    raw = tiny_config(shapes_dir, tmp_path)
    raw["feature_cache"]["dir"] = str(disk.path / "features")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    fill_at(monkeypatch, disk, "extract")
    result = runner.invoke(app, ["extract", str(tmp_path / "c.yaml"), "--plain"])
    _assert_storage_error(result, disk)
    assert not list((disk.path / "features").rglob("manifest.json"))
    disk.free()
    monkeypatch.setattr(faults, "point", lambda name: None)
    result = runner.invoke(app, ["extract", str(tmp_path / "c.yaml"), "--plain"])
    assert result.exit_code == 0, result.output
    assert list((disk.path / "features").rglob("manifest.json"))


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_an_export_to_a_full_or_read_only_disk_leaves_no_export(
    how, disk, finished_run, tmp_path, monkeypatch
):
    run = copy_run(finished_run.run, tmp_path / "run")
    target = disk.path / "export"
    if how == "full":
        fill_at(monkeypatch, disk, "export_written")
    else:
        disk.read_only()
    result = runner.invoke(
        app,
        [
            "export",
            str(run),
            "--format",
            "keras,tflite",
            "--out",
            str(target),
            "--plain",
        ],
    )
    _assert_storage_error(result, disk)
    assert not target.exists()
    assert not [p for p in disk.path.iterdir() if p.name != "ballast"]


@pytest.mark.parametrize("command", ["evaluate", "predict", "promote"])
def test_evaluate_predict_and_promote_outputs_on_a_read_only_disk(
    command, disk, finished_run, tmp_path
):
    run = copy_run(finished_run.run, tmp_path / "run")
    disk.read_only()
    image = next(p for p in sorted(finished_run.data.rglob("*")) if p.is_file())
    argv = {
        "evaluate": ["evaluate", str(run), "--out", str(disk.path / "ev")],
        "predict": ["predict", str(run), str(image), "--out", str(disk.path / "p.csv")],
        "promote": ["promote", str(run), "--to", str(disk.path / "live")],
    }[command]
    before = _files(run)
    result = runner.invoke(app, [*argv, "--plain"])
    _assert_storage_error(result, disk)
    assert _files(run) == before
