"""export_onnx(decode_step=True): past K/V and the MKA state in, updated out. Fed a prompt and then token by
token through ONNX Runtime (OnnxDecoder), it equals PyTorch's cached decode; left padding does not leak."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import zoo
from converted import MAX_LEN, converted, rel

from mka_compile.export import DOMAIN, OnnxDecoder, export_onnx
from mka_compile.hf.compat import cache_kwargs, returned_cache

CASES = [("llama", "fastmka"), ("llama", "mka"), ("gpt2", "fastmka"), ("gpt2", "mka")]


@pytest.fixture(scope="module")
def step_files(tmp_path_factory):
    """``{(family, mode): (model, path)}``, exported on first use."""
    cache: dict = {}

    def get(family: str, mode: str):
        if (family, mode) not in cache:
            model, _ = converted(family, mode)
            path = tmp_path_factory.mktemp("step") / f"{family}_{mode}.onnx"
            example = torch.randint(0, 90, (2, 7))
            export_onnx(model, example, path, decode_step=True, max_len=MAX_LEN, optimize=family == "gpt2")
            cache[family, mode] = model, path
        return cache[family, mode]

    return get


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_prefill_then_tokens_equal_pytorch_decode(family: str, mode: str, step_files) -> None:
    model, path = step_files(family, mode)
    ids = torch.randint(0, 90, (3, 23))
    original, _ = zoo.causal_lm(family, "sdpa")
    with torch.no_grad():
        base = original(ids).logits
    P = 10  # prefill two full chunks and a partial one, then 13 single tokens (more chunks complete)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :P], use_cache=True)
        steps, cache = [out.logits], returned_cache(out)
        for t in range(P, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(model, cache)).logits)
    torch_decode = torch.cat(steps, 1)
    dec = OnnxDecoder(path)
    got = [dec(ids[:, :P])] + [dec(ids[:, t : t + 1]) for t in range(P, ids.shape[1])]
    assert rel(got[0], full[:, :P]) <= 1e-4  # the prefill (an empty past) is the full forward
    assert rel(full, base) >= 1e-3  # the rewrite is live
    assert rel(np.concatenate(got, 1), torch_decode) <= 1e-4
    assert rel(torch_decode, full) <= 1e-4
    assert {n.op_type for n in onnx.load(path).graph.node if n.domain == DOMAIN} >= {"SessionScan", "ChunkUpdate"}


@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_left_padded_batch_decodes_like_each_sequence_alone(mode: str, step_files) -> None:
    model, path = step_files("llama", mode)
    prompts = [torch.randint(1, 90, (1, 11)), torch.randint(1, 90, (1, 6))]
    batch = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, 11 - p.shape[1] :], mask[b, 11 - p.shape[1] :] = p[0], 1
    nxt = torch.randint(1, 90, (2, 6))
    dec = OnnxDecoder(path)
    first = dec(batch, mask)
    steps = np.concatenate([dec(nxt[:, t : t + 1]) for t in range(nxt.shape[1])], 1)
    for b, p in enumerate(prompts):
        with torch.no_grad():
            alone = model(torch.cat([p, nxt[b : b + 1]], 1)).logits[0]
        assert rel(first[b, 11 - p.shape[1] :], alone[: p.shape[1]]) <= 1e-4
        assert rel(steps[b], alone[p.shape[1] :]) <= 1e-4


def test_decoder_refuses_what_the_file_cannot_hold(step_files, tmp_path) -> None:
    _, path = step_files("llama", "fastmka")
    dec = OnnxDecoder(path)
    dec(torch.randint(0, 90, (2, 60)))
    with pytest.raises(ValueError, match="65 positions exceed the max_len 64"):
        dec(torch.randint(0, 90, (2, 5)))
    with pytest.raises(ValueError, match="holds 2 sequences, got a batch of 3"):
        dec(torch.randint(0, 90, (3, 1)))
    dec.reset()
    assert dec(torch.randint(0, 90, (3, 2))).shape == (3, 2, 96)
    with pytest.raises(ValueError, match="attention_mask must be"):
        dec(torch.randint(0, 90, (3, 1)), np.ones((3, 2)))
    plain = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        ir_version=10,
        opset_imports=[onnx.helper.make_opsetid("", 18)],
    )
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not a decode-step file"):
        OnnxDecoder(tmp_path / "plain.onnx")
