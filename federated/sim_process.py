"""One federated simulation in a process of its own: ``python -m federated.sim_process
CONFIG_JSON`` (what ``federated.simulate.run_federated`` starts).

Flower's ``run_simulation`` starts Ray and calls ``ray.shutdown()`` when it ends, so it must not
share a process with another Ray user. The simulated sites are the dataset's first
``simulation.num_sites`` hospitals (partition-id i is the i-th hospital). Exit status 0 when the
run finished, 1 with a ``federated run failed:`` line when it did not.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from dipro import storage
from dipro.data.shards import read_manifest
from federated.client_app import app as client_app
from federated.server import REPORT_FILE
from federated.server_app import server_app_for

FAILED = "federated run failed:"


def num_sites(cfg: dict[str, Any]) -> int:
    """Simulated sites: ``simulation.num_sites`` or every hospital of the server's dataset."""
    wanted = cfg["simulation"].get("num_sites")
    if wanted is not None:
        return int(wanted)
    return len(read_manifest(cfg["server"]["data_root"], cfg["task"]["name"]).hospitals)


def simulate(cfg: dict[str, Any]) -> None:
    """Run ``cfg`` on Flower's Ray simulation backend, in this process."""
    sim = cfg["simulation"]
    run_simulation(
        server_app=server_app_for(cfg),
        client_app=client_app,
        num_supernodes=num_sites(cfg),
        backend_config={
            "client_resources": {"num_cpus": float(sim["client_cpus"]), "num_gpus": 0.0},
            "init_args": {"num_cpus": int(sim["ray_num_cpus"])},
        },
    )


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def main(argv: list[str]) -> int:
    cfg = json.loads(Path(argv[0]).read_text())
    try:
        simulate(cfg)
    except Exception as err:
        traceback.print_exc()
        cause = _root_cause(err)
        print(f"{FAILED} {type(cause).__name__}: {cause}", file=sys.stderr, flush=True)
        return 1
    if not storage.exists(storage.join(cfg["out_dir"], REPORT_FILE)):
        print(
            f"{FAILED} the simulation ended without {REPORT_FILE} (see the log above)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
