"""Rules and the pass manager.

A :class:`Rule` has a dotted name, a :class:`~mka_compile.graph.pattern.Pat`, filters that return
``None`` (ok) or a reason, and optionally a replacement: a Python function whose parameter names are
capture names, or names a filter bound on the match (``m.bound["scale"] = 0.125``: constants or nodes);
parameters with defaults may be left out. :class:`PassManager` runs passes (rules or plain graph
functions) and verifies the graph after every one: lint, shapes/dtypes re-propagated and unchanged at
the outputs, only allowed ops among the nodes the pass inserted. A failure names the pass.

A user rule in a few lines::

    def my_attention(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    rule = Rule("user.attention", op("matmul", op("softmax", op("matmul", any_("q"), any_("kt"))), any_("v")),
                replacement=lambda q, kt, v: my_attention(q, kt.transpose(-1, -2), v))
    PassManager([rule]).run(gm, example_inputs)
"""

from __future__ import annotations

import inspect as pyinspect
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from . import ops
from .pattern import Match, Pat, match

Filter = Callable[[Match], "str | None"]


@dataclass(frozen=True)
class Rule:
    """``name``: dotted (``attention.eager.matmul``); ``pattern``: what to find; ``filters``: each returns
    ``None`` or the reason the match is refused; ``replacement``: function of the captures (by name)."""

    name: str
    pattern: Pat
    filters: tuple[Filter, ...] = ()
    replacement: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.pattern.kinds is None or self.pattern.optional:
            raise ValueError(f"rule {self.name!r}: the pattern's root must be a concrete op(...), not any_/opt")

    @property
    def anchor_kinds(self) -> frozenset[str]:
        return self.pattern.kinds  # type: ignore[return-value]

    def match_at(self, node: fx.Node, gm: fx.GraphModule | None) -> tuple[bool, Match]:
        """Match the pattern rooted at ``node`` and run the filters; ``(ok, match)``."""
        m = Match(gm)
        if ops.kind(node, gm) not in self.anchor_kinds:
            m.fail(f"{node.name} is {ops.kind(node, gm)}, the rule starts at {'/'.join(sorted(self.anchor_kinds))}")
            return False, m
        if not match(self.pattern, node, m):
            return False, m
        for f in self.filters:
            reason = f(m)
            if reason:
                m.fail(reason)
                return False, m
        return True, m

    def find(self, gm: fx.GraphModule) -> list[Match]:
        """Every accepted match in ``gm`` (anchors in graph order)."""
        out = []
        for node in gm.graph.nodes:
            if ops.kind(node, gm) in self.anchor_kinds:
                ok, m = self.match_at(node, gm)
                if ok:
                    m.facts.setdefault("anchor", node)
                    out.append(m)
        return out

    def apply(self, gm: fx.GraphModule) -> int:
        """Replace every match with a call of ``replacement``; returns the number of rewrites. The nodes the
        rewrite leaves unused (the matched ops) are erased; the rest of the graph is not touched."""
        if self.replacement is None:
            raise ValueError(f"rule {self.name!r} has no replacement; use find() to only match")
        params = pyinspect.signature(self.replacement).parameters
        n = 0
        for m in self.find(gm):
            anchor: fx.Node = m.facts["anchor"]
            given = {**m.captures, **m.bound}
            missing = [p for p, x in params.items() if p not in given and x.default is x.empty]
            if missing:
                raise ValueError(
                    f"rule {self.name!r}: replacement parameters {missing} are neither captures of the pattern nor "
                    "bound by its filters"
                )
            with gm.graph.inserting_before(anchor):
                new = gm.graph.call_function(self.replacement, kwargs={p: given[p] for p in params if p in given})
            new.meta.update({k: v for k, v in anchor.meta.items() if k != "val"})
            anchor.replace_all_uses_with(new)
            _erase_unused(anchor)
            n += 1
        if n:
            gm.recompile()
        return n


def _erase_unused(node: fx.Node) -> None:
    """Erase ``node`` if nothing uses it, then the inputs that leaves unused (placeholders and impure ops stay)."""
    graph, todo = node.graph, [node]
    while todo:
        n = todo.pop()
        if n.users or n.op in ("placeholder", "output") or n.is_impure():
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        todo.extend(i for i in inputs if i not in todo)


class PassError(RuntimeError):
    """A pass left the graph broken; the message names the pass."""


@dataclass
class PassResult:
    gm: fx.GraphModule
    changes: dict[str, int] = field(default_factory=dict)


_SAFE_MODULES = ("torch", "operator", "math", "builtins", "_operator")


def _allowed(target: Any, extra: set[Any]) -> bool:
    if target in extra or isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return True
    mod = getattr(target, "__module__", "") or ""
    return mod.split(".")[0] in _SAFE_MODULES or target in (operator.getitem, math.sqrt)


def _signature(gm: fx.GraphModule) -> list[tuple[tuple[int, ...] | None, torch.dtype | None]]:
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = [a for a in ops.tensor_inputs(out_node)]
    return [(ops.shape(n), getattr(ops.value(n), "dtype", None)) for n in leaves]


class PassManager:
    """Run passes in order, verifying the graph after each one.

    ``passes``: :class:`Rule` objects (their replacement is applied) or functions ``f(gm) -> int``
    (number of changes). Verification needs example inputs, or placeholders with ``val`` metadata
    (graphs from torch.export / dynamo have them). ``keep_meta``: verification leaves the nodes' ``val``
    metadata as it was (for graphs whose metadata belongs to their producer, e.g. a dynamo graph).
    """

    def __init__(
        self,
        passes: Sequence[Rule | Callable[[fx.GraphModule], int]],
        verify: bool = True,
        keep_meta: bool = False,
    ) -> None:
        self.passes = list(passes)
        self.verify = verify
        self.keep_meta = keep_meta

    def _fake_inputs(self, gm: fx.GraphModule, example_inputs: Sequence[Any] | None, mode) -> list[Any]:
        holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if example_inputs is not None:
            if len(example_inputs) != len(holders):
                raise ValueError(f"example_inputs has {len(example_inputs)} entries, the graph {len(holders)} inputs")
            return [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        vals = [ops.value(n) for n in holders]
        if any(not isinstance(v, torch.Tensor) for v in vals):
            raise ValueError("the graph's inputs carry no 'val' metadata; pass example_inputs to PassManager.run")
        return [mode.from_tensor(v) for v in vals]

    def _propagate(self, gm: fx.GraphModule, example_inputs: Sequence[Any] | None, mode) -> list:
        """Re-propagate shapes/dtypes; returns the outputs' signature."""
        saved = (
            {n: tuple(n.meta.get(k, _ABSENT) for k in _PROPAGATED) for n in gm.graph.nodes} if self.keep_meta else {}
        )
        try:
            FakeTensorProp(gm, mode).propagate(*self._fake_inputs(gm, example_inputs, mode))
            return _signature(gm)
        finally:
            if self.keep_meta:
                for n in gm.graph.nodes:
                    for k, v in zip(_PROPAGATED, saved.get(n, (_ABSENT,) * len(_PROPAGATED))):
                        if v is _ABSENT:
                            n.meta.pop(k, None)
                        else:
                            n.meta[k] = v

    def run(self, gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None) -> PassResult:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        # one fake mode for every propagation of this run; its shape env lets a graph call .item(); static input shapes
        mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)
        result = PassResult(gm)
        if self.verify:
            before = self._propagate(gm, example_inputs, mode)
        extra: set[Any] = set()
        for p in self.passes:
            name = p.name if isinstance(p, Rule) else getattr(p, "__name__", repr(p))
            old = set(gm.graph.nodes)
            if isinstance(p, Rule):
                extra.add(p.replacement)
                changes = p.apply(gm)
            else:
                changes = int(p(gm) or 0)
            result.changes[name] = changes
            if self.verify:
                self._check(gm, name, before, example_inputs, extra, old, mode)
        return result

    def _check(self, gm, name, before, example_inputs, extra, old, mode) -> None:
        try:
            gm.graph.lint()
        except Exception as exc:  # noqa: BLE001
            raise PassError(f"pass {name!r} left an invalid graph: {exc}") from exc
        for n in gm.graph.nodes:
            if n not in old and n.op == "call_function" and not _allowed(n.target, extra):
                raise PassError(f"pass {name!r} inserted {n.name} calling {n.target!r}, which is not an allowed op")
        try:
            after = self._propagate(gm, example_inputs, mode)
        except Exception as exc:  # noqa: BLE001
            raise PassError(f"pass {name!r}: shapes/dtypes no longer propagate: {type(exc).__name__}: {exc}") from exc
        if after != before:
            raise PassError(f"pass {name!r} changed the graph's output shapes/dtypes from {before} to {after}")


_ABSENT = object()
_PROPAGATED = ("val", "tensor_meta")  # what FakeTensorProp writes
