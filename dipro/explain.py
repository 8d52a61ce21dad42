"""One picture that explains one prediction: which images, which regions, which outcome.

Layout (``explanation_png``): a grid of the record's region crops, one row per CXR (its time,
study and dicom id on the left) and one column per region, headed by that region's attention
(the task tokens' attention over regions; uniform is 1/R = 0.10) and framed with a width and
colour that grow with it (relative to uniform, saturating at twice uniform); below, the
prediction against the label: for progression, per finding, the
probabilities of worsened / improved / no change as a stacked bar with the predicted class and
the labelled one (or "not labelled"); for mortality the death probability, for length of stay
the four class probabilities, each with the label when known. Missing inputs (no EHR observed,
a single CXR) are named in the title. In features mode, where no crops are stored, the grid
shows the attention values only.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dipro import storage, vocab
from dipro.checkpoint import CheckpointMeta
from dipro.data.collate import collate
from dipro.engine import predict
from dipro.metrics import Predictions
from dipro.model import DiPro
from dipro.prediction import missing_input_flags

_CLASS_NAMES = ("worsened", "improved", "no change")
_CLASS_COLOURS = ("#d62728", "#2ca02c", "#7f7f7f")
_LOS_NAMES = tuple(
    f"{lo:g}-{hi:g} d"
    for lo, hi in zip(vocab.LOS_BIN_EDGES[:-1], vocab.LOS_BIN_EDGES[1:], strict=True)
)


def write_explanation(
    model: DiPro,
    meta: CheckpointMeta,
    record: Mapping[str, np.ndarray],
    target: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
) -> None:
    """Run ``model`` on the one-row ``record`` (numpy columns) and write its picture (PNG,
    atomically) to ``target``."""
    model.to(device)
    predictions = predict(model, [collate(record, meta.norm_stats)], device=device)
    storage.write_bytes_atomic(target, explanation_png(predictions, record))


def _crops(record: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """[T, R, S, S] uint8 crops of the one-row record, or None in features mode."""
    raw = record.get("crops")
    if raw is None or raw[0] is None:
        return None
    T, R, S = len(record["cxr_times"][0]), vocab.NUM_REGIONS, int(record["crop_size"][0])
    return np.frombuffer(raw[0], np.uint8).reshape(T, R, S, S)


def _text(value: Any, index: int) -> str:
    if value is None:
        return "n/a"
    return str(np.asarray(value)[index])


def explanation_png(predictions: Predictions, record: Mapping[str, np.ndarray]) -> bytes:
    """PNG of the one-sample ``predictions`` on ``record`` (module docstring)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    task = predictions.task
    R = vocab.NUM_REGIONS
    times = np.asarray(record["cxr_times"][0], np.float64)
    T = len(times)
    crops = _crops(record)
    present = np.asarray(record["region_present"][0], bool).reshape(T, R)
    attention = predictions.region_attention[0].astype(np.float64)
    flags = missing_input_flags(record)
    dicoms = record.get("dicom_ids", [None])[0]
    studies = record.get("study_ids", [None])[0]

    outcome_rows = vocab.NUM_FINDINGS if task == "disease_progression" else 2
    fig = Figure(figsize=(16, 1.7 * T + 0.45 * outcome_rows + 2.2))
    grid = fig.add_gridspec(2, 1, height_ratios=[1.7 * T, 0.45 * outcome_rows + 0.8], hspace=0.35)
    crop_grid = grid[0].subgridspec(T, R, wspace=0.08, hspace=0.25)
    cmap = colormaps["Reds"]
    strength = np.clip(attention * R / 2, 0.0, 1.0)  # 0.5 at uniform attention
    for t in range(T):
        for r in range(R):
            ax = fig.add_subplot(crop_grid[t, r])
            ax.set_xticks([])
            ax.set_yticks([])
            if crops is not None and present[t, r]:
                ax.imshow(crops[t, r], cmap="gray", vmin=0, vmax=255)
            else:
                ax.set_facecolor("#eeeeee")
                ax.text(
                    0.5,
                    0.5,
                    "no box" if crops is not None else "features",
                    ha="center",
                    va="center",
                    fontsize=8,
                    transform=ax.transAxes,
                )
            for spine in ax.spines.values():
                spine.set_edgecolor(cmap(0.15 + 0.85 * float(strength[r])))
                spine.set_linewidth(0.5 + 6 * float(strength[r]))
            if t == 0:
                name = vocab.REGIONS[r].replace(" ", "\n", 1)
                ax.set_title(f"{name}\nattention {attention[r]:.2f}", fontsize=8)
            if r == 0:
                dicom = _text(dicoms, t)
                ax.set_ylabel(
                    f"CXR {t + 1}: {times[t]:.1f} h\nstudy {_text(studies, t)}\n"
                    f"{dicom[:17]}\n{dicom[17:]}",
                    fontsize=7,
                    rotation=0,
                    ha="right",
                    va="center",
                )

    ax = fig.add_subplot(grid[1])
    if task == "disease_progression":
        _progression_panel(ax, predictions)
    else:
        _outcome_panel(ax, predictions)

    missing = [
        name
        for name, key in (
            ("no EHR observed", "missing_ehr"),
            ("a single CXR: no pair", "single_cxr"),
        )
        if flags[key][0]
    ]
    title = (
        f"{record['sample_id'][0]} (subject {record['subject_id'][0]}, stay "
        f"{record['stay_id'][0]}): {task.replace('_', ' ')}"
    )
    if missing:
        title += f"; missing input: {', '.join(missing)}"
    fig.suptitle(
        f"{title}\nframes: region attention (thicker and redder = more; uniform = {1 / R:.2f})",
        fontsize=11,
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _progression_panel(ax: Any, predictions: Predictions) -> None:
    probs = predictions.probabilities[0]  # [K, 3]
    labels = predictions.labels[0]  # [K]
    K = vocab.NUM_FINDINGS
    y = np.arange(K)[::-1]
    left = np.zeros(K)
    for c, (name, colour) in enumerate(zip(_CLASS_NAMES, _CLASS_COLOURS, strict=True)):
        ax.barh(y, probs[:, c], left=left, color=colour, label=name, height=0.6)
        left += probs[:, c]
    for k in range(K):
        predicted = _CLASS_NAMES[int(probs[k].argmax())]
        code = int(labels[k])
        label = _CLASS_NAMES[code] if code < vocab.NOT_MENTIONED else "not labelled"
        mark = (
            ""
            if code >= vocab.NOT_MENTIONED
            else (" (agrees)" if label == predicted else " (differs)")
        )
        ax.text(
            1.02,
            y[k],
            f"predicted {predicted} ({probs[k].max():.2f}); label {label}{mark}",
            va="center",
            fontsize=9,
            transform=ax.get_yaxis_transform(),
        )
    ax.set_yticks(y, list(vocab.FINDINGS), fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("predicted probability of the change between the two CXRs")
    ax.legend(ncols=3, fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0))
    ax.set_title("Predicted vs labelled change per finding", fontsize=10, loc="right")


def _outcome_panel(ax: Any, predictions: Predictions) -> None:
    probs = predictions.probabilities[0]
    label = int(predictions.labels[0])
    if predictions.task == "mortality":
        names, values = ["survives", "dies in hospital"], np.array([1 - probs, probs])
        known = label in (0, 1)
    else:
        names, values = list(_LOS_NAMES), probs
        known = 0 <= label < vocab.NUM_LOS_CLASSES
    y = np.arange(len(names))[::-1]
    colours = ["#1f77b4"] * len(names)
    if known:
        colours[label] = "#ff7f0e"
    ax.barh(y, values, color=colours, height=0.6)
    for i, v in enumerate(values):
        ax.text(min(float(v), 0.9) + 0.01, y[i], f"{v:.2f}", va="center", fontsize=9)
    ax.set_yticks(y, names, fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("predicted probability")
    what = "in-hospital death" if predictions.task == "mortality" else "ICU length of stay"
    suffix = f"label: {names[label]} (orange)" if known else "not labelled"
    ax.set_title(f"Predicted {what}; {suffix}", fontsize=10)
