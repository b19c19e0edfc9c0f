"""Attention-mediated edge graphs between dictionary features ("Tracing Attention Computation
Through Feature Interactions").

For one feature of layer L+1's residual dictionary at a target position, every feature active in
layer L's dictionary at a position up to the target's is a candidate source. Its edge is the
target's pre-activation change caused by the source (times the target's activation), with
attention patterns and norm scales frozen and the MLP linearised; it splits exactly into one
loading per head of layer L (``a_s a_t attention_h(t, s) (v_t . O_h V_h n_s)``), the residual
connection (same position only) and the MLP bypass — the numbers
:func:`headscope.dictionaries.circuits.edge_head_loadings` gives for one edge, here for every
candidate at once: per head, one vector ``W_V[h] W_O[h] v_t`` read by every decoder direction
(``[F, H]``), scaled by each position's frozen norm and attention weight; the MLP read once per
target position as a vector-Jacobian product (the transpose of the per-edge JVP).

The graph keeps the largest edges into the target, then (``depth`` > 1) the largest edges into
the top ``expand`` sources of that pair from the layer before, and so on: ``top`` edges per pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headscope.analysis.results import EdgeGraphResult, GraphEdge, GraphNode
from headscope.analysis.session import Session, TextState
from headscope.dictionaries.basis import Dictionary, DictionarySet
from headscope.dictionaries.circuits import _mlp_read
from headscope.dictionaries.labels import feature_label
from headscope.errors import InputError
from headscope.model.spec import head_name, norm_factor

F64 = torch.float64


@dataclass(frozen=True)
class _Target:
    layer: int  # the target feature's dictionary layer (sources are in layer - 1)
    index: int
    position: int
    activation: float


@dataclass
class _Incoming:
    """Every candidate edge into one target: ``N`` active (source position, feature) pairs."""

    target: _Target
    pos: torch.Tensor  # [N] long
    feat: torch.Tensor  # [N] long
    act: torch.Tensor  # [N] the source features' activations
    heads: torch.Tensor  # [N, H] loadings
    attention: torch.Tensor  # [N, H] attention of each head from the target to the source
    ov: torch.Tensor  # [N, H] per unit attention, as edge_head_loadings reports it
    residual: torch.Tensor  # [N]
    mlp: torch.Tensor  # [N]

    @property
    def edge(self) -> torch.Tensor:  # [N]
        return self.heads.sum(-1) + self.residual + self.mlp


def _node_id(layer: int, index: int, pos: int) -> str:
    return f"L{layer}/{index}@{pos}"


def _incoming(
    session: Session,
    st: TextState,
    dictionaries: DictionarySet,
    tgt: _Target,
    target_vector: str,
    first: int = 0,
) -> _Incoming:
    """Every edge from a feature of layer ``tgt.layer - 1`` at positions ``first..tgt.position``
    into ``tgt``, vectorised over source positions and features (see the module docs)."""
    ad, s = session.adapter, session.adapter.spec
    layer, t = tgt.layer - 1, tgt.position
    src, dst = dictionaries.for_layer(layer), dictionaries.for_layer(tgt.layer)
    x = st.cap.resid_pre[layer][0, : t + 1]  # [S, d] the residual the sources live in
    with torch.no_grad():
        acts = src.sae.encode(x.float())  # [S, F]
    acts[:first] = 0
    pos, feat = acts.nonzero(as_tuple=True)  # [N], [N]
    a_s = acts[pos, feat].to(F64)  # [N]
    feats, inv = torch.unique(feat, return_inverse=True)  # [U], [N]
    W_dec = src.sae.W_dec.detach()[feats].to(F64)  # [U, d]
    sae_t = dst.sae
    t_vec = (
        (sae_t.W_enc[:, tgt.index] if target_vector == "encoder" else sae_t.W_dec[tgt.index])
        .detach()
        .to(F64)
    )  # [d] how the target reads the residual

    ln = ad.ln_attn(layer)
    ln = type(ln)(ln.weight.to(F64), None)
    n_dec = ad.apply_norm_frozen(W_dec, torch.ones((), dtype=F64), ln)  # [U, d] unit norm factor
    c = norm_factor(x, s.norm).to(F64)[:, 0]  # [S] each source position's frozen 1/rms
    w = ad.weights(layer)
    W_V, W_O = w.W_V.to(F64)[w.kv_of_head], w.W_O.to(F64)  # [H, d, D], [H, D, d]
    factor = ad.post_attn_factor(st.cap.attn_out[layer][0, t], layer)  # [d] Gemma, else None
    post = torch.ones((), dtype=F64) if factor is None else factor.to(F64)

    def through_heads(read: torch.Tensor) -> torch.Tensor:  # [d] -> [U, H]
        """Each decoder direction (unit norm factor) through each head's OV, then ``read``."""
        per_head = torch.einsum("hdk,hkm,m->hd", W_V, W_O, post * read)  # [H, d]
        return n_dec @ per_head.T

    _, pattern = session.pattern_rows(st, layer, t)  # [H, t + 1]
    att = pattern.to(F64).T[pos]  # [N, H]
    ov = c[pos, None] * through_heads(t_vec)[inv]  # [N, H]
    scale = a_s * tgt.activation  # [N]
    same = (pos == t).to(F64)  # [N]
    residual = scale * same * (W_dec @ t_vec)[inv]
    m_read = _mlp_read(session, st, layer, t, t_vec)  # [d]
    mlp_in = same * (W_dec @ m_read)[inv]  # [N] the source itself, at the target position
    if not s.parallel_residual:  # ...and what every head moves to the target position
        mlp_in = mlp_in + (att * c[pos, None] * through_heads(m_read)[inv]).sum(-1)
    return _Incoming(
        tgt,
        pos,
        feat,
        a_s,
        scale[:, None] * att * ov,
        att,
        ov,
        residual,
        scale * mlp_in,
    )


def _activations(session: Session, st: TextState, d: Dictionary, pos: int) -> torch.Tensor:
    with torch.no_grad():
        return d.sae.encode(session.resid(st, d.layer, pos).float()[None])[0]  # [F]


def edge_graph(
    session: Session,
    text: str | list[int],
    dictionaries: DictionarySet,
    target_layer: int,
    target_feature: int | None,
    target_pos: int = -1,
    *,
    top: int = 8,
    depth: int = 1,
    expand: int = 3,
    rank_by: str = "edge",
    target_vector: str = "encoder",
    include_bos: bool = False,
    n_alternatives: int = 12,
) -> EdgeGraphResult:
    """The largest edges from features of layer ``target_layer - 1`` (at positions up to
    ``target_pos``) into ``target_feature`` of layer ``target_layer``'s dictionary at
    ``target_pos``, each split over heads plus a bypass; ``depth`` layer pairs back (each further
    pair explains the top ``expand`` sources of the one after it), ``top`` edges per pair.

    ``target_feature`` None: the most active feature there. ``rank_by``: ``"edge"`` ranks by the
    whole edge, ``"heads"`` by its attention-mediated part (the sum of head loadings).
    ``include_bos``: also score sources at position 0, the BOS token, where most heads park their
    attention (its features' edges are real but say little about the text)."""
    s = session.adapter.spec
    if rank_by not in ("edge", "heads"):
        raise InputError("rank_by must be 'edge' or 'heads'")
    if target_vector not in ("encoder", "decoder"):
        raise InputError("target_vector must be 'encoder' or 'decoder'")
    if not 1 <= target_layer <= s.n_layers:
        raise InputError(
            f"target layer must be in 1..{s.n_layers} (its sources are in the layer before)"
        )
    if not 1 <= depth <= target_layer:
        raise InputError(f"depth must be in 1..{target_layer} for a target in layer {target_layer}")
    if top < 1 or expand < 1:
        raise InputError("top and expand must be at least 1")
    for layer in range(target_layer - depth, target_layer + 1):
        dictionaries.for_layer(layer)  # one line naming the layers there are
    st = session.state(text)
    n = st.n_tokens
    t = target_pos + n if target_pos < 0 else target_pos
    if not 0 <= t < n:
        raise InputError(
            f"target position {target_pos} is out of range: the text has {n} tokens (0..{n - 1})"
        )
    d_t = dictionaries.for_layer(target_layer)
    acts_t = _activations(session, st, d_t, t)
    if target_feature is None:
        target_feature = int(acts_t.argmax())
    if not 0 <= target_feature < d_t.n_features:
        raise InputError(
            f"feature {target_feature} out of range 0..{d_t.n_features - 1} of layer "
            f"{target_layer}'s dictionary"
        )

    nodes: dict[str, GraphNode] = {}

    def node(d: Dictionary, index: int, pos: int, act: float) -> str:
        key = _node_id(d.layer, index, pos)
        if key not in nodes:
            nodes[key] = GraphNode(
                id=key,
                feature=d.label(index),
                layer=d.layer,
                index=index,
                position=pos,
                token=st.tokens[pos],
                activation=act,
                label=feature_label(d.features.get(str(index))),
            )
        return key

    root = _Target(target_layer, target_feature, t, float(acts_t[target_feature]))
    root_id = node(d_t, root.index, t, root.activation)
    edges: list[GraphEdge] = []
    scored: list[int] = []
    targets = [root] if root.activation > 0 else []
    for _ in range(depth):
        if not targets:
            break
        first = 0 if include_bos else 1
        parts = [_incoming(session, st, dictionaries, tg, target_vector, first) for tg in targets]
        scored.append(sum(int(p.pos.numel()) for p in parts))
        scores = torch.cat(
            [(p.heads.sum(-1) if rank_by == "heads" else p.edge).abs() for p in parts]
        )
        which = torch.cat([torch.full_like(p.pos, i) for i, p in enumerate(parts)])  # [N]
        local = torch.cat([torch.arange(p.pos.numel()) for p in parts])  # [N]
        best = torch.topk(scores, min(top, int((scores > 0).sum()))).indices.tolist()
        d_s = dictionaries.for_layer(targets[0].layer - 1)
        d_tg = dictionaries.for_layer(targets[0].layer)
        next_targets: list[_Target] = []
        for k in best:  # the top edges only
            p, j = parts[int(which[k])], int(local[k])
            pos, feat, act = int(p.pos[j]), int(p.feat[j]), float(p.act[j])
            src_id = node(d_s, feat, pos, act)
            tgt_id = node(d_tg, p.target.index, p.target.position, p.target.activation)
            edges.append(_edge(p, j, src_id, tgt_id, d_s.layer))
            if len(next_targets) < expand and all(
                (x.index, x.position) != (feat, pos) for x in next_targets
            ):
                next_targets.append(_Target(d_s.layer, feat, pos, act))
        targets = next_targets

    order = torch.argsort(acts_t, descending=True)[:n_alternatives].tolist()
    alternatives = [
        GraphNode(
            id=_node_id(target_layer, i, t),
            feature=d_t.label(i),
            layer=target_layer,
            index=i,
            position=t,
            token=st.tokens[t],
            activation=float(acts_t[i]),
            label=feature_label(d_t.features.get(str(i))),
        )
        for i in order
        if float(acts_t[i]) > 0
    ]
    return EdgeGraphResult(
        tokens=st.tokens,
        target=root_id,
        target_vector=target_vector,
        rank_by=rank_by,
        include_bos=include_bos,
        nodes=list(nodes.values()),
        edges=edges,
        scored=scored,
        alternatives=alternatives,
    )


def _edge(p: _Incoming, j: int, src_id: str, tgt_id: str, layer: int) -> GraphEdge:
    heads = p.heads[j]  # [H]
    total = heads.abs().sum().clamp_min(1e-30)
    order = torch.argsort(heads.abs(), descending=True).tolist()
    return GraphEdge.model_validate(
        {
            "source": src_id,
            "target": tgt_id,
            "edge": float(p.edge[j]),
            "heads": [
                {
                    "head": head_name(layer, h),
                    "loading": float(heads[h]),
                    "share": float(heads[h].abs() / total),
                    "attention": float(p.attention[j, h]),
                    "ov": float(p.ov[j, h]),
                }
                for h in order
            ],
            "residual": float(p.residual[j]),
            "mlp": float(p.mlp[j]),
        }
    )
