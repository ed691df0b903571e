"""Lower the attention sites of a dynamo graph to ``mka::flash_attention`` or SDPA (the ``mka`` backend).

A site found by the attention rules (``attention.eager.*``: matmul - scale - mask - softmax - matmul, or
``attention.sdpa``) is replaced by one ``call_function`` node running :func:`eager_attention` /
:func:`sdpa_attention`, which AOTAutograd traces into ``mka::flash_attention`` (Triton on CUDA, the torch
reference on CPU; autograd through ``mka::flash_attention_backward``) or into
``F.scaled_dot_product_attention`` (Inductor's fused kernels). Every site that is left alone gets a
reason. The replacement computes what the original ops compute, with two documented differences of
``mka::flash_attention``: additive mask values <= -1e4 hide a key exactly (as -inf), and a query row that
sees no key at all gives zeros (eager softmax gives NaN or an average over masked keys there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mka_compile.graph import ops
from mka_compile.graph.capture import Captured
from mka_compile.kernels.flash_attention import HIDDEN_BIAS, flash_attention
from mka_compile.passes.attention import SiteFacts

TARGETS = ("mka", "sdpa", "keep")
SYMBOLIC = "mka_symbolic"  # node.meta key: the symbolic value while the backend shows the rules concrete sizes


def symbolic_value(node: Any) -> Any:
    """A node's value with its symbolic sizes (see ``mka_compile.backend._concrete_meta``)."""
    if isinstance(node, fx.Node) and SYMBOLIC in node.meta:
        return node.meta[SYMBOLIC]
    return ops.value(node)


_SCORE_OPS = frozenset({"matmul", "baddbmm", "mul", "div", "add", "masked_fill", "where", "softmax"}) | ops.TRANSPARENT


@dataclass
class Lowered:
    """What the backend did with one attention site of one graph."""

    name: str  # module path of the site
    rule: str  # the rule that found it
    action: str  # "mka::flash_attention" | "sdpa" | "kept" | "mka::mka_attention"
    reason: str | None = None  # why it was kept as it was


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
    additive: torch.Tensor | None,
    hide: torch.Tensor | None,
    keep: torch.Tensor | None,
    bias: torch.Tensor | None,
    q_factor: Any,
    *,
    scale: float,
    bias_scale: float,
    divide: bool,
    target: str,
) -> torch.Tensor:
    """``softmax(scale * q @ kt + bias_scale * bias + additive, masked by hide/keep) @ v`` as one attention call.

    ``q: [..., Tq, d]``, ``kt: [..., d, Tk]`` (keys transposed), ``v: [..., Tk, d]`` with ``...`` = (B, H) or
    (N,); ``q_factor``: a tensor (or symbolic) scale multiplying (``divide=False``) or dividing ``q``."""
    if q_factor is not None:
        q = q / q_factor if divide else q * q_factor
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
    mask: torch.Tensor | None,
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


# ------------------------------------------------------------------------------------------ graph rewrite


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


def _very_negative(x: Any, captured: Captured) -> bool:
    v = ops.scalar(x)
    if v is not None:
        return v <= HIDDEN_BIAS
    if isinstance(x, fx.Node):
        val = captured.evaluate([x]).get(x)
        return isinstance(val, torch.Tensor) and val.numel() > 0 and bool((val <= HIDDEN_BIAS).all())
    return False


def _dropout_reason(n: fx.Node, gm: fx.GraphModule) -> str | None:
    if ops.kind(n, gm) != "dropout":
        return None
    p, training = ops.arg(n, 1, "p", 0.5), ops.arg(n, 2, "training", True)
    if training is False or p == 0:
        return None
    return f"attention dropout (p={p}) at {n.name} is active: left to Inductor (set the model to eval or p=0)"


def _replace(out: fx.Node, fn, args: tuple, kwargs: dict, dead: list[fx.Node]) -> None:
    gm_graph = out.graph
    with gm_graph.inserting_before(out):
        new = gm_graph.call_function(fn, args, kwargs)
    new.meta = out.meta  # shared: the backend restores symbolic values in place after the rewrite
    out.replace_all_uses_with(new)
    for n in reversed(dead):
        if not n.users:
            gm_graph.erase_node(n)


def _lower_eager(facts: SiteFacts, captured: Captured, target: str) -> str | None:
    m, gm = facts.match, captured.gm
    c = m.captures
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
    scale, q_factor, divide = 1.0, None, False
    bias, bias_scale = None, 1.0
    if "scale_op" in c:
        so = c["scale_op"]
        const = next((ops.scalar(a) for a in so.args if ops.scalar(a) is not None), None)
        if const is not None:
            scale = const if ops.kind(so, gm) == "mul" else 1.0 / const
        else:
            others = [a for a in so.args if a not in chain]
            if len(others) != 1 or (ops.kind(so, gm) == "div" and so.args[1] is not others[0]):
                return f"cannot read the scale at {so.name}"
            q_factor, divide = others[0], ops.kind(so, gm) == "div"
    if ops.kind(scores, gm) == "baddbmm":
        beta, alpha = ops.arg(scores, 3, "beta", 1), ops.arg(scores, 4, "alpha", 1)
        if ops.scalar(beta) is None or ops.scalar(alpha) is None or q_factor is not None:
            return f"baddbmm at {scores.name} has a non-constant alpha/beta or scale"
        if float(beta) != 0:
            bias, bias_scale = c["bias"], float(beta) * scale
        scale *= float(alpha)
    hide = keep = None
    if "mask_fill" in c:
        value = ops.arg(c["mask_fill_op"], 2, "value")
        if not _very_negative(value, captured):
            return f"masked_fill at {c['mask_fill_op'].name} writes {value!r}, not a mask value (<= {HIDDEN_BIAS:g})"
        hide = c["mask_fill"]
    if "mask_where" in c:
        w = c["mask_where_op"]
        if not _very_negative(w.args[2] if len(w.args) > 2 else None, captured):
            return f"where at {w.name} does not fill hidden scores with a mask value (<= {HIDDEN_BIAS:g})"
        keep = c["mask_where"]
    kwargs = dict(scale=float(scale), bias_scale=bias_scale, divide=divide, target=target)
    args = (q, kt, v, c.get("mask_add"), hide, keep, bias, q_factor)
    _replace(out, eager_attention, args, kwargs, chain[:-1])
    return None


def _lower_sdpa(facts: SiteFacts, captured: Captured) -> str | None:
    out = facts.match.captures["out"]
    q, k, v = (ops.arg(out, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = ops.arg(out, 3, "attn_mask")
    dropout, is_causal = ops.arg(out, 4, "dropout_p", 0.0), ops.arg(out, 5, "is_causal", False)
    scale = ops.arg(out, 6, "scale")
    if not isinstance(dropout, (int, float)) or dropout != 0:
        return f"SDPA at {out.name} has dropout_p={dropout!r}: left to Inductor (set the model to eval or p=0)"
    if not isinstance(is_causal, bool):
        return f"SDPA at {out.name} has a non-constant is_causal"
    qv, kv = symbolic_value(q), symbolic_value(k)
    if not isinstance(qv, torch.Tensor) or not isinstance(kv, torch.Tensor) or qv.dim() not in (3, 4):
        return f"SDPA at {out.name}: q is not a [B, H, T, d] or [N, T, d] tensor"
    if qv.dim() == 3 and qv.shape[0] != kv.shape[0]:
        return f"SDPA at {out.name}: 3-D q and k with different leading sizes"
    if scale is None:
        scale = int(qv.shape[-1]) ** -0.5  # a symbolic head size is specialized (guarded)
    if ops.scalar(scale) is None:
        return f"SDPA at {out.name} has a non-constant scale"
    square = bool(statically_known_true(qv.shape[-2] == kv.shape[-2]))
    kwargs = dict(is_causal=is_causal, square=square, scale=float(scale))
    _replace(out, sdpa_attention, (q, k, v, mask), kwargs, [])
    return None


def lower_sites(facts: list[SiteFacts], captured: Captured, target: str) -> list[Lowered]:
    """Rewrite each site of ``captured.gm`` in place for ``target`` ("mka", "sdpa" or "keep")."""
    done = []
    for f in facts:
        kind = ops.kind(f.match.captures["out"], captured.gm)
        if kind == "mka_attention":
            done.append(Lowered(f.name, f.rule, "mka::mka_attention", "a converted MKA site (already an mka:: op)"))
            continue
        if target == "keep":
            done.append(Lowered(f.name, f.rule, "kept", "options attention='keep'"))
            continue
        if f.match.facts.get("not_lowered"):  # score transforms the lowering does not rewrite (soft-cap, sinks, ...)
            done.append(Lowered(f.name, f.rule, "kept", f.match.facts["not_lowered"]))
            continue
        if kind == "sdpa" and target == "sdpa":
            done.append(Lowered(f.name, f.rule, "sdpa", None))
            continue
        why = _lower_sdpa(f, captured) if kind == "sdpa" else _lower_eager(f, captured, target)
        action = "kept" if why else ("sdpa" if target == "sdpa" else "mka::flash_attention")
        done.append(Lowered(f.name, f.rule, action, why))
    captured.gm.graph.lint()
    captured.gm.recompile()
    return done
