"""Streaming metrics computed from attention patterns.

Conventions shared by every metric here (also stated in each docstring where it matters):

* Padding queries (``valid == False``) never count.
* Query position 0 is excluded from every pattern metric: its row can only attend to itself,
  so it says nothing about the head (self attention and attention to position 0 would be
  trivially 1, entropy and distance trivially 0). ``output_norm`` keeps position 0.
* Position 0 is the start of the packed sequence, the usual attention sink; document starts
  inside a packed sequence are ordinary positions.
* Token matches (induction, duplicate) may cross packed-document boundaries; key 0 never
  counts as a match (see :class:`~headscope.metrics.registry.TokenMatches`).

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


def _match_partial(batch: LayerBatch, b: Tensor, q: Tensor, k: Tensor) -> MetricPartial:
    """Mean over queries with >= 1 matching key of the total attention on matching keys.

    b, q, k: [N] int64 (batch, query, key) of every match.
    """
    B, H, T, _ = batch.pattern.shape
    weights = batch.pattern[b, :, q, k]  # [N, H]
    flat = b * T + q  # [N] query id
    per_query = weights.new_zeros(B * T, H).index_add_(0, flat, weights)  # [B*T, H]
    has_match = torch.zeros(B * T, dtype=torch.bool, device=flat.device)
    has_match[flat] = True
    total = per_query.sum(0, dtype=torch.float64)  # [H]; rows without a match are 0
    count = has_match.sum(dtype=torch.float64).expand(H).clone()  # [H]
    return MetricPartial(total=total, count=count)


@register_metric("self_attention_score")
def self_attention_score(batch: LayerBatch) -> MetricPartial:
    """Mean attention from each token to itself.

    Averaged over all non-padding query positions except position 0 (which can only attend to
    itself).
    """
    diag = batch.pattern.diagonal(dim1=-2, dim2=-1)  # [B, H, T]
    return _masked_mean_partial(diag, batch.query_mask)


@register_metric("prev_token_score")
def prev_token_score(batch: LayerBatch) -> MetricPartial:
    """Mean attention from each token to the token right before it.

    Averaged over all non-padding query positions from 1 on. Across a packed-document boundary
    the previous token is the last token of the previous document.
    """
    B, H, T, _ = batch.pattern.shape
    sub = batch.pattern.new_zeros(B, H, T)
    sub[:, :, 1:] = batch.pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # A[q, q-1]
    return _masked_mean_partial(sub, batch.query_mask)


@register_metric("bos_score")
def bos_score(batch: LayerBatch) -> MetricPartial:
    """Mean attention from each token to the first position of the sequence (the attention sink).

    Averaged over non-padding query positions from 1 on. Only sequence position 0 counts, not
    the starts of later documents packed into the same sequence.
    """
    return _masked_mean_partial(batch.pattern[:, :, :, 0], batch.query_mask)


@register_metric("pattern_entropy")
def pattern_entropy(batch: LayerBatch) -> MetricPartial:
    """Mean entropy of each token's attention distribution, in nats (0 = attends to one token).

    A uniform distribution over the q + 1 visible tokens has entropy log(q + 1). Averaged over
    non-padding query positions from 1 on.
    """
    return _masked_mean_partial(batch.rows.entropy, batch.query_mask)


@register_metric("qk_distance")
def qk_distance(batch: LayerBatch) -> MetricPartial:
    """Mean distance (in tokens) from each token back to the tokens it attends to.

    For query q: sum over keys of A[q, k] * (q - k). 0 = attends to itself, 1 = previous token.
    Averaged over non-padding query positions from 1 on.
    """
    return _masked_mean_partial(batch.rows.moments[..., 0], batch.query_mask)


@register_metric("qk_distance_variance")
def qk_distance_variance(batch: LayerBatch) -> MetricPartial:
    """Mean spread (variance, in tokens squared) of the distances each token attends over.

    0 = each token attends to a single position (at any distance). Averaged over non-padding
    query positions from 1 on. Computed from float32 moments of the distance in one pass, so
    the rounding is relative to the distances the head looks over, not to the position.
    """
    moments = batch.rows.moments  # [B, H, T, 2]
    var = (moments[..., 1] - moments[..., 0].square()).clamp_min_(0.0)  # [B, H, T]
    return _masked_mean_partial(var, batch.query_mask)


@register_metric("induction_score")
def induction_score(batch: LayerBatch) -> MetricPartial:
    """Attention to the token that followed an earlier copy of the current token ([A][B] ... [A] -> [B]).

    For each query token, the keys are the positions right after its earlier occurrences
    (excluding the query itself and position 0). Score = total attention on those keys,
    averaged over the queries that have at least one. Matches across packed documents count.
    """
    m = batch.token_matches
    return _match_partial(batch, m.ind_b, m.ind_q, m.ind_k)


@register_metric("duplicate_token_score")
def duplicate_token_score(batch: LayerBatch) -> MetricPartial:
    """Attention to earlier copies of the current token.

    Total attention on earlier positions holding the same token (position 0 excluded),
    averaged over the queries that have at least one earlier copy. Matches across packed
    documents count.
    """
    m = batch.token_matches
    return _match_partial(batch, m.dup_b, m.dup_q, m.dup_k)


@register_metric("max_attention")
def max_attention(batch: LayerBatch) -> MetricPartial:
    """Mean over tokens of the largest attention weight they give to any single token.

    Position 0 (the attention sink) is left out of the maximum, so a head that only "parks"
    its attention on the first token scores low. Averaged over non-padding query positions
    from 1 on.
    """
    return _masked_mean_partial(batch.row_max, batch.query_mask)


@register_metric("output_norm")
def output_norm(batch: LayerBatch) -> MetricPartial:
    """Mean size (L2 norm) of the head's output written to the residual stream.

    Averaged over all non-padding positions, including position 0.
    """
    return _masked_mean_partial(batch.head_out_norm, batch.valid)
