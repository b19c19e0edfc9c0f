"""One pass over the lower triangle of a layer's attention patterns.

Most of what a precompute derives from a pattern is a reduction along its rows or columns
(entropy, maxima, distance moments, attention received, ...). Reading a ``[B, H, T, T]``
pattern from memory costs more than most of these reductions, so :func:`row_reductions` reads
it once, block of rows by block of rows, and computes all of them while the block is in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Rows per block in row_reductions: small enough to skip most of the zero upper triangle
# (32 rows of 512: 53% of the square is read) and to keep a block in cache while several
# reductions read it, large enough that each block is still one big vectorised op.
KEY_GROUP = 32  # keys per group in RowReductions.group_max
_ROW_BLOCK = KEY_GROUP  # block edges fall on group edges
_TINY = 1e-30


@dataclass(frozen=True)
class RowReductions:
    """Per-row and per-key reductions of a causal pattern ``[B, H, T, T]`` (or of a block of
    its rows ``[B, H, r, S]``, ``S = row_start + r``), from one pass."""

    entropy: Tensor  # [B, H, r] entropy of each row in nats
    row_max: Tensor  # [B, H, r] max of each row over keys 1..q (0 for row 0)
    moments: Tensor  # [B, H, r, 2] sum_k A[q, k] (q - k) and sum_k A[q, k] (q - k)^2
    # [B, H, S] sum over the block's valid queries q > k of A[q, k] (a whole pattern: over all
    # later queries; blocks add up to that)
    received: Tensor
    # [B, H, r, S // KEY_GROUP] max of each row over keys [g * 32, (g + 1) * 32); None when
    # S is not a multiple of KEY_GROUP
    group_max: Tensor | None


def _row_blocks(row_start: int, row_stop: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of at most _ROW_BLOCK rows whose inner edges are multiples of it."""
    edges = [row_start, *range((row_start // _ROW_BLOCK + 1) * _ROW_BLOCK, row_stop, _ROW_BLOCK)]
    return list(zip(edges, [*edges[1:], row_stop], strict=True))


def row_reductions(pattern: Tensor, valid: Tensor, row_start: int = 0) -> RowReductions:
    """Every reduction of :class:`RowReductions` in one pass over the lower triangle.

    pattern: [B, H, r, S] causal float32, query rows ``row_start .. S - 1`` (a whole pattern:
    ``row_start = 0``, ``r = S = T``); valid: [B, T] bool (padding at the end). Row block
    ``[s, e)`` only needs keys ``< e``; each block is read by all reductions while in cache.
    """
    B, H, r, S = pattern.shape
    entropy = pattern.new_empty(B, H, r)
    row_max = pattern.new_zeros(B, H, r)
    moments = pattern.new_empty(B, H, r, 2)
    received = pattern.new_zeros(B, H, S)
    groups = S // KEY_GROUP if S % KEY_GROUP == 0 else 0
    group_max = pattern.new_zeros(B, H, r, groups) if groups else None
    k = torch.arange(S, dtype=pattern.dtype, device=pattern.device)  # [S]
    query_weight = valid[:, row_start:S].to(pattern.dtype)  # [B, r]
    all_valid = bool(valid[:, row_start:S].all())
    buf = pattern.new_empty(B, H, min(r, _ROW_BLOCK), S)  # scratch, reused by every block
    for start, stop in _row_blocks(row_start, S):
        i, j = start - row_start, stop - row_start  # the block's rows in ``pattern``
        rows = pattern[:, :, i:j, :stop]  # [B, H, n, stop]
        scratch = buf[:, :, : stop - start, :stop]
        torch.clamp_min(rows, _TINY, out=scratch).log_().mul_(rows)  # A log A, 0 where A == 0
        entropy[:, :, i:j] = scratch.sum(-1).neg_()
        if stop > 1:
            row_max[:, :, i:j] = rows[..., 1:].amax(-1)
        # Moments of the distance q - k, not of the key position k: the variance m2 - m1^2 then
        # cancels on the scale of the distances a head looks over, not of the position (~T^2).
        # Elementwise products reduced along each row, not a matmul: a GEMM picks its kernel (so
        # its rounding) by the batch size, and a metric must not depend on how the stream was
        # split into batches.
        dist = k[start:stop, None] - k[None, :stop]  # [n, stop] q - k (< 0 only where A == 0)
        torch.mul(rows, dist, out=scratch)
        moments[:, :, i:j, 0] = scratch.sum(-1)
        moments[:, :, i:j, 1] = scratch.mul_(dist).sum(-1)
        if all_valid:
            received[:, :, :stop] += rows.sum(-2)
        else:  # the same row sum with padding rows zeroed (not a GEMM, for the reason above)
            torch.mul(rows, query_weight[:, None, i:j, None], out=scratch)
            received[:, :, :stop] += scratch.sum(-2)
        if group_max is not None:
            g = -(-stop // KEY_GROUP)  # keys >= stop are all zero in these rows
            w = min(g * KEY_GROUP, S)
            group_max[:, :, i:j, :g] = pattern[:, :, i:j, :w].unflatten(-1, (g, KEY_GROUP)).amax(-1)
    # the diagonal is not "received from a later query"
    received[:, :, row_start:] -= (
        pattern.diagonal(offset=row_start, dim1=-2, dim2=-1) * (query_weight[:, None, :])
    )
    return RowReductions(entropy, row_max, moments, received, group_max)
