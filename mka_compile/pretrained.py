"""The Hugging Face folder round trip of a converted model: ``save_pretrained`` / ``from_pretrained``.

``save_pretrained(model, d)`` is ``model.save_pretrained(d)`` (the MKA parameters are in ``state_dict()``, so
they land in the same safetensors files) plus a record in ``config.json``::

    "mka_compile": {"mode": "fastmka", "config": {...MKAConfig fields...}, "original_model_type": "llama", ...}

and ``model_type`` replaced by a marker that names this function. Plain transformers cannot rebuild the
conversion (it would load the original architecture and drop the MKA weights, a different model), so
``transformers.AutoModelForCausalLM.from_pretrained(d)`` refuses such a folder with an error that says
"load it with mka_compile.from_pretrained". ``from_pretrained(d, **hf_kwargs)`` loads the original architecture
with transformers (any ``from_pretrained`` keyword: ``dtype``, ``device_map``, ``attn_implementation``, ...),
converts it with the recorded mode and config, and loads the MKA weights: the same logits as the saved model.

Limits: a concrete class (``LlamaForCausalLM.from_pretrained(d)``) does not refuse; transformers warns "You are using
a model of type `llama converted by mka_compile: load it with mka_compile.from_pretrained(path)`" and its load
report lists the ``.mka.`` weights as UNEXPECTED. Plain ``model.save_pretrained(d)`` records the conversion too
(``convert`` puts the record on the model's config), so ``from_pretrained`` reads such a folder; only this function
also replaces ``model_type``, which makes ``AutoModelForCausalLM.from_pretrained(d)`` refuse it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mka_compile.checkpoint import CheckpointError, config_from_dict, config_to_dict, conversion_of, unconvert

RECORD = "mka_compile"
MARKER = "{model_type} converted by mka_compile: load it with mka_compile.from_pretrained(path)"
SAVE_HINT = "save the converted model with mka_compile.save_pretrained(model, path)"


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **kwargs)`` for a converted Hugging Face model, recording its MKA
    mode and config in ``config.json`` (see the module docstring). Returns the folder."""
    mode, config = conversion_of(model)
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"{type(model).__name__} is not a Hugging Face model (no save_pretrained): use "
            "mka_compile.save_converted(model, 'file.safetensors') instead"
        )
    if kwargs.get("push_to_hub"):
        raise ValueError(
            "push_to_hub would upload config.json before the MKA record is written: save to a folder with "
            "mka_compile.save_pretrained, then upload it (huggingface_hub.upload_folder)"
        )
    d = Path(save_directory)
    model.save_pretrained(d, **kwargs)
    path = d / "config.json"
    data = json.loads(path.read_text())
    from mka_compile import __version__

    data[RECORD] = {
        "mode": mode,
        "config": config_to_dict(config),
        "original_model_type": data.get("model_type"),  # not "model_type": transformers looks for nested configs
        "version": __version__,
    }
    data["model_type"] = MARKER.format(model_type=data.get("model_type"))
    data.pop("_mka_original_attn_implementation", None)  # MKA mode's routing: redone by convert on load
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return d


def from_pretrained(path: str | os.PathLike, **hf_kwargs: Any) -> nn.Module:
    """The converted model saved by :func:`save_pretrained` in ``path`` (a folder, or a Hub repo id), with the
    same logits. ``hf_kwargs`` go to ``transformers.AutoModelForCausalLM.from_pretrained``."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from mka_compile.conversion import convert

    d = _folder(path, hf_kwargs)
    data = json.loads((d / "config.json").read_text())
    record = data.pop(RECORD, None)
    data.pop("_mka_original_attn_implementation", None)  # MKA mode's routing: redone by convert
    if record is None:
        if _mka_keys(d):
            raise CheckpointError(
                f"{path} holds MKA weights ('<site>.mka.*') but config.json does not record the mode and MKAConfig "
                f"they were trained with (plain model.save_pretrained does not): {SAVE_HINT}"
            )
        raise CheckpointError(
            f"{path} is not a converted model saved by mka_compile.save_pretrained (config.json has no "
            f"{RECORD!r} record): load an original model with transformers.AutoModelForCausalLM.from_pretrained "
            "and convert it with mka_compile.convert"
        )
    try:
        mode, config = record["mode"], config_from_dict(record["config"])
        model_type = record.get("original_model_type") or data.get("model_type")  # no marker: as it is
        config_class = CONFIG_MAPPING[model_type]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}/config.json: the {RECORD!r} record is malformed or names an unknown model type "
            f"({type(exc).__name__}: {exc}); {SAVE_HINT}"
        ) from exc
    data["model_type"] = model_type
    if "config" not in hf_kwargs:
        hf_kwargs["config"] = config_class.from_dict(data)
    want_info = hf_kwargs.pop("output_loading_info", False)
    with _no_load_report("transformers.modeling_utils"):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, **hf_kwargs)
    mka = lambda keys: {k for k in keys if ".mka." in f".{k}"}  # noqa: E731
    info["unexpected_keys"] = set(info["unexpected_keys"]) - mka(info["unexpected_keys"])
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if problems:
        warnings.warn(f"loading {path}: {problems}", stacklevel=2)
    convert(model, mode=mode, config=config)
    try:
        _load_mka(model, d, path)
    except BaseException:
        unconvert(model)
        raise
    return (model, info) if want_info else model


def _folder(path: str | os.PathLike, hf_kwargs: dict[str, Any]) -> Path:
    d = Path(path)
    if d.is_dir():
        if not (d / "config.json").is_file():
            raise CheckpointError(f"{d} has no config.json: {SAVE_HINT}")
        return d
    if d.exists():
        raise CheckpointError(f"{path} is a file, not a folder saved by mka_compile.save_pretrained")
    from huggingface_hub import snapshot_download  # a Hub repo id: its config and weights

    keys = ("revision", "token", "cache_dir", "local_files_only")
    try:
        got = snapshot_download(
            str(path), allow_patterns=["*.json", "*.safetensors"], **{k: hf_kwargs[k] for k in keys if k in hf_kwargs}
        )
    except Exception as exc:  # noqa: BLE001 - say what was tried
        raise CheckpointError(
            f"{path} is neither a local folder nor a Hugging Face Hub repo that can be downloaded here "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    return _folder(got, {})


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / n for n in names]
    return sorted(d.glob("*.safetensors"))


def _mka_keys(d: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in _weight_files(d):
        with safe_open(str(f), "pt") as st:
            keys += [k for k in st.keys() if ".mka." in f".{k}"]
    return keys


def _load_mka(model: nn.Module, d: Path, path: Any) -> None:
    """Copy the ``.mka.`` tensors of the folder's safetensors files into the converted ``model`` (all of them,
    every shape checked first)."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(d):
        with safe_open(str(f), "pt") as st:
            state.update({k: st.get_tensor(k) for k in st.keys() if ".mka." in f".{k}"})
    own = {k: v for k, v in model.state_dict().items() if ".mka." in f".{k}"}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"the MKA weights in {path} do not fit the model converted with its recorded config: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}, shapes (file vs model) {shapes[:5]}"
        )
    model.load_state_dict(state, strict=False)


class _NoLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def _no_load_report(name: str):
    """Drop transformers' load report (it lists the MKA weights as unexpected); the caller reports the rest."""
    logger, flt = logging.getLogger(name), _NoLoadReport()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)
