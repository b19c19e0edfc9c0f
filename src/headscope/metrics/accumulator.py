"""The one protocol for everything a precompute accumulates over a dataset.

An :class:`Accumulator` sees the stream one :class:`~headscope.metrics.registry.LayerBatch`
(one layer of one batch) at a time. Its state is tensors only, so it checkpoints to safetensors
(no pickle), and two accumulators that saw disjoint sequences merge **exactly**: sums are kept
in float64 and selections (examples, top pairs) break ties by sequence and position, so any
split of the stream -- into batches, resumed halves or ``torchrun`` ranks -- gives the same
result as one pass. ``tests/unit/test_accumulators.py`` checks this for every implementation.

Implementations: :class:`~headscope.metrics.registry.MetricAccumulator` (streaming metrics),
and in ``headscope.precompute``: ``Examples`` (example sequences and their payloads),
``TopTokens``, ``PairCollector`` (Q/K/O pairs) and ``MotifFeatures``. ``StreamState`` holds one
of each and loops over them.
"""

from __future__ import annotations

from typing import Protocol, Self

from torch import Tensor

from headscope.metrics.registry import LayerBatch


class Accumulator(Protocol):
    """Streaming, mergeable, checkpointable state over a dataset."""

    def update(self, batch: LayerBatch) -> None:
        """Add one layer of one batch (each sequence is offered once per layer)."""
        ...

    def merge(self, other: Self) -> None:
        """Add the state of an accumulator of the same shape that saw disjoint sequences."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to resume, as named tensors (safetensors-ready)."""
        ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace this accumulator's state with one from :meth:`state_dict`."""
        ...
