"""Typed settings: each config section is a frozen dataclass whose fields carry their own check.

One definition per setting. A field states its type, its default where a composed config may
lack the key, and its ``Spec`` (the type and range the key must have)::

    @dataclass(frozen=True, kw_only=True)
    class DPSettings:
        clipping_norm: float = setting(Float(gt=0.0), 10.0)

``specs_of(DPSettings, "federated.dp")`` gives the table that ``dipro.config.validate`` checks
(``{"federated.dp.clipping_norm": Float(gt=0.0), ...}``), and ``parse(DPSettings, mapping,
"federated.dp")`` builds the section from a mapping, checking each key as the table does and
raising ``ConfigError`` with one line naming the key, its value and what it should be. Code
then reads ``settings.federated.dp.clipping_norm``, never the mapping by its keys.

Hydra and OmegaConf keep whatever a command line gives: ``model.ablation.ehr=off`` is the
string ``"off"`` (and ``bool("off")`` is True), ``optim.lr=abc`` a string, ``optim.lr=nan`` a
float. The specs refuse each of these before any work starts.

This module imports nothing heavy: the model (``ModelConfig``), the loss (``LossWeights``), the
federated run and every entrypoint build on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from dipro import vocab


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any work (and before Ray starts)."""


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# --- what a key may hold --------------------------------------------------------------------


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
    """A finite number (an integer is accepted) above ``gt`` / at least ``ge`` / at most ``le``
    / below ``lt``."""

    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    lt: float | None = None
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
        if self.lt is not None and not value < self.lt:
            raise ConfigError(f"{key}={value} must be below {self.lt}")


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


@dataclass(frozen=True)
class Workers:
    """A count of workers (at least 1) or a range ``[min, max]`` with 1 <= min <= max."""

    def check(self, key: str, value: Any) -> None:
        bounds = list(value) if isinstance(value, list | tuple) else [value]
        whole = all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        low, high = (bounds[0], bounds[-1]) if whole and len(bounds) in (1, 2) else (0, 0)
        if not 1 <= low <= high:
            raise ConfigError(
                f"{key}={value} must be a count >= 1 or a range [min, max] with 1 <= min <= max"
            )


Spec = Bool | Int | Float | Choice | Str | MappingOf | ListOf | Workers
T = TypeVar("T")


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


# --- a section as a dataclass ---------------------------------------------------------------


def setting(spec: Spec, default: Any = MISSING) -> Any:
    """A field checked by ``spec``; ``default`` where a composed config may lack the key."""
    return field(default=default, metadata={"spec": spec})


def section(cls: type, *, nullable: bool = False) -> Any:
    """A field holding a nested section (``federated.dp``); defaults to ``cls()`` where every
    field of ``cls`` has a default, to None where the section is ``nullable``."""
    if nullable:
        return field(default=None, metadata={"section": cls, "nullable": True})
    if all(f.default is not MISSING for f in fields(cls)):
        return field(default_factory=cls, metadata={"section": cls})
    return field(metadata={"section": cls})


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def specs_of(cls: type, prefix: str = "") -> dict[str, Spec]:
    """The table of ``cls``: every leaf key under ``prefix`` with its spec."""
    table: dict[str, Spec] = {}
    for f in fields(cls):
        key = _key(prefix, f.name)
        if "section" in f.metadata:
            table.update(specs_of(f.metadata["section"], key))
        else:
            table[key] = f.metadata["spec"]
    return table


def _frozen(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def parse(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Section ``cls`` from ``data`` (a plain mapping): each key checked by its spec, nested
    sections built in turn, lists made tuples. Keys ``cls`` does not define are left to the
    sections that do. ConfigError names the first key that is missing or wrong."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}={_show(data)} is not a mapping")
    data = data or {}
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        key = _key(prefix, f.name)
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{key} is missing")
            continue
        value = data[f.name]
        if "section" in f.metadata:
            nullable = value is None and f.metadata.get("nullable", False)
            values[f.name] = None if nullable else parse(f.metadata["section"], value, key)
        else:
            spec = f.metadata["spec"]
            spec.check(key, value)
            if isinstance(spec, Float) and value is not None:
                value = float(value)
            values[f.name] = _frozen(value)
    return cls(**values)


def to_dict(settings: Any) -> dict[str, Any]:
    """The plain mapping ``parse`` reads back (what a checkpoint or a message stores)."""
    if not is_dataclass(settings) or isinstance(settings, type):
        raise TypeError(f"{settings!r} is not a settings dataclass instance")
    return asdict(settings)


# --- the sections ---------------------------------------------------------------------------

SPLITS = ("train", "val", "test")
STRATEGIES = ("fedavg", "fedprox", "fedadam")


@dataclass(frozen=True, kw_only=True)
class TaskSettings:
    """``task``: which prediction, and the validation metric that selects checkpoints."""

    name: str = setting(Choice(vocab.TASKS))
    monitor: str = setting(Str())
    monitor_mode: str = setting(Choice(("max", "min")))


@dataclass(frozen=True, kw_only=True)
class LrReference:
    """``optim.reference``: the training the configured lr belongs to (``lr_scaling: linear``)."""

    batch_size: int = setting(Int(min=1))
    accumulation_steps: int = setting(Int(min=1))
    num_workers: int = setting(Int(min=1))


@dataclass(frozen=True, kw_only=True)
class OptimSettings:
    """``optim``: AdamW and its cosine schedule (``dipro.engine``)."""

    lr: float = setting(Float(gt=0.0))
    batch_size: int = setting(Int(min=1))
    weight_decay: float = setting(Float(ge=0.0), 0.01)
    min_lr: float = setting(Float(ge=0.0), 1e-7)
    lr_scaling: str = setting(Choice(("none", "linear")), "none")
    reference: LrReference | None = section(LrReference, nullable=True)

    def __post_init__(self) -> None:
        if self.lr_scaling == "linear" and self.reference is None:
            raise ConfigError(
                "optim.lr_scaling=linear needs optim.reference (batch_size, accumulation_steps, "
                "num_workers: the training the configured lr belongs to)"
            )


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """``train``: the epochs (or a site's local epochs) and what each step does."""

    max_epochs: int = setting(Int(min=1), 100)
    patience: int | None = setting(Int(min=1, nullable=True), None)
    accumulation_steps: int = setting(Int(min=1), 1)
    max_grad_norm: float | None = setting(Float(gt=0.0, nullable=True), None)
    eval_batch_size: int = setting(Int(min=1), 32)
    checkpoints_to_keep: int = setting(Int(min=1), 2)
    evaluate_test: bool = setting(Bool(), True)
    max_steps_per_epoch: int | None = setting(Int(min=1, nullable=True), None)
    data_progress_bars: bool = setting(Bool(), False)
    deterministic: bool = setting(Bool(), True)
    fail_at: Mapping[str, int] | None = setting(MappingOf(Int(), nullable=True), None)


AMP_DTYPES = ("bf16", "bfloat16", "fp16", "float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True, kw_only=True)
class ScalingSettings:
    """``scaling``: the Ray Train workers, their devices and the step's speed switches
    (configs/scaling/)."""

    num_workers: int | tuple[int, int] = setting(Workers(), 1)
    use_gpu: bool = setting(Bool(), False)
    resources_per_worker: Mapping[str, float] | None = setting(
        MappingOf(Float(ge=0.0), nullable=True), None
    )
    cpus_per_worker: int = setting(Int(min=1), 1)
    amp: str | None = setting(Choice(AMP_DTYPES, nullable=True), None)
    prefetch_batches: int = setting(Int(min=0), 1)
    local_shuffle_buffer_size: int | None = setting(Int(min=1, nullable=True), None)
    max_failures: int = setting(Int(min=-1), 0)
    require_remote_storage: bool = setting(Bool(), False)
    pin_memory: bool = setting(Bool(), False)
    elastic_resize_monitor_interval_s: float = setting(Float(ge=0.0), 60.0)
    channels_last: bool = setting(Bool(), False)
    compile: str | None = setting(Choice(COMPILE_MODES, nullable=True), None)
    compile_backend: str = setting(Choice(COMPILE_BACKENDS), "inductor")
    cudnn_benchmark: bool = setting(Bool(), False)
    fused_optimizer: bool = setting(Bool(), False)
    placement_strategy: str = setting(
        Choice(("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")), "PACK"
    )

    @property
    def worker_range(self) -> tuple[int, int]:
        """``(min, max)`` workers: a count is fixed, a range is elastic."""
        value = self.num_workers
        return (value, value) if isinstance(value, int) else (value[0], value[-1])


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """``data``: the shard root of the run and how it is read."""

    root: str = setting(Str())
    overwrite: bool = setting(Bool(), False)
    verify_checksums: bool = setting(Bool(), True)


STORE_FILE = "mlflow.db"  # the SQLite store in a tracking directory
ARTIFACTS_DIR = "artifacts"  # beside it: the artifacts of each experiment


@dataclass(frozen=True, kw_only=True)
class TrackingSettings:
    """``tracking``: MLflow (``dipro.tracking``); the run directory stays the source of truth.
    A config without the section tracks nothing."""

    enabled: bool = setting(Bool(), False)
    uri: str = setting(Str(), ".")  # a directory (its SQLite store) or a tracking URI
    experiment: str = setting(Str(), "dipro")
    model_name: str | None = setting(Str(nullable=True), None)  # registry model of best runs
    required: bool = setting(Bool(), False)  # a store that does not answer stops the run

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI: a directory becomes its SQLite store."""
        if "://" in self.uri or self.uri == "databricks":
            return self.uri
        return f"sqlite:///{Path(self.uri).resolve() / STORE_FILE}"

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts: beside a SQLite store (MLflow's default
        would be ``./mlruns`` under the current directory); a server's own root otherwise."""
        uri = self.tracking_uri
        if not uri.startswith("sqlite:///"):
            return None
        database = Path(uri.removeprefix("sqlite:///"))
        return (database.parent / ARTIFACTS_DIR / self.experiment).as_uri()

    def describe(self) -> str:
        """One line for a console header."""
        if not self.enabled:
            return "off (tracking.enabled=false)"
        required = ", required" if self.required else ""
        if self.artifact_location is None:
            return f"{self.tracking_uri}, experiment {self.experiment}{required}"
        return (
            f"{self.tracking_uri}, experiment {self.experiment}{required} "
            f"(browse: mlflow ui --backend-store-uri {self.tracking_uri})"
        )


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """The job around a run: the top-level keys the entrypoints share."""

    verbose: bool = setting(Bool(), False)  # Ray's and the workers' output on the console
    log_dir: str | None = setting(Str(nullable=True), None)  # {log_dir}/{job}.log
    ray_address: str | None = setting(Str(nullable=True), None)  # else RAY_ADDRESS, else local
    ray_num_cpus: int | None = setting(Int(min=1, nullable=True), None)  # an in-process Ray's
    resource_wait_s: float | None = setting(Float(ge=0.0, nullable=True), None)
    tracking: TrackingSettings = section(TrackingSettings)


@dataclass(frozen=True, kw_only=True)
class LocalLayers:
    """``federated.local``: the layers that stay at each site, never averaged or sent."""

    batch_norm: bool = setting(Bool(), False)
    layers: tuple[str, ...] = setting(ListOf(Str()), ())

    @property
    def any(self) -> bool:
        """Whether any layer stays local."""
        return self.batch_norm or bool(self.layers)


@dataclass(frozen=True, kw_only=True)
class DPSettings:
    """``federated.dp``: central differential privacy by clipping each site's update."""

    enabled: bool = setting(Bool(), False)
    clipping_norm: float = setting(Float(gt=0.0), 10.0)
    noise_multiplier: float = setting(Float(ge=0.0), 0.0)
    delta: float = setting(Float(gt=0.0, le=0.1), 1e-5)
    target_epsilon: float | None = setting(Float(gt=0.0, nullable=True), None)


@dataclass(frozen=True, kw_only=True)
class SecureSettings:
    """``federated.secure``: SecAgg+ (Flower's workflow); the server sees only the sum."""

    enabled: bool = setting(Bool(), False)
    num_shares: float = setting(Float(gt=0.0), 1.0)
    reconstruction_threshold: float = setting(Float(gt=0.0), 0.5)
    clipping_range: float = setting(Float(gt=0.0), 8.0)
    quantization_range: int = setting(Int(min=2), 4194304)
    modulus_range: int = setting(Int(min=2), 4294967296)
    max_weight: float = setting(Float(gt=0.0), 1000.0)


@dataclass(frozen=True, kw_only=True)
class FederatedSettings:
    """``federated``: the rounds, the sites' local work, and what protects their updates."""

    num_rounds: int = setting(Int(min=1), 10)
    local_epochs: int = setting(Int(min=1), 1)
    fraction_train: float = setting(Float(gt=0.0, le=1.0), 1.0)
    fraction_evaluate: float = setting(Float(ge=0.0, le=1.0), 1.0)
    min_sites: int = setting(Int(min=1), 2)
    min_report_count: int = setting(Int(min=1), 1)
    site_log_dir: str | None = setting(Str(nullable=True), None)
    site_state_dir: str | None = setting(Str(nullable=True), None)
    local: LocalLayers = section(LocalLayers)
    wait_for_sites_s: float = setting(Float(gt=0.0), 120.0)
    round_timeout_s: float = setting(Float(gt=0.0), 3600.0)
    device: str = setting(Choice(("cpu", "cuda")), "cpu")
    threads: int = setting(Int(min=1), 1)
    dp: DPSettings = section(DPSettings)
    secure: SecureSettings = section(SecureSettings)
    fail_at: Mapping[str, Any] | None = setting(MappingOf(Int(), nullable=True), None)


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """``server``: what the coordinator scores with, if anything of its own."""

    eval_data: str | None = setting(Str(nullable=True), None)
    eval_split: str = setting(Choice(SPLITS), "val")
    test_split: str | None = setting(Choice(SPLITS, nullable=True), "test")


@dataclass(frozen=True, kw_only=True)
class SimulationSettings:
    """``simulation``: the sites simulated in one machine's Ray."""

    num_sites: int | None = setting(Int(min=1, nullable=True), None)
    client_cpus: float = setting(Float(gt=0.0), 1.0)
    ray_num_cpus: int = setting(Int(min=1), 2)
    timeout_s: float = setting(Float(gt=0.0), 3600.0)


@dataclass(frozen=True, kw_only=True)
class StrategySettings:
    """``strategy``: how the server combines the sites' updates (configs/strategy/)."""

    name: str = setting(Choice(STRATEGIES))
    proximal_mu: float | None = setting(Float(ge=0.0, nullable=True), None)
    eta: float | None = setting(Float(gt=0.0, nullable=True), None)
    beta_1: float | None = setting(Float(ge=0.0, lt=1.0, nullable=True), None)
    beta_2: float | None = setting(Float(ge=0.0, lt=1.0, nullable=True), None)
    tau: float | None = setting(Float(gt=0.0, nullable=True), None)


@dataclass(frozen=True, kw_only=True)
class Ablation:
    """``model.ablation``: which components are built (docs/model.md, "Ablations"); false turns
    one off."""

    std: bool = setting(Bool(), True)
    pae: bool = setting(Bool(), True)
    local_fusion: bool = setting(Bool(), True)
    global_fusion: bool = setting(Bool(), True)
    ehr: bool = setting(Bool(), True)
    longitudinal: bool = setting(Bool(), True)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """``model``: the architecture's numbers (the comments of ``configs/model/dipro.yaml`` say
    each). Checkpoints store ``to_dict()`` and are read back with ``from_dict``."""

    region_mode: str = setting(Choice(("crops", "features")))
    backbone: str = setting(Choice(("resnet50", "resnet18")))
    pretrained_weights: str | None = setting(Str(nullable=True))
    feature_dim: int = setting(Int(min=1))
    d_model: int = setting(Int(min=2))
    num_heads: int = setting(Int(min=1))
    ehr_layers: int = setting(Int(min=1))
    local_fusion_layers: int = setting(Int(min=1))
    fusion_layers: int = setting(Int(min=1))
    num_groups: int = setting(Int(min=1))
    dropout: float = setting(Float(ge=0.0, lt=1.0))
    ehr_use_observed: bool = setting(Bool())
    ablation: Ablation = section(Ablation)

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads or self.d_model % 2:
            raise ConfigError(
                f"model.d_model={self.d_model} must be even and a multiple of "
                f"model.num_heads={self.num_heads} (each attention head takes d_model / "
                "num_heads features; the sinusoidal time encoding pairs them)"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Exactly the keys of this class and of ``Ablation`` (a checkpoint's model config is
        read without Hydra); a missing, unknown or wrong key is a ConfigError naming it."""
        check_exact_keys("model", data, [f.name for f in fields(cls)])
        check_exact_keys("model.ablation", data["ablation"], [f.name for f in fields(Ablation)])
        return parse(cls, data, "model")

    def to_dict(self) -> dict[str, Any]:
        """The plain mapping ``from_dict`` reads (what checkpoints store)."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class LossWeights:
    """``loss``: the lambdas of the total loss (``dipro.losses``)."""

    ce: float = setting(Float(ge=0.0))
    orth: float = setting(Float(ge=0.0))
    temp: float = setting(Float(ge=0.0))
    static: float = setting(Float(ge=0.0))
    dyn: float = setting(Float(ge=0.0))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossWeights:
        """Exactly the keys ce, orth, temp, static, dyn; a missing or unknown key is an error."""
        check_exact_keys("loss", data, [f.name for f in fields(cls)])
        return parse(cls, data, "loss")


@dataclass(frozen=True, kw_only=True)
class ModelTraining:
    """What every trainer of DiPro reads, a Ray Train worker and a federated site alike: the
    seed, the task, the model, its loss and optimiser, the training loop and the data."""

    seed: int = setting(Int())
    task: TaskSettings = section(TaskSettings)
    model: ModelConfig = section(ModelConfig)
    loss: LossWeights = section(LossWeights)
    optim: OptimSettings = section(OptimSettings)
    train: TrainSettings = section(TrainSettings)
    data: DataSettings = section(DataSettings)


@dataclass(frozen=True, kw_only=True)
class TrainingRun(JobSettings, ModelTraining):
    """A Ray Train run (``configs/train.yaml``): its job, what it trains, its name and where
    it lives, and its workers."""

    run_name: str = setting(Str())
    storage_path: str = setting(Str())
    scaling: ScalingSettings = section(ScalingSettings)
