"""What a synthetic cohort is: its settings (:class:`SyntheticConfig`) and, once simulated
(``dipro.data.synthetic.course.simulate_cohort``), its arrays (:class:`Cohort`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

MAX_STAY_HOURS: Final[int] = 11 * 24  # LOS < 11 days (vocab.LOS_BIN_EDGES)


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and rates of the synthetic cohort; every field is a Hydra override under
    ``data.generator`` (configs/data/synthetic.yaml)."""

    seed: int = 0
    num_patients: int = 300
    num_hospitals: int = 3
    image_size: int = 128  # full CXR side in pixels
    crop_size: int = 32  # S: region crops are S x S
    min_cxrs: int = 2
    max_cxrs: int = 6
    min_gap_hours: float = 8.0  # between consecutive CXRs
    max_gap_hours: float = 40.0
    icu_window_hours: int = 48  # ICU samples: CXRs and EHR of the first hours
    change_threshold: float = 0.06  # |change of finding intensity| above it: worsened / improved
    not_mentioned_rate: float = 0.15  # plausible (region, finding) pairs left unlabelled
    missing_box_rate: float = 0.03  # regions without a box on a CXR
    box_jitter: float = 0.01  # per-image box jitter, fraction of the image side
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train / val / test
    rows_per_file: int = 256  # Parquet rows per shard file

    def __post_init__(self) -> None:
        problems = []
        if self.num_patients < 1 or self.num_hospitals < 1:
            problems.append("num_patients and num_hospitals must be at least 1")
        if not 2 <= self.min_cxrs <= self.max_cxrs:
            problems.append("need 2 <= min_cxrs <= max_cxrs")
        if not 0 < self.min_gap_hours <= self.max_gap_hours:
            problems.append("need 0 < min_gap_hours <= max_gap_hours")
        if self.icu_window_hours < 2 * self.min_gap_hours + 4:
            problems.append("icu_window_hours leaves no room for two CXRs")
        if self.crop_size < 4 or self.image_size < 32:
            problems.append("crop_size must be >= 4 and image_size >= 32")
        fractions = self.split_fractions
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            problems.append("split_fractions must be three non-negative numbers summing to 1")
        for name in ("not_mentioned_rate", "missing_box_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must lie in [0, 1)")
        if self.rows_per_file < 1:
            problems.append("rows_per_file must be at least 1")
        if problems:
            raise ValueError("invalid SyntheticConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (stored in the manifest)."""
        data = dataclasses.asdict(self)
        data["split_fractions"] = list(self.split_fractions)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SyntheticConfig:
        """Build from a dict or a Hydra DictConfig; unknown keys are an error."""
        values = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown synthetic cohort settings {unknown}; known: {sorted(known)}")
        if "split_fractions" in values:
            values["split_fractions"] = tuple(float(x) for x in values["split_fractions"])
        return cls(**values)


@dataclass(frozen=True)
class Cohort:
    """The whole synthetic cohort in memory. N patients (one ICU stay each), M CXRs in total,
    H = MAX_STAY_HOURS hourly steps, R regions, K findings, V EHR variables, S crop size.

    CXRs are stored flat, patient after patient, in time order: the CXRs of patient ``i`` are
    ``cxr_offsets[i] : cxr_offsets[i + 1]``. Pairs (consecutive CXRs of a stay) are stored flat
    too: pair ``j`` compares CXR ``pair_first[j]`` with CXR ``pair_first[j] + 1``.

    | field              | dtype   | shape          | meaning                                     |
    |--------------------|---------|----------------|---------------------------------------------|
    | subject_id         | int64   | [N]            | MIMIC-style patient id (8 digits, 1...)     |
    | stay_id            | int64   | [N]            | MIMIC-style ICU stay id (8 digits, 3...)    |
    | hospital           | int32   | [N]            | site 0 .. num_hospitals-1                   |
    | split              | str     | [N]            | train / val / test                          |
    | age, height, weight| float32 | [N]            | years, cm, kg                               |
    | gender ... marital | str     | [N]            | values of vocab.GENDERS, RACES, ...         |
    | demographics       | float32 | [N, G]         | the record's demographic vector             |
    | severity           | float32 | [N, H]         | latent severity per hour                    |
    | los_days           | float32 | [N]            | ICU length of stay, in [2, 11)              |
    | mortality          | int8    | [N]            | in-hospital death                           |
    | num_hours          | int64   | [N]            | hours of the stay (EHR beyond is not valid) |
    | ehr_values         | float32 | [N, H, V]      | clinical units, clipped, forward filled     |
    | ehr_observed       | bool    | [N, H, V]      | measured in that hour                       |
    | cxr_offsets        | int64   | [N + 1]        | CSR offsets into the CXR arrays             |
    | cxr_subject        | int64   | [M]            | patient index of each CXR                   |
    | cxr_times          | float32 | [M]            | hours since ICU admission                   |
    | images             | uint8   | [M, W, W]      | full CXR, W = image_size                    |
    | boxes              | float32 | [M, R, 4]      | x1, y1, x2, y2 in pixels (continuous)       |
    | region_present     | bool    | [M, R]         | the region has a box                        |
    | intensities        | float32 | [M, R, K]      | finding intensity in [0, 1] (0 off AFFINITY)|
    | crops              | uint8   | [M, R, S, S]   | region crops; 0 where no box                |
    | pair_first         | int64   | [Q]            | first CXR of each consecutive pair          |
    | pair_region_labels | int8    | [Q, R, K]      | progression code per region and finding     |
    | pair_progression   | int8    | [Q, K]         | finding-level progression code              |
    """

    config: SyntheticConfig
    subject_id: np.ndarray
    stay_id: np.ndarray
    hospital: np.ndarray
    split: np.ndarray
    age: np.ndarray
    height: np.ndarray
    weight: np.ndarray
    gender: np.ndarray
    race: np.ndarray
    language: np.ndarray
    marital_status: np.ndarray
    demographics: np.ndarray
    severity: np.ndarray
    los_days: np.ndarray
    mortality: np.ndarray
    num_hours: np.ndarray
    ehr_values: np.ndarray
    ehr_observed: np.ndarray
    cxr_offsets: np.ndarray
    cxr_subject: np.ndarray
    cxr_times: np.ndarray
    images: np.ndarray
    boxes: np.ndarray
    region_present: np.ndarray
    intensities: np.ndarray
    crops: np.ndarray
    pair_first: np.ndarray
    pair_region_labels: np.ndarray
    pair_progression: np.ndarray

    @property
    def num_patients(self) -> int:
        return int(self.subject_id.shape[0])

    def cxr_slice(self, patient: int) -> slice:
        """Indices of patient ``patient``'s CXRs in the flat CXR arrays."""
        return slice(int(self.cxr_offsets[patient]), int(self.cxr_offsets[patient + 1]))
