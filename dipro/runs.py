"""The run directory: its file names, its metrics log and the best-metric tracker.

Every trainer writes one kind of run directory and every reader (evaluation, Tune, the ablation
and seed studies, the report, the console, tracking) reads it through this module:

| file                     | written by                        | holds                             |
|--------------------------|-----------------------------------|-----------------------------------|
| ``epoch_metrics.jsonl``  | the Ray Train worker (rank 0)     | one JSON line per epoch           |
| ``round_metrics.jsonl``  | the federated server              | one JSON line per round           |
| ``checkpoint_*/model.pt``| the Ray Train worker              | ``dipro.checkpoint`` payload      |
| ``checkpoint_*/config.json`` | the Ray Train worker          | the run's resolved configuration  |
| ``best.pt``, ``last.pt`` | the federated server              | ``dipro.checkpoint`` payload      |

A metrics log is rewritten whole (temp file + rename) with each new line; the lines of this and
later steps (``epoch`` or ``round``) are dropped first, so a step that a failed attempt logged
before its checkpoint appears once, as its retry wrote it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from dipro import storage

CHECKPOINT_FILE = "model.pt"
RUN_CONFIG_FILE = "config.json"
EPOCH_METRICS_FILE = "epoch_metrics.jsonl"
ROUND_METRICS_FILE = "round_metrics.jsonl"


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
        if not math.isnan(value) and (
            self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        ):
            self.best, self.bad_steps = value, 0
            return True
        self.bad_steps += 1
        return False

    def exhausted(self, patience: int | None) -> bool:
        """Whether ``patience`` steps have passed without improvement (never when None)."""
        return patience is not None and self.bad_steps >= int(patience)
