"""The step near the hardware (``dipro.accel``): every scaling preset's switches validate and
build, and each switch, alone and all together, trains like the plain step on the tiny model
in crops mode (ResNet-18 on 16-pixel crops, no dropout)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny_model import tiny_model_cfg

from dipro.accel import AccelOptions, prepare_for_device
from dipro.config import TRAIN_SCHEMA, ConfigError, validate
from dipro.data.samples import collate_records, random_record
from dipro.engine import build_optimizer, train_epoch
from dipro.losses import ClassWeights, DiProLoss
from dipro.model import build_model
from dipro.model.dipro import DiPro
from dipro.settings import LossWeights, OptimSettings, ScalingSettings, parse

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(p.stem for p in (CONFIGS / "scaling").glob("*.yaml"))
TASK = "disease_progression"
CROP = 16
DEVICE = torch.device("cpu")
OPTIM = OptimSettings(lr=1e-3, batch_size=2, weight_decay=0.01)
LOSS = {"ce": 2.0, "temp": 0.1, "static": 0.5, "dyn": 2.0, "orth": 1.0}
# aot_eager traces forward and backward as inductor does, then runs them with eager kernels:
# the compiled path without a C++ toolchain or minutes of code generation.
CASES = {
    "channels_last": AccelOptions(channels_last=True),
    "compile": AccelOptions(compile="default", compile_backend="aot_eager"),
    "cudnn_benchmark": AccelOptions(cudnn_benchmark=True),
    "fused_optimizer": AccelOptions(fused_optimizer=True),
    "all": AccelOptions(
        channels_last=True,
        compile="default",
        compile_backend="aot_eager",
        cudnn_benchmark=True,
        fused_optimizer=True,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread (tiny tensors; the same reduction order in every step compared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _cudnn_flag() -> Iterator[None]:
    """The process-wide cuDNN autotuning flag, restored after each test."""
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = benchmark


def compose_train(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return validate(compose("train", overrides=overrides), TRAIN_SCHEMA)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_scaling_preset_validates_and_builds_its_options(preset):
    cfg = compose_train([f"scaling={preset}"])
    options = AccelOptions.of(parse(ScalingSettings, cfg["scaling"], "scaling"))
    if preset == "cpu-laptop":
        assert options == AccelOptions()
    else:
        assert options.channels_last and options.fused_optimizer and options.cudnn_benchmark


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["scaling.compile=fast"], "scaling.compile='fast' is not one of"),
        (["scaling.fused_optimizer=yes"], "scaling.fused_optimizer='yes' is not a boolean"),
        (
            ["scaling.compile=max-autotune", "scaling.compile_backend=aot_eager"],
            "a mode of the inductor backend",
        ),
    ],
)
def test_a_bad_switch_is_a_configuration_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_train(overrides)


def tiny_model() -> DiPro:
    torch.manual_seed(0)
    cfg = tiny_model_cfg(region_mode="crops", dropout=0.0, num_groups=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights", category=UserWarning)
        return build_model(cfg, TASK)


def batches() -> list:
    """Three micro-batches of two progression samples (two CXRs of 10 regions each)."""
    records = [
        random_record(i, TASK, ehr_times=[0.0, 5.0, 9.0], mode="crops", crop_size=CROP)
        for i in range(6)
    ]
    return [collate_records(records[i : i + 2]) for i in (0, 2, 4)]


def three_steps(options: AccelOptions) -> tuple[list, DiPro]:
    """The losses of three optimizer steps of the engine with ``options`` (the last two after
    the updates before them), and the trained model."""
    model = prepare_for_device(tiny_model(), DEVICE, options, deterministic=False)
    optimizer = build_optimizer(model, OPTIM, fused=options.fused_optimizer)
    loss_fn = DiProLoss(
        task=TASK, weights=LossWeights.from_dict(LOSS), class_weights=ClassWeights.uniform()
    )
    losses: list[float] = []
    train_epoch(
        model,
        batches(),
        optimizer,
        loss_fn,
        device=DEVICE,
        max_grad_norm=1.0,
        on_step=lambda _, logged: losses.append(logged["loss"]),
    )
    return losses, model


@pytest.fixture(scope="module")
def plain() -> tuple[list, DiPro]:
    return three_steps(AccelOptions())


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_switch_trains_like_the_plain_step(plain, case):
    """The same losses within float tolerance, step after step. Weights are not compared
    value by value: AdamW's first steps move a weight by about lr x sign(gradient), so a
    gradient of rounding size (a bias before BatchNorm) flips with the summation order, and the
    losses after those updates drift apart by up to about 2e-4 relative on some CPUs (an AMD
    EPYC's channels-last convolutions sum in another order); a layout or dtype bug moves them
    by far more than 1e-3."""
    plain_losses, plain_model = plain
    losses, model = three_steps(CASES[case])
    assert len(losses) == 3
    torch.testing.assert_close(losses, plain_losses, rtol=1e-3, atol=1e-5)
    assert list(model.state_dict()) == list(plain_model.state_dict())  # checkpoint keys kept


def test_channels_last_lays_out_the_backbone_and_its_input_as_nhwc():
    model = prepare_for_device(tiny_model(), DEVICE, CASES["channels_last"], deterministic=True)
    backbone = model.regions.backbone
    conv = backbone.net.conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    conv.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    backbone(torch.zeros(2, CROP, CROP, dtype=torch.uint8))
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("asked", "deterministic", "on"),
    [(True, False, True), (True, True, False), (False, False, False)],
)
def test_cudnn_autotuning_only_when_asked_and_not_deterministic(asked, deterministic, on):
    prepare_for_device(
        tiny_model(), DEVICE, AccelOptions(cudnn_benchmark=asked), deterministic=deterministic
    )
    assert torch.backends.cudnn.benchmark is on


def test_fused_adamw_is_what_torch_builds_on_the_cpu():
    """torch implements fused AdamW on the CPU, so the switch applies there as on CUDA (the
    same-loss check is ``test_each_switch_trains_like_the_plain_step[fused_optimizer]``)."""
    model = tiny_model()
    assert build_optimizer(model, OPTIM, fused=True).defaults["fused"] is True
    assert build_optimizer(model, OPTIM).defaults["fused"] is None


def test_inductor_modes_are_refused_with_another_backend():
    with pytest.raises(ValueError, match="takes only 'default'"):
        AccelOptions(compile="reduce-overhead", compile_backend="eager")
