"""Every attention module of the zoo is found, with correct facts (tiny random configs, CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
import zoo

import mka_compile
from mka_compile.hf.compat import cache_kwargs, returned_cache


def _check_decoder_sites(report, model, cfg, has_cache: bool) -> None:
    H, kv, d = zoo.expected_heads(cfg)
    assert [s.name for s in report.sites] == zoo.attention_modules(model)
    for s in report.sites:
        assert (s.kind, s.causal, s.num_heads, s.num_kv_heads, s.head_dim) == ("self", True, H, kv, d), s
        assert s.has_kv_cache is has_cache, s
        assert s.convertible and s.reason is None and s.status == "original"
        want = getattr(model.get_submodule(s.name), "scaling", d**-0.5)  # HF modules store their scale
        assert abs(s.scale - want) < 1e-6 * want, (s.scale, want)
    assert report.not_attention == []


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", zoo.CAUSAL_LMS)
def test_causal_lm_without_cache(family: str, attn: str) -> None:
    model, cfg = zoo.causal_lm(family, attn)
    ids = torch.randint(0, 90, (2, 8))
    report = mka_compile.inspect(model, {"input_ids": ids, "use_cache": False})
    _check_decoder_sites(report, model, cfg, has_cache=False)
    assert all(s.rule == ("attention.sdpa" if attn == "sdpa" else "attention.eager.matmul") for s in report.sites)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", zoo.CAUSAL_LMS)
def test_causal_lm_with_dynamic_cache(family: str, attn: str) -> None:
    model, cfg = zoo.causal_lm(family, attn)
    ids = torch.randint(0, 90, (2, 8))
    with torch.no_grad():
        past = returned_cache(model(ids[:, :5], use_cache=True))
    report = mka_compile.inspect(model, {"input_ids": ids[:, 5:], **cache_kwargs(model, past), "use_cache": True})
    _check_decoder_sites(report, model, cfg, has_cache=True)
    assert {s.cache for s in report.sites} == {"concat"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_static_cache(family: str) -> None:
    model, cfg = zoo.causal_lm(family, "sdpa")
    ids = torch.randint(0, 90, (2, 8))
    cache = tf.StaticCache(config=cfg, max_cache_len=16)
    with torch.no_grad():
        model(ids[:, :5], use_cache=True, **cache_kwargs(model, cache))
    inputs = {
        "input_ids": ids[:, 5:],
        **cache_kwargs(model, cache),
        "use_cache": True,
        "cache_position": torch.arange(5, 8),
    }
    report = mka_compile.inspect(model, inputs)
    _check_decoder_sites(report, model, cfg, has_cache=True)
    assert {s.cache for s in report.sites} == {"index_copy"}


def test_default_inputs_for_hf_models() -> None:
    model, cfg = zoo.causal_lm("qwen3", "sdpa")
    report = mka_compile.inspect(model)  # no example_inputs: built from the config
    assert len(report.sites) == cfg.num_hidden_layers
    assert all(s.qk_norm == "per_head" and s.rope == "rotate_half" for s in report.sites)
    assert report.sites[0].q_proj == "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("flash", [True, False])
def test_nanogpt(flash: bool) -> None:
    model = zoo.NanoGPT(flash=flash).eval()
    report = mka_compile.inspect(model, (torch.randint(0, 50, (2, 8)),))
    assert [s.name for s in report.sites] == ["h.0.attn", "h.1.attn"]
    for s in report.sites:
        assert (s.kind, s.causal, s.num_heads, s.num_kv_heads, s.head_dim) == ("self", True, 4, 4, 8)
        assert s.q_proj.startswith("h.0.attn.c_attn[") or s.q_proj.startswith("h.1.attn.c_attn[")
        assert abs(s.scale - 8**-0.5) < 1e-6
    assert report.sites[0].rule == ("attention.sdpa" if flash else "attention.eager.matmul")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_encoder_with_padding_mask(attn: str) -> None:
    cfg = tf.BertConfig(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    model = tf.BertModel._from_config(cfg, attn_implementation=attn).eval()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    report = mka_compile.inspect(model, {"input_ids": torch.randint(0, 90, (2, 8)), "attention_mask": mask})
    assert [s.name for s in report.sites] == zoo.attention_modules(model)
    for s in report.sites:
        assert (s.kind, s.causal, s.mask, s.num_heads, s.head_dim) == ("self", False, "padding", 4, 16)
        assert not s.convertible and "bidirectional" in s.reason


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vit_block(attn: str) -> None:
    cfg = tf.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=16, patch_size=4
    )
    model = tf.ViTModel._from_config(cfg, attn_implementation=attn).eval()
    report = mka_compile.inspect(model)
    assert len(report.sites) == 2 == len(zoo.attention_modules(model))
    assert all(not s.causal and s.mask == "none" and s.num_heads == 4 for s in report.sites)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_encoder_decoder_cross_attention(attn: str) -> None:
    model = zoo.bart(attn)
    report = mka_compile.inspect(model)
    assert [s.name for s in report.sites] == zoo.attention_modules(model)
    kinds = {s.name: (s.kind, s.causal) for s in report.sites}
    assert kinds["model.encoder.layers.0.self_attn"] == ("self", False)
    assert kinds["model.decoder.layers.1.self_attn"] == ("self", True)
    assert kinds["model.decoder.layers.1.encoder_attn"] == ("cross", False)
    cross = report["model.decoder.layers.0.encoder_attn"]
    assert not cross.convertible and "cross-attention" in cross.reason


def test_t5_relative_bias_and_cross() -> None:
    cfg = tf.T5Config(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    report = mka_compile.inspect(model)
    assert len(report.sites) == 6
    assert sum(s.kind == "cross" for s in report.sites) == 2
    assert all(s.scale == 1.0 for s in report.sites)  # T5 does not scale its scores


@pytest.mark.parametrize("capture", ["export", "dynamo"])
@pytest.mark.parametrize("start", [0, 3])
def test_meta_llama_complex_rope_and_slice_assigned_cache(capture: str, start: int) -> None:
    model = zoo.MetaLlamaAttention().eval()
    report = mka_compile.inspect(model, (torch.randn(2, 5, 32), start), capture=capture)
    (s,) = report.sites
    assert (s.name, s.kind, s.causal, s.num_heads, s.num_kv_heads, s.head_dim) == ("", "self", True, 4, 2, 8)
    assert (s.rope, s.cache, s.has_kv_cache, s.k_proj, s.v_proj) == ("complex", "slice_assign", True, "wk", "wv")


@pytest.mark.parametrize(("family", "bias"), [("qwen2", True), ("gpt2", True), ("llama", False)])
def test_projection_biases(family: str, bias: bool) -> None:
    report = mka_compile.inspect(zoo.causal_lm(family)[0])
    assert all(s.proj_bias == (bias, bias, bias) for s in report.sites)


def test_falcon_written_out_linear_with_bias() -> None:
    import transformers as tf

    cfg = zoo._cfg("falcon")
    cfg.bias = True
    report = mka_compile.inspect(tf.AutoModelForCausalLM.from_config(cfg).eval())
    assert len(report.sites) == 2 and all(s.proj_bias == (True, True, True) for s in report.sites)
    assert report.sites[0].q_proj.startswith("transformer.h.0.self_attention.query_key_value[")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("capture", ["export", "dynamo"])
def test_timm_vit_attention(fused: bool, capture: str) -> None:
    model = zoo.TimmBlockAttention(fused=fused).eval()
    report = mka_compile.inspect(model, (torch.randn(2, 7, 32),), capture=capture)
    (s,) = report.sites
    assert (s.kind, s.causal, s.mask, s.num_heads, s.head_dim, s.qk_norm) == ("self", False, "none", 4, 8, "per_head")
    assert s.q_proj == "qkv[unbind[0]]" and s.v_proj == "qkv[unbind[2]]"
    assert abs(s.scale - 8**-0.5) < 1e-6
