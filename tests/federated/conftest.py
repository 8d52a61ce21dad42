"""Shared fixtures of the federated tests: one tiny synthetic cohort per session (three
non-IID hospitals) and a composer of the real federated config with a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dipro.data.synthetic import SyntheticConfig, write_synthetic_dataset
from federated.config import compose_config

REPO = Path(__file__).resolve().parents[2]
TASK = "mortality"

# A model small enough for a few federated rounds on two CPU cores.
TINY = [
    f"task={TASK}",
    "+experiment=tiny",
    "federated.min_report_count=1",  # tiny sites: a handful of validation samples each
]


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mortality shards of a 36-patient, 3-hospital synthetic cohort with 16-pixel crops."""
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_dataset(
        SyntheticConfig(seed=5, num_patients=36, image_size=64, crop_size=16), root, tasks=(TASK,)
    )
    return root


def compose(data_root: Path, out_dir: Path, *overrides: str) -> dict[str, Any]:
    """The real ``configs/federated.yaml`` with the tiny model and ``overrides``, resolved."""
    return compose_config([*TINY, f"data.root={data_root}", f"out_dir={out_dir}", *overrides])
