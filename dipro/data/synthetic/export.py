"""The synthetic cohort as data: sample records (:func:`cohort_records`), MIMIC-CXR-style image
identifiers, Parquet datasets (:func:`write_synthetic_dataset`) and the dataset of a ``data``
config node, written once and then reused (:func:`ensure_synthetic_data`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from dipro import vocab
from dipro.config import ConfigError
from dipro.data.layout import Manifest, format_counts, read_manifest
from dipro.data.shard_writer import write_dataset
from dipro.data.synthetic.cohort import Cohort, SyntheticConfig
from dipro.data.synthetic.course import simulate_cohort

# Bump when a code change alters the generated data for the same config, so that datasets
# written by older code are recognised as different (dipro.data.synthetic.generator_info).
GENERATOR_VERSION: Final[int] = 6

_ID_STREAM: Final[int] = 0xD1C0  # second seed word of the CXR identifier stream


def cohort_records(cohort: Cohort, task: str) -> Iterator[dict[str, Any]]:
    """Sample records (dipro.data.schema) of ``task``, patient by patient.

    disease_progression: one record per consecutive CXR pair of a stay (T = 2) with the EHR
    hours between the two CXR times. mortality / length_of_stay: one record per stay with the
    CXRs of the first ``icu_window_hours`` (at least 2) and EHR hours 0 .. window-1.
    """
    if task not in vocab.TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {vocab.TASKS}")
    cfg = cohort.config
    dicom_ids, study_ids = cxr_identifiers(cohort)
    provenance = {"source": "synthetic", "source_version": f"generator {GENERATOR_VERSION}"}
    pair_of_cxr = np.full(cohort.cxr_times.shape[0], -1, np.int64)
    pair_of_cxr[cohort.pair_first] = np.arange(cohort.pair_first.shape[0])
    for i in range(cohort.num_patients):
        cxrs = np.arange(cohort.cxr_offsets[i], cohort.cxr_offsets[i + 1])
        common = {
            "subject_id": int(cohort.subject_id[i]),
            "stay_id": int(cohort.stay_id[i]),
            "hospital": int(cohort.hospital[i]),
            "split": str(cohort.split[i]),
            "task": task,
            "crop_size": cfg.crop_size,
            "demographics": cohort.demographics[i],
            **provenance,
        }
        if task == "disease_progression":
            for j, m in enumerate(cxrs[:-1]):
                t0, t1 = float(cohort.cxr_times[m]), float(cohort.cxr_times[m + 1])
                hours = np.arange(int(np.ceil(t0)), int(np.floor(t1)) + 1)
                q = pair_of_cxr[m]
                yield {
                    **common,
                    "sample_id": f"{task}-{cohort.stay_id[i]}-{j}",
                    **_cxr_fields(cohort, np.array([m, m + 1]), dicom_ids, study_ids),
                    **_ehr_fields(cohort, i, hours),
                    "region_labels": cohort.pair_region_labels[q : q + 1],
                    "progression": cohort.pair_progression[q],
                }
        else:
            early = cxrs[cohort.cxr_times[cxrs] < cfg.icu_window_hours]
            pairs = pair_of_cxr[early[:-1]]
            yield {
                **common,
                "sample_id": f"{task}-{cohort.stay_id[i]}",
                **_cxr_fields(cohort, early, dicom_ids, study_ids),
                **_ehr_fields(cohort, i, np.arange(cfg.icu_window_hours)),
                "region_labels": cohort.pair_region_labels[pairs],
                "mortality": int(cohort.mortality[i]),
                "los_days": float(cohort.los_days[i]),
            }


def cxr_identifiers(cohort: Cohort) -> tuple[np.ndarray, np.ndarray]:
    """MIMIC-CXR-style identifiers of every CXR of the cohort, [M] each: ``dicom_id`` (five
    dash-separated groups of 8 hex digits) and ``study_id`` (8 digits, increasing, one study per
    CXR). Drawn from a stream of their own (the cohort's seed), so the shards of the cohort and
    its raw MIMIC-format tree (``dipro.data.mimic.cohort_tree``) name the same images."""
    M = cohort.cxr_times.shape[0]
    rng = np.random.default_rng([cohort.config.seed, _ID_STREAM])
    words = rng.integers(0, 2**32, (M, 5))
    dicom_ids = np.array(["-".join(f"{int(w):08x}" for w in row) for row in words])
    study_ids = 50_000_000 + np.cumsum(rng.integers(1, 999, M))
    return dicom_ids, study_ids.astype(np.int64)


def _cxr_fields(
    cohort: Cohort, cxrs: np.ndarray, dicom_ids: np.ndarray, study_ids: np.ndarray
) -> dict[str, np.ndarray]:
    return {
        "cxr_times": cohort.cxr_times[cxrs],
        "crops": cohort.crops[cxrs],
        "region_present": cohort.region_present[cxrs],
        "dicom_ids": dicom_ids[cxrs],
        "study_ids": study_ids[cxrs],
    }


def _ehr_fields(cohort: Cohort, patient: int, hours: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "ehr_times": hours.astype(np.float32),
        "ehr_values": cohort.ehr_values[patient, hours],
        "ehr_observed": cohort.ehr_observed[patient, hours],
    }


def generator_info(cfg: SyntheticConfig) -> dict[str, Any]:
    """What the manifest records as the generator of a synthetic dataset."""
    return {"name": "synthetic", "version": GENERATOR_VERSION, **cfg.to_dict()}


def write_synthetic_dataset(
    cfg: SyntheticConfig,
    root: str | os.PathLike[str],
    *,
    tasks: tuple[str, ...] = vocab.TASKS,
    overwrite: bool = False,
) -> dict[str, Manifest]:
    """Simulate the cohort once and write each task's shards under ``{root}/{task}``.

    Returns each task's manifest by task name. Raises FileExistsError if a task's dataset exists
    and ``overwrite`` is False (datasets written before the error stay, each one whole).
    """
    cohort = simulate_cohort(cfg)
    return {
        task: write_dataset(
            cohort_records(cohort, task),
            root,
            task,
            rows_per_file=cfg.rows_per_file,
            generator=generator_info(cfg),
            overwrite=overwrite,
        )
        for task in tasks
    }


@dataclass(frozen=True)
class SyntheticData:
    """The synthetic dataset under ``root`` after :func:`ensure_synthetic_data`: the tasks that
    call wrote (empty when every task's dataset was there already) and each task's manifest."""

    root: Path
    written: tuple[str, ...]
    manifests: dict[str, Manifest]

    def describe(self, seconds: float) -> str:
        """What a command prints about it: where it is, whether it was written or reused, and
        its samples (and subjects) per task, split and hospital."""
        if self.written:
            state = f"wrote {', '.join(self.written)} in {seconds:.1f} s"
        else:
            state = "reused (written before with the same generator config)"
        return f"synthetic cohort under {self.root}: {state}\n{format_counts(self.manifests)}"


def ensure_synthetic_data(cfg: Mapping[str, Any]) -> SyntheticData:
    """Make sure the synthetic dataset of ``cfg`` (a ``data`` config node: ``root``,
    ``generator``, ``overwrite``) exists, writing only the tasks that are missing or stale.

    A task's dataset already there with the same generator config is reused, byte for byte. One
    written with another generator config (or generator version) is replaced when
    ``cfg.overwrite`` is true, else a FileExistsError says so. A generator setting out of range
    is a ConfigError.
    """
    root = Path(str(cfg["root"]))
    try:
        synth = SyntheticConfig.from_dict(cfg.get("generator"))
    except ValueError as err:
        raise ConfigError(f"data.generator: {err}") from err
    wanted = generator_info(synth)
    existing = {}
    for task in vocab.TASKS:
        try:
            existing[task] = read_manifest(root, task).generator
        except FileNotFoundError:
            continue
    stale = sorted(task for task, g in existing.items() if g != wanted)
    if stale and not cfg.get("overwrite", False):
        raise FileExistsError(
            f"the datasets {stale} under {root} were written with another generator config; "
            "set data.overwrite=true to replace them"
        )
    missing = tuple(task for task in vocab.TASKS if task not in existing or task in stale)
    if missing:
        write_synthetic_dataset(synth, root, tasks=missing, overwrite=bool(stale))
    manifests = {task: read_manifest(root, task) for task in vocab.TASKS}
    return SyntheticData(root, missing, manifests)
