"""How a converted site is attached: its module becomes an instance of a converted-site class, and module hooks
connect it to its :class:`~mka_compile.sites.memory.SiteMemory`.

The converted-site class (:func:`site_class`) is a subclass of the site's own class with nothing overridden but
pickling: the model's classes are untouched, and the instance keeps its name, ``isinstance`` checks and forward. It
makes a converted site *different code* from the original for torch.compile: Dynamo guards on the type of a module
it inlines, but not on its hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so without it code compiled
for the original class would run on a converted one.

Hooks are small callable objects rather than closures so that ``copy.deepcopy(model)`` gives the copy hooks that
point at the copy's own memory, projections and interceptor (deepcopy copies objects, not closures), and so
that a converted model pickles.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from mka_compile.hf import cache as hf_cache
from mka_compile.sites.inputs import is_cache, real_eager


class SiteHook:
    def __init__(self, mem) -> None:
        self.mem = mem


class SitePre(SiteHook):
    """Before the site's forward: which tokens are real, which cache (MKA state) this call uses, RoPE tables; then
    the site's attention interceptor (``mem.intercept``, MKA mode outside ``AttentionInterface``) is entered."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        cache = next((v for v in list(args[1:]) + list(kwargs.values()) if is_cache(v)), None)
        position = kwargs.get("cache_position")
        layer = _layer_index(module)
        if position is None and cache is not None and layer is not None:  # tokens cached for this layer, before update
            past = cache.get_seq_length(layer)
            past = int(past) if isinstance(past, torch.Tensor) else past  # a SymInt stays symbolic (export)
            position = torch.arange(past, past + hidden.shape[1], device=hidden.device)
        if not torch.compiler.is_compiling():
            if module._modules.get("mka") is not self.mem:
                raise RuntimeError(
                    f"the converted site {type(module).__name__} no longer holds its MKA memory as .mka (replaced by "
                    f"{type(module._modules.get('mka')).__name__}: PEFT's modules_to_save?). Keep .mka in place; to "
                    "train the router and gate beside adapters, set requires_grad on "
                    "mka_compile.memory_parameters(model)"
                )
            follow_projections(module, self.mem)
        start = None
        if cache is None and self.mem.position_arg is not None:
            start = _argument(module, self.mem.position_arg, args, kwargs)
        self.mem.begin(
            hidden, kwargs.get("attention_mask"), cache, position, kwargs.get("position_embeddings"), start,
            kwargs.get("position_ids"),
        )  # fmt: skip
        if self.mem.intercept is not None:
            self.mem.intercept.__enter__()


class CacheAdopter:
    """A pre-hook on the converted model (its root): the caches of a call become MKA caches (``hf.cache``) before any
    site runs, so that the sites find them adopted also in compiled code (where a class cannot change; there the
    adoption is one call outside the graph, only for a cache not adopted yet)."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for v in (*args, *kwargs.values()):
            if is_cache(v) and not isinstance(v, hf_cache._MKAStateOps):
                hf_cache.adopt_outside_graph(v) if torch.compiler.is_compiling() else hf_cache.adopt(v)


def install_root(model: nn.Module) -> None:
    """Register the :class:`CacheAdopter` on the converted model (once)."""
    if not any(isinstance(h, CacheAdopter) for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(CacheAdopter(), with_kwargs=True, prepend=True)


def remove_root(model: nn.Module) -> None:
    for key in [k for k, h in model._forward_pre_hooks.items() if isinstance(h, CacheAdopter)]:
        del model._forward_pre_hooks[key]
        getattr(model, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)


class SitePost(SiteHook):
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.mem.intercept is not None and self.mem._call is not None:
            self.mem.intercept.__exit__(None, None, None)
        self.mem.end()


class FusedHook(SiteHook):
    def __init__(self, mem, maps: dict[str, torch.Tensor]) -> None:
        super().__init__(mem)
        self.maps = maps

    def __call__(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        return self.mem.mix_fused(out, self.maps)


class QHook(SiteHook):
    def __call__(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        call = self.mem._call
        if call is not None and not call.inner:
            call.q = out


class KVPre(SiteHook):
    """Before a k/v projection whose output the other projection's hook already computed (``SiteMemory.on_kv``):
    when the projection is a plain ``nn.Linear`` called on that same input tensor in eager mode, it runs on zero
    tokens instead (its result is replaced by the stored one in :class:`KVHook`), so the projection is not
    computed twice. Anything else (other module types, other inputs, tracing, compiling) runs as usual."""

    def __init__(self, mem, which: str) -> None:
        super().__init__(mem)
        self.which = which

    def __call__(self, module: nn.Module, inputs: tuple) -> tuple | None:
        call = self.mem._call
        if call is None or self.which not in call.pending or not inputs:
            return None
        x = inputs[0]
        if x is not call.kv_input or type(module).forward is not nn.Linear.forward or x.dim() < 2:
            return None
        if type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None
        if getattr(torch.compiler, "is_exporting", lambda: False)():
            return None
        return (x[..., :0, :], *inputs[1:])


class KVHook(SiteHook):
    def __init__(self, mem, which: str, q_mod: nn.Module, other: nn.Module) -> None:
        super().__init__(mem)
        self.which, self.q_mod, self.other = which, q_mod, other

    def __call__(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        return self.mem.on_kv(self.which, out, self.q_mod, self.other, inputs[0])


_SITE_CLASSES: dict[type, type] = {}


def site_class(base: type) -> type:
    """The converted-site class for modules of class ``base`` (made once per class)."""
    if getattr(base, "_mka_site_base", None) is not None:
        return base
    cls = _SITE_CLASSES.get(base)
    if cls is None:
        attrs = {"__module__": base.__module__, "__qualname__": base.__qualname__, "_mka_site_base": base}
        attrs["__reduce_ex__"] = _reduce_site
        cls = _SITE_CLASSES[base] = type(base.__name__, (base,), attrs)
    return cls


def _reduce_site(self: nn.Module, protocol: int):
    return _rebuild_site, (type(self)._mka_site_base,), self.__getstate__()


def _rebuild_site(base: type) -> nn.Module:
    """Unpickle a converted site: an instance of ``base``'s converted-site class (state set by ``__setstate__``)."""
    return base.__new__(site_class(base))


def plain_linear(mod: nn.Module, x: Any) -> bool:
    """``mod`` is an ``nn.Linear`` whose only hooks are a site's, called eagerly on a real tensor."""
    if type(mod) is not nn.Linear or not real_eager(x):
        return False
    return all(isinstance(h, SiteHook) for h in [*mod._forward_pre_hooks.values(), *mod._forward_hooks.values()])


def _layer_index(module: nn.Module) -> int | None:
    """The index under which the site writes its cache layer (``layer_idx``; GPT-Neo's ``layer_id``), or None: then
    the call's positions are not read from the cache (another layer's length may already include this step: a 4-D mask
    is then read bottom-right, its queries being the last keys)."""
    for name in ("layer_idx", "layer_id"):
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


POSITION_NAMES = ("start_pos", "input_pos", "cache_position", "start", "pos", "position", "offset", "past_length")


@functools.cache
def _signature(forward) -> inspect.Signature:
    """The signature of a module class's ``forward`` (self first), read once per class."""
    return inspect.signature(forward)


def position_argument(module: nn.Module) -> str | None:
    """The forward argument that tells a site with its own KV cache where this call writes (Meta Llama's
    ``start_pos``): a parameter with one of the usual names, else the only one with an int default or annotation."""
    params = list(_signature(type(module).forward).parameters.values())[2:]  # after self and the hidden states
    named = [p.name for p in params if p.name in POSITION_NAMES]
    if named:
        return min(named, key=POSITION_NAMES.index)
    ints = [p.name for p in params if p.annotation in (int, "int") or type(p.default) is int]
    return ints[0] if len(ints) == 1 else None


def _argument(module: nn.Module, name: str, args: tuple, kwargs: dict) -> int | None:
    sig = _signature(type(module).forward)
    value = sig.bind_partial(module, *args, **kwargs).arguments.get(name, sig.parameters[name].default)
    if value is None or value is inspect.Parameter.empty:  # no position given (e.g. a call without a cache)
        return None
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1)[0] if value.numel() else 0
    return int(value)


def install(owner: nn.Module, mem, mods: tuple[nn.Module, ...], maps) -> None:
    """Make ``owner`` (the attention module) a converted site and register the hooks on it and its projections
    ``mods``."""
    owner.__class__ = site_class(type(owner))
    owner.register_forward_pre_hook(SitePre(mem), with_kwargs=True)
    owner.register_forward_hook(SitePost(mem), with_kwargs=True, always_call=True)
    names = {id(m): n for n, m in owner.named_modules(remove_duplicate=False)}
    mem.proj_paths = tuple(names.get(id(m)) for m in mods)  # where the site finds them: see follow_projections
    mem.proj_maps = maps
    _install_projections(mem, mods, maps)
    mem.hooked = [owner, *mods]


def follow_projections(owner: nn.Module, mem) -> None:
    """Keep the projection hooks on the modules the site calls. A wrapper put in a projection's place after
    conversion (PEFT's LoRA layers, which call the original as their ``base_layer`` and add their update) takes the
    hooks, so the memory mixes what the site really projects; when it goes (``merge_and_unload``) they come back."""
    paths = getattr(mem, "proj_paths", ())
    if not paths or None in paths:
        return
    current = tuple(owner.get_submodule(p) for p in paths)
    if all(c is m for c, m in zip(current, mem.hooked[1:])):
        return
    _remove_from(mem.hooked[1:], mem)
    _install_projections(mem, current, mem.proj_maps)
    mem.hooked = [owner, *current]


def _install_projections(mem, mods: tuple[nn.Module, ...], maps) -> None:
    if maps is not None:
        mods[0].register_forward_hook(FusedHook(mem, maps))
    else:
        q_mod, k_mod, v_mod = mods
        q_mod.register_forward_hook(QHook(mem))
        k_mod.register_forward_hook(KVHook(mem, "k", q_mod, v_mod))
        v_mod.register_forward_hook(KVHook(mem, "v", q_mod, k_mod))
        k_mod.register_forward_pre_hook(KVPre(mem, "k"))
        v_mod.register_forward_pre_hook(KVPre(mem, "v"))


def remove(mem) -> None:
    """Remove every hook of ``mem`` from the modules it was installed on (works on deep copies too); the site's module
    gets its own class back."""
    _remove_from(getattr(mem, "hooked", []), mem)
    if mem.hooked:
        owner = mem.hooked[0]
        owner.__class__ = getattr(type(owner), "_mka_site_base", None) or type(owner)
    mem.hooked = []


def _remove_from(modules: list[nn.Module], mem) -> None:
    for m in modules:
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, SiteHook) and h.mem is mem]:
                del hooks[key]
                for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs"):
                    getattr(m, extra, {}).pop(key, None)
                getattr(m, "_forward_hooks_always_called", {}).pop(key, None)
