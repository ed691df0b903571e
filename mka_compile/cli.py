"""The ``mka-compile`` command line.

    mka-compile demo                                   # the main job on the bundled default (a few minutes)
    mka-compile inspect tiny:llama                     # site table (also: file.py:factory, module:factory, HF config)
    mka-compile convert tiny:llama --mode fastmka -o out/llama-fastmka.safetensors
    mka-compile export tiny:llama --weights out/llama-fastmka.safetensors -o out/llama.onnx
    mka-compile bench tiny:llama --tokens 512          # converted model (and MKA layer) ratios vs the baseline
    mka-compile longctx [--quick]                      # long-context benchmark -> docs/long_context.md (a checkout)

Model specs: see :mod:`mka_compile.model_spec`. Converted weights are written by
:func:`mka_compile.checkpoint.save_converted` (weights + mode + MKAConfig) and read back by ``export`` and
``bench`` with ``--weights``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mka_compile.config import MKAConfig

console = Console()


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="tiny:<family> | path/file.py:factory | package.module:factory | HF config name/path")
    p.add_argument("--pretrained", action="store_true", help="HF specs: load the weights too (from_pretrained)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["fastmka", "mka"], default="fastmka")
    p.add_argument("--levels", default="local,session,longterm", help="comma-separated memory levels")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--top-r", type=int, default=8)
    p.add_argument("--ema-beta", type=float, default=0.9)
    p.add_argument(
        "--bidirectional",
        action="store_true",
        help="also convert bidirectional self-attention (encoders), non-causal memory: MKAConfig(causal=False)",
    )


def _config(args) -> MKAConfig:
    levels = tuple(x.strip() for x in args.levels.split(",") if x.strip())
    return MKAConfig(
        levels=levels,
        chunk_size=args.chunk_size,
        top_r=args.top_r,
        ema_beta=args.ema_beta,
        gate_init=0.0,
        causal=not args.bidirectional,
    )


def _load(args):
    from mka_compile.model_spec import load_model

    return load_model(args.model, pretrained=args.pretrained)


def _example(loaded, tokens: int, batch: int = 1):
    """The call used for export/bench: the factory's example inputs, or token ids for a HF causal LM."""
    if loaded.example_inputs is not None:
        return loaded.example_inputs
    vocab = loaded.model.config.vocab_size
    return {"input_ids": torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))}


def cmd_inspect(args) -> int:
    import mka_compile

    loaded = _load(args)
    console.print(f"[bold]{loaded.description}[/bold]")
    report = mka_compile.inspect(loaded.model, loaded.example_inputs, capture=args.capture)
    print(report, flush=True)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps([s.as_dict() for s in report.sites], indent=2))
        console.print(f"sites written to {args.json}")
    return 0


def cmd_convert(args) -> int:
    import mka_compile
    from mka_compile.checkpoint import save_converted

    loaded = _load(args)
    config = _config(args)
    mka_compile.convert(loaded.model, mode=args.mode, config=config, example_inputs=loaded.example_inputs)
    print(mka_compile.inspect(loaded.model, loaded.example_inputs), flush=True)
    path = save_converted(loaded.model, args.output, args.mode, config)
    n_new = sum(p.numel() for n, p in loaded.model.named_parameters() if ".mka." in n)
    console.print(f"converted ({args.mode}); {n_new} new parameters; weights + config written to {path}")
    return 0


def cmd_export(args) -> int:
    import mka_compile
    from mka_compile.checkpoint import load_converted

    loaded = _load(args)
    if args.weights:
        load_converted(loaded.model, args.weights, loaded.example_inputs)
    example = _example(loaded, args.tokens)
    path = mka_compile.export_onnx(loaded.model, example, args.output)
    console.print(f"ONNX written to {path}")
    return 0


def cmd_bench(args) -> int:
    from mka_compile.bench import layer_ratios, model_ratios

    loaded = _load(args)
    inputs = _example(loaded, args.tokens, args.batch)
    if loaded.hf and isinstance(inputs, dict):
        inputs = {**inputs, "labels": inputs["input_ids"], "use_cache": False}
    rows = model_ratios(
        loaded.model,
        inputs,
        config=_config(args),
        example_inputs=loaded.example_inputs,
        repeats=args.repeats,
        backward=not args.no_backward,
    )
    _ratio_table(f"{loaded.description}: converted vs original, {args.tokens} tokens", rows, "ratio to original")
    if args.layer:
        rows = layer_ratios(tokens=args.tokens, batch=args.batch, config=_config(args), repeats=args.repeats)
        _ratio_table(f"one layer (hidden 256, 8/4 heads), {args.tokens} tokens", rows, "ratio to SDPA layer")
    return 0


def _ratio_table(title: str, rows: list[dict], ratio_col: str) -> None:
    t = Table(title=f"{title} (torch {torch.__version__}, {torch.get_num_threads()} threads, same-run medians)")
    for col in ("what", "median ms", ratio_col):
        t.add_column(col)
    for r in rows:
        if "error" in r:
            t.add_row(r["what"], "-", r["error"])
        else:
            t.add_row(r["what"], f"{r['ms']:.1f}", f"{r['ratio']:.2f}")
    console.print(t)


def cmd_demo(args) -> int:
    from mka_compile.demo import run_demo

    return run_demo(quick=args.quick, corpus=args.corpus, out=args.out, seed=args.seed)


def cmd_longctx(args) -> int:
    """The long-context benchmark of ``tools/long_context`` (a source checkout's tool, not installed)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "tools" / "long_context" / "bench.py").is_file():
        raise FileNotFoundError(
            f"the long-context benchmark lives in the source checkout (tools/long_context/), not found under {root}; "
            "run it from a clone with the package installed in editable mode (pip install -e .)"
        )
    if str(root) not in sys.path:
        sys.path.append(str(root))  # appended: the installed mka_compile still comes first
    from tools.long_context.bench import main as longctx_main

    argv = ["--quick"] if args.quick else []
    argv += ["--seed", str(args.seed)]
    if args.doc:
        argv += ["--doc", args.doc]
    if args.cache_dir:
        argv += ["--cache-dir", args.cache_dir]
    longctx_main(argv, prog="mka-compile longctx")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mka-compile", description="Find attention in PyTorch models; rewrite to MKA.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="print the attention sites of a model")
    _model_args(s)
    s.add_argument("--capture", choices=["export", "dynamo"], default="export")
    s.add_argument("--json", help="also write the sites to this JSON file")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("convert", help="convert to FastMKA / MKA and write the weights (+ mode and config)")
    _model_args(s)
    _config_args(s)
    s.add_argument("-o", "--output", required=True, help=".safetensors (or .pt) file to write")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("export", help="export to ONNX (mka:: ops as com.mka custom-domain functions)")
    _model_args(s)
    s.add_argument("--weights", help="converted checkpoint from `mka-compile convert` (else: export as is)")
    s.add_argument("--tokens", type=int, default=16, help="example sequence length")
    s.add_argument("-o", "--output", required=True, help=".onnx file to write")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("bench", help="same-run timing ratios of converted models against the original")
    _model_args(s)
    _config_args(s)
    s.add_argument("--tokens", type=int, default=512)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--no-backward", action="store_true", help="time forward only")
    s.add_argument("--layer", action="store_true", help="also time one MKA/FastMKA layer against an SDPA layer")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", help="the main job: inspect, convert, fine-tune, decode check, ONNX, results")
    s.add_argument("--quick", action="store_true", help="a tiny budget (seconds; for tests)")
    s.add_argument("--corpus", choices=["shakespeare", "wikitext2"], default="shakespeare")
    s.add_argument("--out", default="out/demo", help="folder for the ONNX file and results JSON")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "longctx",
        help="long-context benchmark: retrieval, streaming perplexity, resident bytes, decode and prefill time",
    )
    s.add_argument("--quick", action="store_true", help="a smoke run on tiny sizes (~2 min)")
    s.add_argument("--doc", help="page to write (default docs/long_context.md; --quick: out/long_context/)")
    s.add_argument("--cache-dir", help="where trained weights are cached (default .cache/long_context/)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_longctx)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mka_compile.conversion import ConversionError
    from mka_compile.model_spec import SpecError

    try:
        return args.func(args)
    except (SpecError, ConversionError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]mka-compile {args.command}: {e}[/red]")
        return 2


if __name__ == "__main__":
    sys.exit(main())
