"""Tiny random-weight models, one per supported architecture, built in-process (no downloads).

Each exercises the mechanisms its family has: GQA (llama, qwen3, gemma), biases (qwen2, gpt2,
neox), QK-norm (qwen3, gemma3), softcapping and post-norms (gemma2), sliding windows (mistral,
gemma2, gemma3), learned positions and LayerNorm (gpt2), parallel residual and partial RoPE (neox).
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 259  # 3 special tokens + 256 byte tokens (see tiny_tokenizer)
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def _cfgs():
    return {
        "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2)),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=8)),
        "mistral": (
            MistralConfig,
            MistralForCausalLM,
            dict(num_key_value_heads=1, sliding_window=5),
        ),
        "gemma2": (
            Gemma2Config,
            Gemma2ForCausalLM,
            dict(
                num_key_value_heads=2,
                head_dim=8,
                sliding_window=4,
                attn_logit_softcapping=5.0,
                final_logit_softcapping=30.0,
                query_pre_attn_scalar=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            ),
        ),
        "gemma3": (
            Gemma3TextConfig,
            Gemma3ForCausalLM,
            dict(
                num_key_value_heads=1,
                head_dim=8,
                sliding_window=4,
                query_pre_attn_scalar=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            ),
        ),
        "gpt2": (
            GPT2Config,
            GPT2LMHeadModel,
            dict(n_embd=32, n_layer=3, n_head=4, n_positions=128, n_inner=48),
        ),
        "gpt_neox": (
            GPTNeoXConfig,
            GPTNeoXForCausalLM,
            dict(rotary_pct=0.5, use_parallel_residual=True, attention_bias=True),
        ),
    }


ARCHS = list(_cfgs())


def build(arch: str, seed: int = 0, attn: str = "eager"):
    """A tiny model of ``arch`` with random weights (biases and norm weights randomised too)."""
    cfg_cls, model_cls, extra = _cfgs()[arch]
    kwargs = {**COMMON, **extra, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    cfg = cfg_cls(**kwargs)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def random_tokens(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, n), generator=g)
    ids[:, 0] = 1
    return ids


def tiny_tokenizer():
    """A byte-level tokenizer with no merges: ids 0-2 special, then one id per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_adapter(arch: str, seed: int = 0):
    """A :class:`ModelAdapter` over a tiny random model of ``arch``."""
    from headscope.model import ModelAdapter

    return ModelAdapter(build(arch, seed), tiny_tokenizer(), name=f"tiny-{arch}", source="test")


def save_tiny(arch: str, path, seed: int = 0):
    """Write a tiny model of ``arch`` and its tokenizer as a local Hugging Face directory."""
    model = build(arch, seed)
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_texts(path, n_docs: int = 40, seed: int = 0):
    """A small JSONL corpus of repetitive text, so induction-like patterns occur."""
    import json
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "mat", "1776"]
    with open(path, "w") as f:
        for i in range(n_docs):
            phrase = " ".join(rng.choice(words) for _ in range(6))
            text = ". ".join([phrase] * 3 + [" ".join(rng.choice(words) for _ in range(20))])
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    return path


# small enough for a unit test, large enough that every accumulator sees data
SMALL_RUN = dict(
    sequences=8,
    seq_len=48,
    batch_size=4,
    motif_sequences=4,
    pca_pairs=16,
    probe_sequences=2,
    probe_length=12,
)


def build_tiny_run(
    root, arch: str = "llama", *, model=None, data=None, name: str = "run", **overrides
):
    """Precompute a small run of a tiny model into ``root/name``; returns the run folder.

    ``model``/``data``: an existing model folder / dataset (default: a tiny ``arch`` model and
    :func:`write_texts`); ``overrides``: any :class:`PrecomputeConfig` field.
    """
    from pathlib import Path

    from headscope.precompute.config import PrecomputeConfig
    from headscope.precompute.runner import run_precompute

    root = Path(root)
    model = model if model is not None else save_tiny(arch, root / "model")
    data = data if data is not None else write_texts(root / "data.jsonl")
    cfg = PrecomputeConfig(model=str(model), data=str(data), **{**SMALL_RUN, **overrides})
    return run_precompute(cfg, root / name, progress=False)
