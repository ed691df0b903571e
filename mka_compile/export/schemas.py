"""The ``com.mka`` operator set: one ``onnx.defs.OpSchema`` per exported node type.

Every node of the domain has a model-local function of the same name (standard ONNX ops, see
:mod:`.memory_functions` and :mod:`.attention_functions`), so stock ONNX Runtime runs the file; the schemas
let ``onnx`` (the checker, shape inference) and the exporter's tracer know the inputs, outputs and attributes.
Lists of level tensors are passed stacked on a leading axis (``ks: [L, B, Hkv, T, d]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx.defs
from onnx.defs import OpSchema

DOMAIN = "com.mka"
VERSION = 1

_FLOATS = ["tensor(float16)", "tensor(bfloat16)", "tensor(float)", "tensor(double)"]
_STATE = ["tensor(float)", "tensor(double)"]
_TYPES = {
    "T": (_FLOATS, "activations"),
    "S": (_STATE, "MKA state (float32, or float64 with float64 inputs)"),
    "B": (["tensor(bool)"], "masks"),
    "I": (["tensor(int64)"], "counts, positions and indices"),
    "F": (["tensor(float)"], "log-sum-exp (float32)"),
    "M": (_FLOATS, "additive attention mask (-inf or <= -1e4 hides a key)"),
}


@dataclass(frozen=True)
class OpSpec:
    """A ``com.mka`` node type: ``inputs``/``outputs`` as ``(name, type letter)``, ``attributes`` as
    ``(name, "float" | "int")``. ``shapes`` gives each output's type for shape inference: the index of the input
    whose type it has, or a function ``(input types) -> TypeProto``."""

    name: str
    doc: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    attributes: tuple[tuple[str, str], ...] = ()
    shapes: tuple = ()

    def infer(self, ctx) -> None:
        """Type and shape inference (``onnx.defs``): each output from ``shapes``."""
        types = [ctx.get_input_type(i) if ctx.has_input(i) else None for i in range(ctx.get_num_inputs())]
        for i, rule in enumerate(self.shapes):
            out = types[rule] if isinstance(rule, int) else rule(types, ctx)
            if out is not None:
                ctx.set_output_type(i, out)

    def schema(self) -> OpSchema:
        used = sorted({t for _, t in self.inputs + self.outputs})
        kinds = {"float": OpSchema.AttrType.FLOAT, "int": OpSchema.AttrType.INT}
        schema = OpSchema(
            self.name,
            DOMAIN,
            VERSION,
            self.doc,
            inputs=[OpSchema.FormalParameter(n, t) for n, t in self.inputs],
            outputs=[OpSchema.FormalParameter(n, t) for n, t in self.outputs],
            type_constraints=[(t, _TYPES[t][0], _TYPES[t][1]) for t in used],
            attributes=[OpSchema.Attribute(n, kinds[k]) for n, k in self.attributes],
        )
        schema.set_type_and_shape_inference_function(self.infer)
        return schema


def _recall_type(elem: int):
    """``idx``/``found``: ``[B, Hkv, T, top_r]`` from ``q_r: [B, Hkv, T, d]``."""

    def rule(types, ctx):
        q = types[0]
        out = onnx.TypeProto()
        out.tensor_type.elem_type = elem
        if q is not None and q.tensor_type.HasField("shape"):
            dims = list(q.tensor_type.shape.dim)[:-1]
            for d in dims:
                out.tensor_type.shape.dim.add().CopyFrom(d)
            r = ctx.get_attribute("top_r")
            r_dim = out.tensor_type.shape.dim.add()
            if r is not None:
                r_dim.dim_value = r.i
        return out

    return rule


def _lse_type(types, ctx):
    """``lse: [B, H, Tq]`` float32 from ``q: [B, H, Tq, d]``."""
    out = onnx.TypeProto()
    out.tensor_type.elem_type = onnx.TensorProto.FLOAT
    q = types[0]
    if q is not None and q.tensor_type.HasField("shape"):
        out.tensor_type.shape.SetInParent()
        for d in list(q.tensor_type.shape.dim)[:-1]:
            out.tensor_type.shape.dim.add().CopyFrom(d)
    return out


def _drop_level_axis(index: int):
    """``[L, ...] -> [...]`` (stacked levels to one level), from input ``index``."""

    def rule(types, ctx):
        t = types[index]
        if t is None:
            return None
        out = onnx.TypeProto()
        out.tensor_type.elem_type = t.tensor_type.elem_type
        if t.tensor_type.HasField("shape"):
            out.tensor_type.shape.SetInParent()
            for d in list(t.tensor_type.shape.dim)[1:]:
                out.tensor_type.shape.dim.add().CopyFrom(d)
        return out

    return rule


_MKA_ATTENTION_DOC = (
    "MKA: out = sum_l lam_l Attn(q, K_l, V_l) over the full-length levels ks/vs [Lf, B, Hkv, Tk, d] "
    "(causal, bottom-right aligned, padded keys masked, GQA){}; rows that see no key give zeros."
)
_FLASH_DOC = (
    "Plain attention (mka::flash_attention): out = softmax(scale q k^T{}) v per head, GQA, causal bottom-right "
    "aligned; lse [B, H, Tq] float32 (-inf for a row that sees no key, whose out is 0)."
)
_RECALL_INPUTS = (("q3", "T"), ("mem_k", "S"), ("mem_v", "S"), ("idx3", "I"), ("found3", "B"))

SPECS: dict[str, OpSpec] = {
    s.name: s
    for s in (
        OpSpec(
            "SessionScan",
            "L2 session memory (mka::session_scan): s_t = a_t s_{t-1} + (1 - a_t) k_t with a_t = beta, 1 on "
            "padding, 0 on the first real token a state sees; k, v [B, Hkv, T, d], state [B, Hkv, d].",
            (("k", "T"), ("v", "T"), ("valid", "B"), ("state_k", "S"), ("state_v", "S"), ("n_seen", "I")),
            (("s_k", "T"), ("s_v", "T"), ("new_state_k", "S"), ("new_state_v", "S")),
            (("beta", "float"),),
            (0, 1, 3, 4),
        ),
        OpSpec(
            "ChunkUpdate",
            "L3 state (mka::chunk_update): sums of the running chunk and means of completed chunks of "
            "chunk_size real tokens; summaries in N slots [B, Hkv, N, d].",
            (
                ("k", "T"),
                ("v", "T"),
                ("valid", "B"),
                ("n_seen", "I"),
                ("part_k", "S"),
                ("part_v", "S"),
                ("summ_k", "S"),
                ("summ_v", "S"),
            ),
            (("new_part_k", "S"), ("new_part_v", "S"), ("new_summ_k", "S"), ("new_summ_v", "S")),
            (("chunk_size", "int"),),
            (4, 5, 6, 7),
        ),
        OpSpec(
            "RecallSelect",
            "L3 recall (mka::recall_select): causal top-R completed chunks by q_r . key; idx, found [B, Hkv, T, R].",
            (("q_r", "T"), ("summ_k", "S"), ("pos", "I")),
            (("idx", "I"), ("found", "B")),
            (("chunk_size", "int"), ("top_r", "int")),
            (_recall_type(onnx.TensorProto.INT64), _recall_type(onnx.TensorProto.BOOL)),
        ),
        OpSpec(
            "RouteMix",
            "FastMKA (mka::route_mix): kf = sum_l lam_l ks[l], vf likewise; lam [B, G, T, L], ks/vs stacked "
            "[L, B, Hkv, T, d].",
            (("lam", "S"), ("ks", "T"), ("vs", "T")),
            (("kf", "T"), ("vf", "T")),
            (),
            (_drop_level_axis(1), _drop_level_axis(2)),
        ),
        OpSpec(
            "MKAAttention",
            _MKA_ATTENTION_DOC.format(""),
            (("q", "T"), ("ks", "T"), ("vs", "T"), ("lam", "S"), ("kv_valid", "B")),
            (("out", "T"),),
            (("scale", "float"), ("causal", "int")),
            (0,),
        ),
        OpSpec(
            "FlashAttention",
            _FLASH_DOC.format(""),
            (("q", "T"), ("k", "T"), ("v", "T")),
            (("out", "T"), ("lse", "F")),
            (("scale", "float"), ("causal", "int")),
            (0, _lse_type),
        ),
        OpSpec(
            "FlashAttentionMasked",
            _FLASH_DOC.format(" + mask (additive, [B or 1, H or 1, Tq, Tk])"),
            (("q", "T"), ("k", "T"), ("v", "T"), ("mask", "M")),
            (("out", "T"), ("lse", "F")),
            (("scale", "float"), ("causal", "int")),
            (0, _lse_type),
        ),
        OpSpec(
            "MKAAttentionRecall",
            _MKA_ATTENTION_DOC.format(", plus lam_L3 times attention of q3 over the recalled entries of mem_k/mem_v"),
            (("q", "T"), ("ks", "T"), ("vs", "T"), ("lam", "S"), ("kv_valid", "B")) + _RECALL_INPUTS,
            (("out", "T"),),
            (("scale", "float"), ("causal", "int")),
            (0,),
        ),
    )
}


def register_schemas() -> None:
    """Register every ``com.mka`` schema with ``onnx.defs`` (once per process)."""
    for spec in SPECS.values():
        if not onnx.defs.has(spec.name, DOMAIN):
            onnx.defs.register_schema(spec.schema())
