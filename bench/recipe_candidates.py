"""Benchmark: candidate default recipes on the flower photos, several seeds.

Each candidate is `configs/flowers.yaml` with some keys changed; each runs
as a `finetune-cli finetune` process per seed. The seed (experiment.seed)
draws the split, the augmentation and the initial head, so candidates are
compared on the same split seed by seed (paired). Candidates of one seed
share the feature and activation caches (one experiment name per seed, an
output folder per candidate), so a candidate's wall time includes a cache
only when it is the first to need it: compare speed with bench/recipe.py.

Prints, per candidate, test accuracy per seed, the mean and the spread
(sample standard deviation), and the mean wall time.

    python bench/recipe_candidates.py                       # all, seeds 1 2 3
    python bench/recipe_candidates.py --only blocks11 --seeds 1 2 3 4 5
    python bench/recipe_candidates.py --only head-only --views 4
    python bench/recipe_candidates.py --holdout-share 0.2 --only blocks11-h20-e2-lr2 \
        blocks11-h20-e2-lr2-ema     # chosen on the pool; the holdout is never read

With `--holdout-share`, the candidates see only the pool left after the
holdout (the same draw as bench/recipe.py --holdout-share): choose here,
then score the one chosen once on the holdout with bench/recipe.py.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _assets
import _results  # noqa: E402

AUG = [
    {"type": "flip", "mode": "horizontal"},
    {"type": "rotation", "factor": 0.1},
    {"type": "zoom", "factor": 0.1},
]


def _phase(name, epochs, lr, **kw):
    return {"name": name, "epochs": epochs, "learning_rate": lr, **kw}


def _head_then_blocks(
    first_layer: str,
    head_epochs: int = 6,
    epochs: int = 3,
    lr: float = 1e-4,
    warmup: float = 0.0,
) -> dict:
    """Head `head_epochs` epochs, then the base from `first_layer` up (BN
    frozen) for `epochs` epochs at Adam `lr` with a cosine decay (after a
    linear warm-up of `warmup` epochs), label smoothing 0.1 in both."""
    schedule = {"name": "cosine", "warmup_epochs": warmup} if warmup else "cosine"
    return {
        "phases": [
            _phase("head", head_epochs, 1e-3, label_smoothing=0.1),
            _phase(
                "fine-tune",
                epochs,
                lr,
                trainable={"from_layer": first_layer},
                batchnorm="frozen",
                schedule=schedule,
                label_smoothing=0.1,
            ),
        ],
    }


# name -> changes to configs/flowers.yaml (a list replaces the section, a
# dict updates it).
# MobileNetV2's blocks 13-16 run at 7x7 (about 30% of its multiply-adds),
# blocks 11-12 at 14x14 (another 15%).
CANDIDATES = {
    # Head only: the base's features as they are.
    "head-only": {
        "phases": [_phase("head", 10, 1e-3, label_smoothing=0.1)],
    },
    "blocks13": _head_then_blocks("block_13_expand"),
    "blocks11": _head_then_blocks("block_11_expand"),
    # A head phase on cached views costs about 0.2 s an epoch: train it longer.
    "blocks11-h20": _head_then_blocks("block_11_expand", head_epochs=20),
    # From block 7 the top is about 60% of the multiply-adds instead of 45%,
    # but the bottom is shorter and its activations (14x14x64) smaller than
    # block 10's (14x14x96): about the same total time.
    "blocks7-h20": _head_then_blocks("block_7_expand", head_epochs=20),
    # The fine-tune phase is most of the time after the bottom pass (about
    # 40 s an epoch) and its training accuracy reaches 0.97 by epoch 3:
    # fewer epochs, at a higher rate.
    "blocks11-h20-e2": _head_then_blocks("block_11_expand", 20, epochs=2),
    # The winner, shipped as configs/flowers.yaml (and written by `init`).
    "blocks11-h20-e2-lr2": _head_then_blocks("block_11_expand", 20, 2, lr=2e-4),
    "blocks11-h20-e2-lr3": _head_then_blocks("block_11_expand", 20, 2, lr=3e-4),
    "blocks11-h20-e3-lr2": _head_then_blocks("block_11_expand", 20, 3, lr=2e-4),
    # Adam's first steps on freshly unfrozen blocks are the largest; a
    # warm-up (MediaPipe Model Maker's default) may let a higher peak rate
    # through without the overshoot seen at 3e-4.
    "blocks11-h20-e2-lr2-wu": _head_then_blocks(
        "block_11_expand", 20, 2, lr=2e-4, warmup=0.25
    ),
    "blocks11-h20-e2-lr3-wu": _head_then_blocks(
        "block_11_expand", 20, 2, lr=3e-4, warmup=0.25
    ),
    # Two fine-tune epochs are only 148 steps at batch 32: twice the steps
    # for about the same compute.
    "blocks11-h20-e2-lr1-b16": {
        **_head_then_blocks("block_11_expand", 20, 2, lr=1e-4),
        "data": {"batch_size": 16},
    },
    # Keras' weight EMA (optimizer.use_ema) in both phases: validation, the
    # best epoch and the result are the moving average of the weights.
    "blocks11-h20-e2-lr2-ema": {
        "phases": [
            {**p, "optimizer": {"name": "adam", "use_ema": True, "ema_momentum": 0.9}}
            for p in _head_then_blocks("block_11_expand", 20, 2, lr=2e-4)["phases"]
        ]
    },
    # MixUp (alpha 0.2) after the per-image ops: on the cached views of the
    # head phase and the cached activations of the fine-tune phase.
    "blocks11-h20-e2-lr2-mixup": {
        **_head_then_blocks("block_11_expand", 20, 2, lr=2e-4),
        "augmentation": [*AUG, {"type": "mixup", "alpha": 0.2}],
    },
    "blocks11-h20-e2-lr2-b16": {
        **_head_then_blocks("block_11_expand", 20, 2, lr=2e-4),
        "data": {"batch_size": 16},
    },
}


def main(argv=None) -> int:
    p = _assets.parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--only", nargs="+", choices=sorted(CANDIDATES))
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--work", help="Folder to run in (default: a new temporary one).")
    _assets.holdout_args(p)
    args = p.parse_args(argv)
    if _assets.missing(args):
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.holdout:
        raise SystemExit("--holdout is for bench/recipe.py; here --holdout-share")
    args.data, holdout = _assets.resolve_holdout(args, work)
    shipped = yaml.safe_load((_assets.ROOT / "configs" / "flowers.yaml").read_text())
    names = args.only or list(CANDIDATES)
    results = {name: [] for name in names}
    for seed in args.seeds:
        for name in names:
            cfg = copy.deepcopy(shipped)
            for section, change in copy.deepcopy(CANDIDATES[name]).items():
                if isinstance(change, dict) and isinstance(cfg.get(section), dict):
                    cfg[section].update(change)
                else:
                    cfg[section] = change
            cfg["experiment"].update(
                name=f"seed-{seed}", seed=seed, output_dir=f"runs/{name}"
            )
            cfg["data"]["dir"] = args.data
            cfg["model"]["weights"] = args.weights
            cfg.setdefault("augmentation", AUG)
            cfg["feature_cache"] = {
                **cfg.get("feature_cache", {}),
                "augmented": "views",
                "views": args.views,
            }
            path = work / f"{name}-{seed}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            wall, _ = _assets.run_cli("finetune", path, cwd=work)
            acc = _assets.test_accuracy(
                work / "runs" / name / f"seed-{seed}" / "latest"
            )
            results[name].append((acc, wall))
            print(f"{name} seed {seed}: test {acc:.4f}, {wall:.0f} s", flush=True)
    table = []
    for name, rows in results.items():
        accs = [a for a, _ in rows]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        table.append(
            [name, *(f"{a:.4f}" for a in accs)]
            + [f"{statistics.mean(accs):.4f}", f"{sd:.4f}"]
            + [f"{statistics.mean(w for _, w in rows):.0f} s"]
        )
    kept = (
        ""
        if holdout is None
        else f", on the pool left after a {args.holdout_share:.0%} holdout "
        f"(seed {args.holdout_seed}) that no candidate saw"
    )
    _results.report(
        "recipe_candidates",
        f"Recipe candidates over seeds (test accuracy of each seed's split{kept})",
        ["candidate", *(f"seed {s}" for s in args.seeds)]
        + ["mean", "spread (sd)", "mean wall"],
        table,
    )
    print(f"(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
