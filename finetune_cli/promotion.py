"""Promotion for cron retraining: replace the served model only if better.

`DIR` (the promoted model) is a symbolic link to a complete version folder
under `DIR.versions/`, and `DIR.previous` links to the one before. A
promotion copies the new model into a fresh version folder, then swaps the
link with one atomic rename, so a reader of `DIR` always sees a complete
model: the old one or the new one. Each version folder holds `model.keras`,
`labels.txt`, `config.yaml`, `metrics.json` and `promotion.json`.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Optional

from finetune_cli import evaluation
from finetune_cli.errors import ConfigError
from finetune_cli.errors import GateError
from finetune_cli.rundir import now
from finetune_cli.rundir import write_json


def current(promote_to) -> Optional[Path]:
    """The promoted version folder, or None when nothing is promoted yet."""
    link = Path(promote_to)
    if not link.exists() and not link.is_symlink():
        return None
    if not link.is_symlink():
        raise ConfigError(f"--promote-to {link}: exists and is not a link made by "
                          "finetune-cli; choose another path")
    return link.resolve()


def decide(run_dir, promote_to, *, fail_under=None, compare=True,
           tolerance=0.005, metric="accuracy") -> tuple[bool, list[str], dict]:
    """Evaluate the run on its held-out split and apply the gates.

    Returns (promote?, reasons it was refused, evaluation record).
    """
    run_dir = Path(run_dir)
    has_test = (run_dir / "eval" / "test" / "metrics.json").is_file()
    split = "test" if has_test else "val"
    ev = evaluation.evaluate(run_dir, split=split, name=f"promotion-{split}")
    reasons = evaluation.check_gates(ev.metrics["summary"], fail_under or {}, {})
    record = {"split": split, "metrics": ev.metrics["summary"],
              "fail_under": fail_under or {}}
    promoted = current(promote_to)
    if compare and promoted is not None:
        old = evaluation.resolve_target(promoted / "model.keras")
        if old.labels != ev.metrics["classes"]:
            reasons.append(f"classes changed: promoted {old.labels}, new "
                           f"{ev.metrics['classes']}")
        else:
            probs = evaluation.predict_files(evaluation.load_model(old), ev.files)
            old_metrics = evaluation.compute_metrics(ev.labels, probs, old.labels)
            record["promoted"] = {"path": str(promoted),
                                  "metrics": old_metrics["summary"]}
            worse = evaluation.compare(ev.metrics, old_metrics, metric, tolerance)
            if worse:
                reasons.append(f"not better than the promoted model: {worse}")
    return not reasons, reasons, record


def promote(run_dir, promote_to, record: dict) -> Path:
    """Copy the run's model into a new version and swap the link atomically."""
    run_dir, link = Path(run_dir), Path(promote_to)
    versions = link.parent / f"{link.name}.versions"
    versions.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{run_dir.parent.name}-{run_dir.name}"
    final = versions / name
    partial = versions / f".{name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        shutil.copy2(run_dir / "best.keras", partial / "model.keras")
        for f in ("labels.txt", "config.yaml", "metrics.json"):
            shutil.copy2(run_dir / f, partial / f)
        write_json(partial / "promotion.json", {
            "run": str(run_dir.resolve()), "promoted_at": now(), **record})
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = current(link)
    _swap_link(link, final)
    if old is not None:
        _swap_link(link.parent / f"{link.name}.previous", old)
    return final


def _swap_link(link: Path, target: Path) -> None:
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    os.replace(tmp, link)


def run_promotion(run_dir, promote_to, out, *, fail_under=None, compare=True,
                  tolerance=0.005) -> Path:
    """Decide, then promote or raise GateError (exit 4) saying why."""
    ok, reasons, record = decide(run_dir, promote_to, fail_under=fail_under,
                                 compare=compare, tolerance=tolerance)
    record.update(promoted=ok, reasons=reasons)
    write_json(Path(run_dir) / "promotion.json", record)
    if not ok:
        where = current(promote_to)
        keep = f"{promote_to} stays at {where.name}" if where else "nothing promoted"
        raise GateError(f"not promoted ({keep}): " + "; ".join(reasons))
    final = promote(run_dir, promote_to, record)
    out.success(f"promoted {run_dir} -> {promote_to} ({final.name})")
    return final
