"""The ``mka`` torch.compile backend: ``torch.compile(model, backend="mka", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so it works without importing mka_compile.
For every graph dynamo hands over:

- ``mka::`` ops of a converted model (FastMKA mixes, MKA attention) stay as ops: opaque to Inductor,
  Triton on CUDA, the torch reference on CPU; their autograd formulas give the backward.
- Attention sites of the original model code (eager matmul-softmax-matmul with scale and mask, or SDPA)
  are found by the attention rules and lowered to ``mka::flash_attention`` (``attention="mka"``, default),
  to ``F.scaled_dot_product_attention`` (``"sdpa"``) or left alone (``"keep"``); see
  :mod:`mka_compile.backend.lowering`. The site table and the reasons other softmaxes were not taken are
  logged (logger ``mka_compile.backend``) and kept: :func:`last_report`, :func:`reports`.
- Inductor compiles the rest (``torch._dynamo.lookup_backend("inductor")``, through AOTAutograd, so
  training works).

The backend does not convert. A model gets MKA from :func:`mka_compile.convert`, and trained MKA weights reach
the backend through the converted-checkpoint loader (:func:`mka_compile.load_converted`, or convert +
``load_state_dict``): the converted model's ``mka::`` ops are what it compiles.

Options: ``mode`` (None | "fastmka" | "mka": the mode the model must have been converted with), ``attention``
("mka" | "sdpa" | "keep"), ``inductor`` (a dict of Inductor config patches), ``compiler`` ("inductor", default, or
"aot_eager": AOTAutograd without Inductor's code generation, for debugging and fast checks). ``weights`` and
``config`` are refused with the advice above.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from mka_compile.backend.lowering import SYMBOLIC, Lowered, lower_sites
from mka_compile.backend.options import CONVERT_HINT, OPTION_KEYS, BackendError, BackendOptions, parse_options
from mka_compile.graph import ops
from mka_compile.graph.capture import Captured
from mka_compile.passes.attention import RULES, find_sites
from mka_compile.report import NotAttention

__all__ = [
    "OPTION_KEYS",
    "BackendError",
    "BackendOptions",
    "GraphReport",
    "graph_count",
    "last_report",
    "mka_backend",
    "parse_options",
    "prepare_decode",
    "reports",
    "reset",
]

log = logging.getLogger("mka_compile.backend")

_REPORTS: list[GraphReport] = []


@dataclass
class GraphReport:
    """What the backend did with one dynamo graph."""

    index: int  # 0, 1, ... over the graphs compiled since :func:`reset`
    sites: list[Lowered]
    not_attention: list[NotAttention]
    mka_ops: dict[str, int]  # mka:: ops already in the graph (a converted model) -> count
    num_inputs: int = 0

    def __str__(self) -> str:
        lines = [f"mka backend, graph {self.index}: {len(self.sites)} attention site(s)"]
        if self.mka_ops:
            lines.append("  mka:: ops kept: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.mka_ops.items())))
        if self.sites:
            w = max(len(s.name or "<root>") for s in self.sites)
            lines.append(f"  {'site':<{w}}  {'rule':<26} attention")
            for s in self.sites:
                what = s.action + (f" ({s.reason})" if s.reason else "")
                lines.append(f"  {s.name or '<root>':<{w}}  {s.rule:<26} {what}")
        for r in self.not_attention:
            lines.append(f"  not attention: {r.node} in {r.module or '<root>'}: {r.reason}")
        return "\n".join(lines)


def reports() -> list[GraphReport]:
    """Reports of every graph compiled by the backend since :func:`reset` (one per dynamo graph)."""
    return list(_REPORTS)


def last_report() -> GraphReport | None:
    """The report of the most recently compiled graph (None before the first)."""
    return _REPORTS[-1] if _REPORTS else None


def graph_count() -> int:
    """How many graphs the backend compiled since :func:`reset` (recompilations included)."""
    return len(_REPORTS)


def reset() -> None:
    """Forget the reports (``torch._dynamo.reset()`` does not clear them)."""
    _REPORTS.clear()


# ---------------------------------------------------------------------------------------------- backend


def _mka_ops(gm: fx.GraphModule) -> dict[str, int]:
    count: Counter[str] = Counter()
    for n in gm.graph.nodes:
        packet = getattr(n.target, "_overloadpacket", n.target)  # OpOverload or OpOverloadPacket
        name = getattr(packet, "_qualified_op_name", "") if n.op == "call_function" else ""
        if name.startswith("mka::"):
            count[name] += 1
    return dict(count)


def _check_mode(opts: BackendOptions, mka_ops: dict[str, int], has_sites: bool) -> None:
    converted = "mka" if "mka::mka_attention" in mka_ops else "fastmka" if mka_ops else None
    if converted and opts.mode is not None and opts.mode != converted:
        raise BackendError(f"options['mode']={opts.mode!r} but the model was converted to {converted!r}")
    if opts.mode is not None and not converted and has_sites:
        raise BackendError(f"options['mode']={opts.mode!r} but this model is not converted: {CONVERT_HINT}")


def _own_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of dynamo's GraphModule to rewrite (dynamo reads its own graph's placeholders after the backend),
    with what AOTAutograd reads of a dynamo graph: ``meta``, parameter sources, placeholder sources."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    old_out = next(iter(reversed(gm.graph.nodes)))
    graph.output(out, type_expr=old_out.type).meta = dict(old_out.meta)
    for old, new in env.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    for attr in ("_param_name_to_source", "_source_to_user_stacks", "compile_subgraph_reason"):
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    return copy


@contextmanager
def _concrete_meta(gm: fx.GraphModule) -> Iterator[None]:
    """Node values with the example's sizes instead of symbolic ones while the rules read shapes: reading a
    symbolic size as an int would add a guard and specialize the graph (a recompilation per decode step).
    A node that replaces one (its metadata copied by the rewrite) gets the symbolic value back too."""
    for n in gm.graph.nodes:
        for key in ("val", "example_value"):
            v = n.meta.get(key)
            if isinstance(v, torch.SymInt) and v.node.hint is not None:
                n.meta[key], n.meta[SYMBOLIC] = int(v.node.hint), v
                n.meta[_SYMBOLIC_KEYS] = (*n.meta.get(_SYMBOLIC_KEYS, ()), key)
            elif isinstance(v, torch.Tensor) and any(isinstance(x, torch.SymInt) for x in v.shape):
                hints = [x.node.hint if isinstance(x, torch.SymInt) else x for x in v.shape]
                if any(h is None for h in hints) or not hasattr(v, "fake_mode"):
                    continue
                n.meta[SYMBOLIC] = v
                n.meta[_SYMBOLIC_KEYS] = (*n.meta.get(_SYMBOLIC_KEYS, ()), key)
                with v.fake_mode:
                    n.meta[key] = torch.empty(hints, dtype=v.dtype, device=v.device)
    try:
        yield
    finally:
        for n in gm.graph.nodes:
            if SYMBOLIC in n.meta:
                v = n.meta.pop(SYMBOLIC)
                for key in n.meta.pop(_SYMBOLIC_KEYS):
                    n.meta[key] = v


_SYMBOLIC_KEYS = "mka_symbolic_keys"  # which of "val" / "example_value" hold a concrete value in its place


def _rewrite(gm: fx.GraphModule, example_inputs: list[Any], opts: BackendOptions) -> GraphReport:
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, x in zip(holders, example_inputs):
        if isinstance(x, nn.Parameter) or "_parameters_" in n.name or "_buffers_" in n.name:
            n.meta["mka_param"] = True  # dynamo lifts weights to inputs
    mka_ops = _mka_ops(gm)
    candidates = any(ops.kind(n, gm) in ("softmax", "sdpa", "mka_attention") for n in gm.graph.nodes)
    facts, rejected = [], []
    values = [
        int(x.node.hint) if isinstance(x, torch.SymInt) and x.node.hint is not None else x for x in example_inputs
    ]
    captured = Captured(gm=gm, inputs=values, method="dynamo")  # the rules evaluate masks on the example
    if candidates:
        facts, rejected = find_sites(captured, RULES)
    _check_mode(opts, mka_ops, bool(facts))
    lowered = lower_sites(facts, captured, opts.attention)
    not_attention = [NotAttention(r.node, r.module, r.closest_rule, r.reason) for r in rejected]
    return GraphReport(len(_REPORTS), lowered, not_attention, mka_ops, len(example_inputs))


def mka_backend(
    gm: fx.GraphModule, example_inputs: list[Any], *, options: Mapping[str, Any] | None = None, mode: str | None = None
):
    """The ``mka`` backend (see the module docstring). ``options``: the ``options=`` of ``torch.compile``;
    ``mode``: torch.compile's ``mode`` (Inductor's modes, e.g. ``"max-autotune"``)."""
    opts = parse_options(options)
    gm = _own_copy(gm)
    with _concrete_meta(gm):
        report = _rewrite(gm, example_inputs, opts)
    _REPORTS.append(report)
    if report.sites or report.mka_ops:
        log.info("%s", report)
    inputs = list(example_inputs)
    if opts.compiler == "aot_eager":  # AOTAutograd without Inductor's code generation (debugging, fast tests)
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, inputs)
    else:
        patches: dict[str, Any] = {}
        if mode is not None:
            from torch._inductor import list_mode_options

            patches.update(list_mode_options(mode))
        patches.update(opts.inductor)
        inductor = torch._dynamo.lookup_backend("inductor")
        compiled = inductor(gm, inputs, config_patches=patches) if patches else inductor(gm, inputs)
    return compiled


def prepare_decode(model: nn.Module, max_len: int | None = None) -> nn.Module:
    """Make a converted model's cached decoding compile to a bounded number of graphs; returns ``model``.

    Every converted site preallocates ``max_len // chunk_size`` long-term summary slots (as for export)
    instead of growing its buffer by doubling: a growing buffer changes shapes and its Python-int bookkeeping
    is specialized by dynamo, so each decode step would compile a new graph. ``max_len`` (prompt plus new
    tokens, padding included) defaults to ``model.config.max_position_embeddings``; a longer sequence raises
    a clear error in ``mka::chunk_update``. Call it after :func:`mka_compile.convert`, before compiling.
    """
    from mka_compile.sites.memory import SiteMemory

    sites = [m for m in model.modules() if isinstance(m, SiteMemory)]
    if not sites:
        raise ValueError("prepare_decode: the model has no converted site; call mka_compile.convert(model) first")
    if max_len is None:
        max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if max_len is None:
            raise ValueError("prepare_decode: pass max_len (the model has no config.max_position_embeddings)")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"prepare_decode: max_len must be a positive int, got {max_len!r}")
    for m in sites:
        m.fixed_slots = max(1, max_len // m.config.chunk_size)
    return model
