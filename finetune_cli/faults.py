"""Named crash points, for testing that a run survives dying anywhere.

The code calls `point("name")` at the instants where a crash is most likely
to break a promise (an epoch's state just saved, a phase just ended, a model
half-written, a promotion half-done). Normally this does nothing. Tests set

    FINETUNE_CLI_FAULT=name        # the process SIGKILLs itself at `name`
    FINETUNE_CLI_FAULT=name@3      # ... the third time it gets there

and, to hold a process at a point until the test lets it go,

    FINETUNE_CLI_PAUSE=name=/path/to/release-file

which writes `<release-file>.waiting` and waits (up to 10 minutes) for the
release file to exist, and, for what depends on elapsed time (the time
limit),

    FINETUNE_CLI_CLOCK_STEP=60     # every `clock()` call is 60 s later

so a test decides when a deadline falls instead of sleeping for it.
Nothing else reads these variables.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_hits: dict[str, int] = {}
_ticks = [0]


def clock() -> float:
    """Seconds on a monotonic clock; a fake one under FINETUNE_CLI_CLOCK_STEP."""
    step = os.environ.get("FINETUNE_CLI_CLOCK_STEP")
    if not step:
        return time.monotonic()
    _ticks[0] += 1
    return _ticks[0] * float(step)


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
