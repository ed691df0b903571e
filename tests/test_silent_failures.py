"""Regression tests for silent wrong results (issue 13): each compares a converted model, with trained (non-zero)
gates and routers, against a reference computed another way (eager vs compiled, single vs threaded, pickled vs
original, beams / crop vs full forwards)."""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
import zoo

import mka_compile
from mka_compile.hf.compat import cache_kwargs, returned_cache

CFG = mka_compile.MKAConfig(chunk_size=4, top_r=2)


def _converted(mode: str = "fastmka", config: mka_compile.MKAConfig = CFG, family: str = "llama", model=None):
    model = model if model is not None else zoo.causal_lm(family, "sdpa")[0]
    mka_compile.convert(model, mode=mode, config=config)
    zoo.randomize_mka(model)
    return model


# -- torch.compile: a converted model is different code from the original -------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "mka"])
def test_compile_original_then_converted_copy(backend: str) -> None:
    torch._dynamo.reset()
    orig = zoo.causal_lm("llama", "sdpa")[0]
    conv = _converted(model=copy.deepcopy(orig))
    options = {"compiler": "aot_eager"} if backend == "mka" else None
    ids = torch.randint(0, 90, (2, 13))
    with torch.no_grad():
        eager_o, eager_c = orig(ids, use_cache=False).logits, conv(ids, use_cache=False).logits
        assert (eager_o - eager_c).abs().max() > 1e-3  # the rewrite is live
        out_o = torch.compile(orig, backend=backend, options=options)(ids, use_cache=False).logits
        out_c = torch.compile(conv, backend=backend, options=options)(ids, use_cache=False).logits
    torch.testing.assert_close(out_o, eager_o, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_c, eager_c, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_then_convert_same_model_and_two_configs() -> None:
    torch._dynamo.reset()
    model = zoo.causal_lm("llama", "sdpa")[0]
    other = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(0, 90, (1, 17))
    with torch.no_grad():
        compiled(ids, use_cache=False)
        _converted(model=model)  # converted in place after it was compiled
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
        _converted(model=other, config=mka_compile.MKAConfig(chunk_size=8, top_r=1, ema_beta=0.5))
        eager = other(ids, use_cache=False).logits
        torch.testing.assert_close(torch.compile(other, backend="aot_eager")(ids, use_cache=False).logits, eager)
    torch._dynamo.reset()


# -- threads: a call's state is not on the module ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fastmka", "mka"])
@pytest.mark.parametrize("fused", ["1", "0"])
def test_threads_share_one_converted_model(mode: str, fused: str, monkeypatch) -> None:
    monkeypatch.setenv("MKA_CPU_FUSED", fused)
    model = _converted(mode)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 90, (1, 9 + i)) for i in range(6)]
    with torch.no_grad():
        expected = [model.generate(p, max_new_tokens=6, do_sample=False) for p in prompts]
        single = [model(p, use_cache=False).logits for p in prompts]
    got, errors = {}, []

    def work(i: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(2):
                    got[i] = (model.generate(prompts[i], max_new_tokens=6, do_sample=False), model(prompts[i]).logits)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(len(prompts)):
        assert torch.equal(got[i][0], expected[i])
        torch.testing.assert_close(got[i][1], single[i], rtol=1e-5, atol=1e-5)


# -- pickle -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_converted_model_pickles(mode: str) -> None:
    model = _converted(mode)
    ids = torch.randint(0, 90, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        again = pickle.loads(pickle.dumps(model))
        assert mka_compile.inspect(loaded).sites[0].status == mode
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(again(ids).logits, ref, rtol=0, atol=0)


# -- a user config keeps identity at init -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_any_config_converts_to_the_original(mode: str) -> None:
    model = zoo.causal_lm("llama", "sdpa")[0]
    ids = torch.randint(0, 90, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        mka_compile.convert(model, mode=mode, config=mka_compile.MKAConfig(chunk_size=4, top_r=2, ema_beta=0.5))
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-6)
    assert all(float(m.gate) == 0.0 for n, m in model.named_modules() if n.endswith(".mka"))
    live = mka_compile.convert(zoo.causal_lm("llama", "sdpa")[0], config=mka_compile.MKAConfig(gate_init=0.5))
    assert all(float(m.gate) == 0.5 for n, m in live.named_modules() if n.endswith(".mka"))  # asked for explicitly
    assert float(mka_compile.FastMKAAttention(32, 4).gate) == 1.0  # layers built from scratch route from the start


# -- caches: beam search and crop move the MKA state with the cache ---------------------------------------------------
@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_beam_search_with_cache_equals_without(mode: str) -> None:
    model = _converted(mode)
    ids = torch.randint(0, 90, (2, 10))
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, return_dict_in_generate=True, **kw)
        uncached = model.generate(ids, use_cache=False, return_dict_in_generate=True, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_crop_rewinds_the_mka_state(mode: str) -> None:
    import transformers

    model = _converted(mode)
    ids = torch.randint(0, 90, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = transformers.DynamicCache(config=model.config)
        model(ids[:, :12], attention_mask=mask[:, :12], **cache_kwargs(model, cache))
        for t in range(12, 17):  # token by token, then a chunk: rewinding crosses calls and splits one
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(model, cache))
        model(ids[:, 17:25], attention_mask=mask[:, :25], **cache_kwargs(model, cache))
        cache.crop(-11)  # back to 14 tokens: into the token-by-token calls
        assert cache.get_seq_length() == 14
        out = model(ids[:, 14:30], attention_mask=mask, **cache_kwargs(model, cache)).logits
    torch.testing.assert_close(out, full[:, 14:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
@pytest.mark.parametrize("remove", [11, 15])
def test_crop_after_beam_reorders_rewinds_the_reordered_rows(mode: str, remove: int) -> None:
    """The kept calls take batch edits lazily (a row index, applied when a rewind reads them): crop after two beam
    reorders equals the reordered rows run alone. 11: into calls made between the reorders; 15: into the prefill,
    made before both."""
    import transformers

    model = _converted(mode)
    torch.manual_seed(3)
    ids = torch.randint(0, 90, (3, 30))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    first, second = torch.tensor([1, 2, 0]), torch.tensor([2, 0, 0])
    rows = first[second]  # the rows the cache holds after both reorders
    with torch.no_grad():
        full = model(ids[rows], attention_mask=mask[rows]).logits
        cache = transformers.DynamicCache(config=model.config)
        model(ids[:, :12], attention_mask=mask[:, :12], **cache_kwargs(model, cache))
        cache.reorder_cache(first)
        ids1, mask1 = ids[first], mask[first]
        for t in range(12, 17):
            model(ids1[:, t : t + 1], attention_mask=mask1[:, : t + 1], **cache_kwargs(model, cache))
        model(ids1[:, 17:25], attention_mask=mask1[:, :25], **cache_kwargs(model, cache))
        cache.reorder_cache(second)
        cache.crop(-remove)
        keep = 25 - remove
        out = model(ids[rows][:, keep:], attention_mask=mask[rows], **cache_kwargs(model, cache)).logits
    torch.testing.assert_close(out, full[:, keep:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_assisted_decoding_equals_greedy(mode: str) -> None:
    model = _converted(mode)
    torch.manual_seed(5)
    base = torch.randint(0, 90, (1, 6))
    for i in range(4):
        ids = torch.cat([base, base, torch.randint(0, 90, (1, 3 + i)), base], 1)  # repeats: prompt lookup proposes
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
            looked = model.generate(ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=4)
        assert torch.equal(looked, greedy)


def test_crop_beyond_the_history_is_refused() -> None:
    import transformers

    model = _converted()
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(0, 90, (1, 300)), **cache_kwargs(model, cache))
        model(torch.randint(0, 90, (1, 1)), **cache_kwargs(model, cache))
        with pytest.raises(RuntimeError, match="cannot remove the last 302 tokens"):
            cache.crop(-302)
    assert cache.get_seq_length() == 301  # refused: nothing cropped


def test_import_transformers_from_the_checkout_root() -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import transformers, kernels; "
        "cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
        "num_attention_heads=2); transformers.LlamaForCausalLM(cfg); import mka_compile; "
        "assert kernels.__file__ != mka_compile.kernels.__file__"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONSAFEPATH"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# -- PEFT LoRA: the adapters' update goes through the memory mix, in either order ----------------------------------
@pytest.mark.parametrize("order", ["lora_after_convert", "lora_before_convert"])
def test_lora_on_a_converted_model(order: str) -> None:
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    model = zoo.causal_lm("llama", "sdpa")[0]
    if order == "lora_after_convert":
        model = peft.get_peft_model(_converted(model=model), lora)
        for p in mka_compile.memory_parameters(model):
            p.requires_grad_(True)
    else:
        model = _converted(model=peft.get_peft_model(model, lora))
    assert len(mka_compile.memory_parameters(model)) == 2 * 5  # two sites: router (2 linears: w, b) + gate
    ids = torch.randint(0, 90, (2, 20))
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in grads) and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert sum(".mka." in n for n in grads) == 10  # router and gate train beside the adapters
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
        assert (adapted - plain).abs().max() > 1e-3  # the adapters are live
        merged = model.merge_and_unload()(ids).logits
    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)


def test_replaced_memory_module_is_refused() -> None:
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["mka"])
    model = peft.get_peft_model(_converted(), lora)
    with pytest.raises(RuntimeError, match="no longer holds its MKA memory"):
        model(torch.randint(0, 90, (1, 5)))


# -- attention dropout: FastMKA keeps the site's, MKA mode refuses it on every path ---------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attention_dropout_in_train_mode(family: str) -> None:
    import transformers as tf

    cfg = zoo._cfg(family)
    for name in ("attention_dropout", "attn_pdrop"):
        if hasattr(cfg, name):
            setattr(cfg, name, 0.5)
    ids = torch.randint(0, 90, (1, 12))
    fast = _converted(model=tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"))
    fast.train()
    with torch.no_grad():
        assert not torch.equal(fast(ids).logits, fast(ids).logits)  # dropout applied
    full = _converted("mka", model=tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"))
    full.train()
    with pytest.raises(RuntimeError, match="attention dropout is not supported"):
        full(ids)
    full.eval()
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, full(ids).logits, rtol=0, atol=0)


def test_attention_dropout_refused_inline() -> None:
    from zoo_handwritten import NanoGPT

    model = NanoGPT(flash=False)
    mka_compile.convert(model, mode="mka", example_inputs=(torch.randint(0, 50, (2, 12)),))
    for blk in model.h:
        blk["attn"].attn_dropout.p = 0.5
    model.train()
    with pytest.raises(RuntimeError, match="attention dropout is not supported"):
        model(torch.randint(0, 50, (1, 12)))


# -- checkpoints: plain save_pretrained records the conversion ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_plain_save_pretrained_round_trip(mode: str, tmp_path, monkeypatch) -> None:
    model = _converted(mode)
    ids = torch.randint(0, 90, (2, 15))
    model.save_pretrained(tmp_path)  # transformers' own method: the record rides in config.json
    loaded = mka_compile.from_pretrained(tmp_path)
    assert mka_compile.inspect(loaded).sites[0].status == mode
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    convert_module = __import__("sys").modules["mka_compile.conversion"]
    install, calls = convert_module._install, []

    def failing(*args):  # the second site fails: the first is rolled back
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        install(*args)

    monkeypatch.setattr(convert_module, "_install", failing)
    fresh = zoo.causal_lm("llama", "sdpa")[0]
    with pytest.raises(RuntimeError, match="boom"):
        mka_compile.convert(fresh, mode=mode)
    assert not hasattr(fresh.config, "mka_compile") and not mka_compile.memory_parameters(fresh)
    assert not any(hasattr(type(m), "_mka_site_base") for m in fresh.modules())  # classes restored


@pytest.mark.slow
def test_compiled_forward_beam_search_equals_eager() -> None:
    torch._dynamo.reset()
    model = _converted()
    ids = torch.randint(0, 90, (1, 10))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        eager = model.generate(ids, use_cache=False, **kw)
        model.forward = torch.compile(model.forward, backend="aot_eager", dynamic=True)  # the cache meets compiled code
        compiled = model.generate(ids, **kw)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.sequences_scores, eager.sequences_scores, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# -- a site that names its cache layer otherwise (GPT-Neo's layer_id) reads its positions right -------------------
@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_decode_equals_full_forward_gpt_neo(mode: str) -> None:
    import transformers as tf

    cfg = tf.AutoConfig.for_model(
        "gpt_neo", vocab_size=90, hidden_size=32, num_layers=2, num_heads=4, window_size=8,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    try:
        model = _converted(mode, model=model)
    except mka_compile.ConversionError as e:  # MKA mode refuses GPT-Neo's unscaled scores and local window
        assert mode == "mka" and "use FastMKA" in str(e)
        return
    ids = torch.randint(0, 90, (1, 20))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)
        cache, steps = returned_cache(out), [out.logits]
        for t in range(10, 20):
            steps.append(model(ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_fused_layout_read_with_as_many_tokens_as_features() -> None:
    """Example inputs with T == head_dim: the fused projection's layout is read the same as with other lengths."""
    from zoo_handwritten import NanoGPT

    torch.manual_seed(0)
    base = NanoGPT(flash=False).eval()  # head_dim 8
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    mka_compile.convert(a, example_inputs=(torch.randint(0, 50, (2, 8)),))
    mka_compile.convert(b, example_inputs=(torch.randint(0, 50, (2, 12)),))
    zoo.randomize_mka(a)
    zoo.randomize_mka(b)
    ids = torch.randint(0, 50, (2, 14))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)
