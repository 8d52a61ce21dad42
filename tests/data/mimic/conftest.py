"""One fabricated raw MIMIC tree per test session (about a second to write)."""

from __future__ import annotations

import pytest

from dipro.data.mimic.fixture_tree import write_raw_tree
from dipro.data.mimic.raw_tree import RawTree


@pytest.fixture(scope="session")
def raw_tree(tmp_path_factory: pytest.TempPathFactory) -> RawTree:
    return write_raw_tree(tmp_path_factory.mktemp("raw"), seed=0)
