"""What every live operation takes: one pydantic model per request.

The server validates request bodies with these models (they generate the request half of
``/openapi.json``) and the CLI builds its flags from the same fields, so a limit, a default or a
description is written once. Requests are strict: unknown fields are rejected and sizes bounded
(the bounds live in :mod:`headscope.limits`).

Positions are token indices with the BOS token at 0; negative positions count from the end
(``-1`` is the last token). Head names are ``L{layer}H{head}``, 0-indexed.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from headscope.analysis.prompt_sets import PRESET_HELP, PresetName, PromptSpec, prompt_spec
from headscope.analysis.rules import Rule, RuleSet, rule_input
from headscope.limits import (
    MAX_GEOMETRY_PROMPTS,
    MAX_HEADS,
    MAX_POSITION,
    MAX_SWEEP_VALUES,
    MAX_TEXT_CHARS,
    MAX_TOKENS,
)


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
    str, Field(min_length=1, max_length=32, description="a head such as L5H3"), _UTF8
]
Template = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TEXT_CHARS, description="text with exactly one {} slot"),
    _UTF8,
]
SweepValue = Annotated[str, Field(max_length=1000), _UTF8]
ComponentName = Annotated[
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
Basis = Literal["components", "sae"]
_BASIS_HELP = (
    "what the residual is decomposed into: model components, or the features of the residual "
    "dictionaries (sae)"
)


# Seeds reach torch.Generator.manual_seed after small arithmetic (seed * 1000 + prefix length):
# bounded so that never overflows its 64 bits.
MAX_SEED = 2**32 - 1


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizeRequest(Request):
    text: Text


class AttendRequest(Request):
    text: Text
    heads: list[HeadName] | None = Field(
        None, max_length=MAX_HEADS, description="heads to return (default: every head)"
    )


class AttendSummaryRequest(Request):
    text: Text
    head: HeadName
    top: int = Field(8, ge=1, le=64, description="keys listed per query")
    threshold: float = Field(
        0.02, gt=0.0, le=1.0, description="smallest weight listed among a query's keys"
    )


class PairRequest(Request):
    text: Text
    query: Position
    key: Position = Field(description="key position (<= query); negative counts from the end")


class HeadPairRequest(PairRequest):
    head: HeadName


class RankHeadsRequest(PairRequest):
    top: int = Field(20, ge=1, le=100_000, description="heads to print as text (JSON has all)")


class QKRequest(HeadPairRequest):
    basis: Basis = Field("components", description=_BASIS_HELP)
    top: int = Field(200, ge=1, le=10_000, description="how many (query, key) terms to list")


class OVRequest(HeadPairRequest):
    basis: Basis = Field("components", description=_BASIS_HELP)
    top: int = Field(30, ge=1, le=1000, description="how many components to list")
    n_tokens: int = Field(10, ge=1, le=100, description="promoted/suppressed tokens to list")


class CompositionRequest(HeadPairRequest):
    top: int = Field(10, ge=1, le=1000, description="earlier heads to list per side")


RANGE_SYNTAX = re.compile(r"^\s*(-?[0-9]+)\s*:\s*(-?[0-9]+)\s*(?::\s*(-?[0-9]+)\s*)?$")


class ValueRange(Request):
    """Integers ``start, start+step, ...`` below ``stop`` (Python's ``range``), as strings.

    Also written ``"START:STOP"`` or ``"START:STOP:STEP"`` (stop excluded): the only range syntax
    headscope reads, in the CLI, the API and the app alike.
    """

    start: int = Field(ge=-(10**15), le=10**15)
    stop: int = Field(ge=-(10**15), le=10**15)
    step: int = Field(1, ge=-(10**15), le=10**15)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            m = RANGE_SYNTAX.match(value)
            if not m:
                raise ValueError(f"range {value!r} must look like START:STOP or START:STOP:STEP")
            start, stop, step = m.groups()
            return {"start": int(start), "stop": int(stop), "step": int(step or 1)}
        return value

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
        ValueRange | Annotated[list[SweepValue], Field(min_length=1, max_length=MAX_SWEEP_VALUES)]
    ) = Field(description="strings put into the slot, or an integer range START:STOP[:STEP]")
    heads: list[HeadName] = Field(min_length=1, max_length=MAX_HEADS, description="heads to show")
    query: Position | PositionSpec = Field("slot:-1", description="int, 'last' or slot:i")
    key: Position | PositionSpec = Field("slot:0", description="int, 'last' or slot:i")

    def value_list(self) -> list[str]:
        return self.values.values() if isinstance(self.values, ValueRange) else self.values


class GeometryRequest(Request):
    queries: list[Prompt] = Field(
        [], max_length=MAX_GEOMETRY_PROMPTS, description="prompts, token marked [[x]]"
    )
    keys: list[Prompt] = Field(
        [], max_length=MAX_GEOMETRY_PROMPTS, description="prompts, token marked [[x]]"
    )
    heads: list[HeadName] | None = Field(
        None, max_length=MAX_HEADS, description="heads (default: every head)"
    )
    key_groups: list[int] | None = Field(
        None,
        max_length=MAX_GEOMETRY_PROMPTS,
        description="grouped sets: the query index each key belongs to (reports own-vs-other "
        "means)",
    )
    preset: Literal["country-city"] | None = Field(
        None,
        description="a shipped grouped set instead of queries/keys: country queries vs their "
        "cities' keys",
    )

    @model_validator(mode="after")
    def _prompts(self) -> GeometryRequest:
        if self.preset is not None and (self.queries or self.keys or self.key_groups):
            raise ValueError("give a preset or queries and keys, not both")
        if self.preset is None and (not self.queries or not self.keys):
            raise ValueError("give queries and keys (or a preset)")
        return self


class InterveneRequest(Request):
    text: Text
    heads: list[HeadName] = Field(
        min_length=1, max_length=MAX_HEADS, description="heads whose query or key is edited"
    )
    component: ComponentName
    side: Literal["query", "key"] = Field(description="edit the heads' query or key input")
    scale: float = Field(
        0.0, allow_inf_nan=False, ge=-1e6, le=1e6, description="factor (0 removes the component)"
    )
    query: Position = Field(-1, description="query position whose attention row to report")
    key: Position | None = Field(None, description="key position whose attention to report")
    freeze_patterns: bool = Field(False, description="freeze every other head's pattern")
    at: list[Position] | None = Field(
        None, max_length=MAX_HEADS, description="source positions to scale it at (default: all)"
    )
    basis: Basis = Field("components", description=_BASIS_HELP)


class VirtualWeightsRequest(Request):
    head: HeadName
    feature: int = Field(ge=0, description="feature index in the head's layer's dictionary")
    side: Literal["key", "query"] = "key"
    top: int = Field(20, ge=1, le=1000, description="features to list per side")


class FeatureRequest(Request):
    layer: int = Field(ge=0, description="the layer whose residual dictionary holds the feature")
    feature: int = Field(ge=0, description="feature index in that dictionary")
    n_tokens: int = Field(
        8192, ge=256, le=262_144, description="tokens of text the contexts and histogram read"
    )
    top: int = Field(12, ge=1, le=100, description="top contexts to list")


class HeadLoadingsRequest(Request):
    text: Text
    layer: int = Field(ge=0, description="source layer L (the target feature is in layer L+1)")
    source_feature: int = Field(ge=0, description="feature index in layer L's dictionary")
    source_pos: Position
    target_feature: int = Field(ge=0, description="feature index in layer L+1's dictionary")
    target_pos: Position
    target_vector: Literal["encoder", "decoder"] = Field(
        "encoder",
        description="how the target feature reads the residual: its encoder column (what sets its "
        "activation) or its decoder row (the convention of 'Tracing Attention Computation "
        "Through Feature Interactions')",
    )


class EdgeGraphRequest(Request):
    text: Text
    layer: int = Field(
        ge=1, description="the target feature's layer L+1 (its sources are in layer L's dictionary)"
    )
    feature: int | None = Field(
        None, ge=0, description="target feature index (default: the most active one there)"
    )
    position: Position = Field(-1, description="the target position")
    top: int = Field(8, ge=1, le=50, description="edges to keep per layer pair")
    depth: int = Field(1, ge=1, le=4, description="layer pairs to go back")
    expand: int = Field(
        3, ge=1, le=10, description="top sources of one pair that the next pair back explains"
    )
    rank_by: Literal["edge", "heads"] = Field(
        "edge",
        description="rank by the whole edge, or by its attention-mediated part (the heads' sum)",
    )
    target_vector: Literal["encoder", "decoder"] = Field(
        "encoder", description="how a target feature reads the residual (see head-loadings)"
    )
    include_bos: bool = Field(
        False,
        description="also score sources at position 0, the BOS token where most heads park "
        "their attention",
    )


RuleSetInput = Annotated[
    RuleSet,
    Field(
        description="the head's description: named rules (docs/describe.md), as an object or "
        "as YAML/JSON text"
    ),
]
RuleInput = Annotated[Rule, BeforeValidator(rule_input)]


class DescribeTextRequest(Request):
    text: Text
    head: HeadName
    rules: RuleSetInput
    counterexamples: int = Field(10, ge=0, le=100, description="counterexamples to list")


class KnockoutRequest(Request):
    text: Text
    head: HeadName
    query: Position = Field(-1, description="the query position whose attention row to change")
    keys: list[Position] | None = Field(
        None, max_length=MAX_HEADS, description="key positions to knock out of the softmax"
    )
    rule: RuleInput | None = Field(
        None,
        description="knock out every key this rule matches (docs/describe.md), as an object or "
        "as YAML/JSON text",
    )
    cheap_only: bool = Field(False, description="skip the exact knockout (its forward pass)")
    top: int = Field(10, ge=1, le=1000, description="keys whose attention changes most to list")


class AblateRequest(Request):
    text: Text | None = Field(None, description="the text to score (task 'text')")
    task: Literal["text", "repeated"] = Field(
        "text", description="score a text, or repeated random tokens where induction predicts"
    )
    heads: list[HeadName] | None = Field(
        None,
        max_length=MAX_HEADS,
        description="heads to ablate, each alone, or L0H0+L1H0 together (default: every head)",
    )
    method: Literal["zero", "mean", "resample"] = Field(
        "zero", description="replace a head's output by zero, its mean, or another sequence's"
    )
    positions: list[Position] | None = Field(
        None, max_length=MAX_HEADS, description="logit positions to score (default: all)"
    )
    n_sequences: int = Field(8, ge=1, le=256, description="repeated task: sequences")
    half_len: int = Field(20, ge=2, le=1000, description="repeated task: tokens before repeating")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="random tokens and the resample permutation"
    )


class InterventionCurveRequest(Request):
    text: Text
    heads: list[HeadName] = Field(
        min_length=1, max_length=MAX_HEADS, description="heads whose query or key is edited"
    )
    component: ComponentName
    side: Literal["query", "key"] = Field(description="edit the heads' query or key input")
    scales: list[Annotated[float, Field(allow_inf_nan=False, ge=-1e6, le=1e6)]] = Field(
        [x / 4 for x in range(-4, 13)],
        min_length=1,
        max_length=201,
        description="the factors to sweep",
    )
    query: Position = Field(-1, description="query position of the edge")
    key: Position = Field(description="key position of the edge")
    at: list[Position] | None = Field(
        None,
        max_length=MAX_HEADS,
        description="source positions to scale the component at (default: the key, or the "
        "query when side is query)",
    )
    freeze_patterns: bool = Field(False, description="freeze every other head's pattern")
    target: str | None = Field(
        None, max_length=200, description="the next token whose logit to follow (default: top)"
    )
    basis: Basis = Field("components", description=_BASIS_HELP)


PromptInput = Annotated[PromptSpec, BeforeValidator(prompt_spec)]


class PromptSetRequest(Request):
    prompts: list[PromptInput] = Field(
        [],
        max_length=2000,
        description="prompts: JSON objects {text, key, query ('last' or a substring), candidates}",
    )
    preset: PresetName | None = Field(None, description=PRESET_HELP)
    heads: list[HeadName] | None = Field(
        None, max_length=MAX_HEADS, description="heads (default: every head)"
    )
    detail: int = Field(10, ge=0, le=1000, description="best heads that keep per-prompt numbers")

    @model_validator(mode="after")
    def _source(self) -> PromptSetRequest:
        if bool(self.prompts) == bool(self.preset):
            raise ValueError("give prompts or a preset (one of them)")
        return self


class LongPrefixRequest(Request):
    heads: list[HeadName] | None = Field(
        None, max_length=MAX_HEADS, description="heads to report (default: every head)"
    )
    prefix_lengths: list[Annotated[int, Field(ge=1, le=256)]] = Field(
        list(range(1, 9)), min_length=1, max_length=64, description="matched prefix lengths m"
    )
    n_sequences: int = Field(8, ge=1, le=256, description="random sequences per prefix length")
    seq_len: int = Field(64, ge=8, le=MAX_TOKENS, description="tokens per sequence")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="random tokens")
    min_attention: float = Field(
        0.3, ge=0, le=1, description="an induction head reaches this attention at some m"
    )
    long_ratio: float = Field(
        0.5, ge=0, le=1, description="long-prefix head: attention at m=1 below this x its peak"
    )
