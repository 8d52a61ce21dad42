"""How long an epoch of a crops-mode ResNet-50 run takes on CPUs, said before it starts.

The task presets are the authors' GPU settings (ResNet-50 trained end to end on 224-pixel
crops); started on a CPU preset such a run trains, but an epoch takes hours. ``cpu_epoch_note``
gives the one console line that says so, from a rate measured with ``scripts/bench_model.py``
on the project's 2-core development machine (no GPU), scaled to the run:

- by the crops a sample holds: 10 regions per CXR, 2 CXRs per progression sample (a pair),
  ``ICU_CXRS_PER_SAMPLE`` for the ICU tasks (as ``scripts/bench_model.py`` assumes; the ratio
  of the measured GPU rates of progression and mortality, 81.6 / 43.6 samples/s, agrees);
- by the pixels of a crop (a convolution's work grows with them);
- linearly by the torch threads the run trains with (workers x ``scaling.cpus_per_worker``),
  an upper bound on the gain.
"""

from __future__ import annotations

from typing import Final

REGIONS_PER_CXR: Final = 10
CXRS_PER_SAMPLE: Final = {"disease_progression": 2}
ICU_CXRS_PER_SAMPLE: Final = 4

# ResNet-50 forward + backward on 224-pixel crops, 1 thread of the 2-core machine: 1.2 crops/s
# (docs/cluster.md), i.e. 0.06 progression samples of 20 crops per second.
MEASURED_SAMPLES_PER_S: Final = 0.06
MEASURED_CROP_SIZE: Final = 224
MEASURED_THREADS: Final = 1
MEASURED_CROPS_PER_SAMPLE: Final = CXRS_PER_SAMPLE["disease_progression"] * REGIONS_PER_CXR


def cpu_samples_per_s(task: str, crop_size: int, threads: int) -> float:
    """Expected training samples/s of a ResNet-50 crops-mode run of ``task`` on ``threads`` CPU
    threads with ``crop_size``-pixel crops (see the module docstring for the scaling)."""
    crops = CXRS_PER_SAMPLE.get(task, ICU_CXRS_PER_SAMPLE) * REGIONS_PER_CXR
    crops_per_s = MEASURED_SAMPLES_PER_S * MEASURED_CROPS_PER_SAMPLE
    per_crop_size = (MEASURED_CROP_SIZE / crop_size) ** 2
    return crops_per_s * per_crop_size * (threads / MEASURED_THREADS) / crops


def cpu_epoch_note(
    *,
    task: str,
    backbone: str,
    region_mode: str,
    use_gpu: bool,
    crop_size: int | None,
    train_samples: int,
    threads: int,
) -> str | None:
    """The line a crops-mode ResNet-50 run on CPUs prints before it starts (None for any other
    run): its expected minutes per training epoch and what to run instead."""
    if use_gpu or region_mode != "crops" or backbone != "resnet50" or not crop_size:
        return None
    rate = cpu_samples_per_s(task, crop_size, max(1, threads))
    minutes = train_samples / rate / 60
    return (
        f"crops mode with resnet50 on CPU: about {minutes:,.0f} min per epoch for "
        f"{train_samples:,} training samples of {crop_size} px crops on {threads} thread(s) "
        f"(measured {MEASURED_SAMPLES_PER_S} progression samples/s at {MEASURED_CROP_SIZE} px "
        f"on {MEASURED_THREADS} thread(s) of a 2-core CPU); use a GPU preset (scaling=1-gpu) "
        "or +experiment=demo"
    )
