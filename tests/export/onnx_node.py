"""Run one ``com.mka`` node (with its model-local function) in ONNX Runtime, for the function-body tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from mka_compile.export.attention_functions import FUNCTIONS as ATTENTION
from mka_compile.export.builder import OPSET
from mka_compile.export.memory_functions import FUNCTIONS as MEMORY
from mka_compile.export.schemas import DOMAIN, SPECS, VERSION, register_schemas

FUNCTIONS = {**MEMORY, **ATTENTION}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def run_node(op: str, inputs: list[torch.Tensor], like: list[torch.Tensor], **attrs) -> list[torch.Tensor]:
    """``op``'s outputs for ``inputs`` (in schema order); ``like`` gives each output's dtype."""
    register_schemas()
    spec = SPECS[op]
    in_names = [n for n, _ in spec.inputs]
    out_names = [n for n, _ in spec.outputs]
    node = helper.make_node(op, in_names, out_names, domain=DOMAIN, **attrs)
    vi = lambda n, t: helper.make_tensor_value_info(  # noqa: E731
        n, helper.np_dtype_to_tensor_dtype(_np(t).dtype), list(t.shape)
    )
    graph = helper.make_graph(
        [node],
        op,
        [vi(n, t) for n, t in zip(in_names, inputs)],
        [vi(n, t) for n, t in zip(out_names, like)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, VERSION)],
        functions=[FUNCTIONS[op]()],
        ir_version=10,
    )
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(out_names, {n: _np(t) for n, t in zip(in_names, inputs)})
    return [torch.from_numpy(np.asarray(o)) for o in outs]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` (0 for two empty or all-zero tensors that agree)."""
    diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    scale = float(b.double().abs().max()) if b.numel() else 0.0
    return diff / scale if scale else diff
