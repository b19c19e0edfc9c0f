"""What the decompositions report: one pydantic model per result (stats.json holds them too).

Token positions are indices into a context (BOS at 0); ``context`` is the index of a context in
the evaluation data. Head names are ``L{layer}H{head}``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----- multi-token transcoders ---------------------------------------------------------------------
class MTCStats(Result):
    variant: str = Field(description="mtc | single_head | sae_mtc")
    n_features: int
    l1: float = Field(description="the L1 coefficient it was trained with")
    l0: float = Field(description="mean active features per source token (positions >= 1)")
    moved_l0: float = Field(description="of those, mean in their context's moved top-k")
    mse: float = Field(description="mean over destination tokens of ‖y − ŷ‖², target units")
    fve: float = Field(description="fraction of the target's variance explained")
    sae_fve: float | None = Field(
        default=None, description="sae_mtc only: the SAE's FVE on its own input"
    )
    dead_fraction: float = Field(description="features never active on the evaluation data")
    train_tokens: int
    eval_tokens: int
    seconds: float


class ClusterSizes(Result):
    k: int
    sizes: list[int] = Field(description="cluster sizes, largest first")
    inertia: float


class MTCComparison(Result):
    layer: int
    target: str = Field(description="attn_out | resid_post")
    rows: list[MTCStats]
    columns: list[str] = Field(description="head-loading columns: L{l}H{h} ..., identity")
    mean_loading: list[float] = Field(
        description="the MTC's mean |head loading| per column over its live features"
    )
    dominant: list[int] = Field(
        description="the MTC's live features whose largest |loading| is each column"
    )
    clusters: list[ClusterSizes] = Field(description="k-means of the MTC's head loadings")


# ----- QK diagonalisation ---------------------------------------------------------------------------
class QKStats(Result):
    variant: str = Field(description="softmax (pattern KL) | linear (pattern MSE, no softmax)")
    n_features: int
    rank: int = Field(description="1: scalar query/key activations; r > 1: r-dim, dot product")
    l1: float = Field(description="the L1 coefficient of each side it was trained with")
    l0_query: float = Field(description="mean active query-side features per token")
    l0_key: float = Field(description="mean active key-side features per token")
    l0_pair: float = Field(
        description="mean features active on both sides, over causal (query, key) pairs"
    )
    l0_attended: float = Field(
        description="the same, weighted by the head's attention (pairs it actually attends)"
    )
    kl: float = Field(description="mean over query rows of KL(actual ‖ reconstructed) (nats)")
    top1: float = Field(
        description="fraction of query rows whose most-attended reconstructed key is one of "
        "the head's most-attended keys (ties count)"
    )
    uniform_kl: float = Field(description="KL of a uniform causal pattern, for scale")
    pattern_fve: float = Field(description="FVE of the pattern's causal entries (rows >= 1)")
    train_tokens: int
    eval_tokens: int
    seconds: float


class TokenScore(Result):
    token: str
    id: int
    value: float = Field(description="largest activation on this token")
    count: int = Field(description="occurrences where the feature was active")


class QKPair(Result):
    context: int
    query: int
    key: int
    query_token: str
    key_token: str
    value: float = Field(description="this feature's score contribution at the pair")


class QKFeature(Result):
    feature: int
    share: float = Field(
        description="this feature's share of Σ|score contributions| at attended pairs"
    )
    query_density: float
    key_density: float
    pairs: list[QKPair]
    query_tokens: list[TokenScore]
    key_tokens: list[TokenScore]


class QKReport(Result):
    head: str
    stats: QKStats
    features: list[QKFeature]


# ----- head splitting --------------------------------------------------------------------------------
class SplitStats(Result):
    k: int
    d_head: int
    fve: float = Field(description="FVE of the heads' summed output by the sum of the sub-heads")
    init_fve: float = Field(description="the same before training (original weights + noise)")
    shares: list[float] = Field(description="mean output-norm share of each sub-head")
    handled: list[float] = Field(
        description="fraction of tokens whose largest output-norm share is each sub-head"
    )
    train_tokens: int
    eval_tokens: int
    seconds: float


class SplitExample(Result):
    context: int
    position: int
    token: str
    share: float


class SplitReport(Result):
    heads: list[str] = Field(description="the original head(s) whose summed output is split")
    rows: list[SplitStats] = Field(description="one per k tried")
    examples: list[list[SplitExample]] = Field(
        description="for the last split: each sub-head's tokens with the largest share"
    )


# ----- curves and cluster comparisons -----------------------------------------------------------
class MTCSweep(Result):
    layer: int
    target: str = Field(description="attn_out | resid_post")
    setting: str = Field(
        description="what was swept: the L1 coefficient, which sets L0 in this trainer (the "
        "moved top-k only caps it)"
    )
    values: list[float] = Field(description="the settings, in the order trained")
    options: dict[str, float | int | str] = Field(
        description="every other training option, the same for each point"
    )
    train_tokens: int = Field(description="destination tokens per epoch (all variants)")
    eval_tokens: int
    rows: list[MTCStats] = Field(description="one per (variant, setting); MTCStats.l1 = setting")
    seconds: float = Field(description="wall time of the whole sweep")


class LoadingClusters(Result):
    name: str = Field(description="what the loadings are of, in words")
    source: str = Field(description="mtc | value_sae")
    layers: list[int]
    columns: list[str] = Field(description="the loading vector's entries")
    n_features: int
    n_live: int = Field(description="features active on the held-out data: those clustered")
    l0: float | None = Field(default=None, description="value SAE: active features per token")
    fve: float | None = Field(default=None, description="value SAE: FVE of the values")
    clusters: list[ClusterSizes]
    loglog_slope: dict[int, float] = Field(
        description="k -> least-squares slope of log(size) on log(rank) (power law: a line)"
    )


class LoadingClusterComparison(Result):
    layer: int
    ks: list[int] = Field(description="k values asked for (each set uses those <= live / 2)")
    sets: list[LoadingClusters]
    train_tokens: int
    eval_tokens: int
    seconds: float
