"""The per-worker training loop of Ray Train: dataset shard -> ``dipro.engine`` -> report.

Every worker runs ``train_loop_per_worker``. Each epoch it trains on its shard of the training
split, predicts its shard of the validation split, gathers every worker's predictions, scores
them once with the paper's metrics, and reports. Rank 0 writes the checkpoint (project format,
``dipro.checkpoint``) and appends the epoch's metrics to ``{run_dir}/epoch_metrics.jsonl``.
Early stopping is decided on the gathered metrics, so every rank stops at the same epoch.

Resume: a worker group started on an existing run (a restart after a failure, or the same run
name started again) gets the latest checkpoint from ``ray.train.get_checkpoint`` and continues
with the next epoch: model, optimizer, scheduler, early-stopping state and epoch all come back.
A checkpoint that does not load (truncated, corrupt) is skipped for the newest older one of the
run that does, and rank 0 says which one was skipped and why.

Full or read-only storage: a checkpoint is copied into the run directory whole or not at all
(``_publish``); a write that storage refuses raises ``dipro.storage.StorageUnwritable`` naming
the path (and the bytes it needed), which ends the run with that one line while the earlier
checkpoints stay loadable for a resume.

Elastic runs (``scaling.num_workers=[min, max]``): Ray Train restarts the worker group from the
latest checkpoint whenever its size changes (a node lost, a node added). The global batch stays
what it is with ``max`` workers: each worker accumulates ``elastic_accumulation`` micro-batches,
so the optimizer steps per epoch, the schedule and the lr do not depend on the world size. The
epoch log records each epoch's ``world_size`` and, on the first epoch after a restore, the
epoch it was restored from (``restored_from_epoch``).
"""

from __future__ import annotations

import json
import math
import posixpath
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from dipro import checkpoint as ckpt_io
from dipro import storage
from dipro.accel import AccelOptions, prepare_for_device
from dipro.data.normalize import NormStats
from dipro.engine import (
    build_optimizer,
    build_scheduler,
    check_finite,
    predict_with_loss,
    train_epoch,
)
from dipro.losses import ClassWeights, build_loss
from dipro.metrics import Predictions, compute_metrics
from dipro.model import build_model
from dipro.runs import (
    CHECKPOINT_FILE,
    RUN_CONFIG_FILE,
    BestMetric,
    append_log,
    epoch_log,
    resume_point,
    run_dir,
)
from dipro.seeds import TORCH, set_determinism, stream_seed
from dipro.settings import TrainingRun, parse
from ray_jobs.data import iter_batches

FAULT_MARKER = "fault_injected"
KEEP_FREE = 4 * 2**20  # bytes a checkpoint leaves free on a local disk (``_publish``)


class InjectedFault(RuntimeError):
    """Raised once by ``train.fail_at`` to test recovery from a worker failure."""


def _restore(
    run: TrainingRun, model: torch.nn.Module, latest: ray.train.Checkpoint, rank: int
) -> dict[str, Any]:
    """The payload of the newest checkpoint that loads into ``model``, not newer than Ray's
    ``latest``; the ones skipped are named with their error (rank 0)."""
    errors: list[str] = []

    def load(uri: str) -> dict[str, Any]:
        payload = ckpt_io.read_checkpoint(uri)
        ckpt_io.load_weights(model, payload["weights"], uri)
        return payload

    def skipped(err: ckpt_io.CheckpointError) -> None:
        errors.append(str(err))
        if rank == 0:
            print(f"[{run.task.name}] resume: skipped {err}", flush=True)

    found = resume_point(
        run_dir(run.storage_path, run.run_name),
        load,
        skipped,
        error=ckpt_io.CheckpointError,
        newest=posixpath.basename(latest.path.rstrip("/")),
    )
    if found is None:
        raise ckpt_io.CheckpointError(
            f"run {run.run_name}: no checkpoint loads ({'; '.join(errors) or 'none found'})"
        )
    uri, payload = found
    if rank == 0 and errors:
        print(f"[{run.task.name}] resume: from {uri}", flush=True)
    return payload


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (a list of one on a single worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _fault_hook(run: TrainingRun, epoch: int, rank: int, world: int):  # noqa: ANN202
    """An ``on_step`` callback that raises once at ``train.fail_at`` (tests of recovery)."""
    fail_at = run.train.fail_at
    if not fail_at or int(fail_at["epoch"]) != epoch or rank != min(1, world - 1):
        return None
    marker = storage.join(run_dir(run.storage_path, run.run_name), FAULT_MARKER)

    def hook(step: int, _: dict[str, float]) -> None:
        if step == int(fail_at["step"]) and not storage.exists(marker):
            storage.write_bytes_atomic(marker, f"epoch {epoch} step {step}\n".encode())
            raise InjectedFault(f"injected failure at epoch {epoch}, step {step} on rank {rank}")

    return hook


def elastic_accumulation(accumulation: int, max_workers: int, world_size: int) -> int:
    """Micro-batches each of ``world_size`` workers accumulates per optimizer step so that the
    global batch is (at least) the one of ``max_workers`` workers accumulating ``accumulation``:
    ``ceil(accumulation * max_workers / world_size)``."""
    return math.ceil(accumulation * max_workers / world_size)


@dataclass
class _Gathered:
    """One epoch's validation as every rank saw it, gathered on every rank."""

    predictions: Predictions
    val_loss: float
    train_samples: float
    nodes: list[str]
    max_rss_mb: list[float]


class _WorkerRun:
    """One worker's part of a run: what it builds once, and the steps of each epoch."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.resolved = config["cfg"]
        run = self.run = parse(TrainingRun, self.resolved)
        self.task, self.scaling, self.train = run.task.name, run.scaling, run.train
        self.directory = run_dir(run.storage_path, run.run_name)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        torch.set_num_threads(self.scaling.cpus_per_worker)
        self.device = ray.train.torch.get_device()
        self.deterministic = self.train.deterministic
        set_determinism(self.deterministic, self.device.type)
        self.accel = AccelOptions.of(self.scaling)
        self.model = ray.train.torch.prepare_model(
            prepare_for_device(
                build_model(run.model, self.task, seed=run.seed),
                self.device,
                self.accel,
                deterministic=self.deterministic,
            )
        )
        self.norm_stats_dict = config["norm_stats"]
        self.norm_stats = NormStats.from_dict(self.norm_stats_dict)
        self.class_weights = ClassWeights.from_dict(config["class_weights"])
        self.loss_fn = build_loss(self.task, run.loss, self.class_weights)
        self.accumulation = elastic_accumulation(
            self.train.accumulation_steps, self.scaling.worker_range[1], self.world
        )
        self.optimizer = build_optimizer(
            self.model,
            run.optim,
            world_size=self.world,
            accumulation_steps=self.accumulation,
            fused=self.accel.fused_optimizer,
        )
        self.max_epochs = self.train.max_epochs
        self.scheduler = build_scheduler(
            self.optimizer, run.optim, max(1, self.max_epochs * int(config["steps_per_epoch"]))
        )
        self.amp = self.scaling.amp
        use_fp16 = self.amp in ("fp16", "float16") and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_fp16 else None  # kept across epochs
        self.pin_memory = self.scaling.pin_memory and self.device.type == "cuda"
        self.monitored = BestMetric(run.task.monitor_mode)
        self.start_epoch, self.restored_from = 1, None

    def restore(self) -> None:
        """Continue from Ray's latest checkpoint, when there is one: weights, optimizer,
        schedule, early-stopping state and the next epoch."""
        restored = ray.train.get_checkpoint()
        if restored is None:
            return
        state = ckpt_io.meta_of(_restore(self.run, self.model, restored, self.rank), restored.path)
        self.optimizer.load_state_dict(state.optimizer_state)
        self.scheduler.load_state_dict(state.scheduler_state)
        self.restored_from = int(state.epoch or 0)
        self.start_epoch = self.restored_from + 1
        self.monitored = BestMetric(
            self.monitored.mode, state.best_metric, int(state.extra["bad_epochs"])
        )
        if state.extra["stopped"]:
            self.start_epoch = self.max_epochs + 1

    def _batches(self, split: str, batch_size: int, **shuffle: Any) -> Any:
        return iter_batches(
            ray.train.get_dataset_shard(split),
            batch_size=batch_size,
            norm_stats=self.norm_stats_dict,
            pin_memory=self.pin_memory,
            **shuffle,
        )

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over this worker's shard of the training split (``engine.train_epoch``).
        Dropout and the local shuffle draw from streams of (seed, epoch, rank), so a resumed
        epoch draws what it would have drawn in an uninterrupted run."""
        seed = self.run.seed
        torch.manual_seed(stream_seed(seed, TORCH, epoch, self.rank))
        return train_epoch(
            self.model,
            self._batches(
                "train",
                self.run.optim.batch_size,
                shuffle_buffer=self.scaling.local_shuffle_buffer_size,
                prefetch_batches=self.scaling.prefetch_batches,
                seed=stream_seed(seed, epoch, self.rank) if self.deterministic else None,
            ),
            self.optimizer,
            self.loss_fn,
            device=self.device,
            scheduler=self.scheduler,
            accumulation_steps=self.accumulation,
            max_grad_norm=self.train.max_grad_norm,
            amp_dtype=self.amp,
            scaler=self.scaler,
            max_steps=self.train.max_steps_per_epoch,
            on_step=_fault_hook(self.run, epoch, self.rank, self.world),
        )

    def validate(self, train_samples: float) -> _Gathered:
        """Predict this worker's shard of the validation split; every rank's predictions,
        losses and resource use, gathered."""
        predictions, losses = predict_with_loss(
            self.model,
            self._batches("val", self.train.eval_batch_size, shuffle_buffer=None),
            self.loss_fn,
            device=self.device,
            amp_dtype=self.amp,
        )
        gathered = _gather(
            (
                predictions.to_arrays(),
                losses.get("loss", math.nan),
                len(predictions),
                ray.get_runtime_context().get_node_id(),
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                train_samples,
            )
        )
        rows = sum(g[2] for g in gathered)
        return _Gathered(
            predictions=Predictions.concatenate([Predictions.from_arrays(g[0]) for g in gathered]),
            val_loss=sum(g[1] * g[2] for g in gathered if g[2]) / max(rows, 1),
            train_samples=sum(g[5] for g in gathered),
            nodes=[g[3] for g in gathered],
            max_rss_mb=[round(g[4], 1) for g in gathered],
        )

    def score(
        self, epoch: int, stats: dict[str, float], val: _Gathered, train_s: float, started: float
    ) -> dict[str, float]:
        """The epoch's metrics: the paper's metrics on the gathered predictions, the losses,
        throughput, and the monitored metric's best so far (early stopping's state). Outputs
        that are not finite are a ``NonFiniteOutputError`` (``engine.check_finite``)."""
        check_finite(val.predictions)
        monitor = self.run.task.monitor
        metrics = {f"val/{k}": v for k, v in compute_metrics(val.predictions).items()}
        metrics["val/loss"] = val.val_loss
        metrics.update({f"train/{k}": v for k, v in stats.items()})
        metrics["train/samples_per_s"] = val.train_samples / max(train_s, 1e-9)
        metrics["epoch"] = epoch
        metrics["epoch_seconds"] = time.monotonic() - started
        self.monitored.update(float(metrics[monitor]))
        best = self.monitored.best
        metrics[f"best/{monitor}"] = best if best is not None else math.nan
        return metrics

    def save_and_report(
        self, epoch: int, metrics: dict[str, float], val: _Gathered, stopped: bool
    ) -> None:
        """Rank 0 writes the checkpoint, the run config beside it and the epoch's log line;
        every rank reports the metrics to Ray Train."""
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                ckpt_io.save_checkpoint(
                    Path(tmp) / CHECKPOINT_FILE,
                    self.model,
                    model_cfg=self.run.model,
                    task=self.task,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    epoch=epoch,
                    best_metric=self.monitored.best,
                    norm_stats=self.norm_stats,
                    class_weights=self.class_weights,
                    extra={
                        "bad_epochs": self.monitored.bad_steps,
                        "stopped": stopped,
                        "metrics": metrics,
                    },
                )
                config_json = json.dumps(self.resolved, indent=2, sort_keys=True)
                (Path(tmp) / RUN_CONFIG_FILE).write_text(config_json)
                restored = self.restored_from if epoch == self.start_epoch else None
                append_log(
                    epoch_log(self.directory),
                    {
                        **metrics,
                        "task": self.task,
                        "worker_nodes": val.nodes,
                        "worker_max_rss_mb": val.max_rss_mb,
                        "world_size": self.world,
                        "accumulation_steps": self.accumulation,
                        "restored_from_epoch": restored,
                    },
                    "epoch",
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=_publish)


def _publish(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
    """Ray Train's checkpoint upload, whole or not at all (``storage.publish_directory``): a
    checkpoint that storage refuses part-way (full, read-only) leaves no directory behind, the
    run's older checkpoints stay as they were, and the error names the path and the bytes. One
    that would leave less than ``KEEP_FREE`` bytes on a local disk is refused too: the epoch
    log and Ray Train's run state, written after it, would be left empty."""
    run_storage = ray.train.get_context().get_storage()
    path = run_storage.build_checkpoint_path_from_name(name)
    storage.publish_directory(
        checkpoint.path, path, run_storage.storage_filesystem, keep_free=KEEP_FREE
    )
    return ray.train.Checkpoint(path=path, filesystem=run_storage.storage_filesystem)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one DiPro run on this worker's shards. ``config``: ``cfg`` (the resolved Hydra
    config as a dict), ``norm_stats``, ``class_weights`` and ``steps_per_epoch``."""
    run = _WorkerRun(config)
    run.restore()
    patience = run.train.patience
    for epoch in range(run.start_epoch, run.max_epochs + 1):
        started = time.monotonic()
        stats = run.train_one_epoch(epoch)
        train_seconds = time.monotonic() - started
        val = run.validate(stats.get("samples", 0))
        metrics = run.score(epoch, stats, val, train_seconds, started)
        stopped = run.monitored.exhausted(patience)
        run.save_and_report(epoch, metrics, val, stopped)
        if stopped:
            break
