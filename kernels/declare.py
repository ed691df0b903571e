"""Declare an ``mka::`` op, its fake, its backward op and its autograd from one description.

Every op family registers the same pieces with ``torch.library``; :func:`declare` does it from the family's
reference (whose type hints are the op's one signature), its argument checks and its output shapes:

- ``mka::<op>`` (``torch.library.custom_op``, schema inferred from the reference's type hints by
  ``torch.library.infer_schema``): every device runs the checks, then the reference, and returns contiguous
  outputs (the fake promises them);
- its fake (``register_fake``): the same checks on the metadata, then the output shapes;
- with a :class:`Backward`, ``mka::<op>_backward``: its schema derived from the forward's (the gradients of
  the outputs, then the forward's arguments, unless the description names another order); every device runs
  the adjoint reference; the fake returns one new contiguous tensor like each input it differentiates;
- ``register_autograd`` joining the two: ``setup_context`` saves every tensor input (and the outputs the
  backward takes), ``backward`` makes the gradients contiguous, turns one that arrives as ``None`` into zeros
  (or passes it on as ``None`` where the backward takes ``Tensor?``; autograd usually hands zeros for an
  unused output already), calls ``mka::<op>_backward`` and returns its gradients at
  the positions of the inputs it differentiates, ``None`` at the others.

A family's Triton module then makes its launcher the CUDA implementation with :meth:`Op.implement_cuda`
(anything the kernels do not cover runs the CPU implementation). Only public ``torch.library`` API is used.

Example (``mka::session_scan``; the reference is typed, the backward adjoint takes the gradients of the
outputs ``sk, sv, state_k, state_v`` and then the op's arguments)::

    SESSION_SCAN = declare(
        "mka::session_scan",
        reference_session_scan,
        check=check_session_scan,
        fake=lambda k, v, valid, state_k, state_v, n_seen, beta: (new_like(k), new_like(v), ...),
        backward=Backward(
            reference_session_scan_backward,
            outputs=("sk", "sv", "state_k", "state_v"),
            wrt=("k", "v", "state_k", "state_v"),
        ),
    )
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._grads import contiguous_outputs, new_like

_TENSOR, _TENSORS, _VALUE = "tensor", "tensors", "value"  # how setup_context keeps an argument


@dataclass(frozen=True)
class Backward:
    """The adjoint of an op, declared as ``mka::<op>_backward``.

    ``reference``: computes the gradients of the inputs ``wrt`` (in that order; a ``list[Tensor]`` input gets a
    list) from the backward op's arguments. ``outputs``: a name for each output of the forward op, in order;
    the backward op takes ``grad_<name>`` for each. ``params``: the backward op's arguments by name, in order:
    ``grad_<output>``, a forward argument, or a forward output (then saved for the backward); default: every
    ``grad_<output>``, then every forward argument. ``optional_grads``: outputs whose gradient is passed on as
    ``None`` when it arrives as ``None`` (``Tensor?`` in the backward's schema); the others are passed as zeros.
    """

    reference: Callable
    outputs: tuple[str, ...]
    wrt: tuple[str, ...]
    params: tuple[str, ...] | None = None
    optional_grads: tuple[str, ...] = ()


class Op:
    """A declared ``mka::`` op: ``name`` (``"mka::<op>"``), its ``reference``, its ``signature`` (the schema's),
    its checks and, when it has one, its ``backward`` op (an :class:`Op` too). Calling it runs the CPU
    implementation. Every function the description names (reference, checks, fake, launchers) is called with
    all of the op's arguments, positionally, defaults filled in (the dispatcher leaves trailing defaults out)."""

    def __init__(
        self,
        name: str,
        reference: Callable,
        signature: inspect.Signature,
        check: Callable | None = None,
        check_values: Callable | None = None,
    ) -> None:
        self.name = name
        self.reference = reference
        self.signature = signature
        self.check = check
        self.check_values = check_values
        self.backward: Op | None = None

    def bind(self, *args, **kwargs) -> tuple:
        """The op's arguments as one positional tuple, defaults filled in."""
        if not kwargs and len(args) == len(self.signature.parameters):  # the common case, without inspect
            return args
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.args

    def __call__(self, *args, **kwargs):
        """The CPU implementation (the default of every device): the checks, the reference, contiguous outputs."""
        args = self.bind(*args, **kwargs)
        self.check_all(*args)
        return contiguous_outputs(self.reference(*args))

    def dispatch(self, *args):
        """``torch.ops.<namespace>.<op>(*args)``: through the dispatcher (autograd, the device's kernel)."""
        namespace, op = self.name.split("::")
        return getattr(getattr(torch.ops, namespace), op)(*args)

    def check_all(self, *args) -> None:
        """Run the argument checks (``check`` on the metadata, ``check_values`` on the data)."""
        if self.check is not None:
            self.check(*args)
        if self.check_values is not None:
            self.check_values(*args)

    def implement_cuda(
        self, launcher: Callable | None = None, *, supported: Callable[..., bool] | None = None, check: bool = True
    ):
        """Make ``launcher`` (called with the op's arguments) the CUDA implementation; usable as a decorator.

        ``supported(*args)`` False (dtypes, sizes the kernels do not cover): the CPU implementation runs instead.
        ``check``: run the op's checks before the launcher (False: the launcher checks its arguments itself).
        Returns the registered function (tests call it on CPU tensors, as the dispatcher would on CUDA ones)."""

        def register(launcher: Callable) -> Callable:
            def cuda(*args, **kwargs):
                args = self.bind(*args, **kwargs)
                if supported is not None and not supported(*args):
                    return self(*args)
                if check:
                    self.check_all(*args)
                return launcher(*args)

            cuda.__name__ = cuda.__qualname__ = f"{self.name.split('::')[-1]}_cuda"
            cuda.__doc__ = launcher.__doc__
            torch.library.register_kernel(self.name, "cuda", cuda)
            return cuda

        return register if launcher is None else register(launcher)


def declare(
    name: str,
    reference: Callable,
    *,
    fake: Callable,
    check: Callable | None = None,
    check_values: Callable | None = None,
    backward: Backward | None = None,
) -> Op:
    """Declare the op ``name`` (``"mka::<op>"``) and, with ``backward``, ``<name>_backward`` and the autograd.

    ``reference``: the implementation every device runs (unless a CUDA one is registered later); its type hints
    are the op's schema. ``fake(*args)``: the outputs' shapes and dtypes (new contiguous tensors).
    ``check(*args)``: argument checks on the metadata, run by every implementation and by the fake;
    ``check_values(*args)``: checks that read tensor data, run by the real implementations only.
    """
    plan = _BackwardPlan(name, reference, backward) if backward is not None else None  # raises before registering
    op = Op(name, reference, inspect.signature(reference), check, check_values)
    schema = torch.library.infer_schema(reference, mutates_args=())
    fwd = torch.library.custom_op(name, _named(op), mutates_args=(), schema=schema)

    def fake_impl(*args, **kwargs):
        args = op.bind(*args, **kwargs)
        if check is not None:
            check(*args)
        return fake(*args)

    fwd.register_fake(fake_impl)
    if plan is not None:
        op.backward = plan.declare(fwd)
    return op


class _BackwardPlan:
    """What :func:`declare` needs for ``<op>_backward``, worked out (and checked) before anything is registered."""

    def __init__(self, name: str, reference: Callable, spec: Backward) -> None:
        sig = inspect.signature(reference)
        hints = typing.get_type_hints(reference)
        self.name, self.spec = f"{name}_backward", spec
        self.inputs = list(sig.parameters)
        self.kinds = [_kind(hints[p]) for p in self.inputs]
        grads = {f"grad_{o}": o for o in spec.outputs}
        self.params = spec.params if spec.params is not None else (*grads, *self.inputs)
        self.saved_outputs = tuple(p for p in self.params if p in spec.outputs and p not in self.inputs)
        out_types = _output_types(hints["return"], len(spec.outputs), name)
        for p in self.params:
            if p not in grads and p not in self.inputs and p not in spec.outputs:
                raise ValueError(f"{name}: the backward argument {p!r} is no grad_<output>, input or output name")
        for w in spec.wrt:
            if w not in self.inputs:
                raise ValueError(f"{name}: the backward differentiates {w!r}, which is not an argument")

        def param(p: str) -> inspect.Parameter:
            if p in self.inputs:  # as in the forward: type and default
                return sig.parameters[p].replace(annotation=hints[p])
            if p in grads:
                ann = torch.Tensor | None if grads[p] in spec.optional_grads else torch.Tensor
            else:
                ann = out_types[spec.outputs.index(p)]
            return inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ann)

        returns = tuple(hints[w] for w in spec.wrt)

        def prototype(*args):  # carries the backward op's signature for infer_schema
            raise NotImplementedError

        self.signature = inspect.Signature(
            [param(p) for p in self.params], return_annotation=tuple[returns] if len(returns) > 1 else returns[0]
        )
        prototype.__signature__ = self.signature
        self.schema = torch.library.infer_schema(prototype, mutates_args=())

    def declare(self, fwd) -> Op:
        """Define ``<op>_backward`` and register the autograd of the forward op ``fwd``."""
        spec, params, names, kinds, saved_outputs = self.spec, self.params, self.inputs, self.kinds, self.saved_outputs
        bwd_op = Op(self.name, spec.reference, self.signature)
        bwd = torch.library.custom_op(self.name, _named(bwd_op), mutates_args=(), schema=self.schema)

        @bwd.register_fake
        def _(*args, **kwargs):
            named = dict(zip(params, bwd_op.bind(*args, **kwargs)))
            like = [
                [new_like(t) for t in named[w]] if isinstance(named[w], list) else new_like(named[w]) for w in spec.wrt
            ]
            return tuple(like) if len(like) > 1 else like[0]

        def setup_context(ctx, inputs, output):  # the names autograd passes them by
            outputs = output if isinstance(output, tuple) else (output,)
            saved, ctx.list_lengths, ctx.non_tensors = [], {}, {}
            for p, kind, x in zip(names, kinds, inputs):
                if kind == _TENSORS:
                    ctx.list_lengths[p] = len(x)
                    saved.extend(x)
                elif kind == _TENSOR:
                    saved.append(x)
                else:
                    ctx.non_tensors[p] = x
            saved.extend(outputs[spec.outputs.index(o)] for o in saved_outputs)
            ctx.save_for_backward(*saved)
            ctx.output_meta = [(o.shape, o.dtype, o.device) for o in outputs]  # for the zeros of missing gradients

        def backward(ctx, *out_grads):
            tensors = iter(ctx.saved_tensors)
            named = {}
            for p, kind in zip(names, kinds):
                if kind == _TENSORS:
                    named[p] = [next(tensors) for _ in range(ctx.list_lengths[p])]
                elif kind == _TENSOR:
                    named[p] = next(tensors)
                else:
                    named[p] = ctx.non_tensors[p]
            named.update((o, next(tensors)) for o in saved_outputs)
            for o, g, (shape, dtype, device) in zip(spec.outputs, out_grads, ctx.output_meta):
                if g is not None:
                    g = g.contiguous()
                elif o not in spec.optional_grads:
                    g = torch.zeros(shape, dtype=dtype, device=device)
                named[f"grad_{o}"] = g
            result = bwd_op.dispatch(*(named[p] for p in params))
            result = dict(zip(spec.wrt, result if len(spec.wrt) > 1 else (result,)))
            return tuple(
                (list(result[p]) if kind == _TENSORS else result[p]) if p in result else None
                for p, kind in zip(names, kinds)
            )

        fwd.register_autograd(backward, setup_context=setup_context)
        return bwd_op


def _named(op: Op) -> Callable:
    """``op``'s CPU implementation as a function named after the op (torch names it in its messages)."""

    def impl(*args, **kwargs):
        return op(*args, **kwargs)

    impl.__name__ = impl.__qualname__ = op.name.split("::")[-1]
    impl.__doc__ = op.reference.__doc__
    return impl


def _kind(annotation) -> str:
    """``_TENSOR`` for ``Tensor`` and ``Tensor | None``, ``_TENSORS`` for ``list[Tensor]``, else ``_VALUE``."""
    if annotation is torch.Tensor:
        return _TENSOR
    if torch.Tensor in typing.get_args(annotation):
        return _TENSORS if typing.get_origin(annotation) is list else _TENSOR
    return _VALUE


def _output_types(annotation, n: int, name: str) -> Sequence:
    """The type of each of the ``n`` outputs from the reference's return annotation."""
    types = typing.get_args(annotation) if typing.get_origin(annotation) is tuple else (annotation,)
    if len(types) != n:
        raise ValueError(f"{name}: the reference returns {len(types)} outputs but the backward names {n}")
    return types
