"""Read-path throughput: the plain pyarrow reader vs the Ray Data path, through the one collate.

Builds the synthetic cohort's progression shards at ``--crop-size`` (1x: ``--patients``, and 4x
that), then, each reader in a process of its own, reads the training split ``--epochs`` times
through ``dipro.data.collate`` (no model). The Ray Data path is read twice: in the order that
training reads by default (``deterministic``: blocks kept in order, the file order drawn from a
seed per epoch) and in free order (``free``: an unseeded file shuffle, blocks as they finish,
``train.deterministic=false``). Per reader and data size it prints:

- steady-state samples/s: rows after each epoch's first batch over the time after it;
- time to first batch of the first epoch and of the later ones;
- peak RSS of the reading process (the one that consumes the batches).

The last two lines are ``plain=<samples/s> ray=<samples/s> ratio=<ray/plain>`` (the
deterministic Ray path) and ``deterministic=<samples/s> free=<samples/s> ratio=<det/free>``
(steady state, 1x).
Not a test: numbers depend on the machine and its load.

    python scripts/bench_data.py --crop-size 224
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

TASK = "disease_progression"
READERS = ("plain", "ray", "ray-free")  # "ray": the deterministic order training reads in


def _reader(reader: str, root: str, batch_size: int, prefetch: int) -> Callable[[], Iterator]:
    """A function that starts one epoch of ``reader`` over the training split of ``root``; its
    set-up (imports, checksums, Ray start-up) is done here, outside the timings."""
    from dipro.data.layout import Dataset
    from dipro.data.shard_reader import read_batches, verify_shards

    data = Dataset.open(root, TASK)
    manifest = data.manifest
    paths = data.shards("train")
    verify_shards(data, paths)  # once per run, as training does
    if reader == "plain":
        stats = manifest.norm_statistics()
        return lambda: read_batches(paths, batch_size, "crops", stats)
    import ray

    from ray_jobs.data import iter_batches, read_split

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    deterministic = reader == "ray"
    dataset = read_split(data, "train", "crops", seed=0 if deterministic else None)
    dataset.context.execution_options.preserve_order = deterministic
    iterator = dataset.iterator()
    return lambda: iter_batches(
        iterator,
        batch_size=batch_size,
        norm_stats=manifest.norm_stats,
        shuffle_buffer=None,
        prefetch_batches=prefetch,
    )


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(reader: str, root: str, epochs: int, batch_size: int, prefetch: int) -> dict:
    """Read ``epochs`` passes with ``reader``; the numbers of the module docstring."""
    first_batch, rows_after, seconds_after = [], 0, 0.0
    epoch = _reader(reader, root, batch_size, prefetch)
    for _ in range(epochs):
        start = time.perf_counter()
        batches = iter(epoch())
        next(batches)
        ready = time.perf_counter()
        first_batch.append(ready - start)
        rows_after += sum(b.size for b in batches)
        seconds_after += time.perf_counter() - ready
    return {
        "samples_per_s": rows_after / seconds_after,
        "first_batch_s": first_batch[0],
        "later_first_batch_s": sum(first_batch[1:]) / max(1, len(first_batch) - 1),
        "peak_rss_mb": _peak_rss_mb(),
    }


def build(root: Path, patients: int, crop_size: int) -> Path:
    """The progression shards of a ``patients`` cohort at ``crop_size`` (kept for reuse)."""
    from dipro.data.layout import read_manifest
    from dipro.data.synthetic import SyntheticConfig, write_synthetic_dataset

    out = root / f"patients{patients}-crop{crop_size}"
    if not (out / TASK / "manifest.json").exists():
        write_synthetic_dataset(
            SyntheticConfig(
                seed=0,
                num_patients=patients,
                crop_size=crop_size,
                image_size=max(128, crop_size),
                rows_per_file=64,
            ),
            out,
            tasks=(TASK,),
        )
    manifest = read_manifest(out, TASK)
    size = sum(p.stat().st_size for p in (out / TASK).rglob("*.parquet"))
    print(
        f"data {out}: {manifest.num_samples('train')} training samples, "
        f"{size / 2**20:.0f} MiB of shards",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--patients", type=int, default=116, help="cohort size at 1x")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=2, help="Ray batches fetched ahead")
    parser.add_argument("--root", type=Path, help="datasets kept here (default: a temp dir)")
    parser.add_argument("--measure", choices=READERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(
            json.dumps(
                measure(args.measure, args.data, args.epochs, args.batch_size, args.prefetch)
            )
        )
        return

    root = args.root or Path(tempfile.mkdtemp(prefix="bench_data-"))
    results: dict[tuple[str, int], dict] = {}
    for scale in (1, 4):
        data = build(root, args.patients * scale, args.crop_size)
        for reader in READERS:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--measure",
                    reader,
                    "--data",
                    str(data),
                    "--epochs",
                    str(args.epochs),
                    "--batch-size",
                    str(args.batch_size),
                    "--prefetch",
                    str(args.prefetch),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode:
                sys.exit(f"{reader} reader failed:\n{proc.stderr[-4000:]}")
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(reader, scale)] = got
            print(
                f"{scale}x {reader:8s}: {got['samples_per_s']:7.1f} samples/s steady, "
                f"first batch {got['first_batch_s']:.2f} s (later epochs "
                f"{got['later_first_batch_s']:.2f} s), peak RSS {got['peak_rss_mb']:.0f} MiB",
                flush=True,
            )
    plain, ray_ = results[("plain", 1)]["samples_per_s"], results[("ray", 1)]["samples_per_s"]
    free = results[("ray-free", 1)]["samples_per_s"]
    print(f"plain={plain:.1f} ray={ray_:.1f} ratio={ray_ / plain:.2f}")
    print(f"deterministic={ray_:.1f} free={free:.1f} ratio={ray_ / free:.2f}")


if __name__ == "__main__":
    main()
