"""Where does an attention operand come from? Walk back from q, k or v to its projection.

On the way the walk records what it passes: head split/merge layouts, scalar scale factors, GQA
expansion (``expand`` + ``reshape``, ``repeat_interleave``), RoPE (rotate-half, interleaved, complex,
partial), q/k norms, KV-cache updates (concatenation with a past tensor, ``index_copy`` /
``index_put`` / slice assignment into a static buffer) and which part of a fused QKV projection was
taken (split / chunk / unbind / slicing). It stops at a projection (linear, addmm as in GPT-2's
Conv1D, matmul with a weight), a model parameter, a graph input, or an op it does not know.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import fx

from mka_compile.graph import ops
from mka_compile.graph.capture import module_path

from .rope_forms import _const_like, _reaches, _rope_source, _stack_rope_source
from .writes import target_name
from .writes import writes as buffer_writes

_REDUCTION_OPS = frozenset(
    {
        "rsqrt",
        "sqrt",
        "add",
        "sub",
        "mean",
        "pow",
        "mul",
        "div",
        "cast",
        "identity",
        "view",
        "unsqueeze",
        "unknown",
        "clamp",
        "max",
    }
)


@dataclass
class Provenance:
    """The result of walking back from one operand."""

    role: str
    kind: str = "other"  # projection | parameter | input | other
    stop: fx.Node | None = None  # where the walk ended
    projection: fx.Node | None = None
    source: fx.Node | None = None  # the hidden states the projection reads
    weight: fx.Node | None = None
    module: str = ""  # dotted path of the projection module
    select: str | None = None  # part of a fused projection
    rope: str | None = None
    norm_shape: tuple[int, ...] | None = None
    cache: str | None = None
    scale: float = 1.0
    n_rep: int = 1
    bias: bool = False
    layout_top: fx.Node | None = None  # top of the pure layout/selection run that ends at the projection
    reason: str | None = None
    transforms: list[str] = field(default_factory=list)  # "clip_qkv", "query_temperature", "latent_kv"

    @property
    def describe(self) -> str:
        base = self.module or (self.stop.name if self.stop is not None else "?")
        return f"{base}[{self.select}]" if self.select else base


def _is_past(n: fx.Node, gm) -> bool:
    """A cached past tensor: a graph input or buffer reached only through layout/copy ops."""
    while ops.kind(n, gm) in ops.TRANSPARENT | ops.LAYOUT:
        n = n.args[0]
    return n.op in ("placeholder", "get_attr") or _const_like(n, gm)


def walk(node: fx.Node, gm: fx.GraphModule | None, role: str, limit: int = 400) -> Provenance:
    """Walk back from ``node`` (an attention operand) to its projection; see the module docstring."""
    p = Provenance(role)
    n = node
    for _ in range(limit):
        k = ops.kind(n, gm)
        if k in _LAYOUT_RUN:
            p.layout_top = p.layout_top or n
        elif k not in ("linear", "addmm", "matmul", "placeholder", "get_attr"):
            p.layout_top = None
        if k in ops.TRANSPARENT or k in ("view", "unsqueeze", "squeeze", "permute", "transpose"):
            n = n.args[0]
            continue
        if k == "expand":
            s_in, s_out = ops.shape(n.args[0]), ops.shape(n)
            if s_in and s_out and math.prod(s_in):
                p.n_rep *= max(1, math.prod(s_out) // math.prod(s_in))
            n = n.args[0]
            continue
        if k in ("repeat_interleave", "repeat"):
            s_in, s_out = ops.shape(n.args[0]), ops.shape(n)
            if s_in and s_out and math.prod(s_in):
                p.n_rep *= max(1, math.prod(s_out) // math.prod(s_in))
            n = n.args[0]
            continue
        if k == "clamp":  # clip_qkv: q/k/v clamped between projection and attention
            if "clip_qkv" not in p.transforms:
                p.transforms.append("clip_qkv")
            n = n.args[0]
            continue
        if k == "stack":
            src = _stack_rope_source(n, gm)
            if src is None:
                return _stop(p, n, f"the {role} path stacks tensors at {n.name} (not a rotary embedding)")
            n, p.rope = src, p.rope or "interleaved"
            continue
        if k in ("mul", "div"):
            ins = ops.tensor_inputs(n)
            if len(ins) == 1:
                c = next((ops.scalar(a) for a in n.args if ops.scalar(a) is not None), None)
                if c is not None:
                    p.scale = p.scale * c if k == "mul" else p.scale / c
                    n = ins[0]
                    continue
            if len(ins) == 2 and k == "mul":
                a, b = (ops.skip_transparent(i, gm) for i in ins)
                if ops.is_parameter(b, gm) and not ops.is_parameter(a, gm):  # a norm's weight
                    n = a
                    continue
                if ops.is_parameter(a, gm) and not ops.is_parameter(b, gm):
                    n = b
                    continue
                for x, y in ((a, b), (b, a)):
                    if _reaches(y, x, _REDUCTION_OPS, gm) and ops.kind(y, gm) in ("rsqrt", "div", "reciprocal"):
                        p.norm_shape = ops.shape(x)
                        n = x
                        break
                else:
                    t = _temperature(a, b, n, gm)
                    if t is None:
                        return _stop(p, n, f"the {role} path multiplies two tensors at {n.name}")
                    if "query_temperature" not in p.transforms:
                        p.transforms.append("query_temperature" if role == "query" else f"{role}_temperature")
                    n = t
                continue
            return _stop(p, n, f"the {role} path divides by a tensor at {n.name}")
        if k == "add":
            ins = ops.tensor_inputs(n)
            params = [i for i in ins if ops.is_parameter(i, gm)]
            if len(ins) == 2 and len(params) == 1:  # x @ W + b written out (Falcon's linear)
                p.bias = True
                n = ins[0] if ins[1] is params[0] else ins[1]
                continue
            rope = _rope_source(n, gm)
            if rope is None:
                return _stop(p, n, f"the {role} path adds tensors at {n.name} (not a rotary embedding)")
            n, p.rope = rope[0], p.rope or rope[1]
            continue
        if k == "view_as_real":
            inner = ops.skip_transparent(n.args[0], gm)
            if ops.kind(inner, gm) == "mul":
                cands = [i for i in ops.tensor_inputs(inner) if ops.kind(i, gm) == "view_as_complex"]
                if cands:
                    n, p.rope = cands[0].args[0], "complex"
                    continue
            return _stop(p, n, f"the {role} path has a complex op at {n.name}")
        if k == "cat" and (src := _stack_rope_source(n, gm)) is not None:  # cat([x1 cos - x2 sin, x2 cos + x1 sin])
            n, p.rope = src, p.rope or "rotate_half"
            continue
        if k == "cat":
            tensors = [t for t in n.args[0]] if isinstance(n.args[0], (list, tuple)) else ops.tensor_inputs(n)
            dim = ops.arg(n, 1, "dim", 0)
            nd = ops.rank(n)
            if nd is not None and ops.normalize_dim(dim, nd) == nd - 1:  # partial rotary: cat(rotated, pass)
                src = _slice_source(tensors[-1], gm)  # the tensor both parts were sliced from
                if src is not None:
                    inner = ops.skip_transparent(tensors[0], gm)  # the rotated part: x_rot * cos + rot(x_rot) * sin
                    style = _rope_source(inner, gm) if ops.kind(inner, gm) == "add" else None
                    p.rope = p.rope or ("partial_" + style[1] if style else "partial")
                    n = src
                    continue
            if nd is not None and ops.normalize_dim(dim, nd) == nd - 1 and len(tensors) == 2:
                nxt = _feature_parts(p, tensors, gm)
                if nxt is not None:
                    n = nxt
                    continue
            if nd is not None and ops.normalize_dim(dim, nd) == nd - 1:
                return _stop(p, n, f"the {role} path concatenates features at {n.name} (not a partial rotary)")
            past = [t for t in tensors if _is_past(t, gm)]
            new = [t for t in tensors if t not in past]
            if past and new:
                p.cache = p.cache or "concat"
                p.select = None
                n = new[-1]
                continue
            return _stop(p, n, f"the {role} path concatenates tensors at {n.name}")
        if k == "full":  # a new tensor filled by slice writes: key[..., :a] = k_pass; key[..., a:] = k_rot
            writes = [src for kind, src in buffer_writes(n, None, gm) if kind == "slice_assign"]
            nxt = writes[0] if len(writes) == 1 else _feature_parts(p, writes, gm) if len(writes) == 2 else None
            if nxt is None:
                return _stop(p, n, f"the {role} path reaches a new tensor at {n.name} written in {len(writes)} parts")
            n = nxt
            continue
        if k == "index_copy":
            p.cache, p.select, n = p.cache or "index_copy", None, ops.arg(n, 3, "source")
            continue
        if k == "index_put":
            p.cache, p.select, n = p.cache or "index_put", None, ops.arg(n, 2, "values")
            continue
        if k == "copy" and len(ops.tensor_inputs(n)) >= 2:  # slice_scatter(buffer, src, ...)
            p.cache, p.select, n = p.cache or "slice_assign", None, ops.tensor_inputs(n)[1]
            continue
        if k == "getitem" and isinstance(n.args[0], fx.Node) and ops.kind(n.args[0], gm) == "mka_mix":
            mix, i = n.args[0], n.args[1]  # a converted site's routed keys / values: continue from its own (local)
            if mix.target.__name__.startswith("route_mix"):  # (kf, vf) = route_mix(lam, ks, vs)
                n = (mix.args[1] if i == 0 else mix.args[2])[0]
                continue
            op = getattr(mix.target, "default", mix.target)  # an OpOverloadPacket (dynamo) or its overload
            names = [a.name for a in getattr(getattr(op, "_schema", None), "arguments", ())]
            own = {0: "k1", 1: "v1"}.get(i)  # (kf, vf, ...) = memory_mix(k1, v1, ...): one call's memory step
            if own not in names:
                return _stop(p, n, f"the {role} path reads output {i} of {mix.name}, not its keys or values")
            n = ops.arg(mix, names.index(own), own)
            continue
        if k == "getitem":
            src = n.args[0]
            if isinstance(src, fx.Node) and ops.kind(src, gm) == "split":
                p.select = p.select or f"{target_name(src)}[{n.args[1]}]"
                n = src.args[0]
                continue
            if isinstance(src, fx.Node) and ops.shape(src) is not None:  # tensor indexing x[..., a:b]
                p.select = p.select or f"getitem{n.args[1]}"
                n = src
                continue
            return _stop(p, n, f"the {role} path indexes a non-tensor at {n.name}")
        if k == "index":  # advanced indexing into a fused projection, e.g. qkv[:, :, :, [-2]]
            p.select = p.select or "index"
            n = n.args[0]
            continue
        if k in ("slice", "select"):
            p.select = p.select or f"{k}(dim={n.args[1] if len(n.args) > 1 else 0}, {n.args[2:]})"
            n = n.args[0]
            continue
        if k in ("rms_norm", "layer_norm"):
            p.norm_shape = ops.shape(n)
            n = n.args[0]
            continue
        if k == "linear":
            p.bias = (
                p.bias
                or ops.arg(n, 2, "bias") is not None
                or (n.op == "call_module" and getattr(gm.get_submodule(str(n.target)), "bias", None) is not None)
            )
            return _projection(p, n, n.args[0], _weight(n, gm), gm)
        if k == "addmm":
            p.bias = True
            return _projection(p, n, n.args[1], n.args[2], gm)
        if k == "matmul":
            a, b = ops.tensor_inputs(n)[:2]
            if ops.is_parameter(b, gm) and not ops.is_parameter(a, gm):
                return _projection(p, n, a, b, gm)
            return _stop(p, n, f"the {role} path is a product of activations at {n.name}, not a projection")
        if k == "get_attr" or (k == "placeholder" and n.meta.get("mka_param")):
            write = (buffer_writes(n, node, gm) or [None])[-1]  # a cache buffer written in place before it is read
            if write is not None:
                p.cache = p.cache or write[0]
                p.select = None  # slicing so far read the cache, not a fused projection
                n = write[1]
                continue
        if k == "placeholder" and n.meta.get("mka_param"):  # a weight lifted to an input by dynamo
            p.kind, p.stop = "parameter", n
            p.reason = f"the {role} {_be(role)} a learned parameter ({n.name}), not a projection of the sequence"
            return p
        if k == "placeholder":
            p.kind, p.stop = "input", n
            p.reason = f"the {role} {_be(role)} a model input ({n.name}), not a projection of a sequence"
            return p
        if k == "get_attr":
            p.kind, p.stop = "parameter", n
            target = str(n.target).removeprefix("_mka_wrapped.")
            p.reason = f"the {role} {_be(role)} a learned parameter ({target}), not a projection of the sequence"
            return p
        return _stop(p, n, f"the {role} path reaches {n.name} ({k}), which is not a projection")
    return _stop(p, n, f"the {role} path is longer than {limit} ops")


_LAYOUT_RUN = frozenset(
    {
        "view",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "identity",
        "cast",
        "dropout",
        "slice",
        "select",
        "index",
        "getitem",
    }
)


def _feature_parts(p: Provenance, parts: list[fx.Node], gm) -> fx.Node | None:
    """Two feature parts concatenated (``cat(..., -1)`` or slice writes): a RoPE part and a no-RoPE part of one
    projection (partial rotary, split RoPE) or of two projections (multi-head latent attention: recorded as the
    ``latent_kv`` transform, the walk follows the no-RoPE part). Returns where the walk goes on, or None."""
    (b0, s0), (b1, s1) = (_feature_source(t, gm) for t in parts)
    style = s0 or s1
    if not style:
        return None
    p.rope = p.rope or "partial_" + style
    if b0 is b1:
        return b0
    if s0 is None or s1 is None:
        if "latent_kv" not in p.transforms:
            p.transforms.append("latent_kv")
        return parts[0] if s0 is None else parts[1]
    return None


def _feature_source(part: fx.Node, gm) -> tuple[fx.Node, str | None]:
    """``(tensor a feature part was taken from, RoPE style applied to it or None)``."""
    t, style = ops.skip_transparent(part, gm), None
    for _ in range(24):
        k = ops.kind(t, gm)
        if k == "add" and style is None:
            r = _rope_source(t, gm)
            if r is None:
                break
            t, style = ops.skip_transparent(r[0], gm), r[1]
        elif k == "view" and ops.kind(ops.skip_transparent(t.args[0], gm), gm) == "stack" and style is None:
            src = _stack_rope_source(ops.skip_transparent(t.args[0], gm), gm)
            if src is None:
                break
            t, style = ops.skip_transparent(src, gm), "interleaved"
        elif k == "view_as_real" and style is None:  # complex RoPE: view_as_real(view_as_complex(x) * freqs)
            inner = ops.skip_transparent(t.args[0], gm)
            cands = [i for i in ops.tensor_inputs(inner) if ops.kind(i, gm) == "view_as_complex"]
            if ops.kind(inner, gm) != "mul" or not cands:
                break
            t, style = ops.skip_transparent(cands[0].args[0], gm), "complex"
        elif k == "cat" and style is None and (src := _stack_rope_source(t, gm)) is not None:
            t, style = ops.skip_transparent(src, gm), "rotate_half"
        elif k == "cat" and len(new := [x for x in ops.tensor_inputs(t) if not _is_past(x, gm)]) == 1:
            t = ops.skip_transparent(new[0], gm)  # a KV cache: cat(past, new)
        elif k in ("slice", "select", "identity", "cast", "expand", "view", "transpose", "permute"):
            t = ops.skip_transparent(t.args[0], gm)
        elif k == "getitem" and isinstance(t.args[0], fx.Node):
            t = ops.skip_transparent(t.args[0], gm)
        elif k == "split":
            t = ops.skip_transparent(t.args[0], gm)
        else:
            break
    return t, style


def _slice_source(part: fx.Node, gm) -> fx.Node | None:
    """The tensor ``part`` was sliced from along its last dim (through casts/copies), else None."""
    n = ops.skip_transparent(part, gm)
    if ops.kind(n, gm) == "slice" or (ops.kind(n, gm) == "getitem" and ops.shape(n.args[0]) is not None):
        return ops.skip_transparent(n.args[0], gm)
    return None


def _be(role: str) -> str:
    return "are" if role.endswith("s") else "is"


def _weight(n: fx.Node, gm) -> fx.Node | None:
    if n.op == "call_module":
        return None
    return ops.arg(n, 1, "weight")


def _projection(p: Provenance, n: fx.Node, src, weight, gm) -> Provenance:
    p.kind, p.stop, p.projection, p.weight = "projection", n, n, weight
    p.source = ops.skip_transparent(src, gm) if isinstance(src, fx.Node) else None
    p.module = str(n.target) if n.op == "call_module" else module_path(n)
    return p


def _temperature(a: fx.Node, b: fx.Node, mul: fx.Node, gm) -> fx.Node | None:
    """``x * t`` where ``t`` is a per-token / per-position factor that does not read the hidden states (a constant,
    or computed from positions): returns ``x`` (the operand that keeps the output's shape), else None."""
    out = ops.shape(mul)
    for x, t in ((a, b), (b, a)):
        sx, st = ops.shape(x), ops.shape(t)
        if sx is None or st is None or sx != out or st == out:
            continue
        if st and st[-1] == 1 or _const_like(t, gm):
            return x
    return None


def _stop(p: Provenance, n: fx.Node, reason: str) -> Provenance:
    p.kind, p.stop, p.reason = "other", n, reason
    return p
