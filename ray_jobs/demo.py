"""The main job: `python -m ray_jobs.demo [overrides]` (what `make demo` runs).

1. Generates the default synthetic cohort under ``data.root`` (configs/data/synthetic.yaml) when
   it is absent, and prints the samples per task, split and hospital (what
   ``python -m ray_jobs.synthetic`` does alone).
2. For each task of ``demo.tasks``: trains DiPro with Ray Train (two CPU workers by default,
   ``scaling=cpu-laptop``), evaluates the best checkpoint on the test split and writes its
   report next to the run.
3. Prints the test metrics of every task beside what chance would score, and writes them to
   ``{demo.output_dir}/metrics.json``.

The console shows a header (outputs, log file, MLflow store, Ray), the counts, one line per
epoch and the results; Ray's and the workers' output goes to ``{log_dir}/demo.log`` unless
``verbose=true``. Each task's run is an MLflow run with its report attached and its best
checkpoint registered as a version of ``dipro-{task}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dipro import storage, tracking
from dipro.config import settings_of
from dipro.data.layout import Manifest
from dipro.data.synthetic import ensure_synthetic_data
from dipro.run_report import write_run_report
from dipro.settings import JobSettings, TrainingRun
from ray_jobs.console import say, session
from ray_jobs.training import ensure_ray, local_num_cpus, run_training


def prepare_data(data_cfg: Mapping[str, Any]) -> dict[str, Manifest]:
    """Ensure the synthetic data exists and print what is there; returns the manifests."""
    start = time.perf_counter()
    data = ensure_synthetic_data(data_cfg)
    say(data.describe(time.perf_counter() - start))
    return data.manifests


# What a model that ignores its input scores on each task's headline metrics.
_CHANCE = {
    "disease_progression": {"f1": "~0.33 (3 classes)", "auroc": "0.5"},
    "mortality": {"auroc": "0.5", "auprc": "positive rate"},
    "length_of_stay": {"kappa": "0.0", "accuracy": "majority share"},
}


def _summary_table(results: Mapping[str, Mapping[str, float]]) -> str:
    lines = [f"{'task':<20} {'metric':<9} {'test':>7}   chance"]
    for task, metrics in results.items():
        for name, chance in _CHANCE[task].items():
            lines.append(f"{task:<20} {name:<9} {metrics.get(name, float('nan')):>7.3f}   {chance}")
    return "\n".join(lines)


def run_demo(cfg: DictConfig, overrides: list[str]) -> dict[str, dict[str, float]]:
    """Generate the data if needed, then train, test and report every task of ``demo.tasks``
    with the demo experiment and the user's ``overrides``; returns test metrics per task."""
    prepare_data(cfg.data)
    run = settings_of(TrainingRun, cfg)
    ensure_ray(run, local_num_cpus(run))
    results: dict[str, dict[str, float]] = {}
    for task in cfg.demo.tasks:
        say(f"\n=== {task}: training on Ray ===")
        task_cfg = compose(
            "train",
            overrides=[f"task={task}", f"+experiment={cfg.demo.experiment}", *overrides],
        )
        task_cfg.run_name = f"demo-{task}"
        started = time.perf_counter()
        result = run_training(task_cfg)
        report = write_run_report(result.run_dir)
        settings = settings_of(JobSettings, task_cfg).tracking
        tracker = tracking.open_tracker(settings, say=say) if result.mlflow_run else None
        if tracker is not None and result.mlflow_run is not None:
            tracker.log_dir(result.mlflow_run, report.parent, "report")
        results[task] = dict(result.test_metrics or {})
        say(f"=== {task}: done in {time.perf_counter() - started:.0f} s; report {report} ===")
    summary = storage.join(str(cfg.demo.output_dir), "metrics.json")
    storage.write_bytes_atomic(summary, json.dumps(results, indent=2).encode())
    say("\ntest metrics of the best checkpoints")
    say(_summary_table(results))
    say(f"written to {summary}")
    return results


@hydra.main(config_path="../configs", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with session(cfg, "demo", str(cfg.demo.output_dir)):
        run_demo(cfg, [o for o in HydraConfig.get().overrides.task if not o.startswith("demo.")])


if __name__ == "__main__":
    main()
