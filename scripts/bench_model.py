"""Forward+backward throughput and peak memory of DiPro per task and region mode.

The model is built from configs/model/dipro.yaml with each task preset's overrides (the
authors' widths: d_model 256/256/128, local fusion layers 1/2/1; ResNet-50 on 224 x 224
crops), fed with
random records collated by the project's collate, and trained on the task's total loss
(dipro.losses, uniform class weights). Each (task, mode) runs in a fresh process so that its
peak memory is its own: CPU reports the growth of the peak resident set size (ru_maxrss) over
the imported runtime, GPU ``torch.cuda.max_memory_allocated`` during the timed steps.

    python scripts/bench_model.py                              # CPU, crops 64 x 64 (see below)
    python scripts/bench_model.py --device cuda --amp bf16     # GPU, crops 224 x 224
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from dipro import vocab
from dipro.batch import Batch
from dipro.data.samples import collate_records, random_record
from dipro.losses import ClassWeights, DiProLoss, LossWeights
from dipro.model import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU_CROP = 64


def task_config(task: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(model config, loss lambdas, batch size) of ``task`` from the YAML presets."""
    model_cfg = yaml.safe_load((CONFIGS / "model" / "dipro.yaml").read_text())
    preset = yaml.safe_load((CONFIGS / "task" / f"{task}.yaml").read_text())
    model_cfg.update(preset["model"])
    return model_cfg, preset["loss"], int(preset["optim"]["batch_size"])


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


def bench_one(task: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.steps`` forward+backward passes after ``args.warmup`` untimed ones."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    model_cfg, loss_cfg, batch_size = task_config(task)
    model_cfg.update(region_mode=mode, backbone=args.backbone)
    batch_size = args.batch_size or batch_size
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights", category=UserWarning)
        model = build_model(model_cfg, task).to(device).train()
    loss_fn = DiProLoss(
        task=task, weights=LossWeights.from_dict(loss_cfg), class_weights=ClassWeights.uniform()
    ).to(device)
    batch = random_batch(
        task,
        mode,
        batch_size,
        args.num_cxr,
        args.ehr_hours,
        args.crop_size,
        int(model_cfg["feature_dim"]),
    ).to(device)
    amp = args.amp == "bf16"

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            output = model(batch)
        loss, _ = loss_fn(output, batch)
        loss.backward()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mib
    seconds = time.perf_counter() - start
    return {
        "task": task,
        "mode": mode,
        "batch": batch_size,
        "d_model": model_cfg["d_model"],
        "layers": model_cfg["local_fusion_layers"],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "samples_per_s": args.steps * batch_size / seconds,
        "peak_mib": peak_mib,
    }


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
    parser.add_argument("--num-cxr", type=int, default=4, help="CXRs per ICU-task sample")
    parser.add_argument("--ehr-hours", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.crop_size is None:
        args.crop_size = 224 if args.device.startswith("cuda") else CPU_CROP
    print(
        f"device {args.device}, backbone {args.backbone}, crops {args.crop_size}x{args.crop_size}"
        f", amp {args.amp}, {args.num_cxr} CXRs per ICU sample, {args.ehr_hours} EHR hours, "
        f"{args.steps} timed steps, torch threads {torch.get_num_threads()}"
    )
    if args.crop_size != 224:
        print(f"note: crops are {args.crop_size}x{args.crop_size}, not the authors' 224x224")
    print(
        f"{'task':<20} {'mode':<9} {'batch':>5} {'D':>4} {'layers':>6} {'params M':>9} "
        f"{'samples/s':>10} {'peak MiB':>9}"
    )
    spawn = multiprocessing.get_context("spawn")
    for task in args.tasks:
        for mode in args.modes:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                r = pool.submit(bench_one, task, mode, args).result()
            print(
                f"{r['task']:<20} {r['mode']:<9} {r['batch']:>5} {r['d_model']:>4} "
                f"{r['layers']:>6} {r['params_m']:>9.1f} {r['samples_per_s']:>10.2f} "
                f"{r['peak_mib']:>9.0f}"
            )


if __name__ == "__main__":
    main()
