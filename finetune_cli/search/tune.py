"""`finetune-cli tune`: hyper-parameter search with KerasTuner.

The config's `search:` section (search.py) names key paths and their
spaces; a KerasTuner oracle (Bayesian optimisation or random search)
proposes values, and each trial is scored on `experiment.monitor`.

A trial is one of two kinds, chosen from the keys searched:

- **cached**: every key is under `head.` or under a leading phase that
  trains on cached features (`phases.N.` with the base frozen, before any
  phase that trains it; not its `trainable` or `batchnorm`). The trial
  trains those phases' head on the feature cache, so it costs seconds;
  the base runs once for the whole search. Later phases are not run: the
  score is the best `experiment.monitor` of the head phases.
- **full**: anything else. The trial is a whole `finetune` run, in
  `<tune dir>/trials/`.

Everything is in the tune folder (`<output_dir>/<name>/tune` by default):
`trials.csv` (ranked), `best.yaml` (the config with the best values, which
`finetune` accepts), `tune.json` (what was searched and the best trial) and
`kt/` (KerasTuner's own state). Running the same command again continues a
killed or shorter search; a folder made for another config is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Optional
import keras_tuner


from finetune_cli.config import checks
from finetune_cli import config as config_lib
from finetune_cli import faults
from finetune_cli.train import monitor as monitor_lib
from finetune_cli.train import phases as phases_lib
from finetune_cli.train import setup as setup_lib
from finetune_cli.config import loader as loader_lib
from finetune_cli.config import spaces as search_lib
from finetune_cli.console import Output
from finetune_cli.errors import ConfigError
from finetune_cli.errors import FinetuneError
from finetune_cli.errors import short
from finetune_cli.run.lock import Lock
from finetune_cli.files import read_json
from finetune_cli.files import atomic_write
from finetune_cli.files import write_json
from finetune_cli.search.trials import CachedTrials
from finetune_cli.search.trials import FullTrials
from finetune_cli.search.trials import fmt_value
from finetune_cli.search.trials import ranked_rows
from finetune_cli.search.trials import write_trials


ALGORITHMS = ("bayesian", "random")


_CACHED_EXCLUDED = ("trainable", "batchnorm")


@dataclasses.dataclass
class TuneResult:
    tune_dir: Path
    mode: str  # "cached" or "full"
    rows: list[dict]  # trials.csv, best first
    best_config: Optional[Path]
    seconds: float


def default_dir(cfg) -> Path:
    return Path(cfg.experiment.output_dir) / cfg.experiment.name / "tune"


def trial_mode(spaces, plans) -> str:
    """ "cached" when every searched key can be scored on cached features."""
    cached = set()
    for p in plans:
        if p.path not in ("features", "views"):
            break
        cached.add(p.index)
    for s in spaces:
        parts = s.key.split(".")
        if parts[0] == "head":
            continue
        if (
            parts[0] == "phases"
            and int(parts[1]) in cached
            and parts[2] not in _CACHED_EXCLUDED
        ):
            continue
        return "full"
    return "cached" if cached else "full"


def _check_on_model(cfg, spaces, model, base) -> None:
    """Each candidate value also makes sense for the built model (a
    `trainable.top` beyond the base's layers, a regex matching none)."""
    for space in spaces:
        if ".trainable" not in f".{space.key}":
            continue
        for value in space.candidates():
            candidate = config_lib.validate(
                search_lib.resolved_with(cfg, {space.key: value})
            )
            try:
                phases_lib.plan_phases(model, base, candidate)
            except ConfigError as e:
                raise ConfigError(
                    f"search.{space.key}: with {space.key}={short(value)}: {e}"
                ) from None


def _fingerprint(cfg, algorithm: str) -> str:
    text = json.dumps([cfg.model_dump(mode="json"), algorithm], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tune(
    cfg,
    out: Optional[Output] = None,
    trials: int = 20,
    algorithm: str = "bayesian",
    tune_dir=None,
) -> TuneResult:
    """Search the config's `search:` spaces; see the module docstring.

    Raises:
        ConfigError: no `search:` section, an unknown algorithm, or a tune
            folder that was made for another config or algorithm.
    """
    out = out or Output()
    if not cfg.search:
        raise ConfigError(
            "search: tune needs a search section naming key paths and their "
            "spaces, e.g. search: {phases.0.learning_rate: {log_uniform: "
            "[1e-4, 1e-2]}}. Received: no search section"
        )
    if algorithm not in ALGORITHMS:
        raise ConfigError(
            f"--algorithm: expected one of {', '.join(ALGORITHMS)}. "
            f"Received: {algorithm!r}"
        )
    spaces = loader_lib.check(cfg)
    checks.check(cfg)
    tune_dir = Path(tune_dir) if tune_dir is not None else default_dir(cfg)
    fingerprint = _fingerprint(cfg, algorithm)
    meta_path = tune_dir / "tune.json"
    if meta_path.is_file():
        meta = read_json(
            meta_path,
            todo="it records which search the folder holds; remove the folder "
            "(or choose another --out) to start the search again",
        )
        if meta.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"{tune_dir} holds a search of another config or algorithm "
                f"(--algorithm {meta.get('algorithm')}, search "
                f"{short(meta.get('search'))}); choose another --out or "
                "remove it"
            )
    elif tune_dir.exists() and any(tune_dir.iterdir()):
        raise ConfigError(
            f"--out {tune_dir} exists and is not a tune folder; choose another folder"
        )
    made = [p for p in (tune_dir, *tune_dir.parents) if not p.exists()]
    tune_dir.mkdir(parents=True, exist_ok=True)
    try:
        with Lock(tune_dir / ".lock", f"the search in {tune_dir}"):
            return _search(cfg, out, spaces, trials, algorithm, tune_dir, fingerprint)
    except BaseException:
        # A search that never started leaves no folder behind.
        if made and not meta_path.exists():
            shutil.rmtree(made[-1], ignore_errors=True)
        raise


def _search(cfg, out, spaces, trials, algorithm, tune_dir, fingerprint):
    start = time.monotonic()
    setup = setup_lib.prepare(cfg, out)  # data, seeds, precision, model, plans
    model, base, plans = setup.model, setup.base, setup.plans
    save_verdicts = setup.save_verdicts
    _check_on_model(cfg, spaces, model, base)
    mode = trial_mode(spaces, plans)
    monitor = cfg.experiment.monitor
    meta = {
        "fingerprint": fingerprint,
        "algorithm": algorithm,
        "mode": mode,
        "monitor": monitor,
        "search": cfg.search,
    }
    write_json(tune_dir / "tune.json", meta)
    if save_verdicts is not None:
        save_verdicts()
    if mode == "cached":
        score = CachedTrials(setup, out)
    else:
        score = FullTrials(cfg, tune_dir)
    out.step(
        f"tune {cfg.experiment.name}: {len(spaces)} key(s), up to {trials} "
        f"trials ({algorithm}), {mode} trials -> {tune_dir}"
    )
    hp = keras_tuner.HyperParameters()
    for s in spaces:
        s.register(hp)
    objective = keras_tuner.Objective(
        monitor, "min" if monitor_lib.lower_is_better(monitor) else "max"
    )
    oracle_cls = {
        "bayesian": keras_tuner.oracles.BayesianOptimizationOracle,
        "random": keras_tuner.oracles.RandomSearchOracle,
    }[algorithm]
    oracle = oracle_cls(
        objective=objective,
        max_trials=trials,
        hyperparameters=hp,
        allow_new_entries=False,
        tune_new_entries=False,
        seed=cfg.experiment.seed,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # KerasTuner prints
        tuner = _Tuner(
            score,
            out,
            monitor,
            oracle=oracle,
            directory=str(tune_dir),
            project_name="kt",
        )
    done = sum(t.status == "COMPLETED" for t in tuner.oracle.trials.values())
    if done:
        out.info(f"continuing: {done} trial(s) already done")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            tuner.search(verbose=0)
    except keras_tuner.errors.FatalError:
        raise tuner.fatal from None
    rows = ranked_rows(tuner.oracle, spaces, monitor)
    for r in rows:
        if r["status"] not in ("COMPLETED", "RUNNING"):
            out.warn(f"trial {r['trial']} {r['status'].lower()}: {r['message']}")
    write_trials(tune_dir / "trials.csv", rows, spaces, monitor)
    best = None
    if rows and rows[0]["status"] == "COMPLETED":
        best = tune_dir / "best.yaml"
        tree = search_lib.resolved_with(cfg, rows[0]["values"])
        atomic_write(best, config_lib.to_yaml(config_lib.validate(tree)))
        meta["best"] = {
            "trial": rows[0]["trial"],
            monitor: rows[0]["score"],
            "values": rows[0]["values"],
        }
    meta["trials"] = len(rows)
    write_json(tune_dir / "tune.json", meta)
    return TuneResult(tune_dir, mode, rows, best, time.monotonic() - start)


class _Tuner(keras_tuner.engine.base_tuner.BaseTuner):
    """Trials scored by a callable (values {key path: value}, trial id) ->
    the monitor's value."""

    def __init__(self, score, out, monitor, **kwargs):
        super().__init__(**kwargs)
        self.score, self.out, self.monitor = score, out, monitor
        self.fatal: Optional[FinetuneError] = None

    def run_trial(self, trial, *args, **kwargs):
        values = dict(trial.hyperparameters.values)
        faults.point("trial")
        t0 = time.monotonic()
        try:
            value = self.score(values, trial.trial_id)
        except FinetuneError as e:
            # The user's to fix (data, config): stop the search and say so,
            # rather than let KerasTuner count it as a failed trial.
            self.fatal = e
            raise keras_tuner.errors.FatalError(str(e)) from None
        shown = ", ".join(f"{k}={fmt_value(v)}" for k, v in values.items())
        self.out.info(
            f"trial {trial.trial_id}: {self.monitor} {value:.4f}  ({shown}; "
            f"{time.monotonic() - t0:.1f}s)"
        )
        return {self.monitor: value}

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        faults.point("trial_end")

    def save_model(self, trial_id, model, step=0):
        pass  # trials keep no models; `best.yaml` is the result

    def load_model(self, trial):
        return None
