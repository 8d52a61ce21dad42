"""Batch inference on Ray Data: ``python -m ray_jobs.predict checkpoint=PATH [overrides]``.

The records of ``split`` of a shard dataset (``data.root``, with its manifest), or every Parquet
file under a shard folder (``shards``, labels optional), are read with ``ray.data.read_parquet``
and scored by ``map_batches`` over a pool of ``actors`` model actors (CPU or GPU), each loading
the checkpoint once. Each actor validates its batches with the inference rules of
``dipro.data.schema``, pads them with the project's one collate and normalises them with the
statistics stored in the checkpoint (those of its training data; a federated model normalised
at each site: those of the scored dataset's training split), then turns the model's output
into prediction rows (``dipro.prediction``). The driver gathers the rows, sorts them by
``sample_id`` and writes ``{out_dir}/predictions.parquet`` and ``predictions.json`` (counts,
missing-input flags, throughput, checkpoint identity), each atomically; a rerun refuses an
existing ``out_dir`` unless ``overwrite=true``.

``explain=SAMPLE_ID`` writes ``{out_dir}/explain-{SAMPLE_ID}.png`` instead (no Ray): that
sample's region crops over time with each region's attention, and the predicted versus the
labelled outcome (``dipro.explain``).

The work is ``run_prediction(cfg)``; ``main`` only composes the config and calls it, so the same
command runs through ``ray job submit -- python -m ray_jobs.predict ...``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import posixpath
import time
from collections.abc import Mapping
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from omegaconf import DictConfig

from dipro import storage
from dipro.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    normalised_at_sites,
    read_checkpoint,
)
from dipro.config import exit_on, settings_of
from dipro.data.collate import collate
from dipro.data.layout import list_shards, read_manifest
from dipro.data.normalize import NormStats
from dipro.data.schema import VERSION_KEY, SchemaError, schema_version_of, upgrade, validate
from dipro.data.shard_reader import read_table
from dipro.engine import predict
from dipro.explain import write_explanation
from dipro.prediction import checkpoint_identity, prediction_table
from dipro.run_report import resolve_checkpoint, run_context
from dipro.settings import JobSettings
from ray_jobs.console import session
from ray_jobs.training import ensure_ray

PREDICTIONS_FILE = "predictions.parquet"
SUMMARY_FILE = "predictions.json"


class PredictionError(ValueError):
    """A prediction job that cannot run (no checkpoint, no records, an existing output, ...)."""


class PredictActor:
    """One model replica of the actor pool: ``__call__(pyarrow batch) -> prediction rows``."""

    def __init__(
        self,
        checkpoint: str,
        schema_version: int,
        identity: Mapping[str, str],
        device: str = "cpu",
        amp: str | None = None,
        norm_stats: Mapping[str, Any] | None = None,
    ) -> None:
        self.model, meta = load_checkpoint(checkpoint, map_location=device)
        self.meta = with_stats(meta, norm_stats)
        self.model.to(device)
        self.version = str(schema_version).encode()
        self.identity = dict(identity)
        self.device, self.amp = device, amp

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = sorted(set(batch.column("path").to_pylist()))
        source = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more)"
        table = batch.drop_columns(["path"])
        table = upgrade(table.replace_schema_metadata({VERSION_KEY: self.version}), source)
        validate(table, source, labels_required=False)
        check_records(table, self.meta.task, self.meta.model_cfg["region_mode"], source)
        columns = {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
        predictions = predict(
            self.model,
            [collate(columns, self.meta.norm_stats)],
            device=self.device,
            amp_dtype=self.amp,
        )
        return prediction_table(predictions, columns, self.identity)


def with_stats(meta: CheckpointMeta, norm_stats: Mapping[str, Any] | None) -> CheckpointMeta:
    """``meta`` normalising with ``norm_stats`` (``NormStats.to_dict``) when given."""
    if norm_stats is None:
        return meta
    return dataclasses.replace(meta, norm_stats=NormStats.from_dict(norm_stats))


def scoring_stats(
    checkpoint: str, payload: Mapping[str, Any], cfg: DictConfig, train_root: str | None
) -> dict[str, Any] | None:
    """None: the records are normalised with the checkpoint's statistics. A federated model
    normalised at each site carries none; it is scored as a site does, with the statistics of
    the scored dataset's training split (its manifest), so a folder of shards without one
    cannot be scored. ``payload``: the checkpoint's ``read_checkpoint`` dict."""
    if payload["training"].get("norm_stats") is not None:
        return None
    if not normalised_at_sites(payload):
        raise PredictionError(f"{checkpoint}: carries no normalisation statistics")
    root = cfg.data.root or train_root
    if cfg.shards or root is None:
        raise PredictionError(
            f"{checkpoint}: a federated model normalised at each site; score a shard dataset "
            "(data.root=...), whose manifest has the statistics of its training split, not "
            "a folder of shards"
        )
    return read_manifest(root, payload["task"]).norm_statistics().to_dict()


def check_records(table: pa.Table, task: str, region_mode: str, source: str) -> None:
    """Raise SchemaError when ``table``'s records are not of the model's task or region mode."""
    tasks = set(table.column("task").to_pylist())
    if tasks - {task}:
        raise SchemaError(
            f"records of task {sorted(tasks - {task})} for a {task!r} model",
            source=source,
            field="task",
        )
    if table.column(region_mode).null_count:
        other = "features" if region_mode == "crops" else "crops"
        raise SchemaError(
            f"the records hold {other}; the model reads {region_mode}",
            source=source,
            field=region_mode,
        )


def input_paths(cfg: DictConfig, task: str, train_root: str | None) -> tuple[list[str], str]:
    """The shard files to score and a short name of them (for the default output folder)."""
    if cfg.shards:
        folder = os.fspath(cfg.shards)
        fs, base = storage.resolve_filesystem(folder)
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        found = sorted(
            info.path
            for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.endswith(".parquet")
        )
        prefix = folder[: len(folder) - len(base)] if storage.is_remote(folder) else ""
        paths = [prefix + p for p in found]
        if not paths:
            raise PredictionError(f"shards={folder!r}: no .parquet files there")
        return paths, posixpath.basename(base.rstrip("/")) or "shards"
    root = cfg.data.root or train_root
    if root is None:
        raise PredictionError("no data.root or shards given, and no run config to take them from")
    try:
        paths = list_shards(root, task, cfg.split)
    except FileNotFoundError as err:
        raise PredictionError(str(err)) from err
    if not paths:
        raise PredictionError(f"the {task} dataset under {root} has no {cfg.split} shards")
    return paths, str(cfg.split)


def dataset_version(paths: list[str]) -> int:
    """The one schema version of the shard files (read from their footers)."""
    versions: dict[int, str] = {}
    for path in paths:
        fs, inner = storage.resolve_filesystem(path)
        try:
            schema = pq.read_schema(inner, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as err:
            raise SchemaError(f"cannot read shard: {err}", source=path) from err
        versions.setdefault(schema_version_of(schema, path), path)
    if len(versions) > 1:
        shown = ", ".join(f"version {v} ({p})" for v, p in sorted(versions.items()))
        raise PredictionError(f"the shards mix schema versions: {shown}; rewrite them as one")
    return next(iter(versions))


def _out_dir(cfg: DictConfig, checkpoint: str, run_dir: str | None, name: str) -> str:
    if cfg.out_dir:
        return os.fspath(cfg.out_dir)
    return storage.join(run_dir or posixpath.dirname(checkpoint), f"predictions-{name}")


def run_prediction(cfg: DictConfig) -> str:
    """Score the configured records with ``cfg.checkpoint``; returns the file written
    (``predictions.parquet``, or the explanation PNG with ``cfg.explain``)."""
    try:
        checkpoint = resolve_checkpoint(cfg.checkpoint)
        payload = read_checkpoint(checkpoint)
    except (CheckpointError, ValueError) as err:
        raise PredictionError(str(err)) from err
    task = payload["task"]
    context = run_context(checkpoint)
    train_root = (context.config or {}).get("data", {}).get("root")
    paths, name = input_paths(cfg, task, train_root)
    stats = scoring_stats(checkpoint, payload, cfg, train_root)
    out_dir = _out_dir(cfg, checkpoint, context.run_dir, name)
    if cfg.explain is not None:
        return explain(
            checkpoint, paths, str(cfg.explain), out_dir, device=str(cfg.device), norm_stats=stats
        )
    target = storage.join(out_dir, PREDICTIONS_FILE)
    if storage.exists(target) and not cfg.overwrite:
        raise PredictionError(f"{target} exists; pass overwrite=true to replace it")
    version = dataset_version(paths)
    identity = checkpoint_identity(checkpoint)
    job = settings_of(JobSettings, cfg)
    ensure_ray(job, local_num_cpus(cfg, job))
    table, seconds = score(cfg, checkpoint, paths, version, identity, stats)
    _write_parquet(target, table)
    summary = {
        "rows": table.num_rows,
        "task": task,
        "inputs": paths,
        "schema_version": version,
        "missing_ehr": int(np.sum(table.column("missing_ehr").to_numpy())),
        "single_cxr": int(np.sum(table.column("single_cxr").to_numpy())),
        "actors": int(cfg.actors),
        "batch_size": int(cfg.batch_size),
        "device": str(cfg.device),
        "seconds": seconds,
        "samples_per_second": table.num_rows / seconds if seconds > 0 else None,
        **identity,
    }
    storage.write_bytes_atomic(
        storage.join(out_dir, SUMMARY_FILE), (json.dumps(summary, indent=2) + "\n").encode()
    )
    return target


def local_num_cpus(cfg: DictConfig, job: JobSettings) -> int:
    """Logical CPUs of an in-process Ray for predict: ``ray_num_cpus``, else all cores but at
    least the model actors' CPUs plus one for the read tasks (two one-CPU actors on a two-CPU
    Ray would leave the reads none, and the job would wait forever)."""
    if job.ray_num_cpus:
        return job.ray_num_cpus
    actors = math.ceil(int(cfg.actors) * float(cfg.num_cpus_per_actor))
    return max(os.cpu_count() or 1, actors + 1)


def score(
    cfg: DictConfig,
    checkpoint: str,
    paths: list[str],
    version: int,
    identity: Mapping[str, str],
    norm_stats: Mapping[str, Any] | None = None,
) -> tuple[pa.Table, float]:
    """The prediction rows of every record of ``paths``, sorted by sample_id, and the seconds
    the pipeline took (read, score and gather)."""
    import ray.data

    start = time.perf_counter()
    ds = ray.data.read_parquet(paths, partitioning=None, include_paths=True)
    rows = ds.map_batches(
        PredictActor,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "schema_version": version,
            "identity": dict(identity),
            "device": str(cfg.device),
            "amp": cfg.amp,
            "norm_stats": norm_stats,
        },
        batch_size=int(cfg.batch_size),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=int(cfg.actors)),
        num_cpus=float(cfg.num_cpus_per_actor),
        num_gpus=float(cfg.num_gpus_per_actor),
    )
    parts = list(rows.iter_batches(batch_format="pyarrow", batch_size=None))
    seconds = time.perf_counter() - start
    if not parts:
        raise PredictionError(f"no records in {paths[0]} and the other {len(paths) - 1} files")
    table = pa.concat_tables(parts)
    return table.sort_by("sample_id"), seconds


def _write_parquet(target: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes_atomic(target, buffer.getvalue())


def explain(
    checkpoint: str,
    paths: list[str],
    sample_id: str,
    out_dir: str,
    *,
    device: str = "cpu",
    norm_stats: Mapping[str, Any] | None = None,
) -> str:
    """Write ``{out_dir}/explain-{sample_id}.png`` for one record of ``paths``; returns it."""
    if storage.is_remote(out_dir):
        raise PredictionError(f"out_dir={out_dir!r}: explanations are written locally")
    record = find_record(paths, sample_id)
    model, meta = load_checkpoint(checkpoint, map_location=device)
    target = os.path.join(out_dir, f"explain-{sample_id}.png")
    write_explanation(model, with_stats(meta, norm_stats), record, target, device=device)
    return target


def find_record(paths: list[str], sample_id: str) -> dict[str, Any]:
    """The record ``sample_id`` of the shards ``paths`` as numpy columns of one row."""
    for path in paths:
        table = read_table([path], labels_required=False)
        hits = table.filter(pc.equal(table.column("sample_id"), sample_id))
        if hits.num_rows:
            return {n: hits.column(n).to_numpy(zero_copy_only=False) for n in hits.column_names}
    raise PredictionError(f"no record with sample_id={sample_id!r} in {len(paths)} shard files")


@hydra.main(config_path="../configs", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    outputs = str(cfg.out_dir or "beside the checkpoint's run (predictions-{split or folder})")
    with exit_on({(PredictionError, SchemaError): "prediction"}), session(cfg, "predict", outputs):
        path = run_prediction(cfg)
    print(f"written {path}")


if __name__ == "__main__":
    main()
