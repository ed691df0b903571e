"""mka_compile.checkpoint: converted weights + mode/config round-trip into a fresh copy of the original."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import mka_compile
from mka_compile.bench import randomize_mka
from mka_compile.checkpoint import load_converted, read_converted, save_converted
from mka_compile.model_spec import load_model
from mka_compile.sites.memory import SiteMemory


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


# ------------------------------------------------------------------- issue 13 (g, i): no silent wrong reloads


def _trained(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A converted model as after training: gate 0.7 and random routers (a zero gate would hide any error)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mka." in name:
                p.copy_(torch.full_like(p, 0.7) if name.endswith("gate") else 0.3 * torch.randn(p.shape, generator=g))
    return model


CFG = mka_compile.MKAConfig(chunk_size=4, top_r=2, ema_beta=0.8)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_save_converted_reads_mode_and_config_from_the_model(tmp_path: Path) -> None:
    original = load_model("tiny:llama").model
    model = _trained(mka_compile.convert(copy.deepcopy(original), mode="mka", config=CFG))
    path = mka_compile.save_converted(model, tmp_path / "m.safetensors")  # nothing to pass: read from the model
    _, mode, cfg = read_converted(path)
    assert (mode, cfg) == ("mka", CFG)
    ids = torch.randint(0, 256, (2, 13))
    fresh = mka_compile.load_converted(copy.deepcopy(original), path)
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))
    with pytest.raises(ValueError, match=r"mode='fastmka'.*converted with mode 'mka'"):
        save_converted(model, tmp_path / "x.pt", "fastmka")
    with pytest.raises(ValueError, match=r"chunk_size"):
        save_converted(model, tmp_path / "x.pt", "mka", mka_compile.MKAConfig(top_r=2, ema_beta=0.8))
    save_converted(model, tmp_path / "ok.pt", "mka", dataclasses.replace(CFG, gate_init=0.0))  # gate_init: init only
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(ValueError, match=r"not converted.*mka_compile.convert"):
        save_converted(original, tmp_path / "x.pt")


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        "classes": [type(m) for m in model.modules()],
        **{k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def _assert_untouched(model: torch.nn.Module, before: dict) -> None:
    assert [type(m) for m in model.modules()] == before.pop("classes")  # the sites got their own classes back
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, SiteMemory) for m in model.modules())
    assert {s.status for s in mka_compile.inspect(model).sites} == {"original"}


def test_load_converted_is_atomic(tmp_path: Path) -> None:
    llama = load_model("tiny:llama").model
    path = save_converted(_trained(mka_compile.convert(copy.deepcopy(llama), config=CFG)), tmp_path / "l.pt")
    other = load_model("tiny:qwen3").model  # another architecture: its keys do not fit
    before = _snapshot(other)
    with pytest.raises(ValueError, match="does not fit"):
        load_converted(other, path)
    _assert_untouched(other, before)
    # the same architecture, but the recorded config builds routers of another shape: conversion must be undone
    blob = torch.load(path, weights_only=True)
    blob["mka_config"] = json.dumps({**json.loads(blob["mka_config"]), "router_hidden": 8})
    torch.save(blob, tmp_path / "tampered.pt")
    target = copy.deepcopy(llama)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"does not fit.*router"):
        load_converted(target, tmp_path / "tampered.pt")
    _assert_untouched(target, before)
    load_converted(target, path)  # and the model can still be converted afterwards


def test_empty_and_malformed_checkpoints_name_the_file(tmp_path: Path) -> None:
    for name in ("empty.pt", "empty.safetensors"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ValueError, match=rf"{name}.*(empty|not a readable).*save_converted"):
            read_converted(tmp_path / name)
    model = _trained(mka_compile.convert(load_model("tiny:llama").model, config=CFG))
    blob = {"state_dict": model.state_dict(), "mka_mode": "fastmka", "mka_config": "{chunk_size: 4"}
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt.*mka_config.*not valid JSON.*save_converted"):
        read_converted(tmp_path / "bad.pt")
    from safetensors.torch import save_model

    save_model(model, str(tmp_path / "bad.safetensors"), metadata={"mka_mode": "fastmka", "mka_config": '{"x": 1}'})
    with pytest.raises(ValueError, match=r"bad\.safetensors.*unknown MKAConfig field"):
        read_converted(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------- the Hugging Face round trip (g1)


@pytest.mark.parametrize(
    ("family", "mode"), [("llama", "fastmka"), ("llama", "mka"), ("gpt2", "fastmka"), ("gpt2", "mka")]
)
def test_hugging_face_round_trip(tmp_path: Path, family: str, mode: str) -> None:
    import transformers

    model = _trained(mka_compile.convert(load_model(f"tiny:{family}").model, mode=mode, config=CFG))
    mka_compile.save_pretrained(model, tmp_path)
    loaded = mka_compile.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 13))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-6)
    assert {s.status for s in mka_compile.inspect(loaded).sites} == {mode}
    assert {(m.mode, m.config) for m in loaded.modules() if isinstance(m, SiteMemory)} == {(mode, CFG)}
    out = loaded.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, model.generate(ids, max_new_tokens=3, do_sample=False))
    # plain transformers cannot rebuild the conversion: it must refuse, not give back the original model
    with pytest.raises(ValueError, match=r"mka_compile\.from_pretrained"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    # a concrete class only warns (transformers' own logic), but must read the real config, not the MKA record
    assert type(model).from_pretrained(tmp_path).config.hidden_size == model.config.hidden_size


def test_from_pretrained_refuses_a_folder_without_the_record(tmp_path: Path) -> None:
    model = _trained(mka_compile.convert(load_model("tiny:llama").model, config=CFG))
    model.save_pretrained(tmp_path)  # plain transformers: the config carries the record (convert put it there)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["mka_compile"]  # a folder whose record was lost: MKA weights without their mode and config
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"mka_compile\.save_pretrained"):
        mka_compile.from_pretrained(tmp_path)
