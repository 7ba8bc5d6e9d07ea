"""Benchmark: what `experiment.deterministic` costs, and how far apart runs
land without it.

Runs the shipped flower recipe (configs/flowers.yaml, local weights) as
separate `finetune-cli finetune` processes, all on one fixed split (a CSV
manifest with a split column, made once from the folder with seed 42), so
runs differ only in their training randomness:

- seeds S, S+1, S+2 without determinism: the held-out (test split)
  accuracy of each, their mean and spread (max - min, and standard
  deviation): how far apart two honest runs of the same recipe can land;
- seed S again with `deterministic: true`, twice: wall time against the
  seed-S run without it (the cost), and whether the two deterministic runs
  gave the same test accuracy and best epoch.

    python bench/determinism.py
    python bench/determinism.py --image-size 128 --epochs 3   # quicker

`--epochs N` sets every phase to N epochs; the figures then describe that
shortened recipe, which the output says.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _assets import missing
from _assets import parser
import _results

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--config", default=str(ROOT / "configs" / "flowers.yaml"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default=None, help="Also write the figures as JSON.")
    args = p.parse_args(argv)
    if missing(args):
        return 0

    from finetune_cli import config as config_lib
    from finetune_cli.data import index as data_lib

    tmp = Path(tempfile.mkdtemp(prefix="bench-determinism-"))
    raw = yaml.safe_load(open(args.config))
    folder = config_lib.validate({**raw, "data": {**raw["data"], "dir": args.data}})
    index = data_lib.index_data(folder.data, 42)
    manifest = tmp / "split.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for split, items in index.splits.items():
            for path, label in items:
                w.writerow([path, index.class_names[label], split])
    raw["data"].pop("dir", None)
    raw["data"].pop("split", None)
    raw["data"].update(csv=str(manifest), allow_outside_root=True)
    if args.image_size:
        raw["data"]["image_size"] = args.image_size
    if args.epochs:
        for phase in raw["phases"]:
            phase["epochs"] = args.epochs
    raw["model"]["weights"] = str(Path(args.weights).resolve())
    raw["experiment"]["output_dir"] = str(tmp / "runs")

    def one(name, seed, deterministic):
        cfg = {**raw, "experiment": {**raw["experiment"], "name": name}}
        cfg["experiment"].update(seed=seed, deterministic=deterministic)
        cfg["feature_cache"] = {"dir": str(tmp / "features" / name)}
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "finetune_cli", "finetune", str(path), "--plain"],
            capture_output=True,
            text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            sys.exit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        (run,) = [d for d in (tmp / "runs" / name).iterdir() if d.name[0].isdigit()]
        m = json.loads((run / "metrics.json").read_text())
        row = {
            "name": name,
            "seed": seed,
            "deterministic": deterministic,
            "wall_s": round(wall, 1),
            "test_accuracy": m["test"]["accuracy"],
            "best_epoch": m["best_epoch"],
        }
        print(json.dumps(row), flush=True)
        return row

    shape = raw["data"]["image_size"]
    print(
        f"recipe {args.config} ({len(raw['phases'])} phases, epochs "
        f"{[ph['epochs'] for ph in raw['phases']]}, image size {shape}); "
        f"{len(index.splits['train'])} train / {len(index.splits['val'])} val / "
        f"{len(index.splits['test'])} test images, split fixed"
    )
    free = [one(f"seed{args.seed + i}", args.seed + i, False) for i in range(3)]
    det = [one(f"det{i}", args.seed, True) for i in range(2)]

    accs = [r["test_accuracy"] for r in free]
    summary = {
        "recipe": args.config,
        "image_size": shape,
        "epochs": [ph["epochs"] for ph in raw["phases"]],
        "runs": free + det,
        "accuracy_mean": statistics.mean(accs),
        "accuracy_spread": max(accs) - min(accs),
        "accuracy_stdev": statistics.stdev(accs),
        "deterministic_cost": det[0]["wall_s"] / free[0]["wall_s"],
        "deterministic_repeats": det[0]["test_accuracy"] == det[1]["test_accuracy"]
        and det[0]["best_epoch"] == det[1]["best_epoch"],
    }
    print()
    print(
        f"without determinism, 3 seeds: test accuracy "
        f"{', '.join(f'{a:.4f}' for a in accs)}; mean {summary['accuracy_mean']:.4f}, "
        f"spread {summary['accuracy_spread']:.4f}, stdev "
        f"{summary['accuracy_stdev']:.4f}"
    )
    print(
        f"deterministic: {det[0]['wall_s']:.0f} s vs {free[0]['wall_s']:.0f} s "
        f"(ratio {summary['deterministic_cost']:.2f}); two deterministic runs "
        f"{'agree' if summary['deterministic_repeats'] else 'DIFFER'} "
        f"(test accuracy {det[0]['test_accuracy']:.4f} / "
        f"{det[1]['test_accuracy']:.4f})"
    )
    _results.report(
        "determinism",
        "Op determinism: its cost, and the spread of test accuracy without it",
        ["measure", "value"],
        [
            ["test accuracy over 3 seeds", ", ".join(f"{a:.4f}" for a in accs)],
            ["spread (max - min)", f"{summary['accuracy_spread']:.4f}"],
            ["deterministic / free wall", f"{summary['deterministic_cost']:.2f}x"],
            ["two deterministic runs agree", str(summary["deterministic_repeats"])],
        ],
    )
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
