"""Prompt-set experiments: many prompts, each marking a query token and a key token, evaluated
for every head in batched forward passes (the HeadVis paper's same-set suppression study).

A prompt is one JSON object (one line of a JSONL file)::

    {"text": "Paris, Lyon, Tokyo, Nice and Toulouse are all cities in France",
     "key": "Tokyo",                      # the marked key: the last token of its first match
     "query": "last",                     # "last" (default), or a substring like "key"
     "candidates": ["Paris", "Lyon", "Tokyo", "Nice", "Toulouse"],   # optional
     "expect": "most",                    # or "least": the key should be the least attended
     "group": "France"}                   # optional: the label the prompt is reported under

Substrings match whole words (the first occurrence); the token is the last one overlapping it.
Per head and prompt: the attention the query pays the marked key, the pre-softmax score, and
the key's rank among all keys (1 = most attended). A head "gets a prompt right" when the marked
key is its most attended key among the candidates (all keys when there are none), or its least
attended one for ``"expect": "least"``; accuracy is the share of prompts it gets right, also
reported per group.

Ready-made sets (:data:`PRESETS`) come from editable package data: a list of countries with
their cities (``data/prompt_sets/countries.json``, or any file of that shape) for
:func:`odd_one_out`, :func:`country_swap` and :func:`country_city_geometry`, and year templates
(``data/prompt_sets/years.json``) for :func:`year_sweep`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, Field

from headscope.analysis.batching import run_grouped
from headscope.analysis.inputs import parse_heads
from headscope.analysis.session import Session
from headscope.errors import InputError
from headscope.model.spec import head_name

MAX_PROMPTS = 2000
Expect = Literal["most", "least"]
PresetName = Literal["country-odd-one-out", "country-swap", "year-sweep"]
PRESETS: tuple[str, ...] = get_args(PresetName)
PRESET_HELP = (
    "a shipped set instead: country-odd-one-out ('{five cities} are all cities in {country}', "
    "the foreign city marked), country-swap (the same city lists with the country swapped to "
    "the foreign city's own: it should then be the least attended city), year-sweep (a year "
    "1000-1999 ending a fixed sentence: its last token attends to its first digit)"
)


class PromptSpec(BaseModel):
    """One prompt of a set: its text and the substrings that pick the query and key tokens."""

    text: str = Field(min_length=1, max_length=10_000)
    key: str = Field(min_length=1, description="substring marking the key token")
    query: str = Field(default="last", min_length=1, description="'last' or a substring")
    candidates: list[str] | None = Field(
        default=None, description="substrings of the keys the marked key competes with"
    )
    group: str | None = Field(default=None, description="a label to report the prompt under")
    expect: Expect = Field(
        default="most",
        description="the head gets it right when the key is the most (least) attended",
    )


def prompt_spec(value: Any) -> PromptSpec:
    """A prompt from an object or its JSON text (a line of a JSONL file)."""
    if isinstance(value, PromptSpec):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise InputError(f"a prompt line is not JSON ({err.msg}): {value[:60]!r}") from None
    if not isinstance(value, dict):
        raise InputError("a prompt is a JSON object with text and key")
    return PromptSpec.model_validate(value)


def read_prompts(path: str | Path) -> list[PromptSpec]:
    """The prompts of a JSONL file (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None
    return [prompt_spec(line) for line in lines if line.strip()]


# ----- ready-made sets -----------------------------------------------------------------------
def _read_list(path: str | Path | None, shipped: str) -> str:
    """The text of ``path``, or of the shipped ``data/prompt_sets/<shipped>``."""
    if path is None:
        return (resources.files("headscope") / "data/prompt_sets" / shipped).read_text()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None


def load_countries(path: str | Path | None = None) -> dict[str, list[str]]:
    """``{country: [cities]}`` from ``path`` or the shipped list (edit a copy to change it)."""
    text = _read_list(path, "countries.json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not JSON: {err.msg}") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) and c for c in v)
        for v in data.values()
    ):
        raise InputError("the country list must map each country to a list of >= 2 cities")
    if len(data) < 2:
        raise InputError("the country list needs at least 2 countries")
    return {str(k): list(v) for k, v in data.items()}


def _odd_lists(
    countries: dict[str, list[str]], n_cities: int, seed: int
) -> list[tuple[str, str, str, list[str]]]:
    """``(country, foreign city's country, foreign city, shuffled cities)`` per (country, own
    city left out)."""
    rng = random.Random(seed)
    names = list(countries)
    out = []
    for country, cities in countries.items():
        for left_out in range(len(cities)):
            own = [c for i, c in enumerate(cities) if i != left_out][: n_cities - 1]
            other = rng.choice([n for n in names if n != country])
            foreign = rng.choice(countries[other])
            chosen = [*own, foreign]
            rng.shuffle(chosen)
            out.append((country, other, foreign, chosen))
    return out


def _listed(cities: list[str]) -> str:
    return ", ".join(cities[:-1]) + " and " + cities[-1]


def odd_one_out(
    countries: dict[str, list[str]] | None = None, *, n_cities: int = 5, seed: int = 0
) -> list[PromptSpec]:
    """ "{five cities} are all cities in {country}": ``n_cities - 1`` of the country's own cities
    and one foreign city, in shuffled order; the marked key is the foreign city, the query the
    country (the last token), the candidates all five cities. One prompt per (country, own city
    left out), so every own city is left out once."""
    countries = countries or load_countries()
    return [
        PromptSpec(
            text=f"{_listed(chosen)} are all cities in {country}",
            key=foreign,
            candidates=chosen,
            group=country,
        )
        for country, _, foreign, chosen in _odd_lists(countries, n_cities, seed)
    ]


def country_swap(
    countries: dict[str, list[str]] | None = None, *, n_cities: int = 5, seed: int = 0
) -> list[PromptSpec]:
    """The odd-one-out lists with the country swapped (the HeadVis paper's country swap: the
    same country at the query is suppressed, a different one attends). Per odd-one-out prompt
    two prompts with the same five cities and the same marked city ``m``: group ``odd``, the
    original country (``m`` is the one foreign city: the head should attend to it most), and
    group ``own``, the country swapped to ``m``'s own country (the other four cities are now the
    foreign ones: the head should attend to ``m`` least). A head that follows the country gets
    both right."""
    countries = countries or load_countries()
    out = []
    sides: tuple[tuple[int, str, Expect], ...] = ((0, "odd", "most"), (1, "own", "least"))
    for country, other, foreign, chosen in _odd_lists(countries, n_cities, seed):
        for side, group, expect in sides:
            target = (country, other)[side]
            out.append(
                PromptSpec(
                    text=f"{_listed(chosen)} are all cities in {target}",
                    key=foreign,
                    candidates=chosen,
                    group=group,
                    expect=expect,
                )
            )
    return out


class YearTemplate(BaseModel):
    name: str = Field(min_length=1, description="the group label's prefix")
    text: str = Field(min_length=1, description="a sentence ending in {year}")


class YearSet(BaseModel):
    """``data/prompt_sets/years.json``: sentences ending in a year and the years to sweep."""

    templates: list[YearTemplate] = Field(min_length=1)
    start: int = Field(default=1000, ge=0)
    stop: int = Field(default=2000, ge=1, description="excluded")
    step: int = Field(default=1, ge=1)


def load_years(path: str | Path | None = None) -> YearSet:
    """The year sweep's templates and years from ``path`` or the shipped file."""
    text = _read_list(path, "years.json")
    try:
        return YearSet.model_validate_json(text)
    except ValueError as err:
        raise InputError(f"{path or 'years.json'} is not a year set: {err}") from None


def year_sweep(years: YearSet | None = None) -> list[PromptSpec]:
    """The HeadVis paper's year sweep: each template's ``{year}`` (its last word) takes every
    year of the range; the query is the year's last token, the marked key the token holding the
    year's first digit (the paper's "1" of 1 + 776), among all keys, so a template with an
    earlier year (e.g. "from 1914 to {year}") makes that year's digits compete. Grouped by
    template and century ("plain 1900s")."""
    ys = years or load_years()
    span = range(ys.start, ys.stop, ys.step)
    if len(span) * len(ys.templates) > MAX_PROMPTS:
        raise InputError(f"{len(span) * len(ys.templates)} prompts; the limit is {MAX_PROMPTS}")
    out = []
    for t in ys.templates:
        if t.text.count("{year}") != 1 or not t.text.endswith("{year}"):
            raise InputError(f"a year template ends in its one {{year}}: {t.text!r}")
        start = len(t.text) - len("{year}")
        for y in span:
            text = t.text[:start] + str(y)
            out.append(
                PromptSpec(
                    text=text,
                    key=_unique_key(text, start),
                    group=f"{t.name} {y // 100 * 100}s",
                )
            )
    if not out:
        raise InputError("the year range is empty")
    return out


def _unique_key(text: str, at: int) -> str:
    """The shortest substring ending at the character ``at`` that :func:`_span` finds there."""
    for a in range(at, -1, -1):
        sub = text[a : at + 1]
        if _span(text, sub) == (a, at + 1):
            return sub
    raise InputError(f"no substring marks character {at} of {text!r}")


def country_city_geometry(
    countries: dict[str, list[str]] | None = None,
) -> tuple[list[str], list[str], list[int]]:
    """The country/city QK geometry prompts: queries "The country [[X]]", keys "The city [[Y]]
    is well known", and the index of each city's country (``key_groups``)."""
    countries = countries or load_countries()
    queries = [f"The country [[{c}]]" for c in countries]
    keys, groups = [], []
    for i, cities in enumerate(countries.values()):
        for city in cities:
            keys.append(f"The city [[{city}]] is well known")
            groups.append(i)
    return queries, keys, groups


def preset(name: str) -> list[PromptSpec]:
    """A shipped set by name (:data:`PRESETS`)."""
    if name == "country-odd-one-out":
        return odd_one_out()
    if name == "country-swap":
        return country_swap()
    if name == "year-sweep":
        return year_sweep()
    raise InputError(f"unknown prompt set {name!r}; presets: {', '.join(PRESETS)}")


# ----- evaluation ----------------------------------------------------------------------------
class PromptPositions(BaseModel):
    text: str
    query: int
    key: int
    query_token: str
    key_token: str
    candidates: list[int]
    group: str | None = None
    expect: Expect = "most"


class GroupOnSet(BaseModel):
    """One head over the prompts of one group."""

    n: int
    accuracy: float
    attention_mean: float


class HeadOnSet(BaseModel):
    """One head over the set: accuracy, mean and spread, and (for listed heads) per prompt and
    per group."""

    head: str
    accuracy: float = Field(description="share of prompts the head gets right")
    attention_mean: float
    attention_std: float
    score_mean: float
    score_std: float
    rank_mean: float = Field(description="mean rank of the marked key among all keys (1 = top)")
    attention: list[float] | None = None  # per prompt
    score: list[float] | None = None
    rank: list[int] | None = None
    correct: list[bool] | None = None
    groups: dict[str, GroupOnSet] | None = None  # by group label, in first-seen order


class PromptSetResult(BaseModel):
    """Every evaluated head over a prompt set, best first (accuracy, then mean attention)."""

    n_prompts: int
    prompts: list[PromptPositions]
    heads: list[HeadOnSet]


_WORD = r"(?<![\w]){}(?![\w])"


def _span(text: str, sub: str) -> tuple[int, int]:
    m = re.search(_WORD.format(re.escape(sub)), text) or re.search(re.escape(sub), text)
    if m is None:
        raise InputError(f"{sub!r} is not in the prompt {text[:60]!r}")
    return m.start(), m.end()


def _locate(session: Session, p: PromptSpec) -> tuple[list[int], PromptPositions]:
    ad = session.adapter
    ids, offsets = ad.tokens.encode_with_offsets(p.text)
    if len(ids) > session.max_tokens:
        raise InputError(f"prompt {p.text[:40]!r}... is longer than {session.max_tokens} tokens")

    def token(sub: str) -> int:
        a, b = _span(p.text, sub)
        inside = [i for i, (x, y) in enumerate(offsets) if i > 0 and x < b and y > a]
        if not inside:
            raise InputError(f"{sub!r} covers no token of {p.text[:60]!r}")
        return inside[-1]

    q = len(ids) - 1 if p.query == "last" else token(p.query)
    k = token(p.key)
    if k > q:
        raise InputError(f"the key {p.key!r} comes after the query in {p.text[:60]!r}")
    cands = sorted({token(c) for c in p.candidates}) if p.candidates else []
    if cands and k not in cands:
        cands = sorted({*cands, k})
    if any(c > q for c in cands):
        raise InputError(f"a candidate comes after the query in {p.text[:60]!r}")
    return list(ids), PromptPositions(
        text=p.text,
        query=q,
        key=k,
        query_token=ad.tokens.display(ids[q]),
        key_token=ad.tokens.display(ids[k]),
        candidates=cands,
        group=p.group,
        expect=p.expect,
    )


def evaluate_prompts(
    session: Session,
    prompts: Sequence[PromptSpec | dict | str],
    heads: Sequence[str] | None = None,
    *,
    detail: int = 10,
) -> PromptSetResult:
    """Evaluate every head (or ``heads``) on every prompt in batched forward passes (prompts
    grouped by length). ``detail``: the best heads that keep their per-prompt numbers (all
    named ``heads`` keep them)."""
    specs = [prompt_spec(p) for p in prompts]
    if not specs:
        raise InputError("no prompts")
    if len(specs) > MAX_PROMPTS:
        raise InputError(f"{len(specs)} prompts; the limit is {MAX_PROMPTS}")
    ad = session.adapter
    pairs = parse_heads(ad, list(heads) if heads else None)
    layers = sorted({lay for lay, _ in pairs})
    located = [_locate(session, p) for p in specs]
    seqs = [ids for ids, _ in located]
    pos = [p for _, p in located]
    N, L, H = len(specs), ad.spec.n_layers, ad.spec.n_heads
    att = torch.zeros(N, L, H, dtype=torch.float64)
    score = torch.zeros(N, L, H, dtype=torch.float64)
    rank = torch.zeros(N, L, H, dtype=torch.long)
    right = torch.zeros(N, L, H, dtype=torch.bool)
    least = torch.tensor([p.expect == "least" for p in pos])  # [N]

    def handle(idx: list[int], cap: Any) -> None:
        B, T = len(idx), len(seqs[idx[0]])
        rows = torch.arange(B)
        q = torch.tensor([pos[i].query for i in idx])  # [B]
        k = torch.tensor([pos[i].key for i in idx])  # [B]
        pool = torch.arange(T)[None, :] <= q[:, None]  # [B, T] keys the marked key competes with
        for r, i in enumerate(idx):
            if pos[i].candidates:
                pool[r] = False
                pool[r, pos[i].candidates] = True
        for layer in layers:
            t = cap.layers[layer]
            w = t.pattern[rows, :, q].double()  # [B, H, T] the query rows (later keys are 0)
            sc = t.scores[rows, :, q].double()  # [B, H, T]
            a = w[rows, :, k]  # [B, H]
            att[idx, layer] = a
            score[idx, layer] = sc[rows, :, k]
            rank[idx, layer] = (w > a[..., None]).sum(-1) + 1
            best = w.masked_fill(~pool[:, None, :], -1.0).max(-1).values  # [B, H]
            worst = w.masked_fill(~pool[:, None, :], 2.0).min(-1).values  # [B, H]
            right[idx, layer] = torch.where(least[idx][:, None], a <= worst, a >= best)

    run_grouped(ad, seqs, handle, layers=layers, patterns=True)
    rows = []
    for lay, h in pairs:
        a, s = att[:, lay, h], score[:, lay, h]
        rows.append(
            HeadOnSet(
                head=head_name(lay, h),
                accuracy=float(right[:, lay, h].double().mean()),
                attention_mean=float(a.mean()),
                attention_std=float(a.std(unbiased=False)),
                score_mean=float(s.mean()),
                score_std=float(s.std(unbiased=False)),
                rank_mean=float(rank[:, lay, h].double().mean()),
            )
        )
    order = sorted(range(len(rows)), key=lambda j: (-rows[j].accuracy, -rows[j].attention_mean))
    keep = set(order[:detail]) | (set(range(len(rows))) if heads else set())
    for j in keep:
        lay, h = pairs[j]
        rows[j].attention = att[:, lay, h].tolist()
        rows[j].score = score[:, lay, h].tolist()
        rows[j].rank = rank[:, lay, h].tolist()
        rows[j].correct = right[:, lay, h].tolist()
        rows[j].groups = _by_group(pos, att[:, lay, h], right[:, lay, h])
    return PromptSetResult(n_prompts=N, prompts=pos, heads=[rows[j] for j in order])


def _by_group(
    pos: list[PromptPositions], att: torch.Tensor, right: torch.Tensor
) -> dict[str, GroupOnSet] | None:
    """Per group label (first-seen order): prompts, accuracy and mean attention; ``att`` and
    ``right`` are ``[N]``."""
    index: dict[str, list[int]] = {}
    for i, p in enumerate(pos):
        if p.group is not None:
            index.setdefault(p.group, []).append(i)
    if not index:
        return None
    return {
        g: GroupOnSet(
            n=len(ix),
            accuracy=float(right[ix].double().mean()),
            attention_mean=float(att[ix].mean()),
        )
        for g, ix in index.items()
    }


def prompt_set_text(
    r: PromptSetResult, _req: object = None, limit: int = 15, group_heads: int = 5
) -> str:
    least = sum(p.expect == "least" for p in r.prompts)
    rule = "marked key most attended" + (f"; least on {least} prompts" if least else "")
    lines = [f"{r.n_prompts} prompts; heads by accuracy ({rule}), then mean attention"]
    lines.append(
        f"{'head':<8} {'accuracy':>8} {'attn mean':>10} {'attn sd':>8} {'score mean':>11} "
        f"{'score sd':>9} {'rank mean':>9}"
    )
    for x in r.heads[:limit]:
        lines.append(
            f"{x.head:<8} {x.accuracy:>8.3f} {x.attention_mean:>10.4f} {x.attention_std:>8.4f} "
            f"{x.score_mean:>+11.3f} {x.score_std:>9.3f} {x.rank_mean:>9.2f}"
        )
    if len(r.heads) > limit:
        lines.append(f"... {len(r.heads) - limit} more heads")
    grouped = [x for x in r.heads[:group_heads] if x.groups and len(x.groups) <= 24]
    if grouped:
        lines.append("by group (accuracy / mean attention):")
        width = max(len(g) for x in grouped for g in x.groups or {})
        for x in grouped:
            lines.append(f"{x.head}")
            for g, v in (x.groups or {}).items():
                lines.append(
                    f"  {g:<{width}} n={v.n:<4} {v.accuracy:>6.3f} / {v.attention_mean:.4f}"
                )
    return "\n".join(lines)
