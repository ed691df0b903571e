"""The MKA state inside a Hugging Face cache follows what ``generate`` does to the cache.

A converted site keeps its MKA state (session EMA, chunk state, MKA mode's session keys) in a dict on the cache object
it is called with (``SiteMemory.state_of``). ``generate`` edits a cache through its methods: beam search reorders it
(``reorder_cache``), assisted and speculative decoding remove rejected tokens (``crop``), other strategies repeat or
select batch rows. The first time a site sees a cache, the cache object becomes an instance of an *MKA cache class*: a
subclass of its own class (made once per class) whose methods do the same to the MKA states, then call the cache's
own. Nothing else changes: the cache keeps its class name, ``isinstance`` checks, layers and tensors.
"""

from __future__ import annotations

from typing import Any

import torch

STATES_ATTR = "_mka_states"  # {site key: MKALayerState}
_CLASSES: dict[type, type] = {}


class _MKAStateOps:
    """Mixed in before the cache's own class: each batch or length edit also applies to the MKA states."""

    def _mka_each(self) -> list:
        return list(getattr(self, STATES_ATTR, {}).values())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for st in self._mka_each():
            st.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for st in self._mka_each():
            st.map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for st in self._mka_each():
            st.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        """``max_length <= 0`` removes ``-max_length`` positions (transformers 5); ``> 0`` keeps that many (the
        legacy form). The MKA states are rewound exactly; when one cannot be, nothing is cropped and the error
        says why."""
        states = self._mka_each()
        if max_length <= 0:
            remove = -max_length
        else:
            remove = max(0, int(self.get_seq_length()) - max_length)
        for st in states:  # check first: a refused crop leaves the cache as it was
            if remove > st.rewindable():
                st.rewind(remove, st.config)  # raises the explanation
        super().crop(max_length)
        for st in states:
            st.rewind(remove, st.config)

    def reset(self) -> None:
        super().reset()
        getattr(self, STATES_ATTR, {}).clear()


def adopt(cache: Any) -> bool:
    """Make ``cache`` an instance of its MKA cache class (eager; see the module docstring). False for a cache that takes
    no attributes or whose class cannot be extended."""
    if isinstance(cache, _MKAStateOps):
        return True
    if not all(hasattr(cache, m) for m in ("reorder_cache", "crop")):
        return False
    base = type(cache)
    cls = _CLASSES.get(base)
    if cls is None:
        attrs = {"__module__": base.__module__, "__qualname__": base.__qualname__, "_mka_cache_base": base}
        cls = _CLASSES[base] = type(base.__name__, (_MKAStateOps, base), attrs)
    try:
        cache.__class__ = cls
        if getattr(cache, STATES_ATTR, None) is None:
            setattr(cache, STATES_ATTR, {})
    except (AttributeError, TypeError):
        return False
    return True


adopt_outside_graph = torch.compiler.disable(adopt)


def states(cache: Any) -> dict | None:
    """The MKA states of ``cache``, created (and the cache adopted) on first use in eager code. Traced code cannot
    change a class: a cache first seen there keeps a plain dict (the converted model's root hook adopts caches before
    its sites run, see ``sites.hooks.CacheAdopter``); None for a cache that takes no attributes."""
    store = getattr(cache, STATES_ATTR, None)
    if store is not None:
        return store
    if not torch.compiler.is_compiling() and adopt(cache):
        return getattr(cache, STATES_ATTR)
    try:
        store = {}
        setattr(cache, STATES_ATTR, store)
    except (AttributeError, TypeError):
        return None
    return store
