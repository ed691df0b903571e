"""The Python examples in README.md and docs/*.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(p, code) for p in DOCS for code in re.findall(r"```python\n(.*?)```", p.read_text(), flags=re.S)]


@pytest.mark.parametrize(("path", "code"), BLOCKS, ids=[f"{p.name}:{i}" for i, (p, _) in enumerate(BLOCKS)])
def test_doc_example_runs(path: Path, code: str) -> None:
    exec(compile(code, str(path), "exec"), {"__name__": "__doc_example__"})


def test_docs_have_examples() -> None:
    assert {p.name for p, _ in BLOCKS} >= {"README.md", "custom_passes.md"}
