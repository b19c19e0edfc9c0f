"""Hand-set models with a known circuit, built in-process (no downloads).

``induction_model``: a two-layer GPT-2 in which L0H0 is a previous-token head and L1H0 an
induction head. The residual stream has three subspaces: a random +-1 code of the token (dims
0-63), a one-hot position (64-95) and a slot where L0H0 writes the previous token's code
(96-159). MLPs are zero, and so are the other heads (L0H1, L1H1).
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.tiny_models import VOCAB, tiny_tokenizer

CODE, POS, D = 64, 32, 80  # d_model = 64 + 32 + 64 = 160 = 2 heads x 80


def induction_model() -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=160, n_layer=2, n_head=2, n_positions=POS, n_inner=16)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for blk in [*model.transformer.h, model.transformer]:
            for ln in [m for m in blk.modules() if isinstance(m, torch.nn.LayerNorm)]:
                ln.weight.fill_(1.0)
        model.transformer.wte.weight[:, :CODE] = (
            torch.randint(0, 2, (VOCAB, CODE), generator=g) * 2.0 - 1
        )
        model.transformer.wpe.weight[:, CODE : CODE + POS] = torch.eye(POS)
        c = 8.0
        w0 = model.transformer.h[0].attn.c_attn.weight  # [160, 480]: q | k | v, head 0 = cols 0..79
        for p in range(POS):
            w0[CODE + p, p] = c  # query: position p
            if p + 1 < POS:
                w0[CODE + p, 160 + p + 1] = c  # key: position j looks like p = j + 1
        w0[:CODE, 320 : 320 + CODE] = torch.eye(CODE)  # value: the token code
        model.transformer.h[0].attn.c_proj.weight[:CODE, CODE + POS :] = torch.eye(CODE)
        w1 = model.transformer.h[1].attn.c_attn.weight
        w1[:CODE, :CODE] = torch.eye(CODE) * 1.0  # query: current token code
        w1[CODE + POS :, 160 : 160 + CODE] = torch.eye(CODE) * 1.0  # key: previous token's code
        w1[:CODE, 320 : 320 + CODE] = torch.eye(CODE)
        model.transformer.h[1].attn.c_proj.weight[:CODE, :CODE] = torch.eye(CODE)
    return model


def induction_adapter():
    """A :class:`ModelAdapter` over :func:`induction_model`."""
    from headscope.model import ModelAdapter

    return ModelAdapter(induction_model(), tiny_tokenizer(), name="induction", source="test")


# ----- one-layer models for the attention decompositions (tests/unit/test_decompose.py) -----------
# Token ids 3.. are byte tokens of the tiny tokenizer; BOS is 1. Each model reads a few indicator
# dims of the embedding ([token in set]), keeps 16 dims of a fixed +-1 filler code so every
# LayerNorm sees a similar scale, and has zero MLPs and zero position embeddings unless stated.
FILLER = slice(24, 40)


def _one_layer(n_head: int, d: int = 64, n_positions: int = 32) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=d, n_layer=1, n_head=n_head, n_positions=n_positions, n_inner=8
    )
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]:
            ln.weight.fill_(1.0)
        g = torch.Generator().manual_seed(1)
        signs = torch.tensor([1.0] * 8 + [-1.0] * 8)  # balanced: LayerNorm's mean stays ~0
        order = torch.stack([torch.randperm(16, generator=g) for _ in range(VOCAB)])
        model.transformer.wte.weight[:, FILLER] = signs[order]
    return model


def _indicate(model: GPT2LMHeadModel, dim: int, tokens: range) -> None:
    model.transformer.wte.weight.data[list(tokens), dim] = 1.0


def planted_tokens(n: int, length: int, high: int, seed: int = 0) -> torch.Tensor:
    """``[n, length]`` contexts of byte tokens 3..high-1 after a BOS."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, high, (n, length), generator=g)
    ids[:, 0] = 1
    return ids


# moved_feature_model: L0H0 is a previous-token head that moves [token in MOVED] (dim 48) to
# output dim 50; L0H1 attends uniformly and moves [token in OTHER] (dim 49) to output dim 51.
MOVED, OTHER = range(3, 13), range(13, 23)
MOVED_OUT, OTHER_OUT = 50, 51


def moved_feature_model() -> GPT2LMHeadModel:
    model = _one_layer(n_head=2, n_positions=24)
    D, d = 32, 64
    with torch.no_grad():
        _indicate(model, 48, MOVED)
        _indicate(model, 49, OTHER)
        model.transformer.wpe.weight[:, :24] = torch.eye(24) * 2.0  # one-hot position, dims 0..23
        w = model.transformer.h[0].attn.c_attn.weight  # [64, 192]: q | k | v, 32 dims per head
        c = 6.0
        for p in range(24):
            w[p, p] = c  # L0H0 query: position p (query dims 0..23)
            if p + 1 < 24:
                w[p, d + p + 1] = c  # L0H0 key at position j looks like p = j + 1
        w[48, 2 * d] = 1.0  # L0H0 value: the MOVED indicator
        w[49, 2 * d + D] = 1.0  # L0H1 value: the OTHER indicator (L0H1 has zero QK: uniform)
        proj = model.transformer.h[0].attn.c_proj.weight  # [64 (z: head-major), 64]
        proj[0, MOVED_OUT] = 1.0
        proj[D, OTHER_OUT] = 1.0
    return model


# two_match_model: one head whose score is c * ([query in QA][key in KA] + [query in QB][key in KB])
QA, QB, KA, KB = range(3, 13), range(13, 23), range(23, 33), range(33, 43)


def two_match_model() -> GPT2LMHeadModel:
    model = _one_layer(n_head=1)
    d = 64
    with torch.no_grad():
        for dim, tokens in enumerate((QA, QB, KA, KB)):
            _indicate(model, dim, tokens)
        w = model.transformer.h[0].attn.c_attn.weight
        c = 4.0
        w[0, 0] = c  # query dim 0: in QA
        w[1, 1] = c  # query dim 1: in QB
        w[2, d + 0] = c  # key dim 0: in KA
        w[3, d + 1] = c  # key dim 1: in KB
        w[FILLER, 2 * d : 2 * d + 16] = torch.eye(16)  # value: the filler code
        model.transformer.h[0].attn.c_proj.weight[:16, :16] = torch.eye(16)
    return model


# two_head_sum_model: one head that is the sum of two heads with disjoint QK and OV subspaces.
# Every query attends to BOS (zero value) unless it is in XQ (then it attends to keys in XK and
# moves their code, dims 8..15, to output 40..47) or in YQ (attends to YK, moves dims 16..23 to
# output 48..55). Sub-head A = QK dim 0 + OV dims 0..7, sub-head B = QK dim 1 + OV dims 8..15;
# both share the BOS sink (QK dim 2).
XQ, YQ, XK, YK = range(3, 13), range(13, 23), range(23, 33), range(33, 43)
X_OUT, Y_OUT = range(40, 48), range(48, 56)


def two_head_sum_model() -> GPT2LMHeadModel:
    model = _one_layer(n_head=1)
    d = 64
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for dim, tokens in enumerate((XQ, YQ, XK, YK)):
            _indicate(model, dim, tokens)
        model.transformer.wte.weight[1, 4] = 1.0  # BOS
        emb = model.transformer.wte.weight
        emb[list(XK), 8:16] = torch.randint(0, 2, (10, 8), generator=g) * 2.0 - 1
        emb[list(YK), 16:24] = torch.randint(0, 2, (10, 8), generator=g) * 2.0 - 1
        attn = model.transformer.h[0].attn
        w, b = attn.c_attn.weight, attn.c_attn.bias
        a = 7.0
        w[0, 0] = a  # query dim 0: in XQ
        w[2, d + 0] = a  # key dim 0: in XK
        w[1, 1] = a  # query dim 1: in YQ
        w[3, d + 1] = a  # key dim 1: in YK
        b[2] = 6.5  # query dim 2: every query looks for BOS
        w[4, d + 2] = 6.5  # key dim 2: BOS
        w[8:24, 2 * d : 2 * d + 16] = torch.eye(16)  # value dims 0..15: the two codes
        proj = attn.c_proj.weight
        proj[0:8, X_OUT.start : X_OUT.stop] = torch.eye(8)
        proj[8:16, Y_OUT.start : Y_OUT.stop] = torch.eye(8)
    return model


def planted_adapter(model: GPT2LMHeadModel, name: str = "planted"):
    """A :class:`ModelAdapter` over a hand-set model."""
    from headscope.model import ModelAdapter

    return ModelAdapter(model, tiny_tokenizer(), name=name, source="test")
