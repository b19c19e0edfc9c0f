"""Streaming metrics computed from attention patterns.

Conventions shared by every metric here (each docstring states its exact formula; the table of
all of them is docs/metrics.md). ``A[q, k]`` is the head's attention from query ``q`` to key
``k`` in one packed sequence:

* Padding queries (``valid == False``) never count.
* Query position 0 is excluded from every pattern metric: its row can only attend to itself,
  so it says nothing about the head (self attention and attention to position 0 would be
  trivially 1, entropy and distance trivially 0). ``output_norm`` keeps position 0.
* Position 0 is the start of the packed sequence, the usual attention sink; document starts
  inside a packed sequence are ordinary positions.
* Per-query metrics are means over queries; the token-match scores (``induction_score``,
  ``duplicate_token_score``) are means over (query, key) pairs, as the paper "HeadVis: An
  Interactive Tool For Investigating Attention Heads" defines the induction score, so a query
  with several earlier copies of its token contributes several pairs. ``induction_mass`` is the
  per-query counterpart. Token matches may cross packed-document boundaries; key 0 never counts
  as a match (see :class:`~headscope.metrics.registry.TokenMatches`).

Everything is vectorised over batch, heads and positions. The only loop is
:func:`~headscope.metrics.rows.row_reductions`' loop over blocks of rows: it reads the causal lower triangle once
(skipping the all-zero upper triangle) and derives, block by block while it is in cache, every
per-row and per-key quantity the metrics and the precompute's other accumulators need.
"""

from __future__ import annotations

import torch
from torch import Tensor

from headscope.metrics.registry import LayerBatch, MetricPartial, register_metric


def _masked_mean_partial(values: Tensor, mask: Tensor) -> MetricPartial:
    """values: [B, H, T], mask: [B, T] bool -> per-head sum and count over masked positions."""
    total = torch.where(mask[:, None, :], values, 0.0).sum(dim=(0, 2), dtype=torch.float64)  # [H]
    count = mask.sum(dtype=torch.float64).expand(values.shape[1]).clone()  # [H]
    return MetricPartial(total=total, count=count)


def _pair_weights(batch: LayerBatch, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """b, q, k: [N] int64 (batch, query row of the block, key) of every match -> per-head sum
    of A[q, k]: [H]."""
    return batch.pattern[b, :, q, k].sum(0, dtype=torch.float64)  # pattern[b, :, q, k]: [N, H]


def _pair_mean_partial(batch: LayerBatch, b: Tensor, q: Tensor, k: Tensor) -> MetricPartial:
    """Mean of A[q, k] over the matched (query, key) pairs: each pair counts once."""
    count = torch.full((batch.n_heads,), float(b.numel()), dtype=torch.float64)  # [H]
    return MetricPartial(total=_pair_weights(batch, b, q, k), count=count)


def _query_mass_partial(batch: LayerBatch, b: Tensor, q: Tensor, k: Tensor) -> MetricPartial:
    """Mean over queries with >= 1 matched key of the total attention on their matched keys.

    The sum over queries of each query's total is the sum over all pairs, so only the count
    differs from :func:`_pair_mean_partial`: distinct queries instead of pairs.
    """
    T = batch.seq_len
    n_queries = (b * T + q).unique().numel()  # distinct (batch, query) among the matches
    count = torch.full((batch.n_heads,), float(n_queries), dtype=torch.float64)  # [H]
    return MetricPartial(total=_pair_weights(batch, b, q, k), count=count)


@register_metric("self_attention_score")
def self_attention_score(batch: LayerBatch) -> MetricPartial:
    """Mean attention from each token to itself.

    Mean of ``A[q, q]`` over non-padding queries ``q >= 1`` (query 0 can only attend to itself).
    A packed document's first token is an ordinary query.
    """
    diag = batch.pattern.diagonal(offset=batch.row_start, dim1=-2, dim2=-1)  # [B, H, r]
    return _masked_mean_partial(diag, batch.query_mask)


@register_metric("prev_token_score")
def prev_token_score(batch: LayerBatch) -> MetricPartial:
    """Mean attention from each token to the token right before it.

    Mean of ``A[q, q - 1]`` over non-padding queries ``q >= 1``. At a packed-document boundary
    the previous token is the last token of the previous document.
    """
    B, H, r, _ = batch.pattern.shape
    s = batch.row_start
    sub = batch.pattern.new_zeros(B, H, r)
    first = 1 if s == 0 else 0  # row 0 has no previous token
    sub[:, :, first:] = batch.pattern.diagonal(offset=s - 1, dim1=-2, dim2=-1)  # A[q, q-1]
    return _masked_mean_partial(sub, batch.query_mask)


@register_metric("bos_score")
def bos_score(batch: LayerBatch) -> MetricPartial:
    """Mean attention from each token to the first position of the sequence (the attention sink).

    Mean of ``A[q, 0]`` over non-padding queries ``q >= 1``. Only sequence position 0 counts,
    not the first tokens of later documents packed into the same sequence.
    """
    return _masked_mean_partial(batch.pattern[:, :, :, 0], batch.query_mask)


@register_metric("pattern_entropy")
def pattern_entropy(batch: LayerBatch) -> MetricPartial:
    """Mean entropy of each token's attention distribution, in nats (0 = attends to one token).

    Mean over non-padding queries ``q >= 1`` of ``-sum_k A[q, k] ln A[q, k]`` (``0 ln 0 = 0``);
    a uniform distribution over the ``q + 1`` visible keys has entropy ``ln(q + 1)``. Keys in
    earlier packed documents count like any other key.
    """
    return _masked_mean_partial(batch.rows.entropy, batch.query_mask)


@register_metric("qk_distance")
def qk_distance(batch: LayerBatch) -> MetricPartial:
    """Mean distance (in tokens) from each token back to the tokens it attends to.

    Mean over non-padding queries ``q >= 1`` of ``sum_k A[q, k] (q - k)``: 0 = attends to
    itself, 1 = previous token. Keys in earlier packed documents count at their full distance.
    """
    return _masked_mean_partial(batch.rows.moments[..., 0], batch.query_mask)


@register_metric("qk_distance_variance")
def qk_distance_variance(batch: LayerBatch) -> MetricPartial:
    """Mean spread (variance, in tokens squared) of the distances each token attends over.

    Mean over non-padding queries ``q >= 1`` of ``sum_k A[q, k] (q - k)^2 - (sum_k A[q, k]
    (q - k))^2``: the variance within each query's row (0 = each token attends to a single
    position, at any distance), not the variance of distances pooled over all rows. Keys in
    earlier packed documents count at their full distance. Computed in float32 in one pass from
    moments of ``q - k``, so the rounding error scales with the squared distances the head
    attends over, not with the squared sequence length.
    """
    moments = batch.rows.moments  # [B, H, T, 2]
    var = (moments[..., 1] - moments[..., 0].square()).clamp_min_(0.0)  # [B, H, T]
    return _masked_mean_partial(var, batch.query_mask)


@register_metric("induction_score")
def induction_score(batch: LayerBatch) -> MetricPartial:
    """Mean attention from a repeated token to each token that followed an earlier copy of it
    ([A][B] ... [A] -> [B]).

    Mean of ``A[q, k]`` over all (query, key) pairs with ``tokens[k - 1] == tokens[q]`` and
    ``1 <= k < q``, non-padding queries only: each pair counts once, so a query with several
    earlier copies of its token contributes one pair per copy (the induction score of the paper
    "HeadVis: An Interactive Tool For Investigating Attention Heads"). The query itself and key 0
    are never keys. Pairs may cross packed-document boundaries.
    """
    return _pair_mean_partial(batch, *batch.block_matches("ind"))


@register_metric("induction_mass")
def induction_mass(batch: LayerBatch) -> MetricPartial:
    """Share of a repeated token's attention that goes to the tokens that followed its earlier
    copies ([A][B] ... [A] -> [B]).

    For each non-padding query ``q`` with at least one induction key (``tokens[k - 1] ==
    tokens[q]``, ``1 <= k < q``), the total ``sum_k A[q, k]`` over its induction keys; mean over
    those queries (queries without an induction key do not count). The same pairs as
    ``induction_score``, which averages over pairs instead; the two divide the same total by
    counts that depend only on the tokens, so over a run they differ by one factor for every
    head (pairs per matched query) and rank heads alike, but this one reads as a share of
    attention. Pairs may cross packed-document boundaries.
    """
    return _query_mass_partial(batch, *batch.block_matches("ind"))


@register_metric("duplicate_token_score")
def duplicate_token_score(batch: LayerBatch) -> MetricPartial:
    """Mean attention from a repeated token to each earlier copy of it.

    Mean of ``A[q, k]`` over all (query, key) pairs with ``tokens[k] == tokens[q]`` and
    ``1 <= k < q``, non-padding queries only: each pair counts once, so a query with several
    earlier copies contributes one pair per copy. Key 0 is never a copy. Pairs may cross
    packed-document boundaries.
    """
    return _pair_mean_partial(batch, *batch.block_matches("dup"))


@register_metric("max_attention")
def max_attention(batch: LayerBatch) -> MetricPartial:
    """Mean over tokens of the largest attention weight they give to any single token.

    Mean over non-padding queries ``q >= 1`` of ``max_{1 <= k <= q} A[q, k]``: key 0 (the
    attention sink) is left out of the maximum, so a head that only "parks" its attention on the
    first token scores low. Keys in earlier packed documents count like any other key.
    """
    return _masked_mean_partial(batch.row_max, batch.query_mask)


@register_metric("output_norm")
def output_norm(batch: LayerBatch) -> MetricPartial:
    """Mean size (L2 norm) of the head's output written to the residual stream.

    Mean of ``||z_h[q] W_O[h]||_2`` (the head's value-weighted sum times its output matrix, no
    output bias) over all non-padding positions ``q``, including position 0.
    """
    return _masked_mean_partial(
        batch.head_out_norm, batch.valid[:, batch.row_start : batch.row_stop]
    )


# ----- long range -------------------------------------------------------------------------------------
LONG_DISTANCES = (64, 512)  # the distances of the attention_beyond_* metrics
_LONG_BLOCK = 64  # query rows per block in _far_mass


def _far_mass(pattern: Tensor, row_start: int = 0) -> Tensor:
    """[B, H, r, S] causal pattern (query rows ``row_start .. S - 1``) -> [B, H, r,
    len(LONG_DISTANCES) + 1] float32: per query q, ``sum_{1 <= k <= q - d} A[q, k]`` for each
    distance d, then ``sum_{1 <= k <= q} A[q, k]``.

    Block by block of query rows, so no [T, T]-sized temporary is made: in a block starting at
    ``s`` every row takes all keys ``1 .. s - d``, and only a tile at most a block wide needs
    the per-row mask ``k <= q - d``."""
    B, H, r, S = pattern.shape
    D = len(LONG_DISTANCES)
    out = pattern.new_zeros(B, H, r, D + 1)
    rows_idx = torch.arange(S, device=pattern.device)
    for first in range(0, r, _LONG_BLOCK):
        last = min(first + _LONG_BLOCK, r)
        start, stop = row_start + first, row_start + last  # query positions
        rows = pattern[:, :, first:last, :stop]  # [B, H, n, stop]
        out[:, :, first:last, D] = rows[..., 1:].sum(-1)
        for i, d in enumerate(LONG_DISTANCES):
            full = max(1, start - d + 1)  # keys 1 .. full - 1: inside every row's far region
            edge = max(full, stop - d)  # keys full .. edge - 1: far only for some rows
            if edge <= 1:
                continue
            far = rows[..., 1:full].sum(-1)  # [B, H, r]
            if edge > full:
                k = rows_idx[full:edge]
                q = rows_idx[start:stop, None]
                tile = torch.where(k[None, :] <= q - d, rows[..., full:edge], 0.0)
                far = far + tile.sum(-1)
            out[:, :, first:last, i] = far
    return out


def _far(batch: LayerBatch) -> Tensor:
    return batch.memo("far_mass", lambda: _far_mass(batch.pattern, batch.row_start))


@register_metric("attention_beyond_64")
def attention_beyond_64(batch: LayerBatch) -> MetricPartial:
    """Share of each token's attention that goes to tokens at least 64 positions back (the
    first position, the attention sink, left out).

    Mean over non-padding queries ``q >= 1`` of ``sum_{1 <= k <= q - 64} A[q, k]`` (0 for
    ``q <= 64``, so the value grows with the sequence length: compare heads within a run). Keys
    in earlier packed documents count at their full distance.
    """
    return _masked_mean_partial(_far(batch)[..., 0], batch.query_mask)


@register_metric("attention_beyond_512")
def attention_beyond_512(batch: LayerBatch) -> MetricPartial:
    """Share of each token's attention that goes to tokens at least 512 positions back (the
    first position, the attention sink, left out).

    Mean over non-padding queries ``q >= 1`` of ``sum_{1 <= k <= q - 512} A[q, k]`` (0 for
    ``q <= 512``). Keys in earlier packed documents count at their full distance.
    """
    return _masked_mean_partial(_far(batch)[..., 1], batch.query_mask)


@register_metric("long_range_share")
def long_range_share(batch: LayerBatch) -> MetricPartial:
    """Of the attention a head gives to tokens other than the first position, the share that
    goes 64 or more positions back.

    ``sum_q sum_{1 <= k <= q - 64} A[q, k]`` divided by ``sum_q sum_{1 <= k <= q} A[q, k]``,
    both over non-padding queries ``q >= 1``: a ratio of sums, so each query weighs as much as
    the attention it does not park on position 0 (``attention_beyond_64`` counts attention to
    position 0 in each query's whole). Keys in earlier packed documents count at their full
    distance.
    """
    far = _far(batch)
    w = batch.query_mask[:, None, :]  # [B, 1, T]
    total = torch.where(w, far[..., 0], 0.0).sum(dim=(0, 2), dtype=torch.float64)  # [H]
    count = torch.where(w, far[..., -1], 0.0).sum(dim=(0, 2), dtype=torch.float64)  # [H]
    return MetricPartial(total=total, count=count)
