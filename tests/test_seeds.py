"""Per-stream seeds stay distinct at the scale the presets run at."""

from __future__ import annotations

import itertools

from dipro.seeds import stream_seed


def test_sixteen_ranks_by_fifty_epochs_draw_distinct_seeds():
    table = {(e, r): stream_seed(23, e, r) for e, r in itertools.product(range(1, 51), range(16))}
    assert len(set(table.values())) == len(table) == 800
    assert table[(1, 10)] != table[(2, 0)]  # seed*1000 + epoch*10 + rank made these equal


def test_sites_with_hospital_ids_past_ten_draw_distinct_seeds():
    table = {
        (rnd, e, h): stream_seed(23, rnd, e, h)
        for rnd, e, h in itertools.product(range(1, 31), range(3), range(25))
    }
    assert len(set(table.values())) == len(table)


def test_a_stream_seed_depends_on_the_run_seed_and_is_reproducible():
    assert stream_seed(23, 1, 0) == stream_seed(23, 1, 0)
    assert stream_seed(23, 1, 0) != stream_seed(29, 1, 0)
    assert 0 <= stream_seed(23, 1, 0) < 2**32
