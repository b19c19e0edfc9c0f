"""One-layer models whose head L0H0 scores keys by hand-set rules (no downloads).

Each token belongs to one group; a key's score is its group's score plus ``recency`` times its
position, the same for every query (the query is a constant bias). The residual stream is a
one-hot group (dims 0..31) and a one-hot position (dims 32..63): every token has exactly two
ones, so LayerNorm scales every position alike and scores come out as set. The other head and
the MLP are zero.

* :func:`delimiter_adapter`: L0H0 attends from every token to the most recent delimiter
  ('.' or ',', the query itself included); before the first one, to the BOS.
* :func:`priority_adapter`: L0H0 attends to an 'A' if there is one, otherwise to a 'B'.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.tiny_models import VOCAB, tiny_tokenizer

POS = 32
D_MODEL = 64
D_HEAD = 32


def token_id(ch: str) -> int:
    """The tiny tokenizer's id of a one-byte character."""
    (i,) = tiny_tokenizer()(ch, add_special_tokens=False)["input_ids"]
    return i


def scored_model(groups: dict[int, int], scores: list[float], recency: float) -> GPT2LMHeadModel:
    """L0H0 scores key k as ``scores[group of token k] + recency * k`` (tokens not in
    ``groups``: group 0)."""
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=D_MODEL,
        n_layer=1,
        n_head=2,
        n_positions=POS,
        n_inner=8,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]:
            ln.weight.fill_(1.0)
        group = torch.zeros(VOCAB, dtype=torch.long)
        for tok, g in groups.items():
            group[tok] = g
        model.transformer.wte.weight[torch.arange(VOCAB), group] = 1.0
        model.transformer.wpe.weight[:, 32 : 32 + POS] = torch.eye(POS)
        # LayerNorm maps a one to a and a zero to b (the same for every token); a key's column-0
        # value is then (a - b) * (its weights at its two ones) + b * (sum of all weights)
        mean = 2 / D_MODEL
        std = (mean - mean**2) ** 0.5
        a, b = (1 - mean) / std, -mean / std
        attn = model.transformer.h[0].attn
        w = attn.c_attn.weight  # [64, 192]: q | k | v, head 0 = the first 32 columns of each
        w[: len(scores), D_MODEL] = torch.tensor(scores)
        w[32 : 32 + POS, D_MODEL] = recency * torch.arange(POS, dtype=torch.float32)
        # the query is a constant: its column 0 undoes LayerNorm's (a - b) and GPT-2's 1/sqrt(D)
        attn.c_attn.bias[0] = D_HEAD**0.5 / (a - b)
        del b  # the b * sum term is the same for every key: softmax ignores it
    return model


def _adapter(model: GPT2LMHeadModel, name: str):
    from headscope.model import ModelAdapter

    return ModelAdapter(model, tiny_tokenizer(), name=name, source="test")


DELIMITERS = (".", ",")


def delimiter_adapter():
    """L0H0 attends to the most recent '.' or ',' at or before each query (else the BOS)."""
    recency = 12.0
    delimiter = recency * POS + 20.0  # beats any later non-delimiter
    groups = {token_id(d): 1 for d in DELIMITERS}
    groups[1] = 1  # the BOS: the delimiter before the first one
    return _adapter(scored_model(groups, [0.0, delimiter], recency), "delimiter")


def priority_adapter():
    """L0H0 attends to an 'A' if present, otherwise to a 'B' (else spreads out)."""
    groups = {token_id("A"): 1, token_id("B"): 2}
    return _adapter(scored_model(groups, [0.0, 20.0, 10.0], 0.0), "priority")


def random_text(n: int, length: int, alphabet: str, seed: int = 0) -> list[str]:
    """``n`` strings of ``length`` characters drawn from ``alphabet``."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(alphabet), (n, length), generator=g)
    return ["".join(alphabet[i] for i in row) for row in picks.tolist()]
