"""Bad input, table-driven and grouped by class. Every case asserts: the
documented exit code, a message naming the key path, file or image at
fault, no traceback, and nothing written (no run folder, no epoch, no
other file). To add a class, add a group to CASES."""

import shutil

import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli.cli.main import app
from finetune_cli.errors import EXIT_CONFIG
from finetune_cli.errors import EXIT_DATA

from conftest import tiny_config

runner = CliRunner()
C, D = EXIT_CONFIG, EXIT_DATA


# --------------------------------------------------------------------------
# How a case is built: it gets (tmp_path, data folder) and returns the
# config (a dict, or YAML text) and optionally the command line to run.
# --------------------------------------------------------------------------


def cfg(fn):
    """Change the raw config."""

    def setup(t, d):
        raw = tiny_config(d, t)
        fn(raw, t, d)
        return raw, None

    return setup


def data(fn):
    """Change the data folder."""

    def setup(t, d):
        fn(t, d)
        return tiny_config(d, t), None

    return setup


def text(s):
    """The config file's text as given."""
    return lambda t, d: (s, None)


def args(*argv, change=None):
    """Run other arguments ({cfg} is the config path, {t} the tmp folder)."""

    def setup(t, d):
        raw = tiny_config(d, t)
        if change:
            change(raw, t, d)
        return raw, list(argv)

    return setup


def phase(**kw):
    return cfg(lambda r, t, d: r["phases"][0].update(kw))


def section(section_name, **kw):
    return cfg(lambda r, t, d: r.setdefault(section_name, {}).update(kw))


def csv_data(rows, header="path,label", encoding="utf-8", raw_bytes=None):
    def change(r, t, d):
        path = d / "m.csv"
        if raw_bytes is not None:
            path.write_bytes(raw_bytes)
        else:
            path.write_text(
                header + "\n" + "".join(x + "\n" for x in rows), encoding=encoding
            )
        r["data"].pop("dir")
        r["data"]["csv"] = str(path)

    return cfg(change)


def bomb(levels=9):
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return text(
        "\n".join(lines) + f"\ndata: {{dir: *a{levels - 1}}}\n"
        "phases: [{name: h, epochs: 1}]\n"
    )


def keras_weights_file(t):
    """A real HDF5 weights file of a model that is not the base."""
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = t / "other.weights.h5"
    model.save_weights(str(path))
    return str(path)


def lambda_model(t):
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda v: v * 2.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    folder = t / "lm"
    folder.mkdir()
    model.save(folder / "m.keras")
    (folder / "labels.txt").write_text("circle\nsquare\nstar\ntriangle\n")
    return str(folder / "m.keras")


def plain_model(t):
    """A small .keras model of standard layers, with labels.txt."""
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    folder = t / "pm"
    folder.mkdir()
    model.save(folder / "m.keras")
    (folder / "labels.txt").write_text("circle\nsquare\nstar\ntriangle\n")
    return str(folder / "m.keras")


def truncated(t, d):
    folder = t / "to-predict"
    folder.mkdir()
    (folder / "cut.png").write_bytes(
        (d / "circle" / "circle_0001.png").read_bytes()[:200]
    )
    return str(folder)


CASES = {
    # ---- documents that explode or are not a config ----------------------
    "document": [
        (
            "duplicate YAML key",
            C,
            ["duplicate key 'data'"],
            text("data: {dir: a}\ndata: {dir: b}\nphases: []\n"),
        ),
        (
            "YAML syntax error",
            C,
            ["invalid YAML", "line 2"],
            text("data: {dir: [unclosed\n"),
        ),
        ("tab indentation", C, ["invalid YAML"], text("data:\n\tdir: x\n")),
        (
            "top level is a list",
            C,
            ["top level must be a mapping", "list"],
            text("- data\n- phases\n"),
        ),
        (
            "top level is a number",
            C,
            ["top level must be a mapping", "int"],
            text("42\n"),
        ),
        ("alias bomb", C, ["expands to more than 100,000 values"], bomb()),
        (
            "self-referencing alias",
            C,
            ["refers to itself"],
            text("a: &a [*a]\ndata: {dir: x}\nphases: [{name: h, epochs: 1}]\n"),
        ),
        (
            "nested 40 levels",
            C,
            ["nested deeper than 32"],
            text("x: " + "[" * 40 + "]" * 40 + "\n"),
        ),
        (
            "config over 1 MiB",
            C,
            ["a config is at most 1,048,576"],
            text("# " + "x" * (1 << 20) + "\n"),
        ),
        (
            "config file missing",
            C,
            ["config file not found", "nope.yaml"],
            args("finetune", "{t}/nope.yaml"),
        ),
        (
            "config path is a folder",
            C,
            ["is a folder; expected a YAML file"],
            args("finetune", "{t}"),
        ),
        (
            "config not UTF-8",
            C,
            ["cannot read config file"],
            args(
                "finetune",
                "{t}/latin1.yaml",
                change=lambda r, t, d: (t / "latin1.yaml").write_bytes(
                    "name: caf\xe9\n".encode("latin-1")
                ),
            ),
        ),
        ("empty config", C, ["data: required key is missing"], text("")),
        (
            "huge Received: excerpt is short",
            C,
            ["data.dir", "..."],
            text(
                "data: {dir: [" + ",".join(['"abcdefghij"'] * 5000) + "]}\n"
                "phases: [{name: h, epochs: 1}]\n"
            ),
        ),
    ],
    # ---- unknown keys ----------------------------------------------------
    "unknown keys": [
        (
            "unknown top-level key",
            C,
            ["modle", "did you mean 'model'"],
            cfg(lambda r, t, d: r.update(modle={})),
        ),
        (
            "typo in phase key",
            C,
            ["lerning_rate", "did you mean 'learning_rate'"],
            phase(lerning_rate=1e-3),
        ),
        (
            "typo in data key",
            C,
            ["data.batchsize", "did you mean 'batch_size'"],
            section("data", batchsize=8),
        ),
        (
            "typo in experiment key",
            C,
            ["experiment.sede"],
            section("experiment", sede=1),
        ),
        (
            "unknown head layer key",
            C,
            ["head.0.unit"],
            cfg(lambda r, t, d: r.update(head=[{"type": "dense", "unit": 8}])),
        ),
        (
            "unknown augmentation key",
            C,
            ["augmentation.0.strength"],
            cfg(
                lambda r, t, d: r.update(
                    augmentation=[{"type": "zoom", "strength": 0.1}]
                )
            ),
        ),
        (
            "unknown callback",
            C,
            ["phases.0.callbacks.earlystopping"],
            phase(callbacks={"earlystopping": {}}),
        ),
        (
            "optimizer parameter of another optimizer",
            C,
            ["phases.0.optimizer", "beta_1"],
            phase(optimizer={"name": "sgd", "beta_1": 0.9}),
        ),
        (
            "unknown feature_cache key",
            C,
            ["feature_cache.view"],
            section("feature_cache", view=2),
        ),
        ("unknown runtime key", C, ["runtime.gpus"], section("runtime", gpus=2)),
    ],
    # ---- wrong types -----------------------------------------------------
    "types": [
        (
            "batch size true",
            C,
            ["data.batch_size", "not a boolean"],
            section("data", batch_size=True),
        ),
        (
            "learning rate true",
            C,
            ["phases.0.learning_rate", "not a boolean"],
            phase(learning_rate=True),
        ),
        ("epochs 2.5", C, ["phases.0.epochs", "integer"], phase(epochs=2.5)),
        ("epochs a word", C, ["phases.0.epochs"], phase(epochs="many")),
        ("seed a word", C, ["experiment.seed"], section("experiment", seed="x")),
        (
            "seed false",
            C,
            ["experiment.seed", "not a boolean"],
            section("experiment", seed=False),
        ),
        (
            "image size a word",
            C,
            ["data.image_size", "[height, width]"],
            section("data", image_size="big"),
        ),
        (
            "image size three numbers",
            C,
            ["data.image_size", "[height, width]"],
            section("data", image_size=[32, 32, 3]),
        ),
        (
            "tensorboard 1",
            C,
            ["experiment.tensorboard", "true or false"],
            section("experiment", tensorboard=1),
        ),
        (
            "allow_outside_root a word",
            C,
            ["data.allow_outside_root"],
            section("data", allow_outside_root="yes"),
        ),
        (
            "model option of the wrong type",
            C,
            ["model.options.alpha", "expected a number"],
            section("model", options={"alpha": "wide"}),
        ),
        (
            "model option boolean for a number",
            C,
            ["model.options.alpha"],
            section("model", options={"alpha": True}),
        ),
        (
            "unknown model option",
            C,
            ["model.options.alhpa", "did you mean 'alpha'"],
            section("model", options={"alhpa": 0.35}),
        ),
        (
            "class_weight a word",
            C,
            ["phases.0.class_weight", "null, 'auto' or a mapping"],
            phase(class_weight="automatic"),
        ),
        (
            "class_weight value a word",
            C,
            ["phases.0.class_weight.circle"],
            phase(class_weight={"circle": "x"}),
        ),
        (
            "trainable a word",
            C,
            ["phases.0.trainable", "{top: N}"],
            phase(trainable="some"),
        ),
        (
            "trainable top a word",
            C,
            ["phases.0.trainable.top"],
            phase(trainable={"top": "x"}),
        ),
        (
            "phases a mapping",
            C,
            ["phases", "list"],
            cfg(lambda r, t, d: r.update(phases={"name": "h"})),
        ),
        (
            "data a word",
            C,
            ["data", "mapping"],
            cfg(lambda r, t, d: r.update(data="folder")),
        ),
        (
            "head a mapping",
            C,
            ["head", "list"],
            cfg(lambda r, t, d: r.update(head={"type": "dense"})),
        ),
        ("split a word", C, ["data.split", "mapping"], section("data", split="80/20")),
        ("schedule a number", C, ["phases.0.schedule"], phase(schedule=5)),
        (
            "momentum a word",
            C,
            ["phases.0.optimizer.momentum", "number"],
            phase(optimizer={"name": "sgd", "momentum": "x"}),
        ),
        (
            "monitor unknown",
            C,
            ["experiment.monitor", "val_accuracy"],
            section("experiment", monitor="accuracy"),
        ),
        (
            "experiment name with a slash",
            C,
            ["experiment.name"],
            section("experiment", name="a/b"),
        ),
        ("data.dir a number", C, ["data.dir"], section("data", dir=5)),
    ],
    # ---- values out of range, rules across keys -------------------------
    "ranges and rules": [
        (
            "negative learning rate",
            C,
            ["phases.0.learning_rate"],
            phase(learning_rate=-1e-3),
        ),
        ("zero epochs", C, ["phases.0.epochs"], phase(epochs=0)),
        ("zero batch size", C, ["data.batch_size"], section("data", batch_size=0)),
        (
            "image smaller than the minimum",
            C,
            ["data.image_size"],
            section("data", image_size=8),
        ),
        ("image size zero", C, ["data.image_size"], section("data", image_size=0)),
        (
            "split not adding up",
            C,
            ["data.split", "add up to 1"],
            section("data", split={"train": 0.9, "val": 0.3, "test": 0.0}),
        ),
        (
            "unknown application",
            C,
            ["model.name", "ResNet51"],
            section("model", name="ResNet51"),
        ),
        (
            "unknown optimizer",
            C,
            ["phases.0.optimizer", "adamx"],
            phase(optimizer="adamx"),
        ),
        (
            "plateau callback with a schedule",
            C,
            ["reduce_lr_on_plateau"],
            phase(schedule="cosine", callbacks={"reduce_lr_on_plateau": {}}),
        ),
        (
            "duplicate phase names",
            C,
            ["phase names must be unique"],
            cfg(lambda r, t, d: r["phases"].append({"name": "head", "epochs": 1})),
        ),
        ("no phases", C, ["phases"], cfg(lambda r, t, d: r.update(phases=[]))),
        ("both dir and csv", C, ["data", "exactly one"], section("data", csv="x.csv")),
        (
            "neither dir nor csv",
            C,
            ["data", "exactly one"],
            cfg(lambda r, t, d: r["data"].pop("dir")),
        ),
        (
            "flip with a factor",
            C,
            ["augmentation.0", "flip takes `mode`"],
            cfg(
                lambda r, t, d: r.update(augmentation=[{"type": "flip", "factor": 0.5}])
            ),
        ),
        (
            "rotation without factor",
            C,
            ["augmentation.0", "needs `factor`"],
            cfg(lambda r, t, d: r.update(augmentation=[{"type": "rotation"}])),
        ),
        (
            "flip mode diagonal",
            C,
            ["augmentation.0.mode", "horizontal"],
            cfg(
                lambda r, t, d: r.update(
                    augmentation=[{"type": "flip", "mode": "diagonal"}]
                )
            ),
        ),
        (
            "dense without units",
            C,
            ["head.0", "needs `units`"],
            cfg(lambda r, t, d: r.update(head=[{"type": "dense"}])),
        ),
        (
            "dropout rate 1.5",
            C,
            ["head.0.rate"],
            cfg(lambda r, t, d: r.update(head=[{"type": "dropout", "rate": 1.5}])),
        ),
        (
            "reserved model option",
            C,
            ["model.options", "include_top"],
            section("model", options={"include_top": True}),
        ),
        (
            "infinite learning rate",
            C,
            ["phases.0.learning_rate", "finite"],
            phase(learning_rate=float("inf")),
        ),
        ("negative seed", C, ["experiment.seed"], section("experiment", seed=-1)),
        ("empty weights path", C, ["model.weights"], section("model", weights="")),
        ("empty data.dir", C, ["data.dir"], section("data", dir="")),
        (
            "a head of a billion units",
            C,
            ["head.0.units"],
            cfg(lambda r, t, d: r.update(head=[{"type": "dense", "units": 10**9}])),
        ),
        (
            "bn momentum 1.5",
            C,
            ["model.bn_momentum"],
            section("model", bn_momentum=1.5),
        ),
        (
            "layer that does not exist",
            C,
            ["phases.0.trainable.from_layer"],
            phase(trainable={"from_layer": "block_99"}),
        ),
        (
            "invalid layer regex",
            C,
            ["phases.0.trainable", "invalid regex"],
            phase(trainable={"regex": "block_(("}),
        ),
        (
            "unknown class in class_weight",
            C,
            ["phases.0.class_weight", "circel"],
            phase(class_weight={"circel": 2.0}),
        ),
    ],
    # ---- sizes that cannot fit -------------------------------------------
    "sizes": [
        (
            "image size 100000",
            C,
            ["data.image_size", "GiB", "this machine has"],
            section("data", image_size=100000),
        ),
        (
            "batch of a billion",
            C,
            ["data.batch_size", "GiB"],
            section("data", batch_size=10**9),
        ),
    ],
    # ---- --set overrides -------------------------------------------------
    "--set": [
        (
            "--set without =",
            C,
            ["--set expects key.path=value"],
            args("finetune", "{cfg}", "--set", "data.batch_size"),
        ),
        (
            "--set unknown key",
            C,
            ["data.batchsize"],
            args("finetune", "{cfg}", "--set", "data.batchsize=8"),
        ),
        (
            "--set negative index",
            C,
            ["--set phases.-1.epochs", "negative indices are not supported"],
            args("finetune", "{cfg}", "--set", "phases.-1.epochs=1"),
        ),
        (
            "--set index out of range",
            C,
            ["--set phases.5.epochs", "1 entries"],
            args("finetune", "{cfg}", "--set", "phases.5.epochs=1"),
        ),
        (
            "--set into a value",
            C,
            ["--set data.batch_size.x", "is a value"],
            args("finetune", "{cfg}", "--set", "data.batch_size.x=1"),
        ),
        (
            "--set invalid YAML",
            C,
            ["--set data.image_size", "invalid YAML"],
            args("finetune", "{cfg}", "--set", "data.image_size=[1,"),
        ),
        (
            "--set a boolean batch size",
            C,
            ["data.batch_size", "not a boolean"],
            args("finetune", "{cfg}", "--set", "data.batch_size=true"),
        ),
        (
            "--set list by name",
            C,
            ["--set phases.first.epochs", "use an index"],
            args("finetune", "{cfg}", "--set", "phases.first.epochs=1"),
        ),
    ],
    # ---- paths of the wrong kind -----------------------------------------
    "paths": [
        (
            "output_dir is a file",
            C,
            ["experiment.output_dir", "is a file"],
            cfg(
                lambda r, t, d: (
                    (t / "out").write_text("x"),
                    r["experiment"].update(output_dir=str(t / "out")),
                )
            ),
        ),
        (
            "output_dir under a file",
            C,
            ["experiment.output_dir", "lies under"],
            cfg(
                lambda r, t, d: (
                    (t / "out").write_text("x"),
                    r["experiment"].update(output_dir=str(t / "out" / "runs")),
                )
            ),
        ),
        (
            "data.dir is a file",
            D,
            ["data.dir", "is a file; expected a folder"],
            cfg(
                lambda r, t, d: r["data"].update(
                    dir=str(d / "circle" / "circle_0000.jpg")
                )
            ),
        ),
        (
            "data.dir missing",
            D,
            ["data.dir: folder not found"],
            section("data", dir="/nowhere/at/all"),
        ),
        (
            "data.dir without class folders",
            D,
            ["has no class folders"],
            cfg(
                lambda r, t, d: (
                    (t / "flat").mkdir(),
                    shutil.copy(d / "circle" / "circle_0000.jpg", t / "flat"),
                    r["data"].update(dir=str(t / "flat")),
                )
            ),
        ),
        (
            "data.csv is a folder",
            D,
            ["data.csv", "is a folder"],
            cfg(lambda r, t, d: (r["data"].pop("dir"), r["data"].update(csv=str(d)))),
        ),
        (
            "data.csv missing",
            D,
            ["data.csv: file not found"],
            cfg(
                lambda r, t, d: (
                    r["data"].pop("dir"),
                    r["data"].update(csv=str(t / "no.csv")),
                )
            ),
        ),
        (
            "feature cache dir is a file",
            C,
            ["feature_cache.dir", "is a file"],
            cfg(
                lambda r, t, d: (
                    (t / "fc").write_text("x"),
                    r["feature_cache"].update(dir=str(t / "fc")),
                )
            ),
        ),
        (
            "weights path is a folder",
            C,
            ["model.weights", "is a folder"],
            section("model", weights="/tmp"),
        ),
        (
            "weights file missing",
            C,
            ["model.weights: file not found"],
            cfg(lambda r, t, d: r["model"].update(weights=str(t / "no.h5"))),
        ),
        (
            "weights not HDF5",
            C,
            ["model.weights", "is not an HDF5 file"],
            cfg(
                lambda r, t, d: (
                    (t / "w.h5").write_bytes(b"not hdf5"),
                    r["model"].update(weights=str(t / "w.h5")),
                )
            ),
        ),
        (
            "weights with another extension",
            C,
            ["model.weights", ".h5"],
            cfg(
                lambda r, t, d: (
                    (t / "w.bin").write_bytes(b"x"),
                    r["model"].update(weights=str(t / "w.bin")),
                )
            ),
        ),
        (
            "weights of another model",
            C,
            ["model.weights", "does not fit"],
            cfg(lambda r, t, d: r["model"].update(weights=keras_weights_file(t))),
        ),
    ],
    # ---- data folders ----------------------------------------------------
    "data folders": [
        (
            "zero-byte image",
            D,
            ["empty.jpg", "empty file"],
            data(lambda t, d: (d / "circle" / "empty.jpg").write_bytes(b"")),
        ),
        (
            "truncated image",
            D,
            ["cut.png", "bad image"],
            data(
                lambda t, d: (d / "circle" / "cut.png").write_bytes(
                    (d / "circle" / "circle_0001.png").read_bytes()[:200]
                )
            ),
        ),
        (
            "text file in a class folder",
            D,
            ["notes.txt", "not an image file"],
            data(lambda t, d: (d / "star" / "notes.txt").write_text("hi")),
        ),
        (
            "text file in a nested folder",
            D,
            ["deep", "notes.txt"],
            data(
                lambda t, d: (
                    (d / "star" / "deep").mkdir(),
                    (d / "star" / "deep" / "notes.txt").write_text("x"),
                )
            ),
        ),
        (
            "non-image with an image name",
            D,
            ["fake.jpg"],
            data(lambda t, d: (d / "star" / "fake.jpg").write_text("<html>")),
        ),
        (
            "empty class folder",
            D,
            ["class 'hexagon' has no images"],
            data(lambda t, d: (d / "hexagon").mkdir()),
        ),
        (
            "class with one image",
            D,
            ["class 'single' has 1 image"],
            data(
                lambda t, d: (
                    (d / "single").mkdir(),
                    shutil.copy(
                        d / "circle" / "circle_0000.jpg", d / "single" / "a.jpg"
                    ),
                )
            ),
        ),
        (
            "same image in two splits",
            D,
            ["the same image is in two splits"],
            data(
                lambda t, d: [
                    shutil.copy(
                        d / "circle" / "circle_0000.jpg", d / "circle" / f"copy{i}.jpg"
                    )
                    for i in range(3)
                ]
            ),
        ),
        (
            "train/ without val/",
            D,
            ["has train/ but no val/"],
            data(lambda t, d: shutil.copytree(d / "circle", d / "train" / "c")),
        ),
        (
            "only one class",
            D,
            ["need at least 2 classes"],
            data(
                lambda t, d: [
                    shutil.rmtree(d / c) for c in ("square", "star", "triangle")
                ]
            ),
        ),
        (
            "image that is a folder of images only",
            D,
            ["class 'ghost'"],
            data(lambda t, d: (d / "ghost" / "sub").mkdir(parents=True)),
        ),
    ],
    # ---- CSV manifests ---------------------------------------------------
    "csv": [
        (
            "CSV row with a missing file",
            D,
            ["line 3", "file not found: gone.jpg"],
            csv_data(["circle/circle_0000.jpg,circle", "gone.jpg,circle"]),
        ),
        (
            "CSV path escaping its folder",
            D,
            ["points outside"],
            csv_data(["../../etc/passwd,circle"]),
        ),
        (
            "CSV without a label column",
            D,
            ["`path` and `label`"],
            csv_data(["circle/circle_0000.jpg"], header="path"),
        ),
        ("CSV with a header only", D, ["has no rows"], csv_data([])),
        (
            "CSV row with an empty label",
            D,
            ["line 2", "empty path or label"],
            csv_data(["circle/circle_0000.jpg,"]),
        ),
        (
            "CSV labels differing in case",
            D,
            ["'Circle'", "'circle'", "only in case"],
            cfg(
                lambda r, t, d: (
                    (d / "m.csv").write_text(
                        "path,label\n"
                        + "".join(
                            f"{p.relative_to(d)},{'Circle ' if i == 3 else 'circle'}\n"
                            for i, p in enumerate(sorted((d / "circle").iterdir()))
                        )
                    ),
                    r["data"].pop("dir"),
                    r["data"].update(csv=str(d / "m.csv")),
                )
            ),
        ),
        (
            "CSV with a bad split value",
            D,
            ["split must be one of", "'tets'"],
            csv_data(["circle/circle_0000.jpg,circle,tets"], header="path,label,split"),
        ),
        (
            "CSV split column without val rows",
            D,
            ["no val rows"],
            csv_data(
                [
                    "circle/circle_0000.jpg,circle,train",
                    "square/square_0000.jpg,square,train",
                ],
                header="path,label,split",
            ),
        ),
        (
            "CSV not UTF-8",
            D,
            ["data.csv", "cannot read"],
            csv_data([], raw_bytes="path,label\ncaf\xe9.jpg,x\n".encode("latin-1")),
        ),
        (
            "CSV row naming a non-image",
            D,
            ["line 2", "not an image file"],
            cfg(
                lambda r, t, d: (
                    (d / "n.txt").write_text("x"),
                    (d / "m.csv").write_text("path,label\nn.txt,a\n"),
                    r["data"].pop("dir"),
                    r["data"].update(csv=str(d / "m.csv")),
                )
            ),
        ),
    ],
    # ---- command lines, models and other commands ------------------------
    "commands": [
        (
            "finetune with neither config nor resume",
            C,
            ["give a CONFIG", "--resume"],
            args("finetune"),
        ),
        (
            "resume with --set",
            C,
            ["--set cannot change a run being resumed"],
            args("finetune", "--resume", "{t}", "--set", "data.batch_size=2"),
        ),
        (
            "resume a folder that is not a run",
            C,
            ["--resume", "no such run folder"],
            args("finetune", "--resume", "{t}/nothing"),
        ),
        (
            "promote-to under a file",
            C,
            ["--promote-to", "is a file"],
            args("finetune", "{cfg}", "--promote-to", "{cfg}/served"),
        ),
        (
            "fail-under without promote-to",
            C,
            ["--fail-under on finetune"],
            args("finetune", "{cfg}", "--fail-under", "accuracy=0.9"),
        ),
        (
            "extract with a bad split",
            C,
            ["'--split'", "'bogus' is not one of 'train',"],
            args("extract", "{cfg}", "--split", "bogus"),
        ),
        (
            "extract with a truncated image",
            D,
            ["cut.png"],
            args(
                "extract",
                "{cfg}",
                change=lambda r, t, d: (d / "circle" / "cut.png").write_bytes(
                    (d / "circle" / "circle_0001.png").read_bytes()[:200]
                ),
            ),
        ),
        (
            "extract with data.dir a file",
            D,
            ["data.dir", "is a file"],
            args(
                "extract",
                "{cfg}",
                change=lambda r, t, d: r["data"].update(
                    dir=str(d / "circle" / "circle_0000.jpg")
                ),
            ),
        ),
        (
            "validate a missing data folder",
            D,
            ["data.dir: folder not found"],
            args(
                "config",
                "validate",
                "{cfg}",
                change=lambda r, t, d: r["data"].update(dir=str(t / "nowhere")),
            ),
        ),
        (
            "validate a missing weights file",
            C,
            ["model.weights: file not found"],
            args(
                "config",
                "validate",
                "{cfg}",
                change=lambda r, t, d: r["model"].update(weights=str(t / "no.h5")),
            ),
        ),
        (
            "validate a CSV without header",
            D,
            ["`path` and `label`"],
            args(
                "config",
                "validate",
                "{cfg}",
                change=lambda r, t, d: (
                    (d / "m.csv").write_text("a,b\n"),
                    r["data"].pop("dir"),
                    r["data"].update(csv=str(d / "m.csv")),
                ),
            ),
        ),
        (
            "validate an output_dir under a file",
            C,
            ["lies under"],
            args(
                "config",
                "validate",
                "{cfg}",
                change=lambda r, t, d: (
                    (t / "f").write_text("x"),
                    r["experiment"].update(output_dir=str(t / "f" / "runs")),
                ),
            ),
        ),
        (
            "evaluate a folder that is not a run",
            C,
            ["not a finished run folder"],
            args("evaluate", "{t}"),
        ),
        (
            "evaluate a missing model",
            C,
            ["expected a run folder or a .keras"],
            args("evaluate", "{t}/none.keras"),
        ),
        (
            "evaluate a model without labels.txt",
            C,
            ["no labels.txt beside"],
            args(
                "evaluate",
                "{t}/m.keras",
                change=lambda r, t, d: (t / "m.keras").write_bytes(b"zip?"),
            ),
        ),
        (
            "evaluate a corrupt model",
            C,
            ["cannot load", "bad.keras"],
            args(
                "evaluate",
                "{t}/bad/bad.keras",
                "--data",
                "{d}",
                change=lambda r, t, d: (
                    (t / "bad").mkdir(),
                    (t / "bad" / "bad.keras").write_bytes(b"x"),
                    (t / "bad" / "labels.txt").write_text(
                        "circle\nsquare\nstar\ntriangle\n"
                    ),
                ),
            ),
        ),
        (
            "evaluate a model with a Lambda layer",
            C,
            ["refusing to load", "Lambda", "safe mode"],
            lambda t, d: (
                tiny_config(d, t),
                ["evaluate", lambda_model(t), "--data", str(d)],
            ),
        ),
        (
            "evaluate with a bad gate",
            C,
            ["--fail-under", "METRIC=VALUE"],
            args("evaluate", "{t}", "--fail-under", "accuracy"),
        ),
        (
            "evaluate with an unknown gate metric",
            C,
            ["unknown metric", "did you mean 'accuracy'"],
            args("evaluate", "{t}", "--fail-under", "acuracy=0.9"),
        ),
        (
            "evaluate with an unknown compare metric",
            C,
            ["--compare-metric"],
            args("evaluate", "{t}", "--compare-metric", "speed"),
        ),
        (
            "evaluate --set without --config",
            C,
            ["--set", "--config"],
            args("evaluate", "{t}", "--set", "data.batch_size=2"),
        ),
        (
            "export an unknown format",
            C,
            ["--format", "tflight"],
            args("export", "{t}", "--format", "tflight"),
        ),
        (
            "export an unknown quantization",
            C,
            ["--quantize", "int4"],
            args("export", "{t}", "--quantize", "int4"),
        ),
        (
            "predict with a missing model",
            C,
            ["expected a run folder or a .keras"],
            args("predict", "{t}/none.keras", "{d}"),
        ),
        (
            "predict a truncated image",
            D,
            ["cut.png", "cannot decode"],
            lambda t, d: (
                tiny_config(d, t),
                ["predict", plain_model(t), truncated(t, d)],
            ),
        ),
        (
            "predict top-k 0",
            C,
            ["--top-k", "greater than or equal to 1"],
            args("predict", "{t}", "{d}", "--top-k", "0"),
        ),
        (
            "evaluate negative tolerance",
            C,
            ["--tolerance"],
            args("evaluate", "{t}", "--tolerance", "-1"),
        ),
        (
            "export agreement above 1",
            C,
            ["--min-agreement"],
            args("export", "{t}", "--min-agreement", "1.5"),
        ),
        ("runs list limit 0", C, ["--limit"], args("runs", "list", "--limit", "0")),
        (
            "runs list of a file",
            C,
            ["--output-dir", "is a file"],
            args("runs", "list", "--output-dir", "{cfg}"),
        ),
        (
            "evaluate --data a plain file",
            D,
            ["--data", "is a file"],
            args(
                "evaluate",
                "{t}/pm/m.keras",
                "--data",
                "{cfg}",
                change=lambda r, t, d: plain_model(t),
            ),
        ),
        (
            "schema into a folder",
            C,
            ["--out", "is a folder"],
            args("config", "schema", "--out", "{t}"),
        ),
    ],
}

FLAT = [(group, *case) for group, cases in CASES.items() for case in cases]


def listing(root):
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if "__pycache__" not in p.parts
    )


@pytest.mark.parametrize(
    "group, name, code, culprits, setup", FLAT, ids=[f"{g}: {n}" for g, n, *_ in FLAT]
)
def test_bad_input(tmp_path, shapes_dir, group, name, code, culprits, setup):
    data_dir = tmp_path / "data"
    shutil.copytree(shapes_dir, data_dir)
    made, argv = setup(tmp_path, data_dir)
    path = tmp_path / "c.yaml"
    path.write_text(made if isinstance(made, str) else yaml.safe_dump(made))
    if argv is None:
        argv = ["finetune", "{cfg}"]
    argv = [a.format(cfg=path, t=tmp_path, d=data_dir) for a in argv]
    before = listing(tmp_path)
    result = runner.invoke(app, argv)
    output = result.output
    assert result.exit_code == code, output
    for culprit in culprits:
        assert culprit in output, f"{culprit!r} not in: {output}"
    assert "Traceback" not in output and "unexpected error" not in output
    assert "function_node" not in output and "pydantic" not in output
    assert len(output) < 2000, "a message, not a dump"
    # Nothing written: no run folder, no epoch, no cache, no other file.
    assert listing(tmp_path) == before


def test_unexpected_errors_exit_1_and_debug_shows_the_traceback(monkeypatch, tmp_path):
    from finetune_cli.run import folder as rundir

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(rundir, "list_runs", broken)
    result = runner.invoke(app, ["runs", "list", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "unexpected error: RuntimeError: boom" in result.output
    assert "--debug" in result.output and "Traceback" not in result.output
    result = runner.invoke(
        app, ["runs", "list", "--output-dir", str(tmp_path), "--debug"]
    )
    assert isinstance(result.exception, RuntimeError)
