"""The evaluation report of one checkpoint on one split: ``write_evaluation_report`` writes
``metrics.json``, ``report.md``, the figures and the model card (package docstring: the files)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dipro import vocab
from dipro.checkpoint import CheckpointMeta
from dipro.data.layout import Manifest
from dipro.metrics import TASK_METRICS, Predictions
from dipro.report.figures import best_epoch, plot_learning_curves, plot_region_attention
from dipro.report.model_card import model_card
from dipro.report.numbers import (
    attention_faithfulness,
    bootstrap_intervals,
    confusion_matrices,
    mean_region_attention,
)
from dipro.report.tables import (
    CLASS_NAMES,
    METRIC_LABELS,
    PAPER_RESULTS,
    TABLE_METRICS,
    finite_or_none,
    format_mean_std,
    format_number,
    json_bytes,
    markdown_table,
    write_report_file,
)


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
    write_report_file(
        out / figures["region_attention"],
        plot_region_attention(
            attention,
            f"Mean region attention, {task.replace('_', ' ')} ({split}, n = {len(predictions)})",
        ),
    )
    if epochs:
        figures["learning_curves"] = "learning_curves.png"
        write_report_file(
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
    write_report_file(out / "model_card.md", card_md.encode())
    write_report_file(out / "model_card.json", json_bytes(card_json))

    payload = {
        "task": task,
        "split": split,
        "data_root": eval_data_root,
        "checkpoint": meta.path,
        "epoch": meta.epoch,
        "n_samples": len(predictions),
        "samples_per_hospital": hospitals,
        "metrics": {k: finite_or_none(v) for k, v in metrics.items()},
        "intervals": {
            k: [finite_or_none(lo), finite_or_none(hi)] for k, (lo, hi) in intervals.items()
        },
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
            name: {k: finite_or_none(v) for k, v in values.items()}
            for name, values in missing_inputs.items()
        }
    write_report_file(out / "metrics.json", json_bytes(payload))
    report = render_report(payload, epochs=epochs, monitor=monitor, monitor_mode=monitor_mode)
    write_report_file(out / "report.md", report.encode())
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
        return format_number(metrics.get(key))

    def ci(key: str) -> str:
        lo, hi = intervals.get(key, (None, None))
        return "n/a" if lo is None or hi is None else f"[{format_number(lo)}, {format_number(hi)}]"

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
                    *(format_mean_std(*ref[m], decimals=3) if m in ref else "" for m in table),
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
            best = best_epoch(epochs, monitor, monitor_mode)
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
        markdown_table(["region", "attention"], [[r, format_number(attention[r])] for r in order]),
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
    low, high = (format_number(v) for v in faith["interval"])
    on_changed, share = (
        format_number(faith["attention_on_changed"]),
        format_number(faith["share_of_changed"]),
    )
    map_low, map_high = (format_number(v) for v in faith["interval_against_mean_map"])
    return [
        f"Faithfulness: the regions whose label changed (worsened or improved) get "
        f"{on_changed} of the attention while they are {share} of the regions: ratio "
        f"**{format_number(faith['ratio'])}** ({pct}% interval {low} to {high}; "
        f"{faith['n_samples']} samples; 1 = attention blind to change). Against the averaged "
        f"map (which regions tend to change, not which changed in the sample): "
        f"**{format_number(faith['ratio_against_mean_map'])}** ({pct}% interval {map_low} to "
        f"{map_high}).",
        "",
    ]


def _all_metrics(task: str, metrics: Mapping[str, Any]) -> list[str]:
    """The table's metrics first, then any other top-level metric (e.g. accuracy, kappa)."""
    rest = sorted(k for k in metrics if "/" not in k and k not in TABLE_METRICS[task])
    return [*TABLE_METRICS[task], *rest]
