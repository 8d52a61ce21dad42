"""The deployment of docs/federated.md on loopback: a SuperLink with TLS and node
authentication, two registered SuperNodes each over its own hospital's shards, a third node
whose key is not registered, and two rounds submitted with ``flwr run`` and aggregated with
SecAgg+ (``federated.secure``).

Every process is started in a session of its own and stopped by its process group; every wait
is bounded."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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
        markers = [f"127.0.0.1:{port}" for port in self.ports]
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


def test_tls_and_node_auth_deployment_runs_secure_rounds(tiny_data_root, tmp_path, processes):
    certs = tmp_path / "certs"
    certs.mkdir()
    _write_tls(certs)
    port = processes.port()
    superlink = processes.start(
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
    deadline = time.monotonic() + 180

    keys = [_write_node_key(certs, f"site{h}") for h in (0, 1, 2)]
    for _, public in keys[:2]:  # site 2's key is never registered
        _until(
            f"registering {public.name}",
            deadline,
            lambda public=public: (
                superlink.poll() is None
                and _flwr(processes, "supernode", "register", str(public), FEDERATION).returncode
                == 0
            ),
        )
    for hospital, (private, _) in enumerate(keys):
        processes.start(
            f"supernode{hospital}",
            [
                str(BIN / "flower-supernode"),
                "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(certs / "ca.crt"),
                "--auth-supernode-private-key", str(private),
                "--node-config", f'data-path="{tiny_data_root}" hospital-id={hospital}',
                "--port", str(processes.port()),
            ],
        )  # fmt: skip

    out = tmp_path / "run"
    overrides = " ".join(
        [
            *TINY,
            f"data.root={tiny_data_root}",
            f"out_dir={out}",
            "federated.num_rounds=2",  # round 2 starts from a secure aggregate
            "federated.min_sites=2",
            "federated.wait_for_sites_s=120",
            "federated.secure.enabled=true",
        ]
    )
    submitted = _flwr(
        processes, "run", ".", FEDERATION, "--run-config", f'overrides="{overrides}"',
        "--format", "json",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = json.loads(submitted.stdout)["run-id"]

    def finished() -> str | None:
        listed = _flwr(processes, "ls", FEDERATION, "--run-id", str(run_id), "--format", "json")
        status = json.loads(listed.stdout)["runs"][0]["status"] if listed.returncode == 0 else ""
        return status if status.startswith("finished") else None

    def server_log() -> str:
        return _flwr(processes, "log", str(run_id), FEDERATION, "--show").stdout

    # Every SecAgg+ stage and every evaluation starts a fresh ClientApp process per site (11 per
    # site for two rounds, each importing torch): about 285 s on an idle 2-core machine.
    try:
        status = _until(f"run {run_id} to finish", time.monotonic() + 660, finished)
    except TimeoutError as err:
        raise AssertionError(f"{err}; the ServerApp's log ends:\n{server_log()[-4000:]}") from err
    assert status == "finished:completed", processes.log("superlink")

    lines = [json.loads(x) for x in (out / "round_metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert line["sites"]["sampled"] == line["sites"]["updated"] == 2, "site 2 joined"
        assert line["sites"]["evaluated"] == 2 and not line["sites"]["train_failures"]
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == TASK and report["rounds"] == 2
    assert report["secure_aggregation"]["enabled"]
    shown = server_log()
    for rnd in (1, 2):
        assert f"round {rnd}: SecAgg+ unmasked the sum of 2 site(s)' updates" in shown
    assert load_checkpoint(report["final_checkpoint"])[1].extra["round"] == 2
    assert sorted(s["num_examples"] for s in report["site_test"]["sites"]) == sorted(
        read_manifest(tiny_data_root, TASK).counts["test"][str(h)] for h in (0, 1)
    )
