"""Distributed DiPro training on Ray Train: ``python -m ray_jobs.train [hydra overrides]``.

The work is ``run_training(cfg)``: check the config and the data (before any worker starts),
build the Ray Data pipelines and the ``TorchTrainer``, fit (resuming a run of the same name),
then evaluate the best checkpoint on the test split and write ``metrics.json`` in the run
directory. The ``@hydra.main`` wrapper only composes the config and calls it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

import hydra
import ray
import ray.data
import ray.train
from omegaconf import DictConfig, OmegaConf
from ray.train.torch import TorchTrainer

from dipro import storage, vocab
from dipro.data.shards import Manifest, list_shards, read_manifest
from dipro.evaluation import evaluate_checkpoint
from dipro.losses import ClassWeights
from ray_jobs.data import read_split
from ray_jobs.worker import CHECKPOINT_FILE, EPOCH_METRICS_FILE, run_dir, train_loop_per_worker


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any worker starts."""


@dataclass(frozen=True)
class TrainingResult:
    """What a finished run leaves: its directory, best checkpoint and metrics."""

    run_dir: str
    best_checkpoint: str
    best_val: dict[str, float]
    test_metrics: dict[str, float] | None


def check_config(cfg: DictConfig) -> Manifest:
    """Validate the settings and the dataset; return the task's manifest.

    Raises ConfigError with one clear line: unknown task, no dataset at the shard path, a
    dataset whose region mode differs from the model's, num_workers < 1, ...
    """
    task = cfg.task.name
    if task not in vocab.TASKS:
        raise ConfigError(f"task.name={task!r} is not one of {', '.join(vocab.TASKS)}")
    worker_range(cfg.scaling)
    for key in ("max_epochs", "accumulation_steps", "eval_batch_size"):
        if int(cfg.train[key]) < 1:
            raise ConfigError(f"train.{key}={cfg.train[key]} must be at least 1")
    if int(cfg.optim.batch_size) < 1 or float(cfg.optim.lr) <= 0:
        raise ConfigError("optim.batch_size must be >= 1 and optim.lr > 0")
    if cfg.task.monitor_mode not in ("max", "min"):
        raise ConfigError(f"task.monitor_mode={cfg.task.monitor_mode!r} is not max or min")
    if cfg.scaling.get("require_remote_storage"):
        for key, value in (("storage_path", cfg.storage_path), ("data.root", cfg.data.root)):
            try:
                storage.require_remote(value, key)
            except ValueError as err:
                raise ConfigError(str(err)) from err
    try:
        manifest = read_manifest(cfg.data.root, task)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err
    if manifest.region_mode != cfg.model.region_mode:
        raise ConfigError(
            f"the {task} dataset under {cfg.data.root} stores {manifest.region_mode}, but "
            f"model.region_mode={cfg.model.region_mode}"
        )
    for split in ("train", "val"):
        if manifest.num_samples(split) == 0:
            raise ConfigError(f"the {task} dataset under {cfg.data.root} has no {split} samples")
    return manifest


def worker_range(scaling: DictConfig) -> tuple[int, int]:
    """``(min, max)`` Ray Train workers of ``scaling.num_workers``: a count (fixed) or a
    ``[min, max]`` range (elastic: start with what the cluster has, grow to ``max``)."""
    value = scaling.num_workers
    bounds = list(value) if OmegaConf.is_list(value) or isinstance(value, list | tuple) else None
    try:
        low, high = (int(bounds[0]), int(bounds[1])) if bounds else (int(value), int(value))
    except (TypeError, ValueError, IndexError):
        low = high = 0
    if (bounds is not None and len(bounds) != 2) or not 1 <= low <= high:
        raise ConfigError(
            f"scaling.num_workers={value} must be a count >= 1 or a range [min, max] "
            "with 1 <= min <= max"
        )
    return low, high


def _steps_per_epoch(cfg: DictConfig, manifest: Manifest) -> int:
    """Optimizer steps each worker takes per epoch (for the cosine schedule's length). The same
    at every world size of an elastic run: the global batch is held at its size with the most
    workers (``ray_jobs.worker.elastic_accumulation``)."""
    rows = manifest.num_samples("train") // worker_range(cfg.scaling)[1]
    micro = math.ceil(rows / int(cfg.optim.batch_size))
    steps = math.ceil(micro / int(cfg.train.accumulation_steps))
    cap = cfg.train.get("max_steps_per_epoch")
    return max(1, min(steps, int(cap)) if cap else steps)


def build_trainer(
    cfg: DictConfig, manifest: Manifest, callbacks: list[ray.train.UserCallback] | None = None
) -> TorchTrainer:
    """The ``TorchTrainer`` of a run: datasets, scaling, storage, checkpoints and failures.
    ``callbacks`` go to the run's ``RunConfig`` (a Tune trial passes ``TuneReportCallback``)."""
    task = cfg.task.name
    scaling = cfg.scaling
    low, high = worker_range(scaling)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if manifest.feature_dim is not None:
        resolved["model"]["feature_dim"] = manifest.feature_dim
    # Each epoch re-runs the read pipeline; its progress bars would bury the epoch lines.
    ray.data.DataContext.get_current().enable_progress_bars = bool(
        cfg.train.get("data_progress_bars", False)
    )
    datasets = {
        split: read_split(cfg.data.root, task, split, cfg.model.region_mode)
        for split in ("train", "val")
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": resolved,
            "norm_stats": manifest.norm_stats,
            "class_weights": ClassWeights.from_counts(manifest.label_counts()).to_dict(),
            "steps_per_epoch": _steps_per_epoch(cfg, manifest),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=low if low == high else (low, high),
            elastic_resize_monitor_interval_s=float(
                scaling.get("elastic_resize_monitor_interval_s", 60.0)
            ),
            use_gpu=bool(scaling.use_gpu),
            resources_per_worker=dict(scaling.resources_per_worker),
            placement_strategy=scaling.get("placement_strategy", "PACK"),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=int(cfg.train.get("checkpoints_to_keep", 2)),
                checkpoint_score_attribute=cfg.task.monitor,
                checkpoint_score_order=cfg.task.monitor_mode,
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=int(scaling.max_failures), controller_failure_limit=3
            ),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "val"]),
    )


def ensure_ray(cfg: DictConfig) -> None:
    """Connect to the configured cluster (or RAY_ADDRESS), or start Ray in-process."""
    if ray.is_initialized():
        return
    address = cfg.get("ray_address") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.get("ray_num_cpus"))


def _checkpoint_uri(cfg: DictConfig, checkpoint_path: str) -> str:
    """The project checkpoint file inside a Ray checkpoint directory, as a path or URI (Ray
    keeps remote checkpoint paths without their scheme)."""
    if storage.is_remote(cfg.storage_path) and not storage.is_remote(checkpoint_path):
        scheme = str(cfg.storage_path).split("://", 1)[0]
        checkpoint_path = f"{scheme}://{checkpoint_path}"
    return storage.join(checkpoint_path, CHECKPOINT_FILE)


def _score(
    checkpoint: str, paths: list[str], batch_size: int, device: str, amp: str | None
) -> dict[str, float]:
    return evaluate_checkpoint(
        checkpoint, paths, batch_size=batch_size, device=device, amp_dtype=amp
    ).metrics


def _test_metrics(cfg: DictConfig, checkpoint_uri: str) -> dict[str, float] | None:
    """Metrics of the checkpoint on the whole test split, computed in one Ray task (on a GPU
    when the run trains on GPUs); None when the dataset has no test split."""
    paths = list_shards(cfg.data.root, cfg.task.name, "test")
    if not paths:
        return None
    use_gpu = bool(cfg.scaling.use_gpu)
    remote = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_score)
    return ray.get(
        remote.remote(
            checkpoint_uri,
            paths,
            int(cfg.train.eval_batch_size),
            "cuda" if use_gpu else "cpu",
            cfg.scaling.get("amp"),
        )
    )


def run_training(cfg: DictConfig) -> TrainingResult:
    """Train (or resume) ``cfg.run_name``; evaluate its best checkpoint on the test split."""
    manifest = check_config(cfg)
    ensure_ray(cfg)
    result = build_trainer(cfg, manifest).fit()
    best = result.get_best_checkpoint(cfg.task.monitor, cfg.task.monitor_mode)
    if best is None:
        raise RuntimeError(f"run {cfg.run_name} finished without a checkpoint")
    best_val = next(m for c, m in result.best_checkpoints if c.path == best.path)
    checkpoint_uri = _checkpoint_uri(cfg, best.path)
    test_metrics = _test_metrics(cfg, checkpoint_uri) if cfg.train.evaluate_test else None
    out = {
        "task": cfg.task.name,
        "run_name": cfg.run_name,
        "seed": int(cfg.seed),
        "best_checkpoint": checkpoint_uri,
        "best_epoch": int(best_val["epoch"]),
        "val": {k: float(v) for k, v in best_val.items() if k.startswith("val/")},
        "test": test_metrics,
        "epoch_metrics": storage.join(run_dir(cfg), EPOCH_METRICS_FILE),
    }
    storage.write_bytes_atomic(
        storage.join(run_dir(cfg), "metrics.json"), json.dumps(out, indent=2).encode()
    )
    return TrainingResult(run_dir(cfg), checkpoint_uri, out["val"], test_metrics)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        result = run_training(cfg)
    except ConfigError as err:
        sys.exit(f"configuration error: {err}")
    print(json.dumps({"run_dir": result.run_dir, "test": result.test_metrics}, indent=2))


if __name__ == "__main__":
    main()
