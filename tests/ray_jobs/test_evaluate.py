"""Evaluation reports of real checkpoints: a tiny progression run trained with ``run_training``,
its report read back against ``metrics.json``, the CLI on a checkpoint alone, and the ablation
and seed tables over real runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO, TINY_MODEL
from hydra import compose, initialize_config_dir
from PIL import Image

from dipro import vocab
from dipro.config import ConfigError
from dipro.data.layout import read_manifest
from dipro.report import ReportSettings
from dipro.run_report import EvaluationError, evaluate_to_report, write_run_report
from ray_jobs.experiments import run_ablations, run_seeds

pytestmark = pytest.mark.ray

TASK = "disease_progression"
SECTIONS = (
    "Summary",
    "Results (paper layout)",
    "Confidence intervals",
    "Per-finding metrics",
    "Confusion matrices",
    "Learning curves",
    "Region attention",
    "Model card",
)
LABELS = {
    "Precision": "precision",
    "Recall": "recall",
    "F1": "f1",
    "AUPRC": "auprc",
    "AUROC": "auroc",
    "Accuracy": "accuracy",
    "Kappa": "kappa",
}


def _tiny(data_root: Path, storage: Path, *extra: str) -> list[str]:
    return [
        f"task={TASK}",
        f"data.root={data_root}",
        f"storage_path={storage}",
        *TINY_MODEL,
        "scaling.num_workers=1",
        *extra,
    ]


@pytest.fixture
def tiny_run(progression_run):
    """The suite's two-epoch progression run of the tiny model on the tiny cohort."""
    return progression_run


def _rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table under ``## heading`` (header and rule dropped)."""
    section = markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def _number(cell: str) -> float | None:
    return None if cell == "n/a" else float(cell)


def test_report_of_a_tiny_run_matches_its_metrics_json(tiny_run, tiny_data_root, tmp_path):
    report = write_run_report(
        tiny_run.run_dir, out_dir=tmp_path, settings=ReportSettings(resamples=40)
    )
    text = report.read_text()
    for heading in SECTIONS:
        assert f"\n## {heading}\n" in text, f"report.md lacks the section {heading!r}"
    for png in ("learning_curves.png", "region_attention.png"):
        with Image.open(tmp_path / png) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 200, png

    payload = json.loads((tmp_path / "metrics.json").read_text())
    metrics, intervals = payload["metrics"], payload["intervals"]
    # The checkpoint alone reproduces the test metrics the training run computed.
    for key in ("precision", "recall", "f1", "auprc", "auroc"):
        assert metrics[key] == pytest.approx(tiny_run.test_metrics[key], abs=1e-6), key
    manifest = read_manifest(tiny_data_root, TASK)
    assert payload["n_samples"] == manifest.num_samples("test")

    # Every number of report.md is the number of metrics.json, rounded to 4 decimals.
    section = text.split("\n## Results (paper layout)\n", 1)[1]
    header = next(line for line in section.splitlines() if line.startswith("|"))
    columns = [LABELS[c.strip()] for c in header.strip("|").split("|")[1:]]
    point, ci = _rows(text, "Results (paper layout)")[:2]
    for metric, cell, interval in zip(columns, point[1:], ci[1:], strict=True):
        assert _number(cell) == pytest.approx(round(metrics[metric], 4), abs=1e-12)
        low, high = map(float, re.findall(r"-?\d+\.\d{4}", interval))
        assert [low, high] == pytest.approx([round(v, 4) for v in intervals[metric]], abs=1e-12)
    for name, value, _ in _rows(text, "Confidence intervals"):
        key = LABELS.get(name, name)
        expected = metrics[key]
        assert _number(value) == (None if expected is None else pytest.approx(round(expected, 4)))
    for row in _rows(text, "Per-finding metrics"):
        base = f"per_finding/{row[0]}"
        assert float(row[1]) == metrics[f"{base}/n"]
        for cell, metric in zip(
            row[2:7], ("precision", "recall", "f1", "auprc", "auroc"), strict=True
        ):
            value = metrics[f"{base}/{metric}"]
            assert _number(cell) == (None if value is None else pytest.approx(round(value, 4)))
    confusion = payload["confusion_matrices"]
    for finding in vocab.FINDINGS:
        assert sum(map(sum, confusion[finding])) == metrics[f"per_finding/{finding}/n"]
    attention = dict(_rows(text, "Region attention"))
    assert set(attention) == set(vocab.REGIONS)
    assert sum(payload["region_attention"].values()) == pytest.approx(1.0, abs=1e-4)
    for region, value in attention.items():
        assert float(value) == pytest.approx(round(payload["region_attention"][region], 4))

    # The model card states the contract and the cohort the model was trained on.
    card = (tmp_path / "model_card.md").read_text()
    assert "## Intended use" in card and "not validated for diagnosis" in card
    assert "synthetic cohort" in card
    train_row = next(r for r in _rows(card, "Training data") if r[0] == "train")
    assert int(train_row[-2]) == manifest.num_samples("train")
    card_json = json.loads((tmp_path / "model_card.json").read_text())
    assert card_json["training_data"]["samples"] == manifest.counts
    assert card_json["network_data_format"]["inputs"]["crops"]["shape"] == "[B, T, R, S, S]"


def test_cli_evaluates_a_checkpoint_alone_on_any_split(tiny_run, tiny_data_root, tmp_path):
    checkpoint_dir = Path(tiny_run.best_checkpoint).parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.evaluate",
            f"checkpoint={checkpoint_dir}",
            f"data.root={tiny_data_root}",
            "split=val",
            f"out_dir={tmp_path}",
            "report.bootstrap_resamples=10",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"report written to {tmp_path / 'report.md'}" in proc.stdout
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["split"] == "val"
    assert payload["n_samples"] == read_manifest(tiny_data_root, TASK).num_samples("val")
    assert "learning_curves" in payload["figures"], "the run's epoch log was not found"


def test_evaluation_refuses_a_missing_checkpoint_and_an_unknown_dataset(tiny_run, tmp_path):
    with pytest.raises(EvaluationError, match="/nonexistent/model.pt"):
        evaluate_to_report("/nonexistent/model.pt", None)
    with pytest.raises(EvaluationError, match=str(tmp_path)):
        evaluate_to_report(tiny_run.best_checkpoint, tmp_path)


def _experiments(data_root: Path, storage: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            "experiments",
            overrides=[
                *_tiny(data_root, storage, "train.max_epochs=1", "train.max_steps_per_epoch=2"),
                "name=study",
                "seeds=[7]",
                *extra,
            ],
        )


@pytest.mark.slow
def test_ablation_table_and_seed_table_over_real_runs(tiny_data_root, ray_session, tmp_path):
    path = run_ablations(
        _experiments(tiny_data_root, tmp_path, "mode=ablations", "variants=[dipro,cxr_only]")
    )
    table = path.read_text()
    data = json.loads(path.with_suffix(".json").read_text())
    assert list(data["table"]) == ["DiPro", "CXR-only"]
    assert sorted(r["variant"] for r in data["runs"]) == ["cxr_only", "dipro"]
    for run in data["runs"]:
        label = {"dipro": "DiPro", "cxr_only": "CXR-only"}[run["variant"]]
        summary = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())
        assert data["table"][label]["f1"]["values"] == [pytest.approx(summary["test"]["f1"])]
        assert f"{summary['test']['f1']:.4f}" in table
    config = next(Path(tmp_path, "study-cxr_only-seed7").glob("checkpoint_*/config.json"))
    cxr_cfg = json.loads(config.read_text())
    assert cxr_cfg["model"]["ablation"]["ehr"] is False

    # The seed table reuses the finished DiPro run of the same name instead of training again.
    seeds = run_seeds(_experiments(tiny_data_root, tmp_path, "mode=seeds"))
    seed_data = json.loads(seeds.with_suffix(".json").read_text())
    assert [r["reused"] for r in seed_data["runs"]] == [True]
    assert seed_data["table"]["DiPro (this run)"]["f1"]["mean"] == pytest.approx(
        data["table"]["DiPro"]["f1"]["mean"]
    )
    assert "(paper, MIMIC)" in seeds.read_text()
    # A finished run of the same name with other settings is refused, not silently reused.
    with pytest.raises(ConfigError, match="other optim settings"):
        run_seeds(_experiments(tiny_data_root, tmp_path, "mode=seeds", "optim.lr=0.5"))
