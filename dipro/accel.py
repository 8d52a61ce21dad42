"""The training step near the hardware: switches of the ``scaling`` config section, applied
once to a built model on its device, before DDP wraps it (``ray_jobs/worker.py`` and
``scripts/bench_model.py`` both call ``prepare_for_device``).

| key                       | on                                                             |
|---------------------------|----------------------------------------------------------------|
| scaling.channels_last     | the backbone's conv weights and input in NHWC order (crops mode) |
| scaling.compile           | torch.compile (this mode) of the backbone and of every other   |
|                           | sub-module of DiPro (STD, PAE heads, EHR encoder, fusions,     |
|                           | heads); null: eager                                            |
| scaling.compile_backend   | inductor (generates kernels) | aot_eager | eager (trace only)  |
| scaling.cudnn_benchmark   | cuDNN times its convolution algorithms per input shape and     |
|                           | keeps the fastest; only with ``train.deterministic=false``     |
| scaling.fused_optimizer   | AdamW's update of all parameters in one fused kernel           |

Each leaves the values the step computes as they are, up to floating-point order (a layout, a
kernel choice, a fused or generated kernel); ``tests/test_accel.py`` checks three training
steps with each switch against the plain step. One difference is by design: inductor draws
dropout masks with its own generator, so a compiled model with dropout draws other masks than
the eager one (the same distribution).

Two more levers exist without a switch here:

- crops reach the device as uint8 and are normalised there, always
  (``dipro.model.regions.CropBackbone``);
- larger micro-batches at the same effective batch: ``optim.batch_size`` x
  ``train.accumulation_steps`` is the effective batch per worker, so ``optim.batch_size=32
  train.accumulation_steps=1`` takes the optimizer steps of the presets' 8 x 4 with a quarter
  of the launches (exactly the same gradient for a model without batch statistics; DiPro's
  BatchNorms see larger batches).

The sub-modules are compiled in place (``nn.Module.compile``), so parameter names, state
dicts and checkpoints are those of the eager model. The region gather (``apply_to_valid``:
only present crops reach the backbone) stays eager: its row count depends on the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dipro.model.dipro import DiPro
from dipro.settings import COMPILE_BACKENDS, COMPILE_MODES, ScalingSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccelOptions:
    """The switches of the module docstring; every one off by default."""

    channels_last: bool = False
    compile: str | None = None
    compile_backend: str = "inductor"
    cudnn_benchmark: bool = False
    fused_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile mode {self.compile!r} is not one of {COMPILE_MODES}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(
                f"compile backend {self.compile_backend!r} is not one of {COMPILE_BACKENDS}"
            )
        if self.compile not in (None, "default") and self.compile_backend != "inductor":
            raise ValueError(
                f"compile mode {self.compile!r} is a mode of the inductor backend; the "
                f"{self.compile_backend} backend takes only 'default'"
            )

    @classmethod
    def of(cls, scaling: ScalingSettings) -> AccelOptions:
        """The options of the ``scaling`` settings."""
        return cls(
            channels_last=scaling.channels_last,
            compile=scaling.compile,
            compile_backend=scaling.compile_backend,
            cudnn_benchmark=scaling.cudnn_benchmark,
            fused_optimizer=scaling.fused_optimizer,
        )

    def describe(self) -> str:
        """One line naming the switches that are on (``plain`` when none)."""
        on = [
            name
            for name, enabled in (
                ("channels_last", self.channels_last),
                ("cudnn_benchmark", self.cudnn_benchmark),
                ("fused_optimizer", self.fused_optimizer),
            )
            if enabled
        ]
        if self.compile is not None:
            on.append(f"compile={self.compile}/{self.compile_backend}")
        return " ".join(on) or "plain"


def prepare_for_device(
    model: DiPro, device: torch.device | str, options: AccelOptions, *, deterministic: bool
) -> DiPro:
    """``model`` on ``device`` with ``options`` applied (in place; returns it).

    cuDNN autotuning is process-wide: ``torch.backends.cudnn.benchmark`` is set to
    ``options.cudnn_benchmark and not deterministic``. Deterministic training
    (``train.deterministic``) wins because the algorithm cuDNN picks by timing may differ from
    run to run, and with it the last bits of the result. Call it after
    ``dipro.seeds.set_determinism``, which it overrides on this one flag.
    """
    model.to(device)
    if options.cudnn_benchmark and deterministic:
        logger.info("cudnn_benchmark is off: train.deterministic=true wins")
    torch.backends.cudnn.benchmark = options.cudnn_benchmark and not deterministic
    backbone = model.regions.backbone
    if options.channels_last and backbone is not None:
        backbone.to_channels_last()
    if options.compile is not None:
        mode = None if options.compile == "default" else options.compile
        parts = [child for name, child in model.named_children() if name != "regions"]
        for part in ([backbone] if backbone is not None else []) + parts:
            part.compile(mode=mode, backend=options.compile_backend)
    return model
