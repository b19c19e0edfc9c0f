"""Give memory the process has freed back to the operating system."""

from __future__ import annotations

import ctypes
import functools
import gc


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def release_freed_memory(*, collect: bool = False) -> None:
    """Hand freed heap memory back to the operating system, where the C library can.

    glibc keeps freed blocks below its mmap threshold (which rises to 32 MB as large blocks are
    freed) in its heaps, one per thread, so tensors that were freed would otherwise stay in the
    process's resident memory. ``collect``: run the garbage collector first (for objects in
    reference cycles, such as a model). A no-op on other C libraries."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
