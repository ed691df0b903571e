"""The com.mka operator set: every node type has a registered OpSchema and a function with the same signature,
and ONNX shape inference runs through the functions."""

from __future__ import annotations

import onnx
import onnx.defs
import pytest
from onnx import helper

from mka_compile.export.attention_functions import FUNCTIONS as ATTENTION
from mka_compile.export.builder import OPSET
from mka_compile.export.memory_functions import FUNCTIONS as MEMORY
from mka_compile.export.schemas import DOMAIN, SPECS, VERSION, register_schemas

FUNCTIONS = {**MEMORY, **ATTENTION}


def test_every_spec_has_a_schema_and_a_matching_function() -> None:
    register_schemas()
    register_schemas()  # idempotent
    assert set(SPECS) == set(FUNCTIONS)
    for name, spec in SPECS.items():
        schema = onnx.defs.get_schema(name, VERSION, DOMAIN)
        fn = FUNCTIONS[name]()
        assert [p.name for p in schema.inputs] == list(fn.input) == [n for n, _ in spec.inputs]
        assert [p.name for p in schema.outputs] == list(fn.output) == [n for n, _ in spec.outputs]
        assert set(schema.attributes) == set(fn.attribute) == {n for n, _ in spec.attributes}
        assert (fn.domain, fn.name) == (DOMAIN, name)
        assert {o.domain: o.version for o in fn.opset_import} == {"": OPSET}


@pytest.mark.parametrize("T", [7, "T"])
def test_shape_inference_through_the_session_scan_function(T) -> None:
    f32 = onnx.TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("k", f32, [2, 3, T, 4]),
        helper.make_tensor_value_info("v", f32, [2, 3, T, 4]),
        helper.make_tensor_value_info("valid", onnx.TensorProto.BOOL, [2, T]),
        helper.make_tensor_value_info("sk", f32, [2, 3, 4]),
        helper.make_tensor_value_info("sv", f32, [2, 3, 4]),
        helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [2]),
    ]
    node = helper.make_node("SessionScan", [i.name for i in inputs], ["a", "b", "c", "d"], domain=DOMAIN, beta=0.9)
    graph = helper.make_graph([node], "g", inputs, [helper.make_value_info(n, onnx.TypeProto()) for n in "abcd"])
    model = helper.make_model(
        graph,
        ir_version=10,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, VERSION)],
        functions=[MEMORY["SessionScan"]()],
    )
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in inferred.graph.output}
    assert shapes["a"] == [2, 3, T, 4] and shapes["c"] == [2, 3, 4]


def _infer(op: str, inputs: list, n_out: int, **attrs) -> list[list]:
    node = helper.make_node(op, [i.name for i in inputs], [f"o{i}" for i in range(n_out)], domain=DOMAIN, **attrs)
    outs = [helper.make_value_info(f"o{i}", onnx.TypeProto()) for i in range(n_out)]
    model = helper.make_model(
        helper.make_graph([node], "g", inputs, outs),
        ir_version=10,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, VERSION)],
        functions=[FUNCTIONS[op]()],
    )
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return [
        (v.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
        for v in inferred.graph.output
    ]


def test_shape_inference_of_recall_select_and_route_mix() -> None:
    register_schemas()
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    vi = helper.make_tensor_value_info
    got = _infer(
        "RecallSelect",
        [vi("q", f32, ["B", 2, "T", 8]), vi("s", f32, ["B", 2, 16, 8]), vi("p", i64, ["B", "T"])],
        2,
        chunk_size=4,
        top_r=3,
    )
    assert got == [(i64, ["B", 2, "T", 3]), (onnx.TensorProto.BOOL, ["B", 2, "T", 3])]
    levels = [vi("lam", f32, [1, 1, 5, 3]), vi("ks", f32, [3, 1, 2, 5, 8]), vi("vs", f32, [3, 1, 2, 5, 8])]
    got = _infer("RouteMix", levels, 2)
    assert got == [(f32, [1, 2, 5, 8])] * 2
