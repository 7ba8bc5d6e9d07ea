"""Promotion for cron retraining: replace the served model only if better.

`DIR` (the promoted model) is a symbolic link to a complete version folder
under `DIR.versions/`, and `DIR.previous` links to the one before. On
object storage (`gs://.../DIR`), which has no links, the promotion is made
in a local mirror and uploaded: `DIR.versions/` first, then the text
pointers `DIR.previous.txt` and `DIR.txt` (the version's path relative to
the folder), `DIR.txt` last: replacing that one object is the switch. Each
version folder holds `model.keras`, `labels.txt`, `config.yaml`,
`metrics.json`, `split.json` and `promotion.json`.

A promotion, all of it under a lock on the target (`.DIR.lock` beside it,
so two promoters are serialised and the second one compares against the
first one's result):

1. finishes or undoes a promotion that died halfway (see `recover`);
2. evaluates the new run on its recorded held-out split and applies the
   gates; the promoted model is run on the same files, less any file it
   trained or validated on, and the new one must not be worse;
3. copies the model into a hidden `.NAME.partial` folder, writes a journal
   (`.DIR.pending.json`) and renames the folder into place;
4. swaps the link with one atomic rename (a reader of `DIR` sees the old
   complete model or the new one), then `DIR.previous`, then the run's
   `promotion.json`, and removes the journal.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from finetune_cli import faults
from finetune_cli import remote
from finetune_cli.data import split as split_lib
from finetune_cli.errors import ConfigError
from finetune_cli.errors import GateError
from finetune_cli.run.lock import Lock
from finetune_cli.run.lock import run_lock
from finetune_cli.files import now
from finetune_cli.files import write_json

RECORD = "promotion.json"
# thresholds.json: a multi-label model is scored at its own thresholds.
VERSION_FILES = (
    "labels.txt",
    "config.yaml",
    "metrics.json",
    split_lib.FILE,
    "thresholds.json",
)


def _versions(link: Path) -> Path:
    return link.parent / f"{link.name}.versions"


def _journal(link: Path) -> Path:
    return link.parent / f".{link.name}.pending.json"


def check_target(promote_to) -> None:
    """Refuse, before any training, a --promote-to path we cannot use.

    Raises:
        ConfigError: the path (or a parent) is a file, or the path exists
            and is not a promotion link of ours.
        StorageError: its folder is on a read-only disk or not writable.
    """
    if remote.is_remote(promote_to):  # checked on its local mirror
        promote_to = mirror_link(promote_to)
    link = Path(promote_to)
    for parent in reversed(link.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(
                f"--promote-to {link}: {parent} is a file, not "
                "a folder; choose a path in a folder"
            )
    if link.is_symlink() or link.exists():
        if not link.is_symlink():
            raise ConfigError(
                f"--promote-to {link}: exists and is not a link "
                "made by finetune-cli; choose another path"
            )
        target = link.resolve()
        if not (target / "model.keras").is_file():
            raise ConfigError(
                f"--promote-to {link}: links to {target}, which "
                "holds no model.keras; it was not made by "
                "finetune-cli, choose another path"
            )
    from finetune_cli.config.checks import check_writable

    check_writable(link.parent, "--promote-to")  # read-only disks too: exit 9


def current(promote_to) -> Optional[Path]:
    """The promoted version folder, or None when nothing is promoted yet."""
    link = Path(promote_to)
    if not link.exists() and not link.is_symlink():
        return None
    if not link.is_symlink():
        raise ConfigError(
            f"--promote-to {link}: exists and is not a link made "
            "by finetune-cli; choose another path"
        )
    return link.resolve()


def recover(link: Path, out=None) -> None:
    """Clean up after a promotion that died (call with the lock held).

    Half-copied version folders are removed. A journal whose version the
    link already points at is finished (previous link, run record); a
    journal whose version never got the link is undone (the folder is
    removed: it was never served).
    """
    versions = _versions(link)
    if versions.is_dir():
        for p in versions.glob(".*.partial"):
            shutil.rmtree(p, ignore_errors=True)
    journal_path = _journal(link)
    if not journal_path.is_file():
        return
    try:
        journal = json.loads(journal_path.read_text())
    except (OSError, ValueError):
        journal_path.unlink()
        return
    served = current(link)
    if served is not None and served.name == journal["version"]:
        _finish(link, journal)
        what = f"finished the promotion of {journal['version']}"
    else:
        shutil.rmtree(versions / journal["version"], ignore_errors=True)
        journal_path.unlink()
        what = f"removed {journal['version']}, never promoted"
    if out is not None:
        out.warn(f"an earlier promotion to {link} was interrupted: {what}")


def decide(
    run_dir,
    promote_to,
    *,
    fail_under=None,
    compare=True,
    tolerance=0.005,
    metric="accuracy",
) -> tuple[bool, list[str], dict]:
    """Evaluate the run on its held-out split and apply the gates.

    Returns (promote?, reasons it was refused, evaluation record).
    """
    run_dir = Path(run_dir)
    rec = split_lib.read(run_dir)
    has_test = (
        rec is not None
        and bool(rec["files"].get("test"))
        or (rec is None and (run_dir / "eval" / "test" / "metrics.json").is_file())
    )
    split = "test" if has_test else "val"
    # Imported here: `check_target` runs before training starts and
    # answers without loading TensorFlow.
    from finetune_cli.evaluate import evaluation
    from finetune_cli.evaluate import gates

    ev = evaluation.evaluate(run_dir, split=split, name=f"promotion-{split}")
    reasons = gates.check_gates(ev.metrics["summary"], fail_under or {}, {})
    record = {
        "split": split,
        "metrics": ev.metrics["summary"],
        "images": len(ev.files),
        "fail_under": fail_under or {},
    }
    promoted = current(promote_to)
    if compare and promoted is not None:
        reasons += _compare_with(promoted, ev, metric, tolerance, record)
    return not reasons, reasons, record


def _compare_with(promoted, ev, metric, tolerance, record) -> list[str]:
    from finetune_cli.evaluate import gates
    from finetune_cli.model import saved as runmodel

    old = runmodel.resolve_target(promoted / "model.keras")
    if old.labels != ev.metrics["classes"]:
        return [f"classes changed: promoted {old.labels}, new {ev.metrics['classes']}"]
    message, record["champion"] = gates.compare_unseen(ev, old, metric, tolerance)
    record["champion"]["path"] = str(promoted)
    if record["champion"]["images"] == 0:
        return [message]
    return [f"not better than the promoted model: {message}"] if message else []


def promote(run_dir, promote_to, record: dict) -> Path:
    """Copy the run's model into a new version and swap the link atomically
    (call with the lock held)."""
    run_dir, link = Path(run_dir), Path(promote_to)
    versions = _versions(link)
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
        faults.point("promotion_copy")
        for f in VERSION_FILES:
            if (run_dir / f).is_file():
                shutil.copy2(run_dir / f, partial / f)
        write_json(
            partial / RECORD,
            {"run": str(run_dir.resolve()), "promoted_at": now(), **record},
        )
        old = current(link)
        journal = {
            "version": name,
            "previous": old.name if old else None,
            "run": str(run_dir.resolve()),
            "record": {**record, "version": str(final)},
        }
        write_json(_journal(link), journal)
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    faults.point("promotion_renamed")
    _swap_link(link, final)
    faults.point("promotion_swapped")
    _finish(link, journal)
    return final


def _finish(link: Path, journal: dict) -> None:
    """After the link switched: the previous link, the run's record, and
    the journal's removal (each step safe to redo)."""
    if journal.get("previous"):
        _swap_link(
            link.parent / f"{link.name}.previous", _versions(link) / journal["previous"]
        )
    run = Path(journal["run"])
    if run.is_dir():
        write_json(run / RECORD, journal["record"])
    _journal(link).unlink(missing_ok=True)


def _swap_link(link: Path, target: Path) -> None:
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    os.replace(tmp, link)


def run_promotion(
    run_dir,
    promote_to,
    out,
    *,
    fail_under=None,
    compare=True,
    tolerance=0.005,
    wait: float = 3600.0,
    run_remote: Optional[str] = None,
) -> Path:
    """Decide, then promote or raise GateError (exit 4) saying why.

    Waits up to `wait` seconds for another promotion to the same target.
    A target on object storage is promoted in its local mirror
    (`mirror_link`), then uploaded (`push_link`); `run_remote`: the run
    folder `run_dir` mirrors, where its `promotion.json` is uploaded.
    """
    if run_remote is not None:
        try:
            return run_promotion(
                run_dir,
                promote_to,
                out,
                fail_under=fail_under,
                compare=compare,
                tolerance=tolerance,
                wait=wait,
            )
        finally:
            remote.push(run_dir, run_remote)
    if remote.is_remote(promote_to):
        final = run_promotion(
            run_dir,
            mirror_link(promote_to),
            out,
            fail_under=fail_under,
            compare=compare,
            tolerance=tolerance,
            wait=wait,
        )
        push_link(mirror_link(promote_to, pull=False), promote_to)
        return final
    link = Path(promote_to)
    check_target(link)
    lock = Lock(
        link.parent / f".{link.name}.lock",
        f"promotion target {link}",
        wait=wait,
        on_wait=lambda holder: out.info(
            f"waiting for the promotion lock on {link} (held by "
            f"process {holder.get('pid')})"
        ),
    )
    # The run's own lock first (its evaluation writes into it; a
    # finetune still writing it is waited for), then the target's.
    run = run_lock(
        run_dir,
        wait=wait,
        on_wait=lambda holder: out.info(
            f"waiting for {run_dir} (in use by process {holder.get('pid')})"
        ),
    )
    with run, lock:
        faults.point("promotion_locked")
        recover(link, out)
        ok, reasons, record = decide(
            run_dir, link, fail_under=fail_under, compare=compare, tolerance=tolerance
        )
        record.update(promoted=ok, reasons=reasons)
        if not ok:
            write_json(Path(run_dir) / RECORD, record)
            where = current(link)
            keep = f"{link} stays at {where.name}" if where else "nothing promoted"
            raise GateError(f"not promoted ({keep}): " + "; ".join(reasons))
        final = promote(run_dir, link, record)
    out.success(f"promoted {run_dir} -> {link} ({final.name})")
    return final


def mirror_link(remote_link, *, pull: bool = True) -> Path:
    """The local mirror of a promotion target on object storage:
    `<name>.versions/` pulled, and `<name>` and `<name>.previous` links
    made from the pointers `<name>.txt` and `<name>.previous.txt`."""
    remote_link = str(remote_link).rstrip("/")
    parent, name = remote_link.rsplit("/", 1)
    local = remote.mirror_of(parent) / name
    if not pull:
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    import tensorflow as tf

    versions = remote.join(parent, f"{name}.versions")
    if tf.io.gfile.isdir(versions):
        remote.pull(versions, local.parent / f"{name}.versions")
    for link_name in (name, f"{name}.previous"):
        pointer = remote.join(parent, f"{link_name}.txt")
        if tf.io.gfile.exists(pointer):
            with tf.io.gfile.GFile(pointer) as f:
                target = f.read().strip()
            _swap_link(local.parent / link_name, local.parent / target)
    return local


def push_link(local: Path, remote_link) -> None:
    """Upload a mirrored promotion: the version folders, then the pointers
    (`<name>.txt` last: one object, replaced whole, is the switch a reader
    of object storage sees)."""
    remote_link = str(remote_link).rstrip("/")
    parent = remote_link.rsplit("/", 1)[0]
    remote.push(local.parent / f"{local.name}.versions", f"{remote_link}.versions")
    for link_name in (f"{local.name}.previous", local.name):
        path = local.parent / link_name
        if path.is_symlink():
            remote.write_pointer(
                remote.join(parent, f"{link_name}.txt"), os.readlink(path)
            )
