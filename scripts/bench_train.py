"""Throughput and memory of the Ray training path, side by side in one run (not a test).

Prints, for the synthetic cohort at 1x and 4x its size:
- Ray Data: samples/s from shards through the project's collate (no model);
- Ray Train: training samples/s with 1 and 2 workers, per region mode (crops, features);
- peak memory (max RSS) of the driver and of each training worker at 1x and 4x data: streaming
  keeps both flat as the data grows.

    python scripts/bench_train.py --patients 120 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import ray
from hydra import compose, initialize_config_dir

from dipro.data.features import featurize_dataset
from dipro.data.layout import Dataset, read_manifest
from dipro.data.synthetic import SyntheticConfig, write_synthetic_dataset
from dipro.runs import EPOCH_METRICS_FILE
from ray_jobs.data import iter_batches, read_split
from ray_jobs.training import run_training

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASK = "disease_progression"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def data_pipeline(root: Path, mode: str, batch_size: int) -> float:
    """Samples per second of Ray Data reading the training split through the collate."""
    data = Dataset.open(root, TASK)
    norm = data.manifest.norm_stats
    dataset = read_split(data, "train", mode)
    start, rows = time.perf_counter(), 0
    for batch in iter_batches(
        dataset.iterator(), batch_size=batch_size, norm_stats=norm, shuffle_buffer=None
    ):
        rows += batch.size
    return rows / (time.perf_counter() - start)


def train(root: Path, runs: Path, mode: str, workers: int, epochs: int, name: str) -> dict:
    overrides = [
        f"task={TASK}",
        "+experiment=demo",
        f"data.root={root}",
        f"storage_path={runs}",
        f"run_name={name}",
        f"model.region_mode={mode}",
        f"scaling.num_workers={workers}",
        f"train.max_epochs={epochs}",
        "train.evaluate_test=false",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run_training(cfg)
    lines = (runs / name / EPOCH_METRICS_FILE).read_text().splitlines()
    last = json.loads(lines[-1])  # the last epoch: start-up costs are behind it
    return {
        "samples_per_s": last["train/samples"] * workers / last["epoch_seconds"],
        "worker_rss_mb": max(last["worker_max_rss_mb"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=120, help="cohort size at 1x")
    parser.add_argument("--crop-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["crops", "features"])
    parser.add_argument("--backbone", default="resnet18", help="frozen extractor for features")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dipro-bench-"))
    roots = {}
    for scale in (1, 4):
        crops = work / f"crops-{scale}x"
        cfg = SyntheticConfig(seed=7, num_patients=args.patients * scale, crop_size=args.crop_size)
        write_synthetic_dataset(cfg, crops, tasks=(TASK,))
        roots[("crops", scale)] = crops
        if "features" in args.modes:
            features = work / f"features-{scale}x"
            featurize_dataset(crops, features, TASK, backbone=args.backbone, device="cpu")
            roots[("features", scale)] = features
    n1 = read_manifest(roots[("crops", 1)], TASK).num_samples("train")
    print(f"{TASK}: {n1} training samples at 1x, crops {args.crop_size}px, data under {work}")

    ray.init()
    rows = []
    for mode in args.modes:
        pipe = data_pipeline(roots[(mode, 1)], mode, args.batch_size)
        for workers in args.workers:
            result = train(
                roots[(mode, 1)], work / "runs", mode, workers, args.epochs, f"{mode}-{workers}w"
            )
            rows.append((mode, workers, pipe, result["samples_per_s"], result["worker_rss_mb"]))
    print(
        f"\n{'mode':<9} {'workers':>7} {'Ray Data samples/s':>19} {'train samples/s':>16} "
        f"{'worker max RSS MiB':>19}"
    )
    for mode, workers, pipe, sps, rss in rows:
        print(f"{mode:<9} {workers:>7} {pipe:>19.1f} {sps:>16.1f} {rss:>19.0f}")

    print(f"\nmemory as the data grows (crops, {max(args.workers)} workers)")
    header = ("data", "train samples", "driver max RSS MiB", "worker max RSS MiB")
    print(f"{header[0]:<5} {header[1]:>13} {header[2]:>19} {header[3]:>19}")
    for scale in (1, 4):
        root = roots[("crops", scale)]
        result = train(
            root, work / "runs", "crops", max(args.workers), args.epochs, f"memory-{scale}x"
        )
        n = read_manifest(root, TASK).num_samples("train")
        print(f"{scale}x{'':<3} {n:>13} {_rss_mb():>19.0f} {result['worker_rss_mb']:>19.0f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
