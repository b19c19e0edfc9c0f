"""Attention patterns of chosen heads on any text."""

from __future__ import annotations

from dataclasses import dataclass

from headscope.analysis.inputs import MAX_TOKENS, encode_text, parse_heads
from headscope.model import ModelAdapter, head_name


@dataclass(frozen=True)
class AttendResult:
    tokens: list[str]  # display string per position (index = position)
    patterns: dict[str, list[list[float]]]  # head name -> rows (query-major), row q has q+1 keys

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "patterns": self.patterns}


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
    layers = sorted({layer for layer, _ in pairs})
    cap = adapter.run(ids, layers=layers, patterns=True, logits=False)
    patterns = {}
    for layer, h in pairs:
        pat = cap.layers[layer].weights()[0, h]  # [T, T]
        patterns[head_name(layer, h)] = [
            [round(float(w), 6) for w in row[: q + 1]] for q, row in enumerate(pat.tolist())
        ]
    return AttendResult(adapter.tokens.displays(ids[0]), patterns)
