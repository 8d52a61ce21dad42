"""Random valid sample records of a task, for model benchmarks and tests, and their batch
through the real path: records -> ``records_to_table`` -> numpy columns -> ``collate``."""

from __future__ import annotations

from typing import Any

import numpy as np

from dipro import vocab
from dipro.batch import Batch
from dipro.data.collate import collate
from dipro.data.schema import records_to_table


def random_record(
    seed: int,
    task: str = "mortality",
    *,
    num_cxr: int = 3,
    ehr_times: list[float] | None = None,
    mode: str = "features",
    crop_size: int = 32,
    feature_dim: int = 16,
) -> dict[str, Any]:
    """One valid sample record of ``task`` with random content (``mode``: crops or features).

    ``num_cxr`` CXRs every 10 h (a disease progression sample holds two), EHR at ``ehr_times``
    (default: hourly over 6 h). Region 0 of the first CXR has no box, so missing-region
    embeddings take part; labels cover every code, "not mentioned" included.
    """
    R, K, V, G = vocab.NUM_REGIONS, vocab.NUM_FINDINGS, vocab.NUM_EHR, vocab.NUM_DEMOGRAPHICS
    rng = np.random.default_rng(seed)
    T = num_cxr
    times = [float(h) for h in range(6)] if ehr_times is None else ehr_times
    L = len(times)
    present = np.ones((T, R), bool)
    present[0, 0] = False
    labels = rng.integers(0, 4, size=(T - 1, R, K)).astype(np.int8)
    record: dict[str, Any] = {
        "sample_id": f"s{seed}",
        "subject_id": 1000 + seed,
        "stay_id": 2000 + seed,
        "hospital": seed % 2,
        "split": "train",
        "task": task,
        "cxr_times": np.arange(T, dtype=np.float32) * 10.0,
        "region_present": present,
        "ehr_times": np.asarray(times, np.float32),
        "ehr_values": rng.normal(size=(L, V)).astype(np.float32),
        "ehr_observed": rng.random((L, V)) < 0.5,
        "demographics": rng.normal(size=G).astype(np.float32),
        "region_labels": labels,
    }
    if mode == "crops":
        record["crop_size"] = crop_size
        record["crops"] = rng.integers(0, 256, size=(T, R, crop_size, crop_size), dtype=np.uint8)
    else:
        record["feature_dim"] = feature_dim
        record["features"] = rng.normal(size=(T, R, feature_dim)).astype(np.float32)
    if task == "disease_progression":
        record["progression"] = rng.integers(0, 4, size=K).astype(np.int8)
    else:
        record["mortality"] = int(seed % 2)
        record["los_days"] = float(2.0 + (seed % 4) * 1.5)
    return record


def collate_records(records: list[dict[str, Any]]) -> Batch:
    """The ``Batch`` of ``records`` through the project's schema and collate."""
    table = records_to_table(records)
    return collate(
        {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    )
