"""Tracking is never the reason a run fails: ``python -m ray_jobs.train`` with its MLflow store
unreachable from the start, or killed after epoch 1, trains every epoch and exits 0 with one
warning line; ``python -m ray_jobs.track`` then logs the run's directory into MLflow, and a
second replay changes nothing; ``tracking.required=true`` refuses to train untracked, in one
line. Real MLflow throughout: a SQLite store, a port nobody listens on, a real ``mlflow
server`` killed mid-run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY_MODEL
from local_mlflow import free_port, running_server
from mlflow import MlflowClient

from dipro.tracking import RUN_DIR_TAG, numeric_metrics

pytestmark = pytest.mark.ray


def _args(data_root: Path, tmp_path: Path, uri: str, *extra: str) -> list[str]:
    """A tiny one-worker mortality run tracked at ``uri``."""
    return [
        "task=mortality",
        f"data.root={data_root}",
        f"storage_path={tmp_path / 'runs'}",
        f"log_dir={tmp_path / 'logs'}",
        "run_name=untracked",
        *(o for o in TINY_MODEL if not o.startswith("tracking.")),
        "scaling.num_workers=1",
        "train.max_epochs=2",
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        *extra,
    ]


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "epoch_metrics.jsonl").read_text().splitlines()]


def _warnings(console: str) -> list[str]:
    return [line for line in console.splitlines() if line.startswith("warning:")]


def _mlflow_run(client: MlflowClient, run_dir: Path):  # noqa: ANN202
    """The one MLflow run of ``run_dir`` (found by its directory tag)."""
    experiment = client.get_experiment_by_name("dipro")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'"
    )
    return run


def _same(a: list[tuple], b: list[tuple]) -> bool:
    """Equal lists of (key, value) pairs, NaN equal to NaN."""
    return len(a) == len(b) and all(
        ka == kb and (va == vb or (math.isnan(va) and math.isnan(vb)))
        for (ka, va), (kb, vb) in zip(a, b, strict=True)
    )


def _histories(client: MlflowClient, run_id: str) -> dict[str, int]:
    """Every metric of the run and the length of its history."""
    keys = client.get_run(run_id).data.metrics
    return {key: len(client.get_metric_history(run_id, key)) for key in keys}


@pytest.mark.slow
def test_unreachable_store_warns_once_and_the_run_is_replayed_later(
    tiny_data_root, tmp_path, entrypoint, ray_session
):
    dead = f"http://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "runs" / "untracked"

    code, lines = entrypoint("ray_jobs.train", *_args(tiny_data_root, tmp_path, dead))

    assert code == 0, lines[-10:]
    assert [e["epoch"] for e in _epochs(run_dir)] == [1, 2]
    summary = json.loads((run_dir / "metrics.json").read_text())
    (warning,) = _warnings(entrypoint.stdout)
    assert dead in warning and "Connection refused" in warning, warning
    assert f"python -m ray_jobs.track {run_dir}" in warning

    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    code, lines = entrypoint("ray_jobs.track", str(run_dir), "--uri", store)
    assert code == 0, lines[-10:]
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    run = _mlflow_run(client, run_dir)
    assert run.info.run_id in entrypoint.stdout and run.info.status == "FINISHED"
    assert run.data.params["run_name"] == "untracked"
    assert run.data.params["tracking.uri"] == dead  # the run's own settings, as it trained
    assert "dataset.checksums_sha256" in run.data.params
    epochs = _epochs(run_dir)
    for key in set().union(*(numeric_metrics(e) for e in epochs)):
        history = client.get_metric_history(run.info.run_id, key)
        logged = sorted((m.step, m.value) for m in history)
        expected = sorted((e["epoch"], float(e[key])) for e in epochs if key in e)
        assert _same(logged, expected), key
    test = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    expected_test = {f"test/{k}": v for k, v in numeric_metrics(summary["test"]).items()}
    assert _same(sorted(test.items()), sorted(expected_test.items()))
    (version,) = client.search_model_versions("name='dipro-mortality'")
    assert version.run_id == run.info.run_id
    assert version.tags["best_epoch"] == str(summary["best_epoch"])
    before = _histories(client, run.info.run_id)

    code, lines = entrypoint("ray_jobs.track", str(run_dir), "--uri", store)
    assert code == 0, lines[-10:]
    again = _mlflow_run(client, run_dir)
    assert again.info.run_id == run.info.run_id
    assert again.data.params == run.data.params
    assert _histories(client, run.info.run_id) == before
    assert len(client.search_model_versions("name='dipro-mortality'")) == 1


def test_a_required_store_that_is_unreachable_stops_the_run_before_it_trains(
    tiny_data_root, tmp_path, entrypoint
):
    dead = f"http://127.0.0.1:{free_port()}"
    args = _args(tiny_data_root, tmp_path, dead, "tracking.required=true")

    code, lines = entrypoint("ray_jobs.train", *args)

    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"tracking error: MLflow tracking store {dead}: connecting failed")
    assert "tracking.required=true" in lines[0]
    assert not (tmp_path / "runs" / "untracked" / "epoch_metrics.jsonl").exists()


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real ``mlflow server`` on a free loopback port (SQLite store in its own directory):
    its URI and process, the leader of its own process group (stopped at the end if alive)."""
    with running_server(tmp_path / "mlflow-server", timeout_s=300) as server:
        yield server


@pytest.mark.cluster  # an MLflow server in its own process
def test_a_server_killed_after_epoch_1_is_skipped_and_the_run_ends_well(
    tiny_data_root, tmp_path, entrypoint, ray_session, mlflow_server
):
    uri, server = mlflow_server
    run_dir = tmp_path / "runs" / "untracked"
    killed = threading.Event()

    def kill_after_epoch_1() -> None:
        deadline = time.monotonic() + 900
        log = run_dir / "epoch_metrics.jsonl"
        while time.monotonic() < deadline:
            if log.exists() and log.read_text().strip():
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=60)
                killed.set()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_after_epoch_1, daemon=True)
    watcher.start()
    code, lines = entrypoint("ray_jobs.train", *_args(tiny_data_root, tmp_path, uri))
    watcher.join(timeout=60)

    assert killed.is_set(), "the server was not killed during the run"
    assert code == 0, lines[-10:]
    assert [e["epoch"] for e in _epochs(run_dir)] == [1, 2]
    assert (run_dir / "metrics.json").exists()
    (warning,) = _warnings(entrypoint.stdout)
    assert warning.startswith(f"warning: MLflow tracking store {uri}: finding the run failed 3")
    assert f"python -m ray_jobs.track {run_dir}" in warning
