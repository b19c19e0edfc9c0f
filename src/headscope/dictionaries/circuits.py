"""Feature-level views of a head's circuits: virtual weights and head loadings.

Virtual weights (the HeadVis paper): push every decoder direction of a residual dictionary
through the head's pre-norm weight and W_K (or W_Q), with the norm's scale frozen at a typical
value (a single scalar, so it leaves cosines unchanged) and QK-norm's weight applied; then rank
features by cosine similarity to one feature in that projected space — on the same side (which
features look alike to this head) and on the other side (which query features a key feature
matches best). RoPE is position-dependent and left out: these are position-free affinities.

Head loadings ("Tracing Attention Computation Through Feature Interactions"): the share of an edge between a feature at (layer L, position p_s) and a
feature at (layer L+1, position p_t) that each head of layer L carries:
``a_s * a_t * (v_t . O_h V_h v_s) * attention_h(p_t, p_s)``, with v_s the source decoder
direction (through the frozen pre-norm), v_t the target's encoder direction.
"""

from __future__ import annotations

import torch

from headscope.analysis.inputs import check_pair
from headscope.analysis.results import HeadLoadingsResult, VirtualWeightsResult
from headscope.analysis.session import Session
from headscope.dictionaries.basis import Dictionary, DictionarySet
from headscope.errors import InputError
from headscope.model import ModelAdapter
from headscope.model.spec import head_name, norm_factor, parse_head


def projected_features(
    adapter: ModelAdapter, d: Dictionary, layer: int, head: int, side: str
) -> torch.Tensor:
    """Every decoder direction of ``d`` in the head's query or key space: ``[F, D]``."""
    if side not in ("query", "key"):
        raise InputError("side must be 'query' or 'key'")
    D = d.sae.W_dec.detach().float()  # [F, d_model]
    ln = adapter.ln_attn(layer)
    if adapter.spec.norm.kind == "layer":
        D = D - D.mean(-1, keepdim=True)
    Dn = D * ln.weight.float()
    w = adapter.weights(layer)
    if side == "query":
        out = Dn @ w.W_Q[head].float()
    else:
        out = Dn @ w.W_K[int(w.kv_of_head[head])].float()
    qk = adapter.qk_norm(layer)
    if qk is not None:
        out = out * qk[0 if side == "query" else 1].float()
    return out


def _ranked(d: Dictionary, scores: torch.Tensor, exclude: int | None, top: int) -> list[dict]:
    if exclude is not None:
        scores = scores.clone()
        scores[exclude] = float("-inf")
    idx = torch.topk(scores, min(top, scores.numel() - (exclude is not None))).indices.tolist()
    return [
        {
            "feature": d.label(i),
            "index": i,
            "cosine": float(scores[i]),
            **({"card": d.features[str(i)]} if str(i) in d.features else {}),
        }
        for i in idx
    ]


def virtual_weights(
    adapter: ModelAdapter,
    dictionaries: DictionarySet,
    head: str,
    feature: int,
    side: str = "key",
    *,
    top: int = 20,
) -> VirtualWeightsResult:
    """Features nearest to ``feature`` after projection through the head (see module docs)."""
    try:
        layer, h = parse_head(head, adapter.spec)
    except ValueError as err:
        raise InputError(str(err)) from None
    d = dictionaries.for_layer(layer)
    if not 0 <= feature < d.n_features:
        raise InputError(f"feature {feature} out of range 0..{d.n_features - 1}")
    other = "query" if side == "key" else "key"
    same = torch.nn.functional.normalize(projected_features(adapter, d, layer, h, side), dim=-1)
    opp = torch.nn.functional.normalize(projected_features(adapter, d, layer, h, other), dim=-1)
    src = same[feature]
    return VirtualWeightsResult.model_validate(
        {
            "head": head_name(layer, h),
            "feature": d.label(feature),
            "side": side,
            "same_side": _ranked(d, same @ src, feature, top),
            "other_side": _ranked(d, opp @ src, None, top),
        }
    )


def edge_head_loadings(
    session: Session,
    text: str | list[int],
    dictionaries: DictionarySet,
    source_layer: int,
    source_feature: int,
    source_pos: int,
    target_feature: int,
    target_pos: int,
) -> HeadLoadingsResult:
    """Each head of ``source_layer``'s share of the edge from a feature at (source_layer,
    source_pos) to a feature of the next layer's dictionary at target_pos, ranked."""
    ad, s = session.adapter, session.adapter.spec
    if not 0 <= source_layer < s.n_layers - 1:
        raise InputError(
            f"source layer must be in 0..{s.n_layers - 2} (the target is the next layer)"
        )
    st = session.state(text)
    target_pos, source_pos = check_pair(st.n_tokens, target_pos, source_pos)
    src, tgt = dictionaries.for_layer(source_layer), dictionaries.for_layer(source_layer + 1)
    with torch.no_grad():
        a_s = float(
            src.sae.encode(session.resid(st, source_layer, source_pos).float()[None])[
                0, source_feature
            ]
        )
        a_t = float(
            tgt.sae.encode(session.resid(st, source_layer + 1, target_pos).float()[None])[
                0, target_feature
            ]
        )
    x_s = session.resid(st, source_layer, source_pos)
    v_s = ad.apply_norm_frozen(
        src.sae.W_dec[source_feature].detach().float(),
        norm_factor(x_s, s.norm),
        ad.ln_attn(source_layer),
    )
    v_t = tgt.sae.W_enc[:, target_feature].detach().float()  # [d_model] what reads the target
    w = ad.weights(source_layer)
    vals = torch.einsum("d,hdk->hk", v_s, w.W_V.float()[w.kv_of_head])  # [H, D]
    ov = torch.einsum("hk,hkm,m->h", vals, w.W_O.float(), v_t)  # [H]
    factor = ad.post_attn_factor(st.cap.attn_out[source_layer][0, target_pos], source_layer)
    if factor is not None:  # Gemma's post-attention norm sits between W_O and the residual
        ov = torch.einsum("hk,hkm,m->h", vals, w.W_O.float(), v_t * factor)
    _, pattern = session.pattern_rows(st, source_layer, target_pos)
    att = pattern[:, source_pos]  # [H]
    edge = a_s * a_t * ov * att
    total = edge.abs().sum().clamp_min(1e-30)
    order = torch.argsort(edge.abs(), descending=True).tolist()
    return HeadLoadingsResult.model_validate(
        {
            "source": {
                "feature": src.label(source_feature),
                "position": source_pos,
                "activation": a_s,
            },
            "target": {
                "feature": tgt.label(target_feature),
                "position": target_pos,
                "activation": a_t,
            },
            "heads": [
                {
                    "head": head_name(source_layer, h),
                    "loading": float(edge[h]),
                    "share": float(edge[h].abs() / total),
                    "attention": float(att[h]),
                    "ov": float(ov[h]),
                }
                for h in order
            ],
        }
    )
