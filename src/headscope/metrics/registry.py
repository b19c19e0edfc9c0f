"""The metric registry, the per-layer input every streaming metric reads, and the accumulator.

A metric is one small function registered with :func:`register_metric`. The first paragraph of
its docstring is what the UI shows next to the metric, so write it for a user, not a developer.

Two signatures, one per kind:

* ``kind="stream"``: ``fn(batch: LayerBatch) -> MetricPartial``. The metric sees one layer of one
  batch at a time and returns a per-head total and count; its value over a dataset is
  ``sum(total) / sum(count)`` over all batches (float64), so shards merge exactly by adding.
  :class:`MetricAccumulator` (an :class:`~headscope.metrics.accumulator.Accumulator`) runs them.
* ``kind="probe"`` and ``kind="weights"``: ``fn(probe) -> Tensor [L, H]``, where ``probe`` is the
  model-side context of ``headscope.precompute.probes.Probe`` (the model, the layers, the probe
  sizes and seed). Probes run the model on synthetic sequences, weight metrics read its weights;
  neither depends on the dataset. They are registered where the model is available
  (``precompute/probes.py``), since this package never imports the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from headscope.metrics.rows import RowReductions, row_reductions

MetricKind = Literal["stream", "probe", "weights"]
METRIC_KINDS: tuple[str, ...] = ("stream", "probe", "weights")


@dataclass(frozen=True)
class MetricPartial:
    """One batch's contribution to a streaming metric: value = sum(total) / sum(count)."""

    total: Tensor  # [H] float64
    count: Tensor  # [H] float64


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: its name, function, UI text (first docstring paragraph) and kind."""

    name: str
    fn: Callable
    doc: str
    kind: MetricKind


METRICS: dict[str, MetricSpec] = {}


def _first_paragraph(docstring: str | None) -> str:
    text = inspect.cleandoc(docstring or "")
    return " ".join(text.split("\n\n", 1)[0].split())


def register_metric(name: str, kind: MetricKind = "stream") -> Callable[[Callable], Callable]:
    """Register ``fn`` under ``name``; its docstring's first paragraph becomes the UI text.

    Raises ``ValueError`` for an unknown kind, a duplicate name, or a missing docstring (a metric
    without an explanation cannot be shown in the UI).
    """
    if kind not in METRIC_KINDS:
        raise ValueError(f"unknown metric kind {kind!r}; expected one of {METRIC_KINDS}")

    def decorator(fn: Callable) -> Callable:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        doc = _first_paragraph(fn.__doc__)
        if not doc:
            raise ValueError(f"metric {name!r} needs a docstring: it is shown in the UI")
        METRICS[name] = MetricSpec(name=name, fn=fn, doc=doc, kind=kind)
        return fn

    return decorator


def metric_docs(kind: MetricKind | None = None) -> dict[str, str]:
    """Name -> one-paragraph explanation for every registered metric (of one kind, if given)."""
    return {name: spec.doc for name, spec in METRICS.items() if kind is None or spec.kind == kind}


def stream_metric_names() -> list[str]:
    """Names of all registered streaming metrics, in registration order."""
    return [name for name, spec in METRICS.items() if spec.kind == "stream"]


def model_metric_names() -> list[str]:
    """Names of all registered probe and weight metrics (``fn(probe) -> [L, H]``), in
    registration order."""
    return [name for name, spec in METRICS.items() if spec.kind != "stream"]


@dataclass(frozen=True, eq=False)
class TokenMatches:
    """Earlier occurrences of each query's token in a batch, as flat (batch, query, key) lists.

    ``dup_*``: key ``k`` holds the same token as query ``q``, with ``1 <= k < q``.
    ``ind_*``: the token *before* key ``k`` is the query's token (``tokens[k-1] == tokens[q]``),
    with ``1 <= k < q`` -- the key an induction head attends to.
    Only valid (non-padding) queries appear. Key 0 (the attention sink) never counts as a match.
    Matches across packed-document boundaries do count: the model sees the whole packed
    sequence, and nothing stops a head from copying across a boundary.

    Depends only on the tokens, so the precompute can build it once per batch and share it
    between layers.
    """

    dup_b: Tensor  # [N_dup] int64
    dup_q: Tensor  # [N_dup] int64
    dup_k: Tensor  # [N_dup] int64
    ind_b: Tensor  # [N_ind] int64
    ind_q: Tensor  # [N_ind] int64
    ind_k: Tensor  # [N_ind] int64

    @classmethod
    def from_tokens(cls, tokens: Tensor, valid: Tensor) -> TokenMatches:
        """tokens: [B, T] int64, valid: [B, T] bool. Lists ordered by (batch, query, key).

        Queries are compared in blocks of rows, so no [B, T, T] comparison is ever whole."""
        T = tokens.shape[1]
        found = []
        for start in range(0, T, _MATCH_ROWS):
            stop = min(start + _MATCH_ROWS, T)
            same = tokens[:, start:stop, None] == tokens[:, None, :stop]  # [B, r(q), stop(j)]
            same &= valid[:, start:stop, None]
            same.tril_(start - 1)  # j < q
            b, q, j = same.nonzero(as_tuple=True)  # [N] each: q's token occurred earlier at j
            found.append((b, q + start, j))
        b, q, j = (torch.cat(parts) for parts in zip(*found, strict=True))
        if len(found) > 1 and tokens.shape[0] > 1:  # blocks came query-major: batch first
            order = b.argsort(stable=True)
            b, q, j = b[order], q[order], j[order]
        dup = j >= 1
        ind = j <= q - 2  # the successor j + 1 of the earlier copy lies strictly before q
        return cls(
            dup_b=b[dup],
            dup_q=q[dup],
            dup_k=j[dup],
            ind_b=b[ind],
            ind_q=q[ind],
            ind_k=j[ind] + 1,
        )


_MATCH_ROWS = 1024  # query rows per block in TokenMatches.from_tokens


@dataclass(frozen=True, eq=False)
class LayerBatch:
    """Everything an accumulator sees for one layer of one batch (or of one block of its rows).

    **Blocks of query rows.** For long sequences a layer may arrive as consecutive blocks of
    query rows ``row_start .. row_stop - 1`` (in order, the last one ending at ``seq_len``):
    ``pattern`` is then ``[B, H, r, row_stop]`` (the keys those rows can see) and
    ``head_out_norm`` covers the block's rows; everything else covers the whole sequence. A
    whole layer is the block ``row_start = 0``, ``r = T``. Per-row quantities (``query_mask``,
    ``row_max``, ``rows``) are the block's; accumulators whose result needs whole rows of keys
    or whole sequences (examples, motifs, the count of keys in top tokens) finish the layer on
    its last block (:attr:`is_last`).

    The optional fields are filled by the precompute (which has the model) so that no
    accumulator has to reach back into the model; an accumulator that needs one reads it with
    :meth:`need`. ``matches`` may be passed in to share the token matching between layers;
    otherwise it is computed on first use. Derived quantities (``query_mask``, ``row_max``,
    ``rows``, anything stored with :meth:`memo`) are cached on the object, so accumulators that
    share them compute them once.
    """

    layer: int
    # [B, H, r, row_stop] float32, causal, rows sum to 1: pattern[b, h, q - row_start, k]
    # (a whole layer: [B, H, T, T])
    pattern: Tensor
    tokens: Tensor  # [B, T] int64
    doc_start: Tensor  # [B, T] bool, True where a document starts (position 0 always)
    head_out_norm: Tensor  # [B, H, r] float32, ||z_h @ W_O[h]|| at each query row of the block
    valid: Tensor  # [B, T] bool, False for padding at the end
    matches: TokenMatches | None = field(default=None)
    seq_idx: Tensor | None = None  # [B] int64, dataset index of each sequence
    q: Tensor | None = None  # [B, H, T, D] float32 queries, post-RoPE and post-QK-norm
    k: Tensor | None = None  # [B, H, T, D] float32 keys, one per query head (GQA expanded)
    # [B, H, T, D_o] float32: each key's value through the head's W_O (its output per unit of
    # attention), in any orthonormal basis of W_O[h]'s row space (the precompute: D_o = D)
    v_o: Tensor | None = None
    row_start: int = 0  # first query row of the block (0 for a whole layer)
    _memo: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        B, H, r, S = self.pattern.shape
        T = self.tokens.shape[-1]
        if self.row_start + r != S or S > T or self.row_start < 0:
            raise ValueError(
                f"pattern must be [B, H, T, T] (or a block of rows [B, H, r, row_start + r]), "
                f"got {tuple(self.pattern.shape)} at row_start {self.row_start} for {T} tokens"
            )
        # q, k and v_o: [B, H, T, any width]
        for name, shape, dims in (
            ("tokens", (B, T), 2),
            ("doc_start", (B, T), 2),
            ("valid", (B, T), 2),
            ("head_out_norm", (B, H, r), 3),
            ("seq_idx", (B,), 1),
            ("q", (B, H, T), 4),
            ("k", (B, H, T), 4),
            ("v_o", (B, H, T), 4),
        ):
            value = getattr(self, name)
            if value is not None and (value.dim() != dims or tuple(value.shape[:3]) != shape):
                want = f"{shape}" + (" + (D,)" if dims == 4 else "")
                raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")

    @property
    def n_heads(self) -> int:
        return self.pattern.shape[1]

    @property
    def seq_len(self) -> int:
        """T, the length of the (padded) sequences."""
        return self.tokens.shape[-1]

    @property
    def row_stop(self) -> int:
        """One past the block's last query row (also the number of keys it sees)."""
        return self.pattern.shape[-1]

    @property
    def is_last(self) -> bool:
        """The layer's last block (for a whole layer: always)."""
        return self.row_stop == self.seq_len

    @property
    def is_whole(self) -> bool:
        """The whole layer in one block."""
        return self.row_start == 0 and self.is_last

    def need(self, name: str) -> Tensor:
        """The optional field ``name`` (``seq_idx``, ``q``, ``k``, ``v_o``); raises a clear error
        when the batch was built without it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this accumulator needs LayerBatch.{name}, which was not given")
        return value

    def memo(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()`` once per batch under ``key``, for intermediates several metrics share."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @cached_property
    def query_mask(self) -> Tensor:
        """[B, r] bool: the block's valid queries at position >= 1 (row 0 always attends only to
        itself)."""
        mask = self.valid[:, self.row_start : self.row_stop].clone()
        if self.row_start == 0:
            mask[:, 0] = False
        return mask

    @cached_property
    def row_max(self) -> Tensor:
        """[B, H, r] float32: max attention of each query row of the block, key 0 excluded.

        Zero for row 0 and for padding rows.
        """
        return torch.where(self.query_mask[:, None, :], self.rows.row_max, 0.0)

    @cached_property
    def rows(self) -> RowReductions:
        """Entropy, maxima, distance moments, attention received, key-group maxima of every row
        (:func:`~headscope.metrics.rows.row_reductions`, one pass over the pattern)."""
        return row_reductions(self.pattern, self.valid, self.row_start)

    @cached_property
    def token_matches(self) -> TokenMatches:
        """The whole sequences' matches (see :meth:`block_matches` for the block's)."""
        if self.matches is not None:
            return self.matches
        return TokenMatches.from_tokens(self.tokens, self.valid)

    def block_matches(self, kind: Literal["dup", "ind"]) -> tuple[Tensor, Tensor, Tensor]:
        """(batch, query row in the block, key) of the ``kind`` matches whose query is in the
        block, each [N] int64: ``pattern[b, :, q, k]`` is their attention."""
        m = self.token_matches
        b, q, k = getattr(m, f"{kind}_b"), getattr(m, f"{kind}_q"), getattr(m, f"{kind}_k")
        if self.is_whole:
            return b, q, k
        key = f"block_matches.{kind}"
        if key not in self._memo:
            inside = (q >= self.row_start) & (q < self.row_stop)
            self._memo[key] = torch.stack([b[inside], q[inside] - self.row_start, k[inside]])
        b, q, k = self._memo[key]
        return b, q, k


class MetricAccumulator:
    """Running per-head sums of streaming metrics over a dataset, for every layer.

    ``update`` adds one layer batch; ``merge`` adds another accumulator (e.g. a shard computed on
    another machine) -- exact, because both are sums; ``result`` divides. ``state_dict`` holds
    tensors only (for safetensors checkpoints).
    """

    def __init__(self, n_layers: int, n_heads: int, names: Iterable[str] | None = None):
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.names = list(stream_metric_names() if names is None else names)
        for name in self.names:
            if name not in METRICS or METRICS[name].kind != "stream":
                raise KeyError(f"{name!r} is not a registered streaming metric")
        M = len(self.names)
        self.total = torch.zeros(M, n_layers, n_heads, dtype=torch.float64)  # [M, L, H]
        self.count = torch.zeros(M, n_layers, n_heads, dtype=torch.float64)  # [M, L, H]

    def update(self, batch: LayerBatch) -> None:
        """Add one layer batch to every metric of this accumulator."""
        if batch.n_heads != self.n_heads:
            raise ValueError(f"batch has {batch.n_heads} heads, accumulator {self.n_heads}")
        for i, name in enumerate(self.names):
            part: MetricPartial = METRICS[name].fn(batch)
            self.total[i, batch.layer] += part.total.to(self.total.device)
            self.count[i, batch.layer] += part.count.to(self.count.device)

    def merge(self, other: MetricAccumulator) -> None:
        """Add another accumulator's sums into this one (same layers, heads and metrics)."""
        if other.names != self.names or other.total.shape != self.total.shape:
            raise ValueError("can only merge accumulators with the same metrics and shape")
        self.total += other.total
        self.count += other.count

    def state_dict(self) -> dict[str, Tensor]:
        """``{"<metric>.total": [L, H], "<metric>.count": [L, H]}``, float64."""
        state = {}
        for i, name in enumerate(self.names):
            state[f"{name}.total"] = self.total[i].clone()
            state[f"{name}.count"] = self.count[i].clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for i, name in enumerate(self.names):
            for attr in ("total", "count"):
                value = state[f"{name}.{attr}"]
                if value.shape != (self.n_layers, self.n_heads):
                    raise ValueError(f"{name}.{attr} has shape {tuple(value.shape)}")
                getattr(self, attr)[i] = value.to(torch.float64)

    def result(self) -> dict[str, Tensor]:
        """Metric name -> [L, H] float64 mean. NaN where a head saw no eligible query."""
        value = self.total / self.count  # [M, L, H]; 0/0 -> NaN, on purpose
        return {name: value[i] for i, name in enumerate(self.names)}
