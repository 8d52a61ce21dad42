"""Raw MIMIC tree -> Parquet shards of the three tasks, with Ray Data for the pixels.

Passes, each shown with progress:
1. cohort rules, labels and hourly EHR (``dipro.data.mimic.build.prepare_samples``); chartevents
   is streamed once, pre-filtered by itemid and stay;
2. region crops: every full-size JPEG that a sample needs is decoded once and all its regions
   cut and resized, in parallel (``ray.data.from_items`` of paths + ``map_batches`` over a task
   pool); in "features" mode a frozen backbone then runs in a ``map_batches`` stage over an
   actor pool (GPUs from config). The result is cached under ``{output_root}/_cache/`` as .npy
   arrays indexed by dicom id and reused by later runs with the same settings;
3. shards: records sorted by sample id, written by ``dipro.data.shard_writer.write_dataset`` under
   ``{output_root}/{task}/split=S/hospital=H/part-*.parquet`` with a manifest (counts per split
   and hospital, checksums, normalisation statistics fitted on the training split only). The
   manifest's ``generator`` entry carries the cohort counts at every filter stage and the ids
   of skipped images and scene graphs.

The raw files are only read. The same inputs and config give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from dipro import vocab
from dipro.config import PREPROCESS_SCHEMA, validate
from dipro.data.features import RegionFeatureExtractor
from dipro.data.layout import Manifest
from dipro.data.mimic.build import (
    PreparedCohort,
    RawPaths,
    SampleSpec,
    mimic_provenance,
    prepare_samples,
)
from dipro.data.mimic.cohort import CohortRules
from dipro.data.mimic.images import crop_regions
from dipro.data.mimic.readers import RawDataError
from dipro.data.shard_writer import write_dataset
from ray_jobs.console import Progress
from ray_jobs.ray_startup import set_dashboard_timeouts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionSettings:
    """How region inputs are made (``regions`` in configs/preprocess.yaml)."""

    mode: str = "crops"
    crop_size: int = 224
    batch_size: int = 8
    num_workers: int | None = None
    backbone: str = "resnet50"
    weights_path: str | None = None
    num_actors: int = 1
    num_gpus: float = 0.0
    feature_batch_size: int = 8

    def cache_key(self) -> str:
        parts = [self.mode, f"S{self.crop_size}"]
        if self.mode == "features":
            weights = Path(self.weights_path).name if self.weights_path else "random"
            parts += [self.backbone, weights]
        return "-".join(parts)


class _CropBatch:
    """map_batches UDF: decode each JPEG once, crop and resize all its regions.

    An image that cannot be decoded or cropped is not raised here (Ray would bury it in a remote
    traceback): its crops are blank and its ``error`` says why; the driver raises on it."""

    def __init__(self, crop_size: int) -> None:
        self.crop_size = crop_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        crops, present, errors = [], [], []
        blank = np.zeros((vocab.NUM_REGIONS, self.crop_size, self.crop_size), np.uint8)
        for path, boxes, rows, cols in zip(
            batch["path"], batch["boxes"], batch["rows"], batch["columns"], strict=True
        ):
            try:
                c, p = crop_regions(
                    Path(path).read_bytes(),
                    json.loads(boxes),
                    self.crop_size,
                    int(rows),
                    int(cols),
                )
                error = ""
            except (OSError, ValueError) as err:
                c, p = blank, np.zeros(vocab.NUM_REGIONS, np.bool_)
                error = " ".join(str(err).split()) or type(err).__name__
            crops.append(c)
            present.append(p)
            errors.append(error)
        return {
            "index": batch["index"],
            "values": np.stack(crops),
            "present": np.stack(present),
            "error": np.array(errors, dtype=object),
        }


class _FeatureBatch:
    """map_batches actor UDF: frozen backbone over the crops of a batch of images."""

    def __init__(self, backbone: str, weights_path: str | None) -> None:
        self.extractor = RegionFeatureExtractor(backbone, weights_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats = self.extractor(batch["values"], batch["present"])
        return {
            "index": batch["index"],
            "values": feats,
            "present": batch["present"],
            "error": batch["error"],
        }


@dataclass
class RegionCache:
    """Region crops [N, R, S, S] uint8 or features [N, R, F] float32 and presence [N, R]."""

    index: dict[str, int]
    values: np.ndarray
    present: np.ndarray

    def region_fields(self, dicom_ids: list[str], settings: RegionSettings) -> dict[str, Any]:
        rows = [self.index[d] for d in dicom_ids]
        values = np.asarray(self.values[rows])
        present = np.asarray(self.present[rows])
        if settings.mode == "crops":
            return {
                "crop_size": settings.crop_size,
                "crops": values,
                "feature_dim": None,
                "features": None,
                "region_present": present,
            }
        return {
            "crop_size": None,
            "crops": None,
            "feature_dim": int(values.shape[-1]),
            "features": values,
            "region_present": present,
        }


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path, Path]:
    return (
        cache_dir / f"{key}.values.npy",
        cache_dir / f"{key}.present.npy",
        cache_dir / f"{key}.index.json",
    )


def _items_digest(items: pd.DataFrame, boxes: dict[str, dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in items.itertuples(index=False):
        digest.update(f"{row.dicom_id}|{row.path}|{row.Rows}|{row.Columns}|".encode())
        digest.update(json.dumps(boxes[row.dicom_id], sort_keys=True).encode())
    return digest.hexdigest()


def build_region_cache(
    prepared: PreparedCohort,
    settings: RegionSettings,
    cache_dir: Path,
) -> RegionCache:
    """Compute (or reuse) the region crops/features of every CXR the samples need, with Ray Data.

    The cache is reused when its index lists the same images, paths and boxes; it is written
    under temporary names and renamed into place when complete.
    """
    import ray

    items = prepared.images.sort_values("dicom_id").reset_index(drop=True)
    key = settings.cache_key()
    values_path, present_path, index_path = _cache_paths(cache_dir, key)
    digest = _items_digest(items, prepared.boxes)
    if index_path.is_file() and values_path.is_file() and present_path.is_file():
        meta = json.loads(index_path.read_text())
        if meta.get("digest") == digest:
            log.info("region cache %s reused (%d images)", key, len(meta["dicom_ids"]))
            return RegionCache(
                {d: i for i, d in enumerate(meta["dicom_ids"])},
                np.load(values_path, mmap_mode="r"),
                np.load(present_path, mmap_mode="r"),
            )
    cache_dir.mkdir(parents=True, exist_ok=True)
    n, R, S = len(items), vocab.NUM_REGIONS, settings.crop_size
    rows = [
        {
            "index": i,
            "path": row.path,
            "rows": int(row.Rows),
            "columns": int(row.Columns),
            "boxes": json.dumps(prepared.boxes[row.dicom_id]),
        }
        for i, row in enumerate(items.itertuples(index=False))
    ]
    workers = settings.num_workers or max(1, int(ray.available_resources().get("CPU", 1)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(n, 4 * workers)))
    ds = ds.map_batches(
        _CropBatch,
        fn_constructor_kwargs={"crop_size": S},
        batch_size=settings.batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    if settings.mode == "features":
        ds = ds.map_batches(
            _FeatureBatch,
            fn_constructor_kwargs={
                "backbone": settings.backbone,
                "weights_path": settings.weights_path,
            },
            batch_size=settings.feature_batch_size,
            compute=ray.data.ActorPoolStrategy(size=settings.num_actors),
            num_gpus=settings.num_gpus or None,
        )
    tmp = {p: p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in (values_path, present_path)}
    values = present = None
    done = 0
    progress = Progress(f"region {settings.mode} pass: images", n)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        failed = [(int(i), e) for i, e in zip(batch["index"], batch["error"], strict=True) if e]
        if failed:
            for temp in tmp.values():
                temp.unlink(missing_ok=True)
            row = items.iloc[failed[0][0]]
            raise RawDataError(
                f"cannot decode or crop the image ({failed[0][1]})",
                path=row.path,
                record=f"dicom_id={row.dicom_id}",
                field="JPEG",
            )
        if values is None:
            shape = (n, *batch["values"].shape[1:])
            values = np.lib.format.open_memmap(tmp[values_path], "w+", batch["values"].dtype, shape)
            present = np.lib.format.open_memmap(tmp[present_path], "w+", np.bool_, (n, R))
        assert present is not None
        idx = batch["index"].astype(np.int64)
        values[idx] = batch["values"]
        present[idx] = batch["present"]
        done += idx.size
        progress.step(idx.size)
    if values is None or present is None or done != n:
        raise RuntimeError(f"region pass returned {done} of {n} images")
    values.flush()
    present.flush()
    del values, present
    for final, temp in tmp.items():
        os.replace(temp, final)
    index_tmp = index_path.with_name(f".{index_path.name}.{os.getpid()}.tmp")
    index_tmp.write_text(json.dumps({"digest": digest, "dicom_ids": items["dicom_id"].tolist()}))
    os.replace(index_tmp, index_path)
    return RegionCache(
        {d: i for i, d in enumerate(items["dicom_id"])},
        np.load(values_path, mmap_mode="r"),
        np.load(present_path, mmap_mode="r"),
    )


def _records(
    specs: list[SampleSpec],
    cache: RegionCache,
    settings: RegionSettings,
    provenance: dict[str, str],
) -> Iterator[dict[str, Any]]:
    for spec in sorted(specs, key=lambda s: s.record["sample_id"]):
        yield {**spec.record, **provenance, **cache.region_fields(spec.dicom_ids, settings)}


def run_preprocess(cfg: DictConfig) -> dict[str, Manifest]:
    """Turn the raw tree named by ``cfg.raw`` into shards under ``cfg.output_root``.

    Returns each task's manifest. Starts Ray in-process (``cfg.ray``) unless already running.
    The settings (``dipro.config.PREPROCESS_SCHEMA``: ConfigError) and the raw roots are checked
    before any work. A raw file that cannot be read raises RawDataError naming the file, the
    record and the field (an image that fails in the Ray Data stage included).
    """
    import ray

    validate(cfg, PREPROCESS_SCHEMA)
    paths = RawPaths.from_dict(cfg.raw)
    paths.check()
    rules = CohortRules(**OmegaConf.to_container(cfg.cohort, resolve=True))
    settings = RegionSettings(**OmegaConf.to_container(cfg.regions, resolve=True))
    provenance = mimic_provenance(OmegaConf.to_container(cfg.raw.versions, resolve=True))
    tasks = list(cfg.tasks)
    output_root = Path(cfg.output_root)
    existing = [t for t in tasks if (output_root / t / "manifest.json").exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(
            f"{output_root} already holds the {existing} datasets; pass overwrite=true to "
            "replace them"
        )
    prepared = prepare_samples(
        paths,
        rules,
        seed=int(cfg.seed),
        num_hospitals=int(cfg.hospitals.num),
        hospital_rule=str(cfg.hospitals.rule),
        chunk_bytes=int(cfg.ehr.chunk_mb) << 20,
    )
    if not ray.is_initialized():
        set_dashboard_timeouts()
        ray.init(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, include_dashboard=False)
    cache = build_region_cache(prepared, settings, output_root / "_cache")
    generator = {
        "name": "mimic",
        "versions": provenance["source_version"],
        "cohort_counts": prepared.counts.stages,
        "missing_images": prepared.counts.missing_images,
        "missing_scene_graphs": prepared.counts.missing_scene_graphs,
        "gold_subjects_in_cohort": prepared.extra["gold_subjects_in_cohort"],
        "hospital_rule": str(cfg.hospitals.rule),
        "num_hospitals": int(cfg.hospitals.num),
        "seed": int(cfg.seed),
        "cohort_rules": asdict(rules),
        "regions": asdict(settings),
    }
    manifests = {}
    for task in tasks:
        manifests[task] = write_dataset(
            _records(prepared.samples[task], cache, settings, provenance),
            output_root,
            task,
            rows_per_file=int(cfg.rows_per_file),
            generator=generator,
            overwrite=bool(cfg.overwrite),
        )
        log.info("%s: %s", task, manifests[task].counts)
    return manifests
