"""Benchmark: peak memory of `extract` on a dataset and on one 4x larger.

Each extract runs in its own process, so the peak RSS is its own. The larger
dataset has four times as many distinct images (the first 4N per class of
the same folder instead of the first N), listed in a CSV manifest.

    python bench/extract_memory.py --data ../shared/assets/flower_photos \
        --weights ../shared/assets/weights/mobilenet_v2_1.0_224_imagenet_no_top.h5

Prints each run's peak RSS, images, seconds, and the ratio large/small.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _assets import missing
from _assets import parser
import _results

_CHILD = r"""
import json, os, resource, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from finetune_cli.config import load_config
from finetune_cli.console import Output
from finetune_cli.cache import extract as extract_lib
cfg = load_config(sys.argv[1])
t0 = time.perf_counter()
(r,) = extract_lib.extract_command(cfg, Output(file=open(os.devnull, "w")), "train")
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"images": r.images, "seconds": time.perf_counter() - t0,
                  "peak_rss_mib": rss}))
"""


def manifest(root: Path, per_class: int, path: Path) -> int:
    rows = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(
            f for f in cls.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png")
        )[:per_class]
        rows += [(os.path.relpath(f, path.parent), cls.name) for f in files]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows((p, lb, "train") for p, lb in rows)
        # A val row per class so the manifest is a valid dataset.
        w.writerows((p, lb, "val") for p, lb in rows[:1])
    return len(rows)


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--per-class", type=int, default=140)
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args(argv)
    if missing(args):
        return 0
    root = Path(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    results = {}
    for label, n in (("small", args.per_class), ("large", 4 * args.per_class)):
        csv_path = tmp / f"{label}.csv"
        try:
            count = manifest(root, n, csv_path)
            cfg = tmp / f"{label}.yaml"
            cfg.write_text(
                json.dumps(
                    {
                        "experiment": {"name": label},
                        "data": {
                            "csv": str(csv_path),
                            "image_size": args.image_size,
                            "batch_size": 32,
                            "allow_outside_root": True,
                        },
                        "model": {"name": "MobileNetV2", "weights": args.weights},
                        "phases": [{"name": "head", "epochs": 1}],
                        "feature_cache": {
                            "dir": str(tmp / "features"),
                            "shard_size": 512,
                        },
                    }
                )
            )
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(cfg)],
                check=True,
                capture_output=True,
                text=True,
            )
        finally:
            csv_path.unlink(missing_ok=True)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[label]
        print(
            f"{label}: {r['images']} images ({count} listed), "
            f"{r['seconds']:.1f}s, peak RSS {r['peak_rss_mib']:.0f} MiB"
        )
    ratio = results["large"]["peak_rss_mib"] / results["small"]["peak_rss_mib"]
    scale = results["large"]["images"] / results["small"]["images"]
    small = results["small"]
    _results.report(
        "extract_memory",
        "Peak RSS of extract against the number of images",
        ["images", "seconds", "peak RSS", "ratio"],
        [
            [
                small["images"],
                f"{small['seconds']:.1f}",
                f"{small['peak_rss_mib']:,.0f} MiB",
                "1.00x",
            ],
            [
                f"{results['large']['images']} ({scale:.1f}x)",
                f"{results['large']['seconds']:.1f}",
                f"{results['large']['peak_rss_mib']:,.0f} MiB",
                f"{ratio:.3f}x",
            ],
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
