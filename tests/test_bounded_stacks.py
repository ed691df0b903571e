"""Bounded memory inside the stacks users run it in, each against a reference computed another way, with trained
(non-zero) gates and routers: two threads on one model == one at a time; LoRA adapters merged == unmerged (and
live); sampling with the cache == sampling without it (same seed)."""

from __future__ import annotations

import threading

import pytest
import torch
from bounded_models import CFG, _converted

import mka_compile
from mka_compile import MKAConfig


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_two_threads_on_one_bounded_model_equal_one_at_a_time(mode) -> None:
    model = _converted(MKAConfig(**CFG), mode=mode)
    prompts = [torch.randint(0, 64, (1, 50), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        alone = [model.generate(p, **kw) for p in prompts]
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(3):  # several rounds, so the threads' calls interleave
                    got[i] = model.generate(prompts[i], **kw)
                    assert torch.equal(got[i], alone[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert torch.equal(got[i], alone[i])


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_lora_on_a_bounded_model_merged_equals_unmerged(mode) -> None:
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(_converted(MKAConfig(**CFG), mode=mode), lora)
    ids = torch.randint(0, 64, (2, 70))  # beyond S + W: recall and the window both matter
    model.train()
    model(ids, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
        assert (adapted - plain).abs().max() > 1e-3  # the adapters are live
        merged = model.merge_and_unload()(ids).logits
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)


def test_sampling_with_the_cache_equals_without() -> None:
    model = _converted(MKAConfig(**CFG))
    ids = torch.randint(0, 64, (2, 40))
    kw = dict(max_new_tokens=30, do_sample=True, top_k=20, temperature=1.3, pad_token_id=0)
    with torch.no_grad():
        torch.manual_seed(7)
        cached = model.generate(ids, **kw)
        torch.manual_seed(7)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert mka_compile.memory_parameters(model)  # converted (the samples come from the bounded model)
