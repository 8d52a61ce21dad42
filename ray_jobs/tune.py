"""Hyperparameter sweeps on Ray Tune: ``python -m ray_jobs.tune [hydra overrides]``.

The work is ``run_sweep(cfg)``. Every trial is the distributed training run of
``ray_jobs.train`` (``check_config`` + ``build_trainer`` + ``fit``, several Train workers when
``scaling.num_workers`` says so) on the composed config with the trial's values applied as
overrides: the search space ``tune.space`` maps config keys to domains,

    optim.lr:      {type: loguniform, lower: 1.0e-6, upper: 1.0e-3}
    loss.dyn:      {type: uniform, lower: 0.1, upper: 4.0}
    model.d_model: {type: choice, values: [128, 256]}
    model.fusion_layers: {type: grid, values: [1, 2]}

The Train run of trial ``T`` is ``{storage_path}/{tune.name}-{T}``; its epoch metrics reach Tune
through ``TuneReportCallback``. ASHA stops poor trials early on ``task.monitor`` (time
attribute: epoch). The sweep's directory ``{storage_path}/{tune.name}`` holds Tune's state and,
at the end, ``best.yaml`` (the best trial's config, a primary config for ``ray_jobs.train``),
``best.json`` (its trial, values, metric and checkpoint) and ``trials.csv`` / ``trials.md``
(every trial). Starting the same ``tune.name`` again resumes an interrupted sweep with
``Tuner.restore``: finished trials are kept, unfinished ones continue their Train runs from
their last checkpoints. While a sweep runs its directory is locked (``dipro.runs.run_lock``): a
second launcher of the same sweep is refused. The MLflow store is reached once before Ray
starts (``dipro.tracking.open_tracker``) and the sweep is tracked at the end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import hydra
import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, Searcher

from dipro import storage, tracking
from dipro.config import ConfigError, exit_on, settings_of
from dipro.data.layout import read_manifest
from dipro.runs import (
    RunDirectoryInUse,
    best_index,
    epoch_log,
    last_logged,
    run_dir,
    run_dir_of,
    run_lock,
)
from dipro.settings import TrainingRun
from ray_jobs.console import Progress, format_epoch, say, session
from ray_jobs.training import (
    build_trainer,
    check_config,
    checkpoint_uri,
    ensure_ray,
    local_num_cpus,
)

SEARCHES = ("random", "optuna")
SCHEDULERS = ("asha", "fifo")
DOMAIN_TYPES = ("uniform", "loguniform", "choice", "grid")
# Keys a trial may not override: they name where the trial's run lives, or the sweep itself.
_RESERVED = ("run_name", "storage_path", "tune", "data.root", "ray_address", "ray_num_cpus")
_TRIAL_CPU = 0.01  # the trial's driver only waits on its Train run; Tune rejects 0


class SweepInterrupted(RuntimeError):
    """The sweep stopped before all its trials finished; start it again to resume."""


@dataclass(frozen=True)
class SweepResult:
    """What a finished sweep leaves in its directory."""

    sweep_dir: str
    best_trial: str
    best_value: float
    best_overrides: dict[str, Any]
    best_config: str
    best_checkpoint: str | None
    trials_table: str
    num_trials: int


def _domain(key: str, spec: DictConfig) -> Any:
    """The Tune domain of one search-space entry."""
    kind = spec.get("type")
    if kind not in DOMAIN_TYPES:
        raise ConfigError(
            f"tune.space[{key}].type={kind!r} is not one of {', '.join(DOMAIN_TYPES)}"
        )
    if kind in ("choice", "grid"):
        values = spec.get("values")
        if not values:
            raise ConfigError(f"tune.space[{key}] of type {kind} needs a non-empty values list")
        values = OmegaConf.to_container(values, resolve=True)
        return tune.choice(values) if kind == "choice" else tune.grid_search(values)
    try:
        lower, upper = float(spec.lower), float(spec.upper)
    except Exception as err:
        raise ConfigError(
            f"tune.space[{key}] of type {kind} needs numeric lower and upper"
        ) from err
    if not lower < upper or (kind == "loguniform" and lower <= 0):
        raise ConfigError(
            f"tune.space[{key}]: lower={lower} must be below upper={upper}"
            + (" and above 0" if kind == "loguniform" else "")
        )
    return tune.loguniform(lower, upper) if kind == "loguniform" else tune.uniform(lower, upper)


def search_space(cfg: DictConfig) -> dict[str, Any]:
    """``tune.space`` as Tune's param space; each key must name an existing config value."""
    space = cfg.tune.get("space")
    if not space:
        raise ConfigError("tune.space is empty: give at least one key to search over")
    missing = object()
    out = {}
    for key, spec in space.items():
        if any(key == r or key.startswith(f"{r}.") for r in _RESERVED):
            raise ConfigError(f"tune.space[{key}]: {key} is fixed for the whole sweep")
        if OmegaConf.select(cfg, key, default=missing) is missing:
            raise ConfigError(f"tune.space[{key}]: the config has no key {key}")
        out[key] = _domain(key, spec)
    return out


def apply_overrides(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with dotted ``values`` set (numpy scalars become Python ones)."""
    out = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(out, key, value.item() if isinstance(value, np.generic) else value)
    return out


def _first_point(cfg: DictConfig) -> list[dict[str, Any]]:
    """The composed config's own values of the searched keys, as the first trial to run."""
    if not cfg.tune.get("first_trial_from_config", False):
        return []
    point = {}
    for key, spec in cfg.tune.space.items():
        value = OmegaConf.select(cfg, key)
        if spec.type == "grid":
            return []
        inside = (
            value in spec["values"] if spec.type == "choice" else spec.lower <= value <= spec.upper
        )
        if not inside:
            raise ConfigError(
                f"tune.first_trial_from_config: {key}={value} lies outside tune.space[{key}]"
            )
        point[key] = value
    return [point]


def _check_search(cfg: DictConfig) -> None:
    """The searcher can run this space: Optuna is installed and gets no grid entries."""
    if cfg.tune.search != "optuna":
        return
    if any(spec.type == "grid" for spec in cfg.tune.space.values()):
        raise ConfigError("tune.search=optuna cannot take entries of type grid: use choice")
    try:
        import optuna  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "tune.search=optuna needs the optuna package: pip install 'dipro[optuna]'"
        ) from err


def _search_alg(cfg: DictConfig) -> SearchAlgorithm | Searcher:
    """The searcher: seeded random/grid variants, or Optuna's TPE sampler."""
    points, seed = _first_point(cfg), int(cfg.seed)
    if cfg.tune.search == "random":
        return BasicVariantGenerator(
            points_to_evaluate=points or None,
            max_concurrent=int(cfg.tune.max_concurrent_trials),
            random_state=seed,
        )
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(points_to_evaluate=points or None, seed=seed)


def _scheduler(cfg: DictConfig) -> TrialScheduler:
    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    max_t = int(cfg.train.max_epochs)
    return ASHAScheduler(
        time_attr="epoch",
        max_t=max_t,
        grace_period=min(int(cfg.tune.grace_period), max_t),
        reduction_factor=float(cfg.tune.reduction_factor),
    )


def check_sweep(cfg: DictConfig) -> dict[str, Any]:
    """Validate the sweep settings and the data before Ray starts; return the param space."""
    check_config(cfg)
    t = cfg.tune
    if t.search not in SEARCHES:
        raise ConfigError(f"tune.search={t.search!r} is not one of {', '.join(SEARCHES)}")
    if t.scheduler not in SCHEDULERS:
        raise ConfigError(f"tune.scheduler={t.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    for key in ("num_samples", "max_concurrent_trials"):
        if int(t[key]) < 1:
            raise ConfigError(f"tune.{key}={t[key]} must be at least 1")
    if not str(t.name) or "/" in str(t.name):
        raise ConfigError(f"tune.name={t.name!r} must be a non-empty name without '/'")
    space = search_space(cfg)
    _check_search(cfg)
    _first_point(cfg)
    return space


def _expected_trials(cfg: DictConfig) -> int:
    """Trials of the whole sweep: num_samples, times the grid's size when it has one."""
    grid = [len(spec["values"]) for spec in cfg.tune.space.values() if spec.type == "grid"]
    return int(cfg.tune.num_samples) * math.prod(grid)


def _last_epoch(cfg: DictConfig) -> int:
    """The last epoch the run ``cfg.run_name`` recorded (0 for a new run)."""
    return last_logged(epoch_log(run_dir_of(cfg)))


def run_trial(config: dict[str, Any], base: dict[str, Any], sweep: str) -> None:
    """One trial: the training run of ``base`` with the trial's ``config`` overrides, named
    ``{sweep}-{trial id}``. A trial started again (a resumed sweep) continues its Train run; if
    that run had already finished, its final metrics are reported once more so the trial
    completes with them."""
    cfg = apply_overrides(OmegaConf.create(base), config)
    cfg.run_name = f"{sweep}-{tune.get_context().get_trial_id()}"
    run, dataset = check_config(cfg)
    done_before = _last_epoch(cfg)
    result = build_trainer(cfg, run, dataset, callbacks=[TuneReportCallback()]).fit()
    if done_before and result.metrics and int(result.metrics["epoch"]) <= done_before:
        tune.report({**result.metrics, CHECKPOINT_PATH_KEY: result.checkpoint.path})


def _trial_rows(cfg: DictConfig, results: tune.ResultGrid, keys: list[str]) -> pd.DataFrame:
    """One row per trial: id, status, values, epochs, best and last monitor value, checkpoint of
    the best epoch, Train run directory."""
    monitor, mode = cfg.task.monitor, cfg.task.monitor_mode
    rows = []
    for result in results:
        # A trial that never reported is named by its Tune directory.
        trial_id = (result.metrics or {}).get("trial_id") or result.path.rstrip("/").split("/")[-1]
        row: dict[str, Any] = {"trial_id": trial_id}
        row["status"] = "ERROR" if result.error else "TERMINATED"
        row.update({key: result.config.get(key) for key in keys})
        history = result.metrics_dataframe
        if history is not None and monitor in history and history[monitor].notna().any():
            best = history.index[best_index(history[monitor].tolist(), mode)]
            row["epochs"] = int(history["epoch"].max())
            row[f"best {monitor}"] = float(history.loc[best, monitor])
            row["best epoch"] = int(history.loc[best, "epoch"])
            row[f"last {monitor}"] = float(history[monitor].iloc[-1])
            path = history.loc[best].get(CHECKPOINT_PATH_KEY)
            row["checkpoint"] = (
                checkpoint_uri(str(cfg.storage_path), path) if isinstance(path, str) else None
            )
        else:
            row.update({"epochs": 0, f"best {monitor}": math.nan, "checkpoint": None})
        row["train_run"] = run_dir(cfg.storage_path, f"{cfg.tune.name}-{trial_id}")
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values(
        f"best {monitor}", ascending=mode == "min", na_position="last", kind="stable"
    )


def _markdown(table: pd.DataFrame) -> str:
    """The table as a GitHub markdown table (floats to 4 significant digits)."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)
    ]
    return "\n".join(lines) + "\n"


def _write_outputs(cfg: DictConfig, table: pd.DataFrame, keys: list[str]) -> SweepResult:
    """best.yaml, best.json, trials.csv and trials.md in the sweep directory (atomic writes)."""
    monitor = cfg.task.monitor
    sweep_dir = storage.join(cfg.storage_path, cfg.tune.name)
    scored = table[table[f"best {monitor}"].notna()]
    if scored.empty:
        raise RuntimeError(f"no trial of sweep {cfg.tune.name} reported {monitor}")
    best = scored.iloc[0]
    overrides = {key: best[key].item() if hasattr(best[key], "item") else best[key] for key in keys}
    best_cfg = apply_overrides(cfg, overrides)
    best_cfg.run_name = f"{cfg.tune.name}-best"
    resolved = OmegaConf.to_container(best_cfg, resolve=True)
    resolved.pop("tune")
    config_uri = storage.join(sweep_dir, "best.yaml")
    header = (
        f"# Best trial {best['trial_id']} of sweep {cfg.tune.name}: {monitor}="
        f"{best[f'best {monitor}']:.4f} at epoch {best['best epoch']}.\n"
        f"# Train it: python -m ray_jobs.train --config-dir {sweep_dir} --config-name best\n"
    )
    body = yaml.safe_dump(resolved, sort_keys=False)
    storage.write_bytes_atomic(config_uri, (header + body).encode())
    summary = {
        "sweep": cfg.tune.name,
        "trial_id": best["trial_id"],
        "monitor": monitor,
        "value": float(best[f"best {monitor}"]),
        "epoch": int(best["best epoch"]),
        "overrides": overrides,
        "checkpoint": best["checkpoint"],
        "train_run": best["train_run"],
        "config": config_uri,
    }
    storage.write_bytes_atomic(
        storage.join(sweep_dir, "best.json"), json.dumps(summary, indent=2).encode()
    )
    table_uri = storage.join(sweep_dir, "trials.csv")
    storage.write_bytes_atomic(table_uri, table.to_csv(index=False).encode())
    storage.write_bytes_atomic(storage.join(sweep_dir, "trials.md"), _markdown(table).encode())
    return SweepResult(
        sweep_dir=sweep_dir,
        best_trial=str(best["trial_id"]),
        best_value=summary["value"],
        best_overrides=overrides,
        best_config=config_uri,
        best_checkpoint=best["checkpoint"],
        trials_table=table_uri,
        num_trials=len(table),
    )


class TrialLines(tune.Callback):
    """The sweep's console: each trial's epoch line, and a progress line with an ETA as each
    trial ends."""

    def __init__(self, cfg: DictConfig, total: int) -> None:
        self.task, self.monitor = str(cfg.task.name), str(cfg.task.monitor)
        self.max_epochs = int(cfg.train.max_epochs)
        self.progress = Progress(f"[{cfg.tune.name}] trials done", total, every_s=0)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        say(
            f"trial {trial.trial_id}: "
            + format_epoch(self.task, result, self.max_epochs, self.monitor)
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info):
        last = trial.last_result or {}
        self.progress.step(
            note=f"(trial {trial.trial_id}: {self.monitor} {last.get(self.monitor, math.nan):.4f})"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info):
        self.progress.step(note=f"(trial {trial.trial_id} failed; see the log)")


def _track_sweep(
    tracker: tracking.Tracker, cfg: DictConfig, result: SweepResult, table: pd.DataFrame
) -> str | None:
    """The sweep as one MLflow run (its settings, best value, tables and best config) with one
    child run per trial (the trial's config and its Train run's epoch metrics); None when the
    store stopped answering (``dipro.tracking.Tracker.attempt``)."""
    settings = OmegaConf.to_container(cfg.tune, resolve=True)
    parent = tracking.parent_run(
        tracker, result.sweep_dir, str(cfg.tune.name), "sweep", {"tune": settings}
    )
    if parent is None:
        return None
    tracker.log_summary(
        parent, {f"best/{cfg.task.monitor}": result.best_value, "trials": result.num_trials}, ""
    )
    tracker.log_files(
        parent,
        [
            storage.join(result.sweep_dir, f)
            for f in ("trials.csv", "trials.md", "best.yaml", "best.json")
        ],
        None,
    )
    manifest = read_manifest(cfg.data.root, cfg.task.name).to_dict()
    keys = list(cfg.tune.space)
    for row in table.to_dict("records"):
        trial_cfg = apply_overrides(cfg, {k: row[k] for k in keys})
        trial_cfg.run_name = f"{cfg.tune.name}-{row['trial_id']}"
        resolved = OmegaConf.to_container(trial_cfg, resolve=True)
        resolved.pop("tune")
        tracking.track_training(
            tracker, resolved, manifest, parent=parent, register=False, kind="trial"
        )
    tracker.finish(parent)
    return None if tracker.skipped else parent


def run_sweep(cfg: DictConfig, callbacks: list[tune.Callback] | None = None) -> SweepResult:
    """Run (or resume) the sweep ``cfg.tune.name``; write its best config and trial table.

    ``callbacks`` are extra Tune callbacks (loggers, trackers). Raises ConfigError before Ray
    starts on bad settings, RunDirectoryInUse when another process runs this sweep,
    TrackingUnavailable when ``tracking.required`` is true and the store does not answer,
    SweepInterrupted when the sweep stopped before all trials ended.
    """
    space = check_sweep(cfg)
    with run_lock(storage.join(cfg.storage_path, str(cfg.tune.name)), say):
        return _sweep(cfg, space, callbacks)


def _sweep(
    cfg: DictConfig, space: dict[str, Any], callbacks: list[tune.Callback] | None
) -> SweepResult:
    """``run_sweep``'s work, once the sweep directory is locked."""
    name = str(cfg.tune.name)
    sweep_dir = storage.join(cfg.storage_path, name)
    trial_runs = storage.join(str(cfg.storage_path), f"{name}-<trial id>")
    run = settings_of(TrainingRun, cfg)
    tracker = tracking.open_tracker(run.tracking, replay=trial_runs, say=say)
    ensure_ray(run, local_num_cpus(run))
    base = OmegaConf.to_container(cfg, resolve=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, sweep=name), {"CPU": _TRIAL_CPU}
    )
    if tune.Tuner.can_restore(sweep_dir):
        print(f"resuming sweep {name} from {sweep_dir}", flush=True)
        tuner = tune.Tuner.restore(
            sweep_dir, trainable, resume_errored=bool(cfg.tune.resume_errored)
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=cfg.task.monitor,
                mode=cfg.task.monitor_mode,
                num_samples=int(cfg.tune.num_samples),
                search_alg=_search_alg(cfg),
                scheduler=_scheduler(cfg),
                max_concurrent_trials=(
                    int(cfg.tune.max_concurrent_trials) if cfg.tune.search != "random" else None
                ),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(cfg.storage_path),
                verbose=int(cfg.tune.verbose),
                callbacks=[TrialLines(cfg, _expected_trials(cfg)), *(callbacks or [])],
                failure_config=tune.FailureConfig(max_failures=int(cfg.tune.max_failures)),
            ),
        )
    results = tuner.fit()
    finished, expected = results.num_terminated + results.num_errors, _expected_trials(cfg)
    if finished < expected:
        raise SweepInterrupted(
            f"sweep {name} stopped with {finished} of {expected} trials finished; run it "
            f"again with tune.name={name} to resume"
        )
    table = _trial_rows(cfg, results, list(space))
    result = _write_outputs(cfg, table, list(space))
    if tracker is not None:
        _track_sweep(tracker, cfg, result, table)
    return result


@hydra.main(config_path="../configs", config_name="tune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sweep_dir = storage.join(cfg.storage_path, cfg.tune.name)
    errors = exit_on(
        {RunDirectoryInUse: "run directory", tracking.TrackingUnavailable: "tracking"},
        failures=(SweepInterrupted,),
    )
    with errors, session(cfg, str(cfg.tune.name), sweep_dir):
        result = run_sweep(cfg)
    print(
        json.dumps(
            {
                "sweep_dir": result.sweep_dir,
                "best_config": result.best_config,
                "best_value": result.best_value,
                "best_trial": result.best_trial,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
