"""The real federated run on Flower's Ray simulation backend (``run_federated``): three
simulated hospitals, per-round metrics, checkpoints, resume, a failing site and an
unreachable minimum of sites."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import TASK, compose

from dipro.checkpoint import load_checkpoint
from dipro.data.shards import list_shards
from dipro.evaluation import evaluate_checkpoint
from federated.simulate import FederatedRunError, run_federated

pytestmark = pytest.mark.slow


def _rounds(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "round_metrics.jsonl").read_text().splitlines()]


def test_three_sites_two_rounds_then_resume(tiny_data_root, tmp_path):
    out = tmp_path / "run"
    cfg = compose(tiny_data_root, out, "federated.num_rounds=2", "simulation.timeout_s=900")
    result = run_federated(cfg)

    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["sites"] == {"sampled": 3, "updated": 3, "failures": []}
        assert r["train/loss"] > 0 and "val/auroc" in r and "sites/val/loss" in r
    model, meta = load_checkpoint(result.final_checkpoint)
    assert meta.task == TASK and meta.epoch == 2 and meta.extra["round"] == 2
    assert meta.norm_stats is not None
    report = json.loads((out / "metrics.json").read_text())
    assert {"task", "run_name", "seed", "best_checkpoint", "val", "test"} <= set(report)
    assert report["task"] == TASK and report["rounds"] == 2
    assert set(report["test"]) >= {"auroc", "auprc"}
    rescored = evaluate_checkpoint(
        report["best_checkpoint"], list_shards(tiny_data_root, TASK, "test"), batch_size=16
    )
    assert rescored.metrics == pytest.approx(report["test"], nan_ok=True)

    # started again with one round more, it plays only round 3
    resumed = run_federated(
        compose(tiny_data_root, out, "federated.num_rounds=3", "simulation.timeout_s=900")
    )
    again = _rounds(out)
    assert [r["round"] for r in again] == [0, 1, 2, 3]
    assert again[:3] == rounds, "finished rounds were played again instead of resumed"
    assert resumed.rounds == 3 and load_checkpoint(resumed.final_checkpoint)[1].epoch == 3


def test_a_failing_site_is_logged_and_the_round_completes(tiny_data_root, tmp_path):
    out = tmp_path / "run"
    cfg = compose(
        tiny_data_root,
        out,
        "federated.num_rounds=1",
        "federated.fraction_evaluate=0",
        "+federated.fail_at={hospital: 1, round: 1}",
        "simulation.timeout_s=900",
    )
    result = run_federated(cfg)

    (line,) = _rounds(out)[1:]
    assert line["sites"]["sampled"] == 3 and line["sites"]["updated"] == 2
    (failure,) = line["sites"]["failures"]
    assert failure["reason"] == "site failed: injected-fault"
    log = (out / "simulation.log").read_text()
    assert "failed to train: site failed: injected-fault" in log
    assert "injected failure of hospital 1" not in log  # the details stay at the site
    site_log = (tmp_path / "run-site-logs" / "site-1.log").read_text()
    assert "InjectedSiteFault: injected failure of hospital 1" in site_log
    assert result.rounds == 1 and Path(result.final_checkpoint).exists()


def test_too_few_sites_is_a_clear_error_not_a_hang(tiny_data_root, tmp_path):
    cfg = compose(
        tiny_data_root,
        tmp_path / "run",
        "simulation.num_sites=2",
        "federated.min_sites=3",
        "federated.wait_for_sites_s=5",
        "simulation.timeout_s=300",
    )
    started = time.monotonic()
    with pytest.raises(FederatedRunError, match=r"2 site\(s\) connected, the run needs at least 3"):
        run_federated(cfg)
    assert time.monotonic() - started < 300
