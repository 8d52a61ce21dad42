"""The synthetic ICU cohort: longitudinal chest X-rays, hourly EHR and outcomes, all driven by one
latent severity per patient (docs/model.md, "The synthetic cohort").

Generative model, per patient ``i`` in hospital ``h`` (all draws from one seeded numpy Generator
tree, so a seed fixes every byte):

- demographics: age, sex, height, weight and categorical race / language / marital status, with
  a race mix that differs by hospital;
- latent severity ``s_i(t)`` over hourly steps ``t`` = 0 .. 263 (11 days): a piecewise-linear
  random walk with one knot a day, starting at a baseline that rises with age and with the
  hospital's case mix, with a patient-specific drift (improving or deteriorating stays);
- finding intensities ``a[t, r, k] = level[r, k] + w * s(t0) + resp[r, k] * (s(t) - s(t0)) +
  own[r, k](t) - own[r, k](t0)`` in [0, 1] for the anatomically plausible (region, finding)
  pairs of ``AFFINITY`` (``t0``: the patient's first CXR): a static per-patient level drawn wide
  and independently of the course, so that one image says little about a change; the severity
  the patient arrived with, which every image shows a little of (how sick the patient looks,
  which the ICU outcomes depend on, but which does not predict the direction of a later change);
  the change of severity, which the EHR follows, times the patient's response (a slow drift of
  every region at once); and the finding's own course in each region: a slow background drift
  plus local episodes in which a finding clearly worsens or improves in one region within a
  day. Only the images show where an episode happened; its direction follows that day's
  severity step against the patient's trend, which the EHR between two CXRs shows;
- the ICU stay: length of stay (days, in [2, 11)) and in-hospital mortality from the severity of
  the first 48 h, its slope, the peak severity of the stay and age; 2..6 CXRs at least
  ``min_gap_hours`` apart, the first two inside the first 48 h, all inside the stay;
- each CXR: the patient's static anatomy (lung fields, heart, ribs and a smooth texture; it
  dominates the pixels) plus, inside each region's box, one spatial pattern per finding scaled by
  its intensity at that time; the hospital's contrast and brightness; exposure and pixel noise.
  Region crops are cut from the full image by boxes jittered per image and resized to ``S x S``
  (``torchvision.ops.roi_align``); a few boxes are missing;
- progression labels per consecutive CXR pair and (region, finding): worsened / improved / no
  change by thresholding the change of intensity (what a reader sees, not a latent logit),
  "not mentioned" for implausible pairs, regions without a box and at random; the finding-level
  label is that of the mentioned region with the largest change;
- 38 hourly EHR variables in clinical units, each a normal value plus a patient offset plus
  severity (and, for the respiratory variables, its slope) times a loading, with noise; vitals
  observed almost hourly, lab panels every 4-24 h or never, PEEP only for ventilated patients;
  forward filled from the normal value, with the observed mask.

Public API (also for the raw-MIMIC writer): :class:`SyntheticConfig`; :func:`simulate_cohort`
-> :class:`Cohort` (everything in memory: stays, full CXRs, boxes, times, finding intensities,
labels, hourly EHR, demographics, outcomes); :func:`cohort_records` (the sample records of one
task); :func:`write_synthetic_dataset` (all tasks as Parquet shards, see dipro.data.layout);
:func:`ensure_synthetic_data` (the dataset of a ``data`` config node, written when absent and
reused otherwise: what ``ray_jobs.synthetic``, the demo and the studies call).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torchvision.ops import roi_align

from dipro import vocab
from dipro.config import ConfigError
from dipro.data.layout import Manifest, format_counts, read_manifest
from dipro.data.shard_writer import write_dataset

# Bump when a code change alters the generated data for the same config, so that datasets
# written by older code are recognised as different (dipro.data.synthetic.generator_info).
GENERATOR_VERSION: Final[int] = 6
MAX_STAY_HOURS: Final[int] = 11 * 24  # LOS < 11 days (vocab.LOS_BIN_EDGES)
_KNOT_HOURS: Final[int] = 24
_PROFILE_GRID: Final[int] = 24  # finding patterns are drawn on this grid in box coordinates
_ID_STREAM: Final[int] = 0xD1C0  # second seed word of the CXR identifier stream

# Canonical region boxes as fractions of the image (x1, y1, x2, y2), in vocab.REGIONS order.
# Radiological convention: the patient's left is on the image's right.
CANONICAL_BOXES: Final[np.ndarray] = np.array(
    [
        (0.52, 0.12, 0.92, 0.86),  # left lung
        (0.08, 0.12, 0.48, 0.86),  # right lung
        (0.52, 0.56, 0.92, 0.86),  # left lower lung zone
        (0.08, 0.56, 0.48, 0.86),  # right lower lung zone
        (0.54, 0.34, 0.70, 0.56),  # left hilar structures
        (0.30, 0.34, 0.46, 0.56),  # right hilar structures
        (0.78, 0.76, 0.95, 0.93),  # left costophrenic angle
        (0.05, 0.76, 0.22, 0.93),  # right costophrenic angle
        (0.40, 0.48, 0.76, 0.82),  # cardiac silhouette
        (0.38, 0.08, 0.62, 0.52),  # mediastinum
    ],
    dtype=np.float64,
)

# Which findings can appear in which region, [R, K] in vocab orders. Columns: atelectasis,
# enlarged cardiac silhouette, consolidation, pulmonary edema, lung opacity, pleural effusion,
# pneumonia. Pairs outside it are never rendered and always labelled "not mentioned".
AFFINITY: Final[np.ndarray] = np.array(
    [
        (1, 0, 1, 1, 1, 0, 1),  # left lung
        (1, 0, 1, 1, 1, 0, 1),  # right lung
        (1, 0, 1, 1, 1, 1, 1),  # left lower lung zone
        (1, 0, 1, 1, 1, 1, 1),  # right lower lung zone
        (0, 0, 0, 1, 1, 0, 0),  # left hilar structures
        (0, 0, 0, 1, 1, 0, 0),  # right hilar structures
        (0, 0, 0, 0, 0, 1, 0),  # left costophrenic angle
        (0, 0, 0, 0, 0, 1, 0),  # right costophrenic angle
        (0, 1, 0, 0, 0, 0, 0),  # cardiac silhouette
        (0, 1, 0, 0, 0, 0, 0),  # mediastinum
    ],
    dtype=bool,
)

# Pixel amplitude of each finding's pattern at intensity 1 (image scale 0..1).
_FINDING_AMPLITUDE: Final[np.ndarray] = np.array([0.45, 0.45, 0.60, 0.40, 0.45, 0.60, 0.50])
_LEVEL_LOW, _LEVEL_HIGH = 0.08, 0.92  # a finding's static per-patient intensity
_ARRIVAL: Final[float] = 0.06  # intensity per unit of the severity at the first CXR
_RESPONSE: Final[tuple[float, float]] = (0.003, 0.008)  # intensity per unit of severity change
_BACKGROUND_COURSE: Final[float] = 0.01  # daily step of a finding's slow drift (below a reader)
_EPISODE_RATE: Final[float] = 0.55  # daily chance of an episode of a finding, over its regions
_EPISODE_SIZE: Final[tuple[float, float]] = (0.04, 0.20)  # its change of intensity, either sign
_EPISODE_FOLLOWS_SEVERITY: Final[float] = 5.0  # logit of worsening per unit of the day's step
_EPISODE_TREND_SHARE: Final[float] = 0.9  # of the patient's mean daily step, taken off that step
# The radiographic course: a pleural effusion that builds up or clears after the first CXR, which
# no vital sign or lab follows and which the ICU outcomes depend on.
_COURSE_FINDING: Final[int] = vocab.FINDINGS.index("pleural effusion")
_COURSE_INTENSITY: Final[float] = 0.10  # change of intensity per unit of the course, once complete
_COURSE_HOURS: Final[float] = 12.0  # hours after the first CXR until the change is complete
_COURSE_MORTALITY: Final[float] = 1.5  # mortality logit per unit of the course
_COURSE_LOS: Final[float] = 0.5  # log of the stay beyond 2 days per unit of the course


@dataclass(frozen=True)
class _EhrVar:
    normal: float  # the value used before the first measurement (forward fill start)
    sd: float  # between-patient and measurement spread
    low: float  # physiological clipping range
    high: float
    severity: float  # shift per unit of latent severity
    slope: float  # shift per unit of severity slope (per day)
    schedule: str  # key of _SCHEDULES
    integer: bool = False


# In vocab.EHR_VARIABLES order; units as charted in MIMIC-IV (temperature in Celsius, FiO2 in %).
_EHR: Final[tuple[_EhrVar, ...]] = (
    _EhrVar(30.0, 15.0, 0.0, 5000.0, 12.0, 0.0, "lft"),  # ALT U/L
    _EhrVar(3.4, 0.4, 0.5, 7.0, -0.3, 0.0, "lft"),  # Albumin g/dL
    _EhrVar(85.0, 25.0, 0.0, 3000.0, 10.0, 0.0, "lft"),  # Alkaline phosphatase U/L
    _EhrVar(12.0, 2.5, 0.0, 50.0, 1.8, 0.0, "bmp"),  # Anion gap mEq/L
    _EhrVar(35.0, 18.0, 0.0, 8000.0, 16.0, 0.0, "lft"),  # AST U/L
    _EhrVar(24.0, 2.5, 0.0, 60.0, -2.0, 0.0, "bmp"),  # Bicarbonate mEq/L
    _EhrVar(0.9, 0.4, 0.0, 50.0, 0.5, 0.0, "lft"),  # Bilirubin mg/dL
    _EhrVar(20.0, 7.0, 0.0, 250.0, 7.0, 0.0, "bmp"),  # BUN mg/dL
    _EhrVar(104.0, 3.5, 50.0, 150.0, 0.5, 0.0, "bmp"),  # Chloride mEq/L
    _EhrVar(1.0, 0.3, 0.0, 20.0, 0.4, 0.0, "bmp"),  # Creatinine mg/dL
    _EhrVar(64.0, 10.0, 0.0, 200.0, -4.0, -1.0, "vital"),  # Diastolic BP mmHg
    _EhrVar(40.0, 8.0, 21.0, 100.0, 10.0, 6.0, "fio2"),  # FiO2 %
    _EhrVar(3.6, 0.4, 1.0, 4.0, -0.5, 0.0, "q4", integer=True),  # GCS eye
    _EhrVar(5.6, 0.5, 1.0, 6.0, -0.6, 0.0, "q4", integer=True),  # GCS motor
    _EhrVar(4.3, 0.6, 1.0, 5.0, -0.8, 0.0, "q4", integer=True),  # GCS verbal
    _EhrVar(130.0, 30.0, 0.0, 2000.0, 12.0, 0.0, "bmp"),  # Glucose mg/dL
    _EhrVar(86.0, 12.0, 0.0, 300.0, 8.0, 3.0, "vital"),  # Heart rate bpm
    _EhrVar(170.0, 10.0, 100.0, 250.0, 0.0, 0.0, "once"),  # Height cm
    _EhrVar(31.0, 4.5, 0.0, 80.0, -1.5, 0.0, "cbc"),  # Hematocrit %
    _EhrVar(10.4, 1.6, 0.0, 25.0, -0.5, 0.0, "cbc"),  # Hemoglobin g/dL
    _EhrVar(2.0, 0.3, 0.0, 10.0, 0.05, 0.0, "bmp"),  # Magnesium mg/dL
    _EhrVar(78.0, 10.0, 0.0, 300.0, -5.0, -1.5, "vital"),  # Mean BP mmHg
    _EhrVar(97.0, 1.5, 0.0, 100.0, -1.8, -1.5, "vital"),  # SpO2 %
    _EhrVar(40.0, 6.0, 0.0, 200.0, 3.0, 1.5, "abg"),  # PaCO2 mmHg
    _EhrVar(32.0, 7.0, 0.0, 150.0, 3.0, 0.0, "coag"),  # PTT s
    _EhrVar(210.0, 60.0, 0.0, 2000.0, -20.0, 0.0, "cbc"),  # Platelets K/uL
    _EhrVar(6.0, 2.0, 0.0, 40.0, 2.0, 1.0, "vent"),  # PEEP cmH2O
    _EhrVar(4.1, 0.4, 0.0, 15.0, 0.1, 0.0, "bmp"),  # Potassium mEq/L
    _EhrVar(14.0, 2.0, 0.0, 150.0, 1.2, 0.0, "coag"),  # PT s
    _EhrVar(19.0, 3.5, 0.0, 80.0, 3.0, 4.0, "vital"),  # Respiratory rate /min
    _EhrVar(139.0, 3.5, 50.0, 200.0, 0.3, 0.0, "bmp"),  # Sodium mEq/L
    _EhrVar(120.0, 16.0, 0.0, 300.0, -7.0, -2.0, "vital"),  # Systolic BP mmHg
    _EhrVar(37.0, 0.5, 25.0, 45.0, 0.3, 0.1, "q4"),  # Temperature C
    _EhrVar(0.05, 0.04, 0.0, 30.0, 0.05, 0.0, "troponin"),  # Troponin-T ng/mL
    _EhrVar(80.0, 30.0, 0.0, 2000.0, -18.0, -5.0, "urine"),  # Urine output mL/h
    _EhrVar(78.0, 16.0, 20.0, 300.0, 0.0, 0.0, "daily"),  # Weight kg
    _EhrVar(10.0, 3.5, 0.0, 200.0, 2.5, 0.0, "cbc"),  # WBC K/uL
    _EhrVar(7.40, 0.04, 6.5, 8.0, -0.03, -0.02, "abg"),  # pH
)
_HEIGHT: Final[int] = vocab.EHR_VARIABLES.index("Height")
_WEIGHT: Final[int] = vocab.EHR_VARIABLES.index("Weight")

# Observation schedule: (shortest period h, longest period h, P(never measured in the stay),
# P(measured at a scheduled hour)).
_SCHEDULES: Final[dict[str, tuple[int, int, float, float]]] = {
    "vital": (1, 1, 0.0, 0.92),
    "urine": (1, 1, 0.02, 0.7),
    "fio2": (1, 3, 0.1, 0.85),
    "q4": (4, 4, 0.0, 0.9),
    "bmp": (4, 12, 0.0, 0.95),
    "cbc": (6, 12, 0.0, 0.95),
    "coag": (8, 24, 0.15, 0.9),
    "lft": (12, 24, 0.3, 0.9),
    "abg": (4, 8, 0.45, 0.9),
    "vent": (1, 2, 0.0, 0.85),
    "daily": (24, 24, 0.1, 1.0),
    "once": (1000, 1000, 0.4, 1.0),
    "troponin": (12, 24, 0.8, 1.0),
}


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


def simulate_cohort(cfg: SyntheticConfig) -> Cohort:
    """Simulate the cohort of ``cfg``; the same config gives the same arrays, byte for byte."""
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(8)]
    rng_site, rng_demo, rng_sev, rng_stay, rng_find, rng_img, rng_ehr, rng_course = streams
    N = cfg.num_patients
    site = _hospitals(cfg, rng_site)
    hospital = site["hospital"]
    demo = _demographics(hospital, site["race_probs"], rng_demo)
    severity, slope = _severity(hospital, site["severity_shift"], demo["age"], rng_sev)
    course = rng_course.standard_normal(N)
    los_days, mortality = _outcomes(
        severity, slope, course, demo["age"], site["mortality_shift"][hospital], rng_stay
    )
    num_hours = np.ceil(los_days * 24.0).astype(np.int64)
    cxr_times, cxr_offsets = _cxr_times(cfg, num_hours, rng_stay)
    cxr_subject = np.repeat(np.arange(N), np.diff(cxr_offsets))

    intensities = _finding_intensity(
        hospital, site["finding_shift"], severity, slope, cxr_subject, cxr_times, rng_find
    ) + _radiographic_course(course, cxr_subject, cxr_times)
    intensities = np.where(AFFINITY, np.clip(intensities, 0.0, 1.0), 0.0)
    images, boxes, present, crops = _render(cfg, cxr_subject, hospital, site, intensities, rng_img)
    pair_first, region_labels, progression = _labels(
        cfg, cxr_offsets, intensities, present, rng_find
    )
    ehr_values, ehr_observed = _ehr(severity, slope, num_hours, demo, rng_ehr)

    ids = np.arange(N, dtype=np.int64)
    return Cohort(
        config=cfg,
        subject_id=10_000_000 + ids,
        stay_id=30_000_000 + ids,
        hospital=hospital.astype(np.int32),
        split=_splits(cfg, hospital, rng_site),
        age=demo["age"],
        height=demo["height"],
        weight=demo["weight"],
        gender=demo["gender"],
        race=demo["race"],
        language=demo["language"],
        marital_status=demo["marital_status"],
        demographics=demo["vector"],
        severity=severity.astype(np.float32),
        los_days=los_days.astype(np.float32),
        mortality=mortality.astype(np.int8),
        num_hours=num_hours,
        ehr_values=ehr_values,
        ehr_observed=ehr_observed,
        cxr_offsets=cxr_offsets,
        cxr_subject=cxr_subject,
        cxr_times=cxr_times.astype(np.float32),
        images=images,
        boxes=boxes.astype(np.float32),
        region_present=present,
        intensities=intensities.astype(np.float32),
        crops=crops,
        pair_first=pair_first,
        pair_region_labels=region_labels,
        pair_progression=progression,
    )


def _hospitals(cfg: SyntheticConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Site sizes and the traits that make sites non-IID."""
    Hs, K = cfg.num_hospitals, vocab.NUM_FINDINGS
    weights = 1.0 / (1.0 + 0.5 * np.arange(Hs))
    hospital = rng.choice(Hs, size=cfg.num_patients, p=weights / weights.sum())
    spread = np.linspace(-1.0, 1.0, Hs) if Hs > 1 else np.zeros(1)
    base_race = np.array([0.04, 0.14, 0.05, 0.06, 0.06, 0.65])
    return {
        "hospital": hospital,
        "severity_shift": 0.5 * spread,
        "mortality_shift": 0.3 * rng.permutation(spread),
        "finding_shift": rng.normal(0.0, 0.5, (Hs, K)),
        "contrast": 1.0 + 0.2 * rng.permutation(spread),
        "brightness": rng.uniform(-0.08, 0.08, Hs),
        "race_probs": rng.dirichlet(base_race * 40.0, size=Hs),
    }


def _demographics(
    hospital: np.ndarray, race_probs: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    N = hospital.shape[0]
    age = np.clip(rng.normal(64.0, 15.0, N), 18.0, 95.0)
    male = rng.random(N) < 0.56
    height = np.clip(np.where(male, 176.0, 162.0) + rng.normal(0.0, 7.0, N), 140.0, 205.0)
    weight = np.clip(np.where(male, 84.0, 71.0) + rng.normal(0.0, 16.0, N), 40.0, 200.0)
    cum = np.cumsum(race_probs[hospital], axis=1)
    race_idx = np.minimum((rng.random(N)[:, None] > cum).sum(1), len(vocab.RACES) - 1)
    lang_idx = (rng.random(N) < 0.9).astype(int)  # "?" or ENGLISH
    marital_idx = rng.choice(len(vocab.MARITAL_STATUSES), N, p=[0.12, 0.45, 0.28, 0.15])
    gender_idx = male.astype(int)  # GENDERS = (F, M)

    G = vocab.NUM_DEMOGRAPHICS
    vector = np.zeros((N, G), np.float32)
    vector[:, 0], vector[:, 1], vector[:, 2] = age, height, weight
    col = len(vocab.NUMERIC_DEMOGRAPHICS)
    for idx, values in (
        (gender_idx, vocab.GENDERS),
        (race_idx, vocab.RACES),
        (lang_idx, vocab.LANGUAGES),
        (marital_idx, vocab.MARITAL_STATUSES),
    ):
        vector[np.arange(N), col + idx] = 1.0
        col += len(values)
    return {
        "age": age.astype(np.float32),
        "height": height.astype(np.float32),
        "weight": weight.astype(np.float32),
        "gender": np.asarray(vocab.GENDERS, dtype=object)[gender_idx],
        "race": np.asarray(vocab.RACES, dtype=object)[race_idx],
        "language": np.asarray(vocab.LANGUAGES, dtype=object)[lang_idx],
        "marital_status": np.asarray(vocab.MARITAL_STATUSES, dtype=object)[marital_idx],
        "vector": vector,
    }


def _severity(
    hospital: np.ndarray, shift: np.ndarray, age: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Hourly latent severity [N, H] and its slope per day [N, H]: piecewise linear with one knot
    a day."""
    N, H = hospital.shape[0], MAX_STAY_HOURS
    days = H // _KNOT_HOURS
    baseline = shift[hospital] + 0.3 * (age - 64.0) / 15.0 + rng.normal(0.0, 0.9, N)
    drift = rng.normal(0.0, 0.5, N)
    steps = drift[:, None] + rng.normal(0.0, 0.8, (N, days))  # change per day
    knots = baseline[:, None] + np.concatenate([np.zeros((N, 1)), np.cumsum(steps, 1)], 1)
    hours = np.arange(H)
    day, frac = hours // _KNOT_HOURS, (hours % _KNOT_HOURS) / _KNOT_HOURS
    severity = knots[:, day] * (1.0 - frac) + knots[:, day + 1] * frac
    return severity, steps[:, day]


def _outcomes(
    severity: np.ndarray,
    slope: np.ndarray,
    course: np.ndarray,
    age: np.ndarray,
    site_shift: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """LOS in days within [2, 11) and in-hospital mortality, from severity, the radiographic
    course (``_radiographic_course``) and age."""
    N = severity.shape[0]
    early = severity[:, :48].mean(1)
    early_slope = slope[:, :48].mean(1)
    age_z = (age - 64.0) / 15.0
    extra = np.exp(
        0.7 + 0.45 * early + _COURSE_LOS * course + 0.15 * age_z + rng.normal(0.0, 0.6, N)
    )
    los_days = np.clip(2.0 + extra, 2.05, 10.95)
    stay_hours = np.ceil(los_days * 24.0).astype(int)
    peak = np.array([severity[i, : stay_hours[i]].max() for i in range(N)])
    logit = (
        -2.4
        + 0.9 * early
        + 0.6 * early_slope
        + 0.4 * peak
        + _COURSE_MORTALITY * course
        + 0.4 * age_z
        + site_shift
    )
    mortality = rng.random(N) < 1.0 / (1.0 + np.exp(-logit))
    return los_days, mortality


def _cxr_times(
    cfg: SyntheticConfig, num_hours: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """CXR times (hours) flat over patients and CSR offsets. The first two fall inside the ICU
    window, consecutive CXRs are at least min_gap_hours apart, all lie inside the stay."""
    N, n_max = num_hours.shape[0], cfg.max_cxrs
    window, gap_lo, gap_hi = cfg.icu_window_hours, cfg.min_gap_hours, cfg.max_gap_hours
    first = rng.uniform(0.0, window - gap_lo - 2.0, N)
    first_gap = gap_lo + rng.uniform(0.0, 1.0, N) * (window - 1.0 - first - gap_lo).clip(0.0)
    later = rng.uniform(gap_lo, gap_hi, (N, max(n_max - 2, 0)))
    times = np.cumsum(np.concatenate([first[:, None], first_gap[:, None], later], 1), 1)
    wanted = rng.integers(cfg.min_cxrs, n_max + 1, N)
    keep = (np.arange(n_max)[None, :] < wanted[:, None]) & (times < num_hours[:, None] - 1.0)
    keep[:, :2] = True
    counts = keep.sum(1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return np.round(times[keep], 2), offsets


def _finding_intensity(
    hospital: np.ndarray,
    finding_shift: np.ndarray,
    severity: np.ndarray,
    slope: np.ndarray,
    cxr_subject: np.ndarray,
    cxr_times: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Finding intensity [M, R, K] at each CXR, before the radiographic course is added and the
    result is clipped to [0, 1] off ``AFFINITY``: a static per-patient level, the severity the
    patient arrived with, the change of severity since the patient's first CXR, and the
    finding's own local course.

    ``a[t] = level + _ARRIVAL * s(t0) + resp * (s(t) - s(t0)) + own(t) - own(t0)``, with
    ``level`` drawn wide and independently of the course (the patient's static appearance
    dominates one image), ``s(t0)`` the severity at the first CXR (every image carries a little
    of it, so the CXRs say something about the ICU outcomes; it is independent of the later
    course, so it says nothing about the direction of a change), ``resp`` the patient's response
    to severity (small for a finding the patient does not have; a slow drift of every region at
    once, below what a reader calls a change) and ``own`` the finding's own course in
    each region: a slow background drift plus episodes, one region at a time, in which a finding
    the patient has clearly worsens or improves within a day (``_EPISODE_RATE`` a day, a change
    of ``_EPISODE_SIZE``). An episode is local, so only the images show where it happened; its
    direction follows that day's severity step against the patient's own trend
    (``_EPISODE_TREND_SHARE`` of the mean daily step taken off, so that a patient's trend, which
    the earlier episodes already show in one image, does not predict the next one): a patient
    who deteriorates more than usual that day tends to develop new opacities, one who improves
    to clear them, so the EHR between two CXRs says which way the changes went. The level is
    drawn inside [_LEVEL_LOW, _LEVEL_HIGH], away from the bounds that would make a level predict
    the direction of a change."""
    N, R, K = hospital.shape[0], vocab.NUM_REGIONS, vocab.NUM_FINDINGS
    has = rng.random((N, 1, K)) < 0.8  # the patient has the finding at all
    level = rng.uniform(_LEVEL_LOW, _LEVEL_HIGH, (N, R, K)) + 0.05 * finding_shift[hospital][
        :, None, :
    ]
    resp = np.where(has, rng.uniform(*_RESPONSE, (N, R, K)), 0.002)
    days = MAX_STAY_HOURS // _KNOT_HOURS
    drift = _BACKGROUND_COURSE * rng.standard_normal((N, R, K, days))
    daily = slope[:, ::_KNOT_HOURS][:, :days]  # [N, days] severity step of each day
    surprise = (daily - _EPISODE_TREND_SHARE * daily.mean(1, keepdims=True))[:, None, None, :]
    worsens = rng.random((N, R, K, days)) < 1.0 / (
        1.0 + np.exp(-_EPISODE_FOLLOWS_SEVERITY * surprise)
    )
    per_region = 1.0 - (1.0 - _EPISODE_RATE) ** (1.0 / AFFINITY.sum(0))  # [K]
    episode = (rng.random((N, R, K, days)) < per_region[:, None]) & has[..., None]
    size = rng.uniform(*_EPISODE_SIZE, (N, R, K, days))
    steps = drift + np.where(episode, np.where(worsens, size, -size), 0.0)
    knots = np.concatenate([np.zeros((N, R, K, 1)), np.cumsum(steps, axis=3)], axis=3)
    hour = np.clip(np.floor(cxr_times).astype(int), 0, MAX_STAY_HOURS - 1)
    day, frac = hour // _KNOT_HOURS, ((hour % _KNOT_HOURS) / _KNOT_HOURS)[:, None, None]
    own = knots[cxr_subject, :, :, day] * (1.0 - frac) + knots[cxr_subject, :, :, day + 1] * frac
    starts = np.searchsorted(cxr_subject, np.arange(N))[cxr_subject]
    arrival = severity[cxr_subject, hour[starts]][:, None, None]
    s = severity[cxr_subject, hour][:, None, None] - arrival
    a = level[cxr_subject] + _ARRIVAL * arrival + resp[cxr_subject] * s + own - own[starts]
    return a + rng.normal(0.0, 0.005, a.shape)


def _radiographic_course(
    course: np.ndarray, cxr_subject: np.ndarray, cxr_times: np.ndarray
) -> np.ndarray:
    """The change of intensity [M, R, K] that the radiographic course adds to each CXR.

    ``course[i]`` (standard normal, independent of the severity and so of every EHR variable)
    is how far patient ``i``'s pleural effusion builds up (> 0) or clears (< 0) after the first
    CXR: ``_COURSE_INTENSITY * course * min(1, (t - t0) / _COURSE_HOURS)`` in every region where
    an effusion can show. Mortality and the length of stay rise with it (``_outcomes``), so a
    part of the outcome risk shows only in the images, and since a finding's static level is
    drawn wide, only in the change between the first CXR and a later one."""
    starts = np.searchsorted(cxr_subject, np.arange(course.shape[0]))[cxr_subject]
    done = np.clip((cxr_times - cxr_times[starts]) / _COURSE_HOURS, 0.0, 1.0)
    change = np.zeros((cxr_times.shape[0], vocab.NUM_REGIONS, vocab.NUM_FINDINGS))
    change[:, :, _COURSE_FINDING] = (_COURSE_INTENSITY * course[cxr_subject] * done)[:, None]
    return change


def _anatomy(cfg: SyntheticConfig, boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Static anatomy per patient [N, W, W] in 0..1 from the patient's region boxes [N, R, 4]."""
    N, W = boxes.shape[0], cfg.image_size
    grid = ((np.arange(W) + 0.5) / W).astype(np.float32)
    y, x = grid[None, :, None], grid[None, None, :]

    def ellipse(box: np.ndarray, softness: float) -> np.ndarray:
        cx, cy = (box[:, 0] + box[:, 2]) / 2 / W, (box[:, 1] + box[:, 3]) / 2 / W
        rx, ry = (box[:, 2] - box[:, 0]) / 2 / W, (box[:, 3] - box[:, 1]) / 2 / W
        d = np.sqrt(
            ((x - cx[:, None, None]) / rx[:, None, None]) ** 2
            + ((y - cy[:, None, None]) / ry[:, None, None]) ** 2
        )
        return 1.0 / (1.0 + np.exp((d - 1.0) / softness))

    lungs = ellipse(boxes[:, 0], 0.08) + ellipse(boxes[:, 1], 0.08)
    heart = ellipse(boxes[:, 8], 0.1)
    spine = np.exp(-(((x - 0.5 - rng.normal(0, 0.01, (N, 1, 1))) / 0.06) ** 2))
    body = 0.42 + rng.uniform(-0.12, 0.12, (N, 1, 1)) - 0.25 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)
    rib_period = rng.uniform(0.07, 0.1, (N, 1, 1))
    ribs = (
        rng.uniform(0.04, 0.09, (N, 1, 1))
        * np.cos(
            2 * np.pi * (y + 0.15 * np.abs(x - 0.5)) / rib_period
            + rng.uniform(0, 2 * np.pi, (N, 1, 1))
        )
        ** 8
    )
    texture = np.zeros((N, W, W))
    for _ in range(6):
        fx, fy = rng.uniform(0.5, 4.0, (2, N, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (N, 1, 1))
        texture += rng.normal(0.0, 0.06, (N, 1, 1)) * np.cos(2 * np.pi * (fx * x + fy * y) + phase)
    anatomy = (
        body
        - rng.uniform(0.15, 0.4, (N, 1, 1)) * lungs
        + rng.uniform(0.1, 0.25, (N, 1, 1)) * heart
        + rng.uniform(0.05, 0.15, (N, 1, 1)) * spine
        + ribs * lungs
        + texture
    )
    return anatomy.astype(np.float32)


def _finding_patterns(N: int, rng: np.random.Generator) -> np.ndarray:
    """One spatial pattern per patient, region and finding on a box grid: [N, R, K, g, g]."""
    R, g = vocab.NUM_REGIONS, _PROFILE_GRID
    c = (np.arange(g) + 0.5) / g
    v, u = c[:, None], c[None, :]
    shape = (N, R, 1, 1)
    window = np.sqrt(np.sin(np.pi * u) * np.sin(np.pi * v))

    def blob(sigma: float) -> np.ndarray:
        cu, cv = rng.uniform(0.3, 0.7, (2, *shape))
        return np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * sigma**2))

    d = np.sqrt((u - 0.5) ** 2 + (v - 0.5) ** 2)
    band_v = rng.uniform(0.55, 0.8, shape)
    fu, fv = rng.uniform(3.0, 6.0, (2, *shape))
    patchy = 0.6 + 0.4 * np.cos(2 * np.pi * (fu * u + fv * v) + rng.uniform(0, 2 * np.pi, shape))
    patterns = [
        np.exp(-(((v - band_v) / 0.08) ** 2)) * window,  # atelectasis: a linear band
        np.broadcast_to(np.exp(-(((d - 0.34) / 0.1) ** 2)) * window, (N, R, g, g)),  # big heart
        blob(0.13) * window,  # consolidation: a dense focal blob
        np.broadcast_to(np.exp(-(d**2) / 0.18) * window, (N, R, g, g)),  # edema: diffuse haze
        blob(0.22) * window,  # lung opacity: a wide blob
        np.broadcast_to(np.clip((v - 0.45) / 0.4, 0, 1) * window, (N, R, g, g)),  # effusion: the
        # bottom of the box
        blob(0.18) * patchy * window,  # pneumonia: a patchy blob
    ]
    return np.stack(patterns, axis=2).astype(np.float32)


def _render(
    cfg: SyntheticConfig,
    cxr_subject: np.ndarray,
    hospital: np.ndarray,
    site: dict[str, np.ndarray],
    intensities: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full images [M, W, W] uint8, crop boxes [M, R, 4], region presence [M, R] and crops."""
    N, M, R, W, S = (
        hospital.shape[0],
        cxr_subject.shape[0],
        vocab.NUM_REGIONS,
        cfg.image_size,
        cfg.crop_size,
    )
    centre = np.array([0.5, 0.5, 0.5, 0.5])
    scale = rng.normal(1.0, 0.04, (N, 1, 1))
    shift = np.repeat(rng.normal(0.0, 0.02, (N, 1, 2)), 2, axis=2)
    patient_boxes = ((CANONICAL_BOXES - centre) * scale + centre + shift).clip(0.0, 1.0) * W
    anatomy = _anatomy(cfg, patient_boxes, rng)
    patterns = _finding_patterns(N, rng)

    # Finding layers on the box grid, then pasted into each patient box by separable bilinear
    # interpolation: image += Ay @ layer @ Ax^T, summed over regions in one matmul.
    coef = (intensities * _FINDING_AMPLITUDE).astype(np.float32)  # [M, R, K]
    g = _PROFILE_GRID
    Ax, Ay = (
        _paste_weights(patient_boxes[..., 0], patient_boxes[..., 2], W),
        _paste_weights(patient_boxes[..., 1], patient_boxes[..., 3], W),
    )  # [N, R, W, g]
    findings = np.empty((M, W, W), np.float32)
    chunk = 128
    for start in range(0, M, chunk):
        sub = cxr_subject[start : start + chunk]
        layers = np.einsum("mrk,mrkuv->mruv", coef[start : start + chunk], patterns[sub])
        right = np.matmul(layers, Ax[sub].transpose(0, 1, 3, 2))  # [m, R, g, W]
        left = Ay[sub].transpose(0, 2, 1, 3).reshape(len(sub), W, R * g)  # [m, W, R*g]
        findings[start : start + chunk] = np.matmul(left, right.reshape(len(sub), R * g, W))

    h = hospital[cxr_subject]
    exposure = rng.normal(0.0, 0.006, (M, 1, 1)).astype(np.float32)
    gain = site["contrast"][h][:, None, None].astype(np.float32)
    offset = site["brightness"][h][:, None, None].astype(np.float32)
    noise = rng.standard_normal((M, W, W), dtype=np.float32) * np.float32(0.015)
    image = gain * (anatomy[cxr_subject] + findings - 0.5) + 0.5 + offset + exposure + noise
    images = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)

    jitter = rng.normal(0.0, cfg.box_jitter * W, (M, R, 4))
    boxes = patient_boxes[cxr_subject] + jitter
    boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 2.0)
    boxes = boxes.clip(0.0, float(W))
    present = rng.random((M, R)) >= cfg.missing_box_rate

    chunk = 64
    rois = torch.cat(
        [
            torch.from_numpy(np.repeat(np.arange(M), R)[:, None]).double(),
            torch.from_numpy(boxes.reshape(M * R, 4)),
        ],
        1,
    ).float()
    crops = torch.empty((M * R, 1, S, S))
    for start in range(0, M, chunk):
        stop = min(start + chunk, M)
        sel = rois[start * R : stop * R].clone()
        sel[:, 0] -= start
        src = torch.from_numpy(images[start:stop, None].astype(np.float32))
        crops[start * R : stop * R] = roi_align(
            src, sel, output_size=S, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )
    crops_u8 = crops.round().clamp(0, 255).to(torch.uint8).numpy().reshape(M, R, S, S)
    crops_u8[~present] = 0
    return images, boxes, present, crops_u8


def _paste_weights(lo: np.ndarray, hi: np.ndarray, W: int) -> np.ndarray:
    """Bilinear weights [..., W, g] that map a g-cell box grid onto image pixels between lo and hi
    (continuous pixel coordinates); zero outside the box."""
    g = _PROFILE_GRID
    pixel = np.arange(W, dtype=np.float32) + 0.5
    # Position of each pixel centre in grid-cell units, relative to cell centres.
    pos = (pixel - lo[..., None]) / (hi - lo)[..., None] * g - 0.5  # [..., W]
    cells = np.arange(g, dtype=np.float32)
    weights = np.maximum(0.0, 1.0 - np.abs(pos[..., None] - cells))
    inside = (pos > -0.5) & (pos < g - 0.5)
    return (weights * inside[..., None]).astype(np.float32)


def _labels(
    cfg: SyntheticConfig,
    cxr_offsets: np.ndarray,
    intensities: np.ndarray,
    present: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive pairs of each stay; region-level codes [Q, R, K]; finding-level codes [Q, K]."""
    counts = np.diff(cxr_offsets)
    pair_first = np.concatenate(
        [np.arange(cxr_offsets[i], cxr_offsets[i + 1] - 1) for i in range(counts.shape[0])]
    ).astype(np.int64)
    delta = intensities[pair_first + 1] - intensities[pair_first]  # [Q, R, K]
    thr = cfg.change_threshold
    codes = np.where(
        delta > thr, vocab.WORSENED, np.where(delta < -thr, vocab.IMPROVED, vocab.NO_CHANGE)
    )
    both_present = present[pair_first] & present[pair_first + 1]
    mentioned = (
        AFFINITY[None]
        & both_present[:, :, None]
        & (rng.random(delta.shape) >= cfg.not_mentioned_rate)
    )
    codes = np.where(mentioned, codes, vocab.NOT_MENTIONED).astype(np.int8)
    strongest = np.argmax(np.where(mentioned, np.abs(delta), -1.0), axis=1)  # [Q, K]
    finding = np.take_along_axis(codes, strongest[:, None, :], axis=1)[:, 0, :]
    finding = np.where(mentioned.any(1), finding, vocab.NOT_MENTIONED).astype(np.int8)
    return pair_first, codes, finding


def _ehr(
    severity: np.ndarray,
    slope: np.ndarray,
    num_hours: np.ndarray,
    demo: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Hourly EHR [N, H, V]: clinical units, forward filled from normal values, and the mask."""
    N, H, V = severity.shape[0], MAX_STAY_HOURS, vocab.NUM_EHR
    normal = np.array([v.normal for v in _EHR])
    sd = np.array([v.sd for v in _EHR])
    normal_pp = normal + rng.normal(0.0, 0.6, (N, V)) * sd
    normal_pp[:, _HEIGHT], normal_pp[:, _WEIGHT] = demo["height"], demo["weight"]
    load = np.array([v.severity for v in _EHR])
    slope_load = np.array([v.slope for v in _EHR])
    raw = (
        normal_pp[:, None, :]
        + severity[:, :, None] * load
        + slope[:, :, None] * slope_load
        + rng.normal(0.0, 1.0, (N, H, V)) * (0.4 * sd)
    )
    raw[:, :, _HEIGHT] = demo["height"][:, None] + rng.normal(0.0, 1.0, (N, H))
    raw[:, :, _WEIGHT] = demo["weight"][:, None] + rng.normal(0.0, 1.0, (N, H))
    integer = np.array([v.integer for v in _EHR])
    raw[:, :, integer] = np.round(raw[:, :, integer])
    raw = np.clip(raw, [v.low for v in _EHR], [v.high for v in _EHR])

    hours = np.arange(H)
    ventilated = severity[:, 0] > 0.6
    observed = np.zeros((N, H, V), bool)
    panels: dict[str, np.ndarray] = {}
    for v, var in enumerate(_EHR):
        if var.schedule not in panels:
            lo, hi, p_never, p_obs = _SCHEDULES[var.schedule]
            period = rng.integers(lo, hi + 1, N)
            phase = rng.integers(0, np.minimum(period, 4))
            slot = (hours[None, :] - phase[:, None]) % period[:, None] == 0
            never = rng.random(N) < p_never
            if var.schedule == "vent":
                never |= ~ventilated
            panels[var.schedule] = slot & ~never[:, None]
            p_hour = p_obs
        else:
            p_hour = _SCHEDULES[var.schedule][3]
        observed[:, :, v] = panels[var.schedule] & (rng.random((N, H)) < p_hour)
    observed &= hours[None, :, None] < num_hours[:, None, None]

    last = np.where(observed, hours[None, :, None], -1)
    np.maximum.accumulate(last, axis=1, out=last)
    filled = np.take_along_axis(raw, np.maximum(last, 0), axis=1)
    values = np.where(last >= 0, filled, normal[None, None, :])
    return values.astype(np.float32), observed


def _splits(cfg: SyntheticConfig, hospital: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Patient-level 70/10/20 split, stratified by hospital (every site has every split)."""
    split = np.empty(hospital.shape[0], dtype=object)
    train_frac, val_frac, _ = cfg.split_fractions
    for h in np.unique(hospital):
        members = rng.permutation(np.flatnonzero(hospital == h))
        n_train = int(round(train_frac * members.size))
        n_val = int(round(val_frac * members.size))
        split[members[:n_train]] = "train"
        split[members[n_train : n_train + n_val]] = "val"
        split[members[n_train + n_val :]] = "test"
    return split


def cohort_records(cohort: Cohort, task: str) -> Iterator[dict[str, Any]]:
    """Sample records (dipro.data.schema) of ``task``, patient by patient.

    disease_progression: one record per consecutive CXR pair of a stay (T = 2) with the EHR
    hours between the two CXR times. mortality / length_of_stay: one record per stay with the
    CXRs of the first ``icu_window_hours`` (at least 2) and EHR hours 0 .. window-1.
    """
    if task not in vocab.TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {vocab.TASKS}")
    cfg = cohort.config
    dicom_ids, study_ids = cxr_identifiers(cohort)
    provenance = {"source": "synthetic", "source_version": f"generator {GENERATOR_VERSION}"}
    pair_of_cxr = np.full(cohort.cxr_times.shape[0], -1, np.int64)
    pair_of_cxr[cohort.pair_first] = np.arange(cohort.pair_first.shape[0])
    for i in range(cohort.num_patients):
        cxrs = np.arange(cohort.cxr_offsets[i], cohort.cxr_offsets[i + 1])
        common = {
            "subject_id": int(cohort.subject_id[i]),
            "stay_id": int(cohort.stay_id[i]),
            "hospital": int(cohort.hospital[i]),
            "split": str(cohort.split[i]),
            "task": task,
            "crop_size": cfg.crop_size,
            "demographics": cohort.demographics[i],
            **provenance,
        }
        if task == "disease_progression":
            for j, m in enumerate(cxrs[:-1]):
                t0, t1 = float(cohort.cxr_times[m]), float(cohort.cxr_times[m + 1])
                hours = np.arange(int(np.ceil(t0)), int(np.floor(t1)) + 1)
                q = pair_of_cxr[m]
                yield {
                    **common,
                    "sample_id": f"{task}-{cohort.stay_id[i]}-{j}",
                    **_cxr_fields(cohort, np.array([m, m + 1]), dicom_ids, study_ids),
                    **_ehr_fields(cohort, i, hours),
                    "region_labels": cohort.pair_region_labels[q : q + 1],
                    "progression": cohort.pair_progression[q],
                }
        else:
            early = cxrs[cohort.cxr_times[cxrs] < cfg.icu_window_hours]
            pairs = pair_of_cxr[early[:-1]]
            yield {
                **common,
                "sample_id": f"{task}-{cohort.stay_id[i]}",
                **_cxr_fields(cohort, early, dicom_ids, study_ids),
                **_ehr_fields(cohort, i, np.arange(cfg.icu_window_hours)),
                "region_labels": cohort.pair_region_labels[pairs],
                "mortality": int(cohort.mortality[i]),
                "los_days": float(cohort.los_days[i]),
            }


def cxr_identifiers(cohort: Cohort) -> tuple[np.ndarray, np.ndarray]:
    """MIMIC-CXR-style identifiers of every CXR of the cohort, [M] each: ``dicom_id`` (five
    dash-separated groups of 8 hex digits) and ``study_id`` (8 digits, increasing, one study per
    CXR). Drawn from a stream of their own (the cohort's seed), so the shards of the cohort and
    its raw MIMIC-format tree (``dipro.data.mimic.cohort_tree``) name the same images."""
    M = cohort.cxr_times.shape[0]
    rng = np.random.default_rng([cohort.config.seed, _ID_STREAM])
    words = rng.integers(0, 2**32, (M, 5))
    dicom_ids = np.array(["-".join(f"{int(w):08x}" for w in row) for row in words])
    study_ids = 50_000_000 + np.cumsum(rng.integers(1, 999, M))
    return dicom_ids, study_ids.astype(np.int64)


def _cxr_fields(
    cohort: Cohort, cxrs: np.ndarray, dicom_ids: np.ndarray, study_ids: np.ndarray
) -> dict[str, np.ndarray]:
    return {
        "cxr_times": cohort.cxr_times[cxrs],
        "crops": cohort.crops[cxrs],
        "region_present": cohort.region_present[cxrs],
        "dicom_ids": dicom_ids[cxrs],
        "study_ids": study_ids[cxrs],
    }


def _ehr_fields(cohort: Cohort, patient: int, hours: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "ehr_times": hours.astype(np.float32),
        "ehr_values": cohort.ehr_values[patient, hours],
        "ehr_observed": cohort.ehr_observed[patient, hours],
    }


def generator_info(cfg: SyntheticConfig) -> dict[str, Any]:
    """What the manifest records as the generator of a synthetic dataset."""
    return {"name": "synthetic", "version": GENERATOR_VERSION, **cfg.to_dict()}


def write_synthetic_dataset(
    cfg: SyntheticConfig,
    root: str | os.PathLike[str],
    *,
    tasks: tuple[str, ...] = vocab.TASKS,
    overwrite: bool = False,
) -> dict[str, Manifest]:
    """Simulate the cohort once and write each task's shards under ``{root}/{task}``.

    Returns each task's manifest by task name. Raises FileExistsError if a task's dataset exists
    and ``overwrite`` is False (datasets written before the error stay, each one whole).
    """
    cohort = simulate_cohort(cfg)
    return {
        task: write_dataset(
            cohort_records(cohort, task),
            root,
            task,
            rows_per_file=cfg.rows_per_file,
            generator=generator_info(cfg),
            overwrite=overwrite,
        )
        for task in tasks
    }


@dataclass(frozen=True)
class SyntheticData:
    """The synthetic dataset under ``root`` after :func:`ensure_synthetic_data`: the tasks that
    call wrote (empty when every task's dataset was there already) and each task's manifest."""

    root: Path
    written: tuple[str, ...]
    manifests: dict[str, Manifest]

    def describe(self, seconds: float) -> str:
        """What a command prints about it: where it is, whether it was written or reused, and
        its samples (and subjects) per task, split and hospital."""
        if self.written:
            state = f"wrote {', '.join(self.written)} in {seconds:.1f} s"
        else:
            state = "reused (written before with the same generator config)"
        return f"synthetic cohort under {self.root}: {state}\n{format_counts(self.manifests)}"


def ensure_synthetic_data(cfg: Mapping[str, Any]) -> SyntheticData:
    """Make sure the synthetic dataset of ``cfg`` (a ``data`` config node: ``root``,
    ``generator``, ``overwrite``) exists, writing only the tasks that are missing or stale.

    A task's dataset already there with the same generator config is reused, byte for byte. One
    written with another generator config (or generator version) is replaced when
    ``cfg.overwrite`` is true, else a FileExistsError says so. A generator setting out of range
    is a ConfigError.
    """
    root = Path(str(cfg["root"]))
    try:
        synth = SyntheticConfig.from_dict(cfg.get("generator"))
    except ValueError as err:
        raise ConfigError(f"data.generator: {err}") from err
    wanted = generator_info(synth)
    existing = {}
    for task in vocab.TASKS:
        try:
            existing[task] = read_manifest(root, task).generator
        except FileNotFoundError:
            continue
    stale = sorted(task for task, g in existing.items() if g != wanted)
    if stale and not cfg.get("overwrite", False):
        raise FileExistsError(
            f"the datasets {stale} under {root} were written with another generator config; "
            "set data.overwrite=true to replace them"
        )
    missing = tuple(task for task in vocab.TASKS if task not in existing or task in stale)
    if missing:
        write_synthetic_dataset(synth, root, tasks=missing, overwrite=bool(stale))
    manifests = {task: read_manifest(root, task) for task in vocab.TASKS}
    return SyntheticData(root, missing, manifests)
