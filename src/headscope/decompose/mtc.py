"""Multi-token transcoders (MTCs) of one attention layer, as "Progress on Attention" describes.

An MTC reads the residual stream entering a layer over a whole context and predicts the
layer's attention output (or the residual after the layer) over the same context:

1. a token-wise encoder at each *source* position: ``a = relu(x̃ @ W_enc + b_enc)``
   ``[B, T, F]``, where ``x̃ = x / rms(x)`` is the residual scaled to RMS 1 per position (as the
   layer's own norm does, without its weights): the attention sink's residual is ~100x larger
   than the rest, and unnormalised it dominates every feature it touches;
2. an attention operation per feature: the feature's *head-loading vector* ``w_f [H + 1]``
   mixes the layer's actual attention patterns ``A_h`` with an identity pattern (the residual
   connection): ``m_f[t] = Σ_h w_fh Σ_s A_h[t, s] a_f[s] + w_f,id · a_f[t]``. Only the top-k
   features of each context (by activation summed over the context) are moved;
3. a decoder at the *destination*: ``ŷ = (Σ_f m_f W_dec[f] + b_dec) / s_out``.

Decoder rows have unit norm and head-loading rows unit L1 norm (both restored after every
step), so a feature's scale lives in its activation and the L1 penalty means something.

Variants (``MTCConfig.variant``):

* ``mtc``: as above;
* ``single_head``: the baseline where each feature is bound to one pattern: the loading used is
  the one-hot of the largest entry of ``w_f`` (trained through a straight-through estimator);
* ``sae_mtc``: the jointly trained baseline: the encoder is an SAE's (with its own decoder
  ``W_sae_dec``, ``b_sae_dec`` reconstructing the input), and a single-head MTC decoder reads
  its activations with their gradient detached, so only the SAE objective shapes the features.
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

Variant = Literal["mtc", "single_head", "sae_mtc"]
Target = Literal["attn_out", "resid_post"]
VARIANTS: tuple[str, ...] = ("mtc", "single_head", "sae_mtc")
TARGETS: tuple[str, ...] = ("attn_out", "resid_post")


@dataclass(frozen=True)
class MTCConfig:
    """Shape, variant and training coefficients of one MTC (saved as ``cfg.json``)."""

    d_model: int
    n_heads: int  # attention patterns mixed (the layer's query heads); + 1 identity column
    n_features: int
    layer: int
    variant: Variant = "mtc"
    target: Target = "attn_out"
    k_moved: int = 256  # features moved per context
    l1: float = 1e-3  # L1 on source activations
    neg: float = 1e-5  # penalty on negative pre-activations
    target_scale: float = 1.0  # s_out: target -> decoder space
    model_name: str = ""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InputError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.target not in TARGETS:
            raise InputError(f"target must be one of {TARGETS}, got {self.target!r}")
        for name in ("d_model", "n_heads", "n_features", "k_moved"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def single_head(self) -> bool:
        return self.variant != "mtc"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "mtc", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MTCConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class MTC(nn.Module):
    """A multi-token transcoder; see the module docstring for the computation."""

    W_enc: nn.Parameter  # [d, F]
    b_enc: nn.Parameter  # [F]
    W_dec: nn.Parameter  # [F, d]
    b_dec: nn.Parameter  # [d]
    loading: nn.Parameter  # [F, H + 1]
    W_sae_dec: nn.Parameter  # [F, d] (sae_mtc only)
    b_sae_dec: nn.Parameter  # [d] (sae_mtc only)

    def __init__(
        self,
        cfg: MTCConfig,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        d, F, H = cfg.d_model, cfg.n_features, cfg.n_heads

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=generator)

        w_dec = randn(F, d)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        w_enc = randn(d, F)
        w_enc /= w_enc.norm(dim=0, keepdim=True)  # pre-activations ~ N(0, 1) on rows of norm √d
        loading = 1.0 + 0.5 * randn(F, H + 1).abs()
        loading /= loading.sum(-1, keepdim=True)
        params = {
            "W_enc": w_enc,  # [d, F]
            "b_enc": torch.zeros(F),  # [F]
            "W_dec": w_dec,  # [F, d]
            "b_dec": torch.zeros(d),  # [d]
            "loading": loading,  # [F, H + 1], last column: the identity pattern
        }
        if cfg.variant == "sae_mtc":
            params["W_sae_dec"] = w_enc.T.clone()  # [F, d]
            params["b_sae_dec"] = torch.zeros(d)  # [d]
        for name, value in params.items():
            self.register_parameter(
                name, nn.Parameter(value.to(device=device, dtype=torch.float32))
            )

    # ----- the three stages ----------------------------------------------------------------------
    @staticmethod
    def encoder_input(x: Tensor) -> Tensor:
        """``x [..., d]`` residual (raw units) -> ``x / rms(x)``, what the encoder reads."""
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-12))

    def pre_activations(self, x: Tensor) -> Tensor:
        """``x [..., d]`` residual (raw units) -> ``[..., F]`` encoder pre-activations."""
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """``x [..., d]`` -> ``[..., F]`` source-side feature activations (>= 0)."""
        return self.pre_activations(x).relu()

    def loadings(self, straight_through: bool = False) -> Tensor:
        """The head loadings used to move features: ``[F, H + 1]``.

        ``single_head`` / ``sae_mtc``: the one-hot of each row's largest entry; with
        ``straight_through`` the gradient passes to the raw loadings as if they were used."""
        w = self.loading
        if not self.cfg.single_head:
            return w
        hard = torch.zeros_like(w).scatter_(-1, w.argmax(-1, keepdim=True), 1.0)
        return hard + w - w.detach() if straight_through else hard

    def move(
        self, acts: Tensor, pattern: Tensor, *, straight_through: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Move the top-k features of each context to their destinations.

        ``acts [B, T, F]``, ``pattern [B, H, T, T]`` (query-major) -> (destination activations
        ``[B, T, k]``, the features moved ``[B, k]`` long)."""
        B, T, F = acts.shape
        H = pattern.shape[1]
        if self.cfg.n_heads != H:
            raise InputError(f"pattern has {H} heads, the MTC mixes {self.cfg.n_heads}")
        k = min(self.cfg.k_moved, F)
        idx = acts.detach().sum(1).topk(k, dim=-1).indices  # [B, k]
        a = acts.gather(2, idx[:, None, :].expand(B, T, k))  # [B, T, k]
        moved = torch.matmul(pattern, a[:, None])  # [B, H, T, k]
        w = self.loadings(straight_through)[idx]  # [B, k, H + 1]
        m = torch.einsum("bhtk,bkh->btk", moved, w[..., :H]) + a * w[:, None, :, H]
        return m, idx

    def decode(self, m: Tensor, idx: Tensor) -> Tensor:
        """``m [B, T, k]`` destination activations of features ``idx [B, k]`` -> ``[B, T, d]``
        in target units."""
        out = torch.bmm(m, self.W_dec[idx]) + self.b_dec  # [B, T, d]
        return out / self.cfg.target_scale

    def forward(self, x: Tensor, pattern: Tensor) -> Tensor:
        """``x [B, T, d]`` residual, ``pattern [B, H, T, T]`` -> ``[B, T, d]`` target estimate."""
        acts = self.encode(x)
        m, idx = self.move(acts.detach() if self.cfg.variant == "sae_mtc" else acts, pattern)
        return self.decode(m, idx)

    def sae_reconstruct(self, acts: Tensor) -> Tensor:
        """``sae_mtc`` only: the SAE's reconstruction of its input (``encoder_input(x)``)."""
        if self.cfg.variant != "sae_mtc":
            raise InputError("only an sae_mtc has an SAE decoder")
        return acts @ self.W_sae_dec + self.b_sae_dec

    @torch.no_grad()
    def head_loadings(self) -> Tensor:
        """``[F, H + 1]`` |loading| per feature, rows summing to 1 (one-hot for the single-head
        variants): what "Progress on Attention" clusters."""
        w = self.loadings().abs()
        return w / w.sum(-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Restore unit-norm decoder rows and unit-L1 loading rows (after an optimiser step)."""
        for name in ("W_dec", "W_sae_dec"):
            if hasattr(self, name):
                w = getattr(self, name)
                w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        self.loading.div_(self.loading.abs().sum(-1, keepdim=True).clamp_min(1e-12))


def _shapes(cfg: MTCConfig) -> dict[str, tuple[int, ...]]:
    d, F, H = cfg.d_model, cfg.n_features, cfg.n_heads
    shapes = {
        "W_enc": (d, F),
        "b_enc": (F,),
        "W_dec": (F, d),
        "b_dec": (d,),
        "loading": (F, H + 1),
    }
    if cfg.variant == "sae_mtc":
        shapes |= {"W_sae_dec": (F, d), "b_sae_dec": (d,)}
    return shapes


def save_mtc(mtc: MTC, path: str | os.PathLike[str], stats: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` + ``weights.safetensors`` (+ ``stats.json``) into folder ``path``."""
    return save_folder(path, mtc.cfg.to_dict(), dict(mtc.state_dict()), stats)


def load_mtc(path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> MTC:
    """Load a folder written by :func:`save_mtc` (the exact stored bits)."""
    cfg_dict, tensors, _ = load_folder(path, "mtc")
    cfg = MTCConfig.from_dict(cfg_dict)
    check_shapes(Path(path), tensors, _shapes(cfg))
    with torch.device("meta"):
        mtc = MTC(cfg)
    mtc.load_state_dict({n: t.to(device) for n, t in tensors.items()}, assign=True)
    return cast(MTC, mtc)
