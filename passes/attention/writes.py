"""In-place writes into a tensor before it is read: how a cache buffer or a tensor filled piece by piece got its
contents (``cache[:, a:b] = new`` as ``aten.copy_`` on a slice or ``operator.setitem``, in-place ``index_put_`` /
``index_copy_``), found by one walk over the buffer and its views."""

from __future__ import annotations

from torch import fx

from mka_compile.graph import ops

_VIEW_KINDS = frozenset({"slice", "select", "view", "getitem", "identity", "transpose", "permute", "unsqueeze"})
_INPLACE = {"copy_": ("slice_assign", 1), "index_put_": ("index_put", 2), "index_copy_": ("index_copy", 3)}


def writes(buffer: fx.Node, before: fx.Node | None, gm) -> list[tuple[str, fx.Node]]:
    """``(cache kind, source)`` of each in-place write into ``buffer`` (or a view of it) before the node ``before``
    (None: anywhere in the graph), in graph order."""
    order = {n: i for i, n in enumerate(buffer.graph.nodes)}
    limit = len(order) if before is None else order.get(before, len(order))
    found: list[tuple[int, str, fx.Node]] = []
    todo, seen = [buffer], set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        for u in v.users:
            if order.get(u, limit) >= limit or not u.args or u.args[0] is not v:
                continue
            name = target_name(u)
            if name in _INPLACE:
                kind, pos = _INPLACE[name]
                src = ops.arg(u, pos, "src")
                if isinstance(src, fx.Node):
                    found.append((order[u], kind, src))
            elif ops.kind(u, gm) == "setitem" and isinstance(u.args[2], fx.Node):
                found.append((order[u], "slice_assign", u.args[2]))
            elif ops.kind(u, gm) in _VIEW_KINDS:
                todo.append(u)
    return [(kind, src) for _, kind, src in sorted(found, key=lambda x: x[0])]


def target_name(n: fx.Node) -> str:
    t = n.target
    if hasattr(t, "_overloadpacket"):
        return t._overloadpacket.__name__
    return str(t) if n.op == "call_method" else getattr(t, "__name__", "")
