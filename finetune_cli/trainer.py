"""The trainer: runs a config's phases as a sequence of run-state commits.

`finetune(cfg)`:

1. checks everything that can be checked without training (the data and
   every image, class weights, the weights file, the model build and every
   phase's layer selection). Any problem is raised here, before a run
   folder exists.
2. creates the run folder in one rename, already holding the resolved
   config, labels.txt, environment.json, the recorded split (split.json)
   and a first run state, so a run that dies before its first epoch is
   resumable too.
3. runs the phases in order. Each phase sets what trains, recompiles with
   its own optimizer, schedule, loss and callbacks, and continues the
   epoch count. After every epoch the run state is committed (see
   `runstate.py`); at the end of a phase its best weights (by
   `experiment.monitor`) are restored, carried into the next phase, and
   committed again.
4. finalizes: `best.keras` (best epoch of the run), `base.weights.h5`,
   val and test metrics, the held-out report on the recorded test split,
   then marks the run completed and removes the state.

`finetune(cfg, resume=RUN)` loads RUN's last commit, checks the recorded
files, rewrites the files that are views of the state, and continues from
that commit: at most the unfinished epoch is redone.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Optional

import keras
import tensorflow as tf

from finetune_cli import __version__
from finetune_cli import activations
from finetune_cli import checks
from finetune_cli import config as config_lib
from finetune_cli import data as data_lib
from finetune_cli import pipeline
from finetune_cli import distribute
from finetune_cli import environment
from finetune_cli import faults
from finetune_cli import feature_training
from finetune_cli import model as model_lib
from finetune_cli import phases as phases_lib
from finetune_cli import plots
from finetune_cli import runstate
from finetune_cli import split as split_lib
from finetune_cli import tracking
from finetune_cli.console import Output
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.errors import FinetuneError
from finetune_cli.errors import InterruptedRun
from finetune_cli.rundir import LOCK_FILE
from finetune_cli.rundir import STATUS_FILE
from finetune_cli.rundir import Lock
from finetune_cli.rundir import RunDir
from finetune_cli.rundir import atomic_path
from finetune_cli.rundir import atomic_write
from finetune_cli.rundir import pid_alive


@dataclasses.dataclass
class FinetuneResult:
    run_dir: Path
    metrics: dict
    history: list[dict]


def finetune(
    cfg, out: Optional[Output] = None, argv=None, resume: Optional[Path] = None
) -> FinetuneResult:
    """Fine-tune a model as a config declares; see the module docstring.

    Args:
        resume: an interrupted run folder to continue (its config is `cfg`).

    Raises:
        ConfigError, DataError: before any training (nothing written).
        LockedError: another live run holds the experiment.
        InterruptedRun: on Ctrl-C or SIGTERM; the run can be resumed.
    """
    out = out or Output()
    exp = cfg.experiment
    if resume is None:
        checks.check(cfg)
    else:  # the data is the recorded split, checked when it is read
        checks.check_output_dir(exp.output_dir, "experiment.output_dir")
        checks.check_tracking(cfg)
        if cfg.model.weights not in ("imagenet", "none"):
            checks.check_weights(cfg.model.weights)
    # Before any TensorFlow op: devices and the cluster are set up first.
    topo = distribute.setup(cfg.runtime)
    if not topo.chief:
        return _finetune_worker(cfg, out, argv, resume, topo)
    exp_dir = Path(exp.output_dir) / exp.name
    lock = Lock(exp_dir / LOCK_FILE, f"experiment {exp.name!r} in {exp.output_dir}")
    # A run that never starts leaves no folder behind, not even the lock's.
    made = [p for p in (Path(exp.output_dir), exp_dir) if not p.exists()]
    try:
        with lock, _sigterm_as_interrupt():
            if lock.took_over:
                out.warn(
                    f"the previous run of {exp.name!r} (process "
                    f"{lock.took_over.get('pid')}) ended without "
                    "releasing its lock"
                )
            for p in exp_dir.iterdir():
                if (p / STATUS_FILE).is_file() and not p.is_symlink():
                    RunDir(p).settle()  # dead runs read as interrupted
            trainer = Trainer.prepare(cfg, out, argv, resume, topo)
            return trainer.run_guarded()
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
        with _sigterm_as_interrupt():
            trainer = Trainer.prepare(
                private,
                out,
                argv,
                resume,
                topo,
                config_dict=cfg.model_dump(mode="json"),
            )
            result = trainer.run_guarded()
    return dataclasses.replace(result, run_dir=None)


def _remove_dead_workers_folders() -> None:
    """Temporary folders of workers that were killed (their pid is gone)."""
    for p in Path(tempfile.gettempdir()).glob("finetune-worker-*-*"):
        pid = p.name.split("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (cron timeouts, schedulers) stops the run like Ctrl-C."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    """Owns the model, the phases, the run state and every write into the
    run folder. Build it with `Trainer.prepare`."""

    def __init__(
        self,
        cfg,
        out,
        index,
        model,
        base,
        plans,
        class_weights,
        runtime,
        env,
        state,
        resumed: bool,
        topo: distribute.Topology,
    ):
        self.cfg = cfg
        self.out = out
        self.index = index
        self.model = model
        self.base = base
        self.plans = plans
        self.class_weights = class_weights
        self.runtime = runtime
        self.env = env
        self.state = state
        self.resumed = resumed
        self.run: Optional[RunDir] = None
        self.topo = topo
        self.num_classes = len(index.class_names)
        self.steps = topo.steps_per_epoch(
            len(index.splits["train"]), cfg.data.batch_size
        )
        self.config_dict = cfg.model_dump(mode="json")
        self.versions = {
            "finetune_cli": __version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
        }
        self._augmenter = pipeline.build_augmenter(
            cfg.augmentation, cfg.experiment.seed
        )
        self._cached: dict = {}  # CachedData or ActivationData, by path
        self._val_ds = None
        self.tracker: Optional[tracking.Tracker] = None

    # -- construction -----------------------------------------------------

    @classmethod
    def prepare(
        cls, cfg, out, argv=None, resume=None, topo=None, config_dict=None
    ) -> "Trainer":
        """Check everything, build the model; create the run folder (a new
        run) or load its state (a resume).

        Args:
            topo: the strategy (`distribute.setup`); none by default.
            config_dict: the config a resumed state must match, when `cfg`
                is a worker's private copy of it.
        """
        topo = topo or distribute.Topology("none", tf.distribute.get_strategy())
        exp = cfg.experiment
        if resume is not None:
            run = RunDir(resume)
            if run.status().get("state") == "completed":
                raise ConfigError(f"--resume {resume}: the run is already completed")
            index = split_lib.load(run.path)
            if index is None:
                raise ConfigError(
                    f"--resume {resume}: the run has no recorded file list "
                    "(it was started by an older finetune-cli); start a new "
                    "run"
                )
            skipped, save_verdicts = [], None
        else:
            run = None
            index = data_lib.index_data(cfg.data, exp.seed)
            index, skipped, save_verdicts = checks.scan_images(index, cfg, out)
        class_weights = [
            phases_lib.resolve_class_weight(p, i, index)
            for i, p in enumerate(cfg.phases)
        ]
        if len(index.class_names) < 2:
            raise DataError(
                f"{index.source}: need at least 2 classes. "
                f"Received: {index.class_names}"
            )
        env = environment.describe(argv)
        gpu = any(d["type"] == "GPU" for d in env["devices"])
        runtime = environment.configure_runtime(cfg, gpu)
        env["runtime"] = {**runtime, **topo.describe()}
        _check_batch(cfg, topo, len(index.splits["train"]))
        with topo.strategy.scope():
            model, base = model_lib.build_model(cfg, len(index.class_names))
        distribute.adopt(model, topo)
        plans = phases_lib.plan_phases(model, base, cfg, topo.distributed)
        trainer = cls(
            cfg,
            out,
            index,
            model,
            base,
            plans,
            class_weights,
            runtime,
            env,
            runstate.RunState(),
            resume is not None,
            topo,
        )
        if config_dict is not None:
            trainer.config_dict = config_dict
        if run is not None:
            trainer.run = run
            trainer.state = runstate.load(
                run / runstate.FILE,
                config=trainer.config_dict,
                versions=trainer.versions,
            )
        else:
            trainer.state.model = runstate.values(model.variables)
        # A worker writes into its private folder, even when it resumes
        # from the chief's state.
        if run is None or not topo.chief:
            trainer.run = RunDir.create(
                exp.output_dir,
                exp.name,
                prepare=lambda r: trainer._write_new_run(r, skipped),
            )
            if topo.chief:
                faults.point("run_created")
        if save_verdicts is not None and topo.chief:
            save_verdicts()  # the run exists: every check before it passed
        return trainer

    def _write_new_run(self, run: RunDir, skipped) -> None:
        run.write_text("config.yaml", config_lib.to_yaml(self.cfg))
        run.write_text("labels.txt", "\n".join(self.index.class_names) + "\n")
        run.write_json("environment.json", self.env)
        run.write_json(split_lib.FILE, split_lib.record(self.index, skipped))
        if skipped:
            run.write_text(
                "skipped_images.txt", "".join(f"{p}\t{why}\n" for p, why in skipped)
            )
        self.state.save(
            run / runstate.FILE, config=self.config_dict, versions=self.versions
        )
        run.set_status("running", resumed=False)

    # -- the run ----------------------------------------------------------

    def run_guarded(self) -> FinetuneResult:
        """`run`, with the status kept truthful whatever happens."""
        run = self.run
        if self.resumed:
            run.remove_temporaries()
        run.set_status("running", resumed=self.resumed)
        self.out.attach_log(run / "log.txt")
        ended = "FAILED"
        try:
            self._start_tracking()
            try:
                result = self.run_all()
                ended = "FINISHED"
                return result
            except tf.errors.UnimplementedError as e:
                raise self._not_deterministic(e) from None
            except distribute.peer_errors() as e:
                if self.topo.kind != "multi_worker":
                    raise
                raise InterruptedRun(self._lost_worker(e)) from None
        except InterruptedRun as e:
            ended = "KILLED"
            run.set_status("interrupted", reason=str(e), resumable=True)
            raise
        except KeyboardInterrupt:
            ended = "KILLED"
            run.set_status(
                "interrupted",
                reason="stopped by a signal (Ctrl-C or SIGTERM)",
                resumable=True,
            )
            raise InterruptedRun(
                f"stopped by Ctrl-C or SIGTERM after epoch {self.state.epoch}; "
                f"resume with: finetune-cli finetune --resume {run.path}"
            ) from None
        except FinetuneError as e:
            run.set_status("failed", reason=str(e), resumable=True)
            raise
        except Exception as e:
            run.set_status("failed", reason=f"{type(e).__name__}: {e}", resumable=True)
            raise
        finally:
            if self.tracker is not None:
                self.tracker.finish(ended)
            self.out.close()

    def _start_tracking(self) -> None:
        """Open the run's MLflow run (chief only), and send what the run
        has done that MLflow has not seen (after a resume)."""
        if not self.topo.chief:
            return
        run = self.run
        if self.resumed and (run / tracking.FILE).is_file():
            self.tracker = tracking.Tracker.reopen(run.path, self.out.warn)
        elif self.cfg.experiment.tracking.mlflow is not None:
            env = self.env
            tags = {
                "finetune.run_dir": str(run.path),
                "finetune.version": __version__,
                "finetune.devices": ", ".join(
                    f"{d['name']} ({d.get('model') or d['type']})"
                    for d in env["devices"]
                ),
                **{f"phase.{p.index + 1}": p.phase.name for p in self.plans},
            }
            if env.get("git_commit"):
                tags["mlflow.source.git.commit"] = env["git_commit"]
            self.tracker = tracking.Tracker.start(
                self.cfg,
                run.path,
                tags=tags,
                params=tracking.run_params(self.config_dict),
                warn=self.out.warn,
            )
        if self.tracker is not None:
            self.out.info(f"MLflow: run {self.tracker.run_id} at {self.tracker.uri}")
            self._log_epochs()

    def _log_epochs(self) -> None:
        if self.tracker is not None:
            self.tracker.log_epochs(
                self.run.path, self.state.history, [p.name for p in self.cfg.phases]
            )

    def _not_deterministic(self, e) -> Exception:
        """What op determinism raises for an op without a deterministic
        kernel (mostly GPU ones), said in config terms."""
        if not self.runtime["deterministic"]:
            return e
        first = (e.message or "").strip().splitlines() or ["?"]
        return ConfigError(
            "experiment.deterministic: true, but an op of this model has no "
            f"deterministic implementation on this device ({first[0][:200]}); "
            "set experiment.deterministic: false, or run on CPU. "
            "Received: experiment.deterministic=true"
        )

    def _lost_worker(self, e) -> str:
        where = (
            f"--resume {self.run.path}"
            if self.topo.chief
            else "--resume with the chief's run folder"
        )
        return (
            f"{self.topo.task}: the cluster lost a worker "
            f"({distribute.lost_worker(e, self.topo.task)}); the run stopped "
            "after epoch "
            f"{self.state.epoch}. Start every worker again with "
            f"finetune-cli finetune {where}"
        )

    def run_all(self) -> FinetuneResult:
        st = self.state
        self._announce()
        if self.resumed:
            self._materialize()
        while st.stage == "train" and st.phase < len(self.plans):
            self._run_phase(self.plans[st.phase])
        return self._finalize()

    def _announce(self) -> None:
        cfg, out, st = self.cfg, self.out, self.state
        if self.resumed:
            where = (
                "the end-of-run evaluation"
                if st.stage == "finalize" or st.phase >= len(self.plans)
                else f"phase {st.phase + 1} ({self.plans[st.phase].phase.name})"
            )
            out.step(f"resuming {self.run.path} after epoch {st.epoch}, at {where}")
            saved = st.versions
            changed = [
                f"{k} {saved[k]} -> {v}"
                for k, v in self.versions.items()
                if saved.get(k) not in (None, v)
            ]
            if changed:
                out.warn(
                    "resuming with other versions than the run started "
                    f"with ({', '.join(changed)}); the state format is "
                    "the same, but results may differ slightly"
                )
        out.step(f"finetune {cfg.experiment.name} -> {self.run.path}")
        gpus = [d for d in self.env["devices"] if d["type"] == "GPU"]
        out.info(
            "devices: "
            + (
                ", ".join(f"{d['name']} ({d.get('model') or 'GPU'})" for d in gpus)
                if gpus
                else "CPU only (no GPU found by TensorFlow)"
            )
        )
        out.info(
            f"precision: "
            f"{'mixed_float16' if self.runtime['mixed_precision'] else 'float32'}"
            f"; XLA: {'on' if self.runtime['xla'] else 'off'}"
            f"; deterministic: {'on' if self.runtime['deterministic'] else 'off'}"
        )
        topo = self.topo
        if topo.distributed:
            out.info(
                f"distribute: {topo.kind}, {topo.replicas} replica(s) on "
                f"{topo.workers} worker(s) (this is {topo.task}"
                f"{', the chief' if topo.chief else ', writes nothing'}); "
                f"global batch {cfg.data.batch_size}, "
                f"{topo.per_replica_batch(cfg.data.batch_size)} per replica, "
                f"{self.steps} steps per epoch"
            )
        out.info(
            f"data: {self.index.source}: {self.num_classes} classes, "
            + ", ".join(f"{s} {len(v)}" for s, v in self.index.splits.items())
        )
        out.info(
            f"model: {cfg.model.name} ({cfg.model.weights} weights), "
            f"{model_lib.count_params(self.model.weights):,} parameters, "
            f"input {cfg.data.image_size[0]}x{cfg.data.image_size[1]}"
        )
        out.table(
            "plan",
            phases_lib.PLAN_COLUMNS,
            phases_lib.plan_rows(self.plans, cfg, self.topo.replicas),
        )
        for note in phases_lib.path_notes(self.plans, cfg):
            out.info(note)

    def _materialize(self) -> None:
        """Rewrite the files that are views of the state (a crash may have
        come between the state commit and them)."""
        st = self.state
        if st.best_run_weights:
            self._save_model("best.keras", st.best_run_weights)
        if st.phase_started:
            self._save_model("last.keras", st.model)
        self._write_history()
        if st.phase_metrics:
            self.run.write_json("metrics.json", {"phases": st.phase_metrics})

    # -- one phase --------------------------------------------------------

    def _run_phase(self, plan: phases_lib.PhasePlan) -> None:
        self.out.step(
            f"phase {plan.index + 1}/{len(self.plans)}: {plan.phase.name} "
            f"({phases_lib.describe_path(plan.path, self.cfg, plan)})"
        )
        if plan.path == "activations":
            # The bottom's weights are those at this phase's start (an
            # earlier phase may have trained them): a cache per phase.
            runstate.assign(self.model.variables, self.state.model, "model")
            self._cached[_cache_key(plan)] = activations.activation_datasets(
                self.cfg, self.out, self.model, self.base, self.index, plan.layer_names
            )
        elif plan.path != "base" and plan.path not in self._cached:
            # Outside the scope: extraction is each worker's local pass.
            runstate.assign(self.model.variables, self.state.model, "model")
            self._cached[plan.path] = feature_training.cached_datasets(
                self.cfg,
                self.out,
                self.model,
                self.base,
                self.index,
                plan.path,
                strategy=self.topo.strategy,
                cut_layers=_derive_from(self.plans, plan),
            )
        # Models, compile, optimizer restore and head graft: in the scope.
        with self.topo.strategy.scope():
            self._run_phase_in_scope(plan)

    def _run_phase_in_scope(self, plan: phases_lib.PhasePlan) -> None:
        st, phase = self.state, plan.phase
        mid_phase = st.phase_started
        runstate.assign(self.model.variables, st.model, "model")
        model_lib.apply_trainable(
            self.model,
            self.base,
            plan.layer_names,
            phase.batchnorm,
            sync=self.topo.replicas > 1,
        )
        if not mid_phase:
            st.start_phase()
        phase_end = st.phase_start + phase.epochs
        fit_model, train_ds, val_ds = self._phase_data(plan, st.epoch, phase_end)
        phases_lib.compile_phase(
            fit_model, phase, self.steps, self.num_classes, self.runtime["xla"]
        )
        callbacks = phases_lib.phase_callbacks(
            phase, self.run / "tensorboard" if self.cfg.experiment.tensorboard else None
        )
        extra = []
        if mid_phase:
            fit_model.optimizer.build(fit_model.trainable_variables)
            runstate.assign(fit_model.optimizer.variables, st.opt, "optimizer")
            extra.append(_RestoreCallbacks(callbacks, st.callbacks))
        if not st.phase_finished and st.epoch < phase_end:
            hook = _EpochHook(self, fit_model, callbacks, phase_end, plan.phase.name)
            self._fit(
                fit_model,
                train_ds,
                val_ds,
                [*callbacks, *extra, hook],
                st.epoch,
                phase_end,
                self.class_weights[plan.index],
            )
        self._end_phase(plan, fit_model, val_ds)

    def _phase_data(self, plan, first: int, end: int):
        """(model to fit, training batches of epochs first..end-1, val)."""
        if plan.path == "base":

            def train(**distributed):
                return pipeline.make_dataset(
                    self.index.splits["train"],
                    self.num_classes,
                    self.cfg.data.image_size,
                    distributed.pop("batch_size", self.cfg.data.batch_size),
                    shuffle=True,
                    seed=self.cfg.experiment.seed,
                    augmenter=self._augmenter,
                    epochs=(first, end),
                    deterministic=self.runtime["deterministic"],
                    **distributed,
                )

            fit_model, val = self.model, self._val_dataset()
        else:
            cached = self._cached[_cache_key(plan)]

            def train(**distributed):
                return cached.train_dataset(first, end, **distributed)

            fit_model, val = cached.head, self._unsharded(cached.val_dataset())
        distribute.adopt(fit_model, self.topo)
        if not self.topo.distributed:
            return fit_model, train(), val
        class_weight = self.class_weights[plan.index]
        return fit_model, self._distributed(train, class_weight), val

    def _distributed(self, train, class_weight):
        """Training batches under the strategy: each input pipeline reads
        its own shard of every epoch, in per-replica batches."""
        topo, n = self.topo, len(self.index.splits["train"])
        batch = self.cfg.data.batch_size

        def per_pipeline(ctx):
            per_replica = ctx.get_per_replica_batch_size(batch)
            per_epoch = (
                self.steps
                * per_replica
                * (ctx.num_replicas_in_sync // ctx.num_input_pipelines)
            )
            return train(
                batch_size=per_replica,
                shard=(ctx.input_pipeline_id, ctx.num_input_pipelines),
                per_epoch=min(per_epoch, n),
                class_weight=class_weight,
            )

        return topo.strategy.distribute_datasets_from_function(per_pipeline)

    def _unsharded(self, ds):
        """Validation data is read whole by every worker (the metrics are
        then exact whatever the split of the last batch)."""
        if self.topo.kind != "multi_worker":
            return ds
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        return ds.with_options(options)

    def _val_dataset(self):
        if self._val_ds is None:
            self._val_ds = self._eval_dataset("val")
        return self._val_ds

    def _eval_dataset(self, split: str):
        """A split's images in order, read whole by every worker."""
        return self._unsharded(
            pipeline.make_dataset(
                self.index.splits[split],
                self.num_classes,
                self.cfg.data.image_size,
                self.cfg.data.batch_size,
            )
        )

    def _fit(
        self, model, train_ds, val_ds, callbacks, first, end, class_weight
    ) -> None:
        try:
            model.fit(
                train_ds,
                validation_data=val_ds,
                initial_epoch=first,
                epochs=end,
                steps_per_epoch=self.steps,
                # Under a strategy the weights are in the batches.
                class_weight=None if self.topo.distributed else class_weight,
                callbacks=callbacks,
                verbose=0,
                shuffle=False,
            )
        except tf.errors.ResourceExhaustedError:
            # The config asks for more than the device has: the user's to
            # change, so a config error (exit 2), and the run can resume.
            raise ConfigError(
                f"data.batch_size: out of memory on the device during "
                f"training at a batch of {self.cfg.data.batch_size} "
                f"({self.cfg.data.image_size[0]}x{self.cfg.data.image_size[1]} "
                "images); lower data.batch_size (or data.image_size)"
            ) from None
        except tf.errors.InvalidArgumentError:
            # tf.data does not say which file failed: find it.
            files = self.index.files("train") + self.index.files("val")
            bad = pipeline.find_unreadable(files)
            if not bad:
                raise
            listed = "; ".join(f"{p}: {why}" for p, why in bad)
            raise DataError(
                f"image(s) could not be decoded during training: {listed}"
            ) from None

    def end_epoch(
        self,
        fit_model,
        callbacks,
        epoch: int,
        logs: dict,
        phase_end: int,
        phase_name: str,
        seconds: float,
    ) -> None:
        """Commit the state after an epoch, then update the views of it."""
        st, monitor = self.state, self.cfg.experiment.monitor
        lr = phases_lib.current_lr(fit_model)
        row = {
            "epoch": epoch + 1,
            "phase": phase_name,
            "lr": lr,
            "iterations": int(fit_model.optimizer.iterations.numpy()),
            "seconds": round(seconds, 3),
        }
        row.update({k: float(v) for k, v in logs.items() if k != "learning_rate"})
        st.history.append(row)
        weights = runstate.values(self.model.variables)
        value = logs.get(monitor)
        if _improved(monitor, row, st.history, st.best_phase_epoch):
            st.best_phase, st.best_phase_epoch = float(value), epoch + 1
            st.best_phase_weights = weights
        run_improved = _improved(monitor, row, st.history, st.best_run_epoch)
        if run_improved:
            st.best_run, st.best_run_epoch = float(value), epoch + 1
            st.best_run_weights = weights
        st.epoch = epoch + 1
        st.phase_finished = bool(fit_model.stop_training) or (epoch + 1 >= phase_end)
        st.model = weights
        st.opt = runstate.values(fit_model.optimizer.variables)
        st.callbacks = [phases_lib.callback_state(cb) for cb in callbacks]
        self._commit()
        faults.point("epoch_saved")
        if run_improved:
            self._save_model("best.keras")
        self._save_model("last.keras")
        self._write_history()
        self._log_epochs()
        shown = "  ".join(
            f"{k} {v:.4f}" for k, v in logs.items() if k != "learning_rate"
        )
        self.out.info(
            f"epoch {epoch + 1:>3} [{phase_name}] {shown}  "
            f"lr {lr:.2e}  ({seconds:.1f}s)"
        )

    def _end_phase(self, plan, fit_model, val_ds) -> None:
        st = self.state
        if st.best_phase_weights:
            runstate.assign(self.model.variables, st.best_phase_weights, "best weights")
        results = fit_model.evaluate(val_ds, verbose=0, return_dict=True)
        entry = {
            "phase": plan.phase.name,
            "epochs_run": st.epoch - st.phase_start,
            "last_epoch": st.epoch,
            "best_epoch": st.best_phase_epoch,
            "optimizer": type(fit_model.optimizer).__name__,
            "optimizer_iterations": int(fit_model.optimizer.iterations.numpy()),
            "path": plan.path,
            "val_loss": float(results["loss"]),
            "val_accuracy": float(results["accuracy"]),
        }
        st.end_phase(entry, runstate.values(self.model.variables))
        self._commit()
        faults.point("phase_end")
        self.run.write_json("metrics.json", {"phases": st.phase_metrics})
        self.out.success(
            f"phase {entry['phase']}: val_accuracy {entry['val_accuracy']:.4f}, "
            f"val_loss {entry['val_loss']:.4f} (best epoch "
            f"{entry['best_epoch']}, {entry['epochs_run']} epochs)"
        )

    # -- the end ----------------------------------------------------------

    def _finalize(self) -> FinetuneResult:
        from finetune_cli import evaluation

        st, run, exp = self.state, self.run, self.cfg.experiment
        if st.stage != "finalize":
            st.stage = "finalize"
            self._commit()
        faults.point("before_final_eval")
        # The run's model is its best epoch overall.
        runstate.assign(
            self.model.variables, st.best_run_weights or st.model, "best weights"
        )
        self._save_model("best.keras")
        with atomic_path(run / "base.weights.h5") as tmp:
            self.base.save_weights(str(tmp))
        # Only the loss and metrics are needed now (label smoothing as in
        # the last phase, so `loss` means what it meant during training).
        with self.topo.strategy.scope():
            phases_lib.compile_phase(
                self.model, self.cfg.phases[-1], self.steps, self.num_classes, False
            )
            final = self.model.evaluate(
                self._val_dataset(), verbose=0, return_dict=True
            )
        metrics = {
            "monitor": exp.monitor,
            "best_epoch": st.best_run_epoch,
            "best_value": st.best_run,
            "phases": st.phase_metrics,
            "classes": self.index.class_names,
            "val": {"loss": float(final["loss"]), "accuracy": float(final["accuracy"])},
        }
        if self.topo.chief:
            # In the run folder too: a run without a test split has no
            # evaluation report to carry the curves.
            plots.curves_png(run / "history.csv", run / "curves.png")
        if self.index.splits.get("test") and self.topo.chief:
            # The held-out report, exactly as `finetune-cli evaluate RUN`
            # writes it: on the recorded test files. One pass of the model
            # over them gives the report and, through the loss compiled for
            # val above, Keras' test loss.
            ev = evaluation.evaluate(run.path, split="test", track=False)
            onehot = keras.ops.one_hot(ev.labels, self.num_classes)
            loss = self.model.loss(onehot, ev.probs)
            metrics["test"] = {
                "loss": float(keras.ops.convert_to_numpy(loss)),
                **ev.metrics["summary"],
                "report": str(ev.out_dir / "report.html"),
            }
            self.out.info(f"test report: {ev.out_dir / 'report.html'}")
        if not self.topo.chief:
            self.out.success(f"{self.topo.task}: done; the chief wrote the run folder")
            return FinetuneResult(run.path, metrics, st.history)
        run.write_json("metrics.json", metrics)
        if self.tracker is not None:
            self.tracker.log_metrics(tracking.run_metrics(metrics))
            for name, where in tracking.RUN_ARTIFACTS:
                self.tracker.log_path(run / name, where)
            self.tracker.log_path(run / "eval" / "test", "eval/test")
        run.mark_latest()
        run.set_status("completed")
        with contextlib.suppress(FileNotFoundError):
            (run / runstate.FILE).unlink()  # nothing left to resume
        summary = "no best epoch (the monitor never gave a number)"
        if st.best_run is not None:
            summary = (
                f"best {exp.monitor} {st.best_run:.4f} at epoch {st.best_run_epoch}"
            )
        if "test" in metrics:
            summary += f"; test accuracy {metrics['test']['accuracy']:.4f}"
        self.out.success(f"done: {summary}. Run folder: {run.path}")
        return FinetuneResult(run.path, metrics, st.history)

    # -- writes -----------------------------------------------------------

    def _commit(self) -> None:
        self.state.save(
            self.run / runstate.FILE, config=self.config_dict, versions=self.versions
        )

    def _save_model(self, name: str, weights=None) -> None:
        """Save the full model (with `weights`, if given) atomically."""
        current = None
        if weights is not None:
            current = runstate.values(self.model.variables)
            runstate.assign(self.model.variables, weights, "model")
        try:
            with atomic_path(self.run / name) as tmp:
                self.model.save(tmp)
                faults.point("model_save")
        finally:
            if current is not None:
                runstate.assign(self.model.variables, current, "model")

    def _write_history(self) -> None:
        rows = self.state.history
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, fieldnames=columns or ["epoch"], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.run / "history.csv", buf.getvalue())


def _derive_from(plans, plan):
    """The trainable layers of the first phase after `plan` that trains the
    base, when that phase trains on cached activations: `plan`'s features
    can be computed from that cache (the bottom's weights are the same)."""
    later = next((p for p in plans[plan.index + 1 :] if p.layer_names), None)
    if later is None or later.path != "activations":
        return None
    return later.layer_names


def _cache_key(plan) -> str:
    return f"activations-{plan.index}" if plan.path == "activations" else plan.path


def _improved(monitor: str, row: dict, history: list, best_epoch) -> bool:
    """Is epoch `row` better than `best_epoch` (a row of `history`)?

    Better on the monitor, or equal on it and better on the other metric
    (`val_accuracy` ties go to the lower `val_loss`, `val_loss` ties to the
    higher `val_accuracy`): with few validation images accuracy ties are
    common, and the first of them is not the best model.
    """
    value = row.get(monitor)
    if value is None or math.isnan(value):
        return False
    if best_epoch is None:
        return True
    best = next(r for r in history if r["epoch"] == best_epoch)
    if value != best[monitor]:
        return _better(monitor, value, best[monitor])
    other = _TIE_BREAK.get(monitor)
    if other is None or row.get(other) is None or best.get(other) is None:
        return False
    return _better(other, row[other], best[other])


def _better(metric: str, value: float, than: float) -> bool:
    if phases_lib.lower_is_better(metric):
        return value < than
    return value > than


_TIE_BREAK = {
    "val_accuracy": "val_loss",
    "val_loss": "val_accuracy",
    "accuracy": "loss",
    "loss": "accuracy",
}


class _EpochHook(keras.callbacks.Callback):
    """Hands every finished epoch to the trainer; progress bar and the
    fault point inside a phase's first epoch. Runs after the phase's own
    callbacks, so EarlyStopping's decision is in when the state is saved."""

    def __init__(
        self, trainer: Trainer, fit_model, callbacks, phase_end: int, phase_name: str
    ):
        super().__init__()
        self.trainer = trainer
        self.fit_model = fit_model
        self.callbacks = callbacks
        self.phase_end = phase_end
        self.phase_name = phase_name
        self._progress = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.monotonic()
        self._epoch = epoch
        self._progress = self.trainer.out.progress(
            self.trainer.steps, f"epoch {epoch + 1} ({self.phase_name})"
        )
        self._progress.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        self._progress.update(1, f"loss {loss:.4f}" if loss is not None else "")
        if batch == 0 and self._epoch == self.trainer.state.phase_start:
            faults.point("phase_first_batch")

    def on_epoch_end(self, epoch, logs=None):
        self._progress.__exit__(None, None, None)
        self.trainer.end_epoch(
            self.fit_model,
            self.callbacks,
            epoch,
            dict(logs or {}),
            self.phase_end,
            self.phase_name,
            time.monotonic() - self._t0,
        )


class _RestoreCallbacks(keras.callbacks.Callback):
    """Puts saved EarlyStopping/ReduceLROnPlateau counters back after the
    callbacks reset themselves in `on_train_begin` (it runs after them)."""

    def __init__(self, callbacks, states):
        super().__init__()
        self._callbacks = callbacks
        self._states = states

    def on_train_begin(self, logs=None):
        phases_lib.restore_callbacks(self._callbacks, self._states)


def _check_batch(cfg, topo, n_train: int) -> None:
    """Under a strategy the global batch must split evenly over the replicas
    and leave every worker at least one full batch per epoch."""
    if not topo.distributed:
        return
    batch = cfg.data.batch_size
    if batch % topo.replicas:
        raise ConfigError(
            f"data.batch_size is the global batch and must split evenly over "
            f"the {topo.replicas} replicas of runtime.distribute: {topo.kind}; "
            f"use a multiple of {topo.replicas}. Received: "
            f"data.batch_size={batch}"
        )
    if topo.steps_per_epoch(n_train, batch) < 1:
        raise ConfigError(
            f"data.batch_size {batch} is larger than the {n_train} training "
            f"images can fill on {topo.workers} worker(s); lower it. "
            f"Received: data.batch_size={batch}"
        )
