"""`predict`: streamed rows in input order, unreadable images named,
CSV/JSON to a file or stdout, --out checked before TensorFlow loads."""

import csv
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from finetune_cli.evaluate import prediction
from finetune_cli.model import saved as runmodel
from finetune_cli.cli.main import app

from conftest import constant_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model(shapes_dir, tmp_path_factory):
    return constant_model(tmp_path_factory.mktemp("m"), "m", 2, shapes_dir)


@pytest.fixture(scope="module")
def folder(shapes_dir, tmp_path_factory):
    """5 good images and a broken one sorted between them."""
    folder = tmp_path_factory.mktemp("imgs")
    srcs = sorted((shapes_dir / "square").iterdir())[:5]
    for i, f in enumerate(srcs):
        (folder / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    (folder / "2_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return folder


def test_rows_keep_input_order_across_batches_with_bad_files(model, folder):
    files = prediction.collect_images([folder])
    assert [f.rsplit("/", 1)[-1][:1] for f in files] == list("012234")
    # A duplicate and a missing file; batches of 2 so errors straddle them.
    files = [files[5], *files, files[0], str(folder / "gone.jpg")]
    m = runmodel.load_model(runmodel.resolve_target(model))
    rows = list(prediction.iter_probabilities(m, files, batch_size=2))
    assert [r[0] for r in rows] == files
    errors = {r[0].rsplit("/", 1)[-1]: r[2] for r in rows if r[2]}
    assert set(errors) == {"2_broken.png", "gone.jpg"}
    assert all(r[1].argmax() == 2 for r in rows if r[2] is None)


def test_stdout_json_and_summary_on_stderr(model, folder):
    result = runner.invoke(
        app, ["predict", str(model), str(folder), "--out", "-", "--format", "json"]
    )
    assert result.exit_code == 3, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 6
    assert [r["label"] for r in rows] == ["star"] * 3 + [None] + ["star"] * 2
    assert "2_broken.png" in rows[3]["file"] and rows[3]["error"]
    assert "predicted 5 of 6 images" in result.stderr
    assert "2_broken.png" in result.stderr


def test_csv_file_and_one_line_summary(model, folder, tmp_path):
    out = tmp_path / "p.csv"
    result = runner.invoke(
        app,
        ["predict", str(model), str(folder), "--out", str(out), "--top-k", "2"],
    )
    assert result.exit_code == 3
    rows = list(csv.DictReader(open(out)))
    assert [r["label"] for r in rows] == ["star"] * 3 + [""] + ["star"] * 2
    assert all(len(r["top_k"].split(";")) == 2 for r in rows if r["label"])
    # No per-image lines when writing a file: the summary and the error.
    assert str(folder / "0.jpg") not in result.stdout
    assert "wrote" in result.stdout and "predicted 5 of 6" in result.stdout
    assert not list(tmp_path.glob(".p.*")), "temporary file left behind"


def test_without_out_one_line_per_image(model, folder):
    result = runner.invoke(app, ["predict", str(model), str(folder / "0.jpg")])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith(str(folder)))
    assert ": star 0.99" in line and "(star 1.000, circle 0.000" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "p.txt"], "--out must end in .csv or .json"),
        (["--out", "p.csv", "--format", "json"], "does not match the suffix"),
        (["--format", "csv"], "--format needs --out"),
    ],
)
def test_bad_out_is_refused_before_tensorflow_loads(tmp_path, args, message):
    # The model and images do not even exist: --out is checked first.
    code = (
        "import sys\n"
        "from finetune_cli.cli.main import app\n"
        "try:\n"
        "    app(sys.argv[1:], prog_name='finetune-cli')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'tensorflow' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "predict", "none.keras", "none", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.stdout.strip() == "exit 2 False", proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_out_dash_without_a_format_is_csv_on_stdout(model, folder):
    result = CliRunner().invoke(
        app, ["predict", str(model), str(folder / "0.jpg"), "--out", "-"]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(result.stdout.splitlines()))
    assert rows[0]["file"].endswith("0.jpg") and rows[0]["label"] == "star"


def test_files_in_a_folder_that_are_not_images_are_named_not_silently_left_out(
    model, folder, tmp_path
):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    (mixed / "notes.txt").write_text("not an image")
    (mixed / "labels.csv").write_text("a,b\n")
    result = CliRunner().invoke(app, ["predict", str(model), str(mixed), "--out", "-"])
    text = " ".join(result.stderr.split())
    assert "left out 2 file(s) that are not images" in text
    assert "notes.txt" in text and "labels.csv" in text
    assert "notes.txt" not in result.stdout  # not predicted either


def test_the_rate_leaves_out_the_model_loading_and_the_first_batch(model, folder):
    result = CliRunner().invoke(
        app, ["predict", str(model), str(folder), "--batch-size", "2", "--out", "-"]
    )
    assert "images/s after the first batch" in result.stderr
    few = CliRunner().invoke(app, ["predict", str(model), str(folder / "0.jpg")])
    assert "too few images for a rate" in few.stdout


def test_a_damaged_jpeg_is_named_once_without_the_decoders_own_lines(model, tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 10, 10)).save(buf, "JPEG")
    data = buf.getvalue()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "ok.jpg").write_bytes(data)
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_cli", "predict", str(model), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Improper call to JPEG library" not in proc.stderr
    assert "Corrupt JPEG data" not in proc.stderr
    assert "half.jpg" in proc.stderr and "Traceback" not in proc.stderr


def test_flip_tta_averages_each_image_and_its_mirror(finished_run, tmp_path):
    import numpy as np
    from PIL import Image

    from finetune_cli.evaluate import prediction
    from finetune_cli.model.saved import load_model
    from finetune_cli.model.saved import resolve_target

    from conftest import positional_model

    model = load_model(resolve_target(positional_model(tmp_path / "m")))
    src = sorted(p for p in finished_run.data.rglob("*.png"))[:3]
    mirrors = []
    for p in src:
        m = tmp_path / f"mirror-{p.name}"
        Image.open(p).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(m)
        mirrors.append(str(m))
    plain = prediction.predict_files(model, [str(p) for p in src])
    mirrored = prediction.predict_files(model, mirrors)
    tta = prediction.predict_files(model, [str(p) for p in src], tta="flip")
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, atol=1e-5)
    assert not np.allclose(tta, plain, atol=1e-6)  # the mirror did count

    from typer.testing import CliRunner

    from finetune_cli.cli.main import app

    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(finished_run.run),
            "--tta",
            "flip",
            "--json",
            "--out",
            str(tmp_path / "ev"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert '"tta": "flip"' in result.output
