"""The live API's contract: one pydantic model per request and response body.

These models are the single Python-side definition of what the browser app sends and receives
(`src/headscope/app/data.js` is the JavaScript side). They also generate ``/openapi.json``.
Requests are validated strictly (unknown fields rejected, bounded sizes); responses mirror the
dicts the analysis functions return, and tests validate every response against them.

Positions are token indices with the BOS token at 0; negative positions count from the end
(``-1`` is the last token). Head names are ``L{layer}H{head}``, 0-indexed.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# Bounds that keep a single request from tying up the model (or the tokenizer) for long. Texts
# are limited in tokens by the Session (2048 by default); the character bound only stops a
# multi-megabyte body from being tokenised before that check.
MAX_TEXT_CHARS = 100_000
MAX_HEADS = 4096
MAX_SWEEP_VALUES = 1000
MAX_GEOMETRY_PROMPTS = 200
MAX_POSITION = 1 << 40  # far beyond any context; only keeps numbers JSON-safe


def _utf8(value: str) -> str:
    # JSON can carry lone surrogates ("\ud800"); the tokenizer cannot take them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the string is not valid Unicode (it has a lone surrogate)") from None
    return value


_UTF8 = AfterValidator(_utf8)
Text = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TEXT_CHARS, description="the text; BOS is added"),
    _UTF8,
]
HeadName = Annotated[
    str, Field(min_length=1, max_length=32, description="a head name such as L5H3"), _UTF8
]
Template = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TEXT_CHARS, description="text with exactly one {} slot"),
    _UTF8,
]
SweepValue = Annotated[str, Field(max_length=1000), _UTF8]
Component = Annotated[
    str,
    Field(min_length=1, max_length=64, description="embed, pos_embed, bias, L3H1 or L3.mlp"),
    _UTF8,
]
Prompt = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_TEXT_CHARS,
        description="a prompt with its token marked as [[token]]",
    ),
    _UTF8,
]
Position = Annotated[
    int,
    Field(
        ge=-MAX_POSITION,
        le=MAX_POSITION,
        description="token index (BOS = 0); negative counts from the end, -1 = last token",
    ),
]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    # Responses may gain fields without breaking the app, so extra fields are kept, not rejected.
    model_config = ConfigDict(extra="allow")


# ----- health -------------------------------------------------------------------------------------
class HealthResponse(Response):
    """Whether a model is loaded and which run is served. ``model`` is null without a model."""

    model: str | None
    n_layers: int | None
    n_heads: int | None
    run: str | None = Field(description="name of the served run directory, null without one")
    max_tokens: int | None = Field(None, description="longest text accepted, BOS included")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: a message a user can act on."""

    detail: str
    errors: list[dict] | None = Field(None, description="per-field validation errors (422)")


# ----- tokenize / attend --------------------------------------------------------------------------
class TokenizeRequest(Request):
    text: Text


class TokenizeResponse(Response):
    tokens: list[str] = Field(description="display string per position, BOS first")
    ids: list[int]


class AttendRequest(Request):
    text: Text
    heads: list[HeadName] | None = Field(
        None, max_length=MAX_HEADS, description="heads to return (null or []: every head)"
    )


class AttendResponse(Response):
    tokens: list[str]
    patterns: dict[str, list[list[float]]] = Field(
        description="head -> rows (query-major); row q lists the weights of keys 0..q"
    )


# ----- one attention edge -------------------------------------------------------------------------
class PairRequest(Request):
    text: Text
    query: Position
    key: Position


class HeadPairRequest(PairRequest):
    head: HeadName


class QKRequest(HeadPairRequest):
    basis: Literal["components", "sae"] = Field(
        "components",
        description="what the residual is decomposed into: model components, or the features of "
        "the server's residual dictionaries (sae)",
    )
    top: int = Field(200, ge=1, le=10_000, description="how many (query, key) terms to list")


class OVRequest(HeadPairRequest):
    basis: Literal["components", "sae"] = "components"
    top: int = Field(30, ge=1, le=1000, description="how many components to list")
    n_tokens: int = Field(10, ge=1, le=100, description="promoted/suppressed tokens to list")


class CompositionRequest(HeadPairRequest):
    top: int = Field(10, ge=1, le=1000, description="earlier heads to list per side")


class RankedHead(Response):
    head: str
    attention: float
    score: float | None = Field(description="pre-softmax score; null where the key is masked")


class RankHeadsResponse(Response):
    tokens: list[str]
    query: int
    key: int
    heads: list[RankedHead] = Field(description="every head, highest attention first")


class QKTerm(Response):
    query: str
    key: str
    value: float


class Marginal(Response):
    component: str
    value: float


class QKResponse(Response):
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


class OVTerm(Response):
    component: str
    value: float
    value_norm: float
    logit_top: list[str]


class TokenLogit(Response):
    token: str
    id: int
    logit: float


class OVResponse(Response):
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


class ComposingHead(Response):
    head: str
    value: float
    attends_to: int
    attends_to_token: str
    weight: float


class CompositionResponse(Response):
    head: str
    query: int
    key: int
    score: float
    k_composition: list[ComposingHead]
    q_composition: list[ComposingHead]


# ----- sweep / geometry / intervene ---------------------------------------------------------------
class ValueRange(Request):
    """Integers ``start, start+step, ...`` below ``stop`` (Python's ``range``), as strings."""

    start: int = Field(ge=-(10**15), le=10**15)
    stop: int = Field(ge=-(10**15), le=10**15)
    step: int = Field(1, ge=-(10**15), le=10**15)

    @model_validator(mode="after")
    def _check(self) -> ValueRange:
        if self.step == 0:
            raise ValueError("step must not be 0")
        n = len(range(self.start, self.stop, self.step))
        if n == 0:
            raise ValueError(f"range({self.start}, {self.stop}, {self.step}) is empty")
        if n > MAX_SWEEP_VALUES:
            raise ValueError(f"the range has {n} values; the limit is {MAX_SWEEP_VALUES}")
        return self

    def values(self) -> list[str]:
        return [str(v) for v in range(self.start, self.stop, self.step)]


PositionSpec = Annotated[
    str,
    Field(
        pattern=r"^(last|slot:-?[0-9]{1,9}|-?[0-9]{1,12})$",
        description="'last', 'slot:i' (i-th token of the slot's value; -1 = its last token), "
        "or a position",
    ),
]


class SweepRequest(Request):
    template: Template
    values: (
        Annotated[
            list[SweepValue],
            Field(min_length=1, max_length=MAX_SWEEP_VALUES),
        ]
        | ValueRange
    ) = Field(description="strings put into the slot, or an integer range")
    heads: list[HeadName] = Field(min_length=1, max_length=MAX_HEADS)
    query: Position | PositionSpec = "slot:-1"
    key: Position | PositionSpec = "slot:0"

    def value_list(self) -> list[str]:
        return self.values.values() if isinstance(self.values, ValueRange) else self.values


class SweepPosition(Response):
    value: str
    query: int
    key: int
    query_token: str
    key_token: str


class SweepResponse(Response):
    """Attention of each head from the query to the key, one weight per value."""

    template: str
    values: list[str]
    positions: list[SweepPosition] = Field(description="where query and key fell, per value")
    attention: dict[str, list[float]] = Field(description="head -> one weight per value")


class GeometryRequest(Request):
    queries: list[Prompt] = Field(min_length=1, max_length=MAX_GEOMETRY_PROMPTS)
    keys: list[Prompt] = Field(min_length=1, max_length=MAX_GEOMETRY_PROMPTS)
    heads: list[HeadName] | None = Field(None, max_length=MAX_HEADS)


class CosineMatrix(Response):
    layer: int
    cosine: list[list[float]] = Field(description="[queries, keys] cosine similarities")
    diag_mean: float | None = None
    offdiag_mean: float | None = None


class GeometryResponse(Response):
    """Cosine similarity of mean-subtracted query and key vectors per head, and the same for
    the residual stream at the first requested layer's input (``residual``) and at each."""

    query_labels: list[str]
    key_labels: list[str]
    heads: dict[str, CosineMatrix]
    residual: CosineMatrix
    residual_by_layer: dict[str, CosineMatrix]


class InterveneRequest(Request):
    text: Text
    heads: list[HeadName] = Field(min_length=1, max_length=MAX_HEADS)
    component: Component
    side: Literal["query", "key"]
    scale: float = Field(allow_inf_nan=False, ge=-1e6, le=1e6)
    query: Position
    key: Position | None = None
    freeze_patterns: bool = False


class HeadChange(Response):
    head: str
    attention_before: float | None = Field(description="on (query, key); null without a key")
    attention_after: float | None
    row_before: list[float] = Field(description="the query's attention row before")
    row_after: list[float]


class TokenProb(Response):
    token: str
    prob: float


class InterveneResponse(Response):
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
