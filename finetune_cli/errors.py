"""Errors the user can act on, each with its documented exit code.

The CLI turns any `FinetuneError` into one message and its exit code, with
no traceback (unless `--debug`). Anything else is a bug and exits with 1.

| code | meaning |
| ---- | ------- |
| 0 | success |
| 1 | unexpected error (a bug: rerun with `--debug` and report it) |
| 2 | usage or config error |
| 3 | data error (missing, unreadable or inconsistent images/labels) |
| 4 | a quality gate failed |
| 5 | interrupted; the run can be resumed |
| 6 | locked: another live run holds the run folder or experiment |
| 7 | stopped by the time limit; the run can be resumed |
| 8 | damaged: a file finetune-cli wrote (run, cache, export) is garbled or gone |
| 9 | storage: a disk is full or read-only; what was written before is intact |
"""

import difflib
import reprlib

EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_GATE = 4
EXIT_INTERRUPTED = 5
EXIT_LOCKED = 6
EXIT_TIME_LIMIT = 7
EXIT_DAMAGED = 8
EXIT_STORAGE = 9


class FinetuneError(Exception):
    """Base class: a problem the user can fix, reported without traceback."""

    exit_code = EXIT_UNEXPECTED
    kind = "error"


class ConfigError(FinetuneError):
    """The config, an override or a command-line option is invalid."""

    exit_code = EXIT_CONFIG
    kind = "config error"


class DataError(FinetuneError):
    """The data does not match what the config declares."""

    exit_code = EXIT_DATA
    kind = "data error"


class GateError(FinetuneError):
    """A quality gate failed."""

    exit_code = EXIT_GATE
    kind = "gate failed"


class InterruptedRun(FinetuneError):
    """The run stopped early on a signal; its state can be resumed."""

    exit_code = EXIT_INTERRUPTED
    kind = "interrupted"


class TimeLimitReached(FinetuneError):
    """The run stopped after an epoch because the next one would have
    crossed its time limit; its state can be resumed."""

    exit_code = EXIT_TIME_LIMIT
    kind = "stopped"


class LockedError(FinetuneError):
    """Another live process holds the lock."""

    exit_code = EXIT_LOCKED
    kind = "locked"


class DamagedFile(FinetuneError):
    """A file finetune-cli wrote earlier (a run's state, model, labels,
    split record, status, config; a cache or export file) is truncated,
    emptied, garbled or gone. The message names it and what to do."""

    exit_code = EXIT_DAMAGED
    kind = "damaged file"


class StorageError(FinetuneError):
    """A write failed because the disk is full or read-only (or not ours to
    write). Every file is written atomically, so what was there before is
    intact; a run can be resumed once there is room."""

    exit_code = EXIT_STORAGE
    kind = "storage error"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist = 3, 4, 4
_REPR.maxtuple, _REPR.maxset, _REPR.maxstring, _REPR.maxother = 4, 4, 60, 60


def short(value, limit: int = 80) -> str:
    """A readable excerpt of a value for `Received: ...` (bounded in time
    and length, whatever the value is)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def relative_note(path) -> str:
    """For a "not found" message: where a relative path was looked for
    (config paths are resolved against the current directory, not the
    config file's folder), or '' for an absolute one."""
    import os

    if os.path.isabs(str(path)):
        return ""
    return (
        f" (a relative path: looked for in the current directory {os.getcwd()}, "
        "not beside the config file)"
    )


def did_you_mean(word: str, options) -> str:
    """A ' (did you mean ...?)' hint (case-insensitive), or '' when nothing
    is close."""
    lowered = {str(o).lower(): o for o in options}
    match = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[match[0]]!r}?)" if match else ""
