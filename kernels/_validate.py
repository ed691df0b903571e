"""Argument checks shared by the ``mka::`` ops: every error names the argument and what to do."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def rank(name: str, t: torch.Tensor, n: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != n:
        raise ValueError(f"{name} must have rank {n} ({layout}), got shape {tuple(t.shape)}")


def floating(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def dtype(name: str, t: torch.Tensor, expected: torch.dtype | Sequence[torch.dtype], why: str = "") -> None:
    allowed = (expected,) if isinstance(expected, torch.dtype) else tuple(expected)
    if t.dtype not in allowed:
        names = " or ".join(str(a) for a in allowed)
        raise ValueError(f"{name} must have dtype {names}{why}, got {t.dtype}")


def same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast them to one dtype")


def same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def shape(name: str, t: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(t.shape)} "
            "(nothing is broadcast; expand it explicitly)"
        )


def beta(value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"beta must lie strictly between 0 and 1, got {value!r}")


def positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def heads_divide(num_heads: int, num_kv_heads: int, q_name: str = "q", kv_name: str = "k") -> None:
    if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"{q_name} has {num_heads} heads, which is not a multiple of the {num_kv_heads} heads of "
            f"{kv_name}; GQA needs num_heads % num_kv_heads == 0"
        )
