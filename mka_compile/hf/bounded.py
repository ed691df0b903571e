"""Bounded memory in a Hugging Face cache: the converted sites' layers of a ``transformers`` ``Cache`` become
:class:`BoundedLayer` s (transformers' cache-layer interface), which keep a :class:`~mka_compile.bounded.BoundedStore`
instead of every key and value.

The model keeps calling ``cache.update(k, v, layer_idx)``: the layer counts the positions and hands the call's own keys
and values to the attention, which the converted site answers (``mka_compile.hf.attention``) by storing them in the
layer's store and attending to the bounded set. The layer tells the mask builder that keys are this call's tokens only
(``get_mask_sizes``), so no mask grows with the context either. Beam reorders, batch edits, crop and reset act on the
store; the rest of the MKA state (session EMA, chunk summaries) follows the cache as before (``mka_compile.hf.cache``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from mka_compile.bounded import BoundedStore, attend
from mka_compile.memory import group_mean


class BoundedLayer(CacheLayerMixin):
    """One converted layer's cache in bounded mode (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.store: BoundedStore | None = None
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

    def reset(self) -> None:
        self.store = None
        self.positions = 0
        self.keys = self.values = None
        self.is_initialized = False

    def _batch(self, fn) -> None:
        if self.store is not None:
            self.store.map_batch(fn)
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
        if self.store is not None:
            self.store.crop(remove)
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
    (rotated, as it attends to them, ``[B, H|Hkv, T, d]``) -> ``[B, T, H, d]``; the keys are kept in the cache's
    :class:`BoundedLayer` (a fresh store without a cache)."""
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
    store = None if layer is None else layer.store
    if store is None or store.n.shape[0] != B:
        store = BoundedStore.empty(B, Hkv, d, key, cfg)
        if layer is not None:
            layer.store = store
    q_r = None  # the recall query of chunk_keys="mean"; the bounds recall turns the queries back itself
    if cfg.exact_recall > 0 and cfg.chunk_keys == "mean":
        q_r = group_mean(call.q.view(B, T, Hkv, H // Hkv, d)).transpose(1, 2).float()  # (B, Hkv, T, d)
    out = attend(
        store, query, key, value, call.valid, q_r, call.state.summ_k if cfg.uses_longterm else None, cfg,
        mem.rope_freqs, mem.rope_interleaved, mem.trained_length, float(scaling),
    )  # fmt: skip
    call.attended = True
    return out.transpose(1, 2).contiguous()
