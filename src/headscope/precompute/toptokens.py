"""Per-head token tables: which query tokens attend (away from the sink) and which keys are read.

For every head and token id:

* **query mass** -- how much of a query token's attention goes anywhere but position 0:
  ``1 - A[q, 0]``, averaged over the token's occurrences as a query (positions q >= 1).
* **key mass** -- how much attention a key token receives in total from later queries:
  ``sum_{q > k} A[q, k]`` (the diagonal excluded), averaged over the token's occurrences as a
  key at positions ``1 <= k`` that have at least one later valid query. Position 0 is left out:
  it receives the sink attention of nearly every head and would top every list.

Sums are float64, so tables of shards (or of any split of the stream into batches) merge
exactly, like every other accumulator.

Memory: tables only have columns for token ids that actually occurred, so they scale with
the number of *distinct* tokens seen (C), not the vocabulary. Sums are float64 ``[L, H, C]``
(two tables), counts are int64 ``[L, C]`` (identical for every head of a layer). At
L*H = 270 heads and even C = 49152 (the whole SmolLM2 vocabulary) that is 212 MB; a dataset of
a few hundred thousand tokens has C of roughly 10-30k (40-130 MB). Capacity grows by 1.5x, so
the allocation can be up to 1.5x that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from headscope.metrics.registry import LayerBatch

_MIN_CAPACITY = 1024


class TopTokens:
    """Streaming, mergeable per-(layer, head, token) attention sums and counts."""

    def __init__(self, n_layers: int, n_heads: int):
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_tokens = 0  # C: columns in use
        self.token_of_slot = torch.zeros(0, dtype=torch.int64)  # [cap]
        self._sorted_tokens = torch.zeros(0, dtype=torch.int64)  # [C], for lookups
        self._sorted_slots = torch.zeros(0, dtype=torch.int64)  # [C]
        self.query_sum = torch.zeros(n_layers, n_heads, 0, dtype=torch.float64)  # [L, H, cap]
        self.key_sum = torch.zeros(n_layers, n_heads, 0, dtype=torch.float64)  # [L, H, cap]
        self.query_count = torch.zeros(n_layers, 0, dtype=torch.int64)  # [L, cap]
        self.key_count = torch.zeros(n_layers, 0, dtype=torch.int64)  # [L, cap]

    def _grow(self, needed: int) -> None:
        cap = self.token_of_slot.shape[0]
        if needed <= cap:
            return
        new_cap = max(needed, cap + cap // 2, _MIN_CAPACITY)
        pad = new_cap - cap

        def grow(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_zeros(*t.shape[:-1], pad)], dim=-1)

        self.token_of_slot = grow(self.token_of_slot)
        self.query_sum, self.key_sum = grow(self.query_sum), grow(self.key_sum)
        self.query_count, self.key_count = grow(self.query_count), grow(self.key_count)

    def _slots(self, tokens: Tensor) -> Tensor:
        """Column of every token id (any shape, int64), adding columns for new ids."""
        flat = tokens.reshape(-1)
        uniq = flat.unique()  # [U] sorted
        pos = torch.searchsorted(self._sorted_tokens, uniq).clamp_(max=max(self.n_tokens - 1, 0))
        known = (
            self._sorted_tokens[pos] == uniq
            if self.n_tokens
            else torch.zeros_like(uniq, dtype=torch.bool)
        )
        new = uniq[~known]
        if new.numel():
            start = self.n_tokens
            self._grow(start + new.numel())
            self.token_of_slot[start : start + new.numel()] = new
            self.n_tokens += new.numel()
            used = self.token_of_slot[: self.n_tokens]
            self._sorted_tokens, self._sorted_slots = used.sort()
        pos = torch.searchsorted(self._sorted_tokens, flat)
        return self._sorted_slots[pos].view(tokens.shape)

    def update(self, batch: LayerBatch) -> None:
        """Add one layer batch: its pattern (padding rows may hold any finite values), tokens,
        valid positions and the attention each key receives (``batch.rows.received``).

        A layer in blocks of query rows adds each block's queries and what each key receives
        from them; the keys are counted once, on the last block."""
        layer, pattern, tokens, valid = batch.layer, batch.pattern, batch.tokens, batch.valid
        T, s, S = batch.seq_len, batch.row_start, batch.row_stop
        pos = torch.arange(T, device=valid.device)
        query_ok = (valid & (pos >= 1))[:, s:S]  # [B, r]
        later = torch.zeros_like(valid)
        later[:, :-1] = valid[:, 1:]  # a later valid query exists (padding is at the end)
        key_ok = later & (pos >= 1)  # [B, T]

        received = batch.rows.received  # [B, H, S]: sum over the block's later valid q of A[q, k]
        query_mass = 1.0 - pattern[:, :, :, 0]  # [B, H, r]

        # The selections are made where the pattern is; the tables stay on the host.
        host = self.query_sum.device
        q_slots = self._slots(tokens[:, s:S][query_ok].to(host))  # [Nq]
        seen = key_ok[:, :S]  # keys the block's queries can see
        k_slots = self._slots(tokens[:, :S][seen].to(host))  # [Nk]
        q_mass = query_mass.transpose(0, 1)[:, query_ok].double().to(host)  # [H, Nq]
        k_mass = received.transpose(0, 1)[:, seen].double().to(host)  # [H, Nk]
        self.query_sum[layer].index_add_(1, q_slots, q_mass)
        self.key_sum[layer].index_add_(1, k_slots, k_mass)
        self.query_count[layer].index_add_(0, q_slots, torch.ones_like(q_slots))
        if batch.is_last:
            if s:  # the layer came in blocks: count every key of the sequence once
                k_slots = self._slots(tokens[key_ok].to(host))
            self.key_count[layer].index_add_(0, k_slots, torch.ones_like(k_slots))

    def merge(self, other: TopTokens) -> None:
        """Add another shard's tables into this one (same layers and heads)."""
        if (other.n_layers, other.n_heads) != (self.n_layers, self.n_heads):
            raise ValueError("can only merge tables with the same layers and heads")
        C = other.n_tokens
        slots = self._slots(other.token_of_slot[:C])  # [C] columns in self
        self.query_sum.index_add_(2, slots, other.query_sum[..., :C])
        self.key_sum.index_add_(2, slots, other.key_sum[..., :C])
        self.query_count.index_add_(1, slots, other.query_count[..., :C])
        self.key_count.index_add_(1, slots, other.key_count[..., :C])

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only, columns sorted by token id.

        ``tokens`` [C] int64, ``query_sum``/``key_sum`` [L, H, C] float64,
        ``query_count``/``key_count`` [L, C] int64.
        """
        order = self._sorted_slots
        return {
            "tokens": self._sorted_tokens.clone(),
            "query_sum": self.query_sum[..., order],
            "key_sum": self.key_sum[..., order],
            "query_count": self.query_count[..., order],
            "key_count": self.key_count[..., order],
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        tokens = state["tokens"].long()
        C = tokens.shape[0]
        if state["query_sum"].shape != (self.n_layers, self.n_heads, C):
            raise ValueError(f"query_sum has shape {tuple(state['query_sum'].shape)}")
        self.n_tokens = C
        self.token_of_slot = tokens.clone()
        self._sorted_tokens, self._sorted_slots = tokens.sort()
        self.query_sum = state["query_sum"].double().clone()
        self.key_sum = state["key_sum"].double().clone()
        self.query_count = state["query_count"].long().clone()
        self.key_count = state["key_count"].long().clone()

    def top_tokens(
        self, min_count: int = 5, k: int = 20
    ) -> dict[tuple[int, int], dict[str, list[tuple[int, float, int]]]]:
        """(layer, head) -> ``{"query": [(token_id, mass, count)], "key": [...]}``.

        The ``k`` tokens with the highest mean mass among those seen at least ``min_count``
        times, highest first (ties: lower token id first).
        """
        order = self._sorted_slots  # columns in token-id order, so stable sorts break ties by id
        tokens = self._sorted_tokens.tolist()
        ranked = {}
        for side, sums, counts in (
            ("query", self.query_sum, self.query_count),
            ("key", self.key_sum, self.key_count),
        ):
            s = sums[..., order]  # [L, H, C]
            c = counts[..., order]  # [L, C]
            mean = s / c.clamp_min(1)[:, None, :]
            mean = mean.masked_fill((c < min_count)[:, None, :], float("-inf"))
            best = mean.argsort(dim=-1, descending=True, stable=True)[..., :k]  # [L, H, k]
            ranked[side] = (best.tolist(), mean.gather(-1, best).tolist(), c.tolist())
        out: dict[tuple[int, int], dict[str, list[tuple[int, float, int]]]] = {}
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                out[(layer, head)] = {
                    side: [
                        (tokens[i], m, n[layer][i])
                        for i, m in zip(best_i[layer][head], means[layer][head], strict=True)
                        if m != float("-inf")
                    ]
                    for side, (best_i, means, n) in ranked.items()
                }
        return out
