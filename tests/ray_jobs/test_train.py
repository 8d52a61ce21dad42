"""The real ``run_training`` on Ray with two CPU workers: completion, faults, resume, bad config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MANIFEST_READS, REPO, TINY_MODEL, compose_train

from dipro.checkpoint import load_checkpoint
from dipro.config import ConfigError
from ray_jobs.training import check_config, run_training
from ray_jobs.worker import FAULT_MARKER

pytestmark = pytest.mark.ray


def _overrides(data_root: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        "task=mortality",
        f"data.root={data_root}",
        f"storage_path={runs}",
        f"run_name={name}",
        *TINY_MODEL,
        *extra,
    ]


def _epochs(run_dir: Path) -> list[dict]:
    lines = (run_dir / "epoch_metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# What a run reports that must repeat to the last digit: every epoch's losses and validation
# metrics (timings, memory and node ids are the machine's), and the test metrics.
_TIMING = ("epoch_seconds", "train/samples_per_s", "worker_max_rss_mb", "worker_nodes")


def _numbers(run_dir: Path) -> dict:
    epochs = [{k: v for k, v in e.items() if k not in _TIMING} for e in _epochs(run_dir)]
    for epoch in epochs:
        epoch.pop("restored_from_epoch")
    summary = json.loads((run_dir / "metrics.json").read_text())
    return {"epochs": epochs, "test": summary["test"], "best_epoch": summary["best_epoch"]}


@pytest.mark.slow
def test_two_workers_train_to_completion(two_worker_run):
    result = two_worker_run
    epochs = _epochs(Path(result.run_dir))
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(len(set(e["worker_nodes"])) >= 1 and len(e["worker_nodes"]) == 2 for e in epochs)
    metrics = json.loads((Path(result.run_dir) / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"auroc", "auprc"}
    assert 0.0 <= metrics["test"]["auroc"] <= 1.0
    model, meta = load_checkpoint(result.best_checkpoint)
    assert meta.task == "mortality" and meta.norm_stats is not None
    assert meta.epoch == metrics["best_epoch"]


def test_a_training_run_reads_its_dataset_manifest_once(progression_run):
    """``check_config`` reads the manifest into a ``Dataset``; the shard check, the Ray Data
    pipelines and the test split's scoring ask it, and never read the file again."""
    assert MANIFEST_READS[Path(progression_run.run_dir).name] == 1


@pytest.mark.slow
def test_a_resumed_run_whose_worker_is_killed_ends_as_the_uninterrupted_one(
    two_worker_run, tiny_data_root, tmp_path
):
    """Two launches of the reference's command. The first dies during epoch 2 with no restarts
    allowed, so only epoch 1 is done: a fresh start of the reference's command, whose numbers
    must repeat to the digit (deterministic by default: the data order per epoch, its split
    between the two workers, the local shuffles and dropout all come from the seed). The
    second launch resumes from epoch 1's checkpoint; a worker of it is killed in epoch 2, and
    Ray Train restarts the worker group from that checkpoint with the same data order and
    random streams. The run ends where the uninterrupted one ends."""
    base = _overrides(tiny_data_root, tmp_path, "smoke", "train.max_epochs=2")
    fail = "+train.fail_at={epoch: 2, step: 1}"
    with pytest.raises(Exception, match="injected failure"):
        run_training(compose_train([*base, fail]))
    run_dir = tmp_path / "smoke"
    first = _epochs(run_dir)
    assert [e["epoch"] for e in first] == [1]
    marker = run_dir / FAULT_MARKER
    marker.unlink()  # the failure is injected once per run directory: once more, then

    run_training(compose_train([*base, fail, "scaling.max_failures=1"]))

    assert marker.exists(), "the injected failure did not happen in the resumed run"
    second = _epochs(run_dir)
    assert [e["epoch"] for e in second] == [1, 2]
    assert second[0] == first[0], "epoch 1 was trained again instead of resumed"
    assert second[1]["restored_from_epoch"] == 1
    assert _numbers(run_dir) == _numbers(Path(two_worker_run.run_dir))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("scaling.num_workers=0", "num_workers"),
        ("data.root=/nonexistent/shards", "/nonexistent/shards"),
        ("task.name=unknown_task", "unknown_task"),
    ],
)
def test_bad_config_fails_before_any_worker(tiny_data_root, tmp_path, override, message):
    cfg = compose_train([*_overrides(tiny_data_root, tmp_path, "bad"), override])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_cli_reports_bad_config_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.train",
            "data.root=/nonexistent/shards",
            f"storage_path={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("configuration error:") and "/nonexistent/shards" in lines[-1]
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
