"""`finetune-cli select`: which backbone for this data, measured in minutes.

For each candidate application the frozen base runs once over the train
and validation images (the feature cache: a rerun, or a later `finetune`
of the winner, computes nothing again), and a probe is trained on those
features: multinomial logistic regression (standardised features, one
softmax layer) in a few seconds. The candidates are ranked by the probe's
validation accuracy (ties: the faster base first), beside what serving
them costs: images/s of the base on this machine, parameters and the size
of the exported `.keras` file. The test split is never read, so the run
that the winner's config makes is still judged on images the choice never
saw.

A probe ranks frozen features, not fine-tuned models: it is the cheap
first cut that Battle of the Backbones and timm's `bulk_runner` measure
too. The winner's config is the given config with `model`,
`data.image_size` and the phases' `trainable` layers rewritten for it.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Optional

import keras

from finetune_cli.cache import features
from finetune_cli.cache import heads
from finetune_cli.cache.extract import cache_root
from finetune_cli.data import index as data_lib
from finetune_cli.data import multilabel
from finetune_cli.data import pipeline
from finetune_cli.data import preflight as preflight_lib
from finetune_cli.errors import ConfigError
from finetune_cli.model import applications
from finetune_cli.model import build as model_lib
from finetune_cli.runtime import environment

SPEED_BATCHES = 3


@dataclasses.dataclass
class Candidate:
    """One backbone's config and, once measured, what it scored."""

    name: str
    cfg: object  # the Config this candidate trains with
    why_size: str = ""
    val_accuracy: Optional[float] = None
    train_accuracy: Optional[float] = None
    images_per_s: Optional[float] = None
    params: Optional[int] = None
    export_bytes: Optional[int] = None
    feature_seconds: float = 0.0
    reused: bool = False
    probe_seconds: float = 0.0
    error: Optional[str] = None

    @property
    def weights(self) -> str:
        return self.cfg.model.weights

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size[0]

    def as_dict(self) -> dict:
        d = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in ("cfg", "why_size")
        }
        return {**d, "weights": self.weights, "image_size": self.image_size}


def candidate_configs(
    cfg, names, weights: dict, default_weights: Optional[str], image_size=None
) -> list[Candidate]:
    """The config each candidate is measured with, checked before any work.

    `weights` maps an application name to its weights (a file, imagenet or
    none); a candidate without one takes, in order: the config's weights if
    it is the config's model, a no-top file for it in the Keras cache,
    `default_weights`, or imagenet (a download). Each keeps the config's
    image size where the application accepts it, else takes its default.

    Raises:
        ConfigError: an unknown or repeated model, weights for a model not
            among the candidates, or a candidate config that does not
            validate (naming the model).
    """
    from finetune_cli.config import validate
    from finetune_cli.model.weights import check_weights
    from finetune_cli.model import catalog

    apps = []
    for n in names:
        try:
            app = applications.get(n)
        except KeyError as e:
            raise ConfigError(f"--models: {e.args[0]}") from None
        if app.name in [a.name for a in apps]:
            raise ConfigError(f"--models: {app.name} is named twice. Received: {n}")
        apps.append(app)
    wanted = {a.name for a in apps}
    named = {}
    for key, value in weights.items():
        try:
            named[applications.get(key).name] = value
        except KeyError as e:
            raise ConfigError(f"--weights {key}=...: {e.args[0]}") from None
    stray = sorted(set(named) - wanted)
    if stray:
        raise ConfigError(
            f"--weights: {', '.join(stray)} is not among --models "
            f"({', '.join(sorted(wanted))}). Received: {stray}"
        )
    raw = cfg.model_dump(mode="json")
    out = []
    for app in apps:
        w = named.get(app.name)
        if w is None and app.name == cfg.model.name:
            w = cfg.model.weights
        w = w or catalog.local_weights(app.name) or default_weights or "imagenet"
        if w not in ("imagenet", "none"):
            check_weights(w, key=f"--weights {app.name}")
        size = image_size or cfg.data.image_size[0]
        why = ""
        fixed = app.imagenet_fixed_size and w == "imagenet"
        if size < app.min_size or (fixed and size != app.default_size):
            why = f"{app.name} needs {app.default_size if fixed else app.min_size}+ px"
            size = app.default_size
        model = {**raw["model"], "name": app.name, "weights": w}
        if app.name != cfg.model.name:
            model["options"] = {}  # options of another constructor
        c = validate(
            {**raw, "model": model, "data": {**raw["data"], "image_size": size}},
            source=f"the config for {app.name}",
        )
        out.append(Candidate(app.name, c, why))
    return out


def select(cfg, candidates: list[Candidate], out) -> list[Candidate]:
    """Measure every candidate on `cfg`'s data; ranked best first.

    A candidate whose base cannot be built (an ImageNet download that
    fails offline, say) keeps its error and ranks last; the others go on.

    Raises:
        DataError: the data folder or an image is bad (the pre-flight).
        ConfigError: no candidate could be measured.
    """
    from finetune_cli.config import checks

    checks.check(cfg)
    cfg = _inference_batch(cfg, out)
    index = data_lib.index_config(cfg)
    index, _, save_verdicts = preflight_lib.scan_images(index, cfg, out)
    save_verdicts()
    n_train, n_val = len(index.splits["train"]), len(index.splits["val"])
    out.info(
        f"data: {len(index.class_names)} classes, train {n_train}, val {n_val} "
        "(the test split is not read)"
    )
    for i, c in enumerate(candidates, 1):
        out.step(f"{c.name} ({i}/{len(candidates)}), {c.image_size} px, {c.weights}")
        try:
            _measure(c, _inference_batch(c.cfg, None), index, out)
        except ConfigError as e:
            c.error = str(e)
            out.warn(f"{c.name}: left out: {e}")
        finally:
            keras.backend.clear_session()
    if all(c.error for c in candidates):
        raise ConfigError(
            "select: no candidate could be measured; " + candidates[0].error
        )
    features.evict(cfg, out)
    return rank(candidates)


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Best validation accuracy first; a tie goes to the faster base."""
    return sorted(
        candidates,
        key=lambda c: (
            c.error is not None,
            -(c.val_accuracy or 0.0),
            -(c.images_per_s or 0.0),
        ),
    )


def _inference_batch(cfg, out):
    if cfg.data.batch_size != "auto":
        return cfg
    if out is not None:
        out.info("data.batch_size: auto is for training; select uses 32")
    return cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"batch_size": 32})}
    )


def _measure(c: Candidate, cfg, index, out) -> None:
    environment.configure_runtime(cfg, environment.has_gpu())
    extractor = features.build_extractor(cfg)
    c.params = int(extractor.count_params())
    sets = {}
    for split in ("train", "val"):
        root = cache_root(cfg) / split
        fs, r = features.get_features(cfg, extractor, index, split, root, out)
        sets[split] = fs.load()
        c.feature_seconds += r.seconds
        c.reused = r.reused if split == "train" else c.reused and r.reused
    c.images_per_s = base_speed(extractor, cfg, index)
    (xt, yt, _), (xv, yv, _) = sets["train"], sets["val"]
    if index.multi_label:  # label sets from the index, scored by mAP
        yt, yv = (
            multilabel.targets(index.labels(s), len(index.class_names))
            for s in ("train", "val")
        )
    t0 = time.monotonic()
    probe, c.train_accuracy, c.val_accuracy = heads.train_probe(
        xt[0], yt, xv[0], yv, len(index.class_names), cfg.experiment.seed
    )
    c.probe_seconds = time.monotonic() - t0
    c.export_bytes = exported_size(extractor, probe)
    out.info(
        f"{c.name}: probe val {c.val_accuracy:.4f} (train "
        f"{c.train_accuracy:.4f}) in {c.probe_seconds:.1f}s; base "
        f"{c.images_per_s:.1f} img/s"
    )


def base_speed(extractor, cfg, index) -> float:
    """Images/s of the base (preprocessing and pooling included) over a
    few batches of real validation images, after a warm-up batch."""
    samples = index.splits["val"] + index.splits["train"]
    batch = cfg.data.batch_size
    ds = pipeline.make_dataset(
        samples[: batch * (SPEED_BATCHES + 1)],
        len(index.class_names),
        cfg.data.image_size,
        batch,
    )
    images = [x for x, _ in ds]
    extractor.predict_on_batch(images[0])  # tracing is not speed
    timed = images[1:] or images
    t0 = time.perf_counter()
    for x in timed:
        extractor.predict_on_batch(x)
    return sum(int(x.shape[0]) for x in timed) / (time.perf_counter() - t0)


def exported_size(extractor, probe) -> int:
    """Bytes of the `.keras` file of base and probe together (what
    `export --format keras` writes for this base, but for the head)."""
    model = keras.Model(extractor.input, probe(extractor.output))
    with tempfile.TemporaryDirectory(prefix="finetune-cli-select-") as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        return path.stat().st_size


def winner_config(raw: dict, winner: Candidate, source: str) -> tuple[str, list]:
    """The YAML of `raw` (the config file as written) for the winner, and
    the phases whose `trainable` layers were chosen again for it.

    A phase that names layers of the base (`from_layer`, `regex`, `top`)
    names another model's layers: it is rewritten with the default
    recipe's choice for the winner (`recipe.fine_tune_trainable`).
    """
    import copy

    import yaml

    from finetune_cli.config import recipe
    from finetune_cli.config import validate

    raw = copy.deepcopy(raw)
    model = raw.setdefault("model", {})
    changed = model.get("name", "MobileNetV2") != winner.name
    model["name"] = winner.name
    model["weights"] = winner.weights
    if changed:
        model.pop("options", None)
    raw.setdefault("data", {})["image_size"] = winner.image_size
    rewritten = []
    if changed:
        trainable = None
        for i, phase in enumerate(raw.get("phases") or []):
            if isinstance(phase, dict) and isinstance(phase.get("trainable"), dict):
                if trainable is None:
                    base = model_lib.build_base(
                        winner.cfg.model.model_copy(update={"weights": "none"}),
                        winner.cfg.data.image_size,
                    )
                    trainable, why = recipe.fine_tune_trainable(base, winner.name)
                    keras.backend.clear_session()
                phase["trainable"] = trainable
                rewritten.append((i, phase.get("name"), why))
    validate(raw, source=f"the config for {winner.name}")
    head = [
        f"# Written by `finetune-cli select` from {' '.join(source.splitlines())}:",
        f"# {winner.name} ranked first, probe val accuracy "
        f"{winner.val_accuracy:.4f} at {winner.image_size} px.",
    ]
    for i, name, why in rewritten:
        head.append(f"# phases.{i} ({name}) trains {why} (the default recipe's share).")
    body = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=100)
    return "\n".join(head) + "\n" + body, rewritten
