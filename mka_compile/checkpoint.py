"""Save and load converted models: weights plus what is needed to redo the conversion (mode, MKAConfig).

``save_converted(model, path)`` writes the model's ``state_dict()`` (the original weights and each site's
``<site>.mka.*`` parameters) as safetensors (``.safetensors``) or a torch file (anything else), with
``{"mka_mode": ..., "mka_config": {...}}`` in the safetensors metadata / beside the tensors. Mode and config are
read from the model's converted sites (a ``mode`` / ``config`` passed in must agree with them).
``load_converted(model, path)`` converts a freshly built copy of the original model the same way and loads
the weights (strict, atomic: on any failure the model is left as it was). Torch files are read with
``weights_only=True``. The Hugging Face folder round trip is :mod:`mka_compile.pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mka_compile.config import MKAConfig, config_from_dict, config_to_dict  # noqa: F401  (re-exported)

MODES = ("fastmka", "mka")
WRITE_HINT = "write it with mka_compile.save_converted(model, path) (or `mka-compile convert ... -o path`)"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file and what to do."""


def same_config(a: MKAConfig, b: MKAConfig) -> bool:
    """Equal up to ``gate_init`` (it only sets the gate's starting value; a checkpoint holds the gate itself)."""
    return dataclasses.replace(a, gate_init=None) == dataclasses.replace(b, gate_init=None)


def config_difference(given: MKAConfig, recorded: MKAConfig) -> str:
    """``"chunk_size=64 (recorded: chunk_size=4), ..."`` for the fields (but ``gate_init``) that differ."""
    diffs = [
        f"{f.name}={getattr(given, f.name)!r} (recorded: {f.name}={getattr(recorded, f.name)!r})"
        for f in dataclasses.fields(MKAConfig)
        if f.name != "gate_init" and getattr(given, f.name) != getattr(recorded, f.name)
    ]
    return ", ".join(diffs)


def conversion_of(model: nn.Module) -> tuple[str, MKAConfig]:
    """``(mode, config)`` of a model converted by :func:`mka_compile.convert`, read from its sites' ``.mka``."""
    from mka_compile.sites.memory import SiteMemory

    sites = {name: m for name, m in model.named_modules() if isinstance(m, SiteMemory)}
    if not sites:
        raise ValueError(
            "the model is not converted (no '<site>.mka' module): convert it with mka_compile.convert(model, "
            "mode=..., config=...) before saving it as a converted checkpoint"
        )
    found = {(m.mode, m.config) for m in sites.values()}
    if len(found) > 1:
        raise ValueError(
            f"the model's sites were converted with different modes / configs {sorted(map(str, found))}: a converted "
            "checkpoint records one (convert every site with one mka_compile.convert call)"
        )
    return found.pop()


def _checked(model: nn.Module, mode: str | None, config: MKAConfig | None) -> tuple[str, MKAConfig]:
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    got_mode, got_config = conversion_of(model)
    if mode is not None and mode != got_mode:
        raise ValueError(
            f"mode={mode!r} but the model was converted with mode {got_mode!r}: the checkpoint records the model's "
            "own mode (leave mode out)"
        )
    if config is not None and not same_config(config, got_config):
        raise ValueError(
            f"config differs from the MKAConfig the model was converted with: {config_difference(config, got_config)}"
            " (leave config out: the checkpoint records the model's own)"
        )
    return got_mode, got_config


def save_converted(
    model: nn.Module, path: str | Path, mode: str | None = None, config: MKAConfig | None = None
) -> Path:
    """Write ``model``'s state dict and the conversion's mode / config to ``path``.

    Mode and config are read from the model; ``mode`` / ``config``, when given, are only checked against it
    (``ValueError`` on a mismatch, nothing written)."""
    mode, config = _checked(model, mode, config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"mka_mode": mode, "mka_config": json.dumps(config_to_dict(config))}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_model

        save_model(model, str(path), metadata=meta)  # handles tied (shared) weights
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        torch.save({"state_dict": state, **meta}, path)
    return path


def read_file(path: str | Path, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a safetensors or torch (``weights_only``) file; errors name the file.

    A torch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` (a training checkpoint) gives that dict and
    the other entries as metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (an interrupted write?): {WRITE_HINT} again")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - name the file and say what to do
        kind = "safetensors" if path.suffix == ".safetensors" else "torch (weights_only=True)"
        raise CheckpointError(
            f"{path} is not a readable {kind} file ({type(exc).__name__}: {str(exc).strip()[:200]}); {WRITE_HINT}"
        ) from exc
    if isinstance(blob, dict):
        for key in ("state_dict", "model"):
            if isinstance(blob.get(key), dict):
                return blob[key], {k: v for k, v in blob.items() if k != key}
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path} holds a {type(blob).__name__}, not a state_dict; {WRITE_HINT}")
    return blob, {}


def recorded_conversion(path: str | Path, meta: dict[str, Any]) -> tuple[str, MKAConfig] | None:
    """The ``(mode, config)`` recorded in a checkpoint's metadata, None when it records none."""
    if "mka_mode" not in meta and "mka_config" not in meta:
        return None
    mode, text = meta.get("mka_mode"), meta.get("mka_config")
    if mode not in MODES:
        raise CheckpointError(f"{path}: recorded mka_mode {mode!r} is not one of {MODES}; {WRITE_HINT}")
    if not isinstance(text, str):
        raise CheckpointError(f"{path}: recorded mka_config is missing or not a JSON string; {WRITE_HINT}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: recorded mka_config is not valid JSON ({exc}); {WRITE_HINT}") from exc
    try:
        return mode, config_from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: recorded mka_config is not a valid MKAConfig: {exc}; {WRITE_HINT}") from exc


def read_converted(path: str | Path) -> tuple[dict[str, torch.Tensor], str, MKAConfig]:
    """``(state_dict, mode, config)`` from a file written by :func:`save_converted`."""
    state, meta = read_file(path, "converted checkpoint")
    if not meta and Path(path).suffix != ".safetensors":
        raise CheckpointError(f"{path} is not a converted checkpoint written by mka_compile.save_converted")
    conversion = recorded_conversion(path, meta)
    if conversion is None:
        raise CheckpointError(f"{path} has no mka_mode/mka_config metadata: {WRITE_HINT}")
    return state, *conversion


def fit_problems(model: nn.Module, state: dict[str, torch.Tensor], only_mka: bool = False) -> list[str]:
    """Why ``state`` does not load into ``model`` (missing / unexpected keys, shapes); ``only_mka``: compare the
    ``.mka.`` entries only (else every entry but those)."""
    own = model.state_dict(keep_vars=True)
    pick = lambda k: (".mka." in k or k.startswith("mka.")) == only_mka  # noqa: E731
    own = {k: v for k, v in own.items() if pick(k)}
    given = {k: v for k, v in state.items() if pick(k)}
    groups = _tied_groups(model)
    missing = sorted(k for k in set(own) - set(given) if not any(t in given for t in groups.get(k, ())))
    unexpected = sorted(set(given) - set(own))
    shapes = sorted(
        f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(given) & set(own)
        if tuple(given[k].shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}" + (f" (+{len(missing) - 5})" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}" + (f" (+{len(unexpected) - 5})" if len(unexpected) > 5 else ""))
    if shapes:
        problems.append(f"shape (checkpoint vs model) {shapes[:5]}")
    return problems


def load_converted(model: nn.Module, path: str | Path, example_inputs: Any = None) -> nn.Module:
    """Convert ``model`` (the original architecture) as recorded in ``path`` and load its weights (strict).

    Atomic: the checkpoint is checked against the model before anything is changed and again once converted;
    on any failure the conversion is undone and the model's weights are as before."""
    from mka_compile.conversion import convert

    state, mode, config = read_converted(path)
    problems = fit_problems(model, state)
    if problems:
        raise CheckpointError(
            f"{path} does not fit this model: {'; '.join(problems)} (was it written from the same architecture?); "
            "the model was not changed"
        )
    convert(model, mode=mode, config=config, example_inputs=example_inputs)  # atomic itself
    try:
        problems = fit_problems(model, state, only_mka=True)
        if problems:
            raise CheckpointError(
                f"{path} does not fit this model converted with its recorded config {config}: {'; '.join(problems)}; "
                "the model was not changed"
            )
        model.load_state_dict(state, strict=False)  # every key and shape checked above: nothing can half-load
    except BaseException:
        unconvert(model)
        raise
    return model


def unconvert(model: nn.Module) -> None:
    """Undo :func:`mka_compile.convert` on ``model`` (used to roll back a failed load, as ``convert`` does)."""
    from mka_compile.conversion import unconvert as undo

    undo(model)


def _tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """``{name: every name of the same tensor}`` for tensors shared under several names (safetensors' save_model
    keeps one name of each tied group: the others are not really missing)."""
    seen: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        seen.setdefault(id(v), []).append(k)
    return {k: names for names in seen.values() if len(names) > 1 for k in names}
