"""The run directory: its file names, its metrics log and the best-metric tracker.

Every trainer writes one kind of run directory and every reader (evaluation, Tune, the ablation
and seed studies, the report, the console, tracking) reads it through this module:

| file                     | written by                        | holds                             |
|--------------------------|-----------------------------------|-----------------------------------|
| ``epoch_metrics.jsonl``  | the Ray Train worker (rank 0)     | one JSON line per epoch           |
| ``round_metrics.jsonl``  | the federated server              | one JSON line per round           |
| ``checkpoint_*/model.pt``| the Ray worker, the Flower server | ``dipro.checkpoint`` payload      |
| ``checkpoint_*/config.json`` | the Ray Train worker          | the run's resolved configuration  |
| ``metrics.json``         | ``write_summary`` (both trainers) | the run's summary (best, test)    |
| ``.lock``                | the launcher (``run_lock``)       | its pid; locked while it runs     |

Checkpoints: Ray Train names its directories ``checkpoint_{timestamp}``, the federated server
``checkpoint_{round:06d}`` (``step_checkpoint``); either way ``checkpoint_files`` lists them
newest first, and a run of either kind resumes from ``resume_point``: the newest checkpoint that
loads, a damaged one skipped and named. The federated server keeps the best round's and the
last ones (``prune_checkpoints``); Ray Train keeps its own.

A metrics log is rewritten whole (temp file + rename) with each new line; the lines of this and
later steps (``epoch`` or ``round``) are dropped first, so a step that a failed attempt logged
before its checkpoint appears once, as its retry wrote it.

The monitored metric's rule (``best_first``, ``improves``) is the same for early stopping, the
best checkpoint, the report's best epoch and a sweep's best epoch: NaN is never best and of
equal values the earliest wins.

One run directory, one launcher (``run_lock``): a training run, a sweep, a study and a federated
simulation hold an exclusive ``flock`` on ``{directory}/.lock`` (which holds the launcher's pid)
for as long as they run, and a second launcher is refused with ``RunDirectoryInUse`` naming that
pid. The kernel drops the lock when its process dies, so the lock of a launcher that was killed
(SIGKILL included) is taken over by the next start without help. It works on a local file
system and on NFS (Linux emulates ``flock`` with NFS byte-range locks); on object storage
(``s3://``, ``gs://``) there is nothing to lock and a run is not guarded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow.fs as pafs

from dipro import storage

T = TypeVar("T")
E = TypeVar("E", bound=Exception)

CHECKPOINT_FILE = "model.pt"
RUN_CONFIG_FILE = "config.json"
EPOCH_METRICS_FILE = "epoch_metrics.jsonl"
ROUND_METRICS_FILE = "round_metrics.jsonl"
SUMMARY_FILE = "metrics.json"
CHECKPOINT_DIR_PREFIX = "checkpoint_"
LOCK_FILE = ".lock"


class RunDirectoryInUse(RuntimeError):
    """Another process holds the run directory's lock."""


def lock_run_directory(
    directory: str | os.PathLike[str], holder: str = "a launcher of this run"
) -> int:
    """An exclusive lock on ``{directory}/.lock`` holding this pid; returns its descriptor (the
    lock lasts while it, or a copy inherited by a child, is open). Raises RunDirectoryInUse
    naming the holder's pid when another process has it (``holder`` says what that process
    is, in the message)."""
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirectoryInUse(
            f"{os.fspath(directory)} is in use by process {pid} ({holder} is still going); "
            "wait for it to end or stop it before starting this run again"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def run_lock(directory: str, note: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock of the run ``directory`` (made when missing) around the body: a second
    launcher of the same run is refused (``lock_run_directory``). On remote storage, where
    there is no lock, ``note`` says so in one line and the body runs unguarded. Storage that
    refuses the lock file (read-only, full) raises ``storage.StorageUnwritable``."""
    if storage.is_remote(directory):
        note(f"run lock: {directory} is on remote storage, which has no locks; start a run once")
        yield
        return
    try:
        os.makedirs(directory, exist_ok=True)
        fd = lock_run_directory(directory)
    except OSError as err:
        refused = storage.unwritable(os.path.join(directory, LOCK_FILE), err)
        if refused is None:
            raise
        raise refused from err
    try:
        yield
    finally:
        os.close(fd)


def run_dir(storage_path: str, run_name: str) -> str:
    """Where a run lives: ``{storage_path}/{run_name}`` (a path or URI)."""
    return storage.join(str(storage_path), str(run_name))


def run_dir_of(cfg: Mapping[str, Any]) -> str:
    """The directory of the run a config describes (its ``storage_path`` and ``run_name``)."""
    return run_dir(cfg["storage_path"], cfg["run_name"])


def epoch_log(directory: str) -> str:
    """The ``epoch_metrics.jsonl`` of the run ``directory``."""
    return storage.join(directory, EPOCH_METRICS_FILE)


# What every trainer's ``metrics.json`` holds first, whatever it adds after: the readers (the
# report, the studies, tracking, the console) rely on these keys.
SUMMARY_KEYS = ("task", "run_name", "seed", "best_checkpoint", "val", "test")


def write_summary(directory: str, summary: Mapping[str, Any]) -> str:
    """Write a finished run's ``metrics.json`` in ``directory`` (temp file + rename); its URI.
    A Ray Train run and a federated run both write it here. ``summary`` starts with
    ``SUMMARY_KEYS`` (``test`` None when the run scored no test split); a summary without one
    of them is a ValueError, and nothing is written."""
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if missing:
        raise ValueError(f"a run summary needs {', '.join(missing)}")
    uri = storage.join(directory, SUMMARY_FILE)
    storage.write_bytes_atomic(uri, json.dumps(dict(summary), indent=2).encode())
    return uri


def checkpoint_files(directory: str) -> list[str]:
    """The ``model.pt`` of each checkpoint directory of the run ``directory``, newest first
    (Ray Train names them ``checkpoint_{timestamp}``); empty when the run does not exist."""
    fs, base = storage.resolve_filesystem(directory)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    names = sorted(
        (
            info.base_name
            for info in fs.get_file_info(pafs.FileSelector(base))
            if info.type == pafs.FileType.Directory
            and info.base_name.startswith(CHECKPOINT_DIR_PREFIX)
        ),
        reverse=True,
    )
    return [storage.join(directory, name, CHECKPOINT_FILE) for name in names]


def step_checkpoint(directory: str, step: int) -> str:
    """The checkpoint file of ``step`` (a federated round) in the run ``directory``,
    ``checkpoint_{step:06d}/model.pt``: ``checkpoint_files`` orders it by step."""
    return storage.join(directory, f"{CHECKPOINT_DIR_PREFIX}{step:06d}", CHECKPOINT_FILE)


def resume_point(
    directory: str,
    load: Callable[[str], T],
    skipped: Callable[[E], None],
    *,
    error: type[E],
    newest: str | None = None,
) -> tuple[str, T] | None:
    """Where a run resumes, for a Ray Train run and a federated run alike: the newest of the
    run ``directory``'s checkpoints (``checkpoint_files``) that ``load`` reads, with what it
    read; not newer than the checkpoint directory named ``newest`` when given (Ray Train's
    latest). Each damaged one is passed to ``skipped``. None when none loads (a new run)."""
    uris = [
        uri
        for uri in checkpoint_files(directory)
        if newest is None or posixpath.basename(posixpath.dirname(uri)) <= newest
    ]
    return first_loadable(uris, load, skipped, error=error)


def prune_checkpoints(directory: str, keep: Iterable[str]) -> None:
    """Delete the checkpoint directories of the run ``directory`` whose file is not in
    ``keep`` (the federated server keeps the best round's and the last ones)."""
    kept = set(keep)
    fs, _ = storage.resolve_filesystem(directory)
    for uri in checkpoint_files(directory):
        if uri not in kept:
            _, path = storage.resolve_filesystem(posixpath.dirname(uri))
            fs.delete_dir(path)


def first_loadable(
    uris: Iterable[str],
    load: Callable[[str], T],
    skipped: Callable[[E], None],
    *,
    error: type[E],
) -> tuple[str, T] | None:
    """The first of ``uris`` that ``load`` reads without raising ``error`` (a damaged
    checkpoint: ``dipro.checkpoint.CheckpointError``), with what it read; each one skipped is
    passed to ``skipped`` with its error. None when none loads."""
    for uri in uris:
        try:
            return uri, load(uri)
        except error as err:
            skipped(err)
    return None


def _order(value: float, mode: str) -> float:
    """Sort key of a monitored value: smaller is better, NaN last."""
    if math.isnan(value):
        return math.inf
    return -value if mode == "max" else value


def improves(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``best`` (None: nothing yet) on a metric to ``mode`` (max or
    min); NaN never does."""
    return not math.isnan(value) and (best is None or _order(value, mode) < _order(best, mode))


def best_first(values: Sequence[float], mode: str) -> list[int]:
    """Indices of ``values`` from best to worst (NaN last, the earliest first among equals)."""
    return sorted(range(len(values)), key=lambda i: _order(float(values[i]), mode))


def best_index(values: Sequence[float], mode: str) -> int | None:
    """Index of the best of ``values`` (the earliest among equals); None when all are NaN."""
    order = best_first(values, mode)
    return order[0] if order and not math.isnan(float(values[order[0]])) else None


def append_log(uri: str, record: dict[str, Any], step: str) -> None:
    """Rewrite the metrics log ``uri`` ending with ``record``, after the existing lines whose
    ``step`` key (``"epoch"`` or ``"round"``) is smaller than ``record[step]``."""
    kept = [line for line in read_log(uri) if line[step] < record[step]]
    lines = [json.dumps(line, sort_keys=True) for line in [*kept, record]]
    storage.write_bytes_atomic(uri, ("\n".join(lines) + "\n").encode())


def read_log(uri: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics log in file order (empty when it does not exist).

    Raises:
        ValueError: a line is not JSON (naming the file and the line number).
    """
    uri = os.fspath(uri)
    if not storage.exists(uri):
        return []
    records = []
    for number, line in enumerate(storage.read_bytes(uri).decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{uri}: line {number} is not JSON: {err}") from err
    return records


def read_epoch_log(uri: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's ``epoch_metrics.jsonl``, in epoch order."""
    return sorted(read_log(uri), key=lambda r: int(r["epoch"]))


def last_logged(uri: str | os.PathLike[str], step: str = "epoch") -> int:
    """The largest ``step`` the log holds (0 when it holds none)."""
    return max((int(r[step]) for r in read_log(uri)), default=0)


@dataclass
class BestMetric:
    """The monitored metric's best value so far and the steps since it last improved (early
    stopping's state, saved in every checkpoint and restored with it). NaN never improves."""

    mode: str
    best: float | None = None
    bad_steps: int = 0

    def update(self, value: float) -> bool:
        """Take this step's value; True when it is the new best."""
        if improves(value, self.best, self.mode):
            self.best, self.bad_steps = value, 0
            return True
        self.bad_steps += 1
        return False

    def exhausted(self, patience: int | None) -> bool:
        """Whether ``patience`` steps have passed without improvement (never when None)."""
        return patience is not None and self.bad_steps >= int(patience)
