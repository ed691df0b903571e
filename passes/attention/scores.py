"""What a site does to its scores, read once from a match: the scale, the masks and the named score transforms.

:func:`keep_masks` / :func:`mask_facts` evaluate the masks on the example inputs (causal, padding, sliding
window, ...); :func:`score_transforms` names the transforms and folds the scale layers; :func:`score_facts` keeps, for
a rewrite, the graph values the scores are scaled and masked with (:class:`Scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from mka_compile.graph import ops
from mka_compile.graph.capture import Captured
from mka_compile.graph.pattern import Match

HIDDEN = -1e4  # an additive mask value at or below this hides a key


@dataclass(frozen=True)
class Scores:
    """How a site turns ``q @ k^T`` into its softmax input, as graph values for a rewrite (read once, not evaluated):
    ``softmax(scale * (q @ kt) [* or / factor] + bias_scale * bias + additive)`` with the keys hidden where ``hide``
    is True and kept only where ``keep`` is True; SDPA: ``additive`` is its ``attn_mask``, ``causal`` its
    ``is_causal``. ``refused``: why the site's score layers do not fit this form (None when they do)."""

    scale: float = 1.0
    factor: Any = None  # a graph value (a tensor, or a symbolic number) that multiplies / divides the scores
    divide: bool = False
    additive: fx.Node | None = None
    hide: fx.Node | None = None
    keep: fx.Node | None = None
    bias: fx.Node | None = None  # baddbmm's input
    bias_scale: float = 1.0
    causal: Any = False
    default_scale: bool = False  # SDPA without scale=: 1/sqrt(head size) of the example (one head size)
    refused: str | None = None


def score_facts(m: Match, captured: Captured) -> Scores:
    """:class:`Scores` of an eager or SDPA match (the classic captures of ``attention.eager.*``: one scale layer
    innermost, at most one each of an additive mask, a masked_fill and a where)."""
    gm, c = m.gm, m.captures
    out = c["out"]
    if ops.kind(out, gm) == "sdpa":
        scale, causal = ops.arg(out, 6, "scale"), ops.arg(out, 5, "is_causal", False)
        if scale is not None and ops.scalar(scale) is None:
            return Scores(refused=f"SDPA at {out.name} has a non-constant scale")
        if not isinstance(causal, bool):
            return Scores(refused=f"SDPA at {out.name} has a non-constant is_causal")
        d = (ops.shape(c["q"]) or (0,))[-1]
        if scale is None and not d:
            return Scores(refused=f"SDPA at {out.name}: the head size of q is unknown (no default scale)")
        value = float(scale) if scale is not None else float(d) ** -0.5
        return Scores(value, additive=ops.arg(out, 3, "attn_mask"), causal=causal, default_scale=scale is None)
    if m.facts.get("not_lowered"):
        return Scores(refused=m.facts["not_lowered"])
    scale, factor, divide = 1.0, None, False
    if "scale_op" in c:
        so = c["scale_op"]
        const = next((ops.scalar(a) for a in so.args if ops.scalar(a) is not None), None)
        if const is not None:
            scale = const if ops.kind(so, gm) == "mul" else 1.0 / const
        else:
            operand = next((x for name, node, x in m.facts["transforms"] if node is so), None)
            path = [i for i in ops.tensor_inputs(so) if i is not operand]
            others = [a for a in so.args if a not in path]
            if len(path) != 1 or len(others) != 1 or (ops.kind(so, gm) == "div" and so.args[1] is not others[0]):
                return Scores(refused=f"cannot read the scale at {so.name}")
            factor, divide = others[0], ops.kind(so, gm) == "div"
    bias, bias_scale = None, 1.0
    scores = c["scores"]
    if ops.kind(scores, gm) == "baddbmm":
        beta, alpha = ops.arg(scores, 3, "beta", 1), ops.arg(scores, 4, "alpha", 1)
        if ops.scalar(beta) is None or ops.scalar(alpha) is None or factor is not None:
            return Scores(refused=f"baddbmm at {scores.name} has a non-constant alpha/beta or scale")
        if float(beta) != 0:
            bias, bias_scale = c["bias"], float(beta) * scale
        scale *= float(alpha)
    hide = keep = None
    if "mask_fill" in c:
        value = ops.arg(c["mask_fill_op"], 2, "value")
        if not _mask_value(value, captured):
            return Scores(refused=f"masked_fill at {c['mask_fill_op'].name} writes {value!r}, not a mask value "
                          f"(<= {HIDDEN:g})")  # fmt: skip
        hide = c["mask_fill"]
    if "mask_where" in c:
        w = c["mask_where_op"]
        if not _mask_value(w.args[2] if len(w.args) > 2 else None, captured):
            return Scores(refused=f"where at {w.name} does not fill hidden scores with a mask value (<= {HIDDEN:g})")
        keep = c["mask_where"]
    return Scores(scale, factor, divide, c.get("mask_add"), hide, keep, bias, bias_scale)


def _mask_value(x: Any, captured: Captured) -> bool:
    """A fill value that hides a key: a number, or a graph value that is, everywhere, at or below :data:`HIDDEN`."""
    return _very_negative(x) or (isinstance(x, fx.Node) and _const_like_negative(x, captured))


def _very_negative(x: Any) -> bool:
    v = ops.scalar(x)
    return v is not None and v <= HIDDEN


def keep_masks(m: Match, captured: Captured) -> tuple[list[torch.Tensor], bool]:
    """Boolean "may attend" masks of a match (True = keep) and whether ``is_causal`` was set."""
    gm = m.gm
    out = m.captures["out"]
    wanted: list[tuple[str, fx.Node]] = []
    is_causal = False
    if ops.kind(out, gm) == "mka_attention":  # a converted MKA site: mka::mka_attention(..., kv_valid, scale, causal)
        is_causal = bool(out.args[11])
        wanted.append(("kv_valid", out.args[9]))
    elif ops.kind(out, gm) == "sdpa":
        is_causal = bool(ops.arg(out, 5, "is_causal", False))
        mask = ops.arg(out, 3, "attn_mask")
        if isinstance(mask, fx.Node):
            wanted.append(("sdpa", mask))
    else:
        for name, node, operand in m.facts.get("transforms", ()):
            if name == "add":
                wanted.append(("add", operand))
            elif name == "fill":
                value = ops.arg(node, 2, "value")
                if _mask_value(value, captured):
                    wanted.append(("fill", operand))
            elif name in ("where", "where_inv"):
                other = node.args[2] if name == "where" else node.args[1]
                if _mask_value(other, captured):
                    wanted.append((name, operand))
        bias = m.captures.get("bias")
        if bias is not None and float(ops.arg(m.captures["scores"], 3, "beta", 1) or 0) != 0:
            wanted.append(("add", bias))
    values = captured.evaluate([n for _, n in wanted]) if wanted else {}
    keeps = []
    for how, node in wanted:
        val = values.get(node)
        if not isinstance(val, torch.Tensor):
            continue
        if how in ("fill", "where_inv"):
            keeps.append(~val.bool())
        elif how == "kv_valid":
            keeps.append(val.bool()[:, None, None, :])  # (B, 1, 1, Tk)
        elif how == "where" or (how == "sdpa" and val.dtype == torch.bool):
            keeps.append(val.bool())
        else:
            keeps.append(val > HIDDEN if val.is_floating_point() else val.bool())
    return keeps, is_causal


def score_transforms(m: Match, captured: Captured) -> tuple[tuple[str, ...], float | None]:
    """Named score transforms of an eager match and the scale factor of its scale layers (None: a tensor scale)."""
    layers = m.facts.get("transforms", ())
    out: list[str] = []
    scale: float | None = 1.0
    consts = [n for name, _, n in layers if name == "scale" and isinstance(n, fx.Node)]
    values = captured.evaluate(consts) if consts else {}
    for i, (name, node, operand) in enumerate(layers):
        if name == "scale":
            c = next((ops.scalar(a) for a in node.args if ops.scalar(a) is not None), None)
            if c is None:
                val = values.get(operand)
                c = float(val) if isinstance(val, torch.Tensor) and val.numel() == 1 else None
            if c is None or scale is None:
                scale = None
            else:
                scale = scale * c if ops.kind(node, m.gm) == "mul" else scale / c
        elif name == "scale_tensor":
            scale = None
        elif name == "softcap":
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            cap = next((ops.scalar(a) for a in nxt[1].args if ops.scalar(a) is not None), None) if nxt else None
            out.append(f"softcap={cap:g}" if cap is not None and nxt[0] == "scale" else "softcap")
        elif name == "sinks":
            out.append("sinks")
        elif name == "clamp":
            lo = ops.arg(node, 1, "min")
            if not _very_negative(lo) or ops.arg(node, 2, "max") is not None:
                out.append("clamp")
    adds = [operand for name, _, operand in layers if name == "add"]
    bias = m.captures.get("bias")
    if bias is not None and float(ops.arg(m.captures["scores"], 3, "beta", 1) or 0) != 0:
        adds.append(bias)
    vals = captured.evaluate(adds) if adds else {}
    for a in adds:
        v = vals.get(a)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            finite = v[v > HIDDEN]
            if finite.numel() and bool((finite != 0).any()):
                out.append("bias")
                break
    if scale is None:
        out.append("score_scale")
    return tuple(dict.fromkeys(out)), scale


def _const_like_negative(node: fx.Node, captured: Captured) -> bool:
    val = captured.evaluate([node]).get(node)
    return isinstance(val, torch.Tensor) and val.numel() > 0 and bool((val <= HIDDEN).all())


def _is_causal(keep: torch.Tensor) -> bool:
    """Every query row sees a prefix of the keys, one key longer than the row before (``[N, Tq, Tk]``).

    This holds for bottom-right aligned causal masks and for static caches (unfilled slots masked)."""
    if keep.shape[-2] < 2:
        return False
    prefix = bool((keep[..., 1:] <= keep[..., :-1]).all())  # True-then-False along the keys
    lengths = keep.sum(-1)
    return prefix and bool((lengths[..., 1:] - lengths[..., :-1] == 1).all())


def _local(keep: torch.Tensor) -> tuple[str, int] | None:
    """A causal mask restricted to recent keys (``[N, Tq, Tk]``, bottom-right aligned): every row sees a contiguous
    run of keys ending at its own position. ``("sliding_window", W)`` when the run is ``min(W, position + 1)`` long
    everywhere, ``("chunked", 0)`` for other local masks (chunked attention), None otherwise."""
    tq, tk = keep.shape[-2:]
    if tq < 2:
        return None
    pos = torch.arange(tq)[:, None] + (tk - tq)  # (Tq, 1): each query's own key index
    j = torch.arange(tk)[None, :]
    if bool((keep & (j > pos)).any()) or not bool(keep.gather(-1, pos.expand(keep.shape[0], tq, 1)).all()):
        return None
    width = keep.sum(-1)  # (N, Tq)
    first = torch.where(keep, j.expand_as(keep), tk).amin(-1)  # (N, Tq)
    if not bool((pos[:, 0] - first + 1 == width).all()):
        return None  # not contiguous
    w = int(width.max())
    if bool((width == torch.clamp(pos[:, 0] + 1, max=w)).all()):
        return "sliding_window", w
    return "chunked", 0


def mask_facts(keeps: list[torch.Tensor], is_causal: bool, tq: int, tk: int) -> tuple[bool, str, int | None]:
    """``(causal, mask kind, window)`` from the "may attend" masks of a site, evaluated on the example inputs."""
    causal, kind = _mask_kind(keeps, is_causal, tq, tk)
    if kind != "custom":
        return causal, kind, None
    keep = torch.ones(tq, tk, dtype=torch.bool)
    for k in keeps:
        keep = keep & k.to("cpu")
    if is_causal:
        keep = keep & (torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq))
    local = _local(keep.reshape(-1, tq, tk))
    if local is None:
        return causal, kind, None
    return True, local[0], local[1] or None


def _mask_kind(keeps: list[torch.Tensor], is_causal: bool, tq: int, tk: int) -> tuple[bool, str]:
    keep = torch.ones(tq, tk, dtype=torch.bool)
    for k in keeps:
        keep = keep & k.to("cpu")
    if is_causal:
        keep = keep & (torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq))
    keep = keep.reshape(-1, tq, tk)
    if bool(keep.all()):
        return False, "none"
    if _is_causal(keep):
        return True, "causal"
    seen = keep.any(-2, keepdim=True)  # (N, 1, Tk): keys some query may attend (others are padding)
    live = keep.any(-1)  # (N, Tq): queries that see anything
    filled = keep | ~seen
    rows_ok = [int(lv.sum()) > 1 and _is_causal(f[lv][None]) for f, lv in zip(filled, live)]
    if all(rows_ok):
        return True, "causal+padding"
    same = (keep == keep[..., -1:, :]) | ~live[..., None]
    return False, "padding" if bool(same.all()) else "custom"
