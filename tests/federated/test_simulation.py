"""The real federated run on Flower's Ray simulation backend (``run_federated``): three
simulated hospitals, per-round metrics, checkpoints, resume, the same numbers when run again,
and an unreachable minimum of sites (a failing site: ``test_secure_aggregation.py``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from conftest import TASK, compose

from dipro.checkpoint import load_checkpoint
from dipro.data.layout import list_shards, read_manifest
from dipro.data.normalize import NORM_COLUMNS, fit_norm_stats
from dipro.data.shard_reader import read_table
from dipro.evaluation import evaluate_checkpoint
from dipro.runs import checkpoint_files
from dipro.settings import TrackingSettings
from dipro.tracking import Tracker
from federated.server import FederatedResult
from federated.simulate import FederatedRunError, run_federated

TWO_ROUNDS = ("federated.num_rounds=2", "simulation.timeout_s=900")
# The round log's wall-clock fields: the only ones a rerun may change.
WALL_CLOCK = ("seconds",)
# MLflow 3.17's SQLite store (the pinned version) configures its mappers with SQLAlchemy's
# deprecated ``noload`` loader; the warning comes from MLflow's code, once per process.
MLFLOW_NOLOAD = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"
)


def _rounds(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "round_metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rounds(
    tiny_data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, FederatedResult, list[dict]]:
    """A three-site, two-round run: its directory, result and round log as it finished (the
    resume test goes on from it, the repeat test runs it again)."""
    out = tmp_path_factory.mktemp("two-rounds") / "run"
    result = run_federated(compose(tiny_data_root, out, *TWO_ROUNDS))
    return out, result, _rounds(out)


def _site_scores(data_root: Path, checkpoint: str, split: str) -> list[tuple[int, float]]:
    """(count, AUROC) of ``checkpoint`` on each hospital's ``split``, normalised with that
    hospital's own training statistics, as each site scores it."""
    manifest = read_manifest(data_root, TASK)
    out = []
    for hospital in manifest.hospitals:
        train = list_shards(data_root, TASK, "train", hospitals=[hospital])
        stats = fit_norm_stats(read_table([p], NORM_COLUMNS) for p in train)
        paths = list_shards(data_root, TASK, split, hospitals=[hospital])
        scored = evaluate_checkpoint(checkpoint, paths, batch_size=16, norm_stats=stats)
        out.append((len(scored.predictions), scored.metrics["auroc"]))
    return sorted(out)


def _weighted(entries: list[dict], key: str) -> float:
    finite = [(e["num_examples"], e[key]) for e in entries if math.isfinite(e[key])]
    if not finite:
        return math.nan  # e.g. AUROC where no site's split has both classes
    return sum(n * v for n, v in finite) / sum(n for n, _ in finite)


def _without_wall_clock(rounds: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rounds]


def _digits(value: object) -> str:
    """``value`` as JSON text: every float to the last digit, NaN included (an AUROC where no
    site's split has both classes), so that equal texts mean identical numbers."""
    return json.dumps(value, sort_keys=True)


@MLFLOW_NOLOAD
def test_three_sites_two_rounds_then_resume(tiny_data_root, two_rounds):
    out, result, rounds = two_rounds
    assert [r["round"] for r in rounds] == [1, 2]  # the coordinator has no data to score round 0
    val_counts = read_manifest(tiny_data_root, TASK).counts["val"]
    for r in rounds:
        sites = r["sites"]
        assert (sites["sampled"], sites["updated"], sites["evaluated"]) == (3, 3, 3)
        assert sites["train_failures"] == sites["evaluate_failures"] == []
        assert sorted(s["num_examples"] for s in sites["val"]) == sorted(val_counts.values())
        assert r["train/loss"] > 0
        assert r["val/loss"] == pytest.approx(_weighted(sites["val"], "loss"))
        assert r["val/auroc"] == pytest.approx(_weighted(sites["val"], "auroc"), nan_ok=True)
    model, meta = load_checkpoint(result.final_checkpoint)
    assert meta.task == TASK and meta.epoch == 2 and meta.extra["round"] == 2
    assert meta.norm_stats is None and meta.extra["site_normalisation"]
    report = json.loads((out / "metrics.json").read_text())
    assert {"task", "run_name", "seed", "best_checkpoint", "val", "test"} <= set(report)
    assert report["task"] == TASK and report["rounds"] == 2 and report["selected_on"] == "sites"
    site_test = report["site_test"]
    reported = sorted((s["num_examples"], s["auroc"]) for s in site_test["sites"])
    rescored = _site_scores(tiny_data_root, report["best_checkpoint"], "test")
    assert [n for n, _ in reported] == [n for n, _ in rescored]
    assert [a for _, a in reported] == pytest.approx([a for _, a in rescored], nan_ok=True)
    assert report["test"] == site_test["aggregate"]
    # a site whose test split holds one class has no AUROC, and the aggregate leaves it out
    assert any(math.isfinite(a) for _, a in reported)
    assert report["test"]["auroc"] == pytest.approx(_weighted(site_test["sites"], "auroc"))

    # started again with one round more after its newest checkpoint was damaged, it resumes from
    # round 1's (dipro.runs.resume_point, as a Ray Train run does) and plays rounds 2 and 3
    newest = checkpoint_files(str(out))[0]
    assert newest.endswith("checkpoint_000002/model.pt")
    data = Path(newest).read_bytes()
    Path(newest).write_bytes(data[: len(data) // 3])
    store = out.parent / "mlflow"  # tracked from this start on: the run's directory has the rest
    resumed = run_federated(
        compose(
            tiny_data_root, out, "federated.num_rounds=3", "simulation.timeout_s=900",
            "tracking.enabled=true", f"tracking.uri={store}",
        )
    )  # fmt: skip
    log = (out / "simulation.log").read_text()
    assert f"resume: skipped {newest}: not a loadable checkpoint" in log
    again = _rounds(out)
    assert [r["round"] for r in again] == [1, 2, 3]
    assert again[0] == rounds[0], "round 1 was played again instead of resumed"
    assert _digits(_without_wall_clock(again[1:2])) == _digits(_without_wall_clock(rounds[1:2]))
    assert resumed.rounds == 3 and load_checkpoint(resumed.final_checkpoint)[1].epoch == 3
    client = Tracker(TrackingSettings(enabled=True, uri=str(store))).client
    [tracked] = client.search_runs([client.get_experiment_by_name("dipro").experiment_id])
    steps = [m.step for m in client.get_metric_history(tracked.info.run_id, "val/loss")]
    assert sorted(steps) == [1, 2, 3]  # rounds 1 and 2 from the round log, 3 as it ended
    assert tracked.info.status == "FINISHED" and tracked.data.params["federated.num_rounds"] == "3"
    assert tracked.data.metrics["test/loss"] == pytest.approx(resumed.test_metrics["loss"])
    assert [a.path for a in client.list_artifacts(tracked.info.run_id)] == ["metrics.json"]


def test_a_two_round_run_repeated_writes_the_same_round_metrics(
    tiny_data_root, tmp_path, two_rounds
):
    _, first, first_rounds = two_rounds
    again = run_federated(compose(tiny_data_root, tmp_path / "run", *TWO_ROUNDS))

    rerun = _rounds(tmp_path / "run")
    assert all(set(WALL_CLOCK) <= set(r) for r in first_rounds + rerun)
    assert _digits(_without_wall_clock(rerun)) == _digits(_without_wall_clock(first_rounds))
    assert _digits(again.test_metrics) == _digits(first.test_metrics)


@pytest.mark.slow
def test_too_few_sites_is_a_clear_error_not_a_hang(tiny_data_root, tmp_path):
    cfg = compose(
        tiny_data_root,
        tmp_path / "run",
        "simulation.num_sites=2",
        "federated.min_sites=3",
        "federated.wait_for_sites_s=5",
        "simulation.timeout_s=300",
    )
    started = time.monotonic()
    with pytest.raises(FederatedRunError, match=r"2 site\(s\) connected, the run needs at least 3"):
        run_federated(cfg)
    assert time.monotonic() - started < 300
