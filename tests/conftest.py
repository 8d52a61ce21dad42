"""Fixtures shared by the whole suite: the tiny synthetic cohorts and their shards (written once
per test run, read-only), the run's in-process Ray, a temporary MLflow store, and the
in-process runner of an entrypoint."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from local_ray import ensure_ray

from dipro.data.synthetic import Cohort, SyntheticConfig, simulate_cohort, write_synthetic_dataset


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Runs that tests track go to a temporary MLflow store (``MLFLOW_TRACKING_URI``, which
    ``tracking.uri`` follows), never to the repository's ``outputs/mlflow``."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="session")
def tiny_synthetic_config() -> SyntheticConfig:
    """A cohort small enough for any unit test: 24 patients, 64-pixel CXRs, 16-pixel crops,
    8 rows per shard file (so that every split has several files)."""
    return SyntheticConfig(seed=7, num_patients=24, image_size=64, crop_size=16, rows_per_file=8)


@pytest.fixture(scope="session")
def tiny_cohort(tiny_synthetic_config: SyntheticConfig) -> Cohort:
    """The in-memory cohort of ``tiny_synthetic_config``."""
    return simulate_cohort(tiny_synthetic_config)


@pytest.fixture(scope="session")
def tiny_dataset(
    tmp_path_factory: pytest.TempPathFactory, tiny_synthetic_config: SyntheticConfig
) -> Path:
    """Root of the three tasks' shards of ``tiny_synthetic_config`` (read-only: do not write
    into it; copy it or write your own under ``tmp_path``)."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    write_synthetic_dataset(tiny_synthetic_config, root)
    return root


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three tasks' shards of a 36-patient, 3-hospital synthetic cohort with 16-pixel crops:
    what the Ray, Tune and federated tests train on (read-only)."""
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_dataset(
        SyntheticConfig(seed=5, num_patients=36, image_size=64, crop_size=16), root
    )
    return root


@pytest.fixture
def ray_session() -> None:
    """The test run's in-process Ray (``local_ray``), started if it is not running."""
    ensure_ray()


@pytest.fixture
def without_ray() -> None:
    """No Ray in this process: for a test that checks a command stops before it starts Ray."""
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_after_the_run() -> Iterator[None]:
    yield
    ray.shutdown()


_EXIT_STATUS: list[int] = []


def pytest_configure(config: pytest.Config) -> None:
    """Ray Train's controller polls its workers every 2 s by default, so that each run ends up
    to 2 s after its last epoch (and a failed worker is seen up to 2 s late); the suite's 40-odd
    Train runs poll every 0.5 s. Ray and the clusters the tests start inherit the setting."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process with pytest's own exit status once everything is reported.

    A test run leaves threads of native libraries behind (Ray's and gRPC's after
    ``ray.shutdown()``, MLflow's, torch's); the interpreter's finalisation has once ended a
    full run with a segmentation fault after its summary was printed, turning a green run into
    exit status 139. Nothing is left to do at this point, so the run ends here.
    """
    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


def _checksums(root: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def tree_checksums():
    """``tree_checksums(root)``: sha256 of every file under ``root`` by relative path (compare
    before and after a failing command: nothing already written may change)."""
    return _checksums


@pytest.fixture
def entrypoint(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``entrypoint(module, *overrides) -> (exit code, stderr lines)``: run ``python -m module
    overrides...`` as a user does (the module as ``__main__``, its ``@hydra.main`` parsing the
    command line), in this process, from ``tmp_path``. ``entrypoint.stdout`` is what it (and
    the Ray workers it started) printed."""
    import runpy
    import sys

    def run(module: str, *overrides: str) -> tuple[int, list[str]]:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", [module, *overrides])
        monkeypatch.delitem(sys.modules, module, raising=False)
        capfd.readouterr()
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capfd.readouterr()
        run.stdout = out
        return code, [line for line in err.splitlines() if line.strip()]

    run.stdout = ""

    return run
