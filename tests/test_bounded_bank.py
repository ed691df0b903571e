"""An external memory bank (``mka_compile.memory_bank`` / ``bounded_cache``) on a converted tiny Llama with trained
(non-zero) gates and routers, against references computed another way: prefill + decode == one forward, a padded
row == the same tokens alone, generate with the cache == recomputing every step, saved == reloaded. The attention
step with a bank against its definition is in ``test_bounded_attend.py``."""

from __future__ import annotations

import pytest
import torch
import transformers
from bounded_models import CFG, _converted

import mka_compile
from mka_compile import MemoryBank, MKAConfig
from mka_compile.hf.compat import cache_kwargs

transformers.logging.set_verbosity_error()

BANK_CFG = dict(CFG, trained_length=48)  # queries from 48 on see moved keys


def _bank(model, n=72, seed=3):
    doc = torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(seed))
    return mka_compile.memory_bank(model, doc, block_size=32)


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_decode_with_a_bank_equals_prefill_and_padding_equals_alone(mode):
    model = _converted(MKAConfig(**BANK_CFG), mode=mode)
    bank = _bank(model)
    assert bank.chunks == 72 // CFG["chunk_size"] and set(bank.layers) == {0, 1}
    T = 70
    ids = torch.randint(0, 64, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, **cache_kwargs(model, mka_compile.bounded_cache(bank))).logits
        plain = model(ids, attention_mask=mask).logits
        cache = mka_compile.bounded_cache(bank)
        steps = [model(ids[:, :25], attention_mask=mask[:, :25], **cache_kwargs(model, cache), use_cache=True).logits]
        for lo, hi in [(25, 26), (26, 40), *((t, t + 1) for t in range(40, T))]:
            out = model(ids[:, lo:hi], attention_mask=mask[:, :hi], **cache_kwargs(model, cache), use_cache=True)
            steps.append(out.logits)
        alone = model(ids[1:, 6:], **cache_kwargs(model, mka_compile.bounded_cache(bank))).logits
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got[0], full[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1, 6:], full[1, 6:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full[1, 6:], alone[0], rtol=1e-4, atol=1e-4)  # the bank sits in the row's frame
    assert (full - plain).abs().max() > 1e-3  # the bank is recalled
    with_bank, bank_res, bank_off = mka_compile.memory_report(cache), 0, 0
    for layer in bank.layers.values():
        bank_res, bank_off = bank_res + layer.nbytes()[0], bank_off + layer.nbytes()[1]
    assert bank_off == 2 * 2 * 2 * 72 * 16 * 4  # layers * (keys, values) * kv heads * tokens * head_dim * float32
    assert with_bank["offloaded_bytes"] > bank_off and with_bank["resident_bytes"] > bank_res


def test_generate_with_a_bank_equals_recomputing_and_a_saved_bank_reloads(tmp_path):
    model = _converted(MKAConfig(**BANK_CFG))
    bank = _bank(model)
    bank.save(tmp_path / "bank.safetensors")
    again = MemoryBank.load(tmp_path / "bank.safetensors")
    ids = torch.randint(0, 64, (1, 30))
    with torch.no_grad():
        out = model.generate(ids, cache=mka_compile.bounded_cache(bank), max_new_tokens=20, do_sample=False)
        seq = ids
        for _ in range(20):  # every step from scratch, with a fresh cache on the reloaded bank
            logits = model(seq, **cache_kwargs(model, mka_compile.bounded_cache(again))).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)
    two = MemoryBank.cat([bank, again])
    assert two.chunks == 2 * bank.chunks


def test_bad_banks_are_refused_with_the_reason():
    model = _converted(MKAConfig(**BANK_CFG))
    with pytest.raises(ValueError, match="one sequence"):
        mka_compile.memory_bank(model, torch.randint(0, 64, (2, 40)))
    other = _converted(MKAConfig(**{**BANK_CFG, "chunk_size": 4, "sink_tokens": 2}))
    bank = _bank(other)
    with pytest.raises(ValueError, match="same model and MKAConfig"):
        model(torch.randint(0, 64, (1, 40)), **cache_kwargs(model, mka_compile.bounded_cache(bank)))
    mean = _converted(MKAConfig(**BANK_CFG, chunk_keys="mean"))
    with pytest.raises(ValueError, match="chunk_keys='bounds'"):
        mka_compile.memory_bank(mean, torch.randint(0, 64, (1, 40)))
    with pytest.raises(ValueError, match="chunk_keys='bounds'"):
        mean(torch.randint(0, 64, (1, 40)), **cache_kwargs(mean, mka_compile.bounded_cache(_bank(model))))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_faiss_index_recalls_what_scoring_every_chunk_recalls(kind):
    """A flat index, and an IVF index that probes every list, choose the chunks that scoring every bank chunk
    chooses: the same logits, with a padded row (its own frame) and decode steps."""
    pytest.importorskip("faiss")
    model = _converted(MKAConfig(**BANK_CFG))
    bank = _bank(model, n=160)
    indexed = bank.with_index(kind, nlist=4, nprobe=4)
    ids = torch.randint(0, 64, (2, 60))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask, **cache_kwargs(model, mka_compile.bounded_cache(bank))).logits
        got = model(ids, attention_mask=mask, **cache_kwargs(model, mka_compile.bounded_cache(indexed))).logits
        cache = mka_compile.bounded_cache(indexed)
        steps = [model(ids[:, :50], attention_mask=mask[:, :50], **cache_kwargs(model, cache), use_cache=True).logits]
        for t in range(50, 60):
            out = model(
                ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(model, cache), use_cache=True
            )
            steps.append(out.logits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-4, atol=1e-4)
