"""tools/paper/lm_variants.py: the six attention variants of the small decoder LM (shapes, causality, cached decode,
training, KV-cache byte accounting)."""

from __future__ import annotations

import pytest
import torch

import mka_compile
from tools.paper import lm_training
from tools.paper.lm_variants import (
    VARIANTS,
    DecoderLM,
    KVCache,
    LMConfig,
    MLAAttention,
    analytic_cache_bytes,
    cache_bytes,
)

MKA = mka_compile.MKAConfig(chunk_size=4, top_r=2)
CFG = LMConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, gqa_kv_heads=2, mka=MKA)


def model(variant: str, cfg: LMConfig = CFG) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(cfg, variant).eval()


def ids(B: int = 2, T: int = 23, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_causality(variant: str) -> None:
    m = model(variant)
    x = ids()
    with torch.no_grad():
        out = m(x)
        assert out.shape == (2, 23, CFG.vocab_size) and out.isfinite().all()
        y = x.clone()
        y[:, 15:] = (y[:, 15:] + 1) % CFG.vocab_size  # change the future
        out2 = m(y)
    torch.testing.assert_close(out2[:, :15], out[:, :15], rtol=0, atol=1e-6)
    assert not torch.allclose(out2[:, 15:], out[:, 15:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_equals_full_forward(variant: str) -> None:
    m = model(variant)
    x = ids(T=30)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache()
        parts = [m(x[:, :9], cache=cache), m(x[:, 9:14], cache=cache)]  # prefill, then a multi-token chunk
        parts += [m(x[:, t : t + 1], cache=cache) for t in range(14, 30)]  # one token per call
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_decreases(variant: str) -> None:
    m = model(variant).train()
    opt = lm_training.make_optimizer(m, 1e-2, 0.0)
    window = ids(B=2, T=17, seed=2)
    losses = [lm_training.train_step(m, opt, window, 1e-2)[0] for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is not None for p in m.parameters())  # every parameter trains (MKA: router and gate too)


def test_mka_variants_use_the_project_layers() -> None:
    assert isinstance(model("mka").blocks[0].attn.layer, mka_compile.MKAAttention)
    assert isinstance(model("fastmka").blocks[1].attn.layer, mka_compile.FastMKAAttention)
    assert isinstance(model("fastmka").new_cache(), mka_compile.MKACache)
    assert model("fastmka").blocks[0].attn.layer.gate.item() == 1.0  # trained from scratch: routed from step 0
    assert isinstance(model("gqa").new_cache(), KVCache)


def test_kv_heads_and_parameter_shapes() -> None:
    d = CFG.head_dim
    for variant, hk in (("mha", 4), ("mqa", 1), ("gqa", 2)):
        assert model(variant).blocks[0].attn.k_proj.out_features == hk * d
    mla = model("mla").blocks[0].attn
    assert isinstance(mla, MLAAttention)
    assert mla.kv_down.out_features == CFG.kv_rank + CFG.rope_dim
    assert mla.kv_up.in_features == CFG.kv_rank


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_bytes_match_the_formula(variant: str) -> None:
    m = model(variant)
    cache = m.new_cache()
    with torch.no_grad():
        m(ids(B=1, T=22), cache=cache)  # one sequence, 22 tokens: 5 completed 4-token chunks
    f = analytic_cache_bytes(CFG, variant)
    assert cache_bytes(cache) == f.at(22)
    L, d = CFG.n_layers, CFG.head_dim
    expected = {
        "mha": L * 2 * 4 * d * 4 * 22,
        "mqa": L * 2 * 1 * d * 4 * 22,
        "gqa": L * 2 * 2 * d * 4 * 22,
        "mla": L * (CFG.kv_rank + CFG.rope_dim) * 4 * 22,
        # levels x Hkv x d x fp32 + 1 validity byte per token; 2 summaries per chunk; n_seen, EMA and partial chunk
        "mka": L * ((4 * 4 * d * 4 + 1) * 22 + 2 * 4 * d * 4 * 5 + 8 + 4 * 4 * d * 4),
        "fastmka": L * ((2 * 4 * d * 4 + 1) * 22 + 2 * 4 * d * 4 * 5 + 8 + 4 * 4 * d * 4),
    }[variant]
    assert cache_bytes(cache) == expected
    if variant == "mla":  # the latent and the rope key, nothing per head
        c_kv, k_rope = cache.layers[0]
        assert c_kv.shape == (1, 1, 22, CFG.kv_rank) and k_rope.shape == (1, 1, 22, CFG.rope_dim)


def test_cache_bytes_after_decoding_count_the_summary_buffer() -> None:
    m = model("fastmka")
    _, cache = m.generate(ids(B=1, T=6), 10)  # 16 tokens: the summary buffer grew by doubling
    st = cache.layers[0]
    assert cache_bytes(cache) >= analytic_cache_bytes(CFG, "fastmka").at(16)
    assert cache_bytes(cache) == sum(
        t.numel() * t.element_size()
        for s in cache.layers.values()
        for t in [*s.kv, s.kv_valid, s.n_seen, s.ema_k, s.ema_v, s.part_k, s.part_v, s.summ_k, s.summ_v]
    )
    assert st.summ_k.shape[2] >= 16 // CFG.mka.chunk_size


def test_generate_is_greedy_and_cached() -> None:
    m = model("mla")
    prompt = ids(B=1, T=5)
    out, cache = m.generate(prompt, 6)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], prompt)
    assert cache.get_seq_length(0) == 11  # prompt + every generated token went through the cache
    with torch.no_grad():
        logits = m(out[:, :-1])
    torch.testing.assert_close(out[:, 5:], logits[:, 4:].argmax(-1))


def test_converted_mha_decodes_with_this_cache() -> None:
    """``mka_compile.convert`` turns the MHA variant into FastMKA; the MKA state rides with ``KVCache``."""
    m = model("mha")
    x = ids(T=20)
    mka_compile.convert(m, config=mka_compile.MKAConfig(gate_init=1.0, chunk_size=4, top_r=2), example_inputs=(x,))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache()
        steps = [m(x[:, :8], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="variant must be one of"):
        DecoderLM(CFG, "gqa4")
    with pytest.raises(ValueError, match="gqa_kv_heads 3 must divide n_heads 4"):
        LMConfig(vocab_size=10, d_model=32, n_heads=4, gqa_kv_heads=3)
    with pytest.raises(ValueError, match="mlp"):
        LMConfig(vocab_size=10, mlp="relu")
    with pytest.raises(ValueError, match="even size"):
        LMConfig(vocab_size=10, d_model=36, n_heads=4)
    with pytest.raises(ValueError, match="new_cache"):
        model("mha")(ids(), cache=mka_compile.MKACache())
    with pytest.raises(ValueError, match="integer token ids"):
        model("mha")(torch.randn(2, 3))
    with pytest.raises(ValueError, match="KVCache or an MKACache"):
        cache_bytes({})
