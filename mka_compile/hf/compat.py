"""Across transformers 5.x: the cache argument of a causal LM's forward is ``past_key_values`` up to ~5.2x and
``cache`` after (``past_key_values`` is deprecated in 5.24 and goes in 5.40); outputs follow the same rename."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the name this model's forward takes its KV cache under."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def returned_cache(out: Any) -> Any:
    """The KV cache a Hugging Face model output carries (``out.cache``, or ``out.past_key_values`` before)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    return out["cache"] if "cache" in keys else out.past_key_values
