"""Federated DiPro simulated on one machine: ``python -m federated.simulate [hydra overrides]``.

The work is ``run_federated(cfg)``: check the config and the simulated sites' dataset
(``data.root``: its region mode; its hospitals, the simulated sites unless
``simulation.num_sites`` says fewer; in features mode its feature width, which the run's
``model.feature_dim`` takes, as a deployment's operator sets it), then run the simulation
(``federated.sim_process``) in a process and session of its own, bounded by
``simulation.timeout_s``, with its output in ``{out_dir}/simulation.log``. Flower's runtime
dependency installation and telemetry are turned off for it. The ``@hydra.main`` wrapper only
composes the config and calls it.

One run directory, one writer: the launcher takes an exclusive lock on ``{out_dir}/.lock``
(holding its pid) before it writes anything, and the simulation inherits it; a second launcher
on the same ``out_dir`` is refused with ``RunDirectoryInUse`` naming the other process. The
simulation dies with its launcher (``federated.sim_process.die_with_launcher``), and the lock
with the last of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from dipro import storage
from dipro.config import ConfigError, exit_on
from dipro.data.layout import model_dataset
from dipro.runs import RUN_CONFIG_FILE, RunDirectoryInUse, lock_run_directory
from federated.config import FederatedRun, check_config
from federated.server import FederatedResult, read_result
from federated.sim_process import FAILED, LAUNCHER_PID_ENV

LOG_FILE = "simulation.log"
_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


class FederatedRunError(RuntimeError):
    """The simulation failed or ran out of time; the message says why and where the log is."""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the simulation's process group (the process and the Ray processes it started)."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _failure(log: Path, offset: int) -> str:
    """The failure line this start wrote to the log (or its last lines)."""
    with log.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    failed = [line for line in lines if line.startswith(FAILED)]
    return failed[-1] if failed else "\n".join(lines[-20:])


def run_federated(cfg: DictConfig | dict[str, Any]) -> FederatedResult:
    """Simulate the federated run ``cfg`` (``configs/federated.yaml``); resume it when its
    ``out_dir`` holds a checkpoint. Raises ConfigError before starting anything on a bad
    config, FederatedRunError when the run fails or exceeds ``simulation.timeout_s``."""
    resolved = (
        OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    )
    run, _ = check_config(resolved)
    sites = model_dataset(run.data.root, run.task.name, run.model.region_mode, "data.root").manifest
    if sites.feature_dim is not None:  # features mode: the width the sites' shards hold
        resolved["model"]["feature_dim"] = sites.feature_dim
    if run.simulation.num_sites is None:
        resolved["simulation"]["num_sites"] = len(sites.hospitals)
    if storage.is_remote(run.out_dir):
        raise ConfigError("a simulation writes to a local out_dir")
    out_dir = Path(run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_directory(out_dir, holder="a simulation of this run")
    try:
        return _simulate(resolved, run, out_dir, lock)
    finally:
        os.close(lock)


def _simulate(
    resolved: dict[str, Any], run: FederatedRun, out_dir: Path, lock: int
) -> FederatedResult:
    """Run the simulation of ``resolved`` (its typed ``run``) in a child process."""
    config_path = out_dir / RUN_CONFIG_FILE
    storage.write_bytes_atomic(
        str(config_path), json.dumps(resolved, indent=2, sort_keys=True).encode()
    )
    log = out_dir / LOG_FILE
    timeout = run.simulation.timeout_s
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "federated.sim_process", str(config_path)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **_ENV, LAUNCHER_PID_ENV: str(os.getpid())},
            start_new_session=True,
            pass_fds=(lock,),
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise FederatedRunError(
                f"the federated simulation {run.run_name} did not finish within "
                f"{timeout:.0f} s (simulation.timeout_s); stopped. Log: {log}"
            ) from None
        except BaseException:
            _stop(proc)
            raise
    if code != 0:
        raise FederatedRunError(f"{_failure(log, offset)} (exit status {code}; log: {log})")
    return read_result(out_dir)


@hydra.main(config_path="../configs", config_name="federated", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on({RunDirectoryInUse: "run directory"}, failures=(FederatedRunError,)):
        result = run_federated(cfg)
    print(json.dumps({"out_dir": result.out_dir, "test": result.test_metrics}, indent=2))


if __name__ == "__main__":
    main()
