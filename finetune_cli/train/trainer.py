"""The trainer: runs a config's phases as a sequence of run-state commits.

Each phase sets what trains, recompiles with its own optimizer, schedule,
loss and callbacks, and continues the epoch count. After every epoch the
run state is committed (`run/state.py`, through `checkpoints.py`); at the
end of a phase its best weights (by `experiment.monitor`) are restored,
carried into the next phase, and committed again. The trainer asks for its
inputs: the setup (`setup.py`: data, model, plans), the data of each phase
(`inputs.py`), the writes (`checkpoints.py`) and the tracking (an observer,
`run/tracking.py`). The job around it (lock, signals, status) is `job.py`.
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from finetune_cli import __version__
from finetune_cli import faults
from finetune_cli.data import pipeline
from finetune_cli.errors import ConfigError
from finetune_cli.errors import DataError
from finetune_cli.model import build as model_lib
from finetune_cli.run import state as runstate
from finetune_cli.run import tracking
from finetune_cli.run.folder import RunDir
from finetune_cli.config import loader as loader_lib
from finetune_cli.train import callbacks as callbacks_lib
from finetune_cli.train import finish
from finetune_cli.train.finish import FinetuneResult
from finetune_cli.train import phases as phases_lib
from finetune_cli.train import setup as setup_lib
from finetune_cli.train import summary
from finetune_cli.train.budget import Budget
from finetune_cli.train.checkpoints import Checkpoints
from finetune_cli.train.inputs import PhaseInputs
from finetune_cli.train.monitor import improved


class Trainer:
    """Runs the phases of one prepared job; build it with `Trainer.prepare`."""

    def __init__(self, setup: setup_lib.Setup, out, state, resumed: bool, budget=None):
        self.setup = setup
        self.cfg, self.out, self.index = setup.cfg, out, setup.index
        self.model, self.base, self.plans = setup.model, setup.base, setup.plans
        self.runtime, self.env, self.topo = setup.runtime, setup.env, setup.topo
        self.class_weights = setup.class_weights
        self.state = state
        self.resumed = resumed
        self.run: Optional[RunDir] = None
        self.num_classes = setup.num_classes
        self.config_dict = self.cfg.model_dump(mode="json")
        self.versions = {
            "finetune_cli": __version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
        }
        self.inputs = PhaseInputs(setup, out)
        self.steps = self.inputs.steps
        self.files = Checkpoints(self)
        self.tracking = tracking.RunTracking(out.warn, out.info)
        self.budget = budget or Budget(None)
        self.sync = None  # uploads a remote run folder (train/job.py)
        self._header_shown = False  # the epoch table's header, once a fit
        # The model the current phase trains: `model`, or its twin at the
        # phase's image size (the same variables, so the state's weights
        # pass between them; `model` is what is saved and evaluated).
        self.phase_model = self.model

    @classmethod
    def prepare(
        cls,
        cfg,
        out,
        argv=None,
        resume=None,
        topo=None,
        config_dict=None,
        budget=None,
        remote_out=None,
    ) -> "Trainer":
        """Check everything, build the model; create the run folder (a new
        run) or load its state (a resume).

        Args:
            topo: the strategy (`distribute.setup`); none by default.
            config_dict: the config a resumed state must match, when `cfg`
                is a worker's private copy of it.
        """
        s = setup_lib.prepare(cfg, out, argv=argv, resume=resume, topo=topo)
        t = cls(s, out, runstate.RunState(), resume is not None, budget)
        if config_dict is not None:
            t.config_dict = config_dict
        if remote_out is not None:  # the run's config names the remote folder
            t.config_dict["experiment"]["output_dir"] = remote_out
        if resume is not None:
            t.run = RunDir(resume)
            t.state = runstate.load(
                t.run / runstate.FILE,
                config=t.config_dict,
                versions=t.versions,
                normalize=loader_lib.current_schema,
            )
        else:
            t.state.model = runstate.values(t.model.variables)
        # A worker writes into its private folder, even when it resumes
        # from the chief's state.
        if resume is None or not s.topo.chief:
            exp = cfg.experiment
            t.run = RunDir.create(
                exp.output_dir,
                exp.name,
                prepare=lambda r: t.files.write_new_run(r, s.skipped),
            )
            if s.topo.chief:
                faults.point("run_created")
        if s.save_verdicts is not None and s.topo.chief:
            s.save_verdicts()  # the run exists: every check before it passed
        return t

    def run_all(self) -> FinetuneResult:
        st = self.state
        summary.announce(self)
        if self.resumed:
            self.files.materialize()
        while st.stage == "train" and st.phase < len(self.plans):
            self._run_phase(self.plans[st.phase])
        return self._finalize()

    # -- one phase --------------------------------------------------------

    def _run_phase(self, plan: phases_lib.PhasePlan) -> None:
        head = f"phase {plan.index + 1}/{len(self.plans)}: {plan.phase.name}"
        on = summary.describe_path(plan.path, self.cfg, plan)
        brief = summary.describe_path(plan.path, self.cfg, plan, verbose=False)
        self.out.step(f"{head} ({on})", brief=f"{head} ({brief})")
        # The caches come from the weights at this phase's start.
        self.inputs.build(plan, weights=self.state.model)
        # Models, compile, optimizer restore and head graft: in the scope.
        with self.topo.strategy.scope():
            self._run_phase_in_scope(plan)

    def _run_phase_in_scope(self, plan: phases_lib.PhasePlan) -> None:
        st, phase = self.state, plan.phase
        mid_phase = st.phase_started
        model, base = self.setup.model_for(plan)
        self.phase_model = model
        runstate.assign(model.variables, st.model, "model")
        model_lib.apply_trainable(
            model,
            base,
            plan.layer_names,
            phase.batchnorm,
            sync=self.topo.replicas > 1,
        )
        if not mid_phase:
            st.start_phase()
        phase_end = st.phase_start + phase.epochs
        fit_model, train_ds, val_ds = self.inputs.for_phase(
            plan, st.epoch, phase_end, deterministic=self.runtime["deterministic"]
        )
        phases_lib.compile_phase(
            fit_model,
            phase,
            self.steps,
            self.num_classes,
            self.runtime["xla"],
            **self.setup.task(plan.index),
        )
        tb = self.run / "tensorboard" if self.cfg.experiment.tensorboard else None
        callbacks = callbacks_lib.phase_callbacks(phase, tb)
        extra = callbacks_lib.ema_callbacks(fit_model)
        if mid_phase:
            fit_model.optimizer.build(fit_model.trainable_variables)
            runstate.assign(fit_model.optimizer.variables, st.opt, "optimizer")
            extra.append(callbacks_lib.RestoreCallbacks(callbacks, st.callbacks))
        self._header_shown = False
        if not st.phase_finished and st.epoch < phase_end:
            hook = callbacks_lib.EpochHook(
                self.out.progress,
                lambda epoch, logs, seconds, lr_start: self.end_epoch(
                    fit_model,
                    callbacks,
                    epoch,
                    logs,
                    phase_end,
                    phase.name,
                    seconds,
                    lr_start,
                ),
                self.steps,
                phase.name,
                st.phase_start,
            )
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
        lr_start: Optional[float] = None,
    ) -> None:
        """Commit the state after an epoch, then update the views of it.

        `lr` in the history is the learning rate after the epoch (what the
        next step uses); the epoch line shows the one it started with."""
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
        trained, weights = callbacks_lib.epoch_weights(self.phase_model, fit_model)
        value = logs.get(monitor)
        if improved(monitor, row, st.history, st.best_phase_epoch):
            st.best_phase, st.best_phase_epoch = float(value), epoch + 1
            st.best_phase_weights = weights
        run_improved = improved(monitor, row, st.history, st.best_run_epoch)
        if run_improved:
            st.best_run, st.best_run_epoch = float(value), epoch + 1
            st.best_run_weights = weights
        st.epoch = epoch + 1
        st.phase_finished = bool(fit_model.stop_training) or (epoch + 1 >= phase_end)
        st.model = trained
        st.opt = runstate.values(fit_model.optimizer.variables)
        st.callbacks = [callbacks_lib.callback_state(cb) for cb in callbacks]
        self.files.commit()
        faults.point("epoch_saved")
        # Saved through `model` (data.image_size), whichever model trains.
        if run_improved:
            self.files.save_model("best.keras", weights)
        self.files.save_model("last.keras", weights)
        self.files.write_history()
        self.tracking.epoch(self)
        if not self._header_shown:
            self.out.info(summary.epoch_header(logs))
            self._header_shown = True
        shown_lr = lr if lr_start is None else lr_start
        self.out.info(summary.epoch_line(epoch + 1, logs, shown_lr, seconds))
        more = st.phase < len(self.plans) - 1 or not st.phase_finished
        self.budget.after_epoch(epoch + 1, str(self.run.path), more)

    def _end_phase(self, plan, fit_model, val_ds) -> None:
        st = self.state
        if st.best_phase_weights:
            runstate.assign(
                self.phase_model.variables, st.best_phase_weights, "best weights"
            )
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
            **({"val_map": float(results["map"])} if "map" in results else {}),
        }
        st.end_phase(entry, runstate.values(self.phase_model.variables))
        self.files.commit()
        faults.point("phase_end")
        self.files.write_phase_metrics()
        shown = "val_map" if "val_map" in entry else "val_accuracy"
        self.out.success(
            f"phase {entry['phase']}: {shown} {entry[shown]:.4f}, "
            f"val_loss {entry['val_loss']:.4f} (best epoch "
            f"{entry['best_epoch']}, {summary.plural(entry['epochs_run'], 'epoch')})"
        )

    # -- the end ----------------------------------------------------------

    def _finalize(self) -> FinetuneResult:
        return finish.finalize(self)
