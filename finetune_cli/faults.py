"""Named crash points, for testing that a run survives dying anywhere.

The code calls `point("name")` at the instants where a crash is most likely
to break a promise (an epoch's state just saved, a phase just ended, a model
half-written, a promotion half-done). Normally this does nothing. Tests set

    FINETUNE_CLI_FAULT=name        # the process SIGKILLs itself at `name`
    FINETUNE_CLI_FAULT=name@3      # ... the third time it gets there

and, to hold a process at a point until the test lets it go,

    FINETUNE_CLI_PAUSE=name=/path/to/release-file

which writes `<release-file>.waiting` and waits (up to 10 minutes) for the
release file to exist. Nothing else reads these variables.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_hits: dict[str, int] = {}


def point(name: str) -> None:
    """A named instant where a test may kill or hold this process."""
    fault = os.environ.get("FINETUNE_CLI_FAULT")
    pause = os.environ.get("FINETUNE_CLI_PAUSE")
    if not fault and not pause:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if fault:
        target, _, nth = fault.partition("@")
        if target == name and _hits[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
    if pause:
        target, _, release = pause.partition("=")
        if target == name and release:
            _wait_for(Path(release))


def _wait_for(release: Path, limit: float = 600.0) -> None:
    Path(f"{release}.waiting").write_text(str(os.getpid()))
    t0 = time.monotonic()
    while not release.exists() and time.monotonic() - t0 < limit:
        time.sleep(0.02)
