"""The synthetic cohort alone: `python -m ray_jobs.synthetic [overrides]`.

Writes the default synthetic cohort (configs/data/synthetic.yaml: ``data.generator``'s cohort
under ``data.root``) when it is absent, reuses it when it is there with the same generator
config, and prints its samples per task, split and hospital. It trains nothing and starts no
Ray: it is the data step of the demo on its own, for the commands that read the cohort (a Tune
sweep, the studies, the federated simulation) without running the demo first. A dataset written
with another generator config is refused unless ``data.overwrite=true``, which replaces it.
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from dipro.config import SYNTHETIC_SCHEMA, exit_on, validate
from dipro.data.synthetic import ensure_synthetic_data


@hydra.main(config_path="../configs", config_name="synthetic", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on({FileExistsError: "data"}):
        validate(cfg, SYNTHETIC_SCHEMA)
        start = time.perf_counter()
        data = ensure_synthetic_data(cfg.data)
        print(data.describe(time.perf_counter() - start), flush=True)


if __name__ == "__main__":
    main()
