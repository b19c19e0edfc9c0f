"""Running a model with heads ablated: per-head replacements of a layer's z before its output
projection, and starting a forward pass at a layer from a stored residual."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

from headscope.analysis.inputs import InputError, parse_heads
from headscope.model import ModelAdapter
from headscope.model.spec import head_name


def _out_proj(adapter: ModelAdapter, layer: int) -> torch.nn.Module:
    return getattr(adapter.attn(layer), adapter.spec.layout.out)


def _z_hook(
    adapter: ModelAdapter, layer: int, fn: Callable[[Tensor], Tensor | None]
) -> torch.utils.hooks.RemovableHandle:
    """A pre-hook on ``layer``'s output projection calling ``fn(z [N, T, H, D])``; a returned
    tensor replaces z. Every supported family feeds W_O the heads' outputs concatenated."""
    H, D = adapter.spec.n_heads, adapter.spec.d_head

    def hook(_mod: Any, args: tuple) -> tuple | None:
        x = args[0]  # [N, T, H*D]
        new = fn(x.reshape(*x.shape[:-1], H, D))
        return None if new is None else (new.reshape(x.shape), *args[1:])

    return _out_proj(adapter, layer).register_forward_pre_hook(hook)


def _identity_layer(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return hidden_states


@contextmanager
def _start_at(adapter: ModelAdapter, layer: int, resid: Tensor) -> Iterator[None]:
    """Inside the block the model skips layers ``0..layer-1`` and feeds ``resid [N, T, d]`` to
    ``layer`` (transformers 5 decoder layers take and return the hidden-states tensor)."""
    skipped = [adapter.layer(i) for i in range(layer)]
    saved = [m.__dict__.get("forward") for m in skipped]

    def pre(_mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (resid, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": resid}

    handle = adapter.layer(layer).register_forward_pre_hook(pre, with_kwargs=True)
    for m in skipped:
        setattr(m, "forward", _identity_layer)  # noqa: B010  (an instance attribute shadows the method)
    try:
        yield
    finally:
        handle.remove()
        for m, fwd in zip(skipped, saved, strict=True):
            if fwd is None:
                delattr(m, "forward")
            else:
                setattr(m, "forward", fwd)  # noqa: B010


def _final_hidden(adapter: ModelAdapter, ids: Tensor) -> Tensor:
    """The final norm's output ``[N, T, d]`` (the unembedding is applied at scored positions)."""
    return adapter.model.base_model(input_ids=ids, use_cache=False).last_hidden_state


@contextmanager
def ablating(
    adapter: ModelAdapter, heads: Sequence[str], values: Mapping[str, Tensor] | None = None
) -> Iterator[None]:
    """Every forward pass inside the block runs with ``heads`` ablated: each head's ``z`` is
    replaced by zero, or by ``values[head]`` (``[D]``, or broadcastable to ``[N, T, D]``).

    For looking at anything under an ablation, e.g. another head's pattern with
    ``adapter.run``; :func:`ablate_heads` measures many ablations at once."""
    values = dict(values or {})
    by_layer: dict[int, list[tuple[int, Tensor | None]]] = {}
    for lay, h in parse_heads(adapter, list(heads)) if heads else []:
        by_layer.setdefault(lay, []).append((h, values.get(head_name(lay, h))))
    if not by_layer:
        raise InputError("name at least one head to ablate")

    def edit(items: list[tuple[int, Tensor | None]]) -> Callable[[Tensor], Tensor]:
        def fn(z: Tensor) -> Tensor:  # [N, T, H, D]
            z = z.clone()
            for h, value in items:
                z[:, :, h] = 0.0 if value is None else value.to(z)
            return z

        return fn

    with ExitStack() as stack:
        for lay, items in by_layer.items():
            stack.callback(_z_hook(adapter, lay, edit(items)).remove)
        yield
