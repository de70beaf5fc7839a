"""One way to derive a variant of a model: the same tree with some submodules replaced.

Every target, pass and quantiser that needs "the model, but with X" (its own KV cache form, sparse
FFNs, quantised linears, dequantised weights) calls `derive`. The variant shares every tensor and
module it does not replace with the source, and owns fresh KV caches, so running or tracing it
never writes into the source's buffers and the source stays the fp32 reference.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping

import torch
from torch import nn

from cpm_mobile.exporter.models.kv_cache import StaticKVCache
from cpm_mobile.exporter.models.linear_attention import LinearAttentionState
from cpm_mobile.exporter.models.transformer import CausalLM

# Called with (name, module) for every module of the source, parents before children; returns the
# replacement, or None to keep the module (its children are then visited in turn).
Replacer = Callable[[str, nn.Module], "nn.Module | None"]


def derive(model: CausalLM, replace: Replacer | Mapping[str, nn.Module] | None = None,
           caches: Callable[[StaticKVCache], nn.Module] | None = None,
           linear_states: Callable[[LinearAttentionState], nn.Module] | None = None) -> CausalLM:
    """A variant of `model` with submodules replaced and fresh KV caches.

    replace: a mapping of qualified module names ("layers.3.mlp") to replacements, or a function
        called on every module (see Replacer). Replaced subtrees are not descended into.
    caches: builds each layer's cache for the variant from the model's own (default: an empty
        StaticKVCache of the same shape, so the variant never shares cache state with the source).
    linear_states: the same for linear-attention layers' states (default: empty reference states).
    """
    if isinstance(replace, Mapping):
        table = dict(replace)
        replace_fn: Replacer = lambda name, module: table.pop(name, None)  # noqa: E731
    else:
        table = {}
        replace_fn = replace or (lambda name, module: None)
    variant = _rebuild(model, "", replace_fn)
    if table:
        raise KeyError(f"no module named {', '.join(sorted(table))} in the model")
    make_cache = caches or empty_like
    make_state = linear_states or empty_like
    variant.kv_caches = nn.ModuleList(make_state(cache) if isinstance(cache, LinearAttentionState)
                                      else make_cache(cache) for cache in model.kv_caches)
    variant.training = False
    return variant


def _rebuild(module: nn.Module, name: str, replace: Replacer) -> nn.Module:
    """The module itself where nothing below it is replaced; else a shallow copy with new children."""
    if name:
        replacement = replace(name, module)
        if replacement is not None:
            return replacement
    children = {
        child_name: _rebuild(child, f"{name}.{child_name}" if name else child_name, replace)
        if child is not None and child_name != "kv_caches" else child
        for child_name, child in module._modules.items()
    }
    if name and all(children[k] is module._modules[k] for k in children):
        return module
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = children
    return clone


def empty_like(cache: StaticKVCache | LinearAttentionState) -> StaticKVCache | LinearAttentionState:
    """An empty reference cache with the same heads, widths, length, scale and dtype (or an empty
    linear-attention state of the same shapes)."""
    if isinstance(cache, LinearAttentionState):
        return cache.empty_like()
    _, heads, max_seq_len, k_dim = cache.k_cache.shape
    return StaticKVCache(heads, k_dim, cache.v_cache.shape[-1], max_seq_len, cache.scale, cache.k_cache.dtype)


def with_weights(model: CausalLM, weights: Mapping[str, torch.Tensor],
                 caches: Callable[[StaticKVCache], nn.Module] | None = None) -> CausalLM:
    """A variant whose named parameters ("layers.0.mlp.up_proj.weight") hold the given tensors.

    For twins of quantised artifacts: the dequantised weights an artifact really stores, computed
    by the same eager module. Tied embeddings stay tied only if both names get the same tensor.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    by_owner: dict[str, dict[str, torch.Tensor]] = {}
    for qualified, tensor in weights.items():
        owner, _, attribute = qualified.rpartition(".")
        if owner not in modules or attribute not in modules[owner]._parameters:
            raise KeyError(f"no parameter named {qualified} in the model")
        by_owner.setdefault(owner, {})[attribute] = tensor

    def replace(name: str, module: nn.Module) -> nn.Module | None:
        if name not in by_owner:
            return None
        clone = copy.copy(module)
        clone._parameters = dict(module._parameters)
        # An owner with children (the sparse FFN's expert tables beside its router) has its
        # children's weights replaced too: derive does not descend below a replaced module.
        clone._modules = {child_name: _rebuild(child, f"{name}.{child_name}", replace) if child is not None else child
                          for child_name, child in module._modules.items()}
        for attribute, tensor in by_owner[name].items():
            old = module._parameters[attribute]
            if tensor.shape != old.shape:
                raise ValueError(f"{name}.{attribute}: shape {tuple(tensor.shape)} != {tuple(old.shape)}")
            clone._parameters[attribute] = nn.Parameter(tensor.to(old.dtype), requires_grad=False)
        return clone

    # A parameter of the root itself has no owner to replace.
    if "" in by_owner:
        raise KeyError(f"parameters of the model itself are not replaceable: {', '.join(by_owner[''])}")
    return derive(model, replace, caches)
