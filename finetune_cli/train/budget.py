"""The time limit of a run (`experiment.time_limit`, `--time-limit`).

The run stops after the epoch that would let the next one cross the
limit, estimated from the longest epoch so far in this session: the state
is committed, the run is resumable, and it exits with 7. Time counts from
the start of the command (pre-flight and caches included); the end-of-run
evaluation is not budgeted. The clock is `faults.clock()`, which tests
replace with a fake one.
"""

from __future__ import annotations

from typing import Optional

from finetune_cli import faults
from finetune_cli.config.schema import duration_seconds
from finetune_cli.errors import TimeLimitReached


class Budget:
    """Elapsed time against a limit (`None`: no limit)."""

    def __init__(self, limit, start: Optional[float] = None):
        self.limit = None if limit is None else duration_seconds(limit)
        self.shown = limit
        self.start = faults.clock() if start is None else start
        self._last = self.start
        self.longest = 0.0

    def after_epoch(self, epoch: int, resume_hint: str, more: bool = True) -> None:
        """Raise TimeLimitReached when another epoch would cross the limit
        (`more`: whether the run has another epoch at all)."""
        if self.limit is None:
            return
        now = faults.clock()
        self.longest = max(self.longest, now - self._last)
        self._last = now
        elapsed = now - self.start
        if more and elapsed + self.longest > self.limit:
            raise TimeLimitReached(
                f"time limit {self.shown} ({self.limit:g} s): stopped after "
                f"epoch {epoch}, {elapsed:.0f} s in, as the next epoch (about "
                f"{self.longest:.0f} s) would cross it; the state is committed. "
                f"Resume with: finetune-cli finetune --resume {resume_hint}"
            )
