"""``mka-compile demo``: what mka-compile does, end to end, on the bundled default, in a minute or two on a CPU.

1. ``inspect`` a small byte-level Llama (Hugging Face, random init) and print its attention sites;
2. pretrain it briefly on a bundled corpus (it stands in for "a model you already have");
3. ``convert`` it to FastMKA: outputs unchanged at init (a zero gate);
4. fine-tune; validation perplexity before/after and the router's mean weight per level;
5. decode consistency: prefill + one token at a time through the HF cache (which carries the MKA state)
   equals one full forward, for FastMKA and for an MKA-mode copy with random routers; ``generate()`` equals
   greedy full forwards;
6. ONNX: export the fine-tuned FastMKA model (``com.mka`` custom-domain functions) and compare ONNX
   Runtime's logits with PyTorch's;
7. a results table (and ``results.json`` in ``--out``).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import transformers as tf
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import mka_compile
from mka_compile import training
from mka_compile.bench import randomize_mka
from mka_compile.hf.compat import cache_kwargs, returned_cache
from mka_compile.model_spec import TINY


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@torch.no_grad()
def decode_vs_full(model, ids: torch.Tensor, prefill: int) -> float:
    """Largest relative error, over positions, between cached decoding and one full forward."""
    model.eval()
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :prefill], use_cache=True)
    past, worst = returned_cache(out), _rel(out.logits, full[:, :prefill])
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(model, past))
        past = returned_cache(out)
        worst = max(worst, _rel(out.logits[:, -1], full[:, t]))
    return worst


@torch.no_grad()
def onnx_parity(model, ids: torch.Tensor, path: Path) -> tuple[float, int]:
    """Export ``model`` to ``path``, run it in ONNX Runtime; ``(relative logits error, com.mka node count)``."""
    import onnx

    from mka_compile.export import export_onnx, ort_session

    model.eval()
    export_onnx(model, {"input_ids": ids}, path)
    custom = sum(1 for n in onnx.load(str(path)).graph.node if n.domain == "com.mka")
    sess = ort_session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    want = model(ids, use_cache=False).logits
    return _rel(torch.from_numpy(got), want), custom


def run_demo(quick: bool = False, corpus: str = "shakespeare", out: str = "out/demo", seed: int = 0) -> int:
    t_start = time.time()
    console = Console()
    pre_steps, ft_steps, windows = (10, 10, 8) if quick else (200, 150, 48)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = tf.LlamaConfig(**{**TINY, "hidden_size": 128, "intermediate_size": 384})  # the CLI's tiny:llama, wider
    model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    console.rule("1. inspect: a tiny byte-level Llama (random init)")
    print(mka_compile.inspect(model), flush=True)
    train_ids, val_ids = training.load_corpus(corpus)
    data = training.batches(train_ids, 8, 128, gen)
    config = mka_compile.MKAConfig(gate_init=0.0, chunk_size=32, top_r=4)
    with Progress(console=console) as progress:
        training.train(model, data, pre_steps, 2e-3, f"2. pretrain the original on {corpus}", progress)
        ppl0 = training.perplexity(model, val_ids, 128, windows)
        model.eval()
        probe = val_ids[:256].view(2, 128)
        original = copy.deepcopy(model)
        with torch.no_grad():
            before = model(probe).logits
            mka_compile.convert(model, config=config)
            same = _rel(model(probe).logits, before)
        ppl1 = training.perplexity(model, val_ids, 128, windows)
        training.train(model, data, ft_steps, 2e-3, "4. fine-tune the FastMKA model", progress)
    ppl2 = training.perplexity(model, val_ids, 128, windows)
    routing = mka_compile.routing_stats(model, [(probe,)])
    model.eval()

    console.rule("5. decode consistency and 6. ONNX")
    seq_ids = val_ids[1000 : 1000 + 2 * 96].view(2, 96)  # 96 tokens: 3 long-term chunks
    err_fast = decode_vs_full(model, seq_ids, 20)
    mka_model = randomize_mka(mka_compile.convert(copy.deepcopy(original), mode="mka", config=config), seed)
    err_mka = decode_vs_full(mka_model, seq_ids, 20)
    prompt = val_ids[:24].view(1, 24)
    gen_out = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(16):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    onnx_err, onnx_nodes = onnx_parity(model, val_ids[2000 : 2000 + 80].view(1, 80), outdir / "demo_fastmka.onnx")

    rows = [
        ("3. convert: logits change at init (relative)", f"{same:.1e}", same <= 1e-5),
        ("validation perplexity: original", f"{ppl0:.3f}", True),
        ("validation perplexity: converted, before fine-tuning", f"{ppl1:.3f}", abs(ppl1 - ppl0) <= 1e-4 * ppl0),
        ("validation perplexity: FastMKA after fine-tuning", f"{ppl2:.3f}", ppl2 < ppl1),
        ("5. FastMKA: cached decode vs full forward (rel)", f"{err_fast:.1e}", err_fast <= 1e-4),
        ("5. MKA mode (random routers): decode vs full (rel)", f"{err_mka:.1e}", err_mka <= 1e-4),
        (
            "5. generate() == greedy full forwards",
            "yes" if torch.equal(gen_out, seq) else "NO",
            torch.equal(gen_out, seq),
        ),
        ("6. ONNX Runtime vs PyTorch logits (rel)", f"{onnx_err:.1e}", onnx_err <= 1e-4),
        ("6. com.mka nodes in the ONNX file", str(onnx_nodes), onnx_nodes > 0),
    ]
    for site, lam in routing.items():
        rows.append((f"router at {site} (mean weight)", ", ".join(f"{k} {v:.3f}" for k, v in lam.items()), True))
    table = Table(title=f"mka-compile demo: tiny Llama, {corpus} bytes, {pre_steps}+{ft_steps} steps, CPU")
    for col in ("check", "value", "ok"):
        table.add_column(col)
    for name, value, ok in rows:
        table.add_row(name, value, "yes" if ok else "NO")
    (outdir / "results.json").write_text(
        json.dumps([{"check": n, "value": v, "ok": bool(ok)} for n, v, ok in rows], indent=2)
    )
    console.rule(f"7. results ({time.time() - t_start:.0f} s)")
    console.print(table)
    return 0 if all(ok for _, _, ok in rows) else 1
