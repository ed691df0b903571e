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

import re
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
        """Values of ``nodes`` on the example inputs, running only the nodes they depend on."""
        want = [n for n in nodes if n.name not in self._values]
        if want:
            needed: set[fx.Node] = set()
            todo = list(want)
            while todo:
                n = todo.pop()
                if n not in needed:
                    needed.add(n)
                    todo.extend(n.all_input_nodes)
            interp = fx.Interpreter(self.gm)
            inputs = iter(self.inputs)
            with torch.no_grad():
                for n in self.gm.graph.nodes:
                    if n.op == "placeholder":
                        val = next(inputs, None)
                        if n in needed:
                            interp.env[n] = val
                    elif n in needed:
                        interp.env[n] = interp.run_node(n)
            for n in want:
                out = interp.env.get(n)
                self._values[n.name] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return {n: self._values.get(n.name) for n in nodes}


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that owns ``node`` ('' when it is at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\](\[\d+\])*\.?", "", path)  # dynamo: L['self'].h[0] / L['args'][0].model
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path).replace("L__self___", "")
    prefix = f"{_WRAP}."
    if path.startswith(prefix):
        path = path[len(prefix) :]
    elif path == _WRAP:
        path = ""
    return path


def capture(model: nn.Module, example_inputs: Any, method: str = "export") -> Captured:
    """Capture ``model`` called on ``example_inputs``.

    ``method="export"`` (default): ``torch.export`` non-strict, one aten-level graph.
    ``method="dynamo"``: ``torch.compile`` with a recording backend, torch-level graphs; graph breaks
    are allowed and the graphs are returned as one :class:`Captured` per graph by :func:`capture_all`.
    Raises :class:`CaptureError` naming the capture that was tried, why it failed, and what to do.
    """
    if method == "dynamo":
        graphs = capture_all(model, example_inputs, method)
        if len(graphs) != 1:
            raise CaptureError(f"dynamo produced {len(graphs)} graphs (graph breaks); use capture_all()")
        return graphs[0]
    if method != "export":
        raise ValueError(f"method must be 'export' or 'dynamo', got {method!r}")
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


def capture_all(model: nn.Module, example_inputs: Any, method: str = "export") -> list[Captured]:
    """Like :func:`capture`, returning every graph (dynamo splits a model at graph breaks)."""
    if method == "export":
        return [capture(model, example_inputs)]
    if method != "dynamo":
        raise ValueError(f"method must be 'export' or 'dynamo', got {method!r}")
    args, kwargs, _, _ = split_inputs(example_inputs)
    graphs: list[Captured] = []

    def record(gm: fx.GraphModule, inputs: list[Any]):
        holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for n, x in zip(holders, inputs):
            if isinstance(x, nn.Parameter) or "_parameters_" in n.name or "_buffers_" in n.name:
                n.meta["mka_param"] = True  # dynamo lifts weights to inputs; remember which are weights
        graphs.append(Captured(gm=gm, inputs=list(inputs), method="dynamo"))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=record, dynamic=False)(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(
            f"could not capture {type(model).__name__}: torch.compile (dynamo) failed with {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Pass example_inputs the forward accepts."
        ) from exc
    finally:
        torch._dynamo.reset()
    if not graphs:
        raise CaptureError(f"dynamo captured no graph of {type(model).__name__} (is its forward all Python?)")
    return graphs
