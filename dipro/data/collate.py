"""The one collate of the project: a batch of sample records -> a padded ``Batch`` of tensors.

Input is an Arrow table, the form both Ray Data (``iter_torch_batches`` with an Arrow collate)
and the pyarrow reader (``dipro.data.shard_reader.iter_arrow_batches``) hand over, or a dict of
numpy columns, where a list or binary column is an object array of per-row values (or a 2-D array
when every row has the same length). Either way each column is decoded once for the whole batch.

Padding: CXRs are padded at the end to the batch's longest T (at least 2, so that a record
with a single CXR, valid for prediction only, has one pair slot with ``pair_mask`` False), EHR
hours to the longest L (at least 1). Labels that a record lacks (an inference dataset) become
"not mentioned" / IGNORE_INDEX. Mask convention: True = valid / present.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dipro import vocab
from dipro.batch import Batch
from dipro.data.labels import IGNORE_INDEX
from dipro.data.normalize import NormStats

Columns = pa.Table | Mapping[str, np.ndarray]


def _lists(columns: Columns, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (its values, row after row; values per row), null rows holding none."""
    if isinstance(columns, pa.Table):
        column = columns.column(name)
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
        return pc.list_flatten(column).to_numpy(zero_copy_only=False), lengths.astype(np.int64)
    column = columns[name]
    if column.dtype != object:  # every row of the same length: a 2-D array
        return column.reshape(-1), np.full(len(column), column.reshape(len(column), -1).shape[1])
    rows = [np.asarray(v).reshape(-1) for v in column if v is not None]
    lengths = np.array([0 if v is None else np.size(v) for v in column], np.int64)
    return (np.concatenate(rows) if rows else np.zeros(0)), lengths


def _bytes(columns: Columns, name: str) -> np.ndarray:
    """The concatenated bytes of a binary column as uint8 (zero-copy from a one-chunk column)."""
    if not isinstance(columns, pa.Table):
        return np.frombuffer(b"".join(v for v in columns[name] if v is not None), np.uint8)
    parts = []
    for chunk in columns.column(name).chunks:
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        parts.append(np.frombuffer(data, np.uint8)[ends[0] : ends[-1]])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _scalar(columns: Columns, name: str, missing: float) -> np.ndarray:
    """A nullable scalar column as float64 with ``missing`` where null."""
    if isinstance(columns, pa.Table):
        column = pc.cast(columns.column(name), pa.float64())
        return pc.fill_null(column, missing).to_numpy()
    column = columns[name]
    if column.dtype == object:
        return np.array([missing if v is None else float(v) for v in column], dtype=np.float64)
    out = column.astype(np.float64)
    return np.where(np.isnan(out), missing, out)


def _has(columns: Columns, name: str) -> bool:
    """Whether the batch carries a (non-null) ``name`` column."""
    if isinstance(columns, pa.Table):
        return name in columns.column_names and columns.column(name).null_count < len(columns)
    return columns.get(name) is not None and columns[name][0] is not None


def _padded(flat: np.ndarray, mask: np.ndarray, tail: tuple[int, ...], dtype: type) -> np.ndarray:
    """Rows of ``flat`` (row-major values of the valid positions) spread into a zero-padded
    array of shape ``mask.shape + tail``; no copy when nothing is padded and ``flat`` is
    writable already."""
    if mask.all() and flat.dtype == dtype and flat.flags.writeable:
        return flat.reshape(*mask.shape, *tail)
    out = np.zeros((*mask.shape, *tail), dtype)
    out[mask] = flat.reshape(-1, *tail)
    return out


def collate(columns: Columns, stats: NormStats | None = None, *, pin_memory: bool = False) -> Batch:
    """Pad and stack sample records into a ``Batch``; z-score EHR and demographics with ``stats``.

    ``columns`` is an Arrow table or a dict of numpy columns (module docstring) with the
    columns of ``dipro.data.schema.model_columns`` (either region mode). Decoding is per batch:
    each list column is read as one flat array and scattered into its padded tensor with the
    batch's length masks (no per-row Python loop); crops stay uint8. ``pin_memory`` pins the
    tensors in page-locked memory for non-blocking copies to a GPU. Thread-safe: it touches no
    shared state and never writes into its input.
    """
    stats = stats or NormStats.identity()
    R, K, V, G = vocab.NUM_REGIONS, vocab.NUM_FINDINGS, vocab.NUM_EHR, vocab.NUM_DEMOGRAPHICS
    flat_cxr_times, Ts = _lists(columns, "cxr_times")
    B, T = len(Ts), max(2, int(Ts.max()))
    P = T - 1
    flat_ehr_times, Ls = _lists(columns, "ehr_times")
    L = max(1, int(Ls.max()))
    cxr_mask = np.arange(T) < Ts[:, None]
    pair_mask = np.arange(P) < (Ts - 1)[:, None]
    ehr_mask = np.arange(L) < Ls[:, None]

    crops = features = None
    if _has(columns, "crops"):
        S = int(_scalar(columns, "crop_size", 0)[0])
        crops = _padded(_bytes(columns, "crops"), cxr_mask, (R, S, S), np.uint8)
    else:
        F = int(_scalar(columns, "feature_dim", 0)[0])
        flat, _ = _lists(columns, "features")
        features = _padded(flat.astype(np.float32, copy=False), cxr_mask, (R, F), np.float32)

    cxr_times = _padded(flat_cxr_times.astype(np.float32, copy=False), cxr_mask, (), np.float32)
    region_present = _padded(_lists(columns, "region_present")[0], cxr_mask, (R,), np.bool_)
    ehr_times = _padded(flat_ehr_times.astype(np.float32, copy=False), ehr_mask, (), np.float32)
    ehr_observed = _padded(_lists(columns, "ehr_observed")[0], ehr_mask, (V,), np.bool_)
    ehr_values = np.zeros((B, L, V), np.float32)
    flat_values, _ = _lists(columns, "ehr_values")
    ehr_values[ehr_mask] = (flat_values.reshape(-1, V) - stats.ehr_mean) / stats.ehr_std
    region_labels = np.full((B, P, R, K), vocab.NOT_MENTIONED, np.int64)
    flat_region_labels, has_region_labels = _lists(columns, "region_labels")
    labelled_pairs = pair_mask & (has_region_labels > 0)[:, None]
    region_labels[labelled_pairs] = flat_region_labels.reshape(-1, R, K)
    progression = np.full((B, K), vocab.NOT_MENTIONED, np.int64)
    flat_progression, has_progression = _lists(columns, "progression")
    progression[has_progression > 0] = flat_progression.reshape(-1, K)

    demographics = _lists(columns, "demographics")[0].astype(np.float32).reshape(B, G)
    n_num = len(vocab.NUMERIC_DEMOGRAPHICS)
    demographics[:, :n_num] = (demographics[:, :n_num] - stats.demo_mean) / stats.demo_std

    mortality = _scalar(columns, "mortality", IGNORE_INDEX).astype(np.int64)
    los_days = _scalar(columns, "los_days", np.nan)
    los_class = np.array(
        [IGNORE_INDEX if np.isnan(d) else vocab.los_class(d) for d in los_days], np.int64
    )

    def ids(name: str) -> torch.Tensor:
        column = columns.column(name).to_numpy() if isinstance(columns, pa.Table) else columns[name]
        return torch.from_numpy(np.array(column, dtype=np.int64))

    batch = Batch(
        subject_id=ids("subject_id"),
        stay_id=ids("stay_id"),
        hospital=ids("hospital"),
        cxr_times=torch.from_numpy(cxr_times),
        cxr_mask=torch.from_numpy(cxr_mask),
        pair_mask=torch.from_numpy(pair_mask),
        crops=None if crops is None else torch.from_numpy(crops),
        features=None if features is None else torch.from_numpy(features),
        region_present=torch.from_numpy(region_present),
        ehr_times=torch.from_numpy(ehr_times),
        ehr_mask=torch.from_numpy(ehr_mask),
        ehr_values=torch.from_numpy(ehr_values),
        ehr_observed=torch.from_numpy(ehr_observed),
        demographics=torch.from_numpy(demographics),
        region_labels=torch.from_numpy(region_labels),
        progression=torch.from_numpy(progression),
        mortality=torch.from_numpy(mortality),
        los_class=torch.from_numpy(los_class),
    )
    return batch.pin_memory() if pin_memory else batch
