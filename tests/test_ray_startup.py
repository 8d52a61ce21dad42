"""Ray's dashboard start-up timeouts: in effect for an entrypoint started directly, the same
values as ``make`` exports, and never over a value the user set."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ray_jobs.ray_startup import DASHBOARD_TIMEOUTS, set_dashboard_timeouts

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def test_set_when_absent_kept_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    absent, exported = DASHBOARD_TIMEOUTS
    monkeypatch.delenv(absent, raising=False)
    monkeypatch.setenv(exported, "999")
    set_dashboard_timeouts()
    assert os.environ[absent] == DASHBOARD_TIMEOUTS[absent]
    assert os.environ[exported] == "999"


def test_the_makefile_exports_the_same_values() -> None:
    export = re.compile(r"^export (RAY_DASHBOARD_\w+) \?= (\d+)$", re.MULTILINE)
    assert dict(export.findall(MAKEFILE.read_text())) == DASHBOARD_TIMEOUTS
