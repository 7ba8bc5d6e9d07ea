"""What every training job prepares before anything trains.

`prepare(cfg, out)` is the one setup sequence of `finetune`, `lr-find` and
`tune`: the data (indexed and pre-flight checked, or a resumed run's
recorded split), the class weights of every phase, the runtime (devices,
precision, XLA, seeds), the model built inside the strategy's scope, and
every phase resolved against it (`phases.plan_phases`). Anything wrong is
raised here, before a run folder, a cache or a tune folder is written; the
pre-flight verdicts are saved by the caller (`Setup.save_verdicts`) once
it has passed its own checks too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import tensorflow as tf

from finetune_cli.console import Output
from finetune_cli.data import index as data_lib
from finetune_cli.data import preflight as preflight_lib
from finetune_cli.data import split as split_lib
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.model import build as model_lib
from finetune_cli.run.folder import RunDir
from finetune_cli.runtime import distribute
from finetune_cli.runtime import environment
from finetune_cli.train import batch as batch_lib
from finetune_cli.train import phases as phases_lib


@dataclasses.dataclass
class Setup:
    """Everything a job trains with; built by `prepare`."""

    cfg: object
    index: data_lib.DataIndex
    skipped: list  # [(path, why)] left out by data.on_bad_image: skip
    model: object
    base: object
    plans: list  # phases.PhasePlan, one per phase
    class_weights: list  # per phase: {class index: weight} or None
    runtime: dict  # what environment.configure_runtime set
    env: dict  # environment.describe(), with the runtime and topology
    topo: distribute.Topology
    save_verdicts: Optional[Callable[[], None]] = None
    # (model, base) built at each other size a phase trains at
    # (`phases[].image_size`): the same variables, in the same order, as
    # `model`, so weights pass between them as one list.
    twins: dict = dataclasses.field(default_factory=dict)
    # Multi-label: per phase, the weight of each label's positives or None.
    label_weights: list = dataclasses.field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.index.class_names)

    def task(self, phase_index: int) -> dict:
        """`phases.compile_phase`'s task arguments for a phase."""
        weights = self.label_weights[phase_index] if self.label_weights else None
        return {"multi_label": self.index.multi_label, "label_weight": weights}

    def model_for(self, plan) -> tuple:
        """(model, base) that `plan`'s phase trains, at its image size."""
        size = self.cfg.size_of(plan.phase)
        return self.twins.get(size, (self.model, self.base))

    def cfg_for(self, plan):
        """The config as `plan`'s phase sees it: data.image_size its own."""
        return self.cfg.at_size(self.cfg.size_of(plan.phase))


def prepare(
    cfg,
    out: Optional[Output] = None,
    *,
    argv=None,
    resume: Optional[Path] = None,
    topo: Optional[distribute.Topology] = None,
) -> Setup:
    """Check the data, configure the runtime, build the model, plan phases.

    Args:
        resume: a run folder whose recorded split is the data (no image is
            decoded again; its files are checked when they are read).
        topo: the strategy (`distribute.setup`); none by default.

    Raises:
        ConfigError, DataError: nothing has been written.
    """
    out = out or Output()
    topo = topo or distribute.Topology("none", tf.distribute.get_strategy())
    if resume is not None:
        index, skipped, save_verdicts = _recorded(resume, cfg), [], None
    else:
        index = data_lib.index_config(cfg)
        index, skipped, save_verdicts = preflight_lib.scan_images(index, cfg, out)
    class_weights = [
        phases_lib.resolve_class_weight(p, i, index) for i, p in enumerate(cfg.phases)
    ]
    label_weights = [
        phases_lib.resolve_label_weight(p, i, index) for i, p in enumerate(cfg.phases)
    ]
    if len(index.class_names) < 2:
        raise DataError(
            f"{index.source}: need at least 2 classes. Received: {index.class_names}"
        )
    env = environment.describe(argv)
    gpu = any(d["type"] == "GPU" for d in env["devices"])
    runtime = environment.configure_runtime(cfg, gpu)
    env["runtime"] = {**runtime, **topo.describe()}
    auto = cfg.data.batch_size == "auto"
    if auto and topo.distributed:
        raise ConfigError(
            "data.batch_size: auto is not supported under runtime.distribute "
            f"({topo.kind}): give the global batch. Received: "
            "data.batch_size='auto'"
        )
    if not auto:
        check_batch(cfg, topo, len(index.splits["train"]))
    with topo.strategy.scope():
        model, base = model_lib.build_model(cfg, len(index.class_names))
        twins = {
            size: model_lib.build_model(cfg.at_size(size), len(index.class_names))
            for size in dict.fromkeys(cfg.size_of(p) for p in cfg.phases)
            if size != tuple(cfg.data.image_size)
        }
    distribute.adopt(model, topo)
    for twin, _ in twins.values():
        distribute.adopt(twin, topo)
    plans = phases_lib.plan_phases(model, base, cfg, topo.distributed, models=twins)

    def model_for(plan):
        return twins.get(cfg.size_of(plan.phase), (model, base))

    n_train, n_classes = len(index.splits["train"]), len(index.class_names)
    if auto:
        choice = batch_lib.choose(model_for, plans, n_train, n_classes, gpu)
        cfg = cfg.model_copy(
            update={
                "data": cfg.data.model_copy(update={"batch_size": choice["batch_size"]})
            }
        )
        env["runtime"]["batch_size"] = {"auto": True, **choice}
        out.info(
            f"data.batch_size: auto chose {choice['batch_size']} ({choice['how']})"
        )
    elif resume is not None:
        recorded = _recorded_batch(resume)
        batch_lib.check_recorded(
            model_for, plans, cfg.data.batch_size, n_classes, gpu, recorded
        )
        if recorded:
            env["runtime"]["batch_size"] = recorded
    return Setup(
        cfg,
        index,
        skipped,
        model,
        base,
        plans,
        class_weights,
        runtime,
        env,
        topo,
        save_verdicts,
        twins,
        label_weights,
    )


def _recorded_batch(resume: Path) -> Optional[dict]:
    """How a resumed run's batch was chosen (environment.json), if by auto."""
    import json

    try:
        env = json.loads((Path(resume) / "environment.json").read_text())
    except (OSError, ValueError):
        return None
    record = (env.get("runtime") or {}).get("batch_size")
    return record if isinstance(record, dict) else None


def _recorded(resume: Path, cfg) -> data_lib.DataIndex:
    run = RunDir(resume)
    if run.status().get("state") == "completed":
        raise ConfigError(f"--resume {resume}: the run is already completed")
    index = split_lib.load(
        run.path,
        cache_file=preflight_lib.cache_file(cfg),
        rehash=cfg.data.rehash,
    )
    if index is None:
        raise ConfigError(
            f"--resume {resume}: the run has no recorded file list (it was "
            "started by an older finetune-cli); start a new run"
        )
    return index


def check_batch(cfg, topo, n_train: int) -> None:
    """Under a strategy the global batch must split evenly over the replicas
    and leave every worker at least one full batch per epoch."""
    if not topo.distributed:
        return
    batch = cfg.data.batch_size
    if batch % topo.replicas:
        raise ConfigError(
            f"data.batch_size is the global batch and must split evenly over "
            f"the {topo.replicas} replicas of runtime.distribute: {topo.kind}; "
            f"use a multiple of {topo.replicas}. Received: "
            f"data.batch_size={batch}"
        )
    if topo.steps_per_epoch(n_train, batch) < 1:
        raise ConfigError(
            f"data.batch_size {batch} is larger than the {n_train} training "
            f"images can fill on {topo.workers} worker(s); lower it. "
            f"Received: data.batch_size={batch}"
        )
