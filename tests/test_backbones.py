"""`finetune-cli select`: backbones ranked by a probe on their cached
features, beside speed, parameters and exported size; the winner's config."""

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import lively_weights
from conftest import tiny_config
from finetune_cli import config as config_lib
from finetune_cli.cli.main import app
from finetune_cli.cache import heads
from finetune_cli.search import backbones

runner = CliRunner()


@pytest.fixture
def config_file(shapes_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    raw = tiny_config(shapes_dir, tmp_path)
    raw["phases"] = [
        {"name": "head", "epochs": 1},
        {"name": "top", "epochs": 1, "trainable": {"from_layer": "block_11_expand"}},
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _candidate(name, acc, speed, error=None):
    c = backbones.Candidate(name, cfg=None)
    c.val_accuracy, c.images_per_s, c.error = acc, speed, error
    return c


def test_rank_puts_accuracy_first_then_speed_and_failures_last():
    ranked = backbones.rank(
        [
            _candidate("broken", None, None, error="no weights"),
            _candidate("slow", 0.9, 10.0),
            _candidate("best", 0.95, 1.0),
            _candidate("fast", 0.9, 100.0),
        ]
    )
    assert [c.name for c in ranked] == ["best", "fast", "slow", "broken"]


def test_the_probe_learns_features_that_carry_the_label_and_not_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (4, 16))
    y = rng.integers(0, 4, 400)
    x = (centres[y] + rng.normal(0, 1, (400, 16))).astype("float32")
    _, train_acc, val_acc = heads.train_probe(x[:300], y[:300], x[300:], y[300:], 4, 0)
    assert train_acc > 0.9 and val_acc > 0.9
    noise = rng.normal(0, 1, (400, 16)).astype("float32")
    _, _, chance = heads.train_probe(noise[:300], y[:300], noise[300:], y[300:], 4, 0)
    assert chance < 0.5


# Two selections of two backbones, compared: `make test-heavy` (CI).
@pytest.mark.heavy
def test_select_ranks_writes_the_winner_config_and_reuses_the_cache(
    config_file, tmp_path
):
    weights = lively_weights(tmp_path / "lively.weights.h5")
    args = [
        "select",
        str(config_file),
        "--models",
        "MobileNetV2 MobileNetV3Small",
        "--weights",
        f"MobileNetV2={weights}",
        "--weights",
        "none",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    ranking = report["ranking"]
    assert {r["name"] for r in ranking} == {"MobileNetV2", "MobileNetV3Small"}
    accs = [r["val_accuracy"] for r in ranking]
    assert accs == sorted(accs, reverse=True)
    for r in ranking:
        assert 0 <= r["val_accuracy"] <= 1 and r["images_per_s"] > 0
        assert r["params"] > 0 and r["export_bytes"] > 0 and r["error"] is None
        assert r["reused"] is False
    by = {r["name"]: r for r in ranking}
    assert by["MobileNetV2"]["weights"] == weights
    assert by["MobileNetV3Small"]["weights"] == "none"
    # The test split is never read: only train and val entries were cached.
    folders = {p.name.split(".")[0] for p in (tmp_path / "features" / "t").iterdir()}
    assert folders == {"train", "val"}
    written = config_file.with_name("c.select.yaml")
    assert report["config"] == str(written)
    cfg = config_lib.load_config(written)
    winner = ranking[0]["name"]
    assert cfg.model.name == winner
    assert cfg.model.weights == by[winner]["weights"]
    if winner == "MobileNetV3Small":  # another model's layers are chosen again
        assert cfg.phases[1].trainable.from_layer != "block_11_expand"
        assert cfg.model.options == {}
    # Nothing is overwritten by surprise; with --force the cache is reused.
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    again = runner.invoke(app, [*args, "--force"])
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.output)["ranking"]
    assert all(r["reused"] for r in rerun)
    assert [r["val_accuracy"] for r in rerun] == accs


def test_the_table_fits_80_columns_and_a_base_that_cannot_load_is_left_out(
    config_file, tmp_path
):
    # MobileNetV2 weights do not fit EfficientNetB0: it is listed, not fatal.
    weights = lively_weights(tmp_path / "lively.weights.h5")
    result = runner.invoke(
        app,
        [
            "select",
            str(config_file),
            "-m",
            "MobileNetV2",
            "-m",
            "EfficientNetB0",
            "-w",
            weights,
            "--out",
            str(tmp_path / "winner.yaml"),
            "--plain",
        ],
        env={"COLUMNS": "80"},
    )
    assert result.exit_code == 0, result.output
    assert "EfficientNetB0: left out" in result.output
    assert "does not fit EfficientNetB0" in result.output
    table = [line for line in result.output.splitlines() if line[:1] in "|+"]
    assert len(table) >= 5 and all(len(line) <= 80 for line in table)
    assert config_lib.load_config(tmp_path / "winner.yaml").model.name == "MobileNetV2"


@pytest.mark.parametrize(
    "extra, culprit",
    [
        (["-m", "MobileNetV9"], "did you mean"),
        (["-m", "MobileNetV2 mobilenetv2"], "named twice"),
        (["-m", "MobileNetV2", "-w", "ResNet50=none"], "not among --models"),
        (
            ["-m", "MobileNetV2", "-w", "MobileNetV2=missing.h5"],
            "--weights MobileNetV2",
        ),
        (["-m", "MobileNetV2", "-w", "a.h5", "-w", "b.h5"], "one bare value"),
        (["-m", "MobileNetV2", "-w", "=none"], "expected MODEL=WEIGHTS"),
    ],
)
def test_bad_options_are_named_before_any_work(config_file, tmp_path, extra, culprit):
    result = runner.invoke(app, ["select", str(config_file), *extra])
    assert result.exit_code == 2, result.output
    assert culprit in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "features").exists()
    assert not config_file.with_name("c.select.yaml").exists()
