"""Turn a command-line model spec into a model (for the ``mka-compile`` CLI).

Accepted specs:

- ``tiny:<model_type>`` -- a small Hugging Face causal LM of that family (``tiny:llama``, ``tiny:gpt2``, ...)
  with random weights, built from a config: 2 layers, hidden 64, 4 heads, 2 kv heads, vocabulary 256.
  Works offline.
- ``path/to/file.py:factory`` or ``package.module:factory`` -- ``factory()`` returns a ``nn.Module`` or a
  ``(module, example_inputs)`` pair (a tuple of positional arguments or a dict of keyword arguments).
- anything else is a Hugging Face config name or a local path (a folder holding ``config.json``, or the file
  itself): the model is built from the config with random weights, or with ``pretrained=True`` loaded with its
  weights (``from_pretrained``; needs the weights locally or a network).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect as pyinspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


class SpecError(ValueError):
    """A model spec that cannot be turned into a model; the message says what was tried and what to do."""


@dataclass
class LoadedModel:
    model: nn.Module
    example_inputs: Any  # None for Hugging Face models (inspect/convert make their own)
    description: str
    hf: bool


def load_model(spec: str, *, pretrained: bool = False, attn_implementation: str = "sdpa") -> LoadedModel:
    """The model named by ``spec`` (see the module docstring), in eval mode."""
    if not spec or not isinstance(spec, str):
        raise SpecError("model spec is empty: give tiny:<family>, file.py:factory, module:factory or a HF config")
    if spec.startswith("tiny:"):
        loaded = _tiny(spec[5:], attn_implementation)
    elif (factory := _split_factory(spec)) is not None:
        loaded = _factory(spec, *factory)
    else:
        loaded = _hf(spec, pretrained, attn_implementation)
    loaded.model.eval()
    return loaded


def _tiny(family: str, attn_implementation: str) -> LoadedModel:
    import transformers as tf

    try:
        cfg = tf.AutoConfig.for_model(family, **TINY)
    except ValueError as e:
        raise SpecError(
            f"tiny:{family}: not a Hugging Face model type this transformers knows "
            f"({str(e)[:80]}...); try tiny:llama, tiny:qwen2, tiny:gpt2 or tiny:gpt_neox"
        ) from e
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    return _from_config(cfg, f"tiny random {family} (2 layers, hidden 64, 4/2 heads)", attn_implementation)


def _from_config(cfg: Any, description: str, attn_implementation: str) -> LoadedModel:
    import transformers as tf

    try:
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    except (ValueError, ImportError):  # no such attention implementation for this family: its default
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return LoadedModel(model, None, description, True)


def _hf(spec: str, pretrained: bool, attn_implementation: str) -> LoadedModel:
    import transformers as tf

    path = Path(spec)
    source = str(path.parent) if path.is_file() and path.name.endswith(".json") else spec
    try:
        if pretrained:
            model = tf.AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn_implementation)
            return LoadedModel(model, None, f"{spec} (pretrained weights)", True)
        cfg = tf.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise SpecError(
            f"model spec {spec!r} is neither tiny:<family>, a file.py:factory / module:factory spec, nor a "
            f"Hugging Face config that can be loaded here ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Offline, give a local folder with config.json or use tiny:llama."
        ) from e
    return _from_config(cfg, f"{spec} (random weights from its config)", attn_implementation)


def _split_factory(spec: str) -> tuple[str, str] | None:
    """``(file or module, factory)`` for a ``file.py:factory`` / ``module:factory`` spec, None for other specs;
    a spec that is meant as one but is malformed raises :class:`SpecError` (Hugging Face ids have no ':')."""
    if ":" not in spec or Path(spec).exists():
        return None
    drive, rest = ("", spec) if not (len(spec) > 2 and spec[1] == ":" and spec[0].isalpha()) else (spec[:2], spec[2:])
    if ":" not in rest:
        return None  # a Windows path
    left, _, name = rest.rpartition(":")
    left = drive + left
    form = "path/to/file.py:factory or package.module:factory"
    if ":" in left.removeprefix(drive):
        raise SpecError(
            f"model spec {spec!r}: a factory spec has one ':' between the file or module and the name ({form})"
        )
    if not name:
        raise SpecError(f"model spec {spec!r}: no factory name after ':' (give {form})")
    if not name.isidentifier():
        raise SpecError(f"model spec {spec!r}: factory {name!r} is not a Python name ({form})")
    if not left.endswith(".py") and not all(p.isidentifier() for p in left.split(".")):
        raise SpecError(f"model spec {spec!r}: {left!r} is neither a .py file nor a dotted module name ({form})")
    return left, name


def _factory(spec: str, left: str, name: str) -> LoadedModel:
    if left.endswith(".py"):
        path = Path(left)
        if not path.is_file():
            raise SpecError(f"model spec {spec!r}: file {left} does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(left)
        except ImportError as e:
            raise SpecError(f"model spec {spec!r}: cannot import module {left!r} ({e})") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SpecError(f"model spec {spec!r}: {left} has no callable {name!r}")
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        model, example = made
    elif isinstance(made, nn.Module):
        model, example = made, None
    else:
        raise SpecError(f"model spec {spec!r}: {name}() must return an nn.Module or (module, example_inputs)")
    hf = type(model).__module__.startswith("transformers.")
    if example is None and not hf:
        raise SpecError(
            f"model spec {spec!r}: {type(model).__name__} is not a Hugging Face model, so {name}() must return "
            "(module, example_inputs) with a tuple of positional arguments or a dict of keyword arguments"
        )
    doc = (pyinspect.getdoc(factory) or "").splitlines()
    return LoadedModel(model, example, f"{spec}" + (f" ({doc[0]})" if doc else ""), hf)
