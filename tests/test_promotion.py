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
from finetune_cli.model import build as model_lib
from finetune_cli.deploy import promotion
from finetune_cli.train import job as trainer
from finetune_cli.cli.main import app
from finetune_cli.console import Output
from finetune_cli.errors import EXIT_GATE
from finetune_cli.errors import GateError

import cli_process
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
    raw = tiny_config(
        tmp / "data",
        tmp,
        phases=[{"name": "head", "epochs": 15, "learning_rate": 5e-2}],
    )
    raw["model"]["weights"] = str(tmp / "pre.weights.h5")
    cfg = config_lib.validate(raw)
    run = trainer.finetune(cfg, quiet()).run_dir
    return tmp, raw, run


def copy_run(run, name, constant_class=None):
    """Another run folder with the same files; optionally a model that
    always predicts one class."""
    import keras

    other = run.parent / name
    shutil.copytree(
        run, other, symlinks=True, ignore=shutil.ignore_patterns("promotion.json")
    )
    if constant_class is not None:
        model = keras.saving.load_model(other / "best.keras")
        out = model.get_layer(model_lib.OUTPUT_NAME)
        k, b = out.get_weights()
        out.set_weights(
            [np.zeros_like(k), 10 * np.eye(len(b))[constant_class].astype("float32")]
        )
        model.save(other / "best.keras")
    return other


# Two whole runs compared: `make test-heavy` (CI).
@pytest.mark.heavy
def test_better_promoted_worse_refused(setup, tmp_path):
    _, _, run = setup
    acc = json.loads((run / "eval" / "test" / "metrics.json").read_text())["summary"][
        "accuracy"
    ]
    assert acc >= 0.75, "the head should separate dark from bright"
    link = tmp_path / "promoted"
    first = promotion.run_promotion(run, link, quiet())
    assert link.is_symlink() and link.resolve() == first
    assert (link / "model.keras").is_file()
    assert json.loads((link / "promotion.json").read_text())["run"] == str(
        run.resolve()
    )

    worse = copy_run(run, "worse", constant_class=0)  # 50% on balanced data
    with pytest.raises(
        GateError,
        match=r"not promoted .*not better than the "
        r"promoted model: accuracy 0\.5000",
    ):
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


@pytest.mark.heavy
def test_cli_promote_gate_exit_code_and_runs_list(setup, tmp_path):
    tmp, raw, _ = setup
    path = tmp_path / "c.yaml"
    raw = json.loads(json.dumps(raw))
    raw["experiment"]["output_dir"] = str(tmp_path / "runs")
    raw["phases"][0]["epochs"] = 2
    path.write_text(yaml.safe_dump(raw))
    link = tmp_path / "served"
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            str(path),
            "--promote-to",
            str(link),
            "--fail-under",
            "accuracy=1.01",
            "--quiet",
        ],
    )
    assert result.exit_code == EXIT_GATE, result.output
    assert "not promoted (nothing promoted): accuracy" in result.output
    assert not link.exists()
    result = CliRunner().invoke(
        app, ["runs", "list", "--output-dir", str(tmp_path / "runs"), "--json"]
    )
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert len(rows) == 1 and rows[0]["state"] == "completed"
    assert rows[0]["experiment"] == "t" and rows[0]["test_accuracy"]
    # Numbers, not strings, for scripts.
    assert isinstance(rows[0]["test_accuracy"], float)
    assert isinstance(rows[0]["best"], float) and rows[0]["monitor"]
    table = CliRunner().invoke(
        app, ["runs", "list", "--output-dir", str(tmp_path / "runs")]
    )
    assert f"{rows[0]['test_accuracy']:.4f}" in table.stdout


def test_promote_to_problems_are_found_before_training(setup, tmp_path):
    tmp, raw, _ = setup
    path = tmp_path / "c.yaml"
    raw = json.loads(json.dumps(raw))
    raw["experiment"]["output_dir"] = str(tmp_path / "runs")
    path.write_text(yaml.safe_dump(raw))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    stranger = tmp_path / "stranger"
    (tmp_path / "empty").mkdir()
    stranger.symlink_to(tmp_path / "empty")
    cases = [
        (blocker / "served", "is a file, not a folder"),
        (blocker, "exists and is not a link made by finetune-cli"),
        (stranger, "holds no model.keras"),
    ]
    for target, message in cases:
        result = CliRunner().invoke(
            app, ["finetune", str(path), "--promote-to", str(target)]
        )
        assert result.exit_code == 2, result.output
        assert message in result.output and str(target) in result.output
        assert not (tmp_path / "runs").exists()  # nothing trained


def launch_promote(run, link, *, fault=None, pause=None):
    return cli_process.launch(
        ["promote", run, "--to", link, "--plain"],
        fault=fault,
        pause=pause,
        stderr_to_stdout=True,
    )


def versions_of(link):
    folder = link.parent / f"{link.name}.versions"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.heavy  # a child process per kill point (about 65 s of the suite)
@pytest.mark.parametrize(
    "point", ["promotion_copy", "promotion_renamed", "promotion_swapped"]
)
def test_a_kill_at_each_promotion_step_leaves_link_and_records_true(
    setup, tmp_path, point
):
    _, _, run = setup
    link = tmp_path / "served"
    first = promotion.run_promotion(run, link, quiet())
    challenger = copy_run(run, f"challenger-{point}")
    proc = launch_promote(challenger, link, fault=point)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == -9, output[-2000:]
    served = link.resolve()
    # The link is on a complete model, and what the records say matches it.
    for f in ("model.keras", "labels.txt", "promotion.json", "split.json"):
        assert (served / f).is_file(), f
    record = challenger / "promotion.json"
    if point == "promotion_swapped":
        assert served.name.endswith(challenger.name)
    else:
        assert served == first
    # The run's own record is written only after the link switched.
    assert not record.exists()
    # The next promotion finishes or undoes the interrupted one.
    promotion.run_promotion(copy_run(run, f"next-{point}"), link, quiet())
    assert not (tmp_path / ".served.pending.json").exists()
    names = versions_of(link)
    assert not [n for n in names if n.startswith(".")]
    if point == "promotion_swapped":
        assert json.loads(record.read_text())["promoted"] is True
        assert len(names) == 3
    else:
        assert not record.exists()
        assert len(names) == 2  # the orphan was removed
    assert (tmp_path / "served.previous").resolve().name in names


@pytest.mark.heavy
def test_two_promoters_are_serialised(setup, tmp_path):
    _, _, run = setup
    link = tmp_path / "served"
    good = copy_run(run, "good")
    worse = copy_run(run, "worse2", constant_class=0)
    release = tmp_path / "go"
    # The first holds the lock (before it reads the promoted model) until
    # the test lets it go.
    a = launch_promote(good, link, pause=f"promotion_locked={release}")
    waiting = tmp_path / "go.waiting"
    import time

    t0 = time.monotonic()
    while not waiting.exists() and a.poll() is None and time.monotonic() - t0 < 240:
        time.sleep(0.05)
    assert waiting.exists(), a.communicate()[0][-2000:]
    b = launch_promote(worse, link)
    # The second one says it waits, and does.
    assert b.wait_for_output("waiting for the promotion lock"), b.communicate()[0]
    assert not link.exists()
    release.write_text("go")
    assert a.wait(timeout=300) == 0, a.communicate()[0][-2000:]
    rest = b.communicate(timeout=300)[0]
    assert b.returncode == EXIT_GATE, rest[-2000:]
    # The second compared itself with the first one's result.
    record = json.loads((worse / "promotion.json").read_text())
    assert record["promoted"] is False
    assert record["champion"]["path"] == str(link.resolve())
    assert link.resolve().name.endswith(good.name)
    assert "not better than the promoted model" in record["reasons"][0]
