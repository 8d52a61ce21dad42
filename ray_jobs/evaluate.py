"""Evaluation of a checkpoint alone: ``python -m ray_jobs.evaluate checkpoint=PATH [overrides]``.

The model, its task and its normalisation statistics come from the checkpoint; any split of any
shard dataset (``data.root``) can be scored. The work is ``dipro.run_report.evaluate_to_report``,
which writes ``metrics.json``, ``report.md``, the figures and the model card; this entrypoint
checks the settings and turns an evaluation that cannot run, or bad data, into one line.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from dipro.config import EVALUATE_SCHEMA, exit_on, validate
from dipro.data.schema import SchemaError
from dipro.data.shard_reader import ChecksumError
from dipro.report import ReportSettings
from dipro.run_report import EvaluationError, evaluate_to_report


def run_evaluation(cfg: DictConfig) -> Path:
    """Evaluate ``cfg.checkpoint`` on ``cfg.split`` of ``cfg.data.root``; returns report.md.
    The settings are checked first (``dipro.config.EVALUATE_SCHEMA``: ConfigError)."""
    validate(cfg, EVALUATE_SCHEMA)
    report = cfg.report
    return evaluate_to_report(
        cfg.checkpoint,
        cfg.data.root,
        split=cfg.split,
        out_dir=cfg.out_dir,
        epoch_metrics=cfg.epoch_metrics,
        settings=ReportSettings(
            resamples=int(report.bootstrap_resamples),
            seed=int(report.bootstrap_seed),
            level=float(report.level),
        ),
        batch_size=int(cfg.batch_size),
        device=cfg.device,
        amp=cfg.amp,
        verify_checksums=bool(cfg.data.get("verify_checksums", True)),
        missing_inputs=bool(report.missing_inputs),
    )


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on({EvaluationError: "evaluation", (SchemaError, ChecksumError): "data"}):
        path = run_evaluation(cfg)
    print(f"report written to {path}")


if __name__ == "__main__":
    main()
