"""MKA mode for sites that compute attention inline instead of through transformers' ``AttentionInterface``.

Hugging Face models that dispatch attention through ``AttentionInterface`` are handled by
:mod:`mka_compile.hf.attention`. Other sites (nanoGPT, Meta's Llama, hand-written modules, Falcon) compute attention
in their own forward, as one ``F.scaled_dot_product_attention`` call or spelled out as
``softmax(q @ k^T * scale + mask) @ v``. A :class:`torch.overrides.TorchFunctionMode` (PyTorch's extension point for
intercepting torch functions), active only while the site module runs, answers that attention with the site's MKA
attention (:meth:`mka_compile.sites.memory.SiteMemory.attend`):

- SDPA: the call is answered directly, with the call's own ``scale``;
- spelled out: the scores product records ``q`` and ``k``; the scale between them is the site's, from its facts
  (``Site.scale``, read by the attention rules; ``SiteMemory.score_scale``); the product of the probabilities with
  ``v`` is answered with MKA's output. The scores product returns zeros (the site's own scaling, masking and softmax
  still run on them and their result is discarded), except on the site's first eager call: there it returns the
  real scores, and the softmax's input checks that the site applies exactly that scale to them (a site that scales
  ``q`` or ``k`` before the product, whose facts fold that scale in, is refused there rather than answered with the
  wrong one). The softmax's input also checks the mask, on every eager call.

Keys repeated to the query heads (GQA written as ``expand`` + ``reshape`` or ``repeat_interleave``) are read back
at the site's key heads; masks must be the causal mask, possibly with padded keys (the tokens the site's attention
mask marks as padding). Anything else raises a clear error naming what to do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)
DROPOUT = (F.dropout, torch.dropout)
DROPOUT_REFUSED = (
    "MKA mode: attention dropout is not supported (MKA's level attention has none): set the model's attention "
    "dropout to 0 for training (e.g. config.attention_dropout = 0.0, or dropout_p=0), or use FastMKA, which keeps it"
)
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class AttentionToMKA(TorchFunctionMode):
    """While active, the site's attention (an SDPA call, or matmul - softmax - matmul) is answered by ``mem.attend``."""

    def __init__(self, mem) -> None:
        super().__init__()
        self.mem = mem

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = self.mem._call
        if call is None or call.attended:
            return func(*args, **kwargs)
        if func in SDPA:
            return self._sdpa(dict(zip(_SDPA_NAMES, args)) | kwargs)
        if func in MATMUL and len(args) == 2 and all(isinstance(a, torch.Tensor) and a.dim() == 4 for a in args):
            return self._matmul(func, *args)
        if func in SOFTMAX and call.qk is not None and not call.softmax_seen:
            self._softmax_input(args[0])
        if func in DROPOUT and call.qk is not None and self.mem.training and _dropout_active(args, kwargs):
            raise RuntimeError(DROPOUT_REFUSED)
        return func(*args, **kwargs)

    # -- SDPA --------------------------------------------------------------------------------------------
    def _sdpa(self, a: dict):
        q, k, v = a["query"], a["key"], a["value"]
        mask = a.get("attn_mask")
        T, S = q.shape[-2], k.shape[-2]
        if mask is not None:
            check_mask(self.mem, mask, T, S)
        elif self.mem.causal and not a.get("is_causal", False) and T > 1:
            raise RuntimeError("MKA mode: this site's scaled_dot_product_attention call is not causal (use FastMKA)")
        if self.mem.training and a.get("dropout_p", 0.0):
            raise RuntimeError(DROPOUT_REFUSED)
        scale = a.get("scale")
        return self._answer(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale))

    # -- matmul - softmax - matmul ---------------------------------------------------------------------
    def _matmul(self, func, a: torch.Tensor, b: torch.Tensor):
        call = self.mem._call
        d = self.mem.head_dim
        T = self.mem._call.valid.shape[1]  # this call's tokens: the scores product is [B, H, T, d] @ [B, h, d, S]
        if call.qk is None and a.shape[1:] == (self.mem.num_heads, T, d) and b.shape[-2] == d and b.shape[-1] >= T:
            call.qk = (a, b.transpose(-2, -1))
            self._scale()  # known, or a clear error before the site runs on
            if self.mem.scale_checked or torch.compiler.is_compiling():  # the site's code still runs on the scores
                shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])  # MKA answers
                return torch.zeros(shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
            out = func(a, b)  # the first eager call: the real scores, to check the scale on the softmax input
            call.diag = _diagonal(out).detach().clone()
            return out
        if call.qk is not None and b.shape[-1] == d and a.shape[-1] == b.shape[-2] == call.qk[1].shape[-2]:
            if call.diag is not None:
                raise RuntimeError(
                    f"MKA mode at site {self.mem.site_name!r}: its attention has no softmax between its two products "
                    "(use FastMKA)"
                )
            q, k = call.qk
            out = self._answer(q, k, b, self._scale())
            return out.to(torch.promote_types(a.dtype, b.dtype))
        return func(a, b)

    def _scale(self) -> float:
        """The scale between the scores product's ``q`` and ``k``: the site's, from its facts."""
        scale = self.mem.score_scale
        if scale is None:
            raise RuntimeError(
                f"MKA mode at site {self.mem.site_name!r}: the site's attention scale is unknown (its facts hold no "
                "constant scale for q.k: a tensor scale, or none the attention rules could read); MKA mode computes "
                "the attention itself and needs it: convert this site with mode='fastmka', which keeps the site's "
                "own attention"
            )
        return scale

    def _softmax_input(self, x: torch.Tensor) -> None:
        """The scores as the softmax sees them: check the mask (every eager call) and, on the site's first eager
        call, the scale (:func:`_check_scale`)."""
        call = self.mem._call
        call.softmax_seen = True
        T, S = x.shape[-2], x.shape[-1]
        if torch.compiler.is_compiling():  # the mask and the scale are checked in eager runs
            return
        _check_keep(self.mem, x > torch.finfo(x.dtype).min / 2, T, S)
        if call.diag is not None:
            raw, call.diag = call.diag, None
            _check_scale(self.mem, raw, _diagonal(x.detach()))

    # -- shared ------------------------------------------------------------------------------------------
    def _answer(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if q.shape[1] != self.mem.num_heads:
            raise RuntimeError(
                f"MKA mode: the site attends with {q.shape[1]} query heads, but its query projection has "
                f"{self.mem.num_heads}; use FastMKA"
            )
        k, v = self._kv_heads(k, "key"), self._kv_heads(v, "value")
        return self.mem.attend(q, k, v, scale).transpose(1, 2)  # (B, H, T, d)

    def _kv_heads(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """``[B, h, S, d]`` at the site's key/value heads: keys repeated to the query heads are read back (each kv
        head repeated in a row, as ``repeat_kv`` / ``repeat_interleave`` / ``expand`` + ``reshape`` write them:
        "grouped", or the whole set tiled). The layout is found (checked on the data) on the site's first eager
        call with repeated heads, at conversion, and kept for every later call."""
        B, h, S, d = x.shape
        kv = self.mem.num_kv_heads
        if h == kv:
            return x
        layouts = {"grouped": ((B, kv, h // kv, S, d), 2), "tiled": ((B, h // kv, kv, S, d), 1)}
        if h % kv == 0 and self.mem.kv_layout is None and not torch.compiler.is_compiling():
            for name, (shape, axis) in layouts.items():
                grouped = x.reshape(shape)
                if bool((grouped == grouped.select(axis, 0).unsqueeze(axis)).all()):
                    self.mem.kv_layout = name
                    break
        if h % kv == 0 and self.mem.kv_layout in layouts:
            shape, axis = layouts[self.mem.kv_layout]
            return x.reshape(shape).select(axis, 0)
        raise RuntimeError(
            f"MKA mode: the site attends with {h} {what} heads, which are not its {kv} key/value heads repeated "
            "(or their layout was never seen in an eager run); use FastMKA"
        )


def check_mask(mem, mask: torch.Tensor, T: int, S: int) -> None:
    """An attention mask handed to an MKA site (``[B or 1, 1 or H, T, S]``, bool keep or additive) must be the
    causal mask, possibly with the padded keys masked too, and add nothing else (no ALiBi or other bias).
    Checked in eager runs only (it reads the data); traced runs rely on the eager runs that came before."""
    if torch.compiler.is_compiling():
        return
    keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if mask.dtype != torch.bool and bool((mask.masked_fill(~keep, 0) != 0).any()):
        raise RuntimeError(
            "MKA mode: this site adds a bias to its attention scores (ALiBi or another position bias), which MKA's "
            "memory levels do not have (use FastMKA)"
        )
    _check_keep(mem, keep, T, S)


def _check_keep(mem, keep: torch.Tensor, T: int, S: int) -> None:
    call = mem._call
    allowed = torch.ones(T, S, dtype=torch.bool, device=keep.device)
    allowed = allowed.tril(S - T) if mem.causal else allowed  # a bidirectional site: padding only
    pad_rows = ~call.valid.to(keep.device)[:, None, :, None]  # padded queries: any mask
    ok = (keep == allowed) | pad_rows
    kv = call.valid if call.state.kv_valid is None else torch.cat([call.state.kv_valid, call.valid], 1)
    if kv.shape[1] == S:  # or the causal mask with the padded keys masked too
        ok = ok | (keep == (allowed & kv[:, None, None, :].to(keep.device)))
    if not bool(ok.all()):
        if S > kv.shape[1]:  # more keys than positions seen: a preallocated cache (the future slots masked)
            raise RuntimeError(
                f"MKA mode: this site attends over {S} key slots but its sequence has {kv.shape[1]} positions: a "
                "preallocated (static) KV cache. MKA mode keeps its session levels for caches that grow with the "
                "sequence: use a dynamic cache, or FastMKA (which works with static caches)"
            )
        raise RuntimeError(
            "MKA mode: this site's attention mask is not the causal mask (with padding): a sliding window or "
            "another pattern? MKA mode supports causal self-attention only (use FastMKA)"
        )


def _check_scale(mem, raw: torch.Tensor, seen: torch.Tensor) -> None:
    """``seen`` (the softmax input at each query's own key, ``[B, H, T]``) must be ``raw`` (the scores product
    there) times the site's scale: the scale the facts give applies between the operands the interceptor records.
    Sets ``mem.scale_checked`` once a call had real tokens to check it on."""
    raw, seen = raw.double(), seen.double()
    rows = mem._call.valid[:, None, :].expand_as(raw) & torch.isfinite(seen)
    raw, seen = raw[rows], seen[rows]
    if raw.numel() == 0:  # nothing to check on (all padding): the next call checks
        return
    scale = mem.score_scale
    if not torch.allclose(raw * scale, seen, rtol=1e-3, atol=1e-5 * float(seen.abs().max())):
        raise RuntimeError(
            f"MKA mode at site {mem.site_name!r}: the site's softmax input is not its scores q.k times the scale "
            f"{scale:g} its facts give (it scales q or k before the product, or adds a position bias); MKA mode "
            "cannot answer this attention: convert this site with mode='fastmka', which keeps the site's own "
            "attention"
        )
    mem.scale_checked = True


def _dropout_active(args: tuple, kwargs: dict) -> bool:
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    training = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train", True))
    return bool(training) and float(p) > 0


def _diagonal(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, S]`` -> ``[B, H, T]``: each query's score for its own key (the last ``T`` keys)."""
    T, S = x.shape[-2], x.shape[-1]
    return x[..., S - T :].diagonal(dim1=-2, dim2=-1)
