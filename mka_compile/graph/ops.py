"""A canonical view of FX nodes, the same for torch.export (aten) and dynamo / fx (torch-level) graphs.

``kind(node)`` names what a node computes ('matmul', 'softmax', 'sdpa', 'view', 'cast', ...), whatever
the spelling: ``aten.bmm.default``, ``torch.matmul``, ``operator.matmul``, ``x.matmul(y)`` or an
``nn.Linear`` call_module. Rules match kinds, so one rule covers every capture.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

# aten overload-packet / method / function name -> kind
_BY_NAME: dict[str, str] = {}


def _names(kind_: str, *names: str) -> None:
    for n in names:
        _BY_NAME[n] = kind_


_names("linear", "linear")
_names("matmul", "matmul", "bmm", "mm", "__matmul__")
_names("einsum", "einsum")
_names("baddbmm", "baddbmm")
_names("addmm", "addmm")
_names("softmax", "softmax", "_softmax", "_safe_softmax")
_names("log_softmax", "log_softmax", "_log_softmax")
_names(
    "sdpa",
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
)
_names("mul", "mul", "mul_", "__mul__", "__rmul__", "multiply")
_names("div", "div", "div_", "__truediv__", "true_divide", "divide")
_names("add", "add", "add_", "__add__", "__radd__")
_names("sub", "sub", "sub_", "__sub__", "rsub", "__rsub__")
_names("neg", "neg", "__neg__", "negative")
_names("masked_fill", "masked_fill", "masked_fill_")
_names("where", "where")
_names("cast", "to", "_to_copy", "type_as", "float", "half", "bfloat16", "double", "type", "_to_dtype")
_names("dropout", "dropout", "native_dropout", "feature_dropout", "alpha_dropout", "dropout_")
_names("view", "view", "reshape", "_unsafe_view", "view_copy", "flatten", "unflatten", "_reshape_alias")
_names("transpose", "transpose", "t", "swapaxes", "transpose_", "numpy_T", "mT", "adjoint")
_names("permute", "permute")
_names("expand", "expand", "expand_as", "broadcast_to")
_names("repeat_interleave", "repeat_interleave")
_names("repeat", "repeat", "tile")
_names("unsqueeze", "unsqueeze")
_names("squeeze", "squeeze")
_names("identity", "contiguous", "clone", "alias", "detach", "detach_", "lift_fresh_copy", "lift_fresh")
_names("cat", "cat", "concat", "concatenate")
_names("stack", "stack")
_names("slice", "slice", "narrow")
_names("select", "select")
_names("index", "index", "_index_put_impl")
_names("split", "split", "split_with_sizes", "chunk", "unbind", "tensor_split")
_names("getitem", "getitem")
_names("sqrt", "sqrt")
_names("rsqrt", "rsqrt")
_names("pow", "pow", "__pow__")
_names("mean", "mean")
_names("cos", "cos")
_names("sin", "sin")
_names("tril", "tril")
_names("triu", "triu")
_names("arange", "arange")
_names("compare", "le", "lt", "ge", "gt", "eq", "ne", "__le__", "__lt__", "__ge__", "__gt__", "__eq__", "__ne__")
_names("logical", "logical_and", "logical_or", "logical_not", "__and__", "__or__", "bitwise_and", "bitwise_or")
_names("index_copy", "index_copy", "index_copy_")
_names("index_put", "index_put", "index_put_")
_names("copy", "copy_", "slice_scatter", "copy")
_names("view_as_complex", "view_as_complex")
_names("view_as_real", "view_as_real")
_names("layer_norm", "layer_norm", "native_layer_norm")
_names("rms_norm", "rms_norm")
_names("embedding", "embedding")
_names("mka_attention", "mka_attention")  # a converted MKA site
_names("mka_mix", "route_mix", "memory_mix")  # our FastMKA ops: a converted site's keys/values
_names("tanh", "tanh")
_names("clamp", "clamp", "clamp_min", "clamp_max", "clip", "maximum", "minimum")
_names("max", "amax", "max", "logsumexp")
_names("full", "full", "zeros", "ones", "full_like", "zeros_like", "ones_like", "empty", "new_empty", "new_zeros")

_BY_FUNCTION: dict[Any, str] = {
    operator.matmul: "matmul",
    operator.mul: "mul",
    operator.truediv: "div",
    operator.add: "add",
    operator.sub: "sub",
    operator.neg: "neg",
    operator.getitem: "getitem",
    operator.setitem: "setitem",
    operator.pow: "pow",
    operator.and_: "logical",
    operator.le: "compare",
    operator.lt: "compare",
    operator.ge: "compare",
    operator.gt: "compare",
    operator.eq: "compare",
    operator.ne: "compare",
    F.scaled_dot_product_attention: "sdpa",
    F.softmax: "softmax",
    F.linear: "linear",
    F.dropout: "dropout",
    F.layer_norm: "layer_norm",
}

_BY_MODULE: tuple[tuple[type, str], ...] = (
    (nn.Linear, "linear"),
    (nn.Dropout, "dropout"),
    (nn.Softmax, "softmax"),
    (nn.LayerNorm, "layer_norm"),
    (nn.Identity, "identity"),
)

# ops that do not change values, only dtype/memory/ownership: matching sees through them
TRANSPARENT = frozenset({"identity", "cast", "dropout"})
# ops that only rearrange elements
LAYOUT = frozenset({"view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "repeat_interleave", "repeat"})


def _target_name(target: Any) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    name = getattr(target, "__name__", None)
    return name


def kind(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """Canonical kind of ``node``; ``placeholder`` / ``get_attr`` / ``output`` / ``unknown`` otherwise."""
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    if node.op == "call_function":
        if node.target in _BY_FUNCTION:
            return _BY_FUNCTION[node.target]
        return _BY_NAME.get(_target_name(node.target) or "", "unknown")
    if node.op == "call_method":
        return _BY_NAME.get(str(node.target), "unknown")
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(str(node.target))
        for cls, k in _BY_MODULE:
            if isinstance(mod, cls):
                return k
        if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # GPT-2 style: y = x @ W + b
            return "linear"
    return "unknown"


def arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of ``node`` (keyword, else positional ``pos``, else ``default``)."""
    if name in node.kwargs:
        return node.kwargs[name]
    if pos < len(node.args):
        return node.args[pos]
    return default


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The node's tensor inputs in argument order (lists flattened: ``cat``, aten ``einsum``)."""
    out: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    for a in node.args:
        visit(a)
    for a in node.kwargs.values():
        visit(a)
    return out


def value(node: Any) -> Any:
    """The example/fake value recorded for a node (``val``, ``example_value`` or ``tensor_meta``)."""
    if not isinstance(node, fx.Node):
        return node
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    return node.meta.get("tensor_meta")


SYMBOLIC = "mka_symbolic"  # node.meta key: the symbolic value while the rules see concrete sizes (the mka backend)


def symbolic_value(node: Any) -> Any:
    """A node's value with its symbolic sizes, where the concrete one stands in for it (else :func:`value`)."""
    if isinstance(node, fx.Node) and SYMBOLIC in node.meta:
        return node.meta[SYMBOLIC]
    return value(node)


def shape(node: Any) -> tuple[int, ...] | None:
    v = value(node)
    s = getattr(v, "shape", None)
    if s is None:
        return None
    try:
        return tuple(int(x) for x in s)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def rank(node: Any) -> int | None:
    s = shape(node)
    return None if s is None else len(s)


def is_parameter(node: Any, gm: fx.GraphModule | None) -> bool:
    """Is ``node`` a learned weight or buffer of the model (a ``get_attr``, possibly cast/viewed)?"""
    while isinstance(node, fx.Node) and kind(node, gm) in TRANSPARENT | LAYOUT:
        node = node.args[0]
    return isinstance(node, fx.Node) and (node.op == "get_attr" or bool(node.meta.get("mka_param")))


def scalar(x: Any) -> float | None:
    """A Python number, or None (0-d tensor constants are not resolved)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def normalize_dim(dim: int, nd: int | None) -> int:
    if nd is None or dim >= 0:
        return dim
    return dim + nd


def skip_transparent(node: Any, gm: fx.GraphModule | None = None) -> Any:
    """Follow the first input through casts, copies, contiguous and dropout."""
    while isinstance(node, fx.Node) and kind(node, gm) in TRANSPARENT and node.args:
        node = node.args[0]
    return node


def reaches_back(
    start: Any,
    gm: fx.GraphModule | None,
    found: Callable[[fx.Node, str], bool],
    through: Collection[str],
    limit: int = 24,
) -> bool:
    """Does ``start`` reach, back through nodes whose kind is in ``through`` (transparent ones skipped, at most
    ``limit`` steps), a node for which ``found(node, kind)`` holds?"""
    todo, seen = [(start, 0)], set()
    while todo:
        x, d = todo.pop()
        x = skip_transparent(x, gm)
        if not isinstance(x, fx.Node) or x in seen or d > limit:
            continue
        seen.add(x)
        k = kind(x, gm)
        if found(x, k):
            return True
        if k in through:
            todo.extend((i, d + 1) for i in tensor_inputs(x))
    return False
