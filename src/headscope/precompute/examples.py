"""Per-head example selection: sequences bucketed by their max attention, chosen in one pass.

For every head, each sequence gets one score, its *max attention*: the largest weight over
query positions q >= 1 and keys 1 <= k <= q (key 0, the attention sink, is left out; the
diagonal is kept). Scores fall into ten fixed buckets ``[0, 0.1), [0.1, 0.2), ... [0.9, 1.0]``.

* The top bucket keeps the ``top_k`` highest scores (ties: lower sequence index first).
* Every other bucket keeps a uniform sample of ``per_bucket`` sequences: each sequence has a
  pseudo-random priority ``hash(seed, layer, head, sequence)`` and the bucket keeps the
  smallest priorities. This is a reservoir sample that does not depend on the order sequences
  arrive in, on the batch size, or on how the dataset was split into shards, and two shards
  merge exactly.

The selector stores only sequence indices and scores (a few kB per head); what an example
shows (its sparse pattern, each position's maximum as query and as key) is captured while the
sequence streams past, by :class:`ExamplePayloads`. :class:`Examples` runs both as one
:class:`~headscope.metrics.accumulator.Accumulator`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from headscope.metrics.registry import LayerBatch
from headscope.precompute.payloads import ExamplePayloads, causal_topk, received_maxima_

N_BUCKETS = 10
BUCKET_EDGES: tuple[float, ...] = tuple(i / N_BUCKETS for i in range(N_BUCKETS + 1))
N_HIST_BINS = 20
HISTOGRAM_EDGES: tuple[float, ...] = tuple(i / N_HIST_BINS for i in range(N_HIST_BINS + 1))

_EMPTY_SEQ = -1
_SEQ_SENTINEL = torch.iinfo(torch.int64).max
_PRIORITY_BITS = 52  # priorities are exact integers in float64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser on uint64 arrays (wrapping arithmetic, logical shifts)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def priority(seed: int, layer: Tensor, head: Tensor, sequence: Tensor) -> Tensor:
    """Deterministic pseudo-random priority in ``[0, 2**52)`` as float64 (exact).

    layer, head, sequence: int64 tensors that broadcast together -> float64 of their shape.
    """
    layer, head, sequence = torch.broadcast_tensors(layer, head, sequence)
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(layer.shape, seed, dtype=np.uint64))
        for part in (layer, head, sequence):
            h = _splitmix64(h ^ part.cpu().numpy().astype(np.uint64))
    return torch.from_numpy((h >> np.uint64(64 - _PRIORITY_BITS)).astype(np.float64))


def bucket_of(score: Tensor, n: int = N_BUCKETS) -> Tensor:
    """Index of the fixed interval ``[i/n, (i+1)/n)`` holding each score (last one closed).

    Edges are compared in float32 (the precision of attention weights), so a weight stored
    as ``float32(0.9)`` lands in ``[0.9, 1.0]`` although it is a hair below 0.9.
    """
    edges = torch.arange(1, n, dtype=torch.float64).div_(n).float()  # [n - 1] inner edges
    return torch.bucketize(score.float().contiguous(), edges.to(score.device), right=True)


def sequence_max_attention(batch: LayerBatch) -> Tensor:
    """[B, H] max attention per sequence and head: max over q >= 1 and 1 <= k <= q.

    Padding queries are ignored; a sequence with a single valid token scores 0.
    """
    return batch.row_max.amax(-1)


class ExampleSelector:
    """Streaming, mergeable, order-independent choice of example sequences for every head."""

    def __init__(
        self, n_layers: int, n_heads: int, top_k: int = 10, per_bucket: int = 3, seed: int = 0
    ):
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.top_k = top_k
        self.per_bucket = per_bucket
        self.seed = seed
        self.slots = max(top_k, per_bucket)
        self.capacity = torch.full((N_BUCKETS,), per_bucket, dtype=torch.int64)  # [NB]
        self.capacity[-1] = top_k
        shape = (n_layers, n_heads, N_BUCKETS, self.slots)
        self.seq = torch.full(shape, _EMPTY_SEQ, dtype=torch.int64)  # [L, H, NB, S]
        self.score = torch.zeros(shape, dtype=torch.float32)  # [L, H, NB, S]
        self.hist = torch.zeros(n_layers, n_heads, N_HIST_BINS, dtype=torch.int64)  # [L, H, 20]

    def _keep_best(self, layers: Tensor, seq: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
        """Keep each bucket's best candidates.

        layers: [L'] int64; seq: [L', H, NB, M] int64 (-1 = empty); score: [L', H, NB, M].
        Returns seq, score: [L', H, NB, S] in canonical order (best first, empties last).
        """
        empty = seq == _EMPTY_SEQ
        heads = torch.arange(self.n_heads)
        prio = priority(self.seed, layers[:, None, None, None], heads[None, :, None, None], seq)
        is_top = torch.zeros(N_BUCKETS, 1, dtype=torch.bool)  # [NB, 1]
        is_top[-1] = True
        primary = torch.where(is_top, -score.double(), prio).masked_fill_(empty, float("inf"))
        secondary = seq.masked_fill(empty, _SEQ_SENTINEL)
        # lexicographic (primary, secondary): stable sort by the minor key, then the major one
        order = secondary.argsort(dim=-1, stable=True)
        order = order.gather(-1, primary.gather(-1, order).argsort(dim=-1, stable=True))
        order = order[..., : self.slots]
        seq, score = seq.gather(-1, order), score.gather(-1, order)
        over = torch.arange(self.slots) >= self.capacity[:, None]  # [NB, S]
        return seq.masked_fill(over, _EMPTY_SEQ), score.masked_fill(over, 0.0)

    def update(self, batch: LayerBatch) -> None:
        """Offer the batch's sequences (``batch.seq_idx``) for every head of ``batch.layer``."""
        self.offer(batch.layer, batch.need("seq_idx"), sequence_max_attention(batch))

    def offer(self, layer: int, seq_indices: Tensor, max_attn: Tensor) -> None:
        """Offer a batch of sequences for every head of one layer.

        seq_indices: [B] int64, dataset index of each sequence (each sequence offered once per
        layer); max_attn: [B, H] float, from :func:`sequence_max_attention`.
        """
        seq_indices = seq_indices.cpu().long()
        max_attn = max_attn.detach().cpu().float()
        bucket = bucket_of(max_attn).T  # [H, B]
        in_bucket = bucket[:, None, :] == torch.arange(N_BUCKETS)[None, :, None]  # [H, NB, B]
        cand_seq = torch.where(in_bucket, seq_indices, _EMPTY_SEQ)  # [H, NB, B]
        cand_score = torch.where(in_bucket, max_attn.T[:, None, :], 0.0)  # [H, NB, B]
        seq = torch.cat([self.seq[layer], cand_seq], dim=-1)[None]  # [1, H, NB, S + B]
        score = torch.cat([self.score[layer], cand_score], dim=-1)[None]
        new_seq, new_score = self._keep_best(torch.tensor([layer]), seq, score)
        self.seq[layer], self.score[layer] = new_seq[0], new_score[0]
        bins = bucket_of(max_attn, N_HIST_BINS).T  # [H, B]
        self.hist[layer].scatter_add_(1, bins, torch.ones_like(bins))

    def merge(self, other: ExampleSelector) -> None:
        """Fold in a selector that saw a disjoint set of sequences (another shard)."""
        same = (self.n_layers, self.n_heads, self.top_k, self.per_bucket, self.seed) == (
            other.n_layers,
            other.n_heads,
            other.top_k,
            other.per_bucket,
            other.seed,
        )
        if not same:
            raise ValueError("can only merge selectors with the same shape, sizes and seed")
        seq = torch.cat([self.seq, other.seq], dim=-1)  # [L, H, NB, 2S]
        score = torch.cat([self.score, other.score], dim=-1)
        self.seq, self.score = self._keep_best(torch.arange(self.n_layers), seq, score)
        self.hist += other.hist

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only: ``seq`` [L, H, 10, S], ``score`` [L, H, 10, S], ``hist`` [L, H, 20]."""
        return {"seq": self.seq.clone(), "score": self.score.clone(), "hist": self.hist.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in ("seq", "score", "hist"):
            current = getattr(self, name)
            if state[name].shape != current.shape:
                raise ValueError(f"{name} has shape {tuple(state[name].shape)}")
            setattr(self, name, state[name].to(current.dtype).clone())

    def selected(self) -> dict[tuple[int, int], list[tuple[float, float, list[tuple[int, float]]]]]:
        """(layer, head) -> buckets, highest first: ``(lo, hi, [(sequence, max_attn), ...])``.

        Every bucket is listed, empty ones included. Within a bucket, examples are ordered by
        max attention (highest first, ties by sequence index).
        """
        # sort every bucket by (-score, seq) for display; empties last
        empty = self.seq == _EMPTY_SEQ
        primary = (-self.score.double()).masked_fill(empty, float("inf"))
        secondary = self.seq.masked_fill(empty, _SEQ_SENTINEL)
        order = secondary.argsort(dim=-1, stable=True)
        order = order.gather(-1, primary.gather(-1, order).argsort(dim=-1, stable=True))
        seqs = self.seq.gather(-1, order).tolist()
        scores = self.score.gather(-1, order).tolist()
        out = {}
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                buckets = []
                for b in reversed(range(N_BUCKETS)):
                    items = [
                        (s, v)
                        for s, v in zip(seqs[layer][head][b], scores[layer][head][b], strict=True)
                        if s != _EMPTY_SEQ
                    ]
                    buckets.append((BUCKET_EDGES[b], BUCKET_EDGES[b + 1], items))
                out[(layer, head)] = buckets
        return out

    def histograms(self) -> Tensor:
        """[L, H, 20] int64 counts of per-sequence max attention in bins of width 0.05 on [0, 1]."""
        return self.hist.clone()

    def kept(self, layer: int) -> set[tuple[int, int]]:
        """(head, sequence) of every example ``layer`` currently keeps."""
        seq = self.seq[layer]  # [H, NB, S]
        idx = (seq >= 0).nonzero()  # [N, 3]: head, bucket, slot
        seqs = seq[idx[:, 0], idx[:, 1], idx[:, 2]]
        return set(zip(idx[:, 0].tolist(), seqs.tolist(), strict=True))


class _BlockedLayer:
    """What the examples need of a layer that arrives in blocks of query rows, for every
    (sequence, head): its max attention so far and each position's payload parts (top keys
    and weights as a query, max as a query and as a key). [B, H, T]-sized, never T x T."""

    def __init__(self, batch: LayerBatch, top_k: int):
        B, H, T = batch.pattern.shape[0], batch.n_heads, batch.seq_len
        self.top_k = min(top_k, T)
        self.maxima = batch.pattern.new_zeros(B, H)  # [B, H]
        self.weights = batch.pattern.new_zeros(B, H, T, self.top_k)  # [B, H, T, K]
        self.keys = torch.zeros(B, H, T, self.top_k, dtype=torch.long)  # [B, H, T, K]
        self.row_max = batch.pattern.new_zeros(B, H, T)  # [B, H, T]
        self.received_max = batch.pattern.new_zeros(B, H, T)  # [B, H, T]

    def add(self, batch: LayerBatch) -> None:
        s, S = batch.row_start, batch.row_stop
        B, H, r, _ = batch.pattern.shape
        self.maxima = torch.maximum(self.maxima, batch.row_max.amax(-1))
        self.row_max[:, :, s:S] = batch.row_max
        rows = batch.pattern
        if self.top_k > S:  # the first rows see fewer keys than a payload lists
            rows = torch.nn.functional.pad(rows, (0, self.top_k - S))
        w, k = causal_topk(rows.flatten(0, 1), self.top_k, s)  # [B * H, r, K]
        self.weights[:, :, s:S] = w.view(B, H, r, -1)
        self.keys[:, :, s:S] = k.view(B, H, r, -1).cpu()
        # the largest weight each key receives from the block's later valid queries; a copy
        # of the block, which the next accumulators still read
        got = received_maxima_(batch.pattern.flatten(0, 1).clone(), _repeat(batch.valid, H), s)
        torch.maximum(self.received_max[:, :, :S], got.view(B, H, S), out=got.view(B, H, S))
        self.received_max[:, :, :S] = got.view(B, H, S)


def _repeat(valid: Tensor, heads: int) -> Tensor:
    """[B, T] -> [B * heads, T], each sequence's row once per head."""
    return valid.repeat_interleave(heads, 0)


class Examples:
    """Example sequences of every head and what each one shows, as one accumulator.

    :class:`ExampleSelector` chooses the sequences; :class:`ExamplePayloads` keeps the display
    data of the (layer, head, sequence) triples the selection holds, captured from the batch the
    sequence arrives in. Exact under any split: the selection is order-independent and a
    payload depends only on its own sequence.
    """

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        top_k: int = 10,
        per_bucket: int = 3,
        seed: int = 0,
        *,
        sparse_top_k: int = 2,
        sparse_threshold: float = 0.15,
    ):
        self.selector = ExampleSelector(n_layers, n_heads, top_k, per_bucket, seed)
        self.payloads = ExamplePayloads(sparse_top_k, sparse_threshold)
        self._blocked: _BlockedLayer | None = None  # the layer whose row blocks are arriving

    def update(self, batch: LayerBatch) -> None:
        """Offer the batch (needs ``seq_idx``); capture payloads of newly kept examples.

        A layer in blocks of query rows is offered on its last block: until then every head's
        payload parts are gathered row block by row block (:class:`_BlockedLayer`)."""
        if not batch.is_whole:
            if batch.row_start == 0:
                self._blocked = _BlockedLayer(batch, self.payloads.top_k)
            assert self._blocked is not None, "blocks of a layer must start at row 0"
            self._blocked.add(batch)
            if batch.is_last:
                blocked, self._blocked = self._blocked, None
                self._offer(batch, blocked.maxima, blocked)
            return
        self._offer(batch, sequence_max_attention(batch), None)

    def _offer(self, batch: LayerBatch, max_attn: Tensor, blocked: _BlockedLayer | None) -> None:
        layer, seq_idx = batch.layer, batch.need("seq_idx")
        self.selector.offer(layer, seq_idx, max_attn)
        kept = (
            (self.selector.seq[layer][None] == seq_idx[:, None, None, None]).flatten(2).any(-1)
        )  # [B, H]
        bi, hi = kept.nonzero(as_tuple=True)
        fresh = torch.tensor(
            [
                (layer, h, s) not in self.payloads
                for h, s in zip(hi.tolist(), seq_idx[bi].tolist(), strict=True)
            ],
            dtype=torch.bool,
        )
        bi, hi = bi[fresh], hi[fresh]
        if blocked is None:
            self.payloads.add(layer, batch, bi, hi, seq_idx[bi])
        else:
            parts = (
                blocked.keys[bi, hi],
                blocked.weights[bi, hi],
                blocked.row_max[bi, hi],
                blocked.received_max[bi, hi],
            )
            lengths = batch.valid.sum(-1)
            self.payloads.store(layer, batch, bi, hi, seq_idx[bi], lengths, parts)
        self.payloads.prune(layer, self.selector.kept(layer))

    def merge(self, other: Examples) -> None:
        self.selector.merge(other.selector)
        self.payloads.merge(other.payloads)
        for layer in list(self.payloads.items):
            self.payloads.prune(layer, self.selector.kept(layer))

    def state_dict(self) -> dict[str, Tensor]:
        """The selector's ``seq``, ``score``, ``hist`` and the payloads' tensors as
        ``payload.<name>``."""
        return {
            **self.selector.state_dict(),
            **{f"payload.{k}": v for k, v in self.payloads.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.selector.load_state_dict({k: state[k] for k in ("seq", "score", "hist")})
        prefix = "payload."
        self.payloads.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
