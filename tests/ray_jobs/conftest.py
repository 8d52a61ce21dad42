"""Shared fixtures of the Ray tests: one tiny synthetic cohort and one in-process Ray instance
per session, and a composer of the real training config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dipro.data.synthetic import SyntheticConfig, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

# A model small enough to train a few epochs on two CPU workers in seconds.
TINY_MODEL = ["+experiment=tiny", "train.patience=null"]


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three tasks' shards of a 36-patient synthetic cohort with 16-pixel crops."""
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_dataset(
        SyntheticConfig(seed=5, num_patients=36, image_size=64, crop_size=16), root
    )
    return root


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One in-process Ray per test module (shut down after it, so that no later test finds a
    Ray it did not start), with more logical CPUs than cores so that two training workers and
    Ray Data never starve each other."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True)
    yield
    ray.shutdown()


def compose_train(overrides: list[str]) -> DictConfig:
    """The real ``configs/train.yaml`` composed with ``overrides``."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)
