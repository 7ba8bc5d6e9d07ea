"""The Keras callbacks of a phase, and the two the trainer adds.

`phase_callbacks` builds what a phase declares (EarlyStopping,
ReduceLROnPlateau, TensorBoard); their counters are saved in the run state
(`callback_state`) and put back on resume (`RestoreCallbacks`).
`EpochHook` hands every finished epoch to the trainer, after the phase's
own callbacks, so EarlyStopping's decision is in when the state is saved.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import keras

from finetune_cli import faults


def phase_callbacks(phase, tensorboard_dir=None) -> list:
    """The phase's Keras callbacks (monitor direction by Keras' "auto")."""
    cbs = []
    es = phase.callbacks.early_stopping
    if es is not None:
        cbs.append(
            keras.callbacks.EarlyStopping(
                monitor=es.monitor,
                patience=es.patience,
                min_delta=es.min_delta,
                mode="auto",
            )
        )
    rl = phase.callbacks.reduce_lr_on_plateau
    if rl is not None:
        cbs.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=rl.monitor,
                factor=rl.factor,
                patience=rl.patience,
                min_lr=rl.min_lr,
                mode="auto",
                verbose=0,
            )
        )
    if tensorboard_dir is not None:
        cbs.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir)))
    return cbs


def uses_ema(model) -> bool:
    return bool(getattr(model.optimizer, "use_ema", False))


def ema_callbacks(model) -> list:
    """Validation on the weights' moving average when the optimizer keeps
    one (`optimizer.use_ema`); the model holds the trained weights again
    once validation is done, so the state committed after an epoch is
    what training continues from."""
    return [keras.callbacks.SwapEMAWeights()] if uses_ema(model) else []


def epoch_weights(model, fit_model) -> tuple[list, list]:
    """(the weights `model` trained to, the weights kept as the epoch's
    result): the same, or with EMA (which validation scored) the moving
    average of the trained ones."""
    from finetune_cli.run import state as runstate

    trained = runstate.values(model.variables)
    if not uses_ema(fit_model):
        return trained, trained
    return trained, ema_values(model.variables, fit_model.optimizer, trained)


def ema_values(variables, optimizer, values) -> list:
    """`values` (of `variables`) with each trainable variable's value
    replaced by the optimizer's moving average of it."""
    import numpy as np

    average = {
        id(v): a
        for v, a in zip(
            optimizer._trainable_variables,
            optimizer._model_variables_moving_average,
            strict=True,
        )
    }
    return [
        np.array(average[id(v)].numpy(), copy=True) if id(v) in average else x
        for v, x in zip(variables, values, strict=True)
    ]


# Counters that make EarlyStopping and ReduceLROnPlateau continue where
# they were after a resume.
_CALLBACK_FIELDS = {
    keras.callbacks.EarlyStopping: ("wait", "best", "stopped_epoch", "best_epoch"),
    keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
}


def callback_state(cb) -> Optional[dict]:
    """A callback's counters as JSON-able numbers (None: nothing to keep)."""
    for cls, fields in _CALLBACK_FIELDS.items():
        if isinstance(cb, cls):
            return {f: _finite(getattr(cb, f, None)) for f in fields}
    return None


def restore_callbacks(callbacks, states) -> None:
    """Set counters saved by `callback_state` (after Keras' own reset in
    `on_train_begin`, so call this from a later `on_train_begin`)."""
    for cb, st in zip(callbacks, states, strict=True):
        for field, value in (st or {}).items():
            if value is not None:
                setattr(cb, field, value)


def _finite(v):
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v):
        return None
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


class EpochHook(keras.callbacks.Callback):
    """Calls `end_epoch(epoch, logs, seconds, lr_start)` after every epoch, with a
    progress bar of `steps` batches; the fault point `phase_first_batch`
    fires on the first batch of epoch `phase_start`."""

    def __init__(
        self,
        progress: Callable,
        end_epoch: Callable,
        steps: int,
        phase_name: str,
        phase_start: int,
    ):
        super().__init__()
        self._open_progress = progress
        self._end_epoch = end_epoch
        self.steps = steps
        self.phase_name = phase_name
        self.phase_start = phase_start
        self._progress = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.monotonic()
        self._epoch = epoch
        # The rate of the epoch's first step (a decayed schedule ends an
        # epoch lower, at 0 for a cosine's last).
        self._lr_start = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        self._progress = self._open_progress(
            self.steps, f"epoch {epoch + 1} ({self.phase_name})"
        )
        self._progress.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        self._progress.update(1, f"loss {loss:.4f}" if loss is not None else "")
        if batch == 0 and self._epoch == self.phase_start:
            faults.point("phase_first_batch")

    def on_epoch_end(self, epoch, logs=None):
        self._progress.__exit__(None, None, None)
        self._end_epoch(
            epoch, dict(logs or {}), time.monotonic() - self._t0, self._lr_start
        )


class RestoreCallbacks(keras.callbacks.Callback):
    """Puts saved EarlyStopping/ReduceLROnPlateau counters back after the
    callbacks reset themselves in `on_train_begin` (it runs after them)."""

    def __init__(self, callbacks, states):
        super().__init__()
        self._callbacks = callbacks
        self._states = states

    def on_train_begin(self, logs=None):
        restore_callbacks(self._callbacks, self._states)
