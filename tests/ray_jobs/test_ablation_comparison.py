"""The paired comparison of ablations.json: DiPro minus a variant per seed and its mean over
seeds with a bootstrap interval over the test samples the seeds share."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from dipro import vocab
from dipro.config import ConfigError
from dipro.metrics import Predictions, mortality_metrics
from dipro.runs import RUN_CONFIG_FILE, SUMMARY_FILE
from ray_jobs.experiments import _finished, paired_comparison


def _mortality(labels: np.ndarray, scores: np.ndarray) -> Predictions:
    n = labels.shape[0]
    ids = np.arange(n)
    logits = np.log(scores / (1.0 - scores)).astype(np.float32)
    flat = np.full((n, vocab.NUM_REGIONS), 1.0 / vocab.NUM_REGIONS, np.float32)
    changed = np.zeros((n, vocab.NUM_REGIONS), bool)
    return Predictions("mortality", logits, labels, ids, ids, ids % 2, flat, changed)


def test_paired_comparison_per_seed_and_their_mean():
    rng = np.random.default_rng(2)
    labels = (rng.random(60) < 0.4).astype(np.int64)
    full = [_mortality(labels, np.clip(0.6 * labels + 0.4 * rng.random(60), 0.01, 0.99))]
    full.append(_mortality(labels, np.clip(0.5 * labels + 0.5 * rng.random(60), 0.01, 0.99)))
    weak = [_mortality(labels, rng.uniform(0.05, 0.95, 60)) for _ in range(2)]
    out = paired_comparison("mortality", full, weak, resamples=50, seed=0, level=0.95)
    for s in range(2):
        expected = (
            mortality_metrics(full[s].probabilities, labels)["auroc"]
            - mortality_metrics(weak[s].probabilities, labels)["auroc"]
        )
        assert out["per_seed"][s]["auroc"] == pytest.approx(expected)
    mean = np.mean([out["per_seed"][s]["auroc"] for s in range(2)])
    assert out["samples"] == 60
    assert out["mean_over_seeds"]["auroc"]["difference"] == pytest.approx(mean)
    assert out["mean_over_seeds"]["auroc"]["low"] > 0


def test_paired_comparison_refuses_other_samples():
    labels = np.array([0, 1, 0, 1])
    a = _mortality(labels, np.full(4, 0.5))
    b = Predictions(**{**a.__dict__, "stay_id": np.arange(4) + 10})
    with pytest.raises(ValueError, match="same test samples"):
        paired_comparison("mortality", [a], [b], resamples=5, seed=0, level=0.95)


def test_a_finished_run_is_reused_whatever_data_overwrite_says_but_not_on_other_data(tmp_path):
    run = tmp_path / "run"
    checkpoint = run / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    trained = {"task": {"name": "mortality"}, "data": {"root": "/d", "overwrite": True}, "seed": 1}
    (checkpoint / RUN_CONFIG_FILE).write_text(json.dumps(trained))
    summary = {"test": {"auroc": 0.8}, "best_checkpoint": str(checkpoint / "model.pt")}
    (run / SUMMARY_FILE).write_text(json.dumps(summary))
    again = OmegaConf.create({**trained, "data": {"root": "/d", "overwrite": False}})
    assert _finished(again, str(run)) == summary
    elsewhere = OmegaConf.create({**trained, "data": {"root": "/other", "overwrite": True}})
    with pytest.raises(ConfigError, match="other data settings"):
        _finished(elsewhere, str(run))
