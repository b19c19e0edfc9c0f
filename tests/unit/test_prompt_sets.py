"""Prompt-set experiments (headscope.analysis.prompt_sets) on planted models: the induction head
wins every induction prompt and the previous-token head none, and "least" prompts and per-group
numbers score them the other way round; the shipped country/city, country-swap and year sets
have the paper's shape and mark the tokens they mean on a real tokenizer; grouped QK geometry
reports own-vs-other means that a planted head makes +1 and -1."""

from __future__ import annotations

import json
import random

import pytest

from headscope.analysis.geometry import qk_geometry
from headscope.analysis.prompt_sets import (
    PRESETS,
    YearSet,
    _locate,
    country_city_geometry,
    country_swap,
    evaluate_prompts,
    load_countries,
    load_years,
    odd_one_out,
    preset,
    prompt_set_text,
    read_prompts,
    year_sweep,
)
from headscope.analysis.session import Session
from headscope.errors import InputError
from headscope.model import ModelAdapter
from headscope.operations import OPERATIONS, Context
from tests.planted import induction_model, planted_adapter, two_match_model
from tests.tiny_models import tiny_adapter, tiny_tokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _induction_prompts(n: int, seed: int = 0) -> list[dict]:
    """``r_1..r_n r_j``: the induction head at the last token attends to r_{j+1}."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = "".join(rng.sample(LETTERS, 10))
        j = rng.randrange(0, 8)
        out.append({"text": body + body[j], "key": body[j + 1], "candidates": list(body[1:])})
    return out


@pytest.fixture(scope="module")
def sess() -> Session:
    return Session(ModelAdapter(induction_model(), tiny_tokenizer(), name="ind", source="test"))


def test_induction_head_wins_every_prompt(sess: Session, tmp_path) -> None:
    prompts = _induction_prompts(24)
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in prompts) + "\n\n")
    specs = read_prompts(path)
    r = evaluate_prompts(sess, specs)
    assert r.n_prompts == 24 and len(r.heads) == 4
    best = r.heads[0]
    assert best.head == "L1H0" and best.accuracy == 1.0 and best.rank_mean == 1.0
    assert best.attention_mean > 0.9 and best.correct == [True] * 24
    prev = next(h for h in r.heads if h.head == "L0H0")
    assert prev.accuracy == 0.0 and prev.attention_mean < 0.05
    first = r.prompts[0]
    assert first.query == 11 and first.key_token == prompts[0]["key"]
    assert len(first.candidates) == 9
    # per-prompt numbers: the score and attention agree with a plain capture
    t = sess.adapter.run(sess.adapter.tokens.encode_tensor(specs[0].text), layers=[1])
    w = t.layers[1].weights()[0, 0, first.query, first.key]
    assert best.attention[0] == pytest.approx(float(w), abs=1e-6)
    # the same through the operation table, and with named heads only
    op = next(o for o in OPERATIONS if o.name == "prompt-set")
    req = op.request.model_validate({"prompts": [json.dumps(p) for p in prompts[:3]],
                                     "heads": ["L0H0"], "detail": 0})  # fmt: skip
    out = op.run(Context(sess), req)
    assert [h.head for h in out.heads] == ["L0H0"] and out.heads[0].attention is not None


def test_least_prompts_and_groups(sess: Session) -> None:
    """The same induction prompts marked "most" and "least": the induction head gets every "most"
    prompt and no "least" one; with the previous token as the only other candidate the
    previous-token head gets the "least" ones (it attends to that token, not the target)."""
    base = _induction_prompts(12, seed=3)
    prompts = [{**p, "group": "most"} for p in base]
    for p in base:
        text = p["text"]
        prev = text[-2]  # the token before the query: where the previous-token head looks
        prompts.append({"text": text, "key": p["key"], "candidates": [p["key"], prev],
                        "expect": "least", "group": "least"})  # fmt: skip
    r = evaluate_prompts(sess, prompts)
    by = {h.head: h for h in r.heads}
    ind, prev_head = by["L1H0"], by["L0H0"]
    assert ind.accuracy == pytest.approx(0.5)
    assert ind.groups is not None and list(ind.groups) == ["most", "least"]
    assert ind.groups["most"].accuracy == 1.0 and ind.groups["least"].accuracy == 0.0
    assert ind.groups["most"].n == ind.groups["least"].n == 12
    assert ind.groups["least"].attention_mean == pytest.approx(ind.groups["most"].attention_mean)
    assert ind.correct == [True] * 12 + [False] * 12
    assert prev_head.groups is not None and prev_head.groups["least"].accuracy == 1.0
    assert prev_head.groups["most"].accuracy == 0.0
    assert [p.expect for p in r.prompts] == ["most"] * 12 + ["least"] * 12
    text = prompt_set_text(r)
    assert "least on 12 prompts" in text and "by group" in text


def test_bad_prompts(sess: Session) -> None:
    with pytest.raises(InputError, match="not in the prompt"):
        evaluate_prompts(sess, [{"text": "abcdefa", "key": "z"}])
    with pytest.raises(InputError, match="after the query"):
        evaluate_prompts(sess, [{"text": "abcdefa", "key": "f", "query": "c"}])
    with pytest.raises(InputError, match="not JSON"):
        evaluate_prompts(sess, ["{text"])
    with pytest.raises(InputError, match="no prompts"):
        evaluate_prompts(sess, [])
    op = next(o for o in OPERATIONS if o.name == "prompt-set")
    with pytest.raises(ValueError, match="prompts or a preset"):
        op.request.model_validate({})


def test_country_city_sets() -> None:
    countries = load_countries()
    assert len(countries) >= 30 and all(len(c) == 5 for c in countries.values())
    prompts = odd_one_out(countries)
    assert len(prompts) == 5 * len(countries)
    owner = {city: c for c, cities in countries.items() for city in cities}
    for p in prompts:
        country = p.text.rsplit(" in ", 1)[1]
        assert p.text.endswith(f"are all cities in {country}") and p.group == country
        assert p.candidates is not None and len(p.candidates) == 5
        assert owner[p.key] != country
        assert sorted(owner[c] == country for c in p.candidates) == [False] + [True] * 4
        assert all(c in p.text for c in p.candidates)
    queries, keys, groups = country_city_geometry(countries)
    assert len(queries) == len(countries) and len(keys) == len(groups) == 5 * len(countries)
    assert queries[0] == f"The country [[{next(iter(countries))}]]"
    with pytest.raises(InputError, match=">= 2 cities"):
        load_countries_from({"France": ["Paris"]})


@pytest.fixture(scope="module")
def tiny_sess() -> Session:
    return Session(tiny_adapter("llama"))


def test_country_swap_set(tiny_sess: Session) -> None:
    countries = load_countries()
    owner = {city: c for c, cities in countries.items() for city in cities}
    prompts = country_swap(countries)
    odd = odd_one_out(countries)
    assert len(prompts) == 2 * len(odd) == 10 * len(countries)
    for i, base in enumerate(odd):
        a, b = prompts[2 * i], prompts[2 * i + 1]
        # the same cities and marked city; the country is the original, then the city's own
        assert a.text == base.text and a.key == b.key == base.key
        assert a.candidates == b.candidates == base.candidates
        assert (a.group, a.expect, b.group, b.expect) == ("odd", "most", "own", "least")
        assert b.text == a.text.removesuffix(base.group or "") + owner[b.key]
        assert owner[b.key] != base.group
    # every prompt marks the country's last token as the query and the marked city's last token
    # as the key, on a real tokenizer
    tok = tiny_sess.adapter.tokens
    for p in prompts[:40]:
        ids, pos = _locate(tiny_sess, p)
        _, offsets = tok.encode_with_offsets(p.text)
        country = p.text.rsplit(" in ", 1)[1]
        assert pos.query == len(ids) - 1 and offsets[pos.query][1] == len(p.text)
        start = p.text.index(p.key)
        assert offsets[pos.key][1] == start + len(p.key) and pos.group in ("odd", "own")
        assert len(pos.candidates) == 5 and pos.key in pos.candidates
        assert p.text.endswith(country)


def test_year_sweep_set(tiny_sess: Session) -> None:
    years = load_years()
    prompts = year_sweep(years)
    assert [t.name for t in years.templates] == ["plain", "after 1914"]
    assert len(prompts) == 2 * 1000 and prompts[0].text.endswith(" 1000")
    groups = {p.group for p in prompts}
    assert len(groups) == 20 and "plain 1900s" in groups and "after 1914 1000s" in groups
    tok = tiny_sess.adapter.tokens
    for p in prompts[::97]:
        year = p.text.rsplit(" ", 1)[1]
        ids, pos = _locate(tiny_sess, p)
        _, offsets = tok.encode_with_offsets(p.text)
        # the query is the year's last digit, the key the token holding its first digit: in the
        # "after 1914" template not the 1 of 1914
        assert pos.query == len(ids) - 1 and pos.query_token == year[-1]
        assert pos.key_token == year[0] and offsets[pos.key][0] == len(p.text) - len(year)
        assert p.candidates is None and p.expect == "most"
    ys = YearSet.model_validate(
        {"templates": [{"name": "x", "text": "In {year} it rained"}], "start": 5, "stop": 7}
    )
    with pytest.raises(InputError, match="ends in its one"):
        year_sweep(ys)
    ys = YearSet.model_validate(
        {"templates": [{"name": "x", "text": "In {year}"}], "start": 9, "stop": 5}
    )
    with pytest.raises(InputError, match="empty"):
        year_sweep(ys)
    assert set(PRESETS) == {"country-odd-one-out", "country-swap", "year-sweep"}
    assert len(preset("country-swap")) == 370 and len(preset("year-sweep")) == 2000
    with pytest.raises(InputError, match="presets: "):
        preset("nope")


def load_countries_from(data: dict):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
    return load_countries(f.name)


def test_grouped_geometry_own_vs_other() -> None:
    """two_match_model: queries in QA / QB point along q dims 0 / 1, keys in KA / KB along k
    dims 0 / 1. Mean-subtracted, each query is parallel to its own group's keys and
    anti-parallel to the other group's: own mean +1, other mean -1."""
    sess = Session(planted_adapter(two_match_model()))
    queries = ["q[[!]]", "q[[+]]"]  # ids 3 (QA) and 13 (QB)
    keys = ["k[[5]]", "k[[6]]", "k[[?]]", "k[[@]]"]  # KA, KA, KB, KB
    r = qk_geometry(sess, queries, keys, ["L0H0"], key_groups=[0, 0, 1, 1])
    m = r.heads["L0H0"]
    assert m.own_mean == pytest.approx(1.0, abs=1e-4)
    assert m.other_mean == pytest.approx(-1.0, abs=1e-4)
    cos = m.cosine
    own = [cos[g][j] for j, g in enumerate([0, 0, 1, 1])]
    assert m.own_mean == pytest.approx(sum(own) / 4)
    assert r.residual.own_mean is not None and m.diag_mean is None
    with pytest.raises(InputError, match="key groups"):
        qk_geometry(sess, queries, keys, ["L0H0"], key_groups=[0, 1])
    with pytest.raises(InputError, match="query indices"):
        qk_geometry(sess, queries, keys, ["L0H0"], key_groups=[0, 0, 1, 2])


def test_geometry_request_takes_a_preset_or_prompts() -> None:
    op = next(o for o in OPERATIONS if o.name == "geometry")
    assert op.request.model_validate({"preset": "country-city"}).preset == "country-city"
    ok = op.request.model_validate({"queries": ["a [[b]]"], "keys": ["c [[d]]"], "key_groups": [0]})
    assert ok.key_groups == [0]
    for bad in ({}, {"preset": "country-city", "queries": ["a [[b]]"]}, {"queries": ["a [[b]]"]}):
        with pytest.raises(ValueError):
            op.request.model_validate(bad)
