"""Promotion: a better model is promoted, a worse one is not, and the
promoted folder is never half-written."""

import json
import os
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli import model as model_lib
from finetune_cli import promotion
from finetune_cli import trainer
from finetune_cli.cli import app
from finetune_cli.console import Output
from finetune_cli.errors import EXIT_GATE
from finetune_cli.errors import GateError

from conftest import lively_weights
from conftest import tiny_config


def quiet():
    return Output(file=open(os.devnull, "w"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A dark-vs-bright dataset a head learns perfectly, and a trained run."""
    tmp = tmp_path_factory.mktemp("promo")
    rng = np.random.default_rng(0)
    for cls, level in (("dark", 40), ("bright", 215)):
        (tmp / "data" / cls).mkdir(parents=True)
        for i in range(12):
            px = np.clip(rng.normal(level, 20, (32, 32, 3)), 0, 255).astype("uint8")
            Image.fromarray(px).save(tmp / "data" / cls / f"{i}.png")
    lively_weights(tmp / "pre.weights.h5")
    raw = tiny_config(tmp / "data", tmp, phases=[
        {"name": "head", "epochs": 15, "learning_rate": 5e-2}])
    raw["model"]["weights"] = str(tmp / "pre.weights.h5")
    cfg = config_lib.validate(raw)
    run = trainer.finetune(cfg, quiet()).run_dir
    return tmp, raw, run


def copy_run(run, name, constant_class=None):
    """Another run folder with the same files; optionally a model that
    always predicts one class."""
    import keras

    other = run.parent / name
    shutil.copytree(run, other, symlinks=True)
    if constant_class is not None:
        model = keras.saving.load_model(other / "best.keras")
        out = model.get_layer(model_lib.OUTPUT_NAME)
        k, b = out.get_weights()
        out.set_weights([np.zeros_like(k), 10 * np.eye(len(b))[constant_class]
                         .astype("float32")])
        model.save(other / "best.keras")
    return other


def test_better_promoted_worse_refused(setup, tmp_path):
    _, _, run = setup
    acc = json.loads((run / "eval" / "test" / "metrics.json").read_text())[
        "summary"]["accuracy"]
    assert acc >= 0.75, "the head should separate dark from bright"
    link = tmp_path / "promoted"
    first = promotion.run_promotion(run, link, quiet())
    assert link.is_symlink() and link.resolve() == first
    assert (link / "model.keras").is_file()
    assert json.loads((link / "promotion.json").read_text())["run"] == str(run.resolve())

    worse = copy_run(run, "worse", constant_class=0)  # 50% on balanced data
    with pytest.raises(GateError, match=r"not promoted .*not better than the "
                                        r"promoted model: accuracy 0\.5000"):
        promotion.run_promotion(worse, link, quiet())
    assert link.resolve() == first
    assert json.loads((worse / "promotion.json").read_text())["promoted"] is False

    again = copy_run(run, "again")  # as good: not worse, so promoted
    second = promotion.run_promotion(again, link, quiet())
    assert link.resolve() == second != first
    assert (tmp_path / "promoted.previous").resolve() == first

    with pytest.raises(GateError, match=r"accuracy .* < 1\.01"):
        promotion.run_promotion(again, link, quiet(), fail_under={"accuracy": 1.01})
    assert link.resolve() == second


def test_interrupted_promotion_leaves_the_promoted_model_whole(setup, tmp_path,
                                                              monkeypatch):
    _, _, run = setup
    link = tmp_path / "promoted"
    first = promotion.run_promotion(run, link, quiet())
    calls = []
    real_copy = shutil.copy2

    def dying_copy(src, dst, *a, **kw):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the cron job is killed mid-copy
        return real_copy(src, dst, *a, **kw)

    monkeypatch.setattr(shutil, "copy2", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        promotion.promote(copy_run(run, "next"), link, {})
    monkeypatch.setattr(shutil, "copy2", real_copy)
    assert link.resolve() == first
    assert sorted(p.name for p in first.iterdir()) == [
        "config.yaml", "labels.txt", "metrics.json", "model.keras",
        "promotion.json"]
    versions = tmp_path / "promoted.versions"
    assert [p.name for p in versions.iterdir()] == [first.name]  # no partial


def test_cli_promote_gate_exit_code_and_runs_list(setup, tmp_path):
    tmp, raw, _ = setup
    path = tmp_path / "c.yaml"
    raw = json.loads(json.dumps(raw))
    raw["experiment"]["output_dir"] = str(tmp_path / "runs")
    raw["phases"][0]["epochs"] = 2
    path.write_text(yaml.safe_dump(raw))
    link = tmp_path / "served"
    result = CliRunner().invoke(app, ["finetune", str(path), "--promote-to",
                                      str(link), "--fail-under", "accuracy=1.01",
                                      "--quiet"])
    assert result.exit_code == EXIT_GATE, result.output
    assert "not promoted (nothing promoted): accuracy" in result.output
    assert not link.exists()
    result = CliRunner().invoke(app, ["runs", "list", "--output-dir",
                                      str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert len(rows) == 1 and rows[0]["state"] == "completed"
    assert rows[0]["experiment"] == "t" and rows[0]["test_accuracy"]
