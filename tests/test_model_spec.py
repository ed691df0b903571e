"""mka_compile.model_spec: tiny:<family>, file.py:factory, module:factory, HF config folders; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mka_compile.model_spec import SpecError, load_model


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gpt_neox"])
def test_tiny_families(family: str) -> None:
    loaded = load_model(f"tiny:{family}")
    assert loaded.hf and loaded.example_inputs is None and not loaded.model.training
    assert loaded.model.config.vocab_size == 256 and loaded.model.config.num_hidden_layers == 2
    assert loaded.model(torch.randint(0, 256, (1, 5))).logits.shape == (1, 5, 256)


def test_factory_file_and_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "mymodels.py"
    src.write_text(
        "import torch\n"
        "def make():\n"
        "    '''A linear layer.'''\n"
        "    return torch.nn.Linear(4, 4), (torch.randn(2, 4),)\n"
        "def bare():\n"
        "    return torch.nn.Linear(4, 4)\n"
        "def wrong():\n"
        "    return 3\n"
    )
    loaded = load_model(f"{src}:make")
    assert isinstance(loaded.model, torch.nn.Linear) and loaded.example_inputs[0].shape == (2, 4)
    assert "A linear layer" in loaded.description
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(load_model("mymodels:make").model, torch.nn.Linear)
    with pytest.raises(SpecError, match="must return \\(module, example_inputs\\)"):
        load_model("mymodels:bare")
    with pytest.raises(SpecError, match="must return an nn.Module"):
        load_model("mymodels:wrong")
    with pytest.raises(SpecError, match="no callable 'nothere'"):
        load_model("mymodels:nothere")
    with pytest.raises(SpecError, match="does not exist"):
        load_model(f"{tmp_path / 'missing.py'}:make")


def test_hf_config_folder_and_errors(tmp_path: Path) -> None:
    import transformers as tf

    tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model).__name__ == "GPT2LMHeadModel" and loaded.model.config.n_embd == 32
    assert type(load_model(str(tmp_path / "config.json")).model).__name__ == "GPT2LMHeadModel"
    with pytest.raises(SpecError, match="tiny:nosuchfamily"):
        load_model("tiny:nosuchfamily")
    with pytest.raises(SpecError, match="local folder with config.json"):
        load_model(str(tmp_path / "no_such_folder"))
    with pytest.raises(SpecError, match="empty"):
        load_model("")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("model.py:", r"'model.py:'.*no factory name after ':'.*file.py:factory"),
        ("pkg.mod:", r"'pkg.mod:'.*no factory name after ':'"),
        ("model.py:1x", r"'1x' is not a Python name"),
        ("nonexistent.py:make", r"file nonexistent.py does not exist"),
        ("a.py:b:c", r"one ':'"),
    ],
)
def test_malformed_factory_specs_get_a_spec_error(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as err:
        load_model(spec)
    assert "Hugging Face" not in str(err.value)
