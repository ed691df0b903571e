"""tools/paper/tables.py end to end at the micro budget: JSON, plots and a results.md stating the measured numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tools.paper import tables as paper_tables
from tools.paper.lm_variants import VARIANTS


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("paper_tables")
    r = paper_tables.main(["--quick", "--out", str(out / "results"), "--doc", str(out / "results.md")])
    return r, out


def test_writes_json_plots_and_doc(run) -> None:
    r, out = run
    res = out / "results"
    for name in ("shakespeare.json", "wikitext2.json", "conversion.json", "meta.json"):
        assert json.loads((res / name).read_text())
    for png in ("loss_shakespeare.png", "loss_wikitext2.png", "ppl_vs_speed.png", "conversion.png"):
        size = (res / png).stat().st_size
        assert 5_000 < size < 200_000, (png, size)
        assert (res / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = (out / "results.md").read_text()
    assert f"python tools/paper/tables.py --quick --out {res} --doc {out / 'results.md'}" in doc
    for png in ("loss_shakespeare.png", "ppl_vs_speed.png", "conversion.png"):
        assert f"](results/{png})" in doc  # links relative to the doc
    assert "validation* split, report on the *test* split" in doc and "characters (65 distinct)" in doc


def test_doc_states_the_measured_numbers(run) -> None:
    r, out = run
    doc = (out / "results.md").read_text()
    for name, result in r["results"].items():
        assert list(result["variants"]) == list(VARIANTS)
        for v, d in result["variants"].items():
            row = next(
                line for line in doc.splitlines() if line.startswith(f"| {paper_tables.NAMES[v]} | {d['params']:,}")
            )
            assert f"| {d['ppl']:.3f} |" in row and f"{d['train_tokens_per_s']:,.0f}" in row
            assert f"{d['decode_ms_per_token']:.2f}" in row and f"{d['cache_bytes_held']:,}" in row
            assert math.isfinite(d["ppl"]) and 1 < d["ppl"] < 2 * result["model"]["vocab_size"]
            assert d["tokens"] == 600  # --quick caps the held-out text at 600 predicted tokens
            if v in ("mha", "mqa", "gqa", "mla"):
                assert d["cache_bytes_held"] == d["cache_bytes_analytic"]
            assert len(d["losses"]) == 6 and d["curve"][-1][0] == 6
        noise = result["seed_noise"]  # MHA from init seeds 0 and 1 on the same batches
        assert list(noise["runs"]) == ["mha@seed0", "mha@seed1"]
        assert noise["runs"]["mha@seed0"]["ppl"] == result["variants"]["mha"]["ppl"]
        assert noise["runs"]["mha@seed1"]["ppl"] != result["variants"]["mha"]["ppl"]
        assert f"a spread of {noise['spread']:.1%}" in doc
        for v in ("mka", "fastmka"):  # routing learned from scratch: weights per level sum to one
            lv = result["variants"][v]["routing"]["blocks.0"]
            assert list(lv) == ["local", "session", "longterm"] and sum(lv.values()) == pytest.approx(1.0)
        mla, fast = result["variants"]["mla"], result["variants"]["fastmka"]
        ratio = fast["train_tokens_per_s"] / mla["train_tokens_per_s"]
        assert f"- {name}, training throughput FastMKA / MLA (paper: up to 5x): {ratio:.2f}x" in doc
        rel = fast["ppl"] / mla["ppl"] - 1
        assert f"{fast['ppl']:.3f} vs {mla['ppl']:.3f} ({rel:+.1%})" in doc
        verdict = (
            "**reproduces**" if abs(rel) <= paper_tables.COMPARABLE else "than claimed" if rel < 0 else "**does not"
        )
        line = next(x for x in doc.splitlines() if x.startswith(f"- {name}, perplexity FastMKA vs MLA"))
        assert verdict in line


def test_conversion_starts_at_the_original(run) -> None:
    r, out = run
    rec = r["conversion"]
    start = rec["pretrained_ppl_curve_slice"]
    assert rec["curve"]["fastmka_gate0"][0][1] == pytest.approx(start, rel=1e-5)  # identity at conversion
    assert rec["curve"]["control"][0][1] == pytest.approx(start, rel=1e-6)
    assert rec["curve"]["fastmka_gate1"][0][1] != pytest.approx(start, rel=1e-6)  # routed from step 0
    for site, lv in rec["routing_before"]["fastmka_gate0"].items():
        assert lv["local"] == 1.0 and lv != rec["routing_after"]["fastmka_gate0"][site]  # training moved it
    assert [s for s, _ in rec["curve"]["control"]] == [0, 2, 4]


def test_bad_arguments_are_named() -> None:
    with pytest.raises(SystemExit, match="add mha to --variants or pass --no-convert"):
        paper_tables.parse(["--quick", "--variants", "mqa", "fastmka"])
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        paper_tables.parse(["--quick", "--steps", "0"])
    with pytest.raises(SystemExit, match="--convert-corpus shakespeare is not among"):
        paper_tables.parse(["--quick", "--corpora", "wikitext2"])
