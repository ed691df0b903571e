"""The issue's goals for the long-context benchmark (issue 14, "Measure it"), and their verdicts computed from the
results dict of :func:`tools.long_context.bench.run`: each goal's measured value and whether it was met (None: not
measured)."""

from __future__ import annotations

GOALS = {
    "retrieval_32w": "bounded MKA retrieves >= 95 % at 32W",
    "retrieval_64w": "bounded MKA retrieves >= 90 % at 64W",
    "sinks_near_zero": "window + sinks retrieves near 0 % (<= 10 %) at 32W and 64W",
    "ppl_vs_sinks": "streaming perplexity of bounded MKA no worse than window + sinks at the same budget",
    "ppl_flat": "streaming perplexity of bounded MKA flat (each segment within 10 % of the same text's with 1K of "
    "context)",
    "resident_10pct": "resident KV bytes of bounded MKA <= 10 % of full attention's at 32K",
    "decode_flat": "decode ms/token of bounded MKA flat within +-20 % from W to 64W",
    "prefill_linear": "prefill time of bounded MKA linear (fitted exponent <= 1.2)",
}


def goals(r: dict) -> list[dict]:
    """The issue's goals, each with the measured value and whether it was met (None: not measured)."""
    W, ret, out = r["settings"]["window"], r["retrieval"], []
    mka = "mka_ft" if "mka_ft" in ret else "mka"

    def acc(v: str, mult: int) -> float | None:
        if v not in ret or str(mult * W) not in ret[v]["passkey"]:
            return None
        return min(ret[v][t][str(mult * W)]["accuracy"] for t in r["tasks"])

    def worst(v: str, mult: int) -> str:
        if acc(v, mult) is None:
            return "-"
        return (
            ", ".join(f"{t} {100 * ret[v][t][str(mult * W)]['accuracy']:.0f} %" for t in r["tasks"])
            + f" ({r['variants'][v]['label']})"
        )

    for gid, mult, target in (("retrieval_32w", 32, 0.95), ("retrieval_64w", 64, 0.90)):
        a = max((x for x in (acc("mka", mult), acc("mka_ft", mult)) if x is not None), default=None)
        best = max(("mka", "mka_ft"), key=lambda v: acc(v, mult) if acc(v, mult) is not None else -1)
        out.append(
            {
                "id": gid,
                "measured": worst(best, mult) if a is not None else "-",
                "met": None if a is None else a >= target,
            }
        )
    sinks = [acc("sinks", m) for m in (32, 64)]
    out.append(
        {
            "id": "sinks_near_zero",
            "measured": "; ".join(worst("sinks", m) for m in (32, 64)) if None not in sinks else "-",
            "met": None if None in sinks else max(x for x in sinks) <= 0.10,
        }
    )
    st = r["stream"]
    if mka in st and "sinks" in st:
        a, b = st[mka]["checkpoints"], st["sinks"]["checkpoints"]
        worse = [x["tokens"] for x, y in zip(a, b) if x["ppl"] > 1.001 * y["ppl"]]
        out.append(
            {
                "id": "ppl_vs_sinks",
                "measured": f"{r['variants'][mka]['label']} {a[-1]['ppl']:.2f} vs {b[-1]['ppl']:.2f} "
                f"at {a[-1]['tokens']:,} tokens"
                + (f"; worse at {', '.join(f'{n:,}' for n in worse)}" if worse else "; never worse"),
                "met": not worse,
            }
        )
        ratios = [(x["ppl"] / x["ppl_1k"], x["tokens"]) for x in a if "ppl_1k" in x]
        if ratios:
            worst, at = max(ratios)
            out.append(
                {
                    "id": "ppl_flat",
                    "measured": f"streamed / 1K-context perplexity of the same segment: "
                    f"{min(r for r, _ in ratios):.3f} .. {worst:.3f} (worst at {at:,} tokens)",
                    "met": worst <= 1.10,
                }
            )
        else:
            out.append({"id": "ppl_flat", "measured": "- (no segment past 2K)", "met": None})
    else:
        out += [{"id": "ppl_vs_sinks", "measured": "-", "met": None}, {"id": "ppl_flat", "measured": "-", "met": None}]
    target = 32768
    if mka in st and "full" in st:
        at = {c["tokens"]: c for c in st[mka]["checkpoints"]}.get(target)
        full_bytes = st["full"]["bytes_per_token"] * target if st["full"].get("capped_at") else None
        full_bytes = full_bytes or {c["tokens"]: c for c in st["full"]["checkpoints"]}.get(target, {}).get(
            "resident_bytes"
        )
        if at and full_bytes:
            frac = at["resident_bytes"] / full_bytes
            out.append(
                {
                    "id": "resident_10pct",
                    "measured": f"{100 * frac:.1f} % ({at['resident_bytes']:,} vs {full_bytes:,} bytes)",
                    "met": frac <= 0.10,
                }
            )
        else:
            out.append({"id": "resident_10pct", "measured": "- (the stream did not reach 32K)", "met": None})
    else:
        out.append({"id": "resident_10pct", "measured": "-", "met": None})
    tm = r["timing"]
    if mka in tm:
        last = max(r["settings"]["timing_multiples"]) * r["settings"]["window"]  # 64W (longer lengths: crossover)
        d = [t["decode_ms"] for t in tm[mka] if t["tokens"] <= last]
        spread = max(d) / min(d)
        out.append(
            {
                "id": "decode_flat",
                "measured": f"{min(d):.2f} .. {max(d):.2f} ms/token (max/min {spread:.2f})",
                "met": spread <= 1.2 / 0.8,
            }
        )
        k = r["prefill_exponent"].get(mka)
        out.append(
            {
                "id": "prefill_linear",
                "measured": "-" if k is None else f"exponent {k:.2f}",
                "met": None if k is None else k <= 1.2,
            }
        )
    else:
        out += [
            {"id": "decode_flat", "measured": "-", "met": None},
            {"id": "prefill_linear", "measured": "-", "met": None},
        ]
    return out
