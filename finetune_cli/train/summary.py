"""What a run says before it trains: devices, data, model and the plan.

`announce(trainer)` prints the run's header; `plan_rows` is the plan, one
row per phase; `describe_path` and `path_notes` say what each phase trains
on (images, cached features or cached activations) and why.
"""

from __future__ import annotations

from finetune_cli.config.schema import per_image
from finetune_cli.console import sci
from finetune_cli.console import short_metric
from finetune_cli.model.build import count_params


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
        elif per_image(cfg.augmentation) and fc.augmented == "faithful":
            why = (
                "augmentation is declared with feature_cache.augmented: "
                "faithful (views would cache augmented copies)"
            )
        else:
            why = "tf.distribute runs the whole model"
        notes.append(f"phase {p.index + 1} ({p.phase.name}) runs the base: {why}")
    return notes


def describe_path(path: str, cfg, plan=None, *, verbose: bool = True) -> str:
    """What a phase trains on; the cut's tensor name only when `verbose`;
    its image size when it is not data.image_size."""
    text = _describe_path(path, cfg, plan, verbose=verbose)
    if plan is not None and cfg.size_of(plan.phase) != tuple(cfg.data.image_size):
        h, w = cfg.size_of(plan.phase)
        text += f", {h}x{w} px"
    return text


def _describe_path(path: str, cfg, plan=None, *, verbose: bool = True) -> str:
    """What a phase trains on (without its size)."""
    views = (
        f", {cfg.feature_cache.views} augmented views"
        if per_image(cfg.augmentation)
        else ""
    )
    if path == "features":
        return "cached features"
    if path == "views":
        return f"cached features{views}"
    if path == "activations":
        if not verbose:
            return f"cached activations{views}"
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


def plan_rows(plans, cfg, replicas: int, verbose: bool = True) -> list[list[str]]:
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
                sci(ph.learning_rate),
                sched,
                str(ph.epochs),
                batch,
                describe_path(p.path, cfg, p, verbose=verbose),
            ]
        )
    return rows


def announce(t) -> None:
    """The header of a run (or of its resume) for trainer `t`."""
    cfg, out, st = t.cfg, t.out, t.state
    if t.resumed:
        where = (
            "the end-of-run evaluation"
            if st.stage == "finalize" or st.phase >= len(t.plans)
            else f"phase {st.phase + 1} ({t.plans[st.phase].phase.name})"
        )
        out.step(f"resuming {t.run.path} after epoch {st.epoch}, at {where}")
        saved = st.versions
        changed = [
            f"{k} {saved[k]} -> {v}"
            for k, v in t.versions.items()
            if saved.get(k) not in (None, v)
        ]
        if changed:
            out.warn(
                "resuming with other versions than the run started "
                f"with ({', '.join(changed)}); the state format is "
                "the same, but results may differ slightly"
            )
    out.step(f"finetune {cfg.experiment.name} -> {t.run.path}")
    gpus = [d for d in t.env["devices"] if d["type"] == "GPU"]
    out.info(
        "devices: "
        + (
            ", ".join(f"{d['name']} ({d.get('model') or 'GPU'})" for d in gpus)
            if gpus
            else "CPU only (no GPU found by TensorFlow)"
        )
    )
    policy = t.runtime.get("policy") or (
        "mixed_float16" if t.runtime["mixed_precision"] else "float32"
    )
    out.info(
        f"precision: {policy}"
        f"; XLA: {'on' if t.runtime['xla'] else 'off'}"
        f"; deterministic: {'on' if t.runtime['deterministic'] else 'off'}"
    )
    topo = t.topo
    if topo.distributed:
        out.info(
            f"distribute: {topo.kind}, {topo.replicas} replica(s) on "
            f"{topo.workers} worker(s) (this is {topo.task}"
            f"{', the chief' if topo.chief else ', writes nothing'}); "
            f"global batch {cfg.data.batch_size}, "
            f"{topo.per_replica_batch(cfg.data.batch_size)} per replica, "
            f"{t.steps} steps per epoch"
        )
    share = t.index.fraction
    out.info(
        f"data: {t.index.source}: {t.num_classes} classes, "
        + ", ".join(f"{s} {len(v)}" for s, v in t.index.splits.items())
        + (f" (data.fraction {share:g}: a smoke run)" if share < 1 else "")
    )
    out.info(
        f"model: {cfg.model.name} ({cfg.model.weights} weights), "
        f"{count_params(t.model.weights):,} parameters, "
        f"input {cfg.data.image_size[0]}x{cfg.data.image_size[1]}"
    )
    verbose = out.plain or out.verbose
    out.table(
        "plan",
        PLAN_COLUMNS,
        plan_rows(t.plans, cfg, topo.replicas, verbose),
        right=("trainable", "frozen", "LR", "epochs"),
    )
    for note in path_notes(t.plans, cfg):
        out.info(note)


# Epochs are rows of a table under a header printed at each phase's start:
# a line of 80 columns with the usual four metrics.


def _metric_names(logs: dict) -> list[str]:
    return [k for k in logs if k != "learning_rate"]


def _width(name: str) -> int:
    return max(len(short_metric(name)), 6) + 2


def epoch_header(logs: dict) -> str:
    cells = [f"{short_metric(k):>{_width(k)}}" for k in _metric_names(logs)]
    return f"{'epoch':>5}{''.join(cells)}{'lr':>9}{'time':>8}"


def epoch_line(epoch: int, logs: dict, lr: float, seconds: float) -> str:
    """One finished epoch, as a row under `epoch_header`."""
    cells = [f"{logs[k]:>{_width(k)}.4f}" for k in _metric_names(logs)]
    return f"{epoch:>5}{''.join(cells)}{sci(lr):>9}{seconds:>7.1f}s"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def done_line(metrics: dict, multi_label: bool) -> str:
    """The last line of a run: its best epoch and, with a test split, the
    test accuracy (mAP for a multi-label run)."""
    line = "no best epoch (the monitor never gave a number)"
    if metrics["best_value"] is not None:
        line = (
            f"best {metrics['monitor']} {metrics['best_value']:.4f} at epoch "
            f"{metrics['best_epoch']}"
        )
    if "test" in metrics:
        key = "map" if multi_label else "accuracy"
        line += f"; test {key} {metrics['test'][key]:.4f}"
    return f"done: {line}"
