"""The coordinator holds no patients: with the defaults the server process opens no file of the
sites' dataset (watched with ``strace`` on the real simulation, which also runs DP to its
epsilon target), the sites score every round and the selected model; a coordinator that owns a
held-out set (``server.eval_data``) reads exactly that set's evaluation shards and selects on
it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TASK, TINY

from dipro.data.layout import list_shards
from dipro.evaluation import evaluate_checkpoint
from federated.privacy import PrivacyBudget

pytestmark = pytest.mark.slow

CALL = re.compile(r"^(?P<call>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)")
OPENED = re.compile(r'^openat\([^,]+, "(?P<path>[^"]+)"')


def _server_opens(trace_dir: Path) -> list[str]:
    """The files the simulation's coordinator process (any of its threads) opened, from the
    per-thread files of ``strace -ff``: the thread that exec'd ``federated.sim_process`` and
    the threads it and they cloned with CLONE_THREAD (Ray's processes are not among them)."""
    calls = {
        int(path.suffix[1:]): path.read_text(errors="replace").splitlines()
        for path in trace_dir.glob("trace.*")
    }
    (root,) = [
        tid
        for tid, lines in calls.items()
        if any(line.startswith("execve(") and "federated.sim_process" in line for line in lines)
    ]
    threads, todo = {root}, [root]
    while todo:
        for line in calls.get(todo.pop(), []):
            match = CALL.match(line)
            if match and match["call"] in ("clone", "clone3") and "CLONE_THREAD" in match["args"]:
                tid = int(match["ret"])
                if tid > 0 and tid not in threads:
                    threads.add(tid)
                    todo.append(tid)
    return [
        opened["path"]
        for tid in threads
        for line in calls.get(tid, [])
        if (opened := OPENED.match(line)) and int(CALL.match(line)["ret"]) >= 0
    ]


def _simulate_traced(data_root: Path, tmp_path: Path, *overrides: str) -> tuple[Path, list[str]]:
    traces, out = tmp_path / "traces", tmp_path / "run"
    traces.mkdir()
    command = [
        # --seccomp-bpf: only the traced calls stop the processes (Ray's many others do not)
        "strace", "--seccomp-bpf", "-ff", "-qq", "-e", "trace=openat,clone,clone3,execve",
        "-o", str(traces / "trace"),
        sys.executable, "-m", "federated.simulate", *TINY, f"data.root={data_root}",
        f"out_dir={out}", "federated.num_rounds=1", "simulation.timeout_s=900",
        "tracking.enabled=false", *overrides,
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=1200, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, [p for p in _server_opens(traces) if p.startswith(str(data_root))]


def _rounds(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "round_metrics.jsonl").read_text().splitlines()]


def test_the_coordinator_reads_no_data_and_a_dp_run_stops_at_its_target(tiny_data_root, tmp_path):
    """With the defaults (and DP whose epsilon target allows one of three rounds): the server
    opens no file of the sites' data, the sites score the round and the selected model, and the
    run reports its epsilon and stops at the target."""
    budget = PrivacyBudget(noise_multiplier=1.0, delta=1e-5)
    target = (budget.epsilon(1) + budget.epsilon(2)) / 2  # one round fits, two do not
    out, opened = _simulate_traced(
        tiny_data_root,
        tmp_path,
        "federated.num_rounds=3",
        "federated.dp.enabled=true",
        "federated.dp.noise_multiplier=1.0",
        "federated.dp.clipping_norm=0.1",
        f"federated.dp.target_epsilon={target}",
    )

    assert opened == [], f"the server process opened the sites' data: {opened}"
    (line,) = _rounds(out)
    assert line["round"] == 1 and line["dp/epsilon"] == pytest.approx(budget.epsilon(1))
    assert line["sites"]["evaluated"] == 3 and len(line["sites"]["val"]) == 3
    assert "val/auroc" in line and not any(k.startswith("sites/val/") for k in line)
    report = json.loads((out / "metrics.json").read_text())
    assert report["rounds"] == 1
    assert report["privacy"]["epsilon"] == pytest.approx(budget.epsilon(1))
    assert report["privacy"]["delta"] == 1e-5
    assert report["selected_on"] == "sites" and len(report["site_test"]["sites"]) == 3
    assert str(REPO) not in json.dumps(report["site_test"])  # counts and scores, no paths


def test_a_coordinator_with_its_own_held_out_set_reads_only_its_evaluation_shards(
    tiny_data_root, tmp_path
):
    held_out = tmp_path / "held-out"
    shutil.copytree(tiny_data_root, held_out)
    out, opened = _simulate_traced(tiny_data_root, tmp_path, f"server.eval_data={held_out}")

    assert opened == [], "with server.eval_data the sites' dataset is still theirs alone"
    central = [p for p in _server_opens(tmp_path / "traces") if p.startswith(str(held_out))]
    shards = {p for p in central if p.endswith(".parquet")}
    expected = set(list_shards(held_out, TASK, "val")) | set(list_shards(held_out, TASK, "test"))
    assert shards == expected
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [0, 1]  # the initial model is scored centrally
    assert "val/auroc" in rounds[1] and "sites/val/auroc" in rounds[1]
    report = json.loads((out / "metrics.json").read_text())
    assert report["selected_on"] == "server.eval_data"
    rescored = evaluate_checkpoint(
        report["best_checkpoint"], list_shards(held_out, TASK, "test"), batch_size=16
    )
    assert rescored.metrics == pytest.approx(report["test"], nan_ok=True)
    assert len(report["site_test"]["sites"]) == 3
