"""The one typed check of the Hydra configs, shared by every entrypoint.

Hydra and OmegaConf keep whatever a command line gives: ``model.ablation.ehr=off`` is the
string ``"off"`` (and ``bool("off")`` is True), ``optim.lr=abc`` a string, ``optim.lr=nan`` a
float. ``validate(cfg, schema)`` checks every key of ``schema`` by type and range before any
work starts, and raises ``ConfigError`` with one line naming the key, its value and what it
should be. A key absent from the composed config is not checked (entrypoints share tables).

Adding a config key = one line in the table of its section, e.g.
``"data.verify_checksums": Bool(),`` in ``DATA``. A section listed in ``CLOSED`` accepts only
the keys of its table (an unknown ablation switch is an error, not a silent no-op).

The site-local config (configs/local/default.yaml, last in every defaults list) may only set
keys that some entrypoint config defines: ``LocalSettingsCheck``, a Hydra callback of every
entrypoint, refuses any other key before the job starts (``check_local_settings``).

The configs' own OmegaConf resolvers (``${dipro.cwd:}``, which ``paths.root`` falls back to) are
registered by ``register_resolvers``, which Hydra calls through the project's plugin
(``hydra_plugins/dipro_resolvers.py``) whenever it composes a config: under ``@hydra.main``,
``--cfg job`` and the compose API alike.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dipro import vocab


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any work (and before Ray starts)."""


_MISSING: Final = object()


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Bool:
    """true or false (not a string such as "off" or "yes")."""

    nullable: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={_show(value)} is not a boolean (true or false)")


@dataclass(frozen=True)
class Int:
    """An integer in [min, max]; a float or string is refused."""

    min: int | None = None
    max: int | None = None
    nullable: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={_show(value)} is not an integer")
        if self.min is not None and value < self.min:
            raise ConfigError(f"{key}={value} must be at least {self.min}")
        if self.max is not None and value > self.max:
            raise ConfigError(f"{key}={value} must be at most {self.max}")


@dataclass(frozen=True)
class Float:
    """A finite number (an integer is accepted) above ``gt`` / at least ``ge`` / at most ``le``."""

    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    nullable: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={_show(value)} is not a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number")
        if self.gt is not None and not value > self.gt:
            raise ConfigError(f"{key}={value} must be greater than {self.gt}")
        if self.ge is not None and not value >= self.ge:
            raise ConfigError(f"{key}={value} must be at least {self.ge}")
        if self.le is not None and not value <= self.le:
            raise ConfigError(f"{key}={value} must be at most {self.le}")


@dataclass(frozen=True)
class Choice:
    """One of ``options`` (compared by value and type: "1" is not 1)."""

    options: tuple[Any, ...]
    nullable: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if not any(type(value) is type(o) and value == o for o in self.options):
            shown = " | ".join(_show(o) for o in self.options)
            raise ConfigError(f"{key}={_show(value)} is not one of {shown}")


@dataclass(frozen=True)
class Str:
    """A non-empty string."""

    nullable: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}={_show(value)} is not a non-empty string")


@dataclass(frozen=True)
class MappingOf:
    """A mapping (e.g. ``scaling.resources_per_worker``), optionally with numbers as values."""

    values: Float | Int | None = None
    nullable: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={_show(value)} is not a mapping")
        if self.values is not None:
            for name, item in value.items():
                self.values.check(f"{key}.{name}", item)


@dataclass(frozen=True)
class ListOf:
    """A list whose items all pass ``items``; at least ``min_len`` of them."""

    items: Bool | Int | Float | Choice | Str
    min_len: int = 0

    def check(self, key: str, value: Any) -> None:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={_show(value)} is not a list")
        if len(value) < self.min_len:
            raise ConfigError(f"{key} needs at least {self.min_len} item(s)")
        for i, item in enumerate(value):
            self.items.check(f"{key}[{i}]", item)


Spec = Bool | Int | Float | Choice | Str | MappingOf | ListOf
Rule = Callable[[Mapping[str, Any]], None]

# --- the tables, one per config section ---------------------------------------------------------

TASK: dict[str, Spec] = {
    "task.name": Choice(vocab.TASKS),
    "task.monitor": Str(),
    "task.monitor_mode": Choice(("max", "min")),
}
MODEL: dict[str, Spec] = {
    "model.region_mode": Choice(("crops", "features")),
    "model.backbone": Choice(("resnet50", "resnet18")),
    "model.pretrained_weights": Str(nullable=True),
    "model.feature_dim": Int(min=1),
    "model.d_model": Int(min=1),
    "model.num_heads": Int(min=1),
    "model.ehr_layers": Int(min=1),
    "model.local_fusion_layers": Int(min=1),
    "model.fusion_layers": Int(min=1),
    "model.num_groups": Int(min=1),
    "model.dropout": Float(ge=0.0, le=1.0),
    "model.ehr_use_observed": Bool(),
    "model.ablation.std": Bool(),
    "model.ablation.pae": Bool(),
    "model.ablation.local_fusion": Bool(),
    "model.ablation.global_fusion": Bool(),
    "model.ablation.ehr": Bool(),
    "model.ablation.longitudinal": Bool(),
}
LOSS: dict[str, Spec] = {
    f"loss.{name}": Float(ge=0.0) for name in ("ce", "temp", "static", "dyn", "orth")
}
OPTIM: dict[str, Spec] = {
    "optim.lr": Float(gt=0.0),
    "optim.batch_size": Int(min=1),
    "optim.weight_decay": Float(ge=0.0),
    "optim.min_lr": Float(ge=0.0),
    "optim.lr_scaling": Choice(("none", "linear")),
}
TRAIN: dict[str, Spec] = {
    "seed": Int(),
    "run_name": Str(),
    "train.max_epochs": Int(min=1),
    "train.patience": Int(min=1, nullable=True),
    "train.accumulation_steps": Int(min=1),
    "train.max_grad_norm": Float(gt=0.0, nullable=True),
    "train.eval_batch_size": Int(min=1),
    "train.checkpoints_to_keep": Int(min=1),
    "train.evaluate_test": Bool(),
    "train.max_steps_per_epoch": Int(min=1, nullable=True),
    "train.data_progress_bars": Bool(),
    "train.deterministic": Bool(),
    "verbose": Bool(),
    "tracking.enabled": Bool(),
    "tracking.required": Bool(),
}
DATA: dict[str, Spec] = {
    "data.root": Str(),
    "data.overwrite": Bool(),
    "data.verify_checksums": Bool(),
}
SCALING: dict[str, Spec] = {
    "scaling.use_gpu": Bool(),
    "scaling.resources_per_worker": MappingOf(Float(ge=0.0)),
    "scaling.cpus_per_worker": Int(min=1),
    "scaling.amp": Choice(("bf16", "bfloat16", "fp16", "float16"), nullable=True),
    "scaling.prefetch_batches": Int(min=0),
    "scaling.local_shuffle_buffer_size": Int(min=1, nullable=True),
    "scaling.max_failures": Int(min=-1),
    "scaling.require_remote_storage": Bool(),
    "scaling.pin_memory": Bool(),
    "scaling.elastic_resize_monitor_interval_s": Float(ge=0.0),
    "scaling.channels_last": Bool(),
    "scaling.compile": Choice(("default", "reduce-overhead", "max-autotune"), nullable=True),
    "scaling.compile_backend": Choice(("inductor", "aot_eager", "eager")),
    "scaling.cudnn_benchmark": Bool(),
    "scaling.fused_optimizer": Bool(),
}
EVALUATE: dict[str, Spec] = {
    "checkpoint": Str(),
    "split": Choice(("train", "val", "test")),
    "data.root": Str(nullable=True),
    "out_dir": Str(nullable=True),
    "epoch_metrics": Str(nullable=True),
    "batch_size": Int(min=1),
    "device": Choice(("cpu", "cuda")),
    "amp": Choice(("bf16", "bfloat16", "fp16", "float16"), nullable=True),
    "report.bootstrap_resamples": Int(min=0),
    "report.bootstrap_seed": Int(),
    "report.level": Float(gt=0.0, le=1.0),
}
PREPROCESS: dict[str, Spec] = {
    "raw.mimic_iv": Str(),
    "raw.mimic_cxr": Str(),
    "raw.scene_graph_dir": Str(),
    "raw.gold_file": Str(nullable=True),
    "output_root": Str(),
    "overwrite": Bool(),
    "seed": Int(),
    "tasks": ListOf(Choice(vocab.TASKS), min_len=1),
    "rows_per_file": Int(min=1),
    "cohort.min_age": Float(ge=0.0),
    "cohort.min_los_hours": Float(ge=0.0),
    "cohort.iqr_factor": Float(gt=0.0),
    "cohort.view": Str(),
    "cohort.min_gap_hours": Float(ge=0.0),
    "cohort.max_gap_hours": Float(gt=0.0),
    "cohort.min_cxr": Int(min=1),
    "cohort.max_cxr": Int(min=1),
    "hospitals.num": Int(min=1),
    "hospitals.rule": Choice(("careunit", "hash")),
    "ehr.chunk_mb": Int(min=1),
    "regions.mode": Choice(("crops", "features")),
    "regions.crop_size": Int(min=1),
    "regions.batch_size": Int(min=1),
    "regions.num_workers": Int(min=1, nullable=True),
    "regions.backbone": Choice(("resnet50", "resnet18")),
    "regions.weights_path": Str(nullable=True),
    "regions.num_actors": Int(min=1),
    "regions.num_gpus": Float(ge=0.0),
    "regions.feature_batch_size": Int(min=1),
}
FEDERATED: dict[str, Spec] = {
    "federated.num_rounds": Int(min=1),
    "federated.local_epochs": Int(min=1),
    "federated.fraction_train": Float(gt=0.0, le=1.0),
    "federated.fraction_evaluate": Float(ge=0.0, le=1.0),
    "federated.min_sites": Int(min=1),
    "federated.min_report_count": Int(min=1),
    "federated.site_log_dir": Str(nullable=True),
    "federated.site_state_dir": Str(nullable=True),
    "federated.local.batch_norm": Bool(),
    "federated.local.layers": ListOf(Str()),
    "federated.wait_for_sites_s": Float(gt=0.0),
    "federated.round_timeout_s": Float(gt=0.0),
    "federated.device": Choice(("cpu", "cuda")),
    "federated.threads": Int(min=1),
    "federated.dp.enabled": Bool(),
    "federated.dp.clipping_norm": Float(gt=0.0),
    "federated.dp.noise_multiplier": Float(ge=0.0),
    "federated.dp.delta": Float(gt=0.0, le=0.1),
    "federated.dp.target_epsilon": Float(gt=0.0, nullable=True),
    "federated.secure.enabled": Bool(),
    "federated.secure.num_shares": Float(gt=0.0),
    "federated.secure.reconstruction_threshold": Float(gt=0.0),
    "federated.secure.clipping_range": Float(gt=0.0),
    "federated.secure.quantization_range": Int(min=2),
    "federated.secure.modulus_range": Int(min=2),
    "federated.secure.max_weight": Float(gt=0.0),
    "server.eval_data": Str(nullable=True),
    "server.eval_split": Choice(("train", "val", "test")),
    "server.test_split": Choice(("train", "val", "test"), nullable=True),
    "simulation.num_sites": Int(min=1, nullable=True),
    "simulation.client_cpus": Float(gt=0.0),
    "simulation.ray_num_cpus": Int(min=1),
    "simulation.timeout_s": Float(gt=0.0),
}

# Sections whose keys are exactly those of the tables.
CLOSED: Final[tuple[str, ...]] = ("model.ablation",)


def _heads_divide_width(cfg: Mapping[str, Any]) -> None:
    d_model, heads = cfg["model"]["d_model"], cfg["model"]["num_heads"]
    if d_model % heads:
        raise ConfigError(
            f"model.d_model={d_model} is not a multiple of model.num_heads={heads} "
            "(each attention head takes d_model / num_heads features)"
        )


def _compile_mode_of_backend(cfg: Mapping[str, Any]) -> None:
    scaling = cfg["scaling"]
    mode, backend = scaling.get("compile"), scaling.get("compile_backend", "inductor")
    if mode not in (None, "default") and backend != "inductor":
        raise ConfigError(
            f"scaling.compile={mode!r} is a mode of the inductor backend; "
            f"scaling.compile_backend={backend!r} takes only 'default'"
        )


def _gap_order(cfg: Mapping[str, Any]) -> None:
    cohort = cfg["cohort"]
    if cohort["min_gap_hours"] > cohort["max_gap_hours"]:
        raise ConfigError(
            f"cohort.min_gap_hours={cohort['min_gap_hours']} exceeds "
            f"cohort.max_gap_hours={cohort['max_gap_hours']}"
        )
    if cohort["min_cxr"] > cohort["max_cxr"]:
        raise ConfigError(
            f"cohort.min_cxr={cohort['min_cxr']} exceeds cohort.max_cxr={cohort['max_cxr']}"
        )


def _cuda_when_asked(cfg: Mapping[str, Any]) -> None:
    if cfg["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device=cuda, but this machine has no CUDA device: use device=cpu")


@dataclass(frozen=True)
class Schema:
    """The keys an entrypoint's config must satisfy, and rules across keys."""

    specs: Mapping[str, Spec]
    rules: tuple[Rule, ...] = ()


TRAIN_SCHEMA: Final = Schema(
    {**TASK, **MODEL, **LOSS, **OPTIM, **TRAIN, **DATA, **SCALING},
    (_heads_divide_width, _compile_mode_of_backend),
)
EVALUATE_SCHEMA: Final = Schema(EVALUATE, (_cuda_when_asked,))
PREPROCESS_SCHEMA: Final = Schema(PREPROCESS, (_gap_order,))
FEDERATED_SCHEMA: Final = Schema(
    {**TASK, **MODEL, **LOSS, **OPTIM, **TRAIN, **DATA, **FEDERATED}, (_heads_divide_width,)
)

SYNTHETIC_SCHEMA: Final = Schema(DATA)


def _select(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from err
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def validate(cfg: DictConfig | Mapping[str, Any], schema: Schema) -> dict[str, Any]:
    """Check ``cfg`` against ``schema``; return it resolved to plain containers.

    Raises ConfigError naming the first key whose value has the wrong type or range, a key
    left ``???``, an unknown key of a ``CLOSED`` section, or a broken rule across keys.
    """
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    for key, spec in schema.specs.items():
        value = _select(node, key)
        if value is not _MISSING:
            spec.check(key, value)
    for section in CLOSED:
        present = _select(node, section)
        if isinstance(present, Mapping):
            known = {k.removeprefix(f"{section}.") for k in schema.specs if k.startswith(section)}
            unknown = sorted(set(present) - known)
            if unknown:
                raise ConfigError(
                    f"{section}.{unknown[0]} is not a known setting "
                    f"(known: {', '.join(sorted(known))})"
                )
    try:
        plain = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    for rule in schema.rules:
        try:
            rule(plain)
        except KeyError:
            continue
    return plain


def exit_with_error(kind: str, err: BaseException) -> NoReturn:
    """End an entrypoint with one line ``{kind} error: {err}`` on stderr and exit status 2
    (a usage or input error, as opposed to 1 for a crash)."""
    message = " ".join(str(err).split())
    print(f"{kind} error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_exact_keys(section: str, data: Mapping[str, Any], names: Sequence[str]) -> None:
    """ValueError naming the missing and the unknown keys unless ``data`` has exactly
    ``names`` (a typed section read without Hydra: a checkpoint's model, a loss mapping)."""
    missing = [name for name in names if name not in data]
    unknown = sorted(set(data) - set(names))
    if missing or unknown:
        raise ValueError(
            f"{section} config: missing keys {missing}, unknown keys {unknown}; "
            f"expected exactly {list(names)}"
        )


@contextmanager
def exit_on(
    errors: Mapping[type[BaseException] | tuple[type[BaseException], ...], str],
    failures: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """The one error exit of every entrypoint, around its work: a ``ConfigError`` ends it as
    ``configuration error: ...``, an exception of a type in ``errors`` as ``{kind} error: ...``
    (both exit status 2, ``exit_with_error``); one of ``failures`` (a run that started and then
    failed) prints its message and exits with status 1. Anything else propagates."""
    try:
        yield
    except ConfigError as err:
        exit_with_error("configuration", err)
    except failures as err:
        sys.exit(str(err))
    except Exception as err:
        for types, kind in errors.items():
            if isinstance(err, types):
                exit_with_error(kind, err)
        raise


# --- the site-local config ----------------------------------------------------------------------

LOCAL_GROUP: Final = "local"  # configs/local/<choice>.yaml, the last entry of every defaults list

KeyPath = tuple[str, ...]  # a key as its parts (a part may hold dots: tune.space keys)


def _new_keys(
    merged: Mapping[str, Any], base: Mapping[str, Any], prefix: KeyPath = ()
) -> list[KeyPath]:
    """Keys of ``merged`` that ``base`` lacks, down to the leaves (``tracking.urii``, not
    ``tracking``, where ``base`` has no ``tracking`` section: another config may have one)."""
    found: list[KeyPath] = []
    for key, value in merged.items():
        path = (*prefix, str(key))
        known = key in base
        if known and isinstance(value, Mapping) and isinstance(base[key], Mapping):
            found.extend(_new_keys(value, base[key], path))
        elif not known and isinstance(value, Mapping) and value:
            found.extend(_new_keys(value, {}, path))
        elif not known:
            found.append(path)
    return found


def _defines(cfg: Mapping[str, Any], key: KeyPath) -> bool:
    node: Any = cfg
    for part in key:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _without_local(name: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The primary config ``name`` composed without the site-local file (raises
    ConfigCompositionException when its defaults list has none)."""
    cfg = compose(name, overrides=[*overrides, f"~{LOCAL_GROUP}"])
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def _local_file(hydra_node: DictConfig, choice: str) -> str:
    """Where the site-local config was read from (relative to the working directory)."""
    for source in hydra_node.runtime.config_sources:
        path = os.path.join(str(source.path), LOCAL_GROUP, f"{choice}.yaml")
        if source.schema == "file" and os.path.isfile(path):
            relative = os.path.relpath(path)
            return path if relative.startswith(os.pardir) else relative
    return f"configs/{LOCAL_GROUP}/{choice}.yaml"


def check_local_settings(config: DictConfig) -> None:
    """Refuse a key of the site-local config that no entrypoint config defines.

    ``config`` is a job's config with its ``hydra`` node. Hydra merges the files of a defaults
    list without struct mode, so a misspelt key in configs/local/default.yaml (``trackin.uri``)
    would be merged in and never read, where the same key on the command line is refused. One
    site file serves every entrypoint (the raw MIMIC paths of preprocess, the tracking URI of
    train), so a key counts as defined when the job's config composed without the file has it or,
    failing that, any other primary config that lists the file does. Raises ConfigError naming
    the first undefined key and the file.
    """
    hydra_node = config.hydra
    name = str(hydra_node.job.config_name)
    searchpath = [o for o in hydra_node.overrides.hydra if o.startswith("hydra.searchpath=")]
    loader = GlobalHydra.instance().config_loader()
    choice = hydra_node.runtime.choices.get(LOCAL_GROUP)  # set even when the file is absent
    local = loader.get_group_options(LOCAL_GROUP, config_name=name, overrides=searchpath)
    if choice is None or choice not in local:
        return
    job = OmegaConf.to_container(config, resolve=False)
    assert isinstance(job, dict)
    job.pop("hydra")
    unknown = _new_keys(job, _without_local(name, [*searchpath, *hydra_node.overrides.task]))
    others = loader.get_group_options("", ObjectType.CONFIG, config_name=name, overrides=searchpath)
    for other in others:
        if not unknown:
            return
        if other == name:
            continue
        try:
            defined = _without_local(other, searchpath)
        except ConfigCompositionException:  # no site-local file in its defaults (a template)
            continue
        unknown = [key for key in unknown if not _defines(defined, key)]
    if unknown:
        key = ".".join(unknown[0])
        hint = (
            f"the file's first line must be `# @package _global_`, else its keys land under {key}"
            if unknown[0][0] == LOCAL_GROUP
            else "it would never be read"
        )
        where = _local_file(hydra_node, choice)
        raise ConfigError(f"{key} in {where} is not a setting of any config ({hint})")


class LocalSettingsCheck(Callback):
    """Hydra callback of every entrypoint (configs/hydra/default.yaml): before the job starts,
    ``check_local_settings``; an undefined key ends it as ``configuration error: ...`` with exit
    status 2, as a bad setting on the command line does."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_local_settings(config)
        except ConfigError as err:
            exit_with_error("configuration", err)


def start_dir() -> str:
    """The directory the process runs in, absolute; when that directory is gone, the one the
    Hydra job started in (``runtime.cwd``, recorded when its config was composed).

    A job may outlive its working directory: Ray can delete a ``ray job submit --working-dir``
    copy while the driver still runs, and ``os.getcwd()`` then raises. Unlike
    ``${oc.env:PWD}`` it needs no shell (PWD is unset under systemd or a bare exec, and stale in
    a child started with another cwd).
    """
    try:
        return os.getcwd()
    except FileNotFoundError:
        if not HydraConfig.initialized():
            raise
        return str(HydraConfig.get().runtime.cwd)


RESOLVERS: Final[dict[str, Callable[[], str]]] = {
    # paths.root when DIPRO_ROOT is unset.
    "dipro.cwd": start_dir,
}


def register_resolvers() -> None:
    """Register the configs' own resolvers with OmegaConf (``RESOLVERS``); idempotent."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
