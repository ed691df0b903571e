"""Bounded memory in a Hugging Face cache: the converted sites' layers of a ``transformers`` ``Cache`` become
:class:`BoundedLayer` s (transformers' cache-layer interface), which keep a
:class:`~mka_compile.bounded_store.BoundedStore` instead of every key and value.

The model keeps calling ``cache.update(k, v, layer_idx)``: the layer counts the positions and hands the call's own keys
and values to the attention, which the converted site answers (``mka_compile.hf.attention``) by storing them in the
layer's store and attending to the bounded set. The layer tells the mask builder that keys are this call's tokens only
(``get_mask_sizes``), so no mask grows with the context either. Beam reorders, batch edits, crop and reset act on the
store; the rest of the MKA state (session EMA, chunk summaries) follows the cache as before (``mka_compile.hf.cache``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from mka_compile import bounded_recall as recall
from mka_compile.bounded import attend
from mka_compile.bounded_bank import BankLayer, MemoryBank
from mka_compile.bounded_fixed import FixedStore, attend_one
from mka_compile.bounded_levels import attend_levels, level_stores
from mka_compile.bounded_store import BoundedStore
from mka_compile.config import MKAConfig
from mka_compile.hf.compat import cache_kwargs
from mka_compile.memory import group_mean


class BoundedLayer(CacheLayerMixin):
    """One converted layer's cache in bounded mode (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, bank: BankLayer | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.stores: list[BoundedStore] = []  # one per full-length level (MKA mode: local, session)
        self.bank = bank  # an external memory bank's chunks for this layer (mka_compile.bounded_bank), never written
        self.fixed: FixedStore | None = None  # the fixed-size store of the exported decode step (bounded_fixed)
        self.done: tuple | None = None  # the chunk the fixed-size step completed (bounded_fixed.attend_one)
        self.positions = 0  # positions passed, padding included (what get_seq_length reports)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self._placeholder(key_states.shape[0], key_states.shape[1], key_states.shape[-1])
        self.is_initialized = True

    def _placeholder(self, batch: int, heads: int, head_dim: int) -> None:
        """Empty ``keys`` / ``values`` of the right batch and heads, for code that reads shapes off a layer."""
        self.keys = torch.zeros(batch, heads, 0, head_dim, dtype=self.dtype, device=self.device)
        self.values = self.keys

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.positions += key_states.shape[-2]
        return key_states, value_states  # the site's attention stores them (mka_compile.hf.attention)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.positions  # the mask covers this call's keys only

    def get_seq_length(self) -> int:
        return self.positions

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:  # the store keeps its chunks on the host already
        pass

    def prefetch(self) -> None:
        pass

    @property
    def store(self) -> BoundedStore | None:
        """The local level's store (the one that recalls chunks)."""
        return self.stores[0] if self.stores else None

    def reset(self) -> None:
        self.stores = []
        self.positions = 0
        self.keys = self.values = None
        self.is_initialized = False

    def _batch(self, fn) -> None:
        for store in self.stores:
            store.map_batch(fn)
        if self.is_initialized:
            self._placeholder(fn(self.keys).shape[0], self.keys.shape[1], self.keys.shape[-1])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch(lambda t: t[indices.to(t.device)])

    def crop(self, tokens_to_remove: int) -> None:
        """``tokens_to_remove <= 0`` removes that many positions (transformers 5); ``> 0`` keeps that many."""
        remove = -tokens_to_remove if tokens_to_remove <= 0 else max(0, self.positions - tokens_to_remove)
        if remove == 0:
            return
        for store in self.stores:
            store.crop(remove)
        self.positions -= remove


def layer_for(cache: Any, layer_idx: int | None, site: str) -> BoundedLayer:
    """The :class:`BoundedLayer` of ``cache`` at ``layer_idx``: an empty dynamic layer there (or none yet) becomes one;
    a layer that already holds keys (the cache was filled without bounded memory) is refused, as is a cache without
    transformers' layer list."""
    layers = getattr(cache, "layers", None)
    if layer_idx is None or not isinstance(layers, list):
        raise RuntimeError(
            f"bounded MKA memory at {site!r} keeps its keys in a transformers Cache's layers (layer_idx); this call "
            f"passed a {type(cache).__name__}, which has none: pass a transformers DynamicCache, or no cache"
        )
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    layer = layers[layer_idx]
    if isinstance(layer, BoundedLayer):
        return layer
    if type(layer) is not DynamicLayer or layer.get_seq_length() > 0:
        held = layer.get_seq_length() if hasattr(layer, "get_seq_length") else "?"
        raise RuntimeError(
            f"bounded MKA memory at {site!r}: the cache's layer {layer_idx} is a {type(layer).__name__} holding {held} "
            "positions; bounded memory needs an empty dynamic cache (start generation with a new DynamicCache, or none)"
        )
    layers[layer_idx] = BoundedLayer()
    return layers[layer_idx]


def site_attention(
    mem: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Bounded memory (:mod:`mka_compile.bounded`) answering a converted site's attention (``mem``: its
    :class:`~mka_compile.sites.memory.SiteMemory`, with a call open): the site's query, keys and values of this call
    (rotated, as it attends to them, ``[B, H|Hkv, T, d]``) -> ``[B, T, H, d]``. FastMKA attends to the routed keys
    (:func:`~mka_compile.bounded.attend`); MKA mode mixes its levels' bounded attentions
    (:func:`~mka_compile.bounded_levels.attend_levels`). The keys are kept in the cache's :class:`BoundedLayer` (fresh
    stores without a cache)."""
    call = mem._call
    cfg = mem.config
    B, H, T, d = query.shape
    Hkv = key.shape[1]
    if key.shape[2] != T:
        raise RuntimeError(
            f"bounded MKA memory at {mem.site_name!r}: the site attends over {key.shape[2]} keys for {T} queries; "
            "its cache is not the bounded one (pass a transformers DynamicCache, or none)"
        )
    layer = None if call.cache is None else layer_for(call.cache, mem.layer_idx, mem.site_name)
    if layer is not None and layer.fixed is not None:  # the exported decode step: one token per row, fixed shapes
        if T != 1 or mem.mode != "fastmka" or layer.bank is not None:
            raise RuntimeError(
                f"bounded MKA memory at {mem.site_name!r}: the fixed-size decode step takes one token per row, FastMKA "
                "mode, no memory bank"
            )
        args = (cfg, mem.rope_freqs, mem.rope_interleaved, mem.trained_length, float(scaling))
        out, layer.fixed, layer.done = attend_one(layer.fixed, query, key, value, call.valid[:, 0], *args)
        call.attended = True
        return out.transpose(1, 2).contiguous()
    ks, vs = [key], [value]
    if mem.mode == "mka" and cfg.uses_session:
        k2, v2 = mem.session_keys(key, value)
        ks.append(k2)
        vs.append(v2)
    stores = [] if layer is None else layer.stores
    if len(stores) != len(ks) or stores[0].n.shape[0] != B:
        stores = level_stores(len(ks), Hkv, d, key, cfg)
        if layer is not None:
            layer.stores = stores
    q_r = None  # the recall query of chunk_keys="mean"; the bounds recall turns the queries back itself
    if cfg.exact_recall > 0 and cfg.chunk_keys == "mean":
        q_r = group_mean(call.q.view(B, T, Hkv, H // Hkv, d)).transpose(1, 2).float()  # (B, Hkv, T, d)
    summ = call.state.summ_k if cfg.uses_longterm else None
    bank = None if layer is None else layer.bank
    if bank is not None and (cfg.exact_recall == 0 or cfg.chunk_keys != "bounds"):
        raise ValueError(
            f"a memory bank at {mem.site_name!r} is recalled by chunk bounds: convert with recall_chunks > 0 and "
            "chunk_keys='bounds'"
        )
    args = (cfg, mem.rope_freqs, mem.rope_interleaved, mem.trained_length, float(scaling))
    extra = dict(bank=bank, rot_pos=call.positions, site=mem.site_name)
    if mem.mode == "mka":
        l3 = None
        if cfg.uses_longterm:
            idx, found = call.recall
            q3 = call.q.view(B, T, H, d).transpose(1, 2)  # (B, H, T, d) un-rotated: summaries carry no position
            l3 = (q3, call.state.summ_k, call.state.summ_v, idx, found)
        out = attend_levels(stores, query, ks, vs, call.valid, call.lam, q_r, summ, l3, *args, **extra)
    else:
        out = attend(stores[0], query, key, value, call.valid, q_r, summ, *args, **extra)
    call.attended = True
    return out.transpose(1, 2).contiguous()


@torch.no_grad()
def memory_bank(model: torch.nn.Module, input_ids: torch.Tensor, block_size: int = 1024) -> MemoryBank:
    """Run the converted ``model`` (bounded memory, ``chunk_keys="bounds"``, ``recall_chunks > 0``) over
    ``input_ids: [1, N]`` (one sequence, no padding) in blocks of ``block_size`` tokens, and keep every completed
    chunk of every converted layer as a :class:`MemoryBank` (the last ``N % chunk_size`` tokens are left out)."""
    # the converted sites' memories (mka_compile.sites.memory.SiteMemory, not imported: it imports this module)
    sites = [
        m for m in model.modules() if isinstance(getattr(m, "config", None), MKAConfig) and hasattr(m, "rope_freqs")
    ]
    cfg = sites[0].config if sites else None
    if cfg is None or not cfg.bounded or cfg.exact_recall == 0 or cfg.chunk_keys != "bounds":
        raise ValueError(
            "memory_bank needs a model converted with bounded memory that recalls chunks by their bounds: "
            "convert(model, config=MKAConfig(window=..., recall_chunks=R > 0, chunk_keys='bounds'))"
        )
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if ids.shape[0] != 1:
        raise ValueError(f"memory_bank takes one sequence, input_ids [1, N]; got batch {ids.shape[0]}")
    if ids.shape[1] < cfg.chunk_size:
        raise ValueError(f"memory_bank needs at least chunk_size={cfg.chunk_size} tokens; got {ids.shape[1]}")
    was = model.training
    model.eval()
    cache = DynamicCache()
    try:
        for a in range(0, ids.shape[1], block_size):
            model(input_ids=ids[:, a : a + block_size], use_cache=True, **cache_kwargs(model, cache))
    finally:
        model.train(was)
    C = cfg.chunk_size
    layers = {}
    for mem in sites:
        store = getattr(cache.layers[mem.layer_idx], "store", None)
        if store is None:
            raise RuntimeError(f"memory_bank: the site {mem.site_name!r} kept no bounded store in the cache")
        recall.update_bounds(store, mem.rope_freqs, mem.rope_interleaved)
        M = int(store.n[0]) // C
        real = torch.arange(M * C, device=store.n.device)[None]
        k, v = store.tokens_at(real, store.base)  # (1, G, M*C, d)
        shape = (k.shape[1], M, C, k.shape[3])  # (G, M, C, d)
        starts = torch.arange(M, device=store.n.device) * C
        bounds = store.chunk_bounds[0, :, :M].clone()
        layers[mem.layer_idx] = BankLayer(k[0].reshape(shape).cpu(), v[0].reshape(shape).cpu(), starts, bounds)
    return MemoryBank(C, layers)


def bounded_cache(bank: MemoryBank | None = None) -> DynamicCache:
    """A transformers ``DynamicCache`` for a bounded model whose converted layers also recall from ``bank``
    (:mod:`mka_compile.bounded_bank`)."""
    cache = DynamicCache()
    if bank is not None:
        top = max(bank.layers, default=-1)
        cache.layers = [
            BoundedLayer(bank=bank.layers[i]) if i in bank.layers else DynamicLayer() for i in range(top + 1)
        ]
    return cache
