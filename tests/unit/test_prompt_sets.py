"""Prompt-set experiments (headscope.analysis.prompt_sets) on planted models: the induction head
wins every induction prompt and the previous-token head none; the shipped country/city sets have
the paper's shape; grouped QK geometry reports own-vs-other means that a planted head makes +1
and -1."""

from __future__ import annotations

import json
import random

import pytest

from headscope.analysis.geometry import qk_geometry
from headscope.analysis.prompt_sets import (
    country_city_geometry,
    evaluate_prompts,
    load_countries,
    odd_one_out,
    read_prompts,
)
from headscope.analysis.session import Session
from headscope.errors import InputError
from headscope.model import ModelAdapter
from headscope.operations import OPERATIONS, Context
from tests.planted import induction_model, planted_adapter, two_match_model
from tests.tiny_models import tiny_tokenizer

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
