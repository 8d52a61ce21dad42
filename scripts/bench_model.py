"""Training-step throughput and peak memory of DiPro per task and region mode.

The model is built from configs/model/dipro.yaml with each task preset's overrides (the
authors' widths: d_model 256/256/128, local fusion layers 1/2/1; ResNet-50 on 224 x 224
crops), fed with random records collated by the project's collate, and trained by the
project's engine (``dipro.engine.train_epoch``) on one batch held on the device: forward,
the task's total loss (uniform class weights), backward, and every ``accumulation`` micro-batches
(``train.accumulation_steps`` of configs/optim/adamw.yaml) the division by the group's rows,
clipping and the AdamW step. What the Ray workers run, minus reading the data; a steps count
that is a multiple of the accumulation times the optimizer at its share of training.

The step near the hardware (``dipro.accel``) is applied as in the Ray worker: ``--channels-last``,
``--compile MODE`` (``--compile-backend``), ``--cudnn-benchmark`` (with ``--deterministic``,
deterministic wins, as in training) and ``--fused-optimizer``. Each (task, mode) runs in a
fresh process so that its peak memory is its own: CPU reports the growth of the peak resident
set size (ru_maxrss) over the imported runtime, GPU ``torch.cuda.max_memory_allocated``
during the timed steps. ``--json FILE`` appends one JSON line per case.

``--profile`` times instead one optimizer step (``accumulation`` micro-batches and the update)
under ``torch.profiler`` on the CPU and prints where its time goes: the backbone, the region
adapter, STD, the PAE heads, the EHR encoder, the fusions and task heads, the model's own
code between them, the loss, the optimizer and the engine's code around them. Backward time
is charged to the part whose forward op made the autograd node (the profiler's sequence
numbers).

    python scripts/bench_model.py                              # CPU, crops 64 x 64 (see below)
    python scripts/bench_model.py --device cuda --amp bf16     # GPU, crops 224 x 224
    python scripts/bench_model.py --profile --tasks disease_progression --modes crops \\
        --batch-size 4 --threads 1                             # where a CPU step's time goes
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import resource
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dipro import vocab
from dipro.accel import COMPILE_BACKENDS, COMPILE_MODES, AccelOptions, prepare_for_device
from dipro.batch import Batch
from dipro.data.samples import collate_records, random_record
from dipro.engine import build_optimizer, train_epoch
from dipro.losses import ClassWeights, DiProLoss
from dipro.model import build_model
from dipro.seeds import set_determinism
from dipro.settings import LossWeights, OptimSettings, ScalingSettings, parse

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU_CROP = 64

# Rows of the profile: a DiPro sub-module (dotted path) -> the part it belongs to. The model
# itself is "DiPro's own code" (pairing, reversal, masks between the parts); the loss module is
# "loss"; AdamW's step is "optimizer"; the rest of the step is the engine's.
PROFILE_PARTS: dict[str, str] = {
    "regions.backbone": "backbone (ResNet)",
    "regions": "region adapter and gather",
    "std": "STD",
    "region_heads": "PAE region heads",
    "ehr": "EHR encoder",
    "local_ehr": "fusions and task heads",
    "local_fusion": "fusions and task heads",
    "global_fusion": "fusions and task heads",
    "final_fusion": "fusions and task heads",
    "static_fusion": "fusions and task heads",
    "heads": "fusions and task heads",
    "": "DiPro's own code",
}
LOSS_PART, OPTIMIZER_PART = "loss", "optimizer (AdamW step)"
# Innermost ops that compute nothing on a device (views, allocation): not counted as launches.
NO_KERNEL = frozenset(
    f"aten::{name}"
    for name in (
        "as_strided",
        "view",
        "_reshape_alias",
        "_unsafe_view",
        "alias",
        "empty",
        "empty_strided",
        "resolve_conj",
        "resolve_neg",
        "detach",
        "lift_fresh",
    )
)
ENGINE_PART = "engine (grad / rows, clipping, zero_grad, .grad accumulation)"


def task_config(task: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(model config, loss lambdas, optim section, train section) of ``task`` from the YAML
    presets: configs/model/dipro.yaml and configs/optim/adamw.yaml under the task preset."""
    model_cfg = yaml.safe_load((CONFIGS / "model" / "dipro.yaml").read_text())
    optim_preset = yaml.safe_load((CONFIGS / "optim" / "adamw.yaml").read_text())
    preset = yaml.safe_load((CONFIGS / "task" / f"{task}.yaml").read_text())
    model_cfg.update(preset["model"])
    optim_cfg = {**optim_preset["optim"], **preset["optim"]}
    return model_cfg, preset["loss"], optim_cfg, optim_preset["train"]


def random_batch(
    task: str, mode: str, batch_size: int, num_cxr: int, ehr_hours: int, crop: int, feat: int
) -> Batch:
    """A batch of random records of ``task`` (``dipro.data.samples``) through the collate."""
    hours = [float(h) for h in range(ehr_hours)]
    return collate_records(
        [
            random_record(
                i,
                task,
                num_cxr=2 if task == "disease_progression" else num_cxr,
                ehr_times=hours,
                mode=mode,
                crop_size=crop,
                feature_dim=feat,
            )
            for i in range(batch_size)
        ]
    )


def accel_options(args: argparse.Namespace) -> AccelOptions:
    """The ``dipro.accel`` switches: those of ``--preset`` (configs/scaling/NAME.yaml, none
    without it), plus the ones the command line turns on or sets."""
    preset = AccelOptions()
    if args.preset:
        scaling = yaml.safe_load((CONFIGS / "scaling" / f"{args.preset}.yaml").read_text())
        preset = AccelOptions.of(parse(ScalingSettings, scaling, "scaling"))
    return AccelOptions(
        channels_last=preset.channels_last or args.channels_last,
        compile=args.compile or preset.compile,
        compile_backend=args.compile_backend or preset.compile_backend,
        cudnn_benchmark=preset.cudnn_benchmark or args.cudnn_benchmark,
        fused_optimizer=preset.fused_optimizer or args.fused_optimizer,
    )


class _Setup:
    """One case's model, loss, optimizer and batch on the device, prepared as the Ray worker
    prepares them (determinism, then ``prepare_for_device``, then the optimizer)."""

    def __init__(self, task: str, mode: str, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = torch.device(args.device)
        self.options = accel_options(args)
        model_cfg, loss_cfg, optim_cfg, train_cfg = task_config(task)
        model_cfg.update(region_mode=mode, backbone=args.backbone)
        self.model_cfg = model_cfg
        self.batch_size = args.batch_size or int(optim_cfg["batch_size"])
        self.accumulation = args.accumulation or int(train_cfg["accumulation_steps"])
        self.max_grad_norm = train_cfg.get("max_grad_norm")
        set_determinism(args.deterministic, self.device.type)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*random weights", category=UserWarning)
            built = build_model(model_cfg, task)
        self.model = prepare_for_device(
            built, self.device, self.options, deterministic=args.deterministic
        )
        self.optimizer = build_optimizer(
            self.model,
            parse(OptimSettings, optim_cfg, "optim"),
            accumulation_steps=self.accumulation,
            fused=self.options.fused_optimizer,
        )
        self.loss_fn = DiProLoss(
            task=task, weights=LossWeights.from_dict(loss_cfg), class_weights=ClassWeights.uniform()
        ).to(self.device)
        self.batch = random_batch(
            task,
            mode,
            self.batch_size,
            args.num_cxr,
            args.ehr_hours,
            args.crop_size,
            int(model_cfg["feature_dim"]),
        ).to(self.device)
        self.amp = None if args.amp == "none" else args.amp

    def train(self, micro_batches: int) -> dict[str, float]:
        """``micro_batches`` training micro-batches of the engine on the held batch."""
        return train_epoch(
            self.model,
            itertools.repeat(self.batch, micro_batches),
            self.optimizer,
            self.loss_fn,
            device=self.device,
            accumulation_steps=self.accumulation,
            max_grad_norm=self.max_grad_norm,
            amp_dtype=self.amp,
        )

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def bench_one(task: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.steps`` training micro-batches after ``args.warmup`` untimed ones."""
    base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    setup = _Setup(task, mode, args)
    setup.train(args.warmup)
    setup.synchronize()
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    setup.train(args.steps)
    setup.synchronize()
    seconds = time.perf_counter() - start
    if setup.device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mib
    return {
        "task": task,
        "mode": mode,
        "options": setup.options.describe(),
        "batch": setup.batch_size,
        "accumulation": setup.accumulation,
        "d_model": setup.model_cfg["d_model"],
        "layers": setup.model_cfg["local_fusion_layers"],
        "params_m": sum(p.numel() for p in setup.model.parameters()) / 1e6,
        "samples_per_s": args.steps * setup.batch_size / seconds,
        "peak_mib": peak_mib,
    }


@contextmanager
def _scoped(model: nn.Module, loss_fn: nn.Module) -> Iterator[None]:
    """Every part of ``PROFILE_PARTS`` (and the loss) runs its forward inside a profiler
    ``record_function`` named after its part, for as long as the context lasts."""
    modules = dict(model.named_modules())
    open_scopes: list[Any] = []

    def enter(label: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            scope = torch.profiler.record_function(label)
            scope.__enter__()
            open_scopes.append(scope)

        return hook

    def leave(*_: Any) -> None:
        open_scopes.pop().__exit__(None, None, None)

    handles = []
    targets = [(modules[p], label) for p, label in PROFILE_PARTS.items() if p in modules]
    for module, label in [*targets, (loss_fn, LOSS_PART)]:
        handles.append(module.register_forward_pre_hook(enter(label)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def attribute(events: Any) -> dict[tuple[str, str], list[float]]:
    """[self CPU microseconds, innermost ops] per (part, phase) of a profile's ``events()``;
    phase is forward (ops under the part's scope) or backward (autograd nodes made by the
    part's forward ops, matched by sequence number). Innermost ops (ops that call no other op)
    other than views and allocations (``NO_KERNEL``) are what a GPU launches as kernels, about
    one each: the part's launch count."""
    labels = {*PROFILE_PARTS.values(), LOSS_PART}

    def scope_of(event: Any) -> str | None:
        while event is not None:
            if event.name in labels:
                return event.name
            if event.name.startswith("Optimizer.step#"):
                return OPTIMIZER_PART
            event = event.cpu_parent
        return None

    def backward_node(event: Any) -> Any:
        while event is not None:
            if event.name.startswith("autograd::engine::evaluate_function:"):
                return event
            event = event.cpu_parent
        return None

    # An op that makes no autograd node records the sequence number the next node will take,
    # so the number belongs to the last forward op that records it.
    made_by: dict[int, str] = {}
    for event in sorted(events, key=lambda e: e.time_range.start):
        label = scope_of(event)
        if label is not None and event.sequence_nr >= 0 and backward_node(event) is None:
            made_by[event.sequence_nr] = label
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        node = backward_node(event)
        if node is not None:
            key = (made_by.get(node.sequence_nr, ENGINE_PART), "backward")
        else:
            key = (scope_of(event) or ENGINE_PART, "forward")
        totals[key][0] += event.self_cpu_time_total
        innermost = not event.cpu_children and event.name.startswith("aten::")
        totals[key][1] += innermost and event.name not in NO_KERNEL
    return totals


def profile_one(task: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One optimizer step (``accumulation`` micro-batches) under the profiler after
    ``args.warmup`` untimed micro-batches; the same step timed without the profiler too."""
    setup = _Setup(task, mode, args)
    setup.train(args.warmup)
    start = time.perf_counter()
    setup.train(setup.accumulation)
    plain_s = time.perf_counter() - start
    with (
        _scoped(setup.model, setup.loss_fn),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        setup.train(setup.accumulation)
    totals = attribute(prof.events())
    return {
        "task": task,
        "mode": mode,
        "batch": setup.batch_size,
        "accumulation": setup.accumulation,
        "threads": torch.get_num_threads(),
        "plain_ms": plain_s * 1e3,
        "parts": {
            f"{part}|{phase}": [us / 1e3, ops] for (part, phase), (us, ops) in totals.items()
        },
    }


def print_profile(r: dict[str, Any]) -> None:
    """The profile as a table: ms per optimizer step, forward and backward, share, and the
    innermost computing ops (about the kernel launches on a GPU)."""
    parts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for key, (ms, ops) in r["parts"].items():
        part, phase = key.split("|")
        parts[part][phase] += ms
        parts[part]["ops"] += ops
    total = sum(v["forward"] + v["backward"] for v in parts.values())
    print(
        f"\n{r['task']} {r['mode']}: one optimizer step = {r['accumulation']} micro-batches of "
        f"{r['batch']}, {r['threads']} thread(s); {r['plain_ms']:.0f} ms without the profiler, "
        f"{total:.0f} ms of profiled CPU time"
    )
    print(
        f"{'part':<62} {'forward ms':>10} {'backward ms':>11} {'total ms':>9} {'share':>6} "
        f"{'ops':>6}"
    )
    for part, ms in sorted(
        parts.items(), key=lambda item: -item[1]["forward"] - item[1]["backward"]
    ):
        both = ms["forward"] + ms["backward"]
        print(
            f"{part:<62} {ms['forward']:>10.1f} {ms['backward']:>11.1f} {both:>9.1f} "
            f"{100 * both / total:>5.1f}% {ms['ops']:>6.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet50", choices=["resnet50", "resnet18"])
    parser.add_argument(
        "--crop-size", type=int, default=None, help=f"224 on GPU, {CPU_CROP} on CPU"
    )
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--tasks", nargs="+", default=list(vocab.TASKS), choices=vocab.TASKS)
    parser.add_argument("--modes", nargs="+", default=["crops", "features"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the task preset's")
    parser.add_argument(
        "--accumulation", type=int, default=None, help="default: train.accumulation_steps (4)"
    )
    parser.add_argument("--num-cxr", type=int, default=4, help="CXRs per ICU-task sample")
    parser.add_argument("--ehr-hours", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4, help="timed micro-batches")
    parser.add_argument("--warmup", type=int, default=1, help="untimed micro-batches first")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(p.stem for p in (CONFIGS / "scaling").glob("*.yaml")),
        help="start from the switches of configs/scaling/PRESET.yaml",
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", default=None, choices=COMPILE_MODES)
    parser.add_argument(
        "--compile-backend", default=None, choices=COMPILE_BACKENDS, help="default: inductor"
    )
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--fused-optimizer", action="store_true")
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels, as train.deterministic"
    )
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line per case")
    parser.add_argument("--label", default="", help="the case's name in the JSON lines")
    parser.add_argument("--profile", action="store_true", help="profile one step on the CPU")
    args = parser.parse_args()
    if args.crop_size is None:
        args.crop_size = 224 if args.device.startswith("cuda") else CPU_CROP
    if args.profile and args.device != "cpu":
        parser.error("--profile attributes CPU time; run it with --device cpu")
    print(
        f"device {args.device}, backbone {args.backbone}, crops {args.crop_size}x{args.crop_size}"
        f", amp {args.amp}, {args.num_cxr} CXRs per ICU sample, {args.ehr_hours} EHR hours, "
        f"{args.steps} timed micro-batches, options {accel_options(args).describe()}, "
        f"deterministic {args.deterministic}, "
        f"torch threads {args.threads or torch.get_num_threads()}"
    )
    if args.crop_size != 224:
        print(f"note: crops are {args.crop_size}x{args.crop_size}, not the authors' 224x224")
    if not args.profile:
        print(
            f"{'task':<20} {'mode':<9} {'batch':>5} {'accum':>5} {'D':>4} {'layers':>6} "
            f"{'params M':>9} {'samples/s':>10} {'peak MiB':>9}"
        )
    spawn = multiprocessing.get_context("spawn")
    for task in args.tasks:
        for mode in args.modes:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                r = pool.submit(profile_one if args.profile else bench_one, task, mode, args)
                r = r.result()
            if args.json is not None:
                with args.json.open("a") as out:
                    out.write(json.dumps({**r, "case": args.label, "device": args.device}) + "\n")
            if args.profile:
                print_profile(r)
                continue
            print(
                f"{r['task']:<20} {r['mode']:<9} {r['batch']:>5} {r['accumulation']:>5} "
                f"{r['d_model']:>4} {r['layers']:>6} {r['params_m']:>9.1f} "
                f"{r['samples_per_s']:>10.2f} {r['peak_mib']:>9.0f}"
            )


if __name__ == "__main__":
    main()
