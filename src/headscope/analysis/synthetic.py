"""Synthetic task data: repeated random tokens, the induction test of "We Inspected Every Head in
GPT-2 Small Using SAEs"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headscope.analysis.inputs import InputError
from headscope.model import ModelAdapter


@dataclass(frozen=True)
class RepeatedTokens:
    """Sequences ``BOS, r_1..r_n, r_1..r_n`` and the positions where induction predicts."""

    tokens: Tensor  # [n_sequences, 2 * half_len + 1]
    positions: list[int]  # logit positions half_len+1 .. 2*half_len-1: each predicts r_{j+1}


def repeated_random_tokens(
    source: ModelAdapter | int,
    n_sequences: int,
    half_len: int,
    *,
    seed: int = 0,
    bos_id: int | None = None,
) -> RepeatedTokens:
    """BOS + ``half_len`` random tokens + the same tokens again, for ``n_sequences`` sequences.

    ``source`` is an adapter (tokens drawn from its vocabulary without special tokens, its BOS
    first) or a vocabulary size (then ``bos_id`` is required and excluded from the draw).
    ``positions`` are the logit positions in the repeat whose next token a model that copies
    from the first half can predict (``RepeatedTokens.positions``)."""
    if n_sequences < 1 or half_len < 2:
        raise InputError("need at least 1 sequence and half_len >= 2")
    if isinstance(source, ModelAdapter):
        vocab = min(source.tokens.vocab_size, source.spec.d_vocab)
        excluded = set(source.tokens.special_ids)
        bos = source.tokens.bos_id if bos_id is None else bos_id
    else:
        if bos_id is None:
            raise InputError("give bos_id with a vocabulary size")
        vocab, excluded, bos = source, set(), bos_id
    excluded.add(bos)
    allowed = torch.tensor([i for i in range(vocab) if i not in excluded], dtype=torch.long)
    if len(allowed) == 0:
        raise InputError("no token to draw from")
    g = torch.Generator().manual_seed(seed)
    half = allowed[torch.randint(len(allowed), (n_sequences, half_len), generator=g)]
    bos_col = torch.full((n_sequences, 1), bos, dtype=torch.long)
    return RepeatedTokens(
        torch.cat([bos_col, half, half], dim=1), list(range(half_len + 1, 2 * half_len))
    )
