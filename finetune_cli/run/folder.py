"""The run folder: where every run writes what it did.

`runs/<experiment>/<timestamp>/` is created fresh for every run and never
reused, in one rename with its first files already inside. Every file in it
is written atomically (`files.py`). `status.json` says running, completed,
interrupted or failed (with the reason); `runs/<experiment>/latest` points
at the newest completed run. `list_runs` is what `runs list` shows.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import socket
from pathlib import Path
from finetune_cli.files import atomic_write
from finetune_cli.files import now
from finetune_cli.files import storage_error
from finetune_cli.files import write_json
from finetune_cli.run.lock import _owner_alive
from finetune_cli.run.lock import pid_alive


STATUS_FILE = "status.json"


class RunDir:
    """One run's folder and its status record."""

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def create(cls, output_dir, experiment: str, prepare=None) -> "RunDir":
        """A new run folder; never an existing one.

        `prepare(run)` fills the folder while it is still hidden
        (`.new-<pid>`); the folder then appears under its final name in one
        rename, so a visible run folder always has what `prepare` wrote
        (for a run: its config, split and a resumable state).
        """
        parent = Path(output_dir) / experiment
        parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(parent, ".new-*")
        staging = parent / f".new-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            if prepare is not None:
                prepare(cls(staging))
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            for n in range(1000):
                path = parent / (stamp if n == 0 else f"{stamp}-{n}")
                try:
                    path.mkdir()  # reserves the name
                except FileExistsError:
                    continue
                os.replace(staging, path)  # onto the empty reserved folder
                return cls(path)
            raise RuntimeError(f"could not create a run folder under {parent}")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def __truediv__(self, name) -> Path:
        return self.path / name

    def write_text(self, name, text) -> Path:
        return atomic_write(self.path / name, text)

    def write_json(self, name, obj) -> Path:
        return write_json(self.path / name, obj)

    def status(self) -> dict:
        try:
            return json.loads((self.path / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def read_status(self) -> dict:
        """The status, for a command that depends on it (promote).

        Raises:
            DamagedFile: status.json is missing, empty or garbled.
        """
        from finetune_cli.files import read_json

        return read_json(
            self.path / STATUS_FILE,
            todo="it says whether the run completed; if its log.txt ends "
            "with 'done', restore the file from a backup, else resume or "
            "rerun the run",
        )

    def live_status(self, record: dict | None = None) -> dict:
        """The status, with a `running` run whose process is gone read as
        `interrupted` (resumable when its state file is there)."""
        record = self.status() if record is None else record
        if record.get("state") != "running" or _owner_alive(record):
            return record
        return dict(
            record,
            state="interrupted",
            resumable=(self.path / "resume.npz").is_file(),
            reason=(
                f"process {record.get('pid')} on {record.get('host')} is gone "
                "(killed or crashed)"
            ),
        )

    def settle(self) -> dict:
        """`live_status`, written back to status.json when it changed (and
        only if nobody rewrote the status meanwhile, e.g. a resume that
        just started)."""
        seen = self.status()
        record = self.live_status(seen)
        if record != seen and self.status() == seen:
            self.write_json(STATUS_FILE, record)
        return record

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files a killed process left (every hidden
        file or folder in the run folder is one)."""
        removed = []
        for p in sorted(self.path.rglob(".*"), reverse=True):
            if p.parent == self.path and p.name == ".lock":
                continue  # held by this process (run_lock), not a leftover
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
        return removed

    def set_status(self, state: str, reason: str | None = None, **extra):
        record = self.status()
        record.pop("reason", None)
        record.pop("resumable", None)
        record.update(
            state=state,
            updated=now(),
            pid=os.getpid(),
            host=socket.gethostname(),
            **extra,
        )
        record.setdefault("started", record["updated"])
        if reason is not None:
            record["reason"] = reason
        if state in ("completed", "failed"):
            record["finished"] = record["updated"]
        self.write_json(STATUS_FILE, record)

    def mark_latest(self):
        """Point `<experiment>/latest` at this run (atomic symlink swap)."""
        link = self.path.parent / "latest"
        tmp = self.path.parent / f".latest.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            tmp.symlink_to(self.path.name, target_is_directory=True)
            os.replace(tmp, link)
        except OSError:  # file systems without symlinks: a text pointer
            atomic_write(self.path.parent / "latest.txt", self.path.name + "\n")


@contextlib.contextmanager
def staged_folder(target, todo: str = ""):
    """Fill a folder of outputs whole or not at all (a cache entry, an
    export, an evaluation report).

    Yields `.<name>.partial-<pid>` beside `target`. When the block ends, it
    takes `target`'s name in renames: the old folder steps aside, the new
    one is renamed in, then the old one goes, so there is never a moment
    with neither. When the block fails (a signal, a bug, a full disk), the
    partial folder is removed and `target` is left as it was; a full or
    read-only disk is a StorageError naming `target`, with `todo`. What
    killed processes left beside `target` is removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(target.parent, f".{target.name}.partial-*")
    remove_dead_temporaries(target.parent, f".{target.name}.old-*")
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        storage = storage_error(e, todo, where=target)
        if storage is None:
            raise
        raise storage from None


def remove_dead_temporaries(parent, pattern: str) -> None:
    """Remove what killed processes left in `parent`: entries matching
    `pattern` whose name ends in `-<pid>` of a process that is gone."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in parent.glob(pattern):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def list_runs(output_dir, experiment=None) -> list[dict]:
    """Runs under `output_dir`, newest first, with status and key metrics."""
    rows = []
    root = Path(output_dir)
    if not root.is_dir():
        return rows
    for exp in sorted(p for p in root.iterdir() if p.is_dir()):
        if experiment is not None and exp.name != experiment:
            continue
        for run in exp.iterdir():
            if (
                run.is_symlink()
                or not run.is_dir()
                or not (run / STATUS_FILE).is_file()
            ):
                continue
            status = RunDir(run).settle()
            metrics = {}
            with contextlib.suppress(OSError, ValueError):
                metrics = json.loads((run / "metrics.json").read_text())
            runtime = {}
            with contextlib.suppress(OSError, ValueError, AttributeError):
                env = json.loads((run / "environment.json").read_text())
                runtime = env.get("runtime") or {}
            best = metrics.get("best_value")
            test = (metrics.get("test") or {}).get("accuracy")
            rows.append(
                {
                    "experiment": exp.name,
                    "run": run.name,
                    "path": str(run),
                    "state": status.get("state", "?"),
                    "started": status.get("started"),
                    # Numbers stay numbers (for --json); the table formats.
                    "monitor": metrics.get("monitor"),
                    "best": best if isinstance(best, (int, float)) else None,
                    "test_accuracy": (test if isinstance(test, (int, float)) else None),
                    # None for runs made before it was recorded.
                    "deterministic": runtime.get("deterministic"),
                    "reason": status.get("reason"),
                    "resumable": bool(status.get("resumable")),
                }
            )
    rows.sort(key=lambda r: r["started"] or "", reverse=True)
    return rows
