"""The module of ``mka_compile.inspect``: find the attention sites of a model and explain every other softmax."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from mka_compile.graph.capture import capture_all
from mka_compile.passes.attention import RULES, SiteFacts, find_sites
from mka_compile.report import NotAttention, Report, Site


def hf_example_inputs(model: nn.Module, batch: int = 2, seq_len: int = 8) -> dict[str, Any] | None:
    """Example inputs for a Hugging Face ``PreTrainedModel`` built from its config; None otherwise."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None or not hasattr(config, "to_dict"):
        return None
    gen = torch.Generator().manual_seed(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if main == "input_ids":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = int(getattr(text, "vocab_size", 0) or 0)
        if vocab <= 0:
            return None
        ids = torch.randint(0, min(vocab, 1000), (batch, seq_len), generator=gen).to(device)
        inputs: dict[str, Any] = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, : max(2, seq_len - 2)]
        return inputs
    if main == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        chans = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, chans, size, size, generator=gen).to(device)}
    return None


def _convertible(kind: str, causal: bool, transforms: tuple[str, ...] = ()) -> tuple[bool, str | None]:
    if "latent_kv" in transforms:
        return False, (
            "multi-head latent attention (the keys concatenate a RoPE part and a no-RoPE part from different "
            "projections): not supported yet"
        )
    if kind == "cross":
        return False, "cross-attention is left alone (MKA memory is defined over the site's own sequence)"
    if not causal:
        return False, "bidirectional attention: converted only with MKAConfig(causal=False), CLI --bidirectional"
    return True, None


def _status(model: nn.Module, name: str) -> str:
    try:
        owner = model.get_submodule(name) if name else model
    except AttributeError:
        return "original"
    return str(getattr(owner, "mka_mode", "original"))


def inspect(model: nn.Module, example_inputs: Any = None, *, capture: str = "export") -> Report:
    """Find every attention site of ``model``.

    ``example_inputs``: a tuple of positional arguments or a dict of keyword arguments for
    ``model(...)``; optional for Hugging Face models (built from the config), required otherwise.
    Returns a :class:`~mka_compile.report.Report`: ``report.sites`` (name, kind, causal, heads, kv heads,
    head_dim, has_kv_cache, convertible, reason, status, and the rule/projection/RoPE/norm/cache facts)
    and ``report.not_attention`` (every other softmax with the closest rule and the reason).
    ``capture``: ``"export"`` (torch.export, aten ops; default) or ``"dynamo"`` (torch-level ops, graph
    breaks allowed).
    """
    return inspect_with_facts(model, example_inputs, capture=capture)[0]


def inspect_with_facts(
    model: nn.Module, example_inputs: Any = None, *, capture: str = "export"
) -> tuple[Report, list[SiteFacts]]:
    """:func:`inspect`, also returning the internal facts of each site (graph nodes, provenance)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        example_inputs = hf_example_inputs(model)
        if example_inputs is None:
            raise ValueError(
                f"example_inputs is required for {type(model).__name__} (not a Hugging Face model with a config): "
                "pass a tuple of positional arguments or a dict of keyword arguments for model(...)"
            )
    graphs = capture_all(model, example_inputs, capture)
    facts, rejected = [], []
    for captured in graphs:
        f, r = find_sites(captured, RULES)
        facts += f
        rejected += r
    shared = [f.name for f in fields(Site) if f.name not in ("convertible", "reason", "status")]
    sites = []
    for f in facts:
        ok, reason = _convertible(f.kind, f.causal, f.transforms)
        values = {name: getattr(f, name) for name in shared}
        sites.append(Site(**values, convertible=ok, reason=reason, status=_status(model, f.name)))
    report = Report(
        model=type(model).__name__,
        capture=graphs[0].method + (f" ({len(graphs)} graphs)" if len(graphs) > 1 else ""),
        sites=sites,
        not_attention=[NotAttention(r.node, r.module, r.closest_rule, r.reason, r.attention_like) for r in rejected],
    )
    return report, facts
