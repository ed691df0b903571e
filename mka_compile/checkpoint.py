"""Save and load converted models: weights plus what is needed to redo the conversion (mode, MKAConfig).

``save_converted(model, path, mode, config)`` writes the model's ``state_dict()`` (the original weights and
each site's ``<site>.mka.*`` parameters) as safetensors (``.safetensors``) or a torch file (anything else),
with ``{"mka_mode": ..., "mka_config": {...}}`` in the safetensors metadata / beside the tensors.
``load_converted(model, path)`` converts a freshly built copy of the original model the same way and loads
the weights (strict). Torch files are read with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mka_compile.config import MKAConfig

MODES = ("fastmka", "mka")


def config_to_dict(config: MKAConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["levels"] = list(d["levels"])
    return d


def config_from_dict(d: dict[str, Any]) -> MKAConfig:
    known = {f.name for f in dataclasses.fields(MKAConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown MKAConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
    d = dict(d)
    if "levels" in d:
        d["levels"] = tuple(d["levels"])
    return MKAConfig(**d)


def save_converted(model: nn.Module, path: str | Path, mode: str, config: MKAConfig) -> Path:
    """Write ``model``'s state dict and the conversion's mode/config to ``path``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"mka_mode": mode, "mka_config": json.dumps(config_to_dict(config))}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_model

        save_model(model, str(path), metadata=meta)  # handles tied (shared) weights
    else:
        torch.save({"state_dict": state, **meta}, path)
    return path


def read_converted(path: str | Path) -> tuple[dict[str, torch.Tensor], str, MKAConfig]:
    """``(state_dict, mode, config)`` from a file written by :func:`save_converted`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no converted checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    else:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "state_dict" not in blob:
            raise ValueError(f"{path} is not a converted checkpoint written by mka_compile.save_converted")
        meta, state = blob, blob["state_dict"]
    if meta.get("mka_mode") not in MODES or "mka_config" not in meta:
        raise ValueError(
            f"{path} has no mka_mode/mka_config metadata: write it with mka_compile.save_converted "
            "(or `mka-compile convert`)"
        )
    return state, meta["mka_mode"], config_from_dict(json.loads(meta["mka_config"]))


def load_converted(model: nn.Module, path: str | Path, example_inputs: Any = None) -> nn.Module:
    """Convert ``model`` (the original architecture) as recorded in ``path`` and load its weights (strict)."""
    from mka_compile.convert import convert

    state, mode, config = read_converted(path)
    convert(model, mode=mode, config=config, example_inputs=example_inputs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{path} does not fit this model: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (was it written from the same architecture?)"
        )
    return model


def _is_tied(model: nn.Module, key: str) -> bool:
    """safetensors' save_model drops one name of each tied pair; such a name is not really missing."""
    tensor = model.state_dict(keep_vars=True)[key]
    return sum(t is tensor for t in model.state_dict(keep_vars=True).values()) > 1
