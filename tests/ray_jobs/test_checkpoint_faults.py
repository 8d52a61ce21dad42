"""Checkpoints that do not fit: a truncated latest checkpoint is skipped on resume (saying
which and why), and a checkpoint of another task or other data is refused by resume and by
evaluation; storage that fills up or turns read-only during a checkpoint ends the run with one
line and loses nothing (a small tmpfs of the test's own: root only); through
``python -m ray_jobs.train`` / ``ray_jobs.evaluate`` as a user runs them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_MODEL, compose_train
from omegaconf import OmegaConf
from tiny_model import RANDOM_BACKBONE_EXPECTED

from dipro.checkpoint import read_checkpoint, save_checkpoint
from dipro.data.normalize import NormStats
from dipro.model import build_model
from ray_jobs.worker import KEEP_FREE

pytestmark = pytest.mark.ray


def _args(data_root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "task=mortality",
        f"data.root={data_root}",
        f"storage_path={runs}",
        "run_name=faults",
        *TINY_MODEL,
        "scaling.num_workers=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def mortality_run(two_worker_run, tmp_path_factory) -> Path:
    """A copy of the suite's two-epoch mortality run, named ``faults`` (these tests resume and
    change it); its directory."""
    run_dir = tmp_path_factory.mktemp("runs") / "faults"
    shutil.copytree(two_worker_run.run_dir, run_dir)
    return run_dir


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_*/model.pt"))


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "epoch_metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_skips_a_truncated_latest_checkpoint(
    mortality_run, tiny_data_root, entrypoint, tree_checksums, tmp_path
):
    run_dir = mortality_run
    first, latest = _checkpoints(run_dir)[-2:]
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 3])
    epoch_1 = _epochs(run_dir)[0]
    kept = tree_checksums(first.parent)

    code, lines = entrypoint(  # keep every checkpoint: retention may not hide a change
        "ray_jobs.train",
        *_args(
            tiny_data_root, run_dir.parent, "train.max_epochs=3", "train.checkpoints_to_keep=10"
        ),
    )

    assert code == 0, lines[-10:]
    out = entrypoint.stdout
    assert f"resume: skipped {latest}: not a loadable checkpoint" in out, out[-3000:]
    assert f"resume: from {first}, after epoch 1" in out
    assert "epoch 2/3" in out and "epoch 3/3" in out  # epoch 2 trained again, and shown
    epochs = _epochs(run_dir)
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[0] == epoch_1  # epoch 1 was not trained again
    assert tree_checksums(first.parent) == kept


@pytest.mark.slow
def test_resume_with_another_task_or_other_data_is_refused(
    mortality_run, tiny_dataset, tiny_data_root, entrypoint, tree_checksums
):
    before = tree_checksums(mortality_run)
    runs = mortality_run.parent
    code, lines = entrypoint(
        "ray_jobs.train",
        *_args(tiny_data_root, runs, "task=disease_progression", "run_name=faults"),
    )
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("configuration error: run_name=faults exists and cannot be resumed")
    assert "a mortality checkpoint, not a disease_progression one" in lines[0]

    code, lines = entrypoint("ray_jobs.train", *_args(tiny_dataset, runs))
    assert code == 2 and len(lines) == 1
    assert "trained on data with other normalisation statistics" in lines[0]
    assert tree_checksums(mortality_run) == before


def _progression_checkpoint(path: Path, *, norm_stats) -> Path:
    cfg = compose_train(["task=disease_progression", *TINY_MODEL])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = build_model(model_cfg, "disease_progression")
    task = "disease_progression"
    save_checkpoint(path, model, model_cfg=model_cfg, task=task, norm_stats=norm_stats)
    return path


@pytest.mark.slow
@RANDOM_BACKBONE_EXPECTED
def test_evaluate_refuses_a_checkpoint_that_is_not_the_runs(
    mortality_run, tiny_data_root, entrypoint, tree_checksums, tmp_path
):
    own = read_checkpoint(_checkpoints(mortality_run)[0])
    stats = NormStats.from_dict(own["training"]["norm_stats"])
    before = tree_checksums(mortality_run)
    other = _progression_checkpoint(tmp_path / "progression.pt", norm_stats=stats)
    log = mortality_run / "epoch_metrics.jsonl"
    code, lines = entrypoint(
        "ray_jobs.evaluate",
        f"checkpoint={other}",
        f"data.root={tiny_data_root}",
        f"epoch_metrics={log}",
        f"out_dir={tmp_path / 'report'}",
    )
    assert code == 2 and len(lines) == 1
    assert lines[0] == (
        f"evaluation error: epoch_metrics={log} logs a mortality run, the checkpoint is a "
        "disease_progression model"
    )

    planted = mortality_run / "checkpoint_planted"
    planted.mkdir()
    shutil.copy(other, planted / "model.pt")
    shutil.copy(_checkpoints(mortality_run)[0].parent / "config.json", planted / "config.json")
    code, lines = entrypoint("ray_jobs.evaluate", f"checkpoint={planted}")
    shutil.rmtree(planted)
    assert code == 2 and len(lines) == 1
    assert "a disease_progression checkpoint in the directory of a mortality run" in lines[0]

    bare = _progression_checkpoint(tmp_path / "bare.pt", norm_stats=None)
    code, lines = entrypoint(
        "ray_jobs.evaluate", f"checkpoint={bare}", f"data.root={tiny_data_root}"
    )
    assert code == 2 and lines == [
        f"evaluation error: {bare}: carries no normalisation statistics, so its inputs cannot "
        "be normalised as in training"
    ]
    assert not (tmp_path / "report").exists()
    assert tree_checksums(mortality_run) == before


@dataclass(frozen=True)
class SmallDisk:
    """A tmpfs mounted at ``path``: resized or turned read-only while a run writes to it."""

    path: Path

    def remount(self, options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["mount", "-o", f"remount,{options}", str(self.path)], capture_output=True, text=True
        )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A file system of the test's own (a 1 MiB tmpfs until resized), unmounted afterwards
    with whatever was mounted inside it; skipped where the tests may not mount (not root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        if subprocess.run(["umount", "--recursive", str(path)]).returncode:
            subprocess.run(["umount", "--recursive", "--lazy", str(path)], check=True)


def _checkpoint_bytes(run_dir: Path) -> int:
    return sum(f.stat().st_size for f in _checkpoints(run_dir)[0].parent.iterdir())


def _bytes_needed(line: str) -> int:
    found = re.search(r"the write needs (\d+) bytes", line)
    assert found, line
    return int(found.group(1))


def _turn_read_only_after_checkpoint(
    disk: SmallDisk, run_dir: Path, number: int, failures: list[str]
) -> None:
    """Once the run's ``number``-th checkpoint is in place and Ray Train has recorded it,
    remount the disk read-only (retried while a file on it is being written)."""
    deadline = time.monotonic() + 300
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.monotonic() < deadline:
        names = [p.parent.name for p in _checkpoints(run_dir)]
        if len(names) >= number and snapshot.exists() and names[number - 1] in snapshot.read_text():
            break
        time.sleep(0.05)
    while time.monotonic() < deadline:
        turned = disk.remount("ro")
        if turned.returncode == 0:
            return
        time.sleep(0.05)
    failures.append(f"the disk was not turned read-only: {turned.stderr.strip()}")


@pytest.mark.slow
def test_storage_filling_up_then_turning_read_only_loses_nothing(
    mortality_run, tiny_data_root, entrypoint, small_disk, tree_checksums, tmp_path
):
    """One three-epoch run on a disk of its own, launched three times: epoch 2's checkpoint does
    not fit; with space back, the run resumes, and the disk turns read-only once epoch 2's
    checkpoint is recorded; writable again, the run resumes and ends. Each failure is one line
    naming what could not be written and why, and no checkpoint written before it changes."""
    size = _checkpoint_bytes(mortality_run)
    assert small_disk.remount(f"size={size * 3 // 2 + KEEP_FREE}").returncode == 0
    runs = small_disk.path / "runs"
    args = _args(
        tiny_data_root,
        runs,
        "run_name=full",
        "train.max_epochs=3",
        "train.checkpoints_to_keep=10",
    )
    run_dir = runs / "full"

    code, lines = entrypoint("ray_jobs.train", *args)  # epoch 2's checkpoint does not fit

    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"storage error: cannot write {run_dir}/checkpoint_"), lines[0]
    assert "no space left on the device (the write needs " in lines[0]
    assert abs(_bytes_needed(lines[0]) - size) < size // 100  # the checkpoint's size
    (first,) = _checkpoints(run_dir)  # the half-written copy is gone, the first is whole
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".checkpoint_")]
    assert read_checkpoint(first)["training"]["epoch"] == 1
    epoch_1 = _epochs(run_dir)[0]
    kept = tree_checksums(first.parent)

    assert small_disk.remount(f"size={size * 5}").returncode == 0  # space is back
    # The launcher holds its lock file open for writing, and Linux remounts no file system
    # read-only while a file on it is open for writing: the lock file is bound in from
    # another file system, so that the run's directory can turn read-only under the run.
    lock = tmp_path / "lock"
    lock.touch()
    (run_dir / ".lock").touch()
    subprocess.run(["mount", "--bind", str(lock), str(run_dir / ".lock")], check=True)
    failures: list[str] = []
    watcher = threading.Thread(
        target=_turn_read_only_after_checkpoint, args=(small_disk, run_dir, 2, failures)
    )
    watcher.start()

    code, lines = entrypoint("ray_jobs.train", *args)

    watcher.join()
    assert not failures, failures
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"storage error: cannot write {run_dir}/"), lines[0]
    assert "the file system is read-only" in lines[0]
    assert f"resume: from {first}, after epoch 1" in entrypoint.stdout
    second = _checkpoints(run_dir)[1]
    assert len(_checkpoints(run_dir)) == 2 and read_checkpoint(second)["training"]["epoch"] == 2
    kept_second = tree_checksums(second.parent)

    assert small_disk.remount("rw").returncode == 0
    code, lines = entrypoint("ray_jobs.train", *args)

    assert code == 0, lines[-10:]
    assert f"resume: from {second}, after epoch 2" in entrypoint.stdout
    epochs = _epochs(run_dir)
    assert [e["epoch"] for e in epochs] == [1, 2, 3]  # each once
    assert epochs[0] == epoch_1
    assert tree_checksums(first.parent) == kept
    assert tree_checksums(second.parent) == kept_second
    assert json.loads((run_dir / "metrics.json").read_text())["best_epoch"] in (1, 2, 3)


def test_read_only_storage_refuses_the_run_before_it_starts(tiny_data_root, entrypoint, small_disk):
    runs = small_disk.path / "runs"
    runs.mkdir()
    assert small_disk.remount("ro").returncode == 0
    code, lines = entrypoint("ray_jobs.train", *_args(tiny_data_root, runs, "run_name=never"))
    assert code == 2
    assert lines == [
        f"storage error: cannot write {runs / 'never' / '.lock'}: the file system is read-only"
    ]
