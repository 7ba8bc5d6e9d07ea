"""Phases and training: run a config's schedule and write the run directory.

`finetune(config)` does, in order:

1. checks everything that can be checked without training: the data (index,
   split, class weights), the weights file, the model build and every
   phase's layer selection. Any problem is raised here, before a run folder
   exists.
2. creates the run folder and writes the resolved config, labels.txt and
   environment.json; prints the devices and the plan (per phase: trainable
   layers and parameters, BN mode, optimizer, LR, epochs).
3. runs the phases in order. Each phase sets what trains, recompiles with its
   own optimizer, schedule, loss and callbacks, and trains from the epoch the
   previous one stopped at (one continuous epoch count and history). At the
   end of a phase its best weights (by `experiment.monitor`) are restored and
   carried into the next one.
4. writes `best.keras` (best epoch of the whole run), `last.keras` (latest
   epoch), `history.csv`, `metrics.json`, `base.weights.h5` (the fine-tuned
   base, loadable with `model.weights: <path>`), and marks the run completed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np

from finetune_cli import config as config_lib
from finetune_cli import data as data_lib
from finetune_cli import model as model_lib
from finetune_cli.console import Output
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.errors import FinetuneError
from finetune_cli.errors import InterruptedRun
from finetune_cli.rundir import LOCK_FILE
from finetune_cli.rundir import Lock
from finetune_cli.rundir import RunDir
from finetune_cli.rundir import atomic_path


@dataclasses.dataclass
class PhasePlan:
    """What one phase will do, resolved against the built model."""

    index: int
    phase: config_lib.Phase
    layer_names: list[str]
    trainable_params: int
    frozen_params: int


@dataclasses.dataclass
class FinetuneResult:
    run_dir: Path
    metrics: dict
    history: list[dict]


# --------------------------------------------------------------------------
# Pre-flight (no run folder yet)
# --------------------------------------------------------------------------


def resolve_class_weight(phase, index: int, data_index) -> Optional[dict]:
    """Keras `class_weight` for a phase: None, balanced, or by class name."""
    cw = phase.class_weight
    if cw is None:
        return None
    counts = data_index.counts("train")
    n, k = sum(counts), len(counts)
    if cw == "auto":
        return {i: n / (k * c) for i, c in enumerate(counts) if c}
    unknown = sorted(set(cw) - set(data_index.class_names))
    if unknown:
        raise ConfigError(
            f"phases.{index}.class_weight: unknown classes {unknown}; the "
            f"classes are {', '.join(data_index.class_names)}"
        )
    return {i: float(cw.get(name, 1.0))
            for i, name in enumerate(data_index.class_names)}


def plan_phases(model, base, phases) -> list[PhasePlan]:
    """Resolve each phase's layer selection and count what it trains."""
    plans = []
    for i, phase in enumerate(phases):
        names = model_lib.select_layers(base, phase.trainable,
                                        f"phases.{i}.trainable")
        model_lib.apply_trainable(model, base, names, phase.batchnorm)
        plans.append(PhasePlan(
            index=i,
            phase=phase,
            layer_names=names,
            trainable_params=model_lib.count_params(model.trainable_weights),
            frozen_params=model_lib.count_params(model.non_trainable_weights),
        ))
    return plans


# --------------------------------------------------------------------------
# Optimizer, schedule, loss, callbacks
# --------------------------------------------------------------------------


def build_learning_rate(phase, steps_per_epoch: int):
    """A float or a `keras.optimizers.schedules` object for one phase.

    Schedules count the phase's own optimizer steps, from 0.
    """
    import keras

    lr = phase.learning_rate
    sched = phase.schedule
    total = max(1, steps_per_epoch * phase.epochs)
    warm = min(total - 1, int(round(sched.warmup_epochs * steps_per_epoch)))
    if sched.name == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=steps_per_epoch, decay_rate=sched.decay_rate)
    if sched.name == "constant" and warm <= 0:
        return lr
    # Cosine with alpha=1 is flat: that is "warmup then constant".
    alpha = sched.alpha if sched.name == "cosine" else 1.0
    if warm <= 0:
        return keras.optimizers.schedules.CosineDecay(
            lr, decay_steps=total, alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total - warm), alpha=alpha,
        warmup_target=lr, warmup_steps=warm)


def build_optimizer(phase, steps_per_epoch: int):
    """The phase's optimizer through `keras.optimizers.get`."""
    import keras

    return keras.optimizers.get({
        "class_name": phase.optimizer.name,
        "config": {
            "learning_rate": build_learning_rate(phase, steps_per_epoch),
            **phase.optimizer.params(),
        },
    })


def compile_phase(model, phase, steps_per_epoch: int, num_classes: int,
                  jit_compile: bool):
    import keras

    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy"))
    model.compile(
        optimizer=build_optimizer(phase, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(
            label_smoothing=phase.label_smoothing),
        metrics=metrics,
        jit_compile=jit_compile,
    )


def current_lr(model) -> float:
    import keras

    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def _improved(monitor: str, value, best) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if monitor.endswith("loss") else value > best


def _make_callbacks_class():
    """Callback classes, defined lazily so this module imports without Keras."""
    import keras

    class RunCallback(keras.callbacks.Callback):
        """History, checkpoints, best weights of the phase, console lines.

        One instance lives through all phases so the history, the epoch count
        and the best-of-run checkpoint are continuous.
        """

        def __init__(self, run: RunDir, out: Output, monitor: str,
                     steps_per_epoch: int, full_model):
            super().__init__()
            # The model saved to best/last.keras; `self.model` may be the
            # head alone when a phase trains on cached features.
            self.full_model = full_model
            self.run = run
            self.out = out
            self.monitor = monitor
            self.steps = steps_per_epoch
            self.rows: list[dict] = []
            self.best_run = None
            self.best_run_epoch = None
            self.phase_name = ""
            self._progress = None

        def start_phase(self, index, name, steps, phase_start, callbacks,
                        phase_metrics, keep_best=False):
            self.phase_index = index
            self.phase_name = name
            self.steps = steps
            self.phase_start = phase_start
            self.callbacks = callbacks
            self.phase_metrics = phase_metrics
            if not keep_best:
                self.best_phase = None
                self.best_phase_epoch = None
                self.best_phase_weights = None

        def restore(self, state):
            """Continue from a saved state (see `save_state`)."""
            t = state["tracker"]
            self.rows = t["rows"]
            self.best_run, self.best_run_epoch = t["best_run"], t["best_run_epoch"]
            self.best_phase = t["best_phase"]
            self.best_phase_epoch = t["best_phase_epoch"]
            self.best_phase_weights = state["best"] or None

        def save_state(self, epoch: int):
            """Everything needed to continue after this epoch, atomically."""
            # EarlyStopping runs before this callback, so its decision is in.
            finished = bool(self.model.stop_training) or (
                epoch + 1 >= self.params.get("epochs", math.inf))
            opt = self.model.optimizer
            arrays = {}
            weights = [w.numpy() for w in self.full_model.weights]
            opt_vars = [np.asarray(v.numpy()) for v in opt.variables]
            best = self.best_phase_weights or []
            for prefix, values in (("model", weights), ("opt", opt_vars),
                                   ("best", best)):
                for i, v in enumerate(values):
                    arrays[f"{prefix}_{i}"] = v
            state = {
                "phase": self.phase_index, "phase_start": self.phase_start,
                "epoch": epoch + 1, "phase_finished": finished,
                "phase_metrics": self.phase_metrics,
                "callbacks": [_callback_state(cb) for cb in self.callbacks],
                "tracker": {"rows": self.rows, "best_run": self.best_run,
                            "best_run_epoch": self.best_run_epoch,
                            "best_phase": self.best_phase,
                            "best_phase_epoch": self.best_phase_epoch},
                "n_model": len(weights), "n_opt": len(opt_vars),
                "n_best": len(best),
            }
            arrays["state"] = np.array(json.dumps(state))
            with atomic_path(self.run / RESUME_FILE) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.monotonic()
            self._progress = self.out.progress(
                self.steps, f"epoch {epoch + 1} ({self.phase_name})")
            self._progress.__enter__()

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            self._progress.update(1, f"loss {loss:.4f}" if loss is not None else "")

        def on_epoch_end(self, epoch, logs=None):
            self._progress.__exit__(None, None, None)
            logs = dict(logs or {})
            lr = current_lr(self.model)
            row = {"epoch": epoch + 1, "phase": self.phase_name, "lr": lr,
                   "iterations": int(self.model.optimizer.iterations.numpy()),
                   "seconds": round(time.monotonic() - self._t0, 3)}
            row.update({k: float(v) for k, v in logs.items() if k != "learning_rate"})
            self.rows.append(row)
            value = logs.get(self.monitor)
            if _improved(self.monitor, value, self.best_phase):
                self.best_phase, self.best_phase_epoch = value, epoch + 1
                self.best_phase_weights = [w.numpy() for w in self.model.weights]
            if _improved(self.monitor, value, self.best_run):
                self.best_run, self.best_run_epoch = value, epoch + 1
                save_model(self.full_model, self.run / "best.keras")
            save_model(self.full_model, self.run / "last.keras")
            # The resume state is the commit point of an epoch: history.csv
            # never shows an epoch that a resume would redo.
            self.save_state(epoch)
            write_history(self.run / "history.csv", self.rows)
            shown = "  ".join(f"{k} {v:.4f}" for k, v in logs.items()
                              if k != "learning_rate")
            self.out.info(f"epoch {epoch + 1:>3} [{self.phase_name}] {shown}  "
                          f"lr {lr:.2e}  ({row['seconds']:.1f}s)")

        def restore_phase_best(self):
            if self.best_phase_weights is not None:
                for w, v in zip(self.model.weights, self.best_phase_weights):
                    w.assign(v)

    return RunCallback


def phase_callbacks(phase, run: RunDir, tensorboard: bool):
    import keras

    cbs = []
    es = phase.callbacks.early_stopping
    if es is not None:
        mode = "min" if es.monitor.endswith("loss") else "max"
        cbs.append(keras.callbacks.EarlyStopping(
            monitor=es.monitor, patience=es.patience, min_delta=es.min_delta,
            mode=mode))
    rl = phase.callbacks.reduce_lr_on_plateau
    if rl is not None:
        mode = "min" if rl.monitor.endswith("loss") else "max"
        cbs.append(keras.callbacks.ReduceLROnPlateau(
            monitor=rl.monitor, factor=rl.factor, patience=rl.patience,
            min_lr=rl.min_lr, mode=mode, verbose=0))
    if tensorboard:
        cbs.append(keras.callbacks.TensorBoard(log_dir=str(run / "tensorboard")))
    return cbs


def save_model(model, path) -> None:
    """Save a `.keras` file atomically."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def write_history(path, rows) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    from finetune_cli.rundir import atomic_write

    atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------


def configure_runtime(cfg, gpu: bool) -> dict:
    """Seeds and the dtype policy; returns what was chosen."""
    import keras

    keras.utils.set_random_seed(cfg.experiment.seed)
    mp = cfg.runtime.mixed_precision
    mixed = mp == "on" or (mp == "auto" and gpu)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    return {"mixed_precision": mixed, "xla": cfg.runtime.xla}


def feature_paths(cfg, plans) -> list[str]:
    """How each phase gets its base outputs: "features", "views" or "base".

    Cached features serve a phase whose base is frozen and that comes
    before any phase that trains the base (after that they are stale).
    """
    paths, base_trained = [], False
    fc = cfg.feature_cache
    for p in plans:
        if not fc.enabled or p.layer_names or base_trained:
            paths.append("base")
        elif cfg.augmentation and fc.augmented == "faithful":
            paths.append("base")
        elif cfg.augmentation:
            paths.append("views")
        else:
            paths.append("features")
        base_trained = base_trained or bool(p.layer_names)
    return paths


def describe_path(path: str, cfg) -> str:
    if path == "features":
        return "cached features"
    if path == "views":
        return f"cached features, {cfg.feature_cache.views} augmented views"
    return "base every epoch"


def plan_rows(plans, paths=None, cfg=None):
    rows = []
    for i, p in enumerate(plans):
        ph = p.phase
        if ph.trainable == "none":
            what = "head only"
        elif ph.trainable == "all":
            what = f"all {len(p.layer_names)} base layers"
        elif ph.trainable.top is not None:
            what = f"top {ph.trainable.top} base layers"
        elif ph.trainable.from_layer is not None:
            what = f"from {ph.trainable.from_layer} ({len(p.layer_names)} layers)"
        else:
            what = f"regex {ph.trainable.regex} ({len(p.layer_names)} layers)"
        sched = ph.schedule.name
        if ph.schedule.warmup_epochs and sched != "warmup":
            sched += f" +{ph.schedule.warmup_epochs:g} ep warmup"
        bn = "inference (frozen)" if ph.batchnorm == "frozen" else "train"
        if not p.layer_names:
            bn = "inference (frozen)"
        rows.append([
            str(p.index + 1), ph.name, what, f"{p.trainable_params:,}",
            f"{p.frozen_params:,}", bn, ph.optimizer.name,
            f"{ph.learning_rate:g}", sched, str(ph.epochs),
            describe_path(paths[i], cfg) if paths else "base every epoch",
        ])
    return rows


PLAN_COLUMNS = ["#", "phase", "trains", "trainable", "frozen",
                "BN mode", "optimizer", "LR", "schedule", "epochs", "path"]


def head_model(model, base):
    """The layers after the base as their own model (sharing weights).

    Training it trains the full model's head: grafting back is exact.
    """
    import keras

    head_layers = model.layers[model.layers.index(base) + 1:]
    inputs = keras.Input(tuple(base.output.shape[1:]), name="features")
    x = inputs
    for layer in head_layers:
        x = layer(x)
    return keras.Model(inputs, x, name="head")


def feature_dataset(feats, labels, num_classes: int, batch_size: int, *,
                    shuffle: bool, seed: int):
    """Batches of (features, one-hot) from cached features [views, n, d].

    With several views, epoch e uses view e mod views of every image.
    """
    import tensorflow as tf

    onehot = np.eye(num_classes, dtype="float32")[labels]
    views, n = feats.shape[0], feats.shape[1]
    if views == 1:
        ds = tf.data.Dataset.from_tensor_slices((feats[0], onehot))
        if shuffle:
            ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    per_view = tf.data.Dataset.from_tensor_slices(
        (feats, np.broadcast_to(onehot, (views,) + onehot.shape).copy()))
    ds = per_view.repeat().flat_map(
        lambda f, y: tf.data.Dataset.from_tensor_slices((f, y)).shuffle(
            n, seed=seed).batch(batch_size))
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------


RESUME_FILE = "resume.npz"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (cron timeouts, schedulers) stops the run like Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def finetune(cfg, out: Optional[Output] = None, argv=None,
             resume: Optional[Path] = None) -> FinetuneResult:
    """Fine-tune a model as a config declares; see the module docstring.

    Args:
        resume: an interrupted run folder to continue (its config is `cfg`).

    Raises:
        ConfigError, DataError: before any training (nothing written).
        LockedError: another live run holds the experiment.
        InterruptedRun: on Ctrl-C or SIGTERM; the run can be resumed.
    """
    out = out or Output()
    exp = cfg.experiment
    lock = Lock(Path(exp.output_dir) / exp.name / LOCK_FILE,
                f"experiment {exp.name!r} in {exp.output_dir}")
    with lock, _sigterm_as_interrupt():
        if lock.took_over:
            out.warn(f"took over a stale lock left by process "
                     f"{lock.took_over.get('pid')} (no longer running)")
        return _finetune_locked(cfg, out, argv, resume)


def _finetune_locked(cfg, out, argv, resume) -> FinetuneResult:
    exp = cfg.experiment
    state = None
    if resume is not None:
        run = RunDir(resume)
        status = run.status().get("state")
        if status == "completed":
            raise ConfigError(f"--resume {resume}: the run is already completed")
        state = load_state(run / RESUME_FILE)
    index = data_lib.index_data(cfg.data, exp.seed)
    index, skipped = data_lib.preflight(index, cfg.data.on_bad_image)
    if skipped:
        out.warn(f"skipping {len(skipped)} bad image(s) (data.on_bad_image: skip), "
                 f"e.g. {skipped[0][0]}: {skipped[0][1]}")
    class_weights = [resolve_class_weight(p, i, index)
                     for i, p in enumerate(cfg.phases)]
    num_classes = len(index.class_names)
    if num_classes < 2:
        raise DataError(f"{index.source}: need at least 2 classes. Received: "
                        f"{index.class_names}")

    from finetune_cli import environment

    env = environment.describe(argv)
    gpu = any(d["type"] == "GPU" for d in env["devices"])
    runtime = configure_runtime(cfg, gpu)
    model, base = model_lib.build_model(cfg, num_classes)
    plans = plan_phases(model, base, cfg.phases)

    batch = cfg.data.batch_size
    steps = max(1, math.ceil(len(index.splits["train"]) / batch))

    if resume is None:
        run = RunDir.create(exp.output_dir, exp.name)
    run.set_status("running", resumed=resume is not None)
    out.attach_log(run / "log.txt")
    try:
        if resume is None:
            run.write_text("config.yaml", config_lib.to_yaml(cfg))
            run.write_text("labels.txt", "\n".join(index.class_names) + "\n")
            run.write_json("environment.json", env)
            run.write_json("split.json", {s: {"files": len(v), "per_class": dict(
                zip(index.class_names, index.counts(s)))}
                for s, v in index.splits.items()})
            if skipped:
                run.write_text("skipped_images.txt", "".join(
                    f"{p}\t{why}\n" for p, why in skipped))
        else:
            out.step(f"resuming {run.path} after epoch {state['epoch']} "
                     f"(phase {state['phase'] + 1}: "
                     f"{cfg.phases[state['phase']].name})")
        result = _train(cfg, out, run, index, model, base, plans, class_weights,
                        steps, runtime, env, state)
    except KeyboardInterrupt:
        resumable = (run / RESUME_FILE).is_file()
        run.set_status("interrupted", reason="stopped by a signal (Ctrl-C or "
                       "SIGTERM)", resumable=resumable)
        how = (f"resume with: finetune-cli finetune --resume {run.path}"
               if resumable else "no epoch had completed; start it again")
        raise InterruptedRun(f"interrupted; {how}") from None
    except FinetuneError as e:
        run.set_status("failed", reason=str(e))
        raise
    except Exception as e:
        run.set_status("failed", reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        out.close()
    return result


def load_state(path) -> dict:
    """The resumable state saved after the last completed epoch."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--resume: {path.parent} has no {RESUME_FILE}; no "
                          "epoch completed there, so there is nothing to resume")
    with np.load(path, allow_pickle=False) as z:
        state = json.loads(str(z["state"]))
        for prefix in ("model", "opt", "best"):
            state[prefix] = [z[f"{prefix}_{i}"] for i in range(
                state[f"n_{prefix}"])]
    return state


def _callback_state(cb) -> Optional[dict]:
    import keras

    if isinstance(cb, keras.callbacks.EarlyStopping):
        return {"wait": int(cb.wait), "best": _num(cb.best),
                "stopped_epoch": int(cb.stopped_epoch),
                "best_epoch": int(getattr(cb, "best_epoch", 0) or 0)}
    if isinstance(cb, keras.callbacks.ReduceLROnPlateau):
        return {"wait": int(cb.wait), "best": _num(cb.best),
                "cooldown_counter": int(cb.cooldown_counter)}
    return None


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _make_restorer(callbacks, states):
    """A callback that, after the others reset themselves, restores them."""
    import keras

    class Restore(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            for cb, st in zip(callbacks, states):
                if not st:
                    continue
                cb.wait = st["wait"]
                if st.get("best") is not None:
                    cb.best = st["best"]
                for key in ("stopped_epoch", "best_epoch", "cooldown_counter"):
                    if key in st:
                        setattr(cb, key, st[key])

    return Restore()


def _train(cfg, out, run, index, model, base, plans, class_weights, steps,
           runtime, env, state=None) -> FinetuneResult:
    exp = cfg.experiment
    out.step(f"finetune {exp.name} -> {run.path}")
    gpus = [d for d in env["devices"] if d["type"] == "GPU"]
    out.info("devices: " + (", ".join(
        f"{d['name']} ({d.get('model') or 'GPU'})" for d in gpus)
        if gpus else "CPU only (no GPU found by TensorFlow)"))
    out.info(f"precision: {'mixed_float16' if runtime['mixed_precision'] else 'float32'}"
             f"; XLA: {'on' if runtime['xla'] else 'off'}")
    out.info(f"data: {index.source}: {len(index.class_names)} classes, " + ", ".join(
        f"{s} {len(v)}" for s, v in index.splits.items()))
    out.info(f"model: {cfg.model.name} ({cfg.model.weights} weights), "
             f"{model_lib.count_params(model.weights):,} parameters, input "
             f"{cfg.data.image_size[0]}x{cfg.data.image_size[1]}")
    paths = feature_paths(cfg, plans)
    out.table("plan", PLAN_COLUMNS, plan_rows(plans, paths, cfg))

    augmenter = data_lib.build_augmenter(cfg.augmentation, exp.seed)
    val_ds = data_lib.make_dataset(
        index.splits["val"], len(index.class_names), cfg.data.image_size,
        cfg.data.batch_size)

    RunCallback = _make_callbacks_class()
    tracker = RunCallback(run, out, exp.monitor, steps, model)
    epoch = 0
    phase_metrics = []
    start_phase = 0
    if state is not None:
        for w, v in zip(model.weights, state["model"]):
            w.assign(v)
        tracker.restore(state)
        epoch = state["epoch"]
        phase_metrics = state["phase_metrics"]
        start_phase = state["phase"]
    cached = None
    fit_model = model
    for plan, cw, path in zip(plans, class_weights, paths):
        if plan.index < start_phase:
            continue
        phase = plan.phase
        resuming = state is not None and plan.index == start_phase
        out.step(f"phase {plan.index + 1}/{len(plans)}: {phase.name} "
                 f"({describe_path(path, cfg)})")
        model_lib.apply_trainable(model, base, plan.layer_names, phase.batchnorm)
        phase_start = state["phase_start"] if resuming else epoch
        phase_end = phase_start + phase.epochs
        # Epoch-seeded order: a resumed phase sees the batches it would have.
        fit_train = data_lib.make_dataset(
            index.splits["train"], len(index.class_names), cfg.data.image_size,
            cfg.data.batch_size, shuffle=True, seed=exp.seed,
            augmenter=augmenter, epochs=(epoch, phase_end))
        fit_model, fit_val, fit_steps = model, val_ds, steps
        if path != "base":
            if cached is None or cached[0] != path:
                cached = (path, *_cached_datasets(cfg, out, model, base, index, path))
            _, fit_model, fit_train, fit_val, fit_steps = cached
        compile_phase(fit_model, phase, steps, len(index.class_names),
                      runtime["xla"])
        callbacks = phase_callbacks(phase, run, exp.tensorboard)
        tracker.start_phase(plan.index, phase.name, steps, phase_start,
                            callbacks, phase_metrics, keep_best=resuming)
        finished = False
        if resuming:
            _restore_optimizer(fit_model, state["opt"])
            callbacks.append(_make_restorer(callbacks, state["callbacks"]))
            finished = state["phase_finished"]
        if not finished:
            _fit(fit_model, fit_train, fit_val, epoch, phase, cw,
                 [*callbacks, tracker], index, steps_per_epoch=fit_steps,
                 end_epoch=phase_end)
        ran = sum(1 for r in tracker.rows if r["phase"] == phase.name)
        epoch = phase_start + ran
        tracker.restore_phase_best()
        results = fit_model.evaluate(fit_val, verbose=0, return_dict=True)
        entry = {
            "phase": phase.name,
            "epochs_run": ran,
            "last_epoch": epoch,
            "best_epoch": tracker.best_phase_epoch,
            "optimizer": type(fit_model.optimizer).__name__,
            "optimizer_iterations": int(fit_model.optimizer.iterations.numpy()),
            "path": path,
            "val_loss": float(results["loss"]),
            "val_accuracy": float(results["accuracy"]),
        }
        phase_metrics.append(entry)
        run.write_json("metrics.json", {"phases": phase_metrics})
        out.success(
            f"phase {phase.name}: val_accuracy {entry['val_accuracy']:.4f}, "
            f"val_loss {entry['val_loss']:.4f} (best epoch {entry['best_epoch']}, "
            f"{ran} epochs)")

    # The run's model is its best epoch overall.
    best = _load_best(run / "best.keras")
    if best is not None:
        for w, v in zip(model.weights, best.weights):
            w.assign(v.numpy())
    _save_base(base, run)
    metrics = {
        "monitor": exp.monitor,
        "best_epoch": tracker.best_run_epoch,
        "best_value": tracker.best_run,
        "phases": phase_metrics,
        "classes": index.class_names,
    }
    if fit_model is not model:
        # The last phase trained the head on features: the full model was
        # never compiled; it only needs the loss and metrics now.
        compile_phase(model, cfg.phases[-1], steps, len(index.class_names), False)
    final = model.evaluate(val_ds, verbose=0, return_dict=True)
    metrics["val"] = {"loss": float(final["loss"]),
                      "accuracy": float(final["accuracy"])}
    if index.splits.get("test"):
        test_ds = data_lib.make_dataset(
            index.splits["test"], len(index.class_names), cfg.data.image_size,
            cfg.data.batch_size)
        test = model.evaluate(test_ds, verbose=0, return_dict=True)
        metrics["test"] = {"loss": float(test["loss"]),
                           "accuracy": float(test["accuracy"])}
    run.write_json("metrics.json", metrics)
    if index.splits.get("test"):
        # The held-out report, as `finetune-cli evaluate RUN` would write it.
        from finetune_cli import evaluation

        _save_best_if_missing(model, run)
        ev = evaluation.evaluate(run.path, config=cfg, split="test")
        metrics["test"].update(ev.metrics["summary"])
        metrics["test"]["report"] = str(ev.out_dir / "report.html")
        run.write_json("metrics.json", metrics)
        out.info(f"test report: {ev.out_dir / 'report.html'}")
    with contextlib.suppress(FileNotFoundError):
        (run / RESUME_FILE).unlink()  # a completed run has nothing to resume
    run.set_status("completed")
    run.mark_latest()
    summary = f"best {exp.monitor} {tracker.best_run:.4f} at epoch {tracker.best_run_epoch}"
    if "test" in metrics:
        summary += f"; test accuracy {metrics['test']['accuracy']:.4f}"
    out.success(f"done: {summary}. Run folder: {run.path}")
    return FinetuneResult(run.path, metrics, tracker.rows)


def _save_best_if_missing(model, run):
    # A run whose monitor never produced a number has no best.keras yet.
    if not (run / "best.keras").is_file():
        save_model(model, run / "best.keras")


def _save_base(base, run):
    with atomic_path(run / "base.weights.h5") as tmp:
        base.save_weights(str(tmp))


def _load_best(path):
    import keras

    if not Path(path).is_file():
        return None
    return keras.saving.load_model(path, compile=False, safe_mode=True)


def _cached_datasets(cfg, out, model, base, index, path):
    """Extract (or reuse) features; the head model and its datasets."""
    from finetune_cli import features

    preprocess = (model.get_layer(model_lib.PREPROCESS_NAME)
                  if any(l.name == model_lib.PREPROCESS_NAME for l in model.layers)
                  else None)
    extractor = features.extractor_from(base, preprocess, cfg.data.image_size)
    root = features.cache_root(cfg)
    views = cfg.feature_cache.views if path == "views" else 1
    augmenter = (data_lib.build_augmenter(cfg.augmentation, cfg.experiment.seed)
                 if views > 1 else None)
    train_dir = root / ("train" if views == 1 else f"train-{views}views")
    train_fs, _ = features.get_features(cfg, extractor, index, "train", train_dir,
                                        out, views=views, augmenter=augmenter)
    val_fs, _ = features.get_features(cfg, extractor, index, "val", root / "val", out)
    k = len(index.class_names)
    f, labels, _ = train_fs.load()
    train = feature_dataset(f, labels, k, cfg.data.batch_size, shuffle=True,
                            seed=cfg.experiment.seed)
    vf, vlabels, _ = val_fs.load()
    val = feature_dataset(vf, vlabels, k, cfg.data.batch_size, shuffle=False,
                          seed=0)
    steps = math.ceil(f.shape[1] / cfg.data.batch_size) if views > 1 else None
    return head_model(model, base), train, val, steps


def _restore_optimizer(model, values) -> None:
    opt = model.optimizer
    opt.build(model.trainable_variables)
    if len(opt.variables) != len(values):
        raise ConfigError(
            f"--resume: the saved optimizer state has {len(values)} variables, "
            f"the rebuilt one {len(opt.variables)}; the config or code changed "
            "since the run started")
    for var, value in zip(opt.variables, values):
        var.assign(value)


def _fit(model, train_ds, val_ds, epoch, phase, class_weight, callbacks,
         index, steps_per_epoch=None, end_epoch=None):
    import tensorflow as tf

    try:
        return model.fit(
            train_ds, validation_data=val_ds, initial_epoch=epoch,
            epochs=end_epoch if end_epoch is not None else epoch + phase.epochs,
            class_weight=class_weight,
            callbacks=callbacks, verbose=0, shuffle=False,
            steps_per_epoch=steps_per_epoch)
    except tf.errors.ResourceExhaustedError:
        raise FinetuneError(
            "out of memory on the device during training; lower "
            "data.batch_size (or data.image_size) and try again") from None
    except tf.errors.InvalidArgumentError:
        # tf.data does not say which file failed: find it.
        files = index.files("train") + index.files("val")
        bad = data_lib.find_unreadable(files)
        if not bad:
            raise
        listed = "; ".join(f"{p}: {why}" for p, why in bad)
        raise DataError(f"image(s) could not be decoded during training: "
                        f"{listed}") from None
