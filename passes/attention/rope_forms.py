"""How RoPE is spelled in a graph: the rotated pair ``x * cos + rotate(x) * sin`` (rotate-half, interleaved pairs,
stack/flatten of rotated pairs, concatenated rotated halves) and what is a table lookup or a constant, so that the
provenance walk (:mod:`.provenance`) can step from a rotated operand to the tensor that was rotated."""

from __future__ import annotations

from collections import deque

from torch import fx

from mka_compile.graph import ops

_ROTATION_OPS = frozenset(
    {"slice", "neg", "cat", "stack", "view", "getitem", "select", "unsqueeze", "squeeze", "identity", "cast", "split"}
)
_PAIR_OPS = frozenset({"select", "getitem", "view", "unsqueeze", "squeeze", "slice", "identity", "cast", "split"})


def _reaches(start: fx.Node, target: fx.Node, allowed: frozenset[str], gm, limit: int = 12) -> str | None:
    """Is ``target`` an ancestor of ``start`` through ``allowed`` kinds only? Returns the kinds seen."""
    seen_kinds: set[str] = set()
    queue = deque([(start, 0)])
    visited = set()
    while queue:
        n, depth = queue.popleft()
        if n is target:
            return ",".join(sorted(seen_kinds)) or "direct"
        if depth >= limit or n in visited or not isinstance(n, fx.Node):
            continue
        visited.add(n)
        k = ops.kind(n, gm)
        if n is not start and k not in allowed:
            continue
        seen_kinds.add(k)
        for i in ops.tensor_inputs(n):
            queue.append((i, depth + 1))
    return None


def _rope_source(add: fx.Node, gm) -> tuple[fx.Node, str] | None:
    """``x * cos + rot(x) * sin`` -> ``(x, style)``; None when ``add`` is not a rotation."""
    ins = [ops.skip_transparent(i, gm) for i in ops.tensor_inputs(add)]
    if len(ins) != 2 or any(ops.kind(i, gm) != "mul" for i in ins):
        return None
    for m1, m2 in (ins, ins[::-1]):
        for x in ops.tensor_inputs(m1):
            x = ops.skip_transparent(x, gm)
            for r in ops.tensor_inputs(m2):
                r = ops.skip_transparent(r, gm)
                if r is x:
                    continue
                kinds = _reaches(r, x, _ROTATION_OPS, gm)
                if kinds and ("neg" in kinds or "cat" in kinds or "stack" in kinds):
                    return x, ("interleaved" if "stack" in kinds else "rotate_half")
    return None


def _pair_base(n: fx.Node, gm) -> fx.Node:
    """Follow element selection / reshaping ops back to the tensor they read (``x[..., 0]`` -> ``x``)."""
    while isinstance(n, fx.Node) and ops.kind(n, gm) in _PAIR_OPS and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _stack_rope_source(stack: fx.Node, gm) -> fx.Node | None:
    """``stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1)`` (then flattened: rotated pairs), or the same with
    ``cat`` (rotated halves): the tensor ``x`` both parts read, else None."""
    parts = [ops.skip_transparent(t, gm) for t in ops.tensor_inputs(stack)]
    if len(parts) != 2 or any(ops.kind(t, gm) not in ("add", "sub") for t in parts):
        return None
    common: set[fx.Node] | None = None
    for part in parts:
        muls = [ops.skip_transparent(i, gm) for i in ops.tensor_inputs(part)]
        if len(muls) != 2 or any(ops.kind(x, gm) != "mul" for x in muls):
            return None
        for mul in muls:
            bases = {b for b in (_pair_base(i, gm) for i in ops.tensor_inputs(mul)) if not _const_like(b, gm)}
            common = bases if common is None else common & bases
    if common and len(common) > 1:  # cos / sin looked up in a table at positions: not the rotated tensor
        common = {b for b in common if not _table_lookup(b, gm)}
    if not common or len(common) != 1:
        return None
    return next(iter(common))


def _table_lookup(n: fx.Node, gm) -> bool:
    """``table[positions]`` (or a slice of it): a buffer or parameter read at some positions."""
    while (
        isinstance(n, fx.Node)
        and ops.kind(n, gm) in {"index", "slice", "select", "view", "getitem", "unsqueeze"} | ops.TRANSPARENT
    ):
        n = n.args[0]
    return isinstance(n, fx.Node) and (n.op == "get_attr" or bool(n.meta.get("mka_param")))


def _const_like(n: fx.Node, gm, limit: int = 5000) -> bool:
    """No graph input among the ancestors (a buffer, a constant, a lifted cache tensor)."""
    queue, visited = deque([n]), set()
    while queue:
        x = queue.popleft()
        if x in visited:
            continue
        visited.add(x)
        if (x.op == "placeholder" and not x.meta.get("mka_param")) or len(visited) > limit:
            return False
        queue.extend(ops.tensor_inputs(x))
    return True
