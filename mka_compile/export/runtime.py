"""Running exported files with ONNX Runtime: :func:`ort_session` (CUDA when ``onnxruntime-gpu`` provides it)
and :class:`OnnxDecoder`, which drives a decode-step file (``export_onnx(..., decode_step=True)``) and keeps
the past K/V and the MKA state between calls."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mka_compile.bounded_fixed import DRIVER_WRITES

_NP = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def providers() -> list[str]:
    """``["CUDAExecutionProvider", "CPUExecutionProvider"]`` when ONNX Runtime has CUDA, else the CPU one."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in have else []) + ["CPUExecutionProvider"]


def ort_session(path: str | os.PathLike, providers_: list[str] | None = None, **options: Any):
    """An ``onnxruntime.InferenceSession`` for ``path`` on :func:`providers` (or ``providers_``).

    ``options`` set attributes of ``onnxruntime.SessionOptions`` (e.g. ``intra_op_num_threads=2``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    for k, v in options.items():
        setattr(so, k, v)
    return ort.InferenceSession(str(path), so, providers=providers_ or providers())


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class OnnxDecoder:
    """Runs a decode-step file token by token (or a prompt at a time), keeping the cache between calls.

    Example::

        dec = OnnxDecoder("step.onnx")
        logits = dec(prompt_ids)                 # [B, T, vocab]: prefill (empty past)
        logits = dec(next_ids)                   # [B, 1, vocab]: one decode step
        dec.reset()                              # a new batch of sequences

    ``attention_mask`` (``[B, T]`` for this call's tokens, 1 = real, 0 = left padding) defaults to ones. A bounded
    memory file (``mka.bounded``) takes one token per call: a longer call is fed token by token.
    """

    def __init__(self, path: str | os.PathLike, providers_: list[str] | None = None, **options: Any) -> None:
        self.session = ort_session(path, providers_, **options)
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("mka.decode_step") != "1":
            raise ValueError(f"{path} is not a decode-step file; export it with export_onnx(..., decode_step=True)")
        self.max_len = int(meta["mka.max_len"]) if meta.get("mka.max_len") else None
        self.one_token = meta.get("mka.bounded") == "1"  # bounded memory's fixed-size step: one token per call
        self.inputs = self.session.get_inputs()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.feeds: dict[str, np.ndarray] | None = None
        self.mask: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the cache: the next call starts new sequences."""
        self.feeds, self.mask = None, None

    def _empty(self, batch: int) -> dict[str, np.ndarray]:
        feeds = {}
        for inp in self.inputs[2:]:  # past and state: symbolic axes are the batch and the past length
            shape = [d if isinstance(d, int) else 0 for d in inp.shape]
            shape[0] = batch
            feeds[inp.name] = np.zeros(shape, dtype=_NP[inp.type])
        return feeds

    def __call__(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        ids = _numpy(input_ids).astype(np.int64)
        B, T = ids.shape
        mask = np.ones((B, T), np.int64) if attention_mask is None else _numpy(attention_mask).astype(np.int64)
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask must be [B, T] = {(B, T)} for this call's tokens, got {mask.shape}")
        if self.one_token and T > 1:  # a prompt goes through the fixed-size step token by token
            return np.concatenate([self(ids[:, i : i + 1], mask[:, i : i + 1]) for i in range(T)], 1)
        if self.feeds is None:
            self.feeds, self.mask = self._empty(B), np.zeros((B, 0), np.int64)
        elif self.mask.shape[0] != B:
            raise ValueError(f"this decoder holds {self.mask.shape[0]} sequences, got a batch of {B}; call reset()")
        total = self.mask.shape[1] + T
        if self.max_len is not None and total > self.max_len:
            raise ValueError(f"{total} positions exceed the max_len {self.max_len} the file was exported for")
        full_mask = np.concatenate([self.mask, mask], 1)
        feeds = {"input_ids": ids, "attention_mask": full_mask, **self.feeds}
        outs = self.session.run(self.output_names, feeds)
        done = {}
        for name, value in zip(self.output_names[1:], outs[1:]):
            if name.startswith("chunk_done."):  # bounded memory: the chunk a step completed, for the store kept here
                done[name] = value
                continue
            self.feeds[name.replace("present.", "past.").replace("new_state.", "state.")] = value
        for name, at in done.items():
            if name.endswith(".done_at"):
                site = name[len("chunk_done.") : -len(".done_at")]
                for field, part in DRIVER_WRITES.items():
                    store, chunk = self.feeds[f"state.{site}.{field}"], done[f"chunk_done.{site}.{part}"]
                    for b in np.nonzero(at >= 0)[0]:  # (B, G, N, ...) <- (B, G, ...) at the chunk's slot, in place
                        store[b, :, at[b]] = chunk[b]
        self.mask = full_mask
        return outs[0]
