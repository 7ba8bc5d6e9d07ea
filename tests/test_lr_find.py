"""lr-find: the learning-rate range test on a phase's real trainable set."""

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import lively_weights
from conftest import tiny_config
from finetune_cli.search import lr_find
from finetune_cli.cli.main import app

runner = CliRunner()


def write_config(tmp_path, shapes_dir):
    raw = tiny_config(
        shapes_dir,
        tmp_path,
        phases=[
            {"name": "head", "epochs": 2},
            {
                "name": "top",
                "epochs": 1,
                "trainable": {"top": 6},
                "optimizer": {"name": "sgd", "momentum": 0.9},
            },
        ],
    )
    raw["model"]["weights"] = lively_weights(tmp_path / "pre.weights.h5")
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_range_test_on_cached_features_suggests_a_rate_where_the_loss_falls(
    shapes_dir, tmp_path
):
    path = write_config(tmp_path, shapes_dir)
    result = runner.invoke(
        app,
        ["lr-find", str(path), "--steps", "80", "--min-lr", "1e-4", "--max-lr", "1e3"]
        + ["--plain"],
    )
    assert result.exit_code == 0, result.output
    assert "phase 1 (head, cached features), adam" in result.output
    out = tmp_path / "runs" / "t" / "lr-find" / "head"
    rows = list(csv.DictReader(open(out / "lr_find.csv")))
    lrs = np.array([float(r["lr"]) for r in rows])
    losses = [float(r["loss"]) for r in rows]
    # Exponential steps from --min-lr towards --max-lr.
    assert lrs[0] == pytest.approx(1e-4)
    np.testing.assert_allclose(np.diff(np.log(lrs)), np.log(1e7) / 79, rtol=1e-3)
    meta = json.loads((out / "lr_find.json").read_text())
    # Adam at a learning rate of hundreds diverges: the test stops early.
    assert meta["diverged"] is True and len(rows) < 80
    assert meta["path"] == "features"
    smoothed = lr_find.smooth(losses)
    assert [float(r["smoothed"]) for r in rows] == pytest.approx(smoothed, rel=1e-4)
    # The suggestion is where the smoothed loss falls, below its minimum.
    s, low = meta["suggested_lr"], meta["min_loss_lr"]
    assert 1e-4 < s <= low < lrs[-1]
    at = int(np.argmin(np.abs(lrs - s)))
    assert smoothed[at + 1] < smoothed[at - 1]
    assert min(smoothed) < 0.98 * smoothed[3]
    assert f"--set phases.0.learning_rate={s:.2g}" in result.output
    with Image.open(out / "lr_find.png") as im:
        assert im.format == "PNG" and len(im.convert("RGB").getcolors(1 << 20)) > 20


@pytest.mark.heavy
def test_a_partly_unfrozen_phase_runs_on_cached_activations_with_its_optimizer(
    shapes_dir, tmp_path
):
    path = write_config(tmp_path, shapes_dir)
    result = runner.invoke(
        app,
        ["lr-find", str(path), "--phase", "2", "--steps", "12", "--out"]
        + [str(tmp_path / "lr2"), "--plain"],
    )
    assert result.exit_code == 0, result.output
    assert "phase 2 (top, cached activations at " in result.output
    assert "), sgd" in result.output
    meta = json.loads((tmp_path / "lr2" / "lr_find.json").read_text())
    assert meta["phase"] == "top" and meta["path"] == "activations"
    assert meta["steps"] == 12


def test_a_phase_that_does_not_exist_is_a_config_error(shapes_dir, tmp_path):
    path = write_config(tmp_path, shapes_dir)
    result = runner.invoke(app, ["lr-find", str(path), "--phase", "3"])
    assert result.exit_code == 2
    assert "--phase: the config has 2 phase(s), numbered 1 to 2. Received: 3" in (
        " ".join(result.output.split())
    )


def test_suggestion_rules():
    lrs = list(np.logspace(-5, 0, 50))
    falling = (
        [2.0] * 10 + list(np.linspace(2.0, 0.5, 30)) + list(np.linspace(0.5, 3, 10))
    )
    s, low = lr_find.suggest(lrs, falling)
    assert lrs[10] <= s < low == lrs[39]
    flat = [1.386] * 50
    assert lr_find.suggest(lrs, flat)[0] is None  # never fell: no suggestion
    assert lr_find.smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
