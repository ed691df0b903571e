"""``memory_report(cache)``: what a transformers cache holds on the model's device and in host memory, bounded
(:mod:`mka_compile.bounded`) or not."""

from __future__ import annotations

from dataclasses import fields

import torch

from mka_compile.bounded_store import BoundedStore


def _bytes(obj, seen: set[int]) -> int:
    """Bytes of the tensors in ``obj`` (tensors, lists, tuples, dicts, dataclasses), each storage counted once."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes() if obj.numel() else 0
    if isinstance(obj, (list, tuple)):
        return sum(_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_bytes(getattr(obj, f.name), seen) for f in fields(obj))
    return 0


def memory_report(cache) -> dict[str, int]:
    """What ``cache`` (a transformers ``Cache``, converted or not) holds: ``resident_bytes`` on the model's device
    (bounded layers: sinks and recent tokens, a memory bank's recall keys; other layers: every key and value; the MKA
    state: session EMA, chunk summaries, the crop history), ``offloaded_bytes`` (bounded layers' chunk stores and
    memory bank tokens, in host memory) and ``tokens``
    (the most real tokens a layer holds)."""
    from mka_compile.hf import cache as hf_cache

    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise ValueError(f"memory_report takes a transformers Cache (with .layers); got {type(cache).__name__}")
    resident = offloaded = tokens = 0
    seen: set[int] = set()
    for layer in layers:
        stores = [s for s in getattr(layer, "stores", ()) if isinstance(s, BoundedStore)]
        for store in stores:  # one per full-length level (MKA mode: local and session)
            r, o = store.nbytes()
            resident, offloaded = resident + r, offloaded + o
            tokens = max(tokens, int(store.n.max()) if store.n.numel() else 0)
        bank = getattr(layer, "bank", None)
        if bank is not None and id(bank) not in seen:  # an external memory bank the layer recalls from
            seen.add(id(bank))
            r, o = bank.nbytes()
            resident, offloaded = resident + r, offloaded + o
        if not stores:
            resident += _bytes([getattr(layer, "keys", None), getattr(layer, "values", None)], seen)
            tokens = max(tokens, int(layer.get_seq_length()) if hasattr(layer, "get_seq_length") else 0)
    resident += _bytes(getattr(cache, hf_cache.STATES_ATTR, None) or {}, seen)
    return {"resident_bytes": int(resident), "offloaded_bytes": int(offloaded), "tokens": int(tokens)}
