"""What a person sees while a job runs: a short header, one line per epoch (or trial, or round)
and the results; everything else (Ray's own logging, the workers' output) goes to the job's
log file, unless ``verbose=true``.

``session(cfg, name)`` opens the job's console: it prints the header (where the outputs, the
log file and the MLflow store are) and, unless ``cfg.verbose``, sends the process's stdout and
stderr to ``{log_dir}/{name}.log``. Ray forwards every worker's and actor's output to the
driver (``ray.init(log_to_driver=True)``, the default) and the driver writes it to its
stdout/stderr; the stream handlers of Ray's, Ray Data's and MLflow's loggers are pointed at the
log file too. So the log file holds everything the console showed before, in order; ``say``
writes to the console. A Ray the job started (or connected to) is shut down before the streams
go back to the terminal, so that the workers' last output (a failed worker's traceback, which
arrives after the job's own error) lands in the log file too.

``follow_epochs`` prints the epoch lines of a training run while ``fit()`` runs, from the
``epoch_metrics.jsonl`` that rank 0 writes (the run directory is the source of truth, so the
same line comes out for a run on one laptop or on a cluster with remote storage).

``report_waits`` says on the console when the run's requests have waited for resources longer
than ``resource_wait_s`` seconds (a minute by default): what Ray holds pending (placement
groups, tasks and actors, as ``ray status`` lists them) and what the cluster has free, instead
of a console that stays silent while the cluster cannot place the workers or their reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import ray
from omegaconf import DictConfig

from dipro.config import settings_of
from dipro.report.tables import format_number
from dipro.runs import epoch_log, read_log
from dipro.settings import JobSettings, TaskSettings

_console: TextIO | None = None  # the terminal while a session sends stdout to its log file


def say(line: str) -> None:
    """Print one line for people (to the terminal, also while stdout goes to the log file)."""
    stream = _console or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def log_file(job: JobSettings, name: str) -> str:
    """``{log_dir}/{name}.log`` (``outputs/logs`` for a config without ``log_dir``)."""
    return os.path.join(job.log_dir or os.path.join("outputs", "logs"), f"{name}.log")


@contextlib.contextmanager
def session(cfg: DictConfig | Mapping[str, Any], name: str, outputs: str) -> Iterator[None]:
    """The console of one job (``cfg``, an entrypoint's config): a header naming ``outputs``,
    the log file and the MLflow store; stdout and stderr go to the log file unless ``verbose``
    (then everything shows)."""
    global _console
    job = settings_of(JobSettings, cfg)
    path = log_file(job, name)
    tracking = job.tracking
    if _console is not None or job.verbose:  # a session inside a session (the demo) shares it
        say(f"outputs: {outputs}")
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    say(f"outputs: {outputs}")
    say(f"log:     {path} (Ray's and the workers' output; verbose=true shows it here)")
    say(f"MLflow:  {tracking.describe()}")
    with open(path, "a", buffering=1) as log:
        log.write(f"\n===== {name} {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
        terminal = (sys.stdout, sys.stderr)
        _console = sys.stdout
        ray_before = ray.is_initialized()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                _point_handlers(terminal, log)
                try:
                    yield
                finally:
                    if not ray_before and ray.is_initialized():
                        ray.shutdown()
        finally:
            _point_handlers((log,), terminal[1])
            _console = None


def _point_handlers(streams: tuple[TextIO, ...], target: TextIO) -> None:
    """Point every logging stream handler that writes to one of ``streams`` at ``target`` (Ray's
    and MLflow's loggers keep the stream they were made with)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and any(handler.stream is s for s in streams)
            ):
                handler.setStream(target)


def format_epoch(task: str, record: Mapping[str, Any], max_epochs: int, monitor: str) -> str:
    """``[task] epoch 3/4  train loss 0.6931  val loss 0.6812  val/auroc 0.7012 (best 0.7100)
    12.4 s  85 samples/s``."""
    rate = record.get("train/samples_per_s")
    return (
        f"[{task}] epoch {int(record['epoch'])}/{max_epochs}  "
        f"train loss {format_number(record.get('train/loss'))}  "
        f"val loss {format_number(record.get('val/loss'))}  "
        f"{monitor} {format_number(record.get(monitor))} "
        f"(best {format_number(record.get(f'best/{monitor}'))})  "
        f"{float(record.get('epoch_seconds', math.nan)):.1f} s"
        + (f"  {rate:.0f} samples/s" if isinstance(rate, int | float) else "")
    )


@contextlib.contextmanager
def follow_epochs(
    directory: str, task_settings: TaskSettings, max_epochs: int, interval_s: float = 1.0
) -> Iterator[None]:
    """Print each new epoch of the run in ``directory`` while the body runs (and the last ones
    after); an epoch trained again (a resume from an older checkpoint) is printed again."""
    uri = epoch_log(directory)
    task, monitor = task_settings.name, task_settings.monitor
    seen = {json.dumps(record, sort_keys=True) for record in read_log(uri)}

    def show_new() -> None:
        for record in read_log(uri):
            key = json.dumps(record, sort_keys=True)
            if key not in seen:  # a new epoch, or one trained again after a resume
                seen.add(key)
                say(format_epoch(task, record, max_epochs, monitor))

    def poll() -> None:
        with contextlib.suppress(OSError, ValueError):  # a file being replaced
            show_new()

    with _every(interval_s, poll, "epoch-lines"):
        yield
    show_new()


@contextlib.contextmanager
def _every(interval_s: float, step: Callable[[], None], name: str) -> Iterator[None]:
    """Call ``step`` every ``interval_s`` seconds in a daemon thread while the body runs; the
    thread is stopped and joined when the body ends."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(interval_s):
            step()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class Progress:
    """``label i/n (elapsed, ETA)`` lines for long work, at most one per ``every_s`` seconds
    (and always the last)."""

    def __init__(self, label: str, total: int, every_s: float = 10.0) -> None:
        self.label, self.total, self.every_s = label, max(int(total), 1), every_s
        self.started = self._shown = time.monotonic()
        self.done = 0

    def step(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if self.done < self.total and now - self._shown < self.every_s:
            return
        self._shown = now
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else math.nan
        say(
            f"{self.label} {self.done}/{self.total}  {elapsed:.0f} s"
            + (f", ETA {eta:.0f} s" if self.done < self.total else "")
            + (f"  {note}" if note else "")
        )


def _shape(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"


@dataclass(frozen=True)
class Demand:
    """One request that Ray holds waiting: what it is and the resources it names."""

    text: str
    resources: frozenset[str]


def pending_demands() -> list[Demand]:
    """What Ray holds waiting for resources, as ``ray status`` lists it: each pending placement
    group's bundles (Ray Train's workers, a Tune trial) and the shapes of the pending tasks
    and actors (Ray Data's reads, an evaluation task), ``{name: amount, ...}`` each."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    demands = status.resource_demands
    out = []
    for group in demands.placement_group_demand:
        bundles = " + ".join(f"{r.count} x {_shape(r.bundle)}" for r in group.bundles_by_count)
        names = frozenset(k for r in group.bundles_by_count for k in r.bundle)
        out.append(Demand(f"a placement group of {bundles}", names))
    for demand in demands.ray_task_actor_demand:
        for request in demand.bundles_by_count:
            text = f"{request.count} task(s)/actor(s) of {_shape(request.bundle)}"
            out.append(Demand(text, frozenset(request.bundle)))
    return out


def cluster_offer(asked: Iterable[str] = ()) -> str:
    """The cluster's logical resources, free of total (``CPU 0/4, GPU 0/0, ...``): CPUs, GPUs,
    its custom resources and those ``asked`` for, which it may not have at all."""
    total, free = ray.cluster_resources(), ray.available_resources()
    custom = {
        k
        for k in [*total, *asked]
        if k not in ("CPU", "GPU", "memory", "object_store_memory")
        and not k.startswith(("node:", "accelerator_type:"))
    }
    names = ["CPU", "GPU", *sorted(custom)]
    return ", ".join(f"{k} {free.get(k, 0):g}/{total.get(k, 0):g}" for k in names)


@contextlib.contextmanager
def report_waits(wait_s: float | None, poll_s: float | None = None) -> Iterator[None]:
    """Around a run's ``fit()``: once Ray has held requests pending for ``wait_s`` seconds
    (``resource_wait_s``) without a break (0 or None: never), say one line with what waits and
    what the cluster offers; again while the wait goes on, after twice as long each time."""
    wait_s = wait_s or 0.0
    if wait_s <= 0:
        yield
        return
    interval = poll_s or min(5.0, wait_s / 3)
    since: float | None = None
    after = wait_s

    def watch() -> None:
        nonlocal since, after
        try:
            demands = pending_demands()
        except Exception:  # noqa: BLE001 - a status call that fails says nothing
            return
        now = time.monotonic()
        if not demands:
            since, after = None, wait_s
        elif since is None:
            since = now
        elif now - since >= after:
            asked = {name for demand in demands for name in demand.resources}
            say(
                f"waiting {now - since:.0f} s for resources: "
                f"{'; '.join(demand.text for demand in demands)}. "
                f"The cluster has (free/total) {cluster_offer(asked)}; `ray status` "
                "shows the pending demands, resource_wait_s when this is said"
            )
            after *= 2

    with _every(interval, watch, "resource-waits"):
        yield
