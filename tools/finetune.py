"""Fine-tune a converted model on a bundled corpus; report perplexity and how the router learns.

    python tools/finetune.py                                  # tiny Llama, Tiny Shakespeare (bytes), a few minutes
    python tools/finetune.py --corpus wikitext2 --steps 300 --out out/finetune

Flow: build a small byte-level Llama (random init, no downloads), pretrain it briefly as the "existing
model", convert it with ``mka_compile.convert`` (identity at init: the validation perplexity does not
move), then fine-tune all parameters. Prints validation perplexity (mean NLL over real tokens, no
padding) before/after conversion, after fine-tuning, and for a control (the original model fine-tuned on the
same batches), and the mean routing weight per level per layer
before and after, so you can see the router leave L1-only; saves a loss curve (PNG) and the numbers (JSON).
Corpora: Tiny Shakespeare (first 90 % train / last 10 % validation) or WikiText-2 (train on the
validation split, report on the test split: the training split is not bundled).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import transformers as tf
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import mka_compile
from mka_compile.training import batches, load_corpus, perplexity, train  # noqa: F401 (re-exported)


def gen_copy(seed: int) -> torch.Generator:
    """The fine-tuning batches: the same sequence for the converted model and the control."""
    return torch.Generator().manual_seed(seed + 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=["shakespeare", "wikitext2"], default="shakespeare")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps after conversion")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/finetune")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_ids, val_ids = load_corpus(args.corpus)
    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4 * args.seq,
    )
    model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    data = batches(train_ids, args.batch, args.seq, gen)
    console = Console()
    stats_batch = [(val_ids[: 4 * args.seq].view(4, args.seq),)]
    with Progress(console=console) as progress:
        pre_losses = train(model, data, args.pretrain_steps, args.lr, "pretrain (original)", progress)
        ppl_original = perplexity(model, val_ids, args.seq, args.eval_windows)
        control = copy.deepcopy(model)  # the original, fine-tuned for the same steps on the same batches
        control_losses = train(
            control,
            batches(train_ids, args.batch, args.seq, gen_copy(args.seed)),
            args.steps,
            args.lr,
            "fine-tune (original, control)",
            progress,
        )
        ppl_control = perplexity(control, val_ids, args.seq, args.eval_windows)
        data = batches(train_ids, args.batch, args.seq, gen_copy(args.seed))
        mka_compile.convert(model, config=mka_compile.MKAConfig(gate_init=0.0, chunk_size=args.chunk_size))
        ppl_converted = perplexity(model, val_ids, args.seq, args.eval_windows)
        routing_before = mka_compile.routing_stats(model, stats_batch)
        ft_losses = train(model, data, args.steps, args.lr, "fine-tune (FastMKA)", progress)
    ppl_finetuned = perplexity(model, val_ids, args.seq, args.eval_windows)
    routing_after = mka_compile.routing_stats(model, stats_batch)
    result = {
        "corpus": args.corpus,
        "args": vars(args),
        "ppl_original": ppl_original,
        "ppl_converted_at_init": ppl_converted,
        "ppl_finetuned": ppl_finetuned,
        "ppl_control_original_finetuned": ppl_control,
        "control_losses": control_losses,
        "routing_before": routing_before,
        "routing_after": routing_after,
        "pretrain_losses": pre_losses,
        "finetune_losses": ft_losses,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(range(len(pre_losses)), pre_losses, label="pretrain (original model)")
        ax.plot(range(len(pre_losses), len(pre_losses) + len(ft_losses)), ft_losses, label="fine-tune (FastMKA)")
        ax.plot(
            range(len(pre_losses), len(pre_losses) + len(control_losses)),
            control_losses,
            alpha=0.7,
            label="fine-tune (original, control)",
        )
        ax.axvline(len(pre_losses), color="gray", ls="--", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/byte)")
        ax.set_title(f"convert + fine-tune on {args.corpus}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=120)
    except ImportError:
        console.print("matplotlib is not installed: no loss.png (the numbers are in finetune.json)")
    table = Table(title=f"FastMKA conversion + fine-tuning on {args.corpus} (byte-level, validation perplexity)")
    for col in ("stage", "val ppl"):
        table.add_column(col)
    table.add_row("original after pretraining", f"{ppl_original:.3f}")
    table.add_row("converted, before fine-tuning", f"{ppl_converted:.3f}")
    table.add_row("converted, after fine-tuning", f"{ppl_finetuned:.3f}")
    table.add_row("control: original, same fine-tuning", f"{ppl_control:.3f}")
    console.print(table)
    rt = Table(title="mean routing weight per level (before -> after fine-tuning)")
    rt.add_column("site")
    for lv in next(iter(routing_after.values())):
        rt.add_column(lv)
    for site, after in routing_after.items():
        rt.add_row(site, *(f"{routing_before[site][lv]:.3f} -> {v:.3f}" for lv, v in after.items()))
    console.print(rt)
    console.print(f"details: {out / 'finetune.json'}, loss curve: {out / 'loss.png'}")
    return result


if __name__ == "__main__":
    main()
