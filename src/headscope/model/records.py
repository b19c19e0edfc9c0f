"""The adapter's records: one layer's head-major attention weights, a norm's affine part, and
what one forward pass captured."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from headscope.model import capture as cap


@dataclass(frozen=True)
class HeadWeights:
    """One layer's attention weights, head-major (TransformerLens convention: x @ W)."""

    W_Q: torch.Tensor  # [H, d_model, D]
    b_Q: torch.Tensor  # [H, D]
    W_K: torch.Tensor  # [KV, d_model, D]
    b_K: torch.Tensor  # [KV, D]
    W_V: torch.Tensor  # [KV, d_model, D]
    b_V: torch.Tensor  # [KV, D]
    W_O: torch.Tensor  # [H, D, d_model]
    b_O: torch.Tensor  # [d_model]
    kv_of_head: torch.Tensor  # [H] long: the key/value head each query head reads (GQA/MQA)


@dataclass(frozen=True)
class NormWeights:
    """A norm's effective affine part: ``normed = f(x) * factor * weight + bias``."""

    weight: torch.Tensor  # [d] (includes Gemma's +1 offset)
    bias: torch.Tensor | None  # [d] LayerNorm bias, None for RMSNorm


@dataclass
class Capture:
    """What one forward pass captured. Per-layer dicts hold only the layers asked for."""

    tokens: torch.Tensor  # [B, T]
    logits: torch.Tensor | None = None  # [B, T, V]
    layers: dict[int, cap.LayerTensors] = field(default_factory=dict)
    embed: torch.Tensor | None = None  # [B, T, d] token embedding (scaled, as the model adds it)
    pos_embed: torch.Tensor | None = None  # [B, T, d] learned positional embedding, if any
    resid_pre: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, T, d] layer input
    resid_final: torch.Tensor | None = None  # [B, T, d] input of the final norm
    attn_out: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, T, d] W_O output + b_O
    attn_contrib: dict[int, torch.Tensor] = field(default_factory=dict)  # [B,T,d] added to resid
    mlp_contrib: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, T, d] added to resid
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # cos, sin
    # The last layer this pass ran when it stopped early (``run(stop_after=...)``), else None.
    stopped_after: int | None = None

    def continued(self) -> Capture:
        """A new capture holding everything this one holds (the same tensors, new dicts), for a
        pass that resumes where this one stopped; this capture is left unchanged."""
        fields: dict[str, Any] = {
            name: dict(value) if isinstance(value, dict) else value
            for name, value in vars(self).items()
        }
        return Capture(**fields)

    def get(self, name: str) -> torch.Tensor:
        """A captured tensor field (``embed``, ``resid_final``, ``logits``...); raises a clear
        error when this pass did not capture it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{name} was not captured (run with residuals=True / logits=True)")
        return value
