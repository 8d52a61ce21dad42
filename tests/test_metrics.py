"""The paper's metrics against scikit-learn's own functions; masking, bootstrap, seed summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    auc,
    average_precision_score,
    cohen_kappa_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from dipro import vocab
from dipro.batch import Batch
from dipro.data.collate import IGNORE_INDEX, collate
from dipro.data.schema import records_to_table
from dipro.metrics import (
    TASK_METRICS,
    WEIGHTED_METRICS,
    Predictions,
    bootstrap_ci,
    compute_metrics,
    length_of_stay_metrics,
    mean_std_over_seeds,
    mortality_metrics,
    paired_bootstrap_difference,
    progression_metrics,
)
from dipro.model.output import DiProOutput

K, C = vocab.NUM_FINDINGS, vocab.NUM_PROGRESSION_CLASSES


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _progression_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random probabilities [n, K, 3] and labels with every class present in every finding,
    plus some not-mentioned rows; probabilities weakly informative."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=(n, K))
    labels[:3] = np.array([0, 1, 2])[:, None]
    logits = rng.normal(size=(n, K, C))
    known = labels != vocab.NOT_MENTIONED
    rows, cols = np.nonzero(known)
    logits[rows, cols, labels[known]] += 1.0
    return _softmax(logits), labels


def _reference_pr_auc(y: np.ndarray, p: np.ndarray) -> float:
    areas = []
    for c in range(p.shape[1]):
        prec, rec, _ = precision_recall_curve(y == c, p[:, c])
        areas.append(auc(rec, prec))
    return float(np.mean(areas))


def test_progression_metrics_agree_with_sklearn_per_finding_and_mean():
    probs, labels = _progression_data(120, seed=0)
    out = progression_metrics(probs, labels)
    refs = {m: [] for m in ("precision", "recall", "f1", "auroc", "auprc")}
    for k, finding in enumerate(vocab.FINDINGS):
        keep = labels[:, k] != 3
        y, p = labels[keep, k], probs[keep, k]
        pred = p.argmax(1)
        ref = {
            "precision": precision_score(y, pred, average="macro", zero_division=0),
            "recall": recall_score(y, pred, average="macro", zero_division=0),
            "f1": f1_score(y, pred, average="macro", zero_division=0),
            "auroc": roc_auc_score(y, p, multi_class="ovr", average="macro"),
            "auprc": _reference_pr_auc(y, p),
        }
        for m, v in ref.items():
            assert out[f"per_finding/{finding}/{m}"] == pytest.approx(v, abs=1e-12), (finding, m)
            refs[m].append(v)
        assert out[f"per_finding/{finding}/n"] == keep.sum()
    for m, values in refs.items():
        assert out[m] == pytest.approx(np.mean(values), abs=1e-12)
        assert out[f"n_findings/{m}"] == K


def test_not_mentioned_rows_never_count():
    probs, labels = _progression_data(80, seed=1)
    base = progression_metrics(probs, labels)
    rng = np.random.default_rng(2)
    extra_probs = _softmax(rng.normal(scale=5.0, size=(40, K, C)))
    extra_labels = np.full((40, K), vocab.NOT_MENTIONED)
    grown = progression_metrics(
        np.concatenate([probs, extra_probs]), np.concatenate([labels, extra_labels])
    )
    assert grown == base

    # Garbage predictions on rows that are already not mentioned change nothing either.
    garbage = probs.copy()
    garbage[labels == vocab.NOT_MENTIONED] = np.array([1.0, 0.0, 0.0])
    assert progression_metrics(garbage, labels) == base


def test_progression_finding_with_one_class_is_left_out_of_auroc_mean():
    probs, labels = _progression_data(60, seed=3)
    labels[:, 0] = np.where(labels[:, 0] == 3, 3, 2)  # finding 0: only "no change"
    labels[:, 1] = 3  # finding 1: nothing labelled
    out = progression_metrics(probs, labels)
    first, second = vocab.FINDINGS[0], vocab.FINDINGS[1]
    assert np.isnan(out[f"per_finding/{first}/auroc"])
    assert np.isnan(out[f"per_finding/{second}/f1"])
    assert out["n_findings/auroc"] == K - 2
    assert out["n_findings/f1"] == K - 1
    expected = np.mean([out[f"per_finding/{f}/auroc"] for f in vocab.FINDINGS[2:]])
    assert out["auroc"] == pytest.approx(expected)


def test_mortality_metrics_agree_with_sklearn_and_ignore_absent_labels():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.uniform(size=200) * 0.7, 0, 1)
    out = mortality_metrics(p, y)
    assert out["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert out["auprc"] == pytest.approx(average_precision_score(y, p))
    with_absent = mortality_metrics(
        np.concatenate([p, rng.uniform(size=30)]), np.concatenate([y, np.full(30, IGNORE_INDEX)])
    )
    assert with_absent == out
    assert np.isnan(mortality_metrics(p, np.zeros(200, int))["auroc"])


def test_length_of_stay_metrics_agree_with_sklearn():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 150)
    logits = rng.normal(size=(150, 4))
    logits[np.arange(150), y] += 0.8
    p = _softmax(logits)
    out = length_of_stay_metrics(p, y)
    pred = p.argmax(1)
    assert out["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert out["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert out["precision"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert out["recall"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert out["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert out["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert out["auprc"] == pytest.approx(_reference_pr_auc(y, p))
    padded = length_of_stay_metrics(
        np.concatenate([p, _softmax(rng.normal(size=(20, 4)))]),
        np.concatenate([y, np.full(20, IGNORE_INDEX)]),
    )
    assert padded == out


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_rows():
    def data(n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(6)
        y = rng.integers(0, 2, n)
        return np.clip(0.35 * y + 0.65 * rng.uniform(size=n), 0, 1), y

    small, large = data(100), data(1600)
    ci_small = bootstrap_ci(mortality_metrics, *small, n=200, seed=0)
    ci_large = bootstrap_ci(mortality_metrics, *large, n=200, seed=0)
    for probs_labels, ci in ((small, ci_small), (large, ci_large)):
        point = mortality_metrics(*probs_labels)
        for key in ("auroc", "auprc"):
            low, high = ci[key]
            assert low <= point[key] <= high
    for key in ("auroc", "auprc"):
        assert np.diff(ci_large[key])[0] < 0.5 * np.diff(ci_small[key])[0]
    assert bootstrap_ci(mortality_metrics, *small, n=200, seed=0) == ci_small


def test_bootstrap_progression_resamples_samples():
    probs, labels = _progression_data(60, seed=7)
    ci = bootstrap_ci(progression_metrics, probs, labels, n=30, seed=1)
    point = progression_metrics(probs, labels)
    low, high = ci["f1"]
    assert low <= point["f1"] <= high
    assert f"per_finding/{vocab.FINDINGS[0]}/f1" in ci


def test_mean_std_over_seeds():
    runs = [{"f1": 0.4, "auroc": 0.6}, {"f1": 0.5, "auroc": 0.7}, {"f1": 0.6, "auroc": 0.8, "x": 1}]
    out = mean_std_over_seeds(runs)
    assert set(out) == {"f1", "auroc"}
    assert out["f1"][0] == pytest.approx(0.5)
    assert out["f1"][1] == pytest.approx(np.std([0.4, 0.5, 0.6], ddof=1))


def _batch(n: int, offset: int) -> Batch:
    """Progression records through the real path: records -> Arrow table -> collate."""
    rng = np.random.default_rng(offset)
    recs = [
        {
            "sample_id": f"s{offset + i}",
            "subject_id": offset + i,
            "stay_id": 1000 + offset + i,
            "hospital": 0,
            "split": "test",
            "task": "disease_progression",
            "cxr_times": np.array([0.0, 12.0], np.float32),
            "feature_dim": 4,
            "features": np.zeros((2, vocab.NUM_REGIONS, 4), np.float32),
            "region_present": np.ones((2, vocab.NUM_REGIONS), bool),
            "ehr_times": np.zeros(0, np.float32),
            "ehr_values": np.zeros(0, np.float32),
            "ehr_observed": np.zeros(0, bool),
            "demographics": np.zeros(vocab.NUM_DEMOGRAPHICS, np.float32),
            "region_labels": np.full((1, vocab.NUM_REGIONS, K), 3, np.int8),
            "progression": rng.integers(0, 4, K).astype(np.int8),
        }
        for i in range(n)
    ]
    table = records_to_table(recs)
    return collate({c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names})


def _output(n: int, seed: int) -> DiProOutput:
    g = torch.Generator().manual_seed(seed)
    att = torch.rand(n, vocab.NUM_REGIONS, generator=g)
    return DiProOutput(
        logits=torch.randn(n, K, C, generator=g),
        static=None,
        dynamic=None,
        static_rev=None,
        region_logits=None,
        region_logits_rev=None,
        pair_region_mask=torch.ones(n, 1, vocab.NUM_REGIONS, dtype=torch.bool),
        region_attention=att / att.sum(1, keepdim=True),
    )


def test_predictions_gathered_from_shards_equal_one_pass():
    parts = [
        Predictions.from_output("disease_progression", _batch(n, 10 * i), _output(n, i))
        for i, n in enumerate((5, 3, 7))
    ]
    joined = Predictions.concatenate(parts)
    assert len(joined) == 15
    assert joined.region_attention.shape == (15, vocab.NUM_REGIONS)
    np.testing.assert_array_equal(joined.subject_id[5:8], [10, 11, 12])
    probs = joined.probabilities
    np.testing.assert_allclose(probs.sum(-1), 1.0)
    assert compute_metrics(joined) == progression_metrics(probs, joined.labels)
    again = Predictions.from_arrays(joined.to_arrays())
    assert again.task == joined.task
    np.testing.assert_array_equal(again.logits, joined.logits)


def test_predictions_refuse_mixed_tasks_and_ragged_fields():
    a = Predictions.from_output("disease_progression", _batch(2, 0), _output(2, 0))
    b = Predictions(
        task="mortality",
        logits=np.zeros(2),
        labels=np.zeros(2, int),
        subject_id=np.zeros(2, int),
        stay_id=np.zeros(2, int),
        hospital=np.zeros(2, int),
        region_attention=np.zeros((2, vocab.NUM_REGIONS)),
        region_changed=np.zeros((2, vocab.NUM_REGIONS), bool),
    )
    with pytest.raises(ValueError, match="different tasks"):
        Predictions.concatenate([a, b])
    with pytest.raises(ValueError, match="stay_id has 3 rows"):
        Predictions(
            task="mortality",
            logits=np.zeros(2),
            labels=np.zeros(2, int),
            subject_id=np.zeros(2, int),
            stay_id=np.zeros(3, int),
            hospital=np.zeros(2, int),
            region_attention=np.zeros((2, vocab.NUM_REGIONS)),
            region_changed=np.zeros((2, vocab.NUM_REGIONS), bool),
        )


def test_paired_bootstrap_difference_scores_both_models_on_the_same_draws():
    rng = np.random.default_rng(8)
    labels = (rng.random(80) < 0.4).astype(np.int64)
    good = np.clip(0.5 * labels + 0.5 * rng.random(80), 0, 1)
    weak = rng.random(80)
    fn = mortality_metrics
    got = paired_bootstrap_difference(fn, [good], [weak], labels, n=40, seed=3)
    assert got["auroc"]["difference"] == pytest.approx(
        roc_auc_score(labels, good) - roc_auc_score(labels, weak)
    )
    # the interval: the same 40 draws of rows, each scoring both models on that draw
    draws = np.random.default_rng(3)
    diffs = []
    for _ in range(40):
        idx = draws.integers(0, 80, size=80)
        diffs.append(roc_auc_score(labels[idx], good[idx]) - roc_auc_score(labels[idx], weak[idx]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    assert (got["auroc"]["low"], got["auroc"]["high"]) == pytest.approx((low, high))
    assert got["auroc"]["low"] > 0
    same = paired_bootstrap_difference(fn, [good], [good], labels, n=10)
    assert same["auroc"] == {"difference": 0.0, "low": 0.0, "high": 0.0}


def test_paired_bootstrap_over_runs_averages_each_runs_difference_on_shared_draws():
    """Two runs of each model whose scores live on different scales: each run is ranked on its
    own, so a model that ranks the rows the same way in every run differs by 0 from itself
    rescaled, where pooling the runs' rows into one ranking would not."""
    rng = np.random.default_rng(5)
    labels = (rng.random(60) < 0.4).astype(np.int64)
    run1 = np.clip(0.4 * labels + 0.6 * rng.random(60), 0.01, 0.99)
    run2 = 0.5 * run1  # the same ranking, another calibration
    weak1, weak2 = rng.random(60), rng.random(60)
    got = paired_bootstrap_difference(
        mortality_metrics, [run1, run2], [weak1, weak2], labels, n=30, seed=1
    )
    pairs = ((run1, weak1), (run2, weak2))
    expected = np.mean([roc_auc_score(labels, a) - roc_auc_score(labels, b) for a, b in pairs])
    assert got["auroc"]["difference"] == pytest.approx(expected)
    draws = np.random.default_rng(1)
    diffs = []
    for _ in range(30):
        idx = draws.integers(0, 60, size=60)
        diffs.append(
            np.mean(
                [
                    roc_auc_score(labels[idx], a[idx]) - roc_auc_score(labels[idx], b[idx])
                    for a, b in pairs
                ]
            )
        )
    assert (got["auroc"]["low"], got["auroc"]["high"]) == pytest.approx(
        tuple(np.percentile(diffs, [2.5, 97.5]))
    )
    itself = paired_bootstrap_difference(mortality_metrics, [run1, run2], [run2, run1], labels, n=5)
    assert itself["auroc"]["difference"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="2 runs of model a against 1"):
        paired_bootstrap_difference(mortality_metrics, [run1, run2], [weak1], labels)


@pytest.mark.parametrize("task", ["disease_progression", "mortality", "length_of_stay"])
def test_every_resample_scored_at_once_equals_the_metric_on_the_resampled_rows(task: str) -> None:
    """The bootstrap scores all resamples at once as weight rows; each must equal the metric
    function on the rows that resample drew, ties and classes missing from a draw included."""
    rng = np.random.default_rng(11)
    n = 40
    if task == "disease_progression":
        probs, labels = _progression_data(n, seed=2)
        probs = np.round(probs, 1)  # ties within a finding's scores
    elif task == "mortality":
        labels = (rng.random(n) < 0.3).astype(np.int64)
        labels[:3] = IGNORE_INDEX
        probs = np.round(rng.random(n), 1)
    else:
        labels = rng.choice(4, n, p=[0.5, 0.3, 0.15, 0.05])
        probs = _softmax(np.round(rng.normal(size=(n, 4)) + np.eye(4)[labels], 1))
    metric_fn = TASK_METRICS[task]
    draws = [rng.integers(0, n, size=n) for _ in range(25)] + [np.zeros(n, np.int64)]
    weights = np.stack([np.bincount(idx, minlength=n) for idx in draws]).astype(float)
    got = WEIGHTED_METRICS[metric_fn](probs, labels, weights)
    for row, idx in enumerate(draws):
        expected = metric_fn(probs[idx], labels[idx])
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key][row] == pytest.approx(value, abs=1e-12, nan_ok=True), (row, key)


def test_bootstrap_of_a_metric_without_a_resampled_form_is_refused() -> None:
    with pytest.raises(ValueError, match="no resampled form"):
        bootstrap_ci(lambda p, y: {"x": 0.0}, np.zeros(4), np.zeros(4), n=2)
