"""MKA-mode conversion for Hugging Face models: route attention through transformers' AttentionInterface.

MKA (full) changes the attention computation itself (one attention per memory level, mixed by the
router), so a converted site needs the model to call our function where it would call eager / SDPA
attention. Hugging Face models dispatch attention through ``ALL_ATTENTION_FUNCTIONS`` keyed by
``config._attn_implementation``: we register ``"mka_compile"`` there (and its mask function as the
original implementation's), point the config at it, and fall back to the original implementation for
every module that was not converted.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from mka_compile.attention_intercept import DROPOUT_REFUSED, check_mask
from mka_compile.hf import bounded as hf_bounded
from mka_compile.rope_tables import DERIVABLE

NAME = "mka_compile"


class DispatchRefused(RuntimeError):
    """A converted site's MKA attention refused the trial forward (its reason is the message)."""


def hf_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None and hasattr(cfg, "_attn_implementation") else None


def mka_mode_problem(model: nn.Module, plan, bounded: bool = False) -> str | None:
    """Why ``plan``'s site cannot be converted to MKA mode (``bounded``: to bounded memory), or None."""
    if bounded:
        return _bounded_problem(model, plan)
    site = plan.site
    rope = site.rope
    unsupported = {
        "softcap": "logit soft-capping",
        "sinks": "attention sinks (learned logits concatenated to the scores)",
        "bias": "an additive position bias on the scores (ALiBi or relative)",
        "score_scale": "a tensor scale on the scores",
        "differential": "differential attention (two attention maps per site)",
        "latent_kv": "multi-head latent attention",
        "clamp": "clamped scores",
    }
    found = [why for key, why in unsupported.items() if any(t.split("=")[0] == key for t in site.transforms)]
    if site.mask not in ("sliding_window", "chunked") and _local_layer(model, site.name):
        found.append(f"a {_local_layer(model, site.name)} attention mask (from the model's config)")
    if site.mask in ("sliding_window", "chunked"):
        found.append(f"a {'sliding-window' if site.mask == 'sliding_window' else 'chunked (local)'} attention mask")
    owner = model.get_submodule(site.name) if site.name else model
    d = site.head_dim or 1
    if hf_config(model) is not None and abs(site.scale * d**0.5 - 1) > 1e-3 and getattr(owner, "scaling", None) is None:
        found.append(f"a score scale of {site.scale:g} (not 1/sqrt(head_dim)) that the module does not declare")
    if found:
        return (
            f"MKA mode computes the attention itself and does not support {', '.join(found)} (this site has them); "
            "use FastMKA (mode='fastmka'), which keeps the site's own attention"
        )
    if hf_config(model) is None:  # outside transformers: the site's own attention is intercepted (attention_intercept)
        if plan.site.rule not in ("attention.sdpa", "attention.eager.matmul"):
            return (
                "MKA mode outside transformers needs the site's attention as one scaled_dot_product_attention call or "
                f"as matmul - softmax - matmul; this site computes it as {plan.site.rule} (use FastMKA)"
            )
        if rope is not None and rope not in DERIVABLE:
            return (
                f"MKA mode outside transformers supports no RoPE or full-width {'/'.join(DERIVABLE)} RoPE; this site "
                f"uses {rope!r} RoPE (use FastMKA)"
            )
        return None
    if rope not in (None, "rotate_half", "partial_rotate_half", "interleaved", "partial_interleaved"):
        return (
            f"MKA mode supports no RoPE, (partial) rotate-half or interleaved RoPE; this site uses "
            f"{rope!r} (use FastMKA)"
        )
    return None


def _bounded_problem(model: nn.Module, plan) -> str | None:
    """Bounded memory computes the site's attention itself, through transformers' ``AttentionInterface``."""
    if hf_config(model) is None:
        return (
            "bounded memory (window=...) answers the site's attention through transformers' AttentionInterface and "
            "keeps its keys in a transformers Cache; this model is not a transformers model (convert without window)"
        )
    why = mka_mode_problem(model, plan)
    if why is None:
        return None
    return (
        why.replace("MKA mode", "bounded memory (window=...)")
        .replace("use FastMKA (mode='fastmka'), which keeps the site's own attention", "convert without window=")
        .replace("(use FastMKA)", "(convert without window=)")
    )


def rope_frequencies(model: nn.Module, head_dim: int) -> torch.Tensor | None:
    """The RoPE frequencies ``[rot/2]`` of the model (its rotary module's ``inv_freq`` buffer), or None when there is
    none or several that differ."""
    named = model.named_buffers()
    found = [b for n, b in named if n.rsplit(".", 1)[-1] == "inv_freq" and 0 < 2 * b.numel() <= head_dim]
    if not found or any(f.shape != found[0].shape or not torch.equal(f, found[0]) for f in found[1:]):
        return None
    return found[0].detach().float().clone()


def _local_layer(model: nn.Module, name: str) -> str | None:
    """ "sliding-window" / "chunked" when the site's module is a local-attention layer by its config (a window
    longer than the example inputs does not show in the traced mask)."""
    try:
        owner = model.get_submodule(name) if name else model
    except AttributeError:
        return None
    if getattr(owner, "sliding_window", None) or getattr(owner, "is_sliding", False):
        return "sliding-window"
    cfg, idx = getattr(owner, "config", None), getattr(owner, "layer_idx", None)
    types = getattr(cfg, "layer_types", None) if cfg is not None else None
    if isinstance(types, (list, tuple)) and isinstance(idx, int) and idx < len(types):
        kind = str(types[idx])
        if "sliding" in kind or "local" in kind:
            return "sliding-window"
        if "chunk" in kind:
            return "chunked"
    return None


def _original(module: nn.Module):
    cfg = getattr(module, "config", None)
    impl = getattr(cfg, "_mka_original_attn_implementation", "eager")
    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: MKA for converted sites, the original elsewhere."""
    mem = getattr(module, "mka", None)
    if mem is None or not (mem.mode == "mka" or mem.config.bounded) or mem._call is None:
        return _original(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout:  # the model passes its attention dropout in train mode only
        raise RuntimeError(DROPOUT_REFUSED)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        check_mask(mem, attention_mask, query.shape[-2], key.shape[-2])
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if mem.config.bounded:
        return hf_bounded.site_attention(mem, query, key, value, scale), None
    return mem.attend(query, key, value, scale), None


def route_attention(model: nn.Module) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = hf_config(model)
    if cfg is None:  # not a Hugging Face model: sites intercept their own SDPA call instead
        return
    orig = cfg._attn_implementation
    if orig == NAME:
        return
    ALL_ATTENTION_FUNCTIONS.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS[orig])
    cfg._mka_original_attn_implementation = orig
    cfg._attn_implementation = NAME


def restore_attention(model: nn.Module) -> None:
    cfg = hf_config(model)
    if cfg is not None and getattr(cfg, "_mka_original_attn_implementation", None):
        cfg._attn_implementation = cfg._mka_original_attn_implementation
        del cfg._mka_original_attn_implementation


@torch.no_grad()
def check_dispatch(model: nn.Module, sites: list[str], example_inputs: Any) -> list[str]:
    """Run one forward; returns the converted ``sites`` whose attention did not go through MKA (:func:`attention`
    or an interceptor). A site's clear "MKA mode" error is raised as :class:`DispatchRefused` (``convert`` reports
    it as a conversion error)."""
    from mka_compile.inspection import hf_example_inputs

    inputs = example_inputs if example_inputs is not None else hf_example_inputs(model)
    seen: set[str] = set()
    hooks = []
    for name in sites:
        mem = model.get_submodule(name).mka

        def post(module, args, kwargs, output, name=name, mem=mem):
            if mem._call is not None and mem._call.attended:
                seen.add(name)

        hooks.append(model.get_submodule(name).register_forward_hook(post, with_kwargs=True, prepend=True))
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # a site's own KV cache is written by the run
    try:
        was = model.training
        model.eval()
        try:
            model(**inputs) if isinstance(inputs, dict) else model(*inputs)
        except RuntimeError as e:
            if "MKA mode" not in str(e):
                raise
            raise DispatchRefused(str(e)) from None
    finally:
        model.train(was)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for h in hooks:
            h.remove()
    return [n for n in sites if n not in seen]
