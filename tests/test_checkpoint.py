"""mka_compile.checkpoint: converted weights + mode/config round-trip into a fresh copy of the original."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import mka_compile
from mka_compile.bench import randomize_mka
from mka_compile.checkpoint import load_converted, read_converted, save_converted
from mka_compile.model_spec import load_model


@pytest.mark.parametrize(("family", "mode", "suffix"), [("llama", "fastmka", ".safetensors"), ("gpt2", "mka", ".pt")])
def test_round_trip(tmp_path: Path, family: str, mode: str, suffix: str) -> None:
    original = load_model(f"tiny:{family}").model
    cfg = mka_compile.MKAConfig(chunk_size=4, top_r=2, gate_init=0.0, ema_beta=0.8)
    model = randomize_mka(mka_compile.convert(copy.deepcopy(original), mode=mode, config=cfg))
    path = save_converted(model, tmp_path / f"m{suffix}", mode, cfg)
    state, got_mode, got_cfg = read_converted(path)
    assert got_mode == mode and got_cfg == cfg and any(".mka." in k for k in state)
    fresh = load_converted(copy.deepcopy(original), path)
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert {s.status for s in mka_compile.inspect(fresh).sites} == {mode}


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_converted(tmp_path / "none.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a converted checkpoint"):
        read_converted(tmp_path / "plain.pt")
    model = load_model("tiny:llama").model
    cfg = mka_compile.MKAConfig(gate_init=0.0)
    path = save_converted(mka_compile.convert(copy.deepcopy(model), config=cfg), tmp_path / "l.pt", "fastmka", cfg)
    with pytest.raises(ValueError, match="does not fit"):
        load_converted(load_model("tiny:qwen3").model, path)
    with pytest.raises(ValueError, match="mode must be"):
        save_converted(model, tmp_path / "x.pt", "fast", cfg)
