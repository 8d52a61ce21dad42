"""The cluster configs are valid for the installed Ray, and the scaling presets fit on them.

No cluster is started: the launcher YAML is checked against the schema inside the installed Ray
package (the check `ray up` runs before touching a cloud), the KubeRay manifests are parsed, and
every scaling preset is turned into Ray Train's real ``ScalingConfig``.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.train import ScalingConfig

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = ROOT / "ray_jobs" / "cluster"
CONFIGS = ROOT / "configs"
SCALING_PRESETS = ("cpu-laptop", "1-gpu", "8-gpu", "multi-node")
GPU_PRESETS = ("8-gpu", "multi-node")  # the presets meant for the cluster's GPU nodes
RAY_VERSION = version("ray")
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"


def _load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return _load(CLUSTER_DIR / "cluster.yaml")


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return _load(CLUSTER_DIR / "kuberay" / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return _load(CLUSTER_DIR / "kuberay" / "rayjob.yaml")


def _scaling(name: str) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(overrides=[f"+scaling={name}"])
    return OmegaConf.to_container(cfg.scaling, resolve=True)


@pytest.fixture(scope="module")
def presets() -> dict[str, dict[str, Any]]:
    return {name: _scaling(name) for name in SCALING_PRESETS}


# --- cluster launcher (`ray up`) --------------------------------------------------------------


def test_launcher_config_passes_the_installed_ray_schema(launcher: dict[str, Any]) -> None:
    validate_config(prepare_config(copy.deepcopy(launcher)))


@pytest.mark.parametrize(
    ("where", "typo"),
    [
        ((), "idle_timeout_minute"),
        (("available_node_types", "gpu_worker"), "min_worker"),
        (("available_node_types", "gpu_worker", "docker"), "worker_imag"),
        (("docker",), "pull_before_runn"),
    ],
)
def test_misspelled_launcher_key_is_rejected(
    launcher: dict[str, Any], where: tuple[str, ...], typo: str
) -> None:
    mutated = copy.deepcopy(launcher)
    section = mutated
    for key in where:
        section = section[key]
    section[typo] = 0
    with pytest.raises(jsonschema.ValidationError, match=typo):
        validate_config(prepare_config(mutated))


def test_launcher_node_types(launcher: dict[str, Any]) -> None:
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]

    gpu, cpu = types["gpu_worker"], types["cpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"]
    assert gpu["resources"]["GPU"] > 0
    assert cpu["min_workers"] == 0 < cpu["max_workers"]
    assert "GPU" not in cpu["resources"] and cpu["resources"]["CPU"] > 0


def test_every_node_runs_the_pinned_ray_and_python(launcher: dict[str, Any]) -> None:
    images = [launcher["docker"]["image"]] + [
        t["docker"]["worker_image"]
        for t in launcher["available_node_types"].values()
        if "docker" in t
    ]
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    images += re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    for image in images:
        assert image.startswith(f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-"), image
    assert launcher["available_node_types"]["gpu_worker"]["docker"]["worker_image"].endswith("-gpu")

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'"ray\[[^\]]*\]=={re.escape(RAY_VERSION)}"', pyproject)


def test_project_is_copied_to_and_installed_on_every_node(launcher: dict[str, Any]) -> None:
    [(remote, local)] = launcher["file_mounts"].items()
    assert (ROOT / local / "pyproject.toml").is_file()  # `ray up` runs from the repository root
    installs = [c for c in launcher["setup_commands"] if "pip install" in c]
    assert installs and remote in shlex.split(installs[0])


def test_image_copies_the_packages_and_configs_it_installs() -> None:
    copied: set[str] = set()
    for line in (CLUSTER_DIR / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            args = [a for a in line.split()[1:] if not a.startswith("--")]
            copied.update(args[:-1])
    assert all((ROOT / src).exists() for src in copied), copied
    with (ROOT / "pyproject.toml").open("rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} | {"pyproject.toml", "README.md", "configs"} <= copied


# --- KubeRay ----------------------------------------------------------------------------------


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_raycluster_autoscales_gpu_workers_from_zero(raycluster: dict[str, Any]) -> None:
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    spec = raycluster["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for group in groups.values():
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    [gpu_container] = groups["gpu"]["template"]["spec"]["containers"]
    assert int(gpu_container["resources"]["limits"]["nvidia.com/gpu"]) > 0
    assert len({c["image"] for c in _containers(spec)}) == 1


def test_rayjob_runs_the_training_entrypoint_on_the_same_cluster(
    rayjob: dict[str, Any], raycluster: dict[str, Any]
) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "ray_jobs.train"]
    overrides = dict(arg.split("=", 1) for arg in argv[3:])
    assert (CONFIGS / "task" / f"{overrides['task']}.yaml").is_file()
    assert (CONFIGS / "scaling" / f"{overrides['scaling']}.yaml").is_file()
    assert overrides["data.root"].startswith("s3://")
    assert overrides["storage_path"].startswith("s3://")

    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["rayClusterSpec"] == raycluster["spec"]


# --- scaling presets --------------------------------------------------------------------------


def test_presets_share_one_flat_set_of_keys(presets: dict[str, dict[str, Any]]) -> None:
    keys = {name: set(cfg) for name, cfg in presets.items()}
    assert len({frozenset(k) for k in keys.values()}) == 1, keys
    assert keys["cpu-laptop"] == {
        "num_workers",
        "use_gpu",
        "resources_per_worker",
        "cpus_per_worker",
        "amp",
        "prefetch_batches",
        "local_shuffle_buffer_size",
        "max_failures",
        "elastic_resize_monitor_interval_s",
        "require_remote_storage",
        "pin_memory",
        "channels_last",
        "compile",
        "compile_backend",
        "cudnn_benchmark",
        "fused_optimizer",
    }


@pytest.mark.parametrize("name", SCALING_PRESETS)
def test_preset_builds_a_ray_train_scaling_config(
    presets: dict[str, dict[str, Any]], name: str
) -> None:
    cfg = presets[name]
    scaling = ScalingConfig(
        num_workers=cfg["num_workers"],
        use_gpu=cfg["use_gpu"],
        resources_per_worker=cfg["resources_per_worker"],
    )
    assert scaling.num_workers >= 1
    assert scaling.num_gpus_per_worker == (1 if cfg["use_gpu"] else 0)
    assert cfg["amp"] in ({None, "bf16", "fp16"} if cfg["use_gpu"] else {None})
    assert 1 <= cfg["cpus_per_worker"] <= max(1, cfg["resources_per_worker"]["CPU"])
    assert cfg["prefetch_batches"] >= 1
    assert cfg["local_shuffle_buffer_size"] is None or cfg["local_shuffle_buffer_size"] > 0
    assert cfg["max_failures"] >= 0


def test_laptop_preset_reserves_whole_cpus(
    presets: dict[str, dict[str, Any]],
) -> None:
    # Ray Data counts a fractional reservation as a whole CPU; the in-process Ray's logical
    # CPUs leave it one beside the workers (tests/ray_jobs/test_console.py).
    cfg = presets["cpu-laptop"]
    assert cfg["num_workers"] == 2 and cfg["use_gpu"] is False and cfg["amp"] is None
    assert cfg["resources_per_worker"] == {"CPU": 1}


def test_only_the_multi_node_preset_demands_shared_storage(
    presets: dict[str, dict[str, Any]],
) -> None:
    assert {n for n, c in presets.items() if c["require_remote_storage"]} == {"multi-node"}
    assert presets["multi-node"]["num_workers"] > presets["8-gpu"]["num_workers"]


def _fit(cfg: dict[str, Any], node_cpus: float, node_gpus: float) -> tuple[int, float]:
    """Workers that fit on one node and the CPUs left there for Ray Data."""
    per_worker = ScalingConfig(
        num_workers=cfg["num_workers"],
        use_gpu=cfg["use_gpu"],
        resources_per_worker=cfg["resources_per_worker"],
    )._resources_per_worker_not_none
    per_node = min(node_cpus // per_worker["CPU"], node_gpus // per_worker["GPU"])
    return int(per_node), node_cpus - per_node * per_worker["CPU"]


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_presets_fit_the_launcher_gpu_nodes(
    presets: dict[str, dict[str, Any]], launcher: dict[str, Any], name: str
) -> None:
    cfg, node = presets[name], launcher["available_node_types"]["gpu_worker"]
    per_node, cpus_left = _fit(cfg, node["resources"]["CPU"], node["resources"]["GPU"])
    assert per_node >= 1 and cpus_left >= 8
    assert math.ceil(cfg["num_workers"] / per_node) <= node["max_workers"]


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_presets_fit_the_kuberay_gpu_pods(
    presets: dict[str, dict[str, Any]], raycluster: dict[str, Any], name: str
) -> None:
    cfg = presets[name]
    [group] = [g for g in raycluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    per_node, cpus_left = _fit(cfg, float(limits["cpu"]), float(limits["nvidia.com/gpu"]))
    assert per_node >= 1 and cpus_left >= 8
    assert math.ceil(cfg["num_workers"] / per_node) <= group["maxReplicas"]
