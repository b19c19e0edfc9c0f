"""Torch's thread count, narrowed for work that runs faster on one thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread inside the block (the count is per calling thread: a forward pass
    on another thread keeps its own), restoring the count after it.

    For many tiny ops, where waking OpenMP threads costs more than the op: an attribution on a
    cached text (seen-text QK p50 10.0 ms on two threads, 7.2 ms on one, on a busy 2-core
    machine), and batched small decompositions (eigh / qr / svd of many 64x64 or 512x11
    matrices nest MKL threads inside torch's batch threads: eigh of 32 matrices took 3.6 s
    instead of 0.04 s on 2 busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
