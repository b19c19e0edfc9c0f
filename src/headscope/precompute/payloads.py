"""What an example shows, captured while its sequence streams past: each query's top keys and
weights (a sparse pattern) and each position's maximum as a query and as a key
(:class:`ExamplePayloads`, fed by :class:`~headscope.precompute.examples.Examples`), with the
causal top-k and received-maxima kernels they are built from."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from headscope.metrics.registry import LayerBatch

_TOPK_ROWS = 128  # rows per block in causal_topk
_PAYLOAD_CHUNK = 8  # patterns per gathered copy in ExamplePayloads.add (8 x 1 MB at T = 512)


def causal_topk(patterns: Tensor, k: int, row_start: int = 0) -> tuple[Tensor, Tensor]:
    """``topk`` along the keys of causal ``patterns [N, T, T]`` -> values, indices ``[N, T, k]``
    (or of a block of rows ``row_start ..`` of them, ``[N, r, S]`` -> ``[N, r, k]``).

    Row block ``[s, e)`` only searches keys ``< max(e, k)``: the rest of the row is zero."""
    N, r, S = patterns.shape
    k = min(k, S)
    values = patterns.new_empty(N, r, k)
    indices = torch.empty(N, r, k, dtype=torch.long, device=patterns.device)
    for first in range(0, r, _TOPK_ROWS):
        last = min(first + _TOPK_ROWS, r)
        values[:, first:last], indices[:, first:last] = patterns[
            :, first:last, : max(row_start + last, k)
        ].topk(k, dim=-1)
    return values, indices


def received_maxima_(patterns: Tensor, valid: Tensor, row_start: int = 0) -> Tensor:
    """The largest attention each position receives from a later valid query.

    patterns: [N, T, T] causal (zero above the diagonal), or a block of its rows ``[N, r, S]``
    from ``row_start``, **overwritten**: the diagonal and the padding rows are zeroed in place,
    which saves a copy of N x T x T. valid: [N, T] bool (padding at the end). Returns [N, S]
    (the maxima over the block's rows); 0 for the last position.
    """
    patterns.diagonal(offset=row_start, dim1=-2, dim2=-1).zero_()
    rows = valid[:, row_start : row_start + patterns.shape[1]]
    if not bool(rows.all()):  # only sequences that end in padding pay for the mask
        patterns.masked_fill_(~rows[:, :, None], 0.0)
    return patterns.amax(-2)


# One example's display data: top keys [T, K] int16, their weights [T, K] float16, each
# position's max as query [T] float16 and as key [T] float16.
Payload = tuple[Tensor, Tensor, Tensor, Tensor]


@functools.cache
def _round2_table() -> np.ndarray:
    """``round(x, 2)`` of every float16 ``x``, indexed by its bits: [65536] float64."""
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    return np.array([round(v, 2) for v in values.tolist()])


def _round2(x: Tensor) -> list[float]:
    """``[round(v, 2) for v in x.tolist()]`` of a float16 tensor, by table lookup (the same
    floats, without a Python call per value)."""
    bits = x.numpy().view(np.uint16)
    return _round2_table()[bits].tolist()


class ExamplePayloads:
    """The display data (sparse pattern, max-as-query, max-as-key) of every kept example.

    Captured while the sequence streams past, so no second pass over the data is needed; entries
    a head no longer keeps are dropped by :meth:`prune`, and a sequence's tokens are dropped
    with its last entry."""

    def __init__(self, top_k: int, threshold: float):
        self.top_k, self.threshold = top_k, threshold
        self.items: dict[int, dict[tuple[int, int], Payload]] = {}  # layer -> (head, seq) -> ..
        # token ids [T] int32 and document starts [T] bool of every sequence an entry refers to
        self.sequences: dict[int, tuple[Tensor, Tensor]] = {}
        self._refs: dict[int, int] = {}  # sequence -> entries referring to it

    def __contains__(self, key: tuple[int, int, int]) -> bool:
        layer, head, seq = key
        return (head, seq) in self.items.get(layer, {})

    def add(
        self,
        layer: int,
        batch: LayerBatch,
        b: Tensor,  # [N] sequences in the batch
        heads: Tensor,  # [N]
        seq_ids: Tensor,  # [N] their sequence indices
    ) -> None:
        """Store the payloads of (layer, heads[i]) on sequence b[i] of ``batch``."""
        lengths = batch.valid.sum(-1)  # [B]
        # a few patterns at a time: the gathered copy stays small enough to reuse freed memory
        for c in range(0, b.numel(), _PAYLOAD_CHUNK):
            bc, hc = b[c : c + _PAYLOAD_CHUNK], heads[c : c + _PAYLOAD_CHUNK]
            rows = batch.pattern[bc, hc]  # [n, T, T] a copy
            w, k = causal_topk(rows, self.top_k)  # [n, T, K]
            mq = batch.row_max[bc, hc]  # [n, T]: max over keys >= 1, as in the selection
            mk = received_maxima_(rows, batch.valid[bc])  # consumes rows
            self.store(
                layer, batch, bc, hc, seq_ids[c : c + _PAYLOAD_CHUNK], lengths, (k, w, mq, mk)
            )

    def store(
        self,
        layer: int,
        batch: LayerBatch,
        b: Tensor,  # [n] sequences in the batch
        heads: Tensor,  # [n]
        seq_ids: Tensor,  # [n] their sequence indices
        lengths: Tensor,  # [B] valid tokens of every sequence of the batch
        parts: tuple[Tensor, Tensor, Tensor, Tensor],  # top keys, weights [n, T, K]; mq, mk [n, T]
    ) -> None:
        """Store payloads already computed for (layer, heads[i]) on sequence b[i] (kept on the
        host: they outlive the batch)."""
        k, w, mq, mk = (t.cpu() for t in parts)
        items = self.items.setdefault(layer, {})
        for i, (bb, h, s, n) in enumerate(
            zip(b.tolist(), heads.tolist(), seq_ids.tolist(), lengths[b].tolist(), strict=True)
        ):
            if s not in self.sequences:
                self.sequences[s] = (
                    batch.tokens[bb, :n].int().cpu().clone(),
                    batch.doc_start[bb, :n].cpu().clone(),
                )
            if (h, s) not in items:
                self._refs[s] = self._refs.get(s, 0) + 1
            items[(h, s)] = (
                k[i, :n].short(),
                w[i, :n].half(),
                mq[i, :n].half(),
                mk[i, :n].half(),
            )

    def prune(self, layer: int, keep: set[tuple[int, int]]) -> None:
        """Drop the entries of ``layer`` whose (head, sequence) is not in ``keep``."""
        items = self.items.get(layer, {})
        for key in [key for key in items if key not in keep]:
            del items[key]
            s = key[1]
            self._refs[s] -= 1
            if not self._refs[s]:
                del self._refs[s], self.sequences[s]

    def example(self, layer: int, head: int, seq: int) -> dict:
        """What the head file shows of one example: ``max_as_query``, ``max_as_key`` (rounded
        to 2 decimals) and ``sparse``: ``[query, key, weight]`` of every kept weight at or
        above the threshold, row by row, the weight rounded to 3 decimals."""
        k, w, mq, mk = self.items[layer][(head, seq)]
        # NumPy, not torch: on these few thousand numbers torch's per-call cost dominates, and
        # each torch call releases the GIL, so the head files' writer threads stall it.
        kn, wn = k.numpy(), w.numpy().astype(np.float32)  # [T, K]
        keep = wn >= np.float32(self.threshold)  # compared in float32, as torch does
        q = np.nonzero(keep)[0]  # row-major: the query of each kept weight, in order
        wr = np.round(wn[keep].astype(np.float64) * 1000) / 1000
        sparse = [
            [a, b, c] for a, b, c in zip(q.tolist(), kn[keep].tolist(), wr.tolist(), strict=True)
        ]
        return {"max_as_query": _round2(mq), "max_as_key": _round2(mk), "sparse": sparse}

    def _all(self) -> dict[tuple[int, int, int], Payload]:
        return {(lay, h, s): v for lay, items in self.items.items() for (h, s), v in items.items()}

    def state_dict(self) -> dict[str, Tensor]:
        """``keys`` [N, 3] (layer, head, sequence), their ``lengths`` and concatenated ``k``,
        ``w``, ``mq``, ``mk``; ``seq_ids``, ``seq_lengths``, ``seq_tokens``, ``seq_starts``."""
        items = self._all()
        keys = sorted(items)
        seqs = sorted(self.sequences)
        out: dict[str, Tensor] = {"seq_ids": torch.tensor(seqs, dtype=torch.int64)}
        if seqs:
            out["seq_lengths"] = torch.tensor([self.sequences[s][0].shape[0] for s in seqs])
            out["seq_tokens"] = torch.cat([self.sequences[s][0] for s in seqs])
            out["seq_starts"] = torch.cat([self.sequences[s][1] for s in seqs])
        if not keys:
            return {**out, "keys": torch.zeros(0, 3, dtype=torch.int64)}
        return {
            **out,
            "keys": torch.tensor(keys, dtype=torch.int64),
            "lengths": torch.tensor([items[key][0].shape[0] for key in keys]),
            **{
                name: torch.cat([items[key][i] for key in keys])
                for i, name in enumerate(("k", "w", "mq", "mk"))
            },
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.items, self.sequences = {}, {}
        seqs = state["seq_ids"].tolist()
        if seqs:
            sizes = state["seq_lengths"].tolist()
            toks = state["seq_tokens"].split(sizes)
            starts = state["seq_starts"].split(sizes)
            self.sequences = {s: (toks[i].clone(), starts[i].clone()) for i, s in enumerate(seqs)}
        keys = state["keys"].tolist()
        if keys:
            sizes = state["lengths"].tolist()
            parts = [state[name].split(sizes) for name in ("k", "w", "mq", "mk")]
            for i, (layer, head, seq) in enumerate(keys):
                k, w, mq, mk = (p[i].clone() for p in parts)
                self.items.setdefault(layer, {})[(head, seq)] = (k, w, mq, mk)
        self._count_refs()

    def merge(self, other: ExamplePayloads) -> None:
        """Add another shard's entries (disjoint sequences); prune afterwards."""
        for layer, items in other.items.items():
            self.items.setdefault(layer, {}).update(items)
        self.sequences.update(other.sequences)
        self._count_refs()

    def _count_refs(self) -> None:
        self._refs = {}
        for items in self.items.values():
            for _, s in items:
                self._refs[s] = self._refs.get(s, 0) + 1
