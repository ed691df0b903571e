"""mka_compile.convert: identity at init, a live router, decode == prefill, generate, padding, atomicity."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
import zoo

import mka_compile
from mka_compile import ConversionError, MKAConfig

CFG = MKAConfig(gate_init=0.0, chunk_size=4, top_r=2)
FAMILIES = [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "sdpa"), ("mistral", "eager")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _randomize(model) -> None:
    """Random values in every new parameter: the rewrite is live and every level contributes."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mka." in name:
                p.fill_(1.0) if name.endswith("gate") else p.normal_(0, 0.5)


@pytest.mark.parametrize(("family", "attn"), FAMILIES)
def test_identity_at_init_then_live_and_decode_equals_prefill(family: str, attn: str) -> None:
    model, _ = zoo.causal_lm(family, attn)
    ids = torch.randint(0, 90, (2, 13))
    with torch.no_grad():
        base = model(ids).logits
    assert mka_compile.convert(model, config=CFG) is model
    with torch.no_grad():
        assert _rel(model(ids).logits, base) <= 1e-5
    _randomize(model)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(5, 13):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert _rel(full, base) >= 1e-3  # the rewrite is live
    assert _rel(torch.cat(steps, 1), full) <= 1e-4  # the MKA state rides in the cache
    assert {s.status for s in mka_compile.inspect(model).sites} == {"fastmka"}


def test_generate_equals_greedy_full_forwards_and_left_padding() -> None:
    model, _ = zoo.causal_lm("llama", "sdpa")
    mka_compile.convert(model, config=CFG)
    _randomize(model)
    prompts = [torch.randint(1, 90, (1, 9)), torch.randint(1, 90, (1, 4))]
    alone = []
    for p in prompts:
        gen = model.generate(p, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = p
        for _ in range(6):  # greedy by full forwards over the growing sequence
            with torch.no_grad():
                nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert torch.equal(gen, seq)
        alone.append(gen[0, p.shape[1] :])
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, 9 - p.shape[1] :], mask[b, 9 - p.shape[1] :] = p[0], 1
    gen = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for b in range(2):
        assert torch.equal(gen[b, 9:], alone[b]), b  # padding does not leak into the memory


def test_training_moves_the_router_and_lowers_the_loss() -> None:
    model, _ = zoo.causal_lm("llama", "eager")
    mka_compile.convert(model, config=CFG)
    new = {n: p for n, p in model.named_parameters() if ".mka." in n}
    gate0 = {n: p.detach().clone() for n, p in new.items()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 90, (2, 16))
    losses, got_grad = [], set()
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        got_grad |= {n for n, p in new.items() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert got_grad == set(new)  # every new parameter trains
    assert any((p - gate0[n]).abs().max() > 0 for n, p in new.items() if n.endswith("gate"))


def test_state_dict_round_trip() -> None:
    a, _ = zoo.causal_lm("llama", "sdpa", seed=3)
    b, _ = zoo.causal_lm("llama", "sdpa", seed=4)
    for m in (a, b):
        mka_compile.convert(m, config=CFG)
    _randomize(a)
    keys = a.state_dict().keys()
    assert "model.layers.0.self_attn.mka.router.fc1.weight" in keys and "model.layers.1.self_attn.mka.gate" in keys
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 90, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits)


def test_failure_is_atomic_and_names_the_sites() -> None:
    model, _ = zoo.causal_lm("gpt2", "eager")  # fused c_attn: not supported yet
    ids = torch.randint(0, 90, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match=r"transformer.h.0.attn: fused QKV projection") as err:
        mka_compile.convert(model)
    assert len(err.value.problems) == 2
    assert not any(hasattr(m, "mka") or m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_nothing_convertible_and_bad_arguments() -> None:
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(ConversionError, match="bidirectional"):
        mka_compile.convert(tf.BertModel(cfg, add_pooling_layer=False).eval())
    model, _ = zoo.causal_lm("llama", "sdpa")
    with pytest.raises(ValueError, match="mode='mka' conversion is not available"):
        mka_compile.convert(model, mode="mka")
    with pytest.raises(ValueError, match="mode must be"):
        mka_compile.convert(model, mode="fast")
    with pytest.raises(ValueError, match="config must be an MKAConfig"):
        mka_compile.convert(model, config={"chunk_size": 4})
    mka_compile.convert(model)
    with pytest.raises(ConversionError, match="already converted"):
        mka_compile.convert(model)
