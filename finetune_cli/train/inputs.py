"""What a phase trains on: images, cached features or cached activations.

A phase whose base is frozen trains only the head, on pooled features
computed once (`cache/heads.py`: `features` or augmented `views`); a phase
that trains the top of the base above a single-tensor cut trains on the
cached activations below it (`cache/activations.py`); any other phase
trains the whole model on images (`base`). `PhaseInputs` makes that choice
in one place for the trainer, `lr-find` and `tune`: `build(plan, weights)`
computes the cache a phase needs (from `weights`, when given), and
`for_phase(plan, first, end)` gives the model to fit and its training and
validation data, distributed when a strategy is set.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from finetune_cli.cache import activations
from finetune_cli.cache import heads as feature_training
from finetune_cli.data import pipeline
from finetune_cli.run import state as runstate
from finetune_cli.runtime import distribute


class PhaseInputs:
    """The training and validation data of each phase of one job."""

    def __init__(self, setup, out, *, derive: bool = True):
        """Args:
        setup: the job's `train.setup.Setup`.
        derive: compute a head phase's features from the activation cache
            of a later phase when they share the bottom (`finetune`); lr-find
            computes them directly.
        """
        self.cfg, self.out, self.setup = setup.cfg, out, setup
        self.index, self.topo = setup.index, setup.topo
        self.num_classes = setup.num_classes
        self.steps = self.topo.steps_per_epoch(
            len(self.index.splits["train"]), self.cfg.data.batch_size
        )
        self.derive = derive
        self.augmenter = pipeline.build_augmenter(
            self.cfg.augmentation, self.cfg.experiment.seed
        )
        self.mixer = pipeline.build_mixer(
            self.cfg.augmentation, self.cfg.experiment.seed
        )
        self._cached: dict = {}  # CachedData or ActivationData, by cache_key
        self._val_ds: dict = {}  # image size -> the val split's batches

    def build(self, plan, weights=None) -> None:
        """Compute the cache `plan` trains on, if it needs one it does not
        have yet (activations: one per phase, since an earlier phase may
        have trained the bottom; features: once per path). `weights`, when
        given, are set on the model first: the cache is taken from them."""
        s = self.setup
        key = cache_key(plan, s.cfg)
        if plan.path == "base" or (plan.path != "activations" and key in self._cached):
            return
        model, base = s.model_for(plan)
        cfg = s.cfg_for(plan)
        if weights is not None:
            runstate.assign(model.variables, weights, "model")
        if plan.path == "activations":
            self._cached[key] = activations.activation_datasets(
                cfg, self.out, model, base, self.index, plan.layer_names
            )
        else:
            # Outside the scope: extraction is each worker's local pass.
            self._cached[key] = feature_training.cached_datasets(
                cfg,
                self.out,
                model,
                base,
                self.index,
                plan.path,
                strategy=self.topo.strategy,
                cut_layers=derive_from(s.plans, plan, s.cfg) if self.derive else None,
            )

    def cached(self, plan):
        """The cache `plan` trains on (after `build(plan)`)."""
        return self._cached[cache_key(plan, self.setup.cfg)]

    def for_phase(
        self,
        plan,
        first: int,
        end: int,
        *,
        deterministic: bool = False,
        per_epoch: Optional[int] = None,
    ):
        """(model to fit, training batches of epochs first..end-1, val).

        `per_epoch` caps the rows an epoch reads (lr-find's whole batches).
        """
        cfg = self.setup.cfg_for(plan)
        extra = {} if per_epoch is None else {"per_epoch": per_epoch}
        if plan.path == "base":

            def train(**distributed):
                return pipeline.make_dataset(
                    self.index.splits["train"],
                    self.num_classes,
                    cfg.data.image_size,
                    distributed.pop("batch_size", cfg.data.batch_size),
                    shuffle=True,
                    seed=cfg.experiment.seed,
                    augmenter=self.augmenter,
                    mixer=self.mixer,
                    epochs=(first, end),
                    deterministic=deterministic,
                    **{**extra, **distributed},
                )

            fit_model = self.setup.model_for(plan)[0]
            val = self.val_dataset(cfg.data.image_size)
        else:
            cached = self.cached(plan)

            def train(**distributed):
                return cached.train_dataset(first, end, **{**extra, **distributed})

            fit_model, val = cached.head, self._unsharded(cached.val_dataset())
        distribute.adopt(fit_model, self.topo)
        if not self.topo.distributed:
            return fit_model, train(), val
        class_weight = self.setup.class_weights[plan.index]
        return fit_model, self._distributed(train, class_weight), val

    def val_dataset(self, size=None):
        """The val split's images at `size` (default data.image_size)."""
        size = tuple(size or self.cfg.data.image_size)
        if size not in self._val_ds:
            self._val_ds[size] = self.eval_dataset("val", size)
        return self._val_ds[size]

    def eval_dataset(self, split: str, size=None):
        """A split's images in order, read whole by every worker."""
        return self._unsharded(
            pipeline.make_dataset(
                self.index.splits[split],
                self.num_classes,
                size or self.cfg.data.image_size,
                self.cfg.data.batch_size,
            )
        )

    def _distributed(self, train, class_weight):
        """Training batches under the strategy: each input pipeline reads
        its own shard of every epoch, in per-replica batches."""
        topo, n = self.topo, len(self.index.splits["train"])
        batch = self.cfg.data.batch_size

        def per_pipeline(ctx):
            per_replica = ctx.get_per_replica_batch_size(batch)
            per_epoch = (
                self.steps
                * per_replica
                * (ctx.num_replicas_in_sync // ctx.num_input_pipelines)
            )
            return train(
                batch_size=per_replica,
                shard=(ctx.input_pipeline_id, ctx.num_input_pipelines),
                per_epoch=min(per_epoch, n),
                class_weight=class_weight,
            )

        return topo.strategy.distribute_datasets_from_function(per_pipeline)

    def _unsharded(self, ds):
        """Validation data is read whole by every worker (the metrics are
        then exact whatever the split of the last batch)."""
        if self.topo.kind != "multi_worker":
            return ds
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        return ds.with_options(options)


def derive_from(plans, plan, cfg):
    """The trainable layers of the first phase after `plan` that trains the
    base, when that phase trains on cached activations of images of the
    same size: `plan`'s features can be computed from that cache (the
    bottom's weights are the same)."""
    later = next((p for p in plans[plan.index + 1 :] if p.layer_names), None)
    if later is None or later.path != "activations":
        return None
    if cfg.size_of(later.phase) != cfg.size_of(plan.phase):
        return None
    return later.layer_names


def cache_key(plan, cfg) -> str:
    """Activations: one per phase; features: one per path and image size."""
    if plan.path == "activations":
        return f"activations-{plan.index}"
    h, w = cfg.size_of(plan.phase)
    return f"{plan.path}-{h}x{w}"
