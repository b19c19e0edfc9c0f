"""What every live analysis returns: one pydantic model per result.

The analysis functions return these models; the server sends them as JSON (they generate the
response half of ``/openapi.json``), the CLI prints them as text or JSON, and the browser app's
``data.js`` reads the same fields. Results may gain fields without breaking the app.

Positions are token indices with the BOS token at 0. Head names are ``L{layer}H{head}``.
Component labels are :mod:`headscope.analysis.components` labels (``embed``, ``L3H1``,
``L3.mlp``, ``bias``, ``F123`` features, ``error``, ...).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizeResult(Result):
    tokens: list[str] = Field(description="display string per position, BOS first")
    ids: list[int]


class AttendResult(Result):
    tokens: list[str] = Field(description="display string per position, BOS first")
    patterns: dict[str, list[list[float]]] = Field(
        description="head -> rows (query-major); row q lists the weights of keys 0..q"
    )


class AttendSummaryResult(Result):
    tokens: list[str] = Field(description="display string per position, BOS first")
    head: str
    max_as_query: list[float] = Field(
        description="per position, its largest attention weight as a query (BOS key excluded)"
    )
    max_as_key: list[float] = Field(
        description="per position, the largest weight any later query gives it as a key"
    )
    top_keys: list[tuple[int, int, float]] = Field(
        description="[query, key, weight] triples: each query's largest weights above the "
        "threshold, largest first"
    )


# ----- one attention edge -------------------------------------------------------------------------
class RankedHead(Result):
    head: str
    attention: float
    score: float | None = Field(description="pre-softmax score; null where the key is masked")


class RankHeadsResult(Result):
    tokens: list[str]
    query: int
    key: int
    heads: list[RankedHead] = Field(description="every head, highest attention first")


class QKTerm(Result):
    query: str
    key: str
    value: float


class Marginal(Result):
    component: str
    value: float


class QKResult(Result):
    """The pre-softmax score of (query, key) as a sum of (query component x key component)."""

    head: str
    query: int
    key: int
    basis: str = "components"
    tokens: list[str]
    score: float = Field(description="the model's own pre-softmax score")
    total: float = Field(description="sum of all n_terms terms; equals score up to float error")
    capped_score: float | None
    attention: float
    masked: bool = Field(description="the key is outside the layer's sliding window")
    n_terms: int
    terms: list[QKTerm] = Field(description="the largest terms by |value|")
    query_marginals: list[Marginal]
    key_marginals: list[Marginal]
    features: dict[str, dict[str, Any]] | None = Field(
        None, description="feature label -> its card (feature basis only)"
    )


class OVTerm(Result):
    component: str
    value: float = Field(description="the term's output projected on the total's direction")
    value_norm: float = Field(description="the norm of the term's output vector")
    logit_top: list[str]


class TokenLogit(Result):
    token: str
    id: int
    logit: float


class OVPairTerm(Result):
    value_feature: str = Field(description="value-side row at the key (feature, b_dec, error)")
    output_feature: str = Field(description="output-side feature (read at the query)")
    value: float = Field(
        description="the row's output through this edge, read by the output feature's encoder"
    )


class OVOutputFeature(Result):
    feature: str
    activation: float = Field(description="the output feature's activation at the query")
    model: float = Field(
        description="the head's actual output through this edge read by the feature's encoder"
    )
    total: float = Field(description="sum of this feature's pair terms; equals model")


class OVResult(Result):
    """What the head moves from key to query, by key-side component."""

    head: str
    query: int
    key: int
    basis: str = "components"
    tokens: list[str]
    attention: float
    total_norm: float
    model_norm: float
    max_abs_diff: float
    terms: list[OVTerm]
    promoted: list[TokenLogit] = Field(
        description="tokens this edge's output raises most, read through the final norm and "
        "unembedding (logit lens)"
    )
    suppressed: list[TokenLogit]
    key_token: str = Field("", description="the attended (key) token")
    key_token_rank: int | None = Field(
        None,
        description="rank of the key token among the output's logits (1: it is promoted "
        "most, as a copying head does)",
    )
    key_token_readout: list[TokenLogit] = Field(
        default_factory=list,
        description="the OV circuit applied to the key token's own embedding, read out: what the "
        "head writes for that token in any context",
    )
    features: dict[str, dict[str, Any]] | None = None
    output_dictionary: str | None = Field(
        None,
        description="the dictionary whose encoder reads the head's output (the next layer's "
        "residual dictionary, or the layer's z dictionary); null: no feature pairs",
    )
    n_pairs: int = 0
    pairs: list[OVPairTerm] = Field(
        default_factory=list,
        description="(value-side row at the key x output feature at the query) terms, largest "
        "|value| first",
    )
    outputs: list[OVOutputFeature] = Field(default_factory=list)


class ComposingHead(Result):
    head: str
    value: float
    attends_to: int
    attends_to_token: str
    weight: float


class CompositionResult(Result):
    head: str
    query: int
    key: int
    score: float
    k_composition: list[ComposingHead]
    q_composition: list[ComposingHead]


# ----- sweep / geometry / intervene ---------------------------------------------------------------
class SweepPosition(Result):
    value: str
    query: int
    key: int
    query_token: str
    key_token: str


class SweepResult(Result):
    """Attention of each head from the query to the key, one weight per value."""

    template: str
    values: list[str]
    positions: list[SweepPosition] = Field(description="where query and key fell, per value")
    attention: dict[str, list[float]] = Field(description="head -> one weight per value")


class CosineMatrix(Result):
    layer: int
    cosine: list[list[float]] = Field(description="[queries, keys] cosine similarities")
    diag_mean: float | None = None
    offdiag_mean: float | None = None
    own_mean: float | None = Field(None, description="grouped sets: mean over own-group pairs")
    other_mean: float | None = Field(None, description="grouped sets: mean over the rest")


class GeometryResult(Result):
    """Cosine similarity of mean-subtracted query and key vectors per head, and the same for
    the residual stream at the first requested layer's input (``residual``) and at each."""

    query_labels: list[str]
    key_labels: list[str]
    heads: dict[str, CosineMatrix]
    residual: CosineMatrix
    residual_by_layer: dict[str, CosineMatrix]


class HeadChange(Result):
    head: str
    attention_before: float | None = Field(description="on (query, key); null without a key")
    attention_after: float | None
    score_before: float | None = Field(None, description="pre-softmax score on (query, key)")
    score_after: float | None = None
    row_before: list[float] = Field(description="the query's attention row before")
    row_after: list[float]


class TokenProb(Result):
    token: str
    prob: float


class InterveneResult(Result):
    """Attention and next-token distribution before and after scaling one component's
    contribution to the chosen heads' queries or keys."""

    tokens: list[str]
    query: int
    key: int | None
    component: str
    side: str
    scale: float
    freeze_patterns: bool
    heads: list[HeadChange]
    next_token_before: list[TokenProb]
    next_token_after: list[TokenProb]
    kl_divergence: float


# ----- feature circuits (dictionaries) ------------------------------------------------------------
class NearFeature(Result):
    feature: str
    index: int
    cosine: float
    card: dict[str, Any] | None = None
    label: str | None = Field(None, description="a short label from its card")


class VirtualWeightsResult(Result):
    """Features nearest to one feature after both are projected through a head's W_Q or W_K.

    ``same_side``: features whose projection on the same side (keys, for ``side="key"``) points
    the same way: the head cannot tell them apart on that side. ``other_side``: features whose
    projection on the other side matches it: queries (keys) that this key (query) would attract.
    """

    head: str
    feature: str
    side: str
    same_side: list[NearFeature]
    other_side: list[NearFeature]


class FeatureAt(Result):
    feature: str
    position: int
    activation: float


class HeadLoading(Result):
    head: str
    loading: float
    share: float
    attention: float
    ov: float


class HeadLoadingsResult(Result):
    """Each head's share of the edge from a source feature to a feature of the next layer.

    ``edge`` = the heads' loadings + ``residual`` + ``mlp`` (the bypass), exactly."""

    source: FeatureAt
    target: FeatureAt
    heads: list[HeadLoading]
    target_vector: str = Field(
        "encoder",
        description="how the target feature reads the residual: its encoder column (what sets "
        "its activation) or its decoder row (the paper's convention)",
    )
    edge: float | None = Field(
        None,
        description="the whole edge: a_s a_t times the target vector read of what one unit of "
        "the source feature at the source position adds to the next layer's residual at the "
        "target position (attention patterns and norm scales frozen, the MLP linearised)",
    )
    residual: float = Field(0.0, description="the residual connection's part (same position only)")
    mlp: float = Field(0.0, description="the part through the layer's MLP, linearised")


class GraphNode(Result):
    """A dictionary feature at one position of the text."""

    id: str = Field(description="'L{layer}/{index}@{position}'")
    feature: str = Field(description="the feature's label, sae:L{layer}/{index}")
    layer: int
    index: int
    position: int
    token: str
    activation: float
    label: str | None = Field(None, description="a short label from its card")


class GraphEdge(Result):
    """An edge between features of adjacent layers, split over the source layer's heads.

    ``edge`` = sum of the heads' loadings + ``residual`` + ``mlp``, exactly (the same numbers as
    the ``head-loadings`` operation gives for this pair)."""

    source: str = Field(description="node id of the source (layer L)")
    target: str = Field(description="node id of the target (layer L+1)")
    edge: float
    heads: list[HeadLoading] = Field(description="every head of layer L, largest |loading| first")
    residual: float = Field(description="the residual connection's part (same position only)")
    mlp: float = Field(description="the part through layer L's MLP, linearised")


class EdgeGraphResult(Result):
    """The largest attention-mediated edges into one feature, one or more layer pairs back.

    Pair 0 joins every feature active at layer ``target_layer - 1`` (at positions up to the
    target's) to the target feature; each further pair joins the layer before to the top sources
    of the pair after it. ``scored`` counts the candidate edges of each pair."""

    tokens: list[str] = Field(description="display string per position, BOS first")
    target: str = Field(description="node id of the feature the graph explains")
    target_vector: str = Field(description="how a target feature reads the residual")
    rank_by: str = Field(description="'edge': |whole edge|; 'heads': |sum of head loadings|")
    include_bos: bool = Field(False, description="whether sources at position 0 (BOS) were scored")
    nodes: list[GraphNode]
    edges: list[GraphEdge] = Field(description="largest first within each layer pair")
    scored: list[int] = Field(description="candidate (source feature, position) edges per pair")
    alternatives: list[GraphNode] = Field(
        description="the most active features of the target's layer at its position"
    )


class FeatureContext(Result):
    tokens: list[str] = Field(description="the tokens around the activating one")
    acts: list[float] = Field(description="the feature's activation at each of those tokens")
    at: int = Field(description="index in tokens of the activating token")
    activation: float
    sequence: int
    position: int


class Histogram(Result):
    edges: list[float] = Field(description="bin edges (n_bins + 1)")
    counts: list[int] = Field(description="tokens per bin, among those where the feature fires")


class HeadRead(Result):
    head: str
    share: float = Field(
        description="mean share of the head's query (key) vector norm that the feature's row "
        "contributes where the feature fires most"
    )


class HeadWrite(Result):
    head: str
    value: float = Field(
        description="mean direct effect of the head's output on the feature's pre-activation "
        "where the feature fires most"
    )
    share: float = Field(description="value / the mean pre-activation there")


class FeaturePageResult(Result):
    """One residual dictionary feature: label, top contexts, activation histogram, the heads
    that read it (query and key side) and write it, and its nearest features by virtual weight."""

    feature: str
    layer: int
    index: int
    n_features: int
    label: str | None = Field(description="a short label from its card (null: no card)")
    card: dict[str, Any] | None = Field(description="its card from features.json")
    data: str = Field(description="the text the contexts and histogram were measured on")
    data_name: str = Field(
        description="that text as the page names it, e.g. \"run smol's data (corpus.jsonl, 32 "
        'sequences of 256 tokens)"'
    )
    from_run: bool = Field(description="true: the served run's own data (its sequences)")
    skipped_sequences: int = Field(description="sequences skipped (the dictionary trained on them)")
    n_tokens: int
    density: float = Field(description="fraction of those tokens where the feature fires")
    mean_activation: float = Field(description="mean activation where it fires")
    contexts: list[FeatureContext]
    histogram: Histogram
    query_readers: list[HeadRead]
    key_readers: list[HeadRead]
    writers: list[HeadWrite] = Field(description="earlier heads, by |direct effect|")
    near: list[VirtualWeightsResult] = Field(
        description="nearest features by virtual weight through the top query-side reader and "
        "the top key-side reader"
    )
