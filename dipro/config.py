"""The one typed check of the Hydra configs, shared by every entrypoint.

Hydra and OmegaConf keep whatever a command line gives: ``model.ablation.ehr=off`` is the
string ``"off"`` (and ``bool("off")`` is True), ``optim.lr=abc`` a string, ``optim.lr=nan`` a
float. ``validate(cfg, schema)`` checks every key of ``schema`` by type and range before any
work starts, and raises ``ConfigError`` with one line naming the key, its value and what it
should be. A key absent from the composed config is not checked (entrypoints share tables).

The tables of the typed sections come from their dataclasses (``dipro.settings``): adding a
key there is one field, e.g. ``verify_checksums: bool = setting(Bool(), True)`` in
``DataSettings``, and code reads it from the parsed section. The configs not typed yet
(evaluate, preprocess) keep a table of their own here. A section listed in ``CLOSED``
accepts only the keys of its table (an unknown ablation switch is an error, not a silent
no-op).

The site-local config (configs/local/default.yaml, last in every defaults list) may only set
keys that some entrypoint config defines: ``LocalSettingsCheck``, a Hydra callback of every
entrypoint, refuses any other key before the job starts (``check_local_settings``).

The configs' own OmegaConf resolvers (``${dipro.cwd:}``, which ``paths.root`` falls back to) are
registered by ``register_resolvers``, which Hydra calls through the project's plugin
(``hydra_plugins/dipro_resolvers.py``) whenever it composes a config: under ``@hydra.main``,
``--cfg job`` and the compose API alike.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeVar

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dipro import vocab
from dipro.settings import (
    Bool,
    Choice,
    ConfigError,
    DataSettings,
    Float,
    Int,
    ListOf,
    ModelConfig,
    Spec,
    Str,
    TrainingRun,
    parse,
    specs_of,
)

Rule = Callable[[Mapping[str, Any]], None]
T = TypeVar("T")
_MISSING: Final = object()


# --- the tables, one per config section ---------------------------------------------------------

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
# Sections whose keys are exactly those of the tables.
CLOSED: Final[tuple[str, ...]] = ("model.ablation",)


def _model_builds(cfg: Mapping[str, Any]) -> None:
    ModelConfig.from_dict(cfg["model"])


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


TRAIN_SCHEMA: Final = Schema(specs_of(TrainingRun), (_model_builds, _compile_mode_of_backend))
EVALUATE_SCHEMA: Final = Schema(EVALUATE, (_cuda_when_asked,))
PREPROCESS_SCHEMA: Final = Schema(PREPROCESS, (_gap_order,))
SYNTHETIC_SCHEMA: Final = Schema(specs_of(DataSettings, "data"))


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


def settings_of(cls: type[T], cfg: DictConfig | Mapping[str, Any]) -> T:
    """The typed settings ``cls`` (``dipro.settings``) of a whole config, its interpolations
    resolved; ConfigError names the first key that is missing or wrong."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    assert isinstance(plain, Mapping)
    return parse(cls, plain)


def exit_with_error(kind: str, err: BaseException) -> NoReturn:
    """End an entrypoint with one line ``{kind} error: {err}`` on stderr and exit status 2
    (a usage or input error, as opposed to 1 for a crash)."""
    message = " ".join(str(err).split())
    print(f"{kind} error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


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
