"""One launcher per run: while ``python -m ray_jobs.train`` runs, a second launch of the same
``run_name`` and ``storage_path`` is refused in one line naming the first one's pid; once the
first is killed with SIGKILL, a new launch takes the lock over and resumes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray.train
from conftest import TINY_MODEL

from dipro.runs import LOCK_FILE

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # two launchers, each with its own Ray


def _args(data_root: Path, tmp_path: Path) -> list[str]:
    return [
        "task=mortality",
        f"data.root={data_root}",
        f"storage_path={tmp_path / 'runs'}",
        f"log_dir={tmp_path / 'logs'}",
        "run_name=locked",
        *TINY_MODEL,
        "tracking.enabled=false",
        "scaling.num_workers=1",
        "train.max_epochs=3",
    ]


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` every 0.2 s until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.2)


def _holds(launcher: subprocess.Popen[bytes], lock: Path) -> bool:
    """Whether the running ``launcher`` holds ``lock``: a launcher writes its pid into the lock
    file once it has the lock (polling the file leaves the lock alone)."""
    return (
        launcher.poll() is None and lock.exists() and lock.read_text().strip() == str(launcher.pid)
    )


def _checkpointed(run_dir: Path) -> bool:
    """Whether Ray Train has recorded a checkpoint of the run (what a new launch resumes from;
    the epoch's log line comes before it). The record may be missing or half-written while the
    launcher writes it: not yet, then."""
    try:
        return ray.train.Result.from_path(str(run_dir)).checkpoint is not None
    except Exception:
        return False


def _epochs(run_dir: Path) -> list[dict]:
    log = run_dir / "epoch_metrics.jsonl"
    if not log.exists():
        return []
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]


def test_a_second_launch_is_refused_and_a_killed_launchers_run_resumes(
    tiny_data_root, tmp_path, entrypoint, ray_session
):
    args = _args(tiny_data_root, tmp_path)
    run_dir = tmp_path / "runs" / "locked"
    # Started from tmp_path (Hydra's record goes there), with its own in-process Ray.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PWD": str(tmp_path)}
    with (tmp_path / "first.log").open("wb") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "ray_jobs.train", *args],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    lock = run_dir / LOCK_FILE
    try:
        _wait_for(
            lambda: _holds(first, lock), 300, "the first launcher did not lock its run directory"
        )

        started = time.monotonic()
        code, lines = entrypoint("ray_jobs.train", *args)
        refused_in = time.monotonic() - started
        assert code == 2 and len(lines) == 1, lines
        assert lines[0] == (
            f"run directory error: {run_dir} is in use by process {first.pid} (a launcher of "
            "this run is still going); wait for it to end or stop it before starting this run "
            "again"
        )
        assert refused_in < 60, refused_in

        _wait_for(
            lambda: first.poll() is None and _checkpointed(run_dir),
            600,
            "the first launcher did not checkpoint epoch 1",
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
    done = _epochs(run_dir)

    code, lines = entrypoint("ray_jobs.train", *args)

    assert code == 0, lines[-10:]
    assert f"resume: from {run_dir}/checkpoint_" in entrypoint.stdout, entrypoint.stdout[-2000:]
    epochs = _epochs(run_dir)
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[0] == done[0]  # epoch 1 was resumed from, not trained again
    assert lock.read_text().strip() == str(os.getpid())
