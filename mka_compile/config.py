"""``MKAConfig``: the knobs of MKA / FastMKA, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

CHUNK_KEYS = ("bounds", "mean")
LEVELS = ("local", "session", "longterm")


@dataclass(frozen=True)
class MKAConfig:
    """Configuration shared by the MKA layers, the passes and the kernels.

    Attributes:
        levels: memory levels in use, in this order: ``"local"`` (L1, always first) plus at least one
            of ``"session"`` (L2 EMA) and ``"longterm"`` (L3 chunk recall).
        ema_beta: L2 decay, strictly between 0 and 1.
        chunk_size: L3 chunk length C in real tokens.
        top_r: L3 summaries recalled per query (R).
        router_hidden: hidden width of the router MLP; ``None`` = half the query width (D / 2).
        router_per_head: one routing per kv head instead of one shared by all heads.
        gate_init: initial value of the gate on the non-local levels. The routing weights are
            ``w = onehot(local) + gate * (softmax(router(q)) - onehot(local))``: 1.0 routes from the
            start; 0.0 starts exactly at the original attention while every new parameter still trains.
            ``None`` (default) picks by use: 0.0 when converting a model (``convert``, the backend), so a
            converted model is the original until trained, and 1.0 for layers built from scratch.
        recall_scale: scale of L3 recall scores; ``None`` = ``head_dim ** -0.5``.
        causal: ``False`` allows bidirectional attention with the non-causal memory of
            :mod:`mka_compile.layers.noncausal` (no KV cache). For ``convert`` it lets bidirectional
            self-attention sites (encoders) be converted too; causal sites stay causal.
        window: bounded memory (:mod:`mka_compile.bounded`): the local level attends exactly to the first
            ``sink_tokens`` real tokens, the last ``window`` tokens (from the start of the chunk holding the
            window's first token) and the tokens of the ``recall_chunks`` chunks each query recalls; the cache keeps
            only those on the device (the chunks go to a host-memory store). ``None``: unbounded (every token).
        sink_tokens: S, the first real tokens every query keeps seeing (at most ``chunk_size``).
        recall_chunks: R, chunks of ``chunk_size`` tokens each query recalls exactly (by its score against the
            chunk keys); ``None`` = ``top_r``; 0 = window and sinks only (StreamingLLM).
        chunk_keys: what represents a chunk for recall (bounded memory): ``"bounds"`` (an upper bound of
            ``q . k`` over the chunk's keys: their mean, plus for each RoPE channel pair the largest distance of a
            key from it; summed over the query heads of a kv group, as Quest bounds a page by per-channel minima
            and maxima) or ``"mean"`` (the long-term level's chunk summary, the mean key, against the group's mean
            query). Both score queries and keys turned back to position 0.
        trained_length: beyond this many tokens the sinks and recalled chunks are moved next to the window, so no
            query-key distance exceeds what the model was trained on; ``None`` = the model's
            ``max_position_embeddings`` when ``convert`` can read it, else never.
    """

    levels: tuple[str, ...] = LEVELS
    ema_beta: float = 0.9
    chunk_size: int = 64
    top_r: int = 8
    router_hidden: int | None = None
    router_per_head: bool = False
    gate_init: float | None = None
    recall_scale: float | None = None
    causal: bool = True
    window: int | None = None
    sink_tokens: int = 4
    recall_chunks: int | None = None
    chunk_keys: str = "bounds"
    trained_length: int | None = None

    def __post_init__(self) -> None:
        levels = tuple(self.levels) if isinstance(self.levels, (list, tuple)) else None
        if (
            levels is None
            or not levels
            or levels[0] != "local"
            or len(levels) < 2
            or len(set(levels)) != len(levels)
            or any(lv not in LEVELS for lv in levels)
            or list(levels) != sorted(levels, key=LEVELS.index)
        ):
            raise ValueError(
                f"levels must be 'local' followed by 'session' and/or 'longterm' in that order, "
                f"e.g. {LEVELS}; got {self.levels!r}"
            )
        object.__setattr__(self, "levels", levels)
        _in_open_unit("ema_beta", self.ema_beta)
        _positive_int("chunk_size", self.chunk_size)
        _positive_int("top_r", self.top_r)
        if self.router_hidden is not None:
            _positive_int("router_hidden", self.router_hidden)
        if not isinstance(self.router_per_head, bool):
            raise ValueError(f"router_per_head must be a bool, got {self.router_per_head!r}")
        if self.gate_init is not None and not _finite(self.gate_init):
            raise ValueError(
                f"gate_init must be a finite float or None (0.0 = identity at init), got {self.gate_init!r}"
            )
        if self.recall_scale is not None and not (_finite(self.recall_scale) and self.recall_scale > 0):
            raise ValueError(f"recall_scale must be a finite positive float or None, got {self.recall_scale!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got {self.causal!r}")
        if self.window is not None:
            _positive_int("window", self.window)
            if not self.causal:
                raise ValueError("bounded memory (window=...) is for causal attention; use causal=True or window=None")
        _nonnegative_int("sink_tokens", self.sink_tokens)
        if self.bounded and self.sink_tokens > self.chunk_size:
            raise ValueError(
                f"sink_tokens ({self.sink_tokens}) must not exceed chunk_size ({self.chunk_size}): the sinks are part "
                "of the first chunk"
            )
        if self.recall_chunks is not None:
            _nonnegative_int("recall_chunks", self.recall_chunks)
        if self.trained_length is not None:
            _positive_int("trained_length", self.trained_length)
        if self.chunk_keys not in CHUNK_KEYS:
            raise ValueError(f"chunk_keys must be one of {CHUNK_KEYS}, got {self.chunk_keys!r}")
        if self.bounded and self.exact_recall > 0 and self.chunk_keys == "mean" and not self.uses_longterm:
            raise ValueError(
                "bounded memory with chunk_keys='mean' recalls chunks by their summaries, which the 'longterm' level "
                "keeps: add 'longterm' to levels, use chunk_keys='bounds', or set recall_chunks=0 (window and sinks "
                "only)"
            )

    def initial_gate(self, converting: bool) -> float:
        """The gate's starting value: ``gate_init``, or by use when it is None (0.0 converting, 1.0 from scratch)."""
        if self.gate_init is not None:
            return float(self.gate_init)
        return 0.0 if converting else 1.0

    @property
    def uses_session(self) -> bool:
        return "session" in self.levels

    @property
    def uses_longterm(self) -> bool:
        return "longterm" in self.levels

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def bounded(self) -> bool:
        return self.window is not None

    @property
    def exact_recall(self) -> int:
        """R: chunks each query attends to exactly in bounded mode."""
        return self.top_r if self.recall_chunks is None else self.recall_chunks

    def without_recall(self) -> MKAConfig:
        """This config with ``recall_chunks=0``: the bounded set of a level that recalls nothing (sinks and window;
        MKA mode's session level)."""
        return dataclasses.replace(self, recall_chunks=0)

    def bounded_span(self) -> int:
        """The largest query-key distance bounded memory creates once positions are moved (``trained_length``):
        sinks, the recalled chunks, then a window of up to ``window + chunk_size - 1`` tokens."""
        return self.sink_tokens + self.exact_recall * self.chunk_size + self.window + self.chunk_size - 1


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _nonnegative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _in_open_unit(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")


def config_to_dict(config: MKAConfig) -> dict[str, Any]:
    """The fields of ``config`` as JSON-ready values (checkpoints, Hugging Face configs)."""
    d = dataclasses.asdict(config)
    d["levels"] = list(d["levels"])
    return d


def config_from_dict(d: dict[str, Any]) -> MKAConfig:
    """The :class:`MKAConfig` written by :func:`config_to_dict` (unknown fields are refused)."""
    if not isinstance(d, dict):
        raise ValueError(f"an MKAConfig is recorded as a JSON object of its fields, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(MKAConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown MKAConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
    d = dict(d)
    if "levels" in d:
        d["levels"] = tuple(d["levels"])
    return MKAConfig(**d)
