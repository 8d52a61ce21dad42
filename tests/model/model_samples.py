"""The model tests' sample records (``dipro.data.samples``) and their small model config."""

from __future__ import annotations

from typing import Any

from tiny_model import tiny_model_cfg

from dipro import vocab
from dipro.data.samples import collate_records, random_record

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
    """``dipro.data.samples.random_record`` with EHR hourly over ``num_ehr`` hours unless
    ``ehr_times`` is given, and the tests' feature width."""
    times = ehr_times if ehr_times is not None else [float(h) for h in range(num_ehr)]
    return random_record(
        seed,
        task,
        num_cxr=num_cxr,
        ehr_times=times,
        mode=mode,
        crop_size=crop_size,
        feature_dim=FEATURES,
    )


batch_of = collate_records
