"""Conversion experiment: a pretrained MHA LM converted to FastMKA with ``mka_compile.convert``, fine-tuned,
perplexity tracked against fine-tuning steps.

    python tools/paper/convert_recovery.py               # pretrains its own MHA model first (a few minutes)
    python tools/paper/tables.py                         # runs this on the table's trained MHA model

Three arms fine-tune from the same pretrained weights on the same batches, interleaved step by step:
the original MHA model (control), FastMKA with ``gate_init=0`` (the project's default: the converted
model equals the original, then training moves the gate and router) and FastMKA with ``gate_init=1``
(routed from the first step, as a model converted without an identity start: perplexity jumps at
conversion and must recover). Held-out perplexity is measured on a fixed slice every few steps and on the
whole held-out text at the end; the mean routing weight per level is reported before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import mka_compile

if not __package__:  # run as a file: the checkout's `tools` package, appended so an installed mka_compile still wins
    sys.path.append(str(Path(__file__).resolve().parents[2]))
from tools.paper import lm_training as T  # noqa: E402
from tools.paper.lm_variants import DecoderLM, LMConfig  # noqa: E402

ARMS = ("control", "fastmka_gate0", "fastmka_gate1")
ARM_LABELS = {
    "control": "MHA, fine-tuned (control)",
    "fastmka_gate0": "FastMKA, gate 0 at conversion (identity)",
    "fastmka_gate1": "FastMKA, gate 1 at conversion (routed)",
}


def run_recovery(
    pretrained: DecoderLM,
    corpus: T.Corpus,
    *,
    steps: int,
    lr: float,
    batch: int,
    seq: int,
    eval_every: int,
    curve_tokens: int,
    final_tokens: int,
    seed: int,
    progress: Progress,
    references: dict[str, DecoderLM] | None = None,
) -> dict:
    """Fine-tune the three arms from ``pretrained`` (an MHA :class:`DecoderLM`, left unchanged); returns the
    perplexity curves, final perplexities and routing statistics as a JSON-able dict.

    ``references``: other trained models (e.g. FastMKA trained from scratch) whose perplexity on the same
    slice is drawn as a reference line."""
    if pretrained.variant != "mha":
        raise ValueError(f"pretrained must be an MHA DecoderLM, got variant {pretrained.variant!r}")
    mka_cfg = pretrained.cfg.mka
    example = (corpus.heldout[:seq][None],)  # (1, seq)
    arms = {}
    for arm in ARMS:
        m = copy.deepcopy(pretrained)
        if arm != "control":
            gate = 0.0 if arm == "fastmka_gate0" else 1.0
            cfg = mka_compile.MKAConfig(
                levels=mka_cfg.levels,
                ema_beta=mka_cfg.ema_beta,
                chunk_size=mka_cfg.chunk_size,
                top_r=mka_cfg.top_r,
                gate_init=gate,
            )
            mka_compile.convert(m, config=cfg, example_inputs=example)
        arms[arm] = m
    stats_batch = [(corpus.heldout[: 4 * seq].view(4, seq),)]
    routing_before = {a: mka_compile.routing_stats(m, stats_batch) for a, m in arms.items() if a != "control"}
    opts = {a: T.make_optimizer(m, lr, 0.1) for a, m in arms.items()}
    data = T.batches(corpus.train, batch, seq, seed + 1)
    warmup = max(1, steps // 10)

    def evaluate(step: int) -> None:
        for a, m in arms.items():
            curve[a].append((step, T.perplexity(m, corpus.heldout, seq, curve_tokens)))

    curve: dict[str, list[tuple[int, float]]] = {a: [] for a in ARMS}
    pretrained_ppl = T.perplexity(pretrained, corpus.heldout, seq, curve_tokens)
    evaluate(0)
    losses: dict[str, list[float]] = {a: [] for a in ARMS}
    task = progress.add_task("conversion fine-tune", total=steps)
    for step in range(steps):
        window = next(data)
        lr_now = T.lr_at(step, steps, lr, warmup)
        for i in range(len(ARMS)):
            a = ARMS[(i + step) % len(ARMS)]  # rotate the order so no arm always runs first
            losses[a].append(T.train_step(arms[a], opts[a], window, lr_now)[0])
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            evaluate(step + 1)
        progress.update(task, advance=1, description=f"conversion fine-tune {step + 1}/{steps}")
    progress.remove_task(task)
    final = {}
    for a, m in arms.items():
        nll, n = T.heldout_nll(m, corpus.heldout, seq, final_tokens)
        final[a] = {"ppl": math.exp(nll / n), "tokens": n}
    routing_after = {a: mka_compile.routing_stats(m, stats_batch) for a, m in arms.items() if a != "control"}
    refs = {name: T.perplexity(m, corpus.heldout, seq, curve_tokens) for name, m in (references or {}).items()}
    return {
        "corpus": corpus.name,
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "seq": seq,
        "eval_every": eval_every,
        "curve_tokens": curve_tokens,
        "seed": seed,
        "pretrained_ppl_curve_slice": pretrained_ppl,
        "curve": curve,
        "final": final,
        "losses": losses,
        "routing_before": routing_before,
        "routing_after": routing_after,
        "references_curve_slice": refs,
        "labels": ARM_LABELS,
    }


def plot_recovery(result: dict, path: Path) -> None:
    """Perplexity on the held-out slice against fine-tuning steps, one line per arm (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4))
    style = {  # the control is drawn thin on top: gate 0 starts on it and may stay close
        "control": dict(color="black", ls="--", lw=1, marker="o", ms=2, zorder=4),
        "fastmka_gate0": dict(color="C1", lw=3, alpha=0.7, marker="o", ms=4, zorder=3),
        "fastmka_gate1": dict(color="C2", lw=1.5, marker="o", ms=3, zorder=3),
    }
    for arm, pts in result["curve"].items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=ARM_LABELS[arm], **style[arm])
    ax.axhline(result["pretrained_ppl_curve_slice"], color="gray", ls=":", lw=1.5, label="MHA before fine-tuning")
    for i, (name, ppl) in enumerate(result["references_curve_slice"].items()):
        ax.axhline(ppl, color=f"C{4 + i}", ls="-.", lw=1, label=name)
    ax.set_xlabel("fine-tuning step after conversion")
    ax.set_ylabel(f"held-out perplexity (first {result['curve_tokens']} tokens)")
    ax.set_yscale("log")  # a jump at conversion and the recovery to the pretrained level both stay readable
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_title(f"MHA -> FastMKA conversion, {result['corpus']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict) -> Table:
    t = Table(title=f"conversion + fine-tuning ({result['corpus']}, {result['steps']} steps)")
    for col in ("arm", "ppl at conversion (slice)", "ppl after fine-tuning (slice)", "final ppl (held-out)"):
        t.add_column(col)
    for arm in ARMS:
        c = result["curve"][arm]
        t.add_row(ARM_LABELS[arm], f"{c[0][1]:.3f}", f"{c[-1][1]:.3f}", f"{result['final'][arm]['ppl']:.3f}")
    return t


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=T.CORPORA, default="shakespeare")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="pretraining peak learning rate")
    p.add_argument("--convert-lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--curve-tokens", type=int, default=16384)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--top-r", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/convert_recovery")
    args = p.parse_args(argv)
    corpus = T.load_corpus(args.corpus)
    cfg = LMConfig(
        vocab_size=corpus.vocab_size,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        mka=mka_compile.MKAConfig(chunk_size=args.chunk_size, top_r=args.top_r),
    )
    torch.manual_seed(args.seed)
    model = DecoderLM(cfg, "mha")
    opt = T.make_optimizer(model, args.lr, 0.1)
    data = T.batches(corpus.train, args.batch, args.seq, args.seed)
    console = Console()
    with Progress(console=console) as progress:
        task = progress.add_task("pretrain MHA", total=args.pretrain_steps)
        for step in range(args.pretrain_steps):
            lr = T.lr_at(step, args.pretrain_steps, args.lr, max(1, args.pretrain_steps // 20))
            T.train_step(model, opt, next(data), lr)
            progress.update(task, advance=1)
        result = run_recovery(
            model,
            corpus,
            steps=args.steps,
            lr=args.convert_lr,
            batch=args.batch,
            seq=args.seq,
            eval_every=args.eval_every,
            curve_tokens=args.curve_tokens,
            final_tokens=0,
            seed=args.seed,
            progress=progress,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conversion.json").write_text(json.dumps(result, indent=1))
    plot_recovery(result, out / "conversion.png")
    console.print(table(result))
    console.print(f"details: {out / 'conversion.json'}, plot: {out / 'conversion.png'}")
    return result


if __name__ == "__main__":
    main()
