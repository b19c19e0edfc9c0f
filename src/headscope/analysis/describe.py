"""A head's description as rules, tested on every (query, key) pair of a dataset.

The HeadVis paper asks for "a text description of what the head does" that one could "test
every dataset example against". Here a description is a set of named rules over (query, key)
pairs (docs/describe.md): token text or a regex on either side, the distance ``q - k``, same or
different token, induction (``tokens[k - 1] == tokens[q]``), positions, and ``all`` / ``any`` /
``not`` combinations. :func:`describe` streams a head's attention patterns past the rules and
reports, per rule and for all rules together, the share of the head's attention mass they cover,
of its max-attention events and of its top-bucket examples, and lists the strongest
counterexamples: high attention that no rule covers, in context.

Rules are evaluated on whole ``[T, T]`` grids of pairs at once (each condition broadcasts over
query and key positions); a token condition is decided once per token id and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from headscope.analysis.head_stream import (
    _parse,
    head_patterns,
    sparse_patterns,
)
from headscope.analysis.rule_results import (
    Counterexample,
    DescribeResult,
    DistanceShare,
    RuleCoverage,
    TokenShare,
)
from headscope.analysis.rules import Rule, RuleSet, Side, Span
from headscope.errors import InputError
from headscope.model import ModelAdapter

N_BUCKETS = 10  # max-attention buckets [0, 0.1), ..., [0.9, 1.0], as the precompute's examples
N_DISTANCE_BUCKETS = 16  # 0, 1, 2-3, 4-7, ..., >= 2^14
CONTEXT = 6  # tokens shown on each side of a counterexample's key, before its query


# ----- evaluating rules --------------------------------------------------------------------------
def _in(span: int | Span, x: Tensor) -> Tensor:
    if isinstance(span, int):
        return x == span
    keep = torch.ones_like(x, dtype=torch.bool)
    if span.min is not None:
        keep &= x >= span.min
    if span.max is not None:
        keep &= x <= span.max
    return keep


class RuleEngine:
    """Evaluates rules on a token sequence. Token conditions are decided once per token id."""

    def __init__(self, display: Callable[[int], str]):
        self.display = display
        self._verdicts: dict[int, dict[int, bool]] = {}  # id(side) -> token id -> verdict
        self._sides: list[Side] = []  # keeps every cached side alive (its id stays unique)

    def _token_mask(self, side: Side, ids: Tensor) -> Tensor:  # ids [T] -> [T] bool
        if side.text is None and side.regex is None:
            return torch.ones_like(ids, dtype=torch.bool)
        if id(side) not in self._verdicts:
            self._verdicts[id(side)] = {}
            self._sides.append(side)
        cache = self._verdicts[id(side)]
        uniq, inverse = ids.unique(return_inverse=True)
        for t in uniq.tolist():  # each distinct token once, then cached for the next sequence
            if t not in cache:
                cache[t] = side.token_ok(self.display(t))
        verdict = torch.tensor([cache[t] for t in uniq.tolist()], dtype=torch.bool)
        return verdict[inverse]

    def side_mask(self, side: Side, ids: Tensor) -> Tensor:
        """[T] bool: positions whose token meets ``side``'s token and position conditions."""
        mask = self._token_mask(side, ids)
        if side.position is not None:
            mask = mask & _in(side.position, torch.arange(ids.numel()))
        return mask

    def mask(self, rule: Rule, ids: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Whether ``rule`` holds on pairs (q, k) of the sequence ``ids [T]``.

        ``q`` and ``k`` are int64 position tensors that broadcast together (``[T, 1]`` and
        ``[1, T]`` for every pair, or ``[N]`` each for a list of pairs); ``k <= q`` is assumed.
        Returns a bool tensor of their broadcast shape."""
        shape = torch.broadcast_shapes(q.shape, k.shape)
        return torch.broadcast_to(self._eval(rule, ids, q, k), shape)

    def _eval(self, rule: Rule, ids: Tensor, q: Tensor, k: Tensor) -> Tensor:
        parts: list[Tensor] = []
        if rule.query is not None:
            parts.append(self.side_mask(rule.query, ids)[q])
        if rule.key is not None:
            m = self.side_mask(rule.key, ids)
            if rule.key.most_recent:
                pos = torch.arange(ids.numel())
                last = torch.where(m, pos, -1).cummax(0).values  # [T] latest match at or before
                parts.append(k == last[q])
            else:
                parts.append(m[k])
        if rule.distance is not None:
            parts.append(_in(rule.distance, q - k))
        if rule.same_token is not None:
            parts.append((ids[q] == ids[k]) == rule.same_token)
        if rule.induction is not None:
            before = ids[(k - 1).clamp_min(0)]
            parts.append(((k >= 1) & (k < q) & (before == ids[q])) == rule.induction)
        if rule.all:
            parts += [self._eval(r, ids, q, k) for r in rule.all]
        if rule.any:
            parts.append(
                functools.reduce(torch.logical_or, [self._eval(r, ids, q, k) for r in rule.any])
            )
        if rule.not_ is not None:
            parts.append(~self._eval(rule.not_, ids, q, k))
        return functools.reduce(torch.logical_and, parts)


# ----- coverage ---------------------------------------------------------------------------------------
def _distance_bucket(d: Tensor) -> Tensor:
    """0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, ...; capped at N_DISTANCE_BUCKETS - 1."""
    b = torch.floor(torch.log2(d.clamp_min(1).double())).long() + 1
    return torch.where(d >= 1, b, 0).clamp_max(N_DISTANCE_BUCKETS - 1)


def _windows(ids: Tensor, centre: Tensor, before: int, after: int) -> Tensor:
    """[N, before + 1 + after] token ids around each position of ``centre [N]``; -1 outside."""
    idx = centre[:, None] + torch.arange(-before, after + 1)[None, :]
    inside = (idx >= 0) & (idx < ids.numel())
    return torch.where(inside, ids[idx.clamp(0, ids.numel() - 1)], -1)


class Coverage:
    """How much of a head's attention a rule set covers, accumulated sequence by sequence.

    ``update`` takes one sequence's pattern; ``merge`` adds the state of another instance that
    saw other sequences (sums in float64, counterexamples ordered by weight, then sequence, then
    query: any split of the stream gives the same result); ``state_dict`` is tensors only."""

    def __init__(self, rules: RuleSet, display: Callable[[int], str], *, counterexamples: int = 10):
        self.rules = rules
        self.engine = RuleEngine(display)
        self.n_counter = counterexamples
        R = len(rules.rules) + 1  # every rule, then all rules together
        self.total = torch.zeros((), dtype=torch.float64)
        self.mass = torch.zeros(R, dtype=torch.float64)
        self.queries = torch.zeros((), dtype=torch.int64)
        self.events = torch.zeros((), dtype=torch.int64)
        self.event_hits = torch.zeros(R, dtype=torch.int64)
        # one row per sequence: index, max weight, whether each rule covers its max pair
        self.seq_index = torch.zeros(0, dtype=torch.int64)
        self.seq_max = torch.zeros(0, dtype=torch.float64)
        self.seq_hits = torch.zeros(0, R, dtype=torch.bool)
        # the strongest uncovered (query, key) of each query: weight, sequence, q, k, contexts
        self.cx_weight = torch.zeros(0, dtype=torch.float64)
        self.cx_pos = torch.zeros(0, 3, dtype=torch.int64)  # sequence, query, key
        self.cx_key_ctx = torch.zeros(0, 2 * CONTEXT + 1, dtype=torch.int64)
        self.cx_query_ctx = torch.zeros(0, CONTEXT + 1, dtype=torch.int64)
        self.uncovered_by_token = torch.zeros(0, dtype=torch.float64)  # [V seen so far]
        self.uncovered_by_distance = torch.zeros(N_DISTANCE_BUCKETS, dtype=torch.float64)

    def update(self, sequence: int, ids: Tensor, pattern: Tensor) -> None:
        """Add one sequence: ``ids [T]`` (BOS at 0) and the head's ``pattern [T, T]``."""
        T = ids.numel()
        if pattern.shape != (T, T):
            raise ValueError(f"pattern must be [{T}, {T}], got {tuple(pattern.shape)}")
        q = torch.arange(T)[:, None]  # [T, 1]
        k = torch.arange(T)[None, :]  # [1, T]
        counted = (k <= q) & (q >= 1)
        if not self.rules.include_sink:
            counted &= k >= 1
        W = torch.where(counted, pattern.float(), 0.0)  # [T, T] the attention that counts
        masks = [self.engine.mask(r, ids, q, k) for r in self.rules.rules]
        masks.append(functools.reduce(torch.logical_or, masks))
        self.total += W.sum(dtype=torch.float64)
        self.queries += T - 1
        self.mass += torch.stack([torch.where(m, W, 0.0).sum(dtype=torch.float64) for m in masks])
        # max-attention events: each query's largest counted weight, where it reaches min_event
        top, arg = W.max(-1)  # [T]
        event = top >= self.rules.min_event
        self.events += int(event.sum())
        at_max = torch.stack([m.gather(1, arg[:, None])[:, 0] for m in masks])  # [R, T]
        self.event_hits += (at_max & event).sum(-1)
        # the sequence's max pair (its bucket decides whether it is a top-bucket example)
        flat = int(W.flatten().argmax())
        sq, sk = divmod(flat, T)
        self.seq_index = torch.cat([self.seq_index, torch.tensor([sequence])])
        self.seq_max = torch.cat([self.seq_max, W[sq, sk].double()[None]])
        self.seq_hits = torch.cat([self.seq_hits, torch.stack([m[sq, sk] for m in masks])[None]])
        # what no rule covers
        U = torch.where(masks[-1], 0.0, W)  # [T, T]
        uw, uk = U.max(-1)  # [T] each query's strongest uncovered key
        n = min(self.n_counter, T)
        best = torch.topk(uw.double(), n).indices
        best = best[(uw[best] > 0) & (uw[best] >= self.rules.min_counterexample)]
        self._add_counterexamples(
            uw[best].double(),
            torch.stack([torch.full_like(best, sequence), best, uk[best]], 1),
            _windows(ids, uk[best], CONTEXT, CONTEXT),
            _windows(ids, best, CONTEXT, 0),
        )
        by_key = U.sum(0, dtype=torch.float64)  # [T] uncovered mass on each key position
        need = int(ids.max()) + 1
        if need > self.uncovered_by_token.numel():
            grown = torch.zeros(need, dtype=torch.float64)
            grown[: self.uncovered_by_token.numel()] = self.uncovered_by_token
            self.uncovered_by_token = grown
        self.uncovered_by_token.index_add_(0, ids, by_key)
        self.uncovered_by_distance.index_add_(
            0, _distance_bucket(q - k).flatten(), U.flatten().double()
        )

    def _add_counterexamples(
        self, weight: Tensor, pos: Tensor, key_ctx: Tensor, query_ctx: Tensor
    ) -> None:
        w = torch.cat([self.cx_weight, weight])
        p = torch.cat([self.cx_pos, pos])
        kc = torch.cat([self.cx_key_ctx, key_ctx])
        qc = torch.cat([self.cx_query_ctx, query_ctx])
        # order: weight (high first), then sequence, then query: stable sorts, last key first
        order = torch.argsort(p[:, 1], stable=True)
        order = order[torch.argsort(p[order, 0], stable=True)]
        order = order[torch.argsort(-w[order], stable=True)][: self.n_counter]
        self.cx_weight, self.cx_pos = w[order], p[order]
        self.cx_key_ctx, self.cx_query_ctx = kc[order], qc[order]

    def merge(self, other: Coverage) -> None:
        """Add the state of another instance (same rules) that saw other sequences."""
        if other.rules != self.rules:
            raise ValueError("can only merge coverage of the same rules")
        for name in ("total", "mass", "queries", "events", "event_hits", "uncovered_by_distance"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("seq_index", "seq_max", "seq_hits"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        n = max(self.uncovered_by_token.numel(), other.uncovered_by_token.numel())
        merged = torch.zeros(n, dtype=torch.float64)
        merged[: self.uncovered_by_token.numel()] += self.uncovered_by_token
        merged[: other.uncovered_by_token.numel()] += other.uncovered_by_token
        self.uncovered_by_token = merged
        self._add_counterexamples(
            other.cx_weight, other.cx_pos, other.cx_key_ctx, other.cx_query_ctx
        )

    _STATE = (
        "total",
        "mass",
        "queries",
        "events",
        "event_hits",
        "seq_index",
        "seq_max",
        "seq_hits",
        "cx_weight",
        "cx_pos",
        "cx_key_ctx",
        "cx_query_ctx",
        "uncovered_by_token",
        "uncovered_by_distance",
    )

    def state_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).clone() for name in self._STATE}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in self._STATE:
            setattr(self, name, state[name].clone())

    def result(
        self, head: str, source: str, *, top_bucket: Iterable[int] | None = None
    ) -> DescribeResult:
        """The coverage so far. ``top_bucket``: the sequences that are the head's top-bucket
        examples (a run's); default: the sequences in the highest of the ten max-attention
        buckets that any sequence reached."""
        display = self.engine.display
        if top_bucket is not None:
            wanted = torch.tensor(sorted(set(top_bucket)), dtype=torch.int64)
            chosen = torch.isin(self.seq_index, wanted)
            bucket_range = None
        elif self.seq_max.numel():
            bucket = (self.seq_max * N_BUCKETS).floor().long().clamp(0, N_BUCKETS - 1)
            top = int(bucket.max())
            chosen = bucket == top
            bucket_range = [top / N_BUCKETS, (top + 1) / N_BUCKETS]
        else:
            chosen, bucket_range = torch.zeros(0, dtype=torch.bool), None
        n_top = int(chosen.sum())
        top_hits = self.seq_hits[chosen].sum(0) if n_top else None
        total = float(self.total)
        n_events = int(self.events)

        def coverage(i: int, name: str) -> RuleCoverage:
            return RuleCoverage(
                rule=name,
                mass=float(self.mass[i]) / total if total > 0 else None,
                events=int(self.event_hits[i]) / n_events if n_events else None,
                top_bucket=int(top_hits[i]) / n_top if top_hits is not None else None,
            )

        names = self.rules.names
        counter = []
        for w, (seq, qp, kp), kc, qc in zip(
            self.cx_weight.tolist(),
            self.cx_pos.tolist(),
            self.cx_key_ctx,
            self.cx_query_ctx,
            strict=True,
        ):
            key_tok = display(int(kc[CONTEXT]))
            query_tok = display(int(qc[CONTEXT]))
            counter.append(
                Counterexample(
                    sequence=seq,
                    query=qp,
                    key=kp,
                    weight=w,
                    query_token=query_tok,
                    key_token=key_tok,
                    context=_context(display, kc, qc, qp - kp),
                )
            )
        by_token = self.uncovered_by_token
        top_tokens = torch.topk(by_token, min(10, by_token.numel())) if by_token.numel() else None
        tokens = (
            [
                TokenShare(token=display(int(i)), id=int(i), share=float(v) / total)
                for v, i in zip(top_tokens.values, top_tokens.indices, strict=True)
                if v > 0
            ]
            if top_tokens is not None and total > 0
            else []
        )
        distances = [
            DistanceShare(
                min=0 if b == 0 else 2 ** (b - 1),
                max=None if b == N_DISTANCE_BUCKETS - 1 else (0 if b == 0 else 2**b - 1),
                share=float(v) / total,
            )
            for b, v in enumerate(self.uncovered_by_distance.tolist())
            if v > 0 and total > 0
        ]
        return DescribeResult(
            head=head,
            source=source,
            sequences=int(self.seq_index.numel()),
            queries=int(self.queries),
            include_sink=self.rules.include_sink,
            min_event=self.rules.min_event,
            total_mass=total,
            events=n_events,
            top_bucket=bucket_range,
            top_bucket_examples=n_top,
            rules=[coverage(i, name) for i, name in enumerate(names)],
            all_rules=coverage(len(names), "all rules"),
            counterexamples=counter,
            uncovered_key_tokens=tokens,
            uncovered_distances=distances,
        )


def _shown(display: Callable[[int], str], t: int) -> str:
    return display(t).replace("\n", "\u21b5")


def _context(display: Callable[[int], str], key_ctx: Tensor, query_ctx: Tensor, dist: int) -> str:
    """The key marked ``[[key]]`` with its neighbours, then (after ``...`` when they are far
    apart) the tokens before the query and the query marked ``{{query}}``."""
    C = CONTEXT

    def span(ids: list[int], marks: dict[int, tuple[str, str]]) -> str:
        out = []
        for i, t in enumerate(ids):
            if t < 0:
                continue
            left, right = marks.get(i, ("", ""))
            out.append(f"{left}{_shown(display, t)}{right}")
        return "".join(out)

    kc, qc = key_ctx.tolist(), query_ctx.tolist()
    key, query = ("[[", "]]"), ("{{", "}}")
    if dist == 0:
        return span(kc[: C + 1], {C: ("[[{{", "}}]]")})
    if dist <= C:  # the query is inside the key's window
        return span(kc[: C + 1 + dist], {C: key, C + dist: query})
    if dist <= 2 * C + 1:  # the windows meet: the query's starts right after the key's
        tail = qc[2 * C + 1 - dist :]
        return span(kc, {C: key}) + span(tail, {len(tail) - 1: query})
    return span(kc, {C: key}) + " ... " + span(qc, {C: query})


def describe(
    patterns: Iterable[tuple[int, Tensor, Tensor]],
    head: str,
    rules: RuleSet,
    display: Callable[[int], str],
    *,
    source: str,
    top_bucket: Iterable[int] | None = None,
    counterexamples: int = 10,
) -> DescribeResult:
    """Test ``rules`` on every (query, key) pair of ``patterns``, the head's
    ``(sequence index, ids [T], pattern [T, T])`` per sequence (:func:`head_patterns` streams
    them through a model, :func:`sparse_patterns` reads a run's stored examples).

    ``display``: token id -> text (rules match it); ``source``: what the patterns are, in words;
    ``top_bucket``: the sequences that are the head's top-bucket examples (default: the highest
    max-attention bucket reached)."""
    cov = Coverage(rules, display, counterexamples=counterexamples)
    for sequence, ids, pattern in patterns:
        cov.update(sequence, ids, pattern)
    if not cov.seq_index.numel():
        raise InputError("no sequences to test the rules on")
    return cov.result(head, source, top_bucket=top_bucket)


def head_pattern(session: Any, text: str, head: str) -> tuple[Any, Tensor]:
    """The analysed state of ``text`` and one head's full pattern on it, ``[T, T]`` float32,
    recomputed from the captured q and k with the forward pass's own arithmetic."""
    layer, h = _parse(session.adapter, head)
    st = session.state(text)
    return st, session.head_rows(st, layer, h)


def describe_text(
    session: Any, text: str, head: str, rules: RuleSet, *, counterexamples: int = 10
) -> DescribeResult:
    """:func:`describe` on one text (the live operation): every pair of the text."""
    st, pattern = head_pattern(session, text, head)
    return describe(
        [(0, st.ids[0], pattern)],
        head,
        rules,
        session.adapter.tokens.display,
        source="text",
        counterexamples=counterexamples,
    )


def describe_examples(
    payload: dict,
    rules: RuleSet,
    display: Callable[[int], str],
    *,
    adapter: ModelAdapter | None = None,
    counterexamples: int = 10,
    batch_size: int = 8,
) -> DescribeResult:
    """:func:`describe` on the example sequences a run stored for a head (its
    ``heads/L{l}H{h}.json`` payload as a dict); the top bucket is the run's.

    Without ``adapter`` only the stored sparse entries count (the strongest keys of each query,
    so the mass is a share of the stored mass); with it, the head's full patterns on those
    sequences are recomputed."""
    head = payload["head"]
    examples = payload.get("examples") or []
    if not examples:
        raise InputError(f"the run stores no examples for {head}")
    top = next((b for b in payload.get("buckets", []) if b["examples"]), None)
    top_bucket = [examples[i]["sequence"] for i in top["examples"]] if top else None
    if adapter is None:
        patterns: Iterable[tuple[int, Tensor, Tensor]] = sparse_patterns(examples)
        source = "the run's stored examples (sparse patterns: the mass is of the stored mass)"
    else:
        seqs = [(int(e["sequence"]), torch.tensor(e["tokens"])) for e in examples]
        patterns = head_patterns(adapter, seqs, head, batch_size=batch_size)
        source = "the run's example sequences (patterns recomputed by the model)"
    result = describe(
        patterns,
        head,
        rules,
        display,
        source=source,
        top_bucket=top_bucket,
        counterexamples=counterexamples,
    )
    if top is not None:
        result.top_bucket = [float(top["lo"]), float(top["hi"])]
    return result
