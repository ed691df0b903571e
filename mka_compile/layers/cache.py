"""``MKACache``: a KV cache that also carries the MKA state (session EMA, long-term chunk state)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mka_compile.config import MKAConfig
from mka_compile.memory import memory_levels

REWIND_TOKENS = 256  # a cached state can be rewound (``crop``) by at least this many of its latest tokens
BOUNDED_REWIND_CALL = 32  # bounded memory keeps, for crop, only calls this short (draft tokens, decode steps)


@dataclass
class _Step:
    """One cached call, kept so that ``crop`` can rewind into it: the state before it, its keys and values."""

    before: tuple  # (n_seen, ema_k, ema_v, part_k, part_v, tokens_bound, kv positions) before the call
    k1: torch.Tensor  # (B, Hkv, T, d)
    v1: torch.Tensor  # (B, Hkv, T, d)
    valid: torch.Tensor  # (B, T)
    edits: int = 0  # the batch edits (beam reorders...) its tensors are as of


class _History:
    """The latest calls kept for rewind, oldest first, and how many positions they hold (counted as calls come and
    go, so that a decode step does not sum over the kept calls).

    A batch edit (a beam reorder, a selection, a repetition) is recorded as the row index it applies
    (:meth:`edit`), not applied to every kept call: a call's tensors are brought up to date when a rewind reads
    it (:meth:`__getitem__`). Beam search reorders the cache every step, and the kept calls are up to
    ``REWIND_TOKENS`` of them per layer."""

    def __init__(self) -> None:
        self.calls: collections.deque[_Step] = collections.deque()
        self.positions = 0
        self.edits = 0  # batch edits so far
        self.rows: collections.deque[torch.Tensor] = collections.deque()  # the latest edits' row indices

    def append(self, step: _Step) -> None:
        step.edits = self.edits
        self.calls.append(step)
        self.positions += step.valid.shape[1]

    def edit(self, rows: torch.Tensor) -> None:
        """A batch edit: new row ``r`` is old row ``rows[r]``."""
        self.edits += 1
        if self.calls:
            self.rows.append(rows)
            self._forget_edits()

    def trim(self, keep: int) -> None:
        """Drop the oldest calls while the others hold at least ``keep`` positions (the latest call stays)."""
        while len(self.calls) > 1 and self.positions - self.calls[0].valid.shape[1] >= keep:
            self.positions -= self.calls.popleft().valid.shape[1]
        self._forget_edits()

    def truncate(self, n: int) -> None:
        """Keep the oldest ``n`` calls."""
        while len(self.calls) > n:
            self.positions -= self.calls.pop().valid.shape[1]
        self._forget_edits()

    def _forget_edits(self) -> None:
        """Keep only the edits a kept call is not yet up to date with (the oldest call is the furthest behind)."""
        behind = self.edits - self.calls[0].edits if self.calls else 0
        while len(self.rows) > behind:
            self.rows.popleft()

    def __len__(self) -> int:
        return len(self.calls)

    def __getitem__(self, i: int) -> _Step:
        """The ``i``-th kept call, its tensors brought up to date with the batch edits made since it was kept."""
        st = self.calls[i]
        behind = self.edits - st.edits
        if behind:
            rows = None
            for r in list(self.rows)[len(self.rows) - behind :]:
                rows = r if rows is None else rows[r.to(rows.device)]
            pick = lambda t: t.index_select(0, rows.to(t.device))  # noqa: E731
            st.before = (*(pick(t) for t in st.before[:5]), *st.before[5:])
            st.k1, st.v1, st.valid = pick(st.k1), pick(st.v1), pick(st.valid)
            st.edits = self.edits
        return st


@dataclass
class MKALayerState:
    """What one attention layer keeps between calls.

    ``kv``: the cached key/value tensors of each stored level, ``[B, Hkv, Tk, d]`` (FastMKA: the
    routed ``kf, vf``; MKA: ``k1, v1, k2, v2``); ``kv_valid: [B, Tk]``; ``n_seen: [B]`` real tokens
    seen; ``ema_k, ema_v: [B, Hkv, d]``, ``part_k, part_v: [B, Hkv, d]`` and
    ``summ_k, summ_v: [B, Hkv, N, d]`` in float32 (see ``mka_compile.kernels``).
    """

    n_seen: torch.Tensor
    ema_k: torch.Tensor
    ema_v: torch.Tensor
    part_k: torch.Tensor
    part_v: torch.Tensor
    summ_k: torch.Tensor
    summ_v: torch.Tensor
    kv: list[torch.Tensor] = field(default_factory=list)
    kv_valid: torch.Tensor | None = None
    tokens_bound: int = 0  # tokens passed so far, padding included: a static bound on n_seen (no .item())
    fixed_slots: bool = False  # a preallocated summary buffer (export: static shapes); reserve() leaves it
    steps: _History | None = None  # the latest calls, for rewind (crop); made by the first record (eager only)
    config: MKAConfig | None = None  # the memory's settings, for rewind (set by the site that keeps the state)
    # bounded memory of a layer built from scratch: its BoundedStores (mka_compile.bounded), one per full-length level
    bounded: list | None = None

    @classmethod
    def empty(
        cls, batch: int, kv_heads: int, head_dim: int, device, state_dtype: torch.dtype, slots: int = 0
    ) -> MKALayerState:
        """A fresh state; ``slots > 0`` preallocates that many summary slots, fixed (``max_len // chunk_size``)."""
        # one zero buffer for all six float states (every op replaces a state rather than writing into it)
        per = batch * kv_heads * head_dim
        flat = torch.zeros(per * (4 + 2 * slots), dtype=state_dtype, device=device)
        vec = [flat[i * per : (i + 1) * per].view(batch, kv_heads, head_dim) for i in range(4)]
        summ = [
            flat[(4 + i * slots) * per : (4 + (i + 1) * slots) * per].view(batch, kv_heads, slots, head_dim)
            for i in range(2)
        ]
        return cls(
            n_seen=torch.zeros(batch, dtype=torch.int64, device=device),
            ema_k=vec[0],
            ema_v=vec[1],
            part_k=vec[2],
            part_v=vec[3],
            summ_k=summ[0],
            summ_v=summ[1],
            fixed_slots=slots > 0,
        )

    # -- rewinding and batch reordering (a cache's crop, beam search) ---------------------------------------------
    def snapshot(self) -> tuple:
        """What :meth:`rewind` restores (references: every op replaces a state tensor instead of writing into it)."""
        kv_len = 0 if self.kv_valid is None else self.kv_valid.shape[1]
        return (self.n_seen, self.ema_k, self.ema_v, self.part_k, self.part_v, self.tokens_bound, kv_len)

    def record(self, before: tuple, k1: torch.Tensor, v1: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep one call (``before`` = its :meth:`snapshot`) so that its tokens can be rewound; calls older than the
        latest ``REWIND_TOKENS`` tokens are dropped. With bounded memory (``config.window``) a call longer than
        ``BOUNDED_REWIND_CALL`` is not kept (what stays resident is small next to the bounded store; a crop into
        such a call is refused with the reason)."""
        if self.config is not None and self.config.bounded and valid.shape[1] > BOUNDED_REWIND_CALL:
            self.steps = None
            return
        if self.steps is None:
            self.steps = _History()
        self.steps.append(_Step(before, k1.detach(), v1.detach(), valid))
        self.steps.trim(REWIND_TOKENS)

    def rewindable(self) -> int:
        """How many of the latest positions :meth:`rewind` can remove."""
        return 0 if self.steps is None else self.steps.positions

    def rewind(self, positions: int, config: MKAConfig) -> None:
        """Forget the latest ``positions`` positions (padding included), exactly: the state before the call they
        start in is restored and that call's kept tokens are run through the memory again."""
        if positions <= 0:
            return
        if positions > self.rewindable():
            raise RuntimeError(
                f"MKA memory: cannot remove the last {positions} tokens from the cache: its MKA state can rewind only "
                f"its latest {self.rewindable()} tokens (at least the last call and {REWIND_TOKENS} tokens are kept); "
                "crop fewer tokens, or start the sequence again with a new cache"
            )
        total, i = 0, len(self.steps)
        while total < positions:
            i -= 1
            total += self.steps[i].valid.shape[1]
        step, keep = self.steps[i], total - positions  # keep: the first tokens of call i that stay
        self.n_seen, self.ema_k, self.ema_v, self.part_k, self.part_v, self.tokens_bound, kv_len = step.before
        self.steps.truncate(i)
        if self.kv:
            self.kv = [t[:, :, : kv_len + keep] for t in self.kv]
        if self.kv_valid is not None:
            self.kv_valid = self.kv_valid[:, : kv_len + keep]
        if keep:
            k1, v1, valid = step.k1[:, :, :keep], step.v1[:, :, :keep], step.valid[:, :keep]
            before = self.snapshot()
            advance(self, k1, v1, valid, config)
            self.steps.append(_Step((*before[:6], kv_len), k1, v1, valid))

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (a selection / repetition along the batch axis) to every per-sequence tensor: beam search's
        reorder, select and repeat."""
        if self.steps is not None:  # the edit as a row index, for the kept calls
            rows = fn(torch.arange(self.n_seen.shape[0], device=self.n_seen.device))
        for name in ("n_seen", "ema_k", "ema_v", "part_k", "part_v", "summ_k", "summ_v"):
            setattr(self, name, fn(getattr(self, name)))
        self.kv = [fn(t) for t in self.kv]
        self.kv_valid = None if self.kv_valid is None else fn(self.kv_valid)
        for store in self.bounded or ():
            store.map_batch(fn)
        if self.steps is not None:
            self.steps.edit(rows)

    def reserve(self, new_tokens: int, chunk_size: int) -> None:
        """Make room for the chunks ``new_tokens`` more tokens can complete (a bound that needs no sync).

        Fixed slots need no bookkeeping: no Python int changes per call (torch.compile would specialize it)."""
        if self.fixed_slots:
            return
        self.tokens_bound += new_tokens
        self.ensure_summary_slots(self.tokens_bound // chunk_size)

    def ensure_summary_slots(self, needed: int) -> None:
        """Grow the summary buffers (by doubling) to hold ``needed`` completed chunks."""
        have = self.summ_k.shape[2]
        if needed <= have:
            return
        grow = max(needed, 2 * have) - have
        pad = (0, 0, 0, grow)
        self.summ_k = torch.nn.functional.pad(self.summ_k, pad)
        self.summ_v = torch.nn.functional.pad(self.summ_v, pad)

    def append(self, tensors: list[torch.Tensor], valid: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Append this call's ``[B, Hkv, T, d]`` level tensors and ``valid: [B, T]``; return the full cache."""
        if self.kv:
            if len(tensors) != len(self.kv):
                raise ValueError(
                    f"this cache holds {len(self.kv)} tensors per layer but {len(tensors)} were appended; "
                    "a cache serves one kind of layer (FastMKA or MKA)"
                )
            self.kv = [torch.cat([old, new], 2) for old, new in zip(self.kv, tensors)]
            self.kv_valid = torch.cat([self.kv_valid, valid], 1)
        else:
            self.kv, self.kv_valid = list(tensors), valid
        return self.kv, self.kv_valid


def advance(st: MKALayerState, k1: torch.Tensor, v1: torch.Tensor, valid: torch.Tensor, cfg: MKAConfig) -> None:
    """Run ``k1, v1: [B, Hkv, T, d]`` (``valid: [B, T]``) through the memory of a causal state, as a call does,
    without attending: the session EMA, the chunk summaries and the count of real tokens."""
    memory_levels(cfg, st, k1, v1, valid, None, True)
    st.n_seen = st.n_seen + valid.sum(-1)


class MKACache:
    """Per-layer MKA state, keyed by each layer's ``layer_idx``. Pass one object to every layer call.

    Example::

        cache = MKACache()
        y = layer(x[:, :16], cache=cache)      # prefill
        y1 = layer(x[:, 16:17], cache=cache)   # decode: same output as a full forward at position 16
    """

    def __init__(self) -> None:
        self.layers: dict[int, MKALayerState] = {}

    def layer(self, idx: int, *, batch: int, kv_heads: int, head_dim: int, device, state_dtype) -> MKALayerState:
        st = self.layers.get(idx)
        if st is None:
            st = self.layers[idx] = MKALayerState.empty(batch, kv_heads, head_dim, device, state_dtype)
        elif st.n_seen.shape[0] != batch or st.ema_k.shape[1:] != (kv_heads, head_dim):
            raise ValueError(
                f"cache layer {idx} holds state for batch {st.n_seen.shape[0]}, {st.ema_k.shape[1]} kv heads, "
                f"head_dim {st.ema_k.shape[2]}; this call has batch {batch}, {kv_heads} kv heads, head_dim "
                f"{head_dim}. Use a fresh MKACache per sequence batch and give each layer its own layer_idx"
            )
        return st

    def get_seq_length(self, idx: int = 0) -> int:
        """Positions cached for layer ``idx`` (padding included)."""
        st = self.layers.get(idx)
        if st is not None and st.bounded:
            return st.bounded[0].positions
        return 0 if st is None or st.kv_valid is None else int(st.kv_valid.shape[1])
