"""The main demo job: `python -m ray_jobs.demo [overrides]` (what `make demo` runs).

Generates the default synthetic cohort under ``data.root`` (configs/data/synthetic.yaml) when it
is absent and prints the samples written per task, split and hospital.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from dipro import vocab
from dipro.data.shards import Manifest, read_manifest
from dipro.data.synthetic import SyntheticConfig, generator_info, write_synthetic_dataset


def ensure_synthetic_data(cfg: Mapping[str, Any]) -> Path:
    """Make sure the synthetic dataset of ``cfg`` (the ``data`` config node) exists; return its
    root.

    A dataset already there with the same generator config is reused. One written with another
    generator config is replaced when ``cfg.overwrite`` is true, else a FileExistsError says so.
    """
    root = Path(str(cfg["root"]))
    generator = cfg.get("generator") or {}
    if isinstance(generator, DictConfig):
        generator = OmegaConf.to_container(generator, resolve=True)
    synth = SyntheticConfig.from_mapping(generator)
    wanted = generator_info(synth)
    existing = {}
    for task in vocab.TASKS:
        try:
            existing[task] = read_manifest(root, task).generator
        except FileNotFoundError:
            continue
    if len(existing) == len(vocab.TASKS) and all(g == wanted for g in existing.values()):
        return root
    stale = sorted(task for task, g in existing.items() if g != wanted)
    if stale and not cfg.get("overwrite", False):
        raise FileExistsError(
            f"the datasets {stale} under {root} were written with another generator config; "
            "set data.overwrite=true to replace them"
        )
    missing = tuple(task for task in vocab.TASKS if task not in existing or task in stale)
    write_synthetic_dataset(synth, root, tasks=missing, overwrite=bool(stale))
    return root


def format_counts(manifests: Mapping[str, Manifest]) -> str:
    """A table of samples (and subjects) per task, split and hospital."""
    hospitals = sorted({h for m in manifests.values() for h in m.hospitals})
    header = f"{'task':<20} {'split':<6} " + " ".join(f"{'h' + str(h):>6}" for h in hospitals)
    lines = [header + f" {'total':>7} {'subjects':>8}"]
    for task, manifest in manifests.items():
        for split in vocab.SPLITS:
            per = manifest.counts.get(split, {})
            cells = " ".join(f"{per.get(str(h), 0):>6}" for h in hospitals)
            subjects = sum(manifest.subjects.get(split, {}).values())
            lines.append(
                f"{task:<20} {split:<6} {cells} {manifest.num_samples(split):>7} {subjects:>8}"
            )
    return "\n".join(lines)


def run_demo(cfg: Mapping[str, Any]) -> dict[str, Manifest]:
    """Ensure the synthetic data exists and print what is there; returns the manifests."""
    start = time.perf_counter()
    root = ensure_synthetic_data(cfg)
    seconds = time.perf_counter() - start
    manifests = {task: read_manifest(root, task) for task in vocab.TASKS}
    print(f"synthetic cohort under {root} (ready in {seconds:.1f} s)")
    print(format_counts(manifests))
    return manifests


@hydra.main(config_path="../configs/data", config_name="synthetic", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_demo(cfg)


if __name__ == "__main__":
    main()
