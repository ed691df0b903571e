from __future__ import annotations

import dataclasses

import pytest

from mka_compile import MKAConfig


def test_defaults() -> None:
    cfg = MKAConfig()
    assert cfg.levels == ("local", "session", "longterm")
    assert (cfg.ema_beta, cfg.chunk_size, cfg.top_r, cfg.router_hidden) == (0.9, 64, 8, None)
    assert cfg.num_levels == 3 and cfg.uses_session and cfg.uses_longterm


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        MKAConfig().ema_beta = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("levels", [("local", "session"), ("local", "longterm"), ["local", "session", "longterm"]])
def test_level_subsets(levels) -> None:
    assert MKAConfig(levels=levels).levels == tuple(levels)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("levels", ("session", "local")),
        ("levels", ("local",)),
        ("levels", ("local", "local")),
        ("levels", ("local", "bogus")),
        ("levels", "local"),
        ("ema_beta", 0.0),
        ("ema_beta", 1.0),
        ("ema_beta", 1.5),
        ("ema_beta", -0.1),
        ("chunk_size", 0),
        ("chunk_size", -4),
        ("chunk_size", 2.5),
        ("top_r", 0),
        ("top_r", True),
        ("router_hidden", 0),
        ("router_per_head", "yes"),
        ("gate_init", "zero"),
        ("recall_scale", -1.0),
        ("gate_init", float("nan")),
        ("gate_init", float("inf")),
        ("recall_scale", float("inf")),
        ("recall_scale", float("nan")),
        ("recall_scale", 0.0),
        ("causal", "yes"),
    ],
)
def test_invalid_values_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        MKAConfig(**{field: value})


def test_gate_init_defaults_by_use() -> None:
    assert MKAConfig().gate_init is None
    assert (MKAConfig().initial_gate(converting=True), MKAConfig().initial_gate(converting=False)) == (0.0, 1.0)
    assert MKAConfig(gate_init=0.7).initial_gate(converting=True) == 0.7


def test_bounded_settings_are_checked_only_when_bounded():
    from mka_compile import MKAConfig

    MKAConfig(chunk_size=3)  # sink_tokens (4) matters only with a window
    with pytest.raises(ValueError, match="sink_tokens"):
        MKAConfig(chunk_size=3, window=8)
    with pytest.raises(ValueError, match="window"):
        MKAConfig(window=0)
    with pytest.raises(ValueError, match="causal"):
        MKAConfig(window=8, causal=False)
    with pytest.raises(ValueError, match="longterm"):
        MKAConfig(window=8, levels=("local", "session"), chunk_keys="mean")
    MKAConfig(window=8, levels=("local", "session"))  # the bounds recall keeps its own chunk keys
    with pytest.raises(ValueError, match="chunk_keys"):
        MKAConfig(chunk_keys="max")
    assert MKAConfig(window=8, levels=("local", "session"), recall_chunks=0).exact_recall == 0
