"""Hand-made sample records and the small model config of the model tests.

Batches go through the real path: records -> ``records_to_table`` -> numpy columns ->
``collate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tiny_model import tiny_model_cfg

from dipro import vocab
from dipro.batch import Batch
from dipro.data.collate import collate
from dipro.data.schema import records_to_table

R, K, V, G = vocab.NUM_REGIONS, vocab.NUM_FINDINGS, vocab.NUM_EHR, vocab.NUM_DEMOGRAPHICS
CROP = 32
FEATURES = 16


def small_cfg(mode: str = "features", **ablation: bool) -> dict[str, Any]:
    """The tiny model config in ``mode`` (with the values + observed EHR input, which these
    tests exercise) and some ablation switches turned off/on."""
    cfg = tiny_model_cfg(
        region_mode=mode, feature_dim=FEATURES, num_groups=4, ehr_use_observed=True
    )
    cfg["ablation"].update(ablation)
    return cfg


def make_record(
    seed: int,
    task: str = "mortality",
    num_cxr: int = 3,
    num_ehr: int = 6,
    mode: str = "features",
    ehr_times: list[float] | None = None,
    crop_size: int = CROP,
) -> dict[str, Any]:
    """One valid sample record with random content; CXRs every 10 h, EHR hourly from hour 0.

    Region 0 of the first CXR has no box, so missing-region embeddings take part.
    """
    rng = np.random.default_rng(seed)
    T = num_cxr
    times = ehr_times if ehr_times is not None else [float(h) for h in range(num_ehr)]
    L = len(times)
    present = np.ones((T, R), bool)
    present[0, 0] = False
    labels = rng.integers(0, 4, size=(T - 1, R, K)).astype(np.int8)
    rec: dict[str, Any] = {
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
        rec["crop_size"] = crop_size
        rec["crops"] = rng.integers(0, 256, size=(T, R, crop_size, crop_size), dtype=np.uint8)
    else:
        rec["feature_dim"] = FEATURES
        rec["features"] = rng.normal(size=(T, R, FEATURES)).astype(np.float32)
    if task == "disease_progression":
        rec["progression"] = rng.integers(0, 4, size=K).astype(np.int8)
    else:
        rec["mortality"] = int(seed % 2)
        rec["los_days"] = float(2.0 + (seed % 4) * 1.5)
    return rec


def batch_of(records: list[dict[str, Any]]) -> Batch:
    """Collate records through the project's schema and collate."""
    table = records_to_table(records)
    return collate(
        {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    )
