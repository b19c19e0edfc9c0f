"""Validation shared by every live analysis: texts, head names, positions.

Each check raises :class:`InputError` with a message a user can act on; the CLI prints it and
the server returns it as a 4xx JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import torch

from headscope.errors import InputError
from headscope.limits import MAX_TOKENS
from headscope.model import ModelAdapter
from headscope.model.spec import parse_head


def encode_text(adapter: ModelAdapter, text: str, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """``text`` -> token ids ``[1, T]`` with the BOS rule applied; rejects empty/over-long text."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("the text is empty")
    ids = adapter.tokens.encode(text)
    if len(ids) > max_tokens:
        raise InputError(
            f"the text is {len(ids)} tokens long (BOS included); the limit is {max_tokens}"
        )
    return torch.tensor([ids], dtype=torch.long)


def parse_heads(adapter: ModelAdapter, heads: list[str] | None) -> list[tuple[int, int]]:
    """Head names -> (layer, head) pairs; all heads when ``heads`` is None or empty."""
    s = adapter.spec
    if not heads:
        return [(layer, h) for layer in range(s.n_layers) for h in range(s.n_heads)]
    out = []
    for name in heads:
        try:
            out.append(parse_head(name, s))
        except ValueError as err:
            raise InputError(str(err)) from None
    return out


def check_pair(n_tokens: int, query: int, key: int) -> tuple[int, int]:
    """Validate a (query, key) position pair on a text of ``n_tokens`` tokens; -1 = last."""
    if query < 0:
        query += n_tokens
    if key < 0:
        key += n_tokens
    for name, pos in (("query", query), ("key", key)):
        if not 0 <= pos < n_tokens:
            raise InputError(
                f"{name} position {pos} is out of range: the text has {n_tokens} tokens (0..{n_tokens - 1})"
            )
    if key > query:
        raise InputError(f"key position {key} is after query position {query}: attention is causal")
    return query, key
