"""EHR and demographic normalisation statistics, fitted on a training split only.

The shards store EHR in clinical units (clipped, forward filled); the collate z-scores them with
these statistics. Fitting them on the training split alone (or per federated site) avoids the
authors' leak of validation and test statistics (docs/model.md, "Where the authors' code
differs", item 5).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dipro import vocab

_MIN_STD = 1e-6


@dataclass(frozen=True)
class NormStats:
    """Per-variable mean and standard deviation.

    ehr_mean, ehr_std: [V] over observed hourly values; demo_mean, demo_std: [3] for age, height,
    weight (the one-hot demographics are left as they are).
    """

    ehr_mean: np.ndarray
    ehr_std: np.ndarray
    demo_mean: np.ndarray
    demo_std: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        return {k: [float(x) for x in getattr(self, k)] for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NormStats:
        stats = cls(**{k: np.asarray(data[k], dtype=np.float32) for k in cls.__dataclass_fields__})
        if stats.ehr_mean.shape != (vocab.NUM_EHR,) or stats.demo_mean.shape != (
            len(vocab.NUMERIC_DEMOGRAPHICS),
        ):
            raise ValueError("normalisation statistics have the wrong number of variables")
        return stats

    @classmethod
    def identity(cls) -> NormStats:
        """Statistics that leave values unchanged."""
        n_num = len(vocab.NUMERIC_DEMOGRAPHICS)
        return cls(
            np.zeros(vocab.NUM_EHR, np.float32),
            np.ones(vocab.NUM_EHR, np.float32),
            np.zeros(n_num, np.float32),
            np.ones(n_num, np.float32),
        )


# The record columns the statistics are fitted on.
NORM_COLUMNS: tuple[str, ...] = ("ehr_values", "ehr_observed", "demographics")


def fit_norm_stats(tables: Iterable[pa.Table]) -> NormStats:
    """Fit NormStats in one streaming pass over tables of sample records (a training split).

    Each EHR variable's mean/std is taken over its observed hours only; a variable never
    observed gets mean 0, std 1.
    """
    V, n_num = vocab.NUM_EHR, len(vocab.NUMERIC_DEMOGRAPHICS)
    s, ss, n = np.zeros(V), np.zeros(V), np.zeros(V)
    ds, dss, dn = np.zeros(n_num), np.zeros(n_num), 0
    for table in tables:
        values = table.column("ehr_values").combine_chunks().flatten().to_numpy()
        observed = (
            table.column("ehr_observed").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        )
        values = values.reshape(-1, V).astype(np.float64)
        observed = observed.reshape(-1, V).astype(bool)
        masked = np.where(observed, values, 0.0)
        s += masked.sum(0)
        ss += (masked**2).sum(0)
        n += observed.sum(0)
        demo = table.column("demographics").combine_chunks().flatten().to_numpy()
        demo = demo.reshape(-1, vocab.NUM_DEMOGRAPHICS)[:, :n_num].astype(np.float64)
        ds += demo.sum(0)
        dss += (demo**2).sum(0)
        dn += demo.shape[0]
    mean = np.divide(s, n, out=np.zeros(V), where=n > 0)
    var = np.divide(ss, n, out=np.ones(V), where=n > 0) - mean**2
    std = np.where(n > 1, np.sqrt(np.maximum(var, 0.0)), 1.0)
    dmean = ds / max(dn, 1)
    dstd = np.sqrt(np.maximum(dss / max(dn, 1) - dmean**2, 0.0)) if dn > 1 else np.ones(n_num)
    return NormStats(
        mean.astype(np.float32),
        np.maximum(std, _MIN_STD).astype(np.float32),
        dmean.astype(np.float32),
        np.maximum(dstd, _MIN_STD).astype(np.float32),
    )
