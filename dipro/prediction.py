"""Per-sample predictions of a checkpoint as a table, and the inputs a record may lack.

The prediction table (one row per sample record, written as Parquet by ``ray_jobs.predict``):

| column                                   | type          | meaning                               |
|------------------------------------------|---------------|---------------------------------------|
| sample_id, subject_id, stay_id, hospital | as the record | the record's ids                      |
| split, task                              | string        |                                       |
| dicom_ids, study_ids                     | list [T]      | the CXRs behind the prediction        |
| source, source_version                   | string        | the data set (null: schema version 1) |
| missing_ehr                              | bool          | no EHR value observed in the window   |
| single_cxr                               | bool          | one CXR only: no pair for the model   |
| progression.{finding}.{class}            | float64       | class probabilities (progression)     |
| progression.{finding}.predicted          | string        | the most probable class               |
| progression.{finding}.label              | int8 (null)   | labelled code, 3 = not mentioned      |
| mortality.probability, mortality.label   | float64, int8 | in-hospital death (mortality)         |
| los.{c}.probability                      | float64       | LOS class c = 0..3 (length of stay)   |
| los.expected_class                       | float64       | sum_c c * p_c                         |
| los.predicted, los.label                 | int8          | argmax class, labelled class (null)   |
| attention.{region}                       | float64       | task tokens' attention; sum to 1, or  |
|                                          |               | all 0 when the record has no pair     |
| checkpoint, checkpoint_sha256            | string        | which weights made the prediction     |
| model_version                            | string        | dipro package version + format        |

Names are vocab names with spaces replaced by underscores. Only the columns of the checkpoint's
task are present; labels are null where the record has none (an inference dataset).

Missing inputs. The model masks what is absent: a record whose window has no observed EHR
value runs with an empty (or unobserved) EHR sequence, and a mortality / length-of-stay record
with a single CXR has no CXR pair, so no region token reaches the fusion (its prediction comes
from the EHR and the demographics). Such rows are flagged. ``remove_inputs`` takes those
inputs away from labelled records, to measure what flagged predictions are worth.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

import numpy as np
import pyarrow as pa

from dipro import storage, vocab
from dipro.checkpoint import FORMAT_VERSION
from dipro.data.labels import IGNORE_INDEX
from dipro.metrics import Predictions

ID_COLUMNS: Final[tuple[str, ...]] = (
    "sample_id",
    "subject_id",
    "stay_id",
    "hospital",
    "split",
    "task",
    "dicom_ids",
    "study_ids",
    "source",
    "source_version",
)
REMOVABLE: Final[tuple[str, ...]] = ("ehr", "cxr")
_CLASSES: Final[tuple[str, ...]] = tuple(
    name for name, code in vocab.PROGRESSION_CODES.items() if code < vocab.NOT_MENTIONED
)


def _snake(name: str) -> str:
    return name.replace(" ", "_")


def missing_input_flags(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``missing_ehr`` and ``single_cxr`` [B] of a batch of records (numpy columns)."""
    observed = [np.asarray(v) for v in columns["ehr_observed"]]
    return {
        "missing_ehr": np.array([not v.any() for v in observed], bool),
        "single_cxr": np.array([len(t) == 1 for t in columns["cxr_times"]], bool),
    }


def remove_inputs(columns: Mapping[str, np.ndarray], remove: Sequence[str]) -> dict[str, Any]:
    """A copy of a batch of records (numpy columns) without some inputs.

    ``"ehr"``: no EHR hour is left. ``"cxr"``: only each record's last CXR is left (with its
    crops or features and boxes; no pair, so no region labels). Progression records keep their
    pair (a progression sample is a pair by definition).
    """
    unknown = sorted(set(remove) - set(REMOVABLE))
    if unknown:
        raise ValueError(f"cannot remove inputs {unknown}; expected some of {REMOVABLE}")
    out: dict[str, Any] = dict(columns)
    B = len(columns["cxr_times"])
    if "ehr" in remove:
        empty = np.empty(0, np.float32)
        out["ehr_times"] = _objects([empty] * B)
        out["ehr_values"] = _objects([empty] * B)
        out["ehr_observed"] = _objects([np.empty(0, bool)] * B)
    if "cxr" in remove:
        R = vocab.NUM_REGIONS
        icu = np.array([t != "disease_progression" for t in columns["task"]], bool)
        times = [np.asarray(t) for t in columns["cxr_times"]]
        Ts = [len(t) for t in times]
        out["cxr_times"] = _objects([t[-1:] if k else t for t, k in zip(times, icu, strict=True)])
        out["region_present"] = _objects(
            [
                np.asarray(p)[-R:] if k else np.asarray(p)
                for p, k in zip(columns["region_present"], icu, strict=True)
            ]
        )
        out["region_labels"] = _objects(
            [
                np.empty(0, np.int8) if k else v
                for v, k in zip(columns["region_labels"], icu, strict=True)
            ]
        )
        if columns.get("crops") is not None and columns["crops"][0] is not None:
            out["crops"] = _objects(
                [
                    raw[len(raw) // T * (T - 1) :] if k else raw
                    for raw, T, k in zip(columns["crops"], Ts, icu, strict=True)
                ]
            )
        else:
            out["features"] = _objects(
                [
                    np.asarray(f)[len(f) // T * (T - 1) :] if k else f
                    for f, T, k in zip(columns["features"], Ts, icu, strict=True)
                ]
            )
    return out


def _objects(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), object)
    out[:] = list(values)
    return out


def checkpoint_identity(checkpoint: str) -> dict[str, str]:
    """``checkpoint`` (its path), ``checkpoint_sha256`` and ``model_version``."""
    digest = hashlib.sha256(storage.read_bytes(checkpoint)).hexdigest()
    try:
        package = version("dipro")
    except PackageNotFoundError:
        package = "unknown"
    return {
        "checkpoint": checkpoint,
        "checkpoint_sha256": digest,
        "model_version": f"dipro {package}, checkpoint format {FORMAT_VERSION}",
    }


def prediction_table(
    predictions: Predictions,
    records: Mapping[str, np.ndarray],
    identity: Mapping[str, str],
) -> pa.Table:
    """The prediction rows (module docstring) of ``predictions`` on the batch ``records``
    (numpy columns holding at least ID_COLUMNS and the model's columns)."""
    task = predictions.task
    n = len(predictions)
    data: dict[str, Any] = {name: _list(records, name, n) for name in ID_COLUMNS}
    data.update(missing_input_flags(records))
    probs = predictions.probabilities
    has_labels = _has_labels(records, task)
    if task == "disease_progression":
        predicted = probs.argmax(axis=-1)  # [N, K]
        for k, finding in enumerate(vocab.FINDINGS):
            base = f"progression.{_snake(finding)}"
            for c, name in enumerate(_CLASSES):
                data[f"{base}.{_snake(name)}"] = probs[:, k, c]
            data[f"{base}.predicted"] = [_CLASSES[c] for c in predicted[:, k]]
            data[f"{base}.label"] = pa.array(
                predictions.labels[:, k].astype(np.int8), mask=~has_labels
            )
    elif task == "mortality":
        data["mortality.probability"] = probs
        data["mortality.label"] = pa.array(predictions.labels.astype(np.int8), mask=~has_labels)
    else:
        for c in range(vocab.NUM_LOS_CLASSES):
            data[f"los.{c}.probability"] = probs[:, c]
        data["los.expected_class"] = probs @ np.arange(vocab.NUM_LOS_CLASSES, dtype=np.float64)
        data["los.predicted"] = probs.argmax(axis=-1).astype(np.int8)
        data["los.label"] = pa.array(predictions.labels.astype(np.int8), mask=~has_labels)
    attention = predictions.region_attention.astype(np.float64)
    for r, region in enumerate(vocab.REGIONS):
        data[f"attention.{_snake(region)}"] = attention[:, r]
    for key, value in identity.items():
        data[key] = [value] * n
    return pa.table(data)


def _list(records: Mapping[str, np.ndarray], name: str, n: int) -> list[Any]:
    column = records.get(name)
    if column is None:
        return [None] * n
    if column.dtype != object:
        return column.tolist()
    return [v.tolist() if isinstance(v, np.ndarray) else v for v in column]


def _has_labels(records: Mapping[str, np.ndarray], task: str) -> np.ndarray:
    name = "progression" if task == "disease_progression" else "mortality"
    column = records[name]
    if column.dtype == object:
        return np.array([v is not None for v in column], bool)
    return ~np.isnan(column.astype(np.float64))


def predictions_from_table(table: pa.Table) -> Predictions:
    """The ``Predictions`` behind a prediction table (for ``dipro.metrics``): logits are the log
    probabilities (the log-odds for mortality), which give back the stored probabilities."""
    tasks = set(table.column("task").to_pylist())
    if len(tasks) != 1:
        raise ValueError(f"a prediction table holds one task, this one {sorted(tasks)}")
    task = tasks.pop()

    def col(name: str, fill: int | None = None) -> np.ndarray:
        column = table.column(name)
        if fill is not None:
            column = column.fill_null(fill)
        return column.to_numpy()

    if task == "disease_progression":
        probs = np.stack(
            [
                np.stack([col(f"progression.{_snake(f)}.{_snake(c)}") for c in _CLASSES], -1)
                for f in vocab.FINDINGS
            ],
            axis=1,
        )  # [N, K, 3]
        logits = np.log(probs)
        labels = np.stack(
            [col(f"progression.{_snake(f)}.label", vocab.NOT_MENTIONED) for f in vocab.FINDINGS],
            axis=1,
        ).astype(np.int64)
    elif task == "mortality":
        p = col("mortality.probability")
        logits = np.log(p) - np.log1p(-p)
        labels = col("mortality.label", IGNORE_INDEX).astype(np.int64)
    else:
        probs = np.stack(
            [col(f"los.{c}.probability") for c in range(vocab.NUM_LOS_CLASSES)], axis=-1
        )
        logits = np.log(probs)
        labels = col("los.label", IGNORE_INDEX).astype(np.int64)
    attention = np.stack([col(f"attention.{_snake(r)}") for r in vocab.REGIONS], axis=-1)
    return Predictions(
        task=task,
        logits=logits,
        labels=labels,
        subject_id=col("subject_id"),
        stay_id=col("stay_id"),
        hospital=col("hospital"),
        region_attention=attention,
        # Prediction rows carry no region labels: no region is known to have changed.
        region_changed=np.zeros(attention.shape, bool),
    )
