"""The report's figures (PNG bytes): learning curves and the region-attention map."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from dipro import vocab
from dipro.report.tables import METRIC_LABELS, TABLE_METRICS, format_number
from dipro.runs import best_index

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
    best = best_epoch(epochs, monitor, monitor_mode)
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
            f"{short}\n{format_number(v)}",
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
        bars.text(values[i], pos, f" {format_number(values[i])}", va="center", fontsize=8)
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


def best_epoch(epochs: Sequence[Mapping[str, Any]], monitor: str | None, mode: str) -> int | None:
    """The epoch with the best ``monitor`` (``mode`` max or min); None when unknown."""
    if monitor is None:
        return None
    best = best_index([float(e.get(monitor, math.nan)) for e in epochs], mode)
    return None if best is None else int(epochs[best]["epoch"])


def plot_sample_attention(
    samples: Sequence[tuple[str, np.ndarray, np.ndarray]], mean_map: np.ndarray, title: str
) -> bytes:
    """PNG of the region attention of single samples against the regions that changed in them.

    ``samples``: (label, attention [R], changed [R] bool) per sample, one panel each; the bars
    of the changed regions are red, the others grey, and the model's averaged map over all
    scored samples (``mean_map`` [R]) is drawn as a black tick on every bar: attention that
    follows the sample's change rises above the tick on the red bars.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(samples), 4.8))
    axes = np.atleast_1d(fig.subplots(1, len(samples), sharey=True))
    positions = np.arange(vocab.NUM_REGIONS)
    top = max(float(np.max(mean_map)), *(float(np.max(a)) for _, a, _ in samples))
    for ax, (label, attention, changed) in zip(axes, samples, strict=True):
        colours = np.where(changed, "#c0392b", "#b0b0b0")
        ax.barh(positions, attention, color=colours, edgecolor="black", linewidth=0.5)
        ax.scatter(mean_map, positions, marker="|", s=220, color="black", zorder=3)
        ax.axvline(1.0 / vocab.NUM_REGIONS, color="grey", linestyle="--", lw=1)
        ax.set(xlim=(0, top * 1.25), title=label, xlabel="attention")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, [mark[2] for mark in _REGION_MARKS])
    fig.suptitle(
        f"{title}\nred: regions that changed in the pair; black tick: the model's averaged map; "
        "dashed: uniform"
    )
    fig.tight_layout()
    return _figure_bytes(fig)
