"""The expected CPU epoch time of a crops-mode ResNet-50 run (dipro.epoch_time)."""

from __future__ import annotations

import pytest

from dipro.epoch_time import (
    MEASURED_CROP_SIZE,
    MEASURED_SAMPLES_PER_S,
    MEASURED_THREADS,
    cpu_epoch_note,
    cpu_samples_per_s,
)

RUN = {
    "task": "disease_progression",
    "backbone": "resnet50",
    "region_mode": "crops",
    "use_gpu": False,
    "crop_size": MEASURED_CROP_SIZE,
    "train_samples": 1200,
    "threads": MEASURED_THREADS,
}


def test_the_measured_case_gives_the_measured_rate():
    rate = cpu_samples_per_s("disease_progression", MEASURED_CROP_SIZE, MEASURED_THREADS)
    assert rate == pytest.approx(MEASURED_SAMPLES_PER_S)


def test_the_rate_scales_with_crops_pixels_and_threads():
    base = cpu_samples_per_s("disease_progression", 224, 2)
    assert cpu_samples_per_s("mortality", 224, 2) == pytest.approx(base / 2)  # 4 CXRs, not 2
    assert cpu_samples_per_s("disease_progression", 112, 2) == pytest.approx(base * 4)
    assert cpu_samples_per_s("disease_progression", 224, 8) == pytest.approx(base * 4)


def test_the_note_gives_minutes_per_epoch_and_the_way_out():
    note = cpu_epoch_note(**RUN)
    minutes = 1200 / MEASURED_SAMPLES_PER_S / 60
    assert note == (
        f"crops mode with resnet50 on CPU: about {minutes:,.0f} min per epoch for 1,200 "
        f"training samples of 224 px crops on {MEASURED_THREADS} thread(s) (measured "
        f"{MEASURED_SAMPLES_PER_S} progression samples/s at 224 px on {MEASURED_THREADS} "
        "thread(s) of a 2-core CPU); use a GPU preset (scaling=1-gpu) or +experiment=demo"
    )


@pytest.mark.parametrize(
    "change",
    [
        {"use_gpu": True},
        {"region_mode": "features", "crop_size": None},
        {"backbone": "resnet18"},
    ],
)
def test_no_note_for_a_gpu_features_or_resnet18_run(change):
    assert cpu_epoch_note(**(RUN | change)) is None
