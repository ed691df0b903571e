"""The tests of ``tools/`` import its packages (``tools.paper``, ``tools.gpu``, ...) from the checkout: the repository
root is appended to ``sys.path`` (appended, so the installed ``mka_compile`` and ``kernels`` still come first)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.append(ROOT)
