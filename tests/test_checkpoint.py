"""Checkpoint round trip on the real model, resume, strict loading and clear refusals."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torchvision
from tiny_model import tiny_model_cfg
from torch import nn

from dipro import vocab
from dipro.batch import Batch
from dipro.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from dipro.data.collate import collate
from dipro.data.normalize import NormStats
from dipro.data.schema import records_to_table
from dipro.engine import build_optimizer, build_scheduler, train_epoch
from dipro.losses import ClassWeights, build_loss, count_labels
from dipro.model import build_model
from dipro.settings import OptimSettings

R, K, V, G = vocab.NUM_REGIONS, vocab.NUM_FINDINGS, vocab.NUM_EHR, vocab.NUM_DEMOGRAPHICS
FEATURE_DIM, CROP = 8, 32
LOSS_CFG = {"ce": 2.0, "orth": 1.0, "temp": 0.0, "static": 0.5, "dyn": 2.0}
OPTIM = OptimSettings(lr=1e-3, batch_size=2, min_lr=1e-7)


def model_cfg(mode: str = "features", pretrained: str | None = None) -> dict:
    return tiny_model_cfg(
        region_mode=mode,
        pretrained_weights=pretrained,
        feature_dim=FEATURE_DIM,
        num_groups=4,
        dropout=0.0,
        ehr_use_observed=True,
    )


def batch(task: str, n: int, seed: int, mode: str = "features") -> Batch:
    """Random valid records through the real path: records -> Arrow -> collate."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        T = 2 if task == "disease_progression" else int(rng.integers(2, 4))
        L = int(rng.integers(1, 5))
        icu = task != "disease_progression"
        image = {
            "crop_size": CROP,
            "crops": rng.integers(0, 256, size=(T, R, CROP, CROP), dtype=np.uint8),
        }
        feats = {
            "feature_dim": FEATURE_DIM,
            "features": rng.normal(size=(T, R, FEATURE_DIM)).astype(np.float32),
        }
        recs.append(
            {
                "sample_id": f"s{i}",
                "subject_id": i,
                "stay_id": 100 + i,
                "hospital": 0,
                "split": "train",
                "task": task,
                "cxr_times": (np.arange(T) * 12.0).astype(np.float32),
                **(image if mode == "crops" else feats),
                "region_present": rng.uniform(size=(T, R)) < 0.9,
                "ehr_times": np.arange(L, dtype=np.float32) * 5,
                "ehr_values": rng.normal(size=(L, V)).astype(np.float32),
                "ehr_observed": rng.uniform(size=(L, V)) < 0.5,
                "demographics": rng.normal(size=G).astype(np.float32),
                "region_labels": rng.integers(0, 4, size=(T - 1, R, K)).astype(np.int8),
                "progression": None if icu else rng.integers(0, 4, size=K).astype(np.int8),
                "mortality": i % 2 if icu else None,
                "los_days": 2.5 + i if icu else None,
            }
        )
    table = records_to_table(recs)
    return collate({c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names})


def trained(task: str, b: Batch, cfg: dict):
    """A model after two optimizer steps (weights and BatchNorm statistics off their init)."""
    torch.manual_seed(0)
    model = build_model(cfg, task)
    loss_fn = build_loss(task, LOSS_CFG, ClassWeights.from_counts(count_labels([b])))
    opt = build_optimizer(model, OPTIM)
    sched = build_scheduler(opt, OPTIM, total_steps=10)
    train_epoch(model, [b, b], opt, loss_fn, device="cpu", scheduler=sched)
    return model, opt, sched, loss_fn


def outputs_equal(a, b) -> None:
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("task", vocab.TASKS)
def test_round_trip_reproduces_outputs_and_training_state(task, tmp_path):
    b = batch(task, 4, seed=1)
    model, opt, sched, loss_fn = trained(task, b, model_cfg())
    stats = NormStats.identity()
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(
        path,
        model,
        model_cfg=model_cfg(),
        task=task,
        optimizer=opt,
        scheduler=sched,
        epoch=3,
        best_metric=0.42,
        norm_stats=stats,
        class_weights=loss_fn.class_weights,
        extra={"global_step": 2},
    )
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    model.eval()
    with torch.no_grad():
        outputs_equal(model(b), loaded(b))
    assert meta.task == task and meta.epoch == 3 and meta.best_metric == pytest.approx(0.42)
    assert meta.model_cfg == model_cfg() and meta.format_version == FORMAT_VERSION
    assert meta.norm_stats.to_dict() == stats.to_dict()
    assert meta.class_weights == loss_fn.class_weights
    assert meta.extra == {"global_step": 2}
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left

    # Resuming from the checkpoint continues exactly like the run that never stopped.
    opt2 = build_optimizer(loaded, OPTIM)
    opt2.load_state_dict(meta.optimizer_state)
    sched2 = build_scheduler(opt2, OPTIM, total_steps=10)
    sched2.load_state_dict(meta.scheduler_state)
    train_epoch(model, [b], opt, loss_fn, device="cpu", scheduler=sched)
    train_epoch(loaded, [b], opt2, loss_fn, device="cpu", scheduler=sched2)
    for (name, x), y in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_crops_mode_round_trip_without_the_pretrained_file(tmp_path):
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    cfg = model_cfg("crops", pretrained=str(weights))
    b = batch("mortality", 2, seed=2, mode="crops")
    model = build_model(cfg, "mortality").eval()
    save_checkpoint(tmp_path / "m.pt", model, model_cfg=cfg, task="mortality")
    os.remove(weights)  # the checkpoint alone must be enough
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta.model_cfg["pretrained_weights"] == str(weights)
    with torch.no_grad():
        outputs_equal(model(b), loaded(b))


def _tamper(path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


@pytest.fixture
def saved(tmp_path):
    model = build_model(model_cfg(), "mortality")
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, model_cfg=model_cfg(), task="mortality")
    return path


def test_missing_key_is_refused_naming_the_file_and_key(saved):
    _tamper(saved, lambda p: p["weights"].pop("regions.missing"))
    with pytest.raises(CheckpointError, match=r"missing keys \['regions.missing'\]") as err:
        load_checkpoint(saved)
    assert str(saved) in str(err.value)


def test_extra_key_is_refused_naming_the_file_and_key(saved):
    _tamper(saved, lambda p: p["weights"].update({"temperature": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['temperature'\]") as err:
        load_checkpoint(saved)
    assert str(saved) in str(err.value)


def test_wrong_shape_and_wrong_config_are_refused(saved):
    other = saved.parent / "other.pt"
    save_checkpoint(
        other,
        build_model(model_cfg(), "mortality"),
        model_cfg={**model_cfg(), "d_model": 32, "num_heads": 2},
        task="mortality",
    )
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(other)
    _tamper(saved, lambda p: p["model_cfg"].pop("num_groups"))
    with pytest.raises(CheckpointError, match="model config does not build"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    ("entry", "value", "message"),
    [
        ("format_version", 99, "format version 99 is not known"),
        ("data_schema_version", 7, "data schema version 7 is not known"),
        ("task", "sepsis", "unknown task 'sepsis'"),
    ],
)
def test_unknown_versions_and_tasks_are_refused(saved, entry, value, message):
    _tamper(saved, lambda p: p.update({entry: value}))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(saved)


def test_not_a_checkpoint_and_no_file_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a dipro-checkpoint file"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_failed_save_leaves_the_previous_checkpoint(saved):
    before = saved.read_bytes()
    model = build_model(model_cfg(), "mortality")
    with pytest.raises(TypeError, match="extra.when holds .object., which a checkpoint"):
        save_checkpoint(
            saved, model, model_cfg=model_cfg(), task="mortality", extra={"when": object()}
        )
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["model.pt"]


def test_ddp_wrapped_model_saves_plain_keys(tmp_path):
    model = build_model(model_cfg(), "length_of_stay")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        save_checkpoint(tmp_path / "ddp.pt", ddp, model_cfg=model_cfg(), task="length_of_stay")
    finally:
        dist.destroy_process_group()
    weights = read_checkpoint(tmp_path / "ddp.pt")["weights"]
    assert set(weights) == set(model.state_dict())
    load_checkpoint(tmp_path / "ddp.pt")
