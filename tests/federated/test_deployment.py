"""The deployment of docs/federated.md on loopback: a SuperLink with TLS and node
authentication, three registered SuperNodes each over its own hospital's shards, a fourth node
whose key is not registered, and three rounds submitted with ``flwr run``, in which one site
crashes while training and rejoins. (SecAgg+ runs through the same ServerApp and ClientApp in
``tests/federated/test_secure_aggregation.py``.)

Every process is started in a session of its own and stopped by its process group; every wait
is bounded."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, TASK, TINY
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dipro.checkpoint import load_checkpoint
from dipro.data.layout import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

BIN = Path(sys.executable).parent
FEDERATION = "hospitals"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_tls(directory: Path) -> None:
    """ca.crt, and server.pem/server.key signed by it for localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("dipro test CA"))
        .issuer_name(_name("dipro test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(server.public_bytes(pem))
    (directory / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _write_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: (private key, public key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    private.chmod(0o600)
    return private, public


class Processes:
    """Long-running processes of the test, each in its own session, stopped by group."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.started: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []

    def port(self) -> int:
        """A free loopback port; processes whose command line names it are stopped too."""
        port = _free_port()
        self.ports.append(port)
        return port

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._stop_detached()

    def _stop_detached(self) -> None:
        """Stop what the SuperLink and SuperNodes started in sessions of their own (ServerApp,
        ClientApp, SuperExec processes): they name one of this test's ports."""
        self.kill_naming(*self.ports)

    def kill_naming(self, *ports: int) -> list[int]:
        """SIGKILL every process whose command line names ``127.0.0.1:{port}`` of one of
        ``ports`` (or, for a process this test started, ``--port {port}``); their ids."""
        markers = [f"127.0.0.1:{port}" for port in ports]
        killed = []
        for proc in self.started:
            command = f"{' '.join(proc.args)} "
            if proc.poll() is None and any(f"--port {p} " in command for p in ports):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
                killed.append(proc.pid)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(marker in cmdline for marker in markers):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
        return killed


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    env = {
        **os.environ,
        # the SuperLink and SuperNodes start flower-superexec from PATH
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(env, logs)
    yield procs
    procs.stop_all()


def _flwr(procs: Processes, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        cwd=REPO,
        env=procs.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _until(what: str, deadline: float, check) -> object:  # noqa: ANN001
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(2)


@dataclass(frozen=True)
class Deployment:
    """A SuperLink with TLS and node authentication on 127.0.0.1, and its sites' keys."""

    processes: Processes
    port: int
    certs: Path
    keys: list[tuple[Path, Path]]  # (private, public) of sites 0, 1, 2, 3
    site_ports: dict[int, int] = field(default_factory=dict)

    def register(self, site: int, deadline: float) -> int:
        """Register site ``site``'s public key; its node id."""
        public = self.keys[site][1]

        def registered() -> re.Match[str] | None:
            if self.processes.started[0].poll() is not None:
                raise AssertionError(self.processes.log("superlink"))
            done = _flwr(
                self.processes, "supernode", "register", str(public), FEDERATION,
                "--format", "json",
            )  # fmt: skip
            return re.search(r'"node-id": (\d+)', done.stdout) if done.returncode == 0 else None

        return int(_until(f"registering {public.name}", deadline, registered).group(1))

    def start_supernode(
        self, site: int, data_root: Path, name: str = ""
    ) -> subprocess.Popen[bytes]:
        """Start site ``site``'s SuperNode (again: on the same ClientAppIo port)."""
        port = self.site_ports.setdefault(site, self.processes.port())
        return self.processes.start(
            name or f"supernode{site}",
            [
                str(BIN / "flower-supernode"),
                "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(self.certs / "ca.crt"),
                "--auth-supernode-private-key", str(self.keys[site][0]),
                "--node-config", f'data-path="{data_root}" hospital-id={site}',
                "--port", str(port),
            ],
        )  # fmt: skip

    def kill_site(self, site: int) -> None:
        """SIGKILL site ``site``'s SuperNode and every process it started (they name its
        ClientAppIo port), as a crash of the site's machine would."""
        self.processes.kill_naming(self.site_ports[site])

    def run(self, overrides: list[str]) -> int:
        """Submit the project with ``flwr run``; the run id."""
        submitted = _flwr(
            self.processes, "run", ".", FEDERATION, "--run-config",
            f'overrides="{" ".join(overrides)}"', "--format", "json",
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        return int(json.loads(submitted.stdout)["run-id"])

    def status(self, run_id: int) -> str:
        listed = _flwr(
            self.processes, "ls", FEDERATION, "--run-id", str(run_id), "--format", "json"
        )
        return json.loads(listed.stdout)["runs"][0]["status"] if listed.returncode == 0 else ""

    def server_log(self, run_id: int) -> str:
        return _flwr(self.processes, "log", str(run_id), FEDERATION, "--show").stdout

    def wait_finished(self, run_id: int, timeout_s: float) -> str:
        """The run's final status; an AssertionError with the ServerApp's log past
        ``timeout_s``."""

        def finished() -> str | None:
            status = self.status(run_id)
            return status if status.startswith("finished") else None

        try:
            return _until(f"run {run_id} to finish", time.monotonic() + timeout_s, finished)
        except TimeoutError as err:
            log = self.server_log(run_id)[-4000:]
            raise AssertionError(f"{err}; the ServerApp's log ends:\n{log}") from err


@pytest.fixture
def deployment(tmp_path: Path, processes: Processes) -> Deployment:
    """A running SuperLink with TLS and node authentication, the ``flwr`` CLI configured for
    it, and four sites' key pairs (none registered yet)."""
    certs = tmp_path / "certs"
    certs.mkdir()
    _write_tls(certs)
    port = processes.port()
    processes.start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(port),
        ],
    )  # fmt: skip
    home = Path(processes.env["FLWR_HOME"])
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    keys = [_write_node_key(certs, f"site{h}") for h in (0, 1, 2, 3)]
    return Deployment(processes, port, certs, keys)


def _clientapps(port: int) -> set[int]:
    """Ids of the ClientApp processes that the SuperNode with ClientAppIo ``port`` runs."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flwr-clientapp" in cmdline and f"127.0.0.1:{port}" in cmdline:
            found.add(int(entry.name))
    return found


def _rounds(out: Path) -> list[dict]:
    log = out / "round_metrics.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_a_site_killed_in_training_rejoins_a_later_round(tiny_data_root, tmp_path, deployment):
    """Sites 0-2 are registered; site 3's key never is, so its SuperNode is never admitted.
    Site 2 is killed while it trains round 1 and started again: round 1 completes without it,
    round 3 with it (round 2 starts as soon as round 1 ends, with or without it), and the final
    model is scored at the three registered sites.

    The coordinator selects the best round on a held-out set of its own (``server.eval_data``)
    and asks the sites for no evaluation during the rounds: a deployed SuperNode starts a
    ClientApp process for every message, about 30 s on two cores for three sites at once."""
    held_out = tmp_path / "held-out"
    shutil.copytree(tiny_data_root, held_out)
    deadline = time.monotonic() + 180
    nodes = [deployment.register(site, deadline) for site in (0, 1, 2)]
    for site in (0, 1, 2, 3):
        deployment.start_supernode(site, tiny_data_root)
    out = tmp_path / "run"
    run_id = deployment.run(
        [
            *TINY,
            f"data.root={tiny_data_root}",
            f"out_dir={out}",
            "federated.num_rounds=3",
            "federated.min_sites=2",
            "federated.fraction_evaluate=0",
            f"server.eval_data={held_out}",
            "federated.wait_for_sites_s=120",
            # a round waits this long for a site that took its task and died
            "federated.round_timeout_s=120",
        ]
    )
    site_port = deployment.site_ports[2]

    # Kill site 2 while it trains round 1: its SuperNode has received round 1's train message
    # and not yet sent the reply.
    def training_round_1() -> bool:
        log = deployment.processes.log("supernode2")
        received, sent = log.count("Receiving: train message"), log.count("Sending: train message")
        return received == 1 and sent == 0 and bool(_clientapps(site_port))

    _until("site 2's round-1 training", time.monotonic() + 900, training_round_1)
    time.sleep(2)
    assert deployment.processes.log("supernode2").count("Sending: train message") == 0, (
        "site 2 finished round 1's training before it was killed"
    )
    deployment.kill_site(2)
    assert not _clientapps(site_port)
    # Once site 2 has missed two heartbeats (60 s by default) the SuperLink counts its node
    # offline and answers for its lost task ("Node Unavailable"), and round 1 ends without it.
    # Site 2 is started again after that: a SuperNode that the SuperLink activates before it has
    # answered for the lost task leaves that task pending, and round 1 waits out
    # federated.round_timeout_s instead.
    _until("round 1 to end", time.monotonic() + 300, lambda: _rounds(out)[1:])
    # A node id still counted online is refused (the SuperNode exits with code 305): start it
    # again until the SuperLink activates it, as a supervisor with a restart policy would.
    activated = f"Activated node_id={nodes[2]}"
    restarts: list[subprocess.Popen[bytes]] = []

    def rejoined() -> bool:
        if deployment.processes.log("superlink").count(activated) == 2:
            return True
        if not restarts or restarts[-1].poll() is not None:
            time.sleep(5 if restarts else 0)
            restarts.append(
                deployment.start_supernode(2, tiny_data_root, name=f"restart{len(restarts)}")
            )
        return False

    _until("site 2 to rejoin", time.monotonic() + 300, rejoined)
    round_3_sent = deployment.processes.log("supernode0").count("Receiving: train message") > 2
    assert not round_3_sent, "round 3 began before site 2 was back"  # round 2 takes ~30 s

    status = deployment.wait_finished(run_id, 900)
    assert status == "finished:completed", deployment.server_log(run_id)[-4000:]
    scored, *lines = _rounds(out)
    assert scored["round"] == 0  # the initial model, scored on the held-out set
    assert [line["round"] for line in lines] == [1, 2, 3]  # each round once
    assert all("val/auroc" in line and line["sites"]["evaluated"] == 0 for line in lines)
    trained = [line["sites"]["trained_nodes"] for line in lines]
    assert trained[0] == sorted(nodes[:2]) and trained[2] == sorted(nodes), trained
    assert trained[1] in (sorted(nodes[:2]), sorted(nodes)), trained
    assert lines[0]["sites"]["dropped_nodes"] == [nodes[2]]
    # the SuperLink answered for the dead site ("Node Unavailable"), or the round timed out
    assert all(f["node_id"] == nodes[2] for f in lines[0]["sites"]["train_failures"])
    assert lines[1]["sites"]["dropped_nodes"] == lines[2]["sites"]["dropped_nodes"] == []
    assert lines[0]["sites"]["updated"] == 2 and lines[2]["sites"]["updated"] == 3
    sampled = [line["sites"]["sampled"] for line in lines]
    assert sampled[0] == sampled[2] == 3 and sampled[1] in (2, 3), f"site 3 was admitted: {sampled}"
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == TASK and report["rounds"] == 3
    assert report["selected_on"] == "server.eval_data"
    assert load_checkpoint(report["final_checkpoint"])[1].extra["round"] == 3
    assert sorted(s["num_examples"] for s in report["site_test"]["sites"]) == sorted(
        read_manifest(tiny_data_root, TASK).counts["test"][str(h)] for h in (0, 1, 2)
    )
    shown = deployment.server_log(run_id)
    assert f"trained: nodes {sorted(nodes[:2])}, dropped: nodes {[nodes[2]]}" in shown
