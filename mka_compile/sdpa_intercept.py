"""MKA mode for models outside transformers: the site's one ``F.scaled_dot_product_attention`` call becomes MKA.

Hugging Face models route attention through transformers' ``AttentionInterface`` (:mod:`mka_compile.hf_attention`).
Other models (nanoGPT, hand-written modules) compute attention inline; for a site whose attention is a single
SDPA call, a :class:`torch.overrides.TorchFunctionMode` (PyTorch's extension point for intercepting torch
functions), active only while the site module runs, hands that call to the site's MKA attention
(:meth:`mka_compile.site_memory.SiteMemory.attend`). Every other torch function passes through unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class SDPAToMKA(TorchFunctionMode):
    """While active, the first SDPA call of the site's forward is answered by ``mem.attend``."""

    def __init__(self, mem) -> None:
        super().__init__()
        self.mem = mem

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = self.mem._call
        if func not in SDPA or call is None or call.extra.get("attended"):
            return func(*args, **kwargs)
        a = dict(zip(_NAMES, args)) | kwargs
        q, k, v = a["query"], a["key"], a["value"]
        mask = a.get("attn_mask")
        if mask is not None and not _is_causal_mask(mask, q.shape[-2], k.shape[-2]):
            raise RuntimeError(
                "MKA mode: this site passes an attention mask that is not the causal one to "
                "scaled_dot_product_attention; only causal attention is supported outside transformers (use FastMKA)"
            )
        if mask is None and not a.get("is_causal", False):
            raise RuntimeError("MKA mode: this site's scaled_dot_product_attention call is not causal (use FastMKA)")
        if k.shape[1] != self.mem.num_kv_heads or q.shape[1] != self.mem.num_heads:
            raise RuntimeError(
                f"MKA mode: the site attends with {q.shape[1]} query / {k.shape[1]} key heads, but its projections "
                f"have {self.mem.num_heads} / {self.mem.num_kv_heads} (kv heads repeated before attention?); "
                "use FastMKA"
            )
        if self.mem.training and a.get("dropout_p", 0.0):
            raise RuntimeError("MKA mode: attention dropout is not supported (set dropout_p=0 or use FastMKA)")
        scale = a.get("scale")
        out = self.mem.attend(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale))  # (B, T, H, d)
        return out.transpose(1, 2)


def _is_causal_mask(mask: torch.Tensor, tq: int, tk: int) -> bool:
    keep = mask if mask.dtype == torch.bool else mask == 0
    want = torch.ones(tq, tk, dtype=torch.bool, device=mask.device).tril(tk - tq)
    return bool((keep == want).all())
