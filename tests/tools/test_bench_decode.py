"""tools/bench/decode.py runs (tiny budgets): every model and decode kind gets a time and a ratio to the original.
The numbers themselves are the benchmark's, not asserted here."""

from __future__ import annotations

from tools.bench import decode


def test_decode_benchmark_runs() -> None:
    rows = decode.main(["--prompt", "24", "--steps", "2", "--repeats", "1", "--beams", "2"])
    assert {(r["model"], r["what"]) for r in rows} == {
        (m, w) for m in ("original", "fastmka", "mka") for w in ("greedy", "beams")
    }
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["ratio"] == 1.0 for r in rows if r["model"] == "original")
