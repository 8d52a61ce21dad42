"""Raw MIMIC tree -> shards of the three tasks: ``python -m ray_jobs.preprocess [overrides]``.

The work is ``run_preprocess`` (ray_jobs/preprocess_pipeline.py); this only composes the config
and turns a bad setting or a bad raw file into one line and exit status 2: ``configuration
error: ...`` or ``preprocessing error: FILE, record R, field 'F': ...``.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from dipro.config import exit_on
from dipro.data.mimic.readers import RawDataError
from dipro.data.schema import SchemaError
from ray_jobs.preprocess_pipeline import run_preprocess

__all__ = ["main", "run_preprocess"]


@hydra.main(version_base="1.3", config_path="../configs", config_name="preprocess")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with exit_on(
        {(RawDataError, SchemaError, FileNotFoundError, FileExistsError): "preprocessing"}
    ):
        run_preprocess(cfg)


if __name__ == "__main__":
    main()
