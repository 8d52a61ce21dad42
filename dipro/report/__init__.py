"""Evaluation reports: the paper's tables, intervals, confusion matrices, figures and a model card.

Everything here is framework-free (numpy, scikit-learn, matplotlib): it turns predictions and
metrics into files a reader can open. ``dipro.run_report`` scores a checkpoint and calls
these functions; the commands ``ray_jobs.evaluate`` and ``ray_jobs.experiments`` call it.

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

from dipro.report.evaluation import ReportSettings, render_report, write_evaluation_report
from dipro.report.figures import plot_learning_curves, plot_region_attention
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
    SummaryRow,
    summary_table,
    write_json,
    write_text,
)

__all__ = [
    "CLASS_NAMES",
    "METRIC_LABELS",
    "PAPER_RESULTS",
    "TABLE_METRICS",
    "ReportSettings",
    "SummaryRow",
    "attention_faithfulness",
    "bootstrap_intervals",
    "confusion_matrices",
    "mean_region_attention",
    "model_card",
    "plot_learning_curves",
    "plot_region_attention",
    "render_report",
    "summary_table",
    "write_evaluation_report",
    "write_json",
    "write_text",
]
