"""The site-local config (configs/local/default.yaml): every key that configs/local.example.yaml
documents arrives in the composed config of every entrypoint that has it, over the entrypoint's
own values and under the command line's; a key that no config defines is refused.

The tests compose from a copy of configs/ whose local/default.yaml they write, so a site file of
the checkout itself is neither read nor touched.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dipro.config import ConfigError, check_local_settings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXAMPLE = CONFIGS / "local.example.yaml"

# Every primary config, i.e. every entrypoint (and the keys of the site file it must take).
ENTRYPOINTS: dict[str, set[str]] = {
    "train": {"paths.outputs", "storage_path", "tracking.uri"},
    "tune": {"paths.outputs", "storage_path", "tracking.uri"},
    "demo": {"paths.outputs", "storage_path", "tracking.uri"},
    "experiments": {"paths.outputs", "storage_path", "tracking.uri"},
    "federated": {"paths.outputs", "tracking.uri"},
    "evaluate": {"paths.outputs"},
    "predict": {"paths.outputs"},
    "synthetic": {"paths.outputs"},
    "preprocess": {
        "paths.outputs",
        "output_root",
        "raw.mimic_iv",
        "raw.mimic_cxr",
        "raw.scene_graph_dir",
        "raw.gold_file",
        "raw.versions.mimic_iv",
        "raw.versions.mimic_cxr_jpg",
        "raw.versions.chest_imagenome",
    },
}


# An output of each entrypoint that lies below paths.outputs by default.
BELOW_OUTPUTS = {
    "train": "log_dir",
    "tune": "log_dir",
    "demo": "demo.output_dir",
    "experiments": "data.root",
    "federated": "out_dir",
    "predict": "log_dir",
    "synthetic": "data.root",
}


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _lookup(tree: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


# The documented keys (and tracking.uri and storage_path, which train must take), each set to a
# value no config has.
DOCUMENTED = set(_flat(yaml.safe_load(EXAMPLE.read_text()))) | {"tracking.uri", "storage_path"}
SITE = {key: f"/site/{key}" for key in sorted(DOCUMENTED)}


def _write_local(configs: Path, settings: Mapping[str, Any], header: bool = True) -> None:
    text = yaml.safe_dump(_nested(settings), sort_keys=True)
    path = configs / "local" / "default.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(("# @package _global_\n" if header else "") + text)


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    """A copy of configs/ without any local/ directory."""
    copy = tmp_path / "configs"
    shutil.copytree(CONFIGS, copy, ignore=shutil.ignore_patterns("local"))
    return copy


@pytest.fixture
def configs(config_copy: Path) -> Iterator[Path]:
    """``config_copy``, the config directory of the test's Hydra (``compose``)."""
    with initialize_config_dir(str(config_copy), version_base="1.3"):
        yield config_copy


def test_the_entrypoint_table_lists_every_primary_config() -> None:
    names = {p.stem for p in CONFIGS.glob("*.yaml")} - {"local.example"}
    assert names == set(ENTRYPOINTS)


def test_every_documented_local_key_takes_effect(configs: Path) -> None:
    assert {"paths.outputs", "output_root", "raw.mimic_iv", "raw.gold_file"} <= DOCUMENTED
    _write_local(configs, SITE)
    taken: dict[str, set[str]] = {}
    for name in ENTRYPOINTS:
        own = OmegaConf.to_container(compose(name, overrides=["~local"]))
        cfg = compose(name)
        site = OmegaConf.to_container(cfg)
        taken[name] = set()
        for key, value in SITE.items():
            if _lookup(own, key)[0]:
                assert _lookup(site, key) == (True, value), (name, key)
                taken[name].add(key)
        if name in BELOW_OUTPUTS:  # paths.outputs moves the outputs the file does not set
            assert OmegaConf.select(cfg, BELOW_OUTPUTS[name]).startswith(SITE["paths.outputs"])
    for name, keys in ENTRYPOINTS.items():
        assert keys <= taken[name], (name, keys - taken[name])
    assert set().union(*taken.values()) == DOCUMENTED  # every documented key is used somewhere


def test_the_command_line_wins_over_the_local_file(configs: Path) -> None:
    _write_local(configs, SITE)
    cfg = compose("train", overrides=["storage_path=/cli/runs", "tracking.uri=/cli/mlflow"])
    assert (cfg.storage_path, cfg.tracking.uri) == ("/cli/runs", "/cli/mlflow")
    assert compose("preprocess", overrides=["output_root=/cli"]).output_root == "/cli"


def test_the_documented_keys_pass_the_check_of_every_entrypoint(configs: Path) -> None:
    """One site file serves every entrypoint: train takes preprocess's raw paths too."""
    _write_local(configs, SITE)
    for name in ENTRYPOINTS:
        check_local_settings(compose(name, return_hydra_config=True))


@pytest.mark.parametrize(
    ("name", "extra", "header", "named"),
    [
        ("train", {"trackin.uri": "/typo"}, True, "trackin.uri"),
        ("evaluate", {"tracking.urii": "/typo"}, True, "tracking.urii"),  # no tracking section
        ("train", {"raw.mimic_ivv": "/typo"}, True, "raw.mimic_ivv"),  # preprocess's section
        ("preprocess", {}, False, "local.output_root"),  # no `# @package _global_`: under local.
        ("demo", {"demo.taskz": "mortality"}, True, "demo.taskz"),  # the file sits in train's list
        ("tune", {"tune.serach": "grid"}, True, "tune.serach"),
    ],
)
def test_an_undefined_local_key_is_refused(
    configs: Path, name: str, extra: dict[str, str], header: bool, named: str
) -> None:
    _write_local(configs, {**SITE, **extra}, header=header)
    refused = rf"^{re.escape(named)} in .*local/default\.yaml is not a setting of any config"
    with pytest.raises(ConfigError, match=refused):
        check_local_settings(compose(name, return_hydra_config=True))


def test_every_entrypoint_runs_the_check(configs: Path) -> None:
    for name in ENTRYPOINTS:
        callbacks = compose(name, return_hydra_config=True).hydra.callbacks
        assert callbacks.local_settings._target_ == "dipro.config.LocalSettingsCheck", name


def test_no_local_file_no_check(configs: Path) -> None:
    check_local_settings(compose("train", overrides=["+anything=1"], return_hydra_config=True))


def test_an_entrypoint_stops_on_an_undefined_local_key(
    config_copy: Path, entrypoint, tmp_path: Path
) -> None:
    """As on the command line: one ``configuration error`` line, exit status 2, nothing done.
    (The entrypoint runs from ``tmp_path``, which holds the config copy.)"""
    _write_local(config_copy, {**SITE, "trackin.uri": "/typo"})
    root = tmp_path / "cohort"
    code, err = entrypoint("ray_jobs.synthetic", "-cp", str(config_copy), f"data.root={root}")
    assert code == 2
    assert err == [
        "configuration error: trackin.uri in configs/local/default.yaml is not a setting of any "
        "config (it would never be read)"
    ]
    assert not root.exists()
