"""A small writer of ONNX graphs and functions: ``b.op("MatMul", x, y)`` appends a node and returns its output
name(s). The ``com.mka`` function bodies are written with it (standard ONNX ops only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

OPSET = 18  # the default-domain opset of exported models and of every function body


class Builder:
    """Collects nodes with fresh output names; ``prefix`` keeps names unique across nested subgraphs."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        """Append ``op_type(inputs, **attrs)``; returns the output name, or the names when ``outputs > 1``."""
        names = [self._fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.int64) -> str:
        """A constant tensor (a Python scalar gives a 0-d tensor, a list a 1-d one)."""
        arr = np.asarray(value, dtype=dtype)
        name = self._fresh("const")
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name)))
        return name

    def attr(self, name: str, kind: str) -> str:
        """A 0-d constant holding the enclosing function's attribute ``name`` (``kind``: "float" or "int")."""
        out = self._fresh(name)
        node = helper.make_node("Constant", [], [out])
        attr_type = AttributeProto.FLOAT if kind == "float" else AttributeProto.INT
        node.attribute.append(helper.make_attribute_ref(f"value_{kind}", attr_type, ref_attr_name=name))
        self.nodes.append(node)
        return out

    # -- shorthands used by every body ----------------------------------------------------------------
    def dim(self, x: str, axis: int) -> str:
        """``x.shape[axis]`` as a 1-d int64 tensor of one element."""
        if axis == -1:
            return self.op("Shape", x, start=-1)
        return self.op("Shape", x, start=axis, end=axis + 1)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", x, self.const(list(axes)))

    def reshape(self, x: str, shape: str) -> str:
        return self.op("Reshape", x, shape)

    def cat_shape(self, *parts: str | int) -> str:
        """A shape tensor from 1-d int64 pieces and Python ints."""
        names = [self.const([p]) if isinstance(p, int) else p for p in parts]
        return self.op("Concat", *names, axis=0)

    def where(self, cond: str, a: str, b: str) -> str:
        return self.op("Where", cond, a, b)

    def range_(self, n: str) -> str:
        """``arange(n)`` for a 1-element int64 tensor ``n``."""
        scalar = self.op("Squeeze", n, self.const([0]))
        return self.op("Range", self.const(0), scalar, self.const(1))

    def cast_like(self, x: str, like: str) -> str:
        return self.op("CastLike", x, like)

    def scalar_like(self, value: float, like: str) -> str:
        return self.cast_like(self.const(value, np.float32), like)

    def any_(self, x: str, axis: int) -> str:
        """``x.any(axis, keepdim=True)`` for a bool tensor."""
        hit = self.op("ReduceMax", self.op("Cast", x, to=onnx.TensorProto.INT32), self.const([axis]), keepdims=1)
        return self.op("Greater", hit, self.const(0, np.int32))


def graph(builder: Builder, name: str, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.GraphProto:
    """A subgraph (a Scan or Loop body) from ``builder``'s nodes; input/output types are left to inference."""
    return helper.make_graph(
        builder.nodes,
        name,
        [onnx.ValueInfoProto(name=n) for n in inputs],
        [onnx.ValueInfoProto(name=n) for n in outputs],
    )


def function(
    builder: Builder,
    domain: str,
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    attributes: Sequence[str] = (),
    doc: str = "",
) -> onnx.FunctionProto:
    """A model-local function whose body is ``builder``'s nodes (standard ONNX ops, opset :data:`OPSET`)."""
    return helper.make_function(
        domain,
        name,
        list(inputs),
        list(outputs),
        builder.nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=list(attributes),
        doc_string=doc,
    )


def spec_function(b: Builder, name: str) -> onnx.FunctionProto:
    """The model-local function ``name`` of the ``com.mka`` domain, with the inputs, outputs, attributes and doc
    of its registered schema (:data:`mka_compile.export.schemas.SPECS`) and ``b``'s nodes as its body."""
    from .schemas import DOMAIN, SPECS

    spec = SPECS[name]
    return function(
        b,
        DOMAIN,
        name,
        [n for n, _ in spec.inputs],
        [n for n, _ in spec.outputs],
        [n for n, _ in spec.attributes],
        spec.doc,
    )
