"""The loss and training metrics of a task.

Single-label: categorical cross-entropy (label smoothing as the phase
says) with accuracy (and top-5 above 5 classes). Multi-label: binary
cross-entropy per label, Keras' own, or, with a phase's `class_weight`,
`LabelWeightedBinaryCrossentropy`, which weighs each label's positives by
its weight (`auto`: its negatives over its positives in the training
split, what PyTorch calls `pos_weight`); metrics `map` (Keras' AUC of the
precision-recall curve per label, averaged: the mean average precision
up to interpolation) and `accuracy` (Keras' BinaryAccuracy at 0.5: the
share of (image, label) decisions that are right).
"""

from __future__ import annotations

from typing import Optional

import keras


@keras.saving.register_keras_serializable(package="finetune_cli")
class LabelWeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy with the positives of label c weighted by
    `pos_weight[c]`, averaged over the labels."""

    def __init__(
        self,
        pos_weight,
        label_smoothing: float = 0.0,
        name: str = "label_weighted_binary_crossentropy",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.pos_weight = [float(w) for w in pos_weight]
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        y_pred = keras.ops.convert_to_tensor(y_pred)
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        if self.label_smoothing:
            y_true = y_true * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        eps = keras.config.epsilon()
        p = keras.ops.clip(y_pred, eps, 1.0 - eps)
        w = keras.ops.convert_to_tensor(self.pos_weight, dtype=y_pred.dtype)
        per_label = -(
            w * y_true * keras.ops.log(p) + (1.0 - y_true) * keras.ops.log(1.0 - p)
        )
        return keras.ops.mean(per_label, axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "pos_weight": self.pos_weight,
            "label_smoothing": self.label_smoothing,
        }


def loss_for(phase, multi_label: bool, label_weight: Optional[list] = None):
    """The phase's loss for the task."""
    if not multi_label:
        return keras.losses.CategoricalCrossentropy(
            label_smoothing=phase.label_smoothing
        )
    if label_weight is not None:
        return LabelWeightedBinaryCrossentropy(label_weight, phase.label_smoothing)
    return keras.losses.BinaryCrossentropy(label_smoothing=phase.label_smoothing)


def metrics_for(num_classes: int, multi_label: bool) -> list:
    """The metrics a phase is compiled with (`accuracy` in both tasks)."""
    if multi_label:
        return [
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(
                curve="PR", multi_label=True, num_labels=num_classes, name="map"
            ),
        ]
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy"))
    return metrics
