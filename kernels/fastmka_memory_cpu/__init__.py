"""FastMKA's memory path fused for the CPU (eager float32): routing weights, session EMA, chunk summaries,
causal top-R recall and the routed mix of one site in one C++ pass per (batch row, kv head), forward and
backward (``extension.cpp`` with the passes in ``forward.h`` and ``backward.h``).

It computes what ``SiteMemory.mix_levels`` composes from the ``mka::`` reference ops (``route_mix`` of
``session_scan``, ``chunk_update``, ``recall_select`` + ``recall_mix`` and ``routing_weights``); those ops
stay the definition, and the one torch.compile, ``torch.export`` and ONNX see: this path runs only in eager
mode on real CPU tensors. It exists because, at the sizes of a converted small model, the composed ops
spend most of their time in per-op overhead (about 3 ms per layer at T=1024, next to 14 ms for the layer).

The extension is compiled on first use (``torch.utils.cpp_extension.load``, about a minute, cached per
machine under ``TORCH_EXTENSIONS_DIR``). Without a C++ compiler, or with ``MKA_CPU_FUSED=0``, the
reference ops run instead: same results, slower.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sysconfig
import warnings
from pathlib import Path

import torch
from torch.utils import _python_dispatch

HERE = Path(__file__).parent
SOURCE = HERE / "extension.cpp"  # one translation unit; it includes the headers beside it
ENV = "MKA_CPU_FUSED"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


@functools.cache
def extension():
    """The compiled module, or None (turned off, or it does not build here; a warning says why, once)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    flags = ["-O3", "-fopenmp"]  # OpenMP: ATen's parallel_for and vectorised dot products
    cpu = _cpu_flags()
    if cpu:  # tuned for this CPU; the name keeps builds for different CPUs apart in a shared cache
        flags.append("-march=native")
    # the name changes with the sources (headers included: torch's build check reads only the .cpp) and the CPU
    digest = hashlib.sha1(cpu.encode())
    for f in sorted(HERE.glob("*.[ch]*")):
        if f.suffix in (".cpp", ".h"):
            digest.update(f.read_bytes())
    tag = digest.hexdigest()[:12]
    _ninja_on_path()
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name=f"mka_fastmka_memory_cpu_{tag}", sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"]
        )
    except Exception as e:  # no compiler, no headers: the reference ops still work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"mka_compile: the fused CPU memory path did not build ({first}); converted FastMKA sites run the "
            f"reference ops (same results, slower). Set {ENV}=0 to skip the build.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _ninja_on_path() -> None:
    """The build runs ``ninja`` from PATH; the ``ninja`` package installs it next to this interpreter, which is not
    on PATH when a virtual environment's python runs without being activated (``.venv/bin/python -m pytest``)."""
    if shutil.which("ninja") is None:
        scripts = sysconfig.get_path("scripts")
        if scripts and (Path(scripts) / "ninja").exists():
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused path can run on these inputs: eager (not traced or compiled), real float32 CPU tensors,
    no dispatch mode active, and the extension built."""
    if torch.compiler.is_compiling() or _python_dispatch.is_in_torch_dispatch_mode():
        return False
    if not all(type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return extension() is not None


def _gate(gate: torch.Tensor) -> tuple[float, float]:
    """``(min(|gate|, 1), sign)``: the effective gate of ``routing_weights`` and its gradient (``+1`` at 0)."""
    raw = float(gate.detach().reshape(()))
    return min(abs(raw), 1.0), -1.0 if raw < 0 else 1.0


def _opts(session, longterm, beta, chunk, top_r, scale) -> tuple:
    return bool(session), bool(longterm), float(beta), int(chunk), int(top_r), float(scale)


class _Memory(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k1, v1, q, logits, gate, valid, state, opts):
        save = any(ctx.needs_input_grad[:5])
        g, sign = _gate(gate)
        out = extension().forward(k1, v1, q, logits, g, valid, *state, *opts, save, True, False)
        kf, vf, lam, p = out[:4]
        new_state = tuple(out[4:10])
        ctx.mark_non_differentiable(lam, *new_state)
        if save:  # out[10:]: the session levels, [k3|v3], the recalled slots, their weights, the recall queries
            ctx.save_for_backward(k1, v1, valid, state[0], lam, p, new_state[4], new_state[5], *out[10:])
            ctx.gate_value, ctx.gate_sign, ctx.opts, ctx.q_features = g, sign, opts, q.shape[-1]
        return kf, vf, lam, *new_state

    @staticmethod
    def backward(ctx, gkf, gvf, *_):
        k1, v1, valid, n_seen, lam, p, summ_k, summ_v, s_k, s_v, kv3, slots, weights, q_r = ctx.saved_tensors
        session, longterm, beta, chunk, top_r, scale = ctx.opts
        gkf = torch.zeros_like(s_k) if gkf is None else gkf
        gvf = torch.zeros_like(s_v) if gvf is None else gvf
        gk1, gv1, gq, glogits, ggate = extension().backward(
            gkf, gvf, k1, v1, q_r, ctx.q_features, ctx.gate_value, valid, n_seen, lam, p, summ_k, summ_v,
            s_k, s_v, kv3, slots, weights, session, longterm, beta, chunk, top_r, scale,
        )  # fmt: skip
        gq = gq if longterm else None  # only the recall reads the query
        return gk1.transpose(1, 2), gv1.transpose(1, 2), gq, glogits, ggate * ctx.gate_sign, None, None, None


def memory(k1, v1, q, logits, gate, valid, state, *, session, longterm, beta, chunk, top_r, scale, overwrite=False):
    """FastMKA's memory path of one site call.

    ``k1, v1: [B, Hkv, T, d]``, ``q: [B, T, H*d]`` (un-rotated query projection), ``logits: [B, T, G*L]`` (the
    router's output), ``gate: [1]`` (the raw gate parameter), ``valid: [B, T]``, ``state``: ``(n_seen, ema_k,
    ema_v, part_k, part_v, summ_k, summ_v)`` with room for this call's chunks. Returns ``kf, vf: [B, Hkv, T, d]``
    (views of ``[B, T, Hkv, d]`` buffers), ``lam: [B, G, T, L]`` and the new ``(ema_k, ema_v, part_k, part_v,
    summ_k, summ_v)``. Differentiable in ``k1, v1, q, logits, gate``; the incoming state gets no gradient, so
    callers use it under autograd only for a fresh state that nothing keeps. ``overwrite``: without autograd, kf and
    vf may be written over ``k1`` and ``v1`` (for callers that own them and need them no more).
    """
    opts = _opts(session, longterm, beta, chunk, top_r, scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (k1, v1, q, logits, gate)):
        kf, vf, lam, *new_state = _Memory.apply(k1, v1, q, logits, gate, valid, tuple(state), opts)
    else:  # nothing to differentiate: the extension directly
        kf, vf, lam, _, *new_state = extension().forward(
            k1, v1, q, logits, _gate(gate)[0], valid, *state, *opts, False, True, overwrite
        )[:10]
    return kf.transpose(1, 2), vf.transpose(1, 2), lam, tuple(new_state)


def levels(k1, v1, q, logits, gate, valid, state, *, session, longterm, beta, chunk, top_r, scale):
    """MKA mode's memory levels of one site call (no autograd: for inference): the session EMA ``s_k, s_v:
    [B, Hkv, T, d]`` (or None), the recalled slots ``idx, found: [B, Hkv, T, R]`` as ``mka::recall_select`` gives
    them (or None), ``lam: [B, G, T, L]`` and the new state; arguments as :func:`memory`."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (k1, v1, q, logits, gate)):
        raise RuntimeError("fastmka_memory_cpu.levels has no backward; call it under torch.no_grad()")
    opts = _opts(session, longterm, beta, chunk, top_r, scale)
    out = extension().forward(k1, v1, q, logits, _gate(gate)[0], valid, *state, *opts, False, False, False)
    s_k, s_v, _, slots = out[10:14]
    sess = (s_k.transpose(1, 2), s_v.transpose(1, 2)) if session else (None, None)
    recall = (slots.clamp_min(0).long(), slots >= 0) if longterm else (None, None)
    return *sess, *recall, out[2], tuple(out[4:10])
