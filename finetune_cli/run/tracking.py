"""Experiment tracking with MLflow (`pip install 'finetune-cli[mlflow]'`).

With `experiment.tracking.mlflow` set, a run is also an MLflow run:

- parameters: the resolved config, one per key path (`phases.0.learning_rate`);
- metrics: every numeric column of history.csv at step = epoch, plus
  `phase` (the phase number; tags `phase.N` name them), then the final,
  per-phase and test metrics of metrics.json;
- tags: the run folder, the git commit, finetune-cli's version, devices;
- artifacts: config, labels, history, curves, metrics, the environment,
  `best.keras` (under `model/`) and the test report (under `eval/test/`).

`evaluate` and `export` attach their output to the same MLflow run, found
through `mlflow.json` in the run folder, which also lets a resumed run
continue its MLflow run and log each epoch once.

Tracking never costs a training run: the first MLflow call that fails is
one warning, and tracking is off for the rest of the command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable
from typing import Optional

from finetune_cli.errors import ConfigError
from finetune_cli.files import write_json

FILE = "mlflow.json"  # in the run folder: where its MLflow run is

# What the run folder sends as artifacts, and under which artifact path.
RUN_ARTIFACTS = [
    ("config.yaml", ""),
    ("labels.txt", ""),
    ("history.csv", ""),
    ("curves.png", ""),
    ("metrics.json", ""),
    ("environment.json", ""),
    ("best.keras", "model"),
]
_MAX_PARAM = 6000  # MLflow's limit on a parameter's value


def default_uri(cfg) -> str:
    """A local file store beside the runs: `<output_dir>/mlruns`."""
    return (Path(cfg.experiment.output_dir).resolve() / "mlruns").as_uri()


def require_mlflow(key: str = "experiment.tracking.mlflow") -> None:
    """A config error when tracking is asked for and MLflow is missing."""
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"{key} is set, but MLflow is not installed; install it with "
            "pip install 'finetune-cli[mlflow]' (or mlflow-skinny), or remove "
            f"{key}"
        )


def _quiet_network_defaults(uri: str) -> None:
    # MLflow retries an unreachable server for minutes by default; a run
    # should warn and go on within seconds. The user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store unless told; a local file store
        # is still what the default asks for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def flatten(value, prefix: str = "") -> dict:
    """{"a.b.0.c": leaf} for nested dicts and lists."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value:
        items = enumerate(value)
    else:
        return {prefix: value}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _numbers(flat: dict) -> dict:
    # MLflow refuses a whole batch for one name outside [\w\-. /]; phase
    # and evaluation names are the user's, so other characters become "_".
    return {
        re.sub(r"[^\w\-. /]", "_", str(k)): float(v)
        for k, v in flat.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Tracker:
    """One MLflow run, and what of the run folder it has been sent.

    Every method is best effort: a failing call warns once (through
    `warn`) and turns the tracker off.
    """

    def __init__(self, uri: str, run_id: str, warn: Callable[[str], None]):
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id, self.warn = uri, run_id, warn
        self.client = MlflowClient(uri)
        self.on = True

    # -- opening ------------------------------------------------------------

    @classmethod
    def start(cls, cfg, run_dir, *, tags: dict, params: dict, warn):
        """Create the MLflow run of a new run folder (None: tracking failed,
        warned). Writes `mlflow.json` into the run folder."""
        spec = cfg.experiment.tracking.mlflow
        uri = spec.tracking_uri or default_uri(cfg)
        name = spec.experiment or cfg.experiment.name
        _quiet_network_defaults(uri)
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else client.create_experiment(name)
            run = client.create_run(
                exp_id,
                run_name=Path(run_dir).name,
                tags={k: str(v) for k, v in tags.items()},
            )
            tracker = cls(uri, run.info.run_id, warn)
            items = [(k, str(v)[:_MAX_PARAM]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                tracker.client.log_batch(
                    tracker.run_id,
                    params=[_param(k, v) for k, v in items[i : i + 100]],
                )
        except Exception as e:  # noqa: BLE001 - tracking never stops a run
            warn(_off(uri, e))
            return None
        write_json(
            Path(run_dir) / FILE,
            {
                "tracking_uri": uri,
                "experiment_id": exp_id,
                "run_id": tracker.run_id,
                "logged_epochs": 0,
            },
        )
        return tracker

    @classmethod
    def reopen(cls, run_dir, warn, status: Optional[str] = "RUNNING"):
        """The MLflow run of an existing run folder (None: not tracked, or
        MLflow unreachable, warned)."""
        path = Path(run_dir) / FILE
        if not path.is_file():
            return None
        info = json.loads(path.read_text())
        if importlib.util.find_spec("mlflow") is None:
            warn(
                f"{run_dir} is tracked in MLflow ({info['tracking_uri']}), but "
                "MLflow is not installed here; nothing was sent"
            )
            return None
        _quiet_network_defaults(info["tracking_uri"])
        try:
            tracker = cls(info["tracking_uri"], info["run_id"], warn)
            if status is not None:
                tracker.client.update_run(tracker.run_id, status=status)
        except Exception as e:  # noqa: BLE001 - tracking never stops a run
            warn(_off(info["tracking_uri"], e))
            return None
        return tracker

    # -- logging ------------------------------------------------------------

    def _call(self, fn, *args, **kwargs) -> bool:
        if not self.on:
            return False
        try:
            fn(*args, **kwargs)
            return True
        except Exception as e:  # noqa: BLE001 - tracking never stops a run
            self.on = False
            self.warn(_off(self.uri, e))
            return False

    def log_epochs(self, run_dir, history: list, phase_names: list) -> None:
        """Send the history rows not sent yet (each epoch once, also across
        a crash and resume: `mlflow.json` counts what was sent)."""
        from mlflow.entities import Metric

        path = Path(run_dir) / FILE
        info = json.loads(path.read_text())
        rows = [r for r in history if r["epoch"] > info.get("logged_epochs", 0)]
        if not rows or not self.on:
            return
        now = int(time.time() * 1000)
        metrics = []
        for row in rows:
            step = int(row["epoch"])
            values = {k: v for k, v in _numbers(row).items() if k != "epoch"}
            if row.get("phase") in phase_names:
                values["phase"] = float(phase_names.index(row["phase"]) + 1)
            metrics += [Metric(k, v, now, step) for k, v in values.items()]
        if not self._send(metrics):
            return
        info["logged_epochs"] = int(rows[-1]["epoch"])
        write_json(path, info)

    def log_metrics(self, values: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._send([Metric(k, v, now, step) for k, v in _numbers(values).items()])

    def _send(self, metrics: list) -> bool:
        # MLflow takes at most 1000 metrics per batch.
        return all(
            self._call(
                self.client.log_batch, self.run_id, metrics=metrics[i : i + 1000]
            )
            for i in range(0, len(metrics), 1000)
        )

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._call(
            self.client.log_batch,
            self.run_id,
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

    def log_path(self, path, artifact_path: str = "") -> None:
        """A file or a whole folder as artifacts (missing: skipped)."""
        path = Path(path)
        if path.is_dir():
            self._call(
                self.client.log_artifacts, self.run_id, str(path), artifact_path or None
            )
        elif path.is_file():
            self._call(
                self.client.log_artifact, self.run_id, str(path), artifact_path or None
            )

    def finish(self, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, self.run_id, status)


def attach(run_dir, path, artifact_path: str, *, warn=None, metrics=None, tags=None):
    """Send a file or folder (and metrics, tags) to the MLflow run of
    `run_dir`; nothing when the run is not tracked. What `evaluate`,
    `export` and the gates use."""
    if run_dir is None:
        return
    tracker = Tracker.reopen(run_dir, warn or warn_stderr, status=None)
    if tracker is None:
        return
    if metrics:
        tracker.log_metrics(metrics)
    if tags:
        tracker.set_tags(tags)
    tracker.log_path(path, artifact_path)


def warn_stderr(message: str) -> None:
    """The warning channel of library calls that were given none."""
    print(f"warning: {message}", file=sys.stderr)


def _param(key, value):
    from mlflow.entities import Param

    return Param(key, value)


def _off(uri: str, e: Exception) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (
        f"MLflow tracking at {uri} failed ({type(e).__name__}: {first[:200]}); "
        "tracking is off for the rest of this command, the run goes on"
    )


def run_params(config_dict: dict) -> dict:
    """The resolved config as MLflow parameters, one per key path."""
    return {k: ("null" if v is None else v) for k, v in flatten(config_dict).items()}


def run_metrics(metrics: dict) -> dict:
    """metrics.json as MLflow metrics: `val.accuracy`, `test.macro_f1`,
    `phase.<name>.val_accuracy`, `best_value`, `best_epoch`."""
    flat = {}
    for k, v in metrics.items():
        if k == "phases":
            for entry in v:
                for mk, mv in _numbers(entry).items():
                    flat[f"phase.{entry['phase']}.{mk}"] = mv
        elif k != "classes":
            flat.update(_numbers(flatten(v, k)))
    return _numbers(flat)


class RunTracking:
    """A training run's MLflow tracking, as an observer of its events.

    The trainer calls `start` once the run folder is open, `epoch` after
    every committed epoch, `end` with the final metrics and `close` with
    how the run ended (FINISHED, FAILED or KILLED). Only the chief tracks;
    without `experiment.tracking.mlflow` (and no earlier MLflow run to
    continue) every call does nothing.
    """

    def __init__(self, warn: Callable[[str], None], info: Callable[[str], None]):
        self.warn, self.info = warn, info
        self.tracker: Optional[Tracker] = None

    def start(self, t) -> None:
        """Open the run's MLflow run and send what the run has done that
        MLflow has not seen (after a resume). `t` is the trainer."""
        if not t.topo.chief:
            return
        run = t.run
        if t.resumed and (run / FILE).is_file():
            self.tracker = Tracker.reopen(run.path, self.warn)
        elif t.cfg.experiment.tracking.mlflow is not None:
            env = t.env
            tags = {
                "finetune.run_dir": str(run.path),
                "finetune.version": t.versions["finetune_cli"],
                "finetune.devices": ", ".join(
                    f"{d['name']} ({d.get('model') or d['type']})"
                    for d in env["devices"]
                ),
                **{f"phase.{p.index + 1}": p.phase.name for p in t.plans},
            }
            if env.get("git_commit"):
                tags["mlflow.source.git.commit"] = env["git_commit"]
            self.tracker = Tracker.start(
                t.cfg,
                run.path,
                tags=tags,
                params=run_params(t.config_dict),
                warn=self.warn,
            )
        if self.tracker is not None:
            self.info(f"MLflow: run {self.tracker.run_id} at {self.tracker.uri}")
            self.epoch(t)

    def epoch(self, t) -> None:
        if self.tracker is not None:
            self.tracker.log_epochs(
                t.run.path, t.state.history, [p.name for p in t.cfg.phases]
            )

    def end(self, t, metrics: dict) -> None:
        if self.tracker is None:
            return
        self.tracker.log_metrics(run_metrics(metrics))
        for name, where in RUN_ARTIFACTS:
            self.tracker.log_path(t.run / name, where)
        self.tracker.log_path(t.run / "eval" / "test", "eval/test")

    def close(self, status: str) -> None:
        if self.tracker is not None:
            self.tracker.finish(status)
