"""Capture a model as a torch.fx graph (torch.export, non-strict) with values for numeric facts.

``capture(model, example_inputs)`` returns a :class:`Captured`: an aten-level ``GraphModule`` whose
``get_attr`` nodes are the model's parameters and buffers (so "is this a learned weight?" is a graph
question), node metadata ``val`` (fake tensors: shapes/dtypes) and ``nn_module_stack`` (the owning
module's dotted path), and a way to evaluate chosen nodes on the example inputs.

Only tensors become graph inputs: every other example argument (a cache object, flags) is bound as a
constant, so model outputs holding non-tensor objects (Hugging Face caches) are fine: the graph
returns the output's tensors only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

_WRAP = "_mka_wrapped"


class CaptureError(RuntimeError):
    """The model could not be captured as a graph; the message says what was tried and what to do."""


class _TensorArgs(nn.Module):
    """Calls ``model`` with the example arguments, taking only their tensors as positional inputs."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, slots: list[tuple[str, Any]]) -> None:
        super().__init__()
        setattr(self, _WRAP, model)
        self._args, self._kwargs, self._slots = args, kwargs, slots

    def forward(self, *tensors: torch.Tensor):
        args, kwargs = list(self._args), dict(self._kwargs)
        for (where, key), t in zip(self._slots, tensors):
            if where == "arg":
                args[key] = t
            else:
                kwargs[key] = t
        out = getattr(self, _WRAP)(*args, **kwargs)
        return tuple(_tensors_of(out))


def _tensors_of(obj: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple/list/dict, ``ModelOutput``), skipping cache objects."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors_of(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors_of(v)]
    return []


def split_inputs(example_inputs: Any) -> tuple[tuple, dict, list[tuple[str, Any]], list[torch.Tensor]]:
    """``(args, kwargs, slots, tensors)``: which top-level arguments are tensors (graph inputs)."""
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, (str, bytes)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        raise ValueError(
            "example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
            f"got {type(example_inputs).__name__}"
        )
    slots: list[tuple[str, Any]] = []
    tensors: list[torch.Tensor] = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            slots.append(("arg", i))
            tensors.append(a)
    for k, a in kwargs.items():
        if isinstance(a, torch.Tensor):
            slots.append(("kwarg", k))
            tensors.append(a)
    return args, kwargs, slots, tensors


@dataclass
class Captured:
    """A captured graph plus the inputs it was captured with."""

    gm: fx.GraphModule
    inputs: list[torch.Tensor]
    method: str
    _values: dict[str, Any] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def evaluate(self, nodes: Sequence[fx.Node]) -> dict[fx.Node, Any]:
        """Run the graph on the example inputs and return the values of ``nodes``."""
        want = {n.name for n in nodes} - set(self._values)
        if want:
            keep = self._values

            class _Rec(fx.Interpreter):
                def run_node(self, n: fx.Node) -> Any:
                    out = super().run_node(n)
                    if n.name in want:
                        keep[n.name] = out.detach().clone() if isinstance(out, torch.Tensor) else out
                    return out

            with torch.no_grad():
                _Rec(self.gm).run(*self.inputs)
        return {n: self._values.get(n.name) for n in nodes}


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that owns ``node`` ('' when it is at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = path.replace("L['self'].", "").replace("L__self___", "")
    prefix = f"{_WRAP}."
    if path.startswith(prefix):
        path = path[len(prefix) :]
    elif path == _WRAP:
        path = ""
    return path


def capture(model: nn.Module, example_inputs: Any) -> Captured:
    """Capture ``model`` called on ``example_inputs`` with ``torch.export`` (non-strict).

    Raises :class:`CaptureError` naming the capture that was tried, why it failed, and what to do.
    """
    args, kwargs, slots, tensors = split_inputs(example_inputs)
    wrapper = _TensorArgs(model, args, kwargs, slots)
    was_training = model.training
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, tuple(tensors), strict=False)
    except Exception as exc:  # noqa: BLE001 - report any capture failure with its reason
        raise CaptureError(
            f"could not capture {type(model).__name__}: torch.export.export(strict=False) failed with "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Pass example_inputs that the "
            "model's forward accepts (a tuple of positional arguments or a dict of keyword arguments), and make "
            "sure the forward runs on them in eager mode."
        ) from exc
    finally:
        model.train(was_training)
    gm = ep.module()
    return Captured(gm=gm, inputs=list(tensors), method="torch.export(strict=False)")
