"""What leaves a failing or small site, and one writer per run directory: the real ClientApp
as the SuperNode calls it, ``python -m federated.simulate`` as a user runs it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, TINY, compose
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from tiny_model import RANDOM_BACKBONE_EXPECTED

from dipro.data.layout import MANIFEST_NAME, list_shards, read_manifest
from dipro.data.schema import SCHEMA
from dipro.model import build_model
from federated.client_app import FAILURE_CATEGORIES, app
from federated.config import parse_run, site_config, train_config_record
from federated.simulate import lock_run_directory, run_federated

pytestmark = RANDOM_BACKBONE_EXPECTED

LEAKS = re.compile(r"subject_id|stay_id|/split=")
DOCS = REPO / "docs" / "federated.md"


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def _ask(cfg, partition: int, message_type=MessageType.TRAIN, spoil: str | None = None) -> Message:
    """The real ClientApp's reply to the server's message (with ``spoil``: that array NaN)."""
    torch.manual_seed(0)
    model = build_model(cfg["model"], cfg["task"]["name"])
    if spoil is not None:
        model.state_dict()[spoil].fill_(float("nan"))
    config = train_config_record(site_config(parse_run(cfg)), 0)
    config["server-round"] = 1
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    msg = Message(content=content, dst_node_id=7, message_type=message_type)
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    return app(msg, context)


def _documented_list(section: str) -> set[str]:
    """The backquoted names of a ``<!-- section -->`` list in docs/federated.md."""
    text = DOCS.read_text().split(f"<!-- {section} -->", 1)[1].split("<!-- end -->", 1)[0]
    return set(re.findall(r"^- `([^`]+)`", text, flags=re.M))


def test_a_site_with_a_bad_shard_tells_the_server_only_a_category(
    tiny_data_root, tmp_path, tree_checksums
):
    data = tmp_path / "shards"
    shutil.copytree(tiny_data_root, data)
    (bad,) = list_shards(data, "mortality", "train", hospitals=(1,))[:1]
    Path(bad).write_bytes(b"PAR1 not a parquet file PAR1")
    before = tree_checksums(data)
    cfg = compose(data, tmp_path / "run", "train.max_steps_per_epoch=1")

    reply = _ask(cfg, partition=1)

    assert reply.has_error()
    assert reply.error.reason == "site failed: site-data"
    assert reply.error.code == FAILURE_CATEGORIES["site-data"]
    assert not LEAKS.search(reply.error.reason)
    site_log = (tmp_path / "run-site-logs" / "site-1.log").read_text()
    assert "Traceback" in site_log and "/split=train/hospital=1/" in site_log
    assert tree_checksums(data) == before
    assert set(FAILURE_CATEGORIES) == _documented_list("failure categories")


def test_a_model_that_predicts_nan_is_a_model_output_failure_not_bad_data(tiny_data_root, tmp_path):
    cfg = compose(tiny_data_root, tmp_path / "run")
    reply = _ask(cfg, 0, MessageType.EVALUATE, spoil="heads.heads.0.3.bias")
    assert reply.has_error()
    assert reply.error.reason == "site failed: model-output"
    site_log = (tmp_path / "run-site-logs" / "site-0.log").read_text()
    assert "NonFiniteOutputError: the model's outputs are not finite for" in site_log


def test_replies_carry_exactly_the_documented_metrics(tiny_data_root, tmp_path):
    cfg = compose(tiny_data_root, tmp_path / "run", "train.max_steps_per_epoch=1")
    train = _ask(cfg, partition=0)
    evaluate = _ask(cfg, partition=0, message_type=MessageType.EVALUATE)
    assert not train.has_error() and not evaluate.has_error()
    sent = set(train.content["metrics"]) | set(evaluate.content["metrics"])
    documented = _documented_list("metrics")
    assert sent <= documented, sent - documented
    assert {"num-examples", "train-loss", "val-loss"} <= sent
    assert set(train.content.array_records) == {"arrays"}


def test_a_site_below_the_minimum_count_reports_nothing(tiny_data_root, tmp_path):
    manifest = read_manifest(tiny_data_root, "mortality")
    val_rows = manifest.counts["val"].get("0", 0)
    cfg = compose(tiny_data_root, tmp_path / "run", f"federated.min_report_count={val_rows + 1}")
    reply = _ask(cfg, partition=0, message_type=MessageType.EVALUATE)
    assert reply.has_error() and reply.error.reason == "site failed: too-few-examples"
    assert not reply.has_content()


def test_a_site_at_the_minimum_count_reports(tiny_data_root, tmp_path):
    val_rows = read_manifest(tiny_data_root, "mortality").counts["val"]["0"]
    assert val_rows > 1
    cfg = compose(tiny_data_root, tmp_path / "run", f"federated.min_report_count={val_rows}")
    reply = _ask(cfg, partition=0, message_type=MessageType.EVALUATE)
    assert not reply.has_error()
    assert reply.content["metrics"]["num-examples"] == val_rows


def test_a_second_launcher_on_a_locked_run_directory_is_refused(
    tiny_data_root, tmp_path, entrypoint, tree_checksums
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "round_metrics.jsonl").write_text('{"round": 0}\n')
    lock = lock_run_directory(out)  # this process plays the launcher still running
    before = tree_checksums(out)
    try:
        code, lines = entrypoint(
            "federated.simulate", *compose_args(tiny_data_root, out), "federated.num_rounds=1"
        )
    finally:
        os.close(lock)
    assert code == 2 and len(lines) == 1
    assert lines[0] == (
        f"run directory error: {out} is in use by process {os.getpid()} (a simulation of this "
        "run is still going); wait for it to end or stop it before starting this run again"
    )
    assert tree_checksums(out) == before


def compose_args(data_root: Path, out: Path) -> list[str]:
    return [*TINY, f"data.root={data_root}", f"out_dir={out}"]


def _descendants(pid: int) -> set[int]:
    """Every live process whose ancestry (or session) leads to ``pid``."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,sid="], capture_output=True, text=True).stdout
    rows = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    found, frontier = set(), {pid}
    while frontier:
        found |= frontier
        frontier = {p for p, pp, _ in rows if pp in frontier} - found
    sessions = {s for p, _, s in rows if p in found and p != pid}
    return {p for p, _, s in rows if p in found or s in sessions} - {pid}


@pytest.mark.slow
@pytest.mark.ray
def test_killing_the_launchers_group_stops_the_whole_simulation(tiny_data_root, tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "federated.simulate",
            *compose_args(tiny_data_root, out),
            "federated.num_rounds=20",
            "simulation.timeout_s=900",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (out / "round_metrics.jsonl").exists():
        time.sleep(1)
    simulation = {pid: _command(pid) for pid in _descendants(launcher.pid)}
    assert simulation, "the simulation never started"
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    try:
        _wait_for_exit(set(simulation), 10)
        alive = {pid: simulation[pid] for pid in _alive(set(simulation))}
        assert not alive, f"still running 10 s after SIGKILL of the launcher: {alive}"
    finally:
        for pid in _alive(set(simulation)):  # no orphaned Ray left for the tests after this one
            os.kill(pid, signal.SIGKILL)


def _wait_for_exit(pids: set[int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _alive(pids):
        time.sleep(0.5)


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except FileNotFoundError:
        return "(exited)"


def _alive(pids: set[int]) -> set[int]:
    live = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(") ", 1)[1][0] != "Z":
                    live.add(pid)
        except FileNotFoundError:
            continue
    return live


def _spoil_first_record(root: Path, hospital: int) -> str:
    """Set the first training record of ``hospital`` to ``mortality = 2`` (its shard's sha256
    updated in the manifest, as a faulty writer would); returns that record's stay id."""
    (shard,) = list_shards(root, "mortality", "train", hospitals=(hospital,))[:1]
    rows = pq.read_table(shard, partitioning=None).to_pylist()
    rows[0]["mortality"] = 2
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), shard, compression="zstd")
    manifest_path = root / "mortality" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    relative = Path(shard).relative_to(root / "mortality").as_posix()
    manifest["files"][relative] = hashlib.sha256(Path(shard).read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return str(rows[0]["stay_id"])


@pytest.mark.slow
def test_a_bad_record_at_one_site_and_too_little_val_data_at_others_leak_nothing(
    tiny_data_root, tmp_path
):
    """Through the real simulation: hospital 1 has a bad training record, hospitals 1 and 2
    have fewer validation samples than the reporting minimum. The round completes on the
    others; nothing the server wrote names a patient or a shard; the site's log has it all."""
    data, out = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(tiny_data_root, data)
    stay_id = _spoil_first_record(data, hospital=1)
    val_counts = read_manifest(data, "mortality").counts["val"]
    minimum = max(val_counts.values())
    assert sorted(val_counts.values()) != [minimum] * 3  # some site is below it
    cfg = compose(
        data,
        out,
        "federated.num_rounds=1",
        f"federated.min_report_count={minimum}",
        "simulation.timeout_s=900",
    )
    result = run_federated(cfg)

    assert result.rounds == 1
    (line,) = [json.loads(x) for x in (out / "round_metrics.jsonl").read_text().splitlines()]
    sites = line["sites"]
    assert sites["sampled"] == 3 and sites["updated"] == 2
    assert [f["reason"] for f in sites["train_failures"]] == ["site failed: site-data"]
    reasons = sorted(f["reason"] for f in sites["evaluate_failures"])
    assert reasons == ["site failed: site-data", "site failed: too-few-examples"]
    # hospital 0 has enough validation samples: it alone scored the round
    (reported,) = sites["val"]
    assert reported["num_examples"] == val_counts["0"] == minimum
    assert line["train/loss"] > 0
    assert line["val/loss"] == reported["loss"] and "auprc" in reported
    for path in out.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", errors="ignore")
            assert not LEAKS.search(text), path
            assert stay_id not in text or path.suffix in (".pt", ".parquet"), path
    site_log = (tmp_path / "run-site-logs" / "site-1.log").read_text()
    assert f"stay_id={stay_id}" in site_log and "field 'mortality'" in site_log
