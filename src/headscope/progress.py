"""Progress bars on stderr for the steps of a long command.

A step shows a bar (with an ETA) only once it has run for :data:`DELAY` seconds, so quick steps
print nothing. Steps whose work is forward passes count the tokens the model reads
(:func:`counting_tokens`), so their bars move with the work however the step batches it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from headscope.model import ModelAdapter

DELAY = 2.0  # seconds a step runs before its bar appears


def bar(total: float, desc: str, unit: str = "it", *, enabled: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar on stderr that appears after :data:`DELAY` seconds (never when not enabled);
    counts of ``"tok"`` are shown as 1.2k, 3.4M."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "tok",
        file=sys.stderr,
        delay=DELAY,
        disable=not enabled,
        **kw,
    )


@contextmanager
def counting_tokens(adapter: ModelAdapter, progress: tqdm) -> Iterator[tqdm]:
    """Advance ``progress`` by the tokens of every forward pass of ``adapter``'s model while
    inside (counted where the token ids enter the embedding); the bar ends full."""
    from headscope.model.spec import get_module

    def count(_module: Any, args: tuple, _output: Any) -> None:
        progress.update(args[0].numel())  # ids [B, T]

    handle = get_module(adapter.model, adapter.spec.layout.embed).register_forward_hook(count)
    try:
        yield progress
        if progress.total is not None and progress.n < progress.total:
            progress.update(progress.total - progress.n)
    finally:
        handle.remove()
