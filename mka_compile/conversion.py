"""One-line conversion: ``mka_compile.convert(model)`` turns causal self-attention sites into FastMKA
(or, with ``mode="mka"``, MKA: see :mod:`mka_compile.hf.attention`). The run-time side of a converted
site is :mod:`mka_compile.sites.memory`; this module plans and installs.

FastMKA only changes what attention reads: ``kf = sum_l lam_l k_l`` (and ``vf``) in the space of the
site's k/v projections, before its norm, RoPE, cache and attention, which stay the model's own. So a
site is converted without touching model classes: its new parameters (router, gate) live in a
submodule ``<site>.mka`` (they appear in ``state_dict()``, move with ``.to()``, train with any
optimizer), and module hooks (PyTorch's extension point) route the k/v projection outputs:

- a pre-hook on the site module reads which tokens are real (from the attention mask) and which cache
  object this call uses (the MKA state: session EMA and long-term chunk state, rides with that cache, so
  ``generate()`` decoding equals a full forward);
- hooks on the q/k/v projections record q and replace k/v by the routed mix.

The gate starts at 0: the converted model equals the original exactly, and training moves the gate
(and then the router) from the first steps. Conversion is atomic: every site is checked before any is
changed, and a failure leaves the model as it was, naming the sites and reasons.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from mka_compile.attention_intercept import AttentionToMKA
from mka_compile.config import MKAConfig, config_to_dict
from mka_compile.graph import ops
from mka_compile.hf import attention as hf_attention
from mka_compile.inspection import inspect_with_facts
from mka_compile.passes.attention import SiteFacts
from mka_compile.passes.attention.common import provenance
from mka_compile.report import Site
from mka_compile.sites import hooks as site_hooks
from mka_compile.sites.memory import SiteMemory
from mka_compile.sites.stats import memory_parameters, routing_stats

__all__ = ["ConversionError", "SiteMemory", "convert", "memory_parameters", "routing_stats"]


class ConversionError(ValueError):
    """Some sites cannot be converted; ``problems`` lists ``(site, reason)``. The model is unchanged."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {name or '<root>'}: {why}" for name, why in problems)
        super().__init__(f"cannot convert {len(problems)} site(s); the model was not changed:\n{lines}")


CONFIG_RECORD = "mka_compile"  # the conversion's mode and MKAConfig, on a Hugging Face model's config
MODULE_CACHES = ("slice_assign", "index_copy", "index_put")  # a KV cache buffer the site writes itself


@dataclass
class _Plan:
    site: Site
    mods: tuple[nn.Module, ...]  # (q, k, v) projections, or (fused,)
    maps: dict[str, torch.Tensor] | None = None  # fused: output features of q, k, v, each [heads, d]


def _install(model: nn.Module, plan: _Plan, config: MKAConfig, mode: str) -> None:
    site = plan.site
    owner = model.get_submodule(site.name) if site.name else model
    ref = next(plan.mods[0].parameters(), None)
    mem = SiteMemory(site, site.num_heads * site.head_dim, config, mode)
    if ref is not None:
        mem.to(device=ref.device, dtype=ref.dtype)
    owner.add_module("mka", mem)
    if config.bounded:
        mem.layer_idx = site_hooks._layer_index(owner)
        mem.trained_length = _trained_length(model, config) if site.rope is not None else 0
        freqs = hf_attention.rope_frequencies(model, site.head_dim) if site.rope is not None else None
        if freqs is not None:  # moves keys past the trained length; turns keys back for the bounds recall
            mem.rope_freqs = freqs.to(device=mem.gate.device)

    if hf_attention.hf_config(model) is None:  # outside transformers
        if mode == "mka":
            mem.intercept = AttentionToMKA(mem)
        if site.cache in MODULE_CACHES:
            mem.position_arg = site_hooks.position_argument(owner)
            if mem.position_arg is None:
                warnings.warn(
                    f"site {site.name or '<root>'!r} keeps its own KV cache ({site.cache}) but its forward has no "
                    f"argument that gives the write position (one of {site_hooks.POSITION_NAMES}, or one int "
                    "argument): every call starts a new sequence in the MKA memory, so cached decoding will not see "
                    "the memory of earlier calls",
                    stacklevel=3,
                )
    site_hooks.install(owner, mem, plan.mods, plan.maps)
    owner.mka_mode = mode


def _feature_map(facts: SiteFacts, role: str, heads: int, d: int) -> torch.Tensor | str:
    """``[heads, d]``: which output features of the fused projection form ``role`` (q, k or v).

    Runs the pure layout/selection ops between the projection and the operand on a probe whose entries
    encode ``(token, feature)``, so any split / chunk / view / slice / index spelling is read exactly."""
    prov = provenance(facts.match, role)
    proj, top = prov.projection, prov.layout_top
    shape = ops.shape(proj)
    if top is None or shape is None or len(shape) not in (2, 3):
        return f"cannot read the {role} layout of the fused projection {prov.module}"
    F_ = shape[-1]
    rows = torch.arange(math.prod(shape[:-1]), dtype=torch.float64).view(*shape[:-1], 1)  # token index
    probe = rows * F_ + torch.arange(F_, dtype=torch.float64)  # (..., F): encodes (token, feature)
    needed, todo = set(), [top]
    while todo:
        n = todo.pop()
        if n not in needed and n is not proj:
            needed.add(n)
            todo.extend(n.all_input_nodes)
    interp = fx.Interpreter(facts.match.gm)
    interp.env[proj] = probe
    for n in facts.match.gm.graph.nodes:
        if n in needed:
            if n.op == "placeholder":
                return f"the {role} layout of {prov.module} depends on a model input"
            interp.env[n] = interp.run_node(n)
    r = interp.env[top]
    if not isinstance(r, torch.Tensor) or r.dim() < 3 or d not in r.shape[-2:]:
        return f"unexpected {role} layout of the fused projection {prov.module}"
    # the features sit last, or second to last where eager scores read k^T; with as many tokens as features, try both
    tries = [x for x in (r, r.transpose(-1, -2)) if x.shape[-1] == d]
    found = [_selection(x, F_, heads, d) for x in tries]
    fmap = next((f for f in found if not isinstance(f, str)), None)
    if fmap is not None:
        return fmap
    why = found[0]
    if why == "no token axis":
        return f"cannot find the token axis of the {role} layout of {prov.module} (capture with more tokens)"
    return f"the {role} layout of {prov.module} is not the same selection for every token"


def _selection(r: torch.Tensor, F_: int, heads: int, d: int) -> torch.Tensor | str:
    """``[heads, d]`` feature indices of a probe's layout ``r: [..., d]`` (entries ``token * F_ + feature``), or
    why not (``"no token axis"``, ``"not one selection"``)."""
    token = torch.div(r, F_, rounding_mode="floor")
    t_axis = next((a for a in range(r.dim() - 1) if r.shape[a] > 1 and bool((token.diff(dim=a) == 1).all())), None)
    if t_axis is None:
        return "no token axis"
    T = r.shape[t_axis]
    r = r.movedim(t_axis, -2).reshape(-1, heads, T, d)  # (batch, heads, T, d)
    fmap = (r[0, :, 0, :] % F_).long()  # (heads, d)
    expect = torch.arange(T, dtype=torch.float64)[None, :, None] * F_ + fmap[:, None, :].double()  # (heads, T, d)
    if not bool((r[0] == expect).all()):
        return "not one selection"
    return fmap


def _outermost_wrapper(model: nn.Module, path: str) -> str:
    """``path``, or the module that wraps it as its ``base_layer`` (PEFT's adapter layers, and wrappers that follow
    the convention): the module the site calls, whose output the memory must mix."""
    while "." in path:
        parent = path.rsplit(".", 1)[0]
        if getattr(model.get_submodule(parent), "base_layer", None) is not model.get_submodule(path):
            break
        path = parent
    return path


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Switch off adapter layers (modules with ``base_layer`` and ``enable_adapters``, PEFT's tuner layers) while the
    model is captured, so detection sees their base projections; restored after."""
    layers = [m for m in model.modules() if hasattr(m, "base_layer") and callable(getattr(m, "enable_adapters", None))]
    was = [not bool(getattr(m, "disable_adapters", False)) for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, on in zip(layers, was):
            m.enable_adapters(on)


def _plan(model: nn.Module, site: Site, facts: SiteFacts) -> _Plan | str:
    names = (site.q_proj, site.k_proj, site.v_proj)
    modules = [_outermost_wrapper(model, n.split("[", 1)[0]) for n in names]
    try:
        mods = tuple(model.get_submodule(n) for n in modules)
    except AttributeError as exc:
        return f"projection module not found: {exc}"
    if not any("[" in n for n in names) and len(set(modules)) == 3:
        return _Plan(site, mods)
    if len(set(modules)) != 1:
        return f"q, k and v come from partly fused projections ({', '.join(names)}); not supported yet"
    maps = {}
    for role, heads in (("q", site.num_heads), ("k", site.num_kv_heads), ("v", site.num_kv_heads)):
        fmap = _feature_map(facts, role, heads, site.head_dim)
        if isinstance(fmap, str):
            return fmap
        maps[role] = fmap
    return _Plan(site, (mods[0],), maps)


def _check_mka_dispatch(model: nn.Module, names: list[str], example_inputs: Any) -> None:
    """One forward: every MKA site must have attended through MKA. Hugging Face sites that do not dispatch through
    ``AttentionInterface`` (Falcon) get the inline interceptor instead and are checked again."""
    try:
        missing = hf_attention.check_dispatch(model, names, example_inputs)
        if missing and hf_attention.hf_config(model) is not None:
            if len(missing) == len(names):  # no site dispatches: keep the model's own attention implementation
                hf_attention.restore_attention(model)
            for name in missing:
                mem = model.get_submodule(name).mka
                mem.intercept = AttentionToMKA(mem)
            missing = hf_attention.check_dispatch(model, missing, example_inputs)
    except hf_attention.DispatchRefused as e:
        raise ConversionError([(n, str(e)) for n in names]) from None
    if missing:
        raise ConversionError(
            [(n, "MKA mode found no attention to answer at this site (use FastMKA)") for n in missing]
        )


def _bounded_problem(model: nn.Module, plan: _Plan, config: MKAConfig) -> str | None:
    """Where bounded memory needs the model's RoPE frequencies (positions beyond its trained length), whether it has
    them, and whether the bounded set fits in the trained length."""
    site = plan.site
    length = _trained_length(model, config)
    bounds = config.exact_recall > 0 and config.chunk_keys == "bounds"
    if site.rope is not None and bounds and hf_attention.rope_frequencies(model, site.head_dim) is None:
        return (
            "bounded memory's recall by bounds (chunk_keys='bounds') turns keys back to position 0, which needs the "
            "RoPE frequencies (a rotary module's inv_freq buffer); none (or several different ones) found: use "
            "chunk_keys='mean'"
        )
    if site.rope is None or not length:
        return None
    if hf_attention.rope_frequencies(model, site.head_dim) is None:
        return (
            "bounded memory moves sinks and recalled chunks within the model's trained length, which needs the RoPE "
            "frequencies (a rotary module's inv_freq buffer); none (or several different ones) found: pass "
            "MKAConfig(trained_length=...) only if the model has one RoPE table"
        )
    if config.bounded_span() > length:
        return (
            f"bounded memory lays out sinks + recall_chunks * chunk_size + window + chunk_size - 1 = "
            f"{config.bounded_span()} positions, more than the model's trained length {length}: lower window or "
            "recall_chunks"
        )
    return None


def _trained_length(model: nn.Module, config: MKAConfig) -> int:
    if config.trained_length is not None:
        return config.trained_length
    cfg = hf_attention.hf_config(model)
    n = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
    return int(n) if isinstance(n, int) and n > 0 else 0


def _check_bounded_dispatch(model: nn.Module, names: list[str], example_inputs: Any) -> None:
    """One forward: every bounded site must have answered its attention (transformers' ``AttentionInterface``)."""
    try:
        missing = hf_attention.check_dispatch(model, names, example_inputs)
    except hf_attention.DispatchRefused as e:
        raise ConversionError([(n, str(e)) for n in names]) from None
    if missing:
        raise ConversionError(
            [
                (n, "bounded memory (window=...) needs the site to call its attention through transformers' "
                 "AttentionInterface; this one computes it inline (convert without window=)")
                for n in missing
            ]
        )  # fmt: skip


def convert(
    model: nn.Module,
    mode: str = "fastmka",
    config: MKAConfig | None = None,
    example_inputs: Any = None,
    *,
    allow_partial: bool = False,
) -> nn.Module:
    """Convert every convertible self-attention site of ``model`` to FastMKA or MKA, in place; returns ``model``.

    ``mode="fastmka"``: the site attends to the routed mix of its memory levels (any model). ``mode="mka"``:
    the site attends to each level and mixes the outputs: through transformers' ``AttentionInterface``, or, where
    a site computes attention itself (Falcon, nanoGPT, Meta's Llama), by answering its SDPA call or its
    matmul - softmax - matmul (:mod:`mka_compile.attention_intercept`); no, rotate-half, interleaved or complex
    RoPE; dynamic caches, or a site's own cache written at a position argument.

    ``config`` defaults to ``MKAConfig()``; its ``gate_init`` (None unless set) starts the gate at 0: the converted
    model equals the original until it is trained, whatever else the config sets. Bidirectional self-attention sites
    (encoders) are converted only with ``causal=False`` in the config, with the non-causal memory of
    :mod:`mka_compile.layers.noncausal`. ``example_inputs`` as for :func:`mka_compile.inspect` (optional for Hugging
    Face models).
    Raises :class:`ConversionError` (model unchanged) when a convertible site cannot be converted, and when the
    model has attention-like softmaxes (multiplied with values) that no rule took as a site: they would stay
    original while their neighbours convert. ``allow_partial=True`` converts the sites found and warns, naming them.
    """
    if mode not in ("fastmka", "mka"):
        raise ValueError(f"mode must be 'fastmka' or 'mka', got {mode!r}")
    config = MKAConfig() if config is None else config
    if not isinstance(config, MKAConfig):
        raise ValueError(f"config must be an MKAConfig, got {type(config).__name__}")
    with adapters_off(model):  # LoRA-style wrappers: find the sites through the wrapped projections
        report, facts = inspect_with_facts(model, example_inputs)
    plans, problems = [], []
    for site, fact in zip(report.sites, facts):
        if site.status != "original":
            problems.append((site.name, f"already converted ({site.status})"))
            continue
        if not site.convertible and site.kind == "self" and site.causal:
            problems.append((site.name, site.reason or "not convertible"))
            continue
        if not site.convertible and not (site.kind == "self" and not site.causal and not config.causal):
            continue  # cross-attention, and bidirectional sites unless MKAConfig(causal=False)
        plan = _plan(model, site, fact)
        if (mode == "mka" or config.bounded) and not isinstance(plan, str):
            plan = hf_attention.mka_mode_problem(model, plan, bounded=config.bounded) or plan
        if config.bounded and not isinstance(plan, str):
            plan = _bounded_problem(model, plan, config) or plan
        if isinstance(plan, str):
            problems.append((site.name, plan))
        else:
            plans.append(plan)
    left = [r for r in report.not_attention if r.attention_like]
    if left and plans:
        what = [(r.module, f"attention-like softmax {r.node} left original: {r.reason}") for r in left]
        if not allow_partial:
            hint = "; pass allow_partial=True to convert only the sites found"
            problems += [(name, why + hint) for name, why in what]
        else:
            warnings.warn(
                f"partial conversion: {len(left)} attention-like softmax(es) left original: "
                + "; ".join(f"{name or '<root>'}: {why}" for name, why in what),
                stacklevel=2,
            )
    if problems:
        raise ConversionError(problems)
    if not plans:
        reasons = [(s.name, s.reason or "not convertible") for s in report.sites] or [("", "no attention site found")]
        raise ConversionError(reasons)
    done = []
    try:
        if mode == "mka" or config.bounded:
            hf_attention.route_attention(model)
        for plan in plans:
            _install(model, plan, config, mode)
            done.append(plan.site)
        if config.bounded:
            _check_bounded_dispatch(model, [p.site.name for p in plans], example_inputs)
        elif mode == "mka":
            _check_mka_dispatch(model, [p.site.name for p in plans], example_inputs)
        site_hooks.install_root(model)
    except Exception:
        unconvert(model, [model.get_submodule(s.name) if s.name else model for s in done])  # as it was
        raise
    cfg = hf_attention.hf_config(model)
    if cfg is not None:  # plain model.save_pretrained records the conversion (mka_compile.from_pretrained reads it)
        setattr(cfg, CONFIG_RECORD, {"mode": mode, "config": config_to_dict(config)})
    return model


def unconvert(model: nn.Module, owners: list[nn.Module] | None = None) -> None:
    """Undo :func:`convert` on ``model`` (its sites, or ``owners``): hooks, ``.mka`` modules and classes, attention
    routing and the record on the Hugging Face config. Used to roll back a failed conversion or load."""
    if owners is None:
        owners = [m for m in model.modules() if isinstance(getattr(m, "mka", None), SiteMemory)]
    for owner in owners:
        site_hooks.remove(owner.mka)
        del owner.mka
        if "mka_mode" in vars(owner):
            del owner.mka_mode
    site_hooks.remove_root(model)
    hf_attention.restore_attention(model)
    cfg = hf_attention.hf_config(model)
    if cfg is not None and hasattr(cfg, CONFIG_RECORD):
        delattr(cfg, CONFIG_RECORD)
