"""The model card: intended use, input and output contract, training data, metrics, limits."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dipro import vocab
from dipro.checkpoint import CheckpointMeta
from dipro.data.layout import Manifest
from dipro.report.tables import (
    METRIC_LABELS,
    TABLE_METRICS,
    finite_or_none,
    format_number,
    markdown_table,
)


def _input_contract(meta: CheckpointMeta) -> list[tuple[str, str, str, str]]:
    """(field, dtype, shape, meaning) of what the model reads (``dipro.data.collate.Batch``)."""
    cfg = meta.model_cfg
    crops = cfg.get("region_mode") == "crops"
    image = (
        ("crops", "uint8", "[B, T, R, S, S]", "region crops of each CXR, cut by the region boxes")
        if crops
        else (
            "features",
            "float32",
            f"[B, T, R, {cfg.get('feature_dim')}]",
            "stored region features of a frozen backbone",
        )
    )
    return [
        ("cxr_times", "float32", "[B, T]", "hours since ICU admission, increasing"),
        ("cxr_mask", "bool", "[B, T]", "True = CXR present"),
        image,
        ("region_present", "bool", "[B, T, R]", "True = the region has a box on that CXR"),
        ("ehr_times", "float32", "[B, L]", "hours since ICU admission"),
        ("ehr_mask", "bool", "[B, L]", "True = EHR hour present"),
        (
            "ehr_values",
            "float32",
            f"[B, L, {vocab.NUM_EHR}]",
            "hourly EHR, z-scored with the training split's statistics (stored in the checkpoint)",
        ),
        ("ehr_observed", "bool", f"[B, L, {vocab.NUM_EHR}]", "True = measured in that hour"),
        (
            "demographics",
            "float32",
            f"[B, {vocab.NUM_DEMOGRAPHICS}]",
            "age, height, weight (z-scored), then one-hot gender, race, language, marital status",
        ),
    ]


def _output_contract(task: str) -> list[tuple[str, str, str, str]]:
    logits = {
        "disease_progression": (
            f"[B, {vocab.NUM_FINDINGS}, {vocab.NUM_PROGRESSION_CLASSES}]",
            "per finding, logits of worsened = 0, improved = 1, no change = 2 (softmax)",
        ),
        "mortality": ("[B]", "logit of in-hospital death (sigmoid)"),
        "length_of_stay": (
            f"[B, {vocab.NUM_LOS_CLASSES}]",
            "logits of the ICU stay bins [2,3) [3,4) [4,6) [6,11) days = classes 0..3 (softmax)",
        ),
    }[task]
    return [
        ("logits", "float32", logits[0], logits[1]),
        (
            "region_attention",
            "float32",
            f"[B, {vocab.NUM_REGIONS}]",
            "attention of the task tokens over the regions, rows sum to 1 (a reading aid only)",
        ),
    ]


def _limitations(task: str, manifest: Manifest | None, n_samples: int) -> list[str]:
    out = [
        "Research use only: not a medical device, not validated for diagnosis, triage or any "
        "clinical decision.",
        "Region attention shows where the task tokens look; it is not an explanation of a "
        "prediction and must not be read as one.",
        f"Evaluated on {n_samples} samples: the bootstrap intervals show how much the numbers "
        "can move; small test sets give wide intervals.",
        "Inputs must follow the project's sample-record schema (region crops or features, "
        "hourly EHR in the listed units); other scanners, views or EHR coding are untested.",
    ]
    if task == "disease_progression":
        out.append(
            "Findings labelled 'not mentioned' (code 3) are excluded from training and metrics; "
            "the model says nothing reliable about them."
        )
    if manifest is not None and manifest.generator.get("name") == "synthetic":
        out.insert(
            1,
            "Trained on a synthetic cohort: the numbers describe the method on generated data "
            "and do not transfer to patients.",
        )
    elif manifest is not None:
        out.append(
            f"Trained on hospitals {manifest.hospitals} only; performance at other sites, "
            "populations and time periods is unknown."
        )
    return out


def model_card(
    meta: CheckpointMeta,
    *,
    metrics: Mapping[str, float],
    intervals: Mapping[str, tuple[float, float]],
    split: str,
    n_samples: int,
    level: float,
    manifest: Manifest | None,
    data_root: str | None,
    missing_inputs: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The model card of a checkpoint as markdown and as MONAI-bundle-style metadata (json).

    ``manifest`` describes the data the model was trained on (counts per split and hospital,
    training label counts); None when it cannot be found, which the card then says.
    ``missing_inputs``: metrics of the same split with inputs removed, by variant name.
    """
    task = meta.task
    cfg = meta.model_cfg
    inputs = _input_contract(meta)
    outputs = _output_contract(task)
    limitations = _limitations(task, manifest, n_samples)
    table = TABLE_METRICS[task]
    eval_metrics = {
        m: {
            "value": finite_or_none(metrics.get(m, math.nan)),
            "ci": [finite_or_none(v) for v in intervals.get(m, (math.nan, math.nan))],
        }
        for m in table
    }
    training_data: dict[str, Any] = {"root": data_root}
    if manifest is not None:
        training_data.update(
            generator=manifest.generator.get("name", "unknown"),
            region_mode=manifest.region_mode,
            crop_size=manifest.crop_size,
            samples=manifest.counts,
            subjects=manifest.subjects,
            train_label_counts=manifest.train_label_counts,
        )
    codes: dict[str, Any] = {
        "regions": list(vocab.REGIONS),
        "ehr_variables": list(vocab.EHR_VARIABLES),
        "demographics": list(vocab.DEMOGRAPHICS),
    }
    if task == "disease_progression":
        codes["findings"] = list(vocab.FINDINGS)
        codes["progression_codes"] = dict(vocab.PROGRESSION_CODES)
    if task == "length_of_stay":
        codes["los_bin_edges_days"] = list(vocab.LOS_BIN_EDGES)
    metadata = {
        "name": f"DiPro {task}",
        "task": task,
        "description": "DiPro (NeurIPS 2025): multimodal disease progression modelling from "
        "longitudinal chest X-rays and ICU EHR via spatiotemporal disentanglement and "
        "multiscale alignment.",
        "intended_use": "Research on multimodal disease-progression and ICU outcome modelling. "
        "Not for diagnosis or any clinical decision.",
        "checkpoint": meta.path,
        "checkpoint_format_version": meta.format_version,
        "data_schema_version": meta.data_schema_version,
        "epoch": meta.epoch,
        "model_config": cfg,
        "network_data_format": {
            "inputs": {n: {"dtype": d, "shape": s, "meaning": m} for n, d, s, m in inputs},
            "outputs": {n: {"dtype": d, "shape": s, "meaning": m} for n, d, s, m in outputs},
            "dimensions": {
                "B": "batch",
                "T": "CXRs per sample (2 for progression)",
                "R": f"{vocab.NUM_REGIONS} regions",
                "S": "crop side in pixels"
                + (
                    f" ({manifest.crop_size} in the training data)"
                    if manifest is not None and manifest.crop_size
                    else ""
                ),
                "L": "EHR hours",
            },
            "codes": codes,
        },
        "training_data": training_data,
        "eval_metrics": {
            "split": split,
            "n_samples": n_samples,
            "level": level,
            "metrics": eval_metrics,
        },
        "limitations": limitations,
        "references": ["arXiv:2510.11112"],
    }

    ablations = cfg.get("ablation", {})
    off = [name for name, on in ablations.items() if not on]
    lines = [
        f"# Model card: DiPro, {task.replace('_', ' ')}",
        "",
        "## Model details",
        "",
        f"- Checkpoint: `{meta.path}` (format {meta.format_version}, data schema "
        f"{meta.data_schema_version}, epoch {meta.epoch})",
        f"- Architecture: DiPro, backbone {cfg.get('backbone')} on {cfg.get('region_mode')}, "
        f"d_model {cfg.get('d_model')}, {cfg.get('num_heads')} heads, {cfg.get('ehr_layers')} "
        f"EHR / {cfg.get('local_fusion_layers')} local fusion layers, "
        f"{cfg.get('num_groups')} groups",
        f"- Ablations switched off: {', '.join(off) if off else 'none (the full model)'}",
        "- Reference: Liu et al., NeurIPS 2025, arXiv:2510.11112",
        "",
        "## Intended use",
        "",
        metadata["intended_use"],
        "",
        "## Inputs",
        "",
        "B batch, T CXRs, R = 10 regions, S crop side, L EHR hours. Mask convention: True = "
        "valid / present.",
        "",
        markdown_table(["field", "dtype", "shape", "meaning"], [list(r) for r in inputs]),
        "",
        f"Regions, in tensor order: {', '.join(vocab.REGIONS)}.",
        "",
        "## Outputs",
        "",
        markdown_table(["field", "dtype", "shape", "meaning"], [list(r) for r in outputs]),
    ]
    if task == "disease_progression":
        codes_text = ", ".join(f"{name} = {code}" for name, code in vocab.PROGRESSION_CODES.items())
        lines += [
            "",
            f"Findings, in tensor order: {', '.join(vocab.FINDINGS)}.",
            f"Progression codes: {codes_text}.",
        ]
    lines += ["", "## Training data", ""]
    if manifest is None:
        lines.append(f"The training dataset's manifest was not found (data root: {data_root}).")
    else:
        lines += [
            f"Dataset `{data_root}` ({manifest.generator.get('name', 'unknown')} generator, "
            f"{manifest.region_mode}, crop size {manifest.crop_size}). Normalisation statistics "
            "were fitted on the training split only.",
            "",
            _counts_table(manifest),
        ]
        if task == "disease_progression":
            rows = [
                [finding, *map(str, counts)]
                for finding, counts in zip(
                    vocab.FINDINGS, manifest.label_counts().progression, strict=True
                )
            ]
            lines += [
                "",
                "Training labels per finding:",
                "",
                markdown_table(["finding", *list(vocab.PROGRESSION_CODES)[:3]], rows),
            ]
    pct = round(100 * level)
    lines += [
        "",
        f"## Metrics ({split} split, {n_samples} samples, {pct}% bootstrap intervals)",
        "",
        markdown_table(
            ["metric", "value", f"{pct}% CI"],
            [
                [
                    METRIC_LABELS[m],
                    format_number(metrics.get(m, math.nan)),
                    _ci_text(intervals.get(m)),
                ]
                for m in table
            ],
        ),
    ]
    if missing_inputs:
        metadata["missing_inputs"] = {
            name: {m: finite_or_none(values.get(m, math.nan)) for m in table}
            for name, values in missing_inputs.items()
        }
        lines += [
            "",
            f"## Predictions with missing inputs ({split} split)",
            "",
            "The same records with inputs taken away (no EHR hour; only the last CXR, so no "
            "pair). Predictions the predict job flags `missing_ehr` / `single_cxr` are worth "
            "what these rows say.",
            "",
            markdown_table(
                ["inputs", *(METRIC_LABELS[m] for m in table)],
                [["all", *(format_number(metrics.get(m, math.nan)) for m in table)]]
                + [
                    [name, *(format_number(values.get(m, math.nan)) for m in table)]
                    for name, values in missing_inputs.items()
                ],
            ),
        ]
    lines += [
        "",
        "## Known limitations",
        "",
        *[f"- {text}" for text in limitations],
        "",
    ]
    return "\n".join(lines), metadata


def _counts_table(manifest: Manifest) -> str:
    hospitals = manifest.hospitals
    rows = []
    for split in vocab.SPLITS:
        per = manifest.counts.get(split, {})
        subjects = sum(manifest.subjects.get(split, {}).values())
        rows.append(
            [
                split,
                *(str(per.get(str(h), 0)) for h in hospitals),
                str(manifest.num_samples(split)),
                str(subjects),
            ]
        )
    return markdown_table(
        ["split", *(f"hospital {h}" for h in hospitals), "samples", "subjects"], rows
    )


def _ci_text(interval: tuple[float, float] | None) -> str:
    if interval is None or any(math.isnan(v) for v in interval):
        return "n/a"
    return f"[{format_number(interval[0])}, {format_number(interval[1])}]"
