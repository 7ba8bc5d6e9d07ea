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
import shutil
import socket
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
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem.split('.')[0]}.", suffix=suffix, dir=path.parent
    )
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


def _owner_alive(record: dict) -> bool:
    pid, host = record.get("pid"), record.get("host")
    if not isinstance(pid, int):
        return False
    if host not in (None, socket.gethostname()):
        return True  # another machine's process: we cannot tell
    return pid_alive(pid)


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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """An exclusive lock on a file, held with `flock` for the life of the
    process: the kernel drops it when the holder dies, however it dies, so
    a lock left by a killed run never blocks the next one.

    The file also holds who took it (pid, host, since), for messages; a
    file left behind by a dead holder is reported in `took_over`.

    Args:
        path: the lock file.
        what: what it protects, for the error message.
        wait: seconds to wait for a live holder before giving up (0: fail
            at once with LockedError).
        on_wait: called once with the holder's record when waiting starts.
    """

    def __init__(self, path, what: str, wait: float = 0.0, on_wait=None):
        self.path = Path(path)
        self.what = what
        self.wait = wait
        self.on_wait = on_wait
        self.held = False
        self.took_over: dict | None = None
        self._fd: int | None = None

    def acquire(self) -> "Lock":
        import fcntl
        import time

        from finetune_cli.errors import LockedError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait
        announced = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    if not announced and self.on_wait is not None:
                        self.on_wait(holder)
                    announced = True
                    time.sleep(0.05)
                    continue
                raise LockedError(
                    f"{self.what} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('since')} "
                    f"(lock {self.path}); wait for it to finish"
                ) from None
            # The holder we waited for may have removed the file: then our
            # lock is on a file nobody else will open; take a fresh one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_record(fd)
            if previous:
                self.took_over = previous
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            self.held = True
            return self

    def release(self) -> None:
        if self.held:
            # Unlink while still holding it, so the next taker locks a
            # fresh file.
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _read_record(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data or b"{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


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
