from __future__ import annotations

import pytest
import torch

import mka_compile
from mka_compile import PassError, PassManager, Rule, any_, op
from mka_compile.graph import ops


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2.0


def _captured():
    return mka_compile.capture(_Tiny().eval(), (torch.randn(3, 4),))


def test_rule_requires_concrete_root() -> None:
    with pytest.raises(ValueError, match="root"):
        Rule("bad", any_("x"))


def test_rule_rewrites_and_pass_manager_counts() -> None:
    c = _captured()
    before = c.gm(*c.inputs)[0]
    rule = Rule("double_linear", op("linear", any_("x"), any_("w")), replacement=lambda x, w: 2 * (x @ w.T))
    res = PassManager([rule]).run(c.gm)
    assert res.changes == {"double_linear": 1}
    assert not any(ops.kind(n) == "linear" for n in c.gm.graph.nodes)
    assert c.gm(*c.inputs)[0].shape == before.shape


def test_pass_that_changes_output_shape_is_named() -> None:
    c = _captured()

    def shrink(gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        leaf = out.args[0][0]
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.ops.aten.sum.default, (leaf,))
        out.args = ((new,),)
        gm.recompile()
        return 1

    with pytest.raises(PassError, match="'shrink' changed the graph's output shapes"):
        PassManager([shrink]).run(c.gm)


def test_pass_inserting_unknown_op_is_named() -> None:
    c = _captured()

    def sneaky(x):
        return x

    sneaky.__module__ = "somewhere_else"

    def insert(gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        leaf = out.args[0][0]
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(sneaky, (leaf,))
        out.args = ((new,),)
        gm.recompile()
        return 1

    with pytest.raises(PassError, match="'insert' inserted .* not an allowed op"):
        PassManager([insert]).run(c.gm)


def test_pass_breaking_shapes_is_named() -> None:
    c = _captured()

    def bad_view(gm):
        lin = next(n for n in gm.graph.nodes if ops.kind(n) == "linear")
        with gm.graph.inserting_after(lin):
            v = gm.graph.call_function(torch.ops.aten.view.default, (lin, [5, 7]))
        lin.replace_all_uses_with(v)
        v.args = (lin, [5, 7])
        gm.recompile()
        return 1

    with pytest.raises(PassError, match="'bad_view': shapes/dtypes no longer propagate"):
        PassManager([bad_view]).run(c.gm)


def test_replacement_takes_values_bound_by_filters_and_defaults() -> None:
    """A filter binds a constant (and a node) for the replacement; a parameter with a default may be left out;
    ``keep_meta`` leaves the nodes' ``val`` metadata as it was."""
    model, x = _Tiny().eval(), torch.randn(3, 4)
    c = mka_compile.capture(model, (x,))

    def bind(m):
        m.bound.update(factor=3.0, y=m.captures["x"])
        return None

    def scaled(w, factor, y, unused=None):
        return factor * (y @ w.T)

    rule = Rule("scaled_linear", op("linear", any_("x"), any_("w")), (bind,), scaled)
    vals = {n: n.meta.get("val") for n in c.gm.graph.nodes}
    res = PassManager([rule], keep_meta=True).run(c.gm)
    assert res.changes == {"scaled_linear": 1}
    torch.testing.assert_close(c.gm(*c.inputs)[0], torch.relu(3.0 * (x @ model.lin.weight.T)) * 2.0)
    assert all(n.meta.get("val") is vals[n] for n in c.gm.graph.nodes if n in vals)
    c = mka_compile.capture(model, (x,))
    with pytest.raises(ValueError, match=r"\['z'\] are neither captures of the pattern nor bound"):
        Rule("missing", op("linear", any_("x"), any_("w")), replacement=lambda x, z: x).apply(c.gm)
