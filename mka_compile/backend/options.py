"""Options of the ``mka`` backend: ``torch.compile(model, backend="mka", options={...})``, validated up front.

The backend does not convert: a model gets MKA from :func:`mka_compile.convert`, or with trained weights from
:func:`mka_compile.load_converted` (a converted checkpoint), and the backend compiles its ``mka::`` ops.
``weights`` and ``config`` (the options of the earlier in-graph conversion) are refused with that advice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mka_compile.backend.lowering import TARGETS
from mka_compile.config import MKAConfig

OPTION_KEYS = ("mode", "config", "weights", "attention", "inductor", "compiler")
COMPILERS = ("inductor", "aot_eager")

CONVERT_HINT = (
    "the mka backend compiles models as they are and does not convert them: convert the model first "
    "(mka_compile.convert(model, mode=..., config=...)), or, for trained MKA weights, load the converted checkpoint "
    "into the original model (mka_compile.load_converted(model, path), or convert + model.load_state_dict(...)), "
    "then torch.compile(model, backend='mka')"
)


class BackendError(ValueError):
    """Bad ``options`` or a graph the options cannot apply to; the message names the option and what to do."""


@dataclass
class BackendOptions:
    mode: str | None = None  # the mode the model must have been converted with (a check)
    attention: str = "mka"
    inductor: dict[str, Any] = field(default_factory=dict)
    compiler: str = "inductor"


def _config(cfg: Any) -> MKAConfig:
    if isinstance(cfg, Mapping):
        try:
            cfg = MKAConfig(**{"gate_init": 0.0, **cfg})
        except (TypeError, ValueError) as exc:
            raise BackendError(f"options['config']: {exc}") from exc
    if not isinstance(cfg, MKAConfig):
        raise BackendError(f"options['config'] must be an MKAConfig or a dict of its fields, got {type(cfg).__name__}")
    return cfg


def parse_options(options: Mapping[str, Any] | None) -> BackendOptions:
    """Validate ``options``; unknown keys and bad values raise :class:`BackendError`."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise BackendError(f"unknown option(s) {unknown} for backend 'mka'; valid keys: {list(OPTION_KEYS)}")
    out = BackendOptions()
    mode = options.get("mode")
    if mode not in (None, "fastmka", "mka"):
        raise BackendError(f"options['mode'] must be None, 'fastmka' or 'mka', got {mode!r}")
    out.mode = mode
    if options.get("weights") is not None:
        raise BackendError(f"options['weights']: {CONVERT_HINT}")
    if options.get("config") is not None:
        cfg = _config(options["config"])
        what = "bounded memory (window=...)" if cfg.bounded else "an MKAConfig"
        raise BackendError(f"options['config'] asks for {what}: {CONVERT_HINT}")
    attention = options.get("attention", "mka")
    if attention not in TARGETS:
        raise BackendError(f"options['attention'] must be one of {list(TARGETS)}, got {attention!r}")
    out.attention = attention
    inductor = options.get("inductor") or {}
    if not isinstance(inductor, Mapping):
        raise BackendError(f"options['inductor'] must be a dict of Inductor config patches, got {inductor!r}")
    out.inductor = dict(inductor)
    compiler = options.get("compiler", "inductor")
    if compiler not in COMPILERS:
        raise BackendError(f"options['compiler'] must be one of {list(COMPILERS)}, got {compiler!r}")
    if compiler != "inductor" and inductor:
        raise BackendError("options['inductor'] patches Inductor's config; it needs compiler='inductor'")
    out.compiler = compiler
    return out
