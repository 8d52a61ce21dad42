"""Reports: bootstrap intervals, confusion matrices, tables over seeds, figures and the written
report, on predictions drawn with a known amount of signal."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_model import tiny_model_cfg

from dipro import vocab
from dipro.checkpoint import CheckpointMeta
from dipro.data.collate import IGNORE_INDEX
from dipro.metrics import Predictions, compute_metrics
from dipro.report import (
    PAPER_RESULTS,
    TABLE_METRICS,
    ReportSettings,
    SummaryRow,
    attention_faithfulness,
    bootstrap_intervals,
    confusion_matrices,
    plot_learning_curves,
    summary_table,
    write_evaluation_report,
)
from dipro.report.figures import plot_sample_attention

K, C, R = vocab.NUM_FINDINGS, vocab.NUM_PROGRESSION_CLASSES, vocab.NUM_REGIONS


def _progression(n: int, seed: int, not_mentioned: float = 0.1) -> Predictions:
    """Progression predictions whose logits lean towards the true class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, size=(n, K))
    logits = rng.normal(size=(n, K, C)).astype(np.float32)
    logits += 1.2 * np.eye(C, dtype=np.float32)[labels]
    labels[rng.random((n, K)) < not_mentioned] = vocab.NOT_MENTIONED
    attention = rng.dirichlet(np.arange(1, R + 1), size=n).astype(np.float32)
    ids = np.arange(n)
    changed = rng.random((n, R)) < 0.3
    return Predictions("disease_progression", logits, labels, ids, ids, ids % 3, attention, changed)


def _mortality(n: int, seed: int) -> Predictions:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    logits = (rng.normal(size=n) + 1.5 * labels - 0.5).astype(np.float32)
    ids = np.arange(n)
    attention = np.full((n, R), 1.0 / R, np.float32)
    changed = np.zeros((n, R), bool)
    return Predictions("mortality", logits, labels, ids, ids, ids % 2, attention, changed)


def _meta(task: str) -> CheckpointMeta:
    model_cfg = tiny_model_cfg(region_mode="crops")
    model_cfg["ablation"]["pae"] = False
    return CheckpointMeta(
        path="/runs/x/model.pt",
        task=task,
        model_cfg=model_cfg,
        format_version=1,
        data_schema_version=1,
        epoch=3,
    )


@pytest.mark.parametrize(("make", "metric"), [(_mortality, "auroc"), (_progression, "f1")])
def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_samples(make, metric):
    widths = []
    for n in (40, 400):
        predictions = make(n, seed=1)
        point = compute_metrics(predictions)[metric]
        low, high = bootstrap_intervals(predictions, resamples=40, seed=0)[metric]
        assert low <= point <= high, f"n={n}: {point} outside [{low}, {high}]"
        widths.append(high - low)
    # The width shrinks like 1 / sqrt(n): ten times the samples, about a third of the width.
    assert widths[1] < 0.6 * widths[0], widths


def test_bootstrap_refuses_zero_resamples():
    with pytest.raises(ValueError, match="at least 1"):
        bootstrap_intervals(_mortality(20, 0), resamples=0)


def test_confusion_matrices_count_labelled_rows_only():
    predictions = _progression(50, seed=3, not_mentioned=0.3)
    matrices = confusion_matrices(predictions)
    assert list(matrices) == list(vocab.FINDINGS)
    pred = predictions.logits.argmax(axis=-1)
    for k, finding in enumerate(vocab.FINDINGS):
        matrix = np.asarray(matrices[finding])
        labelled = predictions.labels[:, k] != vocab.NOT_MENTIONED
        assert matrix.sum() == labelled.sum()
        for t in range(C):
            for p in range(C):
                expected = np.sum(labelled & (predictions.labels[:, k] == t) & (pred[:, k] == p))
                assert matrix[t, p] == expected


def test_mortality_confusion_ignores_absent_labels():
    predictions = _mortality(40, seed=2)
    labels = predictions.labels.copy()
    labels[:5] = IGNORE_INDEX
    matrix = np.asarray(
        confusion_matrices(
            Predictions(
                "mortality",
                predictions.logits,
                labels,
                *([predictions.subject_id] * 3),
                predictions.region_attention,
                predictions.region_changed,
            )
        )["mortality"]
    )
    assert matrix.shape == (2, 2) and matrix.sum() == 35


def test_summary_table_gives_mean_and_sample_std_next_to_the_paper():
    runs = [{"f1": 0.40, "auroc": 0.60}, {"f1": 0.50, "auroc": 0.70}, {"f1": 0.45, "auroc": 0.62}]
    markdown, data = summary_table(
        "disease_progression", [SummaryRow("DiPro", runs), SummaryRow("w/o PAE", runs[:2])]
    )
    f1 = [r["f1"] for r in runs]
    assert data["DiPro"]["f1"]["mean"] == pytest.approx(np.mean(f1))
    assert data["DiPro"]["f1"]["std"] == pytest.approx(np.std(f1, ddof=1))
    assert f"{np.mean(f1):.4f} ± {np.std(f1, ddof=1):.4f}" in markdown
    assert "w/o PAE" in markdown and data["w/o PAE"]["runs"] == 2
    # metrics a run does not have are n/a, not invented
    assert data["DiPro"].get("precision") is None and "n/a" in markdown
    paper_f1 = PAPER_RESULTS["disease_progression"]["DiPro"]["f1"]
    assert f"{paper_f1[0]:.3f} ± {paper_f1[1]:.3f}" in markdown


def test_learning_curves_png_opens(tmp_path):
    epochs = [
        {
            "epoch": e,
            "train/loss": 2.0 / e,
            "val/loss": 2.2 / e,
            "val/auroc": 0.5 + 0.05 * e,
            "val/auprc": 0.3 + 0.04 * e,
        }
        for e in range(1, 6)
    ]
    path = tmp_path / "curves.png"
    path.write_bytes(plot_learning_curves(epochs, "mortality", "val/auprc"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 600


def test_sample_attention_png_has_one_panel_per_sample(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.ones(vocab.NUM_REGIONS), size=3)
    changed = np.zeros((3, vocab.NUM_REGIONS), bool)
    changed[:, :2] = True
    samples = [(f"pair {i}", maps[i], changed[i]) for i in range(3)]
    (tmp_path / "three.png").write_bytes(plot_sample_attention(samples, maps.mean(0), "run"))
    (tmp_path / "one.png").write_bytes(plot_sample_attention(samples[:1], maps.mean(0), "run"))
    with Image.open(tmp_path / "three.png") as three, Image.open(tmp_path / "one.png") as one:
        assert three.format == "PNG" and three.size[0] > one.size[0]


_NUMBER = r"(-?\d+\.\d{4}|n/a)"


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table under ``## heading``."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def test_written_report_has_every_section_and_the_numbers_of_metrics_json(tmp_path):
    predictions = _progression(120, seed=4)
    report = write_evaluation_report(
        predictions,
        _meta("disease_progression"),
        tmp_path,
        split="test",
        eval_data_root="/data",
        settings=ReportSettings(resamples=30),
    )
    text = report.read_text()
    for heading in (
        "Summary",
        "Results (paper layout)",
        "Confidence intervals",
        "Per-finding metrics",
        "Confusion matrices",
        "Learning curves",
        "Region attention",
        "Model card",
    ):
        assert f"\n## {heading}\n" in text, heading
    payload = json.loads((tmp_path / "metrics.json").read_text())
    metrics, intervals = payload["metrics"], payload["intervals"]
    assert metrics["f1"] == pytest.approx(compute_metrics(predictions)["f1"])
    for name, value, ci in _table_rows(text, "Confidence intervals"):
        key = {
            "Precision": "precision",
            "Recall": "recall",
            "F1": "f1",
            "AUPRC": "auprc",
            "AUROC": "auroc",
        }.get(name, name)
        assert float(value) == pytest.approx(round(metrics[key], 4), abs=1e-12)
        low, high = map(float, re.findall(_NUMBER, ci))
        assert (low, high) == pytest.approx([round(v, 4) for v in intervals[key]], abs=1e-12)
    for row in _table_rows(text, "Per-finding metrics"):
        finding = row[0]
        assert int(row[1]) == metrics[f"per_finding/{finding}/n"]
        assert float(row[4]) == pytest.approx(round(metrics[f"per_finding/{finding}/f1"], 4))
    for region, value in _table_rows(text, "Region attention"):
        assert float(value) == pytest.approx(round(payload["region_attention"][region], 4))
    faith = payload["region_attention_faithfulness"]
    assert faith["n_samples"] > 0 and f"ratio **{round(faith['ratio'], 4)}" in text
    # Without an epoch log the report says so instead of drawing an empty figure.
    assert "No epoch log" in text and "learning_curves" not in payload["figures"]
    with Image.open(tmp_path / "region_attention.png") as image:
        assert image.format == "PNG"
    card = (tmp_path / "model_card.md").read_text()
    assert "not validated for diagnosis" in card and "Ablations switched off: pae" in card
    card_json = json.loads((tmp_path / "model_card.json").read_text())
    assert card_json["network_data_format"]["outputs"]["logits"]["shape"] == f"[B, {K}, {C}]"
    assert math.isclose(card_json["eval_metrics"]["metrics"]["f1"]["value"], metrics["f1"])


def test_report_refuses_predictions_of_another_task(tmp_path):
    with pytest.raises(ValueError, match="mortality"):
        write_evaluation_report(
            _mortality(10, 0),
            _meta("disease_progression"),
            tmp_path,
            split="test",
            eval_data_root="/data",
        )
    assert not (Path(tmp_path) / "report.md").exists()


def test_attention_faithfulness_ratio_matches_its_formula():
    rng = np.random.default_rng(5)
    n = 200
    changed = rng.random((n, R)) < 0.3
    changed[0] = False  # no changed region: left out
    changed[1] = True  # every region changed: left out
    # attention that leans towards the changed regions: weight 3 on them, 1 elsewhere
    weight = np.where(changed, 3.0, 1.0) * rng.uniform(0.5, 1.5, size=(n, R))
    attention = (weight / weight.sum(1, keepdims=True)).astype(np.float32)
    base = _progression(n, seed=5)
    ids = [base.subject_id] * 3
    leaning = Predictions("disease_progression", base.logits, base.labels, *ids, attention, changed)
    faith = attention_faithfulness(leaning, resamples=300, seed=1)
    keep = changed.any(1) & ~changed.all(1)  # rows 0 and 1 (and any like them) are left out
    assert not keep[0] and not keep[1]
    a = (attention[keep].astype(np.float64) * changed[keep]).sum(1)
    s = changed[keep].sum(1) / R
    assert faith["n_samples"] == keep.sum()
    assert faith["ratio"] == pytest.approx(a.mean() / s.mean())
    low, high = faith["interval"]
    assert 1.0 < low < faith["ratio"] < high
    mean_map = attention.astype(np.float64).mean(0)
    m = (mean_map * changed[keep]).sum(1)
    assert faith["ratio_against_mean_map"] == pytest.approx(a.mean() / m.mean())
    low, high = faith["interval_against_mean_map"]
    assert 1.0 < low < faith["ratio_against_mean_map"] < high
    # attention that follows which regions tend to change, not the sample's: 1 against the map
    often = changed.mean(0)
    prior = np.broadcast_to(often / often.sum(), (n, R)).astype(np.float32)
    positional = Predictions("disease_progression", base.logits, base.labels, *ids, prior, changed)
    by_region = attention_faithfulness(positional, resamples=50)
    assert by_region["ratio_against_mean_map"] == pytest.approx(1.0)
    uniform = Predictions(
        "disease_progression",
        base.logits,
        base.labels,
        *([base.subject_id] * 3),
        np.full((n, R), 1.0 / R, np.float32),
        changed,
    )
    assert attention_faithfulness(uniform, resamples=50)["ratio"] == pytest.approx(1.0)


def test_model_card_states_the_metrics_without_missing_inputs(tmp_path):
    full, degraded = _mortality(80, seed=5), _mortality(80, seed=6)
    removed = {"no EHR": compute_metrics(degraded)}
    write_evaluation_report(
        full,
        _meta("mortality"),
        tmp_path,
        split="test",
        eval_data_root="/data",
        settings=ReportSettings(resamples=10),
        missing_inputs=removed,
    )
    card = (tmp_path / "model_card.md").read_text()
    rows = {r[0]: r[1:] for r in _table_rows(card, "Predictions with missing inputs (test split)")}
    assert list(rows) == ["all", "no EHR"]
    auroc = list(TABLE_METRICS["mortality"]).index("auroc")
    assert float(rows["all"][auroc]) == pytest.approx(round(compute_metrics(full)["auroc"], 4))
    assert float(rows["no EHR"][auroc]) == pytest.approx(round(removed["no EHR"]["auroc"], 4))
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["missing_inputs"]["no EHR"]["auroc"] == pytest.approx(removed["no EHR"]["auroc"])
