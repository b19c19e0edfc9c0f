"""A head's attention patterns streamed over a dataset, a run's stored examples or one text,
stopping each forward pass after the head's layer (used by descriptions and knockouts)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from headscope.errors import InputError
from headscope.model import ModelAdapter, parse_head
from headscope.model.capture import CaptureRequest, LayerTensors, capturing

N_BUCKETS = 10  # max-attention buckets [0, 0.1), ..., [0.9, 1.0], as the precompute's examples
N_DISTANCE_BUCKETS = 16  # 0, 1, 2-3, 4-7, ..., >= 2^14
CONTEXT = 6  # tokens shown on each side of a counterexample's key, before its query


class _Done(Exception):
    """Ends a forward pass once the layer asked for has run."""


def run_layers(
    adapter: ModelAdapter,
    ids: Tensor,  # [B, T]
    layers: Collection[int],
    on_layer: Callable[[LayerTensors], None],
    *,
    override: Callable[..., tuple[Tensor, Tensor | None]] | None = None,
) -> None:
    """One forward pass over ``ids`` that calls ``on_layer`` with each of ``layers``' tensors
    (patterns included, kept only for the call) and stops once the last of them has run.

    ``override``: replaces the attention of every layer up to the last one (see
    :class:`~headscope.model.capture.CaptureRequest`)."""
    last = max(layers)

    def each(t: LayerTensors) -> None:
        if t.layer in layers:
            on_layer(t)
        if t.layer == last:
            raise _Done

    captured = frozenset(range(last + 1)) if override is not None else frozenset(layers)
    req = CaptureRequest(
        layers=captured, patterns=True, on_layer=each, store=False, override=override
    )
    try:
        with torch.no_grad(), capturing(req):
            adapter.model.base_model(input_ids=ids.to(adapter.device), use_cache=False)
    except _Done:
        pass


def run_to_layer(
    adapter: ModelAdapter,
    ids: Tensor,  # [B, T]
    layer: int,
    take: Callable[[LayerTensors], Any],
    *,
    override: Callable[..., tuple[Tensor, Tensor | None]] | None = None,
) -> Any:
    """``take(layer's tensors)`` from one forward pass that stops after ``layer``."""
    taken: list[Any] = []
    run_layers(adapter, ids, [layer], lambda t: taken.append(take(t)), override=override)
    return taken[0]


def equal_length_batches(
    sequences: Iterable[tuple[int, Tensor]], size: int
) -> Iterator[list[tuple[int, Tensor]]]:
    """Consecutive sequences of equal length, at most ``size`` at a time."""
    batch: list[tuple[int, Tensor]] = []
    for item in sequences:
        if batch and (len(batch) == size or item[1].numel() != batch[0][1].numel()):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def head_patterns(
    adapter: ModelAdapter,
    sequences: Iterable[tuple[int, Tensor]],
    head: str,
    *,
    batch_size: int = 8,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(sequence index, ids [T], pattern [T, T] float32)`` of one head for each sequence.

    Each forward pass stops after the head's layer. ``sequences``: ``(index, ids [T])`` pairs,
    BOS included; consecutive sequences of equal length are batched."""
    layer, h = _parse(adapter, head)
    for batch in equal_length_batches(sequences, batch_size):
        ids = torch.stack([t.long() for _, t in batch])  # [B, T]
        pattern = run_to_layer(adapter, ids, layer, lambda t: t.weights()[:, h].float().cpu())
        for j, (index, _) in enumerate(batch):
            yield index, ids[j], pattern[j]


def _parse(adapter: ModelAdapter, head: str) -> tuple[int, int]:
    try:
        return parse_head(head, adapter.spec)
    except ValueError as err:
        raise InputError(str(err)) from None


def sparse_patterns(examples: Iterable[dict]) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(sequence, ids [T], pattern [T, T])`` from a run's stored examples (the ``examples`` of
    ``heads/L{l}H{h}.json``): each pattern holds only the stored sparse entries, zero elsewhere."""
    for ex in examples:
        ids = torch.tensor(ex["tokens"], dtype=torch.long)
        pattern = torch.zeros(ids.numel(), ids.numel())
        if ex["sparse"]:
            entries = torch.tensor(ex["sparse"], dtype=torch.float64)  # [N, 3] q, k, w
            pattern[entries[:, 0].long(), entries[:, 1].long()] = entries[:, 2].float()
        yield int(ex["sequence"]), ids, pattern
