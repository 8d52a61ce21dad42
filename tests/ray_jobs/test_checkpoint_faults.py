"""Checkpoints that do not fit: a truncated latest checkpoint is skipped on resume (saying
which and why), and a checkpoint of another task or other data is refused by resume and by
evaluation; through ``python -m ray_jobs.train`` / ``ray_jobs.evaluate`` as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_MODEL, compose_train
from local_ray import ensure_ray
from omegaconf import OmegaConf

from dipro.checkpoint import read_checkpoint, save_checkpoint
from dipro.data.normalize import NormStats
from dipro.model import build_model
from ray_jobs.train import run_training

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _args(data_root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "task=mortality",
        f"data.root={data_root}",
        f"storage_path={runs}",
        "run_name=faults",
        *TINY_MODEL,
        "scaling.num_workers=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def mortality_run(tiny_data_root, tmp_path_factory) -> Path:
    """A two-epoch mortality run; its directory."""
    ensure_ray()
    runs = tmp_path_factory.mktemp("runs")
    result = run_training(compose_train(_args(tiny_data_root, runs, "train.max_epochs=2")))
    return Path(result.run_dir)


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_*/model.pt"))


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "epoch_metrics.jsonl").read_text().splitlines()]


def test_resume_skips_a_truncated_latest_checkpoint(
    mortality_run, tiny_data_root, entrypoint, tree_checksums, tmp_path
):
    run_dir = mortality_run
    first, latest = _checkpoints(run_dir)[-2:]
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 3])
    epoch_1 = _epochs(run_dir)[0]
    kept = tree_checksums(first.parent)

    code, lines = entrypoint(  # keep every checkpoint: retention may not hide a change
        "ray_jobs.train",
        *_args(
            tiny_data_root, run_dir.parent, "train.max_epochs=3", "train.checkpoints_to_keep=10"
        ),
    )

    assert code == 0, lines[-10:]
    out = entrypoint.stdout
    assert f"resume: skipped {latest}: not a loadable checkpoint" in out, out[-3000:]
    assert f"resume: from {first}, after epoch 1" in out
    assert "epoch 2/3" in out and "epoch 3/3" in out  # epoch 2 trained again, and shown
    epochs = _epochs(run_dir)
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[0] == epoch_1  # epoch 1 was not trained again
    assert tree_checksums(first.parent) == kept


def test_resume_with_another_task_or_other_data_is_refused(
    mortality_run, tiny_dataset, tiny_data_root, entrypoint, tree_checksums
):
    before = tree_checksums(mortality_run)
    runs = mortality_run.parent
    code, lines = entrypoint(
        "ray_jobs.train",
        *_args(tiny_data_root, runs, "task=disease_progression", "run_name=faults"),
    )
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("configuration error: run_name=faults exists and cannot be resumed")
    assert "a mortality checkpoint, not a disease_progression one" in lines[0]

    code, lines = entrypoint("ray_jobs.train", *_args(tiny_dataset, runs))
    assert code == 2 and len(lines) == 1
    assert "trained on data with other normalisation statistics" in lines[0]
    assert tree_checksums(mortality_run) == before


def _progression_checkpoint(path: Path, *, norm_stats) -> Path:
    cfg = compose_train(["task=disease_progression", *TINY_MODEL])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = build_model(model_cfg, "disease_progression")
    task = "disease_progression"
    save_checkpoint(path, model, model_cfg=model_cfg, task=task, norm_stats=norm_stats)
    return path


def test_evaluate_refuses_a_checkpoint_that_is_not_the_runs(
    mortality_run, tiny_data_root, entrypoint, tree_checksums, tmp_path
):
    own = read_checkpoint(_checkpoints(mortality_run)[0])
    stats = NormStats.from_dict(own["training"]["norm_stats"])
    before = tree_checksums(mortality_run)
    other = _progression_checkpoint(tmp_path / "progression.pt", norm_stats=stats)
    log = mortality_run / "epoch_metrics.jsonl"
    code, lines = entrypoint(
        "ray_jobs.evaluate",
        f"checkpoint={other}",
        f"data.root={tiny_data_root}",
        f"epoch_metrics={log}",
        f"out_dir={tmp_path / 'report'}",
    )
    assert code == 2 and len(lines) == 1
    assert lines[0] == (
        f"evaluation error: epoch_metrics={log} logs a mortality run, the checkpoint is a "
        "disease_progression model"
    )

    planted = mortality_run / "checkpoint_planted"
    planted.mkdir()
    shutil.copy(other, planted / "model.pt")
    shutil.copy(_checkpoints(mortality_run)[0].parent / "config.json", planted / "config.json")
    code, lines = entrypoint("ray_jobs.evaluate", f"checkpoint={planted}")
    shutil.rmtree(planted)
    assert code == 2 and len(lines) == 1
    assert "a disease_progression checkpoint in the directory of a mortality run" in lines[0]

    bare = _progression_checkpoint(tmp_path / "bare.pt", norm_stats=None)
    code, lines = entrypoint(
        "ray_jobs.evaluate", f"checkpoint={bare}", f"data.root={tiny_data_root}"
    )
    assert code == 2 and lines == [
        f"evaluation error: {bare}: carries no normalisation statistics, so its inputs cannot "
        "be normalised as in training"
    ]
    assert not (tmp_path / "report").exists()
    assert tree_checksums(mortality_run) == before
