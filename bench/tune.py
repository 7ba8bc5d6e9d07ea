"""Benchmark: a 50-trial head-phase search on cached features, against the
shipped recipe's head phase.

On the shared flower photos and ImageNet MobileNetV2 weights, in a
temporary folder, each step a `finetune-cli` process:

1. shipped: `configs/flowers.yaml` cut to its head phase (frozen base,
   augmentation, the base runs every epoch) -> test accuracy, wall time.
2. tune: the same config with `feature_cache.augmented: views` and a
   `search:` over the head phase's learning rate, epochs, label smoothing
   and the head's dropout; `finetune-cli tune --trials 50`. Every trial
   trains on the cached views; the wall time includes extracting them.
3. best: `finetune` on the tune's `best.yaml` -> test accuracy, wall time.

The test split is the same in all three (same seed) and the search never
sees it: trials are scored on validation accuracy.

    python bench/tune.py                 # 50 trials
    python bench/tune.py --trials 20
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _assets
import _results  # noqa: E402


SEARCH = {
    "phases.0.learning_rate": {"log_uniform": [1e-4, 3e-2]},
    "phases.0.epochs": {"int": [4, 16, 4]},
    "phases.0.label_smoothing": {"uniform": [0.0, 0.2]},
    "head.0.rate": {"choice": [0.0, 0.2, 0.4]},
}


def cli(*args, cwd) -> float:
    return _assets.run_cli(*args, cwd=cwd)[0]


def main(argv=None) -> int:
    p = _assets.parser(__doc__)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--out", default=None, help="Also write the figures as JSON.")
    args = p.parse_args(argv)
    if _assets.missing(args):
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    raw = yaml.safe_load((_assets.ROOT / "configs" / "flowers.yaml").read_text())
    raw["data"]["dir"] = args.data
    raw["model"]["weights"] = args.weights
    raw["phases"] = raw["phases"][:1]
    raw["experiment"]["name"] = "shipped-head"
    (work / "shipped.yaml").write_text(yaml.safe_dump(raw))
    raw["experiment"]["name"] = "tuned-head"
    raw["feature_cache"] = {"augmented": "views"}
    raw["search"] = SEARCH
    (work / "tune.yaml").write_text(yaml.safe_dump(raw))

    shipped_s = cli("finetune", "shipped.yaml", cwd=work)
    shipped = _assets.test_accuracy(work / "runs" / "shipped-head" / "latest")
    print(f"shipped head phase: test {shipped:.4f} in {shipped_s:.0f}s", flush=True)
    tune_s = cli("tune", "tune.yaml", "--trials", str(args.trials), cwd=work)
    tune_dir = work / "runs" / "tuned-head" / "tune"
    meta = json.loads((tune_dir / "tune.json").read_text())
    trials = f"{meta['trials']} trials ({meta['mode']})"
    print(f"tune: {trials} in {tune_s:.0f}s", flush=True)
    best_s = cli("finetune", str(tune_dir / "best.yaml"), cwd=work)
    best = _assets.test_accuracy(work / "runs" / "tuned-head" / "latest")

    rows = [
        ("shipped head phase (base every epoch)", shipped, shipped_s),
        (f"tune, {meta['trials']} trials on cached views", None, tune_s),
        ("best trial's config, finetune", best, best_s),
    ]
    _results.report(
        "tune",
        "The shipped head phase against a search on cached views, then "
        "finetune on its best.yaml",
        ["step", "test accuracy", "wall"],
        [
            [name, "-" if acc is None else f"{acc:.4f}", f"{secs:.0f} s"]
            for name, acc, secs in rows
        ],
    )
    print()
    print(f"best trial: {meta['best']}")
    print(
        f"search + best run: {tune_s + best_s:.0f} s = "
        f"{(tune_s + best_s) / shipped_s:.2f}x the shipped head phase; "
        f"test accuracy {best - shipped:+.4f}"
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "shipped": {"test_accuracy": shipped, "seconds": shipped_s},
                    "tune": {"seconds": tune_s, **meta},
                    "best": {"test_accuracy": best, "seconds": best_s},
                },
                indent=2,
            )
        )
    print(f"(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
