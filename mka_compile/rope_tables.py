"""RoPE for MKA mode's session keys: the EMA keys are rotated at each position the way the site rotates its own keys.

Two sources of the rotation:

- the site's RoPE tables (``position_embeddings`` in Hugging Face models): :func:`calibrate` finds, on the first
  call, which table convention reproduces the model's own rotation of its keys, and :func:`rotate` applies it;
- no tables (hand-written models that rotate inside the module, e.g. Meta's complex multiply):
  :func:`derive` reads the rotation off this call's keys, before (``raw``, the key projection) and after RoPE. A
  rotation by ``theta`` maps each pair ``(x, y)`` to ``(x cos - y sin, x sin + y cos)``, so over the key heads
  ``cos = sum(x x' + y y') / sum(x^2 + y^2)`` and ``sin = sum(x y' - y x') / sum(x^2 + y^2)``; the tables are then
  checked to reproduce every key, and a site whose keys are not a pure rotation of the projection (a key norm
  between them) gets a clear error.
"""

from __future__ import annotations

from typing import Any

import torch

CONVENTIONS = ("cos_sin", "sin_cos_half")  # (cos, sin) at full rotary width (Llama, Cohere); GPT-J's (sin, cos)
DERIVABLE = ("rotate_half", "interleaved", "complex")  # full-width rotations derive() can read off the keys


def _interleaved(style: str) -> bool:
    return style == "complex" or style.endswith("interleaved")


def rotate(x: torch.Tensor, tables: Any, style: str | None, convention: str = "cos_sin") -> torch.Tensor:
    """Apply the site's RoPE to ``[B, h, T, d]``: rotate-half (Llama) or interleaved pairs (Cohere, GPT-J, Meta's
    complex multiply); partial rotary rotates the first ``rot`` features and passes the rest.
    ``convention``: how the tables are given: ``"cos_sin"`` = ``(cos, sin)``, each ``[B or 1, T, rot]``;
    ``"sin_cos_half"`` = ``(sin, cos)``, each ``[B or 1, T, rot / 2]`` (one angle per pair, GPT-J)."""
    if style is None:
        return x
    if tables is None:
        raise RuntimeError(
            f"MKA mode needs the site's RoPE tables (position_embeddings) for its {style} RoPE, but this attention "
            "module does not receive them (use FastMKA for this model)"
        )
    if convention == "sin_cos_half":
        sin, cos = (t.repeat_interleave(2, -1) for t in tables)
    else:
        cos, sin = tables
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    if _interleaved(style):
        turned = torch.stack([-xr[..., 1::2], xr[..., ::2]], -1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, -1)
        turned = torch.cat([-x2, x1], -1)
    out = xr * cos + turned * sin
    return out if xp.shape[-1] == 0 else torch.cat([out, xp], -1)


def _close(mine: torch.Tensor, want: torch.Tensor) -> bool:
    tol = dict(rtol=1e-4, atol=1e-5) if want.dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    return mine.shape == want.shape and torch.allclose(mine.to(want.dtype), want, **tol)


def calibrate(raw: torch.Tensor, rotated: torch.Tensor, tables: Any, style: str) -> str:
    """Which table convention reproduces the model's own rotation of this call's keys (``raw`` -> ``rotated``,
    both ``[B, Hkv, T, d]``); a clear error when none does."""
    for convention in CONVENTIONS:
        try:
            mine = rotate(raw, tables, style, convention)
        except RuntimeError as e:
            if "MKA mode" in str(e):
                raise
            continue  # shapes do not fit this convention
        if _close(mine, rotated):
            return convention
    raise RuntimeError(
        f"MKA mode cannot reproduce this site's {style} RoPE from its position_embeddings (tried {CONVENTIONS}); "
        "use FastMKA for this model"
    )


def derive(raw: torch.Tensor, rotated: torch.Tensor, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` tables, each ``[B, T, d]`` (convention ``"cos_sin"``), that rotate ``raw`` into ``rotated``
    (both ``[B, Hkv, T, d]``: this call's keys from the key projection and as the site attends to them)."""
    if style not in DERIVABLE:
        raise RuntimeError(
            f"MKA mode reads a site's RoPE off its keys for full-width {'/'.join(DERIVABLE)} rotations; this site "
            f"uses {style!r} RoPE and passes no tables (use FastMKA for this model)"
        )
    dt = torch.float64 if raw.dtype == torch.float64 else torch.float32
    a, b = raw.to(dt), rotated.to(dt)
    half = raw.shape[-1] // 2
    if _interleaved(style):
        x, y, xr, yr = a[..., 0::2], a[..., 1::2], b[..., 0::2], b[..., 1::2]
    else:
        x, y, xr, yr = a[..., :half], a[..., half:], b[..., :half], b[..., half:]
    den = (x * x + y * y).sum(1)  # (B, T, d/2): least squares over the key heads
    some = den > 0
    den = torch.where(some, den, torch.ones_like(den))
    cos = torch.where(some, (x * xr + y * yr).sum(1) / den, torch.ones_like(den))
    sin = torch.where(some, (x * yr - y * xr).sum(1) / den, torch.zeros_like(den))
    if _interleaved(style):
        cos, sin = (t.repeat_interleave(2, -1) for t in (cos, sin))
    else:
        cos, sin = (torch.cat([t, t], -1) for t in (cos, sin))
    if not _close(rotate(a, (cos, sin), style), b):
        raise RuntimeError(
            f"MKA mode cannot read this site's {style} RoPE off its keys: they are not a rotation of the key "
            "projection's output (a key norm or another transform in between?); use FastMKA for this model"
        )
    return cos, sin
