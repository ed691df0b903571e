"""Rewrite the golden files of the detection rules: ``tests/golden/<case>.txt`` = ``str(inspect(...))``.

    python tools/refresh_golden.py          # then review ``git diff tests/golden``

The cases live in ``tests/golden_cases.py`` (shared with ``tests/passes/test_golden.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from golden_cases import CASES, render  # noqa: E402


def main() -> None:
    out = ROOT / "tests" / "golden"
    out.mkdir(exist_ok=True)
    for name in CASES:
        (out / f"{name}.txt").write_text(render(name))
        print(f"wrote tests/golden/{name}.txt")


if __name__ == "__main__":
    main()
