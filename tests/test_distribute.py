"""Training under tf.distribute: two logical CPUs (mirrored) and two local
worker processes (multi_worker, TF_CONFIG on 127.0.0.1) give the losses of
one device; a worker that dies stops the others, and --resume completes."""

import csv
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from finetune_cli import config as config_lib
from finetune_cli.runtime import distribute
from finetune_cli.errors import ConfigError

import cli_process
from conftest import lively_weights
from conftest import tiny_config

PHASES = [
    {"name": "head", "epochs": 2, "learning_rate": 1e-2},
    # Batch statistics train here: equal to one device only if the two
    # replicas' BatchNormalization layers are synchronised.
    {
        "name": "top",
        "epochs": 2,
        "trainable": {"top": 6},
        "batchnorm": "train",
        "learning_rate": 1e-3,
    },
]


def write_config(shapes_dir, tmp_path, name, **runtime):
    raw = tiny_config(shapes_dir, tmp_path, phases=PHASES)
    raw["model"]["weights"] = lively_weights(tmp_path / "pre.weights.h5")
    raw["experiment"]["name"] = name
    raw["runtime"] = runtime
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def launch(args, env=None, fault=None):
    return cli_process.launch(args + ["--plain"], env=env, fault=fault)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def runs(tmp_path, name):
    root = tmp_path / "runs" / name
    return [p for p in root.iterdir() if p.name[0].isdigit()] if root.is_dir() else []


def history(run):
    rows = list(csv.DictReader(open(run / "history.csv")))
    return [(r["phase"], float(r["loss"]), float(r["val_loss"])) for r in rows]


def losses(rows):
    return [x for _, *vals in rows for x in vals]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config(ports, index):
    workers = [f"127.0.0.1:{p}" for p in ports]
    return json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )


@pytest.fixture(scope="module")
def single(shapes_dir, tmp_path_factory):
    """The reference: the same config on one device."""
    tmp = tmp_path_factory.mktemp("single")
    cfg = write_config(shapes_dir, tmp, "single", distribute="none")
    code, out, err = finish(launch(["finetune", str(cfg)]))
    assert code == 0, err[-3000:]
    (run,) = runs(tmp, "single")
    return run


@pytest.mark.heavy
def test_mirrored_on_two_logical_cpus_matches_one_device(single, shapes_dir, tmp_path):
    import keras

    cfg = write_config(
        shapes_dir, tmp_path, "mirrored", distribute="mirrored", logical_cpus=2
    )
    code, out, err = finish(launch(["finetune", str(cfg)]))
    assert code == 0, err[-3000:]
    assert "8 = 2 x 4" in out  # the plan table: global batch over 2 replicas
    assert err == "", err[-2000:]  # no native TensorFlow log lines
    (run,) = runs(tmp_path, "mirrored")
    env = json.loads((run / "environment.json").read_text())
    assert env["runtime"]["distribute"] == "mirrored"
    assert env["runtime"]["replicas"] == 2 and env["runtime"]["workers"] == 1

    rows, ref = history(run), history(single)
    assert [r[0] for r in rows] == ["head"] * 2 + ["top"] * 2
    assert losses(rows) == pytest.approx(losses(ref), rel=1e-4)
    assert len(set(losses(ref))) > 4  # the losses move

    images = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3))
    got = keras.saving.load_model(run / "best.keras").predict(images, verbose=0)
    want = keras.saving.load_model(single / "best.keras").predict(images, verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.heavy
def test_two_workers_write_one_run_with_the_losses_of_one_device(
    single, shapes_dir, tmp_path
):
    cfg = write_config(
        shapes_dir, tmp_path, "workers", distribute="multi_worker", worker_timeout=60
    )
    ports = free_ports(2)
    procs = [
        launch(["finetune", str(cfg)], env={"TF_CONFIG": tf_config(ports, i)})
        for i in range(2)
    ]
    results = [finish(p) for p in procs]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert "worker:1: done; the chief wrote the run folder" in results[1][1]

    (run,) = runs(tmp_path, "workers")  # exactly one run folder
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    env = json.loads((run / "environment.json").read_text())
    assert env["runtime"]["workers"] == 2 and env["runtime"]["task"] == "worker:0"
    # Worker 1 wrote only to its temporary folder, which is gone.
    temp = Path(tempfile.gettempdir())
    assert not list(temp.glob(f"finetune-worker-{procs[1].pid}-*"))
    assert losses(history(run)) == pytest.approx(losses(history(single)), rel=1e-3)

    import keras

    model = keras.saving.load_model(run / "best.keras")
    assert model.predict(np.zeros((1, 32, 32, 3)), verbose=0).shape == (1, 4)


@pytest.mark.heavy
def test_a_dead_worker_stops_the_other_and_resume_completes(
    single, shapes_dir, tmp_path
):
    cfg = write_config(
        shapes_dir, tmp_path, "killed", distribute="multi_worker", worker_timeout=20
    )
    ports = free_ports(2)
    env = [{"TF_CONFIG": tf_config(ports, i)} for i in range(2)]
    t0 = time.monotonic()
    chief = launch(["finetune", str(cfg)], env=env[0])
    worker = launch(["finetune", str(cfg)], env=env[1], fault="epoch_saved@2")
    assert finish(worker)[0] == -9
    code, out, err = finish(chief)
    # Within a bounded time of the kill, with a message, not a hang.
    assert time.monotonic() - t0 < 150
    assert code == 5, err[-3000:]
    assert "worker:1 stopped answering" in err
    (run,) = runs(tmp_path, "killed")
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["resumable"]
    assert f"--resume {run}" in err

    ports = free_ports(2)
    procs = [
        launch(
            ["finetune", "--resume", str(run)], env={"TF_CONFIG": tf_config(ports, i)}
        )
        for i in range(2)
    ]
    for code, _, err in [finish(p) for p in procs]:
        assert code == 0, err[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert losses(history(run)) == pytest.approx(losses(history(single)), rel=1e-3)


def test_config_validate_checks_tf_config_without_tensorflow(
    shapes_dir, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from finetune_cli.cli.main import app

    cfg = write_config(shapes_dir, tmp_path, "v", distribute="multi_worker")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = CliRunner().invoke(app, ["config", "validate", str(cfg)])
    assert result.exit_code == 2 and "TF_CONFIG" in result.output
    monkeypatch.setenv("TF_CONFIG", tf_config([1, 2], 1))
    result = CliRunner().invoke(app, ["config", "validate", str(cfg)])
    assert result.exit_code == 0, result.output


def test_tf_config_problems_are_config_errors(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribute.cluster()
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}}')
    with pytest.raises(ConfigError, match="TF_CONFIG must be JSON like"):
        distribute.cluster()
    monkeypatch.setenv(
        "TF_CONFIG",
        '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
    )
    with pytest.raises(ConfigError, match="index"):
        distribute.cluster()


def test_an_unreachable_cluster_names_the_address(shapes_dir, tmp_path):
    cfg = write_config(
        shapes_dir, tmp_path, "alone", distribute="multi_worker", worker_timeout=5
    )
    ports = free_ports(2)
    code, out, err = finish(
        launch(["finetune", str(cfg)], env={"TF_CONFIG": tf_config(ports, 0)})
    )
    assert code == 2, err[-3000:]
    assert f"nothing answers at 127.0.0.1:{ports[1]}" in err
    assert not runs(tmp_path, "alone")


def test_a_batch_that_does_not_split_over_the_replicas_is_refused():
    topo = distribute.Topology("mirrored", None, replicas=3)
    cfg = config_lib.validate(
        {"data": {"dir": "d", "batch_size": 8}, "phases": [{"name": "a", "epochs": 1}]}
    )
    from finetune_cli.train.setup import check_batch as _check_batch

    with pytest.raises(ConfigError, match="multiple of 3"):
        _check_batch(cfg, topo, 100)
    assert distribute.Topology("none", None).steps_per_epoch(17, 8) == 3
    two = distribute.Topology("multi_worker", None, replicas=2, workers=2)
    assert two.steps_per_epoch(17, 8) == 2  # full global batches only


@pytest.mark.heavy
def test_two_workers_train_from_shards_into_a_remote_run_folder(shapes_dir, tmp_path):
    """data.records under multi_worker: each worker reads whole shards of
    every epoch (4 train shards of 4 images, 2 a worker), and the chief
    writes the one run folder through tf.io.gfile to a URL (file://: a
    scheme both processes share, where ram:// lives in one process; the
    code paths are those of gs://), uploaded after every epoch."""
    from finetune_cli import config as config_lib
    from finetune_cli.console import Output
    from finetune_cli.data.pack import pack_data

    shards = tmp_path / "shards"
    section = config_lib.Data(
        dir=str(shapes_dir), split={"train": 0.5, "val": 0.25, "test": 0.25}
    )
    pack_data(
        section,
        shards,
        seed=3,
        multi_label=False,
        shard_size=4,
        out=Output(file=open(os.devnull, "w")),
    )
    cfg = write_config(
        shapes_dir, tmp_path, "shards", distribute="multi_worker", worker_timeout=60
    )
    raw = yaml.safe_load(cfg.read_text())
    raw["data"] = {"records": str(shards), "image_size": 32, "batch_size": 8}
    raw["experiment"]["output_dir"] = f"file://{tmp_path}/bucket/runs"
    cfg.write_text(yaml.safe_dump(raw))
    ports = free_ports(2)
    mirror = {"FINETUNE_CLI_MIRROR": str(tmp_path / "mirror")}
    procs = [
        launch(["finetune", str(cfg)], env={"TF_CONFIG": tf_config(ports, i), **mirror})
        for i in range(2)
    ]
    for code, _, err in [finish(p) for p in procs]:
        assert code == 0, err[-3000:]
    root = tmp_path / "bucket" / "runs" / "shards"
    (run,) = [p for p in root.iterdir() if p.name[0].isdigit()]
    assert (root / "latest.txt").read_text().strip() == run.name
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    rec = json.loads((run / "split.json").read_text())
    assert rec["records"]["folder"] == str(shards) and rec["files"] == {}
    rows = history(run)
    assert [r[0] for r in rows] == ["head"] * 2 + ["top"] * 2
    assert all(np.isfinite(losses(rows)))
    assert (run / "best.keras").is_file() and (run / "eval/test/report.html").is_file()


def test_the_cluster_recipes_are_what_the_tool_accepts(monkeypatch):
    """The Kubernetes TFJob recipe's config validates, its command is ours,
    and TF_CONFIG as the training operator and Ray Train set it is read."""
    from finetune_cli import config as config_lib
    from finetune_cli.runtime import distribute

    root = Path(__file__).resolve().parent.parent / "examples" / "cluster"
    docs = list(yaml.safe_load_all((root / "tfjob.yaml").read_text()))
    config_map, job = docs
    assert job["kind"] == "TFJob"
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    (container,) = worker["template"]["spec"]["containers"]
    assert container["name"] == "tensorflow"
    assert container["command"][:2] == ["finetune-cli", "finetune"]
    cfg = config_lib.validate(yaml.safe_load(config_map["data"]["flowers.yaml"]))
    assert cfg.runtime.distribute == "multi_worker"
    assert cfg.data.records.startswith("gs://")
    assert cfg.experiment.output_dir.startswith("gs://")
    # TF_CONFIG of pod worker-1 as the operator sets it ("environment" too),
    # and of Ray's worker 0.
    workers = [f"flowers-finetune-worker-{i}.default.svc:2222" for i in range(2)]
    operator = {
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": 1},
        "environment": "cloud",
    }
    monkeypatch.setenv("TF_CONFIG", json.dumps(operator))
    assert distribute.cluster() == ({"worker": workers}, "worker", 1)
    ray = {"cluster": {"worker": ["10.0.0.1:5000", "10.0.0.2:5000"]}}
    ray["task"] = {"type": "worker", "index": 0}
    monkeypatch.setenv("TF_CONFIG", json.dumps(ray))
    assert distribute.cluster()[1:] == ("worker", 0)
    source = (root / "ray_train.py").read_text()
    compile(source, "ray_train.py", "exec")
    assert "TensorflowTrainer" in source and '"finetune"' in source
