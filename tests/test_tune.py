"""tune: search spaces checked before anything runs, trials on cached
features, a ranked table and a best config that finetune accepts, a killed
search that continues where it stopped."""

import csv
import json
import types

import pytest
import yaml
from typer.testing import CliRunner

import cli_process
from conftest import lively_weights
from conftest import tiny_config
from finetune_cli import config as config_lib
from finetune_cli.config import spaces as search_lib
from finetune_cli.search import tune as tune_lib
from finetune_cli.cli.main import app

runner = CliRunner()

SEARCH = {
    "phases.0.learning_rate": {"log_uniform": [1e-3, 1e-1]},
    "head.0.rate": {"choice": [0.0, 0.25, 0.5]},
    "phases.0.label_smoothing": {"uniform": [0.0, 0.2]},
}


def write_config(tmp_path, shapes_dir, search=SEARCH, lively=True, **changes):
    raw = tiny_config(
        shapes_dir,
        tmp_path,
        head=[{"type": "dropout", "rate": 0.2}],
        phases=[
            {"name": "head", "epochs": 3, "learning_rate": 1e-2},
            {"name": "top", "epochs": 1, "trainable": {"top": 4}},
        ],
        search=search,
    )
    if lively:  # features that carry signal, so trials differ
        raw["model"]["weights"] = lively_weights(tmp_path / "pre.weights.h5")
    raw["experiment"].update(changes)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return raw, path


def test_cached_search_ranks_trials_and_writes_a_config_finetune_accepts(
    shapes_dir, tmp_path
):
    raw, path = write_config(tmp_path, shapes_dir)
    result = runner.invoke(
        app, ["tune", str(path), "--trials", "4", "--algorithm", "random", "--plain"]
    )
    assert result.exit_code == 0, result.output
    assert "cached trials" in result.output
    tune_dir = tmp_path / "runs" / "t" / "tune"
    rows = list(csv.DictReader(open(tune_dir / "trials.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"COMPLETED"}
    scores = [float(r["val_accuracy"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    for r in rows:  # every value inside its space
        assert 1e-3 <= float(r["phases.0.learning_rate"]) <= 1e-1
        assert float(r["head.0.rate"]) in (0.0, 0.25, 0.5)
        assert 0.0 <= float(r["phases.0.label_smoothing"]) <= 0.2
    assert len({r["phases.0.learning_rate"] for r in rows}) == 4
    # best.yaml: the config with the best trial's values, and nothing else
    # changed; finetune and config validate accept it.
    best = config_lib.load_config(tune_dir / "best.yaml")
    assert best.phases[0].learning_rate == pytest.approx(
        float(rows[0]["phases.0.learning_rate"])
    )
    assert best.head[0].rate == float(rows[0]["head.0.rate"])
    assert best.search == {}
    original = config_lib.validate(raw).model_dump(mode="json", exclude={"search"})
    values = {k: json.loads(rows[0][k]) for k in SEARCH}
    assert best.model_dump(mode="json", exclude={"search"}) == search_lib.apply(
        original, values
    )
    meta = json.loads((tune_dir / "tune.json").read_text())
    assert meta["mode"] == "cached" and meta["best"]["trial"] == rows[0]["trial"]
    assert meta["best"]["val_accuracy"] == pytest.approx(scores[0])
    # The base ran once for the whole search: one feature cache, no runs.
    assert not (tmp_path / "runs" / "t" / "tune" / "trials").exists()
    # The same folder for another config is refused, before any work.
    _, other = write_config(tmp_path, shapes_dir, seed=4)
    again = runner.invoke(app, ["tune", str(other), "--trials", "4", "--plain"])
    assert again.exit_code == 2, again.output
    assert "another config or algorithm" in again.output


@pytest.mark.heavy
def test_killed_search_continues_where_it_stopped(shapes_dir, tmp_path):
    _, path = write_config(tmp_path, shapes_dir)
    args = ["tune", str(path), "--trials", "5", "--plain"]
    killed = cli_process.run(args, fault="trial@3")
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    tune_dir = tmp_path / "runs" / "t" / "tune"
    assert not (tune_dir / "trials.csv").exists()
    assert "trial 0:" in killed.stdout and "trial 1:" in killed.stdout
    result = cli_process.run(args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "continuing: 2 trial(s) already done" in result.stdout
    assert "trial 0:" not in result.stdout and "trial 2:" in result.stdout
    rows = list(csv.DictReader(open(tune_dir / "trials.csv")))
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2", "3", "4"]
    assert {r["status"] for r in rows} == {"COMPLETED"}
    # The first two trials kept the values and scores they had.
    for line in killed.stdout.splitlines():
        if line.startswith(("trial 0:", "trial 1:")):
            trial = line.split(":")[0].split()[1]
            (row,) = [r for r in rows if r["trial"] == trial]
            assert f"val_accuracy {float(row['val_accuracy']):.4f}" in line


@pytest.mark.parametrize(
    "search, message",
    [
        (
            {"phases.0.learning_rat": {"log_uniform": [1e-4, 1e-2]}},
            "search.phases.0.learning_rat: no such key in the config: phases.0 "
            "has no key 'learning_rat' (did you mean 'learning_rate'?)",
        ),
        (
            {"head.3.rate": {"choice": [0.1]}},
            "search.head.3.rate: no such key in the config: head is a list of 1",
        ),
        (
            {"head.0.rate": {"choice": [0.0, 1.5]}},
            "search.head.0.rate: the config is not valid with head.0.rate=1.5",
        ),
        (
            {"phases.0.epochs": {"int": [0, 4]}},
            "the config is not valid with phases.0.epochs=0",
        ),
        (
            {"phases.0.learning_rate": {"log_uniform": [0, 1e-2]}},
            "search.phases.0.learning_rate.log_uniform: expected [low, high], "
            "0 < low < high",
        ),
        (
            {"phases.0.learning_rate": {"loguniform": [1e-4, 1e-2]}},
            "unknown space 'loguniform' (did you mean 'log_uniform'?)",
        ),
        ({"phases.0.epochs": 3}, "search.phases.0.epochs: expected one of"),
    ],
)
def test_a_bad_search_space_is_a_config_error_naming_the_key(
    shapes_dir, tmp_path, search, message
):
    _, path = write_config(tmp_path, shapes_dir, search=search, lively=False)
    for command in (["config", "validate"], ["tune"]):
        result = runner.invoke(app, [*command, str(path)])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_a_layer_count_beyond_the_base_is_refused_before_any_trial(
    shapes_dir, tmp_path
):
    search = {"phases.1.trainable.top": {"int": [2, 5000, 2]}}
    _, path = write_config(tmp_path, shapes_dir, search=search, lively=False)
    result = runner.invoke(app, ["tune", str(path), "--plain"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "search.phases.1.trainable.top: with phases.1.trainable.top=5000" in text
    assert "Received: top=5000" in text
    assert not (tmp_path / "runs").exists()


def test_tune_without_a_search_section_says_what_to_add(shapes_dir, tmp_path):
    _, path = write_config(tmp_path, shapes_dir, search={}, lively=False)
    result = runner.invoke(app, ["tune", str(path)])
    assert result.exit_code == 2
    assert "search: tune needs a search section" in result.output


def test_trials_are_cached_only_when_every_key_is_a_head_phase_key():
    plans = [
        types.SimpleNamespace(index=0, path="features"),
        types.SimpleNamespace(index=1, path="base"),
    ]

    def mode(*keys):
        return tune_lib.trial_mode(
            [search_lib.Space(k, "choice", (1,)) for k in keys], plans
        )

    assert mode("head.0.rate", "phases.0.learning_rate") == "cached"
    assert mode("phases.0.optimizer.name") == "cached"
    assert mode("phases.1.learning_rate") == "full"
    assert mode("phases.0.trainable.top") == "full"  # it would move the phase
    assert mode("data.batch_size") == "full"
    assert mode("head.0.rate", "model.pooling") == "full"
    no_cache = [types.SimpleNamespace(index=0, path="base")]
    assert (
        tune_lib.trial_mode([search_lib.Space("head.0.rate", "choice", (1,))], no_cache)
        == "full"
    )
