"""Rule family ``lower.attention``: rewrite plain attention sites to one attention call (the ``mka`` backend).

A site found by the attention rules (``attention.eager.*``: matmul - scale - mask - softmax - matmul, or
``attention.sdpa``) becomes one ``call_function`` node running :func:`eager_attention` / :func:`sdpa_attention`,
which AOTAutograd traces into ``mka::flash_attention`` (Triton on CUDA, the torch reference on CPU; autograd through
``mka::flash_attention_backward``) or into ``F.scaled_dot_product_attention`` (Inductor's fused kernels).

:func:`plan` reads the scale and masks from the site's facts (:class:`~.scores.Scores`, read once by the site
rules) and checks what only a rewrite cares about (the ops between the scores and the values, dropout, layouts):
the arguments of the replacement, or the reason the site is kept. :func:`rules` turns the plans into
:class:`~mka_compile.graph.rules.Rule` objects with replacements, for a ``PassManager`` (which verifies shapes,
dtypes and the ops inserted). The replacement computes what the original ops compute, with two documented
differences of ``mka::flash_attention``: additive mask values <= -1e4 hide a key exactly (as -inf), and a query row
that sees no key at all gives zeros (eager softmax gives NaN or an average over masked keys there).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mka_compile.graph import ops
from mka_compile.graph.capture import Captured
from mka_compile.graph.pattern import Match, any_, op
from mka_compile.graph.rules import Rule
from mka_compile.kernels.flash_attention import flash_attention

from .sites import SiteFacts

_SCORE_OPS = frozenset({"matmul", "baddbmm", "mul", "div", "add", "masked_fill", "where", "softmax"}) | ops.TRANSPARENT

# ------------------------------------------------------------------------------------ run-time functions


def _fit_mask(mask: torch.Tensor, tq: Any, tk: Any) -> torch.Tensor:
    """A mask broadcastable to the scores ``[..., Tq, Tk]`` as ``[B or 1, H or 1, Tq, Tk]`` (a view)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(mask.shape[0], mask.shape[1], tq, tk)


def _combine(additive: torch.Tensor | None, hide: torch.Tensor | None, keep: torch.Tensor | None):
    """One mask from the site's layers: bool (True = attend) or additive float; None without layers."""
    allowed = None
    if hide is not None:
        allowed = ~hide.bool()
    if keep is not None:
        allowed = keep.bool() if allowed is None else allowed & keep.bool()
    if additive is None:
        return allowed
    if allowed is None:
        return additive
    return additive.masked_fill(~allowed, -torch.inf)


def eager_attention(
    q: torch.Tensor,
    kt: torch.Tensor,
    v: torch.Tensor,
    additive: torch.Tensor | None = None,
    hide: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    factor: Any = None,
    *,
    scale: float,
    bias_scale: float = 1.0,
    divide: bool = False,
    target: str = "mka",
) -> torch.Tensor:
    """``softmax(scale * q @ kt + bias_scale * bias + additive, masked by hide/keep) @ v`` as one attention call.

    ``q: [..., Tq, d]``, ``kt: [..., d, Tk]`` (keys transposed), ``v: [..., Tk, d]`` with ``...`` = (B, H) or
    (N,); ``factor``: a tensor (or symbolic) scale multiplying (``divide=False``) or dividing ``q``."""
    if factor is not None:
        q = q / factor if divide else q * factor
    k = kt.transpose(-1, -2)  # (..., Tk, d)
    flat = q.dim() == 3
    if flat:  # (N, T, d) -> (1, N, T, d)
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if bias is not None:
        bias = bias * bias_scale
        additive = bias if additive is None else additive + bias
    mask = _combine(additive, hide, keep)
    if mask is not None:
        mask = _fit_mask(mask, q.shape[-2], k.shape[-2])
    if target == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        out = flash_attention(q, k, v, mask, scale=scale)
    return out.squeeze(0) if flat else out


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    is_causal: bool,
    square: bool,
    scale: float,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, mask, is_causal=..., scale=...)`` (no dropout, GQA allowed) on
    ``mka::flash_attention``. ``square``: Tq == Tk is known statically (then SDPA's top-left causal mask is
    the op's bottom-right one)."""
    flat = q.dim() == 3
    if flat:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    tq, tk = q.shape[-2], k.shape[-2]
    if mask is not None:
        mask = _fit_mask(mask, tq, tk)
    causal = False
    if is_causal and square:
        causal = True
    elif is_causal:  # SDPA's causal mask is aligned top-left
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()[None, None]
    out = flash_attention(q, k, v, mask, scale=scale, causal=causal)
    return out.squeeze(0) if flat else out


# ------------------------------------------------------------------------------------------ plans and rules


def _dim(node: Any) -> int | None:
    v = ops.value(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _chain(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """Nodes on a path from ``start`` to ``end`` (both included), in graph order."""
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    lo, hi = order[start], order[end]
    down, todo = set(), [start]
    while todo:
        n = todo.pop()
        if n in down or order[n] > hi:
            continue
        down.add(n)
        todo.extend(n.users)
    up, todo = set(), [end]
    while todo:
        n = todo.pop()
        if n in up or order.get(n, -1) < lo:
            continue
        up.add(n)
        todo.extend(n.all_input_nodes)
    return sorted(down & up, key=order.__getitem__)


def _dropout_reason(n: fx.Node, gm: fx.GraphModule) -> str | None:
    if ops.kind(n, gm) != "dropout":
        return None
    p, training = ops.arg(n, 1, "p", 0.5), ops.arg(n, 2, "training", True)
    if training is False or p == 0:
        return None
    return f"attention dropout (p={p}) at {n.name} is active: left to Inductor (set the model to eval or p=0)"


def _plan_eager(site: SiteFacts, gm: fx.GraphModule, target: str) -> dict[str, Any] | str:
    c, sc = site.match.captures, site.scores
    scores, softmax, out = c["scores"], c["softmax"], c["out"]
    if ops.kind(out, gm) != "matmul":
        return f"the values are combined by {ops.kind(out, gm)} ({out.name}); only matmul layouts are lowered"
    q, kt, v = c["q"], c["kt"], out.args[1]
    if not (_dim(q) == _dim(kt) == _dim(v) and _dim(q) in (3, 4)):
        return f"q, k, v at {scores.name} are not [B, H, T, d] or [N, T, d] tensors"
    chain = _chain(scores, out)
    for n in chain[:-1]:
        outside = [u.name for u in n.users if u not in chain]
        if outside:
            return f"{n.name} is also used by {', '.join(outside)} (attention weights returned?): kept"
        if ops.kind(n, gm) not in _SCORE_OPS:
            return f"{n.name} ({ops.kind(n, gm)}) between the scores and the values is not a scale, mask or softmax"
        why = _dropout_reason(n, gm)
        if why:
            return why
    if softmax not in chain:
        return "the softmax does not lie between the scores and the values"
    if sc.refused:
        return sc.refused
    return dict(
        q=q, kt=kt, v=v, additive=sc.additive, hide=sc.hide, keep=sc.keep, bias=sc.bias, factor=sc.factor,
        scale=float(sc.scale), bias_scale=sc.bias_scale, divide=sc.divide, target=target,
    )  # fmt: skip


def _plan_sdpa(site: SiteFacts) -> dict[str, Any] | str:
    out, sc = site.match.captures["out"], site.scores
    q, k, v = (ops.arg(out, i, name) for i, name in enumerate(("query", "key", "value")))
    dropout = ops.arg(out, 4, "dropout_p", 0.0)
    if not isinstance(dropout, (int, float)) or dropout != 0:
        return f"SDPA at {out.name} has dropout_p={dropout!r}: left to Inductor (set the model to eval or p=0)"
    if sc.refused:
        return sc.refused
    qv, kv = ops.symbolic_value(q), ops.symbolic_value(k)
    if not isinstance(qv, torch.Tensor) or not isinstance(kv, torch.Tensor) or qv.dim() not in (3, 4):
        return f"SDPA at {out.name}: q is not a [B, H, T, d] or [N, T, d] tensor"
    if qv.dim() == 3 and qv.shape[0] != kv.shape[0]:
        return f"SDPA at {out.name}: 3-D q and k with different leading sizes"
    if sc.default_scale:
        int(qv.shape[-1])  # the default scale is this head size's: a symbolic head size is specialized (guarded)
    square = bool(statically_known_true(qv.shape[-2] == kv.shape[-2]))
    return dict(q=q, k=k, v=v, mask=sc.additive, is_causal=sc.causal, square=square, scale=float(sc.scale))


def plan(site: SiteFacts, captured: Captured, target: str) -> dict[str, Any] | str:
    """The arguments of ``site``'s replacement for ``target`` ("mka": ``mka::flash_attention``, "sdpa": SDPA), or
    the reason it is kept. SDPA sites are lowered only to "mka" (with "sdpa" they are SDPA already)."""
    if site.match.facts.get("not_lowered"):  # score transforms not rewritten (soft-cap, sinks, ...), MLA
        return site.match.facts["not_lowered"]
    if site.scores is None:
        return "not a plain attention site (a converted MKA site is an mka:: op already)"
    if ops.kind(site.match.captures["out"], captured.gm) == "sdpa":
        return _plan_sdpa(site)
    return _plan_eager(site, captured.gm, target)


def _planned(plans: dict[fx.Node, dict[str, Any]]):
    def planned(m: Match) -> str | None:
        bound = plans.get(m.captures["out"])
        if bound is None:
            return "not a site planned for lowering"
        m.bound.update(bound)
        return None

    return planned


def rules(plans: dict[fx.Node, dict[str, Any]]) -> tuple[Rule, Rule]:
    """``lower.attention.eager`` and ``lower.attention.sdpa``: each planned site (keyed by its output node, the
    value ``@ v`` or the SDPA call) becomes one call of :func:`eager_attention` / :func:`sdpa_attention`."""
    eager = Rule("lower.attention.eager", op("matmul", any_(), any_(), name="out"), (_planned(plans),), eager_attention)
    sdpa = Rule("lower.attention.sdpa", op("sdpa", any_(), name="out"), (_planned(plans),), sdpa_attention)
    return eager, sdpa
