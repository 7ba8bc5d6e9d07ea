"""The end of a run: the best weights, calibration (and multi-label
thresholds), `best.keras`, the held-out report and `metrics.json`, the run
marked completed and `latest`."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional

import keras

from finetune_cli import faults
from finetune_cli.data import multilabel
from finetune_cli.evaluate import plots
from finetune_cli.run import state as runstate
from finetune_cli.train import phases as phases_lib
from finetune_cli.train import summary


@dataclasses.dataclass
class FinetuneResult:
    run_dir: Path
    metrics: dict
    history: list[dict]
    remote_dir: Optional[str] = None  # where a remote run folder was uploaded


def finalize(t):
    """Finish the trainer `t`'s run (see the module doc); a
    `trainer.FinetuneResult`."""
    from finetune_cli.evaluate import calibration

    st, run, exp = t.state, t.run, t.cfg.experiment
    if st.stage != "finalize":
        st.stage = "finalize"
        t.files.commit()
    faults.point("before_final_eval")
    # The run's model is its best epoch overall.
    runstate.assign(t.model.variables, st.best_run_weights or st.model, "best weights")
    for name, rec, line in calibration.after_training(
        t.model,
        t.inputs.val_dataset(),
        t.cfg.calibration.method,
        t.index.class_names,
        t.index.multi_label,
    ):
        t.out.info(line)
        if t.topo.chief:
            run.write_json(name, rec)
    t.files.save_model("best.keras")
    t.files.save_base_weights()
    # Only the loss and metrics are needed now (label smoothing as in
    # the last phase, so `loss` means what it meant during training).
    with t.topo.strategy.scope():
        phases_lib.compile_phase(
            t.model,
            t.cfg.phases[-1],
            t.steps,
            t.num_classes,
            False,
            **t.setup.task(len(t.cfg.phases) - 1),
        )
        final = t.model.evaluate(t.inputs.val_dataset(), verbose=0, return_dict=True)
    metrics = {
        "monitor": exp.monitor,
        "best_epoch": st.best_run_epoch,
        "best_value": st.best_run,
        "phases": st.phase_metrics,
        "classes": t.index.class_names,
        "val": {"loss": float(final["loss"]), "accuracy": float(final["accuracy"])},
    }
    if t.topo.chief:
        # In the run folder too: a run without a test split has no
        # evaluation report to carry the curves.
        plots.curves_png(run / "history.csv", run / "curves.png")
    if t.index.splits.get("test") and t.topo.chief:
        # The held-out report, exactly as `finetune-cli evaluate RUN`
        # writes it: on the recorded test files. One pass of the model
        # over them gives the report and, through the loss compiled for
        # val above, Keras' test loss.
        metrics["test"] = test_metrics(t.model, run.path, t.num_classes)
        t.out.info(f"test report: {metrics['test']['report']}")
    if not t.topo.chief:
        t.out.success(f"{t.topo.task}: done; the chief wrote the run folder")
        return FinetuneResult(run.path, metrics, st.history)
    run.write_json("metrics.json", metrics)
    t.tracking.end(t, metrics)
    run.mark_latest()
    run.set_status("completed")
    with contextlib.suppress(FileNotFoundError):
        (run / runstate.FILE).unlink()  # nothing left to resume
    t.out.success(summary.done_line(metrics, t.index.multi_label))
    t.out.info(f"run folder: {run.path}")
    return FinetuneResult(run.path, metrics, st.history)


def test_metrics(model, run_path, num_classes: int) -> dict:
    """The run's held-out report, exactly as `finetune-cli evaluate RUN`
    writes it, and Keras' test loss from the loss `model` is compiled with."""
    from finetune_cli.evaluate import evaluation

    ev = evaluation.evaluate(run_path, split="test", name="test", track=False)
    loss = model.loss(multilabel.rows(ev.labels, num_classes), ev.probs)
    return {
        "loss": float(keras.ops.convert_to_numpy(loss)),
        **ev.metrics["summary"],
        "report": str(ev.out_dir / "report.html"),
    }
