"""Hourly EHR: itemid map, conversions, clipping, last value per hour, mask, forward fill."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dipro import vocab
from dipro.data.mimic import ehr


def test_specs_follow_the_vocabulary_order() -> None:
    assert tuple(s.name for s in ehr.EHR_SPECS) == vocab.EHR_VARIABLES
    assert all(i > 220000 for i in ehr.ITEMID_TO_VARIABLE)
    assert len(ehr.ITEMID_TO_VARIABLE) == sum(len(s.itemids) for s in ehr.EHR_SPECS)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4 Spontaneously", 4.0),
        ("Spontaneously", 4.0),
        ("To Pain", 2.0),
        ("No Response-ETT", 1.0),
        ("Obeys Commands", 6.0),
        ("5 Oriented", 5.0),
    ],
)
def test_gcs_text_to_number(text: str, value: float) -> None:
    assert ehr.gcs_text_to_number(text) == value


def test_unknown_gcs_text_is_missing() -> None:
    assert np.isnan(ehr.gcs_text_to_number("Unable to assess"))


def _write_chartevents(path: Path, rows: list[list[object]]) -> None:
    header = (
        "subject_id,hadm_id,stay_id,caregiver_id,charttime,storetime,itemid,value,valuenum,"
        "valueuom,warning\n"
    )
    body = "".join(",".join("" if v is None else str(v) for v in row) + "\n" for row in rows)
    with gzip.open(path, "wt") as f:
        f.write(header + body)


def test_hourly_grid_last_value_clip_convert_and_fill(tmp_path: Path) -> None:
    hr, temp, gcs_eye, fio2 = (
        vocab.EHR_VARIABLES.index(n)
        for n in (
            "Heart Rate",
            "Temperature",
            "Glascow coma scale eye opening",
            "Fraction inspired oxygen",
        )
    )
    row = [1, 2, 30, 9]
    rows = [
        [*row, "2150-01-01 00:10:00", "", 220045, 90, 90, "bpm", 0],
        [*row, "2150-01-01 00:50:00", "", 220045, 95, 95, "bpm", 0],  # last of hour 0
        [*row, "2150-01-01 02:05:00", "", 220045, 9999, 9999, "bpm", 0],  # clipped to 350
        [*row, "2150-01-01 01:00:00", "", 223761, 98.6, 98.6, "F", 0],  # 37 C in hour 1
        [*row, "2150-01-01 01:30:00", "", 220739, "To Pain", "", "", 0],  # text only
        [*row, "2150-01-01 00:30:00", "", 223835, 0.5, 0.5, "", 0],  # fraction -> 50 %
        [*row, "2150-01-01 00:30:00", "", 220048, "SR", "", "", 0],  # not one of the 38
        [1, 2, 31, 9, "2150-01-01 00:30:00", "", 220045, 70, 70, "bpm", 0],  # other stay
        [*row, "2149-12-31 23:30:00", "", 220045, 60, 60, "bpm", 0],  # before intime
    ]
    path = tmp_path / "chartevents.csv.gz"
    _write_chartevents(path, rows)
    stats = ehr.StreamStats()
    events = ehr.stream_events(path, [30], ehr.CHART_ITEMIDS, block_size=256, stats=stats)
    assert (stats.rows_read, stats.rows_kept) == (9, 7)
    stays = pd.DataFrame(
        {
            "stay_id": [30],
            "intime": pd.to_datetime(["2150-01-01 00:00:00"]),
            "outtime": pd.to_datetime(["2150-01-01 03:30:00"]),
        }
    )
    grid = ehr.hourly_ehr(ehr.to_variables(events), stays)[30]
    assert grid.values.shape == (4, vocab.NUM_EHR)
    np.testing.assert_allclose(grid.values[:, hr], [95, 95, 350, 350])
    assert grid.observed[:, hr].tolist() == [True, False, True, False]
    np.testing.assert_allclose(grid.values[:, temp], [37, 37, 37, 37], atol=1e-4)
    assert grid.observed[:, temp].tolist() == [False, True, False, False]
    assert grid.values[:, gcs_eye].tolist() == [4, 2, 2, 2]  # normal 4, then forward filled
    assert grid.values[0, fio2] == 50
    never = vocab.EHR_VARIABLES.index("Troponin-T")
    assert not grid.observed[:, never].any()
    np.testing.assert_allclose(grid.values[:, never], ehr.NORMAL_VALUES[never])


def test_streaming_in_small_blocks_equals_one_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 3000
    rows = [
        [
            1,
            2,
            int(rng.integers(30, 40)),
            9,
            f"2150-01-01 {int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}:00",
            "",
            int(rng.choice([220045, 220179, 220048, 226730])),
            80,
            80,
            "",
            0,
        ]
        for _ in range(n)
    ]
    path = tmp_path / "chartevents.csv.gz"
    _write_chartevents(path, rows)
    small = ehr.stream_events(path, [31, 33], ehr.CHART_ITEMIDS, block_size=1 << 10)
    big = ehr.stream_events(path, [31, 33], ehr.CHART_ITEMIDS, block_size=64 << 20)
    pd.testing.assert_frame_equal(small, big)
    frame = pd.read_csv(path)
    expected = frame[frame["stay_id"].isin([31, 33]) & frame["itemid"].isin(ehr.CHART_ITEMIDS)]
    assert len(small) == len(expected) > 0


def test_stream_events_names_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "outputevents.csv"
    path.write_text("subject_id,hadm_id,charttime,itemid,value\n")
    with pytest.raises(ValueError, match=r"outputevents\.csv.*'stay_id'"):
        ehr.stream_events(path, [1], [226559])
