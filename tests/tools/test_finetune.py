"""tools/finetune.py: identity at conversion, perplexity falls, the router leaves L1-only (tiny budget)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "finetune.py"


def test_finetune_runs_and_learns(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("finetune", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(
        [
            "--pretrain-steps",
            "20",
            "--steps",
            "25",
            "--batch",
            "4",
            "--seq",
            "64",
            "--hidden",
            "64",
            "--eval-windows",
            "16",
            "--chunk-size",
            "16",
            "--out",
            str(tmp_path),
        ]
    )
    assert abs(r["ppl_converted_at_init"] - r["ppl_original"]) <= 1e-4 * r["ppl_original"]  # identity at init
    assert r["ppl_finetuned"] < r["ppl_converted_at_init"]
    for site, after in r["routing_after"].items():
        assert r["routing_before"][site]["local"] == 1.0
        assert abs(after["local"] - 1.0) > 1e-4, site  # the routing moved away from L1-only
    assert (tmp_path / "finetune.json").exists() and (tmp_path / "loss.png").stat().st_size > 0
