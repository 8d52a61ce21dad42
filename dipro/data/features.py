"""A "features" dataset from a "crops" dataset: every region crop through a frozen backbone.

Training in features mode (docs/model.md, "Region features") skips the backbone, which is what
makes large cohorts and CPU runs affordable. This is the one place on the data side that uses the
model (its backbone, frozen). The records keep everything else; EHR normalisation statistics
and counts are recomputed by the shard writer exactly as for any dataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dipro import vocab
from dipro.data.layout import Manifest, list_shards, read_manifest
from dipro.data.shard_reader import read_table
from dipro.data.shard_writer import write_dataset
from dipro.model.regions import BACKBONES, CropBackbone, build_backbone


class RegionFeatureExtractor:
    """Frozen backbone over region crops: [N, R, S, S] uint8 -> [N, R, F] float32.

    The same backbone and pixel normalisation as the model's crops mode
    (``dipro.model.regions.CropBackbone``), so stored features and end-to-end crops agree; the
    backbone keeps a seeded random initialisation without ``weights_path``. Absent regions
    (present False) get zero features.
    """

    def __init__(
        self,
        backbone: str,
        weights_path: str | None = None,
        device: str | None = None,
        chunk: int = 64,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(0)
        self.model = CropBackbone(build_backbone(backbone, weights_path)).to(self.device).eval()
        self.model.requires_grad_(False)
        self.dim = BACKBONES[backbone]
        self.chunk = chunk

    @torch.no_grad()
    def __call__(self, crops: np.ndarray, present: np.ndarray) -> np.ndarray:
        n, r, s, _ = crops.shape
        flat = torch.from_numpy(np.array(crops, np.uint8).reshape(n * r, s, s))  # a writable copy
        out = [
            self.model(flat[start : start + self.chunk].to(self.device)).float().cpu()
            for start in range(0, n * r, self.chunk)
        ]
        feats = torch.cat(out).numpy().reshape(n, r, self.dim)
        feats[~present.astype(bool)] = 0.0
        return feats.astype(np.float32)


def _featurized(
    root: str | os.PathLike[str], task: str, extractor: RegionFeatureExtractor
) -> Iterator[dict[str, Any]]:
    R = vocab.NUM_REGIONS
    for split in vocab.SPLITS:
        for path in list_shards(root, task, split):
            for record in read_table([path]).to_pylist():  # validated, as every reader
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


def _features_generator(
    source: Manifest, src_root: str | os.PathLike[str], backbone: str, weights_path: str | None
) -> dict[str, Any]:
    """The features dataset's provenance: the source's, plus where its features came from (the
    source dataset by root and shard digest, the backbone and its weights)."""
    features = {
        "source": os.fspath(src_root),
        "source_sha256": source.files_digest(),
        "backbone": backbone,
        "weights": weights_path,
    }
    return {**source.generator, "features": features}


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
    generator = _features_generator(source, src_root, backbone, weights_path)
    return write_dataset(
        _featurized(src_root, task, extractor),
        dst_root,
        task,
        rows_per_file=source.rows_per_file,
        generator=generator,
        overwrite=overwrite,
    )


def ensure_features(
    src_root: str | os.PathLike[str],
    dst_root: str | os.PathLike[str],
    task: str,
    *,
    backbone: str,
    weights_path: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """``featurize_dataset`` unless ``{dst_root}/{task}`` already holds the features of this
    source dataset and backbone; returns the features dataset's manifest.

    Features of another source dataset (its generator or shards changed) or of another backbone
    are replaced when ``overwrite`` is true, else a FileExistsError says which.
    """
    wanted = _features_generator(read_manifest(src_root, task), src_root, backbone, weights_path)
    try:
        existing = read_manifest(dst_root, task)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if existing.generator == wanted:
            return existing
        if not overwrite:
            raise FileExistsError(
                f"{dst_root}/{task} holds features of another source dataset or backbone than "
                f"{src_root}/{task} with {backbone}; set data.overwrite=true to replace them"
            )
    return featurize_dataset(
        src_root,
        dst_root,
        task,
        backbone=backbone,
        weights_path=weights_path,
        device=device,
        overwrite=existing is not None,
    )
