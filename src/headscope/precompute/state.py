"""Everything a precompute accumulates while streaming, as one checkpointable, mergeable object.

:class:`StreamState` is a named set of :class:`~headscope.metrics.accumulator.Accumulator`
objects and loops over them: every layer batch goes to each of them, and checkpoints and merges
are theirs, prefixed by their names. All of it is tensors (saved with safetensors, no pickle).
Merging two states computed on disjoint sequences (two ranks, or two resumed halves) gives the
same result as one stream.
"""

from __future__ import annotations

import torch
from torch import Tensor

from headscope.errors import DataError
from headscope.metrics.accumulator import Accumulator
from headscope.metrics.registry import LayerBatch, MetricAccumulator
from headscope.model.spec import ArchSpec
from headscope.precompute.config import PrecomputeConfig
from headscope.precompute.examples import Examples
from headscope.precompute.motifs import MotifFeatures
from headscope.precompute.pca import PairCollector
from headscope.precompute.toptokens import TopTokens

# Bumped whenever the checkpoint's tensor names or meanings change, so a run resumed by another
# headscope version fails with a message instead of a KeyError.
STATE_FORMAT = 3  # 3: the Q/K/O pairs keep their token context (pairs.window)


class StreamState:
    """The accumulators of one precompute stream (one rank), and how far it has got."""

    def __init__(self, spec: ArchSpec, cfg: PrecomputeConfig):
        L, H = spec.n_layers, spec.n_heads
        self.metrics = MetricAccumulator(L, H)
        self.examples = Examples(
            L,
            H,
            cfg.top_k,
            cfg.per_bucket,
            cfg.seed,
            sparse_top_k=cfg.sparse_top_k,
            sparse_threshold=cfg.sparse_threshold,
        )
        self.top_tokens = TopTokens(L, H)
        # O vectors in each head's output basis: D dims, the norms and PCA of the d_model ones
        self.pairs = PairCollector(L, H, spec.d_head, spec.d_head, n_pairs=cfg.pca_pairs)
        self.motifs = MotifFeatures(L, H, cfg.motif_sequences)
        self.accumulators: dict[str, Accumulator] = {
            "metrics": self.metrics,
            "examples": self.examples,
            "top_tokens": self.top_tokens,
            "pairs": self.pairs,
            "motifs": self.motifs,
        }
        self.sequences_done = 0  # sequences of this stream processed (checkpoint position)
        self.tokens_done = 0

    def update(self, batch: LayerBatch) -> None:
        """Reduce one layer of one batch into every accumulator."""
        for acc in self.accumulators.values():
            acc.update(batch)

    def finish_batch(self, n_sequences: int, n_tokens: int) -> None:
        """Count a batch whose layers have all been reduced."""
        self.sequences_done += n_sequences
        self.tokens_done += n_tokens

    def state_dict(self) -> dict[str, Tensor]:
        """``<accumulator>.<tensor>`` for every accumulator, ``progress`` and ``format``."""
        out: dict[str, Tensor] = {}
        for name, acc in self.accumulators.items():
            out.update({f"{name}.{k}": v.contiguous() for k, v in acc.state_dict().items()})
        out["progress"] = torch.tensor([self.sequences_done, self.tokens_done], dtype=torch.int64)
        out["format"] = torch.tensor([STATE_FORMAT], dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        found = state["format"].tolist() if "format" in state else [1]
        if found != [STATE_FORMAT]:
            raise DataError(
                f"the checkpoint was written by another headscope version (state format "
                f"{found[0]}, expected {STATE_FORMAT}); delete the run's checkpoint/ folder "
                "to start over"
            )
        for name, acc in self.accumulators.items():
            prefix = f"{name}."
            acc.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
        self.sequences_done, self.tokens_done = state["progress"].tolist()

    def merge(self, other: StreamState) -> None:
        """Add another rank's state (disjoint sequences)."""
        for name, acc in self.accumulators.items():
            acc.merge(other.accumulators[name])
        self.sequences_done += other.sequences_done
        self.tokens_done += other.tokens_done
