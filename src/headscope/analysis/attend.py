"""Tokens and attention patterns of chosen heads on any text."""

from __future__ import annotations

from headscope.analysis.inputs import encode_text, parse_heads
from headscope.analysis.results import AttendResult, TokenizeResult
from headscope.errors import InputError
from headscope.limits import MAX_ATTEND_VALUES, MAX_TOKENS
from headscope.model import ModelAdapter, head_name


def tokenize(adapter: ModelAdapter, text: str, *, max_tokens: int = MAX_TOKENS) -> TokenizeResult:
    """Tokens of ``text`` as the model sees them (BOS first), with their ids."""
    ids = encode_text(adapter, text, max_tokens)[0]
    return TokenizeResult(tokens=adapter.tokens.displays(ids), ids=ids.tolist())


def attend(
    adapter: ModelAdapter,
    text: str,
    heads: list[str] | None = None,
    *,
    max_tokens: int = MAX_TOKENS,
) -> AttendResult:
    """Tokens of ``text`` (BOS first) and the attention pattern of each head in ``heads``
    (every head when None). Rows are truncated at the diagonal: row q lists keys 0..q."""
    ids = encode_text(adapter, text, max_tokens)
    pairs = parse_heads(adapter, heads)
    n = ids.shape[1]
    n_values = len(pairs) * n * (n + 1) // 2
    if n_values > MAX_ATTEND_VALUES:
        raise InputError(
            f"{len(pairs)} heads x {n} tokens is {n_values:,} attention weights; the limit is "
            f"{MAX_ATTEND_VALUES:,}: ask for fewer heads or a shorter text"
        )
    layers = sorted({layer for layer, _ in pairs})
    cap = adapter.run(ids, layers=layers, patterns=True, logits=False)
    patterns = {}
    for layer, h in pairs:
        pat = cap.layers[layer].weights()[0, h]  # [T, T]
        patterns[head_name(layer, h)] = [
            [round(float(w), 6) for w in row[: q + 1]] for q, row in enumerate(pat.tolist())
        ]
    # built from trusted numbers: skip validating millions of floats one by one
    return AttendResult.model_construct(tokens=adapter.tokens.displays(ids[0]), patterns=patterns)
