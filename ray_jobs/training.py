"""Distributed DiPro training on Ray Train, the library behind ``python -m ray_jobs.train``,
Tune's trials, the studies and the demo.

``run_training(cfg)``: check the config and the data (before any worker starts), lock the run
directory against a second launcher (``dipro.runs.run_lock``), reach the MLflow store once
(``dipro.tracking.open_tracker``: a store that does not answer is a warning, or with
``tracking.required=true`` the end of the run before it trains), build the Ray Data pipelines
and the ``TorchTrainer``, fit (resuming a run of the same name), then evaluate the best
checkpoint on the test split, write ``metrics.json`` in the run directory and track the run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
import ray.train
from omegaconf import DictConfig, OmegaConf
from ray.train.torch import TorchTrainer

from dipro import checkpoint as ckpt_io
from dipro import storage, tracking
from dipro.config import TRAIN_SCHEMA, ConfigError, settings_of, validate
from dipro.data.layout import Dataset, Manifest, model_dataset
from dipro.data.schema import SchemaError
from dipro.data.shard_reader import ChecksumError, verify_shards
from dipro.epoch_time import cpu_epoch_note
from dipro.evaluation import evaluate_checkpoint
from dipro.losses import ClassWeights
from dipro.runs import (
    CHECKPOINT_FILE,
    best_first,
    epoch_log,
    first_loadable,
    resume_point,
    run_dir,
    run_lock,
    write_summary,
)
from dipro.settings import JobSettings, TrainingRun
from ray_jobs.console import follow_epochs, report_waits, say
from ray_jobs.data import TrainSplit, read_split
from ray_jobs.worker import train_loop_per_worker


@dataclass(frozen=True)
class TrainingResult:
    """What a finished run leaves: its directory, best checkpoint and metrics."""

    run_dir: str
    best_checkpoint: str
    best_val: dict[str, float]
    test_metrics: dict[str, float] | None
    mlflow_run: str | None = None


def check_config(cfg: DictConfig) -> tuple[TrainingRun, Dataset]:
    """Validate the settings and the dataset; return the typed settings (parsed here, once)
    and the task's dataset (its manifest read here, once: the rest of the run asks both).

    Raises ConfigError with one clear line: a value of the wrong type or range
    (``dipro.config.TRAIN_SCHEMA``), no dataset at the shard path, a dataset whose region mode
    differs from the model's, ... The shards the run will read are checked too, once per run:
    their footers against the schema and (unless ``data.verify_checksums=false``) their sha256
    against the manifest, raising SchemaError or ChecksumError naming the file.
    """
    validate(cfg, TRAIN_SCHEMA)
    run = settings_of(TrainingRun, cfg)
    task = run.task.name
    if run.scaling.require_remote_storage:
        for key, value in (("storage_path", run.storage_path), ("data.root", run.data.root)):
            try:
                storage.require_remote(value, key)
            except ValueError as err:
                raise ConfigError(str(err)) from err
    dataset = model_dataset(
        run.data.root, task, run.model.region_mode, "data.root", splits=("train", "val")
    )
    splits = ("train", "val", "test") if run.train.evaluate_test else ("train", "val")
    verify_shards(
        dataset,
        [path for split in splits for path in dataset.shards(split)],
        checksums=run.data.verify_checksums,
    )
    _check_resumable(run, dataset.manifest)
    if not (run.ray_address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        local_num_cpus(run)  # an in-process Ray too small for the run is refused here
    return run, dataset


def _check_resumable(run: TrainingRun, manifest: Manifest) -> None:
    """A run of this name that exists must be of this task and trained on this data (its
    newest loadable checkpoint's task, region mode and normalisation statistics). Says which
    checkpoints the resume skips (unreadable ones, as the workers do) and the one it uses."""
    found = resume_point(
        run_dir(run.storage_path, run.run_name),
        ckpt_io.read_checkpoint,
        lambda err: say(f"[{run.task.name}] resume: skipped {err}"),
        error=ckpt_io.CheckpointError,
    )
    if found is None:
        return
    uri, payload = found
    try:
        ckpt_io.check_matches(
            payload,
            uri,
            task=run.task.name,
            norm_stats=manifest.norm_statistics(),
            region_mode=manifest.region_mode,
        )
    except ckpt_io.CheckpointError as err:
        raise ConfigError(
            f"run_name={run.run_name} exists and cannot be resumed with this config: {err}"
        ) from err
    epoch = ckpt_io.meta_of(payload, uri).epoch
    say(f"[{run.task.name}] resume: from {uri}, after epoch {epoch}")


def stopping_error(err: BaseException) -> Exception | None:
    """The bad-data error (``SchemaError``, ``ChecksumError``) or the refused write
    (``storage.StorageUnwritable``) behind ``err``, however deep Ray wrapped it (a data task's
    error inside a worker's inside the trainer's), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(
            current, (SchemaError, ChecksumError, storage.StorageUnwritable)
        ) and not isinstance(current, ray.exceptions.RayError):
            return current
        todo.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
        todo.extend(getattr(current, "worker_failures", {}).values())
    return None


def _steps_per_epoch(run: TrainingRun, manifest: Manifest) -> int:
    """Optimizer steps each worker takes per epoch (for the cosine schedule's length). The same
    at every world size of an elastic run: the global batch is held at its size with the most
    workers (``ray_jobs.worker.elastic_accumulation``)."""
    rows = manifest.num_samples("train") // run.scaling.worker_range[1]
    micro = math.ceil(rows / run.optim.batch_size)
    steps = math.ceil(micro / run.train.accumulation_steps)
    cap = run.train.max_steps_per_epoch
    return max(1, min(steps, cap) if cap else steps)


@dataclass(frozen=True)
class NextEpoch:
    """The epoch a run's workers train next: one past its newest checkpoint that loads (1 for
    a new run). Called where Ray Train starts each worker group, as the workers restore."""

    run_dir: str

    def __call__(self) -> int:
        found = resume_point(
            self.run_dir, ckpt_io.read_checkpoint, lambda _: None, error=ckpt_io.CheckpointError
        )
        if found is None:
            return 1
        uri, payload = found
        return int(ckpt_io.meta_of(payload, uri).epoch or 0) + 1


def build_trainer(
    cfg: DictConfig,
    run: TrainingRun,
    dataset: Dataset,
    callbacks: list[ray.train.UserCallback] | None = None,
) -> TorchTrainer:
    """The ``TorchTrainer`` of the run ``cfg`` (``run``, typed) on ``dataset`` (both
    ``check_config``'s): datasets, scaling, storage, checkpoints and failures. The workers get
    the resolved ``cfg``. ``callbacks`` go to the run's ``RunConfig`` (a Tune trial passes
    ``TuneReportCallback``)."""
    manifest = dataset.manifest
    scaling = run.scaling
    low, high = scaling.worker_range
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if manifest.feature_dim is not None:  # features mode: the width the shards hold
        resolved["model"]["feature_dim"] = manifest.feature_dim
    # Each epoch re-runs the read pipeline; its progress bars would bury the epoch lines.
    ray.data.DataContext.get_current().enable_progress_bars = run.train.data_progress_bars
    deterministic = run.train.deterministic
    datasets = {
        "train": TrainSplit(
            dataset=dataset,
            region_mode=run.model.region_mode,
            seed=run.seed if deterministic else None,
            next_epoch=NextEpoch(run_dir(run.storage_path, run.run_name)),
        ),
        "val": read_split(dataset, "val", run.model.region_mode),
    }
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = deterministic
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": resolved,
            "norm_stats": manifest.norm_stats,
            "class_weights": ClassWeights.from_counts(manifest.label_counts()).to_dict(),
            "steps_per_epoch": _steps_per_epoch(run, manifest),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=low if low == high else (low, high),
            elastic_resize_monitor_interval_s=scaling.elastic_resize_monitor_interval_s,
            use_gpu=scaling.use_gpu,
            resources_per_worker=dict(scaling.resources_per_worker or {}),
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run.run_name,
            storage_path=run.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=run.train.checkpoints_to_keep,
                checkpoint_score_attribute=run.task.monitor,
                checkpoint_score_order=run.task.monitor_mode,
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=scaling.max_failures, controller_failure_limit=3
            ),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train", "val"], execution_options=ingest
        ),
    )


def local_num_cpus(run: TrainingRun) -> int:
    """Logical CPUs of an in-process Ray: ``ray_num_cpus``, else all cores but at least the
    Train workers' CPUs (each rounded up to a whole CPU) plus one for Ray Data's read tasks and
    one for drivers and evaluation tasks.

    Ray Data's resource coordinator counts a Train worker's CPU reservation rounded up to a
    whole CPU (0.5 counts as 1); on a 2-core machine two workers would leave Ray Data no CPU
    ("Cluster resources are not enough to run any task from ...ReadParquet"): the reads still
    run, on the CPU Ray core has left, but Ray Data plans them with a zero budget. A
    ``ray_num_cpus`` below the workers' CPUs plus one is a ConfigError (the run would wait for
    a CPU that never comes).
    """
    per_worker = math.ceil(float((run.scaling.resources_per_worker or {}).get("CPU", 1)))
    workers = run.scaling.worker_range[1]
    if run.ray_num_cpus:
        if run.ray_num_cpus < workers * per_worker + 1:
            raise ConfigError(
                f"ray_num_cpus={run.ray_num_cpus} leaves Ray Data no CPU to read with: "
                f"{workers} worker(s) x {per_worker} CPU + 1 for the reads needs at least "
                f"{workers * per_worker + 1} (or leave ray_num_cpus unset)"
            )
        return run.ray_num_cpus
    return max(os.cpu_count() or 1, workers * per_worker + 2)


def ensure_ray(job: JobSettings, num_cpus: int) -> None:
    """Connect to the job's cluster (``ray_address``, else RAY_ADDRESS), or start Ray
    in-process with ``num_cpus`` logical CPUs (a training job's: ``local_num_cpus``); keep the
    cluster's detached Ray Data and Train actors on this node (``pin_cluster_actors_to_driver``);
    say where Ray's dashboard and logs are."""
    from ray_jobs.ray_startup import pin_cluster_actors_to_driver, set_dashboard_timeouts

    set_dashboard_timeouts()
    if ray.is_initialized():
        return
    address = job.ray_address or os.environ.get("RAY_ADDRESS")
    context = ray.init(address=address) if address else ray.init(num_cpus=num_cpus)
    pin_cluster_actors_to_driver()
    where = f"connected to {address}" if address else "started in-process"
    say(
        f"Ray:     {where}, {int(ray.cluster_resources().get('CPU', 0))} CPUs; its logs in "
        f"{context.address_info['session_dir']}/logs"
        + (f", dashboard http://{context.dashboard_url}" if context.dashboard_url else "")
    )


def checkpoint_uri(storage_path: str, checkpoint_path: str) -> str:
    """The project checkpoint file inside a Ray checkpoint directory of a run under
    ``storage_path``, as a path or URI (Ray keeps remote checkpoint paths without their
    scheme)."""
    if storage.is_remote(storage_path) and not storage.is_remote(checkpoint_path):
        scheme = storage_path.split("://", 1)[0]
        checkpoint_path = f"{scheme}://{checkpoint_path}"
    return storage.join(checkpoint_path, CHECKPOINT_FILE)


def _score(
    checkpoint: str, paths: list[str], batch_size: int, device: str, amp: str | None
) -> dict[str, float]:
    return evaluate_checkpoint(
        checkpoint, paths, batch_size=batch_size, device=device, amp_dtype=amp
    ).metrics


def _test_metrics(run: TrainingRun, dataset: Dataset, uri: str) -> dict[str, float] | None:
    """Metrics of the checkpoint on the whole test split, computed in one Ray task (on a GPU
    when the run trains on GPUs); None when the dataset has no test split."""
    paths = dataset.shards("test")
    if not paths:
        return None
    use_gpu = run.scaling.use_gpu
    remote = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_score)
    return ray.get(
        remote.remote(
            uri,
            paths,
            run.train.eval_batch_size,
            "cuda" if use_gpu else "cpu",
            run.scaling.amp,
        )
    )


def _best_loadable(
    run: TrainingRun, kept: list[tuple[ray.train.Checkpoint, dict[str, Any]]]
) -> tuple[ray.train.Checkpoint, dict[str, Any]]:
    """The best kept checkpoint on ``task.monitor`` whose file loads (a damaged one, skipped
    on resume, may still hold the best score)."""
    scores = [float(metrics.get(run.task.monitor, math.nan)) for _, metrics in kept]
    ranked = [kept[i] for i in best_first(scores, run.task.monitor_mode)]
    by_uri = {
        checkpoint_uri(run.storage_path, checkpoint.path): (checkpoint, m)
        for checkpoint, m in ranked
    }
    found = first_loadable(
        by_uri,
        ckpt_io.read_checkpoint,
        lambda err: print(f"[{run.task.name}] best checkpoint: skipped {err}", flush=True),
        error=ckpt_io.CheckpointError,
    )
    if found is None:
        raise RuntimeError(f"run {run.run_name} finished without a checkpoint that loads")
    return by_uri[found[0]]


def _note_random_backbone(run: TrainingRun) -> None:
    model = run.model
    if model.region_mode == "crops" and model.pretrained_weights is None:
        say(
            f"[{run.task.name}] note: the {model.backbone} backbone starts from random "
            f"weights; pass model.pretrained_weights=/path/to/{model.backbone}.pth (a "
            "torchvision state dict) to start from pretrained ones"
        )


def run_training(cfg: DictConfig, tracking_parent: str | None = None) -> TrainingResult:
    """Train (or resume) ``cfg.run_name``; evaluate its best checkpoint on the test split;
    track the run in MLflow (under the run ``tracking_parent`` when given).

    Raises RunDirectoryInUse when another process runs ``cfg.run_name`` (before Ray starts),
    TrackingUnavailable when ``tracking.required`` is true and the store does not answer.
    """
    run, dataset = check_config(cfg)
    with run_lock(run_dir(run.storage_path, run.run_name), say):
        return _train(cfg, run, dataset, tracking_parent)


def _train(
    cfg: DictConfig, run: TrainingRun, dataset: Dataset, tracking_parent: str | None
) -> TrainingResult:
    """``run_training``'s work, once the run directory is locked: the tracking store is reached
    before Ray starts, so that a required store that is down stops the run before it trains."""
    directory = run_dir(run.storage_path, run.run_name)
    manifest = dataset.manifest
    tracker = tracking.open_tracker(run.tracking, replay=directory, say=say)
    ensure_ray(run, local_num_cpus(run))
    _note_random_backbone(run)
    slow = cpu_epoch_note(
        task=run.task.name,
        backbone=run.model.backbone,
        region_mode=run.model.region_mode,
        use_gpu=run.scaling.use_gpu,
        crop_size=manifest.crop_size,
        train_samples=manifest.num_samples("train"),
        threads=run.scaling.worker_range[1] * run.scaling.cpus_per_worker,
    )
    if slow:
        say(f"[{run.task.name}] note: {slow}")
    try:
        with (
            follow_epochs(directory, run.task, run.train.max_epochs),
            report_waits(run.resource_wait_s),
        ):
            result = build_trainer(cfg, run, dataset).fit()
    except Exception as err:
        bad = stopping_error(err)
        if isinstance(bad, storage.StorageUnwritable):
            raise storage.StorageUnwritable(
                f"{bad}; the run stopped, its earlier checkpoints are intact: make room and "
                "start the same command again to resume from the last one"
            ) from None
        if bad is None:
            raise
        raise bad from None
    best, best_val = _best_loadable(run, result.best_checkpoints)
    best_uri = checkpoint_uri(run.storage_path, best.path)
    test_metrics = _test_metrics(run, dataset, best_uri) if run.train.evaluate_test else None
    out = {
        "task": run.task.name,
        "run_name": run.run_name,
        "seed": run.seed,
        "best_checkpoint": best_uri,
        "best_epoch": int(best_val["epoch"]),
        "val": {k: float(v) for k, v in best_val.items() if k.startswith("val/")},
        "test": test_metrics,
        "epoch_metrics": epoch_log(directory),
    }
    write_summary(directory, out)
    last = max(int(best_val["epoch"]), int(result.metrics.get("epoch", 0)))
    if last < run.train.max_epochs:
        say(f"[{run.task.name}] stopped early after epoch {last}: no {run.task.monitor} gain")
    mlflow_run = None
    if tracker is not None:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        mlflow_run = tracking.track_training(
            tracker, resolved, manifest.to_dict(), parent=tracking_parent
        )
    return TrainingResult(directory, best_uri, out["val"], test_metrics, mlflow_run)
