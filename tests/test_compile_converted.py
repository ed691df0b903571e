"""torch.compile (Inductor, CPU) on converted models equals eager: the ops' fake implementations are right.

(The ``mka`` backend has its own tests in ``tests/test_backend.py``; this guards the ops under plain Inductor.)
"""

from __future__ import annotations

import pytest
import torch
import zoo

import mka_compile


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fastmka", "mka"])
def test_inductor_matches_eager(mode: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no stale graphs from other fake impls
    torch._dynamo.reset()
    model, _ = zoo.causal_lm("llama", "sdpa")
    mka_compile.convert(model, mode=mode, config=mka_compile.MKAConfig(gate_init=0.0, chunk_size=4, top_r=2))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mka." in name:
                p.fill_(1.0) if name.endswith("gate") else p.normal_(0, 0.5)
        ids = torch.randint(0, 90, (2, 13))
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model)(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
