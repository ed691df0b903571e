"""The main job (until the ``mka-compile`` CLI exists): what mka-compile does, end to end, in about a minute.

    python tools/demo.py            # or: ./run.sh demo

1. ``inspect`` a small byte-level Llama (Hugging Face, random init) and print its attention sites;
2. pretrain it briefly on the bundled Tiny Shakespeare (it stands in for "a model you already have");
3. ``convert`` it to FastMKA: outputs are unchanged at init;
4. fine-tune a few steps; print validation perplexity and the router's level weights;
5. check that ``generate()`` with the KV cache (which carries the MKA state) equals greedy full forwards,
   and that the MKA layers decode exactly like a full forward (``tools/decode_check.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers as tf
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import mka_compile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_check  # noqa: E402
import finetune  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, default=80)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    console = Console()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    console.rule("1. inspect")
    print(mka_compile.inspect(model), flush=True)  # the report renders its own table at 160 columns
    train_ids, val_ids = finetune.load_corpus("shakespeare")
    data = finetune.batches(train_ids, 8, 128, gen)
    rows = []
    with Progress(console=console) as progress:
        finetune.train(model, data, args.pretrain_steps, 2e-3, "2. pretrain the original", progress)
        ppl0 = finetune.perplexity(model, val_ids, 128, 32)
        model.eval()
        probe = val_ids[:256].view(2, 128)
        with torch.no_grad():
            before = model(probe).logits
            mka_compile.convert(model, config=mka_compile.MKAConfig(gate_init=0.0, chunk_size=32))
            same = float((model(probe).logits - before).abs().max())
        ppl1 = finetune.perplexity(model, val_ids, 128, 32)
        finetune.train(model, data, args.steps, 2e-3, "4. fine-tune FastMKA", progress)
    ppl2 = finetune.perplexity(model, val_ids, 128, 32)
    routing = mka_compile.routing_stats(model, [(probe,)])
    model.eval()
    prompt = val_ids[:24].view(1, 24)
    out = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    seq = prompt
    for _ in range(16):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    rows += [
        ("3. convert: max |logits change| at init", f"{same:.1e}", same <= 1e-5 * max(1.0, float(before.abs().max()))),
        ("val perplexity: original", f"{ppl0:.3f}", True),
        ("val perplexity: converted, before fine-tuning", f"{ppl1:.3f}", abs(ppl1 - ppl0) <= 1e-4 * ppl0),
        ("val perplexity: after fine-tuning", f"{ppl2:.3f}", ppl2 < ppl1),
        (
            "5. generate() with cache == greedy full forwards",
            "yes" if torch.equal(out, seq) else "NO",
            torch.equal(out, seq),
        ),
    ]
    for site, lam in routing.items():
        rows.append((f"router at {site}", ", ".join(f"{k} {v:.3f}" for k, v in lam.items()), True))
    console.rule("results")
    table = Table(title="mka-compile demo (tiny Llama, Tiny Shakespeare bytes, CPU)")
    for col in ("check", "value", "ok"):
        table.add_column(col)
    for name, value, ok in rows:
        table.add_row(name, value, "yes" if ok else "NO")
    console.print(table)
    console.rule("MKA layers: prefill + decode vs one forward")
    rc = decode_check.main(["--tokens", "120"])
    return 0 if rc == 0 and all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
