"""Region attention per finding token of trained progression models, against the regions where
that finding changed.

``region_attention`` (the report's) averages the K task tokens; this reads each token's own
attention over regions (the final fusion's last layer, summed over pairs and renormalised over
regions, as the report does) from a forward hook, and compares it with the regions where *its*
finding improved or worsened:

    ratio              = mean a_nk / mean s_nk       a: attention on those regions, s: their share
    against_own_map    = mean a_nk / mean m_nk       m: the same regions under the token's mean map
    map_spread         = max_r - min_r of each token's mean map (0 for a uniform map)

over the (sample, finding) pairs where the finding changed in some regions but not all.

    python scripts/attention_by_finding.py outputs/runs/ablation-progression-dipro-seed23 \
        --data outputs/data/synthetic-features-resnet18
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dipro import vocab
from dipro.checkpoint import load_checkpoint
from dipro.data.layout import list_shards
from dipro.data.shard_reader import read_batches
from dipro.runs import SUMMARY_FILE
from dipro.settings import ModelConfig


def token_attention(run: Path, shards: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-token attention over regions [N, K, R] and the finding's changed regions [N, K, R]."""
    best = json.loads((run / SUMMARY_FILE).read_text())["best_checkpoint"]
    model, meta = load_checkpoint(best)
    model.eval()
    seen: dict[str, torch.Tensor] = {}
    hook = model.final_fusion.register_forward_hook(
        lambda module, args, out: seen.__setitem__("attention", out[1])
    )
    attention, changed = [], []
    with torch.no_grad():
        region_mode = ModelConfig.from_dict(meta.model_cfg).region_mode
        for batch in read_batches(shards, 64, region_mode, meta.norm_stats):
            model(batch)
            B, K, _ = seen["attention"].shape
            per_region = seen["attention"].reshape(B, K, -1, vocab.NUM_REGIONS).sum(dim=2)
            attention.append((per_region / per_region.sum(-1, keepdim=True)).numpy())
            labels = batch.region_labels  # [B, P, R, K]
            moved = (labels == vocab.WORSENED) | (labels == vocab.IMPROVED)
            moved &= batch.pair_mask[:, :, None, None]
            changed.append(moved.any(dim=1).permute(0, 2, 1).numpy())  # [B, K, R]
    hook.remove()
    return np.concatenate(attention), np.concatenate(changed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", required=True, help="the data.root the runs trained on")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    shards = list_shards(args.data, "disease_progression", args.split)
    for run in args.runs:
        attention, changed = token_attention(run, shards)
        keep = changed.any(-1) & ~changed.all(-1)  # [N, K]
        mean_map = attention.mean(axis=0)  # [K, R]
        on = (attention * changed).sum(-1)[keep]
        share = changed.mean(-1)[keep]
        expected = (mean_map[None] * changed).sum(-1)[keep]
        spread = mean_map.max(-1) - mean_map.min(-1)
        print(
            f"{run.name}: ratio {on.mean() / share.mean():.3f}, against own map "
            f"{on.mean() / expected.mean():.3f} over {int(keep.sum())} (sample, finding) pairs; "
            f"map spread per token {[round(float(x), 3) for x in spread]} (uniform 0)"
        )


if __name__ == "__main__":
    main()
