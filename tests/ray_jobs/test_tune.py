"""The real ``run_sweep`` on Ray Tune over the tiny cohort: a sweep whose best config trains with
``ray_jobs.train`` unchanged, an interrupted sweep that resumes, and bad sweep settings."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, TINY_MODEL
from hydra import compose, initialize_config_dir
from local_ray import ensure_ray
from omegaconf import DictConfig, OmegaConf, open_dict
from ray import tune

from dipro.checkpoint import load_checkpoint
from dipro.config import ConfigError
from ray_jobs.training import run_training
from ray_jobs.tune import SweepInterrupted, check_sweep, run_sweep

pytestmark = pytest.mark.ray

SPACE = {
    "optim.lr": {"type": "loguniform", "lower": 1e-4, "upper": 1e-2},
    "loss.dyn": {"type": "uniform", "lower": 0.05, "upper": 0.5},
}


def compose_tune(data_root: Path, runs: Path, name: str, *extra: str) -> DictConfig:
    """The real ``configs/tune.yaml``: mortality, the tiny model, one epoch, one worker, two
    trials one at a time, over ``SPACE``."""
    overrides = [
        "task=mortality",
        f"data.root={data_root}",
        f"storage_path={runs}",
        *TINY_MODEL,
        "train.max_epochs=1",
        "scaling.num_workers=1",
        f"tune.name={name}",
        "tune.num_samples=2",
        "tune.max_concurrent_trials=1",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("tune", overrides=overrides)
    cfg.tune.space = OmegaConf.create(SPACE)
    return cfg


def _trial_runs(runs: Path, name: str) -> dict[str, list[dict]]:
    """Epoch records of every trial's Train run ``{name}-{trial id}``."""
    out = {}
    for path in sorted(runs.glob(f"{name}-*/epoch_metrics.jsonl")):
        out[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def _trials(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tiny_data_root, tmp_path_factory):
    """A finished two-trial sweep named ``sweep``: its result and its storage path."""
    ensure_ray()
    runs = tmp_path_factory.mktemp("runs")
    return run_sweep(compose_tune(tiny_data_root, runs, "sweep")), runs


@pytest.mark.slow
def test_sweep_best_config_trains_unchanged(sweep):
    result, tmp_path = sweep
    sweep_dir = tmp_path / "sweep"
    trials = _trials(sweep_dir)
    assert len(trials) == result.num_trials == 2
    assert all(t["status"] == "TERMINATED" and t["epochs"] == "1" for t in trials)
    # The first trial runs the composed config's own values; the second is sampled.
    assert {float(t["optim.lr"]) for t in trials} >= {1e-3}
    for t in trials:
        assert 1e-4 <= float(t["optim.lr"]) <= 1e-2 and 0.05 <= float(t["loss.dyn"]) <= 0.5
    assert set(_trial_runs(tmp_path, "sweep")) == {f"sweep-{t['trial_id']}" for t in trials}
    values = [float(t["best val/auprc"]) for t in trials]
    assert result.best_value == max(values) and not math.isnan(result.best_value)
    assert (sweep_dir / "trials.md").read_text().count("\n") == 4

    summary = json.loads((sweep_dir / "best.json").read_text())
    assert summary["trial_id"] == result.best_trial
    _, meta = load_checkpoint(summary["checkpoint"])
    assert meta.task == "mortality" and meta.epoch == 1

    # best.yaml is a primary config for ray_jobs.train, as `--config-dir DIR --config-name best`.
    with initialize_config_dir(config_dir=str(sweep_dir), version_base="1.3"):
        best = compose("best")
    assert best.optim.lr == pytest.approx(summary["overrides"]["optim.lr"])
    assert best.loss.dyn == pytest.approx(summary["overrides"]["loss.dyn"])
    trained = run_training(best)
    assert trained.run_dir == str(tmp_path / "sweep-best")
    metrics = json.loads((tmp_path / "sweep-best" / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and 0.0 <= metrics["test"]["auroc"] <= 1.0


class _InterruptAfterFirstTrial(tune.Callback):
    """Ctrl-C, sent to this process once the first trial has finished."""

    def __init__(self) -> None:
        self.sent = False

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
    sweep, tiny_data_root, ray_session, tmp_path
):
    cfg = compose_tune(tiny_data_root, tmp_path, "resumed")
    with pytest.raises(SweepInterrupted, match="1 of 2 trials finished"):
        run_sweep(cfg, callbacks=[_InterruptAfterFirstTrial()])
    finished = {run: epochs for run, epochs in _trial_runs(tmp_path, "resumed").items()}
    assert len(finished) == 1 and [e["epoch"] for e in next(iter(finished.values()))] == [1]
    (first_run,) = finished
    tune_results = {p.parent.name: p.read_text() for p in tmp_path.glob("resumed/*/result.json")}
    first_result = next(text for text in tune_results.values() if text.strip())

    result = run_sweep(cfg)

    runs = _trial_runs(tmp_path, "resumed")
    assert len(runs) == 2 and all([e["epoch"] for e in r] == [1] for r in runs.values())
    assert runs[first_run] == finished[first_run], "the finished trial trained again"
    after = [p.read_text() for p in tmp_path.glob("resumed/*/result.json")]
    assert len(after) == 2 and first_result in after, "the finished trial reported again"
    assert all(len(text.splitlines()) == 1 for text in after)
    assert result.num_trials == 2

    # The same seed gives the same trials in the same order, with the same results, as the
    # uninterrupted sweep of the same settings.
    reference, reference_runs = sweep
    keys = ("optim.lr", "loss.dyn", "epochs", "best val/auprc")
    got = [{k: t[k] for k in keys} for t in _trials(tmp_path / "resumed")]
    assert got == [{k: t[k] for k in keys} for t in _trials(reference_runs / "sweep")]
    assert result.best_value == reference.best_value


def test_optuna_searcher_drives_a_sweep(tiny_data_root, ray_session, tmp_path):
    cfg = compose_tune(
        tiny_data_root,
        tmp_path,
        "optuna",
        "tune.search=optuna",
        "tune.num_samples=1",
        "tune.first_trial_from_config=false",
        "tune.scheduler=fifo",
    )
    result = run_sweep(cfg)

    assert result.num_trials == 1 and Path(result.best_config).exists()
    assert 1e-4 <= result.best_overrides["optim.lr"] <= 1e-2
    # Tune keeps a Searcher's state (Optuna's study) next to the experiment state.
    assert list((tmp_path / "optuna").glob("searcher-state-*.pkl"))


@pytest.mark.parametrize(
    ("settings", "space", "message"),
    [
        ({"tune.search": "bayes"}, {}, "bayes"),
        ({"tune.num_samples": 0}, {}, "num_samples"),
        ({}, {"model.no_such_key": {"type": "uniform", "lower": 0, "upper": 1}}, "no_such_key"),
        ({}, {"model.dropout": {"type": "normal"}}, "normal"),
        ({}, {"model.dropout": {"type": "uniform", "lower": 0.5, "upper": 0.1}}, "below"),
        ({}, {"model.d_model": {"type": "choice", "values": []}}, "values"),
        ({}, {"storage_path": {"type": "choice", "values": ["/x"]}}, "fixed for the whole sweep"),
        ({}, {"optim.lr": {"type": "uniform", "lower": 0.1, "upper": 0.2}}, "outside"),
        ({"tune.search": "optuna"}, {"seed": {"type": "grid", "values": [1, 2]}}, "grid"),
    ],
)
def test_bad_sweep_settings_fail_before_ray(tiny_data_root, tmp_path, settings, space, message):
    cfg = compose_tune(tiny_data_root, tmp_path, "bad")
    with open_dict(cfg):
        for key, value in settings.items():
            OmegaConf.update(cfg, key, value)
        cfg.tune.space.update(space)
    with pytest.raises(ConfigError, match=message):
        check_sweep(cfg)


def test_optuna_search_without_optuna_says_how_to_install(tiny_data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the optional extra were missing
    cfg = compose_tune(tiny_data_root, tmp_path, "no-optuna", "tune.search=optuna")
    with pytest.raises(ConfigError, match=r"dipro\[optuna\]"):
        check_sweep(cfg)
