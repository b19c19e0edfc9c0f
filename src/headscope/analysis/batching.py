"""Run many short texts through the model in batches of equal length (no padding needed)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from headscope.model import Capture, ModelAdapter


def run_grouped(
    adapter: ModelAdapter,
    sequences: list[list[int]],
    handle: Callable[[list[int], Capture], None],
    *,
    layers: list[int],
    patterns: bool,
    residuals: bool = False,
    batch_size: int = 32,
) -> None:
    """Run ``sequences`` grouped by length; ``handle(indices, capture)`` sees each batch."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, seq in enumerate(sequences):
        by_len[len(seq)].append(i)
    for length in sorted(by_len):
        idx = by_len[length]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            ids = torch.tensor([sequences[i] for i in chunk], dtype=torch.long)
            cap = adapter.run(
                ids, layers=layers, patterns=patterns, residuals=residuals, logits=False
            )
            handle(chunk, cap)
