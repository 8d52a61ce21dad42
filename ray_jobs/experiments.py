"""Multi-seed runs and the ablation study: ``python -m ray_jobs.experiments mode=seeds|ablations``.

- ``run_seeds(cfg)``: train and test DiPro once per seed in ``cfg.seeds`` (the paper's 23, 29,
  66) with ``run_training``, then write the mean ± std table in the paper's layout, next to the
  paper's published numbers.
- ``run_ablations(cfg)``: the same for DiPro and each variant of ``cfg.ablations`` (without STD,
  without PAE, without local fusion, without global fusion, CXR-only, last-CXR-only), as one
  table.

Before the first run trains, ``prepare_dataset(cfg)`` makes the study's dataset when it is
absent (``dataset``): the synthetic cohort of ``data.generator`` under ``data.root``, as the demo
does (``dataset.synthetic``), and, with ``dataset.features`` naming a backbone, that frozen
backbone's features of the task's crops under ``dataset.root``, computed once and reused; every
run then trains on them (features mode, docs/model.md, "Region features").

``ablations.json`` also holds, for each variant, its test metrics per seed with their mean and
std, on progression its averaged region attention map and the attention faithfulness ratios
(``dipro.report.attention_faithfulness``) over the test samples of all seeds, and against the
full model the paired difference (DiPro minus variant, same seed and test sample) per seed and
its mean over seeds with a percentile bootstrap interval over the test samples, which every seed
shares (``paired_bootstrap``: resamples, seed, level). The predictions behind it come from each
run's best checkpoint scored again on the test split.

Each run is an ordinary training run named ``{cfg.name}-{variant}-seed{seed}`` under
``storage_path``; a run whose ``metrics.json`` already holds test metrics is reused
(``reuse_finished``), so a study stopped halfway continues where it stopped. The tables go to
``cfg.out_dir`` as ``{mode}.md`` and ``{mode}.json``, written atomically. In MLflow the study is
one parent run (its settings and both tables) with every training run, reused ones included,
as a child. While a study runs its ``out_dir`` is locked (``dipro.runs.run_lock``), and so is
each training run's directory: a second launcher of the same study is refused.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from dipro import storage, tracking
from dipro.config import TRAIN_SCHEMA, ConfigError, exit_on, settings_of, validate
from dipro.data.features import ensure_features
from dipro.data.layout import list_shards, read_manifest
from dipro.data.synthetic import ensure_synthetic_data
from dipro.evaluation import evaluate_checkpoint
from dipro.metrics import (
    TASK_METRICS,
    Predictions,
    mean_std_over_seeds,
    paired_bootstrap_difference,
)
from dipro.report import (
    SummaryRow,
    attention_faithfulness,
    mean_region_attention,
    summary_table,
    write_json,
    write_text,
)
from dipro.runs import RUN_CONFIG_FILE, SUMMARY_FILE, RunDirectoryInUse, run_dir_of, run_lock
from dipro.settings import JobSettings
from ray_jobs.console import say, session
from ray_jobs.training import run_training

FULL_MODEL = "dipro"


@dataclass(frozen=True)
class RunRecord:
    """One finished training run of a study."""

    variant: str
    seed: int
    run_dir: str
    test: dict[str, float]
    reused: bool
    seconds: float


_STUDY_KEYS = (
    "mode",
    "name",
    "seeds",
    "ablations",
    "variants",
    "out_dir",
    "reuse_finished",
    "paired_bootstrap",
    "dataset",
)


def _run_config(
    cfg: DictConfig, variant: str, seed: int, ablation: Mapping[str, bool]
) -> DictConfig:
    """The training config of one run: the study's config with the seed, the run name and the
    variant's ablation switches set, checked (``dipro.config.TRAIN_SCHEMA``)."""
    run = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in _STUDY_KEYS])
    OmegaConf.set_struct(run, False)
    run.seed = int(seed)
    run.run_name = f"{cfg.name}-{variant}-seed{seed}"
    for key, value in ablation.items():
        if key not in run.model.ablation:
            raise ConfigError(
                f"ablations.{variant}: model.ablation has no switch {key!r} "
                f"(switches: {', '.join(run.model.ablation)})"
            )
        run.model.ablation[key] = value
    OmegaConf.set_struct(run, True)
    try:
        validate(run, TRAIN_SCHEMA)
    except ConfigError as err:
        raise ConfigError(f"ablations.{variant}: {err}") from err
    return run


# The settings a reused run must share with the run the study asks for.
_SAME_RUN_KEYS = ("task", "model", "data", "optim", "loss", "train", "seed")


def _agree(trained: Any, wanted: Any) -> bool:
    """True when two config values agree on every key both have (a key added to the configs
    after a run trained does not make it differ)."""
    if isinstance(trained, dict) and isinstance(wanted, dict):
        return all(_agree(trained[k], wanted[k]) for k in trained.keys() & wanted.keys())
    return trained == wanted


def _finished(run_cfg: DictConfig, directory: str) -> dict[str, Any] | None:
    """The ``metrics.json`` of a finished run of this name, or None. A finished run trained with
    other settings (its checkpoint's ``config.json``) is refused, not silently reused."""
    uri = storage.join(directory, SUMMARY_FILE)
    if not storage.exists(uri):
        return None
    summary = json.loads(storage.read_bytes(uri))
    if not summary.get("test"):
        return None
    config_uri = storage.join(posixpath.dirname(summary["best_checkpoint"]), RUN_CONFIG_FILE)
    trained = json.loads(storage.read_bytes(config_uri))
    wanted = OmegaConf.to_container(run_cfg, resolve=True)
    for config in (trained, wanted):
        config.get("model", {}).pop("feature_dim", None)  # set from the dataset in features mode
        config.get("data", {}).pop("overwrite", None)  # what to do with old data, not what trains
    differ = [k for k in _SAME_RUN_KEYS if not _agree(trained.get(k), wanted.get(k))]
    if differ:
        raise ConfigError(
            f"{directory} holds a finished run with other {', '.join(differ)} settings: give the "
            "study another name, or reuse_finished=false to train it again"
        )
    return summary


def _study_run(cfg: DictConfig, mode: str) -> tuple[tracking.Tracker, str] | None:
    """The MLflow run that groups a study's runs (None when tracking is off or the store did
    not answer: one warning, and each training run reaches it again on its own)."""
    runs = storage.join(str(cfg.storage_path), f"{cfg.name}-<variant>-seed<seed>")
    tracker = tracking.open_tracker(settings_of(JobSettings, cfg).tracking, replay=runs, say=say)
    if tracker is None:
        return None
    study_dir = storage.join(os.fspath(cfg.out_dir), mode)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    study = {"study": {k: resolved[k] for k in _STUDY_KEYS}}
    parent = tracking.parent_run(tracker, study_dir, f"{cfg.name}-{mode}", mode, study)
    return None if parent is None else (tracker, parent)


def train_run(
    cfg: DictConfig,
    variant: str,
    seed: int,
    ablation: Mapping[str, bool],
    study: tuple[tracking.Tracker, str] | None = None,
) -> RunRecord:
    """Train and test ``variant`` with ``seed`` (or reuse the finished run of that name); its
    MLflow run goes under the ``study`` run."""
    run_cfg = _run_config(cfg, variant, seed, ablation)
    directory = run_dir_of(run_cfg)
    started = time.monotonic()
    done = _finished(run_cfg, directory) if cfg.reuse_finished else None
    if done is None:
        result = run_training(run_cfg, tracking_parent=study[1] if study else None)
        if result.test_metrics is None:
            raise ConfigError(f"run {run_cfg.run_name} has no test split to report")
        test = result.test_metrics
    else:
        test = done["test"]
        if study is not None:
            manifest = read_manifest(run_cfg.data.root, run_cfg.task.name).to_dict()
            resolved = OmegaConf.to_container(run_cfg, resolve=True)
            tracking.track_training(study[0], resolved, manifest, parent=study[1])
    seconds = time.monotonic() - started
    metric = cfg.task.monitor.removeprefix("val/")
    say(
        f"[{cfg.name}] {variant} seed {seed}: "
        + ("reused" if done is not None else f"trained in {seconds:.0f} s")
        + f", test {metric} {test.get(metric, math.nan):.4f}"
    )
    return RunRecord(variant, seed, directory, test, done is not None, seconds)


def test_predictions(cfg: DictConfig, record: RunRecord) -> Predictions:
    """The test-split predictions of a finished run's best checkpoint, scored on the CPU."""
    summary = json.loads(storage.read_bytes(storage.join(record.run_dir, SUMMARY_FILE)))
    paths = list_shards(cfg.data.root, cfg.task.name, "test")
    return evaluate_checkpoint(
        summary["best_checkpoint"], paths, batch_size=int(cfg.train.eval_batch_size)
    ).predictions


def paired_comparison(
    task: str,
    full: list[Predictions],
    variant: list[Predictions],
    *,
    resamples: int,
    seed: int,
    level: float,
) -> dict[str, Any]:
    """DiPro minus a variant, both lists in the same seed order: per seed the metric difference,
    and their mean over seeds with a paired bootstrap interval over the test samples (each
    resample draws the samples once and scores every seed of both models on them)."""
    first = full[0]
    for a in [*full, *variant]:
        if not (
            np.array_equal(a.subject_id, first.subject_id)
            and np.array_equal(a.stay_id, first.stay_id)
        ):
            raise ValueError("DiPro and the variant were not scored on the same test samples")
    metric_fn = TASK_METRICS[task]
    per_seed = []
    for a, b in zip(full, variant, strict=True):
        ma, mb = metric_fn(a.probabilities, a.labels), metric_fn(b.probabilities, a.labels)
        per_seed.append({k: ma[k] - mb[k] for k in ma if "/" not in k})
    over_seeds = paired_bootstrap_difference(
        metric_fn,
        [p.probabilities for p in full],
        [p.probabilities for p in variant],
        full[0].labels,
        n=resamples,
        seed=seed,
        level=level,
    )
    return {
        "per_seed": per_seed,
        "mean_over_seeds": {k: v for k, v in over_seeds.items() if "/" not in k},
        "samples": len(full[0]),
        "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "unit": "sample"},
    }


def _write_study(
    cfg: DictConfig,
    mode: str,
    title: str,
    rows: list[SummaryRow],
    records: list[RunRecord],
    notes: list[str],
    extra: Mapping[str, Any] | None = None,
    study: tuple[tracking.Tracker, str] | None = None,
) -> Path:
    task = cfg.task.name
    table, data = summary_table(task, rows)
    out_dir = os.fspath(cfg.out_dir)
    seeds = ", ".join(str(s) for s in cfg.seeds)
    lines = [
        f"# {title}: {task.replace('_', ' ')}",
        "",
        f"Test split of `{cfg.data.root}`; mean ± sample std over seeds {seeds}. "
        "The paper's rows are its published MIMIC results, for reference only.",
        "",
        table,
        "",
        *notes,
        "",
        "## Runs",
        "",
        "| model | seed | run | test metrics |",
        "|---|---|---|---|",
        *(
            f"| {r.variant} | {r.seed} | `{r.run_dir}` | "
            + ", ".join(
                f"{k} {v:.4f}"
                for k, v in sorted(r.test.items())
                if "/" not in k and isinstance(v, float) and not math.isnan(v)
            )
            + " |"
            for r in records
        ),
        "",
    ]
    payload = {
        "task": task,
        "mode": mode,
        "seeds": [int(s) for s in cfg.seeds],
        "data_root": str(cfg.data.root),
        "table": data,
        "runs": [
            {
                "variant": r.variant,
                "seed": r.seed,
                "run_dir": r.run_dir,
                "reused": r.reused,
                "seconds": r.seconds,
                "test": {
                    k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in r.test.items()
                },
            }
            for r in records
        ],
        **(extra or {}),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(storage.join(out_dir, f"{mode}.json"), payload)
    path = storage.join(out_dir, f"{mode}.md")
    write_text(path, "\n".join(lines))
    if study is not None:
        tracker, parent = study
        tracker.log_files(parent, [path, storage.join(out_dir, f"{mode}.json")], None)
        tracker.finish(parent)
    return Path(path)


def _check_seeds(cfg: DictConfig) -> None:
    """Every seed's run config is checked (before the first one trains)."""
    for seed in cfg.seeds:
        _run_config(cfg, FULL_MODEL, int(seed), {})


def run_seeds(cfg: DictConfig) -> Path:
    """Train and test DiPro (as configured) over ``cfg.seeds``; write ``seeds.md`` and
    ``seeds.json`` (mean ± std table in the paper's layout); returns the markdown path."""
    _check_seeds(cfg)
    study = _study_run(cfg, "seeds")
    records = [train_run(cfg, FULL_MODEL, int(seed), {}, study) for seed in cfg.seeds]
    rows = [SummaryRow("DiPro (this run)", [r.test for r in records])]
    return _write_study(cfg, "seeds", "DiPro over seeds", rows, records, [], study=study)


def _variants(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The study's variants' specs and ablation switches, and their names in training order (the
    full model first); every variant's run config is checked (before the first one trains)."""
    variants = OmegaConf.to_container(cfg.ablations, resolve=True)
    if cfg.variants is not None:
        unknown = sorted(set(cfg.variants) - set(variants))
        if unknown:
            raise ConfigError(
                f"variants: {unknown} are not in ablations (defined: {', '.join(variants)})"
            )
        variants = {name: spec for name, spec in variants.items() if name in cfg.variants}
    if FULL_MODEL not in variants:
        raise ConfigError(f"ablations must include the full model {FULL_MODEL!r}")
    specs = {name: spec or {} for name, spec in variants.items()}
    ablations = {name: spec.get("ablation") or {} for name, spec in specs.items()}
    trained = [FULL_MODEL, *(v for v in variants if v != FULL_MODEL)]
    for name in trained:
        _run_config(cfg, name, int(cfg.seeds[0]), ablations[name])
    return specs, ablations, trained


def run_ablations(cfg: DictConfig) -> Path:
    """DiPro and each variant of ``cfg.ablations`` over ``cfg.seeds``, as one table
    (``ablations.md`` / ``ablations.json``); returns the markdown path."""
    specs, ablations, trained = _variants(cfg)
    # Seeds outermost: a study stopped halfway has every variant for its first seeds.
    study = _study_run(cfg, "ablations")
    records = [
        train_run(cfg, name, int(seed), ablations[name], study)
        for seed in cfg.seeds
        for name in trained
    ]
    notes = []
    results = _variant_results(cfg, trained, records)
    rows = [
        SummaryRow(specs[name].get("label", name), [r.test for r in records if r.variant == name])
        for name in trained
    ]
    for name, result in results.items():
        over_seeds = result.get("vs_dipro", {}).get("mean_over_seeds", {})
        if over_seeds:
            label = specs[name].get("label", name)
            pct = round(100 * float(cfg.paired_bootstrap.level))
            notes.append(
                f"- DiPro minus {label}, mean over seeds (paired, {pct}% bootstrap over the test "
                "samples): "
                + ", ".join(
                    f"{k} {v['difference']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]"
                    for k, v in sorted(over_seeds.items())
                )
            )
    for name, result in results.items():
        faith = result.get("region_attention", {}).get("faithfulness", {})
        if faith.get("n_samples"):
            label = specs[name].get("label", name)
            low, high = faith["interval"]
            map_low, map_high = faith["interval_against_mean_map"]
            notes.append(
                f"- {label} region attention on the changed regions (test samples of all seeds): "
                f"ratio {faith['ratio']:.3f} [{low:.3f}, {high:.3f}] to their share of regions, "
                f"{faith['ratio_against_mean_map']:.3f} [{map_low:.3f}, {map_high:.3f}] to its "
                "averaged map"
            )
    extra = {"variants": _json_safe(results)}
    return _write_study(
        cfg, "ablations", "DiPro and its ablations", rows, records, notes, extra, study=study
    )


def _json_safe(obj: Any) -> Any:
    """``obj`` with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _variant_results(
    cfg: DictConfig, trained: list[str], records: list[RunRecord]
) -> dict[str, Any]:
    """Per variant: test metrics per seed, their mean and std, and the paired comparison with
    the full model (``paired_comparison``)."""
    boot = cfg.paired_bootstrap
    seeds = [int(s) for s in cfg.seeds]
    by_run = {(r.variant, r.seed): r for r in records}
    predictions = {
        key: test_predictions(cfg, record) for key, record in by_run.items() if key[0] in trained
    }
    out: dict[str, Any] = {}
    for name in trained:
        tests = [by_run[(name, s)].test for s in seeds]
        scalar = [{k: v for k, v in m.items() if "/" not in k} for m in tests]
        summary = mean_std_over_seeds(scalar)
        result: dict[str, Any] = {
            "per_seed": {str(s): m for s, m in zip(seeds, scalar, strict=True)},
            "mean": {k: mean for k, (mean, _) in summary.items()},
            "std": {k: std for k, (_, std) in summary.items()},
        }
        if cfg.task.name == "disease_progression":
            pooled = Predictions.concatenate([predictions[(name, s)] for s in seeds])
            result["region_attention"] = {
                "mean_map": mean_region_attention(pooled),
                "faithfulness": attention_faithfulness(
                    pooled,
                    resamples=int(boot.resamples),
                    seed=int(boot.seed),
                    level=float(boot.level),
                ),
            }
        if name != FULL_MODEL:
            result["vs_dipro"] = paired_comparison(
                cfg.task.name,
                [predictions[(FULL_MODEL, s)] for s in seeds],
                [predictions[(name, s)] for s in seeds],
                resamples=int(boot.resamples),
                seed=int(boot.seed),
                level=float(boot.level),
            )
        out[name] = result
    return out


def prepare_dataset(cfg: DictConfig) -> DictConfig:
    """Make the study's dataset when it is absent and point ``cfg.data.root`` at what the runs
    train on; returns ``cfg``.

    With ``dataset.synthetic`` the synthetic cohort of ``data.generator`` is written under
    ``data.root`` unless it is there (one written with another generator config is refused, or
    replaced with ``data.overwrite``). With ``dataset.features`` (a backbone name) the task's
    crops are featurised once by that frozen backbone (``dataset.weights``: a local state dict,
    else seeded random weights) into ``dataset.root``, and the runs train on those features
    (``model.region_mode`` features).
    """
    spec = cfg.dataset
    overwrite = bool(cfg.data.get("overwrite", False))
    source = str(cfg.data.root)
    if spec.synthetic:
        try:
            name = read_manifest(source, cfg.task.name).generator.get("name")
        except FileNotFoundError:
            name = "synthetic"
        if name != "synthetic":
            raise ConfigError(
                f"{source}/{cfg.task.name} holds {name} data, not a synthetic cohort: set "
                "dataset.synthetic=false to study it as it is"
            )
        ensure_synthetic_data(cfg.data)
    if spec.features is None:
        return cfg
    root = str(spec.root)
    manifest = ensure_features(
        source,
        root,
        cfg.task.name,
        backbone=str(spec.features),
        weights_path=None if spec.weights is None else str(spec.weights),
        overwrite=overwrite,
    )
    say(
        f"[{cfg.name}] {cfg.task.name}: {spec.features} features ({manifest.feature_dim} per "
        f"region) of {source} in {root}"
    )
    with open_dict(cfg):
        cfg.dataset.root = root
        cfg.data.root = root
        cfg.model.region_mode = "features"
    return cfg


def run_experiment(cfg: DictConfig) -> Path:
    """Check every run's config, lock the study's ``out_dir`` (``RunDirectoryInUse`` when
    another process runs this study), prepare the study's dataset (``prepare_dataset``), then
    dispatch on ``cfg.mode``: ``seeds`` or ``ablations``."""
    if cfg.mode == "seeds":
        _check_seeds(cfg)
    elif cfg.mode == "ablations":
        _variants(cfg)
    else:
        raise ConfigError(f"mode={cfg.mode!r} is not seeds or ablations")
    with run_lock(os.fspath(cfg.out_dir), say):
        prepare_dataset(cfg)
        return run_seeds(cfg) if cfg.mode == "seeds" else run_ablations(cfg)


@hydra.main(config_path="../configs", config_name="experiments", version_base="1.3")
def main(cfg: DictConfig) -> None:
    errors = exit_on({RunDirectoryInUse: "run directory", tracking.TrackingUnavailable: "tracking"})
    with errors, session(cfg, f"{cfg.name}-{cfg.mode}", os.fspath(cfg.out_dir)):
        path = run_experiment(cfg)
    print(f"table written to {path}")


if __name__ == "__main__":
    main()
