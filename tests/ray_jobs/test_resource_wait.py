"""No silent wait: ``python -m ray_jobs.train`` asking for a resource its Ray does not have (a
custom resource here, as a GPU or a node type would be on a cluster) passes the checks before
Ray starts, waits, and says on the console what it waits for and what the cluster offers once
it has waited ``resource_wait_s`` seconds; then the test stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # a launcher with its own Ray


def test_a_run_waiting_for_resources_says_so_on_the_console(tiny_data_root, tmp_path):
    args = [
        "task=mortality",
        f"data.root={tiny_data_root}",
        f"storage_path={tmp_path / 'runs'}",
        f"log_dir={tmp_path / 'logs'}",
        "run_name=waits",
        *TINY_MODEL,
        "scaling.num_workers=1",
        "+scaling.resources_per_worker.accelerator_slot=1",  # no node has one
        "ray_num_cpus=3",
        "resource_wait_s=5",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PWD": str(tmp_path)}
    console = tmp_path / "console.txt"
    with console.open("wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "ray_jobs.train", *args],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def said() -> list[str]:
        return [x for x in console.read_text().splitlines() if x.startswith("waiting ")]

    try:
        deadline = time.monotonic() + 300
        while not said() and launcher.poll() is None:
            assert time.monotonic() < deadline, console.read_text()
            time.sleep(0.5)
        assert launcher.poll() is None, console.read_text()  # still waiting, not failed
        time.sleep(1)  # the whole line
        (line, *_) = said()
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and the Ray it started
        launcher.wait()
    assert "s for resources: a placement group of 1 x {CPU: 1, accelerator_slot: 1}" in line
    assert "The cluster has (free/total) CPU 3/3, GPU 0/0, accelerator_slot 0/0;" in line
    assert not list((tmp_path / "runs" / "waits").glob("checkpoint_*"))  # nothing trained
