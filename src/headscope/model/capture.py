"""Capture what attention computes, through transformers' ``AttentionInterface``.

headscope registers one attention function, ``"headscope"``, for every model it loads. Every
supported architecture calls it with post-RoPE, post-QK-norm queries and keys, so the same code
captures q, k, v, z, scores and patterns for all of them. Outside a capture (or for layers not
asked for) it runs fused SDPA; for captured layers it computes the pattern explicitly
(softcapping and sliding windows included) and uses it for the output, so captured patterns are
exactly the ones that produced the output.

A capture that keeps nothing (``store=False``, each layer reduced by ``on_layer``) computes
every layer's scores and pattern into the same reused buffers (a :class:`Workspace`): fresh
pattern-sized tensors (tens of MB) come straight from the operating system on every allocation,
and their page faults cost more than the attention itself on a CPU.

Long sequences: inside :func:`query_blocks` such a capture computes each layer in blocks of
query rows (:func:`blocked_attention`) and hands ``on_layer`` one block at a time, so no
``T x T`` pattern is ever whole: memory grows with ``T x block``, not ``T^2``.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTN_NAME = "headscope"


@dataclass
class LayerTensors:
    """One layer's attention internals for a batch (only the parts that were asked for)."""

    layer: int
    q: torch.Tensor  # [B, H, T, D] post-RoPE (and post-QK-norm) queries
    k: torch.Tensor  # [B, KV, T, D] post-RoPE keys, one per key/value head
    v: torch.Tensor  # [B, KV, T, D] values
    z: torch.Tensor  # [B, T, H, D] per-head attention output before W_O
    scores: torch.Tensor | None = (
        None  # [B, H, T, T] pre-softmax (scaled, softcapped; masked = -inf)
    )
    pattern: torch.Tensor | None = None  # [B, H, T, T] float32 attention weights, query-major
    # A blocked capture (query_blocks): scores and pattern hold query rows row_start ..
    # row_start + r - 1 and keys 0 .. row_start + r - 1 ([B, H, r, row_start + r]; later keys
    # are masked for these rows), and z is final only up to row row_start + r - 1.
    row_start: int = 0

    def weights(self) -> torch.Tensor:
        """The pattern ``[B, H, T, T]`` (a block of rows in a blocked capture); raises if this
        capture ran without patterns."""
        if self.pattern is None:
            raise ValueError(f"layer {self.layer} was captured without patterns")
        return self.pattern


class Workspace:
    """Named scratch tensors reused from call to call (one per name, reallocated on a new shape).

    A tensor handed out under a name is overwritten the next time that name is asked for."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def flat(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        capacity: int,
    ) -> torch.Tensor:
        """A contiguous ``shape`` view into a buffer of at least ``capacity`` elements (blocks of
        growing width share one allocation)."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(
                max(numel, capacity), dtype=dtype, device=device
            )
        return buf.view(-1)[:numel].view(shape)


def _scratch(
    workspace: Workspace | None,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.get(name, shape, dtype, device)


@dataclass
class CaptureRequest:
    """Which layers to capture and what to do with them.

    ``on_layer`` is called with each captured layer's :class:`LayerTensors` during the forward
    pass, so a caller can reduce a layer's patterns and drop them before the next layer runs.
    """

    layers: frozenset[int] | None = None  # None: every layer
    patterns: bool = True
    on_layer: Callable[[LayerTensors], None] | None = None
    store: bool = True
    # Replaces the attention computation of a layer (interventions): called as
    # override(layer, query, key, value, mask, scaling, softcap, window) -> (out [B,T,H,D],
    # pattern [B,H,T,S], or None when the override keeps what it needs of it itself)
    override: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
    results: dict[int, LayerTensors] = field(default_factory=dict)
    workspace: Workspace | None = None  # created on first use when store=False

    def scratch(self) -> Workspace | None:
        """The buffers patterns are computed into: shared across layers only when nothing is
        stored."""
        if self.store:
            return None
        if self.workspace is None:
            self.workspace = Workspace()
        return self.workspace

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


_ACTIVE: contextvars.ContextVar[CaptureRequest | None] = contextvars.ContextVar(
    "headscope_capture", default=None
)
_QUERY_BLOCK: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "headscope_query_block", default=None
)


class query_blocks:
    """Context manager: captures that store nothing and reduce layers with ``on_layer``
    compute patterns ``rows`` query rows at a time (None: whole layers, the default).

    Layers no longer than ``rows`` are computed whole, exactly as without blocks."""

    def __init__(self, rows: int | None):
        if rows is not None and rows < 1:
            raise ValueError("query blocks need at least one row")
        self.rows = rows
        self._token: contextvars.Token | None = None

    def __enter__(self) -> None:
        self._token = _QUERY_BLOCK.set(self.rows)

    def __exit__(self, *exc) -> None:
        assert self._token is not None
        _QUERY_BLOCK.reset(self._token)


def causal_keep(
    t_q: int, t_k: int, window: int | None, device: torch.device
) -> torch.Tensor:  # [T_q, T_k] bool
    """True where a query may attend to a key: causal, and within the sliding window if any."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    keep = k_pos <= q_pos
    if window is not None:
        keep &= k_pos > q_pos - window
    return keep


_MASK_BLOCK = 32


def _mask_causal_(scores: torch.Tensor) -> None:
    """Set the upper triangle of ``scores [..., T, T]`` to -inf in place.

    Block by block of rows: everything right of the block's diagonal tile is filled (a write,
    no read of the scores or of a mask), and only the tile itself goes through a mask. Several
    times faster than one ``masked_fill_`` with a ``[T, T]`` mask on CPU."""
    T = scores.shape[-1]
    upper = torch.ones(_MASK_BLOCK, _MASK_BLOCK, dtype=torch.bool, device=scores.device).triu(1)
    for start in range(0, T, _MASK_BLOCK):
        stop = min(start + _MASK_BLOCK, T)
        scores[..., start:stop, stop:].fill_(float("-inf"))
        n = stop - start
        scores[..., start:stop, start:stop].masked_fill_(upper[:n, :n], float("-inf"))


def eager_attention(
    query: torch.Tensor,  # [B, H, T, D]
    key: torch.Tensor,  # [B, KV, S, D]
    value: torch.Tensor,  # [B, KV, S, D]
    mask: torch.Tensor | None,  # None (causal), bool [B|1, 1, T, S] keep-mask, or additive float
    scaling: float,
    softcap: float | None = None,
    window: int | None = None,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores [B,H,T,S], pattern [B,H,T,S] (float32) and output [B,T,H,D], computed explicitly.

    The same operations, in the same order and precision, as transformers' eager attention
    (scores in the model's dtype, softmax in float32, the output from the pattern cast back to
    the model's dtype), so the results are bit-identical to it. Query heads sharing a key/value
    head are multiplied as one group instead of repeating keys and values. With a
    ``workspace`` the scores and pattern are written into its buffers (see :class:`Workspace`).
    """
    B, H, T, D = query.shape
    S = key.shape[2]
    # Query head h reads key/value head h // rep (GQA/MQA); callers may pass keys or values
    # already expanded to one per query head.
    if key.shape[1] == value.shape[1] and H % key.shape[1] == 0:
        groups = key.shape[1]
    else:  # keys and values shared differently: expand both to one per query head
        key = key.repeat_interleave(H // key.shape[1], dim=1)
        value = value.repeat_interleave(H // value.shape[1], dim=1)
        groups = H
    rep = H // groups
    # A power-of-two scaling commutes exactly with every rounding of the product, so it is
    # applied to the queries (T x D) instead of the scores (T x S): the same bits, one pass less.
    exact = math.frexp(scaling)[0] == 0.5
    q = query * scaling if exact else query
    q_grouped = q.reshape(B, groups, rep * T, D)  # heads of a group stacked along queries
    scores = _scratch(workspace, "scores", (B, H, T, S), query.dtype, query.device)
    torch.matmul(q_grouped, key.transpose(-1, -2), out=scores.view(B, groups, rep * T, S))
    if not exact:
        scores.mul_(scaling)
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    if mask is None and window is None and T == S:
        _mask_causal_(scores)
    elif mask is None:
        scores.masked_fill_(~causal_keep(T, S, window, query.device), float("-inf"))
    elif mask.dtype == torch.bool:
        scores.masked_fill_(~mask, float("-inf"))
    elif torch.result_type(scores, mask) == scores.dtype:
        scores.add_(mask)
    else:  # a wider additive mask widens the scores, as in eager attention
        scores = scores + mask
    pattern = _scratch(workspace, "pattern", (B, H, T, S), torch.float32, query.device)
    torch.softmax(pattern.copy_(scores), dim=-1, out=pattern)  # float32 whatever the dtype
    weights = pattern
    if value.dtype != torch.float32:
        weights = _scratch(workspace, "weights", (B, H, T, S), value.dtype, query.device)
        weights.copy_(pattern)
    out = torch.matmul(weights.view(B, groups, rep * T, S), value)  # [B, groups, rep*T, D]
    return scores, pattern, out.view(B, H, T, -1).transpose(1, 2)


# Patterns of one batch and layer up to this size (float32) are computed whole; longer
# sequences in blocks of query rows that keep each block's pattern about this size.
PATTERN_BUDGET_BYTES = 256 << 20


def query_block_for(batch_size: int, n_heads: int, seq_len: int) -> int | None:
    """Query rows per block for a batch: None (whole layers) when ``[B, H, T, T]`` float32 fits
    :data:`PATTERN_BUDGET_BYTES`, else a multiple of 32 rows (at least 32) whose ``[B, H, rows,
    T]`` block does."""
    per_row = batch_size * n_heads * seq_len * 4
    if per_row * seq_len <= PATTERN_BUDGET_BYTES:
        return None
    return max(32, PATTERN_BUDGET_BYTES // per_row // 32 * 32)


def blocked_attention(
    query: torch.Tensor,  # [B, H, T, D]
    key: torch.Tensor,  # [B, KV, S, D]
    value: torch.Tensor,  # [B, KV, S, Dv]
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    window: int | None,
    workspace: Workspace | None,
    block: int,
    emit: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None],
) -> torch.Tensor:
    """:func:`eager_attention` ``block`` query rows at a time; returns the output [B, T, H, Dv].

    Each block's rows see keys up to the block's last row only (causal), so its scores and
    pattern are ``[B, H, r, S - T + stop]``. After each block, ``emit(row_start, scores,
    pattern, out)`` is called; the buffers are reused by the next block and ``out`` is final up
    to the block's last row. Per row, the same operations as :func:`eager_attention` (equal up
    to the rounding of the matrix products)."""
    B, H, T, D = query.shape
    S = key.shape[2]
    if key.shape[1] == value.shape[1] and H % key.shape[1] == 0:
        groups = key.shape[1]
    else:
        key = key.repeat_interleave(H // key.shape[1], dim=1)
        value = value.repeat_interleave(H // value.shape[1], dim=1)
        groups = H
    rep = H // groups
    exact = math.frexp(scaling)[0] == 0.5
    q = query * scaling if exact else query
    out = torch.empty(B, T, H, value.shape[-1], dtype=value.dtype, device=query.device)
    size = B * H * block * S  # the largest block: the last rows see every key
    keep = None if mask is not None else causal_keep
    for start in range(0, T, block):
        stop = min(start + block, T)
        r, n_keys = stop - start, S - T + stop
        q_block = q[:, :, start:stop].reshape(B, groups, rep * r, D)
        shape = (B, H, r, n_keys)
        scores = _scratch_flat(workspace, "scores", shape, query.dtype, query.device, size)
        torch.matmul(
            q_block, key[:, :, :n_keys].transpose(-1, -2), out=scores.view(B, groups, -1, n_keys)
        )
        if not exact:
            scores.mul_(scaling)
        if softcap is not None:
            scores.div_(softcap).tanh_().mul_(softcap)
        if mask is None and window is None and T == S:
            _mask_causal_(scores[..., start:stop])  # keys before the block are all visible
        elif keep is not None:
            rows = keep(T, S, window, query.device)[start:stop, :n_keys]
            scores.masked_fill_(~rows, float("-inf"))
        elif mask is not None and mask.dtype == torch.bool:
            scores.masked_fill_(~mask[..., start:stop, :n_keys], float("-inf"))
        elif mask is not None and torch.result_type(scores, mask) == scores.dtype:
            scores.add_(mask[..., start:stop, :n_keys])
        elif mask is not None:
            scores = scores + mask[..., start:stop, :n_keys]
        pattern = _scratch_flat(workspace, "pattern", shape, torch.float32, query.device, size)
        torch.softmax(pattern.copy_(scores), dim=-1, out=pattern)
        weights = pattern
        if value.dtype != torch.float32:
            weights = _scratch_flat(workspace, "weights", shape, value.dtype, query.device, size)
            weights.copy_(pattern)
        o = torch.matmul(weights.view(B, groups, rep * r, n_keys), value[:, :, :n_keys])
        out[:, start:stop] = o.view(B, H, r, -1).transpose(1, 2)
        emit(start, scores, pattern, out)
    return out


def attention_in_rows(
    query: torch.Tensor,  # [B, H, T, D]
    key: torch.Tensor,  # [B, KV, S, D]
    value: torch.Tensor,  # [B, KV, S, Dv]
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    window: int | None,
    emit: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None],
) -> torch.Tensor:
    """The attention output ``[B, T, H, Dv]``, computed whole by :func:`eager_attention` while
    ``[B, H, T, T]`` fits :data:`PATTERN_BUDGET_BYTES`, else :func:`blocked_attention` in blocks
    of query rows (:func:`query_block_for`); ``emit(row_start, scores, pattern, out)`` sees
    each block (one, starting at row 0, when whole). For overrides that keep a few rows of a
    pattern and must not hold a ``T x T`` one on long texts."""
    B, H, T, _ = query.shape
    block = query_block_for(B, H, T)
    if block is not None:
        return blocked_attention(
            query, key, value, mask, scaling, softcap, window, None, block, emit
        )
    scores, pattern, out = eager_attention(query, key, value, mask, scaling, softcap, window)
    emit(0, scores, pattern, out)
    return out


def _scratch_flat(
    workspace: Workspace | None,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    capacity: int,
) -> torch.Tensor:
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.flat(name, shape, dtype, device, capacity)


def headscope_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function registered with transformers as ``"headscope"``."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    request = _ACTIVE.get()
    layer = int(getattr(module, "layer_idx", -1))
    captured = request is not None and request.wants(layer)
    need_pattern = captured and request is not None and request.patterns
    block = _QUERY_BLOCK.get()
    if (
        need_pattern
        and request is not None
        and request.override is None
        and request.on_layer is not None
        and not request.store
        and block is not None
        and block < query.shape[2]
    ):
        on_layer = request.on_layer

        def emit(start: int, scores: torch.Tensor, pattern: torch.Tensor, z: torch.Tensor) -> None:
            on_layer(LayerTensors(layer, query, key, value, z, scores, pattern, row_start=start))

        z = blocked_attention(
            query,
            key,
            value,
            attention_mask,
            scaling,
            softcap,
            sliding_window,
            request.scratch(),
            block,
            emit,
        )
        return z, None
    if captured and request is not None and request.override is not None:
        out, pattern = request.override(
            layer, query, key, value, attention_mask, scaling, softcap, sliding_window
        )
        scores = None
    elif need_pattern or softcap is not None:
        scores, pattern, out = eager_attention(
            query,
            key,
            value,
            attention_mask,
            scaling,
            softcap,
            sliding_window,
            request.scratch() if request is not None else None,
        )
    else:
        scores = pattern = None
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            is_causal=attention_mask is None and query.shape[2] > 1,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        ).transpose(1, 2)
    if captured and request is not None:
        tensors = LayerTensors(
            layer=layer,
            q=query,
            k=key,
            v=value,
            z=out,
            scores=scores if request.patterns else None,
            pattern=pattern if request.patterns else None,
        )
        if request.on_layer is not None:
            request.on_layer(tensors)
        if request.store:
            request.results[layer] = tensors
    return out.contiguous(), None


def register() -> None:
    """Register the attention function (and SDPA-style masks) under ``"headscope"``; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, headscope_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


class capturing:
    """Context manager making ``request`` the active capture for forward passes inside it."""

    def __init__(self, request: CaptureRequest):
        self.request = request
        self._token: contextvars.Token | None = None

    def __enter__(self) -> CaptureRequest:
        self._token = _ACTIVE.set(self.request)
        return self.request

    def __exit__(self, *exc) -> None:
        assert self._token is not None
        _ACTIVE.reset(self._token)
