"""Rule outputs against golden files (refresh with ``python tools/refresh_golden.py`` and review the diff)."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden_cases import CASES, render

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.mark.parametrize("name", sorted(CASES))
def test_report_matches_golden(name: str) -> None:
    path = GOLDEN / f"{name}.txt"
    assert path.exists(), f"missing {path}; run python tools/refresh_golden.py"
    assert render(name) == path.read_text(), f"{name} differs from its golden file; if intended, refresh it"
