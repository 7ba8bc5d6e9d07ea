"""Print the demo's comparison: fine-tuned from the source base vs scratch.

Usage: python -m finetune_cli.demo_summary RUN_DIR [RUN_DIR ...]
Reads each run's metrics.json; prints validation accuracy after each phase
and test accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from finetune_cli.console import Output


def main(argv=None) -> int:
    runs = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    out = Output()
    rows = []
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        weights = _weights(run)
        phases = ", ".join(
            f"{p['phase']} {p['val_accuracy']:.3f}" for p in metrics["phases"]
        )
        test = metrics.get("test", {}).get("accuracy")
        rows.append(
            [
                str(run.resolve().parent.name),
                weights,
                phases,
                "-" if test is None else f"{test:.3f}",
            ]
        )
    out.table(
        "demo: validation accuracy after each phase, and test accuracy",
        ["experiment", "base weights", "val accuracy by phase", "test"],
        rows,
    )
    return 0


def _weights(run: Path) -> str:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return cfg["model"]["weights"]


if __name__ == "__main__":
    sys.exit(main())
