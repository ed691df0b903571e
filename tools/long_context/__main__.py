"""``python tools/long_context [--quick]`` or ``python -m tools.long_context`` (from the checkout root)."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a folder: the checkout's `tools` package, appended so an installed mka_compile still wins
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from tools.long_context.bench import main  # noqa: E402

main()
