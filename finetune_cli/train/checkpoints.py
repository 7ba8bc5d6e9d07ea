"""Every write a training run makes into its run folder.

The run state (`run/state.py`) is the commit: written atomically after
every epoch and at the end of every phase. `best.keras`, `last.keras`,
`history.csv` and the phase metrics are views of it, rewritten after each
commit and again on resume (`materialize`), since a crash may fall between
the commit and them. Each file is written whole, then renamed into place.
"""

from __future__ import annotations

import csv
import io

from finetune_cli import faults
from finetune_cli.config import to_yaml
from finetune_cli.data import split as split_lib
from finetune_cli.files import atomic_path
from finetune_cli.files import atomic_write
from finetune_cli.run import state as runstate
from finetune_cli.run.folder import RunDir


class Checkpoints:
    """The run folder's files of one trainer (its state, model and run)."""

    def __init__(self, trainer):
        self.t = trainer

    @property
    def run(self) -> RunDir:
        return self.t.run

    def write_new_run(self, run: RunDir, skipped) -> None:
        """The files a run folder holds from its first instant (before the
        rename that makes it visible): a run that dies before its first
        epoch is resumable too."""
        t = self.t
        # The config as given (a remote output_dir, not its local mirror).
        saved = t.cfg.model_copy(
            update={
                "experiment": t.cfg.experiment.model_copy(
                    update={"output_dir": t.config_dict["experiment"]["output_dir"]}
                )
            }
        )
        run.write_text("config.yaml", to_yaml(saved))
        run.write_text("labels.txt", "\n".join(t.index.class_names) + "\n")
        run.write_json("environment.json", t.env)
        run.write_json(split_lib.FILE, split_lib.record(t.index, skipped))
        if skipped:
            run.write_text(
                "skipped_images.txt", "".join(f"{p}\t{why}\n" for p, why in skipped)
            )
        t.state.save(run / runstate.FILE, config=t.config_dict, versions=t.versions)
        run.set_status("running", resumed=False)

    def commit(self) -> None:
        t = self.t
        t.state.save(
            self.run / runstate.FILE, config=t.config_dict, versions=t.versions
        )
        if t.sync is not None:  # a remote run folder: upload what changed
            t.sync()

    def save_model(self, name: str, weights=None) -> None:
        """Save the full model (with `weights`, if given) atomically."""
        model = self.t.model
        current = None
        if weights is not None:
            current = runstate.values(model.variables)
            runstate.assign(model.variables, weights, "model")
        try:
            with atomic_path(self.run / name) as tmp:
                model.save(tmp)
                faults.point("model_save")
        finally:
            if current is not None:
                runstate.assign(model.variables, current, "model")

    def save_base_weights(self) -> None:
        with atomic_path(self.run / "base.weights.h5") as tmp:
            self.t.base.save_weights(str(tmp))

    def write_history(self) -> None:
        rows = self.t.state.history
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

    def write_phase_metrics(self) -> None:
        self.run.write_json("metrics.json", {"phases": self.t.state.phase_metrics})

    def materialize(self) -> None:
        """Rewrite the files that are views of the state (a crash may have
        come between the state commit and them)."""
        st = self.t.state
        # The class names are the recorded split's (a damaged labels.txt
        # would only be found at the end-of-run report).
        self.run.write_text("labels.txt", "\n".join(self.t.index.class_names) + "\n")
        if st.best_run_weights:
            self.save_model("best.keras", st.best_run_weights)
        if st.phase_started:
            self.save_model("last.keras", st.model)
        self.write_history()
        if st.phase_metrics:
            self.write_phase_metrics()
