"""Region attention of single test pairs against the regions that changed in them.

Scores a trained progression run's best checkpoint on the test split, picks ``--samples`` test
pairs at random (seeded) among those with both changed and unchanged regions, and draws each
pair's attention over the regions with its changed regions marked and the model's averaged map
beside them (``dipro.report.figures.plot_sample_attention``). It also prints the faithfulness
ratios of the whole split (``dipro.report.attention_faithfulness``).

    python scripts/attention_samples.py outputs/runs/ablation-crops-dipro-seed23 \
        --out docs/figures/attention-samples.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dipro.data.layout import list_shards
from dipro.evaluation import evaluate_checkpoint
from dipro.report import attention_faithfulness
from dipro.report.figures import plot_sample_attention
from dipro.runs import RUN_CONFIG_FILE, SUMMARY_FILE

TASK = "disease_progression"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a training run directory")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    best = Path(json.loads((args.run / SUMMARY_FILE).read_text())["best_checkpoint"])
    data_root = json.loads((best.parent / RUN_CONFIG_FILE).read_text())["data"]["root"]
    predictions = evaluate_checkpoint(best, list_shards(data_root, TASK, "test")).predictions
    changed = predictions.region_changed.astype(bool)
    eligible = np.flatnonzero(changed.any(1) & ~changed.all(1))
    picked = np.sort(np.random.default_rng(args.seed).choice(eligible, args.samples, replace=False))
    attention = predictions.region_attention.astype(np.float64)
    mean_map = attention.mean(axis=0)
    samples = [
        (
            f"stay {predictions.stay_id[n]}: {attention[n][changed[n]].sum():.2f} on changed "
            f"(map {mean_map[changed[n]].sum():.2f})",
            attention[n],
            changed[n],
        )
        for n in picked
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(plot_sample_attention(samples, mean_map, args.run.name))
    faith = attention_faithfulness(predictions)
    low, high = faith["interval"]
    map_low, map_high = faith["interval_against_mean_map"]
    print(
        f"{args.run.name}: {faith['n_samples']} test pairs with changed and unchanged regions; "
        f"ratio {faith['ratio']:.3f} [{low:.3f}, {high:.3f}] to their share of regions, "
        f"{faith['ratio_against_mean_map']:.3f} [{map_low:.3f}, {map_high:.3f}] to the averaged "
        f"map; figure {args.out}"
    )


if __name__ == "__main__":
    main()
