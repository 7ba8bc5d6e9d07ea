"""Benchmark: what `make demo` shows, and how much it varies with the seed.

Runs the demo's three steps as `finetune-cli` processes in a temporary
folder (no shared assets needed): the source-task base once, then for each
seed the fine-tuning config (configs/demo.yaml, with `experiment.seed` set:
the split, head initialisation, augmentation and order all change) and the
same schedule from random weights. Prints, per seed and as mean / min / max:

- scratch: test accuracy of the demo schedule from random weights
  (what the source task is worth);
- head: best validation accuracy of the head phase on the frozen base;
- fine-tune: best validation accuracy after unfreezing the top layers;
- test: held-out accuracy of the fine-tuned model.

    python bench/demo_seeds.py                 # seeds 1 2 3
    python bench/demo_seeds.py --seeds 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
import _results

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd):
    cmd = [sys.executable, "-m", "finetune_cli", *args, "--quiet"]
    subprocess.run(
        cmd, cwd=cwd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default=None, help="Also write the figures as JSON.")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    (work / "configs").mkdir()
    for name in ("demo.yaml", "demo-source.yaml"):
        (work / "configs" / name).write_text((ROOT / "configs" / name).read_text())
    t0 = time.monotonic()
    synth = ["synth", "--force", "--size", "64"]
    cli(
        *synth,
        "data/demo/source",
        "--task",
        "source",
        "--per-class",
        "300",
        "--seed",
        "0",
        cwd=work,
    )
    cli(
        *synth,
        "data/demo/target",
        "--task",
        "target",
        "--per-class",
        "60",
        "--seed",
        "1",
        cwd=work,
    )
    cli("finetune", "configs/demo-source.yaml", cwd=work)
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for name, extra in (
            ("fine-tuned", []),
            ("scratch", ["--set", "model.weights=none"]),
        ):
            exp = f"{name}-{seed}"
            cli(
                "finetune",
                "configs/demo.yaml",
                "--set",
                f"experiment.seed={seed}",
                "--set",
                f"experiment.name={exp}",
                *extra,
                cwd=work,
            )
            m = json.loads(
                (work / "runs" / exp / "latest" / "metrics.json").read_text()
            )
            if name == "scratch":
                row["scratch"] = m["test"]["accuracy"]
            else:
                phases = [phase["phase"] for phase in m["phases"]]
                for phase in m["phases"]:
                    row[phase["phase"]] = phase["val_accuracy"]
                row["test"] = m["test"]["accuracy"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if k != "seed"]
    summary = {
        k: {
            "mean": statistics.mean(r[k] for r in rows),
            "min": min(r[k] for r in rows),
            "max": max(r[k] for r in rows),
        }
        for k in keys
    }
    print(f"\n{len(rows)} seeds, {time.monotonic() - t0:.0f} s in all")
    _results.report(
        "demo_seeds",
        f"make demo's steps over {len(rows)} seeds (validation accuracy by "
        "phase, test accuracy, the same schedule from scratch)",
        ["", *keys],
        [
            [stat, *(f"{summary[k][stat]:.3f}" for k in keys)]
            for stat in ("mean", "min", "max")
        ],
    )
    first, last = phases[0], phases[-1]
    helped = sum(r["scratch"] < r["test"] and r[first] < r[last] for r in rows)
    print(
        f"seeds where the source base and unfreezing both helped: {helped}/{len(rows)}"
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"rows": rows, "summary": summary}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
