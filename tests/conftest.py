"""Fixtures shared by the whole suite: a tiny synthetic cohort and its shards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dipro.data.synthetic import Cohort, SyntheticConfig, simulate_cohort, write_synthetic_dataset


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Runs that tests track go to a temporary MLflow store (``MLFLOW_TRACKING_URI``, which
    ``tracking.uri`` follows), never to the repository's ``outputs/mlflow``."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="session")
def tiny_synthetic_config() -> SyntheticConfig:
    """A cohort small enough for any unit test: 24 patients, 64-pixel CXRs, 16-pixel crops,
    8 rows per shard file (so that every split has several files)."""
    return SyntheticConfig(seed=7, num_patients=24, image_size=64, crop_size=16, rows_per_file=8)


@pytest.fixture(scope="session")
def tiny_cohort(tiny_synthetic_config: SyntheticConfig) -> Cohort:
    """The in-memory cohort of ``tiny_synthetic_config``."""
    return simulate_cohort(tiny_synthetic_config)


@pytest.fixture(scope="session")
def tiny_dataset(
    tmp_path_factory: pytest.TempPathFactory, tiny_synthetic_config: SyntheticConfig
) -> Path:
    """Root of the three tasks' shards of ``tiny_synthetic_config`` (read-only: do not write
    into it; copy it or write your own under ``tmp_path``)."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    write_synthetic_dataset(tiny_synthetic_config, root)
    return root
