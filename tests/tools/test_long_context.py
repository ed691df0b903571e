"""tools/long_context --quick end to end on tiny sizes: the JSON has every row, the numbers are computed (the
in-length retrieval of full attention is recomputed here from the cached weights), and the page states them."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tools.long_context import bench, measure, tasks
from tools.long_context.model import bounded_api_available, build_model


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("long_context")
    doc = out / "long_context.md"
    r = bench.main(["--quick", "--doc", str(doc), "--cache-dir", str(out / "cache")])
    return r, out


def test_writes_json_doc_and_plots(run) -> None:
    r, out = run
    doc = (out / "long_context.md").read_text()
    saved = json.loads((out / "long_context.json").read_text())
    assert saved["retrieval"].keys() == r["retrieval"].keys() and saved["goals"] == r["goals"]
    for png in ("retrieval", "stream", "timing"):
        path = out / "long_context" / f"{png}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](long_context/{png}.png)" in doc
    assert "## GPU" in doc and "Not run" in doc
    assert "## Retrieval from a memory bank" in doc or not r["bank"]
    assert r["model"]["train"]["cached"] is False  # a fresh cache folder: the quick run trained its own model


def test_rows_for_every_variant_task_and_length(run) -> None:
    r, _ = run
    expected = ["full", "sinks", "mka", "mka_mean", "mka_ft"] if bounded_api_available() else ["full"]
    if "mka_ft" not in r["variants"] and bounded_api_available():  # skipped for time: the page says so
        assert any(n.startswith("bounded MKA fine-tuned: skipped") for n in r["notes"])
        expected.remove("mka_ft")
    assert list(r["variants"]) == expected
    lengths = [str(n) for n in r["retrieval_lengths"]]
    assert lengths[0] == str(r["settings"]["train"]["length"])  # in-length first
    for v in expected:
        for t in tasks.TASKS:
            for n in lengths:
                d = r["retrieval"][v][t][n]
                assert d["n"] == len(d["correct"]) == r["settings"]["samples"]
                assert d["accuracy"] == sum(d["correct"]) / d["n"]
        assert r["stream"][v]["checkpoints"] and r["timing"][v]
    if not bounded_api_available():
        assert any("not in this checkout" in n for n in r["notes"])
    else:  # the memory bank rows: the documents' samples, asked with and without the bank
        n = str(r["settings"]["bank_multiples"][0] * r["settings"]["window"])
        for t in ("passkey", "multikey"):
            d = r["bank"][t][n]
            assert d["n"] == r["settings"]["bank_samples"] and 0 <= d["bank"] <= 1 and 0 <= d["alone"] <= 1


def test_in_length_retrieval_is_computed(run) -> None:
    """Rebuild the quick model from its cached weights, regenerate the in-length samples and recompute the
    predictions of full attention: they equal the stored ones byte for byte."""
    r, out = run
    s = replace(bench.QUICK)
    L = s.train.length
    model = build_model(s.train)
    blob = torch.load(out / "cache" / f"{s.train.key()}.pt", weights_only=False)
    model.load_state_dict(blob["state"])
    text = tasks.text_ids("test")
    for t in tasks.TASKS:
        samples = tasks.make_samples(t, L, s.samples, text, s.seed + 1)
        again = measure.retrieval(model, samples, batch=3)
        stored = r["retrieval"]["full"][t][str(L)]
        assert again["predicted"] == stored["predicted"] and again["correct"] == stored["correct"]
        assert all(len(p) == tasks.ANSWER_DIGITS for p in stored["predicted"])
        assert r["model"]["in_length_accuracy"][t] == stored["accuracy"]


def test_stream_and_memory_numbers(run) -> None:
    r, _ = run
    full = r["stream"]["full"]["checkpoints"]
    for c in full:  # a DynamicCache holds every token: 2 (K, V) * layers * kv heads * head dim * 4 bytes per token
        s = r["settings"]["train"]
        per_token = 2 * s["layers"] * s["kv_heads"] * (s["hidden"] // s["heads"]) * 4
        assert c["resident_bytes"] == per_token * c["tokens"] and c["offloaded_bytes"] == 0
        assert math.isfinite(c["ppl"]) and 1 < c["ppl"] < 300
    if bounded_api_available():
        mka = r["stream"]["mka"]["checkpoints"]
        assert mka[-1]["tokens"] == r["settings"]["stream_tokens"]
        assert mka[-1]["offloaded_bytes"] > 0
        assert all(math.isfinite(c["ppl_1k"]) for c in mka if c["tokens"] >= 2048)  # the text-difficulty reference
        assert any("ppl_1k" in c for c in mka)
    for rows in r["timing"].values():
        assert all(t["prefill_s"] > 0 and t["decode_ms"] > 0 for t in rows)


def test_goals_follow_the_numbers(run) -> None:
    r, out = run
    doc = (out / "long_context.md").read_text()
    for g in r["goals"]:
        verdict = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        assert f"| {g['measured']} | {verdict} |" in doc
    k = r["prefill_exponent"]["full"]
    rows = r["timing"]["full"]
    assert k == pytest.approx(measure.fit_exponent([t["tokens"] for t in rows], [t["prefill_s"] for t in rows]))


def test_fresh_segment_perplexity_equals_one_forward(run) -> None:
    """The 1K-context reference of a stream segment, streamed in blocks through a cache, equals the perplexity of
    the same tokens from one uncached forward over the same window of text."""
    _, out = run
    s = bench.QUICK
    model = build_model(s.train)
    model.load_state_dict(torch.load(out / "cache" / f"{s.train.key()}.pt", weights_only=False)["state"])
    model.eval()
    ids = torch.cat([torch.tensor([tasks.BOS]), tasks.text_ids("test")[:2047]])
    got = measure.fresh_segment_ppl(model, ids, 2048, block=256, warm=512)
    with torch.no_grad():
        logits = model(ids[512:2048][None], use_cache=False).logits[0].float()  # window [n/2 - warm, n)
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[513:2048], reduction="none")
    want = math.exp(nll[1024 - 512 :].mean().item())  # tokens 1025 .. 2047 predicted (the segment (n/2, n])
    assert got == pytest.approx(want, rel=1e-4)
