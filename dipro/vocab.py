"""Vocabularies of the DiPro data: facts of the data, not settings.

Everything here follows docs/model.md ("Vocabularies"). Orders are part of the data contract: the
index of a region, finding or EHR variable in a tensor is its index in these tuples.
"""

from __future__ import annotations

from typing import Final

REGIONS: Final[tuple[str, ...]] = (
    "left lung",
    "right lung",
    "left lower lung zone",
    "right lower lung zone",
    "left hilar structures",
    "right hilar structures",
    "left costophrenic angle",
    "right costophrenic angle",
    "cardiac silhouette",
    "mediastinum",
)

FINDINGS: Final[tuple[str, ...]] = (
    "atelectasis",
    "enlarged cardiac silhouette",
    "consolidation",
    "pulmonary edema",
    "lung opacity",
    "pleural effusion",
    "pneumonia",
)

# Progression codes. NOT_MENTIONED is masked out of every loss and metric.
WORSENED: Final[int] = 0
IMPROVED: Final[int] = 1
NO_CHANGE: Final[int] = 2
NOT_MENTIONED: Final[int] = 3
PROGRESSION_CODES: Final[dict[str, int]] = {
    "worsened": WORSENED,
    "improved": IMPROVED,
    "no change": NO_CHANGE,
    "not mentioned": NOT_MENTIONED,
}
NUM_PROGRESSION_CLASSES: Final[int] = 3  # worsened, improved, no change

EHR_VARIABLES: Final[tuple[str, ...]] = (
    "Alanine aminotransferase",
    "Albumin",
    "Alkaline phosphate",
    "Anion gap",
    "Asparate aminotransferase",
    "Bicarbonate",
    "Bilirubin",
    "Blood urea nitrogen",
    "Chloride",
    "Creatinine",
    "Diastolic blood pressure",
    "Fraction inspired oxygen",
    "Glascow coma scale eye opening",
    "Glascow coma scale motor response",
    "Glascow coma scale verbal response",
    "Glucose",
    "Heart Rate",
    "Height",
    "Hematocrit",
    "Hemoglobin",
    "Magnesium",
    "Mean blood pressure",
    "Oxygen saturation",
    "Partial pressure of carbon dioxide",
    "Partial thromboplastin time",
    "Platelets",
    "Positive end-expiratory pressure",
    "Potassium",
    "Prothrombin time",
    "Respiratory rate",
    "Sodium",
    "Systolic blood pressure",
    "Temperature",
    "Troponin-T",
    "Urine output",
    "Weight",
    "White blood cell count",
    "pH",
)

GENDERS: Final[tuple[str, ...]] = ("F", "M")
RACES: Final[tuple[str, ...]] = (
    "ASIAN",
    "BLACK/AFRICAN AMERICAN",
    "HISPANIC/LATINO",
    "OTHER",
    "UNKNOWN/UNABLE TO OBTAIN/PATIENT DECLINED TO ANSWER",
    "WHITE",
)
LANGUAGES: Final[tuple[str, ...]] = ("?", "ENGLISH")
MARITAL_STATUSES: Final[tuple[str, ...]] = ("DIVORCED", "MARRIED", "SINGLE", "WIDOWED")
NUMERIC_DEMOGRAPHICS: Final[tuple[str, ...]] = ("age", "height", "weight")

DEMOGRAPHICS: Final[tuple[str, ...]] = (
    *NUMERIC_DEMOGRAPHICS,
    *(f"gender={g}" for g in GENDERS),
    *(f"race={r}" for r in RACES),
    *(f"language={lang}" for lang in LANGUAGES),
    *(f"marital_status={m}" for m in MARITAL_STATUSES),
)

# Length of stay in days -> class: [2,3) [3,4) [4,6) [6,11).
LOS_BIN_EDGES: Final[tuple[float, ...]] = (2.0, 3.0, 4.0, 6.0, 11.0)

TASKS: Final[tuple[str, ...]] = ("disease_progression", "mortality", "length_of_stay")
SPLITS: Final[tuple[str, ...]] = ("train", "val", "test")

NUM_REGIONS: Final[int] = len(REGIONS)
NUM_FINDINGS: Final[int] = len(FINDINGS)
NUM_EHR: Final[int] = len(EHR_VARIABLES)
NUM_DEMOGRAPHICS: Final[int] = len(DEMOGRAPHICS)
NUM_LOS_CLASSES: Final[int] = len(LOS_BIN_EDGES) - 1


def los_class(los_days: float) -> int:
    """Map a length of stay in days to its bin 0..3; out-of-range values go to the nearest bin."""
    for cls, upper in enumerate(LOS_BIN_EDGES[1:-1]):
        if los_days < upper:
            return cls
    return NUM_LOS_CLASSES - 1


def reverse_code(code: int) -> int:
    """The progression code of the same pair seen backwards: worsened <-> improved."""
    return {WORSENED: IMPROVED, IMPROVED: WORSENED}.get(code, code)


def task_output_dim(task: str) -> int:
    """Width of the task head's logits: K x 3 for progression, 1 for mortality, 4 for LOS."""
    if task == "disease_progression":
        return NUM_FINDINGS * NUM_PROGRESSION_CLASSES
    if task == "mortality":
        return 1
    if task == "length_of_stay":
        return NUM_LOS_CLASSES
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
