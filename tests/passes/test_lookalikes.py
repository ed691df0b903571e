"""Softmaxes that are not attention are not sites, and each is explained."""

from __future__ import annotations

import pytest
import torch
import zoo

import mka_compile

X = torch.randn(2, 6, 16)
CASES = [
    (zoo.MoERouter(), (X,), "attention.eager.matmul", "but found linear"),
    (zoo.FeatureSoftmax(), (X,), "attention.eager.matmul", "normalises axis -2, not the key axis"),
    (zoo.AttentionPooling(), (X,), "attention.eager.matmul", "the query is a learned parameter"),
    (zoo.ForeignValues(), (X, torch.randn(2, 6, 16)), "attention.eager.matmul", "the values are a model input"),
    (zoo.ClassifierHead(), (X,), None, "not multiplied with values"),
]


@pytest.mark.parametrize(("model", "inputs", "rule", "reason"), CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_lookalike_is_explained(model, inputs, rule, reason) -> None:
    report = mka_compile.inspect(model.eval(), inputs)
    assert report.sites == []
    assert len(report.not_attention) == 1
    why = report.not_attention[0]
    assert why.closest_rule == rule
    assert reason in why.reason, why.reason
    assert why.reason in str(report)
