"""The trials of a search: head-only trials on the feature cache (seconds
each) or whole `finetune` runs, and the ranked trials table.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import keras
import numpy as np

from finetune_cli import config as config_lib
from finetune_cli.cache import heads as feature_training
from finetune_cli.model import build as model_lib
from finetune_cli.train import callbacks as callbacks_lib
from finetune_cli.train import monitor as monitor_lib
from finetune_cli.train import phases as phases_lib
from finetune_cli.train.inputs import PhaseInputs
from finetune_cli.config import spaces as search_lib
from finetune_cli.console import Output
from finetune_cli.files import atomic_write


def fmt_value(v) -> str:
    """A searched value, short (4 significant digits for floats)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class CachedTrials:
    """Trials that train the head phases on the feature cache."""

    def __init__(self, setup, out):
        cfg, index, base = setup.cfg, setup.index, setup.base
        self.cfg, self.index = cfg, index
        self.phases = []
        for p in setup.plans:
            if p.path not in ("features", "views"):
                break
            self.phases.append(p)
        inputs = PhaseInputs(setup, out, derive=False)
        self.cached = {}
        for p in self.phases:
            inputs.build(p)
            self.cached[p.path] = inputs.cached(p)
        self.dim = int(base.output.shape[-1])
        self.num_classes = len(index.class_names)

    def __call__(self, values: dict, trial_id: str) -> float:
        tree = search_lib.resolved_with(self.cfg, values)
        cfg = config_lib.validate(tree)
        keras.utils.set_random_seed(cfg.experiment.seed)
        inputs = keras.Input((self.dim,), name="features")
        x = inputs
        multi = self.index.multi_label
        for layer in model_lib.build_head(cfg.head, self.num_classes, multi):
            x = layer(x)
        head = keras.Model(inputs, x, name="head")
        monitor = cfg.experiment.monitor
        lower = monitor_lib.lower_is_better(monitor)
        best = None
        n = len(self.index.splits["train"])
        steps = -(-n // cfg.data.batch_size)
        epoch = 0
        for plan in self.phases:
            phase = cfg.phases[plan.index]
            cached = self.cached[plan.path]
            phases_lib.compile_phase(
                head,
                phase,
                steps,
                self.num_classes,
                False,
                multi_label=multi,
                label_weight=phases_lib.resolve_label_weight(
                    phase, plan.index, self.index
                ),
            )
            train = feature_training.feature_dataset(
                *cached.train,
                self.num_classes,
                cfg.data.batch_size,
                seed=cfg.experiment.seed,
                epochs=(epoch, epoch + phase.epochs),
            )
            history = head.fit(
                train,
                validation_data=cached.val_dataset(),
                initial_epoch=epoch,
                epochs=epoch + phase.epochs,
                steps_per_epoch=steps,
                class_weight=phases_lib.resolve_class_weight(
                    phase, plan.index, self.index
                ),
                callbacks=callbacks_lib.phase_callbacks(phase),
                verbose=0,
                shuffle=False,  # the dataset orders each epoch itself
            )
            epoch += phase.epochs
            seen = [v for v in history.history.get(monitor, []) if np.isfinite(v)]
            if seen:
                here = min(seen) if lower else max(seen)
                if best is None or (here < best if lower else here > best):
                    best = here
        if best is None:
            raise RuntimeError(f"{monitor} was never a number")
        return float(best)


class FullTrials:
    """Trials that are whole `finetune` runs, in
    `<tune dir>/trials/trial-<id>/` (untracked in MLflow)."""

    def __init__(self, cfg, tune_dir):
        self.cfg, self.root = cfg, Path(tune_dir) / "trials"

    def __call__(self, values: dict, trial_id: str) -> float:
        from finetune_cli.train import job

        tree = search_lib.resolved_with(self.cfg, values)
        tree["experiment"].update(
            output_dir=str(self.root),
            name=f"trial-{trial_id}",
            tracking={"mlflow": None},
        )
        result = job.finetune(
            config_lib.validate(tree), Output(file=io.StringIO(), plain=True)
        )
        value = result.metrics.get("best_value")
        if value is None:
            raise RuntimeError(f"{self.cfg.experiment.monitor} was never a number")
        return float(value)


def ranked_rows(oracle, spaces, monitor) -> list[dict]:
    rows = []
    for trial in oracle.trials.values():
        rows.append(
            {
                "trial": trial.trial_id,
                "status": trial.status,
                "score": trial.score,
                "values": {
                    s.key: trial.hyperparameters.values.get(s.key) for s in spaces
                },
                "message": ((trial.message or "").strip().splitlines() or [""])[-1],
            }
        )
    lower = monitor_lib.lower_is_better(monitor)
    done = [r for r in rows if r["status"] == "COMPLETED" and r["score"] is not None]
    rest = [r for r in rows if r not in done]
    done.sort(key=lambda r: (r["score"] if lower else -r["score"], int(r["trial"])))
    return done + sorted(rest, key=lambda r: int(r["trial"]))


def write_trials(path, rows, spaces, monitor) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "trial", "status", monitor, *[s.key for s in spaces]])
    for i, r in enumerate(rows, 1):
        score = "" if r["score"] is None else f"{r['score']:.6f}"
        w.writerow(
            [i, r["trial"], r["status"], score, *[r["values"][s.key] for s in spaces]]
        )
    atomic_write(path, buf.getvalue())
