"""Exact QK and OV attributions of one attention edge, in a basis of residual components.

The residual at the query and at the key is a sum of components (token embedding, positional
embedding, each earlier head's output, each earlier MLP's output, biases; see
:meth:`Session.components`). With every norm's scale frozen at its actual value, everything
between the residual and the score is linear: pre-norm, W_Q / W_K (+ biases), QK-norm and RoPE
at the actual positions. So the pre-softmax score is exactly

    score = scale * sum_{i,j} q_i . k_j

over query-side components i and key-side components j (projection biases and LayerNorm biases
folded into the ``bias`` row of each side). Softcapping (Gemma 2) is applied after this sum: the
capped score is reported beside it. OV is linear in the key-side components in the same way.
"""

from __future__ import annotations

import contextlib

import torch

from headscope.analysis.components import COMPONENTS, Basis, Component
from headscope.analysis.inputs import check_pair
from headscope.analysis.results import (
    CompositionResult,
    Marginal,
    OVResult,
    QKResult,
    RankHeadsResult,
)
from headscope.analysis.session import Session, TextState
from headscope.errors import InputError
from headscope.model.spec import head_name, norm_factor, parse_head
from headscope.threads import single_threaded


def _head(session: Session, head: str) -> tuple[int, int]:
    try:
        return parse_head(head, session.adapter.spec)
    except ValueError as err:
        raise InputError(str(err)) from None


def project_side(
    session: Session,
    st: TextState,
    layer: int,
    head: int,
    side: str,
    X: torch.Tensor,  # [..., d_model] residual-stream vectors
    pos: torch.Tensor,  # [...] long: the position each vector sits at
    bias: torch.Tensor | None = None,  # [...] 0/1: where to add the projection's constant part
) -> torch.Tensor:  # [..., D]
    """Map residual vectors into the head's post-QK-norm, post-RoPE query (``side="q"``) or key
    space, linearly: every norm's scale is frozen at its actual value at ``pos``."""
    # float64: rows of a basis can be much larger than their sum (a poor dictionary's
    # reconstruction and error cancel), and the terms must still add up to the score.
    ad, s = session.adapter, session.adapter.spec
    f64 = torch.float64
    x_full = st.cap.resid_pre[layer][0][pos].to(f64)  # [..., d]
    ln = ad.ln_attn(layer)
    ln = type(ln)(ln.weight.to(f64), None if ln.bias is None else ln.bias.to(f64))
    f = norm_factor(x_full, s.norm).to(f64)
    w = ad.weights(layer)
    if side == "q":
        W, b = w.W_Q[head].to(f64), w.b_Q[head].to(f64)
    else:
        kv = int(w.kv_of_head[head])
        W, b = w.W_K[kv].to(f64), w.b_K[kv].to(f64)
    const = b + (ln.bias @ W if ln.bias is not None else 0.0)  # [D]
    vec = ad.apply_norm_frozen(X.to(f64), f, ln) @ W
    if bias is not None:
        vec = vec + bias.to(f64)[..., None] * const
    qk = ad.qk_norm(layer)
    if qk is not None:
        full = ad.apply_norm_frozen(x_full, f, ln) @ W + const  # [..., D] the actual pre-norm q/k
        vec = vec * norm_factor(full, s.norm).to(f64) * qk[0 if side == "q" else 1].to(f64)
    if layer in st.cap.rope:
        cos, sin = st.cap.rope[layer]
        vec = ad.apply_rope(vec, cos[0][pos].to(f64), sin[0][pos].to(f64), s.rotary_dim)
    return vec


def side_vectors(
    session: Session,
    st: TextState,
    layer: int,
    head: int,
    pos: int,
    side: str,
    basis: Basis | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Each basis row's contribution to the head's q (``side="q"``) or k at ``pos``.

    ``basis`` decomposes the residual (default: residual components; or a dictionary, see
    ``headscope.dictionaries.basis``). Returns labels and ``[C, D]`` rows (post-QK-norm,
    post-RoPE); rows sum to the captured q or k vector exactly up to float error."""
    labels, X, flag = (basis or COMPONENTS).decompose(session, st, layer, pos)
    positions = torch.full((len(labels),), pos, dtype=torch.long)
    return labels, project_side(session, st, layer, head, side, X, positions, flag)


def _sorted(labels: list[str], values: torch.Tensor) -> list[dict]:
    order = torch.argsort(values.abs(), descending=True).tolist()
    floats = values.tolist()
    return [{"component": labels[i], "value": floats[i]} for i in order]


def qk_attribution(
    session: Session,
    text: str,
    head: str,
    query: int,
    key: int,
    *,
    top: int = 200,
    basis: Basis | None = None,
) -> QKResult:
    """The head's pre-softmax score on (query, key) as (query component x key component) terms.

    ``score`` is the model's own number (q . k * scale from the forward pass), ``total`` the sum
    of every term (all ``n_terms`` of them; ``terms`` lists the ``top`` largest by |value|)."""
    layer, h = _head(session, head)
    st = session.state(text, through=layer)  # layers 0..layer only
    query, key = check_pair(st.n_tokens, query, key)
    s = session.adapter.spec
    # Components: a few hundred rows, tiny ops (a dictionary's encoder can be large).
    with single_threaded() if basis is None else contextlib.nullcontext():
        # both sides decomposed in one pass (each earlier layer's W_O read once for the two)
        (q_labels, Xq, fq), (k_labels, Xk, fk) = (basis or COMPONENTS).decompose_at(
            session, st, layer, [query, key]
        )
        Q = project_side(session, st, layer, h, "q", Xq, torch.full((len(q_labels),), query), fq)
        K = project_side(session, st, layer, h, "k", Xk, torch.full((len(k_labels),), key), fk)
        terms = s.attn_scale * (Q @ K.T)  # [Cq, Ck]
        t = st.cap.layers[layer]
        kv = int(session.adapter.weights(layer).kv_of_head[h])
        score = float(s.attn_scale * (t.q[0, h, query].double() @ t.k[0, kv, key].double()))
        scores, pattern = session.pattern_rows(st, layer, query)
        flat = terms.flatten()
        n_top = min(top, flat.numel())
        idx = torch.topk(flat.abs(), n_top).indices
        top_values = flat[idx].tolist()
    n_k = terms.shape[1]
    return QKResult.model_validate(
        {
            "head": head_name(layer, h),
            "query": query,
            "key": key,
            "tokens": st.tokens,
            "score": score,
            "total": float(terms.sum(dtype=torch.float64)),
            "capped_score": (
                float(s.attn_softcap * torch.tanh(torch.tensor(score / s.attn_softcap)))
                if s.attn_softcap is not None
                else None
            ),
            "attention": float(pattern[h, key]),
            # A key outside the layer's sliding window gets no attention whatever its score.
            "masked": bool(torch.isinf(scores[h, key])),
            "n_terms": flat.numel(),
            "terms": [
                {"query": q_labels[i // n_k], "key": k_labels[i % n_k], "value": v}
                for i, v in zip(idx.tolist(), top_values, strict=True)
            ],
            "query_marginals": _sorted(q_labels, terms.sum(1)),
            "key_marginals": _sorted(k_labels, terms.sum(0)),
            "basis": (basis or COMPONENTS).name,
            "features": None if basis is None else basis.cards(_shown(q_labels, k_labels, terms)),
        }
    )


def _shown(q_labels: list[str], k_labels: list[str], terms: torch.Tensor, n: int = 40) -> set[str]:
    """Labels of the rows and columns with the largest marginals (for feature hover cards)."""
    rows = torch.topk(terms.sum(1).abs(), min(n, terms.shape[0])).indices.tolist()
    cols = torch.topk(terms.sum(0).abs(), min(n, terms.shape[1])).indices.tolist()
    return {q_labels[i] for i in rows} | {k_labels[j] for j in cols}


def logit_readout(session: Session, st: TextState, pos: int, vec: torch.Tensor) -> torch.Tensor:
    """Direct effect of residual vectors ``vec [..., d]`` added at ``pos`` on the logits
    ``[..., V]``: through the final norm (scale frozen at its actual value) and unembedding."""
    ad = session.adapter
    x = session.resid(st, ad.spec.n_layers, pos)
    normed = ad.apply_norm_frozen(vec, norm_factor(x, ad.spec.norm), ad.ln_final())
    return normed @ ad.unembed()[0]


def ov_attribution(
    session: Session,
    text: str,
    head: str,
    query: int,
    key: int,
    *,
    top: int = 30,
    n_tokens: int = 10,
    basis: Basis | None = None,
    top_pairs: int = 200,
) -> OVResult:
    """What the head moves from ``key`` to ``query``: attention x value path, by key component.

    Each component's output vector o_j sums to the head's actual output through this edge
    (``total_norm`` is the norm of that sum; ``value`` is each o_j projected on the total's
    direction, so values sum to ``total_norm``). ``promoted``/``suppressed`` read the total
    through the final norm and unembedding (logit lens).

    With a dictionary basis that has an output dictionary for the head's layer (the next layer's
    residual dictionary, or the layer's z dictionary), ``pairs`` lists the ``top_pairs`` largest
    (value-side row at the key x output feature at the query) terms and ``outputs`` checks each
    output feature's terms against the model's own output through the edge."""
    layer, h = _head(session, head)
    st = session.state(text)
    query, key = check_pair(st.n_tokens, query, key)
    ad, s = session.adapter, session.adapter.spec
    w = ad.weights(layer)
    kv = int(w.kv_of_head[h])
    labels, X, flag = (basis or COMPONENTS).decompose(session, st, layer, key)
    f64 = torch.float64
    ln = ad.ln_attn(layer)
    ln = type(ln)(ln.weight.to(f64), None if ln.bias is None else ln.bias.to(f64))
    x_key = session.resid(st, layer, key).to(f64)
    Xn = ad.apply_norm_frozen(X.to(f64), norm_factor(x_key, s.norm).to(f64), ln)
    W_V, W_O = w.W_V[kv].to(f64), w.W_O[h].to(f64)
    vals = Xn @ W_V  # [C, D]
    vals = vals + flag.to(f64)[:, None] * (
        w.b_V[kv].to(f64) + (ln.bias @ W_V if ln.bias is not None else 0.0)
    )
    _, pattern = session.pattern_rows(st, layer, query)
    a = pattern[h, key].to(f64)
    out = a * (vals @ W_O)  # [C, d]
    model_out = a * (st.cap.layers[layer].v[0, kv, key].to(f64) @ W_O)  # [d]
    factor = ad.post_attn_factor(st.cap.attn_out[layer][0, query], layer)
    if factor is not None:
        out, model_out = out * factor.to(f64), model_out * factor.to(f64)
    total = out.sum(0)
    norm = total.norm()
    proj = (
        out @ (total / norm) if norm > 0 else torch.zeros(len(labels), dtype=f64, device=out.device)
    )
    logits = logit_readout(session, st, query, total.float())
    order = torch.argsort(proj.abs(), descending=True)[:top].tolist()
    comp_logits = logit_readout(session, st, query, out[order].float())  # [top, V]
    toks = ad.tokens

    def tok_list(values: torch.Tensor, k: int, sign: float) -> list[dict]:
        idx = torch.topk(values * sign, k).indices.tolist()
        return [{"token": toks.display(i), "id": i, "logit": float(values[i])} for i in idx]

    # The OV circuit on the attended token alone: its embedding, normalised on its own, through
    # W_V W_O and the unembedding. A copying head lists the token itself here, whatever else the
    # residual at the key carries.
    key_id = int(st.ids[0, key])
    e = ad.embed_matrix()[key_id].to(f64)  # [d]
    e_out = ad.apply_norm_frozen(e, norm_factor(e, s.norm).to(f64), ln) @ W_V @ W_O  # [d]
    if factor is not None:
        e_out = e_out * factor.to(f64)
    e_logits = logit_readout(session, st, query, e_out.float())
    key_rank = int((logits > logits[key_id]).sum()) + 1
    pairs = None
    if basis is not None and hasattr(basis, "output_read"):
        v_model = st.cap.layers[layer].v[0, kv, key].to(f64)  # [D]
        pairs = _ov_pairs(
            basis, session, st, layer, h, query, labels, out, a * vals, a * v_model, top_pairs
        )
    shown_labels = {labels[i] for i in order} | (pairs["shown"] if pairs else set())

    return OVResult.model_validate(
        {
            "head": head_name(layer, h),
            "query": query,
            "key": key,
            "tokens": st.tokens,
            "attention": float(a),
            "total_norm": float(norm),
            "model_norm": float(model_out.norm()),
            "max_abs_diff": float((total - model_out).abs().max()),
            "terms": [
                {
                    "component": labels[i],
                    "value": float(proj[i]),
                    "value_norm": float(out[i].norm()),
                    "logit_top": [t["token"] for t in tok_list(comp_logits[j], 5, 1.0)],
                }
                for j, i in enumerate(order)
            ],
            "promoted": tok_list(logits, n_tokens, 1.0),
            "suppressed": tok_list(logits, n_tokens, -1.0),
            "key_token": toks.display(key_id),
            "key_token_rank": key_rank,
            "key_token_readout": tok_list(e_logits, n_tokens, 1.0),
            "basis": (basis or COMPONENTS).name,
            "features": None if basis is None else basis.cards(shown_labels),
            **({k: v for k, v in pairs.items() if k != "shown"} if pairs else {}),
        }
    )


def _ov_pairs(
    basis,
    session: Session,
    st: TextState,
    layer: int,
    head: int,
    query: int,
    labels: list[str],
    out: torch.Tensor,  # [C, d_model] each value-side row's output through the edge
    zs: torch.Tensor,  # [C, D] the same rows before W_O (attention x value)
    z_model: torch.Tensor,  # [D] the edge's actual attention x value
    top: int = 200,
    max_outputs: int = 64,
) -> dict | None:
    """OV in the feature basis on both sides: (value-side row at the key x output feature at the
    query) terms, read by the output dictionary's encoder (see ``DictionarySet.output_read``).

    Each output feature's terms sum to the head's actual output through this edge read by that
    feature's encoder (``model``; from the captured value vector, not from the rows)."""
    read = basis.output_read(session, st, layer, head, query)
    if read is None:
        return None
    d, E, acts = read  # E [d_model or D, F]
    if d.site == "resid":
        w = session.adapter.weights(layer)
        model_out = z_model @ w.W_O[head].to(torch.float64)  # [d_model]
        factor = session.adapter.post_attn_factor(st.cap.attn_out[layer][0, query], layer)
        if factor is not None:
            model_out = model_out * factor.to(torch.float64)
        rows, model_vec = out, model_out
    else:  # a z dictionary reads the head's output before W_O (and any post-attention norm)
        rows, model_vec = zs, z_model
    model = model_vec @ E  # [F]
    cols = acts.nonzero().flatten()
    if cols.numel() == 0:  # nothing fires at the query: the features this edge moves most
        cols = torch.topk(model.abs(), min(8, model.numel())).indices
    if cols.numel() > max_outputs:
        cols = cols[torch.topk(model[cols].abs(), max_outputs).indices]
    terms = rows @ E[:, cols]  # [C, O]
    out_labels = [d.label(i) for i in cols.tolist()]
    flat = terms.flatten()
    idx = torch.topk(flat.abs(), min(top, flat.numel())).indices.tolist()
    n_o = terms.shape[1]
    order = torch.argsort(terms.sum(0).abs(), descending=True).tolist()
    return {
        "output_dictionary": f"{d.site}:L{d.layer}",
        "n_pairs": flat.numel(),
        "pairs": [
            {
                "value_feature": labels[i // n_o],
                "output_feature": out_labels[i % n_o],
                "value": float(flat[i]),
            }
            for i in idx
        ],
        "outputs": [
            {
                "feature": out_labels[j],
                "activation": float(acts[cols[j]]),
                "model": float(model[cols[j]]),
                "total": float(terms[:, j].sum()),
            }
            for j in order
        ],
        "shown": {out_labels[j] for j in order[:40]},
    }


def rank_heads(session: Session, text: str, query: int, key: int) -> RankHeadsResult:
    """Every head's attention weight and pre-softmax score on (query, key), by attention."""
    st = session.state(text)
    query, key = check_pair(st.n_tokens, query, key)
    rows = []
    for layer in range(session.adapter.spec.n_layers):
        scores, pattern = session.pattern_rows(st, layer, query)  # [H, query+1]
        for h, (a, sc) in enumerate(
            zip(pattern[:, key].tolist(), scores[:, key].tolist(), strict=True)
        ):
            rows.append({"head": head_name(layer, h), "attention": a, "score": sc})
    rows.sort(key=lambda r: -r["attention"])
    return RankHeadsResult.model_validate(
        {"tokens": st.tokens, "query": query, "key": key, "heads": rows}
    )


def composition(
    session: Session, text: str, head: str, query: int, key: int, *, top: int = 10
) -> CompositionResult:
    """Which earlier heads' outputs drive this edge's score: at the key (K-composition) and at
    the query (Q-composition), each with where that earlier head attended from that position."""
    qk = qk_attribution(session, text, head, query, key, top=1)
    st = session.state(text)

    def side(marginals: list[Marginal], pos: int) -> list[dict]:
        out = []
        for m in marginals:
            c = Component.parse(m.component)
            if c.kind != "head":
                continue
            lay, h = c.layer or 0, c.index or 0
            _, pattern = session.pattern_rows(st, lay, pos)
            to = int(pattern[h].argmax())
            out.append(
                {
                    "head": m.component,
                    "value": m.value,
                    "attends_to": to,
                    "attends_to_token": st.tokens[to],
                    "weight": float(pattern[h, to]),
                }
            )
            if len(out) == top:
                break
        return out

    return CompositionResult.model_validate(
        {
            "head": qk.head,
            "query": qk.query,
            "key": qk.key,
            "score": qk.score,
            "k_composition": side(qk.key_marginals, qk.key),
            "q_composition": side(qk.query_marginals, qk.query),
        }
    )
