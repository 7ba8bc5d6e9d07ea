"""Phases: what each phase of a schedule trains, and how.

A phase declares which base layers train, the BN policy, the optimizer and
its schedule, the loss and the callbacks. `plan_phases` resolves every
phase against the built model before anything trains (so a bad layer
selection is a config error, not a crash in phase 3); `compile_phase`
recompiles the model for a phase, which Keras needs after `trainable`
changes. Schedules count the phase's own optimizer steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import keras

from finetune_cli import activations
from finetune_cli import config as config_lib
from finetune_cli import model as model_lib
from finetune_cli.errors import ConfigError


@dataclasses.dataclass
class PhasePlan:
    """What one phase will do, resolved against the built model.

    `path` is how the phase gets its base outputs: "features" (cached),
    "views" (cached augmented copies) or "base" (the base runs every step).
    """

    index: int
    phase: config_lib.Phase
    layer_names: list[str]
    trainable_params: int
    frozen_params: int
    path: str = "base"
    # Where the base would be cut for cached activations (None: no cut,
    # `no_cut` says why).
    cut: Optional[str] = None
    no_cut: str = ""


def plan_phases(model, base, cfg, distributed: bool = False) -> list[PhasePlan]:
    """Resolve each phase's layer selection, count what it trains, and
    choose its data path (see `feature_paths`)."""
    plans = []
    for i, phase in enumerate(cfg.phases):
        names = model_lib.select_layers(base, phase.trainable, f"phases.{i}.trainable")
        model_lib.apply_trainable(model, base, names, phase.batchnorm)
        plan = PhasePlan(
            index=i,
            phase=phase,
            layer_names=names,
            trainable_params=model_lib.count_params(model.trainable_weights),
            frozen_params=model_lib.count_params(model.non_trainable_weights),
        )
        if names and phase.batchnorm == "frozen":
            plan.cut, plan.no_cut = activations.plan_cut(
                base, names, cfg.data.image_size
            )
        plans.append(plan)
    for plan, path in zip(plans, feature_paths(cfg, plans, distributed), strict=True):
        plan.path = path
    return plans


def feature_paths(cfg, plans, distributed: bool = False) -> list[str]:
    """How each phase gets its base outputs: "features", "views",
    "activations" or "base".

    Cached features serve a phase whose base is frozen and that comes
    before any phase that trains the base (after that they are stale).
    Cached activations serve a phase that trains the top of the base under
    frozen BN (a cut was found), without augmentation or with augmented
    views, outside tf.distribute.
    """
    paths, base_trained = [], False
    fc = cfg.feature_cache
    for p in plans:
        if (
            fc.enabled
            and fc.activations
            and p.cut is not None
            and not distributed
            and (not cfg.augmentation or fc.augmented == "views")
        ):
            paths.append("activations")
        elif not fc.enabled or p.layer_names or base_trained:
            paths.append("base")
        elif cfg.augmentation and fc.augmented == "faithful":
            paths.append("base")
        elif cfg.augmentation:
            paths.append("views")
        else:
            paths.append("features")
        base_trained = base_trained or bool(p.layer_names)
    return paths


def path_notes(plans, cfg) -> list[str]:
    """Why a partly unfrozen phase under frozen BN runs the base anyway."""
    notes = []
    fc = cfg.feature_cache
    for p in plans:
        if not p.layer_names or p.phase.batchnorm != "frozen" or p.path != "base":
            continue
        if p.cut is None:
            why = p.no_cut
        elif not fc.enabled or not fc.activations:
            continue  # the user's choice
        elif cfg.augmentation and fc.augmented == "faithful":
            why = (
                "augmentation is declared with feature_cache.augmented: "
                "faithful (views would cache augmented copies)"
            )
        else:
            why = "tf.distribute runs the whole model"
        notes.append(f"phase {p.index + 1} ({p.phase.name}) runs the base: {why}")
    return notes


def describe_path(path: str, cfg, plan=None) -> str:
    views = f", {cfg.feature_cache.views} augmented views" if cfg.augmentation else ""
    if path == "features":
        return "cached features"
    if path == "views":
        return f"cached features{views}"
    if path == "activations":
        return f"cached activations at {plan.cut if plan else 'the cut'}{views}"
    return "base every epoch"


PLAN_COLUMNS = [
    "#",
    "phase",
    "trains",
    "trainable",
    "frozen",
    "BN mode",
    "optimizer",
    "LR",
    "schedule",
    "epochs",
    "batch",
    "path",
]


def plan_rows(plans, cfg, replicas: int) -> list[list[str]]:
    """The plan table: one row per phase (see PLAN_COLUMNS). The batch is
    the global one, split over `replicas`."""
    batch = str(cfg.data.batch_size)
    if replicas > 1:
        batch += f" = {replicas} x {cfg.data.batch_size // replicas}"
    rows = []
    for p in plans:
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
        if bn == "train" and replicas > 1:
            bn = "train (synchronised)"
        if not p.layer_names:
            bn = "inference (frozen)"
        rows.append(
            [
                str(p.index + 1),
                ph.name,
                what,
                f"{p.trainable_params:,}",
                f"{p.frozen_params:,}",
                bn,
                ph.optimizer.name,
                f"{ph.learning_rate:g}",
                sched,
                str(ph.epochs),
                batch,
                describe_path(p.path, cfg, p),
            ]
        )
    return rows


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
    return {
        i: float(cw.get(name, 1.0)) for i, name in enumerate(data_index.class_names)
    }


def build_learning_rate(phase, steps_per_epoch: int):
    """A float or a `keras.optimizers.schedules` object for one phase.

    Schedules count the phase's own optimizer steps, from 0.
    """
    lr = phase.learning_rate
    sched = phase.schedule
    total = max(1, steps_per_epoch * phase.epochs)
    warm = min(total - 1, int(round(sched.warmup_epochs * steps_per_epoch)))
    if sched.name == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=steps_per_epoch, decay_rate=sched.decay_rate
        )
    if sched.name == "constant" and warm <= 0:
        return lr
    # Cosine with alpha=1 is flat: that is "warmup then constant".
    alpha = sched.alpha if sched.name == "cosine" else 1.0
    if warm <= 0:
        return keras.optimizers.schedules.CosineDecay(
            lr, decay_steps=total, alpha=alpha
        )
    return keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, total - warm),
        alpha=alpha,
        warmup_target=lr,
        warmup_steps=warm,
    )


def build_optimizer(phase, steps_per_epoch: int):
    """The phase's optimizer through `keras.optimizers.get`."""
    return keras.optimizers.get(
        {
            "class_name": phase.optimizer.name,
            "config": {
                "learning_rate": build_learning_rate(phase, steps_per_epoch),
                **phase.optimizer.params(),
            },
        }
    )


def compile_phase(
    model, phase, steps_per_epoch: int, num_classes: int, jit_compile: bool
) -> None:
    """Compile `model` for `phase` (a fresh optimizer; recompiling is what
    makes Keras pick up changed `trainable` flags)."""
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy"))
    model.compile(
        optimizer=build_optimizer(phase, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(
            label_smoothing=phase.label_smoothing
        ),
        metrics=metrics,
        jit_compile=jit_compile,
    )


def current_lr(model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


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


def lower_is_better(monitor: str) -> bool:
    """Keras' own rule for `mode="auto"`: losses and errors go down."""
    return "loss" in monitor or "error" in monitor
