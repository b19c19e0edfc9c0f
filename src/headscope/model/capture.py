"""Capture what attention computes, through transformers' ``AttentionInterface``.

headscope registers one attention function, ``"headscope"``, for every model it loads. Every
supported architecture calls it with post-RoPE, post-QK-norm queries and keys, so the same code
captures q, k, v, z, scores and patterns for all of them. Outside a capture (or for layers not
asked for) it runs fused SDPA; for captured layers it computes the pattern explicitly
(softcapping and sliding windows included) and uses it for the output, so captured patterns are
exactly the ones that produced the output.
"""

from __future__ import annotations

import contextvars
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

    def weights(self) -> torch.Tensor:
        """The pattern ``[B, H, T, T]``; raises if this capture ran without patterns."""
        if self.pattern is None:
            raise ValueError(f"layer {self.layer} was captured without patterns")
        return self.pattern


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
    # override(layer, query, key, value, mask, scaling, softcap, window) -> (out [B,T,H,D], pattern)
    override: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    results: dict[int, LayerTensors] = field(default_factory=dict)

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


_ACTIVE: contextvars.ContextVar[CaptureRequest | None] = contextvars.ContextVar(
    "headscope_capture", default=None
)


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


def eager_attention(
    query: torch.Tensor,  # [B, H, T, D]
    key: torch.Tensor,  # [B, KV, S, D]
    value: torch.Tensor,  # [B, KV, S, D]
    mask: torch.Tensor | None,  # None (causal), bool [B|1, 1, T, S] keep-mask, or additive float
    scaling: float,
    softcap: float | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores [B,H,T,S], pattern [B,H,T,S] (float32) and output [B,T,H,D], computed explicitly.

    The softmax runs in float32 as in transformers' eager attention; the output uses the pattern
    cast to the model's dtype, exactly as eager attention does."""
    # Query head h reads key/value head h // rep (GQA/MQA); callers may pass keys or values
    # already expanded to one per query head.
    rep_k, rep_v = query.shape[1] // key.shape[1], query.shape[1] // value.shape[1]
    k = key.repeat_interleave(rep_k, dim=1) if rep_k > 1 else key
    v = value.repeat_interleave(rep_v, dim=1) if rep_v > 1 else value
    scores = torch.matmul(query, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        keep = causal_keep(query.shape[2], key.shape[2], window, query.device)
        scores = scores.masked_fill(~keep, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    pattern = torch.softmax(scores.float(), dim=-1)  # float32 whatever the model's dtype
    out = torch.matmul(pattern.to(v.dtype), v).transpose(1, 2)
    return scores, pattern, out


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
    if captured and request is not None and request.override is not None:
        out, pattern = request.override(
            layer, query, key, value, attention_mask, scaling, softcap, sliding_window
        )
        scores = None
    elif need_pattern or softcap is not None:
        scores, pattern, out = eager_attention(
            query, key, value, attention_mask, scaling, softcap, sliding_window
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
