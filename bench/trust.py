"""Benchmark: calibration and "unknown" on the flower photos.

A finished run of the shipped recipe (`--run RUN`, e.g. the one
bench/recipe.py --holdout-share 0.2 leaves in its work folder; without it
this script trains configs/flowers.yaml on the shared photos), evaluated
with `finetune-cli evaluate RUN [--data HOLDOUT] --unknown UNKNOWN`:

- ECE and log loss before and after the temperature the run fitted on its
  validation split, on images it was not fitted on (the holdout, or the
  run's test split);
- accuracy when answering only the most confident 90% and 80%;
- images of none of the five classes (`--unknown DIR`; default: 200
  synthetic shapes made by `finetune-cli synth`, the demo's data): the
  share rejected at the threshold that keeps 95% of the flower photos
  answered, and their mean top probability against the flowers'.

    python bench/trust.py --run /tmp/bench-recipe-xyz/runs/flowers/latest \
        --holdout /tmp/bench-recipe-xyz/holdout
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _assets
import _results  # noqa: E402


def main(argv=None) -> int:
    p = _assets.parser(__doc__)
    p.add_argument("--run", help="A finished run of the flower photos.")
    p.add_argument("--holdout", help="Labelled photos the run never saw.")
    p.add_argument("--unknown", help="Images of none of the classes.")
    args = p.parse_args(argv)
    if _assets.missing(args):
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-trust-"))
    run = args.run
    if run is None:
        cfg = yaml.safe_load((_assets.ROOT / "configs" / "flowers.yaml").read_text())
        cfg["data"]["dir"] = args.data
        cfg["model"]["weights"] = args.weights
        (work / "flowers.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        _assets.run_cli("finetune", work / "flowers.yaml", cwd=work)
        run = work / "runs" / cfg["experiment"]["name"] / "latest"
    unknown = args.unknown
    if unknown is None:
        from finetune_cli.data import synthetic

        unknown = work / "shapes"
        for task, seed in (("source", 7), ("target", 8)):
            synthetic.generate(unknown / task, task, per_class=25, size=96, seed=seed)
    cmd = ["evaluate", run, "--unknown", unknown, "--json", "--out", work / "eval"]
    if args.holdout:
        cmd += ["--data", args.holdout]
    _, _, text = _assets.run_cli(*cmd, cwd=work, stdout=True)
    m = json.loads(text)
    c, u = m.get("calibration"), m["unknown"]
    at = {r["coverage"]: r for r in m["selective"]["at_coverage"]}
    on = "holdout" if args.holdout else "the run's test split"
    rows = []
    if c is not None:
        rows += [
            ["temperature (fitted on val)", f"{c['temperature']:.3f}", ""],
            ["ECE", f"{c['ece_before']:.4f}", f"{c['ece_after']:.4f}"],
            ["log loss", f"{c['log_loss_before']:.4f}", f"{c['log_loss_after']:.4f}"],
        ]
    rows += [
        ["accuracy, all answered", "", f"{at[1.0]['accuracy']:.4f}"],
        ["accuracy, 90% most confident", "", f"{at[0.9]['accuracy']:.4f}"],
        ["accuracy, 80% most confident", "", f"{at[0.8]['accuracy']:.4f}"],
        [
            f"unknown images rejected at {u['threshold']:.3f} (95% of flowers kept)",
            "",
            f"{u['rejected']:.4f} of {u['images']}",
        ],
        [
            "mean top probability: flowers / unknown",
            "",
            f"{u['mean_confidence_in_class']:.3f} / {u['mean_confidence_unknown']:.3f}",
        ],
    ]
    _results.report(
        "trust",
        f"Calibration and unknown images, flower photos ({m['num_samples']} "
        f"images of {on}; {u['images']} images of none of the classes)",
        ["what", "before calibration", "after (as shipped)"],
        rows,
        note=f"Unknown images: {unknown}.",
    )
    print(f"(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
