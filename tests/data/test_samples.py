"""Random sample records: valid shard records of every task and region mode."""

from __future__ import annotations

import pytest

from dipro import vocab
from dipro.data.samples import collate_records, random_record
from dipro.data.schema import records_to_table, validate


@pytest.mark.parametrize("task", vocab.TASKS)
@pytest.mark.parametrize("mode", ["crops", "features"])
def test_random_records_are_valid_shard_records_and_collate(task: str, mode: str) -> None:
    cxrs = 2 if task == "disease_progression" else 3
    records = [random_record(i, task, num_cxr=cxrs, mode=mode, crop_size=8) for i in range(3)]
    validate(records_to_table(records), "random records")
    batch = collate_records(records)
    assert batch.size == 3 and batch.cxr_mask.shape == (3, cxrs)
    assert not bool(batch.region_present[:, 0, 0].any())  # a missing box in every record
    assert random_record(1, task, mode=mode)["sample_id"] == "s1"
