"""Priority logic through softmax competition: take keys out of a head's softmax.

The HeadVis paper asks how often heads implement "attend to A if present, otherwise B" by
scoring A's keys above B's: logic invisible to any one (query, key) edge. :func:`knockout`
shows one query's full score profile and where the attention goes when chosen keys (or every
key a rule matches) are removed, two ways:

* **cheap** -- the head's own scores renormalised without those keys (``softmax`` over the rest):
  no forward pass, and exact for this layer's pattern *as it is*; it ignores that the earlier
  layers, which built the query and the other keys, also read the removed keys.
* **exact** -- a forward pass in which no head of layers ``0..L`` may attend to the removed keys
  (from any later position, and from the query itself). The head's scores change wherever
  earlier layers carried information from those keys. Positions are unchanged (the keys are
  masked, not deleted).

:func:`priority_pairs` scans a dataset cheaply for every requested head: queries whose top key A
has most of the attention and whose runner-up B takes most of it once A is knocked out, summed
up as (A, B) token pairs per head, optionally checked by exact knockouts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from headscope.analysis.describe import RuleEngine
from headscope.analysis.head_stream import equal_length_batches, run_layers, run_to_layer
from headscope.analysis.inputs import parse_heads
from headscope.analysis.rule_results import (
    KeyMove,
    KnockoutResult,
    PriorityExample,
    PriorityHead,
    PriorityPair,
    PriorityResult,
)
from headscope.analysis.rules import Rule
from headscope.errors import InputError
from headscope.model import ModelAdapter, head_name
from headscope.model.capture import attention_in_rows, causal_keep


def _hiding(knocked: list[int], query: int, kept: dict[str, Tensor], layer: int, h: int):
    """An attention override hiding ``knocked`` keys from every later query and from ``query``
    itself, in every layer it is applied to; keeps ``layer``'s scores and weights of head ``h``
    at ``query`` in ``kept`` (``"scores"``, ``"weights"``). Whole patterns while they fit
    ``PATTERN_BUDGET_BYTES``, else blocks of query rows (:func:`attention_in_rows`)."""
    kn = torch.tensor(knocked, dtype=torch.long)

    def override(lay, q, k, v, mask, scaling, softcap, window):
        T, S = q.shape[2], k.shape[2]
        dev = q.device
        q_pos = torch.arange(S - T, S, device=dev)[:, None]  # [T, 1]
        hide = torch.zeros(T, S, dtype=torch.bool, device=dev)
        hide[:, kn] = q_pos > kn.to(dev)[None, :]
        if S - T <= query < S:
            hide[query - (S - T), kn] = True
        if mask is None:
            keep = causal_keep(T, S, window, dev) & ~hide
            mask = keep[None, None]
        elif mask.dtype == torch.bool:
            mask = mask & ~hide
        else:
            mask = mask.masked_fill(hide, float("-inf"))

        def keep_row(start: int, scores: Tensor, pattern: Tensor, *_) -> None:
            r = query - (S - T) - start  # the query's row in this block of rows
            if lay == layer and 0 <= r < scores.shape[2]:
                kept["scores"] = scores[0, h, r, : query + 1].float().cpu().clone()
                kept["weights"] = pattern[0, h, r, : query + 1].float().cpu().clone()

        return attention_in_rows(q, k, v, mask, scaling, softcap, window, keep_row), None

    return override


def exact_knockout(
    adapter: ModelAdapter, ids: Tensor, layer: int, h: int, query: int, knocked: list[int]
) -> tuple[Tensor, Tensor]:
    """Scores and attention ``[query + 1]`` of head ``(layer, h)`` at ``query`` after a forward
    pass over ``ids [1, T]`` in which no head of layers ``0..layer`` attends to ``knocked``."""
    kept: dict[str, Tensor] = {}
    run_to_layer(
        adapter, ids, layer, lambda t: None, override=_hiding(knocked, query, kept, layer, h)
    )
    return kept["scores"], kept["weights"]


def knockout(
    session,
    text: str,
    head: str,
    query: int = -1,
    keys: list[int] | None = None,
    rule: Rule | None = None,
    *,
    exact: bool = True,
    top: int = 10,
) -> KnockoutResult:
    """Remove ``keys`` (positions) and/or every key matching ``rule`` from ``head``'s softmax at
    ``query`` and show where its attention goes, cheap and (with ``exact``) exact."""
    ad = session.adapter
    layer, h = parse_heads(ad, [head])[0]
    st = session.state(text, through=layer)
    T = st.n_tokens
    if not -T <= query < T:
        raise InputError(f"query position {query} is outside the text ({T} tokens)")
    query %= T
    chosen = torch.zeros(query + 1, dtype=torch.bool)  # [query + 1]
    for k in keys or []:
        pos = k + T if k < 0 else k
        if not 0 <= pos <= query:
            raise InputError(f"key position {k} is not in 0..{query} (keys come before the query)")
        chosen[pos] = True
    if rule is not None:
        engine = RuleEngine(ad.tokens.display)
        chosen |= engine.mask(rule, st.ids[0].cpu(), torch.tensor([query]), torch.arange(query + 1))
    if not chosen.any():
        what = "the rule matches no key" if rule is not None else "name keys or a rule"
        raise InputError(f"nothing to knock out at query {query}: {what}")
    if chosen.all():
        raise InputError(f"that knocks out every key of query {query}; nothing would be left")
    scores_all, pattern_all = session.pattern_rows(st, layer, query)  # [H, query + 1] each
    scores, before = scores_all[h].float().cpu(), pattern_all[h].float().cpu()
    if torch.isinf(scores[~chosen]).all():
        raise InputError("every key left is outside this layer's sliding window")
    cheap = torch.softmax(scores.masked_fill(chosen, float("-inf")), -1)
    knocked = chosen.nonzero()[:, 0].tolist()
    exact_scores = after = None
    if exact:
        exact_scores, after = exact_knockout(ad, st.ids, layer, h, query, knocked)
    change = ((after if after is not None else cheap) - before).abs()
    change = change.masked_fill(chosen, -1.0)
    order = torch.argsort(-change, stable=True)[: min(top, int((~chosen).sum()))]

    def finite(x: Tensor) -> list[float | None]:
        return [float(v) if torch.isfinite(v) else None for v in x]

    return KnockoutResult(
        tokens=st.tokens,
        head=head_name(layer, h),
        query=query,
        knocked=knocked,
        rule=rule.name if rule is not None else None,
        knocked_mass=float(before[chosen].sum()),
        scores=finite(scores),
        before=before.tolist(),
        cheap=cheap.tolist(),
        exact=after.tolist() if after is not None else None,
        exact_scores=finite(exact_scores) if exact_scores is not None else None,
        moves=[
            KeyMove(
                key=int(k),
                token=st.tokens[int(k)],
                before=float(before[k]),
                cheap=float(cheap[k]),
                exact=float(after[k]) if after is not None else None,
            )
            for k in order
        ],
    )


# ----- over a dataset ---------------------------------------------------------------------------------
_COLUMNS = ("count", "first", "second", "after")  # float64 sums per (head, A, B)


class PriorityCounter:
    """(head, token A, token B) counts of "A if present, otherwise B" queries over a stream.

    A query counts when its top key A (key 0 left out unless ``include_sink``) has at least
    ``min_first`` of the attention, its runner-up B at most ``max_second_before``, and B at
    least ``min_second`` once A is knocked out (cheap: the softmax of the query's scores without
    A; key 0 stays in it). The default ``min_second`` is above 1/2 so that a query with only
    three keys left, spread evenly, does not count. ``update`` takes one layer
    of a batch, ``merge`` adds another counter's state exactly (float64 sums; each pair's example
    is the one where B takes the most, ties to the lower sequence, then query);
    ``state_dict`` is tensors only."""

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        vocab: int,
        *,
        min_first: float = 0.5,
        max_second_before: float = 0.25,
        min_second: float = 0.6,
        include_sink: bool = False,
    ):
        self.n_heads, self.vocab = n_heads, vocab
        self.min_first, self.min_second, self.include_sink = min_first, min_second, include_sink
        self.max_second_before = max_second_before
        self.queries = torch.zeros(n_layers * n_heads, dtype=torch.int64)
        self.events = torch.zeros(n_layers * n_heads, dtype=torch.int64)
        self.keys = torch.zeros(0, dtype=torch.int64)  # (head * V + A) * V + B
        self.sums = torch.zeros(0, len(_COLUMNS), dtype=torch.float64)
        self.example = torch.zeros(0, 4, dtype=torch.int64)  # sequence, query, A's key, B's key
        self.best = torch.zeros(0, dtype=torch.float64)  # B's share after knockout, at example
        self.sequences = torch.zeros((), dtype=torch.int64)

    def update(
        self,
        layer: int,
        heads: list[int],
        scores: Tensor,  # [B, len(heads), T, T] pre-softmax, -inf where masked
        ids: Tensor,  # [B, T]
        seq: Tensor,  # [B] sequence indices
    ) -> None:
        """Add one layer of a batch: the scores of ``heads`` (head indices within the layer)."""
        B, Hs, T, _ = scores.shape
        off = 0 if self.include_sink else 1
        if T - off < 2:
            return
        s = scores.float()
        pattern = torch.softmax(s, -1)  # [B, Hs, T, T]
        v, idx = torch.topk(pattern[..., off:], 2, dim=-1)  # [B, Hs, T, 2]
        v1, v2 = v[..., 0], v[..., 1]
        k1, k2 = idx[..., 0] + off, idx[..., 1] + off  # [B, Hs, T]
        # B's share once A is knocked out, from the scores (1 - A's weight would round to 0)
        rest = s.scatter(-1, k1[..., None], float("-inf")).logsumexp(-1)  # [B, Hs, T]
        after = (s.gather(-1, k2[..., None])[..., 0] - rest).exp()
        has_two = torch.arange(T) >= off + 1  # [T] a query with two candidate keys
        g = torch.tensor([layer * self.n_heads + h for h in heads])  # [Hs] global head index
        self.queries.index_add_(0, g, torch.full((Hs,), B * int(has_two.sum())))
        event = (
            has_two
            & (v1 >= self.min_first)
            & (v2 <= self.max_second_before)
            & (after >= self.min_second)
        )  # [B, Hs, T]
        self.events.index_add_(0, g, event.sum((0, 2)))
        b, hh, q = event.nonzero(as_tuple=True)
        a_tok, b_tok = ids[b, k1[b, hh, q]], ids[b, k2[b, hh, q]]
        keys = (g[hh] * self.vocab + a_tok) * self.vocab + b_tok
        sums = torch.stack(
            [torch.ones_like(v1[b, hh, q]), v1[b, hh, q], v2[b, hh, q], after[b, hh, q]], 1
        ).double()
        example = torch.stack([seq[b], q, k1[b, hh, q], k2[b, hh, q]], 1)
        self._add(keys, sums, example, after[b, hh, q].double())

    def _add(self, keys: Tensor, sums: Tensor, example: Tensor, best: Tensor) -> None:
        keys = torch.cat([self.keys, keys])
        sums = torch.cat([self.sums, sums])
        example = torch.cat([self.example, example])
        best = torch.cat([self.best, best])
        # sort by key, then B's share (high first), then sequence, then query: stable sorts
        order = torch.argsort(example[:, 1], stable=True)
        order = order[torch.argsort(example[order, 0], stable=True)]
        order = order[torch.argsort(-best[order], stable=True)]
        order = order[torch.argsort(keys[order], stable=True)]
        keys, sums, example, best = keys[order], sums[order], example[order], best[order]
        uniq, inverse = torch.unique_consecutive(keys, return_inverse=True)
        first = torch.ones_like(keys, dtype=torch.bool)
        first[1:] = keys[1:] != keys[:-1]
        self.keys = uniq
        self.sums = torch.zeros(uniq.numel(), sums.shape[1], dtype=torch.float64).index_add_(
            0, inverse, sums
        )
        self.example, self.best = example[first], best[first]

    def merge(self, other: PriorityCounter) -> None:
        self.queries += other.queries
        self.events += other.events
        self.sequences += other.sequences
        self._add(other.keys, other.sums, other.example, other.best)

    _STATE = ("queries", "events", "keys", "sums", "example", "best", "sequences")

    def state_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).clone() for name in self._STATE}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in self._STATE:
            setattr(self, name, state[name].clone())

    def result(
        self,
        display: Callable[[int], str],
        query_token: Callable[[int, int], str],
        *,
        top: int = 10,
    ) -> PriorityResult:
        """The summary: per head, its events and most frequent (A, B) pairs; ``query_token(
        sequence, position)`` names the query of each pair's example."""
        V = self.vocab
        g, a, b = self.keys // (V * V), (self.keys // V) % V, self.keys % V
        count = self.sums[:, 0]
        order = torch.argsort(-count, stable=True)  # keys ascending within equal counts

        def pair(i: int) -> PriorityPair:
            n = float(count[i])
            gi = int(g[i])
            seq, q, k1, k2 = self.example[i].tolist()
            return PriorityPair(
                head=head_name(gi // self.n_heads, gi % self.n_heads),
                first=display(int(a[i])),
                second=display(int(b[i])),
                count=int(n),
                first_attention=float(self.sums[i, 1]) / n,
                second_before=float(self.sums[i, 2]) / n,
                second_after=float(self.sums[i, 3]) / n,
                example=PriorityExample(
                    sequence=seq,
                    query=q,
                    first=k1,
                    second=k2,
                    query_token=query_token(seq, q),
                    exact_second_after=None,
                ),
            )

        heads = []
        for gi in torch.argsort(-self.events, stable=True).tolist():
            if self.events[gi] == 0:
                break
            mine = order[g[order] == gi][:top]
            heads.append(
                PriorityHead(
                    head=head_name(gi // self.n_heads, gi % self.n_heads),
                    queries=int(self.queries[gi]),
                    events=int(self.events[gi]),
                    share=int(self.events[gi]) / max(1, int(self.queries[gi])),
                    pairs=[pair(int(i)) for i in mine],
                )
            )
        return PriorityResult(
            sequences=int(self.sequences),
            min_first=self.min_first,
            max_second_before=self.max_second_before,
            min_second=self.min_second,
            include_sink=self.include_sink,
            heads=heads,
            pairs=[pair(int(i)) for i in order[:top]],
        )


def priority_pairs(
    adapter: ModelAdapter,
    sequences: Iterable[tuple[int, Tensor]],
    *,
    heads: list[str] | None = None,
    min_first: float = 0.5,
    max_second_before: float = 0.25,
    min_second: float = 0.6,
    include_sink: bool = False,
    top: int = 10,
    verify: int = 0,
    batch_size: int = 4,
) -> PriorityResult:
    """Find "A if present, otherwise B" behaviour of ``heads`` (default: every head) over
    ``sequences``, ``(index, ids [T])`` pairs with BOS first (a dataset's packed sequences, or a
    run's stored example sequences), by cheap knockouts of each query's top key; see
    :class:`PriorityCounter` for what counts.

    ``verify``: check the example of the first ``verify`` reported pairs (overall and per head)
    with an exact knockout (one forward pass each, up to the head's layer)."""
    for name, x in (
        ("min_first", min_first),
        ("max_second_before", max_second_before),
        ("min_second", min_second),
    ):
        if not 0 <= x <= 1:
            raise InputError(f"{name} must be in [0, 1], got {x}")
    s = adapter.spec
    by_layer: dict[int, list[int]] = {}
    for layer, h in parse_heads(adapter, heads):
        by_layer.setdefault(layer, []).append(h)
    counter = PriorityCounter(
        s.n_layers,
        s.n_heads,
        adapter.tokens.vocab_size,
        min_first=min_first,
        max_second_before=max_second_before,
        min_second=min_second,
        include_sink=include_sink,
    )
    kept: dict[int, Tensor] = {}
    for batch in equal_length_batches(sequences, batch_size):
        ids = torch.stack([t.long().cpu() for _, t in batch])  # [B, T]
        seq = torch.tensor([i for i, _ in batch])
        kept.update((i, t) for i, t in zip(seq.tolist(), ids, strict=True))

        def on_layer(t, ids=ids, seq=seq) -> None:
            hs = sorted(set(by_layer[t.layer]))
            counter.update(t.layer, hs, t.scores[:, hs].float().cpu(), ids, seq)

        run_layers(adapter, ids, list(by_layer), on_layer)
        counter.sequences += len(batch)
    if not int(counter.sequences):
        raise InputError("no sequences to look at")
    tokens = adapter.tokens
    result = counter.result(
        tokens.display, lambda seq, q: tokens.display(int(kept[seq][q])), top=top
    )
    checked: dict[tuple, float] = {}
    for pairs in [result.pairs, *(h.pairs for h in result.heads)]:
        for p in pairs[:verify]:
            ex = p.example
            key = (p.head, ex.sequence, ex.query, ex.first)
            if key not in checked:
                layer, h = parse_heads(adapter, [p.head])[0]
                ids = kept[ex.sequence][None]
                _, row = exact_knockout(adapter, ids, layer, h, ex.query, [ex.first])
                checked[key] = float(row[ex.second])
            ex.exact_second_after = checked[key]
    return result
