"""How each live result prints as text in a terminal (``--json`` prints the model instead).

Numbers are rounded to what a reader can use; every list says what it is.
"""

from __future__ import annotations

from typing import Any

from headscope.analysis.ablate import AblationResult, format_text
from headscope.analysis.results import (
    AttendResult,
    AttendSummaryResult,
    CompositionResult,
    EdgeGraphResult,
    FeaturePageResult,
    GeometryResult,
    HeadLoadingsResult,
    InterveneResult,
    OVResult,
    QKResult,
    RankHeadsResult,
    SweepResult,
    TokenizeResult,
    VirtualWeightsResult,
)
from headscope.analysis.rule_results import DescribeResult, KnockoutResult


def _edge(tokens: list[str], query: int, key: int) -> str:
    return f"query {query} {tokens[query]!r} -> key {key} {tokens[key]!r}"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def tokenize_text(r: TokenizeResult, _req: Any = None) -> str:
    return "\n".join(
        f"{i:>5}  {t!r}  (id {i_})" for i, (t, i_) in enumerate(zip(r.tokens, r.ids, strict=True))
    )


def attend_text(r: AttendResult, _req: Any = None) -> str:
    lines = [" ".join(f"[{i}]{t!r}" for i, t in enumerate(r.tokens))]
    for name, rows in r.patterns.items():
        last = rows[-1]
        top = sorted(range(len(last)), key=lambda k: -last[k])[:5]
        tops = ", ".join(f"{r.tokens[k]!r}@{k} {last[k]:.3f}" for k in top)
        lines.append(f"{name}: the last token attends to {tops}")
    return "\n".join(lines)


def attend_summary_text(r: AttendSummaryResult, _req: Any = None) -> str:
    T = len(r.tokens)
    by_query: dict[int, list[tuple[int, float]]] = {}
    for q, k, w in r.top_keys:
        by_query.setdefault(q, []).append((k, w))
    lines = [f"{r.head} on {T} tokens; queries whose largest non-BOS weight is highest:"]
    order = sorted(range(T), key=lambda q: -r.max_as_query[q])[:10]
    for q in order:
        keys = ", ".join(f"{r.tokens[k]!r}@{k} {w:.3f}" for k, w in by_query.get(q, [])[:4])
        lines.append(f"{q:>6} {r.tokens[q]!r:<16} {r.max_as_query[q]:.3f}  keys: {keys}")
    return "\n".join(lines)


def rank_heads_text(r: RankHeadsResult, req: Any = None) -> str:
    top = req.top if req is not None else 20
    lines = [_edge(r.tokens, r.query, r.key), "    head  attention  score (pre-softmax)"]
    lines += [f"{h.head:>8}  {h.attention:9.4f}  {_num(h.score, '+.3f')}" for h in r.heads[:top]]
    if len(r.heads) > top:
        lines.append(f"({len(r.heads) - top} more heads: --top N, or --json for all)")
    return "\n".join(lines)


def qk_text(r: QKResult, _req: Any = None, top: int = 20) -> str:
    lines = [
        f"{r.head} {_edge(r.tokens, r.query, r.key)}",
        f"score (model) {r.score:+.5f}   sum of all {r.n_terms} terms {r.total:+.5f}   "
        f"attention {r.attention:.4f}",
    ]
    if r.capped_score is not None:
        lines.append(f"softcapped score {r.capped_score:+.5f}")
    if r.masked:
        lines.append("the key is outside this layer's sliding window: it gets no attention")
    lines.append(f"largest terms ({r.basis} basis):    value  query side x key side")
    lines += [f"{t.value:+30.4f}  {t.query} x {t.key}" for t in r.terms[:top]]
    return "\n".join(lines)


def ov_text(r: OVResult, _req: Any = None, top: int = 20) -> str:
    lines = [
        f"{r.head} moves |o| = {r.total_norm:.4f} (model {r.model_norm:.4f}) from key {r.key} "
        f"{r.tokens[r.key]!r} to query {r.query} {r.tokens[r.query]!r}, attention "
        f"{r.attention:.4f}",
        "this edge's output read through the unembedding (logit lens):",
        "  promotes:   " + ", ".join(f"{t.token!r}" for t in r.promoted),
        "  suppresses: " + ", ".join(f"{t.token!r}" for t in r.suppressed),
        f"  the attended token {r.key_token!r} ranks {r.key_token_rank} among the promoted tokens",
        f"the OV circuit on {r.key_token!r}'s embedding alone promotes: "
        + ", ".join(f"{t.token!r}" for t in r.key_token_readout),
        f"key-side components ({r.basis} basis), by their share of the output:",
        "  along output     |term|  component   tokens its term promotes",
    ]
    lines += [
        f"  {t.value:+12.4f} {t.value_norm:10.4f}  {t.component:<10}  {', '.join(map(repr, t.logit_top))}"
        for t in r.terms[:top]
    ]
    return "\n".join(lines)


def composition_text(r: CompositionResult, _req: Any = None) -> str:
    lines = [f"{r.head} query {r.query} -> key {r.key}: score {r.score:+.4f}"]
    for title, rows in (
        ("K-composition (earlier heads' output at the key)", r.k_composition),
        ("Q-composition (earlier heads' output at the query)", r.q_composition),
    ):
        lines.append(f"{title}:")
        lines += [
            f"  {c.value:+8.4f} {c.head:>8} (which attends to {c.attends_to} "
            f"{c.attends_to_token!r}, weight {c.weight:.2f})"
            for c in rows
        ]
    return "\n".join(lines)


def sweep_text(r: SweepResult, _req: Any = None) -> str:
    heads = list(r.attention)
    lines = ["value".ljust(12) + "".join(h.rjust(10) for h in heads)]
    for i, v in enumerate(r.values):
        lines.append(v.ljust(12) + "".join(f"{r.attention[h][i]:10.4f}" for h in heads))
    p0 = r.positions[0]
    lines.append(f"(query {p0.query_token!r} -> key {p0.key_token!r} for the first value)")
    return "\n".join(lines)


def geometry_text(r: GeometryResult, _req: Any = None) -> str:
    def line(name: str, diag: float | None, off: float | None) -> str:
        return f"{name}: mean own-pair cosine {_num(diag, '+.3f')}, other pairs {_num(off, '+.3f')}"

    res = r.residual
    if res.own_mean is not None:  # a grouped set: heads by own - other, most negative first

        def gap(m: Any) -> float:
            return (m.own_mean or 0.0) - (m.other_mean or 0.0)

        ranked = sorted(r.heads.items(), key=lambda kv: gap(kv[1]))
        lines = [
            f"grouped set: mean cosine of each query with its own group's keys vs the others' "
            f"({len(ranked)} heads, most negative own - other first)"
        ]
        lines += [line(h, m.own_mean, m.other_mean) for h, m in ranked[:20]]
        if len(ranked) > 20:
            lines.append(f"... {len(ranked) - 20} more heads (--json for all)")
        lines.append(line(f"residual (layer {res.layer})", res.own_mean, res.other_mean))
        return "\n".join(lines)
    lines = [line(h, m.diag_mean, m.offdiag_mean) for h, m in r.heads.items()]
    lines.append(line(f"residual (layer {res.layer})", res.diag_mean, res.offdiag_mean))
    return "\n".join(lines)


def intervene_text(r: InterveneResult, _req: Any = None) -> str:
    what = f"{r.component} x {r.scale:g} on the {r.side} side"
    lines = [f"{what}{' (other patterns frozen)' if r.freeze_patterns else ''}, query {r.query}"]
    for h in r.heads:
        if h.attention_before is not None and h.attention_after is not None:
            lines.append(
                f"  {h.head}: attention to key {r.key} {h.attention_before:.4f} -> "
                f"{h.attention_after:.4f} ({h.attention_after - h.attention_before:+.4f}), "
                f"score {_num(h.score_before, '+.4f')} -> {_num(h.score_after, '+.4f')}"
            )
        else:
            top = max(range(len(h.row_after)), key=lambda k: h.row_after[k])
            before = max(range(len(h.row_before)), key=lambda k: h.row_before[k])
            lines.append(
                f"  {h.head}: top key {before} {r.tokens[before]!r} -> {top} {r.tokens[top]!r} "
                "(--key K for one key's attention)"
            )
    for title, toks in (("before", r.next_token_before), ("after ", r.next_token_after)):
        lines.append(
            f"next token {title}: " + ", ".join(f"{t.token!r} {t.prob:.3f}" for t in toks[:5])
        )
    lines.append(f"KL(before || after) = {r.kl_divergence:.5f}")
    return "\n".join(lines)


def virtual_weights_text(r: VirtualWeightsResult, _req: Any = None) -> str:
    def row(f) -> str:
        label = (f.card or {}).get("label") or (f.card or {}).get("top_tokens") or ""
        return f"  {f.cosine:+.3f}  {f.feature:<10} {label}"

    side, other = r.side, "query" if r.side == "key" else "key"
    lines = [
        f"{r.feature} as seen through {r.head}'s W_{side[0].upper()} ({side} side)",
        f"same side: features whose {side} projections point the same way "
        f"(the head cannot tell them apart as {side}s):",
        *[row(f) for f in r.same_side[:10]],
        f"other side: {other}-side features this {side} would match (high score when they meet):",
        *[row(f) for f in r.other_side[:10]],
    ]
    return "\n".join(lines)


def feature_text(r: FeaturePageResult, _req: Any = None) -> str:
    lines = [
        f"{r.feature}  {r.label or '(no card)'}",
        f"fires on {r.density:.2%} of {r.n_tokens:,} tokens (mean activation "
        f"{r.mean_activation:.3f}) of {r.data}",
        "top contexts:",
    ]
    for c in r.contexts:
        toks = [f"[[{t}]]" if i == c.at else t for i, t in enumerate(c.tokens)]
        lines.append(f"  {c.activation:7.3f}  {''.join(toks)!r}")
    for title, rows in (("query", r.query_readers), ("key", r.key_readers)):
        lines.append(f"read on the {title} side (share of the head's {title} vector):")
        lines += [f"  {h.head:>7}  {h.share:6.1%}" for h in rows[:5]]
    if r.writers:
        lines.append("written by (direct effect on its pre-activation where it fires):")
        lines += [f"  {h.head:>7}  {h.value:+.4f}  {h.share:+6.1%}" for h in r.writers[:5]]
    for vw in r.near:
        other = "key" if vw.side == "query" else "query"
        lines.append(f"nearest by virtual weight through {vw.head} ({vw.side} side):")
        lines.append(
            "  same side: " + ", ".join(f"{f.feature} {f.cosine:+.2f}" for f in vw.same_side[:5])
        )
        lines.append(
            f"  {other}s it matches: "
            + ", ".join(f"{f.feature} {f.cosine:+.2f}" for f in vw.other_side[:5])
        )
    return "\n".join(lines)


def head_loadings_text(r: HeadLoadingsResult, _req: Any = None) -> str:
    s, t = r.source, r.target
    lines = [
        f"{s.feature}@{s.position} (activation {s.activation:.3f}) -> "
        f"{t.feature}@{t.position} (activation {t.activation:.3f})",
        "    head   share   loading  attention",
    ]
    lines += [
        f"  {h.head:>6}  {h.share:6.3f}  {h.loading:+8.4g}  {h.attention:9.4f}" for h in r.heads
    ]
    if r.edge is not None:
        heads = sum(h.loading for h in r.heads)
        lines.append(
            f"edge {r.edge:+.4g} = heads {heads:+.4g} + residual {r.residual:+.4g} "
            f"+ MLP {r.mlp:+.4g}  (target read by its {r.target_vector})"
        )
    return "\n".join(lines)


def edge_graph_text(r: EdgeGraphResult, _req: Any = None) -> str:
    nodes = {n.id: n for n in r.nodes}

    def name(node_id: str) -> str:
        n = nodes[node_id]
        label = f"  [{n.label}]" if n.label else ""
        return f"{n.feature}@{n.position} {n.token!r} (act {n.activation:.3f}){label}"

    tgt = nodes[r.target]
    if not r.edges:
        lines = [
            f"{name(r.target)}: no edges"
            + (" (it does not fire here)" if not tgt.activation else "")
        ]
        if r.alternatives:
            lines.append(
                "features that fire there: "
                + ", ".join(f"{a.feature} {a.activation:.3f}" for a in r.alternatives[:8])
            )
        return "\n".join(lines)
    lines = [f"edges into {name(r.target)}, ranked by |{r.rank_by}|"]
    layer = None
    for e in r.edges:
        src = nodes[e.source]
        if src.layer != layer:
            layer = src.layer
            lines.append(f"layer {layer} -> {layer + 1}:")
        heads = sum(h.loading for h in e.heads)
        top = ", ".join(f"{h.head} {h.loading:+.3g}" for h in e.heads[:3])
        lines.append(
            f"  {e.edge:+9.4g}  {name(e.source)} -> {nodes[e.target].feature}@{nodes[e.target].position}"
        )
        lines.append(
            f"             heads {heads:+.4g} ({top}) + residual {e.residual:+.3g} + MLP {e.mlp:+.3g}"
        )
    return "\n".join(lines)


def _share(x: float | None) -> str:
    return "   n/a" if x is None else f"{x:6.1%}"


def describe_text(r: DescribeResult, _req: Any = None) -> str:
    sink = "key 0 included" if r.include_sink else "key 0 (the sink) left out"
    bucket = (
        f"top bucket [{r.top_bucket[0]:.1f}, {r.top_bucket[1]:.1f}]"
        if r.top_bucket
        else "top bucket"
    )
    lines = [
        f"{r.head} on {r.source}: {r.sequences} sequences, {r.queries} queries ({sink})",
        f"{r.events} max-attention events (largest weight >= {r.min_event:g}), "
        f"{r.top_bucket_examples} examples in the {bucket}",
        "  mass  events  top-bucket  rule",
    ]
    for c in [*r.rules, r.all_rules]:
        lines.append(f"{_share(c.mass)}  {_share(c.events)}  {_share(c.top_bucket)}      {c.rule}")
    if r.uncovered_key_tokens:
        lines.append(
            "uncovered attention goes to: "
            + ", ".join(f"{t.token!r} {t.share:.1%}" for t in r.uncovered_key_tokens[:6])
        )
    if r.uncovered_distances:
        far = sorted(r.uncovered_distances, key=lambda d: -d.share)[:4]
        lines.append(
            "uncovered by distance: "
            + ", ".join(
                f"{d.min}{'' if d.max == d.min else '-' + (str(d.max) if d.max is not None else '')}"
                f" {d.share:.1%}"
                for d in far
            )
        )
    if r.counterexamples:
        lines.append("strongest counterexamples (no rule covers them; key [[ ]], query {{ }}):")
        lines += [
            f"  {c.weight:.3f}  seq {c.sequence} q {c.query} k {c.key}: {c.context}"
            for c in r.counterexamples
        ]
    else:
        lines.append("no counterexamples: the rules cover every weight that counts")
    return "\n".join(lines)


def knockout_text(r: KnockoutResult, _req: Any = None) -> str:
    knocked = ", ".join(f"{k} {r.tokens[k]!r}" for k in r.knocked[:8])
    more = f" and {len(r.knocked) - 8} more" if len(r.knocked) > 8 else ""
    by = f" (rule {r.rule!r})" if r.rule else ""
    lines = [
        f"{r.head} query {r.query} {r.tokens[r.query]!r}: knocked out {knocked}{more}{by}, "
        f"which had {r.knocked_mass:.4f} of the attention",
        "score profile (pre-softmax) of the strongest keys before:",
    ]
    top = sorted(range(len(r.before)), key=lambda k: -r.before[k])[:5]
    lines += [
        f"  key {k:>5} {r.tokens[k]!r:<16} score {_num(r.scores[k], '+.3f')}  "
        f"attention {r.before[k]:.4f}"
        for k in top
    ]
    exact = r.exact is not None
    lines += [
        "where the attention goes (the largest changes):",
        f"  {'key':>9} {'token':<16} {'before':>8} {'cheap':>8}"
        + (f" {'exact':>8}" if exact else ""),
    ]
    lines += [
        f"  key {m.key:>5} {m.token!r:<16} {m.before:8.4f} {m.cheap:8.4f}"
        + (f" {m.exact:8.4f}" if m.exact is not None else "")
        for m in r.moves
    ]
    lines.append(
        "cheap: this layer's scores renormalised without the knocked-out keys (no forward pass; "
        "it ignores that earlier layers read them too)"
    )
    if exact:
        lines.append("exact: a forward pass in which no head up to this layer attends to them")
    return "\n".join(lines)


def ablate_text(r: AblationResult, _req: Any = None) -> str:
    return format_text(r, limit=20)
