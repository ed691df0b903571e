"""``Report``: what ``mka_compile.inspect`` found: attention sites and the softmaxes that are not."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.table import Table


@dataclass
class Site:
    """One attention site. ``name`` is the dotted path of the module that owns it (stable across runs)."""

    name: str
    kind: str  # "self" | "cross"
    causal: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    has_kv_cache: bool
    convertible: bool
    reason: str | None  # why not convertible, else None
    status: str = "original"  # "original" | "fastmka" | "mka"
    rule: str = ""
    scale: float = 0.0
    mask: str = "none"
    q_proj: str = ""
    k_proj: str = ""
    v_proj: str = ""
    rope: str | None = None
    qk_norm: str | None = None
    cache: str | None = None
    proj_bias: tuple[bool, bool, bool] = (False, False, False)  # q, k, v projections add a bias
    # named transforms of the scores / operands besides scale and masks: "softcap=<cap>", "bias" (ALiBi / position
    # bias), "sinks", "score_scale", "clip_qkv", "query_temperature", "latent_kv", "differential" (``maps`` == 2)
    transforms: tuple[str, ...] = ()
    maps: int = 1  # attention maps (softmaxes) per site: 2 for differential attention
    window: int | None = None  # sliding-window width when ``mask == "sliding_window"``

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class NotAttention:
    """A softmax (or SDPA call) that is not an attention site, with the closest rule and its reason."""

    node: str
    module: str
    closest_rule: str | None
    reason: str
    attention_like: bool = False  # its probabilities are multiplied with values (an attention the rules did not take)


@dataclass
class Report:
    model: str
    capture: str
    sites: list[Site] = field(default_factory=list)
    not_attention: list[NotAttention] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no attention site named {name!r}; sites: {[s.name for s in self.sites]}")

    def __str__(self) -> str:
        buf = io.StringIO()
        console = Console(file=buf, width=160, color_system=None, force_terminal=False)
        t = Table(title=f"{self.model}: {len(self.sites)} attention site(s) (captured with {self.capture})")
        extra = any(s.transforms or s.maps > 1 or s.window or s.mask == "chunked" for s in self.sites)
        cols = ["site", "kind", "causal", "heads", "kv", "d", "cache", "rope", "rule", "convertible", "status"]
        for col in cols[:9] + (["transforms"] if extra else []) + cols[9:]:
            t.add_column(col)
        for s in self.sites:
            more = [
                ", ".join([*s.transforms, *([f"window={s.window}"] if s.window else [])])
                or ("-" if s.mask not in ("chunked",) else "chunked")
            ]
            if s.mask == "chunked" and s.transforms:
                more = [more[0] + ", chunked"]
            row = [
                s.name or "<root>",
                s.kind,
                "yes" if s.causal else "no",
                str(s.num_heads),
                str(s.num_kv_heads),
                str(s.head_dim),
                s.cache or ("yes" if s.has_kv_cache else "-"),
                s.rope or "-",
                s.rule,
            ]
            row += more if extra else []
            t.add_row(*row, "yes" if s.convertible else f"no: {s.reason}", s.status)
        console.print(t)
        if self.not_attention:
            n = Table(title="softmax / SDPA calls that are not attention sites")
            for col in ("node", "module", "closest rule", "reason"):
                n.add_column(col)
            for r in self.not_attention:
                n.add_row(r.node, r.module or "-", r.closest_rule or "-", r.reason)
            console.print(n)
        return buf.getvalue()
