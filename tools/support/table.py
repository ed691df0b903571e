"""The support table: every causal-LM family the installed transformers can build tiny, plus vendored
third-party model files, through detection and conversion. Writes ``docs/support.md`` (and
``docs/support.json``, the numbers it is made from).

    .venv/bin/python tools/support/table.py            # everything (ONNX export included; ~30-60 min on 2 cores)
    .venv/bin/python tools/support/table.py --quick    # skip the ONNX column
    .venv/bin/python tools/support/table.py --only llama,gemma2 --print   # a few families, table to stdout
    .venv/bin/python tools/support/table.py --only bloom --merge           # rerun rows of the last table
    .venv/bin/python tools/support/table.py --worker gemma2               # one family, JSON to stdout

Each family runs in its own subprocess (a crash or a hang costs one row, with the reason). Columns:

- ``inspect``: every attention module the forward runs is covered by a site (eager and sdpa attention);
  ``found/expected``. Expected modules: class name containing ``Attention`` (not linear / state-space /
  cross attention), with a linear child, run by the forward, innermost such module.
- ``identity``: FastMKA conversion at init gives the original logits (1e-5 relative).
- ``live``: with a non-zero gate and random router the logits change.
- ``decode``: with the live gate, prefill + token-by-token cached decoding equals one full forward (1e-4).
- ``mka``: MKA mode converts (and is the original at init) or refuses with a ConversionError reason.
- ``backend``: ``torch.compile(model, backend="mka", options={"compiler": "aot_eager"})`` equals eager (1e-4).
- ``onnx``: ``mka_compile.export_onnx`` of the FastMKA model (skipped with ``--quick``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if not __package__:  # run as a file: the checkout's `tools` package, appended so an installed mka_compile still wins
    sys.path.append(str(ROOT))

from tools.support.render import COLUMNS, _order, _write, render  # noqa: E402
from tools.support.tiny_models import build_hf, build_thirdparty  # noqa: E402
from tools.support.tiny_models import logits as _logits  # noqa: E402

THIRDPARTY = ("thirdparty:litgpt", "thirdparty:litgpt_softcap", "thirdparty:torchtune")


# families whose row is a known skip (not buildable as a tiny causal LM from a default config)
def attention_modules(model, run) -> list[str]:
    """Innermost modules named ``*Attention*`` (not linear / state-space / cross) with a linear child that
    the forward ``run()`` calls."""
    import torch
    from torch import nn

    skip = re.compile(r"Linear|Mamba|Delta|Lightning|Cross|Recurrent|Conv|Pool|Mlp|MLP|Rotary|Norm", re.I)
    cands = {}
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if "attention" in cls.lower() and not skip.search(cls):
            if any(isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D" for c in mod.modules() if c is not mod):
                cands[name] = mod
    called = set()
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: called.add(n)) for n, m in cands.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    names = sorted(called)
    return [n for n in names if not any(o.startswith(n + ".") for o in names)]


def _covered(expected: list[str], found: list[str]) -> list[str]:
    """Expected modules no found site is in (or contains)."""

    def inside(a: str, b: str) -> bool:  # a within b
        return a == b or b == "" or a.startswith(b + ".")

    return [e for e in expected if not any(inside(f, e) or inside(e, f) for f in found)]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    lines = [ln.strip() for ln in text if ln.strip()]
    msg = " ".join(lines[:3]) if isinstance(exc, ValueError) and "cannot convert" in str(exc) else (lines or [""])[0]
    return f"{type(exc).__name__}: {msg}"[:300]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _randomize(model) -> None:
    import torch

    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mka." in f".{name}":
                p.fill_(1.0) if name.endswith("gate") else p.normal_(0, 0.5)


# ------------------------------------------------------------------------------------------------ checks


def run_family(name: str, quick: bool, columns: tuple[str, ...] = COLUMNS) -> dict:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import mka_compile
    from mka_compile.conversion import ConversionError

    row: dict = {"family": name, "cells": {}, "notes": {}}
    cells, notes = row["cells"], row["notes"]
    hf = not name.startswith("thirdparty:")
    t0 = time.time()
    try:
        if hf:
            model, ids = build_hf(name, "eager")
            spec = None
        else:
            model, ids, spec = build_thirdparty(name)
    except Exception as exc:  # noqa: BLE001
        row["skip"] = _short(exc)
        return row
    fwd_kwargs = {} if hf else spec.get("forward_kwargs", {})
    example = None if hf else spec["example"]

    def run_orig(m=model):
        return _logits(m, ids, **fwd_kwargs)

    try:
        ref = run_orig()
    except Exception as exc:  # noqa: BLE001
        row["skip"] = "forward fails: " + _short(exc)
        return row

    # inspect (eager, and sdpa where the family has it)
    variants = [("eager", model)]
    if hf:
        try:
            variants.append(("sdpa", build_hf(name, "sdpa")[0]))
        except Exception as exc:  # noqa: BLE001
            notes["sdpa"] = _short(exc)
    ok_all, text, empty = True, [], True
    for attn, m in variants:
        try:
            expected = attention_modules(m, lambda m=m: _logits(m, ids, **fwd_kwargs))
            report = mka_compile.inspect(m, example)
            found = [s.name for s in report.sites if s.kind == "self"]
            left = [r for r in report.not_attention if r.attention_like]
            if not expected and (found or left):  # modules not named *Attention*: the softmaxes are the expectation
                expected = sorted({*found, *(r.module for r in left)})
            # a module with no attention-like softmax inside (linear attention, RWKV) is not expected
            softmaxes = [*(s.name for s in report.sites), *(r.module for r in left)]
            expected = [e for e in expected if _covered([e], softmaxes) == []]
            missing = _covered(expected, found)
            empty = empty and not expected
            row.setdefault("expected", len(expected))
            row[f"found_{attn}"] = len(expected) - len(missing)
            if missing:
                ok_all = False
                why = [r.reason for r in report.not_attention if r.module in missing or not r.module][:1]
                text.append(f"{attn}: {len(expected) - len(missing)}/{len(expected)} ({'; '.join(why)[:160]})")
            row.setdefault("sites", [s.as_dict() for s in report.sites if s.kind == "self"][:2])
        except Exception as exc:  # noqa: BLE001
            ok_all, empty = False, False
            text.append(f"{attn}: {_short(exc)}")
    cells["inspect"] = "n/a" if empty else ("ok" if ok_all else "FAIL")
    if empty:
        notes["inspect"] = "no attention (state-space / recurrent model)"
        row["seconds"] = round(time.time() - t0, 1)
        return row
    notes["inspect"] = "; ".join(text)

    if columns == ("inspect",):
        row["seconds"] = round(time.time() - t0, 1)
        return row
    # FastMKA: identity, live, decode
    conv = None
    try:
        conv = mka_compile.convert(copy.deepcopy(model), example_inputs=example)
        err = _rel(run_orig(conv), ref)
        cells["identity"] = "ok" if err <= 1e-5 else "FAIL"
        notes["identity"] = f"rel {err:.1e}"
    except ConversionError as exc:
        cells["identity"] = "refused"
        notes["identity"] = _short(exc)
    except Exception as exc:  # noqa: BLE001
        cells["identity"] = "FAIL"
        notes["identity"] = _short(exc)
    if conv is not None:
        live = copy.deepcopy(conv)
        _randomize(live)
        try:
            full = run_orig(live)
            d = _rel(full, ref)
            cells["live"] = "ok" if d > 1e-4 else "FAIL"
            notes["live"] = f"changes logits by {d:.1e}"
        except Exception as exc:  # noqa: BLE001
            cells["live"], notes["live"] = "FAIL", _short(exc)
            full = None
        if full is not None:
            try:
                step = _decode(live, ids, hf, spec)
                err = _rel(step, full[:, -step.shape[1] :])
                cells["decode"] = "ok" if err <= 1e-4 else "FAIL"
                notes["decode"] = f"rel {err:.1e}"
                if err > 1e-4:  # does the original decode equal its own full forward?
                    own = _decode(model, ids, hf, spec)
                    own_err = _rel(own, ref[:, -own.shape[1] :])
                    if own_err > 1e-4:
                        cells["decode"] = "n/a"
                        notes["decode"] = f"the original's own decode differs from its full forward (rel {own_err:.1e})"
            except Exception as exc:  # noqa: BLE001
                cells["decode"], notes["decode"] = "FAIL", _short(exc)

    # MKA mode
    try:
        mk = mka_compile.convert(copy.deepcopy(model), mode="mka", example_inputs=example)
        err = _rel(run_orig(mk), ref)
        cells["mka"] = "ok" if err <= 1e-4 else "FAIL"
        notes["mka"] = f"rel {err:.1e}"
    except ConversionError as exc:
        cells["mka"], notes["mka"] = "refused", _short(exc)
    except Exception as exc:  # noqa: BLE001
        cells["mka"], notes["mka"] = "FAIL", _short(exc)

    # backend
    try:
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="mka", options={"compiler": "aot_eager"})
        err = _rel(run_orig(compiled), ref)
        cells["backend"] = "ok" if err <= 1e-4 else "FAIL"
        notes["backend"] = f"rel {err:.1e}"
    except Exception as exc:  # noqa: BLE001
        cells["backend"], notes["backend"] = "FAIL", _short(exc)
    finally:
        torch._dynamo.reset()

    if quick:
        cells["onnx"] = "skipped"
    elif conv is None:
        cells["onnx"], notes["onnx"] = "-", "not converted"
    else:
        try:
            with tempfile.TemporaryDirectory() as d:
                mka_compile.export_onnx(conv, ids if hf else example, Path(d) / "m.onnx", optimize=False, check=False)
            cells["onnx"] = "ok"
        except Exception as exc:  # noqa: BLE001
            cells["onnx"], notes["onnx"] = "FAIL", _short(exc)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _decode(model, ids, hf: bool, spec) -> torch.Tensor:  # noqa: F821
    """Logits of the last tokens, from a prefill then one cached step per token."""
    import torch

    from mka_compile.hf.compat import cache_kwargs, returned_cache

    if not hf:
        return spec["decode"](model, ids)
    n = 3
    with torch.no_grad():
        out = model(ids[:, :-n], use_cache=True)
        past, steps = returned_cache(out), []
        for t in range(ids.shape[1] - n, ids.shape[1]):
            out = model(ids[:, t : t + 1], **cache_kwargs(model, past), use_cache=True)
            past = returned_cache(out)
            steps.append(out.logits)
    return torch.cat(steps, 1)


# ------------------------------------------------------------------------------------------------ table


def families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _worker(names: list[str], quick: bool, timeout: int, inspect_only: bool = False) -> list[dict]:
    """Run families in one subprocess (imports paid once), one JSON line each; a crash or a hang reruns the families
    without a line one by one, and a single family's crash or hang becomes its row's reason."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(names), "--timeout", str(timeout)]
    cmd += (["--quick"] if quick else []) + (["--inspect-only"] if inspect_only else [])
    env = dict(os.environ, PYTHONSAFEPATH="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    why = None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * len(names) + 60, env=env, cwd=ROOT)
        out, err = p.stdout, p.stderr
        if p.returncode:
            why = f"worker crashed (rc {p.returncode}): {(err.strip().splitlines() or ['no output'])[-1][:200]}"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        why = f"timed out after {timeout} s"
    rows = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows[r["family"]] = r
    missing = [n for n in names if n not in rows]
    if missing and len(names) > 1:
        for n in missing:
            rows.update({r["family"]: r for r in _worker([n], quick, timeout, inspect_only)})
    elif missing:
        rows[names[0]] = {"family": names[0], "skip": why or "no output", "cells": {}, "notes": {}}
    return [rows[n] for n in names]


def _alarm(signum, frame):
    raise TimeoutError("timed out")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the ONNX export column")
    ap.add_argument("--only", help="comma-separated families (model types, or thirdparty:<name>)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--inspect-only", action="store_true", help="only the inspect column (a fast detection survey)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="families per worker process")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per family")
    ap.add_argument("--print", action="store_true", help="print the table instead of writing docs/support.md")
    ap.add_argument("--render", action="store_true", help="only rewrite docs/support.md from docs/support.json")
    ap.add_argument("--merge", action="store_true", help="keep the other rows of docs/support.json (rerun --only rows)")
    args = ap.parse_args(argv)
    if args.render:
        _write(json.loads((ROOT / "docs" / "support.json").read_text()), args.quick)
        return
    if args.worker:
        import signal

        signal.signal(signal.SIGALRM, _alarm)
        for name in args.worker.split(","):
            signal.alarm(args.timeout)
            try:
                row = run_family(name, args.quick, ("inspect",) if args.inspect_only else COLUMNS)
            except Exception as exc:  # noqa: BLE001
                row = {"family": name, "skip": _short(exc), "cells": {}, "notes": {}}
                traceback.print_exc()
            finally:
                signal.alarm(0)
            print(json.dumps(row, default=str), flush=True)
        return
    names = args.only.split(",") if args.only else families() + list(THIRDPARTY)
    kept: list[dict] = []
    data = ROOT / "docs" / "support.json"
    if args.merge and data.exists():  # rerun some rows of an earlier table
        kept = [r for r in json.loads(data.read_text()) if r["family"] not in names]
    rows: list[dict] = []
    batches = [names[i :: max(1, len(names) // args.batch)] for i in range(max(1, len(names) // args.batch))]
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futs = [pool.submit(_worker, b, args.quick, args.timeout, args.inspect_only) for b in batches]
        for f in cf.as_completed(futs):
            for r in f.result():
                rows.append(r)
                status = r.get("skip") or " ".join(f"{c}={r['cells'].get(c, '-')}" for c in COLUMNS)
                print(f"[{len(rows)}/{len(names)}] {r['family']}: {status}", flush=True)
            if not args.print:
                _write(kept + rows, args.quick)  # written as batches end: an interrupted run leaves its rows
    if args.print:
        print(render(sorted(kept + rows, key=_order), args.quick))
        return
    _write(kept + rows, args.quick)
    print(f"wrote docs/support.md ({len(kept) + len(rows)} rows)")


if __name__ == "__main__":
    main()
