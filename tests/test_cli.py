"""The ``mka-compile`` command line: inspect, convert, export, bench and the demo (tiny budgets)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mka_compile.cli import main


def test_inspect_prints_sites_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "tiny:gpt2", "--json", str(tmp_path / "sites.json")]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn" in out and "transformer.h.1.attn" in out
    sites = json.loads((tmp_path / "sites.json").read_text())
    assert [s["name"] for s in sites] == ["transformer.h.0.attn", "transformer.h.1.attn"]


def test_convert_then_export_with_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "llama.safetensors"
    assert main(["convert", "tiny:llama", "--mode", "fastmka", "--chunk-size", "4", "-o", str(ckpt)]) == 0
    assert ckpt.stat().st_size > 0 and "fastmka" in capsys.readouterr().out
    onnx_path = tmp_path / "llama.onnx"
    assert main(["export", "tiny:llama", "--weights", str(ckpt), "--tokens", "12", "-o", str(onnx_path)]) == 0
    import onnx

    assert any(n.domain == "com.mka" for n in onnx.load(str(onnx_path)).graph.node)


def test_bench_prints_ratios(capsys: pytest.CaptureFixture) -> None:
    args = ["bench", "tiny:llama", "--tokens", "32", "--repeats", "1", "--chunk-size", "8", "--layer"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for what in ("original fwd", "fastmka fwd", "mka fwd+bwd", "FastMKA layer", "MKA layer"):
        assert what in out


def test_errors_are_clear(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "tiny:nosuchfamily"]) == 2
    assert "tiny:nosuchfamily" in capsys.readouterr().out
    assert main(["export", "tiny:llama", "--weights", "/nonexistent.pt", "-o", "/tmp/x.onnx"]) == 2
    assert "no converted checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert", "tiny:llama"])  # -o is required: argparse exits with usage


def test_demo_quick(tmp_path: Path) -> None:
    from mka_compile.demo import run_demo

    assert run_demo(quick=True, out=str(tmp_path)) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert all(r["ok"] for r in rows) and (tmp_path / "demo_fastmka.onnx").exists()


@pytest.mark.slow
def test_console_script_is_installed() -> None:
    exe = shutil.which("mka-compile") or str(Path(sys.executable).parent / "mka-compile")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in ("inspect", "convert", "export", "bench", "demo"))


def test_convert_an_encoder_needs_bidirectional(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    factory = tmp_path / "encoder.py"
    factory.write_text(
        "import torch, transformers as tf\n"
        "def make():\n"
        "    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,\n"
        "                        intermediate_size=64)\n"
        "    return tf.BertModel(cfg, add_pooling_layer=False).eval()\n"
    )
    ckpt = tmp_path / "bert.safetensors"
    assert main(["convert", f"{factory}:make", "-o", str(ckpt)]) == 2
    assert "--bidirectional" in capsys.readouterr().out
    assert main(["convert", f"{factory}:make", "--bidirectional", "--chunk-size", "4", "-o", str(ckpt)]) == 0
    from mka_compile.checkpoint import read_converted

    _, mode, config = read_converted(ckpt)
    assert mode == "fastmka" and config.causal is False
