"""The small byte-level Llama of the long-context benchmark: its config, training (cached by settings), and the
variants measured (full attention, window + sinks, bounded MKA at init and after a short fine-tune).

Training: ``transformers.LlamaForCausalLM`` built from a config, full attention at length ``L``, AdamW with
warmup and cosine decay, on a mix of plain text windows and retrieval samples of the three tasks
(:func:`tools.long_context.tasks.training_batches`); the loss is the LM loss plus the mean loss on the answer
digits. The weights are cached under ``.cache/long_context/<key>.pt``, the key a hash of every training
setting, so a rerun skips training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tools.long_context import tasks

CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "long_context"


@dataclass(frozen=True)
class TrainSettings:
    length: int = 256  # L: training length = max_position_embeddings
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    steps: int = 2400
    batch: int = 32
    lr: float = 1e-3  # 3e-3 never formed induction heads (answer loss stayed at chance, 0 % retrieval)
    warmup: int = 50
    answer_weight: float = 3.0  # loss = LM loss + answer_weight * answer-digit loss
    # stages: (fraction of the steps, sequence length, retrieval share, repeat share); the last stage runs at
    # the training length until the end. A first stage of short rows rich in repeats grows induction heads.
    stages: tuple[tuple[float, int, float, float], ...] = ((0.4, 128, 0.7, 0.15), (0.6, 256, 0.8, 0.05))
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": 2, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_model(s: TrainSettings) -> LlamaForCausalLM:
    torch.manual_seed(s.seed)
    cfg = LlamaConfig(
        vocab_size=tasks.VOCAB,
        hidden_size=s.hidden,
        intermediate_size=3 * s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.length,
        bos_token_id=tasks.BOS,
        eos_token_id=tasks.BOS,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def answer_loss(model, x: torch.Tensor, mask: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LM loss, answer-digit loss)`` of ``x: [B, T+1]`` (inputs and shifted targets), ``mask`` marks answers."""
    logits = model(x[:, :-1], use_cache=False, **kw).logits  # (B, T, V)
    ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (B, T)
    m = mask[:, 1:]
    return ce.mean(), (ce[m].mean() if m.any() else ce.new_zeros(()))


def train(s: TrainSettings, log: Callable[[str], None]) -> tuple[LlamaForCausalLM, dict]:
    """Train from scratch (full attention); returns the model and a record (losses, seconds)."""
    model = build_model(s).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95)
    )
    text = tasks.text_ids("train")
    starts, done = [], 0
    for i, (frac, seq, share, repeat) in enumerate(s.stages):
        starts.append((done, i, min(seq, s.length), share, repeat))
        done += int(frac * s.steps)
    curve, t0, data, stage_now = [], time.perf_counter(), None, None
    for step in range(s.steps):
        _, stage, seq, share, repeat = [st for st in starts if step >= st[0]][-1]
        if stage != stage_now:  # each stage its own stream, seeded by stage
            data = tasks.training_batches(text, s.batch, seq + 1, s.seed * 1000 + stage, share, repeat)
            stage_now = stage
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s.steps, s.lr, s.warmup)
        x, mask = next(data)
        lm, ans = answer_loss(model, x, mask)
        opt.zero_grad(set_to_none=True)
        (lm + s.answer_weight * ans).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append((step + 1, round(lm.item(), 4), round(ans.item(), 4)))
        if (step + 1) % max(1, s.steps // 20) == 0 or step + 1 == s.steps:
            log(
                f"  train step {step + 1}/{s.steps} (seq {seq}): loss {lm.item():.3f}, answer digits {ans.item():.3f}, "
                f"{time.perf_counter() - t0:.0f} s"
            )
    model.eval()
    return model, {"curve": curve, "seconds": time.perf_counter() - t0}


def trained_model(s: TrainSettings, log: Callable[[str], None], cache_dir: Path = CACHE_DIR) -> tuple:
    """The trained model for settings ``s``: from ``cache_dir`` when there, else trained and cached.
    Returns ``(model, record)``; ``record['cached']`` says which."""
    path = cache_dir / f"{s.key()}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        model = build_model(s)
        model.load_state_dict(blob["state"])
        log(f"trained weights from {path} (training skipped; delete the file to retrain)")
        return model, {**blob["record"], "cached": True, "path": str(path)}
    log(f"training the byte-level Llama ({s.layers} layers, hidden {s.hidden}, L={s.length}, {s.steps} steps)")
    model, record = train(s, log)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "record": record, "settings": asdict(s)}, path)
    return model, {**record, "cached": False, "path": str(path)}


@dataclass(frozen=True)
class Variant:
    """One way to run the trained model: full attention (``bounded=None``) or an ``MKAConfig``'s keyword
    arguments for a bounded conversion; ``finetune`` = fine-tune the memory parameters after converting."""

    name: str
    label: str
    bounded: dict | None = None
    finetune: bool = False
    what: str = ""


def bounded_api_available() -> bool:
    """Whether this checkout has the bounded-memory API (``MKAConfig(window=...)`` and ``memory_report``)."""
    try:
        from mka_compile import MKAConfig, memory_report  # noqa: F401

        MKAConfig(window=64, sink_tokens=4)
    except (ImportError, TypeError, ValueError):
        return False
    return True


def instantiate(base: LlamaForCausalLM, v: Variant) -> LlamaForCausalLM:
    """A copy of ``base`` run as variant ``v`` (converted in place when bounded)."""
    model = copy.deepcopy(base).eval()
    if v.bounded is not None:
        from mka_compile import MKAConfig, convert

        convert(model, config=MKAConfig(**v.bounded))
        model.eval()
    return model


def finetune_memory(
    model, seq: int, steps: int, batch: int, lr: float, max_s: float, log: Callable[[str], None], seed: int
) -> dict:
    """Fine-tune only ``mka_compile.memory_parameters(model)`` (routers and gates) on retrieval samples of ``seq``
    tokens (beyond the trained length, so recall is exercised), everything else frozen, for ``steps`` steps or
    ``max_s`` seconds, whichever comes first. Returns a record (steps run, loss curve, seconds, parameters)."""
    import mka_compile

    params = list(mka_compile.memory_parameters(model))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = tasks.training_batches(tasks.text_ids("train"), batch, seq + 1, seed + 7, 1.0, 0.0)
    model.train()
    curve, t0 = [], time.perf_counter()
    for step in range(steps):
        if time.perf_counter() - t0 > max_s:
            break
        x, mask = next(data)
        lm, ans = answer_loss(model, x, mask)
        opt.zero_grad(set_to_none=True)
        (lm + ans).backward()
        opt.step()
        curve.append((step + 1, round(lm.item(), 4), round(ans.item(), 4)))
        log(f"  fine-tune step {step + 1}/{steps}: loss {lm.item():.3f}, answer digits {ans.item():.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {
        "steps": len(curve),
        "curve": curve,
        "seconds": round(time.perf_counter() - t0, 1),
        "params": sum(p.numel() for p in params),
    }
