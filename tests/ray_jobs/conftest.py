"""Shared parts of the Ray tests: the tiny model's overrides and a composer of the real training
config (the cohort and the in-process Ray are the suite's: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from local_ray import ensure_ray
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

# A model small enough to train a few epochs on two CPU workers in seconds; MLflow tracking is
# off except in the tests of tracking.
TINY_MODEL = ["+experiment=tiny", "train.patience=null", "tracking.enabled=false"]


def compose_train(overrides: list[str]) -> DictConfig:
    """The real ``configs/train.yaml`` composed with ``overrides``."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


# run_name -> how many times its run_training (the driver) read its dataset's manifest.json
MANIFEST_READS: dict[str, int] = {}


def _finished_run(factory: pytest.TempPathFactory, overrides: list[str]):
    """Train the tiny model with ``overrides`` into a new storage directory: its
    ``TrainingResult``. The reads of the dataset's manifest are counted (``MANIFEST_READS``)."""
    from dipro import storage
    from dipro.data.layout import MANIFEST_NAME
    from ray_jobs.training import run_training

    ensure_ray()
    cfg = compose_train([f"storage_path={factory.mktemp('runs')}", *TINY_MODEL, *overrides])
    read_bytes, reads = storage.read_bytes, []

    def counted(uri: str) -> bytes:
        reads.extend([uri] if str(uri).endswith(f"/{MANIFEST_NAME}") else [])
        return read_bytes(uri)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage, "read_bytes", counted)
        result = run_training(cfg)
    MANIFEST_READS[cfg.run_name] = len(reads)
    return result


@pytest.fixture(scope="session")
def progression_run(tiny_data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A finished two-epoch disease-progression run of the tiny model (one worker), shared
    read-only by the evaluation, report and prediction tests: its ``TrainingResult``."""
    return _finished_run(
        tmp_path_factory,
        [
            "task=disease_progression",
            f"data.root={tiny_data_root}",
            "scaling.num_workers=1",
            "run_name=tiny",
            "train.max_epochs=2",
        ],
    )


@pytest.fixture(scope="session")
def two_worker_run(tiny_data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A finished two-epoch mortality run of two workers named ``smoke``, shared read-only by the
    tests of training faults and checkpoint faults (copy its directory to resume or change it):
    its ``TrainingResult``."""
    return _finished_run(
        tmp_path_factory,
        ["task=mortality", f"data.root={tiny_data_root}", "run_name=smoke", "train.max_epochs=2"],
    )
