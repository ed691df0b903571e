"""An external memory bank for bounded memory: the chunks of another sequence (a document, an earlier session) that
every query of a bounded cache may recall beside its own past.

    bank = mka_compile.memory_bank(model, document_ids)   # run the converted model over the document once
    bank.save("doc.safetensors"); bank = mka_compile.MemoryBank.load("doc.safetensors")
    cache = mka_compile.bounded_cache(bank)               # a DynamicCache whose bounded layers recall from it
    model.generate(question_ids, cache=cache)   # (``past_key_values=`` before transformers 5.24)

(``memory_bank`` and ``bounded_cache`` live with the cache layer, in :mod:`mka_compile.hf.bounded`.)

Per converted layer the bank keeps the document's completed chunks: their keys (rotated at their positions in the
document) and values in host memory, and their recall keys (``chunk_keys="bounds"``: centre and pair radii) on the
model's device. A query recalls its R best chunks among its own chunks before its window and the bank's, by the same
score (:mod:`mka_compile.bounded_recall`), and attends to a recalled bank chunk token by token, placed right before
its window: bank chunks first (in bank order), then its own recalled chunks (in chunk order; at their true
positions within the trained length), then the window. So a bank chunk is never farther from the query than
:meth:`~mka_compile.config.MKAConfig.bounded_span`. The bank is shared by every row of a batch and is never written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class BankLayer:
    """One converted layer's share of a :class:`MemoryBank`: ``M`` chunks of ``C`` tokens, ``G`` kv heads."""

    keys: torch.Tensor  # (G, M, C, d) in host memory, rotated at their positions in the source
    values: torch.Tensor  # (G, M, C, d)
    starts: torch.Tensor  # (M,) int64 on the model's device: each chunk's first position in the source
    bounds: torch.Tensor  # (G, M, d + P) float32 on the model's device: the chunks' recall keys
    index: list | None = None  # optional: one FAISS inner-product index per kv head over ``bounds`` (with_index)

    @property
    def chunks(self) -> int:
        return self.keys.shape[1]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best bank chunks of each query by its FAISS index: ``queries: [G, Q, d + P]`` -> ``(scores
        [G, Q, k] float32, ids [G, Q, k] int64; -1 where the index found fewer)`` on the queries' device."""
        import numpy as np

        k = min(k, self.chunks)
        scores, ids = [], []
        for g, index in enumerate(self.index):
            s, i = index.search(np.ascontiguousarray(queries[g].detach().float().cpu().numpy()), k)
            scores.append(torch.from_numpy(s))
            ids.append(torch.from_numpy(i))
        dev = queries.device
        return torch.stack(scores).to(dev), torch.stack(ids).to(dev)

    def nbytes(self) -> tuple[int, int]:
        """``(resident, offloaded)`` bytes: the recall keys and starts on the device, the tokens in host memory."""
        size = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return size(self.bounds, self.starts), size(self.keys, self.values)


@dataclass
class MemoryBank:
    """Chunks of a source sequence per converted layer (``layers[layer_idx]``), recalled by bounded caches that
    :func:`bounded_cache` makes; see the module docstring."""

    chunk_size: int
    layers: dict[int, BankLayer]

    @property
    def chunks(self) -> int:
        return min((b.chunks for b in self.layers.values()), default=0)

    def to(self, device: torch.device | str) -> MemoryBank:
        """The recall keys on ``device`` (the model's); the tokens stay in host memory (pinned for CUDA)."""
        device = torch.device(device)
        pin = device.type == "cuda"
        layers = {
            i: BankLayer(
                b.keys.pin_memory() if pin and not b.keys.is_pinned() else b.keys,
                b.values.pin_memory() if pin and not b.values.is_pinned() else b.values,
                b.starts.to(device),
                b.bounds.to(device),
            )
            for i, b in self.layers.items()
        }
        return MemoryBank(self.chunk_size, layers)

    def with_index(self, kind: str = "flat", nlist: int | None = None, nprobe: int = 8, hnsw_m: int = 32):
        """This bank with a FAISS index per layer and kv head over the chunks' recall keys (needs ``faiss-cpu``),
        for banks too large to score every chunk for every query: a query then scores its own chunks as before and
        takes the bank's best by the index. ``kind``: ``"flat"`` (exact: the same chunks as without an index),
        ``"ivf"`` (``nlist`` clusters, ``nprobe`` searched: approximate unless ``nprobe >= nlist``) or ``"hnsw"``
        (``hnsw_m`` links: approximate). The index is not saved with the bank: build it again after ``load``."""
        try:
            import faiss
        except ImportError:
            raise ImportError("MemoryBank.with_index needs FAISS: pip install faiss-cpu") from None
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"kind must be 'flat', 'ivf' or 'hnsw', got {kind!r}")
        layers = {}
        for i, b in self.layers.items():
            indexes = []
            for g in range(b.bounds.shape[0]):
                x = b.bounds[g].detach().float().cpu().contiguous().numpy()  # (M, d + P)
                width = x.shape[1]
                if kind == "flat":
                    index = faiss.IndexFlatIP(width)
                elif kind == "hnsw":
                    index = faiss.IndexHNSWFlat(width, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                else:
                    lists = nlist or max(1, int(len(x) ** 0.5))
                    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, lists, faiss.METRIC_INNER_PRODUCT)
                    index.train(x)
                    index.nprobe = nprobe
                index.add(x)
                indexes.append(index)
            layers[i] = BankLayer(b.keys, b.values, b.starts, b.bounds, indexes)
        return MemoryBank(self.chunk_size, layers)

    def save(self, path: str | Path) -> None:
        """One safetensors file (``MemoryBank.load`` reads it)."""
        from safetensors.torch import save_file

        tensors = {}
        for i, b in self.layers.items():
            for name in ("keys", "values", "starts", "bounds"):
                tensors[f"layer.{i}.{name}"] = getattr(b, name).detach().cpu().contiguous()
        save_file(tensors, str(path), metadata={"mka_compile.bank": json.dumps({"chunk_size": self.chunk_size})})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> MemoryBank:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("mka_compile.bank")
            if meta is None:
                raise ValueError(f"{path} is not a memory bank saved by MemoryBank.save (no 'mka_compile.bank' entry)")
            found: dict[int, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                _, i, name = key.split(".")
                found.setdefault(int(i), {})[name] = f.get_tensor(key)
        layers = {i: BankLayer(t["keys"], t["values"], t["starts"], t["bounds"]) for i, t in sorted(found.items())}
        return cls(int(json.loads(meta)["chunk_size"]), layers).to(device)

    @classmethod
    def cat(cls, banks: list[MemoryBank]) -> MemoryBank:
        """One bank holding the chunks of ``banks`` in order (e.g. several documents)."""
        if not banks or len({b.chunk_size for b in banks}) != 1 or len({tuple(b.layers) for b in banks}) != 1:
            raise ValueError("MemoryBank.cat takes one or more banks of the same model (same layers and chunk_size)")
        layers = {
            i: BankLayer(*(torch.cat([getattr(b.layers[i], n) for b in banks], dim) for n, dim in _CAT_DIMS))
            for i in banks[0].layers
        }
        return cls(banks[0].chunk_size, layers)


_CAT_DIMS = (("keys", 1), ("values", 1), ("starts", 0), ("bounds", 1))


def check_bank(bank: BankLayer, store: Any, width: int, site: str) -> None:
    """A bank layer must match the site's store (a :class:`~mka_compile.bounded_store.BoundedStore`): kv heads, head
    size, chunk size and recall-key width."""
    G, d, C = store.recent_k.shape[1], store.recent_k.shape[3], store.chunk
    want = (G, bank.chunks, C, d)
    if tuple(bank.keys.shape) != want or bank.bounds.shape[-1] != width:
        raise ValueError(
            f"the memory bank's layer at {site!r} holds keys {tuple(bank.keys.shape)} and recall keys of width "
            f"{bank.bounds.shape[-1]}; this site needs (kv heads, chunks, chunk_size, head_dim) = {want} and width "
            f"{width}: build the bank with the same model and MKAConfig (mka_compile.memory_bank)"
        )
