"""The `finetune` job: the lock, signals, workers and a truthful status.

`finetune(cfg)`:

1. checks everything that can be checked without training (the data and
   every image, class weights, the weights file, the model build and every
   phase's layer selection). Any problem is raised here, before a run
   folder exists.
2. creates the run folder in one rename, already holding the resolved
   config, labels.txt, environment.json, the recorded split (split.json)
   and a first run state, so a run that dies before its first epoch is
   resumable too.
3. runs the phases in order (`trainer.py`); after every epoch the run
   state is committed (`run/state.py`).
4. finalizes: `best.keras`, `base.weights.h5`, val and test metrics, the
   held-out report on the recorded test split, then marks the run
   completed and removes the state.

`finetune(cfg, resume=RUN)` loads RUN's last commit, checks the recorded
files, rewrites the files that are views of the state, and continues from
that commit: at most the unfinished epoch is redone.

This module owns what is around the training: the experiment's lock,
SIGTERM as Ctrl-C, the private folders of non-chief workers and the run's
status whatever happens (`run_guarded`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import tensorflow as tf

from finetune_cli.config import checks
from finetune_cli.console import Output
from finetune_cli.errors import ConfigError
from finetune_cli.errors import FinetuneError
from finetune_cli.errors import InterruptedRun
from finetune_cli.errors import TimeLimitReached
from finetune_cli.evaluate import plots
from finetune_cli.model.weights import check_weights
from finetune_cli.run.folder import STATUS_FILE
from finetune_cli.run.folder import RunDir
from finetune_cli.run.lock import LOCK_FILE
from finetune_cli.run.lock import Lock
from finetune_cli.run.lock import pid_alive
from finetune_cli.run.lock import run_lock
from finetune_cli.signals import sigterm_as_interrupt
from finetune_cli.files import storage_error
from finetune_cli import remote
from finetune_cli.runtime import distribute
from finetune_cli.train.budget import Budget
from finetune_cli.train.trainer import FinetuneResult
from finetune_cli.train.trainer import Trainer


def finetune(
    cfg,
    out: Optional[Output] = None,
    argv=None,
    resume=None,
    time_limit=None,
) -> FinetuneResult:
    """Fine-tune a model as a config declares; see the module docstring.

    Args:
        resume: an interrupted run folder to continue (its config is `cfg`).
        time_limit: this session's limit (`30m`, seconds); default the
            config's `experiment.time_limit`.

    Raises:
        ConfigError, DataError: before any training (nothing written).
        LockedError: another live run holds the experiment.
        InterruptedRun: on Ctrl-C or SIGTERM; the run can be resumed.
        TimeLimitReached: the time limit stopped it; it can be resumed.
    """
    budget = Budget(cfg.experiment.time_limit if time_limit is None else time_limit)
    out = out or Output()
    # A run folder on object storage is written in a local mirror and
    # uploaded after every commit (`finetune_cli/remote.py`).
    remote_out = (
        cfg.experiment.output_dir
        if remote.is_remote(cfg.experiment.output_dir)
        else None
    )
    if remote_out is not None:
        if resume is not None:
            resume, _ = remote.local_run(resume)
        cfg = cfg.model_copy(
            update={
                "experiment": cfg.experiment.model_copy(
                    update={"output_dir": str(remote.mirror_of(remote_out))}
                )
            }
        )
    exp = cfg.experiment
    if resume is None:
        checks.check(cfg)
    else:  # the data is the recorded split, checked when it is read
        checks.check_output_dir(exp.output_dir, "experiment.output_dir")
        checks.check_tracking(cfg)
        if cfg.model.weights not in ("imagenet", "none"):
            check_weights(remote.fetch(cfg.model.weights))
    if budget.limit is not None and cfg.runtime.distribute == "multi_worker":
        raise ConfigError(
            "experiment.time_limit: not with runtime.distribute: multi_worker "
            "(each worker would decide on its own clock and they could stop at "
            "different epochs); use the scheduler's limit, whose SIGTERM "
            f"stops every worker. Received: time limit {budget.shown}"
        )
    # Before any TensorFlow op: devices and the cluster are set up first.
    topo = distribute.setup(cfg.runtime)
    if not topo.chief:
        return _finetune_worker(cfg, out, argv, resume, topo)
    exp_dir = Path(exp.output_dir) / exp.name
    lock = Lock(exp_dir / LOCK_FILE, f"experiment {exp.name!r} in {exp.output_dir}")
    # A run that never starts leaves no folder behind, not even the lock's.
    made = [p for p in (Path(exp.output_dir), exp_dir) if not p.exists()]
    try:
        with lock, sigterm_as_interrupt():
            if lock.took_over:
                out.warn(
                    f"the previous run of {exp.name!r} (process "
                    f"{lock.took_over.get('pid')}) ended without "
                    "releasing its lock"
                )
            for p in exp_dir.iterdir():
                if (p / STATUS_FILE).is_file() and not p.is_symlink():
                    RunDir(p).settle()  # dead runs read as interrupted
            trainer = Trainer.prepare(
                cfg, out, argv, resume, topo, budget=budget, remote_out=remote_out
            )
            if remote_out is None:
                return run_guarded(trainer)
            return _synced(trainer, remote_out)
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()  # only when empty


def _finetune_worker(cfg, out, argv, resume, topo) -> FinetuneResult:
    """A non-chief worker: the same steps as the chief, every write in a
    temporary folder that is removed at the end. It takes no lock."""
    _remove_dead_workers_folders()
    prefix = f"finetune-worker-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        private = cfg.model_copy(
            update={
                "experiment": cfg.experiment.model_copy(
                    update={"output_dir": str(Path(tmp) / "runs")}
                ),
                "feature_cache": cfg.feature_cache.model_copy(
                    update={"dir": str(Path(tmp) / "features")}
                ),
            }
        )
        with sigterm_as_interrupt():
            trainer = Trainer.prepare(
                private,
                out,
                argv,
                resume,
                topo,
                config_dict=cfg.model_dump(mode="json"),
            )
            result = run_guarded(trainer)
    return dataclasses.replace(result, run_dir=None)


def _synced(trainer: Trainer, remote_out: str) -> FinetuneResult:
    """`run_guarded`, uploading the run folder after every commit and at
    the end, however it ends; a completed run becomes `latest`."""
    name = trainer.cfg.experiment.name
    where = remote.join(remote_out, name, trainer.run.path.name)
    trainer.sync = lambda: remote.push(trainer.run.path, where)
    trainer.sync()  # the new run's config, split and state, at once
    try:
        result = run_guarded(trainer)
        trainer.out.info(f"run folder uploaded: {where}")
        return dataclasses.replace(result, remote_dir=where)
    finally:
        remote.push(trainer.run.path, where)
        if trainer.run.status().get("state") == "completed":
            remote.write_pointer(
                remote.join(remote_out, name, "latest.txt"), trainer.run.path.name
            )


def _remove_dead_workers_folders() -> None:
    """Temporary folders of workers that were killed (their pid is gone)."""
    for p in Path(tempfile.gettempdir()).glob("finetune-worker-*-*"):
        pid = p.name.split("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def run_guarded(t: Trainer) -> FinetuneResult:
    """`t.run_all()`, with the run's status kept truthful whatever happens."""
    with run_lock(t.run.path):
        return _run_locked(t)


def _run_locked(t: Trainer) -> FinetuneResult:
    run = t.run
    if t.resumed:
        run.remove_temporaries()
    run.set_status("running", resumed=t.resumed)
    t.out.attach_log(run / "log.txt")
    ended = "FAILED"
    try:
        t.tracking.start(t)
        try:
            result = t.run_all()
            ended = "FINISHED"
            return result
        except tf.errors.UnimplementedError as e:
            raise _not_deterministic(t, e) from None
        except distribute.peer_errors() as e:
            if t.topo.kind != "multi_worker":
                raise
            raise InterruptedRun(_lost_worker(t, e)) from None
    except TimeLimitReached as e:
        ended = "KILLED"
        run.set_status("interrupted", reason=str(e), resumable=True)
        t.out.log_only(e.kind, str(e))
        _stopped_report(t)
        raise
    except InterruptedRun as e:
        ended = "KILLED"
        run.set_status("interrupted", reason=str(e), resumable=True)
        t.out.log_only(e.kind, str(e))
        raise
    except KeyboardInterrupt:
        ended = "KILLED"
        run.set_status(
            "interrupted",
            reason="stopped by a signal (Ctrl-C or SIGTERM)",
            resumable=True,
        )
        stopped = InterruptedRun(
            f"stopped by Ctrl-C or SIGTERM after epoch {t.state.epoch}; "
            f"resume with: finetune-cli finetune --resume {run.path}"
        )
        t.out.log_only(stopped.kind, str(stopped))
        raise stopped from None
    except FinetuneError as e:
        run.set_status("failed", reason=str(e), resumable=True)
        t.out.log_only(e.kind, str(e))
        raise
    except Exception as e:
        storage = storage_error(
            e,
            "once there is room, resume with: finetune-cli finetune --resume "
            f"{run.path}",
        )
        if storage is None:
            _try_status(run, "failed", f"{type(e).__name__}: {e}")
            t.out.log_only("failed", f"{type(e).__name__}: {e}")
            raise
        ended = "KILLED"
        # The state of the last epoch is intact (written atomically).
        _try_status(run, "interrupted", str(storage))
        t.out.log_only(storage.kind, str(storage))
        raise storage from None
    finally:
        t.tracking.close(ended)
        t.out.close()


def _try_status(run, state: str, reason: str) -> None:
    """Record how the run ended, if the disk lets us: on a full disk the
    old status stays (written atomically), and reads as interrupted once
    this process is gone."""
    with contextlib.suppress(OSError):
        run.set_status(state, reason=reason, resumable=True)


def _not_deterministic(t: Trainer, e) -> Exception:
    """What op determinism raises for an op without a deterministic
    kernel (mostly GPU ones), said in config terms."""
    if not t.runtime["deterministic"]:
        return e
    first = (e.message or "").strip().splitlines() or ["?"]
    return ConfigError(
        "experiment.deterministic: true, but an op of this model has no "
        f"deterministic implementation on this device ({first[0][:200]}); "
        "set experiment.deterministic: false, or run on CPU. "
        "Received: experiment.deterministic=true"
    )


def _lost_worker(t: Trainer, e) -> str:
    where = (
        f"--resume {t.run.path}"
        if t.topo.chief
        else "--resume with the chief's run folder"
    )
    return (
        f"{t.topo.task}: the cluster lost a worker "
        f"({distribute.lost_worker(e, t.topo.task)}); the run stopped "
        "after epoch "
        f"{t.state.epoch}. Start every worker again with "
        f"finetune-cli finetune {where}"
    )


def _stopped_report(t: Trainer) -> None:
    """What a run stopped by its time limit has: the curves, and the
    best model so far on the recorded test split (`eval/partial/`)."""
    from finetune_cli.evaluate import evaluation

    run = t.run
    if not t.topo.chief or not (run / "history.csv").is_file():
        return
    plots.curves_png(run / "history.csv", run / "curves.png")
    if t.index.splits.get("test") and (run / "best.keras").is_file():
        ev = evaluation.evaluate(run.path, split="test", name="partial", track=False)
        accuracy = ev.metrics["summary"]["accuracy"]
        t.out.info(
            f"partial report (best epoch so far, test accuracy "
            f"{accuracy:.4f}): {ev.out_dir / 'report.html'}"
        )
