"""Evaluation reports: the paper's tables, intervals, confusion matrices, figures and a model card.

Everything here is framework-free (numpy, scikit-learn, matplotlib): it turns predictions and
metrics into files a reader can open. Ray and Hydra live in ``ray_jobs.evaluate`` and
``ray_jobs.experiments``, which call these functions.

One evaluation directory holds:

| file                 | content                                                              |
|----------------------|----------------------------------------------------------------------|
| metrics.json         | point metrics, bootstrap intervals, confusion matrices, attention    |
| report.md            | the same numbers as tables (4 decimals), with the figures linked      |
| learning_curves.png  | losses and validation metrics per epoch (when the epoch log is known) |
| region_attention.png | mean attention of the task tokens over the 10 CXR regions             |
| model_card.md / .json| intended use, input/output contract, training data, metrics, limits   |

Numbers in ``report.md`` are those of ``metrics.json`` rounded to 4 decimals. Files are written
atomically (``dipro.storage``), so a reader never sees half a report.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from sklearn.metrics import confusion_matrix

from dipro import storage, vocab
from dipro.checkpoint import CheckpointMeta
from dipro.data.shards import Manifest
from dipro.metrics import TASK_METRICS, Predictions, bootstrap_ci, mean_std_over_seeds

# The columns of the paper's result tables, in the paper's order (DIPRO_SPEC.md section 8).
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
# Published test results, mean and std over seeds 23, 29, 66 (DIPRO_SPEC.md section 8); a std of
# None where the paper gives only the mean.
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
# Where each region is marked on the schematic chest (x right, y down, fractions of the image;
# radiological convention: the patient's left on the image's right), where its label goes, and
# the label's short name. The bar chart beside the chest uses the full names.
_REGION_MARKS: Final[tuple[tuple[tuple[float, float], tuple[float, float], str], ...]] = (
    ((0.75, 0.32), (1.30, 0.28), "L lung"),
    ((0.25, 0.32), (-0.30, 0.28), "R lung"),
    ((0.75, 0.66), (1.30, 0.68), "L lower zone"),
    ((0.25, 0.66), (-0.30, 0.68), "R lower zone"),
    ((0.62, 0.45), (1.30, 0.48), "L hilum"),
    ((0.38, 0.45), (-0.30, 0.48), "R hilum"),
    ((0.88, 0.86), (1.30, 0.90), "L CP angle"),
    ((0.12, 0.86), (-0.30, 0.90), "R CP angle"),
    ((0.57, 0.68), (0.57, 1.14), "cardiac silhouette"),
    ((0.50, 0.20), (0.50, -0.10), "mediastinum"),
)


def fmt(value: float | None) -> str:
    """A metric as the report prints it: 4 decimals, ``n/a`` when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def fmt_mean_std(mean: float, std: float | None, decimals: int = 4) -> str:
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


def _finite(value: float) -> float | None:
    """JSON cannot hold NaN: undefined metrics are written as null."""
    return None if value is None or math.isnan(value) else float(value)


# ---------------------------------------------------------------- numbers of one evaluation


def bootstrap_intervals(
    predictions: Predictions, *, resamples: int = 200, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (samples resampled) of every metric of the task.

    One progression metric call on 3000 samples takes about 0.3 s on a CPU, so 200 resamples
    keep a report under a minute; more resamples give steadier interval ends.
    """
    if resamples < 1:
        raise ValueError(f"bootstrap resamples must be at least 1, got {resamples}")
    return bootstrap_ci(
        TASK_METRICS[predictions.task],
        predictions.probabilities,
        predictions.labels,
        n=resamples,
        seed=seed,
        level=level,
    )


def confusion_matrices(predictions: Predictions) -> dict[str, list[list[int]]]:
    """Confusion matrices (rows = true class, columns = predicted class) of the task.

    Progression: one 3 x 3 matrix per finding over its labelled rows (code != 3). Mortality:
    2 x 2 at probability 0.5. Length of stay: 4 x 4. Rows labelled IGNORE_INDEX do not count.
    """
    probs, labels = predictions.probabilities, predictions.labels
    task = predictions.task
    if task == "disease_progression":
        out = {}
        classes = list(range(vocab.NUM_PROGRESSION_CLASSES))
        for k, finding in enumerate(vocab.FINDINGS):
            keep = labels[:, k] != vocab.NOT_MENTIONED
            pred = probs[keep, k].argmax(axis=1)
            out[finding] = confusion_matrix(labels[keep, k], pred, labels=classes).tolist()
        return out
    keep = labels >= 0
    if task == "mortality":
        pred = (probs[keep] >= 0.5).astype(np.int64)
        return {"mortality": confusion_matrix(labels[keep], pred, labels=[0, 1]).tolist()}
    pred = probs[keep].argmax(axis=1)
    classes = list(range(vocab.NUM_LOS_CLASSES))
    return {"length_of_stay": confusion_matrix(labels[keep], pred, labels=classes).tolist()}


def mean_region_attention(predictions: Predictions) -> dict[str, float]:
    """The task tokens' attention over the 10 regions, averaged over samples (sums to 1)."""
    if len(predictions) == 0:
        return {region: float("nan") for region in vocab.REGIONS}
    mean = predictions.region_attention.astype(np.float64).mean(axis=0)
    return {region: float(v) for region, v in zip(vocab.REGIONS, mean, strict=True)}


def attention_faithfulness(
    predictions: Predictions, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """How much more attention the changed regions get than their share of regions.

    Over the samples with at least one changed and one unchanged region (``region_changed``):

        a_n   = sum over changed regions r of attention[n, r]       attention share on them
        s_n   = (changed regions of n) / R                          their share of regions
        ratio = mean_n a_n / mean_n s_n

    1 is attention blind to change; above 1, attention prefers the regions that changed. The
    interval is the percentile bootstrap of the ratio over those samples.
    """
    changed = predictions.region_changed.astype(bool)
    keep = changed.any(axis=1) & ~changed.all(axis=1)
    n = int(keep.sum())
    if n == 0:
        return {
            "ratio": None,
            "interval": [None, None],
            "n_samples": 0,
            "attention_on_changed": None,
            "share_of_changed": None,
        }
    attention = predictions.region_attention[keep].astype(np.float64)
    on_changed = (attention * changed[keep]).sum(axis=1)  # a_n [n]
    share = changed[keep].mean(axis=1)  # s_n [n]
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for b in range(resamples):
        idx = rng.integers(0, n, size=n)
        draws[b] = on_changed[idx].mean() / share[idx].mean()
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return {
        "ratio": float(on_changed.mean() / share.mean()),
        "interval": [float(low), float(high)],
        "n_samples": n,
        "attention_on_changed": float(on_changed.mean()),
        "share_of_changed": float(share.mean()),
    }


# ---------------------------------------------------------------- figures


def _figure_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    return buffer.getvalue()


def plot_learning_curves(
    epochs: Sequence[Mapping[str, Any]],
    task: str,
    monitor: str | None = None,
    monitor_mode: str = "max",
) -> bytes:
    """PNG of the training curves in a run's ``epoch_metrics.jsonl`` records: train and val loss
    on the left, the task's validation metrics on the right, the best epoch marked."""
    from matplotlib.figure import Figure

    if not epochs:
        raise ValueError("no epoch records to plot")
    x = [int(e["epoch"]) for e in epochs]
    fig = Figure(figsize=(11, 4))
    loss_ax, metric_ax = fig.subplots(1, 2)
    for key, label in (("train/loss", "train loss"), ("val/loss", "val loss")):
        values = [float(e.get(key, math.nan)) for e in epochs]
        loss_ax.plot(x, values, marker="o", label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss (total, weighted)", title="Loss")
    loss_ax.ticklabel_format(axis="y", useOffset=False)
    loss_ax.legend()
    for metric in TABLE_METRICS[task]:
        values = [float(e.get(f"val/{metric}", math.nan)) for e in epochs]
        if not all(math.isnan(v) for v in values):
            metric_ax.plot(x, values, marker="o", label=METRIC_LABELS[metric])
    best = _best_epoch(epochs, monitor, monitor_mode)
    if best is not None:
        metric_ax.axvline(best, color="grey", linestyle="--", label=f"best epoch ({best})")
    metric_ax.set(xlabel="epoch", ylabel="score", title="Validation metrics", ylim=(0.0, 1.0))
    metric_ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        ax.set_xticks(x if len(x) <= 20 else x[:: max(1, len(x) // 10)])
    fig.suptitle(f"Learning curves ({task.replace('_', ' ')})")
    return _figure_bytes(fig)


def plot_region_attention(attention: Mapping[str, float], title: str) -> bytes:
    """PNG of the mean region attention: drawn over a schematic frontal chest (the patient's
    left on the image's right) and as a labelled bar chart.

    Colours are relative to uniform attention (0.1): red above it, blue below, white at it, so
    an attention that prefers no region reads as such.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Ellipse

    values = np.asarray([attention[r] for r in vocab.REGIONS], dtype=np.float64)
    uniform = 1.0 / vocab.NUM_REGIONS
    top = float(np.nanmax(values)) if np.isfinite(values).any() else uniform
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(2 * uniform, top))
    cmap = colormaps["RdBu_r"]
    shade = norm(np.nan_to_num(values, nan=uniform))
    fig = Figure(figsize=(13, 5.6))
    chest, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1.0]})

    chest.add_patch(Ellipse((0.5, 0.52), 1.0, 1.0, fc="#f4f4f4", ec="#9a9a9a", lw=1.5))
    for cx in (0.27, 0.73):
        chest.add_patch(Ellipse((cx, 0.50), 0.40, 0.76, fc="#dfe7ef", ec="#7f8c99", lw=1.2))
    chest.add_patch(Ellipse((0.50, 0.26), 0.16, 0.44, fc="#e8e8e8", ec="#9a9a9a", lw=1.0))
    chest.add_patch(Ellipse((0.57, 0.68), 0.34, 0.28, fc="#eadede", ec="#a08080", lw=1.0))
    for ((cx, cy), (lx, ly), short), v, c in zip(_REGION_MARKS, values, shade, strict=True):
        chest.add_patch(Circle((cx, cy), 0.045, fc=cmap(c), ec="black", lw=0.8, zorder=3))
        chest.annotate(
            f"{short}\n{fmt(v)}",
            xy=(cx, cy),
            xytext=(lx, ly),
            ha="center",
            va="center",
            fontsize=9,
            zorder=4,
            bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "#bbbbbb"},
            arrowprops={"arrowstyle": "-", "color": "#555555", "lw": 0.8},
        )
    chest.text(0.02, -0.02, "R", fontsize=14, fontweight="bold", ha="center")
    chest.text(0.98, -0.02, "L", fontsize=14, fontweight="bold", ha="center")
    chest.set(xlim=(-0.55, 1.55), ylim=(1.25, -0.22), aspect="equal")
    chest.set_axis_off()
    chest.set_title("Frontal chest, patient's left on the image's right", fontsize=10)

    order = np.arange(len(values))[::-1]
    bars.barh(
        [vocab.REGIONS[i] for i in order],
        values[order],
        color=[cmap(shade[i]) for i in order],
        edgecolor="black",
        linewidth=0.5,
    )
    for pos, i in enumerate(order):
        bars.text(values[i], pos, f" {fmt(values[i])}", va="center", fontsize=8)
    bars.axvline(uniform, color="grey", linestyle="--", lw=1)
    bars.set(
        xlabel="mean attention (dashed line: uniform, 0.1)",
        xlim=(0, max(top, uniform) * 1.3),
    )
    bars.grid(axis="x", alpha=0.3)
    colorbar = fig.colorbar(
        ScalarMappable(norm=norm, cmap=cmap),
        ax=chest,
        orientation="horizontal",
        shrink=0.6,
        fraction=0.05,
        pad=0.02,
    )
    colorbar.set_label("attention (white = uniform, red above, blue below)", fontsize=8)
    colorbar.ax.tick_params(labelsize=8)
    fig.suptitle(title)
    fig.subplots_adjust(wspace=0.6)
    return _figure_bytes(fig)


# ---------------------------------------------------------------- model card


def _input_contract(meta: CheckpointMeta) -> list[tuple[str, str, str, str]]:
    """(field, dtype, shape, meaning) of what the model reads (``dipro.data.collate.Batch``)."""
    cfg = meta.model_cfg
    crops = cfg.get("region_mode") == "crops"
    image = (
        ("crops", "uint8", "[B, T, R, S, S]", "region crops of each CXR, cut by the region boxes")
        if crops
        else (
            "features",
            "float32",
            f"[B, T, R, {cfg.get('feature_dim')}]",
            "stored region features of a frozen backbone",
        )
    )
    return [
        ("cxr_times", "float32", "[B, T]", "hours since ICU admission, increasing"),
        ("cxr_mask", "bool", "[B, T]", "True = CXR present"),
        image,
        ("region_present", "bool", "[B, T, R]", "True = the region has a box on that CXR"),
        ("ehr_times", "float32", "[B, L]", "hours since ICU admission"),
        ("ehr_mask", "bool", "[B, L]", "True = EHR hour present"),
        (
            "ehr_values",
            "float32",
            f"[B, L, {vocab.NUM_EHR}]",
            "hourly EHR, z-scored with the training split's statistics (stored in the checkpoint)",
        ),
        ("ehr_observed", "bool", f"[B, L, {vocab.NUM_EHR}]", "True = measured in that hour"),
        (
            "demographics",
            "float32",
            f"[B, {vocab.NUM_DEMOGRAPHICS}]",
            "age, height, weight (z-scored), then one-hot gender, race, language, marital status",
        ),
    ]


def _output_contract(task: str) -> list[tuple[str, str, str, str]]:
    logits = {
        "disease_progression": (
            f"[B, {vocab.NUM_FINDINGS}, {vocab.NUM_PROGRESSION_CLASSES}]",
            "per finding, logits of worsened = 0, improved = 1, no change = 2 (softmax)",
        ),
        "mortality": ("[B]", "logit of in-hospital death (sigmoid)"),
        "length_of_stay": (
            f"[B, {vocab.NUM_LOS_CLASSES}]",
            "logits of the ICU stay bins [2,3) [3,4) [4,6) [6,11) days = classes 0..3 (softmax)",
        ),
    }[task]
    return [
        ("logits", "float32", logits[0], logits[1]),
        (
            "region_attention",
            "float32",
            f"[B, {vocab.NUM_REGIONS}]",
            "attention of the task tokens over the regions, rows sum to 1 (a reading aid only)",
        ),
    ]


def _limitations(task: str, manifest: Manifest | None, n_samples: int) -> list[str]:
    out = [
        "Research use only: not a medical device, not validated for diagnosis, triage or any "
        "clinical decision.",
        "Region attention shows where the task tokens look; it is not an explanation of a "
        "prediction and must not be read as one.",
        f"Evaluated on {n_samples} samples: the bootstrap intervals show how much the numbers "
        "can move; small test sets give wide intervals.",
        "Inputs must follow the project's sample-record schema (region crops or features, "
        "hourly EHR in the listed units); other scanners, views or EHR coding are untested.",
    ]
    if task == "disease_progression":
        out.append(
            "Findings labelled 'not mentioned' (code 3) are excluded from training and metrics; "
            "the model says nothing reliable about them."
        )
    if manifest is not None and manifest.generator.get("name") == "synthetic":
        out.insert(
            1,
            "Trained on a synthetic cohort: the numbers describe the method on generated data "
            "and do not transfer to patients.",
        )
    elif manifest is not None:
        out.append(
            f"Trained on hospitals {manifest.hospitals} only; performance at other sites, "
            "populations and time periods is unknown."
        )
    return out


def model_card(
    meta: CheckpointMeta,
    *,
    metrics: Mapping[str, float],
    intervals: Mapping[str, tuple[float, float]],
    split: str,
    n_samples: int,
    level: float,
    manifest: Manifest | None,
    data_root: str | None,
    missing_inputs: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The model card of a checkpoint as markdown and as MONAI-bundle-style metadata (json).

    ``manifest`` describes the data the model was trained on (counts per split and hospital,
    training label counts); None when it cannot be found, which the card then says.
    ``missing_inputs``: metrics of the same split with inputs removed, by variant name.
    """
    task = meta.task
    cfg = meta.model_cfg
    inputs = _input_contract(meta)
    outputs = _output_contract(task)
    limitations = _limitations(task, manifest, n_samples)
    table = TABLE_METRICS[task]
    eval_metrics = {
        m: {
            "value": _finite(metrics.get(m, math.nan)),
            "ci": [_finite(v) for v in intervals.get(m, (math.nan, math.nan))],
        }
        for m in table
    }
    training_data: dict[str, Any] = {"root": data_root}
    if manifest is not None:
        training_data.update(
            generator=manifest.generator.get("name", "unknown"),
            region_mode=manifest.region_mode,
            crop_size=manifest.crop_size,
            samples=manifest.counts,
            subjects=manifest.subjects,
            train_label_counts=manifest.train_label_counts,
        )
    codes: dict[str, Any] = {
        "regions": list(vocab.REGIONS),
        "ehr_variables": list(vocab.EHR_VARIABLES),
        "demographics": list(vocab.DEMOGRAPHICS),
    }
    if task == "disease_progression":
        codes["findings"] = list(vocab.FINDINGS)
        codes["progression_codes"] = dict(vocab.PROGRESSION_CODES)
    if task == "length_of_stay":
        codes["los_bin_edges_days"] = list(vocab.LOS_BIN_EDGES)
    metadata = {
        "name": f"DiPro {task}",
        "task": task,
        "description": "DiPro (NeurIPS 2025): multimodal disease progression modelling from "
        "longitudinal chest X-rays and ICU EHR via spatiotemporal disentanglement and "
        "multiscale alignment.",
        "intended_use": "Research on multimodal disease-progression and ICU outcome modelling. "
        "Not for diagnosis or any clinical decision.",
        "checkpoint": meta.path,
        "checkpoint_format_version": meta.format_version,
        "data_schema_version": meta.data_schema_version,
        "epoch": meta.epoch,
        "model_config": cfg,
        "network_data_format": {
            "inputs": {n: {"dtype": d, "shape": s, "meaning": m} for n, d, s, m in inputs},
            "outputs": {n: {"dtype": d, "shape": s, "meaning": m} for n, d, s, m in outputs},
            "dimensions": {
                "B": "batch",
                "T": "CXRs per sample (2 for progression)",
                "R": f"{vocab.NUM_REGIONS} regions",
                "S": "crop side in pixels"
                + (
                    f" ({manifest.crop_size} in the training data)"
                    if manifest is not None and manifest.crop_size
                    else ""
                ),
                "L": "EHR hours",
            },
            "codes": codes,
        },
        "training_data": training_data,
        "eval_metrics": {
            "split": split,
            "n_samples": n_samples,
            "level": level,
            "metrics": eval_metrics,
        },
        "limitations": limitations,
        "references": ["arXiv:2510.11112"],
    }

    ablations = cfg.get("ablation", {})
    off = [name for name, on in ablations.items() if not on]
    lines = [
        f"# Model card: DiPro, {task.replace('_', ' ')}",
        "",
        "## Model details",
        "",
        f"- Checkpoint: `{meta.path}` (format {meta.format_version}, data schema "
        f"{meta.data_schema_version}, epoch {meta.epoch})",
        f"- Architecture: DiPro, backbone {cfg.get('backbone')} on {cfg.get('region_mode')}, "
        f"d_model {cfg.get('d_model')}, {cfg.get('num_heads')} heads, {cfg.get('ehr_layers')} "
        f"EHR / {cfg.get('local_fusion_layers')} local fusion layers, "
        f"{cfg.get('num_groups')} groups",
        f"- Ablations switched off: {', '.join(off) if off else 'none (the full model)'}",
        "- Reference: Liu et al., NeurIPS 2025, arXiv:2510.11112",
        "",
        "## Intended use",
        "",
        metadata["intended_use"],
        "",
        "## Inputs",
        "",
        "B batch, T CXRs, R = 10 regions, S crop side, L EHR hours. Mask convention: True = "
        "valid / present.",
        "",
        markdown_table(["field", "dtype", "shape", "meaning"], [list(r) for r in inputs]),
        "",
        f"Regions, in tensor order: {', '.join(vocab.REGIONS)}.",
        "",
        "## Outputs",
        "",
        markdown_table(["field", "dtype", "shape", "meaning"], [list(r) for r in outputs]),
    ]
    if task == "disease_progression":
        codes_text = ", ".join(f"{name} = {code}" for name, code in vocab.PROGRESSION_CODES.items())
        lines += [
            "",
            f"Findings, in tensor order: {', '.join(vocab.FINDINGS)}.",
            f"Progression codes: {codes_text}.",
        ]
    lines += ["", "## Training data", ""]
    if manifest is None:
        lines.append(f"The training dataset's manifest was not found (data root: {data_root}).")
    else:
        lines += [
            f"Dataset `{data_root}` ({manifest.generator.get('name', 'unknown')} generator, "
            f"{manifest.region_mode}, crop size {manifest.crop_size}). Normalisation statistics "
            "were fitted on the training split only.",
            "",
            _counts_table(manifest),
        ]
        if task == "disease_progression":
            rows = [
                [finding, *map(str, counts)]
                for finding, counts in zip(
                    vocab.FINDINGS, manifest.label_counts().progression, strict=True
                )
            ]
            lines += [
                "",
                "Training labels per finding:",
                "",
                markdown_table(["finding", *list(vocab.PROGRESSION_CODES)[:3]], rows),
            ]
    pct = round(100 * level)
    lines += [
        "",
        f"## Metrics ({split} split, {n_samples} samples, {pct}% bootstrap intervals)",
        "",
        markdown_table(
            ["metric", "value", f"{pct}% CI"],
            [
                [METRIC_LABELS[m], fmt(metrics.get(m, math.nan)), _ci_text(intervals.get(m))]
                for m in table
            ],
        ),
    ]
    if missing_inputs:
        metadata["missing_inputs"] = {
            name: {m: _finite(values.get(m, math.nan)) for m in table}
            for name, values in missing_inputs.items()
        }
        lines += [
            "",
            f"## Predictions with missing inputs ({split} split)",
            "",
            "The same records with inputs taken away (no EHR hour; only the last CXR, so no "
            "pair). Predictions the predict job flags `missing_ehr` / `single_cxr` are worth "
            "what these rows say.",
            "",
            markdown_table(
                ["inputs", *(METRIC_LABELS[m] for m in table)],
                [["all", *(fmt(metrics.get(m, math.nan)) for m in table)]]
                + [
                    [name, *(fmt(values.get(m, math.nan)) for m in table)]
                    for name, values in missing_inputs.items()
                ],
            ),
        ]
    lines += [
        "",
        "## Known limitations",
        "",
        *[f"- {text}" for text in limitations],
        "",
    ]
    return "\n".join(lines), metadata


def _counts_table(manifest: Manifest) -> str:
    hospitals = manifest.hospitals
    rows = []
    for split in vocab.SPLITS:
        per = manifest.counts.get(split, {})
        subjects = sum(manifest.subjects.get(split, {}).values())
        rows.append(
            [
                split,
                *(str(per.get(str(h), 0)) for h in hospitals),
                str(manifest.num_samples(split)),
                str(subjects),
            ]
        )
    return markdown_table(
        ["split", *(f"hospital {h}" for h in hospitals), "samples", "subjects"], rows
    )


def _ci_text(interval: tuple[float, float] | None) -> str:
    if interval is None or any(math.isnan(v) for v in interval):
        return "n/a"
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]"


# ---------------------------------------------------------------- the evaluation report


@dataclass(frozen=True)
class ReportSettings:
    """How a report is computed: bootstrap resamples, their seed and the interval level."""

    resamples: int = 200
    seed: int = 0
    level: float = 0.95


def write_evaluation_report(
    predictions: Predictions,
    meta: CheckpointMeta,
    out_dir: str | os.PathLike[str],
    *,
    split: str,
    eval_data_root: str,
    epochs: Sequence[Mapping[str, Any]] | None = None,
    monitor: str | None = None,
    monitor_mode: str = "max",
    training_manifest: Manifest | None = None,
    training_data_root: str | None = None,
    settings: ReportSettings | None = None,
    missing_inputs: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Score ``predictions`` of the checkpoint ``meta`` and write the whole report under
    ``out_dir`` (local directory); returns the path of ``report.md``.

    ``epochs``: the run's ``epoch_metrics.jsonl`` records, for the learning curves (omitted
    when None); ``monitor`` / ``monitor_mode``: the run's model-selection metric, marked on
    them. ``training_manifest``: the manifest of the data the model was trained on, for
    the model card. ``missing_inputs``: the metrics of the same split with inputs removed, by
    variant name (e.g. "no EHR"), for the model card.
    """
    settings = settings or ReportSettings()
    task = predictions.task
    if task != meta.task:
        raise ValueError(f"predictions of task {task!r} but a {meta.task!r} checkpoint")
    if len(predictions) == 0:
        raise ValueError(f"no samples to evaluate in the {split} split under {eval_data_root}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = TASK_METRICS[task](predictions.probabilities, predictions.labels)
    intervals = bootstrap_intervals(
        predictions, resamples=settings.resamples, seed=settings.seed, level=settings.level
    )
    confusion = confusion_matrices(predictions)
    attention = mean_region_attention(predictions)
    faithfulness = attention_faithfulness(
        predictions, resamples=settings.resamples, seed=settings.seed, level=settings.level
    )
    hospitals = {
        str(h): int(c)
        for h, c in zip(*np.unique(predictions.hospital, return_counts=True), strict=True)
    }

    figures = {"region_attention": "region_attention.png"}
    _write(
        out / figures["region_attention"],
        plot_region_attention(
            attention,
            f"Mean region attention, {task.replace('_', ' ')} ({split}, n = {len(predictions)})",
        ),
    )
    if epochs:
        figures["learning_curves"] = "learning_curves.png"
        _write(
            out / figures["learning_curves"],
            plot_learning_curves(epochs, task, monitor, monitor_mode),
        )

    card_md, card_json = model_card(
        meta,
        metrics=metrics,
        intervals=intervals,
        split=split,
        n_samples=len(predictions),
        level=settings.level,
        manifest=training_manifest,
        data_root=training_data_root,
        missing_inputs=missing_inputs,
    )
    _write(out / "model_card.md", card_md.encode())
    _write(out / "model_card.json", _json_bytes(card_json))

    payload = {
        "task": task,
        "split": split,
        "data_root": eval_data_root,
        "checkpoint": meta.path,
        "epoch": meta.epoch,
        "n_samples": len(predictions),
        "samples_per_hospital": hospitals,
        "metrics": {k: _finite(v) for k, v in metrics.items()},
        "intervals": {k: [_finite(lo), _finite(hi)] for k, (lo, hi) in intervals.items()},
        "bootstrap": {
            "resamples": settings.resamples,
            "seed": settings.seed,
            "level": settings.level,
            "unit": "sample",
        },
        "confusion_matrices": confusion,
        "class_names": list(CLASS_NAMES[task]),
        "region_attention": attention,
        "region_attention_faithfulness": faithfulness,
        "figures": figures,
        "model_card": "model_card.md",
    }
    if missing_inputs:
        payload["missing_inputs"] = {
            name: {k: _finite(v) for k, v in values.items()}
            for name, values in missing_inputs.items()
        }
    _write(out / "metrics.json", _json_bytes(payload))
    report = render_report(payload, epochs=epochs, monitor=monitor, monitor_mode=monitor_mode)
    _write(out / "report.md", report.encode())
    return out / "report.md"


def render_report(
    payload: Mapping[str, Any],
    *,
    epochs: Sequence[Mapping[str, Any]] | None = None,
    monitor: str | None = None,
    monitor_mode: str = "max",
) -> str:
    """``report.md`` from the ``metrics.json`` payload of ``write_evaluation_report``."""
    task = payload["task"]
    metrics, intervals = payload["metrics"], payload["intervals"]
    pct = round(100 * payload["bootstrap"]["level"])
    table = TABLE_METRICS[task]

    def value(key: str) -> str:
        return fmt(metrics.get(key))

    def ci(key: str) -> str:
        lo, hi = intervals.get(key, (None, None))
        return "n/a" if lo is None or hi is None else f"[{fmt(lo)}, {fmt(hi)}]"

    hosp = ", ".join(f"hospital {h}: {n}" for h, n in payload["samples_per_hospital"].items())
    lines = [
        f"# DiPro evaluation: {task.replace('_', ' ')}, {payload['split']} split",
        "",
        "## Summary",
        "",
        f"- Checkpoint: `{payload['checkpoint']}` (epoch {payload['epoch']})",
        f"- Data: `{payload['data_root']}`, split `{payload['split']}`, "
        f"{payload['n_samples']} samples ({hosp})",
        f"- Intervals: {pct}% percentile bootstrap over samples, "
        f"{payload['bootstrap']['resamples']} resamples (seed {payload['bootstrap']['seed']})",
        f"- Model card: [model_card.md]({payload['model_card']})",
        "",
        "## Results (paper layout)",
        "",
        markdown_table(
            ["model", *(METRIC_LABELS[m] for m in table)],
            [
                ["DiPro (this checkpoint)", *(value(m) for m in table)],
                [f"DiPro (this checkpoint), {pct}% CI", *(ci(m) for m in table)],
            ]
            + [
                [
                    f"{name} (paper, MIMIC)",
                    *(fmt_mean_std(*ref[m], decimals=3) if m in ref else "" for m in table),
                ]
                for name, ref in PAPER_RESULTS[task].items()
            ],
        ),
        "",
        "The paper's rows are the published MIMIC results (mean ± std over 3 seeds), for "
        "reference only: they come from other data.",
        "",
        "## Confidence intervals",
        "",
        markdown_table(
            ["metric", "value", f"{pct}% CI"],
            [[METRIC_LABELS.get(m, m), value(m), ci(m)] for m in _all_metrics(task, metrics)],
        ),
    ]
    if task == "disease_progression":
        columns = ("precision", "recall", "f1", "auprc", "auroc")
        rows = []
        for finding in vocab.FINDINGS:
            base = f"per_finding/{finding}"
            rows.append(
                [
                    finding,
                    str(int(metrics[f"{base}/n"])),
                    *(value(f"{base}/{m}") for m in columns),
                    ci(f"{base}/f1"),
                ]
            )
        lines += [
            "",
            "## Per-finding metrics",
            "",
            "Each finding is scored on its labelled rows (code != 3), n of them; the "
            "headline metrics above are the means of these rows over the findings.",
            "",
            markdown_table(
                ["finding", "n", *(METRIC_LABELS[m] for m in columns), f"F1 {pct}% CI"], rows
            ),
        ]
    lines += [
        "",
        "## Confusion matrices",
        "",
        "Rows: true class, columns: predicted class"
        + (" (threshold 0.5)." if task == "mortality" else "."),
    ]
    names = payload["class_names"]
    for name, matrix in payload["confusion_matrices"].items():
        lines += [
            "",
            f"**{name}**",
            "",
            markdown_table(
                ["true \\ predicted", *names],
                [[names[i], *map(str, row)] for i, row in enumerate(matrix)],
            ),
        ]
    lines += ["", "## Learning curves", ""]
    if "learning_curves" in payload["figures"]:
        lines.append(f"![learning curves]({payload['figures']['learning_curves']})")
        if epochs:
            best = _best_epoch(epochs, monitor, monitor_mode)
            lines += [
                "",
                f"{len(epochs)} epochs logged"
                + (f"; best {monitor} at epoch {best}." if best is not None else "."),
            ]
    else:
        lines.append("No epoch log was given for this checkpoint.")
    attention = payload["region_attention"]
    order = sorted(attention, key=lambda r: -(attention[r] or 0.0))
    lines += [
        "",
        "## Region attention",
        "",
        f"![region attention]({payload['figures']['region_attention']})",
        "",
        "Mean attention of the task tokens over the regions (sums to 1; uniform = 0.1). "
        "A reading aid, not an explanation.",
        "",
        markdown_table(["region", "attention"], [[r, fmt(attention[r])] for r in order]),
        "",
        *_faithfulness_lines(payload),
        "## Model card",
        "",
        f"Intended use, input/output contract, training data and limitations: "
        f"[{payload['model_card']}]({payload['model_card']}).",
        "",
    ]
    return "\n".join(lines)


def _faithfulness_lines(payload: Mapping[str, Any]) -> list[str]:
    """The report's paragraph on the attention faithfulness ratio (``attention_faithfulness``)."""
    faith = payload.get("region_attention_faithfulness") or {}
    if not faith.get("n_samples"):
        return [
            "Faithfulness: no sample has both changed and unchanged regions, so the ratio of "
            "attention on changed regions is not defined here.",
            "",
        ]
    pct = round(100 * payload["bootstrap"]["level"])
    low, high = faith["interval"]
    return [
        f"Faithfulness: the regions whose label changed (worsened or improved) get "
        f"{fmt(faith['attention_on_changed'])} of the attention while they are "
        f"{fmt(faith['share_of_changed'])} of the regions: ratio **{fmt(faith['ratio'])}** "
        f"({pct}% interval {fmt(low)} to {fmt(high)}; {faith['n_samples']} samples; "
        "1 = attention blind to change).",
        "",
    ]


def _all_metrics(task: str, metrics: Mapping[str, Any]) -> list[str]:
    """The table's metrics first, then any other top-level metric (e.g. accuracy, kappa)."""
    rest = sorted(k for k in metrics if "/" not in k and k not in TABLE_METRICS[task])
    return [*TABLE_METRICS[task], *rest]


def _best_epoch(epochs: Sequence[Mapping[str, Any]], monitor: str | None, mode: str) -> int | None:
    """The epoch with the best ``monitor`` (``mode`` max or min); None when unknown."""
    if monitor is None:
        return None
    scores = [float(e.get(monitor, math.nan)) for e in epochs]
    if all(math.isnan(s) for s in scores):
        return None
    pick = np.nanargmax if mode == "max" else np.nanargmin
    return int(epochs[int(pick(scores))]["epoch"])


# ---------------------------------------------------------------- tables over seeds


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
                    "mean": _finite(stats[m][0]),
                    "std": _finite(stats[m][1]),
                    "values": [_finite(float(r[m])) for r in row.runs],
                }
                for m in columns
                if m in stats
            },
        }
        body.append(
            [
                row.label + (f" ({row.note})" if row.note else ""),
                *(fmt_mean_std(*stats[m]) if m in stats else "n/a" for m in columns),
            ]
        )
    if with_paper:
        for name, ref in PAPER_RESULTS[task].items():
            body.append(
                [
                    f"{name} (paper, MIMIC)",
                    *(fmt_mean_std(*ref[m], decimals=3) if m in ref else "" for m in columns),
                ]
            )
    return markdown_table(["model", *(METRIC_LABELS[m] for m in columns)], body), data


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()


def _write(path: Path, data: bytes) -> None:
    storage.write_bytes_atomic(path, data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (NaN is refused: write null instead)."""
    storage.write_bytes_atomic(path, _json_bytes(obj))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8), atomically."""
    storage.write_bytes_atomic(path, text.encode())
