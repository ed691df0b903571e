"""A small pattern language over canonical op kinds (see :mod:`mka_compile.graph.ops`).

``op("matmul", op("softmax", any_("scores")), any_("v"))`` matches ``softmax(scores) @ v`` whatever the
capture spelled (``aten.bmm``, ``torch.matmul``, ``x @ y``). Matching always sees through casts,
copies, contiguous and dropout; ``opt(...)`` layers may be present or absent (a scale multiply, a mask
add), ``commutative=True`` tries both operand orders, and ``check`` callbacks return ``None`` (ok) or a
reason string. A failed match remembers how far it got and why, for the explainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from . import ops

Check = Callable[[fx.Node, "Match"], "str | None"]


@dataclass(frozen=True)
class Pat:
    kinds: frozenset[str] | None = None  # None: any node (a capture)
    inputs: tuple[Pat, ...] = ()  # matched against the node's tensor inputs, in order (a prefix)
    name: str | None = None  # capture name
    optional: bool = False  # may be absent: then ``inputs[through]`` is matched against the same node
    check: Check | None = None
    commutative: bool = False
    through: int = 0


def op(
    kinds: str | set[str] | frozenset[str],
    *inputs: Pat,
    name: str | None = None,
    check: Check | None = None,
    commutative: bool = False,
) -> Pat:
    """A node of one of ``kinds`` whose tensor inputs match ``inputs``."""
    ks = frozenset({kinds}) if isinstance(kinds, str) else frozenset(kinds)
    return Pat(ks, tuple(inputs), name, False, check, commutative)


def opt(
    kinds: str | set[str] | frozenset[str],
    *inputs: Pat,
    through: int = 0,
    name: str | None = None,
    check: Check | None = None,
    commutative: bool = False,
) -> Pat:
    """An optional layer ``kinds(*inputs)``; when absent, ``inputs[through]`` matches the node itself."""
    ks = frozenset({kinds}) if isinstance(kinds, str) else frozenset(kinds)
    return Pat(ks, tuple(inputs), name, True, check, commutative, through)


def any_(name: str | None = None, check: Check | None = None) -> Pat:
    """Any node, captured as ``name``."""
    return Pat(None, (), name, False, check)


@dataclass
class Match:
    """Captures of a (partial) match, how many pattern nodes matched, and the first failure. ``bound``: values a
    rule's filters give its replacement besides the captures (constants such as a scale, or nodes)."""

    gm: fx.GraphModule | None
    captures: dict[str, fx.Node] = field(default_factory=dict)
    progress: int = 0
    reason: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    bound: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> fx.Node:
        return self.captures[name]

    def get(self, name: str) -> fx.Node | None:
        return self.captures.get(name)

    def _snapshot(self) -> tuple[dict[str, fx.Node], int]:
        return dict(self.captures), self.progress

    def _restore(self, snap: tuple[dict[str, fx.Node], int]) -> None:
        self.captures, self.progress = dict(snap[0]), snap[1]

    def fail(self, reason: str) -> bool:
        self.reason = reason
        return False


def match(pat: Pat, node: Any, m: Match) -> bool:
    """Match ``pat`` against ``node`` (recursively), filling ``m``; on failure ``m.reason`` says why."""
    if not isinstance(node, fx.Node):
        return m.fail(f"expected a tensor, found the constant {node!r}")
    node = ops.skip_transparent(node, m.gm)
    if pat.kinds is None:
        if pat.check is not None and (reason := pat.check(node, m)):
            return m.fail(reason)
        if pat.name:
            m.captures[pat.name] = node
        m.progress += 1
        return True
    k = ops.kind(node, m.gm)
    if k not in pat.kinds:
        if pat.optional:
            return match(pat.inputs[pat.through], node, m)
        return m.fail(f"expected {'/'.join(sorted(pat.kinds))} but found {k} ({node.name})")
    ins = ops.tensor_inputs(node)
    orders = [ins]
    if pat.commutative and len(ins) == 2:
        orders.append(ins[::-1])
    best_reason = None
    for order in orders:
        snap = m._snapshot()
        ok = len(order) >= len(pat.inputs)
        if not ok:
            m.fail(f"{node.name} has {len(order)} tensor inputs, the pattern needs {len(pat.inputs)}")
        else:
            ok = all(match(p, n, m) for p, n in zip(pat.inputs, order))
        if ok and pat.check is not None and (reason := pat.check(node, m)):
            ok = m.fail(reason)
        if ok:
            if pat.name:
                m.captures[pat.name] = node
            m.progress += 1
            return True
        best_reason = m.reason
        if pat.optional:  # the layer may also be absent
            m._restore(snap)
            if match(pat.inputs[pat.through], node, m):
                return True
        m._restore(snap)
    return m.fail(best_reason or f"no match at {node.name}")
