"""Shared options of the benchmarks: where ../shared/assets are."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "assets"


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with --data and --weights defaulting to the assets."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument(
        "--data",
        default=str(SHARED / "flower_photos"),
        help="Folder of class folders (default: the flower photos).",
    )
    p.add_argument(
        "--weights",
        default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_no_top.h5"),
        help="MobileNetV2 no-top weights file.",
    )
    return p


def missing(args) -> bool:
    """True (after saying so) when the data or weights are not there."""
    if Path(args.data).is_dir() and Path(args.weights).is_file():
        return False
    print(f"skipped: need {args.data} and {args.weights}")
    return True


def run_cli(*args, cwd, stdout: bool = False):
    """Run `finetune-cli ARGS --plain` (this checkout) in a process of its
    own; (wall seconds, its peak RSS in MiB), and its standard output as a
    third item with `stdout`. Exits when it fails."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_cli", *map(str, args), "--plain"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
    )
    text = proc.stdout.read().decode() if stdout else None
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"finetune-cli {' '.join(map(str, args))} failed: exit {code}")
    wall, rss = time.monotonic() - t0, usage.ru_maxrss / 1024
    return (wall, rss, text) if stdout else (wall, rss)


def test_accuracy(run_dir) -> float:
    """A finished run's test accuracy (metrics.json)."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())["test"]["accuracy"]


def carve_holdout(data, share: float, seed: int, work) -> tuple[Path, Path]:
    """Split a folder of class folders into (pool, holdout) folders of
    links under `work`: `share` of every class, drawn with `seed` (the
    same data, share and seed give the same holdout in every script), is
    the holdout; the rest is the pool that recipes are chosen on."""
    import random

    pool, holdout = Path(work) / "pool", Path(work) / "holdout"
    for folder in (pool, holdout):
        if folder.exists():
            raise SystemExit(f"{folder} exists; give another --work folder")
    for cls in sorted(p for p in Path(data).iterdir() if p.is_dir()):
        files = sorted(p for p in cls.iterdir() if p.is_file())
        random.Random(f"holdout-{seed}:{cls.name}").shuffle(files)
        n = round(len(files) * share)
        for part, chosen in ((holdout, files[:n]), (pool, files[n:])):
            (part / cls.name).mkdir(parents=True)
            for f in chosen:
                (part / cls.name / f.name).symlink_to(f.resolve())
    return pool, holdout


def holdout_args(p: argparse.ArgumentParser) -> None:
    """--holdout DIR, or --holdout-share F (with --holdout-seed) to carve
    one out of --data (`carve_holdout`)."""
    p.add_argument(
        "--holdout",
        help="A folder of class folders never used in choosing: the recipes "
        "train on all of --data (train/val) and are scored on it.",
    )
    p.add_argument(
        "--holdout-share",
        type=float,
        help="Carve this share of every class of --data out as the holdout "
        "(the rest is the pool), instead of --holdout.",
    )
    p.add_argument("--holdout-seed", type=int, default=0)


def resolve_holdout(args, work) -> tuple[str, str | None]:
    """(the data to train or choose on, the holdout folder or None)."""
    if args.holdout and args.holdout_share:
        raise SystemExit("give --holdout or --holdout-share, not both")
    if args.holdout_share:
        pool, holdout = carve_holdout(
            args.data, args.holdout_share, args.holdout_seed, work
        )
        return str(pool), str(holdout)
    return args.data, args.holdout
