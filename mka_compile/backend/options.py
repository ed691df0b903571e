"""Options of the ``mka`` backend: ``torch.compile(model, backend="mka", options={...})``, validated up front."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mka_compile.backend.lowering import TARGETS
from mka_compile.backend.weights import split_weights
from mka_compile.checkpoint import CheckpointError, config_difference, read_file, recorded_conversion, same_config
from mka_compile.config import MKAConfig

OPTION_KEYS = ("mode", "config", "weights", "attention", "inductor", "compiler")
COMPILERS = ("inductor", "aot_eager")


class BackendError(ValueError):
    """Bad ``options`` or a graph the options cannot apply to; the message names the option and what to do."""


@dataclass
class BackendOptions:
    mode: str | None = None
    config: MKAConfig | None = None
    weights: dict[str, dict[str, torch.Tensor]] | None = None  # {site: {param: tensor}}
    attention: str = "mka"
    inductor: dict[str, Any] = field(default_factory=dict)
    compiler: str = "inductor"


def _load(path: str | os.PathLike) -> tuple[Mapping[str, Any], tuple[str, MKAConfig] | None]:
    """The checkpoint's tensors and, when it records them (``save_converted``), its mode and MKAConfig."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BackendError(f"options['weights']: no checkpoint file at {path!r}")
    try:
        state, meta = read_file(path)
        return state, recorded_conversion(path, meta)
    except CheckpointError as exc:
        raise BackendError(f"options['weights']: {exc}") from exc


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
    cfg = options.get("config")
    if isinstance(cfg, Mapping):
        try:
            cfg = MKAConfig(**{"gate_init": 0.0, **cfg})
        except (TypeError, ValueError) as exc:
            raise BackendError(f"options['config']: {exc}") from exc
    if cfg is not None and not isinstance(cfg, MKAConfig):
        raise BackendError(f"options['config'] must be an MKAConfig or a dict of its fields, got {type(cfg).__name__}")
    weights, recorded = options.get("weights"), None
    if isinstance(weights, (str, os.PathLike)):
        where = os.fspath(weights)
        weights, recorded = _load(weights)
    if recorded is not None:  # a checkpoint from save_converted: its mode and config are the ones to use
        file_mode, file_cfg = recorded
        if mode is not None and mode != file_mode:
            raise BackendError(
                f"options['mode']={mode!r} but {where} records mode {file_mode!r}: leave 'mode' out (the checkpoint "
                "records the mode its weights were trained with)"
            )
        if cfg is not None and not same_config(cfg, file_cfg):
            raise BackendError(
                f"options['config'] differs from the MKAConfig recorded in {where}: {config_difference(cfg, file_cfg)};"
                " leave 'config' out (the checkpoint records the config its weights were trained with)"
            )
        mode, cfg = file_mode, cfg or file_cfg
    if cfg is not None and cfg.bounded:
        raise BackendError(
            "options['config'] asks for bounded memory (window=...), which the backend's graph rewrite does not build "
            "(its attention and cache live in a transformers Cache): run mka_compile.convert(model, config=...) and "
            "compile the converted model (torch.compile(model, backend='mka') keeps its mka:: ops)"
        )
    out.mode, out.config = mode, cfg
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
    if weights is not None:
        if not isinstance(weights, Mapping):
            raise BackendError(f"options['weights'] must be a state_dict or a checkpoint path, got {type(weights)}")
        split = split_weights(dict(weights))
        if not split:
            raise BackendError(
                "options['weights'] has no '<site>.mka.*' entries (router, gate): pass the state_dict (or checkpoint) "
                "of a model converted with mka_compile.convert"
            )
        if mode is None:
            raise BackendError(
                "options['weights'] needs options['mode']: 'fastmka' or 'mka', the mode the checkpoint was trained in"
            )
        out.weights = split
    return out
