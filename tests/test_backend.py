"""The ``mka`` torch.compile backend: options, attention lowering, converted models, trained weights through the
converted-checkpoint loader, decode graph counts, and Inductor training steps equal to eager.

Most checks run ``options={"compiler": "aot_eager"}`` (the backend's rewrite and AOTAutograd without Inductor's
C++ code generation, ~30 s per graph on 2 cores); the ``slow`` tests run Inductor end to end. ``MKA_FULL_ZOO=1``
runs every Hugging Face family of the zoo through Inductor.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import zoo

import mka_compile
from mka_compile import MKAConfig
from mka_compile import backend as B

CFG = MKAConfig(gate_init=0.0, chunk_size=4, top_r=2)
AOT = {"compiler": "aot_eager"}
INDUCTOR = {"inductor": {"compile_threads": 1}}  # no worker pool: faster on 2 shared cores
LAYERS = 2  # every zoo model has two layers


@pytest.fixture(autouse=True)
def _fresh(tmp_path_factory, monkeypatch):
    # Inductor's FX cache does not key on custom-op fake impls: a private cache dir per test session
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor"))
    torch._dynamo.reset()
    B.reset()
    yield
    torch._dynamo.reset()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _model(family: str, attn: str, variant: str):
    model, _ = zoo.causal_lm(family, attn)
    if variant in ("fastmka", "mka"):
        mka_compile.convert(model, mode=variant, config=CFG)
        zoo.randomize_mka(model)
    return model


def _actions() -> set[str]:
    return {s.action for r in B.reports() for s in r.sites}


def _mka_ops() -> set[str]:
    return {op for r in B.reports() for op in r.mka_ops}


# --------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mod": "fastmka"}, r"unknown option\(s\) \['mod'\].*valid keys"),
        ({"mode": "fast"}, r"options\['mode'\] must be None, 'fastmka' or 'mka'"),
        ({"attention": "flash"}, r"options\['attention'\] must be one of \['mka', 'sdpa', 'keep'\]"),
        ({"config": {"chunk": 4}}, r"options\['config'\]"),
        ({"config": 3}, r"must be an MKAConfig or a dict"),
        ({"config": MKAConfig()}, r"options\['config'\].*does not convert.*mka_compile.convert"),
        ({"config": {"window": 32}}, r"options\['config'\] asks for bounded memory"),
        ({"weights": {"a.mka.gate": torch.zeros(1)}, "mode": "fastmka"}, r"options\['weights'\].*load_converted"),
        ({"weights": "/some/converted.safetensors"}, r"options\['weights'\].*load_converted\(model, path\)"),
        ({"compiler": "eager"}, r"options\['compiler'\] must be one of"),
    ],
)
def test_bad_options_name_the_option(options, message) -> None:
    with pytest.raises(B.BackendError, match=message):
        B.parse_options(options)


def test_options_reach_the_backend_through_torch_compile() -> None:
    model = zoo.NanoGPT(flash=False, n_layer=1)
    with pytest.raises(Exception, match=r"unknown option\(s\) \['typo'\]"):
        torch.compile(model, backend="mka", options={"typo": 1})(torch.randint(0, 50, (1, 5)))


def test_mode_on_an_original_model_says_what_to_do() -> None:
    model = zoo.NanoGPT(flash=True, n_layer=1)
    with pytest.raises(Exception, match=r"mode'\]='fastmka' but this model is not converted.*mka_compile.convert"):
        torch.compile(model, backend="mka", options={**AOT, "mode": "fastmka"})(torch.randint(0, 50, (1, 5)))


# ------------------------------------------------------------------------------------- zoo (aot_eager)


@pytest.mark.parametrize(
    "family, attn, variant",
    [
        ("llama", "sdpa", "original"),  # SDPA sites (GQA)
        ("gpt2", "eager", "original"),  # eager sites, fused Conv1D QKV
        ("qwen3", "eager", "fastmka"),  # q/k norms, eager attention next to the mka:: ops
        ("llama", "sdpa", "mka"),  # MKA attention is an mka:: op already
        ("falcon", "eager", "mka"),  # MKA mode through the inline interceptor (no AttentionInterface)
    ],
)
def test_zoo_forward_equals_eager(family: str, attn: str, variant: str) -> None:
    """Original models: attention lowered to mka::flash_attention; converted ones: the mka:: ops stay."""
    model = _model(family, attn, variant)
    ids = torch.randint(0, 90, (2, 13))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="mka", options=AOT)(ids, use_cache=False).logits
    assert _rel(out, ref) <= 1e-4
    if family == "falcon":  # the keys reach MKA through the interceptor's un-repeat: the report does not list sites
        assert sum(r.mka_ops.get("mka::mka_attention", 0) for r in B.reports()) == LAYERS
        return
    sites = [s for r in B.reports() for s in r.sites]
    assert len(sites) == LAYERS
    if variant == "mka":
        assert _actions() == {"mka::mka_attention"} and "mka::mka_attention" in _mka_ops()
    else:
        assert _actions() == {"mka::flash_attention"}, [s.reason for s in sites]
    if variant == "fastmka":
        assert "mka::memory_mix" in _mka_ops()  # the memory step: one op


# ------------------------------------------------------------------------------ report, logging, targets


class _RoutedNano(torch.nn.Module):
    """nanoGPT with the manual (masked_fill + tril buffer) attention path, plus a mixture-of-experts softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = zoo.NanoGPT(flash=False)
        self.moe = zoo.MoERouter(d=50)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.moe(self.gpt(idx))


@pytest.mark.parametrize("target", ["mka", "sdpa", "keep"])
def test_report_log_and_targets(target: str, caplog) -> None:
    torch.manual_seed(0)
    model = _RoutedNano().eval()
    idx = torch.randint(0, 50, (2, 11))
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="mka_compile.backend"):
        ref = model(idx)
        out = torch.compile(model, backend="mka", options={**AOT, "attention": target})(idx)
    assert _rel(out, ref) <= 1e-5
    report = B.last_report()
    assert B.graph_count() == 1 and report is B.reports()[0]
    assert [s.name for s in report.sites] == ["gpt.h.0.attn", "gpt.h.1.attn"]
    want = {"mka": "mka::flash_attention", "sdpa": "sdpa", "keep": "kept"}[target]
    assert {s.action for s in report.sites} == {want}
    (router,) = report.not_attention
    assert router.module == "moe" and router.closest_rule and router.reason  # why the MoE softmax is not attention
    assert "mka backend, graph 0: 2 attention site(s)" in caplog.text and router.reason in caplog.text


class _TinyAttention(torch.nn.Module):
    """One eager attention with dropout on the probabilities; returns the output and (optionally) the weights."""

    def __init__(self, p: float = 0.0, weights: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        self.drop, self.weights = torch.nn.Dropout(p), weights

    def forward(self, x: torch.Tensor):
        heads = lambda t: t.view(2, 7, 2, 8).transpose(1, 2)  # noqa: E731
        s = heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) * 8**-0.5
        p = torch.softmax(s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf")), dim=-1)
        out = self.drop(p) @ heads(self.v(x))
        return (out, p) if self.weights else out


def test_sites_kept_with_reasons() -> None:
    """Attention dropout in training and returned attention weights are left to Inductor, with the reason."""
    x = torch.randn(2, 7, 16)
    torch.compile(_TinyAttention(p=0.1).train(), backend="mka", options=AOT)(x)
    (site,) = B.last_report().sites
    assert site.action == "kept" and "dropout (p=0.1)" in site.reason
    torch._dynamo.reset()
    model = _TinyAttention(weights=True)
    ref = model(x)
    out = torch.compile(model, backend="mka", options=AOT)(x)
    (site,) = B.last_report().sites
    assert site.action == "kept" and "also used by" in site.reason
    assert _rel(out[0], ref[0]) <= 1e-6 and _rel(out[1], ref[1]) <= 1e-6


def test_padded_rows_differ_only_where_no_key_is_visible() -> None:
    """mka::flash_attention gives zeros where a query sees no key (left padding); real tokens are unchanged."""
    model, _ = zoo.causal_lm("llama", "eager")
    ids = torch.randint(1, 90, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
        out = torch.compile(model, backend="mka", options=AOT)(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert _rel(out[real], ref[real]) <= 1e-5


# ------------------------------------------------------------------- trained weights: the checkpoint loader


def _trained(family: str, attn: str):
    conv, _ = zoo.causal_lm(family, attn)
    mka_compile.convert(conv, config=CFG)
    zoo.randomize_mka(conv)
    with torch.no_grad():
        for name, p in conv.named_parameters():
            if name.endswith(".mka.gate"):
                p.fill_(0.7)
    return conv


def test_converted_checkpoint_compiles_as_the_converted_model(tmp_path) -> None:
    """Original model code + load_converted (mode and MKAConfig recorded in the file: chunk 4, not the default 64)
    compiles to the converted model's logits (fused QKV for gpt2); the trained routers act."""
    from mka_compile.checkpoint import conversion_of

    conv = _trained("gpt2", "sdpa")
    path = mka_compile.save_converted(conv, tmp_path / "conv.safetensors")
    model, _ = zoo.causal_lm("gpt2", "sdpa")
    ids = torch.randint(0, 90, (2, 13))
    with torch.no_grad():
        ref = conv(ids, use_cache=False).logits
        base = model(ids, use_cache=False).logits
        mka_compile.load_converted(model, path)
        assert conversion_of(model) == ("fastmka", CFG)
        out = torch.compile(model, backend="mka", options=AOT)(ids, use_cache=False).logits
    assert _rel(out, ref) <= 1e-4 and _rel(out, base) >= 1e-3
    assert "mka::memory_mix" in _mka_ops() and len(_actions()) == 1


def test_weights_and_config_options_are_refused_with_the_loader() -> None:
    """The backend does not convert: ``weights`` / ``config`` name the loader; ``mode`` must match a converted model."""
    conv = _trained("llama", "sdpa")
    model, _ = zoo.causal_lm("llama", "sdpa")
    ids = torch.randint(0, 90, (1, 7))
    with pytest.raises(Exception, match=r"options\['weights'\].*mka_compile.load_converted"):
        torch.compile(model, backend="mka", options={**AOT, "weights": conv.state_dict()})(ids, use_cache=False)
    with pytest.raises(Exception, match=r"options\['mode'\]='mka' but the model was converted to 'fastmka'"):
        torch.compile(conv, backend="mka", options={**AOT, "mode": "mka"})(ids, use_cache=False)


# ----------------------------------------------------------------------------------------- decode graphs


def test_decode_compiles_a_bounded_number_of_graphs() -> None:
    """generate() with a DynamicCache: prefill + decode graphs, the same for more tokens and for a new request."""
    model = _model("llama", "sdpa", "fastmka")
    B.prepare_decode(model, max_len=64)
    prompts = [torch.randint(0, 90, (1, 9)), torch.randint(0, 90, (1, 5))]
    with torch.no_grad():
        ref = [model.generate(p, max_new_tokens=n, do_sample=False, pad_token_id=0) for p, n in zip(prompts, (4, 8))]
        model.forward = torch.compile(model.forward, backend="mka", dynamic=True, options=AOT)
        first = model.generate(prompts[0], max_new_tokens=4, do_sample=False, pad_token_id=0)
        count = B.graph_count()
        second = model.generate(prompts[1], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(first, ref[0]) and torch.equal(second, ref[1])
    assert count <= 4 and B.graph_count() == count  # no graph per token, none per request


def test_prepare_decode_errors() -> None:
    model, _ = zoo.causal_lm("llama", "sdpa")
    with pytest.raises(ValueError, match="no converted site"):
        B.prepare_decode(model)
    mka_compile.convert(model, config=CFG)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        B.prepare_decode(model, max_len=0)


# ------------------------------------------------------------------------------------- Inductor, training


def _grads_equal_eager(model, ids) -> float:
    """Training step: loss and every gradient of the compiled model vs eager; returns the max relative error."""
    model.train()
    ref = model(ids, labels=ids, use_cache=False)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = torch.compile(model, backend="mka", options=INDUCTOR)(ids, labels=ids, use_cache=False)
    out.loss.backward()
    errs = [_rel(out.logits, ref.logits), _rel(out.loss, ref.loss)]
    errs += [_rel(p.grad, grads[n]) for n, p in model.named_parameters() if n in grads]
    assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    return max(errs)


@pytest.mark.slow
def test_inductor_training_step_equals_eager() -> None:
    """Inductor end to end: a FastMKA-converted Llama (random routers) with eager attention: the attention is
    lowered to mka::flash_attention, the FastMKA ops stay, and loss, logits and every gradient equal eager's."""
    model = _model("llama", "eager", "fastmka")
    ids = torch.randint(0, 90, (2, 13))
    assert _grads_equal_eager(model, ids) <= 1e-4
    assert _actions() == {"mka::flash_attention"}
    assert "mka::memory_mix" in _mka_ops()


@pytest.mark.slow
def test_entry_point_without_importing_mka_compile() -> None:
    """``torch.compile(backend="mka")`` finds the backend through the ``torch_dynamo_backends`` entry point."""
    script = textwrap.dedent(
        """
        import sys, torch
        torch.manual_seed(0)
        class Attn(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
            def forward(self, x):
                s = self.q(x).view(2, 5, 2, 8).transpose(1, 2) @ self.k(x).view(2, 5, 2, 8).permute(0, 2, 3, 1)
                mask = torch.ones(5, 5, dtype=torch.bool).tril()
                p = torch.softmax((s * 8 ** -0.5).masked_fill(~mask, float("-inf")), dim=-1)
                return (p @ self.v(x).view(2, 5, 2, 8).transpose(1, 2)).sum()
        m, x = Attn(), torch.randn(2, 5, 16)
        assert "mka_compile" not in sys.modules
        out = torch.compile(m, backend="mka", options={"compiler": "aot_eager"})(x)
        assert "mka_compile" in sys.modules
        from mka_compile import backend
        assert backend.last_report().sites[0].action == "mka::flash_attention"
        print("ok", float((out - m(x)).abs()))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok") and float(run.stdout.split()[1]) <= 1e-4


@pytest.mark.skipif(os.environ.get("MKA_FULL_ZOO") != "1", reason="full zoo through Inductor: set MKA_FULL_ZOO=1")
@pytest.mark.parametrize("variant", ["original", "fastmka", "mka"])
@pytest.mark.parametrize("family", zoo.CAUSAL_LMS)
def test_full_zoo_inductor(family: str, variant: str) -> None:
    model = _model(family, "sdpa", variant)
    ids = torch.randint(0, 90, (2, 13))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="mka", options=INDUCTOR)(ids, use_cache=False).logits
    assert _rel(out, ref) <= 1e-4
