"""QK diagonalisation of one attention head, as "Progress on Attention" describes it.

The head's queries ``q [T, D]`` and keys ``k [T, D]`` (post-RoPE, as the capture gives them)
go through separate encoders; feature i's query activation meets only feature i's key
activation, and the summed feature scores form the head's pattern:

* rank 1: ``gq = relu(q·s_q @ U_q + b_q)``, ``gk = relu(k·s_k @ U_k + b_k)`` ``[T, F]``;
  ``S[t, s] = Σ_f gq[t, f] gk[s, f]``;
* rank r > 1: each feature also has small matrices ``M_q[f], M_k[f]`` ``[D, r]``; its query
  and key activations are the vectors ``gq[t, f] · (q_t·s_q @ M_q[f])`` (and the same for keys)
  and meet by a dot product, so one feature's score matrix can have rank up to r.

``softmax`` variant: ``Â = softmax(S + causal mask)``, trained on KL(A ‖ Â) per query row.
``linear`` variant: ``Â = S`` on the causal entries (no softmax), trained on MSE against A.
Penalties: L1 on each side's activations, L1 on their product over causal (query, key) pairs,
and the negative pre-activation penalty on both sides. A feature is *active* at a position when
its gate ``gq`` (or ``gk``) is positive.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from headscope.decompose.io import check_shapes, load_folder, save_folder
from headscope.errors import InputError

QKVariant = Literal["softmax", "linear"]
QK_VARIANTS: tuple[str, ...] = ("softmax", "linear")


@dataclass(frozen=True)
class QKConfig:
    """Shape, variant and coefficients of one QK diagonalisation (saved as ``cfg.json``)."""

    d_head: int
    n_features: int
    layer: int
    head: int
    kv_head: int
    rank: int = 1
    variant: QKVariant = "softmax"
    l1: float = 1e-3  # on each side's activations
    l1_product: float = 1e-3  # on Σ_f gq·gk over causal pairs
    neg: float = 1e-3
    q_scale: float = 1.0
    k_scale: float = 1.0
    window: int | None = None  # the head's sliding window, if any
    model_name: str = ""

    def __post_init__(self) -> None:
        if self.variant not in QK_VARIANTS:
            raise InputError(f"variant must be one of {QK_VARIANTS}, got {self.variant!r}")
        for name in ("d_head", "n_features", "rank"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "qk", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QKConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class QKActivations:
    """One batch through a :class:`QKDiagonal`."""

    pre_q: Tensor  # [B, T, F]
    pre_k: Tensor  # [B, T, F]
    gq: Tensor  # [B, T, F] query-side gates (>= 0)
    gk: Tensor  # [B, T, F]
    vq: Tensor | None  # [B, T, F, r] query vectors (gated), rank > 1 only
    vk: Tensor | None  # [B, T, F, r]


class QKDiagonal(nn.Module):
    """Query/key encoders whose features interact only feature-by-feature."""

    U_q: nn.Parameter  # [D, F]
    b_q: nn.Parameter  # [F]
    U_k: nn.Parameter  # [D, F]
    b_k: nn.Parameter  # [F]
    M_q: nn.Parameter  # [F, D, r] (rank > 1 only)
    M_k: nn.Parameter  # [F, D, r] (rank > 1 only)

    def __init__(
        self,
        cfg: QKConfig,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        D, F, r = cfg.d_head, cfg.n_features, cfg.rank

        def unit_cols(*shape: int) -> Tensor:
            w = torch.randn(*shape, generator=generator)
            return w / w.norm(dim=-2, keepdim=True)

        # A linear pattern is <= 1 per entry: start its summed scores near that size (gates of
        # size F^-1/2), or the first steps switch every feature off and none comes back.
        scale = F**-0.5 if cfg.variant == "linear" else 1.0
        params = {
            "U_q": unit_cols(D, F) * scale,  # [D, F]
            "b_q": torch.zeros(F),  # [F]
            "U_k": unit_cols(D, F) * scale,  # [D, F]
            "b_k": torch.zeros(F),  # [F]
        }
        if r > 1:
            params["M_q"] = unit_cols(F, D, r)  # [F, D, r]
            params["M_k"] = unit_cols(F, D, r)  # [F, D, r]
        for name, value in params.items():
            self.register_parameter(
                name, nn.Parameter(value.to(device=device, dtype=torch.float32))
            )

    def activations(self, q: Tensor, k: Tensor) -> QKActivations:
        """``q``, ``k`` ``[B, T, D]`` (raw units) -> both sides' activations."""
        cfg = self.cfg
        qs, ks = q.float() * cfg.q_scale, k.float() * cfg.k_scale
        pre_q, pre_k = qs @ self.U_q + self.b_q, ks @ self.U_k + self.b_k
        gq, gk = pre_q.relu(), pre_k.relu()
        vq = vk = None
        if cfg.rank > 1:
            B, T, D = qs.shape
            F, r = cfg.n_features, cfg.rank
            vq = (qs @ self.M_q.permute(1, 0, 2).reshape(D, F * r)).view(B, T, F, r) * gq[..., None]
            vk = (ks @ self.M_k.permute(1, 0, 2).reshape(D, F * r)).view(B, T, F, r) * gk[..., None]
        return QKActivations(pre_q, pre_k, gq, gk, vq, vk)

    @staticmethod
    def scores_of(acts: QKActivations) -> Tensor:
        """``[B, T, T]`` summed feature scores (query-major), no mask."""
        if acts.vq is None or acts.vk is None:
            return acts.gq @ acts.gk.transpose(1, 2)
        B, T = acts.vq.shape[:2]
        return acts.vq.reshape(B, T, -1) @ acts.vk.reshape(B, T, -1).transpose(1, 2)

    @staticmethod
    def contributions(acts: QKActivations, index: int) -> Tensor:
        """``[F, T, T]`` each feature's score at every (query, key) pair of context ``index``."""
        if acts.vq is None or acts.vk is None:
            return acts.gq[index].T[:, :, None] * acts.gk[index].T[:, None, :]
        return torch.einsum("tfr,sfr->fts", acts.vq[index], acts.vk[index])

    def pattern(self, scores: Tensor, keep: Tensor) -> Tensor:
        """``scores [B, T, T]``, ``keep [T, T]`` causal mask -> the reconstructed pattern.

        softmax: the softmax of the masked scores; linear: the masked scores themselves."""
        if self.cfg.variant == "linear":
            return scores.masked_fill(~keep, 0.0)
        return scores.masked_fill(~keep, float("-inf")).softmax(-1)

    def forward(self, q: Tensor, k: Tensor, keep: Tensor) -> Tensor:
        """``q``, ``k`` ``[B, T, D]``, ``keep [T, T]`` -> reconstructed pattern ``[B, T, T]``."""
        return self.pattern(self.scores_of(self.activations(q, k)), keep)


def _shapes(cfg: QKConfig) -> dict[str, tuple[int, ...]]:
    D, F, r = cfg.d_head, cfg.n_features, cfg.rank
    shapes = {"U_q": (D, F), "b_q": (F,), "U_k": (D, F), "b_k": (F,)}
    if r > 1:
        shapes |= {"M_q": (F, D, r), "M_k": (F, D, r)}
    return shapes


def save_qk(
    model: QKDiagonal, path: str | os.PathLike[str], stats: dict[str, Any] | None = None
) -> Path:
    """Write ``cfg.json`` + ``weights.safetensors`` (+ ``stats.json``) into folder ``path``."""
    return save_folder(path, model.cfg.to_dict(), dict(model.state_dict()), stats)


def load_qk(path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> QKDiagonal:
    """Load a folder written by :func:`save_qk` (the exact stored bits)."""
    cfg_dict, tensors, _ = load_folder(path, "qk")
    cfg = QKConfig.from_dict(cfg_dict)
    check_shapes(Path(path), tensors, _shapes(cfg))
    with torch.device("meta"):
        model = QKDiagonal(cfg)
    model.load_state_dict({n: t.to(device) for n, t in tensors.items()}, assign=True)
    return cast(QKDiagonal, model)
