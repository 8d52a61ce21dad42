"""The one collate of the project: a dict of numpy columns -> a padded ``Batch`` of tensors.

Input is the form both Ray Data (``iter_torch_batches`` with a numpy collate) and the pyarrow
reader (``dipro.data.shards``) hand over: one numpy array per column, where a list or binary
column is an object array of per-row values (or a 2-D array when every row has the same length).

Padding: CXRs are padded at the end to the batch's longest T (at least 2, so that a record
with a single CXR, valid for prediction only, has one pair slot with ``pair_mask`` False), EHR
hours to the longest L (at least 1). Labels that a record lacks (an inference dataset) become
"not mentioned" / IGNORE_INDEX. Mask convention: True = valid / present.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from dipro import vocab
from dipro.data.labels import IGNORE_INDEX
from dipro.data.normalize import NormStats


@dataclass(frozen=True)
class Batch:
    """A padded batch of samples. B batch, T CXRs, P = T-1 pairs, R regions, K findings,
    S crop size, F feature size, L EHR hours, V EHR variables, G demographics.

    | field          | dtype   | shape           | notes                                    |
    |----------------|---------|-----------------|------------------------------------------|
    | subject_id     | int64   | [B]             |                                          |
    | stay_id        | int64   | [B]             |                                          |
    | hospital       | int64   | [B]             |                                          |
    | cxr_times      | float32 | [B, T]          | hours; 0 at padding                      |
    | cxr_mask       | bool    | [B, T]          | CXR exists                               |
    | pair_mask      | bool    | [B, P]          | both CXRs of pair i exist                |
    | crops          | uint8   | [B, T, R, S, S] | or None in features mode; 0 at padding   |
    | features       | float32 | [B, T, R, F]    | or None in crops mode; 0 at padding      |
    | region_present | bool    | [B, T, R]       | region has a box; False on padded CXRs   |
    | ehr_times      | float32 | [B, L]          | hours; 0 at padding                      |
    | ehr_mask       | bool    | [B, L]          | EHR hour exists                          |
    | ehr_values     | float32 | [B, L, V]       | z-scored; 0 at padding                   |
    | ehr_observed   | bool    | [B, L, V]       | measured in that hour                    |
    | demographics   | float32 | [B, G]          | numeric part z-scored                    |
    | region_labels  | int64   | [B, P, R, K]    | codes 0..3; 3 on padded pairs            |
    | progression    | int64   | [B, K]          | codes 0..3; all 3 when the task has none |
    | mortality      | int64   | [B]             | 0/1; IGNORE_INDEX when absent            |
    | los_class      | int64   | [B]             | 0..3; IGNORE_INDEX when absent           |
    """

    subject_id: torch.Tensor
    stay_id: torch.Tensor
    hospital: torch.Tensor
    cxr_times: torch.Tensor
    cxr_mask: torch.Tensor
    pair_mask: torch.Tensor
    crops: torch.Tensor | None
    features: torch.Tensor | None
    region_present: torch.Tensor
    ehr_times: torch.Tensor
    ehr_mask: torch.Tensor
    ehr_values: torch.Tensor
    ehr_observed: torch.Tensor
    demographics: torch.Tensor
    region_labels: torch.Tensor
    progression: torch.Tensor
    mortality: torch.Tensor
    los_class: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.subject_id.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on ``device``."""
        moved = {
            f.name: None
            if getattr(self, f.name) is None
            else getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return replace(self, **moved)


def _rows(column: np.ndarray) -> list[np.ndarray]:
    """Per-row arrays of a list column, whether it arrived as an object array or as 2-D."""
    if column.dtype == object:
        return [np.asarray(v) if v is not None else None for v in column]
    return list(column)


def _scalar(column: np.ndarray, missing: float) -> np.ndarray:
    """A nullable scalar column as float64 with ``missing`` where null."""
    if column.dtype == object:
        return np.array([missing if v is None else float(v) for v in column], dtype=np.float64)
    out = column.astype(np.float64)
    return np.where(np.isnan(out), missing, out)


def collate(columns: Mapping[str, np.ndarray], stats: NormStats | None = None) -> Batch:
    """Pad and stack sample records into a ``Batch``; z-score EHR and demographics with ``stats``.

    Needs the columns of ``dipro.data.schema.model_columns`` (either region mode). Thread-safe:
    it copies what it reads and touches no shared state.
    """
    stats = stats or NormStats.identity()
    R, K, V, G = vocab.NUM_REGIONS, vocab.NUM_FINDINGS, vocab.NUM_EHR, vocab.NUM_DEMOGRAPHICS
    cxr_times = _rows(columns["cxr_times"])
    B = len(cxr_times)
    Ts = np.array([len(t) for t in cxr_times])
    T = max(2, int(Ts.max()))
    P = T - 1
    ehr_times = _rows(columns["ehr_times"])
    Ls = np.array([len(t) for t in ehr_times])
    L = max(1, int(Ls.max()))

    out_cxr_times = np.zeros((B, T), np.float32)
    cxr_mask = np.zeros((B, T), bool)
    region_present = np.zeros((B, T, R), bool)
    out_ehr_times = np.zeros((B, L), np.float32)
    ehr_mask = np.zeros((B, L), bool)
    ehr_values = np.zeros((B, L, V), np.float32)
    ehr_observed = np.zeros((B, L, V), bool)
    region_labels = np.full((B, P, R, K), vocab.NOT_MENTIONED, np.int64)
    progression = np.full((B, K), vocab.NOT_MENTIONED, np.int64)

    crops = features = None
    if columns.get("crops") is not None and columns["crops"][0] is not None:
        S = int(_scalar(columns["crop_size"], 0)[0])
        crops = np.zeros((B, T, R, S, S), np.uint8)
        for b, raw in enumerate(columns["crops"]):
            crops[b, : Ts[b]] = np.frombuffer(raw, np.uint8).reshape(Ts[b], R, S, S)
    else:
        F = int(_scalar(columns["feature_dim"], 0)[0])
        features = np.zeros((B, T, R, F), np.float32)
        for b, row in enumerate(_rows(columns["features"])):
            features[b, : Ts[b]] = row.reshape(Ts[b], R, F)

    presence = _rows(columns["region_present"])
    labels = _rows(columns["region_labels"])
    values = _rows(columns["ehr_values"])
    observed = _rows(columns["ehr_observed"])
    prog = _rows(columns["progression"])
    for b in range(B):
        t, n = Ts[b], Ls[b]
        out_cxr_times[b, :t] = cxr_times[b]
        cxr_mask[b, :t] = True
        region_present[b, :t] = presence[b].reshape(t, R)
        if labels[b] is not None:
            region_labels[b, : t - 1] = labels[b].reshape(t - 1, R, K)
        out_ehr_times[b, :n] = ehr_times[b]
        ehr_mask[b, :n] = True
        ehr_values[b, :n] = (values[b].reshape(n, V) - stats.ehr_mean) / stats.ehr_std
        ehr_observed[b, :n] = observed[b].reshape(n, V)
        if prog[b] is not None:
            progression[b] = prog[b]

    demographics = np.stack([np.asarray(d, np.float32) for d in _rows(columns["demographics"])])
    n_num = len(vocab.NUMERIC_DEMOGRAPHICS)
    demographics = demographics.reshape(B, G).copy()
    demographics[:, :n_num] = (demographics[:, :n_num] - stats.demo_mean) / stats.demo_std

    mortality = _scalar(columns["mortality"], IGNORE_INDEX).astype(np.int64)
    los_days = _scalar(columns["los_days"], np.nan)
    los_class = np.array(
        [IGNORE_INDEX if np.isnan(d) else vocab.los_class(d) for d in los_days], np.int64
    )

    def ids(name: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(columns[name], dtype=np.int64).copy())

    return Batch(
        subject_id=ids("subject_id"),
        stay_id=ids("stay_id"),
        hospital=ids("hospital"),
        cxr_times=torch.from_numpy(out_cxr_times),
        cxr_mask=torch.from_numpy(cxr_mask),
        pair_mask=torch.from_numpy(cxr_mask[:, 1:].copy()),
        crops=None if crops is None else torch.from_numpy(crops),
        features=None if features is None else torch.from_numpy(features),
        region_present=torch.from_numpy(region_present),
        ehr_times=torch.from_numpy(out_ehr_times),
        ehr_mask=torch.from_numpy(ehr_mask),
        ehr_values=torch.from_numpy(ehr_values),
        ehr_observed=torch.from_numpy(ehr_observed),
        demographics=torch.from_numpy(demographics),
        region_labels=torch.from_numpy(region_labels),
        progression=torch.from_numpy(progression),
        mortality=torch.from_numpy(mortality),
        los_class=torch.from_numpy(los_class),
    )
