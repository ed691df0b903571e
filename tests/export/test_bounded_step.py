"""export_onnx(decode_step=True) of bounded memory: the fixed-size decode step (mka_compile.bounded_fixed) in ONNX
Runtime, fed a left-padded batch token by token (OnnxDecoder), equals the PyTorch bounded model's forward, beyond
the window, with recall and moved positions and trained (non-zero) gates and routers; what it does not export is
refused with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from bounded_models import CFG, _converted

from mka_compile import MKAConfig
from mka_compile.export import OnnxDecoder, export_onnx

transformers.logging.set_verbosity_error()


def test_onnx_runtime_decode_equals_the_pytorch_bounded_model(tmp_path) -> None:
    model = _converted(MKAConfig(**CFG, trained_length=48))
    path = export_onnx(model, torch.randint(0, 64, (2, 12)), tmp_path / "step.onnx", decode_step=True, max_len=128)
    T = 80  # past the window (16 + 4 sinks) and the trained length (48); 10 chunks of 8
    ids = torch.randint(0, 64, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        unconverted = _converted(MKAConfig(**CFG, trained_length=48), trained=False)(ids, attention_mask=mask).logits
    dec = OnnxDecoder(path)
    got = [dec(ids[:, :30], mask[:, :30])] + [dec(ids[:, t : t + 1], mask[:, t : t + 1]) for t in range(30, T)]
    got = torch.from_numpy(np.concatenate(got, 1))
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1, 5:], want[1, 5:], rtol=1e-4, atol=1e-4)
    assert (want - unconverted).abs().max() > 1e-3  # the trained memory is live
    with pytest.raises(ValueError, match="max_len"):
        dec(ids[:, :60])  # 140 positions > 128: the chunk store's fixed slots


def test_what_the_fixed_step_does_not_export_is_refused(tmp_path) -> None:
    ids = torch.randint(0, 64, (2, 12))
    model = _converted(MKAConfig(**CFG))
    with pytest.raises(ValueError, match="decode_step=True"):
        export_onnx(model, ids, tmp_path / "full.onnx")
    with pytest.raises(ValueError, match="FastMKA"):
        export_onnx(_converted(MKAConfig(**CFG), mode="mka"), ids, tmp_path / "mka.onnx", decode_step=True)
