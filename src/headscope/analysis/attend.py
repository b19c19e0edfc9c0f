"""Tokens and attention patterns of chosen heads on any text; for long texts, one head's
pattern summarised the way the app's token view shows it, without a ``T x T`` pattern."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from headscope.analysis.inputs import encode_text, parse_heads
from headscope.analysis.results import AttendResult, AttendSummaryResult, TokenizeResult
from headscope.errors import InputError
from headscope.limits import MAX_ATTEND_VALUES, MAX_TOKENS
from headscope.model import ModelAdapter, head_name

if TYPE_CHECKING:
    from headscope.analysis.session import Session

SUMMARY_BLOCK = 256  # query rows recomputed at a time by attend_summary


def tokenize(adapter: ModelAdapter, text: str, *, max_tokens: int = MAX_TOKENS) -> TokenizeResult:
    """Tokens of ``text`` as the model sees them (BOS first), with their ids."""
    ids = encode_text(adapter, text, max_tokens)[0]
    return TokenizeResult(tokens=adapter.tokens.displays(ids), ids=ids.tolist())


def attend(session: Session, text: str, heads: list[str] | None = None) -> AttendResult:
    """Tokens of ``text`` (BOS first) and the attention pattern of each head in ``heads``
    (every head when None). Rows are truncated at the diagonal: row q lists keys 0..q.

    The patterns are recomputed from the session's captured q and k (the forward pass's
    arithmetic, as :meth:`Session.pattern_rows`), so a text already in the session's cache
    needs no forward pass, and one that is not joins it (the pass runs up to the deepest head
    asked for): rank-heads and attributions on it that follow need none either."""
    ad = session.adapter
    n = encode_text(ad, text, session.max_tokens).shape[1]
    pairs = parse_heads(ad, heads)
    n_values = len(pairs) * n * (n + 1) // 2
    if n_values > MAX_ATTEND_VALUES:
        raise InputError(
            f"{len(pairs)} heads x {n} tokens is {n_values:,} attention weights; the limit is "
            f"{MAX_ATTEND_VALUES:,}: ask for fewer heads or a shorter text"
        )
    st = session.state(text, through=max(layer for layer, _ in pairs))
    patterns = {}
    for layer, h in pairs:
        pat = session.head_rows(st, layer, h)  # [T, T]
        patterns[head_name(layer, h)] = [
            [round(w, 6) for w in row[: q + 1]] for q, row in enumerate(pat.tolist())
        ]
    # built from trusted numbers: skip validating millions of floats one by one
    return AttendResult.model_construct(tokens=st.tokens, patterns=patterns)


def _rounded(x: torch.Tensor) -> list[float]:
    """Weights to 4 decimals, as float64 so each prints as its short decimal."""
    return ((x.double() * 1e4).round() / 1e4).tolist()


def attend_summary(
    session: Session,
    text: str,
    head: str,
    *,
    top: int = 8,
    threshold: float = 0.02,
    block: int = SUMMARY_BLOCK,
) -> AttendSummaryResult:
    """One head's attention on ``text`` as what a token view shows, for texts of any length.

    Per position: its largest weight as a query (BOS key excluded) and as a key (its own query
    excluded); per query, its ``top`` keys with weight ≥ ``threshold``, largest first. Rows are
    recomputed ``block`` queries at a time from the session's captured q and k (the forward
    pass's arithmetic, as :meth:`Session.pattern_rows`), so no ``T x T`` pattern is ever whole:
    memory grows with ``T x block``. The text joins the session's cache, so rank-heads and
    attributions on it that follow need no forward pass."""
    [(layer, h)] = parse_heads(session.adapter, [head])
    st = session.state(text, through=layer)
    T = st.n_tokens
    as_query = torch.zeros(T)
    as_key = torch.zeros(T)
    rows: list[tuple[int, int, float]] = []
    for start in range(0, T, block):
        stop = min(start + block, T)
        w = session.head_rows(st, layer, h, start, stop)  # [r, stop]: later keys 0
        if stop > 1:
            as_query[start:stop] = w[:, 1:].amax(-1).clamp_min(0)
        values, keys = w.topk(min(top, stop), dim=-1)  # [r, top]
        w[torch.arange(stop - start), torch.arange(start, stop)] = 0.0  # a key's own query
        as_key[:stop] = torch.maximum(as_key[:stop], w.amax(0))
        # largest first, ties by key position: a stable sort by key, then by weight
        by_key = keys.argsort(dim=-1, stable=True)
        values, keys = values.gather(-1, by_key), keys.gather(-1, by_key)
        by_weight = values.argsort(dim=-1, descending=True, stable=True)
        values, keys = values.gather(-1, by_weight), keys.gather(-1, by_weight)
        queries = torch.arange(start, stop)[:, None].expand_as(keys)
        kept = (values >= threshold) & (keys <= queries)  # [r, top]
        rows.extend(
            zip(queries[kept].tolist(), keys[kept].tolist(), _rounded(values[kept]), strict=True)
        )
    return AttendSummaryResult(
        tokens=st.tokens,
        head=head_name(layer, h),
        max_as_query=_rounded(as_query),
        max_as_key=_rounded(as_key),
        top_keys=rows,
    )
