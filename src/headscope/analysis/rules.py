"""The rule language of head descriptions (docs/describe.md): pydantic models, no torch.

A description (:class:`RuleSet`) is a list of named :class:`Rule` s over (query, key) pairs;
:mod:`headscope.analysis.describe` evaluates them on token sequences and attention patterns.
Rules come as YAML (a file, or text on the command line) or as JSON objects (the live API);
YAML aliases are refused and the size of a description is bounded, since a server evaluates them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from headscope.errors import InputError

MAX_RULES = 64  # named rules in one description
MAX_RULE_NODES = 512  # rules and sub-rules in one description, all levels together
MAX_RULE_DEPTH = 8  # nesting of all / any / not
MAX_REGEX_CHARS = 200
MAX_TEXTS = 1000  # token texts one condition lists
_MAX_POS = 1 << 40


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Span(_Strict):
    """Integers from ``min`` to ``max``, both included; either end may be left open."""

    min: int | None = Field(None, ge=-_MAX_POS, le=_MAX_POS)
    max: int | None = Field(None, ge=-_MAX_POS, le=_MAX_POS)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {self.min} is above max {self.max}")
        return self


class Side(_Strict):
    """A condition on one token of the pair: the query's or the key's. Every condition given
    must hold."""

    text: str | list[str] | None = Field(
        None,
        description="the token's text, or a list of them; whitespace around the token is "
        "ignored (' the' matches 'the')",
    )
    regex: str | None = Field(
        None,
        max_length=MAX_REGEX_CHARS,
        description="a Python regular expression searched in the token's text (whitespace kept)",
    )
    position: int | Span | None = Field(None, description="the token's position (BOS = 0)")
    most_recent: bool = Field(
        False,
        description="key side only: the latest token at or before the query that meets the "
        "other conditions",
    )

    @field_validator("text")
    @classmethod
    def _texts(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_TEXTS:
            raise ValueError(f"list 1..{MAX_TEXTS} token texts")
        return value

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"bad regular expression {value!r}: {err}") from None
        return value

    @model_validator(mode="after")
    def _some(self) -> Self:
        if self.text is None and self.regex is None and self.position is None:
            raise ValueError("a token condition needs text, regex or position")
        return self

    @functools.cached_property
    def _texts_set(self) -> frozenset[str]:
        texts = [self.text] if isinstance(self.text, str) else self.text or []
        return frozenset(texts) | frozenset(t.strip() for t in texts)

    @functools.cached_property
    def _pattern(self) -> re.Pattern | None:
        return None if self.regex is None else re.compile(self.regex)

    def token_ok(self, text: str) -> bool:
        """Whether a token with display string ``text`` meets the text and regex conditions."""
        if (
            self.text is not None
            and text not in self._texts_set
            and text.strip() not in (self._texts_set)
        ):
            return False
        return self._pattern is None or self._pattern.search(text) is not None


class Rule(_Strict):
    """One behaviour of a head: a condition on (query, key) pairs. Every condition given must
    hold (``any`` holds when one of its rules does)."""

    name: str | None = Field(None, max_length=200, description="required on top-level rules")
    query: Side | None = Field(None, description="a condition on the query's token")
    key: Side | None = Field(None, description="a condition on the key's token")
    distance: int | Span | None = Field(
        None, description="q - k: 0 = the query itself, 1 = the previous token"
    )
    same_token: bool | None = Field(
        None, description="true: key and query are the same token; false: different tokens"
    )
    induction: bool | None = Field(
        None,
        description="true: the token before the key is the query's token "
        "([A][B] ... [A] -> [B]; 1 <= k < q); false: it is not",
    )
    all: list[Rule] | None = Field(None, max_length=MAX_RULES, description="all of these hold")
    any: list[Rule] | None = Field(None, max_length=MAX_RULES, description="one of these holds")
    not_: Rule | None = Field(None, alias="not", description="this rule does not hold")

    @model_validator(mode="after")
    def _check(self) -> Self:
        conditions = (
            self.query,
            self.key,
            self.distance,
            self.same_token,
            self.induction,
            self.all,
            self.any,
            self.not_,
        )
        if all(c is None for c in conditions):
            raise ValueError("a rule needs at least one condition")
        if self.query is not None and self.query.most_recent:
            raise ValueError("most_recent applies to the key side only")
        if self.all == [] or self.any == []:
            raise ValueError("all / any need at least one rule")
        return self

    def nodes(self, depth: int = 1) -> Iterator[tuple[Rule, int]]:
        """This rule and every sub-rule, with its nesting depth."""
        yield self, depth
        for sub in [*(self.all or []), *(self.any or []), *([self.not_] if self.not_ else [])]:
            yield from sub.nodes(depth + 1)


def _check_size(rules: list[Rule]) -> None:
    nodes = [node for rule in rules for node in rule.nodes()]
    if len(nodes) > MAX_RULE_NODES:
        raise ValueError(f"the rules have {len(nodes)} conditions; the limit is {MAX_RULE_NODES}")
    deepest = max(depth for _, depth in nodes)
    if deepest > MAX_RULE_DEPTH:
        raise ValueError(f"rules nest {deepest} deep; the limit is {MAX_RULE_DEPTH}")


def _no_aliases(text: str) -> None:
    # A YAML alias shares a node, so a few lines can stand for an exponential tree
    # ("billion laughs"); descriptions never need one.
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ValueError("YAML aliases (*name) are not allowed in rules")


def read_yaml(text: str) -> Any:
    """YAML (or JSON) text -> plain data; raises ValueError with the parser's message."""
    try:
        _no_aliases(text)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"not valid YAML: {' '.join(str(err).split())}") from None


def rule_input(value: Any) -> Any:
    """A rule given as YAML/JSON text (the command line) or as data (JSON body): data."""
    return read_yaml(value) if isinstance(value, str) else value


class RuleSet(_Strict):
    """A head's description: named rules, and how coverage is measured."""

    rules: list[Rule] = Field(min_length=1, max_length=MAX_RULES, description="named rules")
    include_sink: bool = Field(
        False,
        description="count attention to position 0 (the attention sink); by default it is left "
        "out of the mass, the events and the counterexamples, as in max_attention",
    )
    min_event: float = Field(
        0.3,
        gt=0.0,
        le=1.0,
        description="a query's largest weight must reach this to count as a max-attention event",
    )
    min_counterexample: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="uncovered weights below this are not listed as counterexamples",
    )

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        value = rule_input(value)
        return {"rules": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _named(self) -> Self:
        names = [r.name or "" for r in self.rules]
        if not all(names):
            raise ValueError("every top-level rule needs a name")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule names must be unique: {dup}")
        _check_size(self.rules)
        return self

    @property
    def names(self) -> list[str]:
        return [r.name or "" for r in self.rules]


def load_rules(path: str) -> RuleSet:
    """Read a rules file (YAML, docs/describe.md); InputError names the file and the problem."""
    from pydantic import ValidationError

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None
    try:
        return RuleSet.model_validate(text)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise InputError(f"{path}: {where + ': ' if where else ''}{first['msg']}") from None
