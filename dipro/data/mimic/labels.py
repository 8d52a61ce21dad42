"""Progression labels of CXR pairs from Chest ImaGenome comparisons.

Region level: for a pair (current image c, previous image p) and a (region, finding), the code is
the one comparison the scene graph of c states against p for that region and finding. When the
gold file has any row for the pair (c, p), the pair's labels come from the gold rows only (gold
overrides silver). A (region, finding) with two different comparisons is conflicting and dropped
(left NOT_MENTIONED). A comparison against an image other than the previous kept CXR of the stay
does not label the pair.

Finding level, per pair and finding, from its region codes other than NOT_MENTIONED:
none -> NOT_MENTIONED; worsened and improved both present -> NOT_MENTIONED (contradictory);
any worsened -> WORSENED; any improved -> IMPROVED; otherwise NO_CHANGE.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from dipro import vocab
from dipro.data.mimic.readers import RegionComparison

Pair = tuple[str, str]


def pair_region_labels(
    silver: Iterable[RegionComparison],
    gold: Iterable[RegionComparison],
) -> tuple[dict[Pair, np.ndarray], int]:
    """Region labels [R, K] int8 per (current, previous) pair, and the number of conflicts dropped.

    Pairs with at least one usable comparison appear in the result.
    """

    def collect(items: Iterable[RegionComparison]) -> dict[Pair, dict[tuple[str, str], set[int]]]:
        table: dict[Pair, dict[tuple[str, str], set[int]]] = defaultdict(lambda: defaultdict(set))
        for c in items:
            table[(c.current, c.previous)][(c.region, c.finding)].add(c.code)
        return table

    silver_by_pair, gold_by_pair = collect(silver), collect(gold)
    out: dict[Pair, np.ndarray] = {}
    conflicts = 0
    for pair in sorted(set(silver_by_pair) | set(gold_by_pair)):
        source = gold_by_pair[pair] if pair in gold_by_pair else silver_by_pair[pair]
        labels = np.full((vocab.NUM_REGIONS, vocab.NUM_FINDINGS), vocab.NOT_MENTIONED, np.int8)
        for (region, finding), codes in source.items():
            if len(codes) != 1:
                conflicts += 1
                continue
            labels[vocab.REGIONS.index(region), vocab.FINDINGS.index(finding)] = next(iter(codes))
        if np.any(labels != vocab.NOT_MENTIONED):
            out[pair] = labels
    return out, conflicts


def finding_labels(region_labels: np.ndarray) -> np.ndarray:
    """Finding-level codes [K] int8 of one pair from its region codes [R, K] (module rule)."""
    out = np.full(vocab.NUM_FINDINGS, vocab.NOT_MENTIONED, np.int8)
    for k in range(vocab.NUM_FINDINGS):
        codes = set(region_labels[:, k].tolist()) - {vocab.NOT_MENTIONED}
        if not codes or {vocab.WORSENED, vocab.IMPROVED} <= codes:
            continue
        if vocab.WORSENED in codes:
            out[k] = vocab.WORSENED
        elif vocab.IMPROVED in codes:
            out[k] = vocab.IMPROVED
        else:
            out[k] = vocab.NO_CHANGE
    return out
