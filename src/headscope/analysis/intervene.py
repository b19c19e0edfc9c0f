"""Interventions inside one head's QK circuit (seed 002).

Scale one residual component's contribution to the queries (or keys) of chosen heads only —
every other reader of the residual stream sees it unchanged — and report how those heads'
attention and the next-token distribution change. Optionally freeze every other head's pattern
at its clean value, which removes downstream compensation (the "hydra" effect).
"""

from __future__ import annotations

import torch

from headscope.analysis.attribution import project_side
from headscope.analysis.inputs import check_pair, parse_heads
from headscope.analysis.results import InterveneResult
from headscope.analysis.session import Session, TextState
from headscope.errors import InputError
from headscope.model.capture import CaptureRequest, capturing, eager_attention
from headscope.model.spec import head_name


def component_vectors(session: Session, st: TextState, component: str, layer: int) -> torch.Tensor:
    """One residual component at every position, ``[T, d_model]``, as read by ``layer``."""
    ad, cap = session.adapter, st.cap
    if component == "embed":
        return cap.get("embed")[0]
    if component == "pos_embed":
        if cap.pos_embed is None:
            raise InputError("this model has no learned positional embedding")
        return cap.pos_embed[0]
    if component == "bias":
        total = torch.zeros_like(cap.get("embed")[0])
        for lay in range(layer):
            factor = ad.post_attn_factor(cap.attn_out[lay][0], lay)
            b = ad.weights(lay).b_O
            total = total + (b * factor if factor is not None else b)
        return total
    import re

    m = re.fullmatch(r"L(\d+)(?:H(\d+)|\.mlp)", component)
    if not m:
        raise InputError(
            f"unknown component {component!r}: use embed, pos_embed, bias, L3H1 or L3.mlp"
        )
    lay = int(m.group(1))
    if lay >= layer:
        raise InputError(f"component {component} is not upstream of layer {layer}")
    if m.group(2) is None:
        return cap.mlp_contrib[lay][0]
    h = int(m.group(2))
    if h >= ad.spec.n_heads:
        raise InputError(f"unknown head in component {component!r}")
    out = ad.head_outputs(cap.layers[lay].z[0, :, h : h + 1], lay)[:, 0]  # [T, d]
    factor = ad.post_attn_factor(cap.attn_out[lay][0], lay)
    return out * factor if factor is not None else out


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
) -> InterveneResult:
    """Scale ``component`` by ``scale`` on the ``side`` ("query"/"key") of ``heads`` only."""
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
    # The change to each edited head's q (or k) at every position: (scale - 1) * component's part.
    deltas: dict[int, dict[int, torch.Tensor]] = {}
    for layer, h in pairs:
        X = component_vectors(session, st, component, layer)  # [T, d]
        is_bias = torch.ones(T) if component == "bias" else None
        vec = project_side(
            session, st, layer, h, "q" if side == "query" else "k", X, positions, is_bias
        )
        deltas.setdefault(layer, {})[h] = ((scale - 1.0) * vec).float()  # [T, D]
    edited = {layer: sorted(hs) for layer, hs in deltas.items()}

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
        _, pattern, out = eager_attention(q, k, v, mask, scaling, softcap, window)
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
        _, before = session.pattern_rows(st, layer, query)
        after = rows[layer][h]
        changes.append(
            {
                "head": head_name(layer, h),
                "attention_before": float(before[h, key_]) if key is not None else None,
                "attention_after": float(after[key_]) if key is not None else None,
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
