"""Lower the attention sites of a dynamo graph (the ``mka`` backend): the ``lower.attention`` rules, run by
:class:`~mka_compile.graph.rules.PassManager` with its verification (lint, shapes/dtypes at the outputs, the ops
inserted), turn each plain attention site into one ``mka::flash_attention`` call (``attention="mka"``) or an SDPA
call (``"sdpa"``, eager sites); ``"keep"`` leaves them. The rules, their replacements and the reading of scale
and masks from the site facts live in :mod:`mka_compile.passes.attention.lowering`; this module decides per site
and reports what was done, or why not.
"""

from __future__ import annotations

from dataclasses import dataclass

from mka_compile.graph import ops
from mka_compile.graph.capture import Captured
from mka_compile.graph.ops import SYMBOLIC, symbolic_value
from mka_compile.graph.rules import PassManager
from mka_compile.passes.attention import SiteFacts
from mka_compile.passes.attention import lowering as attention_lowering

TARGETS = ("mka", "sdpa", "keep")

__all__ = ["SYMBOLIC", "TARGETS", "Lowered", "lower_sites", "symbolic_value"]


@dataclass
class Lowered:
    """What the backend did with one attention site of one graph."""

    name: str  # module path of the site
    rule: str  # the rule that found it
    action: str  # "mka::flash_attention" | "sdpa" | "kept" | "mka::mka_attention"
    reason: str | None = None  # why it was kept as it was


def lower_sites(facts: list[SiteFacts], captured: Captured, target: str) -> list[Lowered]:
    """Rewrite each site of ``captured.gm`` in place for ``target`` ("mka", "sdpa" or "keep")."""
    done, plans = [], {}
    lowered = "sdpa" if target == "sdpa" else "mka::flash_attention"
    for f in facts:
        out = f.match.captures["out"]
        kind = ops.kind(out, captured.gm)
        if kind == "mka_attention":
            done.append(Lowered(f.name, f.rule, "mka::mka_attention", "a converted MKA site (already an mka:: op)"))
        elif target == "keep":
            done.append(Lowered(f.name, f.rule, "kept", "options attention='keep'"))
        elif kind == "sdpa" and target == "sdpa":
            done.append(Lowered(f.name, f.rule, "sdpa", None))
        else:
            plan = attention_lowering.plan(f, captured, target)
            if isinstance(plan, str):
                done.append(Lowered(f.name, f.rule, "kept", plan))
            else:
                plans[out] = plan
                done.append(Lowered(f.name, f.rule, lowered, None))
    if plans:
        result = PassManager(attention_lowering.rules(plans), keep_meta=True).run(captured.gm, captured.inputs)
        if sum(result.changes.values()) != len(plans):
            raise RuntimeError(f"mka backend: {len(plans)} site(s) planned for lowering, {result.changes} rewritten")
    captured.gm.graph.lint()
    captured.gm.recompile()
    return done
