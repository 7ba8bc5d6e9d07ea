"""`finetune-cli lr-find`: the learning-rate range test (Smith, 2015).

For one phase of a config, on that phase's real trainable set, optimizer
and loss: train for up to `steps` batches while the learning rate grows
exponentially from `min_lr` to `max_lr`, record the loss of each batch,
smooth it (exponential moving average, bias-corrected) and stop early when
the smoothed loss passes 4x its lowest (the run has diverged). A phase
that `finetune` would train on cached features (or cached augmented
views) runs on them here too.

The suggestion is the learning rate where the smoothed loss falls fastest
(steepest negative slope against log LR), before its minimum; the LR of
the minimum is reported too, since a tenth of it is the other common rule.

The model starts as `finetune` builds it (pretrained base, a new head):
for a later phase that is not the state earlier phases would leave, so
its suggestion is a starting point. Nothing is written into a run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from pathlib import Path
from typing import Optional

import keras
import numpy as np

from finetune_cli.config import checks
from finetune_cli.model import build as model_lib
from finetune_cli.train import losses
from finetune_cli.train import setup as setup_lib
from finetune_cli.train.inputs import PhaseInputs
from finetune_cli.train import summary as summary_lib
from finetune_cli.evaluate import plots
from finetune_cli.console import Output
from finetune_cli.errors import ConfigError
from finetune_cli.files import atomic_write
from finetune_cli.files import write_json

DIVERGED = 4.0  # stop when the smoothed loss passes this many times its lowest
BETA = 0.98  # smoothing of the loss
MIN_DROP = 0.02  # a suggestion needs the loss to fall by at least 2%


@dataclasses.dataclass
class LrFindResult:
    out_dir: Path
    phase: str
    path: str  # the phase's data path (features, views, base)
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested: Optional[float]
    min_loss_lr: Optional[float]
    diverged: bool
    seconds: float


def smooth(losses, beta: float = BETA) -> list[float]:
    """Bias-corrected exponential moving average of the losses."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def suggest(lrs, smoothed, skip: int = 3) -> tuple[Optional[float], Optional[float]]:
    """(steepest-descent LR, LR of the lowest smoothed loss).

    The first `skip` points are left out of the slope: the average has not
    settled there. No suggestion (None) when the loss never fell by
    MIN_DROP of its starting value.
    """
    if len(smoothed) < skip + 3:
        return None, None
    low = int(np.argmin(smoothed))
    if low <= skip or smoothed[low] > (1 - MIN_DROP) * smoothed[skip]:
        return None, float(lrs[low])  # the loss never really fell
    x = np.log10(np.asarray(lrs[: low + 1]))
    y = np.asarray(smoothed[: low + 1])
    slope = np.gradient(y, x)
    steepest = skip + int(np.argmin(slope[skip:]))
    return float(lrs[steepest]), float(lrs[low])


class _RangeTest(keras.callbacks.Callback):
    """Sets each batch's LR and records its loss; stops at `steps` or on
    divergence. `progress(done)` is called after each batch."""

    def __init__(self, min_lr: float, max_lr: float, steps: int, progress=None):
        super().__init__()
        self.min_lr, self.ratio, self.steps = min_lr, max_lr / min_lr, steps
        self.progress = progress
        self.lrs, self.losses, self.smoothed = [], [], []
        self.diverged = False
        self._avg = 0.0  # the moving average of `smooth`, kept as it goes

    def _lr(self, i: int) -> float:
        return self.min_lr * self.ratio ** (i / max(1, self.steps - 1))

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate.assign(self._lr(len(self.lrs)))

    def on_train_batch_end(self, batch, logs=None):
        # Keras' logs hold the epoch's running mean; this batch's loss is
        # what the test needs, so undo the mean.
        mean = float(logs["loss"])
        n = batch + 1
        loss = mean * n - self._epoch_sum
        self._epoch_sum = mean * n
        self.lrs.append(self._lr(len(self.lrs)))
        self.losses.append(loss)
        self._avg = BETA * self._avg + (1 - BETA) * loss
        self.smoothed.append(self._avg / (1 - BETA ** len(self.losses)))
        if not math.isfinite(loss) or self.smoothed[-1] > DIVERGED * min(self.smoothed):
            self.diverged = True
            self.model.stop_training = True
        if len(self.lrs) >= self.steps:
            self.model.stop_training = True
        if self.progress is not None:
            self.progress(len(self.lrs))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_sum = 0.0


def lr_find(
    cfg,
    out: Optional[Output] = None,
    phase: int = 1,
    steps: int = 200,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    out_dir=None,
) -> LrFindResult:
    """Run the range test for phase `phase` (1-based); see the module doc.

    Writes `lr_find.csv` (step, lr, loss, smoothed), `lr_find.png` and
    `lr_find.json` into `out_dir` (default
    `<output_dir>/<name>/lr-find/<phase name>`).
    """
    out = out or Output()
    n = len(cfg.phases)
    if not 1 <= phase <= n:
        raise ConfigError(
            f"--phase: the config has {n} phase(s), numbered 1 to {n}. "
            f"Received: {phase}"
        )
    if not 0 < min_lr < max_lr:
        raise ConfigError(
            f"--min-lr and --max-lr: need 0 < min < max. Received: "
            f"min_lr={min_lr}, max_lr={max_lr}"
        )
    checks.check(cfg)
    start = time.monotonic()
    setup = setup_lib.prepare(cfg, out)
    index = setup.index
    plan = setup.plans[phase - 1]
    model, base = setup.model_for(plan)  # at the phase's image size
    spec = plan.phase
    if setup.save_verdicts is not None:
        setup.save_verdicts()
    cfg = setup.cfg  # data.batch_size: auto resolved
    batch = cfg.data.batch_size
    steps_per_epoch = max(1, len(index.splits["train"]) // batch)
    epochs = math.ceil(steps / steps_per_epoch)
    class_weight = setup.class_weights[phase - 1]
    if plan.path in ("base", "activations"):
        model_lib.apply_trainable(model, base, plan.layer_names, spec.batchnorm)
    inputs = PhaseInputs(setup, out, derive=False)
    inputs.build(plan)
    fit_model, train, _val = inputs.for_phase(
        plan, 0, epochs, per_epoch=steps_per_epoch * batch
    )
    out.step(
        f"lr-find: phase {phase} ({spec.name}, "
        f"{summary_lib.describe_path(plan.path, cfg, plan)}), {spec.optimizer.name}, "
        f"{min_lr:g} to {max_lr:g} over up to {steps} steps"
    )
    optimizer = keras.optimizers.get(
        {
            "class_name": spec.optimizer.name,
            "config": {"learning_rate": min_lr, **spec.optimizer.params()},
        }
    )
    fit_model.compile(
        optimizer=optimizer,
        loss=losses.loss_for(spec, **setup.task(phase - 1)),
    )
    with out.counter(steps, "lr-find", unit="steps", final=False) as progress:
        test = _RangeTest(min_lr, max_lr, steps, progress)
        fit_model.fit(
            train,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            class_weight=class_weight,
            callbacks=[test],
            verbose=0,
            shuffle=False,
        )
    suggested, low = suggest(test.lrs, test.smoothed)
    out_dir = Path(
        out_dir
        if out_dir is not None
        else Path(cfg.experiment.output_dir)
        / cfg.experiment.name
        / "lr-find"
        / spec.name
    )
    result = LrFindResult(
        out_dir,
        spec.name,
        plan.path,
        test.lrs,
        test.losses,
        test.smoothed,
        suggested,
        low,
        test.diverged,
        time.monotonic() - start,
    )
    _write(result)
    return result


def _write(r: LrFindResult) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "lr", "loss", "smoothed"])
    for i, (lr, loss, sm) in enumerate(zip(r.lrs, r.losses, r.smoothed, strict=True)):
        w.writerow([i + 1, f"{lr:.6g}", f"{loss:.6g}", f"{sm:.6g}"])
    atomic_write(r.out_dir / "lr_find.csv", buf.getvalue())
    plots.lr_find_png(r.lrs, r.smoothed, r.suggested, r.out_dir / "lr_find.png")
    write_json(
        r.out_dir / "lr_find.json",
        {
            "phase": r.phase,
            "path": r.path,
            "steps": len(r.lrs),
            "diverged": r.diverged,
            "suggested_lr": r.suggested,
            "min_loss_lr": r.min_loss_lr,
            "seconds": round(r.seconds, 3),
        },
    )
