"""The hourly EHR of the synthetic cohort.

38 hourly EHR variables in clinical units, each a normal value plus a patient offset plus
severity (and, for the respiratory variables, its slope) times a loading, with noise; vitals
observed almost hourly, lab panels every 4-24 h or never, PEEP only for ventilated patients;
forward filled from the normal value, with the observed mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from dipro import vocab
from dipro.data.synthetic.cohort import MAX_STAY_HOURS


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


def hourly_ehr(
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
