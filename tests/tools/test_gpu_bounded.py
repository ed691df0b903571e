"""tools/gpu/bounded.py on the CPU at tiny sizes (``--device cpu --tiny``): full attention against bounded memory at
three lengths, prefill through the cache, cached decode, resident bytes, the identity check and the goals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_reports_every_length_and_the_goals(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONSAFEPATH"] = "1"  # as run.sh runs scripts: the current directory is not on sys.path
    res = subprocess.run(
        [sys.executable, "tools/gpu/bounded.py", "--device", "cpu", "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((tmp_path / "bounded.json").read_text())
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
    assert res.stdout.strip().splitlines()[-1].startswith("goal: decode within 1.1x")  # the table and goals last
