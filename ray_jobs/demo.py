"""The main job: `python -m ray_jobs.demo [overrides]` (what `make demo` runs).

1. Generates the default synthetic cohort under ``data.root`` (configs/data/synthetic.yaml) when
   it is absent, and prints the samples per task, split and hospital.
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
from pathlib import Path
from typing import Any

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dipro import storage, tracking, vocab
from dipro.data.shards import Manifest, read_manifest
from dipro.data.synthetic import SyntheticConfig, generator_info, write_synthetic_dataset
from ray_jobs.console import say, session
from ray_jobs.evaluate import write_run_report
from ray_jobs.train import ensure_ray, run_training


def ensure_synthetic_data(cfg: Mapping[str, Any]) -> Path:
    """Make sure the synthetic dataset of ``cfg`` (the ``data`` config node) exists; return its
    root.

    A dataset already there with the same generator config is reused. One written with another
    generator config is replaced when ``cfg.overwrite`` is true, else a FileExistsError says so.
    """
    root = Path(str(cfg["root"]))
    generator = cfg.get("generator") or {}
    if isinstance(generator, DictConfig):
        generator = OmegaConf.to_container(generator, resolve=True)
    synth = SyntheticConfig.from_dict(generator)
    wanted = generator_info(synth)
    existing = {}
    for task in vocab.TASKS:
        try:
            existing[task] = read_manifest(root, task).generator
        except FileNotFoundError:
            continue
    if len(existing) == len(vocab.TASKS) and all(g == wanted for g in existing.values()):
        return root
    stale = sorted(task for task, g in existing.items() if g != wanted)
    if stale and not cfg.get("overwrite", False):
        raise FileExistsError(
            f"the datasets {stale} under {root} were written with another generator config; "
            "set data.overwrite=true to replace them"
        )
    missing = tuple(task for task in vocab.TASKS if task not in existing or task in stale)
    write_synthetic_dataset(synth, root, tasks=missing, overwrite=bool(stale))
    return root


def format_counts(manifests: Mapping[str, Manifest]) -> str:
    """A table of samples (and subjects) per task, split and hospital."""
    hospitals = sorted({h for m in manifests.values() for h in m.hospitals})
    header = f"{'task':<20} {'split':<6} " + " ".join(f"{'h' + str(h):>6}" for h in hospitals)
    lines = [header + f" {'total':>7} {'subjects':>8}"]
    for task, manifest in manifests.items():
        for split in vocab.SPLITS:
            per = manifest.counts.get(split, {})
            cells = " ".join(f"{per.get(str(h), 0):>6}" for h in hospitals)
            subjects = sum(manifest.subjects.get(split, {}).values())
            lines.append(
                f"{task:<20} {split:<6} {cells} {manifest.num_samples(split):>7} {subjects:>8}"
            )
    return "\n".join(lines)


def prepare_data(data_cfg: Mapping[str, Any]) -> dict[str, Manifest]:
    """Ensure the synthetic data exists and print what is there; returns the manifests."""
    start = time.perf_counter()
    root = ensure_synthetic_data(data_cfg)
    seconds = time.perf_counter() - start
    manifests = {task: read_manifest(root, task) for task in vocab.TASKS}
    say(f"synthetic cohort under {root} (ready in {seconds:.1f} s)")
    say(format_counts(manifests))
    return manifests


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
    ensure_ray(cfg)
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
        tracker = tracking.open_tracker(task_cfg)
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
