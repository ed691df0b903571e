from __future__ import annotations

import pytest
import torch
import zoo

import mka_compile
from mka_compile import CaptureError


def test_report_table_and_lookup() -> None:
    model = zoo.NanoGPT(flash=False).eval()
    report = mka_compile.inspect(model, (torch.randint(0, 50, (2, 8)),))
    text = str(report)
    assert "h.0.attn" in text and "attention.eager.matmul" in text and "2 attention site(s)" in text
    assert report["h.1.attn"].causal
    with pytest.raises(KeyError, match="no attention site named"):
        report["nope"]
    assert report.sites[0].as_dict()["num_heads"] == 4


def test_names_are_stable_across_runs() -> None:
    model = zoo.NanoGPT(flash=True).eval()
    ids = torch.randint(0, 50, (2, 8))
    assert [s.name for s in mka_compile.inspect(model, (ids,)).sites] == [
        s.name for s in mka_compile.inspect(model, (ids,), capture="dynamo").sites
    ]


def test_non_hf_model_needs_example_inputs() -> None:
    with pytest.raises(ValueError, match="example_inputs is required for NanoGPT"):
        mka_compile.inspect(zoo.NanoGPT())


def test_not_a_module() -> None:
    with pytest.raises(ValueError, match="torch.nn.Module"):
        mka_compile.inspect(lambda x: x, (torch.zeros(1),))


def test_capture_failure_says_what_was_tried_and_what_to_do() -> None:
    model = zoo.NanoGPT()
    with pytest.raises(CaptureError, match=r"torch.export.export\(strict=False\) failed .* example_inputs"):
        mka_compile.inspect(model, (torch.zeros(2, 8),))  # float ids: the embedding refuses them
    with pytest.raises(CaptureError, match="torch.compile \\(dynamo\\) failed"):
        mka_compile.inspect(model, (torch.zeros(2, 8),), capture="dynamo")


def test_bad_example_inputs_type() -> None:
    with pytest.raises(ValueError, match="tuple of positional arguments or a dict"):
        mka_compile.inspect(zoo.NanoGPT(), 3)
