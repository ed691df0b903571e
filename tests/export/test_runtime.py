"""ort_session / providers: ONNX Runtime's CUDA provider first when it is there (onnxruntime-gpu), else the CPU."""

from __future__ import annotations

import onnx
import onnxruntime
from onnx import helper

from mka_compile.export import ort_session, providers


def test_cuda_first_when_onnxruntime_has_it(monkeypatch) -> None:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers() == ["CPUExecutionProvider"]
    have = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: have)
    assert providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_session_options_are_applied(tmp_path) -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "r.onnx")
    sess = ort_session(tmp_path / "r.onnx", intra_op_num_threads=1)
    assert sess.get_providers()[-1] == "CPUExecutionProvider"
    assert sess.get_session_options().intra_op_num_threads == 1
