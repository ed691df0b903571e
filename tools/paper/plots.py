"""The plots of ``tools/paper/tables.py`` (matplotlib, Agg backend): perplexity against speed, and loss curves."""

from __future__ import annotations

from pathlib import Path

from tools.paper.report import NAMES


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(results: dict[str, dict], path: Path) -> None:
    """Perplexity against training tokens/s and against decode ms/token, one row per corpus."""
    plt = _plt()
    rows = list(results)
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.6 * len(rows)), squeeze=False)
    for r, name in enumerate(rows):
        res = results[name]["variants"]
        for c, (key, label) in enumerate(
            (("train_tokens_per_s", "training tokens/s (higher is better)"), ("decode_ms_per_token", "decode ms/token"))
        ):
            ax = axes[r][c]
            for i, (v, d) in enumerate(res.items()):
                ax.scatter(d[key], d["ppl"], s=40, color=f"C{i}", zorder=3)
                ax.annotate(NAMES[v], (d[key], d["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=9)
            ax.set_xlabel(label)
            ax.set_ylabel(f"held-out perplexity ({name})")
            ax.grid(alpha=0.3)
            ax.margins(0.15)
    fig.suptitle("perplexity (lower is better) against speed, same budget, 2-core CPU", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_losses(result: dict, path: Path) -> None:
    """Training loss (smoothed) and held-out perplexity against steps, one line per variant."""
    plt = _plt()
    from matplotlib.ticker import ScalarFormatter

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (v, d) in enumerate(result["variants"].items()):
        raw = d["losses"]
        sm, acc = [], raw[0]
        for x in raw:  # exponential smoothing, as in TensorBoard
            acc = 0.9 * acc + 0.1 * x
            sm.append(acc)
        a1.plot(range(1, len(raw) + 1), sm, color=f"C{i}", lw=1.2, label=NAMES[v])
        xs, ys = zip(*d["curve"])
        a2.plot(xs, ys, color=f"C{i}", marker="o", ms=3, lw=1.2, label=NAMES[v])
    for label, d in list((result.get("seed_noise") or {"runs": {}})["runs"].items())[1:]:
        xs, ys = zip(*d["curve"])
        a2.plot(xs, ys, color="gray", ls="--", lw=1, label=f"MHA, init seed {label.split('@seed')[1]} (seed noise)")
    a1.set_xlabel("step")
    a1.set_ylabel("training loss, nats/token (smoothed 0.9)")
    a2.set_xlabel("step")
    a2.set_ylabel(f"held-out perplexity (first {result['curve_tokens']} tokens)")
    for ax in (a1, a2):
        ax.set_yscale("log")  # the late steps, where the variants differ, stay readable
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['corpus']}: training curves ({result['tokens']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- tables and the report ------------------------------------------------------------------------------
