"""Benchmark: a head phase with augmentation, the base every epoch against
cached augmented views.

On the shared flower photos and ImageNet MobileNetV2 weights, each a
`finetune-cli finetune` process in a temporary folder, the head phase of
`configs/flowers.yaml` (augmentation declared, its epochs, Adam 1e-3):

- faithful: `feature_cache.augmented: faithful`, the base runs every epoch
  on freshly augmented images (the baseline);
- views N: `feature_cache.augmented: views` with N views: the base runs
  once per image and view, and epoch e trains on view e mod N.

Prints wall time (cache building included, cold cache), test accuracy and
the ratio against the baseline measured in the same session.

    python bench/augmented_head.py              # faithful, views 4
    python bench/augmented_head.py --views 2 4 8
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


def finetune(cfg: dict, work: Path) -> tuple[float, float]:
    """(wall seconds, test accuracy) of one run."""
    name = cfg["experiment"]["name"]
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    wall, _ = _assets.run_cli("finetune", path, cwd=work)
    return wall, _assets.test_accuracy(work / "runs" / name / "latest")


def main(argv=None) -> int:
    p = _assets.parser(__doc__)
    p.add_argument("--views", type=int, nargs="+", default=[4])
    args = p.parse_args(argv)
    if _assets.missing(args):
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-augmented-"))
    raw = yaml.safe_load((_assets.ROOT / "configs" / "flowers.yaml").read_text())
    raw["data"]["dir"] = args.data
    raw["model"]["weights"] = args.weights
    raw["phases"] = raw["phases"][:1]
    rows = []
    for views in [None, *args.views]:
        cfg = json.loads(json.dumps(raw))
        if views is None:
            name, cfg["feature_cache"] = "faithful", {"augmented": "faithful"}
        else:
            name = f"views-{views}"
            cfg["feature_cache"] = {"augmented": "views", "views": views}
        cfg["experiment"]["name"] = name
        wall, acc = finetune(cfg, work)
        rows.append((name, wall, acc))
        print(f"{name}: {wall:.0f} s, test {acc:.4f}", flush=True)
    base_wall, base_acc = rows[0][1], rows[0][2]
    epochs = raw["phases"][0]["epochs"]
    _results.report(
        "augmented_head",
        f"The shipped head phase ({epochs} epochs): faithful against cached "
        "augmented views",
        ["feature_cache.augmented", "wall", "vs faithful", "test accuracy"],
        [
            [
                name,
                f"{wall:.0f} s",
                f"{wall / base_wall:.2f}x",
                f"{acc:.4f} ({(acc - base_acc) * 100:+.1f} points)",
            ]
            for name, wall, acc in rows
        ],
    )
    print(f"(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
