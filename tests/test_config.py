"""The typed config check (dipro.config) at the entrypoints: one ``configuration error:`` line
naming the key, exit status 2, before Ray starts and before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dipro.config import (
    EVALUATE_SCHEMA,
    PREPROCESS_SCHEMA,
    TRAIN_SCHEMA,
    ConfigError,
    exit_on,
    settings_of,
    validate,
)
from dipro.runs import CHECKPOINT_FILE
from dipro.settings import TrainingRun
from federated.config import parse_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

_SCHEMAS = {
    "train": TRAIN_SCHEMA,
    "tune": TRAIN_SCHEMA,
    "experiments": TRAIN_SCHEMA,
    "demo": TRAIN_SCHEMA,
    "evaluate": EVALUATE_SCHEMA,
    "preprocess": PREPROCESS_SCHEMA,
}


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        *((name, []) for name in ("tune", "experiments", "demo", "federated")),
        *(("train", [f"task={t}"]) for t in ("disease_progression", "mortality", "length_of_stay")),
        ("evaluate", ["checkpoint=model.pt"]),
        ("preprocess", [f"raw.{k}=/raw" for k in ("mimic_iv", "mimic_cxr", "scene_graph_dir")]),
    ],
)
def test_every_shipped_config_passes_its_schema(name, overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    if name == "federated":
        run = parse_run(OmegaConf.to_container(cfg, resolve=True))
        assert run.federated.dp.delta > 0 and run.strategy.name == "fedavg"
        return
    validate(cfg, _SCHEMAS[name])
    if _SCHEMAS[name] is TRAIN_SCHEMA:
        run = settings_of(TrainingRun, cfg)
        assert run.model.d_model % run.model.num_heads == 0 and run.scaling.worker_range[0] >= 1


# The authors' per-task settings (docs/model.md, "The authors' settings"): the lr the published
# runs trained with (nominal lr x batch x accumulation 4 x 1 GPU), width, and local-fusion depth
# ("transformer layers" // 2); their EHR encoder always has one layer.
AUTHORS = {
    "disease_progression": {"lr": 5e-6 * 8 * 4, "batch": 8, "d_model": 256, "local": 1},
    "mortality": {"lr": 1e-5 * 4 * 4, "batch": 4, "d_model": 256, "local": 2},
    "length_of_stay": {"lr": 8e-6 * 4 * 4, "batch": 4, "d_model": 128, "local": 1},
}


@pytest.mark.parametrize("config", ["train", "federated"])
@pytest.mark.parametrize("task", sorted(AUTHORS))
def test_a_task_preset_sets_the_authors_model_and_lr(config, task):
    """The preset wins over the model group's defaults (it comes after it)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config, overrides=[f"task={task}"])
    want = AUTHORS[task]
    assert cfg.optim.lr == pytest.approx(want["lr"])
    assert (cfg.optim.batch_size, cfg.optim.reference.batch_size) == (want["batch"],) * 2
    assert cfg.optim.reference.accumulation_steps == 4 and cfg.optim.reference.num_workers == 1
    assert (cfg.model.d_model, cfg.model.local_fusion_layers) == (want["d_model"], want["local"])
    assert cfg.model.ehr_layers == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.ablation.ehr=off", "model.ablation.ehr='off' is not a boolean"),
        ("optim.lr=abc", "optim.lr='abc' is not a number"),
        ("optim.lr=nan", "optim.lr=nan is not a finite number"),
        ("model.d_model=65", "model.d_model=65 must be even and a multiple of model.num_heads=8"),
        ("train.max_epochs=two", "train.max_epochs='two' is not an integer"),
        ("+model.ablation.no_such_switch=false", "model.ablation.no_such_switch is not a known"),
    ],
)
def test_train_refuses_a_mistyped_setting_before_ray(
    without_ray, entrypoint, tree_checksums, tiny_dataset, tmp_path, override, message
):
    runs = tmp_path / "runs"
    before = tree_checksums(tiny_dataset)
    code, lines = entrypoint(
        "ray_jobs.train", f"data.root={tiny_dataset}", f"storage_path={runs}", override
    )
    assert code == 2
    assert lines == [f"configuration error: {lines[0].removeprefix('configuration error: ')}"]
    assert message in lines[0]
    assert not ray.is_initialized()
    assert not runs.exists() and tree_checksums(tiny_dataset) == before


def test_ablation_study_checks_every_variant_before_training(
    without_ray, entrypoint, tree_checksums, tiny_dataset, tmp_path
):
    runs = tmp_path / "runs"
    before = tree_checksums(tiny_dataset)
    code, lines = entrypoint(
        "ray_jobs.experiments",
        "mode=ablations",
        f"data.root={tiny_dataset}",
        f"storage_path={runs}",
        "ablations.cxr_only.ablation.ehr=off",  # the last variant but one
    )
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("configuration error: ablations.cxr_only: model.ablation.ehr=")
    assert not ray.is_initialized()
    assert not runs.exists() and tree_checksums(tiny_dataset) == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("split=valid", "split='valid' is not one of 'train' | 'val' | 'test'"),
        ("batch_size=0", "batch_size=0 must be at least 1"),
        pytest.param(
            "device=cuda",
            "device=cuda, but this machine has no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there"),
        ),
    ],
)
def test_evaluate_refuses_bad_settings(entrypoint, tree_checksums, tmp_path, override, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT_FILE).write_bytes(b"a checkpoint that must not be read")
    before = tree_checksums(run)
    code, lines = entrypoint("ray_jobs.evaluate", f"checkpoint={run / CHECKPOINT_FILE}", override)
    assert code == 2
    assert lines == [f"configuration error: {message}" + lines[0].split(message, 1)[-1]]
    assert tree_checksums(run) == before


def test_a_closed_section_names_the_unknown_key():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["+model.ablation.fusion=false"])
    with pytest.raises(ConfigError, match=r"model\.ablation\.fusion is not a known setting"):
        validate(cfg, TRAIN_SCHEMA)


class _Spoilt(ValueError):
    pass


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (ConfigError("optim.lr='abc' is not a number"), 2, "configuration error: optim.lr='abc'"),
        (
            _Spoilt("shard.parquet, record 7,\n field 'x'"),
            2,
            "data error: shard.parquet, record 7, ",
        ),
        (RuntimeError("the run stopped after round 3"), 1, None),
    ],
)
def test_every_entrypoint_ends_an_error_the_same_way(capsys, error, code, line):
    with pytest.raises(SystemExit) as exit_, exit_on({_Spoilt: "data"}, failures=(RuntimeError,)):
        raise error
    if line is None:
        assert exit_.value.code == str(error)
    else:
        assert exit_.value.code == code
        (printed,) = capsys.readouterr().err.splitlines()
        assert printed.startswith(line)


def test_an_unlisted_error_is_not_swallowed():
    with pytest.raises(KeyError), exit_on({ValueError: "data"}):
        raise KeyError("a bug, with its traceback")


def test_paths_root_outlives_a_deleted_working_directory(tmp_path):
    """A ``ray job submit --working-dir`` copy can be deleted while its driver still runs:
    ``paths.root`` then stays the directory the job started in instead of failing to resolve."""
    started = tmp_path / "job_copy"
    started.mkdir()
    script = (
        "import os, shutil, sys\n"
        "import hydra\n"
        "from omegaconf import OmegaConf\n"
        "@hydra.main(version_base=None, config_path=sys.argv[1], config_name='train')\n"
        "def main(cfg):\n"
        "    shutil.rmtree(os.getcwd())\n"
        "    print(OmegaConf.select(cfg, 'paths.outputs'))\n"
        "sys.argv = sys.argv[:1] + ['hydra.run.dir=" + str(tmp_path / "hydra") + "']\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(CONFIGS)],
        cwd=started,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"{started}/outputs"
