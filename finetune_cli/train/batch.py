"""`data.batch_size: auto`: the largest power-of-two batch that fits.

Found by a short probe before the run folder exists:

- on a GPU, training steps of the phase that trains the most of the model
  on images, at 8, 16, 32, ... until the device runs out of memory (the
  last batch that fitted is taken);
- on the CPU, where running out of memory kills the process instead of
  raising, the activations of one image through that phase's model
  (forward and backward, measured from the model's layer outputs) against
  half of the memory available now, then one training step at that batch.

Never above the training images or `MAX_AUTO`. The model's weights are put
back after the probe. The choice is recorded in the run (`config.yaml`
holds the number, `environment.json` how it was found); a resumed run keeps
it, and a batch that no longer fits there is a config error naming it.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from finetune_cli.errors import ConfigError
from finetune_cli.model import build as model_lib

MAX_AUTO = 256
CPU_SHARE = 0.5  # of the memory available when the probe runs


def available_memory() -> int:
    """Bytes of memory available now (0 when unknown)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def bytes_per_image(model) -> int:
    """Activations of one image through `model`, forward and backward (3x
    the outputs of every layer, float32): a floor of what a step needs."""
    total = 0
    for layer in model.layers:
        outputs = layer.output if isinstance(layer.output, list) else [layer.output]
        for t in outputs:
            shape = [d for d in t.shape[1:] if d is not None]
            total += math.prod(shape) if shape else 0
    return 3 * 4 * total


def _worst(plans, model_for):
    """The phase on images with the largest images that trains the most of
    the model (None when every phase trains on cached features or
    activations)."""
    on_images = [p for p in plans if p.path == "base"]

    def cost(p):
        h, w = model_for(p)[0].input_shape[1:3]
        return (h * w, len(p.layer_names))

    return max(on_images, key=cost, default=None)


@contextlib.contextmanager
def _probing(model, base, plan):
    """The model set up to train `plan` (compiled, at a rate of 0), its
    weights put back afterwards whatever the probe did."""
    saved = [v.numpy() for v in model.variables]
    try:
        model_lib.apply_trainable(model, base, plan.layer_names, plan.phase.batchnorm)
        model.compile(
            optimizer=keras.optimizers.SGD(0.0), loss="categorical_crossentropy"
        )
        yield
    finally:
        for v, value in zip(model.variables, saved, strict=True):
            v.assign(value)


def _fits(model, batch: int, num_classes: int) -> bool:
    h, w = model.input_shape[1:3]
    x = np.random.default_rng(0).uniform(0, 255, (batch, h, w, 3)).astype("float32")
    y = np.eye(num_classes, dtype="float32")[np.arange(batch) % num_classes]
    try:
        model.train_on_batch(x, y)
        return True
    except tf.errors.ResourceExhaustedError:
        return False


def choose(model_for, plans, n_train: int, num_classes: int, gpu: bool) -> dict:
    """Probe for the batch (see the module doc): {"batch_size", "how"}.

    `model_for(plan)` gives the (model, base) a phase trains (its size)."""
    cap = 2 ** int(math.log2(max(1, min(n_train, MAX_AUTO))))
    plan = _worst(plans, model_for)
    if plan is None:
        return {
            "batch_size": cap,
            "how": "every phase trains on cached features or activations: "
            f"the largest power of two up to {MAX_AUTO} and the "
            f"{n_train} training images",
        }
    model, base = model_for(plan)
    with _probing(model, base, plan):
        if gpu:
            batch = 0
            candidate = 1
            while candidate <= cap and _fits(model, candidate, num_classes):
                batch, candidate = candidate, candidate * 2
            how = f"training steps of phase {plan.phase.name!r} on the GPU"
        else:
            per_image = bytes_per_image(model)
            budget = CPU_SHARE * available_memory()
            fit = int(budget // max(per_image, 1))
            batch = 2 ** int(math.log2(fit)) if fit >= 1 else 0
            batch = min(batch, cap)
            while batch >= 1 and not _fits(model, batch, num_classes):
                batch //= 2
            how = (
                f"phase {plan.phase.name!r}: about {per_image / 2**20:,.1f} MiB "
                f"an image against {CPU_SHARE:.0%} of the "
                f"{available_memory() / 2**30:,.1f} GiB available, then a step"
            )
    if batch < 1:
        raise ConfigError(
            "data.batch_size: auto found no batch that fits: not even one "
            f"image of {model.input_shape[1]}x{model.input_shape[2]} trains in "
            "the memory of this device; lower data.image_size. Received: "
            "data.batch_size='auto'"
        )
    return {"batch_size": batch, "how": how}


def check_recorded(
    model_for,
    plans,
    batch: int,
    num_classes: int,
    gpu: bool,
    recorded: Optional[dict],
) -> None:
    """On resume of a run whose batch `auto` chose: the batch must still fit
    (a resumed run keeps its batch), else a config error saying so."""
    if not recorded or not recorded.get("auto"):
        return
    plan = _worst(plans, model_for)
    if plan is None:
        return
    model, base = model_for(plan)
    with _probing(model, base, plan):
        if gpu:
            ok, need = _fits(model, batch, num_classes), None
        else:
            need = bytes_per_image(model) * batch
            ok = need <= available_memory()
    if not ok:
        have = available_memory() / 2**30
        where = (
            "on this GPU"
            if need is None
            else f"here (about {need / 2**30:,.1f} GiB, {have:,.1f} GiB available)"
        )
        raise ConfigError(
            f"data.batch_size: auto chose {batch} when this run started "
            f"({recorded.get('how', '')}); {batch} no longer fits {where}. A "
            "resumed run keeps its batch: resume it where it fits, or start "
            "a new run (auto probes again). Received: data.batch_size='auto'"
        )
