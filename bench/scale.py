"""Benchmark: cost against data size, a folder of files against shards.

For each size (default 2,000, 20,000 and 200,000 images: 10 classes of
32x32 JPEGs the script makes), and for the folder (`data.dir`) and for
its pack (`finetune-cli pack`, `data.records`):

- pre-flight cold and warm: the check of every image with no verdict
  cache, then with it (in this process; a pack's pre-flight is `pack`);
- time to first epoch: `finetune` with a one-epoch head on cached
  features at 32 px, from the command's start to its first epoch row
  (the base runs over every image: the feature cache is cold);
- evaluate: `evaluate RUN` on the recorded test split;
- resume start-up: a two-epoch run killed after its first epoch (fault
  injection), resumed: from the command's start to the next epoch row
  (the feature cache is warm by then);
- peak memory of the `finetune` process and the size of `split.json`.

Ratios are against the smallest size's folder, measured in the same run.

    python bench/scale.py [--sizes 2000 20000 200000] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EPOCH_ROW = re.compile(r"^\s*\d+\s+\d")


def make_images(folder: Path, n: int, classes: int = 10) -> None:
    """`n` 32x32 JPEGs in `classes` folders: a class colour plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (classes, 1, 1, 3))
    for i in range(n):
        c = i % classes
        px = np.clip(base[c] + rng.normal(0, 40, (32, 32, 3)), 0, 255)
        Image.fromarray(px.astype("uint8")).save(
            folder / f"c{c}" / f"{i:07d}.jpg", quality=90
        )


def run(args, cwd, fault=None) -> dict:
    """`finetune-cli ARGS --plain` in its own process: wall seconds,
    seconds to the first epoch row, peak RSS (MiB) and the exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FINETUNE_CLI_FAULT", None)
    if fault:
        env["FINETUNE_CLI_FAULT"] = fault
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_cli", *map(str, args), "--plain"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    first = None
    for line in proc.stdout:
        if first is None and EPOCH_ROW.match(line):
            first = time.monotonic() - t0
    _, status, usage = os.wait4(proc.pid, 0)
    return {
        "wall": time.monotonic() - t0,
        "first_epoch": first,
        "rss": usage.ru_maxrss / 1024,
        "code": os.waitstatus_to_exitcode(status),
    }


def config(work: Path, name: str, data: dict, epochs: int) -> Path:
    import yaml

    raw = {
        "experiment": {"name": name, "seed": 1, "output_dir": str(work / "runs")},
        "data": {**data, "image_size": 32, "batch_size": 64},
        "model": {
            "name": "MobileNetV2",
            "weights": "none",
            "options": {"alpha": 0.35},
        },
        "phases": [{"name": "head", "epochs": epochs}],
        # One cache per data set: the resumed run's extraction is warm.
        "feature_cache": {"dir": str(work / f"features-{name.split('-resume')[0]}")},
        "calibration": "none",
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def preflight_times(cfg_path: Path) -> tuple[float, float]:
    """Seconds of the pre-flight check: cold (no verdicts), warm."""
    sys.path.insert(0, str(ROOT))
    from finetune_cli import config as config_lib
    from finetune_cli.console import Output
    from finetune_cli.data import index as data_lib
    from finetune_cli.data import preflight

    cfg = config_lib.load_config(cfg_path)
    out = Output(quiet=True)
    times = []
    for _ in range(2):
        t0 = time.monotonic()
        index = data_lib.index_config(cfg)
        _, _, save = preflight.scan_images(index, cfg, out)
        save()
        times.append(time.monotonic() - t0)
    return times[0], times[1]


def latest_run(work: Path, name: str) -> Path:
    runs = sorted(p for p in (work / "runs" / name).iterdir() if p.name[0] == "2")
    return runs[-1]


def measure(work: Path, n: int, layout: str) -> dict:
    folder = work / f"images-{n}"
    if not folder.is_dir():
        print(f"making {n} images ...", flush=True)
        make_images(folder, n)
    name = f"{layout}-{n}"
    row = {"size": n, "layout": layout}
    if layout == "folder":
        data = {"dir": str(folder)}
        cfg = config(work, name, data, 1)
        row["preflight_cold"], row["preflight_warm"] = preflight_times(cfg)
    else:
        shards = work / f"shards-{n}"
        r = run(["pack", folder, "--out", shards, "--force"], work)
        row["preflight_cold"] = r["wall"]  # pack: the check and the writing
        row["preflight_warm"] = 0.0  # a pack is checked once, when packed
        data = {"records": str(shards)}
        cfg = config(work, name, data, 1)
    r = run(["finetune", cfg], work)
    assert r["code"] == 0, f"finetune {name} failed"
    row["first_epoch"], row["rss"] = r["first_epoch"], r["rss"]
    run_dir = latest_run(work, name)
    row["split_kb"] = (run_dir / "split.json").stat().st_size / 1024
    row["evaluate"] = run(["evaluate", run_dir, "--name", "bench"], work)["wall"]
    two = config(work, name + "-resume", data, 2)
    killed = run(["finetune", two], work, fault="epoch_saved@1")
    assert killed["code"] != 0, "the fault did not stop the run"
    resumed = run(["finetune", "--resume", latest_run(work, name + "-resume")], work)
    assert resumed["code"] == 0, f"resume {name} failed"
    row["resume_start"] = resumed["first_epoch"]
    print(row, flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 200000])
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = [
        measure(work, n, layout) for n in args.sizes for layout in ("folder", "shards")
    ]
    base = rows[0]

    def cell(r, key, unit="s"):
        v = r[key]
        ratio = f" ({v / base[key]:.2f}x)" if base[key] else ""
        return f"{v:.1f} {unit}{ratio}"

    table = [
        [
            f"{r['size']:,}",
            r["layout"],
            cell(r, "preflight_cold"),
            "-" if r["layout"] == "shards" else cell(r, "preflight_warm"),
            cell(r, "first_epoch"),
            cell(r, "evaluate"),
            cell(r, "resume_start"),
            cell(r, "rss", "MiB"),
            cell(r, "split_kb", "KB"),
        ]
        for r in rows
    ]
    _results.report(
        "scale",
        "cost against data size: a folder of 32x32 JPEGs (10 classes) and its "
        "pack (TFRecord shards), MobileNetV2 alpha 0.35, one-epoch head at 32 px",
        [
            "images",
            "data",
            "pre-flight cold",
            "warm",
            "to first epoch",
            "evaluate",
            "resume start-up",
            "peak memory",
            "split.json",
        ],
        table,
        note="Ratios against the smallest folder in the same run. A pack's "
        "'pre-flight cold' is `pack` (the check of every image and the "
        "writing); it is not checked again. Times include the process start "
        "and the cold feature cache (the base over every image).",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
