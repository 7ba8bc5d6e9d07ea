"""Locks: one live run per experiment, one command at a time in a run
folder, one export into a folder.

`Lock` holds an exclusive `flock` with a record of its owner (pid, host,
start, command); a second taker is refused with exit 6 naming the holder
(or waits, where the caller says so), and the lock of a process that died
is taken over (and said). The locks:

- `<experiment>/.lock`: held by `finetune` for the whole run;
- `<run>/.lock` (`run_lock`): held by `finetune` (new or resumed) and by
  `evaluate`, `export`, `explain` and `promote` of that run, so none of
  them writes into a run folder another is writing; `predict` and `runs
  list` only read files that are replaced atomically and take no lock;
- `.<folder>.lock` beside an export folder, and beside a promotion link.

A process may take a lock it already holds (the run's own end-of-run
evaluation, a promotion's evaluation): it is counted, not refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from finetune_cli.files import now


LOCK_FILE = ".lock"
# Locks this process holds, by path: taken again, they are counted.
_HELD: dict[str, int] = {}


def run_lock(run_dir, *, wait: float = 0.0, on_wait=None) -> "Lock":
    """The lock on one run folder (see the module docstring)."""
    return Lock(
        Path(run_dir) / LOCK_FILE,
        f"run folder {run_dir}",
        wait,
        on_wait,
        reentrant=True,
    )


def _owner_alive(record: dict) -> bool:
    pid, host = record.get("pid"), record.get("host")
    if not isinstance(pid, int):
        return False
    if host not in (None, socket.gethostname()):
        return True  # another machine's process: we cannot tell
    return pid_alive(pid)


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
        reentrant: this process may take it again while it holds it (the
            second taking is counted, not refused).
    """

    def __init__(
        self, path, what: str, wait: float = 0.0, on_wait=None, reentrant=False
    ):
        self.path = Path(path)
        self.what = what
        self.wait = wait
        self.on_wait = on_wait
        self.reentrant = reentrant
        self.held = False
        self.took_over: dict | None = None
        self._fd: int | None = None

    def acquire(self) -> "Lock":
        import fcntl
        import time

        from finetune_cli.errors import LockedError

        key = os.path.abspath(self.path)
        if self.reentrant and key in _HELD:
            _HELD[key] += 1
            self.held, self._fd = True, None
            return self
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
                doing = f" ({holder['command']})" if holder.get("command") else ""
                raise LockedError(
                    f"{self.what} is in use by process {holder.get('pid')}"
                    f"{doing} on {holder.get('host')} since "
                    f"{holder.get('since')} (lock {self.path}); wait for it "
                    "to finish"
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
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": now(),
                "command": _command(),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            self.held = True
            _HELD[key] = 1
            return self

    def release(self) -> None:
        key = os.path.abspath(self.path)
        if self.held and _HELD.get(key, 0) > 1:
            _HELD[key] -= 1
            self.held = False
            return
        _HELD.pop(key, None)
        if self.held and self._fd is not None:
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


def _command() -> str:
    """What this process is doing, for the holder's record: the command
    and its first argument (`finetune --resume`, `evaluate`, ...)."""
    import sys

    words = [w for w in sys.argv[1:3] if "/" not in w]
    return " ".join(words)[:60]


def _read_record(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data or b"{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}
