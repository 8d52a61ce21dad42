"""Demographics (vocab.DEMOGRAPHICS), in-hospital mortality and length of stay of an ICU stay."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dipro import vocab

_UNKNOWN_RACE = "UNKNOWN/UNABLE TO OBTAIN/PATIENT DECLINED TO ANSWER"


def race_group(race: object) -> str:
    """Map a MIMIC-IV race (or 1.0 ethnicity) string to one of vocab.RACES."""
    text = "" if race is None or (isinstance(race, float) and np.isnan(race)) else str(race)
    text = text.strip().upper()
    if text.startswith("ASIAN"):
        return "ASIAN"
    if text.startswith("BLACK"):
        return "BLACK/AFRICAN AMERICAN"
    if text.startswith(("HISPANIC", "LATINO", "SOUTH AMERICAN")):
        return "HISPANIC/LATINO"
    if text.startswith("WHITE"):
        return "WHITE"
    if not text or text.startswith(("UNKNOWN", "UNABLE", "PATIENT DECLINED")):
        return _UNKNOWN_RACE
    return "OTHER"


def demographic_vector(
    age: float,
    height: float,
    weight: float,
    gender: object,
    race: object,
    language: object,
    marital_status: object,
) -> np.ndarray:
    """[G] float32: age, height (cm), weight (kg) raw, then one-hots in vocab.DEMOGRAPHICS order.

    A language other than ENGLISH counts as "?"; a gender or marital status outside the
    vocabulary leaves its one-hot all zero.
    """
    out = np.zeros(vocab.NUM_DEMOGRAPHICS, np.float32)
    out[:3] = (age, height, weight)
    lang = "ENGLISH" if str(language).strip().upper() == "ENGLISH" else "?"
    for key in (
        f"gender={str(gender).strip().upper()}",
        f"race={race_group(race)}",
        f"language={lang}",
        f"marital_status={str(marital_status).strip().upper()}",
    ):
        if key in vocab.DEMOGRAPHICS:
            out[vocab.DEMOGRAPHICS.index(key)] = 1.0
    return out


def in_hospital_death(
    admittime: pd.Timestamp, dischtime: pd.Timestamp, deathtime: pd.Timestamp | None
) -> int:
    """1 when ``deathtime`` lies in [admittime, dischtime], else 0."""
    if deathtime is None or pd.isna(deathtime):
        return 0
    return int(admittime <= deathtime <= dischtime)
