"""Interventions inside one head's QK circuit ("Tracing Attention Computation Through Feature
Interactions").

Scale one residual component's contribution to the queries (or keys) of chosen heads only —
every other reader of the residual stream sees it unchanged — and report how those heads'
attention and the next-token distribution change. Optionally freeze every other head's pattern
at its clean value, which removes downstream compensation (the "hydra" effect).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, Field

from headscope.analysis.attribution import project_side
from headscope.analysis.components import COMPONENTS, Basis
from headscope.analysis.inputs import check_pair, parse_heads
from headscope.analysis.results import InterveneResult
from headscope.analysis.session import Session, TextState
from headscope.errors import InputError
from headscope.model.capture import CaptureRequest, attention_in_rows, capturing
from headscope.model.spec import get_module, head_name

_ROWS_TOKENS = 1 << 14  # tokens (scales x text length) per batched forward pass


def _next_token(session: Session, logits: torch.Tensor, k: int = 10) -> list[dict]:
    probs = torch.softmax(logits.float(), -1)
    top = torch.topk(probs, k)
    return [
        {"token": session.adapter.tokens.display(i), "prob": float(p)}
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


def _deltas(
    session: Session,
    st: TextState,
    pairs: list[tuple[int, int]],
    component: str,
    side: str,
    at: list[int] | None,
    basis: Basis | None,
) -> dict[int, dict[int, torch.Tensor]]:
    """``{layer: {head: [T, D]}}``: the component's part of each head's q (or k) at the
    positions ``at`` (default every position), zero elsewhere."""
    T = st.n_tokens
    positions = torch.arange(T)
    where = torch.ones(T)  # [T] 1 where the component is scaled
    if at is not None:
        where = torch.zeros(T)
        for p in at:
            if not -T <= p < T:
                raise InputError(f"position {p} is outside the text ({T} tokens)")
            where[p] = 1.0
    out: dict[int, dict[int, torch.Tensor]] = {}
    for layer, h in pairs:
        X = (basis or COMPONENTS).vector(session, st, component, layer)  # [T, d]
        is_bias = torch.ones(T, device=X.device) if component == "bias" else None
        vec = project_side(
            session, st, layer, h, "q" if side == "query" else "k", X, positions, is_bias
        )
        out.setdefault(layer, {})[h] = (where.to(vec.device)[:, None] * vec).float()  # [T, D]
    return out


def _scaled_passes(
    session: Session,
    st: TextState,
    parts: dict[int, dict[int, torch.Tensor]],
    side: str,
    scales: list[float],
    query: int,
    freeze_patterns: bool,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """One forward pass per chunk of scales, the text repeated along the batch, row ``s``
    adding ``(scales[s] - 1) x parts`` to the edited heads' q (or k).

    Returns scores and patterns at ``query`` of the edited layers, ``{layer: [S, H, query+1]}``,
    and the logits at ``query``, ``[S, V]`` float32."""
    ad = session.adapter
    T = st.n_tokens
    edited = {layer: sorted(hs) for layer, hs in parts.items()}
    step = max(1, _ROWS_TOKENS // T)
    score_rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in parts}
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in parts}
    logits: list[torch.Tensor] = []
    for a in range(0, len(scales), step):
        factor = torch.tensor(scales[a : a + step], dtype=torch.float32) - 1.0  # [S]

        def override(layer, q, k, v, mask, scaling, softcap, window, factor=factor):
            H = q.shape[1]
            k = k.repeat_interleave(H // k.shape[1], dim=1)
            v = v.repeat_interleave(H // v.shape[1], dim=1)
            here = edited.get(layer, [])
            if freeze_patterns:  # every head not edited attends with its clean q and k
                clean = st.cap.layers[layer]
                fresh = torch.zeros(H, 1, 1, dtype=torch.bool, device=q.device)
                fresh[here] = True
                clean_k = clean.k.repeat_interleave(H // clean.k.shape[1], dim=1)
                q, k = torch.where(fresh, q, clean.q), torch.where(fresh, k, clean_k)
            elif here:
                q, k = q.clone(), k.clone()
            for h in here:
                delta = (factor.to(q.device)[:, None, None] * parts[layer][h]).to(q)  # [S, T, D]
                if side == "query":
                    q[:, h] += delta
                else:
                    k[:, h] += delta

            def keep(start: int, scores: torch.Tensor, pattern: torch.Tensor, *_):
                r = query - start  # the query's row in this block of rows
                if here and 0 <= r < scores.shape[2]:
                    score_rows[layer].append(scores[:, :, r, : query + 1].float().clone())
                    rows[layer].append(pattern[:, :, r, : query + 1].float().clone())

            # whole patterns while [S, H, T, T] fits the budget, else blocks of query rows
            return attention_in_rows(q, k, v, mask, scaling, softcap, window, keep), None

        # the edited layers (every layer when other heads' patterns are frozen) run the
        # override, which keeps the edited heads' rows at the query itself
        needed = None if freeze_patterns else frozenset(parts)
        req = CaptureRequest(layers=needed, patterns=False, override=override, store=False)
        ids = st.ids.expand(len(factor), -1).to(ad.device)
        with torch.no_grad(), capturing(req):
            hidden = ad.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            out = get_module(ad.model, ad.spec.layout.unembed)(hidden[:, query])  # [S, V]
        cap = ad.spec.final_softcap
        logits.append((torch.tanh(out / cap) * cap if cap else out).float())
    return (
        {layer: torch.cat(v) for layer, v in score_rows.items()},
        {layer: torch.cat(v) for layer, v in rows.items()},
        torch.cat(logits),
    )


def _check(side: str, heads: list[str]) -> None:
    if side not in ("query", "key"):
        raise InputError("side must be 'query' or 'key'")
    if not heads:
        raise InputError("name at least one head to intervene on")


def intervene(
    session: Session,
    text: str,
    heads: list[str],
    component: str,
    side: str,
    scale: float,
    query: int = -1,
    key: int | None = None,
    freeze_patterns: bool = False,
    *,
    at: list[int] | None = None,
    basis: Basis | None = None,
) -> InterveneResult:
    """Scale ``component`` by ``scale`` on the ``side`` ("query"/"key") of ``heads`` only.

    ``component`` is a row label of ``basis`` (default: the model's components, e.g. ``L3H1``;
    with a dictionary, a feature ``sae:L5/123``). ``at``: the source positions where it is
    scaled (default: every position)."""
    _check(side, heads)
    st = session.state(text)
    query, key_ = check_pair(st.n_tokens, query, 0 if key is None else key)
    pairs = parse_heads(session.adapter, heads)
    parts = _deltas(session, st, pairs, component, side, at, basis)
    score_rows, rows, logits = _scaled_passes(
        session, st, parts, side, [scale], query, freeze_patterns
    )
    clean_logits = session.logits_at(st, query)
    new_logits = logits[0]
    p_clean = torch.log_softmax(clean_logits.float(), -1)
    p_new = torch.log_softmax(new_logits, -1)
    kl = float((p_clean.exp() * (p_clean - p_new)).sum())
    changes = []
    for layer, h in pairs:
        scores_before, before = session.pattern_rows(st, layer, query)
        after = rows[layer][0, h]
        has_key = key is not None
        changes.append(
            {
                "head": head_name(layer, h),
                "attention_before": float(before[h, key_]) if has_key else None,
                "attention_after": float(after[key_]) if has_key else None,
                "score_before": float(scores_before[h, key_]) if has_key else None,
                "score_after": float(score_rows[layer][0, h, key_]) if has_key else None,
                "row_before": before[h].tolist(),
                "row_after": after.tolist(),
            }
        )
    return InterveneResult.model_validate(
        {
            "tokens": st.tokens,
            "query": query,
            "key": key_ if key is not None else None,
            "component": component,
            "side": side,
            "scale": scale,
            "freeze_patterns": freeze_patterns,
            "heads": changes,
            "next_token_before": _next_token(session, clean_logits),
            "next_token_after": _next_token(session, new_logits),
            "kl_divergence": kl,
        }
    )


# ----- a sweep of the scale ----------------------------------------------------------------------
MAX_CURVE_SCALES = 201


class CurveHead(BaseModel):
    """One edited head's attention and score on (query, key) at each scale."""

    head: str
    attention: list[float]
    score: list[float] = Field(description="pre-softmax score on (query, key) per scale")
    attention_clean: float
    score_clean: float


class InterventionCurve(BaseModel):
    """Attention, score and the logit of one next token while one component's part of the
    chosen heads' query (or key) is scaled at chosen source positions."""

    tokens: list[str]
    query: int
    key: int
    component: str
    side: str
    at: list[int] = Field(description="source positions where the component is scaled")
    freeze_patterns: bool
    scales: list[float]
    heads: list[CurveHead]
    target: str = Field(description="the next token whose logit is followed")
    target_id: int
    logit: list[float] = Field(description="the target's logit at the query, per scale")
    prob: list[float] = Field(description="the target's probability at the query, per scale")
    logit_clean: float
    prob_clean: float


def intervention_curve(
    session: Session,
    text: str,
    heads: list[str],
    component: str,
    side: str,
    scales: list[float],
    query: int = -1,
    key: int = 0,
    at: list[int] | None = None,
    *,
    freeze_patterns: bool = False,
    target: str | int | None = None,
    basis: Basis | None = None,
) -> InterventionCurve:
    """Sweep the scale of ``component``'s contribution to ``heads``' ``side`` input at source
    positions ``at`` (default: the key position when ``side`` is key, the query position when
    it is query); report each head's attention and score on (``query``, ``key``) and the logit
    of ``target`` (a token string, an id, or None: the clean top next token) at ``query``.

    Scales run as batched forward passes (the text repeated along the batch). The score moves
    linearly in the scale: by ``(scale - 1) x`` the sum of the QK attribution terms of the
    component on that side, when the component is scaled only at the key (or query) itself."""
    _check(side, heads)
    if not scales or len(scales) > MAX_CURVE_SCALES:
        raise InputError(f"give 1..{MAX_CURVE_SCALES} scales")
    if any(not math.isfinite(x) for x in scales):
        raise InputError("scales must be finite numbers")
    st = session.state(text)
    query, key = check_pair(st.n_tokens, query, key)
    if at is None:
        at = [key if side == "key" else query]
    at = sorted({p + st.n_tokens if p < 0 else p for p in at})
    pairs = parse_heads(session.adapter, heads)
    parts = _deltas(session, st, pairs, component, side, at, basis)
    score_rows, rows, logits = _scaled_passes(
        session, st, parts, side, [float(x) for x in scales], query, freeze_patterns
    )
    clean_logits = session.logits_at(st, query).float()
    ad = session.adapter
    if target is None:
        tid = int(clean_logits.argmax())
    elif isinstance(target, int):
        if not 0 <= target < clean_logits.shape[0]:
            raise InputError(f"target id {target} is outside the vocabulary")
        tid = target
    else:
        ids = ad.tokens.tokenizer.encode(target, add_special_tokens=False)
        if len(ids) != 1:
            raise InputError(f"target {target!r} is {len(ids)} tokens; give one token")
        tid = int(ids[0])
    probs = torch.softmax(logits, -1)[:, tid]
    out_heads = []
    for layer, h in pairs:
        scores_before, before = session.pattern_rows(st, layer, query)
        out_heads.append(
            CurveHead(
                head=head_name(layer, h),
                attention=rows[layer][:, h, key].tolist(),
                score=score_rows[layer][:, h, key].tolist(),
                attention_clean=float(before[h, key]),
                score_clean=float(scores_before[h, key]),
            )
        )
    return InterventionCurve(
        tokens=st.tokens,
        query=query,
        key=key,
        component=component,
        side=side,
        at=at,
        freeze_patterns=freeze_patterns,
        scales=[float(x) for x in scales],
        heads=out_heads,
        target=ad.tokens.display(tid),
        target_id=tid,
        logit=logits[:, tid].tolist(),
        prob=probs.tolist(),
        logit_clean=float(clean_logits[tid]),
        prob_clean=float(torch.softmax(clean_logits, -1)[tid]),
    )


def curve_text(r: InterventionCurve, _req: object = None) -> str:
    """The curve as a table: one row per scale."""
    where = ", ".join(str(p) for p in r.at)
    lines = [
        f"{r.component} scaled at position(s) {where} in the {r.side} input of "
        f"{', '.join(h.head for h in r.heads)}"
        f"{' (other patterns frozen)' if r.freeze_patterns else ''}; edge query {r.query} "
        f"{r.tokens[r.query]!r} -> key {r.key} {r.tokens[r.key]!r}; next token {r.target!r}",
    ]
    head_cols = "".join(f"  {h.head + ' attn':>12}  {h.head + ' score':>12}" for h in r.heads)
    lines.append(f"{'scale':>8}{head_cols}  {'logit':>9}  {'prob':>7}")
    lines.append(
        f"{'clean':>8}"
        + "".join(f"  {h.attention_clean:>12.4f}  {h.score_clean:>+12.4f}" for h in r.heads)
        + f"  {r.logit_clean:>9.3f}  {r.prob_clean:>7.4f}"
    )
    for i, s in enumerate(r.scales):
        cells = "".join(f"  {h.attention[i]:>12.4f}  {h.score[i]:>+12.4f}" for h in r.heads)
        lines.append(f"{s:>8g}{cells}  {r.logit[i]:>9.3f}  {r.prob[i]:>7.4f}")
    return "\n".join(lines)
