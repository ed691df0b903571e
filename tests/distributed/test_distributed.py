"""A converted model trains under DDP and FSDP2 (torchrun, 2 CPU processes, gloo); gradients match one process."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker  # noqa: E402

WORKER = Path(__file__).resolve().parent / "worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_gradients_match_single_process(mode: str, tmp_path: Path) -> None:
    out = tmp_path / "grads.pt"
    for _attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
        cmd += [str(WORKER), "--mode", mode, "--out", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        # gloo's threads rarely abort a rank on a loaded machine ("terminate called without an active exception",
        # SIGABRT; seen once in ~20 runs): such a launch is retried once, any other failure is reported
        if res.returncode == 0 or "terminate called without an active exception" not in res.stderr:
            break
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    model = worker.build()
    shards = worker.batch().chunk(2)
    loss = sum(model(s, labels=s, use_cache=False).loss for s in shards) / len(shards)  # what the ranks average
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert any(".mka." in n and got[n].abs().sum() > 0 for n in got)
