"""Bounded memory (``MKAConfig(window=W, sink_tokens=S)``) on a converted tiny Llama, each property against a
reference computed another way: the original (identity up to S + W; equal when the recalled chunks cover the past),
the unbounded conversion with trained gates (a window that covers everything), itself (decode == prefill, padded
batch == rows alone, beams and assisted decoding with the cache == without), and its memory. The attention step
against its definition: ``test_bounded_attend.py``."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from bounded_models import CFG, _converted, _copy_memory, _llama

import mka_compile
from mka_compile import MKAConfig
from mka_compile.hf.compat import cache_kwargs, returned_cache

transformers.logging.set_verbosity_error()


MODES = ["fastmka", "mka"]


@pytest.mark.parametrize("mode", MODES)
def test_identity_at_init_up_to_sinks_plus_window(mode):
    original = _llama()
    model = _converted(MKAConfig(**CFG), trained=False, mode=mode)
    ids = torch.randint(0, 64, (2, 80))
    with torch.no_grad():
        a, b = original(ids).logits, model(ids).logits
    n = CFG["window"] + CFG["sink_tokens"]
    torch.testing.assert_close(b[:, :n], a[:, :n], rtol=1e-5, atol=1e-5)
    assert (b[:, n + 8 :] - a[:, n + 8 :]).abs().max() > 1e-3  # beyond it, the memory is bounded


def test_recall_covering_the_past_equals_the_original():
    """R chunks cover every chunk that left the window, within the trained length: the original, exactly."""
    original = _llama()
    model = _converted(MKAConfig(**{**CFG, "recall_chunks": 12}), trained=False)
    ids = torch.randint(0, 64, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_trained_memory_with_a_covering_window_equals_the_unbounded_conversion(mode):
    """With trained gates and routers, a window longer than the sequence is the unbounded conversion (FastMKA, or MKA
    mode with every level: local, session, long-term): logits and gradients (of the router and gate) agree."""
    ids = torch.randint(0, 64, (2, 40))
    unbounded = _converted(MKAConfig(chunk_size=8, top_r=2), mode=mode)
    bounded_m = _converted(MKAConfig(**{**CFG, "window": 64}), mode=mode)
    _copy_memory(unbounded, bounded_m)
    a, b = unbounded(ids).logits, bounded_m(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for p, q in zip(mka_compile.memory_parameters(unbounded), mka_compile.memory_parameters(bounded_m)):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "trained_length,keys,mode",
    [(None, "bounds", "fastmka"), (48, "bounds", "fastmka"), (48, "mean", "fastmka"), (48, "bounds", "mka")],
)  # 48: moved on
def test_decode_equals_prefill_with_padding(trained_length, keys, mode):
    cfg = MKAConfig(**CFG, trained_length=trained_length, chunk_keys=keys)
    model = _converted(cfg, mode=mode)
    T = 90
    ids = torch.randint(0, 64, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :30], attention_mask=mask[:, :30], use_cache=True)
        cache, steps = returned_cache(out), [out.logits]
        for lo, hi in [(30, 31), (31, 45), *((t, t + 1) for t in range(45, T))]:
            out = model(ids[:, lo:hi], attention_mask=mask[:, :hi], **cache_kwargs(model, cache), use_cache=True)
            steps.append(out.logits)
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got[0], full[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1, 7:], full[1, 7:], rtol=1e-4, atol=1e-4)
    # the padded row equals the same tokens alone
    with torch.no_grad():
        alone = model(ids[1:, 7:]).logits
    torch.testing.assert_close(full[1, 7:], alone[0], rtol=1e-4, atol=1e-4)


def test_positions_beyond_the_trained_length_are_moved():
    """Beyond the trained length, the keys are moved: outputs differ from true positions there, not before."""
    ids = torch.randint(0, 64, (1, 100))
    moved = _converted(MKAConfig(**CFG, trained_length=60))
    true_pos = _converted(MKAConfig(**CFG, trained_length=1000))
    _copy_memory(moved, true_pos)
    with torch.no_grad():
        a, b = moved(ids).logits, true_pos(ids).logits
    torch.testing.assert_close(a[:, :60], b[:, :60], rtol=1e-5, atol=1e-5)
    assert (a[:, 60:] - b[:, 60:]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_generate_with_cache_equals_without(mode):
    """Greedy, beam search and assisted decoding (crop) with the bounded cache equal recomputing every step."""
    model = _converted(MKAConfig(**CFG), mode=mode)
    ids = torch.randint(0, 64, (2, 40))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        greedy = model.generate(ids, **kw)
        greedy_nc = model.generate(ids, use_cache=False, **kw)
        beams = model.generate(ids, num_beams=3, **kw)
        beams_nc = model.generate(ids, num_beams=3, use_cache=False, **kw)
        assisted = model.generate(ids[1:], max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(greedy, greedy_nc)
    assert torch.equal(beams, beams_nc)
    assert torch.equal(assisted, greedy[1:])


@pytest.mark.parametrize("mode", MODES)
def test_resident_memory_is_bounded(mode):
    model = _converted(MKAConfig(**CFG), mode=mode)
    full = _llama()
    reps = {}
    with torch.no_grad():
        for T in (160, 320, 640):
            ids = torch.randint(0, 64, (1, T))
            reps[T] = (
                mka_compile.memory_report(returned_cache(model(ids, use_cache=True))),
                mka_compile.memory_report(returned_cache(full(ids, use_cache=True))),
            )
    (b1, f1), (b2, f2), (b3, f3) = reps.values()
    assert f3["resident_bytes"] == 4 * f1["resident_bytes"]  # full attention grows with the context
    # bounded: only what represents each chunk grows (summary key and value, the recall bounds' centre and pair
    # radii: 2 + 1 + 1/2 vectors of d floats per chunk and kv head); the tokens go to the host store
    per_chunk = int(3.5 * 16 * 4)  # d = 16, float32
    grown = 2 * 2 * (640 - 160) // 8 * per_chunk  # layers * kv heads * new chunks
    assert b3["resident_bytes"] - b1["resident_bytes"] <= 2 * grown  # buffers grow by doubling
    assert b3["resident_bytes"] < f3["resident_bytes"] / 2
    assert b3["offloaded_bytes"] > b2["offloaded_bytes"] > b1["offloaded_bytes"]
    assert b3["tokens"] == 640


def test_bad_uses_are_refused_with_the_reason():
    model = _llama()
    with pytest.raises(mka_compile.ConversionError, match="trained length"):
        mka_compile.convert(model, config=MKAConfig(**{**CFG, "window": 300}))
    assert not any(n.endswith(".mka") for n, _ in model.named_modules())  # untouched
    model = _converted(MKAConfig(**CFG))
    filled = transformers.DynamicCache()
    filled.update(torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16), 0)
    with pytest.raises(RuntimeError, match="empty dynamic cache"):
        model(torch.randint(0, 64, (1, 4)), **cache_kwargs(model, filled))


def test_crop_refuses_padded_positions_and_rewinds_decoded_ones():
    model = _converted(MKAConfig(**CFG))
    ids = torch.randint(0, 64, (1, 60))
    with torch.no_grad():
        cache = returned_cache(model(ids[:, :50], use_cache=True))
        for t in range(50, 60):
            model(ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True)
        cache.crop(-7)  # back to 53 tokens
        again = model(ids[:, 53:60], **cache_kwargs(model, cache), use_cache=True).logits
        full = model(ids).logits
    torch.testing.assert_close(again, full[:, 53:60], rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(again.sum()))


@pytest.mark.parametrize("mode", MODES)
def test_compiled_and_saved_models_equal_eager(tmp_path, mode):
    """torch.compile (the mka backend) and save_pretrained / from_pretrained give the eager bounded model's logits;
    ONNX export and the backend's own rewrite refuse bounded memory with the reason."""
    model = _converted(MKAConfig(**CFG, trained_length=48), mode=mode)
    ids = torch.randint(0, 64, (1, 70))
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="mka")(ids).logits
        mka_compile.save_pretrained(model, tmp_path)
        again = mka_compile.from_pretrained(tmp_path)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    with pytest.raises(ValueError, match="bounded memory"):
        mka_compile.export_onnx(model, ids[:, :8], tmp_path / "m.onnx")
    with pytest.raises(Exception, match="bounded memory"):
        torch._dynamo.reset()
        torch.compile(_llama(), backend="mka", options={"config": MKAConfig(**CFG)})(ids)


@pytest.mark.parametrize("kind", ["FastMKAAttention", "MKAAttention"])
def test_layers_built_from_scratch(kind):
    """A layer with a window: equal to the unbounded layer (gate 1, every level) up to S + W and everywhere when the
    window covers the sequence, decode == prefill with moved positions, gradients flow."""
    from mka_compile import MKACache

    Layer = getattr(mka_compile, kind)
    torch.manual_seed(0)
    cfg = MKAConfig(**CFG, trained_length=40)
    layer = Layer(64, 4, 2, config=cfg)
    wide = Layer(64, 4, 2, config=MKAConfig(chunk_size=8, top_r=2))
    covering = Layer(64, 4, 2, config=MKAConfig(**{**CFG, "window": 128}))
    wide.load_state_dict(layer.state_dict())
    covering.load_state_dict(layer.state_dict())
    x = torch.randn(2, 90, 64)
    full = layer(x)
    full.square().mean().backward()
    assert layer.gate.grad is not None and layer.router.fc1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        n = CFG["window"] + CFG["sink_tokens"]
        unbounded = wide(x)
        torch.testing.assert_close(full[:, :n], unbounded[:, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(covering(x), unbounded, rtol=1e-5, atol=1e-5)
        assert (full[:, n + 8 :] - unbounded[:, n + 8 :]).abs().max() > 1e-3
        cache = MKACache()
        outs = [layer(x[:, :30], cache=cache)]
        for t in range(30, 90):
            outs.append(layer(x[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full.detach(), rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length(0) == 90


def test_models_outside_transformers_are_refused():
    class Block(torch.nn.Module):
        def __init__(self, d=32, h=4):
            super().__init__()
            self.h = h
            self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = (m(x).view(B, T, self.h, D // self.h).transpose(1, 2) for m in (self.q, self.k, self.v))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return y.transpose(1, 2).reshape(B, T, D)

    model = Block().eval()
    with pytest.raises(mka_compile.ConversionError, match="not a transformers model"):
        mka_compile.convert(model, config=MKAConfig(**CFG), example_inputs=(torch.randn(1, 8, 32),))
    assert not hasattr(model, "mka")


def test_window_and_sinks_only_keep_no_chunks():
    """recall_chunks=0 (StreamingLLM): nothing is offloaded, resident memory is the same at 4x the context, and a
    crop past the window's start is refused with the reason."""
    model = _converted(MKAConfig(**{**CFG, "recall_chunks": 0}))
    with torch.no_grad():
        reps = []
        for T in (100, 400):
            cache = returned_cache(model(torch.randint(0, 64, (1, T)), use_cache=True))
            reps.append(mka_compile.memory_report(cache))
        assert reps[0]["offloaded_bytes"] == reps[1]["offloaded_bytes"] == 0
        for _ in range(3):
            model(torch.randint(0, 64, (1, 1)), **cache_kwargs(model, cache), use_cache=True)
        cache.crop(-2)  # within the window: fine
        with pytest.raises(RuntimeError, match="past the window"):
            for layer in cache.layers:
                layer.store.crop(40)


def test_bounds_recall_without_the_longterm_level():
    """chunk_keys='bounds' keeps its own chunk keys, so bounded recall works with levels=('local', 'session');
    'mean' needs the long-term summaries and says so."""
    cfg = MKAConfig(**CFG, levels=("local", "session"))
    assert cfg.chunk_keys == "bounds"
    with pytest.raises(ValueError, match="chunk_keys='mean' recalls chunks by their summaries"):
        MKAConfig(**CFG, levels=("local", "session"), chunk_keys="mean")
    model = _converted(cfg)
    ids = torch.randint(0, 64, (2, 70))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :40], use_cache=True)
        cache, steps = returned_cache(out), [out.logits]
        for t in range(40, 70):
            out = model(ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    stores = [layer.store for layer in cache.layers if getattr(layer, "store", None) is not None]
    assert stores and all(s.chunk_k.shape[2] > 0 and s.chunk_bounds.shape[2] >= 70 // 8 for s in stores)


def test_bounds_recall_without_rope_frequencies_is_refused(monkeypatch):
    """The bounds turn keys back to position 0 with the model's RoPE frequencies; without them convert refuses (and
    leaves the model as it was) rather than scoring rotated keys."""
    from mka_compile import conversion

    model = _llama()
    monkeypatch.setattr(conversion.hf_attention, "rope_frequencies", lambda *a: None)
    with pytest.raises(mka_compile.ConversionError, match="chunk_keys='mean'"):
        mka_compile.convert(model, config=MKAConfig(**CFG))
    assert not mka_compile.memory_parameters(model)
