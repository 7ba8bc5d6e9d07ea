"""Benchmark results are data: a script's table is appended to
bench/results/<script>.jsonl, and docs/benchmarks.md is generated from
those files (never edited by hand)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import _results  # noqa: E402
import report  # noqa: E402


def test_a_report_prints_the_table_and_appends_it_with_the_machine(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(_results, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench/recipe.py", "--split-seed", "5"])
    _results.report("recipe", "a title", ["recipe", "wall"], [["shipped", "160 s"]])
    _results.report("recipe", "again", ["recipe", "wall"], [["x", 1]], record=False)
    assert "| shipped | 160 s |" in capsys.readouterr().out
    (line,) = (tmp_path / "recipe.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert entry["rows"] == [["shipped", "160 s"]]
    assert entry["command"] == "python bench/recipe.py --split-seed 5"
    assert entry["machine"]["cores"] >= 1 and entry["date"][:2] == "20"


def test_the_page_is_rendered_from_the_results_newest_first(tmp_path, monkeypatch):
    for date, acc in (("2026-01-01", "0.80"), ("2026-02-01", "0.90")):
        entry = {
            "date": date,
            "commit": "abc",
            "command": "python bench/x.py",
            "machine": {"cpu": "cpu", "cores": 2},
            "title": f"run of {date}",
            "columns": ["what", "acc"],
            "rows": [["shipped", acc]],
        }
        with open(tmp_path / "x.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = report.render()
    assert text.index("run of 2026-02-01") < text.index("run of 2026-01-01")
    assert "| shipped | 0.90 |" in text
    assert "Reproduce: `python bench/x.py`" in text


def test_docs_benchmarks_is_what_the_results_give():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_benchmark_records_its_results():
    scripts = [p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_")]
    scripts = [p for p in scripts if p.name != "report.py"]
    assert len(scripts) >= 14
    for p in scripts:
        assert "_results.report(" in p.read_text(), p.name


def test_a_carved_holdout_is_disjoint_stratified_and_the_same_every_time(tmp_path):
    import _assets

    data = tmp_path / "data"
    for cls, n in (("a", 10), ("b", 20)):
        (data / cls).mkdir(parents=True)
        for i in range(n):
            (data / cls / f"{i}.jpg").write_bytes(b"x")

    def carve(work, seed=0):
        pool, held = _assets.carve_holdout(data, 0.2, seed, tmp_path / work)
        return {
            part.name: {str(p.relative_to(part)) for p in part.rglob("*.jpg")}
            for part in (pool, held)
        }

    first = carve("w1")
    assert not first["pool"] & first["holdout"]
    assert first["pool"] | first["holdout"] == {
        str(p.relative_to(data)) for p in data.rglob("*.jpg")
    }
    held = sorted(p.split("/")[0] for p in first["holdout"])
    assert held == ["a"] * 2 + ["b"] * 4  # 20% of every class
    assert carve("w2") == first  # the same draw in every script
    assert carve("w3", seed=1)["holdout"] != first["holdout"]
