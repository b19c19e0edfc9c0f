"""Feature-level views of a head's circuits: virtual weights and head loadings.

Virtual weights (the HeadVis paper): push every decoder direction of a residual dictionary
through the head's pre-norm weight and W_K (or W_Q), with the norm's scale frozen at a typical
value (a single scalar, so it leaves cosines unchanged) and QK-norm's weight applied; then rank
features by cosine similarity to one feature in that projected space — on the same side (which
features look alike to this head) and on the other side (which query features a key feature
matches best). RoPE is position-dependent and left out: these are position-free affinities.

Head loadings ("Tracing Attention Computation Through Feature Interactions"): the share of an
edge between a feature at (layer L, position p_s) and a feature at (layer L+1, position p_t) that
each head of layer L carries: ``a_s * a_t * (v_t . O_h V_h v_s) * attention_h(p_t, p_s)``, with
``v_s`` the source feature's decoder vector (through the frozen pre-norm: a residual SAE's
feature is its decoder vector times its activation) and ``v_t`` the vector through which the
target feature reads the residual. The paper writes ``v_t`` as the target's decoder vector too
(its SAE attribution graphs ignore encoders); here the default is the target's *encoder* column,
because that is what sets the target's activation: the loading is then the head's share of the
target's pre-activation change caused by the source. ``target_vector="decoder"`` gives the
paper's convention. Heads are one of three routes: with patterns and norm scales frozen and the
MLP linearised, ``edge = sum_h loading_h + residual + mlp``, where ``residual`` is the residual
connection (p_s = p_t only) and ``mlp`` the layer's MLP acting on what the source adds before it
(directly at p_t = p_s, and through every head).
"""

from __future__ import annotations

import torch

from headscope.analysis.inputs import check_pair
from headscope.analysis.results import HeadLoadingsResult, VirtualWeightsResult
from headscope.analysis.session import Session
from headscope.dictionaries.basis import Dictionary, DictionarySet
from headscope.dictionaries.labels import feature_label
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
            "label": feature_label(d.features.get(str(i))),
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
    *,
    target_vector: str = "encoder",
) -> HeadLoadingsResult:
    """Each head of ``source_layer``'s share of the edge from a feature at (source_layer,
    source_pos) to a feature of the next layer's dictionary at target_pos, ranked; plus the
    bypass (residual connection, MLP) so that loadings + bypass = the whole edge."""
    ad, s = session.adapter, session.adapter.spec
    if not 0 <= source_layer < s.n_layers:
        raise InputError(
            f"source layer must be in 0..{s.n_layers - 1} (the target is the next layer)"
        )
    if target_vector not in ("encoder", "decoder"):
        raise InputError("target_vector must be 'encoder' or 'decoder'")
    st = session.state(text)
    target_pos, source_pos = check_pair(st.n_tokens, target_pos, source_pos)
    src, tgt = dictionaries.for_layer(source_layer), dictionaries.for_layer(source_layer + 1)
    for d, f in ((src, source_feature), (tgt, target_feature)):
        if not 0 <= f < d.n_features:
            raise InputError(f"feature {f} out of range 0..{d.n_features - 1} of {d.label(0)[:-2]}")
    f64 = torch.float64
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
    d_s = src.sae.W_dec[source_feature].detach().to(f64)  # [d] the source's decoder vector
    t_vec = (
        (
            tgt.sae.W_enc[:, target_feature]
            if target_vector == "encoder"
            else tgt.sae.W_dec[target_feature]
        )
        .detach()
        .to(f64)
    )  # [d] how the target feature reads the residual
    ln = ad.ln_attn(source_layer)
    ln = type(ln)(ln.weight.to(f64), None if ln.bias is None else ln.bias.to(f64))
    x_s = session.resid(st, source_layer, source_pos).to(f64)
    n_s = ad.apply_norm_frozen(d_s, norm_factor(x_s, s.norm).to(f64), ln)  # [d]
    w = ad.weights(source_layer)
    W_V, W_O = w.W_V.to(f64)[w.kv_of_head], w.W_O.to(f64)  # [H, d, D], [H, D, d]
    head_out = torch.einsum("d,hdk,hkm->hm", n_s, W_V, W_O)  # [H, d] per unit attention
    factor = ad.post_attn_factor(st.cap.attn_out[source_layer][0, target_pos], source_layer)
    if factor is not None:  # Gemma's post-attention norm sits between W_O and the residual
        head_out = head_out * factor.to(f64)
    _, pattern = session.pattern_rows(st, source_layer, target_pos)
    att = pattern[:, source_pos].to(f64)  # [H]
    ov = head_out @ t_vec  # [H]
    scale = a_s * a_t
    edge_heads = scale * ov * att
    # What one unit of the source adds to the residual between attention and MLP at target_pos.
    same = float(source_pos == target_pos)
    delta_mid = same * d_s  # [d]
    if not s.parallel_residual:
        delta_mid = delta_mid + (att[:, None] * head_out).sum(0)
    residual = scale * same * float(d_s @ t_vec)
    mlp = scale * float(_mlp_jvp(session, st, source_layer, target_pos, delta_mid) @ t_vec)
    total = edge_heads.abs().sum().clamp_min(1e-30)
    order = torch.argsort(edge_heads.abs(), descending=True).tolist()
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
                    "loading": float(edge_heads[h]),
                    "share": float(edge_heads[h].abs() / total),
                    "attention": float(att[h]),
                    "ov": float(ov[h]),
                }
                for h in order
            ],
            "target_vector": target_vector,
            "edge": float(edge_heads.sum()) + residual + mlp,
            "residual": residual,
            "mlp": mlp,
        }
    )


def _mlp_point(session: Session, st, layer: int, pos: int):
    """Where the layer's MLP is linearised at ``pos``: ``(mlp module, its actual input u [d] in
    the module's dtype, the frozen pre-norm factor [1], the pre-norm's weights in float64)``."""
    ad, s = session.adapter, session.adapter.spec
    f64 = torch.float64
    if s.parallel_residual:  # the MLP reads the layer's input, beside attention, not after it
        mid = session.resid(st, layer, pos).to(f64)
    else:
        mid = session.resid(st, layer + 1, pos).to(f64) - st.cap.mlp_contrib[layer][0, pos].to(f64)
    block = ad.layer(layer)
    ln_mod = getattr(block, s.layout.ln_mlp)
    bias = getattr(ln_mod, "bias", None)
    ln = type(ad.ln_attn(layer))(
        ln_mod.weight.detach().to(f64) + s.norm.weight_offset,
        None if bias is None else bias.detach().to(f64),
    )
    f = norm_factor(mid, s.norm).to(f64)
    u = ad.apply_norm_frozen(mid, f, ln) + (ln.bias if ln.bias is not None else 0.0)
    mlp = getattr(block, s.layout.mlp)
    return mlp, u.to(next(mlp.parameters()).dtype), f, ln


def _mlp_jvp(
    session: Session, st, layer: int, pos: int, delta: torch.Tensor
) -> torch.Tensor:  # [d]
    """The layer's MLP output change at ``pos`` for a change ``delta [d]`` of the residual it
    reads (after attention), to first order: its pre-norm (and Gemma's post-MLP norm) frozen at
    their actual scales, the MLP itself linearised at its actual input (a Jacobian-vector
    product)."""
    ad, s = session.adapter, session.adapter.spec
    mlp, u, f, ln = _mlp_point(session, st, layer, pos)
    du = ad.apply_norm_frozen(delta, f, ln)
    with torch.no_grad():
        out = torch.func.jvp(lambda x: mlp(x[None, None])[0, 0], (u,), (du.to(u.dtype),))
    y, dy = out[0], out[1].to(torch.float64)
    post = ad.post_norm(layer, "mlp")
    if post is not None:
        dy = ad.apply_norm_frozen(dy, norm_factor(y, s.norm).to(torch.float64), post)
    return dy


def _frozen_norm_adjoint(ad: ModelAdapter, y: torch.Tensor, factor, norm) -> torch.Tensor:
    """The transpose of :meth:`ModelAdapter.apply_norm_frozen` (centring is symmetric)."""
    out = y * factor * norm.weight.to(y.dtype)
    return out - out.mean(-1, keepdim=True) if ad.spec.norm.kind == "layer" else out


def _mlp_read(
    session: Session, st, layer: int, pos: int, read: torch.Tensor
) -> torch.Tensor:  # [d] float64
    """The vector ``w`` with ``read . _mlp_jvp(..., delta) = w . delta`` for every ``delta``:
    the same linearised MLP, transposed (one vector-Jacobian product instead of one JVP per
    delta)."""
    ad, s = session.adapter, session.adapter.spec
    f64 = torch.float64
    mlp, u, f, ln = _mlp_point(session, st, layer, pos)
    with torch.no_grad():
        out = torch.func.vjp(lambda x: mlp(x[None, None])[0, 0], u)
    y, back = out[0], out[1]
    cot = read.to(f64)
    post = ad.post_norm(layer, "mlp")
    if post is not None:
        post = type(post)(post.weight.to(f64), None)
        cot = _frozen_norm_adjoint(ad, cot, norm_factor(y, s.norm).to(f64), post)
    with torch.no_grad():
        (gu,) = back(cot.to(y.dtype))
    return _frozen_norm_adjoint(ad, gu.to(f64), f, ln)
