"""Benchmark: training throughput on 1 replica, 2 replicas (mirrored) and 2
worker processes (multi_worker on 127.0.0.1), with the ratio to 1 replica.

Each configuration is a `finetune-cli finetune` run of one phase that
trains the top of MobileNetV2 on the images (the base runs every step), on
the same files and global batch. Images/s is taken from history.csv over
the epochs after the first (the first one traces the step). Mirrored uses
every GPU when there are two or more, else two logical CPU devices
(`runtime.logical_cpus: 2`), so the script runs unchanged on a GPU machine.

    python bench/distribute.py
    python bench/distribute.py --images 600 --image-size 96 --epochs 3
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from _assets import missing
from _assets import parser
import _results


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=1000, help="Training images.")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args(argv)
    if missing(args):
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench-distribute-"))
    classes = sorted(d for d in Path(args.data).iterdir() if d.is_dir())
    per_class = max(2, args.images // len(classes))
    manifest = tmp / "images.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for c in classes:
            files = sorted(c.glob("*.jpg"))
            for i, path in enumerate(files[: per_class + 8]):
                w.writerow([path.resolve(), c.name, "train" if i >= 8 else "val"])

    def config(name, runtime):
        raw = {
            "experiment": {"name": name, "seed": 1, "output_dir": str(tmp / "runs")},
            "data": {
                "csv": str(manifest),
                "allow_outside_root": True,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
            },
            "model": {"name": "MobileNetV2", "weights": str(Path(args.weights))},
            "phases": [
                {
                    "name": "top",
                    "epochs": args.epochs,
                    "trainable": {"top": 20},
                    "learning_rate": 1e-4,
                }
            ],
            "feature_cache": {"dir": str(tmp / "features")},
            "runtime": runtime,
        }
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def launch(path, env=None):
        return subprocess.Popen(
            [sys.executable, "-m", "finetune_cli", "finetune", str(path), "--plain"],
            env=dict(os.environ, **(env or {})),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def images_per_s(name):
        (run,) = [d for d in (tmp / "runs" / name).iterdir() if d.name[0].isdigit()]
        rows = list(csv.DictReader(open(run / "history.csv")))
        env = json.loads((run / "environment.json").read_text())["runtime"]
        # `iterations` counts optimizer steps since the phase began.
        steps_per_epoch = int(rows[-1]["iterations"]) / len(rows)
        timed = rows[1:]
        seconds = sum(float(r["seconds"]) for r in timed)
        return steps_per_epoch * len(timed) * args.batch_size / seconds, env

    def wait(procs, name):
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"{name} failed ({proc.returncode}):\n{err[-3000:]}")

    results = {}
    wait([launch(config("one", {"distribute": "none"}))], "one")
    results["1 replica"] = images_per_s("one")
    wait(
        [launch(config("mirrored", {"distribute": "mirrored", "logical_cpus": 2}))],
        "mirrored",
    )
    results["mirrored"] = images_per_s("mirrored")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    workers = [f"127.0.0.1:{port}" for port in ports]
    path = config("workers", {"distribute": "multi_worker"})
    procs = [
        launch(
            path,
            {
                "TF_CONFIG": json.dumps(
                    {
                        "cluster": {"worker": workers},
                        "task": {"type": "worker", "index": i},
                    }
                )
            },
        )
        for i in range(2)
    ]
    wait(procs, "workers")
    results["2 workers"] = images_per_s("workers")

    base = results["1 replica"][0]
    print(
        f"{per_class * len(classes)} training images, {args.image_size}px, global "
        f"batch {args.batch_size}, {args.epochs} epochs (first left out)"
    )
    table = []
    for name, (speed, env) in results.items():
        devices = ", ".join(d.rsplit("/", 1)[-1] for d in env.get("devices", []))
        table.append(
            [name, env.get("replicas", 1), devices[:40]]
            + [f"{speed:.1f}", f"{speed / base:.2f}x"]
        )
    _results.report(
        "distribute",
        "Training throughput under tf.distribute against one replica",
        ["setup", "replicas", "devices", "images/s", "ratio"],
        table,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
