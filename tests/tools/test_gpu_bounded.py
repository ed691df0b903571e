"""tools/gpu/bounded.py on the CPU at tiny sizes (``--device cpu --tiny``): full attention against bounded memory at
three lengths, prefill through the cache, cached decode, resident bytes, the identity check and the goals."""

from __future__ import annotations

from pathlib import Path

from test_gpu_timings import run_tiny


def test_tiny_run_reports_every_length_and_the_goals(tmp_path: Path) -> None:
    r = run_tiny(["tools/gpu/bounded.py"], tmp_path, report="bounded.json")
    assert r["identity"]["ok"] and r["identity"]["max_rel_diff"] < 1e-4  # bounded at init == original
    contexts = r["run"]["contexts"]
    rows = {(x["model"], x["tokens"]): x for x in r["rows"]}
    assert set(rows) == {(m, n) for m in ("full", "bounded") for n in contexts}
    for x in rows.values():
        assert x["prefill_s"] > 0 and x["decode_ms"] > 0 and x["finite"]
    n = max(contexts)
    full, bounded = rows[("full", n)], rows[("bounded", n)]
    layers, kv, d = r["model"]["layers"], r["model"]["kv_heads"], r["model"]["hidden"] // r["model"]["heads"]
    assert full["resident_bytes"] == 2 * layers * kv * d * 4 * (n + r["run"]["steps"])  # every token, fp32
    assert bounded["resident_bytes"] < full["resident_bytes"]
    assert [g["goal"].split(" ")[0] for g in r["goals"]] == ["resident", "decode", "decode"]
    assert r["stdout"].strip().splitlines()[-1].startswith("goal: decode within 1.1x")  # the table and goals last
