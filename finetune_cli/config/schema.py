"""The experiment config's schema: one strict pydantic model per section.

Unknown keys are errors with a "did you mean" hint, values are typed (a
YAML boolean is not a number), and cross-field rules are checked with
messages that name the key path. The YAML loader and `--set` overrides are
`loader.py`; how pydantic's errors are said is `messages.py`. No
TensorFlow here.

Relative paths in a config (`data.dir`, `data.csv`, `model.weights`,
`experiment.output_dir`) are resolved against the current working directory.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator
from pydantic import BaseModel
from pydantic import BeforeValidator
from pydantic import ByteSize
from pydantic import Strict
from pydantic import ConfigDict
from pydantic import Discriminator
from pydantic import Field
from pydantic import Tag
from pydantic import field_validator
from pydantic import model_validator

from finetune_cli.model import applications
from finetune_cli.errors import short as _short


def _not_bool(v):
    # YAML reads `true` as a boolean, and Python's bool is an int: without
    # this, `batch_size: true` would train with a batch of 1.
    if isinstance(v, bool):
        raise ValueError(
            f"expected a number, not a boolean (true/false). Received: {v}"
        )
    return v


def _not_number(v):
    if not isinstance(v, bool):
        raise ValueError(
            f"expected true or false. Received: {_short(v)} ({type(v).__name__})"
        )
    return v


# Typed values: a boolean is not a number, a number is not a boolean, and a
# float is not silently truncated to an int.
def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"expected a finite number. Received: {v}")
    return v


Int = Annotated[int, BeforeValidator(_not_bool), Strict()]


Float = Annotated[float, BeforeValidator(_not_bool), AfterValidator(_finite)]


# A path: never the empty string (which would mean "here" silently).
PathStr = Annotated[str, Field(min_length=1)]


Bool = Annotated[bool, BeforeValidator(_not_number)]


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def duration_seconds(value) -> float:
    """Seconds in a duration: a number of seconds, or a string of numbers
    with units s, m, h, d (`90s`, `30m`, `1h30m`, `2.5h`)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, not a boolean. Received: {value}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", str(value)):
        seconds = float(value)  # a number given as text (the command line)
    else:
        text = str(value).strip().lower()
        parts = _DURATION_PART.findall(text)
        if not parts or _DURATION_PART.sub("", text).strip():
            raise ValueError(
                "expected a duration: seconds, or numbers with units s, m, h, "
                f"d (e.g. 90s, 30m, 1h30m). Received: {_short(value)}"
            )
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected a positive duration. Received: {_short(value)}")
    return seconds


def _duration(value):
    duration_seconds(value)
    return value


Duration = Annotated[
    Union[int, float, str], BeforeValidator(_not_bool), AfterValidator(_duration)
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class MLflowTracking(_Strict):
    """Where an MLflow-tracked run is logged (docs/commands.md: MLflow)."""

    # None: a local file store beside the runs, file:<output_dir>/mlruns.
    tracking_uri: Optional[str] = Field(None, min_length=1)
    # None: experiment.name.
    experiment: Optional[str] = Field(None, min_length=1)


class Tracking(_Strict):
    """Experiment trackers that a run also logs to."""

    mlflow: Optional[MLflowTracking] = None


class Experiment(_Strict):
    """Names the run and where it is written."""

    name: str = Field("experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: Int = Field(42, ge=0, le=2**32 - 1)
    output_dir: PathStr = "runs"
    # The metric that picks the best epoch of each phase and `best.keras`.
    # `val_map` (mean average precision) is multi-label's, and its default.
    monitor: Literal["val_accuracy", "val_loss", "val_map"] = "val_accuracy"
    tensorboard: Bool = False
    # Same config, seed, data and machine -> bit-identical weights, at some
    # cost in speed (docs/scale-out.md: reproducible runs).
    deterministic: Bool = False
    tracking: Tracking = Tracking()
    # Stop after the epoch that would cross this much wall time (from the
    # start of the command), committed and resumable (exit 7): `30m`, `2h`,
    # `1h30m` or seconds. `finetune --time-limit` overrides it for one
    # session, a resumed one too; a resume is not refused for changing it.
    time_limit: Optional[Duration] = None


class Split(_Strict):
    """Stratified fractions used when `data.dir` has no train/val/test folders."""

    train: Float = Field(0.8, gt=0, le=1)
    val: Float = Field(0.1, gt=0, lt=1)
    test: Float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                "train + val + test must add up to 1. Received: "
                f"train={self.train}, val={self.val}, test={self.test} "
                f"(sum {total:g})"
            )
        return self


class Data(_Strict):
    """Where the images are and how they are fed.

    Exactly one of `dir` (folder per class, optionally under train/, val/,
    test/) or `csv` (a `path,label` manifest, paths relative to the CSV).
    """

    dir: Optional[PathStr] = None
    csv: Optional[PathStr] = None
    # A folder written by `finetune-cli pack` (TFRecord shards and their
    # manifest, local or `gs://...`): the split is the manifest's.
    records: Optional[PathStr] = None
    split: Split = Split()
    image_size: tuple[Int, Int] = (224, 224)
    # `auto`: the largest power-of-two batch that fits this device, found by
    # a short probe and recorded in the run (docs/config.md).
    batch_size: Union[Annotated[Int, Field(ge=1)], Literal["auto"]] = 32
    # Allow CSV paths outside the CSV's folder (e.g. absolute paths).
    allow_outside_root: Bool = False
    # What the pre-flight check does with an unreadable, truncated or empty
    # image, or a file whose bytes are also in another split: "error" stops
    # before training naming it; "skip" leaves it (the held-out copy) out
    # and lists it in the run folder (skipped_images.txt).
    on_bad_image: Literal["error", "skip"] = "error"
    # Hash every image on every run (pre-flight, resume, evaluate) instead
    # of trusting the verdict cache for files whose size and modification
    # time are unchanged (a file rewritten in place with its mtime kept).
    rehash: Bool = False
    # task: multi_label: the separator of the labels in the CSV's `label`
    # cell (`cat|dog`); an empty cell is an image with none of the labels.
    label_separator: str = Field("|", min_length=1, max_length=8)
    # A share of the images for a smoke run (CI, a first try): each split
    # keeps this fraction of every class (at least one image a class),
    # drawn with experiment.seed; recorded in the run's split.json.
    fraction: Float = Field(1.0, gt=0, le=1)

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, v):
        return (v, v) if isinstance(v, int) else v

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v):
        if min(v) < 1:
            raise ValueError(f"sizes must be positive. Received: {list(v)}")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        given = [x for x in (self.dir, self.csv, self.records) if x is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of `data.dir` (folder per class), `data.csv` "
                "(path,label manifest) or `data.records` (shards written by "
                f"`finetune-cli pack`). Received: dir={_short(self.dir)}, "
                f"csv={_short(self.csv)}, records={_short(self.records)}"
            )
        if self.records is not None and self.fraction < 1:
            raise ValueError(
                "data.fraction keeps a share of each class's files; shards are "
                "read whole: pack a smaller set instead. Received: "
                f"fraction={self.fraction} with records"
            )
        return self


class Model(_Strict):
    """The pretrained base: any image classifier in `keras.applications`."""

    name: str = "MobileNetV2"
    # "imagenet" (downloads), "none" (random init) or a path to a .h5 /
    # .weights.h5 file of the base without its top.
    weights: PathStr = "imagenet"
    pooling: Literal["avg", "max"] = "avg"
    # Extra keyword arguments of the application constructor, e.g. alpha.
    options: dict[str, Any] = {}
    # Override the BatchNormalization momentum of the base (useful when
    # training a base from scratch on little data). null keeps the default.
    bn_momentum: Optional[Float] = Field(None, gt=0, lt=1)

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        try:
            return applications.get(v).name
        except KeyError as e:
            raise ValueError(e.args[0]) from None

    @field_validator("weights", mode="before")
    @classmethod
    def _none(cls, v):
        return "none" if v is None else v

    @field_validator("options")
    @classmethod
    def _reserved(cls, v):
        reserved = {"weights", "include_top", "input_shape", "pooling", "classes"}
        bad = sorted(reserved & set(v))
        if bad:
            raise ValueError(
                f"{', '.join(bad)} are set by finetune-cli (use model.weights, "
                f"model.pooling, data.image_size). Received: {_short(bad)}"
            )
        return v


class HeadLayer(_Strict):
    """One layer of the classification head, before the output layer."""

    type: Literal["dense", "dropout", "batchnorm"]
    units: Optional[Int] = Field(None, ge=1, le=65536)
    activation: Optional[str] = None
    l2: Optional[Float] = Field(None, ge=0)
    rate: Optional[Float] = Field(None, ge=0, lt=1)

    @model_validator(mode="after")
    def _fields_fit_type(self):
        allowed = {
            "dense": {"units", "activation", "l2"},
            "dropout": {"rate"},
            "batchnorm": set(),
        }[self.type]
        given = {
            k
            for k in ("units", "activation", "l2", "rate")
            if getattr(self, k) is not None
        }
        extra = sorted(given - allowed)
        if extra:
            raise ValueError(
                f"a {self.type} layer takes {sorted(allowed) or 'no options'}. "
                f"Received: {_short(extra)}"
            )
        if self.type == "dense" and self.units is None:
            raise ValueError("a dense layer needs `units`. Received: units=None")
        if self.type == "dropout" and self.rate is None:
            raise ValueError("a dropout layer needs `rate`. Received: rate=None")
        return self


# Ops that mix pairs of training images and their labels (a batch's worth
# at a time), after the per-image ops; the others change one image.
MIXING = ("mixup", "cutmix")


class Augmentation(_Strict):
    """One Keras preprocessing op applied to training batches only.

    Per image: flip (`mode`), rotation, zoom, translation, contrast,
    brightness (`factor`), randaugment (`num_ops` ops of strength `factor`,
    default 2 and 0.5). Mixing pairs of images and their labels, after
    those: mixup (`alpha`, default 0.2), cutmix (`alpha`, default 1.0).
    """

    type: Literal[
        "flip",
        "rotation",
        "zoom",
        "translation",
        "contrast",
        "brightness",
        "randaugment",
        "mixup",
        "cutmix",
    ]
    # Fraction: of a full turn (rotation), of the size (zoom, translation),
    # of the intensity range (contrast, brightness), of the strongest
    # change (randaugment).
    factor: Optional[Float] = Field(None, gt=0, le=1)
    mode: Optional[Literal["horizontal", "vertical", "horizontal_and_vertical"]] = None
    num_ops: Optional[Int] = Field(None, ge=1, le=16)
    # The Beta(alpha, alpha) distribution the mixing weights are drawn from.
    alpha: Optional[Float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _fields_fit_type(self):
        allowed = {
            "flip": {"mode"},
            "randaugment": {"factor", "num_ops"},
            "mixup": {"alpha"},
            "cutmix": {"alpha"},
        }.get(self.type, {"factor"})
        given = {
            k
            for k in ("factor", "mode", "num_ops", "alpha")
            if getattr(self, k) is not None
        }
        extra = sorted(given - allowed)
        if extra:
            raise ValueError(
                f"{self.type} takes {', '.join(f'`{k}`' for k in sorted(allowed))}, "
                f"not {', '.join(f'`{k}`' for k in extra)}. Received: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in extra)
            )
        if self.type == "flip":
            self.mode = self.mode or "horizontal"
        elif self.type == "randaugment":
            self.factor = 0.5 if self.factor is None else self.factor
            self.num_ops = 2 if self.num_ops is None else self.num_ops
        elif self.type in MIXING:
            if self.alpha is None:
                self.alpha = 0.2 if self.type == "mixup" else 1.0
        elif self.factor is None:
            raise ValueError(f"{self.type} needs `factor`. Received: factor=None")
        return self


def per_image(augmentation) -> list:
    """The ops of an `augmentation` list that change one image at a time."""
    return [a for a in augmentation if a.type not in MIXING]


def mixing(augmentation) -> list:
    """The ops of an `augmentation` list that mix pairs of images."""
    return [a for a in augmentation if a.type in MIXING]


class TrainableLayers(_Strict):
    """Which base layers train: exactly one of `top`, `from_layer`, `regex`."""

    top: Optional[Int] = Field(None, ge=1)
    from_layer: Optional[str] = None
    regex: Optional[str] = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [
            k for k in ("top", "from_layer", "regex") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `top` (the top N layers), `from_layer` "
                "(that layer and all after it) or `regex` (names matching). "
                f"Received: {_short(given) if given else 'none of them'}"
            )
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(
                    f"invalid regex: {e}. Received: {_short(self.regex)}"
                ) from None
        return self


def _trainable_tag(v):
    return "trainable:name" if isinstance(v, str) else "trainable:layers"


Trainable = Annotated[
    Union[
        Annotated[Literal["none", "all"], Tag("trainable:name")],
        Annotated[TrainableLayers, Tag("trainable:layers")],
    ],
    Discriminator(_trainable_tag),
]


_OPTIMIZER_PARAMS = {
    "adam": {"beta_1", "beta_2", "epsilon", "amsgrad", "weight_decay"},
    "adamw": {"beta_1", "beta_2", "epsilon", "amsgrad", "weight_decay"},
    "sgd": {"momentum", "nesterov", "weight_decay"},
    "rmsprop": {"rho", "momentum", "epsilon", "centered", "weight_decay"},
}


_COMMON_OPTIMIZER_PARAMS = {
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
}


class Optimizer(_Strict):
    """A Keras optimizer by name with its parameters (not the learning rate)."""

    name: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    beta_1: Optional[Float] = Field(None, gt=0, lt=1)
    beta_2: Optional[Float] = Field(None, gt=0, lt=1)
    epsilon: Optional[Float] = Field(None, gt=0)
    amsgrad: Optional[Bool] = None
    weight_decay: Optional[Float] = Field(None, ge=0)
    momentum: Optional[Float] = Field(None, ge=0, lt=1)
    nesterov: Optional[Bool] = None
    rho: Optional[Float] = Field(None, gt=0, lt=1)
    centered: Optional[Bool] = None
    clipnorm: Optional[Float] = Field(None, gt=0)
    clipvalue: Optional[Float] = Field(None, gt=0)
    global_clipnorm: Optional[Float] = Field(None, gt=0)
    # Keras' exponential moving average of the weights (Polyak averaging):
    # validation, the best epoch and the phase's result use the average.
    use_ema: Optional[Bool] = None
    ema_momentum: Optional[Float] = Field(None, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _params_fit(self):
        if self.ema_momentum is not None and not self.use_ema:
            raise ValueError(
                "ema_momentum needs use_ema: true. Received: "
                f"ema_momentum={self.ema_momentum}, use_ema={self.use_ema}"
            )
        allowed = _OPTIMIZER_PARAMS[self.name] | _COMMON_OPTIMIZER_PARAMS
        given = self.params()
        bad = sorted(set(given) - allowed)
        if bad:
            raise ValueError(
                f"{self.name} does not take {bad}; it takes "
                f"{sorted(allowed)}. Received: {bad}"
            )
        return self

    def params(self) -> dict:
        """The parameters set by the user, as Keras keyword arguments."""
        return {
            k: v for k, v in self.model_dump().items() if k != "name" and v is not None
        }


class Schedule(_Strict):
    """Learning-rate schedule over the phase's steps.

    constant; cosine (to `alpha` x LR); exponential (x `decay_rate` per
    epoch); warmup (linear from 0, then constant). `warmup_epochs` adds a
    linear warmup to constant and cosine.
    """

    name: Literal["constant", "cosine", "exponential", "warmup"] = "constant"
    warmup_epochs: Float = Field(0.0, ge=0)
    alpha: Float = Field(0.0, ge=0, le=1)
    decay_rate: Float = Field(0.9, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _warmup(self):
        if self.name == "warmup" and self.warmup_epochs == 0:
            self.warmup_epochs = 1.0
        if self.name == "exponential" and self.warmup_epochs:
            raise ValueError(
                "exponential decay has no warmup; use cosine or warmup. "
                f"Received: warmup_epochs={self.warmup_epochs}"
            )
        return self


class EarlyStopping(_Strict):
    monitor: str = "val_loss"
    patience: Int = Field(3, ge=0)
    min_delta: Float = Field(0.0, ge=0)


class ReduceLROnPlateau(_Strict):
    monitor: str = "val_loss"
    factor: Float = Field(0.2, gt=0, lt=1)
    patience: Int = Field(2, ge=0)
    min_lr: Float = Field(0.0, ge=0)


class Callbacks(_Strict):
    early_stopping: Optional[EarlyStopping] = None
    reduce_lr_on_plateau: Optional[ReduceLROnPlateau] = None


_MONITORS = {"loss", "accuracy", "val_loss", "val_accuracy", "map", "val_map"}


class Phase(_Strict):
    """One step of the schedule: what trains, how, for how long."""

    name: str
    epochs: Int = Field(ge=1)
    trainable: Trainable = "none"
    # frozen: BatchNormalization layers never train and stay in inference
    # mode, even inside the unfrozen range. train: they train (batch
    # statistics, moving averages and gamma/beta update) when unfrozen.
    batchnorm: Literal["frozen", "train"] = "frozen"
    optimizer: Optimizer = Optimizer()
    learning_rate: Float = Field(1e-3, gt=0)
    schedule: Schedule = Schedule()
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    # null (none), "auto" (balanced: n / (k * count)) or {class: weight}.
    class_weight: Union[Literal["auto"], dict[str, Float], None] = None
    callbacks: Callbacks = Callbacks()
    # Train this phase at another image size than data.image_size (which
    # stays the size the model is evaluated, exported and served at): e.g.
    # a head phase at 160 px, then the fine-tune at 224 (progressive
    # resizing). null: data.image_size.
    image_size: Optional[tuple[Int, Int]] = None

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, v):
        return (v, v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v):
        if v is not None and min(v) < 1:
            raise ValueError(f"sizes must be positive. Received: {list(v)}")
        return v

    @model_validator(mode="after")
    def _rules(self):
        cbs = self.callbacks
        for key, cb in (
            ("early_stopping", cbs.early_stopping),
            ("reduce_lr_on_plateau", cbs.reduce_lr_on_plateau),
        ):
            if cb is not None and cb.monitor not in _MONITORS:
                raise ValueError(
                    f"callbacks.{key}.monitor must be one of "
                    f"{sorted(_MONITORS)}. Received: {_short(cb.monitor)}"
                )
        if cbs.reduce_lr_on_plateau is not None and (
            self.schedule.name != "constant" or self.schedule.warmup_epochs
        ):
            raise ValueError(
                "callbacks.reduce_lr_on_plateau needs a constant learning "
                "rate; it cannot be combined with a schedule. Received: "
                f"schedule={self.schedule.name!r}"
            )
        if isinstance(self.class_weight, dict):
            bad = {k: v for k, v in self.class_weight.items() if v <= 0}
            if bad:
                raise ValueError(f"class weights must be positive. Received: {bad}")
        return self


class FeatureCache(_Strict):
    """Cached base features for phases that train only the head.

    A phase whose base is frozen, before any phase that trains the base,
    trains its head on features computed once (see `finetune-cli extract`)
    instead of running the base every epoch.
    """

    enabled: Bool = True
    dir: PathStr = "features"
    # With augmentation declared: "views" (the default) caches `views`
    # augmented copies of each training image and cycles through them, one
    # per epoch; "faithful" runs the base every epoch on freshly augmented
    # images. Two views: as accurate as faithful at a quarter of the time
    # (bench/augmented_head.py, bench/recipe_candidates.py --views).
    augmented: Literal["faithful", "views"] = "views"
    views: Int = Field(2, ge=2)
    shard_size: Int = Field(1024, ge=1)
    # A phase that trains the top of the base under frozen BN trains on the
    # bottom's outputs, computed once (activations.py).
    activations: Bool = True
    activation_dtype: Literal["float16", "float32"] = "float16"
    # Every base/size/weights keeps its own entry (alternating two configs
    # recomputes nothing); the least recently used entries of the whole
    # folder go once it holds more than this: bytes, or 500MB, 10GB, 2GiB.
    max_size: Annotated[ByteSize, BeforeValidator(_not_bool)] = ByteSize(10 * 10**9)


class Calibration(_Strict):
    """After training: probabilities fitted to mean what they say, and
    when a prediction is "unknown" (docs/config.md: calibration)."""

    # temperature: one temperature fitted on the validation split, folded
    # into the output layer of best.keras (and so of every export); none:
    # the probabilities as trained. `calibration: none` is short for it.
    method: Literal["temperature", "none"] = "temperature"
    # predict answers `unknown` when the top (calibrated) probability is
    # below this; `predict --reject-below` overrides it, and exports carry
    # it in their metadata. null: always a class.
    reject_below: Optional[Float] = Field(None, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"method": v} if isinstance(v, str) else v


class Runtime(_Strict):
    """Where and how the run computes (docs/scale-out.md)."""

    # auto: mixed_float16 when TensorFlow finds a GPU, float32 otherwise;
    # on: mixed_float16; bfloat16: mixed_bfloat16 (GPUs from Ampere on, TPUs:
    # bfloat16 needs no loss scaling); off: float32. The output layer stays
    # float32 under either.
    mixed_precision: Literal["auto", "on", "off", "bfloat16"] = "auto"
    # auto: XLA when TensorFlow finds a GPU (and runs are not deterministic),
    # off on CPU, where it slowed training and inference (bench/throughput.py).
    xla: Union[Literal["auto"], Bool] = "auto"
    # auto: mirrored when TensorFlow finds more than one GPU, else none.
    # multi_worker reads the cluster from the TF_CONFIG environment variable.
    distribute: Literal["auto", "none", "mirrored", "multi_worker", "tpu"] = "auto"
    # Split the host CPU into this many logical devices (a strategy without
    # GPUs, for trying and testing one).
    logical_cpus: Optional[Int] = Field(None, ge=1, le=64)
    # multi_worker: seconds to wait for every worker at start, and after
    # which a worker that stopped answering ends the others' run.
    worker_timeout: Int = Field(60, ge=5)

    @model_validator(mode="after")
    def _supported(self):
        if self.distribute == "tpu":
            raise ValueError(
                "distribute: tpu is not supported yet; use none, mirrored or "
                "multi_worker. Received: distribute='tpu'"
            )
        return self


class Config(_Strict):
    """A whole experiment."""

    # single_label: one class an image (softmax); multi_label: any number of
    # labels an image (sigmoid, binary cross-entropy, per-label thresholds
    # chosen on val), labels from `data.csv` (docs/multi-label.md).
    task: Literal["single_label", "multi_label"] = "single_label"
    experiment: Experiment = Experiment()
    data: Data
    model: Model = Model()
    head: list[HeadLayer] = []
    augmentation: list[Augmentation] = []
    phases: list[Phase] = Field(min_length=1)
    feature_cache: FeatureCache = FeatureCache()
    calibration: Calibration = Calibration()
    runtime: Runtime = Runtime()
    # finetune-cli tune: key path -> space (search_lib.py); finetune ignores it.
    search: dict[str, Any] = {}

    @model_validator(mode="after")
    def _cross_field(self):
        app = applications.get(self.model.name)
        self._check_size(app, self.data.image_size, ("data", "image_size"))
        for i, p in enumerate(self.phases):
            if p.image_size is not None:
                self._check_size(app, p.image_size, ("phases", i, "image_size"))
        self._check_task()
        names = [p.name for p in self.phases]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _KeyError(
                    ("phases", i, "name"),
                    f"phase names must be unique. Received: {name!r} twice",
                )
        return self

    def _check_task(self) -> None:
        multi = self.task == "multi_label"
        if multi and self.data.csv is None and self.data.records is None:
            raise _KeyError(
                ("data", "dir"),
                "task: multi_label reads its labels from a CSV manifest: set "
                "data.csv (a `path,label` file whose label cell holds the "
                f"labels joined by data.label_separator "
                f"{self.data.label_separator!r}). Received: data.dir="
                f"{_short(self.data.dir)}",
            )
        if multi and "monitor" not in self.experiment.model_fields_set:
            self.experiment.monitor = "val_map"
        if multi and self.experiment.monitor == "val_accuracy":
            raise _KeyError(
                ("experiment", "monitor"),
                "val_accuracy is single-label's metric; task: multi_label "
                "monitors val_map (mean average precision) or val_loss. "
                "Received: experiment.monitor='val_accuracy'",
            )
        if not multi and self.experiment.monitor == "val_map":
            raise _KeyError(
                ("experiment", "monitor"),
                "val_map is measured for task: multi_label only; use "
                "val_accuracy or val_loss. Received: experiment.monitor='val_map'",
            )

    def _check_size(self, app, size, loc) -> None:
        h, w = size
        key = ".".join(map(str, loc))
        if min(h, w) < app.min_size:
            raise _KeyError(
                loc,
                f"{app.name} needs images of at least {app.min_size}x"
                f"{app.min_size}. Received: {key}={[h, w]}",
            )
        if (
            app.imagenet_fixed_size
            and self.model.weights == "imagenet"
            and (h, w) != (app.default_size, app.default_size)
        ):
            raise _KeyError(
                loc,
                f"{app.name} with ImageNet weights only accepts "
                f"{app.default_size}x{app.default_size}. Received: "
                f"{key}={[h, w]}",
            )

    def size_of(self, phase) -> tuple:
        """The image size `phase` trains at (its own, or data.image_size)."""
        return tuple(phase.image_size or self.data.image_size)

    def at_size(self, size) -> "Config":
        """This config with data.image_size set to `size` (what a phase at
        another size reads its images, caches and model with)."""
        size = tuple(size)
        if size == tuple(self.data.image_size):
            return self
        return self.model_copy(
            update={"data": self.data.model_copy(update={"image_size": size})}
        )


class _KeyError(ValueError):
    """A cross-field error that knows the key path it is about."""

    def __init__(self, loc, message):
        super().__init__(message)
        self.loc = loc
        self.message = message
