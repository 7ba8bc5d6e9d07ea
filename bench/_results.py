"""Benchmark results as data: each script prints its table and appends it,
with the machine and the command, to `bench/results/<script>.jsonl`.

`python bench/report.py` writes `docs/benchmarks.md` from those files, so
the figures in the docs are what the scripts measured, not prose.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the figures depend on: CPU model, cores, memory, GPU (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
    }


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=RESULTS.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def report(
    bench: str,
    title: str,
    columns: list[str],
    rows: list[list],
    *,
    note: str = "",
    record: bool = True,
) -> None:
    """Print `rows` as a markdown table and append them to the results.

    Args:
        bench: the script's name (`recipe` for bench/recipe.py).
        title: what was measured, in one line.
        note: what the reader needs to read the figures (optional).
        record: false for a dry or partial run that should not be kept.
    """
    print()
    print("| " + " | ".join(columns) + " |")
    print("| --- " * len(columns) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    if not record:
        return
    entry = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "commit": _commit(),
        "command": "python "
        + " ".join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "title": title,
        "columns": columns,
        "rows": [[str(c) for c in row] for row in rows],
        "note": note,
    }
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"{bench}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    print(f"(appended to bench/results/{bench}.jsonl; docs: python bench/report.py)")
