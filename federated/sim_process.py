"""One federated simulation in a process of its own: ``python -m federated.sim_process
CONFIG_JSON`` (what ``federated.simulate.run_federated`` starts).

Flower's ``run_simulation`` starts Ray and calls ``ray.shutdown()`` when it ends, so it must not
share a process with another Ray user. The simulated sites are the dataset's first
``simulation.num_sites`` hospitals (partition-id i is the i-th hospital; the launcher sets the
number). This process is the coordinator's: it reads no data, the sites (Ray actors) do. The
simulated SuperNodes' node ids are drawn from the run's seed (``seed_node_ids``), so a site
has the same node id, and is sampled and aggregated in the same place, in every run of it.
Exit status 0 when the run finished, 1 with a ``federated run failed:`` line when it did not.

It dies with its launcher, for any reason the launcher exits (a SIGKILL of the launcher's
process group included): the kernel sends it SIGUSR1 (``PR_SET_PDEATHSIG``; not SIGTERM, which
Ray's in-process driver handles itself), and a watcher thread checks the parent too, in case
the signal cannot be handled at once. Either way it sends SIGTERM to every process of its
session (Ray's GCS, raylet and workers and the node agents, which exit at once on a raylet's
SIGTERM but wait a minute on the dead GCS after a raylet's SIGKILL), but not to itself: the
stop must outlive Ray's teardown. A few seconds later they, and then its process group with
itself, get SIGKILL, so no orphan ever goes on writing the run directory. The launcher's pid
is ``DIPRO_LAUNCHER_PID``.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from flwr.server.superlink.linkstate import in_memory_linkstate
from flwr.simulation import run_simulation

from dipro import storage
from dipro.config import ConfigError
from dipro.runs import SUMMARY_FILE
from dipro.seeds import stream_seed
from federated.client_app import app as client_app
from federated.config import parse_run
from federated.server_app import server_app_for
from federated.streams import NODE_IDS

FAILED = "federated run failed:"
LAUNCHER_PID_ENV = "DIPRO_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1
_GRACE_S = 3.0
_WATCH_INTERVAL_S = 0.5
_stopping = threading.Lock()


def die_with_launcher() -> None:
    """Stop this process group when the parent exits (Linux): SIGUSR1 from the kernel
    (``PR_SET_PDEATHSIG``) or the watcher thread, whichever comes first; stop now if the
    launcher is already gone (it died before this process asked)."""
    launcher = int(os.environ.get(LAUNCHER_PID_ENV, os.getppid()))
    signal.signal(signal.SIGTERM, lambda *_: _stop_process_group())
    signal.signal(signal.SIGUSR1, lambda *_: _stop_process_group())
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != launcher:
        _stop_process_group()
    threading.Thread(target=_watch_parent, args=(launcher,), daemon=True).start()


def _watch_parent(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(_WATCH_INTERVAL_S)
    _stop_process_group()


def _stop_process_group() -> None:
    """SIGTERM to every other process of this session (Ray ends gracefully, its agents with
    it), SIGKILL to them after ``_GRACE_S``, then to this process group, this process included.
    Ray's node agents may have been reparented away from their raylet, so the session is what
    is stopped, not only the descendants. Runs in the main thread (a signal handler) or the
    watcher thread, so it sets no signal disposition."""
    if not _stopping.acquire(blocking=False):
        return  # the other of the two paths: already stopping
    family = _session_members(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in family:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        if sig == signal.SIGTERM:
            time.sleep(_GRACE_S)
    os.killpg(0, signal.SIGKILL)


def _await_stop() -> None:
    """Wait for the end when the watcher thread is stopping the process group: the simulation
    it tears down returns here, and exiting now would end the watcher before its SIGKILLs."""
    while _stopping.locked():
        time.sleep(_WATCH_INTERVAL_S)


def _session_members(root: int) -> set[int]:
    """The live descendants of ``root`` and the other processes of its session, from
    ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    session = os.getsid(root)
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # gone meanwhile
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        if int(fields[3]) == session and pid != root:
            found.add(pid)
    frontier = [root, *found]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def seed_node_ids(seed: int) -> None:
    """Have Flower's simulation register its SuperNodes under node ids drawn from ``seed``.

    Flower draws each node id from ``os.urandom`` (``InMemoryLinkState.create_node``), so they
    differ between runs, and with them the sites a round samples (by node id), the order their
    replies are aggregated in and the round log's node ids. The simulation registers its
    nodes one after the other, partition 0 first, and draws nothing else from the link state's
    generator (it stores its run directly); drawn from the stream ``NODE_IDS`` of the run's seed
    instead, partition i gets the same id in every run. The generator is replaced for the
    lifetime of this process, which runs one simulation."""
    rng = random.Random(stream_seed(seed, NODE_IDS))

    def draw(num_bytes: int, exclude: set[int] | None = None) -> int:
        value = rng.getrandbits(8 * num_bytes)
        while exclude and value in exclude:
            value = rng.getrandbits(8 * num_bytes)
        return value

    in_memory_linkstate.generate_rand_int_from_bytes = draw


def simulate(cfg: dict[str, Any]) -> None:
    """Run ``cfg`` (resolved, with ``simulation.num_sites`` set) on Flower's Ray simulation
    backend, in this process."""
    run = parse_run(cfg)
    sim = run.simulation
    if sim.num_sites is None:
        raise ConfigError("simulation.num_sites is unset: the launcher sets it")
    seed_node_ids(run.seed)
    run_simulation(
        server_app=server_app_for(cfg),
        client_app=client_app,
        num_supernodes=sim.num_sites,
        backend_config={
            "client_resources": {"num_cpus": sim.client_cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": sim.ray_num_cpus},
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
        _await_stop()
        traceback.print_exc()
        cause = _root_cause(err)
        print(f"{FAILED} {type(cause).__name__}: {cause}", file=sys.stderr, flush=True)
        return 1
    _await_stop()
    if not storage.exists(storage.join(parse_run(cfg).out_dir, SUMMARY_FILE)):
        print(
            f"{FAILED} the simulation ended without {SUMMARY_FILE} (see the log above)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
