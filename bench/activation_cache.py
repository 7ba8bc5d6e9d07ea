"""Benchmark: a top-N phase on cached activations vs on the full model, and
the activation cache's peak memory at 1x and 4x the images.

On the shared flower photos and ImageNet MobileNetV2 weights, each run a
`finetune-cli finetune` process of its own (peak RSS from wait4), in a
temporary folder:

1. full: a head phase (cached features), then `trainable: {top: 54}`
   under frozen BN with `feature_cache.activations: false`: the phase runs
   the whole base every step.
2. cached: the same config with the activation cache (the default): the
   bottom of the base runs once per image, the phase trains on its outputs.
3. cached, 1/4 of the images: the same config on a quarter of each class,
   for the memory figure (the cache is read from disk; RSS should not grow
   with the number of images).

Prints the top phase's wall time (its epochs plus, for the cache, building
it), both test accuracies, the ratio, and the peak RSS of runs 2 and 3.

    python bench/activation_cache.py
    python bench/activation_cache.py --epochs 3 --image-size 160
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _assets
import _results  # noqa: E402


def phase_seconds(run_dir: Path, phase: str) -> float:
    rows = list(csv.DictReader(open(run_dir / "history.csv")))
    return sum(float(r["seconds"]) for r in rows if r["phase"] == phase)


def subset(data: Path, dest: Path, fraction: float) -> Path:
    """A folder of symlinks to the first `fraction` of each class."""
    for cls in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        (dest / cls.name).mkdir(parents=True)
        for f in files[: max(1, int(len(files) * fraction))]:
            (dest / cls.name / f.name).symlink_to(f)
    return dest


def main(argv=None) -> int:
    p = _assets.parser(__doc__)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--top", type=int, default=54)
    args = p.parse_args(argv)
    if _assets.missing(args):
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-activations-"))
    raw = {
        "experiment": {"name": "x", "seed": 42, "output_dir": "runs"},
        "data": {
            "dir": args.data,
            "split": {"train": 0.8, "val": 0.1, "test": 0.1},
            "image_size": args.image_size,
            "batch_size": 32,
            "on_bad_image": "skip",
        },
        "model": {"name": "MobileNetV2", "weights": args.weights},
        "head": [{"type": "dropout", "rate": 0.2}],
        "phases": [
            {"name": "head", "epochs": 2, "learning_rate": 1e-3},
            {
                "name": "top",
                "epochs": args.epochs,
                "trainable": {"top": args.top},
                "batchnorm": "frozen",
                "learning_rate": 1e-4,
            },
        ],
    }
    runs = {}
    quarter = subset(Path(args.data), work / "quarter", 0.25)
    for name, activations, data in (
        ("full", False, args.data),
        ("cached", True, args.data),
        ("cached-quarter", True, str(quarter)),
    ):
        cfg = json.loads(json.dumps(raw))
        cfg["experiment"]["name"] = name
        cfg["data"]["dir"] = data
        cfg["feature_cache"] = {"activations": activations}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        wall, rss = _assets.run_cli("finetune", path, cwd=work)
        run_dir = work / "runs" / name / "latest"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        runs[name] = {
            "wall": wall,
            "rss": rss,
            "top_epochs": phase_seconds(run_dir, "top"),
            "test": metrics["test"]["accuracy"],
            "path": metrics["phases"][1]["path"],
        }
        print(
            f"{name}: wall {wall:.0f}s, top epochs {runs[name]['top_epochs']:.0f}s, "
            f"test {runs[name]['test']:.4f}, path {runs[name]['path']}, "
            f"peak RSS {rss:.0f} MiB",
            flush=True,
        )
    full, cached, quarter_run = runs["full"], runs["cached"], runs["cached-quarter"]
    r = cached["top_epochs"] / full["top_epochs"]
    _results.report(
        "activation_cache",
        f"A top-{args.top} phase ({args.epochs} epochs, BN frozen): the full "
        "model every step against cached activations",
        ["run", "phase epochs", "whole run", "test accuracy", "peak RSS"],
        [
            [
                "full model every step",
                f"{full['top_epochs']:.0f} s",
                f"{full['wall']:.0f} s",
                f"{full['test']:.4f}",
                f"{full['rss']:,.0f} MiB",
            ],
            [
                "cached activations",
                f"{cached['top_epochs']:.0f} s ({r:.2f}x)",
                f"{cached['wall']:.0f} s ({cached['wall'] / full['wall']:.2f}x)",
                f"{cached['test']:.4f}",
                f"{cached['rss']:,.0f} MiB",
            ],
            [
                "cached activations, a quarter of the photos",
                f"{quarter_run['top_epochs']:.0f} s",
                f"{quarter_run['wall']:.0f} s",
                f"{quarter_run['test']:.4f}",
                f"{quarter_run['rss']:,.0f} MiB",
            ],
        ],
    )
    # Both runs have the same head phase; the cache is built at the top
    # phase's start, so it is in the run's wall time, not in its epochs.
    saved = full["wall"] - cached["wall"]
    print(
        f"\ntop-phase epochs ratio cached/full: "
        f"{cached['top_epochs'] / full['top_epochs']:.2f}x; whole run "
        f"{cached['wall'] / full['wall']:.2f}x ({saved:.0f} s saved, cache "
        "build included)"
    )
    print(
        f"peak RSS with the activation cache: {quarter_run['rss']:.0f} MiB at 1x "
        f"(a quarter of the photos), {cached['rss']:.0f} MiB at 4x: "
        f"{cached['rss'] / quarter_run['rss']:.2f}x"
    )
    print(f"(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
