"""Ray nodes started with ``ray start`` on loopback for tests, and stopped by their own process
group (never ``ray stop``, which would kill every Ray process on the host)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_nodes

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # The dashboard gets 60 s to start and each of its modules 30 s by default: too short on a
    # loaded 2-core CI machine.
    env["RAY_DASHBOARD_STARTUP_TIMEOUT_S"] = "300"
    env["RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT"] = "240"
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "300"
    env.pop("RAY_ADDRESS", None)
    return env


def _node_ports() -> list[str]:
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


class LocalCluster:
    """A head node (and optionally worker nodes) on 127.0.0.1 in a private temp dir."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self._procs: list[subprocess.Popen] = []

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = Path(self.temp_dir) / f"node{len(self._procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", *args, *_node_ports()],
                env={**_env(), **(extra_env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)

    def logs(self) -> str:
        """What the ``ray start`` processes printed (for failure messages)."""
        return "\n".join(
            p.read_text(errors="replace") for p in Path(self.temp_dir).glob("node*.log")
        )

    def start_head(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        self._start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}",
                f"--num-cpus={num_cpus}",
                f"--resources={json.dumps(resources or {})}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--temp-dir={self.temp_dir}",
            ]
        )
        self.client(timeout=360)

    def add_worker(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        """Start a worker node and wait until the cluster counts it alive (one retry: a raylet
        gets only 30 s to register, which a loaded machine can miss)."""
        expected = self.alive_nodes() + 1
        for _ in range(2):
            self._start(
                [
                    f"--address=127.0.0.1:{self.gcs_port}",
                    "--node-ip-address=127.0.0.1",
                    f"--num-cpus={num_cpus}",
                    f"--resources={json.dumps(resources or {})}",
                ]
            )
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and self._procs[-1].poll() is None:
                if self.alive_nodes() >= expected:
                    return
                time.sleep(3)
        raise RuntimeError(f"the worker node did not join:\n{self.logs()}")

    def alive_nodes(self) -> int:
        nodes = list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")])
        return len(nodes)

    def client(self, timeout: float = 60) -> JobSubmissionClient:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return JobSubmissionClient(self.dashboard)
            except Exception as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no Ray dashboard at {self.dashboard}:\n{self.logs()}"
                    ) from err
                time.sleep(2)

    def submit(
        self, entrypoint: str, working_dir: str | None, env_vars: dict[str, str] | None = None
    ) -> str:
        """Submit with ``ray job submit`` (the CLI users run) and return the job id. With
        ``working_dir=None`` the job runs the project as installed on the nodes; ``env_vars``
        go to the job's environment (``--runtime-env-json``)."""
        shipped = ["--working-dir", working_dir] if working_dir else []
        if env_vars:
            shipped += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        proc = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                self.dashboard,
                *shipped,
                "--no-wait",
                "--",
                *entrypoint.split(),
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
        for line in proc.stdout.splitlines():
            if "submitted successfully" in line:
                return line.split("'")[1]
        raise AssertionError(f"no job id in:\n{proc.stdout}\n{proc.stderr}")

    def working_dir_copies(self) -> list[Path]:
        """The unpacked ``--working-dir`` copies the nodes hold now (jobs run in them)."""
        unpacked = Path(self.temp_dir).glob("session_2*/runtime_resources/working_dir_files/*")
        return sorted(path for path in unpacked if path.is_dir())  # (session_latest: a link)

    def wait(self, job_id: str, timeout: float) -> tuple[JobStatus, str]:
        client = self.client()
        deadline = time.monotonic() + timeout
        status = client.get_job_status(job_id)
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(1)
            status = client.get_job_status(job_id)
        if not status.is_terminal():
            client.stop_job(job_id)
        return status, client.get_job_logs(job_id)

    def stop(self) -> None:
        """Stop every process this cluster started, by process group; workers first."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
