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
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from dipro import checkpoint as ckpt_io
from dipro import storage
from dipro.data.normalize import NormStats
from dipro.engine import build_optimizer, build_scheduler, predict_with_loss, train_epoch
from dipro.losses import ClassWeights, build_loss
from dipro.metrics import Predictions, compute_metrics
from dipro.model import build_model
from dipro.runs import (
    CHECKPOINT_FILE,
    EPOCH_METRICS_FILE,
    RUN_CONFIG_FILE,
    BestMetric,
    append_log,
)
from dipro.seeds import stream_seed
from ray_jobs.data import iter_batches

FAULT_MARKER = "fault_injected"


class InjectedFault(RuntimeError):
    """Raised once by ``train.fail_at`` to test recovery from a worker failure."""


def run_dir(cfg: dict[str, Any]) -> str:
    """Where Ray Train keeps this run: ``{storage_path}/{run_name}``."""
    return storage.join(cfg["storage_path"], cfg["run_name"])


def run_checkpoints(cfg: dict[str, Any]) -> list[str]:
    """The ``model.pt`` of each of the run's checkpoint directories, newest first (Ray Train
    names them ``checkpoint_{timestamp}``)."""
    fs, base = storage.resolve_filesystem(run_dir(cfg))
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    names = sorted(
        (
            info.base_name
            for info in fs.get_file_info(pafs.FileSelector(base))
            if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
        ),
        reverse=True,
    )
    return [storage.join(run_dir(cfg), name, CHECKPOINT_FILE) for name in names]


def _restore(
    cfg: dict[str, Any], model: torch.nn.Module, latest: ray.train.Checkpoint, rank: int
) -> dict[str, Any]:
    """The payload of the newest checkpoint that loads into ``model``, not newer than Ray's
    ``latest``; the ones skipped are named with their error (rank 0)."""
    latest_name = posixpath.basename(latest.path.rstrip("/"))
    candidates = [
        uri
        for uri in run_checkpoints(cfg)
        if posixpath.basename(posixpath.dirname(uri)) <= latest_name
    ]
    errors = []
    for uri in candidates:
        try:
            payload = ckpt_io.read_checkpoint(uri)
            ckpt_io.load_weights(model, payload["weights"], uri)
        except ckpt_io.CheckpointError as err:
            errors.append(str(err))
            if rank == 0:
                print(f"[{cfg['task']['name']}] resume: skipped {err}", flush=True)
            continue
        if rank == 0 and errors:
            print(f"[{cfg['task']['name']}] resume: from {uri}", flush=True)
        return payload
    raise ckpt_io.CheckpointError(
        f"run {cfg['run_name']}: no checkpoint loads ({'; '.join(errors) or 'none found'})"
    )


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (a list of one on a single worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _fault_hook(cfg: dict[str, Any], epoch: int, rank: int, world: int):  # noqa: ANN202
    """An ``on_step`` callback that raises once at ``train.fail_at`` (tests of recovery)."""
    fail_at = cfg["train"].get("fail_at")
    if not fail_at or int(fail_at["epoch"]) != epoch or rank != min(1, world - 1):
        return None
    marker = storage.join(run_dir(cfg), FAULT_MARKER)

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


def _max_workers(scaling: dict[str, Any]) -> int:
    value = scaling["num_workers"]
    return int(value[1]) if isinstance(value, list | tuple) else int(value)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one DiPro run on this worker's shards. ``config``: ``cfg`` (the resolved Hydra
    config as a dict), ``norm_stats``, ``class_weights`` and ``steps_per_epoch``."""
    cfg = config["cfg"]
    task, scaling, train_cfg = cfg["task"]["name"], cfg["scaling"], cfg["train"]
    monitor, mode = cfg["task"]["monitor"], cfg["task"]["monitor_mode"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(int(scaling["cpus_per_worker"]))
    torch.manual_seed(int(cfg["seed"]))
    device = ray.train.torch.get_device()

    model = ray.train.torch.prepare_model(build_model(cfg["model"], task))
    norm_stats = NormStats.from_dict(config["norm_stats"])
    class_weights = ClassWeights.from_dict(config["class_weights"])
    loss_fn = build_loss(task, cfg["loss"], class_weights)
    accumulation = elastic_accumulation(
        int(train_cfg["accumulation_steps"]), _max_workers(scaling), world
    )
    optimizer = build_optimizer(
        model, cfg["optim"], world_size=world, accumulation_steps=accumulation
    )
    max_epochs = int(train_cfg["max_epochs"])
    scheduler = build_scheduler(
        optimizer, cfg["optim"], max(1, max_epochs * int(config["steps_per_epoch"]))
    )

    amp = scaling.get("amp")
    use_fp16 = amp in ("fp16", "float16") and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_fp16 else None  # loss scale kept across epochs
    start_epoch, restored_from = 1, None
    monitored = BestMetric(mode)
    restored = ray.train.get_checkpoint()
    if restored is not None:
        payload = _restore(cfg, model, restored, rank)
        state = payload["training"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        restored_from = int(state["epoch"])
        monitored = BestMetric(mode, state["best_metric"], int(state["extra"]["bad_epochs"]))
        if state["extra"]["stopped"]:
            start_epoch = max_epochs + 1

    patience = train_cfg.get("patience")
    pin_memory = bool(scaling.get("pin_memory", False)) and device.type == "cuda"
    for epoch in range(start_epoch, max_epochs + 1):
        started = time.monotonic()
        stats = train_epoch(
            model,
            iter_batches(
                ray.train.get_dataset_shard("train"),
                batch_size=int(cfg["optim"]["batch_size"]),
                norm_stats=config["norm_stats"],
                shuffle_buffer=scaling.get("local_shuffle_buffer_size"),
                prefetch_batches=int(scaling.get("prefetch_batches", 1)),
                seed=stream_seed(cfg["seed"], epoch, rank),
                pin_memory=pin_memory,
            ),
            optimizer,
            loss_fn,
            device=device,
            scheduler=scheduler,
            accumulation_steps=accumulation,
            max_grad_norm=train_cfg.get("max_grad_norm"),
            amp_dtype=amp,
            scaler=scaler,
            max_steps=train_cfg.get("max_steps_per_epoch"),
            on_step=_fault_hook(cfg, epoch, rank, world),
        )
        train_seconds = time.monotonic() - started
        local_preds, local_losses = predict_with_loss(
            model,
            iter_batches(
                ray.train.get_dataset_shard("val"),
                batch_size=int(train_cfg["eval_batch_size"]),
                norm_stats=config["norm_stats"],
                shuffle_buffer=None,
                pin_memory=pin_memory,
            ),
            loss_fn,
            device=device,
            amp_dtype=amp,
        )
        gathered = _gather(
            (
                local_preds.to_arrays(),
                local_losses.get("loss", math.nan),
                len(local_preds),
                ray.get_runtime_context().get_node_id(),
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                stats.get("samples", 0),
            )
        )
        predictions = Predictions.concatenate([Predictions.from_arrays(g[0]) for g in gathered])
        rows = sum(g[2] for g in gathered)
        val_loss = sum(g[1] * g[2] for g in gathered if g[2]) / max(rows, 1)
        metrics = {f"val/{k}": v for k, v in compute_metrics(predictions).items()}
        metrics["val/loss"] = val_loss
        metrics.update({f"train/{k}": v for k, v in stats.items()})
        metrics["train/samples_per_s"] = sum(g[5] for g in gathered) / max(train_seconds, 1e-9)
        metrics["epoch"] = epoch
        metrics["epoch_seconds"] = time.monotonic() - started

        monitored.update(float(metrics[monitor]))
        stopped = monitored.exhausted(patience)
        metrics[f"best/{monitor}"] = monitored.best if monitored.best is not None else math.nan

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                ckpt_io.save_checkpoint(
                    Path(tmp) / CHECKPOINT_FILE,
                    model,
                    model_cfg=cfg["model"],
                    task=task,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    epoch=epoch,
                    best_metric=monitored.best,
                    norm_stats=norm_stats,
                    class_weights=class_weights,
                    extra={
                        "bad_epochs": monitored.bad_steps,
                        "stopped": stopped,
                        "metrics": metrics,
                    },
                )
                (Path(tmp) / RUN_CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
                append_log(
                    storage.join(run_dir(cfg), EPOCH_METRICS_FILE),
                    {
                        **metrics,
                        "task": task,
                        "worker_nodes": [g[3] for g in gathered],
                        "worker_max_rss_mb": [round(g[4], 1) for g in gathered],
                        "world_size": world,
                        "accumulation_steps": accumulation,
                        "restored_from_epoch": restored_from if epoch == start_epoch else None,
                    },
                    "epoch",
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if stopped:
            break
