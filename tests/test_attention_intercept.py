"""MKA mode for attention computed inline (mka_compile.attention_intercept): nanoGPT (SDPA and manual), Meta's Llama
(complex RoPE, GQA written as expand + reshape, its own KV cache written at ``start_pos``), Falcon (no
AttentionInterface), and the sites it refuses with a clear error."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import zoo

import mka_compile
from mka_compile import ConversionError, MKAConfig
from mka_compile.hf.compat import cache_kwargs, returned_cache

CFG = MKAConfig(gate_init=0.0, chunk_size=4, top_r=2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _train_lowers_loss(model: torch.nn.Module, loss_fn) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(20):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
@pytest.mark.parametrize("flash", [True, False])
def test_nanogpt_identity_live_and_training(flash: bool, mode: str) -> None:
    model = zoo.NanoGPT(flash=flash).eval()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        base = model(ids)
    mka_compile.convert(model, mode=mode, config=CFG, example_inputs=(ids,))
    assert {s.status for s in mka_compile.inspect(model, (ids,)).sites} == {mode}
    with torch.no_grad():
        assert _rel(model(ids), base) <= 1e-5
    zoo.randomize_mka(model)
    with torch.no_grad():
        live = model(ids)
    assert _rel(live, base) >= 1e-3
    # the manual and SDPA spellings of the same weights convert to the same model
    twin = zoo.NanoGPT(flash=not flash).eval()
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if ".mka." not in k}, strict=False)
    mka_compile.convert(twin, mode=mode, config=CFG, example_inputs=(ids,))
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert _rel(twin(ids), live) <= 1e-5
    _train_lowers_loss(model, lambda m: F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()))


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_meta_llama_decode_with_its_own_cache_equals_full(mode: str) -> None:
    """Meta's Llama writes its KV cache at ``start_pos``: the MKA memory continues across those calls
    (regression: it restarted at every call, the authors' "session state lost between cached calls")."""
    torch.manual_seed(0)
    model = zoo.MetaLlamaAttention().eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        base = model(x)
    mka_compile.convert(model, mode=mode, config=CFG, example_inputs=(x,))
    assert model.mka.position_arg == "start_pos"
    with torch.no_grad():
        assert _rel(model(x), base) <= 1e-5
    zoo.randomize_mka(model)
    with torch.no_grad():
        full = model(x)
        steps = [model(x[:, :5], 0)] + [model(x[:, t : t + 1], t) for t in range(5, 12)]
        assert _rel(full, base) >= 1e-3
        assert _rel(torch.cat(steps, 1), full) <= 1e-4
        with pytest.raises(RuntimeError, match="called at position 3, but its memory holds 12 tokens"):
            model(x[:, 3:4], 3)
        model.mka.position_arg = None  # without the position every call restarts the memory
        if mode == "fastmka":  # decode silently differs
            again = [model(x[:, :5], 0)] + [model(x[:, t : t + 1], t) for t in range(5, 12)]
            assert _rel(torch.cat(again, 1), full) >= 1e-3
        else:  # MKA mode sees that its memory does not cover the model's cache
            model(x[:, :5], 0)
            with pytest.raises(RuntimeError, match="session cache of 1 positions but the model's cache has 6"):
                model(x[:, 5:6], 5)
    model.mka.position_arg = "start_pos"

    def loss(m):
        m.cache_k.detach_(), m.cache_v.detach_()  # Meta's cache buffers keep the last step's graph otherwise
        return (m(x) - base.roll(1, 1)).pow(2).mean()

    _train_lowers_loss(model, loss)


def test_module_cache_without_position_argument_warns() -> None:
    class NoPosition(zoo.MetaLlamaAttention):
        def forward(self, x):  # always writes at 0
            return super().forward(x, 0)

    model = NoPosition().eval()
    with pytest.warns(UserWarning, match="keeps its own KV cache .* no argument that gives the write position"):
        mka_compile.convert(model, config=CFG, example_inputs=(torch.randn(2, 6, 32),))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_falcon_left_padding_and_mask_check(attn: str) -> None:
    """Falcon computes attention inline (no AttentionInterface): padded keys in its mask are accepted and kept out of
    the memory, and decode with its cache equals the full forward."""
    model, cfg = zoo.causal_lm("falcon", attn)
    mka_compile.convert(model, mode="mka", config=CFG)
    # transformers < 5.25: no Falcon site dispatches through AttentionInterface, the model keeps its implementation
    # and the sites are intercepted inline; 5.25 dispatches them: MKA answers through the interface
    assert model.config._attn_implementation in (attn, "mka_compile")
    zoo.randomize_mka(model)
    ids = torch.randint(1, 90, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 4:]).logits
        assert _rel(full[1, 4:], alone[0]) <= 1e-4  # padding does not reach the memory
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        steps, cache = [out.logits], returned_cache(out)
        for t in range(6, 11):
            o = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True, **cache_kwargs(model, cache))
            steps.append(o.logits)
        assert _rel(torch.cat(steps, 1)[1, 4:], full[1, 4:]) <= 1e-4


class _Biased(torch.nn.Module):
    """Attention with a learned position bias added to the scores (not MKA-convertible: no single scale)."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.h, self.d = heads, d // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.bias = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        B, T, D = x.shape
        heads = lambda t: t.view(B, T, self.h, self.d).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        s = (q @ k.transpose(-2, -1)) / math.sqrt(self.d) + self.bias[:T, :T].tril()
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))


class _NormedRope(zoo.MetaLlamaAttention):
    """Meta's Llama with a key norm between the projection and RoPE: the keys are not a rotation of the projection."""

    def __init__(self) -> None:
        super().__init__()
        self.k_norm = torch.nn.LayerNorm(self.head_dim)

    def rope(self, x, start):
        return super().rope(self.k_norm(x) if x.shape[2] == self.n_kv_heads else x, start)


class _MaskArgument(torch.nn.Module):
    """Attention whose SDPA mask comes from the caller."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.h, self.d = heads, d // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask):
        B, T, D = x.shape
        heads = lambda t: t.view(B, T, self.h, self.d).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(B, T, D))


def test_a_mask_that_is_not_causal_is_refused_at_run_time() -> None:
    model = _MaskArgument().eval()
    x = torch.randn(2, 12, 32)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    report = mka_compile.inspect(model, (x, causal))
    if not report.sites or not report.sites[0].convertible:
        pytest.skip(f"a caller's mask is not taken as causal by the detection: {report}")
    mka_compile.convert(model, mode="mka", config=CFG, example_inputs=(x, causal))
    with torch.no_grad():
        model(x, causal)
        with pytest.raises(RuntimeError, match="attention mask is not the causal mask"):
            model(x, causal & ~torch.ones(12, 12, dtype=torch.bool).tril(-4))  # a sliding window of 4 keys


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_Biased, "does not support an additive position bias"),  # refused at conversion, from the site facts
        (_NormedRope, "cannot read this site's complex RoPE"),
    ],
)
def test_unsupported_inline_sites_are_refused_and_left_alone(make, reason: str) -> None:
    model = make().eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ConversionError, match=reason):
        mka_compile.convert(model, mode="mka", config=CFG, example_inputs=(x,))
    assert not any(hasattr(m, "mka") or m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)


class _Spelled(torch.nn.Module):
    """Causal attention spelled out with its own scale, applied to the scores (``post``) or to q before the product."""

    def __init__(self, scale: float = 0.3, pre_scaled_q: bool = False, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.h, self.d, self.scale, self.pre = heads, d // heads, scale, pre_scaled_q
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        heads = lambda t: t.view(B, T, self.h, self.d).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        s = (q * self.scale) @ k.transpose(-2, -1) if self.pre else (q @ k.transpose(-2, -1)) * self.scale
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))


def test_spelled_out_scale_comes_from_the_site_facts() -> None:
    """The scale between q and k is the one the attention rules read (not learned from the softmax input): MKA's
    answer with live memory equals MKA attention computed with that scale, and a changed scale changes it."""
    torch.manual_seed(0)
    model = _Spelled(scale=0.3).eval()
    x = torch.randn(2, 12, 32)
    facts = mka_compile.inspect(model, (x,)).sites[0]
    assert facts.scale == pytest.approx(0.3)
    with torch.no_grad():
        base = model(x)
    mka_compile.convert(model, mode="mka", config=CFG, example_inputs=(x,))
    assert model.mka.score_scale == pytest.approx(0.3) and model.mka.scale_checked  # checked by convert's forward
    with torch.no_grad():
        assert _rel(model(x), base) <= 1e-5
    zoo.randomize_mka(model)
    with torch.no_grad():
        live = model(x)
        model.mka.score_scale = 0.3 * 2  # MKA answers with the scale it holds, whatever the site's code runs
        assert _rel(model(x), live) >= 1e-3
        model.mka.score_scale = 0.3
        assert _rel(model(x), live) <= 1e-6


def test_unknown_or_unchecked_scale_is_refused_with_the_site_named() -> None:
    """No guessing: a site whose facts hold no scale, or whose softmax input is not q.k times its scale (q scaled
    before the product), fails with an error naming the site and FastMKA."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 32)
    model = _Spelled(scale=0.3, pre_scaled_q=True).eval()
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ConversionError, match=r"softmax input is not its scores q\.k times the scale 0\.3.*fastmka"):
        mka_compile.convert(model, mode="mka", config=CFG, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(model(x), before)
    model = _Spelled(scale=0.3).eval()
    mka_compile.convert(model, mode="mka", config=CFG, example_inputs=(x,))
    model.mka.score_scale = None
    with (
        torch.no_grad(),
        pytest.raises(RuntimeError, match=r"MKA mode at site '': the site's attention scale is unknown"),
    ):
        model(x)
