"""Tables and files of reports: the paper's table columns and published numbers, number
formatting, Markdown tables, the mean +- std table over seeds, atomic JSON / text writers."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dipro import storage
from dipro.metrics import mean_std_over_seeds

# The columns of the paper's result tables, in the paper's order (docs/model.md, "Published
# results").
TABLE_METRICS: Final[dict[str, tuple[str, ...]]] = {
    "disease_progression": ("precision", "recall", "f1", "auprc", "auroc"),
    "mortality": ("auprc", "auroc"),
    "length_of_stay": ("kappa", "accuracy", "precision", "recall", "f1", "auroc", "auprc"),
}
METRIC_LABELS: Final[dict[str, str]] = {
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "auprc": "AUPRC",
    "auroc": "AUROC",
    "kappa": "Kappa",
    "accuracy": "Accuracy",
}
CLASS_NAMES: Final[dict[str, tuple[str, ...]]] = {
    "disease_progression": ("worsened", "improved", "no change"),
    "mortality": ("survived", "died"),
    "length_of_stay": ("2-3 d", "3-4 d", "4-6 d", "6-11 d"),
}
# Published test results, mean and std over seeds 23, 29, 66 (docs/model.md, "Published
# results"); a std of None where the paper gives only the mean.
PAPER_RESULTS: Final[dict[str, dict[str, dict[str, tuple[float, float | None]]]]] = {
    "disease_progression": {
        "DiPro": {
            "precision": (0.484, 0.008),
            "recall": (0.471, 0.024),
            "f1": (0.466, 0.018),
            "auprc": (0.478, 0.018),
            "auroc": (0.664, 0.013),
        },
        "DiPro CXR-only": {"f1": (0.453, None), "auroc": (0.651, None)},
        "UTDE (best other method)": {"f1": (0.449, None), "auroc": (0.659, None)},
    },
    "mortality": {
        "DiPro": {"auprc": (0.742, 0.003), "auroc": (0.897, 0.002)},
        "best baseline": {"auprc": (0.722, None), "auroc": (0.896, None)},
    },
    "length_of_stay": {
        "DiPro": {"kappa": (0.248, 0.008), "accuracy": (0.440, 0.007)},
        "best baseline": {"kappa": (0.217, None), "accuracy": (0.419, None)},
    },
}


def format_number(value: float | None) -> str:
    """A metric as the report prints it: 4 decimals, ``n/a`` when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def format_mean_std(mean: float, std: float | None, decimals: int = 4) -> str:
    """``mean ± std`` (just the mean when the std is unknown or undefined)."""
    if math.isnan(mean):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def finite_or_none(value: float) -> float | None:
    """JSON cannot hold NaN: undefined metrics are written as null."""
    return None if value is None or math.isnan(value) else float(value)


@dataclass(frozen=True)
class SummaryRow:
    """One model of a multi-seed table: its label and the test metrics of each seed."""

    label: str
    runs: Sequence[Mapping[str, float]]
    note: str = ""


def summary_table(
    task: str, rows: Sequence[SummaryRow], *, with_paper: bool = True
) -> tuple[str, dict[str, Any]]:
    """Mean ± std (sample std over seeds) of each row's metrics in the paper's layout, followed
    by the paper's published rows; as markdown and as json.

    The json maps each label to ``{metric: {"mean", "std", "values"}}`` plus ``seeds`` and
    ``note``.
    """
    columns = TABLE_METRICS[task]
    body, data = [], {}
    for row in rows:
        if not row.runs:
            raise ValueError(f"row {row.label!r} has no runs")
        stats = mean_std_over_seeds(row.runs)
        data[row.label] = {
            "runs": len(row.runs),
            "note": row.note,
            **{
                m: {
                    "mean": finite_or_none(stats[m][0]),
                    "std": finite_or_none(stats[m][1]),
                    "values": [finite_or_none(float(r[m])) for r in row.runs],
                }
                for m in columns
                if m in stats
            },
        }
        body.append(
            [
                row.label + (f" ({row.note})" if row.note else ""),
                *(format_mean_std(*stats[m]) if m in stats else "n/a" for m in columns),
            ]
        )
    if with_paper:
        for name, ref in PAPER_RESULTS[task].items():
            body.append(
                [
                    f"{name} (paper, MIMIC)",
                    *(format_mean_std(*ref[m], decimals=3) if m in ref else "" for m in columns),
                ]
            )
    return markdown_table(["model", *(METRIC_LABELS[m] for m in columns)], body), data


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()


def write_report_file(path: Path, data: bytes) -> None:
    storage.write_bytes_atomic(path, data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (NaN is refused: write null instead)."""
    storage.write_bytes_atomic(path, json_bytes(obj))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8), atomically."""
    storage.write_bytes_atomic(path, text.encode())
