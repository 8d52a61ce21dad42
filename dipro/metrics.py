"""The paper's evaluation metrics (docs/model.md, "Metrics") on predictions gathered from workers.

Everything here works on numpy arrays of one whole split: shards of ``Predictions`` from Ray
workers or Flower sites are joined with ``Predictions.concatenate`` first, and only then is a
metric computed. Nothing in this module is distributed.

| task                | probabilities | labels  | rows that count                    |
|---------------------|---------------|---------|------------------------------------|
| disease_progression | [N, K, 3]     | [N, K]  | per finding, code != 3 (labelled)  |
| mortality           | [N]           | [N]     | label != IGNORE_INDEX              |
| length_of_stay      | [N, 4]        | [N]     | label != IGNORE_INDEX              |

Definitions (scikit-learn does the arithmetic):

- precision, recall, f1: macro average over the classes present in the labels or the
  predictions (scikit-learn's default label set), ``zero_division=0``.
- auroc (multi-class): one-vs-rest, the mean of class c's binary AUROC of ``p[:, c]`` over the
  classes that have both positive and negative rows; equal to
  ``roc_auc_score(..., multi_class="ovr")`` when every class is present. NaN when no class
  qualifies (the labels hold a single class).
- auprc (multi-class): macro PR-AUC, the trapezoid area (``auc``) under each class's
  ``precision_recall_curve``, averaged over the classes present in the labels.
- auprc (mortality): average precision.
- progression: each metric per finding on that finding's labelled rows, then the mean over
  findings; a finding whose metric is NaN (no labelled row, or a single class for AUROC) is
  left out of that mean, and ``n_findings/<metric>`` says how many findings entered it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    auc,
    average_precision_score,
    cohen_kappa_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
)

from dipro import vocab
from dipro.batch import Batch
from dipro.data.collate import IGNORE_INDEX
from dipro.model.output import DiProOutput

MetricFn = Callable[..., dict[str, float]]

_CLASS_METRICS = ("precision", "recall", "f1", "auroc", "auprc")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Predictions:
    """Predictions of one task on a set of samples, in numpy, ready to be gathered and joined.

    | field            | shape                        | meaning                                 |
    |------------------|------------------------------|-----------------------------------------|
    | logits           | [N, K, 3] / [N] / [N, 4]     | progression / mortality / length of stay |
    | labels           | [N, K] / [N] / [N]           | codes (3 = not mentioned) / 0-1 / 0..3; |
    |                  |                              | IGNORE_INDEX where absent               |
    | subject_id       | [N]                          |                                         |
    | stay_id          | [N]                          |                                         |
    | hospital         | [N]                          | site                                    |
    | region_attention | [N, R]                       | attention of the task tokens on regions |
    | region_changed   | [N, R]                       | bool: the region's label says worsened  |
    |                  |                              | or improved in some pair and finding    |
    """

    task: str
    logits: np.ndarray
    labels: np.ndarray
    subject_id: np.ndarray
    stay_id: np.ndarray
    hospital: np.ndarray
    region_attention: np.ndarray
    region_changed: np.ndarray

    def __post_init__(self) -> None:
        if self.task not in vocab.TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {vocab.TASKS}")
        n = self.logits.shape[0]
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray) and value.shape[0] != n:
                raise ValueError(f"Predictions.{f.name} has {value.shape[0]} rows, logits have {n}")

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def probabilities(self) -> np.ndarray:
        """Softmax over classes (progression, LOS) or sigmoid (mortality), in float64."""
        logits = self.logits.astype(np.float64)
        if self.task == "mortality":
            return 1.0 / (1.0 + np.exp(-logits))
        return _softmax(logits)

    @classmethod
    def from_output(cls, task: str, batch: Batch, output: DiProOutput) -> Predictions:
        """The predictions of one forward pass, moved to the CPU as numpy."""
        labels = {
            "disease_progression": batch.progression,
            "mortality": batch.mortality,
            "length_of_stay": batch.los_class,
        }[task]

        def cpu(t: torch.Tensor) -> np.ndarray:
            return t.detach().float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()

        region = batch.region_labels  # [B, P, R, K]
        moved = (region == vocab.WORSENED) | (region == vocab.IMPROVED)
        changed = (moved & batch.pair_mask[:, :, None, None]).any(dim=-1).any(dim=1)  # [B, R]

        return cls(
            task=task,
            logits=cpu(output.logits),
            labels=cpu(labels),
            subject_id=cpu(batch.subject_id),
            stay_id=cpu(batch.stay_id),
            hospital=cpu(batch.hospital),
            region_attention=cpu(output.region_attention),
            region_changed=cpu(changed),
        )

    @classmethod
    def empty(cls, task: str) -> Predictions:
        """No predictions (a worker or site with no batch), shaped for ``task``."""
        logits = {
            "disease_progression": np.zeros((0, vocab.NUM_FINDINGS, vocab.NUM_PROGRESSION_CLASSES)),
            "mortality": np.zeros(0),
            "length_of_stay": np.zeros((0, vocab.NUM_LOS_CLASSES)),
        }[task].astype(np.float32)
        labels = np.zeros((0, vocab.NUM_FINDINGS) if task == "disease_progression" else 0, np.int64)
        ids = np.zeros(0, np.int64)
        return cls(
            task=task,
            logits=logits,
            labels=labels,
            subject_id=ids,
            stay_id=ids,
            hospital=ids,
            region_attention=np.zeros((0, vocab.NUM_REGIONS), np.float32),
            region_changed=np.zeros((0, vocab.NUM_REGIONS), bool),
        )

    @classmethod
    def concatenate(cls, parts: Sequence[Predictions]) -> Predictions:
        """Join shards of predictions (from batches, workers or sites) of one task, in order."""
        if not parts:
            raise ValueError("no predictions to concatenate")
        tasks = {p.task for p in parts}
        if len(tasks) != 1:
            raise ValueError(f"cannot concatenate predictions of different tasks {sorted(tasks)}")
        arrays = {
            f.name: np.concatenate([getattr(p, f.name) for p in parts])
            for f in fields(cls)
            if f.name != "task"
        }
        return cls(task=parts[0].task, **arrays)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fields as a dict of numpy arrays (the task as a 0-d string array), for transport."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "task"}
        out["task"] = np.array(self.task)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Predictions:
        """Inverse of ``to_arrays``."""
        values = {f.name: np.asarray(arrays[f.name]) for f in fields(cls) if f.name != "task"}
        return cls(task=str(arrays["task"]), **values)


def _class_curves(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """One-vs-rest macro AUROC and macro PR-AUC (trapezoid) of probs [n, C] against labels [n].

    AUROC averages the classes with both positive and negative rows; PR-AUC the classes with at
    least one positive row. NaN where no class qualifies.
    """
    aurocs, pr_aucs = [], []
    for c in range(probs.shape[1]):
        positive = labels == c
        n_pos = int(positive.sum())
        if n_pos == 0:
            continue
        precision, recall, _ = precision_recall_curve(positive, probs[:, c])
        pr_aucs.append(auc(recall, precision))
        if n_pos < len(labels):
            aurocs.append(roc_auc_score(positive, probs[:, c]))
    auroc = float(np.mean(aurocs)) if aurocs else float("nan")
    pr_auc = float(np.mean(pr_aucs)) if pr_aucs else float("nan")
    return auroc, pr_auc


def multiclass_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Macro precision/recall/F1, accuracy, Cohen's kappa, OvR AUROC and macro PR-AUC.

    probs [n, C] (rows sum to 1), labels [n] in 0..C-1, every row counts. NaN everywhere when
    n = 0.
    """
    if len(labels) == 0:
        return {k: float("nan") for k in (*_CLASS_METRICS, "accuracy", "kappa")}
    pred = probs.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, pred, average="macro", zero_division=0
    )
    auroc, pr_auc = _class_curves(labels, probs)
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auroc": auroc,
        "auprc": pr_auc,
        "accuracy": float(accuracy_score(labels, pred)),
        "kappa": _kappa(labels, pred),
    }


def _kappa(labels: np.ndarray, pred: np.ndarray) -> float:
    """Cohen's kappa; NaN for a single sample, or when the labels and predictions hold one class
    between them (the chance agreement is then 1 and kappa 0/0, which sklearn answers with two
    warnings)."""
    if len(labels) < 2 or len(np.union1d(labels, pred)) < 2:
        return float("nan")
    return float(cohen_kappa_score(labels, pred))


def progression_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-finding metrics on labelled rows (code != 3), and their mean over findings.

    probs [N, K, 3], labels [N, K] with codes 0..3. Keys: ``precision``, ``recall``, ``f1``,
    ``auroc``, ``auprc`` (means over findings), ``n_findings/<metric>``, and
    ``per_finding/<finding>/<metric>`` plus ``per_finding/<finding>/n`` (labelled rows).
    """
    _check_rows(probs, labels)
    if probs.shape[1:] != (vocab.NUM_FINDINGS, vocab.NUM_PROGRESSION_CLASSES):
        raise ValueError(f"progression probabilities have shape {probs.shape}, expected [N, K, 3]")
    out: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {m: [] for m in _CLASS_METRICS}
    for k, finding in enumerate(vocab.FINDINGS):
        labelled = labels[:, k] != vocab.NOT_MENTIONED
        scores = multiclass_metrics(probs[labelled, k], labels[labelled, k])
        out[f"per_finding/{finding}/n"] = float(labelled.sum())
        for m in _CLASS_METRICS:
            out[f"per_finding/{finding}/{m}"] = scores[m]
            per_metric[m].append(scores[m])
    for m, values in per_metric.items():
        finite = [v for v in values if not np.isnan(v)]
        out[m] = float(np.mean(finite)) if finite else float("nan")
        out[f"n_findings/{m}"] = float(len(finite))
    return out


def mortality_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC (average precision) of probs [N] against labels [N] in {0, 1}.

    Rows labelled IGNORE_INDEX do not count; NaN when the counted labels hold one class.
    """
    _check_rows(probs, labels)
    keep = labels != IGNORE_INDEX
    y, p = labels[keep], probs[keep]
    if len(np.unique(y)) < 2:
        return {"auroc": float("nan"), "auprc": float("nan")}
    return {
        "auroc": float(roc_auc_score(y, p)),
        "auprc": float(average_precision_score(y, p)),
    }


def length_of_stay_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Kappa, accuracy, macro P/R/F1, OvR AUROC and macro PR-AUC over 4 LOS classes.

    probs [N, 4], labels [N]; rows labelled IGNORE_INDEX do not count.
    """
    _check_rows(probs, labels)
    keep = labels != IGNORE_INDEX
    return multiclass_metrics(probs[keep], labels[keep])


TASK_METRICS: dict[str, MetricFn] = {
    "disease_progression": progression_metrics,
    "mortality": mortality_metrics,
    "length_of_stay": length_of_stay_metrics,
}


def compute_metrics(predictions: Predictions) -> dict[str, float]:
    """The task's metrics on a whole (gathered) set of predictions."""
    return TASK_METRICS[predictions.task](predictions.probabilities, predictions.labels)


def _check_rows(probs: np.ndarray, labels: np.ndarray) -> None:
    if probs.shape[0] != labels.shape[0]:
        raise ValueError(f"{probs.shape[0]} rows of probabilities but {labels.shape[0]} labels")


# Bootstrap resamples as weights: a resample that draws row i c_i times is the row of counts c
# [n], and every metric below is computed for a block of such rows [B, n] at once, with the
# definitions of the module docstring (ties, undefined cases and the classes that count
# included). The weighted forms equal the metric functions above on the resampled rows.

_RESAMPLE_BLOCK = 200  # resamples scored together; bounds memory at B x n x a few arrays


def _binary_weighted(
    scores: np.ndarray, positive: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """AUROC, average precision and trapezoid PR-AUC of ``scores`` [n] against ``positive`` [n]
    under each row of ``weights`` [B, n], plus the positive and negative weight [B].

    Rows are grouped by distinct score, highest first (a threshold each, as scikit-learn's
    curves); AUROC counts a tie between a positive and a negative as one half. A group of
    zero weight repeats the previous curve point and adds no area. NaN where a side is empty."""
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    w = weights[:, order]
    is_pos = positive[order]
    pos = np.add.reduceat(w * is_pos, starts, axis=1)
    neg = np.add.reduceat(w * ~is_pos, starts, axis=1)
    tps, fps = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    n_pos, n_neg = tps[:, -1], fps[:, -1]
    both = (n_pos > 0) & (n_neg > 0)
    below = n_neg[:, None] - fps  # negative weight scored below each group
    auroc = np.full(w.shape[0], np.nan)
    auroc[both] = (pos * (below + 0.5 * neg)).sum(1)[both] / (n_pos * n_neg)[both]
    called = tps + fps
    precision = np.ones_like(tps)
    np.divide(tps, called, out=precision, where=called > 0)
    has_pos = n_pos > 0
    recall = np.zeros_like(tps)
    np.divide(tps, n_pos[:, None], out=recall, where=has_pos[:, None])
    step = np.diff(recall, axis=1, prepend=0.0)
    before = np.concatenate([np.ones((w.shape[0], 1)), precision[:, :-1]], axis=1)
    average_precision = np.where(has_pos, (step * precision).sum(1), np.nan)
    pr_auc = np.where(has_pos, (step * 0.5 * (precision + before)).sum(1), np.nan)
    return {
        "auroc": auroc,
        "average_precision": average_precision,
        "pr_auc": pr_auc,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def _mean_defined(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean over axis 1 of the defined (non-NaN) entries of ``values`` [B, m] and how many
    there were; NaN where none is."""
    defined = ~np.isnan(values)
    count = defined.sum(1)
    total = np.where(defined, values, 0.0).sum(1)
    mean = np.full(values.shape[0], np.nan)
    np.divide(total, count, out=mean, where=count > 0)
    return mean, count


def _multiclass_weighted(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """``multiclass_metrics`` of probs [n, C] against labels [n] under each row of weights
    [B, n]."""
    B, C = weights.shape[0], probs.shape[1]
    pred = probs.argmax(axis=1)
    cells = np.zeros((labels.shape[0], C * C))
    cells[np.arange(labels.shape[0]), labels * C + pred] = 1.0
    cm = (weights @ cells).reshape(B, C, C)  # rows: true class, columns: predicted class
    true, called = cm.sum(2), cm.sum(1)
    hit = np.diagonal(cm, axis1=1, axis2=2)
    present = (true > 0) | (called > 0)
    precision_c, recall_c, f1_c = np.zeros((B, C)), np.zeros((B, C)), np.zeros((B, C))
    np.divide(hit, called, out=precision_c, where=called > 0)
    np.divide(hit, true, out=recall_c, where=true > 0)
    np.divide(2.0 * hit, true + called, out=f1_c, where=(true + called) > 0)
    n_present = present.sum(1)
    total = true.sum(1)
    rows = total > 0
    out: dict[str, np.ndarray] = {}
    for name, per_class in (("precision", precision_c), ("recall", recall_c), ("f1", f1_c)):
        out[name] = np.full(B, np.nan)
        out[name][rows] = (per_class * present).sum(1)[rows] / n_present[rows]
    aurocs, pr_aucs = np.full((B, C), np.nan), np.full((B, C), np.nan)
    for c in range(C):
        curves = _binary_weighted(probs[:, c], labels == c, weights)
        aurocs[:, c], pr_aucs[:, c] = curves["auroc"], curves["pr_auc"]
    out["auroc"], out["auprc"] = _mean_defined(aurocs)[0], _mean_defined(pr_aucs)[0]
    accuracy = np.full(B, np.nan)
    np.divide(hit.sum(1), total, out=accuracy, where=rows)
    out["accuracy"] = accuracy
    chance = np.full(B, np.nan)
    np.divide((true * called).sum(1), total**2, out=chance, where=rows)
    kappa = np.full(B, np.nan)
    defined = (total >= 2) & (n_present >= 2)
    kappa[defined] = (accuracy - chance)[defined] / (1.0 - chance)[defined]
    out["kappa"] = kappa
    return out


def _progression_weighted(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """``progression_metrics`` under each row of weights [B, N]."""
    out: dict[str, np.ndarray] = {}
    per_metric: dict[str, list[np.ndarray]] = {m: [] for m in _CLASS_METRICS}
    for k, finding in enumerate(vocab.FINDINGS):
        labelled = labels[:, k] != vocab.NOT_MENTIONED
        w = weights[:, labelled]
        scores = _multiclass_weighted(probs[labelled, k], labels[labelled, k], w)
        out[f"per_finding/{finding}/n"] = w.sum(1)
        for m in _CLASS_METRICS:
            out[f"per_finding/{finding}/{m}"] = scores[m]
            per_metric[m].append(scores[m])
    for m, values in per_metric.items():
        mean, count = _mean_defined(np.stack(values, axis=1))
        out[m], out[f"n_findings/{m}"] = mean, count.astype(np.float64)
    return out


def _mortality_weighted(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """``mortality_metrics`` under each row of weights [B, N]."""
    keep = labels != IGNORE_INDEX
    curves = _binary_weighted(probs[keep], labels[keep] == 1, weights[:, keep])
    return {"auroc": curves["auroc"], "auprc": curves["average_precision"]}


def _length_of_stay_weighted(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """``length_of_stay_metrics`` under each row of weights [B, N]."""
    keep = labels != IGNORE_INDEX
    return _multiclass_weighted(probs[keep], labels[keep], weights[:, keep])


WeightedMetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]

# Each task metric's resampled form: (probs, labels, weights [B, n]) -> {metric: [B]}.
WEIGHTED_METRICS: dict[MetricFn, WeightedMetricFn] = {
    progression_metrics: _progression_weighted,
    mortality_metrics: _mortality_weighted,
    length_of_stay_metrics: _length_of_stay_weighted,
}


def _weighted_form(metric_fn: MetricFn) -> WeightedMetricFn:
    try:
        return WEIGHTED_METRICS[metric_fn]
    except KeyError:
        raise ValueError(
            f"no resampled form of {getattr(metric_fn, '__name__', metric_fn)!r}; "
            f"bootstrap one of {[f.__name__ for f in WEIGHTED_METRICS]}"
        ) from None


def _resample_counts(rows: int, n: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of bootstrap resamples as counts [B, rows]: each of the ``n`` draws takes ``rows``
    rows with replacement (``Generator.integers``, in order)."""
    rng = np.random.default_rng(seed)
    for first in range(0, n, _RESAMPLE_BLOCK):
        block = min(_RESAMPLE_BLOCK, n - first)
        yield np.stack(
            [np.bincount(rng.integers(0, rows, size=rows), minlength=rows) for _ in range(block)]
        ).astype(np.float64)


def bootstrap_ci(
    metric_fn: MetricFn,
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric ``metric_fn(probs, labels)`` returns.

    Rows (samples; for progression a row holds all K findings of a sample) are drawn with
    replacement ``n`` times, and every resample is scored at once (a block of weight rows, see
    above). A resample where a metric is undefined (NaN, e.g. one class only) is left out of
    that metric's interval; a metric undefined in every resample gets (NaN, NaN).
    """
    _check_rows(probs, labels)
    _check_level(level)
    weighted = _weighted_form(metric_fn)
    blocks = [weighted(probs, labels, w) for w in _resample_counts(labels.shape[0], n, seed)]
    return {key: _percentiles(np.concatenate([b[key] for b in blocks]), level) for key in blocks[0]}


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of the defined (non-NaN) values; (NaN, NaN)
    when none is defined."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(arr, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_bootstrap_difference(
    metric_fn: MetricFn,
    probs_a: Sequence[np.ndarray],
    probs_b: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Model a minus model b on the same rows, averaged over runs (seeds), with a paired
    percentile bootstrap interval.

    ``probs_a[s]`` and ``probs_b[s]`` are run ``s``'s scores of the two models on the same rows,
    whose ``labels`` every run shares. The difference is the mean over runs of metric(a_s) -
    metric(b_s); each resample draws the rows with replacement once and scores every run of
    both models on that draw (all resamples at once, as weight rows). Each run keeps its own
    score scale (pooling the runs' rows into one ranking would compare the runs' calibrations,
    not the models). Returns ``{metric: {"difference", "low", "high"}}``; a resample where a
    side is undefined (NaN) is left out of that metric's interval."""
    if len(probs_a) != len(probs_b) or not probs_a:
        raise ValueError(f"{len(probs_a)} runs of model a against {len(probs_b)} of model b")
    for probs in (*probs_a, *probs_b):
        _check_rows(probs, labels)
    _check_level(level)
    weighted = _weighted_form(metric_fn)

    def difference(weights: np.ndarray) -> dict[str, np.ndarray]:
        runs = [
            (weighted(a, labels, weights), weighted(b, labels, weights))
            for a, b in zip(probs_a, probs_b, strict=True)
        ]
        return {key: np.mean([a[key] - b[key] for a, b in runs], axis=0) for key in runs[0][0]}

    runs = [
        (metric_fn(a, labels), metric_fn(b, labels)) for a, b in zip(probs_a, probs_b, strict=True)
    ]
    point = {key: [a[key] - b[key] for a, b in runs] for key in runs[0][0]}
    blocks = [difference(w) for w in _resample_counts(labels.shape[0], n, seed)]
    out = {}
    for key, values in point.items():
        low, high = _percentiles(np.concatenate([b[key] for b in blocks]), level)
        out[key] = {"difference": float(np.mean(values)), "low": low, "high": high}
    return out


def mean_std_over_seeds(
    results: Sequence[Mapping[str, float]], ddof: int = 1
) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation (``ddof=1``: the sample std) of each metric over seed runs.

    Only keys present in every run are summarised; a single run gets std NaN with ddof=1.
    """
    if not results:
        raise ValueError("no results to summarise")
    keys = set(results[0]).intersection(*results[1:])
    out = {}
    for key in sorted(keys):
        values = np.asarray([r[key] for r in results], dtype=np.float64)
        std = float(np.std(values, ddof=ddof)) if len(values) > ddof else float("nan")
        out[key] = (float(np.mean(values)), std)
    return out
