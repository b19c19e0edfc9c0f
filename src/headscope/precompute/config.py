"""The precompute's configuration: one frozen dataclass, written whole into the run manifest."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class PrecomputeConfig:
    model: str = "default"
    data: str | None = None  # None: the default corpus (built on first use)
    text_field: str = "text"
    sequences: int | None = 256
    tokens: int | None = None  # alternative to ``sequences``: ceil(tokens / seq_len) sequences
    seq_len: int = 512
    batch_size: int = 4
    dtype: str = "fp32"  # "fp32" or "bf16"
    device: str = "cpu"
    layers: tuple[int, ...] | None = None  # None: every layer
    seed: int = 0
    # examples per head: a deterministic top-K in the top bucket, a reservoir in the others
    # sized so a head's payload stays under 0.5 MB at 512-token sequences (docs/run-format.md)
    top_k: int = 6
    per_bucket: int = 2
    sparse_top_k: int = 2  # keys kept per query row in an example's sparse pattern
    sparse_threshold: float = 0.15
    pca_pairs: int = 256  # (query, key) pairs per head for the Q/K/O PCA
    motif_sequences: int = 32  # sequences whose patterns feed the motif embedding
    probe_sequences: int = 16  # repeated-random-token sequences per synthetic probe
    probe_length: int = 48
    checkpoint_every: int = 8  # batches between checkpoints
    # query rows per block of a layer's patterns (memory grows with seq_len x query_block);
    # None: whole layers while a batch's patterns fit 256 MB, blocks beyond (runner.py)
    query_block: int | None = None

    @property
    def n_sequences(self) -> int:
        if self.tokens is not None:
            return math.ceil(self.tokens / self.seq_len)
        if self.sequences is None:
            raise ValueError("give sequences or tokens")
        return self.sequences

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = list(self.layers) if self.layers is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecomputeConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown precompute settings: {sorted(unknown)}")
        values = dict(data)
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        return cls(**values)

    def validate(self, n_layers: int) -> None:
        if self.seq_len < 8:
            raise ValueError("seq_len must be at least 8")
        if self.n_sequences < 1 or self.batch_size < 1:
            raise ValueError("need at least one sequence and a batch size of at least 1")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError("dtype must be fp32 or bf16")
        if self.query_block is not None and self.query_block < 1:
            raise ValueError("query_block must be at least 1")
        if self.layers is not None and not all(0 <= x < n_layers for x in self.layers):
            raise ValueError(f"layers must be in 0..{n_layers - 1}")
