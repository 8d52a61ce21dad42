"""What the STD tokens of trained progression models hold: linear probes of S and Dy.

For every test pair and region with a box on both CXRs, the model's static token S and dynamic
token Dy (``DiPro.std``'s output, read by a forward hook; w/o STD: its one shared token, which
serves as both) are probed, 5-fold cross-validated by subject:

- static level: the region's finding intensities on the pair's first CXR (mean over the findings
  it can show), which the synthetic cohort draws per patient and independently of the course;
  R^2 of a ridge regression;
- same patient: the cosine similarity of the tokens of two test pairs in the same region, pairs
  of one patient against pairs of two patients; AUROC of the similarity itself (no fit);
- changed: a region where a finding worsened or improved against one where every labelled
  finding stayed; AUROC of a logistic regression;
- direction: among regions that changed one way, worsened against improved; AUROC.

Every regression probe also gets the region's one-hot code, and the one-hot code alone is the
baseline: what a probe reads beyond it is in the token. Under STD, S should hold the static
part (level, same patient) and Dy the change. The script also prints the tokens' mean cos^2
(L_orth, chance 1/D) and whether the temporal term could act (it needs two pairs in a sample).
The truth comes from the cohort itself, simulated again from the generator settings in the
shards' manifest.

    python scripts/disentanglement_probes.py outputs/runs/ablation-crops-{dipro,no_std}-seed23
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dipro import vocab
from dipro.checkpoint import load_checkpoint
from dipro.data.layout import list_shards, read_manifest
from dipro.data.shard_reader import read_batches
from dipro.data.synthetic import AFFINITY, Cohort, SyntheticConfig, simulate_cohort
from dipro.runs import RUN_CONFIG_FILE, SUMMARY_FILE
from dipro.settings import ModelConfig

TASK = "disease_progression"


def run_tokens(run: Path, shards: list[str]) -> dict[str, np.ndarray]:
    """S, Dy [M, D] of every valid (pair, region) token of the shards, with its stay, region,
    first CXR time and region labels [M, K]."""
    best = json.loads((run / SUMMARY_FILE).read_text())["best_checkpoint"]
    model, meta = load_checkpoint(best)
    model.eval()
    seen: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: tuple, out: tuple) -> None:
        seen["valid"], (seen["static"], seen["dynamic"]) = args[1], out

    hook = model.std.register_forward_hook(keep)
    parts: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        region_mode = ModelConfig.from_dict(meta.model_cfg).region_mode
        for batch in read_batches(shards, 64, region_mode, meta.norm_stats):
            model(batch)
            B = batch.stay_id.shape[0]  # with PAE the reversed pairs follow the B pairs
            valid = seen["valid"][:B, 0].numpy()  # [B, R]: progression samples hold one pair
            rows, regions = np.nonzero(valid)
            for name, values in (
                ("static", seen["static"][:B, 0].numpy()[rows, regions]),
                ("dynamic", seen["dynamic"][:B, 0].numpy()[rows, regions]),
                ("stay", batch.stay_id.numpy()[rows]),
                ("subject", batch.subject_id.numpy()[rows]),
                ("time", batch.cxr_times[:, 0].numpy()[rows]),
                ("region", regions),
                ("labels", batch.region_labels[:, 0].numpy()[rows, regions]),
            ):
                parts.setdefault(name, []).append(values)
    hook.remove()
    tokens = {name: np.concatenate(values) for name, values in parts.items()}
    tokens["disentangled"] = np.array(model.disentangled)
    return tokens


def static_levels(cohort: Cohort, tokens: dict[str, np.ndarray]) -> np.ndarray:
    """The mean intensity of each token's region over its plausible findings on the pair's
    first CXR [M]."""
    patient = {int(s): i for i, s in enumerate(cohort.stay_id)}
    level = np.empty(tokens["stay"].shape[0])
    for m, (stay, time, region) in enumerate(
        zip(tokens["stay"], tokens["time"], tokens["region"], strict=True)
    ):
        cxrs = cohort.cxr_slice(patient[int(stay)])
        first = cxrs.start + int(np.argmin(np.abs(cohort.cxr_times[cxrs] - time)))
        level[m] = cohort.intensities[first, region][AFFINITY[region]].mean()
    return level


def _with_region(x: np.ndarray, region: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.eye(vocab.NUM_REGIONS)[region]], axis=1)


def _cv(model: object, x: np.ndarray, y: np.ndarray, groups: np.ndarray, proba: bool) -> np.ndarray:
    method = "predict_proba" if proba else "predict"
    out = cross_val_predict(model, x, y, groups=groups, cv=GroupKFold(5), method=method)
    return out[:, 1] if proba else out


def _auroc(
    model: object, x: np.ndarray, y: np.ndarray, groups: np.ndarray, rows: np.ndarray
) -> float:
    """Cross-validated AUROC of ``model`` on the ``rows`` of (x, y)."""
    return float(roc_auc_score(y[rows], _cv(model, x[rows], y[rows], groups[rows], True)))


def _same_patient_auroc(x: np.ndarray, tokens: dict[str, np.ndarray]) -> float:
    """AUROC of the cosine similarity of two tokens of one region: same patient against two."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    scores, same = [], []
    for r in range(vocab.NUM_REGIONS):
        idx = np.flatnonzero(tokens["region"] == r)
        first, second = np.triu_indices(idx.shape[0], k=1)
        a, b = idx[first], idx[second]
        scores.append((unit[a] * unit[b]).sum(1))
        same.append(tokens["subject"][a] == tokens["subject"][b])
    return float(roc_auc_score(np.concatenate(same), np.concatenate(scores)))


def probe(tokens: dict[str, np.ndarray], level: np.ndarray) -> dict[str, dict[str, float]]:
    """The probes' scores per input: S, Dy, their pair, and the region one-hot alone."""
    labels, region, groups = tokens["labels"], tokens["region"], tokens["subject"]
    moved = (labels == vocab.WORSENED) | (labels == vocab.IMPROVED)
    still = ~moved.any(1) & (labels == vocab.NO_CHANGE).any(1)
    changed = moved.any(1)
    worse = (labels == vocab.WORSENED).any(1)
    better = (labels == vocab.IMPROVED).any(1)
    one_way = worse ^ better
    empty = np.zeros((region.shape[0], 0))
    inputs = {
        "S": tokens["static"],
        "Dy": tokens["dynamic"],
        "S and Dy": np.concatenate([tokens["static"], tokens["dynamic"]], axis=1),
        "region only": empty,
    }
    ridge = make_pipeline(StandardScaler(), Ridge(alpha=10.0))
    logistic = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
    scores: dict[str, dict[str, float]] = {}
    kept = changed | still
    for name, x in inputs.items():
        xr = _with_region(x, region)
        scores[name] = {
            "static level R2": float(r2_score(level, _cv(ridge, xr, level, groups, False))),
            "changed AUROC": _auroc(logistic, xr, changed, groups, kept),
            "direction AUROC": _auroc(logistic, xr, worse, groups, one_way),
            "same patient AUROC": _same_patient_auroc(x, tokens) if x.shape[1] else float("nan"),
        }
    return scores


def orthogonality(tokens: dict[str, np.ndarray]) -> float:
    """Mean cos^2 between S and Dy over the tokens (L_orth; 1/D for unrelated directions)."""
    s, d = tokens["static"], tokens["dynamic"]
    cos = (s * d).sum(1) / np.maximum(np.linalg.norm(s, axis=1) * np.linalg.norm(d, axis=1), 1e-12)
    return float(np.mean(cos**2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training run directories")
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args()
    results = {}
    cohorts: dict[str, Cohort] = {}
    for run in args.runs:
        best = Path(json.loads((run / SUMMARY_FILE).read_text())["best_checkpoint"])
        data_root = json.loads((best.parent / RUN_CONFIG_FILE).read_text())["data"]["root"]
        if data_root not in cohorts:
            generator = dict(read_manifest(data_root, TASK).generator)
            generator.pop("name", None)
            generator.pop("version", None)
            cohorts[data_root] = simulate_cohort(SyntheticConfig.from_dict(generator))
        tokens = run_tokens(run, list_shards(data_root, TASK, args.split))
        scores = probe(tokens, static_levels(cohorts[data_root], tokens))
        d_model = tokens["static"].shape[1]
        results[run.name] = {
            "disentangled": bool(tokens["disentangled"]),
            "tokens": int(tokens["region"].shape[0]),
            "cos2": orthogonality(tokens),
            "chance_cos2": 1.0 / d_model,
            "probes": scores,
        }
        kind = "S, Dy" if tokens["disentangled"] else "shared token as S and Dy"
        print(
            f"{run.name} ({kind}; {tokens['region'].shape[0]} tokens; mean cos^2 "
            f"{results[run.name]['cos2']:.4f}, chance {1.0 / d_model:.4f}; every sample holds "
            "one pair, so the temporal term L_temp never acts)"
        )
        for name, row in scores.items():
            print(f"  {name:>12}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
