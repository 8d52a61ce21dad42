"""The console of the jobs: the epoch line, following a run's epochs, the log-file session,
the line of a run that waits for resources, and the logical CPUs of an in-process Ray (no Ray
started here)."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path

import pytest
import ray
from conftest import CONFIGS, compose_train
from hydra import compose, initialize_config_dir

import ray_jobs.console
from dipro.config import settings_of
from dipro.settings import JobSettings, TaskSettings, TrainingRun
from ray_jobs.console import (
    Demand,
    Progress,
    follow_epochs,
    format_epoch,
    report_waits,
    say,
    session,
)
from ray_jobs.predict import local_num_cpus as predict_num_cpus
from ray_jobs.training import local_num_cpus

RECORD = {
    "epoch": 3,
    "train/loss": 0.69312,
    "val/loss": 0.7,
    "val/auprc": 0.41234,
    "best/val/auprc": 0.5,
    "epoch_seconds": 12.44,
    "train/samples_per_s": 85.2,
}


def test_epoch_line_holds_losses_monitor_best_seconds_and_rate():
    line = format_epoch("mortality", RECORD, 4, "val/auprc")
    assert line == (
        "[mortality] epoch 3/4  train loss 0.6931  val loss 0.7000  val/auprc 0.4123 "
        "(best 0.5000)  12.4 s  85 samples/s"
    )
    no_best = format_epoch("mortality", {**RECORD, "best/val/auprc": math.nan}, 4, "val/auprc")
    assert "(best n/a)" in no_best


def _cfg(tmp_path: Path, **extra) -> dict:
    return {"log_dir": str(tmp_path / "logs"), "tracking": {"enabled": False}, **extra}


MORTALITY = TaskSettings(name="mortality", monitor="val/auprc", monitor_mode="max")


def test_follow_epochs_prints_each_epoch_once_as_it_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    log = run / "epoch_metrics.jsonl"

    def write(epochs: int) -> None:
        lines = [json.dumps({**RECORD, "epoch": e}) for e in range(1, epochs + 1)]
        tmp = log.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(log)

    def trainer() -> None:
        for epochs in (1, 2, 3):
            write(epochs)
            time.sleep(0.15)

    with follow_epochs(str(run), MORTALITY, 3, interval_s=0.05):
        thread = threading.Thread(target=trainer)
        thread.start()
        thread.join()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"]


def test_follow_epochs_prints_an_epoch_trained_again_after_a_resume(tmp_path, capsys):
    """A resume from an older checkpoint rewrites the log from that epoch on: the epochs
    trained again are printed again (with their new numbers), the kept one is not."""
    run = tmp_path / "run"
    run.mkdir()
    log = run / "epoch_metrics.jsonl"
    old = [{**RECORD, "epoch": e} for e in (1, 2)]
    log.write_text("".join(json.dumps(r) + "\n" for r in old))
    with follow_epochs(str(run), MORTALITY, 3, interval_s=0.05):
        again = [old[0], {**RECORD, "epoch": 2, "train/loss": 0.25}]
        log.write_text("".join(json.dumps(r) + "\n" for r in again))
        time.sleep(0.2)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["2/3"]
    assert "train loss 0.2500" in lines[0]


def test_session_sends_output_to_the_log_file_and_people_lines_to_the_console(tmp_path, capsys):
    logger = logging.getLogger("ray.test_console")
    handler = logging.StreamHandler()  # made before the session: bound to the terminal
    logger.addHandler(handler)
    try:
        with session(_cfg(tmp_path), "job", "/out/run"):
            print("(RayTrainWorker pid=1) Reporting training result 1")
            logger.warning("Cluster resources are not enough")
            say("[mortality] epoch 1/3")
        logger.warning("after the session")
    finally:
        logger.removeHandler(handler)
    captured = capsys.readouterr()
    assert "Reporting" not in captured.out + captured.err
    assert "not enough" not in captured.out + captured.err
    assert "[mortality] epoch 1/3" in captured.out
    assert captured.out.splitlines()[0] == "outputs: /out/run"
    assert "after the session" in captured.err
    text = (tmp_path / "logs" / "job.log").read_text()
    assert "Reporting training result 1" in text and "Cluster resources" in text


def test_verbose_session_keeps_everything_on_the_console(tmp_path, capsys):
    with session(_cfg(tmp_path, verbose=True), "job", "/out/run"):
        print("worker output")
    assert "worker output" in capsys.readouterr().out
    assert not (tmp_path / "logs").exists()


def test_progress_prints_an_eta(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 30.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    progress = Progress("pass", 3, every_s=0)
    progress.step()
    progress.step()
    progress.step()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["pass 1/3  10 s, ETA 20 s", "pass 2/3  20 s, ETA 10 s", "pass 3/3  30 s"]


@pytest.mark.parametrize(
    ("cores", "overrides", "expected"),
    [
        (2, [], 4),  # two workers x 1 CPU + Ray Data's read + drivers/evaluation
        (16, [], 16),
        (2, ["scaling.resources_per_worker.CPU=0.5"], 4),  # Ray Data rounds 0.5 up to 1
        (2, ["scaling.num_workers=1"], 3),
        (2, ["ray_num_cpus=3"], 3),
    ],
)
def test_in_process_ray_leaves_ray_data_a_whole_cpu(monkeypatch, cores, overrides, expected):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert local_num_cpus(settings_of(TrainingRun, compose_train(overrides))) == expected


def test_an_in_process_ray_too_small_for_the_run_is_refused_before_ray_starts(
    without_ray, entrypoint, tiny_data_root, tmp_path
):
    """Two workers of one CPU and nothing left for the reads would wait forever in silence."""
    code, lines = entrypoint(
        "ray_jobs.train",
        "task=mortality",
        "+experiment=demo",
        f"data.root={tiny_data_root}",
        f"storage_path={tmp_path / 'runs'}",
        "ray_num_cpus=2",
    )
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("configuration error: ray_num_cpus=2 leaves Ray Data no CPU")
    assert "needs at least 3" in lines[0]
    assert not ray.is_initialized()


@pytest.mark.parametrize(("cores", "actors", "expected"), [(2, 1, 2), (2, 2, 3), (8, 2, 8)])
def test_predict_leaves_its_reads_a_cpu_beside_the_model_actors(
    monkeypatch, cores, actors, expected
):
    """Two actors of one CPU on a 2-CPU Ray would leave the read tasks none (a hang)."""
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("predict", overrides=["checkpoint=model.pt", f"actors={actors}"])
    assert predict_num_cpus(cfg, settings_of(JobSettings, cfg)) == expected


def test_a_wait_for_resources_is_said_once_it_lasts_resource_wait_s(capsys, monkeypatch):
    group = Demand("a placement group of 2 x {CPU: 1, GPU: 1}", frozenset({"CPU", "GPU"}))
    demands: list[list[Demand]] = [[], [group]]
    monkeypatch.setattr(ray_jobs.console, "pending_demands", lambda: demands[-1])
    monkeypatch.setattr(ray_jobs.console, "cluster_offer", lambda asked: f"{sorted(asked)}")
    with report_waits(0.4, poll_s=0.05):
        time.sleep(1.0)  # said at 0.4 s, not again before 0.8 s
        demands.append([])  # placed: nothing more is said
        time.sleep(0.5)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines  # at 0.4 s and at 0.8 s of the same wait
    for line in lines:
        assert line.startswith("waiting ")
        assert " s for resources: a placement group of 2 x {CPU: 1, GPU: 1}. " in line
        assert "The cluster has (free/total) ['CPU', 'GPU']" in line


def test_no_wait_line_when_resource_wait_s_is_off(capsys, monkeypatch):
    waiting = [Demand("1 task(s)/actor(s) of {CPU: 1}", frozenset({"CPU"}))]
    monkeypatch.setattr(ray_jobs.console, "pending_demands", lambda: waiting)
    with report_waits(0, poll_s=0.05):
        time.sleep(0.2)
    assert capsys.readouterr().out == ""
