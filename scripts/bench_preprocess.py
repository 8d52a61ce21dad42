"""Benchmark the two heavy passes of ray_jobs.preprocess on fabricated inputs.

1. chartevents: rows per second of the streamed, itemid- and stay-filtered pass, and its peak
   resident memory for a file of N rows and of 4N rows (each measured in a fresh process, next
   to the same process's memory after imports only);
2. regions: images per second of decode + crop + resize with 1 and with 2 Ray workers, on
   copies of the real radiograph of pydicom-data (1955 x 1841, about MIMIC-CXR-JPG size).

    .venv/bin/python scripts/bench_preprocess.py --rows 1000000 --images 24
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

_ITEMS = (
    220045,
    220179,
    220180,
    220181,
    220210,
    220277,
    220048,
    223761,
    220739,
    227969,
    224650,
    220615,
    228096,
    226730,
)


def write_chartevents(path: Path, rows: int, seed: int = 0) -> None:
    """A chartevents.csv with the MIMIC-IV 2.2 columns, 38-variable and other itemids mixed."""
    rng = np.random.default_rng(seed)
    chunk = 500_000
    base = pd.Timestamp("2150-01-01")
    with path.open("w") as handle:
        handle.write(
            "subject_id,hadm_id,stay_id,caregiver_id,charttime,storetime,itemid,value,"
            "valuenum,valueuom,warning\n"
        )
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            stay = rng.integers(30000000, 30002000, n)
            times = base + pd.to_timedelta(rng.integers(0, 3600 * 24 * 30, n), unit="s")
            stamp = times.strftime("%Y-%m-%d %H:%M:%S")
            value = np.round(rng.normal(80, 10, n), 1)
            frame = pd.DataFrame(
                {
                    "subject_id": stay - 20000000,
                    "hadm_id": stay - 10000000,
                    "stay_id": stay,
                    "caregiver_id": 4242,
                    "charttime": stamp,
                    "storetime": stamp,
                    "itemid": rng.choice(_ITEMS, n),
                    "value": value,
                    "valuenum": value,
                    "valueuom": "bpm",
                    "warning": 0,
                }
            )
            frame.to_csv(handle, header=False, index=False)


_CHILD = """
import json, sys, time
from pathlib import Path
from dipro.data.mimic import ehr

def peak_mb():  # VmHWM: this process's peak resident set (reset by exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

base = peak_mb()
stats = ehr.StreamStats()
t0 = time.perf_counter()
events = ehr.stream_events(Path(sys.argv[1]), range(30000000, 30000100), ehr.CHART_ITEMIDS,
                           block_size=int(sys.argv[2]), stats=stats)
seconds = time.perf_counter() - t0
print(json.dumps({"rows": stats.rows_read, "kept": stats.rows_kept, "seconds": seconds,
                  "base_rss_mb": base, "peak_rss_mb": peak_mb()}))
"""


def bench_chartevents(tmp: Path, rows: int, block_size: int) -> list[dict[str, float]]:
    results = []
    for factor in (1, 4):
        path = tmp / f"chartevents_{factor}x.csv"
        write_chartevents(path, rows * factor, seed=factor)
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), str(block_size)],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(
            factor=factor,
            file_mb=path.stat().st_size / 2**20,
            rows_per_s=result["rows"] / result["seconds"],
        )
        results.append(result)
        path.unlink()
    return results


def bench_regions(tmp: Path, images: int, workers: tuple[int, ...]) -> list[dict[str, float]]:
    """Run the pipeline's decode+crop stage (``_CropBatch``) over ``images`` full-size JPEGs.

    Worker count 0 is the same UDF called in this process, without Ray (one core); the Ray runs
    include starting their actors.
    """
    import ray
    from PIL import Image

    from dipro import vocab
    from dipro.data.mimic.raw_tree import real_cxr_pixels
    from ray_jobs.preprocess_pipeline import _CropBatch

    pixels = real_cxr_pixels()
    rows, cols = pixels.shape
    src = tmp / "cxr.jpg"
    Image.fromarray(pixels).save(src, format="JPEG", quality=95)
    data = src.read_bytes()
    rng = np.random.default_rng(0)
    items = []
    for i in range(images):
        path = tmp / f"img{i:04d}.jpg"
        path.write_bytes(data)
        boxes = {}
        for region in vocab.REGIONS:
            x1, y1 = rng.uniform(0.05, 0.5) * cols, rng.uniform(0.05, 0.5) * rows
            boxes[region] = (
                x1,
                y1,
                x1 + rng.uniform(0.1, 0.4) * cols,
                y1 + rng.uniform(0.1, 0.4) * rows,
            )
        items.append(
            {
                "index": i,
                "path": str(path),
                "rows": rows,
                "columns": cols,
                "boxes": json.dumps(boxes),
            }
        )
    columns = {k: np.array([item[k] for item in items]) for k in items[0]}
    t0 = time.perf_counter()
    _CropBatch(224)(columns)
    seconds = time.perf_counter() - t0
    results = [
        {"workers": 0, "images": images, "seconds": seconds, "images_per_s": images / seconds}
    ]
    ray.init(num_cpus=max(workers), include_dashboard=False)
    try:
        for n in workers:
            ds = ray.data.from_items(items, override_num_blocks=4 * n).map_batches(
                _CropBatch,
                fn_constructor_kwargs={"crop_size": 224},
                batch_size=2,
                compute=ray.data.ActorPoolStrategy(size=n),
                num_cpus=1,
            )
            t0 = time.perf_counter()
            count = sum(len(b["index"]) for b in ds.iter_batches(batch_size=None))
            seconds = time.perf_counter() - t0
            assert count == images
            results.append(
                {
                    "workers": n,
                    "images": images,
                    "seconds": seconds,
                    "images_per_s": images / seconds,
                }
            )
    finally:
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="chartevents rows at 1x")
    parser.add_argument("--block-mb", type=int, default=16, help="streaming block size")
    parser.add_argument("--images", type=int, default=48, help="images for decode+crop")
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--skip-chartevents", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for r in (
            [] if args.skip_chartevents else bench_chartevents(tmp, args.rows, args.block_mb << 20)
        ):
            print(
                f"chartevents {r['factor']}x: {r['rows']:,} rows ({r['file_mb']:.0f} MB), "
                f"{r['kept']:,} kept, {r['rows_per_s']:,.0f} rows/s, peak RSS "
                f"{r['peak_rss_mb']:.0f} MB (after imports {r['base_rss_mb']:.0f} MB)"
            )
        if not args.skip_images:
            for r in bench_regions(tmp, args.images, (1, 2)):
                where = f"{r['workers']} Ray worker(s)" if r["workers"] else "in-process, no Ray"
                print(
                    f"decode+crop, {where}: {r['images']} images in {r['seconds']:.1f} s = "
                    f"{r['images_per_s']:.2f} images/s"
                )


if __name__ == "__main__":
    main()
