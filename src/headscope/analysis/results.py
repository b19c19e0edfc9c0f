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
    promoted: list[TokenLogit]
    suppressed: list[TokenLogit]
    features: dict[str, dict[str, Any]] | None = None


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
    """Each head's share of the edge from a source feature to a feature of the next layer."""

    source: FeatureAt
    target: FeatureAt
    heads: list[HeadLoading]
