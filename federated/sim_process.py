"""One federated simulation in a process of its own: ``python -m federated.sim_process
CONFIG_JSON`` (what ``federated.simulate.run_federated`` starts).

Flower's ``run_simulation`` starts Ray and calls ``ray.shutdown()`` when it ends, so it must not
share a process with another Ray user. The simulated sites are the dataset's first
``simulation.num_sites`` hospitals (partition-id i is the i-th hospital). Exit status 0 when the
run finished, 1 with a ``federated run failed:`` line when it did not.

It dies with its launcher: the kernel sends it SIGKILL when the launcher exits for any reason
(``PR_SET_PDEATHSIG``; a SIGKILL of the launcher's process group included), and the Ray
processes it started share its fate (Ray's own parent-death signals), so no orphan ever goes on
writing the run directory. Ray's two per-node agents (dashboard, runtime env), which write
nothing of the run, exit within Ray's GCS reconnect timeout (60 s) of their raylet's death.
The launcher's pid is ``DIPRO_LAUNCHER_PID``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
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
LAUNCHER_PID_ENV = "DIPRO_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux); exit now if the
    launcher is already gone (it died before this process asked)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is not None and os.getppid() != int(launcher):
        os._exit(1)


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
    die_with_launcher()
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
