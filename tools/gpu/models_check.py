"""Converted models on a GPU: the Triton kernels inside real models, eager and under the ``mka`` backend.

    python tools/gpu/models_check.py            # CUDA machine; prints a table last (exit 1 if a check fails)

For a tiny Llama converted to FastMKA and to MKA (random routers, gate 1), in fp32 on CUDA (Triton kernels):
logits against the same model on the CPU (torch references); cached decode against one full forward;
``torch.compile(backend="mka")`` (Inductor) against eager; one training step's gradients finite and equal
to eager's.
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import transformers as tf

import mka_compile
from mka_compile.backend import mka_backend
from mka_compile.bench import randomize_mka
from mka_compile.demo import decode_vs_full


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dev = torch.device("cpu" if "--cpu-dry-run" in argv else "cuda")  # the dry run only exercises the script
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (--cpu-dry-run runs the script on the CPU)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 256, (2, 150))
    config = mka_compile.MKAConfig(chunk_size=16, top_r=4, gate_init=0.0)
    rows = []
    for mode in ("fastmka", "mka"):
        cpu = randomize_mka(mka_compile.convert(copy.deepcopy(base), mode=mode, config=config))
        gpu = copy.deepcopy(cpu).to(dev)
        t0 = time.time()
        with torch.no_grad():
            want = cpu(ids, use_cache=False).logits
            got = gpu(ids.to(dev), use_cache=False).logits
        rows.append((f"{mode}: CUDA (Triton) vs CPU logits", rel(got, want), 1e-4))
        rows.append((f"{mode}: CUDA cached decode vs full", decode_vs_full(gpu, ids[:, :80].to(dev), 20), 1e-4))
        compiled = torch.compile(gpu, backend=mka_backend)  # = backend="mka" where the package is pip-installed
        with torch.no_grad():
            out = compiled(ids.to(dev), use_cache=False).logits
        rows.append((f"{mode}: torch.compile(backend='mka') vs eager", rel(out, got), 1e-4))
        gpu.train()
        loss = gpu(ids.to(dev), labels=ids.to(dev), use_cache=False).loss
        grads = torch.autograd.grad(loss, params := [p for p in gpu.parameters() if p.requires_grad], allow_unused=True)
        closs = compiled(ids.to(dev), labels=ids.to(dev), use_cache=False).loss
        cgrads = torch.autograd.grad(closs, params, allow_unused=True)
        worst = max(rel(a, b) for a, b in zip(cgrads, grads) if b is not None)
        rows.append((f"{mode}: compiled training-step grads vs eager (worst)", worst, 1e-3))
        print(f"{mode}: {time.time() - t0:.1f} s", flush=True)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU dry run"
    print(f"\n{name}, torch {torch.__version__}, fp32 (TF32 off)")
    print(f"{'check':55s} {'rel err':>10s} {'tol':>8s}  ok")
    for name, err, tol in rows:
        print(f"{name:55s} {err:10.2e} {tol:8.0e}  {'yes' if err <= tol else 'NO'}")
    return 0 if all(err <= tol for _, err, tol in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
