"""Attention sites: run the rules over a captured graph, derive each site's facts, explain the misses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import fx

from mka_compile.graph import ops
from mka_compile.graph.capture import Captured, module_path
from mka_compile.graph.pattern import Match
from mka_compile.graph.rules import Rule

from .common import provenance, same_sequence
from .scores import Scores, keep_masks, mask_facts, score_facts, score_transforms


@dataclass
class SiteFacts:
    """What one attention site is. ``name`` is the dotted path of the module that owns it."""

    name: str
    kind: str  # "self" | "cross"
    causal: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    has_kv_cache: bool
    rule: str
    scale: float
    mask: str  # "none" | "causal" | "padding" | "causal+padding" | "custom"
    q_proj: str
    k_proj: str
    v_proj: str
    rope: str | None
    qk_norm: str | None  # "per_head" | "full" | None
    cache: str | None  # "concat" | "index_copy" | "index_put" | "slice_assign" | None
    proj_bias: tuple[bool, bool, bool]  # whether the q, k, v projections add a bias
    anchor: fx.Node = field(repr=False)
    match: Match = field(repr=False)
    # named score transforms besides the scale and the masks: "softcap=<cap>", "bias" (ALiBi / position bias),
    # "sinks", "score_scale" (a tensor scale), "clip_qkv", "query_temperature", "differential" (two maps)
    transforms: tuple[str, ...] = ()
    maps: int = 1  # attention maps per site (2: differential attention)
    window: int | None = None  # sliding-window width (mask "sliding_window")
    scores: Scores | None = field(default=None, repr=False)  # scale and masks as graph values, for rewrites


@dataclass
class Rejected:
    """A softmax that did not become a site, with the closest rule and its reason."""

    node: str
    module: str
    closest_rule: str | None
    reason: str
    attention_like: bool = False  # multiplied with values: an attention-like softmax the rules did not take


def _consumers(node: fx.Node, gm) -> list[fx.Node]:
    """Users of ``node``, looking through casts, copies and dropout."""
    out, todo, seen = [], list(node.users), set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        if ops.kind(u, gm) in ops.TRANSPARENT | {"slice", "view", "expand"}:
            todo.extend(u.users)
        else:
            out.append(u)
    return out


def _heads(node: fx.Node, batch: int | None, head_letter_index: int | None = None) -> int | None:
    s = ops.shape(node)
    if s is None:
        return None
    if head_letter_index is not None and len(s) > head_letter_index:
        return s[head_letter_index]
    if len(s) == 4:
        return s[1]
    if len(s) == 3 and batch:
        return s[0] // batch
    return None


def _facts(rule: Rule, m: Match, captured: Captured) -> SiteFacts:
    gm = m.gm
    out = m.captures["out"]
    pq, pk, pv = provenance(m, "q"), provenance(m, "k"), provenance(m, "v")
    q = m.captures["q"]
    q_shape = ops.shape(q) or ()
    d = q_shape[-1] if q_shape else 0
    src_shape = ops.shape(pq.source) if pq.source is not None else None
    batch = src_shape[0] if src_shape else None
    is_sdpa = ops.kind(out, gm) in ("sdpa", "mka_attention")
    head_idx = None
    if ops.kind(m.captures.get("scores", out), gm) == "einsum" and not is_sdpa:
        head_idx = _einsum_head_index(m)
    H = _heads(q, batch, head_idx) or 0
    k_node = m.captures["k"] if is_sdpa else m.captures["kt"]
    Hk = _heads(k_node, batch, head_idx) or 0
    Hkv = max(1, Hk // max(1, pk.n_rep)) if Hk else 0
    # scale
    scale = pq.scale * pk.scale
    if is_sdpa:
        s = out.args[10] if ops.kind(out, gm) == "mka_attention" else ops.arg(out, 6, "scale")
        scale *= float(s) if ops.scalar(s) is not None else d**-0.5
    transforms: tuple[str, ...] = ()
    if not is_sdpa:
        transforms, layer_scale = score_transforms(m, captured)
        scale *= layer_scale if layer_scale is not None else 1.0
        if "bias" in m.captures:
            scale *= float(ops.arg(m.captures["scores"], 4, "alpha", 1.0))
    # masks and causality
    if is_sdpa:
        tq, tk = (ops.shape(q) or (0, 0))[-2], (ops.shape(m.captures["k"]) or (0, 0))[-2]
    else:
        sc = ops.shape(m.captures["scores"]) or (0, 0)
        key_axis = m.facts.get("key_axis", len(sc) - 1)
        tk = sc[key_axis]
        tq = sc[key_axis - 1] if key_axis >= 1 else 0
    keeps, is_causal = keep_masks(m, captured)
    causal, mask, window = mask_facts(keeps, is_causal, tq, tk)
    for p in (pq, pk, pv):
        transforms += tuple(t for t in p.transforms if t not in transforms)
    norm = pq.norm_shape or pk.norm_shape
    qk_norm = None if norm is None else ("per_head" if norm[-1] == d and len(norm) >= 3 else "full")
    v_shape = ops.shape(m.captures.get("v"))
    if not is_sdpa and v_shape and v_shape[-1] != d:  # MLA: the values' head size differs from the queries'
        m.facts.setdefault("not_lowered", f"the values' head size {v_shape[-1]} is not the queries' {d}: kept")
    if "latent_kv" in transforms:
        m.facts.setdefault("not_lowered", "multi-head latent attention: kept")
    anchor = out if is_sdpa else m.captures["softmax"]
    name = module_path(anchor) or (pq.module.rsplit(".", 1)[0] if "." in pq.module else "")
    if _in_leaf_softmax(anchor) and "." in name:
        name = name.rsplit(".", 1)[0]  # the softmax is an nn.Softmax submodule: the site is its owner
    return SiteFacts(
        name=name,
        kind="self" if same_sequence(pq.source, pk.source, gm) else "cross",
        causal=causal,
        num_heads=H,
        num_kv_heads=Hkv,
        head_dim=d,
        has_kv_cache=bool(pk.cache or pv.cache),
        rule=rule.name,
        scale=scale,
        mask=mask,
        q_proj=pq.describe,
        k_proj=pk.describe,
        v_proj=pv.describe,
        rope=pq.rope or pk.rope,
        qk_norm=qk_norm,
        cache=pk.cache or pv.cache,
        proj_bias=(pq.bias, pk.bias, pv.bias),
        anchor=anchor,
        match=m,
        transforms=transforms,
        window=window,
        scores=None if ops.kind(out, gm) == "mka_attention" else score_facts(m, captured),
    )


def _in_leaf_softmax(node: fx.Node) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    cls = list(stack.values())[-1][1]
    return (getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1].strip("'>")) == "Softmax"


def _einsum_head_index(m: Match) -> int | None:
    eq = m.captures["scores"].args[0]
    a, rest = eq.split(",")
    b, out = rest.split("->")
    shared = [c for c in a if c in b and c in out]
    return a.index(shared[-1]) if len(shared) >= 2 else None


def find_sites(captured: Captured, rules: Sequence[Rule]) -> tuple[list[SiteFacts], list[Rejected]]:
    """All attention sites of ``captured`` and every other softmax with the reason it is not one."""
    gm = captured.gm
    sites: list[SiteFacts] = []
    claimed: set[fx.Node] = set()
    for rule in rules:
        for node in list(gm.graph.nodes):
            if ops.kind(node, gm) not in rule.anchor_kinds:
                continue
            ok, m = rule.match_at(node, gm)
            if not ok:
                continue
            core = m.captures.get("softmax", node)
            if core in claimed:
                continue
            claimed.add(core)
            sites.append(_facts(rule, m, captured))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites.sort(key=lambda f: order.get(f.anchor, 0))  # graph order, whichever rule found the site
    sites = _merge_maps(sites)
    rejected = [
        explain_softmax(n, gm, rules)
        for n in gm.graph.nodes
        if ops.kind(n, gm) in ("softmax", "sdpa") and n not in claimed
    ]
    return sites, rejected


def _scores_of_activations(node: fx.Node, gm, limit: int = 24) -> bool:
    """Does the softmax's input come from a product of two activations (``q @ k^T``-like), through elementwise
    score layers? A router's softmax reads a projection of the hidden states instead."""
    if ops.kind(node, gm) == "sdpa":
        return True
    layers = {"mul", "div", "add", "sub", "masked_fill", "where", "tanh", "cat", "clamp", "view", "unsqueeze"}

    def product_of_activations(x: fx.Node, k: str) -> bool:
        ins = ops.tensor_inputs(x)[-2:]
        return k in ("matmul", "einsum", "baddbmm") and len(ins) == 2 and not any(ops.is_parameter(i, gm) for i in ins)

    return ops.reaches_back(node.args[0], gm, product_of_activations, layers, limit)


def _merge_maps(sites: list[SiteFacts]) -> list[SiteFacts]:
    """Two attention maps of one module over the same q and k projections (differential attention:
    ``softmax_1 V - lambda softmax_2 V``) are one site with ``maps == 2``."""

    def base(name: str) -> str:
        return name.split("[", 1)[0]

    out: list[SiteFacts] = []
    for f in sites:
        key = (f.name, base(f.q_proj), base(f.k_proj), base(f.v_proj), f.kind)
        twin = next((o for o in out if (o.name, base(o.q_proj), base(o.k_proj), base(o.v_proj), o.kind) == key), None)
        if twin is None:
            out.append(f)
            continue
        twin.maps += 1
        for role in ("q_proj", "k_proj", "v_proj"):  # the maps read different parts: the site reads all of it
            if getattr(twin, role) != getattr(f, role):
                setattr(twin, role, base(getattr(f, role)))
        if "differential" not in twin.transforms:
            twin.transforms = (*twin.transforms, "differential")
    return out


def explain_softmax(node: fx.Node, gm: fx.GraphModule, rules: Sequence[Rule]) -> Rejected:
    """Why ``node`` (a softmax or SDPA call) is not a site: the rule that came closest and what refused."""
    products = [node] if ops.kind(node, gm) == "sdpa" else []
    products += [u for u in _consumers(node, gm) if ops.kind(u, gm) in ("matmul", "einsum")]
    if not products:
        return Rejected(
            node.name,
            module_path(node),
            None,
            "its output is not multiplied with values (a gating / router / classifier softmax)",
        )
    attention_like = _scores_of_activations(node, gm)
    best: tuple[int, str | None, str] = (-1, None, "")
    for u in products:
        for rule in rules:
            if ops.kind(u, gm) not in rule.anchor_kinds:
                continue
            ok, m = rule.match_at(u, gm)
            if ok:
                return Rejected(node.name, module_path(node), rule.name, "matched (claimed by another site)", False)
            score = m.progress + (100 if "softmax" in m.captures else 0)
            if score > best[0]:
                best = (score, rule.name, m.reason or "no match")
    return Rejected(node.name, module_path(node), best[1], best[2], attention_like)
