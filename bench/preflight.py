"""Benchmark: the pre-flight check of every image, cold and on a rerun.

Three passes over the same folder, in one process:

- serial (the baseline: what pre-flight did before, decode and hash each
  file in turn);
- parallel, cold (no verdict cache yet: every file decoded, in threads);
- parallel, rerun (the verdict cache from the cold pass: files are hashed,
  none decoded).

    python bench/preflight.py                   # the flower photos
    python bench/preflight.py --data DIR

Prints seconds per pass and the ratios against the serial baseline.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from _assets import missing
from _assets import parser
import _results


def main(argv=None) -> int:
    p = parser(__doc__)
    args = p.parse_args(argv)
    if missing(args):
        return 0
    from finetune_cli import config as config_lib
    from finetune_cli.data import index as data_lib
    from finetune_cli.data import preflight as preflight_lib

    cfg = config_lib.Data(dir=args.data)
    index = data_lib.index_data(cfg, 42)
    files = [path for samples in index.splits.values() for path, _ in samples]
    cache = Path(tempfile.mkdtemp(prefix="bench-preflight-")) / "preflight.json"

    t0 = time.perf_counter()
    for path in files:
        if preflight_lib.check_image(path) is None:
            preflight_lib.sha256_file(path)
    serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    cold, save = preflight_lib.image_verdicts(files, cache)
    save()
    parallel = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm, _ = preflight_lib.image_verdicts(files, cache)
    rerun = time.perf_counter() - t0
    assert warm == cold
    _results.report(
        "preflight",
        f"The pre-flight check of {len(files)} images",
        ["run", "seconds", "vs serial"],
        [
            [name, f"{seconds:.1f}", f"{serial / seconds:.1f}x"]
            for name, seconds in (
                ("serial, decode every file (baseline)", serial),
                ("parallel, cold cache", parallel),
                ("parallel, rerun (verdicts cached)", rerun),
            )
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
