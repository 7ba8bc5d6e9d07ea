"""The run directory: where every run writes what it did.

`runs/<experiment>/<timestamp>/` is created fresh for every run and never
reused. Every file in it is written atomically (a temporary file in the same
folder, then a rename), so a crash leaves either the old file or the new one,
never half of one. `status.json` says running, completed or failed (with the
reason); `runs/<experiment>/latest` points at the newest completed run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
from pathlib import Path

STATUS_FILE = "status.json"
LOCK_FILE = ".lock"


def atomic_write(path, data) -> Path:
    """Write text or bytes to `path` through a temporary file and a rename."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same suffix); rename on success.

    The suffix is kept because Keras picks the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem.split('.')[0]}.", suffix=suffix,
                               dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # Keras refuses to overwrite some files; let it create it.
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


class RunDir:
    """One run's folder and its status record."""

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def create(cls, output_dir, experiment: str) -> "RunDir":
        """A new, empty run folder; never an existing one."""
        parent = Path(output_dir) / experiment
        parent.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            path = parent / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path)
        raise RuntimeError(f"could not create a run folder under {parent}")

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

    def set_status(self, state: str, reason: str | None = None, **extra):
        record = self.status()
        record.update(state=state, updated=now(), pid=os.getpid(), **extra)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """An exclusive lock file; a lock left by a dead process is taken over.

    Args:
        path: the lock file.
        what: what it protects, for the error message.
    """

    def __init__(self, path, what: str):
        self.path = Path(path)
        self.what = what
        self.held = False
        self.took_over: dict | None = None

    def acquire(self) -> "Lock":
        import socket

        from finetune_cli.errors import LockedError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}
                pid = holder.get("pid")
                same_host = holder.get("host") in (None, me["host"])
                if isinstance(pid, int) and (not same_host or _alive(pid)):
                    raise LockedError(
                        f"{self.what} is in use by process {pid} on "
                        f"{holder.get('host')} since {holder.get('since')} "
                        f"(lock {self.path}); wait for it to finish, or delete "
                        "the lock if that process is gone") from None
                if not holder:
                    # Being written right now by its owner, or left empty by
                    # a crash: give a live writer a moment.
                    import time

                    time.sleep(0.2)
                    try:
                        if json.loads(self.path.read_text() or "{}"):
                            continue
                    except (OSError, ValueError):
                        pass
                self.took_over = holder
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise LockedError(f"could not lock {self.what} ({self.path})")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


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
            if run.is_symlink() or not run.is_dir() or not (run / STATUS_FILE).is_file():
                continue
            status = RunDir(run).status()
            metrics = {}
            with contextlib.suppress(OSError, ValueError):
                metrics = json.loads((run / "metrics.json").read_text())
            best = metrics.get("best_value")
            test = (metrics.get("test") or {}).get("accuracy")
            rows.append({
                "experiment": exp.name, "run": run.name, "path": str(run),
                "state": status.get("state", "?"),
                "started": status.get("started"),
                "best": (f"{metrics.get('monitor')} {best:.4f}"
                         if isinstance(best, (int, float)) else None),
                "test_accuracy": f"{test:.4f}" if isinstance(test, (int, float)) else None,
                "reason": status.get("reason"),
            })
    rows.sort(key=lambda r: r["started"] or "", reverse=True)
    return rows
