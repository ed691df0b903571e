from __future__ import annotations

import pytest
import torch
from naive_mka import naive_layer

from mka_compile import FastMKAAttention, MKAAttention, MKACache, MKAConfig

LAYERS = [FastMKAAttention, MKAAttention]
F64 = torch.float64


def _layer(cls, hidden=24, heads=4, kv=2, dtype=torch.float32, seed=0, gate=0.8, **cfg_kw):
    torch.manual_seed(seed)
    cfg = MKAConfig(**{"chunk_size": 4, "top_r": 3, **cfg_kw})
    bias = cfg_kw.pop("bias", False) if "bias" in cfg_kw else False
    layer = cls(hidden, heads, kv, config=cfg, bias=bias).to(dtype)
    with torch.no_grad():  # random router values: make the routing far from uniform and far from L1-only
        for p in layer.router.parameters():
            p.normal_(0, 0.7)
        layer.gate.fill_(gate)
    return layer


def _x(B=2, T=29, hidden=24, dtype=torch.float32, seed=1):
    return torch.randn(B, T, hidden, generator=torch.Generator().manual_seed(seed), dtype=dtype)


CONFIGS = [
    dict(),
    dict(router_per_head=True),
    dict(levels=("local", "session")),
    dict(levels=("local", "longterm")),
    dict(top_r=1, chunk_size=3, ema_beta=0.5),
]


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_naive_definition(cls, cfg) -> None:
    layer = _layer(cls, dtype=F64, **cfg)
    x = _x(T=17, dtype=F64)
    valid = torch.ones(2, 17, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    valid[0, 9] = False  # and a hole
    with torch.no_grad():
        got = layer(x, attention_mask=valid)
        want = naive_layer(layer, x, valid)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls", LAYERS)
def test_matches_naive_gqa_mqa_no_rope_bias(cls) -> None:
    torch.manual_seed(3)
    layer = cls(16, 4, 1, head_dim=6, config=MKAConfig(chunk_size=2, top_r=2), rope=False, bias=True).double()
    x = _x(T=11, hidden=16, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_layer(layer, x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls", LAYERS)
def test_memory_bank(cls) -> None:
    layer = _layer(cls, dtype=F64)
    x = _x(T=9, dtype=F64)
    bank_k = torch.randn(2, 2, 5, 6, dtype=F64)
    bank_v = torch.randn(2, 2, 5, 6, dtype=F64)
    bank_valid = torch.tensor([[True, True, False, True, False], [True] * 5])
    bank = (bank_k, bank_v, bank_valid)
    with torch.no_grad():
        got = layer(x, memory_bank=bank)
        torch.testing.assert_close(got, naive_layer(layer, x, bank=bank), rtol=1e-9, atol=1e-10)
        assert (got - layer(x)).abs().max() > 1e-6  # the bank is recalled from the first token on


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("splits", [[7] + [1] * 22, [3, 5, 1, 9, 2, 9], [1] * 29])
def test_decode_equals_prefill(cls, splits) -> None:
    layer = _layer(cls)
    x = _x()
    with torch.no_grad():
        full = layer(x)
        cache, outs, t = MKACache(), [], 0
        for n in splits:
            outs.append(layer(x[:, t : t + n], cache=cache))
            t += n
    assert t == x.shape[1]
    assert _rel(torch.cat(outs, 1), full) <= 1e-5
    assert cache.get_seq_length() == 29


@pytest.mark.parametrize("cls", LAYERS)
def test_left_padding_equals_each_sequence_alone(cls) -> None:
    layer = _layer(cls)
    lens = [29, 18, 5]
    x = _x(B=3)
    valid = torch.zeros(3, 29, dtype=torch.bool)
    for b, n in enumerate(lens):
        valid[b, 29 - n :] = True
    with torch.no_grad():
        cache = MKACache()
        batched = torch.cat(
            [
                layer(x[:, :20], cache=cache, attention_mask=valid[:, :20]),
                layer(x[:, 20:], cache=cache, attention_mask=valid[:, 20:]),
            ],
            1,
        )
        for b, n in enumerate(lens):
            alone = layer(x[b : b + 1, 29 - n :])
            assert _rel(batched[b : b + 1, 29 - n :], alone) <= 1e-5, b
        assert torch.isfinite(batched).all()


@pytest.mark.parametrize("cls", LAYERS)
def test_gate_zero_is_plain_attention_and_still_trains(cls) -> None:
    layer = _layer(cls, gate=0.0)
    x = _x()
    base = FastMKAAttention(24, 4, 2, config=MKAConfig(levels=("local", "session")))
    base.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("router")}, strict=False)
    with torch.no_grad():
        base.gate.zero_()
    q = layer.q_proj(x).view(2, 29, 4, 6).transpose(1, 2)
    k = layer.k_proj(x).view(2, 29, 2, 6).transpose(1, 2)
    v = layer.v_proj(x).view(2, 29, 2, 6).transpose(1, 2)
    pos = torch.arange(29).expand(2, 29)
    o = torch.nn.functional.scaled_dot_product_attention(
        layer.rotary(q, pos), layer.rotary(k, pos), v, is_causal=True, enable_gqa=True
    )
    plain = layer.o_proj(o.transpose(1, 2).reshape(2, 29, 24))
    out = layer(x)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    assert layer.gate.grad.abs() > 0


@pytest.mark.parametrize("cls", LAYERS)
def test_every_parameter_gets_a_gradient(cls) -> None:
    layer = _layer(cls)
    layer(_x()).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", LAYERS)
def test_bf16_runs_with_fp32_state(cls) -> None:
    layer = _layer(cls, dtype=torch.bfloat16)
    cache = MKACache()
    with torch.no_grad():
        y = layer(_x(dtype=torch.bfloat16), cache=cache)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    st = cache.layers[0]
    assert st.ema_k.dtype == st.summ_k.dtype == st.part_k.dtype == torch.float32


@pytest.mark.parametrize("cls", LAYERS)
def test_bad_input_names_the_argument(cls) -> None:
    layer = _layer(cls)
    x = _x()
    with pytest.raises(ValueError, match="x must have rank 3"):
        layer(x[0])
    with pytest.raises(ValueError, match="hidden_size"):
        layer(x[..., :10])
    with pytest.raises(ValueError, match="dtype"):
        layer(x.double())
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache"):
        layer(x, cache={})
    with pytest.raises(ValueError, match="memory_bank"):
        layer(x, memory_bank=(torch.zeros(2, 2, 3, 5), torch.zeros(2, 2, 3, 5)))
    cache = MKACache()
    layer(x, cache=cache)
    with pytest.raises(ValueError, match="batch"):
        layer(x[:1], cache=cache)


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        FastMKAAttention(24, 4, 3)
    with pytest.raises(ValueError, match="hidden_size"):
        MKAAttention(25, 4)
    with pytest.raises(ValueError, match="config"):
        MKAAttention(24, 4, config={"ema_beta": 0.5})


@pytest.mark.parametrize("cls", [FastMKAAttention, MKAAttention])
def test_reflecting_gate_keeps_the_mix_convex_and_trains(cls) -> None:
    """Routing weights stay a convex mix for any gate value; a negative gate reflects and still gets gradient."""
    from mka_compile.layers.attention import effective_gate, routing_weights

    layer = _layer(cls, gate=-0.5)
    q = torch.randn(2, 7, layer.num_heads * layer.head_dim)
    L = layer.config.num_levels
    for value in (-0.5, 0.0, 0.3, 2.0):
        with torch.no_grad():
            layer.gate.fill_(value)
        lam = routing_weights(layer.router, layer.gate, q, None, L, layer.groups)
        assert (lam >= 0).all() and (lam <= 1).all(), value
        torch.testing.assert_close(lam.sum(-1), torch.ones(lam.shape[:-1]))
    gates = torch.tensor([-0.5, 0.0, 0.3, 2.0], requires_grad=True)
    g = effective_gate(gates)
    torch.testing.assert_close(g, torch.tensor([0.5, 0.0, 0.3, 1.0]))
    g.sum().backward()
    torch.testing.assert_close(gates.grad, torch.tensor([-1.0, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("cls", [FastMKAAttention, MKAAttention])
def test_bare_layers_torch_export(cls) -> None:
    """A layer built from scratch exports with torch.export (no data-dependent branch when traced)."""
    torch.manual_seed(0)
    layer = cls(hidden_size=32, num_heads=4, num_kv_heads=2, config=MKAConfig(chunk_size=4, top_r=2)).eval()
    x = torch.randn(2, 11, 32)
    program = torch.export.export(layer, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), layer(x))


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_fused_cpu_path_equals_reference_ops(cls, cfg, monkeypatch) -> None:
    """float32 on the CPU runs the fused pass (kernels/fastmka_memory_cpu): same outputs with padding and a cache,
    and (FastMKA, no cache) the same gradients as the mka:: reference ops."""
    from mka_compile import kernels as K

    if not K.fastmka_memory_cpu.built():
        pytest.skip("the fused extension did not build here")
    layer, x = _layer(cls, **cfg), _x()
    mask = torch.ones(2, 29, dtype=torch.bool)
    mask[1, :4] = False

    def run():
        with torch.no_grad():
            full = layer(x, attention_mask=mask)
            cache = MKACache()
            steps = [layer(x[:, :9], cache=cache, attention_mask=mask[:, :9])]
            steps += [layer(x[:, t : t + 1], cache=cache, attention_mask=mask[:, t : t + 1]) for t in range(9, 29)]
        layer.zero_grad()
        (layer(x, attention_mask=mask) * torch.linspace(-1, 1, 24)).sum().backward()
        return full, torch.cat(steps, 1), [p.grad.clone() for p in layer.parameters()]

    fused = run()
    monkeypatch.setattr(K.fastmka_memory_cpu, "supports", lambda *a: False)
    ref = run()
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(fused[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
