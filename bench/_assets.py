"""Shared options of the benchmarks: where ../shared/assets are."""

from __future__ import annotations

import argparse
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"


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
