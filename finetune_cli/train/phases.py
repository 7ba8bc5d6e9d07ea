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
from typing import Optional

import keras

from finetune_cli.cache import cut as cut_lib
from finetune_cli import config as config_lib
from finetune_cli.model import build as model_lib
from finetune_cli.errors import ConfigError
from finetune_cli.train import losses


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


def plan_phases(
    model, base, cfg, distributed: bool = False, models=None
) -> list[PhasePlan]:
    """Resolve each phase's layer selection, count what it trains, and
    choose its data path (see `feature_paths`).

    `models` maps another image size a phase trains at to its (model,
    base) (`setup.Setup.twins`); the cut is planned at the phase's size."""
    plans = []
    for i, phase in enumerate(cfg.phases):
        size = cfg.size_of(phase)
        model, base = (models or {}).get(size, (model, base))
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
            plan.cut, plan.no_cut = cut_lib.plan_cut(base, names, size)
        plans.append(plan)
    for plan, path in zip(plans, feature_paths(cfg, plans, distributed), strict=True):
        plan.path = path
        check_mixing(cfg, plan)
    return plans


def check_mixing(cfg, plan) -> None:
    """CutMix cuts a box out of one image into another: a phase that
    trains on cached features or activations has no images to cut.

    Raises:
        ConfigError: naming the augmentation op and the phase.
    """
    if plan.path == "base":
        return
    for i, a in enumerate(cfg.augmentation):
        if a.type == "cutmix":
            raise ConfigError(
                f"augmentation.{i}: cutmix mixes boxes of images, and phase "
                f"{plan.index + 1} ({plan.phase.name}) trains on cached "
                f"{'activations' if plan.path == 'activations' else 'features'}"
                "; use mixup (it mixes cached rows too), or set "
                "feature_cache.augmented: faithful (every phase on images). "
                "Received: type='cutmix'"
            )


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
    # CutMix needs images: under `faithful` it sends phases to them as
    # per-image ops do (`check_mixing` names the other case).
    augmented = bool(config_lib.per_image(cfg.augmentation)) or (
        fc.augmented == "faithful" and any(a.type == "cutmix" for a in cfg.augmentation)
    )
    for p in plans:
        if (
            fc.enabled
            and fc.activations
            and p.cut is not None
            and not distributed
            and (not augmented or fc.augmented == "views")
        ):
            paths.append("activations")
        elif not fc.enabled or p.layer_names or base_trained:
            paths.append("base")
        elif augmented and fc.augmented == "faithful":
            paths.append("base")
        elif augmented:
            paths.append("views")
        else:
            paths.append("features")
        base_trained = base_trained or bool(p.layer_names)
    return paths


def resolve_class_weight(phase, index: int, data_index) -> Optional[dict]:
    """Keras `class_weight` for a phase: None, balanced, or by class name.
    None for a multi-label index, whose weights are the loss's
    (`resolve_label_weight`)."""
    cw = phase.class_weight
    if cw is None or data_index.multi_label:
        return None
    counts = data_index.counts("train")
    n, k = sum(counts), len(counts)
    if cw == "auto":
        return {i: n / (k * c) for i, c in enumerate(counts) if c}
    return _by_name(cw, index, data_index)


def resolve_label_weight(phase, index: int, data_index) -> Optional[list]:
    """Multi-label: the weight of each label's positives in the loss
    (`losses.LabelWeightedBinaryCrossentropy`), or None. `auto`: a label's
    negatives over its positives in the training split."""
    cw = phase.class_weight
    if cw is None or not data_index.multi_label:
        return None
    if cw == "auto":
        n = len(data_index.splits["train"])
        return [(n - c) / c if c else 1.0 for c in data_index.counts("train")]
    weights = _by_name(cw, index, data_index)
    return [weights[i] for i in range(len(data_index.class_names))]


def _by_name(cw: dict, index: int, data_index) -> dict:
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
    model,
    phase,
    steps_per_epoch: int,
    num_classes: int,
    jit_compile: bool,
    *,
    multi_label: bool = False,
    label_weight: Optional[list] = None,
) -> None:
    """Compile `model` for `phase` (a fresh optimizer; recompiling is what
    makes Keras pick up changed `trainable` flags), with the task's loss
    and metrics (`losses.py`)."""
    model.compile(
        optimizer=build_optimizer(phase, steps_per_epoch),
        loss=losses.loss_for(phase, multi_label, label_weight),
        metrics=losses.metrics_for(num_classes, multi_label),
        jit_compile=jit_compile,
    )


def current_lr(model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
