import json
import pathlib
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli.cli.main import app
from finetune_cli.errors import ConfigError

from conftest import tiny_config

runner = CliRunner()


def write(tmp_path, raw, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def error_of(raw):
    with pytest.raises(ConfigError) as e:
        config_lib.validate(raw)
    return str(e.value)


def test_scientific_notation_is_a_float(tmp_path):
    text = (
        "data: {dir: d}\n"
        "phases:\n  - {name: a, epochs: 1, learning_rate: 1e-3}\n"
        "  - {name: b, epochs: 1, learning_rate: 5E-5, label_smoothing: .1}\n"
    )
    cfg = config_lib.load_config(write(tmp_path, text))
    assert cfg.phases[0].learning_rate == 1e-3
    assert isinstance(cfg.phases[1].learning_rate, float)
    assert cfg.phases[1].learning_rate == 5e-5


def test_unknown_keys_get_did_you_mean(tmp_path):
    raw = tiny_config("d", tmp_path)
    raw["phases"][0]["lerning_rate"] = 1e-3
    msg = error_of(raw)
    assert "phases.0.lerning_rate" in msg and "did you mean 'learning_rate'" in msg
    raw = tiny_config("d", tmp_path, modle={"name": "VGG16"})
    msg = error_of(raw)
    assert "modle" in msg and "did you mean 'model'" in msg


@pytest.mark.parametrize(
    "change, key, fragment",
    [
        (
            lambda r: r["data"].update(image_size=16),
            "data.image_size",
            "at least 32x32",
        ),
        (lambda r: r.update(phases=[]), "phases", "at least 1"),
        (lambda r: r["data"].update(csv="x.csv"), "data", "exactly one of"),
        (
            lambda r: r["model"].update(name="ResNet5"),
            "model.name",
            "did you mean 'ResNet50'",
        ),
        (
            lambda r: r["phases"][0].update(optimizer="adamm"),
            "phases.0.optimizer.name",
            "did you mean 'adam'",
        ),
        (
            lambda r: r["phases"][0].update(trainable="some"),
            "phases.0.trainable",
            "{top: N}",
        ),
        (
            lambda r: r["phases"][0].update(trainable={"top": 2, "regex": "x"}),
            "phases.0.trainable",
            "exactly one of",
        ),
        (
            lambda r: r["phases"].append({"name": "head", "epochs": 1}),
            "phases.1.name",
            "unique",
        ),
        (
            lambda r: r["phases"][0].update(epochs=0),
            "phases.0.epochs",
            "greater than or equal to 1",
        ),
        (
            lambda r: r["phases"][0].update(optimizer={"name": "sgd", "beta_1": 0.9}),
            "phases.0.optimizer",
            "sgd does not take ['beta_1']",
        ),
        (
            lambda r: r["phases"][0].update(
                schedule="cosine", callbacks={"reduce_lr_on_plateau": {"patience": 1}}
            ),
            "phases.0",
            "cannot be combined with a schedule",
        ),
        (
            lambda r: r["data"].update(split={"train": 0.5, "val": 0.1, "test": 0.1}),
            "data.split",
            "add up to 1",
        ),
        (lambda r: r.update(head=[{"type": "dense"}]), "head.0", "needs `units`"),
        (
            lambda r: r.update(augmentation=[{"type": "zoom"}]),
            "augmentation.0",
            "needs `factor`",
        ),
        (
            lambda r: r["model"].update(name="NASNetMobile", weights="imagenet"),
            "data.image_size",
            "only accepts 224x224",
        ),
        (
            lambda r: r["model"].update(options={"input_shape": [1, 2, 3]}),
            "model.options",
            "set by finetune-cli",
        ),
        (
            lambda r: (
                r["runtime"].update(mixed_precision="yes")
                if "runtime" in r
                else r.update(runtime={"mixed_precision": "yes"})
            ),
            "runtime.mixed_precision",
            "'auto', 'on', 'off' or 'bfloat16'",
        ),
    ],
)
def test_rules_name_the_key_path(tmp_path, change, key, fragment):
    raw = tiny_config("d", tmp_path)
    change(raw)
    msg = error_of(raw)
    assert f"{key}:" in msg, msg
    assert fragment in msg, msg


def test_duplicate_yaml_keys_are_errors(tmp_path):
    path = write(tmp_path, "data: {dir: a}\ndata: {dir: b}\nphases: []\n")
    with pytest.raises(ConfigError, match="line 2.*duplicate key 'data'"):
        config_lib.load_config(path)


def test_overrides_take_precedence_and_index_lists(tmp_path):
    raw = tiny_config("d", tmp_path)
    raw["phases"].append({"name": "ft", "epochs": 2, "trainable": "all"})
    path = write(tmp_path, raw)
    cfg = config_lib.load_config(
        path,
        [
            "phases.1.epochs=3",
            "data.batch_size=4",
            "phases.1.learning_rate=1e-5",
            "model.pooling=max",
            "runtime.xla=true",
        ],
    )
    assert cfg.phases[1].epochs == 3
    assert cfg.phases[1].learning_rate == 1e-5
    assert cfg.data.batch_size == 4
    assert cfg.model.pooling == "max"
    assert cfg.runtime.xla is True
    with pytest.raises(ConfigError, match=r"phases has 2 entries"):
        config_lib.load_config(path, ["phases.2.epochs=3"])
    with pytest.raises(ConfigError, match=r"expects key.path=value"):
        config_lib.load_config(path, ["phases.0.epochs"])
    with pytest.raises(ConfigError, match=r"data.batch_sise.*did you mean"):
        config_lib.load_config(path, ["data.batch_sise=3"])


def test_resolved_config_round_trips(tmp_path):
    raw = tiny_config("d", tmp_path, head=[{"type": "dense", "units": 8, "l2": 1e-4}])
    raw["phases"].append(
        {
            "name": "ft",
            "epochs": 2,
            "trainable": {"top": 5},
            "optimizer": {"name": "sgd", "momentum": 0.9},
            "schedule": {"name": "cosine", "warmup_epochs": 1},
            "class_weight": "auto",
        }
    )
    cfg = config_lib.validate(raw)
    text = config_lib.to_yaml(cfg)
    again = config_lib.load_config(write(tmp_path, text, "resolved.yaml"))
    assert again == cfg
    # Every key, null defaults included; per-type options only when set.
    shown = yaml.safe_load(text)
    assert shown["data"]["csv"] is None and "logical_cpus" in shown["runtime"]
    assert shown["model"]["bn_momentum"] is None
    assert shown["phases"][1]["optimizer"] == {"name": "sgd", "momentum": 0.9}
    assert shown["phases"][0]["callbacks"] == {
        "early_stopping": None,
        "reduce_lr_on_plateau": None,
    }


def test_json_schema_describes_sections():
    schema = config_lib.json_schema()
    assert {"experiment", "data", "model", "phases"} <= set(schema["properties"])
    json.dumps(schema)


def test_cli_validate_and_show(tmp_path, shapes_dir):
    path = write(tmp_path, tiny_config(shapes_dir, tmp_path))
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 0, result.output
    # What finetune would find seconds later, validate finds now.
    missing = write(tmp_path, tiny_config(tmp_path / "nope", tmp_path), "m.yaml")
    result = runner.invoke(app, ["config", "validate", str(missing)])
    assert result.exit_code == 3 and "data.dir: folder not found" in result.output
    result = runner.invoke(
        app, ["config", "show", str(path), "--set", "phases.0.epochs=7"]
    )
    assert result.exit_code == 0
    shown = yaml.safe_load(result.stdout)
    assert shown["phases"][0]["epochs"] == 7
    assert shown["phases"][0]["batchnorm"] == "frozen"  # defaults shown


def test_cli_config_error_exit_code_and_no_traceback(tmp_path):
    raw = tiny_config("d", tmp_path)
    raw["phases"][0]["epochs"] = "many"
    path = write(tmp_path, raw)
    for args in (["config", "validate", str(path)], ["finetune", str(path)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert "phases.0.epochs" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing written
    result = runner.invoke(app, ["config", "validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


def test_cli_config_and_run_do_not_import_tensorflow():
    # Every module of the TensorFlow-free folders, and the modules of other
    # layers that they import at module level.
    root = pathlib.Path(__file__).parent.parent / "finetune_cli"
    modules = [
        "finetune_cli." + ".".join(p.relative_to(root).with_suffix("").parts)
        for folder in ("cli", "config", "run")
        for p in sorted((root / folder).glob("*.py"))
    ] + [
        "finetune_cli.data.split",
        "finetune_cli.data.preflight",
        "finetune_cli.deploy.promotion",
        "finetune_cli.runtime.distribute",
        "finetune_cli.model.weights",
    ]
    code = (
        f"import sys, {', '.join(modules)}; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in "
        "sys.modules and 'mlflow' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_schema_command(tmp_path):
    out = tmp_path / "schema.json"
    result = runner.invoke(app, ["config", "schema", "--out", str(out)])
    assert result.exit_code == 0
    assert json.loads(out.read_text())["title"] == "finetune-cli experiment config"


@pytest.mark.parametrize("name", ["demo-source.yaml", "demo.yaml", "flowers.yaml"])
def test_shipped_configs_are_valid(name):
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "configs" / name
    cfg = config_lib.load_config(path)
    assert cfg.phases and cfg.experiment.name


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    # Config paths are resolved against the current directory (documented),
    # not beside the config file: the message says so, with the directory.
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    raw = tiny_config("photos", tmp_path)
    raw["experiment"]["output_dir"] = "runs"
    path = tmp_path / "project" / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "data.dir: folder not found: photos" in text
    assert f"current directory {tmp_path / 'elsewhere'}" in text
    assert "not beside the config file" in text
