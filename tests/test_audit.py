"""`finetune-cli audit`: planted label flips, copies and an outlier are
found; it informs (exit 0) unless a gate is asked for."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune_cli.cli.main import app
from finetune_cli.search import audit as audit_lib

runner = CliRunner()


HUES = {
    "circle": (200, 40, 40),
    "square": (40, 170, 40),
    "star": (40, 60, 200),
    "triangle": (190, 180, 30),
}


def _colour_classes(data, per_class: int, seed: int) -> None:
    """Classes a base with random weights tells apart (colour survives
    random convolutions; shapes at 32 px do not): each image its class's
    colour with jittered brightness, noise and a box of a random colour."""
    rng = np.random.default_rng(seed)
    for name, rgb in HUES.items():
        (data / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.asarray(rgb, float) * rng.uniform(0.7, 1.1)
            img = img + rng.normal(0, 12, (32, 32, 3))
            y, x = rng.integers(0, 20, 2)
            img[y : y + 10, x : x + 10] = rng.uniform(0, 255, 3)
            Image.fromarray(np.clip(img, 0, 255).astype("uint8")).save(
                data / name / f"{name}_{i:04d}.png"
            )


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Four classes with 3 label flips, a copy within a class, a copy in
    another class, and a blank image among the stars."""
    root = tmp_path_factory.mktemp("audit")
    data = root / "shapes"
    _colour_classes(data, per_class=16, seed=2)
    flips = []
    for src, dst in (("circle", "square"), ("square", "triangle"), ("star", "circle")):
        f = sorted((data / src).glob(f"{src}_*"))[0]
        moved = data / dst / f"flipped_{f.name}"
        f.rename(moved)
        flips.append(moved.name)
    first = sorted((data / "triangle").iterdir())[3]
    shutil.copy(first, data / "triangle" / f"copy_{first.name}")
    other = sorted((data / "square").iterdir())[5]
    shutil.copy(other, data / "star" / f"cross_{other.name}")
    Image.new("RGB", (32, 32), (0, 0, 0)).save(data / "star" / "blank.png")
    return {"data": data, "flips": flips, "root": root}


def _audit(planted, *extra):
    out = planted["root"] / "report"
    return runner.invoke(
        app,
        [
            "audit",
            str(planted["data"]),
            # Random VGG16 features tell colours apart (no download here).
            "--weights",
            "none",
            "--model",
            "VGG16",
            "--image-size",
            "32",
            "--folds",
            "3",
            "--out",
            str(out),
            *extra,
        ],
        env={"COLUMNS": "80"},
    ), out


# Two audits of real images end to end: `make test-heavy` (CI); the
# checks themselves are in the quick suite below, on planted features.
@pytest.mark.heavy
def test_planted_flips_copies_and_an_outlier_are_found(planted):
    result, out = _audit(planted, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    findings = report["findings"]
    ranked = [f["file"] for f in findings if f["kind"] == "label_error"]
    names = [r.rsplit("/", 1)[-1] for r in ranked]
    # Every planted flip is among the first ranks of the label errors (the
    # copy planted in another class is a fourth).
    top = names[: 4 + 2]
    assert all(f in top for f in planted["flips"]), names[:10]
    dups = {f["kind"]: f for f in findings if "duplicate" in f["kind"]}
    assert "copy_" in dups["duplicate"]["file"] + dups["duplicate"]["other"]
    cross = dups["cross_class_duplicate"]
    assert "cross_" in cross["file"] + cross["other"]
    assert cross["score"] > 0.999
    outliers = [f["file"] for f in findings if f["kind"] == "outlier"]
    assert outliers and outliers[0].endswith("blank.png")
    for name in ("audit.csv", "audit.json", "audit.html"):
        assert (out / name).is_file()
    assert "blank.png" in (out / "audit.html").read_text()
    # A rerun reuses the features, refuses to replace the report without
    # --force, and a gate fails with exit 4 naming the count.
    again, _ = _audit(planted)
    assert again.exit_code == 2 and "--force" in again.output
    gated, _ = _audit(planted, "--force", "--fail-over", "cross_class_duplicate=0")
    assert gated.exit_code == 4, gated.output
    assert "cross_class_duplicate: 1 found, more than 0" in gated.output
    assert "extract" not in gated.output  # the cached features


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--fail-over", "typo=1"], "--fail-over expects KIND=N"),
        (["--fail-over", "outlier=x"], "expected a whole number"),
        (["--model", "ResNet9"], "did you mean"),
    ],
)
def test_bad_options_are_named(planted, tmp_path, args, culprit):
    result = runner.invoke(
        app, ["audit", str(planted["data"]), "--out", str(tmp_path / "r"), *args]
    )
    assert result.exit_code == 2, result.output
    assert culprit in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_folds_deal_every_class_round_the_folds():
    y = np.array([0] * 10 + [1] * 7 + [2] * 3)
    fold = audit_lib.folds_of(y, 3, seed=0)
    for c, n in ((0, 10), (1, 7), (2, 3)):
        counts = np.bincount(fold[y == c], minlength=3)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n


def test_the_checks_find_what_was_planted_in_features():
    """Class clusters with 3 flipped labels, a copy within a class, a copy
    under another class, a split leak and a point far from every class."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (4, 16))
    y = np.repeat(np.arange(4), 30)
    x = centres[y] + rng.normal(0, 1, (120, 16))
    flipped = [3, 40, 77]
    y[flipped] = (y[flipped] + 1) % 4
    x[100] = x[101]  # within class 3
    x[5] = x[35]  # class 0 and class 1
    x[119] = rng.normal(0, 1, 16) * 0.1  # near the middle, no class
    splits = ["train"] * 110 + ["test"] * 10
    x[115] = x[60]  # class 2 (train) and class 3 (test)
    files = [f"f{i}" for i in range(120)]
    names = ["a", "b", "c", "d"]
    probs = audit_lib.out_of_fold(x.astype("float32"), y, 4, folds=5, seed=0)
    errors = audit_lib.label_errors(probs, y, files, names, splits)
    top = {f.file for f in errors[:5]}
    assert {"f3", "f40", "f77"} <= top
    assert errors[0].score < 0.5 and errors[0].other != errors[0].label
    dups = audit_lib.duplicates(x, y, files, names, splits, 0.98)
    kinds = {(f.kind, f.file, f.other.split(" ")[0]) for f in dups}
    assert ("duplicate", "f100", "f101") in kinds
    assert ("cross_class_duplicate", "f5", "f35") in kinds
    assert ("cross_split_duplicate", "f60", "f115") in kinds
    outliers = audit_lib.outliers(x, y, files, names, splits)
    assert outliers and outliers[0].file == "f119"
