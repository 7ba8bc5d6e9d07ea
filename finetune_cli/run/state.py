"""The run state: everything a run needs to continue, as data.

A run is a sequence of commits of one `RunState`, saved atomically to
`resume.npz` in the run folder:

- when the run folder is created (phase 0, epoch 0, the initial weights),
- after every epoch (weights, optimizer variables, callback counters, the
  best weights of the phase and of the run, the history),
- at every phase transition (the phase's best weights restored and carried
  into the next phase; the optimizer state dropped, since the next phase
  compiles a fresh one),
- when training ends and the end-of-run evaluation starts (`stage:
  finalize`).

`finetune --resume RUN` loads the last commit and continues from it: at
most the unfinished epoch is redone. Every other file of the run folder
(`history.csv`, `metrics.json`, `best.keras`, `last.keras`) is a view of
the state and is rewritten from it on resume, so a crash between two of
those writes cannot make them disagree.

The file is a NumPy archive: `state` (JSON: the fields below, `format`,
the finetune-cli/Keras/TensorFlow versions and the resolved config) and one
array per variable, `model_<i>`, `opt_<i>`, `best_phase_<i>`, `best_run_<i>`.
`format` is bumped whenever the layout changes; a resume with another
format, another config or another model layout says what differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from zipfile import BadZipFile
from pathlib import Path
from typing import Optional

import numpy as np

from finetune_cli.errors import ConfigError
from finetune_cli.errors import short
from finetune_cli.files import damaged
from finetune_cli.files import atomic_path

FILE = "resume.npz"
TODO = (
    "the run cannot continue from it (the models it saved, best.keras and "
    "last.keras, may still be evaluated); start a new run with "
    "`finetune-cli finetune RUN/config.yaml`"
)
FORMAT = 2
_ARRAYS = ("model", "opt", "best_phase", "best_run")


@dataclasses.dataclass
class RunState:
    """One commit of a run (see the module docstring).

    Attributes:
        stage: "train" while phases remain, "finalize" once the end-of-run
            evaluation has started.
        phase: index of the phase being run (== number of phases done).
        phase_start: the epoch count when the current phase started.
        epoch: completed epochs, over all phases.
        phase_started: the current phase has compiled and trained at least
            one epoch; `opt` and `callbacks` belong to it.
        phase_finished: the current phase's training is over (last epoch
            or early stopping) but its end is not committed yet.
        history: one row per completed epoch (history.csv).
        phase_metrics: one entry per completed phase (metrics.json).
        callbacks: EarlyStopping/ReduceLROnPlateau counters of the phase.
        best_phase, best_phase_epoch: best monitor value in this phase.
        best_run, best_run_epoch: best monitor value of the whole run.
        model, opt, best_phase_weights, best_run_weights: variable values.
        versions: finetune-cli/Keras/TensorFlow versions that wrote the
            state (set by `load`; `save` writes the ones it is given).
    """

    stage: str = "train"
    phase: int = 0
    phase_start: int = 0
    epoch: int = 0
    phase_started: bool = False
    phase_finished: bool = False
    history: list = dataclasses.field(default_factory=list)
    phase_metrics: list = dataclasses.field(default_factory=list)
    versions: dict = dataclasses.field(default_factory=dict)
    callbacks: list = dataclasses.field(default_factory=list)
    best_phase: Optional[float] = None
    best_phase_epoch: Optional[int] = None
    best_run: Optional[float] = None
    best_run_epoch: Optional[int] = None
    model: list = dataclasses.field(default_factory=list, repr=False)
    opt: list = dataclasses.field(default_factory=list, repr=False)
    best_phase_weights: list = dataclasses.field(default_factory=list, repr=False)
    best_run_weights: list = dataclasses.field(default_factory=list, repr=False)

    def start_phase(self) -> None:
        """The current phase begins: fresh optimizer, counters and best."""
        self.phase_started = True
        self.phase_finished = False
        self.phase_start = self.epoch
        self.opt, self.callbacks = [], []
        self.best_phase = self.best_phase_epoch = None
        self.best_phase_weights = []

    def end_phase(self, entry: dict, weights: list) -> None:
        """The current phase is done; the next one starts from `weights`."""
        self.phase_metrics.append(entry)
        self.phase += 1
        self.phase_started = self.phase_finished = False
        self.phase_start = self.epoch
        self.model = weights
        self.opt, self.callbacks = [], []
        self.best_phase = self.best_phase_epoch = None
        self.best_phase_weights = []

    def save(self, path, *, config: dict, versions: dict) -> None:
        """Write atomically (temporary file, fsync, rename)."""
        meta = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in ("model", "opt", "best_phase_weights", "best_run_weights")
        }
        arrays = {}
        # The run's best is usually the phase's best: store it once.
        same = (
            self.best_run_epoch is not None
            and self.best_run_epoch == self.best_phase_epoch
            and len(self.best_phase_weights) > 0
        )
        values = {
            "model": self.model,
            "opt": self.opt,
            "best_phase": self.best_phase_weights,
            "best_run": [] if same else self.best_run_weights,
        }
        for prefix in _ARRAYS:
            for i, v in enumerate(values[prefix]):
                arrays[f"{prefix}_{i}"] = np.asarray(v)
            meta[f"n_{prefix}"] = len(values[prefix])
        meta.update(
            format=FORMAT, best_run_is_phase_best=same, config=config, versions=versions
        )
        arrays["state"] = np.array(json.dumps(meta))
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())


# Keys a resume may change: budgets of a session, not what the run computes.
SESSION_KEYS = ("experiment.time_limit",)


def load(path, *, config: dict, versions: dict, normalize=None) -> RunState:
    """The state saved at `path`, checked against the config and versions
    of this resume.

    Args:
        normalize: turns the saved config into the current schema's form
            (keys added since the run started, at their defaults), so only
            real changes count.

    Raises:
        ConfigError: no state, or a state of another format.
        DamagedFile: the run's config.yaml differs from the config the
            state records (edited or damaged; the changed keys are named).
    """
    path = Path(path)
    if not path.is_file():
        if (path.parent / "status.json").is_file():
            raise damaged(path, "missing", TODO)
        raise ConfigError(
            f"--resume: {path.parent} has no {FILE}; it is not "
            "a run folder finetune-cli can resume"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["state"]))
            if meta.get("format") != FORMAT:
                raise ConfigError(
                    f"--resume: {path} was written by finetune-cli "
                    f"{meta.get('versions', {}).get('finetune_cli', '?')} "
                    f"(state format {meta.get('format')}); this finetune-cli "
                    f"{versions.get('finetune_cli')} reads format {FORMAT}. "
                    "Resume it with the version that started it"
                )
            arrays = {
                p: [z[f"{p}_{i}"] for i in range(meta[f"n_{p}"])] for p in _ARRAYS
            }
    except (OSError, ValueError, KeyError, EOFError, TypeError, BadZipFile) as e:
        raise damaged(path, f"unreadable ({short(str(e), 80)})", TODO) from None
    saved = meta.get("config") or {}
    if normalize is not None:
        saved = normalize(saved)
    changed = [c for c in diff_config(saved, config) if not c.startswith(SESSION_KEYS)]
    if changed:
        # A resume reads the run's own config.yaml: a difference from the
        # config recorded in the state is that file edited or damaged.
        raise damaged(
            path.parent / "config.yaml",
            f"differs from the config the run started with (recorded in "
            f"{FILE}): {'; '.join(changed[:5])}",
            "a resumed run must run the config it started with: restore the "
            "file, or start a new run for a new config",
        )
    fields = {f.name for f in dataclasses.fields(RunState)}
    state = RunState(**{k: v for k, v in meta.items() if k in fields})
    state.model, state.opt = arrays["model"], arrays["opt"]
    state.best_phase_weights = arrays["best_phase"]
    state.best_run_weights = (
        arrays["best_phase"]
        if meta.get("best_run_is_phase_best")
        else arrays["best_run"]
    )
    return state


def diff_config(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Key paths whose values differ, as `key (old -> new)`."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff_config(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += diff_config(a, b, f"{prefix}{i}.")
        return out
    if old != new:
        return [f"{prefix.rstrip('.')} ({_short(old)} -> {_short(new)})"]
    return []


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def assign(variables, values, what: str) -> None:
    """Assign saved values to variables; a count or shape mismatch is an
    error that says so, never a silent truncation."""
    variables = list(variables)
    if len(variables) != len(values):
        raise ConfigError(
            f"--resume: the saved {what} has {len(values)} variables, the "
            f"rebuilt one has {len(variables)}; the model code or the "
            "Keras/TensorFlow version changed since the run started"
        )
    for var, value in zip(variables, values, strict=True):
        if tuple(var.shape) != tuple(np.shape(value)):
            raise ConfigError(
                f"--resume: the saved {what} variable {var.path} has shape "
                f"{tuple(np.shape(value))}, the rebuilt one "
                f"{tuple(var.shape)}; the model changed since the run started"
            )
        var.assign(value)


def values(variables) -> list[np.ndarray]:
    """Copies of the variables' current values."""
    return [np.array(v.numpy(), copy=True) for v in variables]
