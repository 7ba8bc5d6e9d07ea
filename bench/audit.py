"""Benchmark: `finetune-cli audit` on the shared flower photos.

The audit of the whole folder (MobileNetV2 with the shared ImageNet
weights, 224 px, 5-fold probe) in a process of its own: cold (an empty
feature cache: every image decoded and run through the base) and warm
(the cache of the cold run reused). Prints both wall times, the counts of
each kind of finding and the first few of each, and records them.

    python bench/audit.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _assets
import _results  # noqa: E402


def main(argv=None) -> int:
    p = _assets.parser(__doc__)
    args = p.parse_args(argv)
    if _assets.missing(args):
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    cmd = ["audit", args.data, "--weights", args.weights, "--json", "--force"]
    runs = {}
    for label in ("cold", "warm"):
        runs[label] = _assets.run_cli(
            *cmd, "--out", work / label, cwd=work, stdout=True
        )
        print(f"{label}: {runs[label][0]:.0f} s", flush=True)
    report = json.loads(runs["cold"][2])
    findings = report["findings"]
    rows = []
    for kind, n in report["counts"].items():
        first = [
            f"{Path(f['file']).parent.name}/{Path(f['file']).name}"
            + (f" -> {f['other']}" if kind == "label_error" else "")
            for f in findings
            if f["kind"] == kind
        ][:3]
        rows.append([kind, n, "; ".join(first)])
    cold, warm = runs["cold"][0], runs["warm"][0]
    rows.append(["wall time", "", f"cold {cold:.0f} s, warm {warm:.0f} s"])
    rows.append(["peak memory", "", f"{runs['cold'][1]:.0f} MiB"])
    _results.report(
        "audit",
        f"finetune-cli audit of the flower photos ({report['images']} images), "
        "MobileNetV2 ImageNet features, 5-fold probe",
        ["finding", "count", "first of them"],
        rows,
        note="Cold: no feature cache (decode and base for every image); warm: "
        "the cache reused. Times include the process start and the pre-flight.",
    )
    print(f"(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
