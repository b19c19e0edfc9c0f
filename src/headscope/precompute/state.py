"""Everything a precompute accumulates while streaming, as one checkpointable, mergeable object.

All of it is tensors (saved with safetensors, no pickle). Merging two states computed on
disjoint sequences (two ranks, or two resumed halves) gives the same result as one stream.
"""

from __future__ import annotations

import torch
from torch import Tensor

from headscope.metrics.registry import LayerBatch, MetricAccumulator, TokenMatches
from headscope.model.spec import ArchSpec
from headscope.precompute.config import PrecomputeConfig
from headscope.precompute.examples import (
    ExampleSelector,
    causal_topk,
    received_maxima_,
    sequence_max_attention,
)
from headscope.precompute.motifs import motif_features
from headscope.precompute.pca import PairCollector
from headscope.precompute.toptokens import TopTokens

_PAYLOAD_CHUNK = 8  # patterns per gathered copy in ExamplePayloads.add (8 x 1 MB at T = 512)


class ExamplePayloads:
    """The display data (sparse pattern, max-as-query, max-as-key) of every kept example.

    Captured while the sequence streams past, so no second pass over the data is needed; entries
    a head no longer keeps are dropped by :meth:`prune`."""

    def __init__(self, top_k: int, threshold: float):
        self.top_k, self.threshold = top_k, threshold
        self.items: dict[tuple[int, int, int], tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        # token ids and document starts of every sequence some payload refers to
        self.sequences: dict[int, tuple[Tensor, Tensor]] = {}

    def add_sequences(
        self, seq_idx: Tensor, tokens: Tensor, doc_start: Tensor, valid: Tensor
    ) -> None:
        lengths = valid.sum(-1).tolist()
        for i, s in enumerate(seq_idx.tolist()):
            if s not in self.sequences:
                n = lengths[i]
                self.sequences[s] = (tokens[i, :n].int().clone(), doc_start[i, :n].clone())

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
            mq = batch.row_max[bc, hc].half()  # [n, T]: max over keys >= 1, as in the selection
            mk = received_maxima_(rows, batch.valid[bc]).half()  # consumes rows
            for i, (h, s, n) in enumerate(
                zip(
                    hc.tolist(),
                    seq_ids[c : c + _PAYLOAD_CHUNK].tolist(),
                    lengths[bc].tolist(),
                    strict=True,
                )
            ):
                self.items[(layer, h, s)] = (
                    k[i, :n].short(),
                    w[i, :n].half(),
                    mq[i, :n],
                    mk[i, :n],
                )

    def prune(self, keep: set[tuple[int, int, int]]) -> None:
        self.items = {key: v for key, v in self.items.items() if key in keep}
        used = {s for _, _, s in self.items}
        self.sequences = {s: v for s, v in self.sequences.items() if s in used}

    def example(self, layer: int, head: int, seq: int) -> dict:
        k, w, mq, mk = self.items[(layer, head, seq)]
        T = k.shape[0]
        keep = w.float() >= self.threshold
        q = torch.arange(T)[:, None].expand_as(k)[keep]
        wr = (w.float()[keep].double() * 1000).round() / 1000
        sparse = [
            [a, b, c] for a, b, c in zip(q.tolist(), k[keep].tolist(), wr.tolist(), strict=True)
        ]
        return {
            "max_as_query": [round(x, 2) for x in mq.float().tolist()],
            "max_as_key": [round(x, 2) for x in mk.float().tolist()],
            "sparse": sparse,
        }

    def state_dict(self) -> dict[str, Tensor]:
        keys = sorted(self.items)
        seqs = sorted(self.sequences)
        out: dict[str, Tensor] = {"payload.seq_ids": torch.tensor(seqs, dtype=torch.int64)}
        if seqs:
            out["payload.seq_lengths"] = torch.tensor([self.sequences[s][0].shape[0] for s in seqs])
            out["payload.seq_tokens"] = torch.cat([self.sequences[s][0] for s in seqs])
            out["payload.seq_starts"] = torch.cat([self.sequences[s][1] for s in seqs])
        if not keys:
            return {**out, "payload.keys": torch.zeros(0, 3, dtype=torch.int64)}
        lengths = torch.tensor([self.items[key][0].shape[0] for key in keys])
        return {
            **out,
            "payload.keys": torch.tensor(keys, dtype=torch.int64),
            "payload.lengths": lengths,
            "payload.k": torch.cat([self.items[key][0] for key in keys]),
            "payload.w": torch.cat([self.items[key][1] for key in keys]),
            "payload.mq": torch.cat([self.items[key][2] for key in keys]),
            "payload.mk": torch.cat([self.items[key][3] for key in keys]),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.items, self.sequences = {}, {}
        seqs = state["payload.seq_ids"].tolist()
        if seqs:
            sizes = state["payload.seq_lengths"].tolist()
            toks = state["payload.seq_tokens"].split(sizes)
            starts = state["payload.seq_starts"].split(sizes)
            self.sequences = {s: (toks[i].clone(), starts[i].clone()) for i, s in enumerate(seqs)}
        keys = state["payload.keys"].tolist()
        if not keys:
            return
        parts = [
            state[f"payload.{n}"].split(state["payload.lengths"].tolist())
            for n in ("k", "w", "mq", "mk")
        ]
        for i, key in enumerate(keys):
            self.items[tuple(key)] = tuple(p[i].clone() for p in parts)  # type: ignore[assignment]

    def merge(self, other: ExamplePayloads) -> None:
        self.items.update(other.items)
        self.sequences.update(other.sequences)


class StreamState:
    """Accumulators of one precompute stream (one rank)."""

    def __init__(self, spec: ArchSpec, cfg: PrecomputeConfig):
        L, H = spec.n_layers, spec.n_heads
        self.spec, self.cfg = spec, cfg
        self.metrics = MetricAccumulator(L, H)
        self.examples = ExampleSelector(L, H, cfg.top_k, cfg.per_bucket, cfg.seed)
        self.top_tokens = TopTokens(L, H)
        # O vectors in each head's output basis: D dims, the norms and PCA of the d_model ones
        self.pairs = PairCollector(L, H, spec.d_head, spec.d_head, n_pairs=cfg.pca_pairs)
        self.payloads = ExamplePayloads(cfg.sparse_top_k, cfg.sparse_threshold)
        self.motifs: Tensor | None = None  # [L, H, M, F] float32, filled for sequences < M
        self.motif_filled = torch.zeros(cfg.motif_sequences, dtype=torch.bool)  # [M]
        self.sequences_done = 0  # sequences of this stream processed (checkpoint position)
        self.tokens_done = 0

    def update_layer(
        self,
        layer: int,
        seq_idx: Tensor,  # [B] long
        tokens: Tensor,  # [B, T]
        doc_start: Tensor,  # [B, T] bool
        valid: Tensor,  # [B, T] bool
        pattern: Tensor,  # [B, H, T, T] float32
        q: Tensor,  # [B, H, T, D]
        k: Tensor,  # [B, H, T, D] expanded to query heads
        v_o: Tensor,  # [B, H, T, D] each key's value through W_O, in the head's output basis
        out_norm: Tensor,  # [B, H, T]
        matches: TokenMatches,
    ) -> None:
        """Reduce one layer of one batch into every accumulator."""
        batch = LayerBatch(layer, pattern, tokens, doc_start, out_norm, valid, matches=matches)
        self.metrics.update(batch)
        max_attn = sequence_max_attention(batch)  # [B, H]
        self.examples.update(layer, seq_idx, max_attn)
        # Payloads only for (head, sequence) pairs that the selection keeps and that are new.
        kept = (
            (self.examples.seq[layer][None] == seq_idx[:, None, None, None]).flatten(2).any(-1)
        )  # [B, H]
        bi, hi = kept.nonzero(as_tuple=True)
        have = self.payloads.items
        fresh = torch.tensor(
            [
                (layer, h, s) not in have
                for h, s in zip(hi.tolist(), seq_idx[bi].tolist(), strict=True)
            ],
            dtype=torch.bool,
        )
        bi, hi = bi[fresh], hi[fresh]
        if bi.numel():
            self.payloads.add_sequences(seq_idx, tokens, doc_start, valid)
        self.payloads.add(layer, batch, bi, hi, seq_idx[bi])
        self.top_tokens.update(layer, pattern, tokens, valid, batch.rows.received)
        self.pairs.update(layer, seq_idx, pattern, q, k, v_o, tokens, valid, batch.rows.group_max)
        in_motif = seq_idx < self.cfg.motif_sequences
        if in_motif.any():
            # the whole batch is the common case: no copy of the pattern then
            whole = bool(in_motif.all())
            feats = motif_features(
                pattern if whole else pattern[in_motif], valid if whole else valid[in_motif]
            )  # [B', H, F]
            if self.motifs is None:
                self.motifs = torch.zeros(
                    self.spec.n_layers, self.spec.n_heads, self.cfg.motif_sequences, feats.shape[-1]
                )
            self.motifs[layer][:, seq_idx[in_motif]] = feats.transpose(0, 1).float()
            self.motif_filled[seq_idx[in_motif]] = True

    def finish_batch(self, n_sequences: int, n_tokens: int) -> None:
        self.sequences_done += n_sequences
        self.tokens_done += n_tokens
        self.payloads.prune(set(self._kept_keys()))

    def _kept_keys(self) -> list[tuple[int, int, int]]:
        idx = (self.examples.seq >= 0).nonzero()  # [N, 4]: layer, head, bucket, slot
        seqs = self.examples.seq[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]]
        return list(zip(idx[:, 0].tolist(), idx[:, 1].tolist(), seqs.tolist(), strict=True))

    # ----- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, part in (
            ("metrics", self.metrics),
            ("examples", self.examples),
            ("top_tokens", self.top_tokens),
            ("pairs", self.pairs),
        ):
            out.update({f"{name}.{k}": v.contiguous() for k, v in part.state_dict().items()})
        out.update(self.payloads.state_dict())
        if self.motifs is not None:
            out["motifs"] = self.motifs.contiguous()
        out["motif_filled"] = self.motif_filled
        out["progress"] = torch.tensor([self.sequences_done, self.tokens_done], dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, part in (
            ("metrics", self.metrics),
            ("examples", self.examples),
            ("top_tokens", self.top_tokens),
            ("pairs", self.pairs),
        ):
            prefix = f"{name}."
            part.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
        self.payloads.load_state_dict(state)
        self.motifs = state["motifs"].clone() if "motifs" in state else None
        self.motif_filled = state["motif_filled"].clone()
        self.sequences_done, self.tokens_done = state["progress"].tolist()

    def merge(self, other: StreamState) -> None:
        """Add another rank's state (disjoint sequences)."""
        self.metrics.merge(other.metrics)
        self.examples.merge(other.examples)
        self.top_tokens.merge(other.top_tokens)
        self.pairs.merge(other.pairs)
        self.payloads.merge(other.payloads)
        if other.motifs is not None:
            if self.motifs is None:
                self.motifs = other.motifs.clone()
            else:
                fill = other.motif_filled
                self.motifs[:, :, fill] = other.motifs[:, :, fill]
        self.motif_filled |= other.motif_filled
        self.sequences_done += other.sequences_done
        self.tokens_done += other.tokens_done
        self.payloads.prune(set(self._kept_keys()))
