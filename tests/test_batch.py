"""`data.batch_size: auto`: the largest power of two that fits, by a short
probe, recorded in the run; a resumed run keeps it, and says so when it no
longer fits."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from finetune_cli import config as config_lib
from finetune_cli.cli.main import app
from finetune_cli.errors import ConfigError
from finetune_cli.model import build as model_lib
from finetune_cli.train import batch as batch_lib
from finetune_cli.train import phases as phases_lib
from conftest import tiny_config

WHOLE = [{"name": "all", "epochs": 1, "trainable": "all", "batchnorm": "train"}]


def test_auto_is_the_only_word_a_batch_size_takes(shapes_dir, tmp_path):
    raw = tiny_config(shapes_dir, tmp_path)
    raw["data"]["batch_size"] = "auto"
    assert config_lib.validate(raw).data.batch_size == "auto"
    for bad in ("big", 0, True, 2.5):
        raw["data"]["batch_size"] = bad
        with pytest.raises(ConfigError, match="data.batch_size"):
            config_lib.validate(raw)


def _model(shapes_dir, tmp_path, phases):
    cfg = config_lib.validate(tiny_config(shapes_dir, tmp_path, phases=phases))
    model, base = model_lib.build_model(cfg, 4)
    return model, base, phases_lib.plan_phases(model, base, cfg)


def test_on_a_gpu_the_batch_doubles_until_a_step_runs_out_of_memory(
    shapes_dir, tmp_path, monkeypatch
):
    model, base, plans = _model(shapes_dir, tmp_path, WHOLE)
    tried = []

    def fits(m, batch, k):  # a device where 64 images are the most
        tried.append(batch)
        return batch <= 64

    monkeypatch.setattr(batch_lib, "_fits", fits)
    before = [v.numpy().copy() for v in model.variables]
    choice = batch_lib.choose(lambda p: (model, base), plans, 1000, 4, gpu=True)
    assert choice["batch_size"] == 64 and tried == [1, 2, 4, 8, 16, 32, 64, 128]
    # Never above the training images (a power of two below them).
    assert (
        batch_lib.choose(lambda p: (model, base), plans, 40, 4, gpu=True)["batch_size"]
        == 32
    )
    after = [v.numpy() for v in model.variables]
    assert all((a == b).all() for a, b in zip(before, after, strict=True))


def test_on_the_cpu_the_batch_is_what_half_the_free_memory_holds(
    shapes_dir, tmp_path, monkeypatch
):
    model, base, plans = _model(shapes_dir, tmp_path, WHOLE)
    per_image = batch_lib.bytes_per_image(model)
    assert per_image > 0
    # 10.5 images' worth of memory: half of it holds 5, the power of two 4.
    monkeypatch.setattr(batch_lib, "available_memory", lambda: int(10.5 * per_image))
    choice = batch_lib.choose(lambda p: (model, base), plans, 1000, 4, gpu=False)
    assert choice["batch_size"] == 4 and "MiB an image" in choice["how"]
    monkeypatch.setattr(batch_lib, "available_memory", lambda: per_image)
    with pytest.raises(ConfigError, match="auto found no batch that fits"):
        batch_lib.choose(lambda p: (model, base), plans, 1000, 4, gpu=False)


# A whole run and its resume (or two runs): `make test-heavy` (CI).
@pytest.mark.heavy
def test_a_run_records_the_batch_auto_chose_and_a_resume_checks_it(
    shapes_dir, tmp_path, monkeypatch
):
    raw = tiny_config(shapes_dir, tmp_path, phases=WHOLE)
    raw["data"]["batch_size"] = "auto"
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["finetune", str(path), "--plain"])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs" / "t").glob("2*")
    chosen = yaml.safe_load((run / "config.yaml").read_text())["data"]["batch_size"]
    assert chosen in (1, 2, 4, 8, 16) and f"auto chose {chosen}" in result.output
    record = json.loads((run / "environment.json").read_text())["runtime"]
    assert record["batch_size"]["auto"] is True
    assert record["batch_size"]["batch_size"] == chosen

    # The same run, resumed where the chosen batch no longer fits.
    model, base, plans = _model(shapes_dir, tmp_path, WHOLE)
    monkeypatch.setattr(batch_lib, "available_memory", lambda: 1)
    with pytest.raises(ConfigError) as e:
        batch_lib.check_recorded(
            lambda p: (model, base), plans, chosen, 4, False, record["batch_size"]
        )
    assert f"auto chose {chosen} when this run started" in str(e.value)
    assert "no longer fits" in str(e.value)
    # A batch the user chose is not probed.
    batch_lib.check_recorded(lambda p: (model, base), plans, chosen, 4, False, None)
