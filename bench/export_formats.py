"""Benchmark: every export format of a flowers model, size/latency/accuracy.

Trains MobileNetV2 (ImageNet weights from ../shared/assets) with a head on
cached features of the flower photos at 224x224, then exports all formats
with every TFLite quantization and prints the parity table (size, mean
latency per image at batch 1 on this machine, accuracy, agreement).

    python bench/export_formats.py [--epochs 10] [--parity-images 128]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _assets import missing  # noqa: E402
from _assets import parser  # noqa: E402
import _results


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--parity-images", type=int, default=128)
    p.add_argument("--calibration-images", type=int, default=256)
    args = p.parse_args(argv)
    if missing(args):
        return 0
    from finetune_cli import config as config_lib
    from finetune_cli.deploy import export as export_lib
    from finetune_cli.deploy import formats as formats_lib
    from finetune_cli.train import job as trainer
    from finetune_cli.console import Output

    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    cfg = config_lib.validate(
        {
            "experiment": {"name": "flowers", "output_dir": str(tmp / "runs")},
            "data": {
                "dir": args.data,
                "image_size": 224,
                "batch_size": 32,
                "on_bad_image": "skip",  # tf_flowers has duplicate photos
                "split": {"train": 0.8, "val": 0.1, "test": 0.1},
            },
            "model": {"name": "MobileNetV2", "weights": args.weights},
            "phases": [{"name": "head", "epochs": args.epochs, "learning_rate": 1e-3}],
            "feature_cache": {"dir": str(tmp / "features")},
        }
    )
    run = trainer.finetune(cfg, Output(file=open(os.devnull, "w"))).run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    print(
        f"trained: val accuracy {metrics['val']['accuracy']:.4f}, test "
        f"accuracy {metrics['test']['accuracy']:.4f} ({run})"
    )
    result = export_lib.export(
        run,
        formats=formats_lib.FORMATS,
        quantize=formats_lib.QUANTIZATIONS,
        parity_images=args.parity_images,
        calibration_images=args.calibration_images,
    )
    r = result.report
    print(
        f"parity: {r['images']} validation images, Keras model accuracy "
        f"{r['reference_accuracy']:.4f}"
    )
    _results.report(
        "export_formats",
        f"Every export format: size, latency at batch 1, parity on "
        f"{r['images']} validation images",
        ["artifact", "size", "ms/image", "accuracy", "top-1 agreement"]
        + ["max abs diff", "ok"],
        [
            [
                a["artifact"],
                f"{a['size_bytes'] / 1e6:.2f} MB",
                f"{a['latency_ms']:.1f}",
                f"{a['accuracy']:.4f}",
                f"{a['top1_agreement']:.4f}",
                f"{a['max_abs_diff']:.1e}",
                "yes" if a["passed"] else "NO",
            ]
            for a in r["artifacts"]
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
