"""SIGTERM read as Ctrl-C, for every command.

Schedulers, `timeout` and cron stop a job with SIGTERM; users stop it with
Ctrl-C. Both raise KeyboardInterrupt inside the block, so a command's own
cleanup (temporary names removed, a run's status set to interrupted) runs
the same way for either, and the CLI exits 5.
"""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while in the block (on the main
    thread; elsewhere signals are left alone)."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
