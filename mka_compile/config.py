"""``MKAConfig``: the knobs of MKA / FastMKA, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

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


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


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
