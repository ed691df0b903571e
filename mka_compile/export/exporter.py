"""``export_onnx``: a (converted) model to an ONNX file whose ``mka::`` ops are ``com.mka`` nodes.

Route: ``torch.export`` captures the model (``mka::`` custom ops stay single nodes); every ``mka::`` node is
checked to have an ONNX translation (an error names the op and the site otherwise); ``torch.onnx.export``
turns each into ONE ``com.mka`` node (:mod:`.translation`); the model-local functions that define those
nodes with standard ONNX ops (:mod:`.memory_functions`, :mod:`.attention_functions`) are added, so stock ONNX
Runtime runs the file and ``onnx.checker`` passes.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch
from torch import nn

from .attention_functions import FUNCTIONS as ATTENTION_FUNCTIONS
from .builder import OPSET
from .decode_step import DecodeStep, converted_sites, example_step
from .memory_functions import FUNCTIONS as MEMORY_FUNCTIONS
from .schemas import DOMAIN, VERSION, register_schemas

if TYPE_CHECKING:
    from onnxscript import ir

FUNCTIONS = {**MEMORY_FUNCTIONS, **ATTENTION_FUNCTIONS}


class ExportError(ValueError):
    """The model cannot be exported; the message names the op and the site, and what to do."""


def _site_of(node: torch.fx.Node, sites: list[str], prefix: str) -> str:
    """The converted site (else the innermost module) whose forward made ``node``; paths as in the user's model
    (``prefix``: where the export wrapper holds it)."""
    stack = [path.removeprefix(prefix) for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    stack = [p for p in stack if p and p != prefix.rstrip(".")]
    for path in reversed(stack):
        for site in sites:
            if path == site or path.startswith(site + "."):
                return site
    return stack[-1] if stack else "<model>"


def check_ops(ep: torch.export.ExportedProgram, sites: list[str], prefix: str = "") -> None:
    """Raise :class:`ExportError` for every ``mka::`` call that has no ONNX translation."""
    from .translation import TABLE  # onnxscript is imported on first use (it takes about a second)

    translated = {t.name() for t in TABLE}  # by name: OpOverload objects are not reliable dictionary keys
    problems = []
    for node in ep.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace != "mka":
            continue
        where = _site_of(node, sites, prefix)
        if target.name() not in translated:
            problems.append(f"cannot export op mka::{target._opname} at site {where}: it has no ONNX function")
        elif target._opname == "recall_select" and len(node.args) > 5 and node.args[5] is not None:
            problems.append(
                f"cannot export op mka::recall_select at site {where}: recall from an external memory bank has "
                "no ONNX function yet (export without memory_bank)"
            )
    if problems:
        raise ExportError("; ".join(dict.fromkeys(problems)))


def _add_functions(model: ir.Model) -> list[str]:
    """Add the model-local function of every ``com.mka`` node type in ``model``; returns the types."""
    from onnxscript import ir

    used = sorted({n.op_type for n in model.graph.all_nodes() if n.domain == DOMAIN})
    for name in used:
        fn = ir.serde.deserialize_function(FUNCTIONS[name]())
        model.functions[fn.identifier()] = fn
    if used:
        model.opset_imports[DOMAIN] = VERSION
    return used


def _name_dims(model: ir.Model, axes: dict[str, list[str | None]]) -> None:
    """Readable input/output axes: the exporter's symbols (``s14``, ``s15 + s70``) get the names in ``axes``
    (``{input: [axis names or None]}``); axes it named with a number (a specialised size) become static."""
    from onnxscript import ir

    names: dict[str, str] = {}
    for v in model.graph.inputs:
        for d, new in zip(v.shape or (), axes.get(v.name, ())):
            if new and isinstance(d, ir.SymbolicDim) and d.value and str(d.value) not in names:
                names[str(d.value)] = new
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None
    for v in list(model.graph.inputs) + list(model.graph.outputs):
        if v.shape is None:
            continue
        dims = []
        for d in v.shape:
            if isinstance(d, ir.SymbolicDim) and d.value is not None:
                text = str(d.value)
                d = int(text) if text.isdigit() else pattern.sub(lambda m: names[m.group(1)], text) if pattern else text
            dims.append(d)
        v.shape = ir.Shape(dims)


@contextlib.contextmanager
def _fixed_slots(sites: dict[str, Any], slots: dict[str, int]) -> Iterator[None]:
    """Sites make states with ``slots[site]`` fixed summary slots while the model is captured."""
    old = {name: m.fixed_slots for name, m in sites.items()}
    for name, m in sites.items():
        m.fixed_slots = slots[name]
    try:
        yield
    finally:
        for name, m in sites.items():
            m.fixed_slots = old[name]


class _Flat(nn.Module):
    """Calls ``model`` with its example structure rebuilt from a flat list of tensors (so every tensor is an
    input with a name and a dynamic-shape spec); returns the logits of a Hugging Face output."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.model = model
        self.args, self.kwargs = args, kwargs
        self.slots = [("a", i) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self.slots += [("k", k) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]

    def names(self) -> list[str]:
        return [f"input_{i}" if kind == "a" else str(i) for kind, i in self.slots]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The example tensors, copied: torch.export guards on a view's base, which breaks the ONNX export."""
        return tuple((self.args[i] if kind == "a" else self.kwargs[i]).clone() for kind, i in self.slots)

    def forward(self, *tensors: torch.Tensor):
        args, kwargs = list(self.args), dict(self.kwargs)
        for (kind, i), t in zip(self.slots, tensors):
            if kind == "a":
                args[i] = t
            else:
                kwargs[i] = t
        out = self.model(*args, **kwargs)
        return out.logits if hasattr(out, "logits") else out


def _is_hf(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "use_cache")


def _split_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = {"input_ids": example_inputs} if _is_hf(model) else (example_inputs,)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise ExportError(
            f"example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword arguments, got "
            f"{type(example_inputs).__name__}"
        )
    if _is_hf(model):
        kwargs.setdefault("use_cache", False)  # the full forward: logits only, MKA state from scratch
    return args, kwargs


def _max_len(model: nn.Module, max_len: int | None, sites: dict[str, Any]) -> int | None:
    if max_len is None:
        cfg = getattr(model, "config", None)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        max_len = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    needs_slots = any(m.config.uses_longterm for m in sites.values())
    if needs_slots and max_len is None:
        raise ExportError(
            "the converted model keeps long-term chunk summaries; pass max_len (the most tokens a sequence will "
            "hold) so the summary buffer gets max_len // chunk_size fixed slots"
        )
    if max_len is None:
        return None
    if not isinstance(max_len, int) or max_len < 1:
        raise ExportError(f"max_len must be a positive int, got {max_len!r}")
    for name, m in sites.items():
        if m.config.uses_longterm and max_len < m.config.chunk_size:
            raise ExportError(f"max_len {max_len} is below the chunk size {m.config.chunk_size} of site {name}")
    return max_len


def _auto(module: nn.Module, args: tuple) -> dict[str, Any]:
    """Every axis ``Dim.AUTO``, keyed like ``module.forward``'s parameters (a ``*args`` one takes the rest);
    ``args``: tensors and lists of tensors."""

    def spec(x):
        return [spec(t) for t in x] if isinstance(x, list) else {a: torch.export.Dim.AUTO for a in range(x.dim())}

    out: dict[str, Any] = {}
    for i, (name, p) in enumerate(inspect.signature(module.forward).parameters.items()):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(a) for a in args[i:])
            break
        out[name] = spec(args[i])
    return out


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    decode_step: bool = False,
    max_len: int | None = None,
    dynamic: bool = True,
    optimize: bool = True,
    check: bool = True,
) -> Path:
    """Export ``model`` (converted by :func:`mka_compile.convert` or not) to the ONNX file ``path``.

    ``example_inputs``: a tensor (``input_ids`` for Hugging Face models), a tuple of positional arguments or a
    dict of keyword arguments. By default the file is the full forward (Hugging Face models: ``logits`` from
    ``input_ids`` and the other example inputs, ``use_cache=False``). ``decode_step=True`` (Hugging Face causal
    LMs) exports one cached call instead: past K/V and the MKA state in, logits and both updated out (see
    :mod:`mka_compile.export.decode_step`; :class:`mka_compile.export.OnnxDecoder` drives it).

    ``max_len``: the most tokens a sequence will hold (default: the model config's ``max_position_embeddings``);
    long-term summaries get ``max_len // chunk_size`` fixed slots. ``dynamic``: batch and sequence sizes stay
    symbolic where the model allows (``torch.export.Dim.AUTO``; an example batch of 1 is fixed at 1).
    ``optimize``: run the ONNX exporter's graph optimizer (constant folding, fusions; about a third of the export
    time). ``check``: run ``onnx.checker.check_model(full_check=True)`` on the file.

    Every ``mka::`` op becomes one ``com.mka`` node defined by a model-local function of standard ONNX ops.
    Raises :class:`ExportError` naming the op and the site for an op that cannot be exported.
    """
    from . import translation

    register_schemas()
    path = _writable(Path(path))
    sites = converted_sites(model)
    bounded = [name for name, m in sites.items() if m.config.bounded]
    if bounded:
        _check_bounded(model, sites, bounded, decode_step)
    max_len = _max_len(model, max_len, sites)
    slots = {name: max_len // m.config.chunk_size if max_len else 0 for name, m in sites.items()}
    was_training = model.training
    model.eval()
    try:
        with _fixed_slots(sites, slots), torch.no_grad():
            if decode_step:
                wrapper, tensors = _decode_wrapper(model, example_inputs)
                names, outputs = wrapper.input_names(), wrapper.output_names()
            else:
                args, kwargs = _split_inputs(model, example_inputs)
                wrapper = _Flat(model, args, kwargs)
                tensors, names = wrapper.tensors(), wrapper.names()
                outputs = ["logits"] if _is_hf(model) else None
            if not dynamic:
                shapes = None
            elif decode_step:
                shapes = _decode_shapes(wrapper, tensors)
            else:
                shapes = _auto(wrapper, tensors)
            ep = torch.export.export(wrapper, tensors, dynamic_shapes=shapes, strict=False)
        check_ops(ep, list(sites), prefix="model.")
        program = torch.onnx.export(
            ep,
            input_names=names,
            output_names=outputs,
            opset_version=OPSET,
            custom_translation_table=translation.TABLE,
            dynamo=True,
            optimize=optimize,
            verbose=False,
        )
    finally:
        model.train(was_training)
    used = _add_functions(program.model)
    if decode_step:
        axes = {"input_ids": ["batch", "new_tokens"], "attention_mask": ["batch", "total"]}
        axes.update({n: ["batch", None, "past"] for n in names if n.startswith("past.")})
    else:
        axes = {n: ["batch", "sequence"] for n in names if n in ("input_ids", "attention_mask")}
    _name_dims(program.model, axes)
    meta = program.model.metadata_props
    meta["mka.sites"] = ",".join(sites)
    meta["mka.modes"] = ",".join(m.mode for m in sites.values())
    meta["mka.max_len"] = "" if max_len is None else str(max_len)
    meta["mka.com_mka_ops"] = ",".join(used)
    meta["mka.decode_step"] = str(int(decode_step))
    meta["mka.bounded"] = str(int(bool(bounded)))
    program.save(path)
    if check:
        onnx.checker.check_model(str(path), full_check=True)
    return path


def _writable(path: Path) -> Path:
    """``path`` if the file can be written there (missing folders are made), checked before the export runs."""
    why = None
    if path.is_dir():
        why = "it is a folder (give a file name, e.g. model.onnx)"
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = f"its folder cannot be made ({exc.strerror or exc})"
        else:
            if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
                why = "no write permission"
    if why:
        raise ExportError(f"cannot write the ONNX file {str(path)!r}: {why}; choose another path")
    return path


def _check_bounded(model: nn.Module, sites: dict, bounded: list[str], decode_step: bool) -> None:
    """Bounded memory exports as a fixed-size decode step (:mod:`mka_compile.bounded_fixed`): FastMKA, every
    layer converted, ``decode_step=True``."""
    why = None
    if not decode_step:
        why = "it exports as a fixed-size decode step only: pass decode_step=True (one token per row and call)"
    elif any(m.mode != "fastmka" for m in sites.values()):
        why = "its fixed-size decode step is built for FastMKA; MKA mode with window= runs in PyTorch"
    elif len(bounded) != len(sites) or len(sites) != getattr(getattr(model, "config", None), "num_hidden_layers", 0):
        why = "its fixed-size decode step needs every layer converted with window= (this model is partly converted)"
    if why:
        raise ValueError(f"export_onnx of bounded memory (window=...) at sites {bounded[:3]}: {why}")


def _decode_shapes(step: DecodeStep, args: tuple) -> dict[str, Any]:
    """Batch, new-token and past lengths symbolic; every other axis (heads, head size, slots) static. Bounded memory:
    one new token per row, no past."""
    from .decode_step import is_bounded

    Dim = torch.export.Dim
    B, T, P = Dim("batch"), Dim("new_tokens"), Dim("past")
    if is_bounded(step.sites):
        state = [{0: B}] * len(args[3])
        return {"input_ids": {0: B}, "attention_mask": {0: B, 1: Dim.AUTO}, "past": [], "state": state}
    state = []
    for mem in step.sites.values():
        state += [{0: B}] * 7 + ([{0: B, 2: P}] * 2 if mem.mode == "mka" else [])
    return {
        "input_ids": {0: B, 1: T},
        "attention_mask": {0: B, 1: Dim.AUTO},
        "past": [{0: B, 2: P}] * len(args[2]),
        "state": state,
    }


def _decode_wrapper(model: nn.Module, example_inputs: Any) -> tuple[DecodeStep, tuple]:
    if not _is_hf(model):
        raise ExportError("decode_step=True needs a Hugging Face causal LM (one that takes past_key_values)")
    ids = example_inputs.get("input_ids") if isinstance(example_inputs, dict) else example_inputs
    if isinstance(ids, (tuple, list)):
        ids = ids[0]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ExportError("decode_step=True needs example input_ids of shape [B, T] (a tensor or {'input_ids': ...})")
    if ids.shape[0] < 2:  # a batch of one would be fixed at one
        ids = ids.expand(2, -1)
    while ids.shape[1] < 4:  # two past positions and two new ones keep both lengths symbolic
        ids = torch.cat([ids, ids], 1)
    num_layers, tensors = example_step(model, ids)
    return DecodeStep(model, num_layers), tensors
