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
