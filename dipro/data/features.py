"""A "features" dataset from a "crops" dataset: every region crop through a frozen backbone.

Training in features mode (DIPRO_SPEC section 1) skips the backbone, which is what makes large
cohorts and CPU runs affordable. The records keep everything else; EHR normalisation statistics
and counts are recomputed by the shard writer exactly as for any dataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dipro import storage, vocab
from dipro.data.mimic.images import RegionFeatureExtractor
from dipro.data.shards import Manifest, list_shards, read_manifest, write_dataset


def _featurized(
    root: str | os.PathLike[str], task: str, extractor: RegionFeatureExtractor
) -> Iterator[dict[str, Any]]:
    R = vocab.NUM_REGIONS
    for split in vocab.SPLITS:
        for path in list_shards(root, task, split):
            fs, inner = storage.resolve_filesystem(path)
            for record in pq.read_table(inner, filesystem=fs, partitioning=None).to_pylist():
                T, S = len(record["cxr_times"]), int(record["crop_size"])
                crops = np.frombuffer(record["crops"], np.uint8).reshape(T, R, S, S)
                present = np.asarray(record["region_present"], bool).reshape(T, R)
                features = extractor(crops, present)  # [T, R, F]
                record.update(
                    crops=None,
                    crop_size=None,
                    features=features,
                    feature_dim=int(features.shape[-1]),
                )
                yield record


def featurize_dataset(
    src_root: str | os.PathLike[str],
    dst_root: str | os.PathLike[str],
    task: str,
    *,
    backbone: str = "resnet50",
    weights_path: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write ``{dst_root}/{task}`` in features mode from the crops dataset ``{src_root}/{task}``.

    ``backbone`` with weights from the local file ``weights_path`` (random weights when None:
    then the features are a fixed random projection of the crops).
    """
    source = read_manifest(src_root, task)
    if source.region_mode != "crops":
        raise ValueError(f"{src_root}/{task} stores {source.region_mode}, not crops")
    extractor = RegionFeatureExtractor(backbone, weights_path, device)
    generator = {
        **source.generator,
        "features": {"source": os.fspath(src_root), "backbone": backbone, "weights": weights_path},
    }
    return write_dataset(
        _featurized(src_root, task, extractor),
        dst_root,
        task,
        rows_per_file=source.rows_per_file,
        generator=generator,
        overwrite=overwrite,
    )
