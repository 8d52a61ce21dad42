"""The run directory's metrics log and best-metric tracker (dipro.runs)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dipro.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from dipro.runs import (
    BestMetric,
    append_log,
    best_first,
    best_index,
    checkpoint_files,
    first_loadable,
    last_logged,
    prune_checkpoints,
    read_epoch_log,
    read_log,
    resume_point,
    run_dir,
    step_checkpoint,
    write_summary,
)


def test_a_retried_epoch_replaces_the_lines_of_the_failed_attempt(tmp_path):
    log = str(tmp_path / "epoch_metrics.jsonl")
    for epoch in (1, 2, 3):
        append_log(log, {"epoch": epoch, "attempt": 1}, "epoch")
    append_log(log, {"epoch": 2, "attempt": 2}, "epoch")  # restored from epoch 1's checkpoint
    assert read_log(log) == [{"epoch": 1, "attempt": 1}, {"epoch": 2, "attempt": 2}]
    assert last_logged(log) == 2
    assert not list(tmp_path.glob("*.tmp*"))


def test_reading_names_the_file_and_line_that_is_not_json(tmp_path):
    log = tmp_path / "epoch_metrics.jsonl"
    log.write_text('{"epoch": 2}\n{"epoch": 1}\n{"epoch": \n')
    with pytest.raises(ValueError, match=rf"{log}: line 3 is not JSON"):
        read_epoch_log(log)
    log.write_text('{"epoch": 2}\n\n{"epoch": 1, "val/loss": NaN}\n')
    assert [r["epoch"] for r in read_epoch_log(log)] == [1, 2]
    assert read_log(tmp_path / "absent.jsonl") == [] and last_logged(tmp_path / "absent") == 0


@pytest.mark.parametrize(
    ("mode", "values", "bests", "exhausted_after"),
    [
        ("max", [0.5, 0.7, 0.6, 0.7, math.nan], [0.5, 0.7, 0.7, 0.7, 0.7], 5),
        ("min", [2.0, 1.0, 1.5, math.nan, 0.5], [2.0, 1.0, 1.0, 1.0, 0.5], None),
    ],
)
def test_best_metric_improves_strictly_and_counts_patience(mode, values, bests, exhausted_after):
    monitored = BestMetric(mode)
    for step, (value, best) in enumerate(zip(values, bests, strict=True), start=1):
        monitored.update(value)
        assert monitored.best == best
        assert monitored.exhausted(3) == (exhausted_after is not None and step >= exhausted_after)
    assert not monitored.exhausted(None)


def test_a_restored_tracker_continues_its_patience():
    monitored = BestMetric("max", best=0.8, bad_steps=2)
    assert not monitored.update(0.79) and monitored.exhausted(3)
    assert monitored.update(0.81) and monitored.bad_steps == 0


@pytest.mark.parametrize(
    ("mode", "values", "order"),
    [
        ("max", [0.5, math.nan, 0.7, 0.7, 0.1], [2, 3, 0, 4, 1]),
        ("min", [0.5, math.nan, 0.7, 0.1, 0.1], [3, 4, 0, 2, 1]),
    ],
)
def test_one_rule_ranks_a_monitored_metric_nan_last_and_the_earliest_of_equals_first(
    mode, values, order
):
    assert best_first(values, mode) == order
    assert best_index(values, mode) == order[0]
    assert best_index([math.nan, math.nan], mode) is None and best_index([], mode) is None
    monitored = BestMetric(mode)
    for step, value in enumerate(values):
        if monitored.update(value):
            best_step = step
    assert best_step == order[0]  # early stopping keeps the epoch the ranking puts first


def test_checkpoints_are_listed_newest_first_and_the_first_loadable_is_taken(tmp_path):
    directory = run_dir(str(tmp_path), "run")
    assert checkpoint_files(directory) == []
    for name in ("checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-02_00-00-00.000000"):
        (tmp_path / "run" / name).mkdir(parents=True)
    (tmp_path / "run" / "report-test").mkdir()
    files = checkpoint_files(directory)
    assert [f.split("/")[-2] for f in files] == [
        "checkpoint_2026-01-02_00-00-00.000000",
        "checkpoint_2026-01-01_00-00-00.000000",
    ]
    assert all(f.endswith("/model.pt") for f in files)

    def load(uri: str) -> str:
        if "01-02" in uri:
            raise CheckpointError(f"{uri}: truncated")
        return "payload"

    skipped: list[str] = []
    found = first_loadable(files, load, lambda err: skipped.append(str(err)), error=CheckpointError)
    assert found == (files[1], "payload") and skipped == [f"{files[0]}: truncated"]
    assert first_loadable([], load, skipped.append, error=CheckpointError) is None


def _save(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(path, torch.nn.Linear(2, 1), model_cfg={}, task="mortality")


@pytest.mark.parametrize(
    "names",
    [
        ["checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-02_00-00-00.000000"],
        ["checkpoint_000001", "checkpoint_000002"],
    ],
    ids=["ray-train", "federated"],
)
def test_a_ray_run_and_a_federated_run_resume_through_one_check(tmp_path, names):
    """Both trainers' run directories: the newest checkpoint that loads is the resume point, a
    truncated newer one is skipped and named, and none at all is a new run."""
    directory = run_dir(str(tmp_path), "run")
    skipped: list[str] = []
    assert resume_point(directory, read_checkpoint, skipped.append, error=CheckpointError) is None
    older, newer = (os.path.join(directory, name, "model.pt") for name in names)
    for path in (older, newer):
        _save(path)
    with open(newer, "r+b") as f:
        f.truncate(100)
    found = resume_point(directory, read_checkpoint, skipped.append, error=CheckpointError)
    assert found is not None and found[0] == older and found[1]["task"] == "mortality"
    assert len(skipped) == 1 and str(skipped[0]).startswith(f"{newer}: not a loadable")
    # Ray Train's latest may be older than a checkpoint on disk: nothing newer is taken
    limited = resume_point(
        directory, read_checkpoint, skipped.append, error=CheckpointError, newest=names[0]
    )
    assert limited is not None and limited[0] == older


def test_a_federated_run_keeps_its_best_and_last_checkpoints(tmp_path):
    directory = str(tmp_path / "run")
    for step in range(1, 5):
        _save(step_checkpoint(directory, step))
    keep = [step_checkpoint(directory, s) for s in (4, 3, 1)]
    prune_checkpoints(directory, keep)
    assert checkpoint_files(directory) == keep


def test_a_run_summary_has_the_keys_readers_rely_on_or_is_not_written(tmp_path):
    summary = {"task": "mortality", "run_name": "r", "seed": 7, "best_checkpoint": "c/model.pt"}
    with pytest.raises(ValueError, match="val, test"):
        write_summary(str(tmp_path), summary)
    assert list(tmp_path.iterdir()) == []
    uri = write_summary(
        str(tmp_path), {**summary, "val": {"val/auprc": 0.5}, "test": None, "rounds": 3}
    )
    assert uri == str(tmp_path / "metrics.json")
    assert list(json.loads((tmp_path / "metrics.json").read_text())) == [
        "task",
        "run_name",
        "seed",
        "best_checkpoint",
        "val",
        "test",
        "rounds",
    ]
