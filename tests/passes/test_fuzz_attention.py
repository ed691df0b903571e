"""Property-based: compose attention variants from the rule axes (and look-alikes); no miss, no false match.

Each example builds a one-layer module from independent choices (projection layout, head split, scale
placement, GQA expansion, product op, mask form, softmax upcast, dropout, capture), runs
``mka_compile.inspect`` and checks the site count and facts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mka_compile

B, T = 2, 6


class Generated(nn.Module):
    def __init__(self, v: dict) -> None:
        super().__init__()
        self.v = v
        H, Hkv, d = v["H"], v["Hkv"], v["d"]
        D = H * d
        if v["proj"] == "separate":
            self.q, self.k, self.vp = nn.Linear(D, H * d), nn.Linear(D, Hkv * d), nn.Linear(D, Hkv * d)
        else:
            self.qkv = nn.Linear(D, (H + 2 * Hkv) * d)
        if v["look"] == "learned_query":
            self.query = nn.Parameter(torch.randn(1, H, 1, d))
        self.o = nn.Linear(H * d, D)
        tri = torch.tril(torch.ones(T, T))
        self.register_buffer("tril", tri)
        self.register_buffer("causal_add", torch.zeros(T, T).masked_fill(tri == 0, float("-inf")))
        pad = torch.zeros(B, 1, 1, T)
        pad[1, ..., -2:] = float("-inf")
        self.register_buffer("pad_add", pad)

    def heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        d = self.v["d"]
        how = self.v["heads"]
        if how == "view_transpose":
            return t.view(B, T, n, d).transpose(1, 2)
        if how == "reshape_permute":
            return t.reshape(B, T, n, d).permute(0, 2, 1, 3)
        return t.unflatten(-1, (n, d)).transpose(1, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = self.v
        H, Hkv, d = v["H"], v["Hkv"], v["d"]
        if v["proj"] == "separate":
            q, k, val = self.q(x), self.k(x), self.vp(x)
        else:
            qkv = self.qkv(x)
            if v["proj"] == "split":
                q, k, val = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
            elif v["proj"] == "chunk" and H == Hkv:
                q, k, val = qkv.chunk(3, dim=-1)
            else:
                q, k, val = qkv[..., : H * d], qkv[..., H * d : (H + Hkv) * d], qkv[..., (H + Hkv) * d :]
        q, k, val = self.heads(q, H), self.heads(k, Hkv), self.heads(val, Hkv)
        if v["look"] == "learned_query":
            q = self.query.expand(B, H, T, d)
        if v["look"] == "foreign_values":
            val = self.heads(y[..., : Hkv * d], Hkv)
        s = d**-0.5
        if v["scale"] == "q":
            q = q * s
        elif v["scale"] == "k":
            k = k * s
        elif v["scale"] == "split_sqrt":
            q, k = q * math.sqrt(s), k * math.sqrt(s)
        if v["product"] == "sdpa":
            return self._sdpa(q, k, val, s)
        if Hkv != H:
            rep = H // Hkv
            if v["gqa"] == "expand":
                k = k[:, :, None].expand(B, Hkv, rep, T, d).reshape(B, H, T, d)
                val = val[:, :, None].expand(B, Hkv, rep, T, d).reshape(B, H, T, d)
            else:
                k, val = k.repeat_interleave(rep, dim=1), val.repeat_interleave(rep, dim=1)
        three = v["product"] in ("bmm", "baddbmm")
        if three:
            q, k, val = q.reshape(B * H, T, d), k.reshape(B * H, T, d), val.reshape(B * H, T, d)
        if v["product"] == "matmul":
            sc = q @ k.transpose(-2, -1)
        elif v["product"] == "bmm":
            sc = torch.bmm(q, k.transpose(1, 2))
        elif v["product"] == "einsum":
            sc = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:
            alpha = s if v["scale"] == "scores_mul" else 1.0
            sc = torch.baddbmm(torch.zeros(B * H, T, T), q, k.transpose(1, 2), beta=0.0, alpha=alpha)
        if v["scale"] == "scores_mul" and v["product"] != "baddbmm":
            sc = sc * s
        elif v["scale"] == "scores_div":
            sc = sc / math.sqrt(d)
        m = v["mask"]
        if m == "additive_causal":
            sc = sc + self.causal_add
        elif m == "masked_fill_tril":
            sc = sc.masked_fill(self.tril == 0, float("-inf"))
        elif m == "where_arange":
            i = torch.arange(T)
            sc = torch.where(i[None, :] <= i[:, None], sc, float("-inf"))
        elif m == "additive_padding" and not three:
            sc = sc + self.pad_add
        dim = -2 if v["look"] == "feature_softmax" else -1
        p = torch.softmax(sc.float(), dim=dim).to(q.dtype) if v["upcast"] else F.softmax(sc, dim=dim)
        if v["dropout"]:
            p = F.dropout(p, p=0.0, training=False)
        out = torch.bmm(p, val) if three else p @ val
        return self.o(out.reshape(B, H, T, d).transpose(1, 2).reshape(B, T, H * d))

    def _sdpa(self, q, k, val, s):
        v = self.v
        H, Hkv, d = v["H"], v["Hkv"], v["d"]
        gqa = False
        if Hkv != H:
            if v["gqa"] == "enable_gqa":
                gqa = True
            else:
                k, val = k.repeat_interleave(H // Hkv, dim=1), val.repeat_interleave(H // Hkv, dim=1)
        m = v["mask"]
        mask = {
            "masked_fill_tril": self.tril.bool(),
            "additive_causal": self.causal_add,
            "additive_padding": self.pad_add,
        }.get(m)
        scale = s if v["scale"] in ("scores_mul", "scores_div") else (1.0 if v["scale"] != "none" else None)
        out = F.scaled_dot_product_attention(
            q, k, val, attn_mask=mask, is_causal=m == "where_arange", scale=scale, enable_gqa=gqa
        )
        return self.o(out.transpose(1, 2).reshape(B, T, H * d))


class Router(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate, self.vals = nn.Linear(d, 4), nn.Linear(d, 4 * d)

    def forward(self, x, y):
        p = torch.softmax(self.gate(x), -1)  # (B, T, E)
        return torch.einsum("bte,bted->btd", p, self.vals(x).unflatten(-1, (4, -1)))


@st.composite
def variants(draw) -> dict:
    H = draw(st.sampled_from([2, 4]))
    v = {
        "H": H,
        "Hkv": draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0])),
        "d": draw(st.sampled_from([4, 8])),
        "proj": draw(st.sampled_from(["separate", "split", "chunk", "slice"])),
        "heads": draw(st.sampled_from(["view_transpose", "reshape_permute", "unflatten"])),
        "scale": draw(st.sampled_from(["scores_mul", "scores_div", "q", "k", "split_sqrt", "none"])),
        "product": draw(st.sampled_from(["matmul", "bmm", "einsum", "baddbmm", "sdpa"])),
        "mask": draw(
            st.sampled_from(["none", "additive_causal", "masked_fill_tril", "where_arange", "additive_padding"])
        ),
        "upcast": draw(st.booleans()),
        "dropout": draw(st.booleans()),
        "look": draw(st.sampled_from([None] * 6 + ["router", "feature_softmax", "learned_query", "foreign_values"])),
        "capture": draw(st.sampled_from(["export"] * 4 + ["dynamo"])),
    }
    v["gqa"] = draw(
        st.sampled_from(["expand", "repeat_interleave"] + (["enable_gqa"] if v["product"] == "sdpa" else []))
    )
    if v["look"] == "feature_softmax" and v["product"] == "sdpa":
        v["product"] = "matmul"
    return v


def _expected_scale(v: dict) -> float:
    s = v["d"] ** -0.5
    if v["product"] == "sdpa":
        return {"scores_mul": s, "scores_div": s, "none": s}.get(v["scale"], 1.0 * s)
    return 1.0 if v["scale"] == "none" else s


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(variants())
def test_composed_variants(v: dict) -> None:
    D = v["H"] * v["d"]
    model = (Router(D) if v["look"] == "router" else Generated(v)).eval()
    x, y = torch.randn(B, T, D), torch.randn(B, T, D)
    report = mka_compile.inspect(model, (x, y), capture=v["capture"])
    if v["look"] is not None:
        assert report.sites == [], v
        assert report.not_attention, v
        want = {
            "router": "",
            "feature_softmax": "not the key axis",
            "learned_query": "learned parameter",
            "foreign_values": "model input",
        }[v["look"]]
        assert any(want in r.reason for r in report.not_attention), (v, report.not_attention)
        return
    assert len(report.sites) == 1, (v, report.not_attention)
    s = report.sites[0]
    causal = v["mask"] in ("additive_causal", "masked_fill_tril", "where_arange")
    bmm_padding = v["mask"] == "additive_padding" and v["product"] in ("bmm", "baddbmm")
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (
        v["H"],
        v["Hkv"] if v["gqa"] == "enable_gqa" or v["product"] != "sdpa" else v["Hkv"],
        v["d"],
    ), (v, s)
    assert s.causal is causal, (v, s)
    assert s.kind == "self" and s.has_kv_cache is False, (v, s)
    assert s.mask == (
        "causal" if causal else "padding" if v["mask"] == "additive_padding" and not bmm_padding else "none"
    ), (v, s)
    assert abs(s.scale - _expected_scale(v)) < 1e-6, (v, s.scale)
