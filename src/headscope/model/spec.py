"""Architecture facts as data.

Every difference between the supported model families (GQA, RoPE, QK-norm, softcapping,
sliding windows, LayerNorm vs RMSNorm, biases, post-norms, parallel residual, fused QKV) is a
field here, read once from the Hugging Face config and module tree. The rest of headscope reads
these fields instead of asking which model type it has.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

NormKind = Literal["rms", "layer"]
QKVKind = Literal["separate", "gpt2_fused", "neox_fused"]


@dataclass(frozen=True)
class NormSpec:
    """A pre-norm: RMSNorm (``x / rms(x) * (offset + w)``) or LayerNorm (centred, with bias)."""

    kind: NormKind
    eps: float
    weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its modules, as attribute paths relative to the causal-LM object."""

    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    ln_attn: str
    ln_mlp: str
    mlp: str
    qkv: QKVKind
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    out: str = "o_proj"
    pos_embed: str | None = None
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None


_LLAMA = Layout(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    ln_attn="input_layernorm",
    ln_mlp="post_attention_layernorm",
    mlp="mlp",
    qkv="separate",
)
_QWEN3 = Layout(**{**asdict(_LLAMA), "q_norm": "q_norm", "k_norm": "k_norm"})
_GEMMA = Layout(
    **{
        **asdict(_LLAMA),
        "ln_mlp": "pre_feedforward_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
    }
)
_GEMMA3 = Layout(**{**asdict(_GEMMA), "q_norm": "q_norm", "k_norm": "k_norm"})
_GPT2 = Layout(
    layers="transformer.h",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    attn="attn",
    ln_attn="ln_1",
    ln_mlp="ln_2",
    mlp="mlp",
    qkv="gpt2_fused",
    q="c_attn",
    k="c_attn",
    v="c_attn",
    out="c_proj",
)
_NEOX = Layout(
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    attn="attention",
    ln_attn="input_layernorm",
    ln_mlp="post_attention_layernorm",
    mlp="mlp",
    qkv="neox_fused",
    q="query_key_value",
    k="query_key_value",
    v="query_key_value",
    out="dense",
)

LAYOUTS: dict[str, Layout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _QWEN3,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA3,
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
}


@dataclass(frozen=True)
class ArchSpec:
    """Sizes and mechanisms of one model, the same fields for every family."""

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    norm: NormSpec
    positional: Literal["rope", "learned"]
    rotary_dim: int  # dims of each head that RoPE rotates (0 without RoPE)
    attn_scale: float
    qk_norm: bool
    attn_softcap: float | None
    final_softcap: float | None
    sliding_window: tuple[int | None, ...]  # per layer; None = full causal attention
    max_positions: int | None  # longest sequence learned positions allow (None: RoPE, no limit)
    post_attn_norm: bool
    post_mlp_norm: bool
    parallel_residual: bool
    layout: Layout = field(repr=False)

    @property
    def n_heads_total(self) -> int:
        return self.n_layers * self.n_heads

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("layout")
        return out


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def get_module(root: nn.Module, path: str) -> Any:
    return _get(root, path)


def arch_spec(model: nn.Module) -> ArchSpec:
    """Read an :class:`ArchSpec` from a loaded Hugging Face causal LM."""
    cfg: Any = model.config
    model_type: str = cfg.model_type
    if model_type not in LAYOUTS:
        raise ValueError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(LAYOUTS))}"
        )
    layout = LAYOUTS[model_type]
    n_layers = cfg.num_hidden_layers
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d_model = cfg.hidden_size
    d_head = getattr(cfg, "head_dim", None) or d_model // n_heads
    layers: Any = _get(model, layout.layers)
    attn0 = getattr(layers[0], layout.attn)
    ln0 = getattr(layers[0], layout.ln_attn)
    if isinstance(ln0, nn.LayerNorm):
        norm = NormSpec("layer", float(ln0.eps))
    else:
        eps = getattr(ln0, "variance_epsilon", None) or getattr(ln0, "eps", 1e-6)
        offset = 1.0 if model_type.startswith("gemma") else 0.0
        norm = NormSpec("rms", float(eps or 1e-6), offset)

    positional: Literal["rope", "learned"]
    if layout.pos_embed is not None:
        positional, rotary_dim = "learned", 0
    else:
        rope = getattr(cfg, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
        positional, rotary_dim = "rope", int(d_head * factor)

    scale = getattr(attn0, "scaling", None)
    if scale is None:
        scale = d_head**-0.5
    if model_type == "gpt2" and not getattr(cfg, "scale_attn_weights", True):
        scale = 1.0
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if not getattr(cfg, "use_sliding_window", True):
        window = None  # Qwen 2 carries a window size it does not use by default
    if layer_types is not None and window:
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    else:  # Mistral: one window for every layer
        windows = tuple(window for _ in range(n_layers))
    return ArchSpec(
        architecture=model_type,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=d_head,
        d_model=d_model,
        d_vocab=cfg.vocab_size,
        norm=norm,
        positional=positional,
        rotary_dim=rotary_dim,
        attn_scale=float(scale),
        qk_norm=layout.q_norm is not None,
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
        sliding_window=windows,
        # Learned positions are a hard limit; RoPE's max_position_embeddings is only nominal.
        max_positions=(
            getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        )
        if layout.pos_embed is not None
        else None,
        post_attn_norm=layout.post_attn_norm is not None,
        post_mlp_norm=layout.post_mlp_norm is not None,
        parallel_residual=bool(getattr(cfg, "use_parallel_residual", False)),
        layout=layout,
    )


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def parse_head(name: str, spec: ArchSpec | None = None) -> tuple[int, int]:
    """``"L5H3"`` -> ``(5, 3)``; raises ValueError for malformed or out-of-range names."""
    import re

    m = re.fullmatch(r"L(\d+)H(\d+)", name.strip())
    if not m:
        raise ValueError(f"malformed head name {name!r}; expected L{{layer}}H{{head}}, e.g. L5H3")
    layer, head = int(m.group(1)), int(m.group(2))
    if spec is not None and not (0 <= layer < spec.n_layers and 0 <= head < spec.n_heads):
        raise ValueError(
            f"unknown head {name!r}: the model has layers 0..{spec.n_layers - 1} "
            f"and heads 0..{spec.n_heads - 1}"
        )
    return layer, head


def norm_factor(x: torch.Tensor, norm: NormSpec) -> torch.Tensor:
    """The frozen scale ``1 / rms`` (or ``1 / std``) of ``x [..., d]`` -> ``[..., 1]``."""
    xf = x.float()
    if norm.kind == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
