"""Trained FastMKA weights on original model code: rewrite a dynamo graph's k/v projections (``mka`` backend).

A deployment may keep the original model code and ship the trained MKA parameters (``<site>.mka.*`` keys of
a converted model's ``state_dict``). There are no modules to hook in a compiled graph, so the graph itself
is rewritten: each site's k and v projection outputs are replaced by the routed mix of the memory levels,
computed by a :class:`~mka_compile.sites.memory.SiteMemory` holding the checkpoint's router and gate (the same
object and code a converted model runs: ``mix_levels`` / ``mix_fused``), attached to the GraphModule as a
submodule. A full-sequence forward (scoring, training, prefill without earlier cached tokens) then equals
the converted model in eager mode. A site that reads a KV cache holding earlier calls is refused: the
session and long-term memory would have to ride in the cache between calls, which only a converted model
does (convert, ``load_state_dict``, then compile).
"""

from __future__ import annotations

import operator
from dataclasses import fields
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mka_compile.backend.lowering import _combine, _dim, symbolic_value
from mka_compile.config import MKAConfig
from mka_compile.conversion import _feature_map
from mka_compile.graph import ops
from mka_compile.graph.capture import Captured
from mka_compile.passes.attention import SiteFacts
from mka_compile.passes.attention.common import provenance
from mka_compile.report import Site
from mka_compile.sites.memory import SiteMemory

CONVERT_HINT = (
    "convert the model first (mka_compile.convert(model, mode=..., config=...)), load the checkpoint with "
    "model.load_state_dict(...), then torch.compile(model, backend='mka')"
)


class WeightsError(ValueError):
    """The trained MKA weights cannot be applied to this graph; the message says what to do."""


class GraphSite(nn.Module):
    """A site's trained memory run inside a compiled graph: full-sequence forward, fresh state.

    The router and gate (and a fused projection's feature maps) are extra graph inputs, in the order of
    :attr:`names`, swapped into the :class:`SiteMemory` with ``torch.func.functional_call``: AOTAutograd lifts
    only dynamo's own parameters, so the memory is kept out of this module's parameters."""

    def __init__(self, mem: SiteMemory, maps: dict[str, torch.Tensor] | None) -> None:
        super().__init__()
        params = [(f"mem.{n}", p.detach()) for n, p in mem.named_parameters()]
        self.num_params = len(params)
        self.fused = maps is not None
        params += [(f"map_{role}", m) for role, m in (maps or {}).items()]
        self.names = [n for n, _ in params]
        self.tensors = [t for _, t in params]
        object.__setattr__(self, "_run", _SiteRun(mem))  # not a submodule: no parameters of the graph

    def forward(self, additive, hide, keep, q, k, v, *tensors):
        params = dict(zip(self.names[: self.num_params], tensors[: self.num_params]))
        maps = dict(zip("qkv", tensors[self.num_params :])) if self.fused else None
        return torch.func.functional_call(self._run, params, (additive, hide, keep, q, k, v, maps))


class _SiteRun(nn.Module):
    def __init__(self, mem: SiteMemory) -> None:
        super().__init__()
        self.mem = mem

    def forward(self, additive, hide, keep, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, maps):
        """Separate projections: ``q [B, T, H*d]``, ``k, v [B, T, Hkv*d]`` -> mixed ``(k, v)``. Fused (``maps``:
        ``[heads, d]`` feature indices of q, k, v): ``q`` is the fused output ``[B, T, F]`` (``k``, ``v`` unused)
        -> the fused output with its k/v features mixed."""
        mem, mask = self.mem, _combine(additive, hide, keep)
        mem.begin(q if maps is not None else k, mask, None, None)
        try:
            if maps is not None:
                return mem.mix_fused(q, maps)
            B, T = k.shape[0], k.shape[1]
            heads = lambda t: t.reshape(B, T, mem.num_kv_heads, mem.head_dim).transpose(1, 2)  # noqa: E731
            mem._call.q = q
            kf, vf = mem.mix_levels(heads(k), heads(v))  # (B, Hkv, T, d)
            return kf.transpose(1, 2).reshape(k.shape), vf.transpose(1, 2).reshape(v.shape)
        finally:
            mem.end()


def split_weights(state: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """``{site: {param: tensor}}`` from the ``<site>.mka.<param>`` entries of a state_dict."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key.startswith("mka."):
            site, param = "", key[len("mka.") :]
        elif ".mka." in key:
            site, param = key.split(".mka.", 1)
        else:
            continue
        out.setdefault(site, {})[param] = value
    return out


def _site(f: SiteFacts) -> Site:
    shared = {x.name: getattr(f, x.name) for x in fields(Site) if x.name not in ("convertible", "reason", "status")}
    return Site(**shared, convertible=True, reason=None)


def match_site(name: str, weights: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """The checkpoint site for graph site ``name``: equal, or the checkpoint name ends with ``.name`` (a
    submodule was compiled), when exactly one does."""
    if name in weights:
        return name
    cands = [w for w in weights if w.endswith("." + name) or (name == "" and w == "")]
    return cands[0] if len(cands) == 1 else None


def _output(proj: fx.Node) -> fx.Node:
    """The projection's output as ``[B, T, F]``: a 2-D ``addmm`` (GPT-2's Conv1D) is followed by its reshape."""
    if _dim(proj) == 2 and len(proj.users) == 1:
        (u,) = proj.users
        if ops.kind(u, None) == "view" and _dim(u) == 3:
            return u
    return proj


def _hoist(before: fx.Node, node: fx.Node) -> None:
    """Move ``node`` and its ancestors that come after ``before`` to just before it (graph order kept)."""
    order = {n: i for i, n in enumerate(before.graph.nodes)}
    late, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in late or order[n] < order[before]:
            continue
        if n is before:
            raise WeightsError(f"cannot place the FastMKA mix before {before.name}: it depends on its own output")
        late.add(n)
        todo.extend(n.all_input_nodes)
    for n in sorted(late, key=order.__getitem__):
        before.prepend(n)


def _mask_nodes(f: SiteFacts, gm: fx.GraphModule) -> tuple[Any, Any, Any]:
    c = f.match.captures
    if ops.kind(c["out"], gm) == "sdpa":
        return ops.arg(c["out"], 3, "attn_mask"), None, None
    return c.get("mask_add"), c.get("mask_fill"), c.get("mask_where")


def apply_fastmka(
    captured: Captured,
    facts: list[SiteFacts],
    weights: dict[str, dict[str, torch.Tensor]],
    config: MKAConfig,
) -> tuple[dict[str, str], list[torch.Tensor]]:
    """Rewrite each site of ``captured.gm`` that has weights. Returns ``{site: what was done or why not}`` and
    the tensors of the graph inputs it added (after dynamo's: the caller passes them on every call)."""
    gm = captured.gm
    done: dict[str, str] = {}
    extra: list[torch.Tensor] = []
    for i, f in enumerate(facts):
        key = match_site(f.name, weights)
        if key is None:
            done[f.name] = "no '<site>.mka.*' weights for this site in the checkpoint: original attention"
            continue
        c = f.match.captures
        q_at, k_at = c["q"], c["k"] if "k" in c else c["kt"]
        tq = symbolic_value(q_at).shape[-2]
        tk = symbolic_value(k_at).shape[-1 if "kt" in c else -2]
        if f.has_kv_cache and not statically_known_true(tq == tk):
            raise WeightsError(
                f"site {f.name!r} reads a KV cache with earlier tokens: trained MKA weights on original model code "
                f"support full-sequence calls only (training, scoring, prefill). For cached decoding, {CONVERT_HINT}"
            )
        if f.kind != "self" or not f.causal:
            raise WeightsError(f"site {f.name!r} has trained MKA weights but is not causal self-attention here")
        pq, pk, pv = (provenance(f.match, r) for r in ("q", "k", "v"))
        projs = [p.projection for p in (pq, pk, pv)]
        if any(p is None for p in projs):
            raise WeightsError(f"site {f.name!r}: cannot find its q/k/v projections in the graph")
        site = _site(f)
        mem = SiteMemory(site, site.num_heads * site.head_dim, config, "fastmka")
        try:
            mem.load_state_dict(weights[key], strict=True)
        except RuntimeError as exc:
            raise WeightsError(
                f"the checkpoint's weights for site {key!r} do not fit {config}: {str(exc).splitlines()[-1].strip()}. "
                "Pass options={'config': ...} with the MKAConfig the model was converted with."
            ) from exc
        ref = ops.value(projs[1])
        mem.to(device=ref.device, dtype=ref.dtype)
        maps = None
        if projs[0] is projs[1] is projs[2]:
            maps = {}
            for role, heads in (("q", site.num_heads), ("k", site.num_kv_heads), ("v", site.num_kv_heads)):
                fmap = _feature_map(f, role, heads, site.head_dim)
                if isinstance(fmap, str):
                    raise WeightsError(f"site {f.name!r}: {fmap} (compile with dynamic=False for fused QKV weights)")
                maps[role] = fmap.to(ref.device)  # (heads, d) long
            outs = [_output(projs[0])]
        elif len({id(p) for p in projs}) == 3:
            outs = [_output(p) for p in projs]
        else:
            raise WeightsError(f"site {f.name!r}: q, k and v come from partly fused projections; not supported")
        target = f"mka_weights_{i}"
        site_mod = GraphSite(mem, maps)
        gm.add_submodule(target, site_mod)
        holders = list(gm.graph.find_nodes(op="placeholder"))
        params = []
        for name, t in zip(site_mod.names, site_mod.tensors):
            with gm.graph.inserting_after(holders[-1]):
                ph = gm.graph.placeholder(f"{target}_{name.replace('.', '_')}")
            ph._dynamo_source = None  # an input the backend adds (AOTAutograd accepts source-less inputs)
            ph.meta["mka_param"] = True
            holders.append(ph)
            params.append(ph)
            extra.append(t)
        replaced = outs if maps is not None else outs[1:]
        order = {n: j for j, n in enumerate(gm.graph.nodes)}
        first = min((u for o in replaced for u in o.users), key=order.__getitem__)
        args = (*_mask_nodes(f, gm), *(outs if maps is None else (outs[0], None, None)), *params)
        with gm.graph.inserting_before(first):
            mix = gm.graph.call_module(target, args)
        for a in mix.all_input_nodes:
            _hoist(mix, a)
        if maps is not None:
            mix.meta = outs[0].meta  # shared (see backend.lowering._replace)
            outs[0].replace_all_uses_with(mix, delete_user_cb=lambda u, mix=mix: u is not mix)
        else:
            for j, o in enumerate(outs[1:]):
                with gm.graph.inserting_after(mix):
                    new = gm.graph.call_function(operator.getitem, (mix, j))
                new.meta = o.meta
                o.replace_all_uses_with(new, delete_user_cb=lambda u, mix=mix: u is not mix)
        done[f.name] = "fastmka (trained weights)"
    gm.graph.lint()
    gm.recompile()
    return done, extra
