"""export_onnx: converted models run in stock ONNX Runtime with PyTorch's logits, as com.mka nodes with
model-local functions; plain models export as plain ONNX; ops without an ONNX function give a clear error."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import onnx
import pytest
import torch
import zoo
from converted import CFG, MAX_LEN, converted, rel
from torch import nn

from mka_compile.export import DOMAIN, ExportError, export_onnx, ort_session
from mka_compile.kernels import flash_attention

NODES = {
    "fastmka": {"SessionScan", "ChunkUpdate", "RecallSelect", "RouteMix"},
    "mka": {"SessionScan", "ChunkUpdate", "RecallSelect", "MKAAttentionRecall"},
}


def _left_padded(B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, : T // 3] = 0  # row 1 is left-padded
    return ids, mask


PROBE = torch.randint(1, 90, (1, 21), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(family, mode) -> (model, original logits on PROBE, path)``, exported on first use."""
    cache: dict = {}

    def get(family: str, mode: str):
        if (family, mode) not in cache:
            model, base = converted(family, mode, probe=PROBE)
            example = dict(zip(("input_ids", "attention_mask"), _left_padded(2, 13, seed=1)))
            path = tmp_path_factory.mktemp("full") / f"{family}_{mode}.onnx"
            export_onnx(model, example, path, max_len=MAX_LEN, optimize=(family, mode) == ("qwen2", "fastmka"))
            cache[family, mode] = model, base, path
        return cache[family, mode]

    return get


# Llama and GPT-2 in both modes: the prefill of their decode-step files (an empty past) is checked against the
# full forward in test_decode_step.py (exports take seconds each; the suite keeps to about twelve).
FULL = [("qwen2", "fastmka"), ("qwen2", "mka"), ("gpt_neox", "fastmka"), ("gpt_neox", "mka")]


@pytest.mark.parametrize(("family", "mode"), FULL)
def test_converted_model_matches_pytorch_in_onnxruntime(family: str, mode: str, exported) -> None:
    model, base, path = exported(family, mode)
    ids, mask = _left_padded(3, 21, seed=0)  # another batch and length than the example: symbolic axes
    ids[0] = PROBE[0]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert rel(want[:1], base) >= 1e-3  # the rewrite is live
    got = ort_session(path).run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    real = mask.bool()
    assert rel(torch.from_numpy(got)[real], want[real]) <= 1e-4
    m = onnx.load(path)
    ops = Counter(n.op_type for n in m.graph.node if n.domain == DOMAIN)
    assert set(ops) == NODES[mode] and set(ops.values()) == {2}  # one node per op and layer
    assert {f.name for f in m.functions} == NODES[mode]
    assert all(n.domain == "" for f in m.functions for n in f.node)  # bodies: standard ONNX ops


def test_file_checks_and_runs_in_a_process_that_knows_nothing_of_mka(exported) -> None:
    _, _, path = exported("qwen2", "fastmka")
    code = (
        "import sys, numpy as np, onnx, onnxruntime as ort\n"
        "onnx.checker.check_model(sys.argv[1], full_check=True)\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "ids = np.ones((1, 11), np.int64)\n"
        "out = s.run(None, {'input_ids': ids, 'attention_mask': ids})[0]\n"
        "assert out.shape == (1, 11, 96) and np.isfinite(out).all()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def test_unconverted_model_exports_as_plain_onnx(tmp_path) -> None:
    model, _ = zoo.causal_lm("llama", "sdpa")
    path = export_onnx(model, torch.randint(0, 90, (2, 9)), tmp_path / "plain.onnx", optimize=False)
    m = onnx.load(path)
    assert DOMAIN not in {o.domain for o in m.opset_import} and not m.functions
    ids = torch.randint(0, 90, (3, 14))
    with torch.no_grad():
        want = model(ids).logits
    assert rel(ort_session(path).run(None, {"input_ids": ids.numpy()})[0], want) <= 1e-4


class _PlainAttention(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)  # (B, 2, T, 4)
        if self.kind == "untranslated":  # an mka:: op with no ONNX function (a backward, called directly)
            lam = torch.ones(*q.shape[:3], 1)  # (B, 1, T, 1)
            return torch.ops.mka.route_mix_backward(q, q, lam[:, :1], [q], [q])[1][0]
        bias = torch.zeros(1, 2, x.shape[1], x.shape[1]).masked_fill(~keep[:, None, None, :], -1.0e9)
        return (
            flash_attention(q, q, q, causal=True)
            + flash_attention(q, q, q, keep[:, None, None, :].expand(-1, 1, x.shape[1], -1))
            + flash_attention(q, q, q, bias)
        )


class _Net(nn.Module):
    def __init__(self, kind: str = "flash") -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = _PlainAttention(kind)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.attn(self.proj(x), keep)


def test_plain_mka_flash_attention_exports(tmp_path) -> None:
    net, keep = _Net(), torch.ones(3, 6, dtype=torch.bool)
    keep[1, :2] = False
    path = export_onnx(net, (torch.randn(2, 5, 8), keep[:2, :5]), tmp_path / "f.onnx", optimize=False)
    x = torch.randn(3, 6, 8)
    got = ort_session(path).run(None, {"input_0": x.numpy(), "input_1": keep.numpy()})[0]
    with torch.no_grad():
        assert rel(got, net(x, keep)) <= 1e-5
    ops = Counter(n.op_type for n in onnx.load(path).graph.node if n.domain == DOMAIN)
    assert ops == {"FlashAttention": 1, "FlashAttentionMasked": 2}


def test_op_without_onnx_function_names_op_and_site(tmp_path) -> None:
    with pytest.raises(ExportError, match=r"mka::route_mix_backward at site attn: it has no ONNX function"):
        export_onnx(
            _Net("untranslated"), (torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)), tmp_path / "x.onnx"
        )
    assert not (tmp_path / "x.onnx").exists()


class _Recall(nn.Module):
    def forward(self, q_r, summ_k, pos, bank_k):
        return torch.ops.mka.recall_select(q_r, summ_k, pos, 4, 2, bank_k, None)


class _WithBank(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.recall = _Recall()

    def forward(self, q_r, summ_k, pos, bank_k):
        return self.recall(q_r, summ_k, pos, bank_k)


def test_memory_bank_recall_is_refused_with_the_site(tmp_path) -> None:
    args = (torch.randn(1, 2, 6, 8), torch.randn(1, 2, 3, 8), torch.arange(6)[None], torch.randn(1, 2, 5, 8))
    with pytest.raises(ExportError, match=r"mka::recall_select at site recall: recall from an external memory bank"):
        export_onnx(_WithBank(), args, tmp_path / "x.onnx")


def test_bad_arguments(tmp_path) -> None:
    model, _ = converted("llama", "fastmka")
    with pytest.raises(ExportError, match="example_inputs must be"):
        export_onnx(model, "text", tmp_path / "x.onnx")
    with pytest.raises(ExportError, match=f"max_len 3 is below the chunk size {CFG.chunk_size}"):
        export_onnx(model, torch.ones(1, 4, dtype=torch.long), tmp_path / "x.onnx", max_len=3)
    with pytest.raises(ExportError, match="decode_step=True needs a Hugging Face causal LM"):
        export_onnx(_Net(), (torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)), "x.onnx", decode_step=True)


def test_bidirectional_encoder_exports(tmp_path) -> None:
    """A BERT converted with MKAConfig(causal=False) (non-causal memory, MKA attention) runs the same in ORT,
    on a right-padded batch."""
    import transformers as tf

    import mka_compile
    from mka_compile import MKAConfig

    cfg = tf.BertConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    torch.manual_seed(0)
    model = tf.BertModel._from_config(cfg, attn_implementation="sdpa", add_pooling_layer=False).eval()
    mka_compile.convert(model, mode="mka", config=MKAConfig(gate_init=0.0, chunk_size=4, top_r=2, causal=False))
    zoo.randomize_mka(model)
    ids = torch.randint(1, 90, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
    export_onnx(model, {"input_ids": ids, "attention_mask": mask}, tmp_path / "bert.onnx")
    out = ort_session(tmp_path / "bert.onnx").run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert rel(torch.from_numpy(out), ref) <= 1e-5


def test_unwritable_path_is_reported_before_the_export(tmp_path, monkeypatch) -> None:
    def no_export(*args, **kwargs):
        raise AssertionError("the path must be checked before torch.export runs")

    monkeypatch.setattr(torch.export, "export", no_export)
    (tmp_path / "a_file").write_text("")
    model, x = nn.Linear(4, 4), (torch.randn(2, 4),)
    for path in (tmp_path / "a_file" / "m.onnx", tmp_path):  # below a file; a folder
        with pytest.raises(ExportError, match=rf"cannot write the ONNX file {str(path)!r}"):
            export_onnx(model, x, path)
