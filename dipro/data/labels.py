"""Label counts of a split: what class weights and pos_weight are computed from.

Counts come from the label columns of sample records (``from_table``), so they can be taken
while shards are written (the manifest keeps the training split's), from a site's own shards
(federated), or from batches; ``a + b`` pools shards, workers or sites.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa

from dipro import vocab

K, C = vocab.NUM_FINDINGS, vocab.NUM_PROGRESSION_CLASSES
IGNORE_INDEX = -1  # the collate's marker of an absent label
LABEL_COLUMNS = ("progression", "region_labels", "mortality", "los_days")


def _codes(values: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """Counts of 0..num_classes-1 in ``values``, skipping ``ignore``."""
    values = np.asarray(values).reshape(-1)
    values = values[values != ignore]
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"label codes outside 0..{num_classes - 1} (besides {ignore})")
    return np.bincount(values.astype(np.int64), minlength=num_classes)


def _finding_codes(codes: np.ndarray) -> np.ndarray:
    """Counts [K, 3] of progression codes per finding; codes [..., K], code 3 skipped."""
    codes = np.asarray(codes).reshape(-1, K)
    return np.stack([_codes(codes[:, k], C, vocab.NOT_MENTIONED) for k in range(K)])


@dataclass(frozen=True)
class LabelCounts:
    """Label counts of a split; ``a + b`` pools shards, workers or sites.

    progression [K, 3] finding-level codes per finding; region [K, 3] region-level codes per
    finding (over pairs and regions); mortality [2]; los [4]. Not-mentioned and absent labels
    are not counted.
    """

    progression: np.ndarray
    region: np.ndarray
    mortality: np.ndarray
    los: np.ndarray

    @classmethod
    def zeros(cls) -> LabelCounts:
        return cls(
            np.zeros((K, C), np.int64),
            np.zeros((K, C), np.int64),
            np.zeros(2, np.int64),
            np.zeros(vocab.NUM_LOS_CLASSES, np.int64),
        )

    @classmethod
    def from_labels(
        cls,
        *,
        progression: np.ndarray,
        region_labels: np.ndarray,
        mortality: np.ndarray,
        los_class: np.ndarray,
    ) -> LabelCounts:
        """Count label arrays: progression [N, K], region_labels [N, P, R, K] (or any [..., K]),
        mortality [N] and los_class [N] with IGNORE_INDEX where absent."""
        return cls(
            _finding_codes(progression),
            _finding_codes(region_labels),
            _codes(mortality, 2, IGNORE_INDEX),
            _codes(los_class, vocab.NUM_LOS_CLASSES, IGNORE_INDEX),
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> LabelCounts:
        """Count the label columns of a table of sample records (only those columns are read)."""

        def flat(name: str) -> np.ndarray:
            return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)

        def scalar(name: str, missing: float) -> np.ndarray:
            col = table.column(name).combine_chunks().to_numpy(zero_copy_only=False)
            return np.where(np.isnan(col.astype(np.float64)), missing, col)

        los_days = scalar("los_days", np.nan)
        los = np.array(
            [IGNORE_INDEX if np.isnan(d) else vocab.los_class(d) for d in los_days], np.int64
        )
        return cls.from_labels(
            progression=flat("progression"),
            region_labels=flat("region_labels"),
            mortality=scalar("mortality", IGNORE_INDEX).astype(np.int64),
            los_class=los,
        )

    def __add__(self, other: LabelCounts) -> LabelCounts:
        return LabelCounts(
            *(getattr(self, f.name) + getattr(other, f.name) for f in fields(LabelCounts))
        )

    def to_dict(self) -> dict[str, list]:
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelCounts:
        return cls(*(np.asarray(data[f.name], np.int64) for f in fields(cls)))
