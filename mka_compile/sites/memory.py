"""What a converted site does at run time: ``SiteMemory`` (its new parameters, per-call context and hooks'
work) and the session RoPE for MKA mode; what it reads off a call is in :mod:`.inputs`, ``routing_stats`` and
``memory_parameters`` in :mod:`.stats`."""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mka_compile import kernels as K
from mka_compile.config import MKAConfig
from mka_compile.hf import cache as hf_cache
from mka_compile.layers.cache import MKALayerState
from mka_compile.memory import Router, memory_step
from mka_compile.report import Site
from mka_compile.rope_tables import calibrate as calibrate_rope
from mka_compile.rope_tables import derive as derive_rope
from mka_compile.rope_tables import rotate as rotate_rope
from mka_compile.sites.hooks import plain_linear
from mka_compile.sites.inputs import real_eager, valid_tokens

_SITE_KEYS = itertools.count()


@dataclass
class _Call:
    """What one forward call of a converted site needs between its hooks."""

    valid: torch.Tensor  # (B, T) bool
    state: MKALayerState
    rope: Any = None  # the site's (cos, sin) position embeddings, when the model passes them
    discarded: bool = False  # a fresh state nothing keeps (no cache): no count, the fused path may differentiate
    before: tuple | None = None  # the state's snapshot before this call, until the call is recorded for rewind
    q: torch.Tensor | None = None  # (B, T, H*d) query projection output
    lam: torch.Tensor | None = None  # (B, G, T, L)
    # separate k / v projections: the first hook computes both (on_kv); the other's result waits here for its hook
    inner: bool = False  # our own call of the other projection is running
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # "k" or "v" -> its (mixed) projection output
    kv_input: torch.Tensor | None = None  # the hidden states the pending projection was computed from (KVPre)
    # MKA mode: the levels attend reads
    k1: torch.Tensor | None = None  # (B, Hkv, T, d) the call's own keys, un-rotated
    ema_k: torch.Tensor | None = None  # (B, Hkv, T, d) session level keys
    ema_v: torch.Tensor | None = None
    recall: tuple[torch.Tensor, torch.Tensor] | None = None  # (idx, found): (B, Hkv, T, R) recalled summary slots
    attended: bool = False  # MKA mode (or bounded memory) answered the site's attention
    cache: Any = None  # the cache the call was given (bounded memory keeps its keys in that cache's layer)
    positions: torch.Tensor | None = None  # (B, T) or (1, T) the positions the model rotates the call at, when known
    # MKA mode, attention spelled out (attention_intercept): the scores product, and what checks the site's scale
    qk: tuple[torch.Tensor, torch.Tensor] | None = None  # (q, k) of the scores product
    diag: torch.Tensor | None = None  # (B, H, T) raw scores of each query's own key, until the scale is checked
    softmax_seen: bool = False


class SiteMemory(nn.Module):
    """The new parameters and hooks of one converted site (registered as ``<site>.mka``)."""

    def __init__(self, site: Site, q_features: int, config: MKAConfig, mode: str = "fastmka") -> None:
        super().__init__()
        self.config = config
        self.mode = mode
        self.rope = site.rope
        self.causal = site.causal  # False: a bidirectional site, converted with MKAConfig(causal=False)
        self.rope_tables: str | None = None if site.qk_norm is None else "cos_sin"  # MKA mode; see calibrate_rope
        self.num_heads, self.num_kv_heads, self.head_dim = site.num_heads, site.num_kv_heads, site.head_dim
        self.groups = self.num_kv_heads if config.router_per_head else 1
        hidden = config.router_hidden or max(1, q_features // 2)
        self.router = Router(q_features, hidden, self.groups * config.num_levels)
        self.gate = nn.Parameter(torch.full((1,), config.initial_gate(converting=True)))
        self.recall_scale = config.recall_scale or site.head_dim**-0.5
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # caches that take no attributes
        self._state_key = f"site{next(_SITE_KEYS)}"  # this site's entry in a cache's MKA states
        self._local = threading.local()  # the open call of each thread (see _call)
        self.hooked: list[nn.Module] = []  # the modules our hooks sit on (mka_compile.sites.hooks)
        self._stats: list[tuple[torch.Tensor, float]] | None = None  # set while routing_stats() records
        self.intercept = None  # MKA mode for attention computed inline: an AttentionToMKA mode (sites.hooks)
        self.kv_layout: str | None = None  # how the inline attention repeats its kv heads (attention_intercept)
        # MKA mode, attention spelled out (attention_intercept): the scale of q.k, from the site facts (None: unknown),
        # checked against the site's softmax input on its first eager call
        self.score_scale: float | None = _known_scale(site)
        self.scale_checked = False
        self.position_arg: str | None = None  # a site with its own KV cache: the forward argument giving its position
        self._held: MKALayerState | None = None  # that site's memory (see held_state)
        self.fixed_slots = 0  # > 0: states made here preallocate that many summary slots (set by export)
        self._zeros: dict[tuple, MKALayerState] = {}  # fresh zero states by shape: _zero_state
        # bounded memory (MKAConfig(window=...)), set by convert: the site's cache layer, RoPE and trained length
        self.layer_idx: int | None = None
        self.register_buffer("rope_freqs", None, persistent=False)  # (rot/2,) float32: moves keys (bounded)
        self.rope_interleaved = site.rope is not None and ("interleaved" in site.rope or site.rope == "complex")
        self.trained_length = 0  # bounded: keys move from this position on (0: never)
        self.site_name = site.name

    # -- per-call context -----------------------------------------------------------------------------
    @property
    def _call(self) -> _Call | None:
        """The call of this site open in this thread (between its pre- and post-hook), or None. Held per thread, so
        threads that call one converted model concurrently each have their own; while torch.compile / export traces
        (one thread, and the compiled code keeps no Python state), a plain attribute."""
        if torch.compiler.is_compiling():
            return self.__dict__.get("_traced_call")
        return getattr(self._local, "call", None)

    @_call.setter
    def _call(self, call: _Call | None) -> None:
        if torch.compiler.is_compiling():
            self.__dict__["_traced_call"] = call
        else:
            self._local.call = call

    def __getstate__(self) -> dict:
        """Pickle / deepcopy: the module's parameters and settings, not what belongs to calls or caches (open calls,
        states of caches held weakly, shared zero states)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        drop = ("_local", "_traced_call", "_states", "_zeros")
        return {k: v for k, v in state.items() if k not in drop}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._local = threading.local()
        self._states = weakref.WeakKeyDictionary()
        self._zeros = {}

    def state_for(self, cache: Any, batch: int, ref: torch.Tensor) -> MKALayerState:
        sdt = torch.float64 if ref.dtype == torch.float64 else torch.float32
        fresh = lambda: MKALayerState.empty(  # noqa: E731
            batch, self.num_kv_heads, self.head_dim, ref.device, sdt, self.fixed_slots
        )
        if cache is None:
            if real_eager(ref) and not self.fixed_slots:
                return self._zero_state(batch, ref.device, sdt, ref.shape[1] if ref.dim() > 1 else 0)
            return fresh()
        st = self.state_of(cache)
        if st is None or st.n_seen.shape[0] != batch:
            st = fresh()
            st.config = self.config
            self.bind_state(cache, st)
        return st

    def _zero_state(self, batch: int, device: torch.device, dtype: torch.dtype, tokens: int) -> MKALayerState:
        """A fresh state whose zero tensors are shared by the calls of this shape (every op replaces a state tensor
        instead of writing into it, so sharing is safe and saves creating them on each call), with summary slots
        for the chunks ``tokens`` tokens complete (so ``reserve`` pads nothing)."""
        slots = tokens // self.config.chunk_size if self.config.uses_longterm else 0
        key = (batch, device, dtype, slots)
        zero = self._zeros.get(key)
        if zero is None:
            with torch.no_grad():
                zero = MKALayerState.empty(batch, self.num_kv_heads, self.head_dim, device, dtype, slots)
            zero = self._zeros[key] = dataclasses.replace(zero, fixed_slots=False)
        return dataclasses.replace(zero, kv=[])

    def _store(self, cache: Any) -> dict[str, MKALayerState] | weakref.WeakKeyDictionary:
        """Where the states of ``cache`` live: a dict on the cache object itself (the state dies with the cache, follows
        its beam reorders and crops: :mod:`mka_compile.hf.cache`, and torch.compile sees the same structure for every
        new cache), else (a cache that takes no attributes) this site's weak dictionary keyed by the cache."""
        store = hf_cache.states(cache)
        return self._states if store is None else store

    def bind_state(self, cache: Any, state: MKALayerState) -> None:
        """Make ``state`` the MKA state of this site for calls with ``cache`` (decode-step export)."""
        store = self._store(cache)
        store[cache if store is self._states else self._state_key] = state

    def state_of(self, cache: Any) -> MKALayerState | None:
        """The MKA state this site keeps for ``cache`` (None before the first call with it)."""
        store = self._store(cache)
        return store.get(cache if store is self._states else self._state_key)

    def held_state(self, start: int, batch: int, ref: torch.Tensor) -> MKALayerState:
        """The state of a site that keeps its own KV cache (a buffer written at ``start``, Meta-Llama style): the
        memory lives here, a call at position 0 starts a new sequence, a call at the end of the memory continues."""
        st = self._held
        if start == 0 or st is None or st.n_seen.shape[0] != batch:
            if start != 0:
                raise RuntimeError(
                    f"MKA memory: the site was called at position {start} with no memory for a batch of {batch}; "
                    "start each sequence at position 0"
                )
            st = self._held = self.state_for(None, batch, ref)
        elif start != int(st.n_seen.max()):
            raise RuntimeError(
                f"MKA memory: the site was called at position {start}, but its memory holds {int(st.n_seen.max())} "
                "tokens; continue the sequence where it stopped, or restart it at position 0"
            )
        return st

    def begin(
        self,
        hidden: torch.Tensor,
        mask: Any,
        cache: Any,
        cache_position: Any,
        rope: Any = None,
        start: Any = None,
        position_ids: Any = None,
    ) -> None:
        """Open a call. ``start``: the position a site with its own KV cache writes at (None: ``cache`` decides);
        ``position_ids``: the positions the model passes the site (None: ``cache_position``, as transformers
        defaults)."""
        B, T = hidden.shape[0], hidden.shape[1]
        state = self.state_for(cache, B, hidden) if start is None else self.held_state(start, B, hidden)
        valid = valid_tokens(mask, B, T, cache_position, hidden.device)
        call = self._call = _Call(valid=valid, state=state, rope=rope, discarded=cache is None and start is None)
        call.cache = cache
        pos = position_ids if isinstance(position_ids, torch.Tensor) else cache_position
        if isinstance(pos, torch.Tensor) and pos.shape[-1] == T:
            call.positions = pos.reshape(-1, T)
        if self.config.bounded and cache is not None:  # before the site's cache.update: its layer keeps bounded keys
            from mka_compile.hf import bounded as hf_bounded

            hf_bounded.layer_for(cache, self.layer_idx, self.site_name)
        if cache is not None and self.causal and not state.fixed_slots:  # a cache's crop may rewind this call
            if torch.compiler.is_compiling():
                state.steps = None  # compiled calls keep no history: crop refuses (clear error), no wrong rewind
            else:
                call.before = state.snapshot()

    def end(self) -> None:
        call, self._call = self._call, None
        if call is not None and not call.discarded:  # a discarded state needs no count
            call.state.n_seen = call.state.n_seen + call.valid.sum(-1)

    # -- the routed mix ---------------------------------------------------------------------------------
    def on_kv(self, which: str, out: torch.Tensor, q_proj: nn.Module, other: nn.Module, hidden: torch.Tensor):
        """Separate projections: the first of the k/v hooks to fire runs the other projection itself (once, as
        an inner call), mixes keys and values together, and leaves the other's result for its hook."""
        call = self._call
        if call is None or call.inner:  # outside the site's forward, or our own projection call
            return out
        if which in call.pending:  # computed when the other projection's hook fired
            call.kv_input = None
            return call.pending.pop(which)
        if call.q is None:
            call.q = q_proj(hidden)
        if plain_linear(other, hidden):  # no module call needed (its only hooks are ours, idle for this call)
            other_out = torch.nn.functional.linear(hidden, other.weight, other.bias)
        else:
            call.inner = True
            try:
                other_out = other(hidden)
            finally:
                call.inner = False
        k_out, v_out = (out, other_out) if which == "k" else (other_out, out)
        B, T = out.shape[0], out.shape[1]
        heads = lambda t: t.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        kf, vf = self.mix_levels(heads(k_out), heads(v_out))  # (B, Hkv, T, d)
        if self.mode == "fastmka":
            k_out, v_out = kf.transpose(1, 2).reshape(k_out.shape), vf.transpose(1, 2).reshape(v_out.shape)
        call.pending["v" if which == "k" else "k"] = v_out if which == "k" else k_out
        call.kv_input = hidden  # the other projection's call on this input can skip its work (KVPre)
        return k_out if which == "k" else v_out

    def mix_fused(self, out: torch.Tensor, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """A fused QKV projection's output ``[B, T, F]`` with its k and v features replaced by their mixes.

        ``maps[x]: [heads, d]`` are the output features that form q, k and v (read off the graph)."""
        call = self._call
        if call is None:
            return out
        B, T = out.shape[0], out.shape[1]
        call.q = out[..., maps["q"]].reshape(B, T, -1)  # (B, T, H*d)
        kf, vf = self.mix_levels(out[..., maps["k"]].transpose(1, 2), out[..., maps["v"]].transpose(1, 2))
        if self.mode == "mka":  # MKA mode only records the levels; attention reads them
            return out
        new = out.clone()
        new[..., maps["k"]] = kf.transpose(1, 2)
        new[..., maps["v"]] = vf.transpose(1, 2)
        return new

    def mix_levels(self, k1: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k1, v1: [B, Hkv, T, d]`` (this call's keys and values) -> their routed mixes (FastMKA); MKA mode records
        the levels in the call for its attention and returns ``k1, v1``."""
        call = self._call
        if call.before is not None:  # keep this call's keys for a rewind
            call.state.record(call.before, k1, v1, call.valid)
            call.before = None
        step = memory_step(
            self.mode, self.config, call.state, k1, v1, call.q, self.router, self.gate, call.valid,
            causal=self.causal, scale=self.recall_scale, groups=self.groups, discarded=call.discarded,
        )  # fmt: skip
        call.lam = step.lam
        if self._stats is not None:  # routing_stats() is recording
            w = call.valid[:, None, :, None].to(call.lam.dtype)  # (B, 1, T, 1): real tokens only
            self._stats.append(((call.lam.detach() * w).sum((0, 1, 2)), float(w.sum()) * call.lam.shape[1]))
        if self.mode == "fastmka":
            return step.ks[0], step.vs[0]
        if self.config.uses_session:
            call.ema_k, call.ema_v = step.ks[1], step.vs[1]  # the session level, rotated by session_keys
        if step.recall is not None:
            call.recall = step.recall[2:]  # (idx, found) into the chunk summaries
        call.k1 = k1  # to check how the site rotates its keys (calibrate_rope, derive_rope)
        return k1, v1

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """MKA mode: ``sum_l lam_l Attn(q, K_l, V_l)`` over the site's own (rotated, cached) keys, the session
        EMA keys (rotated at each position, cached here) and the recalled summaries. Returns ``[B, T, H, d]``."""
        call = self._call
        cfg, st = self.config, call.state
        B, H, T, d = query.shape
        ks, vs = [key], [value]
        valid = call.valid
        st.kv_valid = valid if st.kv_valid is None else torch.cat([st.kv_valid, valid], 1)
        if cfg.uses_session:
            k2, v2 = self.session_keys(key[:, :, -T:], value)
            st.kv = [torch.cat([a, b], 2) for a, b in zip(st.kv, (k2, v2))] if st.kv else [k2, v2]
            ks.append(st.kv[0])
            vs.append(st.kv[1])
        if st.kv_valid.shape[1] != key.shape[2]:
            raise RuntimeError(
                f"MKA mode keeps its own session cache of {st.kv_valid.shape[1]} positions but the model's cache "
                f"has {key.shape[2]}; MKA conversion supports dynamic caches (use FastMKA for static caches)"
            )
        kw = {}
        if cfg.uses_longterm:
            idx, found = call.recall
            q3 = call.q.view(B, T, H, d).transpose(1, 2)  # (B, H, T, d) un-rotated
            kw = dict(q3=q3.to(query.dtype), mem_k=st.summ_k, mem_v=st.summ_v, idx3=idx, found3=found)
        out = K.mka_attention(
            query, ks, vs, call.lam, kv_valid=st.kv_valid, scale=float(scaling), causal=self.causal, **kw
        )
        call.attended = True
        return out.transpose(1, 2).contiguous()  # (B, T, H, d)

    def session_keys(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MKA mode's session level for this call: the EMA keys rotated at the call's positions as the site rotates
        its own keys (``key: [B, Hkv, T, d]``, this call's), and the EMA values."""
        call = self._call
        tables, convention = call.rope, self.rope_tables
        if self.rope is not None and tables is None:  # a site that rotates inside: read the rotation off its keys
            tables, convention = derive_rope(call.k1, key, self.rope), "cos_sin"
        elif self.rope is not None and convention is None:  # first call: learn how the tables are given
            convention = self.rope_tables = calibrate_rope(call.k1, key, tables, self.rope)
        k2 = rotate_rope(call.ema_k, tables, self.rope, convention).to(key.dtype)  # (B, Hkv, T, d)
        return k2, call.ema_v.to(value.dtype)

    def remove_hooks(self) -> None:
        from mka_compile.sites import hooks as site_hooks

        site_hooks.remove(self)


def _known_scale(site: Site) -> float | None:
    """The constant that scales the site's scores ``q . k``, as its facts read it (the rules fold scale layers and
    scales on q or k), or None: a tensor scale (``score_scale`` transform) or no positive finite value."""
    scale = float(site.scale)
    if "score_scale" in site.transforms or not math.isfinite(scale) or scale <= 0:
        return None
    return scale
