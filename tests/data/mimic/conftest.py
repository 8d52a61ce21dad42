"""One fabricated raw MIMIC tree per test session (about a second to write)."""

from __future__ import annotations

import pytest

from dipro.data.mimic.fabricate import RawTree, write_raw_tree


@pytest.fixture(scope="session")
def raw_tree(tmp_path_factory: pytest.TempPathFactory) -> RawTree:
    return write_raw_tree(tmp_path_factory.mktemp("raw"), seed=0)
