"""Where a phase's model can be cut: the single tensor below the trained
layers that the activation cache stores, and the model trained above it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import keras

from finetune_cli.model import build as model_lib


STOCHASTIC = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)


@dataclasses.dataclass
class Cut:
    """The base cut below its first trainable layer."""

    bottom: keras.Model  # base input -> crossing tensors
    top: keras.Model  # crossing tensors -> base output (shared layers)
    names: list[str]  # the crossing tensors, "<layer>:<output index>"
    shapes: list[tuple]  # their shapes, without the batch

    @property
    def row_size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def split(self, rows):
        """[batch, D] -> the crossing tensors (a list)."""
        out, at = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            out.append(keras.ops.reshape(rows[:, at : at + size], (-1, *shape)))
            at += size
        return out


def find_cut(base, layer_names) -> tuple[Optional[Cut], str]:
    """(the cut below the first of `layer_names`, "") or (None, why not)."""
    layers = model_lib.base_layers(base)
    chosen = set(layer_names)
    first = next((i for i, la in enumerate(layers) if la.name in chosen), None)
    if not first:
        return None, "nothing is frozen below the trainable layers"
    below = {id(la) for la in layers[:first]}
    below |= {id(la) for la in base.layers if isinstance(la, keras.layers.InputLayer)}
    random = [la.name for la in layers[:first] if isinstance(la, STOCHASTIC)]
    if random:
        return None, f"random layers below the cut ({random[0]})"
    crossing, seen = [], set()
    for la in layers[first:]:
        for t in la._inbound_nodes[0].input_tensors:
            op, _, index = t._keras_history
            if id(op) in below and id(t) not in seen:
                seen.add(id(t))
                crossing.append((t, f"{op.name}:{index}"))
    outputs = [t for t, _ in crossing]
    bottom = keras.Model(base.inputs, outputs, name="bottom")
    top = keras.Model(outputs, base.output, name="top")
    shapes = [tuple(int(d) for d in t.shape[1:]) for t in outputs]
    return Cut(bottom, top, [n for _, n in crossing], shapes), ""


def plan_cut(base, layer_names, image_size) -> tuple[Optional[str], str]:
    """(where the cut is, for the plan table) or (None, why there is none)."""
    cut, why = find_cut(base, layer_names)
    if cut is None:
        return None, why
    pixels = image_size[0] * image_size[1] * 3
    if cut.row_size > pixels:
        return None, (
            f"the activations at the cut ({cut.row_size:,} values) are larger "
            f"than the image ({pixels:,})"
        )
    return ", ".join(n.split(":")[0] for n in cut.names), ""


def training_model(model, base, cut: Cut):
    """Crossing tensors (flattened rows) -> top -> head: the phase's model.

    It shares the top's and the head's layers with `model`, so training it
    trains `model`.
    """
    rows = keras.Input((cut.row_size,), name="activations")
    x = cut.top(cut.split(rows))
    for layer in model.layers[model.layers.index(base) + 1 :]:
        x = layer(x)
    return keras.Model(rows, x, name="top_and_head")
