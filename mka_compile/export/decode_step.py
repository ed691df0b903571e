"""The decode-step wrapper: one call of a (converted) Hugging Face causal LM with its whole cache as tensors.

``DecodeStep(model)(input_ids, attention_mask, *past, *state) -> (logits, *present, *new_state)``:

- ``input_ids: [B, T]`` new tokens (T = 1 to decode, or a whole prompt with an empty past);
- ``attention_mask: [B, P + T]`` (1 = real token, 0 = padding; left padding like ``generate``), positions
  follow it as in ``generate`` (``cumsum - 1``);
- ``past``: per layer ``key, value: [B, Hkv, P, d]`` (the model's KV cache: for FastMKA the routed keys);
- ``state``: per converted site the MKA state (:data:`STATE_FIELDS`, plus :data:`MKA_FIELDS` in MKA mode):
  ``n_seen: [B]`` int64, ``ema_k, ema_v, part_k, part_v: [B, Hkv, d]``, ``summ_k, summ_v: [B, Hkv, N, d]``
  (N = ``max_len // chunk_size`` fixed slots), and MKA mode's cache of the rotated EMA keys/values
  ``kv_k, kv_v: [B, Hkv, P, d]``; the outputs are the same tensors updated (``present`` and ``kv_*`` grown
  by T positions).

Bounded memory (``MKAConfig(window=...)``, FastMKA, every layer converted): no ``past``; each site's state adds its
fixed-size store (:data:`mka_compile.bounded_fixed.FIELDS`: ``count, sink_k, sink_v, ring_k, ring_v, chunk_k,
chunk_v, bounds``), and every call takes one token per row (T = 1; a prompt is fed token by token). The chunk store
and the chunks' recall keys (``chunk_k, chunk_v, bounds``, ``max_len // C`` chunks) are inputs only: a step returns
the chunk it completed and its recall key (``chunk_done.{j}.done_k, done_v, done_bounds, done_at``; ``done_at =
-1``: none) and the driver writes them into the store it keeps (:class:`~mka_compile.export.OnnxDecoder` does), so
no step copies the store.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mka_compile.bounded_fixed import DONE_FIELDS, STORE_FIELDS, FixedStore
from mka_compile.bounded_fixed import FIELDS as FIXED_FIELDS
from mka_compile.hf.compat import cache_kwargs, returned_cache
from mka_compile.layers.cache import MKALayerState
from mka_compile.sites.memory import SiteMemory

STATE_FIELDS = ("n_seen", "ema_k", "ema_v", "part_k", "part_v", "summ_k", "summ_v")
MKA_FIELDS = ("kv_k", "kv_v")


def site_fields(mem: SiteMemory) -> tuple[str, ...]:
    return STATE_FIELDS + (MKA_FIELDS if mem.mode == "mka" else ()) + (FIXED_FIELDS if mem.config.bounded else ())


def is_bounded(sites: dict[str, SiteMemory]) -> bool:
    return any(m.config.bounded for m in sites.values())


def fixed_store(mem: SiteMemory, cache: Any, batch: int, ref: torch.Tensor) -> FixedStore:
    """The site's bounded memory in fixed-size tensors: from the cache's store after a PyTorch prefill, or empty."""
    layer = cache.layers[mem.layer_idx] if cache is not None and len(cache.layers) > mem.layer_idx else None
    store = getattr(layer, "store", None)
    freqs, inter = mem.rope_freqs, mem.rope_interleaved
    if store is not None:
        return FixedStore.from_store(store, mem.fixed_slots, mem.config, freqs, inter)
    d, G = mem.head_dim, mem.num_kv_heads
    width = d + recall_width(d, freqs, inter)
    return FixedStore.empty(batch, G, d, width, mem.fixed_slots, mem.config, ref)


def recall_width(d: int, freqs, interleaved: bool) -> int:
    from mka_compile.bounded_recall import pair_norms

    return pair_norms(torch.zeros(d), freqs, interleaved).shape[-1]


def converted_sites(model: nn.Module) -> dict[str, SiteMemory]:
    """``{site name: SiteMemory}`` in module order."""
    return {name.removesuffix(".mka"): m for name, m in model.named_modules() if isinstance(m, SiteMemory)}


def generate_positions(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``position_ids: [B, T]`` as ``generate`` computes them from a (left-padded) mask."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, pos.shape[1] - new_tokens :]


def state_tensors(mem: SiteMemory, st: MKALayerState, slots: int) -> list[torch.Tensor]:
    """A site's state as the step model's tensors, the summary buffer padded (or cut) to ``slots``."""
    summ = []
    for t in (st.summ_k, st.summ_v):
        have = t.shape[2]
        summ.append(t[:, :, :slots] if have >= slots else nn.functional.pad(t, (0, 0, 0, slots - have)))
    out = [st.n_seen, st.ema_k, st.ema_v, st.part_k, st.part_v, *summ]
    if mem.mode == "mka":
        out += list(st.kv)
    return out


class DecodeStep(nn.Module):
    """See the module docstring. ``model``: a Hugging Face causal LM (converted or not)."""

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.sites = converted_sites(model)

    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"]
        names += [f"past.{i}.{kv}" for i in range(self.past_layers) for kv in ("key", "value")]
        names += [f"state.{j}.{f}" for j, m in enumerate(self.sites.values()) for f in site_fields(m)]
        return names

    @property
    def past_layers(self) -> int:
        """Layers with a past K/V input: none with bounded memory (each site's fixed store is its state)."""
        return 0 if is_bounded(self.sites) else self.num_layers

    def output_names(self) -> list[str]:
        names = ["logits"]
        names += [f"present.{i}.{kv}" for i in range(self.past_layers) for kv in ("key", "value")]
        for j, m in enumerate(self.sites.values()):
            names += [f"new_state.{j}.{f}" for f in site_fields(m) if f not in STORE_FIELDS]
            names += [f"chunk_done.{j}.{f}" for f in (DONE_FIELDS if m.config.bounded else ())]
        return names

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor], state: list[torch.Tensor]
    ):
        from transformers import DynamicCache

        from mka_compile.hf.bounded import BoundedLayer

        L = self.num_layers
        states = list(state)
        bounded = is_bounded(self.sites)
        T = input_ids.shape[1]
        if bounded:
            cache = DynamicCache()
            cache.layers = [BoundedLayer() for _ in range(L)]
            for layer in cache.layers:
                layer.positions = attention_mask.shape[1] - T
        else:
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(L)], config=self.model.config)
        P = attention_mask.shape[1] - T
        for mem in self.sites.values():
            n = len(site_fields(mem))
            t, states = states[:n], states[n:]
            st = MKALayerState(*t[:7], fixed_slots=True)
            if mem.mode == "mka":
                st.kv, st.kv_valid = [t[7], t[8]], attention_mask[:, :P].bool()
            if bounded:
                cache.layers[mem.layer_idx].fixed = FixedStore(*t[-len(FIXED_FIELDS) :])
            mem.bind_state(cache, st)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=generate_positions(attention_mask, T),
            use_cache=True,
            **cache_kwargs(self.model, cache),
        )
        present = [] if bounded else [t for layer in cache.layers[:L] for t in (layer.keys, layer.values)]
        new_state = []
        for mem in self.sites.values():
            new_state += state_tensors(mem, mem.state_of(cache), mem.fixed_slots)
            if bounded:  # the chunk store is read, not returned: the chunk a step completes is, for the driver
                layer = cache.layers[mem.layer_idx]
                new_state += [t for f, t in zip(FIXED_FIELDS, layer.fixed.tensors()) if f not in STORE_FIELDS]
                new_state += list(layer.done)
        return (out.logits, *present, *new_state)


@torch.no_grad()
def example_step(model: nn.Module, input_ids: torch.Tensor) -> tuple[int, tuple[Any, ...]]:
    """``(num_layers, args)``: example arguments of :class:`DecodeStep` from ``input_ids: [B, T]`` (T >= 4): a
    PyTorch prefill of all but the last two tokens (bounded memory: the last one) gives the past and the state; the
    rest is the step."""
    sites = converted_sites(model)
    bounded = is_bounded(sites)
    P = input_ids.shape[1] - (1 if bounded else 2)  # the bounded step takes one token per row
    out = model(input_ids=input_ids[:, :P], use_cache=True)
    cache = returned_cache(out)
    layers = cache.layers
    past = [] if bounded else [t.clone() for layer in layers for t in (layer.keys, layer.values)]  # not views
    state = []
    for mem in sites.values():
        state += [t.clone() for t in state_tensors(mem, mem.state_of(cache), mem.fixed_slots)]
        if bounded:
            ref = out.logits
            state += [t.clone() for t in fixed_store(mem, cache, input_ids.shape[0], ref).tensors()]
    return len(layers), (input_ids[:, P:].clone(), torch.ones_like(input_ids), past, state)
