"""Shared parts of the federated tests: a composer of the real federated config with a tiny
model (the cohort, three non-IID hospitals, is the suite's ``tiny_data_root``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from federated.config import compose_config

REPO = Path(__file__).resolve().parents[2]
TASK = "mortality"

# A model small enough for a few federated rounds on two CPU cores.
TINY = [
    f"task={TASK}",
    "+experiment=tiny",
    "federated.min_report_count=1",  # tiny sites: a handful of validation samples each
    "tracking.enabled=false",  # on in the tests of tracking only
]


def compose(data_root: Path, out_dir: Path, *overrides: str) -> dict[str, Any]:
    """The real ``configs/federated.yaml`` with the tiny model and ``overrides``, resolved."""
    return compose_config([*TINY, f"data.root={data_root}", f"out_dir={out_dir}", *overrides])
