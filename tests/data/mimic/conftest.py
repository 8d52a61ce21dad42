"""One fabricated raw MIMIC tree per test session (about a second to write)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dipro.data.mimic.fabricate import RawTree, write_raw_tree


@pytest.fixture(scope="session")
def raw_tree(tmp_path_factory: pytest.TempPathFactory) -> RawTree:
    return write_raw_tree(tmp_path_factory.mktemp("raw"), seed=0)


def tree_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
