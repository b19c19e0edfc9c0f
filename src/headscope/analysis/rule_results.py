"""What the rule-based views return: a head description tested on text (coverage and
counterexamples) and key knockouts (where the attention goes, "A if present, otherwise B"
pairs). The conventions of :mod:`headscope.analysis.results` hold here too."""

from __future__ import annotations

from pydantic import Field

from headscope.analysis.results import Result


# ----- head descriptions (rules) --------------------------------------------------------------------
class RuleCoverage(Result):
    rule: str
    mass: float | None = Field(description="share of the head's attention mass on pairs it covers")
    events: float | None = Field(
        description="share of max-attention events (a query's largest weight, at least "
        "min_event) whose pair it covers; null when there are none"
    )
    top_bucket: float | None = Field(
        description="share of the top-bucket examples whose max-attention pair it covers"
    )


class Counterexample(Result):
    """A query whose strongest uncovered key got high attention: something no rule explains."""

    sequence: int
    query: int
    key: int
    weight: float
    query_token: str
    key_token: str
    context: str = Field(
        description="the key marked [[key]] with its neighbours, then the tokens before the "
        "query and the query marked {{query}} (' ... ' where they are far apart); newlines as ↵"
    )


class TokenShare(Result):
    token: str
    id: int
    share: float = Field(description="uncovered attention on this key token / all attention")


class DistanceShare(Result):
    min: int
    max: int | None = Field(description="inclusive; null: no upper end")
    share: float = Field(description="uncovered attention at these distances / all attention")


class DescribeResult(Result):
    """How much of a head's attention a written description (named rules) covers."""

    head: str
    source: str = Field(description="what the patterns came from, in words")
    sequences: int
    queries: int = Field(description="queries counted (position 0 never is)")
    include_sink: bool = Field(description="whether attention to position 0 counts")
    min_event: float
    total_mass: float = Field(description="the attention that counts, summed over queries")
    events: int = Field(description="max-attention events")
    top_bucket: list[float] | None = Field(description="[lo, hi) of the top max-attention bucket")
    top_bucket_examples: int
    rules: list[RuleCoverage]
    all_rules: RuleCoverage = Field(description="the union of every rule")
    counterexamples: list[Counterexample] = Field(description="strongest first, one per query")
    uncovered_key_tokens: list[TokenShare] = Field(description="where uncovered attention goes")
    uncovered_distances: list[DistanceShare] = Field(
        description="uncovered attention by distance q - k (buckets 0, 1, 2-3, 4-7, ...)"
    )


# ----- key knockouts (softmax competition) ------------------------------------------------------------
class KeyMove(Result):
    key: int
    token: str
    before: float
    cheap: float
    exact: float | None = None


class KnockoutResult(Result):
    """A head's attention at one query with keys removed from its softmax.

    ``cheap``: the head's own scores renormalised without the knocked-out keys, no forward pass;
    exact for this layer's pattern alone (it ignores that earlier layers also read those keys).
    ``exact``: a forward pass in which no head of layers 0..L may attend to the knocked-out keys
    (from later positions, and from the query itself); positions are unchanged."""

    tokens: list[str]
    head: str
    query: int
    knocked: list[int] = Field(description="key positions removed")
    rule: str | None = Field(None, description="the rule that chose them, if one did")
    knocked_mass: float = Field(description="attention the knocked-out keys had")
    scores: list[float | None] = Field(
        description="pre-softmax score of keys 0..query (scaled, softcapped); null: masked"
    )
    before: list[float] = Field(description="attention of keys 0..query")
    cheap: list[float]
    exact: list[float] | None = None
    exact_scores: list[float | None] | None = None
    moves: list[KeyMove] = Field(
        description="the keys whose attention changes most (exact, else cheap), largest first"
    )


class PriorityExample(Result):
    sequence: int
    query: int
    first: int = Field(description="the key with the most attention (A)")
    second: int = Field(description="the runner-up key (B)")
    query_token: str
    exact_second_after: float | None = Field(
        None, description="B's attention after an exact knockout of A (when verified)"
    )


class PriorityPair(Result):
    """'A if present, otherwise B': the head attends to token A; without it, to token B."""

    head: str
    first: str = Field(description="token A")
    second: str = Field(description="token B")
    count: int = Field(description="queries where this happened")
    first_attention: float = Field(description="mean attention to A")
    second_before: float = Field(description="mean attention to B while A is there")
    second_after: float = Field(description="mean attention to B with A knocked out (cheap)")
    example: PriorityExample


class PriorityHead(Result):
    head: str
    queries: int
    events: int = Field(description="queries whose runner-up takes the mass when A goes")
    share: float
    pairs: list[PriorityPair]


class PriorityResult(Result):
    """Heads and queries where softmax competition looks like priority logic."""

    sequences: int
    min_first: float
    max_second_before: float
    min_second: float
    include_sink: bool
    heads: list[PriorityHead] = Field(description="heads with events, most events first")
    pairs: list[PriorityPair] = Field(description="the most frequent pairs over all heads")
