"""Distributed DiPro training on Ray Train: ``python -m ray_jobs.train [hydra overrides]``.

Composes the config and runs ``ray_jobs.training.run_training``; an error the user can fix (bad
data, a run directory in use, a required tracking store that does not answer, storage that
refuses a write) ends it with one line and exit status 2.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from dipro import storage, tracking
from dipro.config import exit_on
from dipro.data.schema import SchemaError
from dipro.data.shard_reader import ChecksumError
from dipro.runs import RunDirectoryInUse, run_dir_of
from ray_jobs.console import session
from ray_jobs.training import run_training


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    errors = exit_on(
        {
            (SchemaError, ChecksumError): "data",
            RunDirectoryInUse: "run directory",
            tracking.TrackingUnavailable: "tracking",
            storage.StorageUnwritable: "storage",
        }
    )
    with errors, session(cfg, cfg.run_name, run_dir_of(cfg)):
        result = run_training(cfg)
    print(json.dumps({"run_dir": result.run_dir, "test": result.test_metrics}, indent=2))


if __name__ == "__main__":
    main()
