"""Interventions inside one head's QK circuit ("Tracing Attention Computation Through Feature
Interactions").

Scale one residual component's contribution to the queries (or keys) of chosen heads only —
every other reader of the residual stream sees it unchanged — and report how those heads'
attention and the next-token distribution change. Optionally freeze every other head's pattern
at its clean value, which removes downstream compensation (the "hydra" effect).
"""

from __future__ import annotations

import torch

from headscope.analysis.attribution import project_side
from headscope.analysis.components import COMPONENTS, Basis
from headscope.analysis.inputs import check_pair, parse_heads
from headscope.analysis.results import InterveneResult
from headscope.analysis.session import Session
from headscope.errors import InputError
from headscope.model.capture import CaptureRequest, capturing, eager_attention
from headscope.model.spec import head_name


def _next_token(session: Session, logits: torch.Tensor, k: int = 10) -> list[dict]:
    probs = torch.softmax(logits.float(), -1)
    top = torch.topk(probs, k)
    return [
        {"token": session.adapter.tokens.display(i), "prob": float(p)}
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


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
    if side not in ("query", "key"):
        raise InputError("side must be 'query' or 'key'")
    if not heads:
        raise InputError("name at least one head to intervene on")
    st = session.state(text)
    ad = session.adapter
    query, key_ = check_pair(st.n_tokens, query, 0 if key is None else key)
    pairs = parse_heads(ad, heads)
    T = st.n_tokens
    positions = torch.arange(T)
    where = torch.ones(T)  # [T] 1 where the component is scaled
    if at is not None:
        where = torch.zeros(T)
        for p in at:
            if not -T <= p < T:
                raise InputError(f"position {p} is outside the text ({T} tokens)")
            where[p] = 1.0
    # The change to each edited head's q (or k) at every position: (scale - 1) * component's part.
    deltas: dict[int, dict[int, torch.Tensor]] = {}
    for layer, h in pairs:
        X = (basis or COMPONENTS).vector(session, st, component, layer)  # [T, d]
        is_bias = torch.ones(T) if component == "bias" else None
        vec = project_side(
            session, st, layer, h, "q" if side == "query" else "k", X, positions, is_bias
        )
        deltas.setdefault(layer, {})[h] = ((scale - 1.0) * where[:, None] * vec).float()  # [T, D]
    edited = {layer: sorted(hs) for layer, hs in deltas.items()}

    score_rows: dict[int, torch.Tensor] = {}

    def override(layer, q, k, v, mask, scaling, softcap, window):
        H = q.shape[1]
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
        if layer in deltas:
            q, k = q.clone(), k.clone()
            for h, d in deltas[layer].items():
                if side == "query":
                    q[0, h] += d
                else:
                    k[0, h] += d
        scores, pattern, out = eager_attention(q, k, v, mask, scaling, softcap, window)
        if layer in deltas:
            score_rows[layer] = scores[0, :, query, : query + 1].clone()  # [H, query + 1]
        if freeze_patterns:
            clean = st.cap.layers[layer]
            _, clean_pattern, _ = eager_attention(
                clean.q, clean.k, clean.v, mask, scaling, softcap, window
            )
            keep = torch.zeros(H, dtype=torch.bool)
            keep[edited.get(layer, [])] = True
            pattern = torch.where(keep[None, :, None, None], pattern, clean_pattern)
            out = torch.matmul(pattern, v).transpose(1, 2)
        return out, pattern

    rows: dict[int, torch.Tensor] = {}

    def keep_rows(t):  # only the edited layers' rows at the query are kept, not T^2 patterns
        if t.layer in deltas:
            rows[t.layer] = t.pattern[0, :, query, : query + 1].clone()

    needed = None if freeze_patterns else frozenset(deltas)
    req = CaptureRequest(
        layers=needed, patterns=True, override=override, on_layer=keep_rows, store=False
    )
    with torch.no_grad(), capturing(req):
        logits = ad.model(input_ids=st.ids, use_cache=False).logits
    clean_logits = session.logits_at(st, query)
    new_logits = logits[0, query]
    p_clean = torch.log_softmax(clean_logits.float(), -1)
    p_new = torch.log_softmax(new_logits.float(), -1)
    kl = float((p_clean.exp() * (p_clean - p_new)).sum())
    changes = []
    for layer, h in pairs:
        scores_before, before = session.pattern_rows(st, layer, query)
        after = rows[layer][h]
        has_key = key is not None
        changes.append(
            {
                "head": head_name(layer, h),
                "attention_before": float(before[h, key_]) if has_key else None,
                "attention_after": float(after[key_]) if has_key else None,
                "score_before": float(scores_before[h, key_]) if has_key else None,
                "score_after": float(score_rows[layer][h, key_]) if has_key else None,
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
