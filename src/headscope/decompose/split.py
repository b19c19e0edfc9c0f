"""Head splitting: k sub-heads whose summed output reproduces one head's output.

Each sub-head is a full attention head of its own (``W_Q, W_K, W_V [d, D']``, ``W_O [D', d]``,
biases), reading the same normalised residual stream as the original head (the layer's
attention-input norm, stored with the split), with RoPE on the dims it inherited from the
original head and the model's score scale, soft-cap and window::

    x̂ = norm(x);  q_i = rope(x̂ W_Q[i] + b_Q[i]);  k_i = rope(x̂ W_K[i] + b_K[i])
    A_i = softmax(scale · q_i k_iᵀ + causal mask);  out_i = A_i (x̂ W_V[i] + b_V[i]) W_O[i]

and ``Σ_i out_i`` is trained to match the original head's output ``z_h W_O[h]``. Sub-heads
start as the original head (its ``D'`` most important dims) plus noise, with ``W_O / k``, so
their sum starts near the original. What makes them differ is the simplicity penalty from the
attention-replacement-layer section of "Progress on Attention",
``Σ_i [½(‖W_Q‖² + ‖W_K‖²) · ½(‖W_V‖² + ‖W_O‖²)]^β`` (a proxy of ``(‖W_QK‖_* ‖W_OV‖_*)^β``,
which prefers independent behaviours in separate heads when β < 1), and an exclusivity penalty
``mean_t Σ_i √‖out_i(t)‖`` that prefers one sub-head per token.

The target may also be the summed output of several heads (``heads``): then sub-head i starts
from ``heads[i % len(heads)]``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from headscope.decompose.common import causal_mask
from headscope.decompose.io import check_shapes, load_folder, save_folder
from headscope.errors import InputError

_WEIGHTS = ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O")


@dataclass(frozen=True)
class SplitConfig:
    """Sizes, attention settings and penalties of one head split (saved as ``cfg.json``)."""

    d_model: int
    d_head: int  # D' of each sub-head
    n_sub: int  # k
    layer: int
    heads: tuple[int, ...]  # original query heads whose summed output is reproduced
    qk_index: tuple[int, ...]  # [D'] the original head dim each sub-head q/k dim started from
    ov_index: tuple[int, ...]  # [D'] the same for v / W_O rows
    rotary_dim: int = 0  # sub-head dims RoPE rotates (rotate-half over the first rotary_dim)
    attn_scale: float = 1.0
    softcap: float | None = None
    window: int | None = None
    norm_kind: str = "rms"  # the layer's attention-input norm: rms | layer
    norm_eps: float = 1e-6
    weight_penalty: float = 0.1
    beta: float = 0.75
    exclusive: float = 0.03
    routed: float = 0.5  # fraction of steps each sub-head fits one query cluster alone
    noise: float = 0.1
    model_name: str = ""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_head", "n_sub"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.heads:
            raise InputError("give at least one head to split")
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "qk_index", tuple(int(i) for i in self.qk_index))
        object.__setattr__(self, "ov_index", tuple(int(i) for i in self.ov_index))
        if len(self.qk_index) != self.d_head or len(self.ov_index) != self.d_head:
            raise InputError("qk_index and ov_index need one entry per sub-head dim")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("heads", "qk_index", "ov_index"):
            d[key] = list(d[key])
        return {"kind": "split", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitConfig:
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for key in ("heads", "qk_index", "ov_index"):
            kw[key] = tuple(kw[key])
        return cls(**kw)


class HeadSplit(nn.Module):
    """k sub-heads; ``forward`` gives each one's output on a batch of residual streams."""

    W_Q: nn.Parameter  # [k, d, D']
    b_Q: nn.Parameter  # [k, D']
    W_K: nn.Parameter  # [k, d, D']
    b_K: nn.Parameter  # [k, D']
    W_V: nn.Parameter  # [k, d, D']
    b_V: nn.Parameter  # [k, D']
    W_O: nn.Parameter  # [k, D', d]
    norm_weight: nn.Parameter  # [d] the layer's attention-input norm (frozen)
    norm_bias: nn.Parameter  # [d]

    def __init__(self, cfg: SplitConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        k, d, D = cfg.n_sub, cfg.d_model, cfg.d_head
        shapes = _shapes(cfg)
        for name, shape in shapes.items():
            self.register_parameter(
                name, nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32))
            )
        assert shapes["W_O"] == (k, D, d)
        self.norm_weight.requires_grad_(False)
        self.norm_bias.requires_grad_(False)

    def normalise(self, x: Tensor) -> Tensor:
        """``x [..., d]`` residual -> the layer's attention input (its norm applied)."""
        x = x.float()
        if self.cfg.norm_kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)
        return x * self.norm_weight + self.norm_bias

    def _rope(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """Rotate the first ``rotary_dim`` dims of ``x [B, k, T, D']`` (rotate-half), using
        the original head's cos/sin ``[T, R]`` at each dim's original index."""
        R = self.cfg.rotary_dim
        if R == 0:
            return x
        if rope is None:
            raise InputError("this split needs the layer's RoPE tables (LayerData.rope)")
        index = torch.tensor(self.cfg.qk_index[:R], device=x.device)
        T = x.shape[-2]
        cos, sin = rope[0][:T, index], rope[1][:T, index]  # [T, R]
        rot, rest = x[..., :R], x[..., R:]
        half = R // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated * sin, rest], dim=-1)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``x [B, T, d]`` residual stream entering the layer -> ``[B, k, T, d]`` each
        sub-head's output."""
        cfg = self.cfg
        xn = self.normalise(x)[:, None]  # [B, 1, T, d]
        q = self._rope(xn @ self.W_Q + self.b_Q[:, None], rope)  # [B, k, T, D']
        k = self._rope(xn @ self.W_K + self.b_K[:, None], rope)
        v = xn @ self.W_V + self.b_V[:, None]
        scores = (q @ k.transpose(-1, -2)) * cfg.attn_scale  # [B, k, T, T]
        if cfg.softcap is not None:
            scores = torch.tanh(scores / cfg.softcap) * cfg.softcap
        keep = causal_mask(x.shape[1], x.device, cfg.window)
        pattern = scores.masked_fill(~keep, float("-inf")).softmax(-1)
        return (pattern @ v) @ self.W_O  # [B, k, T, d]

    def simplicity(self) -> Tensor:
        """``[k]`` each sub-head's ``½(‖W_Q‖² + ‖W_K‖²) · ½(‖W_V‖² + ‖W_O‖²)`` (before ^β)."""
        sq = {n: getattr(self, n).pow(2).sum((-2, -1)) for n in ("W_Q", "W_K", "W_V", "W_O")}
        return 0.25 * (sq["W_Q"] + sq["W_K"]) * (sq["W_V"] + sq["W_O"])


def _shapes(cfg: SplitConfig) -> dict[str, tuple[int, ...]]:
    k, d, D = cfg.n_sub, cfg.d_model, cfg.d_head
    return {
        "W_Q": (k, d, D),
        "b_Q": (k, D),
        "W_K": (k, d, D),
        "b_K": (k, D),
        "W_V": (k, d, D),
        "b_V": (k, D),
        "W_O": (k, D, d),
        "norm_weight": (d,),
        "norm_bias": (d,),
    }


def save_split(
    split: HeadSplit, path: str | os.PathLike[str], stats: dict[str, Any] | None = None
) -> Path:
    """Write ``cfg.json`` + ``weights.safetensors`` (+ ``stats.json``) into folder ``path``."""
    return save_folder(path, split.cfg.to_dict(), dict(split.state_dict()), stats)


def load_split(path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> HeadSplit:
    """Load a folder written by :func:`save_split` (the exact stored bits)."""
    cfg_dict, tensors, _ = load_folder(path, "split")
    cfg = SplitConfig.from_dict(cfg_dict)
    check_shapes(Path(path), tensors, _shapes(cfg))
    with torch.device("meta"):
        split = HeadSplit(cfg)
    split.load_state_dict({n: t.to(device) for n, t in tensors.items()}, assign=True)
    split.norm_weight.requires_grad_(False)
    split.norm_bias.requires_grad_(False)
    return cast(HeadSplit, split)
