"""The bidirectional memory (mka_compile.layers.noncausal) and converting encoders with MKAConfig(causal=False)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
import zoo

import mka_compile
from mka_compile import MKAConfig
from mka_compile.layers.noncausal import session_both_ways, whole_sequence_positions

BIDIR = MKAConfig(gate_init=0.0, chunk_size=4, top_r=2, causal=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_session_both_ways_is_symmetric_and_skips_padding() -> None:
    k, v = torch.randn(2, 3, 9, 4, dtype=torch.float64), torch.randn(2, 3, 9, 4, dtype=torch.float64)
    valid = torch.ones(2, 9, dtype=torch.bool)
    sk, sv = session_both_ways(k, v, 0.8, valid)
    rk, rv = session_both_ways(k.flip(2), v.flip(2), 0.8, valid)
    torch.testing.assert_close(rk.flip(2), sk)  # reversing the sequence reverses the summaries
    torch.testing.assert_close(rv.flip(2), sv)
    # by hand at one position: the average of the two directed EMAs (each: beta * previous + (1 - beta) * x)
    fwd = torch.zeros_like(k[:, :, 0])
    for t in range(5):
        fwd = 0.8 * fwd + 0.2 * k[:, :, t]
    bwd = torch.zeros_like(k[:, :, 0])
    for t in range(8, 3, -1):
        bwd = 0.8 * bwd + 0.2 * k[:, :, t]
    from mka_compile import kernels as K

    f_scan = K.session_scan(k, v, 0.8, valid)[0][:, :, 4]
    b_scan = K.session_scan(k.flip(2), v.flip(2), 0.8, valid)[0].flip(2)[:, :, 4]
    torch.testing.assert_close(sk[:, :, 4], (f_scan + b_scan) / 2)
    if torch.allclose(f_scan, fwd):  # the scan is the plain EMA (no bias correction): then check it by hand too
        torch.testing.assert_close(sk[:, :, 4], (fwd + bwd) / 2)
    # padding: a right-padded row gives its real tokens the same summaries as the row alone
    pad = valid.clone()
    pad[1, 6:] = False
    pk, _ = session_both_ways(k, v, 0.8, pad)
    alone, _ = session_both_ways(k[1:, :, :6], v[1:, :, :6], 0.8, valid[1:, :6])
    torch.testing.assert_close(pk[1:, :, :6], alone)


def test_whole_sequence_positions_count_real_tokens() -> None:
    valid = torch.tensor([[True, True, True, False], [False, True, True, True]])
    assert whole_sequence_positions(valid).tolist() == [[3, 3, 3, 3], [3, 3, 3, 3]]


def _bert(attn: str):
    cfg = tf.BertConfig(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        attention_probs_dropout_prob=0.0,  # MKA mode refuses attention dropout in training (it has none)
    )
    torch.manual_seed(0)
    return tf.BertModel._from_config(cfg, attn_implementation=attn, add_pooling_layer=False).eval()


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_converts_with_causal_false(attn: str, mode: str) -> None:
    model = _bert(attn)
    ids = torch.randint(1, 90, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        base = model(ids, attention_mask=mask).last_hidden_state
    with pytest.raises(mka_compile.ConversionError, match=r"MKAConfig\(causal=False\)"):
        mka_compile.convert(model, mode=mode)  # the default config keeps encoders as they are
    mka_compile.convert(model, mode=mode, config=BIDIR)
    assert {s.status for s in mka_compile.inspect(model).sites} == {mode}
    with torch.no_grad():
        assert _rel(model(ids, attention_mask=mask).last_hidden_state, base) <= 1e-5
    zoo.randomize_mka(model)
    with torch.no_grad():
        live = model(ids, attention_mask=mask).last_hidden_state
        alone = model(ids[1:, :9]).last_hidden_state
    assert _rel(live, base) >= 1e-3
    assert _rel(live[1, :9], alone[0]) <= 1e-4  # padding does not reach the memory
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    target = torch.randn_like(base)
    losses = []
    model.train()
    for _ in range(20):
        loss = (model(ids, attention_mask=mask).last_hidden_state - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_hand_written_vit_attention(mode: str) -> None:
    """timm's ViT attention: fused qkv, q/k LayerNorm, one bidirectional SDPA call."""
    model = zoo.TimmBlockAttention().eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        base = model(x)
    mka_compile.convert(model, mode=mode, config=BIDIR, example_inputs=(x,))
    with torch.no_grad():
        assert _rel(model(x), base) <= 1e-5
    zoo.randomize_mka(model)
    with torch.no_grad():
        assert _rel(model(x), base) >= 1e-3


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_bidirectional_layers_see_the_whole_sequence_and_refuse_a_cache(mode: str) -> None:
    from mka_compile.layers import FastMKAAttention, MKAAttention, MKACache

    cls = FastMKAAttention if mode == "fastmka" else MKAAttention
    torch.manual_seed(0)
    layer = cls(hidden_size=32, num_heads=4, num_kv_heads=2, config=MKAConfig(causal=False, chunk_size=4, top_r=2))
    x = torch.randn(2, 11, 32)
    later = x.clone()
    later[:, -1] += 1
    with torch.no_grad():
        assert _rel(layer(later)[:, 0], layer(x)[:, 0]) >= 1e-4
        with pytest.raises(ValueError, match="bidirectional layer .* no cache"):
            layer(x, cache=MKACache())
