"""A real ``mlflow server`` for the tests of tracking: a free loopback port, a SQLite store and
an artifact directory of its own, started in a process group of its own and stopped with it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A loopback port nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(home: Path, timeout_s: float = 600) -> Iterator[tuple[str, subprocess.Popen]]:
    """``(uri, process)`` of an ``mlflow server`` over ``home`` once it answers ``/health``
    (within ``timeout_s``); its process group is stopped at the end, whether or not a test
    killed the server already."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with (home / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                os.path.join(os.path.dirname(sys.executable), "mlflow"),
                "server",
                f"--backend-store-uri=sqlite:///{home / 'mlflow.db'}",
                f"--artifacts-destination={home / 'artifacts'}",
                "--host=127.0.0.1",
                f"--port={port}",
                "--workers=1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"mlflow server did not start in {timeout_s} s"
            time.sleep(0.5)
        yield uri, proc
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
