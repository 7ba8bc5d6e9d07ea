"""The experiment lock: one live run per experiment.

`Lock` holds an exclusive `flock` on `<experiment>/.lock` with a record of
its owner (pid, host, start); a second run is refused with exit 6 naming
the holder, and the lock of a process that died is taken over (and said).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from finetune_cli.files import now


LOCK_FILE = ".lock"


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
